"""Guest memory (issue 9) against QEMU itself, on a real Linux guest.

The saves come from tests/linux_guest.py (fixture ``guest_saves``): a pc
guest with 256 MiB and a q35 guest with 3 GiB (RAM above 4 GiB), each
dumped by QEMU (``dump-guest-memory``, ELF, paging off) and saved at the
same paused moment, and that save loaded by a second QEMU and saved again
with mapped-ram; and live, XBZRLE and postcopy-ram saves of a guest that
kept rewriting its pages, each loaded into a fresh QEMU and dumped there.
QEMU's dump is the oracle: savedir's physical view, its block reads and its
ELF must equal it byte for byte over every range QEMU dumps.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest

import physmap
import savedir
from linux_guest import MAGIC, GuestSaves, LiveSave, Snapshot

CHUNK = 64 << 20
G = 1 << 30


def snapshot_files(saves: GuestSaves) -> List[Tuple[str, Snapshot, Path]]:
    return [(f"{s.name}-{kind}", s, p) for s in saves.snapshots for kind, p in (("save", s.save), ("mapped", s.mapped))]


SNAPSHOT_IDS = ["pc-save", "pc-mapped", "q35-save", "q35-mapped"]


def pick(saves: GuestSaves, which: str) -> Tuple[Snapshot, Path]:
    for name, snap, path in snapshot_files(saves):
        if name == which:
            return snap, path
    raise KeyError(which)


def first_difference(a: bytes, b: bytes) -> int:
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    n = min(len(x), len(y))
    d = np.nonzero(x[:n] != y[:n])[0]
    return int(d[0]) if len(d) else n


def assert_equals_dump(read: Callable[[int, int], bytes], dump: physmap.Elf, what: str) -> None:
    """``read(gpa, n)`` equals the dump over every PT_LOAD, in 64 MiB pieces."""
    for ld in dump.loads:
        for gpa, want in dump.chunks(ld, CHUNK):
            got = read(gpa, len(want))
            assert len(got) == len(want) and got == want, (
                f"{what}: differs from QEMU's dump at {gpa + first_difference(got, want):#x} "
                f"(load {ld.paddr:#x}+{ld.filesz:#x})"
            )


def load_set(elf: physmap.Elf) -> List[Tuple[int, int]]:
    return sorted((ld.paddr, ld.filesz) for ld in elf.loads)


def savedir_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(["savedir", *args], stdin=subprocess.DEVNULL, timeout=900, check=False, **kw)


# ---------------------------------------------------------------------------
# the physical view


@pytest.mark.parametrize("which", SNAPSHOT_IDS)
def test_read_phys_equals_qemus_dump(guest_saves: GuestSaves, which: str) -> None:
    snap, path = pick(guest_saves, which)
    dump = physmap.Elf(snap.dump)
    with savedir.open(path) as f:
        ranges = f.ram.ranges
        assert [(r.gpa, r.size) for r in ranges] == load_set(dump), (ranges, dump.loads)
        assert all(a.gpa + a.size <= b.gpa for a, b in zip(ranges, ranges[1:]))
        assert_equals_dump(f.ram.read_phys, dump, f"{which} read_phys")
        # the same bytes through the blocks the ranges name
        for r in ranges:
            blk = f.ram[r.block]
            for done in range(0, r.size, CHUNK):
                n = min(CHUNK, r.size - done)
                assert blk.read(r.offset + done, n) == dump.read(r.gpa + done, n), (which, r, done)


def test_q35_ram_lies_above_4g(guest_saves: GuestSaves) -> None:
    with savedir.open(guest_saves.q35.save) as f:
        high = [r for r in f.ram.ranges if r.gpa >= 4 * G]
        assert [(r.gpa, r.size, r.block, r.offset) for r in high] == [(4 * G, 1 * G, "pc.ram", 2 * G)]
        assert f.ram.read_phys(4 * G, 4096) == f.ram["pc.ram"].read(2 * G, 4096)


@pytest.mark.parametrize("kind", ["live", "xbzrle", "postcopy"])
def test_streams_qemu_loads_equal_its_dump(guest_saves: GuestSaves, kind: str) -> None:
    """Last write wins and XBZRLE pages decode: the view equals what a fresh
    QEMU holds after loading the same stream."""
    ls: LiveSave = guest_saves.live[kind]
    dump = physmap.Elf(ls.dump)
    with savedir.open(ls.save) as f:
        assert [(r.gpa, r.size) for r in f.ram.ranges] == load_set(dump)
        assert_equals_dump(f.ram.read_phys, dump, f"{kind} read_phys")


def test_read_phys_many(guest_saves: GuestSaves) -> None:
    snap = guest_saves.q35
    dump = physmap.Elf(snap.dump)
    rng = np.random.default_rng(9)
    gpas = []
    for ld in dump.loads:
        gpas += [ld.paddr + int(o) for o in rng.integers(0, ld.filesz - 100, size=50)]
    with savedir.open(snap.save) as f:
        got = f.ram.read_phys_many(np.array(gpas, dtype=np.uint64), 100)
        assert got.shape == (len(gpas), 100) and got.dtype == np.uint8
        for row, gpa in zip(got, gpas):
            assert row.tobytes() == dump.read(gpa, 100), hex(gpa)


def test_unbacked_addresses_are_refused(guest_saves: GuestSaves) -> None:
    with savedir.open(guest_saves.pc.save) as f:
        end = max(r.gpa + r.size for r in f.ram.ranges if r.block == "pc.ram")
        # (address asked for, first address not backed: either may be named)
        for gpa, n, bad in ((0xF000_0000, 16, 0xF000_0000), (end - 4096, 8192, end), (4 * G, 1, 4 * G)):
            with pytest.raises(savedir.errors.SavedirError, match=rf"(?i)({gpa:#x}|{gpa}|{bad:#x}|{bad})\b"):
                f.ram.read_phys(gpa, n)


def test_with_layout_moves_the_split(guest_saves: GuestSaves) -> None:
    with savedir.open(guest_saves.q35.save) as f:
        other = f.ram.with_layout(below_4g=1 * G)
        high = [(r.gpa, r.size, r.offset) for r in other.ranges if r.gpa >= 4 * G]
        assert high == [(4 * G, 2 * G, 1 * G)]
        assert other.read_phys(4 * G, 8192) == f.ram["pc.ram"].read(1 * G, 8192)
        assert f.ram.read_phys(4 * G, 8192) == f.ram["pc.ram"].read(2 * G, 8192)  # unchanged


# ---------------------------------------------------------------------------
# blocks


@pytest.mark.parametrize("which", ["pc-save", "pc-mapped"])
def test_blocks(guest_saves: GuestSaves, which: str) -> None:
    snap, path = pick(guest_saves, which)
    listed = physmap.ram_blocks(snap.save)  # what the RAM section lists (as QEMU sent it)
    with savedir.open(path) as f:
        ram = f.ram
        assert sorted(ram) == sorted(n for n, _ in listed)
        for name, size in listed:
            blk = ram[name]
            assert (blk.name, blk.size, blk.page_size) == (name, size, 4096)
            present = blk.present()
            assert len(present) == blk.pages_present
            # present: stored as data; zero: recorded as zero; the rest never sent
            assert blk.pages_present >= 0 and blk.pages_zero >= 0
            assert blk.pages_present + blk.pages_zero <= size // 4096
        blk = ram["pc.ram"]
        pages = blk.present()
        assert len(pages) and (np.diff(pages) > 0).all()
        # every page of pc.ram once, through gather, page and read
        gathered = blk.gather(pages)
        assert gathered.shape == (len(pages), 4096) and gathered.dtype == np.uint8
        for i in np.random.default_rng(1).choice(len(pages), size=500, replace=False):
            p = int(pages[i])
            view = blk.page(p)
            assert isinstance(view, memoryview) and view.readonly
            assert bytes(view) == gathered[i].tobytes() == blk.read(p * 4096, 4096)
        # the pages of the fill are all there: count their magic
        assert int((gathered[:, :8] == np.frombuffer(MAGIC, np.uint8)).all(axis=1).sum()) == snap.pages
        nonzero = int(gathered.any(axis=1).sum())
        dump = physmap.Elf(snap.dump)
        with_data = 0
        for ld in dump.loads:
            r = next(r for r in ram.ranges if r.gpa == ld.paddr)
            if r.block != "pc.ram":
                continue
            for _, data in dump.chunks(ld):
                with_data += int(np.frombuffer(data, np.uint8).reshape(-1, 4096).any(axis=1).sum())
        covered = sum(r.size for r in ram.ranges if r.block == "pc.ram")
        if covered == blk.size:  # this guest: no VGA window hides pc.ram
            assert nonzero == with_data
        else:
            assert nonzero >= with_data
        if which == "pc-mapped":
            arr = np.asarray(blk.array()).reshape(-1)
            assert arr.size == blk.size
            for p in pages[:: max(1, len(pages) // 300)]:
                p = int(p)
                assert arr[p * 4096:(p + 1) * 4096].tobytes() == blk.read(p * 4096, 4096)


def test_a_save_indexed_with_the_page_map_reads_like_one_without(guest_saves: GuestSaves, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for src in (guest_saves.pc.save, guest_saves.live["xbzrle"].save):
        indexed = tmp_path / src.name
        shutil.copyfile(src, indexed)
        savedir.index(indexed)
        with savedir.open(src) as plain, savedir.open(indexed) as fast:
            assert [tuple(r) for r in plain.ram.ranges] == [tuple(r) for r in fast.ram.ranges]
            gpas = []
            for r in plain.ram.ranges:
                gpas += [r.gpa + int(o) for o in rng.integers(0, r.size - 4096, size=200)]
            a = plain.ram.read_phys_many(np.array(gpas, dtype=np.uint64), 4096)
            b = fast.ram.read_phys_many(np.array(gpas, dtype=np.uint64), 4096)
            assert (a == b).all()
            for name in plain.ram:
                pa, pb = plain.ram[name], fast.ram[name]
                assert (pa.pages_present, pa.pages_zero) == (pb.pages_present, pb.pages_zero)
                assert (pa.present() == pb.present()).all()
                sample = pa.present()[:: max(1, pa.pages_present // 64)]
                assert (pa.gather(sample) == pb.gather(sample)).all()
        indexed.unlink()


# ---------------------------------------------------------------------------
# the ELF core and the CLI


def readelf_loads(path: Path) -> List[Tuple[int, int, int]]:
    out = subprocess.run(["readelf", "-l", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for m in re.finditer(r"^\s*LOAD\s+0x[0-9a-f]+\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", out, re.M):
        rows.append(tuple(int(x, 16) for x in m.groups()))
    assert rows, out[:2000]
    return sorted(rows)


@pytest.mark.parametrize("which", SNAPSHOT_IDS)
def test_elf_equals_qemus_dump(guest_saves: GuestSaves, which: str, tmp_path: Path) -> None:
    snap, path = pick(guest_saves, which)
    out = tmp_path / "core.elf"
    r = savedir_cli("ram", str(path), "--elf", str(out))
    assert r.returncode == 0, r.stderr
    mine, qemu = physmap.Elf(out), physmap.Elf(snap.dump)
    assert mine.e_type == 4  # ET_CORE
    assert load_set(mine) == load_set(qemu)
    assert readelf_loads(out) == readelf_loads(snap.dump)
    assert_equals_dump(mine.read, qemu, f"{which} --elf")
    out.unlink()


def vol_banners(path: Path) -> List[str]:
    r = subprocess.run(["vol", "-q", "-f", str(path), "banners.Banners"], capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "Linux version" in ln]
    assert lines, r.stdout[-3000:]
    return sorted(lines)


def test_volatility_reads_savedirs_elf_like_qemus_dump(guest_saves: GuestSaves, tmp_path: Path) -> None:
    out = tmp_path / "pc.elf"
    r = savedir_cli("ram", str(guest_saves.pc.save), "--elf", str(out))
    assert r.returncode == 0, r.stderr
    with ThreadPoolExecutor(max_workers=2) as pool:
        mine, qemu = pool.map(vol_banners, [out, guest_saves.pc.dump])
    assert mine == qemu
    assert any("Linux version 6." in ln for ln in mine)


def first_magic_gpa(dump: physmap.Elf, above: int = 0) -> int:
    for ld in dump.loads:
        if ld.paddr + ld.filesz <= above:
            continue
        for gpa, data in dump.chunks(ld):
            a = np.frombuffer(data, dtype=np.uint64).reshape(-1, 512)
            hit = np.nonzero(a[:, 0] == np.frombuffer(MAGIC, dtype=np.uint64)[0])[0]
            hit = [int(i) for i in hit if gpa + int(i) * 4096 >= above]
            if hit:
                return gpa + hit[0] * 4096
    raise AssertionError("no page of the fill in the dump")


def test_cli_ram_table_json_and_read(guest_saves: GuestSaves) -> None:
    snap = guest_saves.q35
    r = savedir_cli("ram", str(snap.save))
    assert r.returncode == 0 and b"pc.ram" in r.stdout, r.stderr
    r = savedir_cli("ram", str(snap.save), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    text = json.dumps(doc)
    assert "pc.ram" in text and (str(4 * G) in text or "0x100000000" in text), text[:2000]
    dump = physmap.Elf(snap.dump)
    gpa = first_magic_gpa(dump, above=4 * G)
    r = savedir_cli("ram", str(snap.save), "--read", hex(gpa), "8192")
    assert r.returncode == 0, r.stderr
    assert r.stdout == dump.read(gpa, 8192)
    r = savedir_cli("ram", str(snap.save), "--read", hex(gpa), "64", "--hexdump")
    assert r.returncode == 0 and "SAVEDIR!" in r.stdout.decode(), r.stdout
    # the override moves the RAM above 4 GiB
    with savedir.open(snap.save) as f:
        want = f.ram["pc.ram"].read(1 * G, 4096)
    r = savedir_cli("ram", str(snap.save), "--below-4g", str(1 * G), "--read", hex(4 * G), "4096")
    assert r.returncode == 0 and r.stdout == want, r.stderr
    r = savedir_cli("ram", str(snap.save), "--read", hex(0xF000_0000), "16")
    assert r.returncode != 0 and r.stdout == b"" and re.search(rb"(?i)0xf0000000|4026531840", r.stderr), r.stderr


def test_cli_extract(guest_saves: GuestSaves, tmp_path: Path) -> None:
    for snap in guest_saves.snapshots:
        d = tmp_path / snap.name
        r = savedir_cli("ram", str(snap.save), "--extract", str(d))
        assert r.returncode == 0, r.stderr
        files = {p.name: p for p in d.iterdir()}
        ram_file = next(p for n, p in files.items() if "pc.ram" in n)
        blocks = dict(physmap.ram_blocks(snap.save))
        assert len(files) == len(blocks)
        assert ram_file.stat().st_size == blocks["pc.ram"]
        with savedir.open(snap.save) as f, open(ram_file, "rb") as raw:
            blk = f.ram["pc.ram"]
            for off in range(0, blk.size, CHUNK):
                n = min(CHUNK, blk.size - off)
                assert raw.read(n) == blk.read(off, n), (snap.name, off)
        if snap.name == "q35":
            # half of the 3 GiB were never written: zero pages, holes in the file
            assert ram_file.stat().st_blocks * 512 < blocks["pc.ram"] - G, ram_file.stat()
        shutil.rmtree(d)
