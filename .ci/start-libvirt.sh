#!/usr/bin/env bash
# Installs Debian's libvirt (bookworm) and starts its daemons by hand (no
# systemd here), for the tests that make real `virsh save` images. libvirt's
# default network is never started: the test domains have no network
# interface, and the daemon listens on its unix socket only. Idempotent; root.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
if ! command -v virsh >/dev/null 2>&1 || ! command -v libvirtd >/dev/null 2>&1 || ! id libvirt-qemu >/dev/null 2>&1; then
  $SUDO apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients >/dev/null
fi
$SUDO rm -f /etc/libvirt/qemu/networks/autostart/*.xml
$SUDO mkdir -p /run/libvirt /var/log/libvirt
up() { virsh -c qemu:///system version >/dev/null 2>&1; }
if ! up; then
  # A daemon that does not answer (or is still shutting down) is replaced.
  for d in libvirtd virtlogd; do
    if pgrep -x "$d" >/dev/null; then
      $SUDO pkill -x "$d" || true
      for _ in $(seq 50); do pgrep -x "$d" >/dev/null || break; sleep 0.2; done
    fi
  done
  $SUDO virtlogd -d
  $SUDO libvirtd -d
fi
# The first start probes QEMU's capabilities, which takes a while under TCG.
for _ in $(seq 240); do
  up && exit 0
  sleep 0.5
done
echo "start-libvirt: libvirtd did not come up in 2 minutes; see /var/log/libvirt/libvirtd.log" >&2
exit 1
