#!/usr/bin/env bash
# Runs every test of savedir on a fresh Debian bookworm machine: installs what
# the tests need (QEMU 10 from bookworm-backports, the package with its test
# extras), then the Rust unit tests and the pytest suite against real QEMU.
# Run from anywhere inside the repository, as root (or with sudo at hand).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  bash .ci/install-qemu.sh
  bash .ci/start-libvirt.sh
else
  sudo bash .ci/install-qemu.sh
  sudo bash .ci/start-libvirt.sh
fi

echo "== Rust unit tests"
cargo test --no-default-features --quiet

echo "== build and install savedir"
python3 -m pip install --quiet --disable-pip-version-check '.[test]'

echo "== pytest"
# Run from tests/ so that `import savedir` finds the installed package, not python/.
cd tests
python3 -m pytest -q -p no:cacheprovider "$@"
