"""Real `virsh save` images: Debian's libvirt (bookworm, 9.0) driving QEMU 10.

`.ci/start-libvirt.sh` installs libvirt and starts its daemon. The domains
have no network interface. savedir finds the stream behind libvirt's header,
shows the domain, indexes the image, and libvirt restores the indexed image
(plainly, and through its I/O helper with --bypass-cache).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import savedir

VIRSH = ["virsh", "-q", "-c", "qemu:///system"]

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <features><acpi/></features>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def virsh(*args: str, check: bool = True) -> str:
    p = subprocess.run(VIRSH + list(args), capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout.strip()


@pytest.fixture(scope="module")
def libvirt() -> None:
    if shutil.which("virsh") is None or subprocess.run(VIRSH + ["version"], capture_output=True).returncode != 0:
        pytest.fail("libvirt is not running: run .ci/start-libvirt.sh (as root)", pytrace=False)


@pytest.mark.parametrize("machine,running", [("pc", False), ("q35", True)])
def test_virsh_save_index_restore(libvirt: None, tmp_path: Path, machine: str, running: bool) -> None:
    name = f"savedir-test-{uuid.uuid4().hex[:8]}"
    dom_uuid = str(uuid.uuid4())
    xml = tmp_path / "dom.xml"
    xml.write_text(DOMAIN.format(name=name, uuid=dom_uuid, machine=machine))
    image = tmp_path / "vm.save"
    try:
        virsh("create", str(xml), *([] if running else ["--paused"]))
        if running:
            time.sleep(2)  # the firmware runs
        virsh("save", name, str(image))
        original = image.read_bytes()
        assert original[:16] == b"LibvirtQemudSave"
        with savedir.open(image) as f:
            assert f.container is not None
            assert f.container["domain_name"] == name and f.container["domain_uuid"] == dom_uuid
            assert f.container["format"] == 0 and f.container["was_running"] == running
            assert f.stream_start > 92 and f.machine_type and machine in f.machine_type
        r = savedir.index(image)
        assert r.written
        assert savedir.verify(image, deep=True).ok
        p = subprocess.run(["savedir", "ls", str(image)], capture_output=True, text=True)
        assert name in p.stdout and dom_uuid in p.stdout
        assert image.read_bytes()[: len(original)] == original
        # libvirt restores the indexed image, directly and through its helper.
        for extra in ([], ["--bypass-cache"]):
            virsh("restore", str(image), "--paused", *extra)
            assert virsh("domstate", name) == "paused"
            virsh("destroy", name)
        savedir.strip(image)
        assert image.read_bytes() == original
    finally:
        virsh("destroy", name, check=False)
