"""Tests of the QEMU test harness itself (tests/qemu_harness.py, conftest.py)."""

from __future__ import annotations

import time

import pytest

import qemu_harness as h

pytestmark = pytest.mark.qemu

# Far below anything that could pass for a hang, far above what a load takes
# (~0.1-0.2 s for these streams on TCG).
QUICK = 30.0


def test_streams_cover_every_axis(qemu_streams):
    assert {s.machine for s in qemu_streams} == {"pc", "q35"}
    assert {s.uri_kind for s in qemu_streams} == {"exec", "file"}
    assert {s.run_seconds > 0 for s in qemu_streams} == {True, False}
    assert {s.full_devices for s in qemu_streams} == {True, False}
    assert len({s.name for s in qemu_streams}) == len(qemu_streams)


def test_streams_are_real_and_small(qemu_streams):
    for s in qemu_streams:
        data = s.read_bytes()
        assert data[:8] == b"QEVM\x00\x00\x00\x03", s.name
        assert h.STREAM_MAGIC == b"QEVM\x00\x00\x00\x03"
        # QEMU_VM_CONFIGURATION (0x07) with the machine type comes next
        assert data[8] == 0x07, s.name
        n = int.from_bytes(data[9:13], "big")
        machine_type = data[13:13 + n].decode()
        assert machine_type.startswith("pc-q35-" if s.machine == "q35" else "pc-i440fx-"), s.name
        assert h.stream_end_ok(s.path), s.name
        assert len(data) < 8 << 20, (s.name, len(data))
        names = [d["name"] for d in h.vmdesc(data)["devices"]]
        if s.full_devices:
            for dev in ("virtio-net", "e1000", "virtio-blk", "xhci", "usb-ptr", "virtio-balloon", "vga"):
                assert any(n.endswith("/" + dev) for n in names), (s.name, dev, names)
        else:
            assert not any("virtio" in n for n in names), (s.name, names)


def test_copy_to_gives_a_writable_copy(qemu_streams, tmp_path):
    s = qemu_streams[0]
    copy = s.copy_to(tmp_path)
    assert copy != s.path and copy.read_bytes() == s.path.read_bytes()
    with open(copy, "r+b") as f:
        f.write(b"X")
    assert s.path.read_bytes()[:1] == b"Q"


@pytest.mark.parametrize("uri_kind", ["exec", "file"])
def test_pristine_streams_load_back(qemu_streams, qemu_load, uri_kind):
    for s in qemu_streams:
        t0 = time.monotonic()
        st = qemu_load(s, uri_kind=uri_kind, timeout=QUICK)
        assert time.monotonic() - t0 < QUICK
        assert st["running"] is False, (s.name, st)
        assert st["status"] in h.LOADED_STATES, (s.name, st)
        # a source that never ran stays in "prelaunch" on the destination
        assert st["status"] == ("paused" if s.run_seconds > 0 else "prelaunch"), (s.name, st)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["idstr", "footer", "payload"])
def test_flipped_device_byte_fails_fast(qemu_streams, qemu_load, tmp_path, where):
    for s in [s for s in qemu_streams if s.full_devices][:2]:
        pristine = s.read_bytes()
        sections = h.device_sections(pristine)
        assert len(sections) > 20, (s.name, sections)
        by_name = {name.rsplit("/", 1)[-1]: off for off, name, _, _ in sections}
        ram_end = sections[0][0]
        if where == "idstr":
            # the section in the middle of the device state: its name
            off, name, _, _ = sections[len(sections) // 2]
            target = off + 1 + 4 + 1 + 1
            expect = "Unknown savevm section"
        elif where == "footer":
            # the 0x7e that closes the section before virtio-blk's
            target = by_name["virtio-blk"] - 5
            expect = "Missing section footer"
        else:
            # 200 bytes into virtio-net's section: its PCI config space,
            # whose read-only bits QEMU checks on load
            target = by_name["virtio-net"] + 200
            full_name = next(n for _, n, _, _ in sections if n.endswith("/virtio-net"))
            expect = f"error while loading state for instance 0x0 of device '{full_name}'"
        assert target > ram_end
        bad = s.copy_to(tmp_path / s.name)
        _flip(bad, target)
        for kind in ("exec", "file"):
            t0 = time.monotonic()
            with pytest.raises(h.MigrationError) as info:
                qemu_load(s, bad, uri_kind=kind, timeout=QUICK)
            assert time.monotonic() - t0 < QUICK
            msg = str(info.value)
            assert "failed" in msg and "load of migration failed" in msg, msg
            assert expect in msg, msg
        assert s.read_bytes() == pristine  # the pristine file was not touched


def test_truncated_stream_fails_fast(qemu_streams, qemu_load, tmp_path):
    s = next(s for s in qemu_streams if s.full_devices)
    data = s.read_bytes()
    cut = h.device_sections(data)[-3][0] + 3
    bad = tmp_path / "truncated.mig"
    bad.write_bytes(data[:cut])
    assert not h.stream_end_ok(bad)
    with pytest.raises(h.MigrationError, match="load of migration failed"):
        qemu_load(s, bad, uri_kind="file", timeout=QUICK)


def test_failed_load_with_qemu_exiting_raises(qemu_streams, tmp_path):
    """With exit-on-error left at QEMU's default (true), QEMU exits on a bad
    stream; the harness reports that instead of waiting."""
    s = next(s for s in qemu_streams if not s.full_devices)
    bad = s.copy_to(tmp_path)
    off, _, _, _ = h.device_sections(s.read_bytes())[2]
    _flip(bad, off + 7)
    t0 = time.monotonic()
    with h.VM(s.machine, s.devices, incoming="defer") as vm:
        vm.cmd("migrate-incoming", uri="file:" + str(bad))
        with pytest.raises(h.QEMUExited, match="Unknown savevm section"):
            vm.wait_migration("load", timeout=QUICK)
    assert vm.exitcode == 1
    assert time.monotonic() - t0 < QUICK


def test_qmp_basics():
    with h.VM("pc") as vm:
        assert vm.status() == {"status": "prelaunch", "running": False}
        with pytest.raises(h.QMPError) as info:
            vm.cmd("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        vm.set_capabilities({"events": True})
        caps = {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}
        assert caps["events"] is True
        vm.set_parameters({"max-bandwidth": 1 << 30})
        assert vm.cmd("query-migrate-parameters")["max-bandwidth"] == 1 << 30
        vm.cont()
        assert vm.status()["running"] is True
        vm.stop()
        assert vm.status() == {"status": "paused", "running": False}
    assert vm.exitcode == 0
    assert "qemu-system-x86_64" in vm.log()
