"""Streams written by an older producer: Debian bookworm's own QEMU 7.2.

`.ci/install-qemu.sh` unpacks it under /opt/savedir-test/qemu-7.2. Its
streams have no SWITCHOVER_START command and a vmdesc without the
configuration; savedir must index them, and QEMU (7.2, and 10 with the
7.2 machine type) must still load the indexed files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import qemu_harness as h
import savedir
import state_check

ROOT = Path("/opt/savedir-test/qemu-7.2")
BINARY = ROOT / "usr/bin/qemu-system-x86_64"
FIRMWARE = ["-L", str(ROOT / "usr/share/qemu"), "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"]


@pytest.fixture
def qemu72(monkeypatch: pytest.MonkeyPatch) -> None:
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: run .ci/install-qemu.sh", pytrace=False)
    monkeypatch.setattr(h, "QEMU_BINARY", str(BINARY))
    monkeypatch.setenv("QEMU_MODULE_DIR", str(ROOT / "usr/lib/x86_64-linux-gnu/qemu"))


@pytest.mark.parametrize("machine,full,run_seconds", [("pc", False, 0), ("q35", True, 2.0)])
def test_qemu_7_2_streams(qemu72: None, tmp_path: Path, machine: str, full: bool, run_seconds: float) -> None:
    devices = FIRMWARE + (h.full_devices(tmp_path) if full else [])
    orig = tmp_path / "orig.sav"
    h.save_stream(orig, machine, devices, uri_kind="exec", run_seconds=run_seconds)
    p = tmp_path / "vm.sav"
    shutil.copyfile(orig, p)
    r = savedir.index(p)
    assert r.written
    assert savedir.verify(p, deep=True).ok
    with savedir.open(p) as f:
        assert f.machine_type is not None and f.machine_type.endswith("-7.2"), f.machine_type
        assert not [e for e in f.entries if e.kind == "command"], "7.2 sends no SWITCHOVER_START"
        fulls = [(e.name, e.instance_id) for e in f.entries if e.kind == "full"]
        assert fulls == [(d["name"], d["instance_id"]) for d in f.vmdesc["devices"]]
        assert "configuration" not in f.vmdesc
        assert state_check.check_decodes(f) > 20
        scanned = [(e.kind, e.offset, e.size) for e in savedir.open(p, scan=True).entries]
        assert scanned == [(e.kind, e.offset, e.size) for e in f.entries]
    assert p.read_bytes()[: orig.stat().st_size] == orig.read_bytes()
    # QEMU 7.2 loads the indexed file...
    st = h.load_stream(p, machine, devices, uri_kind="exec")
    assert st["status"] in h.LOADED_STATES, st


def test_qemu_10_loads_an_indexed_7_2_stream(qemu72: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "vm.sav"
    h.save_stream(p, "pc-i440fx-7.2", FIRMWARE, uri_kind="exec")
    savedir.index(p)
    monkeypatch.setattr(h, "QEMU_BINARY", "qemu-system-x86_64")
    monkeypatch.delenv("QEMU_MODULE_DIR")
    st = h.load_stream(p, "pc-i440fx-7.2", [], uri_kind="file")
    assert st["status"] in h.LOADED_STATES, st
    savedir.strip(p)
    assert savedir.verify(p).check == "trailer"
