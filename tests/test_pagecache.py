"""A scan leaves the page cache as it was, and `index` waits for no data but
its own.

* The page cache, seen by util-linux's ``fincore``: after ``index``,
  ``verify --deep``, ``ls --scan`` and ``catalog --scan`` read a file, the
  pages of it that were not cached before are not cached after; those that
  were stay, and so does an unrelated cached file. Synthetic streams of a
  few windows (tests/synthetic.py), on the disk that holds pytest's
  temporary folders (a tmpfs keeps every page it holds: these tests need a
  real file system there).
* Durability: ``index`` flushes the directory it appends with
  ``sync_file_range`` on those bytes alone, and never ``fsync`` or
  ``fdatasync``, which would wait for every unwritten byte of the file
  (QEMU's, right after a save). Seen with ``strace``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import savedir
import synthetic

SAVEDIR = [sys.executable, "-m", "savedir"]
PAGE = os.sysconf("SC_PAGE_SIZE")
#: Pages a run may leave cached of a file it did not find cached: those of
#: the directory it wrote (and the page before it), and a few of the tail.
SLACK = 64


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (.ci/install-qemu.sh installs it)"
    return path


def fincore(p: Path) -> int:
    """Pages of ``p`` in the page cache, as util-linux's fincore counts them."""
    out = subprocess.run([_tool("fincore"), "-b", "-n", "-o", "PAGES", str(p)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return int(out.split()[0])


def pages(p: Path) -> int:
    return -(-p.stat().st_size // PAGE)


def drop(p: Path) -> None:
    """Takes ``p`` out of the page cache (written to disk first)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert fincore(p) == 0, "the file system drops clean pages on request"


def read(p: Path, upto: int = -1) -> None:
    """Reads ``p`` (its first ``upto`` bytes) into the page cache, without
    read-ahead: the kernel's, finishing later, would cache more meanwhile."""
    with open(p, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        left = p.stat().st_size if upto < 0 else upto
        while left > 0:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            left -= len(b)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*SAVEDIR, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("pagecache")
    big = d / "big.sav"
    # More than the look-ahead (64 MiB) of what the cache held, in windows of 8 MiB.
    synthetic.write_stream(big, 112 << 20, pages_per_part=2048, seed=11)
    other = d / "other.bin"
    other.write_bytes(os.urandom(8 << 20))
    return {"big": big, "other": other}


@pytest.fixture
def big(files: Dict[str, Path], tmp_path: Path) -> Path:
    p = tmp_path / "big.sav"
    shutil.copyfile(files["big"], p)
    return p


SCANS = [
    ["index"],
    ["verify", "--deep"],
    ["ls", "--scan"],
    ["catalog", "--scan", "-o", "{tmp}/c.jsonl"],
]


@pytest.mark.parametrize("command", SCANS, ids=lambda c: " ".join(c[:2]))
def test_a_cold_file_stays_cold_and_a_cached_one_cached(
    command: List[str], big: Path, files: Dict[str, Path], tmp_path: Path
) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    if command[0] == "verify":
        run("index", str(big))
    other = files["other"]
    read(other)
    assert fincore(other) == pages(other)

    drop(big)
    run(*args, str(big))
    assert fincore(big) <= SLACK, f"{fincore(big)} pages of {pages(big)} left cached"
    assert fincore(other) == pages(other), "an unrelated file stays cached"

    read(big)
    full = fincore(big)
    assert full == pages(big)
    if command[0] == "index":
        args.append("--force")
    run(*args, str(big))
    assert fincore(big) >= full - 1, "pages cached before stay cached"


def test_a_half_cached_file_keeps_its_half(big: Path) -> None:
    run("index", str(big))
    for args in (["verify", "--deep"], ["index", "--force"], ["ls", "--scan"]):
        drop(big)
        read(big, big.stat().st_size // 2)
        half = fincore(big)
        assert abs(half - pages(big) // 2) <= 1, (half, pages(big))
        run(*args, str(big))
        after = fincore(big)
        assert half <= after <= half + SLACK, (args, half, after, pages(big))


@pytest.mark.parametrize("command", [["verify"], ["ls"]], ids=lambda c: c[0])
def test_checks_through_the_directory_read_a_page_per_header(command: List[str], big: Path) -> None:
    """verify (not deep) and ls of an indexed file read its tail, its
    directory and a header per entry: a page each, not what read-ahead
    would bring around each (megabytes)."""
    run("index", str(big))
    entries = len(savedir.open(big).entries)
    drop(big)
    run(*command, str(big))
    assert fincore(big) <= 2 * entries + SLACK, (fincore(big), entries)


def test_positioned_reads_and_mappings_alike(big: Path) -> None:
    """A file opened with mmap=False is read by pread: the same promise."""
    code = "import sys, savedir\nf = savedir.open(sys.argv[1], scan=True, mmap=sys.argv[2] == 'map')\nprint(len(f.entries))\n"
    for how in ("read", "map"):
        drop(big)
        r = subprocess.run([sys.executable, "-c", code, str(big), how], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and int(r.stdout) > 10, r.stderr
        assert fincore(big) <= SLACK, (how, fincore(big))


def test_dirty_pages_are_never_dropped(files: Dict[str, Path], tmp_path: Path) -> None:
    """Right after a save, the file's pages are dirty in the cache: they were
    there before, and stay (the kernel would have to write them first)."""
    p = tmp_path / "fresh.sav"
    with open(files["big"], "rb") as src, open(p, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    before = fincore(p)
    run("index", str(p))
    assert fincore(p) >= before - 1
    assert savedir.verify(p, deep=True).ok


SYNCS = re.compile(r"^\d+\s+(fsync|fdatasync|sync|syncfs|msync|sync_file_range2?)\((.*)\)\s+=\s+(-?\d+)", re.M)


def _syncs(tmp_path: Path, *args: str) -> List[tuple[str, str]]:
    log = tmp_path / "strace.log"
    r = subprocess.run(
        [_tool("strace"), "-f", "-qq", "-y", "-o", str(log),
         "-e", "trace=fsync,fdatasync,sync,syncfs,msync,sync_file_range", *SAVEDIR, *args],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return [(m.group(1), m.group(2)) for m in SYNCS.finditer(log.read_text())]


def test_index_flushes_only_the_directory_it_wrote(files: Dict[str, Path], tmp_path: Path) -> None:
    # A file just written, its pages dirty: an fdatasync would wait for them.
    p = tmp_path / "vm.sav"
    shutil.copyfile(files["big"], p)
    syncs = _syncs(tmp_path, "index", "--json", str(p))
    r = savedir.verify(p, deep=True)
    assert r.ok, r.message
    d = json.loads(subprocess.run([*SAVEDIR, "index", "--json", str(p)], capture_output=True, text=True).stdout)
    # What it wrote after the stream: the RAM page map, then the directory.
    off, size = d["directory_offset"] - d["ram_map_size"], d["ram_map_size"] + d["directory_size"]
    assert d["ram_map_size"] > 0, d
    assert [name for name, _ in syncs] == ["sync_file_range"], syncs
    fd, start, length, flags = [a.strip() for a in syncs[0][1].split(",", 3)]
    assert fd.endswith(f"<{p}>") and (int(start), int(length)) == (off, size), syncs
    assert flags == "SYNC_FILE_RANGE_WAIT_BEFORE|SYNC_FILE_RANGE_WRITE|SYNC_FILE_RANGE_WAIT_AFTER", flags

    # A sidecar is a file of its own, written whole and renamed: it is
    # fsynced, the save never.
    q = tmp_path / "side.sav"
    shutil.copyfile(files["big"], q)
    syncs = _syncs(tmp_path, "index", "--sidecar", str(q))
    assert syncs and all(f"<{q}>" not in args for _, args in syncs), syncs
    assert any(".savedir" in args for name, args in syncs if name == "fsync"), syncs
    assert savedir.verify(q).ok
