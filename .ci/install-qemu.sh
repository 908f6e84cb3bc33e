#!/usr/bin/env bash
# Installs Debian's qemu-system-x86 10.x from bookworm-backports (adding that
# suite to apt's sources, on the same mirror the machine already uses, when it
# is missing). Idempotent; run as root.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

want_major=10
have_qemu() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
  [ "${v:-0}" -ge "$want_major" ]
}
if have_qemu; then
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # Reuse the URI of the mirror that serves the bookworm suite already.
  uri=$(awk '
    /^URIs:/ {u=$2}
    /^Suites:/ && / bookworm( |$)/ && u != "" {print u; exit}
  ' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  if [ -z "$uri" ]; then
    echo "install-qemu: cannot find the Debian mirror in apt's sources" >&2
    exit 1
  fi
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports --no-install-recommends \
  qemu-system-x86 qemu-system-data qemu-utils ovmf seabios ipxe-qemu >/dev/null
have_qemu || { echo "install-qemu: qemu-system-x86_64 >= $want_major not installed" >&2; exit 1; }
