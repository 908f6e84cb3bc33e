#!/usr/bin/env bash
# Runs every test of savedir on a fresh Debian bookworm machine: installs what
# the tests need (QEMU 10 from bookworm-backports), runs the Rust unit tests,
# builds the release wheel and the sdist (scripts/build-wheel.sh), installs
# the wheel with its test extras into a venv of its own (.venv-test/), and
# runs the pytest suite against real QEMU with that venv's python.
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

# Debian's own python3 makes venvs with pip only with its python3-venv package.
if ! "${PYTHON:-python3}" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get install -y -qq python3-venv >/dev/null
fi

echo "== Rust unit tests"
cargo test --no-default-features --quiet

echo "== build the wheel and the sdist (scripts/build-wheel.sh)"
built=$(bash scripts/build-wheel.sh)
SAVEDIR_WHEEL=$PWD/$(sed -n 1p <<<"$built")
SAVEDIR_SDIST=$PWD/$(sed -n 2p <<<"$built")
export SAVEDIR_WHEEL SAVEDIR_SDIST

echo "== install the wheel with the test extras into a fresh .venv-test/"
# A venv of its own: Debian's python3 refuses `pip install` outside one
# (externally-managed-environment), and the tests must see the installed
# wheel, not an editable build.
rm -rf .venv-test
"${PYTHON:-python3}" -m venv .venv-test
.venv-test/bin/python -m pip install --quiet --disable-pip-version-check "$SAVEDIR_WHEEL[test]"
export PATH="$PWD/.venv-test/bin:$PATH"

echo "== pytest"
# Run from tests/ so that `import savedir` finds the installed package, not python/.
cd tests
../.venv-test/bin/python -m pytest -q -p no:cacheprovider "$@"
