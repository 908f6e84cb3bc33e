#!/usr/bin/env bash
# Installs Debian's qemu-system-x86 10.x from bookworm-backports (adding that
# suite to apt's sources, on the same mirror the machine already uses, when it
# is missing), and unpacks bookworm's QEMU 7.2 under /opt/savedir-test for the
# tests. Idempotent; run as root.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo

want_major=10
have_qemu() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
  [ "${v:-0}" -ge "$want_major" ]
}
export DEBIAN_FRONTEND=noninteractive
if ! have_qemu; then
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
fi

# QEMU 7.2, Debian bookworm's own, unpacked beside the system's QEMU 10 for
# the tests of streams written by an older producer (run with -L and
# QEMU_MODULE_DIR pointing into the unpacked tree).
old=/opt/savedir-test/qemu-7.2
if [ ! -x "$old/usr/bin/qemu-system-x86_64" ]; then
  tmp=$(mktemp -d)
  apt-cache madison qemu-system-x86 | grep -q ' 1:7\.2' || $SUDO apt-get update -qq
  ver=$(apt-cache madison qemu-system-x86 | awk -F'|' '$2 ~ /^ *1:7\.2/ {gsub(/ /, "", $2); print $2; exit}')
  dver=$(apt-cache madison qemu-system-data | awk -F'|' '$2 ~ /^ *1:7\.2/ {gsub(/ /, "", $2); print $2; exit}')
  if [ -z "$ver" ] || [ -z "$dver" ]; then
    echo "install-qemu: Debian's QEMU 7.2 packages are not available" >&2
    exit 1
  fi
  (cd "$tmp" && apt-get download -qq "qemu-system-x86=$ver" "qemu-system-common=$ver" "qemu-system-data=$dver" 2>/dev/null)
  $SUDO mkdir -p "$old"
  for deb in "$tmp"/*.deb; do $SUDO dpkg -x "$deb" "$old"; done
  rm -rf "$tmp"
  "$old/usr/bin/qemu-system-x86_64" --version >/dev/null
fi

# Tools the tests use besides QEMU. The guest-memory tests
# (tests/linux_guest.py) build a static /init (gcc, libc6-dev), read ELF
# headers with readelf (binutils), and boot Debian's cloud kernel, which they
# fetch with apt-get download: apt must know it. tests/test_pagecache.py
# watches which flushes `index` makes (strace) and what is cached
# (util-linux's fincore).
need=""
for p in gcc libc6-dev binutils strace util-linux; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [ -n "$need" ]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep -q 'Depends: linux-image-' || $SUDO apt-get update -qq
