"""``savedir diff`` and ``savedir.diff``: what differs between two saves.

* The same paused VM saved twice (a second QEMU loads the first save and
  saves again) differs in one place at most: the RTC's CMOS time registers
  (``mc146818rtc``, ``cmos_data`` bytes 0, 2, 4, 6-9: seconds, minutes,
  hours, weekday, day, month, year). QEMU's RTC follows the host's clock by
  default (``-rtc clock=host``), and saving writes the time of the save into
  them, so two saves a second apart differ there. Everything else is equal
  byte for byte, RAM included: QEMU's virtual clocks stand still while the
  VM is paused, and the load restores the timer offsets (``timer``:
  ``cpu_ticks_offset``, ``cpu_clock_offset``) and every device's state as
  they were. With ``-rtc clock=vm`` the two saves are identical.
* A NIC's link taken down between two saves of the same state shows in
  that NIC's registers (e1000: STATUS loses LU, ICR/ICS get LSC, the PHY
  status loses its link bit), and nowhere else but the RTC's time.
* A guest that runs between two saves changes its RAM, its vCPU and the
  clocks.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

import qemu_harness as h
import savedir
import savedir.cli
import stream_kinds as sk


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = savedir.cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


def hmp(vm: h.VM, line: str) -> Any:
    return vm.cmd("human-monitor-command", **{"command-line": line})


def first_difference(a: Path, b: Path) -> int:
    """The first offset at which two files differ (what ``cmp`` reports)."""
    x, y = a.read_bytes(), b.read_bytes()
    return next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)


#: The CMOS registers that hold the time of day and the date (in the
#: order seconds, minutes, hours, weekday, day of month, month, year) and
#: the century (0x32).
RTC_TIME = {0, 2, 4, 6, 7, 8, 9, 0x32}


def unexplained(d: savedir.Diff) -> list[Any]:
    """The differences between two saves of the same paused VM that the
    RTC's time registers do not explain."""
    out: list[Any] = list(d.only_in_a) + list(d.only_in_b)
    for s in d.sections:
        if s.name != "mc146818rtc" or s.fields is None:
            out.append(s)
            continue
        for x in s.fields:
            if x.path != "cmos_data" or {i for i, (p, q) in enumerate(zip(x.a, x.b)) if p != q} - RTC_TIME:
                out.append((s.name, x))
    return out


@pytest.fixture(scope="module", params=["pc", "q35", "pc,rtc=vm"])
def saves(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A VM with two vCPUs and the full device set that ran its firmware,
    saved; that save loaded and saved again; and loaded, its e1000's link
    set down, saved again. (``rtc=vm``: the RTC follows the VM's clock.)"""
    machine, _, rtc = request.param.partition(",rtc=")
    d = tmp_path_factory.mktemp(f"diff-{machine}-{rtc or 'host'}")
    devices = tuple(h.full_devices(d)) + ("-smp", "2") + (("-rtc", f"clock={rtc}") if rtc else ())
    setup = sk.Setup(machine=machine, args=devices)
    first, again, link = d / "first.sav", d / "again.sav", d / "link.sav"
    sk.save(setup, sk.file_uri(first), run_seconds=2.0)
    sk.load(setup, sk.file_uri(first), inspect=lambda vm: vm.migrate(sk.file_uri(again)))

    def link_down(vm: h.VM) -> None:
        hmp(vm, "set_link nic1 off")
        vm.migrate(sk.file_uri(link))

    sk.load(setup, sk.file_uri(first), inspect=link_down)
    return {"machine": machine, "rtc": rtc or "host", "first": first, "again": again, "link": link}


def test_the_same_paused_vm_saved_twice_does_not_differ(saves: dict[str, Any]) -> None:
    a, b = saves["first"], saves["again"]
    d = savedir.diff(a, b)
    assert unexplained(d) == []
    if saves["rtc"] == "vm":
        assert d.same and (d.only_in_a, d.only_in_b, d.sections) == ([], [], [])
        assert a.read_bytes() == b.read_bytes()
    want = 0 if d.same else 1
    rc, out, err = cli("diff", str(a), str(b))
    assert rc == want and err == "" and (out == "") == d.same
    rc, out, err = cli("diff", str(a), str(b), "--json")
    assert rc == want and json.loads(out)["same"] is d.same


def test_a_link_change_shows_in_the_nic_fields(saves: dict[str, Any]) -> None:
    a, b = saves["first"], saves["link"]
    d = savedir.diff(a, b)
    assert not d.same and d.only_in_a == [] and d.only_in_b == []
    (s,) = [s for s in d.sections if s.name.endswith("/e1000")]
    assert unexplained(d) == [s]
    assert not s.live and s.error is None
    fields = {x.path: (x.a, x.b) for x in s.fields or []}
    status_a, status_b = fields["mac_reg[STATUS]"]
    assert status_a & 2 and status_b == status_a & ~2, fields  # E1000_STATUS_LU: link up, then down
    assert fields["mac_reg[ICR]"][1] & 4 and fields["mac_reg[ICS]"][1] & 4  # E1000_ICR_LSC: link status change
    phy_a, phy_b = fields["phy_reg[1]"]  # PHY_STATUS: its link bit (MII_SR_LINK_STATUS) goes down
    assert phy_a & 4 and not phy_b & 4
    # Everything listed differs, and the bytes first differ where cmp says.
    assert all(x.a != x.b for x in s.fields or [])
    fd = min((x.first_difference for x in d.sections if x.first_difference), key=lambda f: f["offset_a"])
    assert fd["offset_a"] == fd["offset_b"] == first_difference(a, b)
    rc, out, err = cli("diff", str(a), str(b))
    assert rc == 1, err
    assert f"mac_reg[STATUS]: {hex(status_a)} -> {hex(status_b)}" in out
    rc, out, err = cli("diff", str(a), str(b), "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["same"] is False and s.name in [x["name"] for x in doc["sections"]]
    (js,) = [x for x in doc["sections"] if x["name"] == s.name]
    assert {"path": "mac_reg[STATUS]", "keys": ["mac_reg[STATUS]"], "a": status_a, "b": status_b,
            "only_in": None} in js["fields"]


def _dump_pages(path: Path) -> dict[int, bytes]:
    """Guest-physical page address -> bytes, from a dump-guest-memory ELF."""
    data = path.read_bytes()
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pages = {}
    for i in range(phnum):
        p_type, _f, off, _v, paddr, size = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            for k in range(0, size, 4096):
                pages[paddr + k] = data[off + k : off + k + 4096]
    return pages


@pytest.mark.parametrize("caps", [{}, {"mapped-ram": True}], ids=["precopy", "mapped-ram"])
def test_a_running_guest_changes_ram_cpu_and_clocks(tmp_path: Path, caps: dict[str, bool]) -> None:
    """(mapped-ram: the two files line up page for page, so most pages are
    found equal by where they lie before the first differing byte.)"""
    disk = sk.make_boot_disk(tmp_path / "boot.img")
    setup = sk.Setup(machine="pc", args=("-drive", f"file={disk},format=raw,if=ide"), caps=caps)
    a, b = tmp_path / "a.sav", tmp_path / "b.sav"
    da, db = tmp_path / "a.elf", tmp_path / "b.elf"
    with setup.vm() as vm:
        vm.cont()
        time.sleep(1.5)  # the BIOS boots the sector, which then writes RAM in a loop
        vm.stop()
        vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{da}")
        vm.migrate(sk.file_uri(a))
        vm.cont()
        time.sleep(0.5)
        vm.stop()
        vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{db}")
        vm.migrate(sk.file_uri(b))
    # Exactly the pages QEMU's own dumps of the two moments say differ.
    pa, pb = _dump_pages(da), _dump_pages(db)
    assert pa.keys() == pb.keys()
    changed = sorted(g for g in pa if pa[g] != pb[g])
    assert changed, "the guest changed no page"
    want: list[tuple[int, int]] = []
    for g in changed:
        if want and want[-1][1] == g:
            want[-1] = (want[-1][0], g + 4096)
        else:
            want.append((g, g + 4096))
    for indexed in (False, True):
        if indexed:
            savedir.index(a)
            savedir.index(b)
        d = savedir.diff(a, b)
        names = {s.name: s for s in d.sections}
        ram = names["ram"]
        assert ram.live and ram.fields is None and ram.first_difference is not None
        assert ram.pages is not None
        assert [tuple(r) for r in ram.pages["ranges"]] == want, (ram.pages["ranges"][:5], want[:5])
        assert ram.pages["pages"] >= len(changed)
    cpu = names["cpu"]
    assert cpu.fields and any(x.path.startswith(("env.regs", "env.eip", "env.tsc")) for x in cpu.fields)
    assert "timer" in names
    rc, out, err = cli("diff", str(a), str(b))
    assert rc == 1 and "ram (instance 0): bytes differ from payload byte" in out


def test_sections_only_one_save_has(qemu_stream_by_name: dict[str, Any]) -> None:
    pc, q35 = qemu_stream_by_name["pc-full-exec-paused"], qemu_stream_by_name["q35-full-file-paused"]
    d = savedir.diff(pc.path, q35.path)
    only_a = {x["name"] for x in d.only_in_a}
    only_b = {x["name"] for x in d.only_in_b}
    assert "0000:00:01.0/PIIX3" in only_a and "0000:00:1f.0/ICH9LPC" in only_b
    assert not only_a & only_b
    conf = next(s for s in d.sections if s.name == "configuration")
    assert {x.path for x in conf.fields or []} == {"len", "name"}
    assert savedir.diff(pc.path, pc.path).same


def test_diff_of_files_it_cannot_read_is_status_2(tmp_path: Path, qemu_stream_by_name: dict[str, Any]) -> None:
    p = qemu_stream_by_name["pc-minimal-exec-paused"].path
    rc, out, err = cli("diff", str(p), str(tmp_path / "missing.sav"))
    assert rc == 2 and "missing.sav" in err
    junk = tmp_path / "junk.sav"
    junk.write_bytes(b"not a save")
    rc, out, err = cli("diff", str(junk), str(p))
    assert rc == 2 and "not a QEMU migration stream" in err
