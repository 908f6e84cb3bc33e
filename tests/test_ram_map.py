"""Guest RAM through savedir's page map, proved against QEMU itself.

Each stream is loaded into a fresh QEMU (paused), which then writes its own
``dump-guest-memory`` (ELF, paging off); every byte of ``pc.ram`` that the
dump holds must equal what savedir reads for the same address, through a
walk of the records, a stored page map and (for mapped-ram) the bitmaps.
The guest is the boot sector of stream_kinds.py, which keeps rewriting
~9 MiB of RAM, so live saves send pages again and XBZRLE sends deltas.

On a 32 MiB ``pc`` guest, guest-physical address ``a`` is byte ``a`` of
``pc.ram`` for every ``a`` below the RAM size outside [0xa0000, 0x100000);
this file relies on only that, the full layout is tested elsewhere.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import qemu_harness as h
import savedir
import stream_kinds as sk

pytestmark = pytest.mark.qemu

CHUNK = 1 << 20


def elf_segments(path: Path) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(e_machine, [(p_type, p_offset, p_paddr, p_filesz)]) of an ELF64 core."""
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2, f"{path}: not an ELF64 file"
        (machine,) = struct.unpack_from("<H", head, 0x12)
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    segs = []
    for i in range(phnum):
        p_type, _flags, off, _vaddr, paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        segs.append((p_type, off, paddr, filesz))
    return machine, segs


def read_at(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def assert_same_core(ours: Path, qemu: Path) -> None:
    """savedir's ELF core holds QEMU's loads (addresses, sizes, bytes) and notes."""
    m1, s1 = elf_segments(ours)
    m2, s2 = elf_segments(qemu)
    assert m1 == m2, (m1, m2)
    loads1 = [(p, n) for t, _, p, n in s1 if t == 1]
    loads2 = [(p, n) for t, _, p, n in s2 if t == 1]
    assert loads1 == loads2, (loads1, loads2)
    for (t1, o1, p1, n1), (t2, o2, p2, n2) in zip([s for s in s1 if s[0] == 1], [s for s in s2 if s[0] == 1]):
        for at in range(0, n1, CHUNK):
            k = min(CHUNK, n1 - at)
            assert read_at(ours, o1 + at, k) == read_at(qemu, o2 + at, k), f"load at {p1:#x} differs near {p1 + at:#x}"
    notes1 = [read_at(ours, o, n) for t, o, _, n in s1 if t == 4]
    notes2 = [read_at(qemu, o, n) for t, o, _, n in s2 if t == 4]
    assert notes1 == notes2


def elf_loads(path: Path) -> list[tuple[int, int, int]]:
    """(p_offset, p_paddr, p_filesz) of every PT_LOAD of an ELF64 core."""
    return [(off, paddr, size) for t, off, paddr, size in elf_segments(path)[1] if t == 1]


def pc_ram_pieces(loads: list[tuple[int, int, int]], ram_size: int) -> Iterator[tuple[int, int, int]]:
    """(file offset, guest address, length) of the dump's bytes that are pc.ram
    at offset == address (below the RAM size, outside the legacy window)."""
    for off, paddr, size in loads:
        lo, hi = paddr, min(paddr + size, ram_size)
        for a, b in ((lo, min(hi, 0xA0000)), (max(lo, 0x100000), hi)):
            if a < b:
                yield off + (a - paddr), a, b - a


def dump_of(vm: h.VM, path: Path) -> None:
    vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}")


def compare_with_dump(save: Path, dump: Path, ram_size: int, **open_kw: Any) -> int:
    """Compares savedir's pc.ram with the dump; returns the bytes compared."""
    loads = elf_loads(dump)
    compared = 0
    with savedir.open(save, **open_kw) as f, open(dump, "rb") as d:
        blk = f.ram["pc.ram"]
        assert blk.size == ram_size
        for off, gpa, n in pc_ram_pieces(loads, ram_size):
            for at in range(0, n, CHUNK):
                k = min(CHUNK, n - at)
                d.seek(off + at)
                want = d.read(k)
                got = blk.read(gpa + at, k)
                if got != want:
                    bad = next(i for i in range(k) if got[i] != want[i])
                    pytest.fail(f"{save}: pc.ram byte 0x{gpa + at + bad:x} is {got[bad]:#x}, QEMU's dump has {want[bad]:#x}")
                compared += k
    assert compared > ram_size // 2, compared
    return compared


def loaded_dump(m: sk.Made, tmp: Path) -> Path:
    dump = tmp / f"{m.kind}.dump"
    m.load(inspect=lambda vm: dump_of(vm, dump))
    return dump


def check_all_ways(m: sk.Made, dump: Path, tmp: Path, ram_size: int = 32 << 20) -> dict[str, Any]:
    """The unindexed save (a walk), the save indexed with its map, and
    without; each equals the dump; stored and walked maps read the same."""
    facts: dict[str, Any] = {}
    with savedir.open(m.path) as f:
        facts["unindexed"] = f.ram.source
    compare_with_dump(m.path, dump, ram_size)
    with_map = m.path.with_name(m.path.stem + "-map.sav")
    no_map = m.path.with_name(m.path.stem + "-nomap.sav")
    shutil.copyfile(m.path, with_map)
    shutil.copyfile(m.path, no_map)
    r = savedir.index(with_map)
    facts["map_size"] = r.ram_map_size
    assert savedir.index(no_map, ram_map=False).ram_map_size == 0
    assert savedir.verify(with_map, deep=True), savedir.verify(with_map, deep=True).message
    with savedir.open(with_map) as f:
        facts["indexed"] = f.ram.source
    with savedir.open(no_map) as f:
        assert f.ram.source in ("scanned", "mapped-ram")
    compare_with_dump(with_map, dump, ram_size)
    compare_with_dump(with_map, dump, ram_size, mmap=False)
    with savedir.open(with_map) as a, savedir.open(no_map) as b:
        for name in a.ram:
            x, y = a.ram[name], b.ram[name]
            assert (x.pages_present, x.pages_zero) == (y.pages_present, y.pages_zero), name
            assert (x.present() == y.present()).all()
            assert x.read(0, x.size) == y.read(0, y.size), name
    # QEMU still loads the file with the map in it.
    st = m.load(with_map)
    assert st["status"] in h.LOADED_STATES
    return facts


def test_paused_save(tmp_path: Path) -> None:
    setup = sk.booted_setup(tmp_path)
    save = tmp_path / "paused.sav"
    dump = tmp_path / "paused.dump"
    sk.save(setup, sk.file_uri(save), run_seconds=1.5, before_migrate=lambda vm: dump_of(vm, dump))
    m = sk.Made(kind="paused", path=save, setup=setup)
    facts = check_all_ways(m, dump, tmp_path)
    assert facts["unindexed"] == "scanned" and facts["indexed"] == "stored", facts
    # A paused save sends each page once, in order: few runs, a small map.
    assert facts["map_size"] < 4096, facts
    # The dump QEMU loaded from the save equals the one it took before.
    again = loaded_dump(m, tmp_path)
    compare_with_dump(save, again, 32 << 20)
    # savedir's ELF core is QEMU's dump of that moment: loads and vCPU notes.
    ours = tmp_path / "ours.elf"
    with savedir.open(save) as f:
        f.ram.write_elf(ours)
    assert_same_core(ours, dump)


@pytest.mark.parametrize("variant", ["plain", "xbzrle"])
def test_live_save(tmp_path: Path, variant: str) -> None:
    m = sk.make_live(tmp_path, variant)
    dump = loaded_dump(m, tmp_path)
    with savedir.open(m.path) as f:
        blk = f.ram["pc.ram"]
        # Pages sent again: more page records than pages.
        assert blk.pages_present > 0
    facts = check_all_ways(m, dump, tmp_path)
    assert facts["indexed"] == "stored"
    if variant == "xbzrle":
        assert m.info is not None and m.info.query_migrate["xbzrle-cache"]["pages"] > 0


def test_postcopy_switched(tmp_path: Path) -> None:
    """A migration that really switches to postcopy: the stream carries
    POSTCOPY_RAM_DISCARD commands and pages sent after the switch. The
    destination QEMU that received it is the oracle (it stays paused)."""
    setup = sk.booted_setup(tmp_path, caps={"postcopy-ram": True})
    rec = tmp_path / "postcopy.sav"
    dump = tmp_path / "postcopy.dump"
    status = sk.migrate_via_proxy(
        setup, rec, live=sk.LivePlan(start_postcopy=True), dest_inspect=lambda vm: dump_of(vm, dump)
    )
    assert status["status"] in h.LOADED_STATES, status
    with savedir.open(rec) as f:
        names = [e.command_name for e in f.entries if e.kind == "command"]
    assert "PACKAGED" in names, names  # device state and POSTCOPY_RUN travel inside it
    assert "POSTCOPY_RAM_DISCARD" in names, names
    compare_with_dump(rec, dump, 32 << 20)
    savedir.index(rec)
    assert savedir.verify(rec, deep=True)
    with savedir.open(rec) as f:
        assert f.ram.source == "stored"
    compare_with_dump(rec, dump, 32 << 20)


def test_mapped_ram(tmp_path: Path) -> None:
    m = sk.make_mapped_ram(tmp_path, channels=2)
    dump = loaded_dump(m, tmp_path)
    with savedir.open(m.path) as f:
        assert f.ram.source == "mapped-ram"
        blk = f.ram["pc.ram"]
        arr = blk.array()
        assert arr.shape == (blk.size,) and not arr.flags.writeable
        pages = blk.present()[:64]
        got = blk.gather(pages)
        for i, p in enumerate(pages):
            assert bytes(got[i]) == bytes(arr[p * 4096 : (p + 1) * 4096]) == bytes(blk.page(int(p)))
        # Into an array of the caller's, from a list or a strided array.
        buf = np.full((len(pages), 4096), 0x5A, np.uint8)
        assert blk.gather([int(p) for p in pages], out=buf) is buf and (buf == got).all()
        twice = np.repeat(pages, 2)
        assert (blk.gather(twice[::2]) == got).all()
        assert blk.gather([]).shape == (0, 4096)
        for bad, exc in ((np.zeros((len(pages), 4095), np.uint8), ValueError), (buf[:, ::2], ValueError),
                         (np.zeros((len(pages), 4096), np.int16), TypeError)):
            with pytest.raises(exc):
                blk.gather(pages, out=bad)
        for pages_bad, exc in (([-1], ValueError), (np.array([1.0]), TypeError), ([blk.pages], savedir.RamError)):
            with pytest.raises(exc):
                blk.gather(pages_bad)
    facts = check_all_ways(m, dump, tmp_path)
    # mapped-ram needs no stored map: its bitmaps place every page.
    assert facts["map_size"] == 0 and facts["indexed"] == "mapped-ram", facts


def test_damaged_map_is_refused(tmp_path: Path) -> None:
    setup = sk.booted_setup(tmp_path)
    save = tmp_path / "d.sav"
    sk.save(setup, sk.file_uri(save), run_seconds=1.0)
    r = savedir.index(save)
    assert r.ram_map_size > 0
    size = save.stat().st_size
    map_at = r.directory_offset - r.ram_map_size
    good = save.read_bytes()
    for where in (map_at, map_at + 12, map_at + r.ram_map_size // 2, r.directory_offset - 1):
        data = bytearray(good)
        data[where] ^= 0x40
        save.write_bytes(bytes(data))
        v = savedir.verify(save)
        assert not v and v.check == "directory", (where, v)
        assert "RAM page map" in v.message, v.message
        with pytest.raises(savedir.DirectoryError):
            savedir.open(save)
    assert size == len(good)


def test_errors_name_block_and_address(tmp_path: Path) -> None:
    setup = sk.booted_setup(tmp_path)
    save = tmp_path / "e.sav"
    sk.save(setup, sk.file_uri(save))
    with savedir.open(save) as f:
        with pytest.raises(KeyError, match="no RAM block 'nope'"):
            f.ram["nope"]
        blk = f.ram["pc.ram"]
        with pytest.raises(savedir.RamError, match=r"pc\.ram.*no page 8192"):
            blk.page(8192)
        with pytest.raises(savedir.RamError, match=r"pc\.ram.*past its end"):
            blk.read(blk.size - 10, 20)
        z = blk.page(blk.pages - 1)
        assert bytes(z) == bytes(4096) and z.readonly
        assert blk.page(blk.pages - 1) is z or bytes(blk.page(blk.pages - 2)) == bytes(4096)
