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
pgrep -x virtlogd >/dev/null || $SUDO virtlogd -d
pgrep -x libvirtd >/dev/null || $SUDO libvirtd -d
# The first start probes QEMU's capabilities, which takes a while under TCG.
for _ in $(seq 240); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "start-libvirt: libvirtd did not come up in 2 minutes; see /var/log/libvirt/libvirtd.log" >&2
exit 1
