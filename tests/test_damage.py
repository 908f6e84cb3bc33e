"""Damaged, truncated, extended and foreign files.

Everything here starts from one real full-device stream and its indexed
copy.  savedir must notice every damage where the spec says it can (naming the
check and the offset), never change a file it refuses, and never raise
anything but a SavedirError or an OSError -- nor crash the interpreter.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import qemu_harness
import savedir
import savedir.cli
from conftest import RealStream

pytestmark = pytest.mark.qemu

STREAM = "pc-full-exec-paused"
TRAILER_LEN = 18
QUICK = 30.0  # seconds: far above anything these commands need


@dataclass
class Base:
    stream: RealStream
    pristine: bytes
    indexed: bytes
    entries: list[savedir.Entry]
    eof: int
    d: int  # the stream's end == len(pristine): where the RAM page map, then the directory, start
    dir: int  # the directory's marker (D)


@pytest.fixture(scope="module")
def base(qemu_stream_by_name: dict[str, RealStream], tmp_path_factory: pytest.TempPathFactory) -> Base:
    s = qemu_stream_by_name[STREAM]
    assert s.full_devices
    path = s.copy_to(tmp_path_factory.mktemp("damage-base"))
    r = savedir.index(path)
    assert r.written and savedir.verify(path, deep=True).ok
    with savedir.open(path) as f:
        entries = f.entries
        eof = f.eof
    return Base(stream=s, pristine=s.read_bytes(), indexed=path.read_bytes(), entries=entries, eof=eof, d=r.directory_offset - r.ram_map_size,
                dir=r.directory_offset)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def flipped(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def only_savedir_errors(fn: Callable[[], Any]) -> BaseException | None:
    """Runs ``fn``; returns the exception it raised (None if none), failing
    the test if that is anything but a SavedirError or an OSError (a Rust
    panic would surface as a BaseException)."""
    try:
        fn()
    except (savedir.SavedirError, OSError) as e:
        return e
    except BaseException as e:  # noqa: BLE001  (a Rust panic is a BaseException)
        pytest.fail(f"{fn}: raised {type(e).__module__}.{type(e).__qualname__}: {e}")
    return None


# ---------------------------------------------------------------------------
# (a) the trailer


@pytest.mark.parametrize("i", range(TRAILER_LEN))
def test_flipped_trailer_byte(base: Base, tmp_path: Path, i: int) -> None:
    off = len(base.indexed) - TRAILER_LEN + i
    p = write(tmp_path / "t.mig", flipped(base.indexed, off))
    r = savedir.verify(p)
    assert not r.ok and not bool(r), r
    assert r.check in ("trailer", "directory", "cross-check"), r
    assert r.offset is not None and 0 <= r.offset < len(base.indexed), r
    assert r.message, r
    if i in (0, 9):  # the EOF / DIRECTORY entry type bytes themselves
        assert (r.check, r.offset) == ("trailer", off), r
    if r.check == "trailer":
        # no directory: opening falls back to parsing the stream
        with savedir.open(p) as f:
            assert f.indexed is False and len(f.entries) == len(base.entries)
    else:
        with pytest.raises(savedir.DirectoryError):
            savedir.open(p)
    # index refuses what follows the stream, and leaves the file alone
    with pytest.raises(savedir.TrailingDataError) as info:
        savedir.index(p)
    assert info.value.offset == base.d and info.value.path == str(p)
    assert p.read_bytes() == flipped(base.indexed, off)


@pytest.mark.parametrize("cut", range(1, TRAILER_LEN + 1))
def test_cut_trailer(base: Base, tmp_path: Path, cut: int) -> None:
    p = write(tmp_path / "t.mig", base.indexed[:-cut])
    r = savedir.verify(p)
    assert not r.ok and r.check == "trailer" and r.offset is not None, r
    d = savedir.verify(p, deep=True)
    assert not d.ok and d.check == "trailer", d
    with savedir.open(p) as f:
        assert f.indexed is False
    s = savedir.strip(p)  # a torn directory starts with 0x7d: strip removes it
    assert s.removed == len(base.indexed) - cut - base.d
    assert p.read_bytes() == base.pristine


# ---------------------------------------------------------------------------
# (b) inside the directory


def checksum_algorithm_bytes(b: Base) -> dict[int, savedir.Entry]:
    """File offsets of the algorithm byte of every checksum in the directory,
    found by walking the entries (whose sizes the spec gives)."""
    out: dict[int, savedir.Entry] = {}
    pos = b.dir + 1
    for e in b.entries:
        if e.kind in ("start", "full"):
            size = 1 + 4 + 1 + len(e.name.encode()) + 4 + 4 + 8
        elif e.kind in ("part", "end"):
            size = 1 + 4 + 8
        elif e.kind == "command":
            size = 1 + 2 + 2 + 8
        else:
            size = 1 + 8
        pos += size
        assert b.indexed[pos:pos + 2] == b"\x7c\x01", (e.kind, e.name, pos)
        out[pos + 1] = e
        pos += 6
    if b.dir > b.d:  # the RAM page map's entry: 7b be64
        assert b.indexed[pos] == 0x7B and int.from_bytes(b.indexed[pos + 1 : pos + 9], "big") == b.d
        pos += 9
    assert pos == len(b.indexed) - TRAILER_LEN
    return out


@pytest.mark.parametrize("mask", [0xFF, 0x01, 0x80])
def test_flipped_directory_bytes(base: Base, tmp_path: Path, mask: int) -> None:
    """Every flip inside the directory is caught: by checks 1-3, or -- when
    it only changed a checksum value -- by the deep check."""
    alg = checksum_algorithm_bytes(base)
    # the 4 bytes of each checksum value -> the entry it covers
    value_bytes = {at + 1 + k: e for at, e in alg.items() for k in range(4)}
    stride = 3
    start = {0xFF: 0, 0x01: 1, 0x80: 2}[mask]
    p = tmp_path / "t.mig"
    p.write_bytes(base.indexed)
    problems: list[str] = []
    checked = 0
    with open(p, "r+b") as fh:
        for off in range(base.d + start, len(base.indexed) - TRAILER_LEN, stride):
            if off in alg:
                continue  # see test_flipped_checksum_algorithm_byte
            fh.seek(off)
            fh.write(bytes([base.indexed[off] ^ mask]))
            fh.flush()
            checked += 1
            r = savedir.verify(p)
            if r.ok:
                d = savedir.verify(p, deep=True)
                if off not in value_bytes:
                    problems.append(f"flip at {off} (directory byte {off - base.d}) is not in a checksum value, yet verify is ok: {r}")
                elif d.ok or d.check != "deep" or d.offset != value_bytes[off].offset:
                    problems.append(f"flip at {off} (directory byte {off - base.d}): verify ok, deep verify {d}")
            elif r.check not in ("trailer", "directory", "cross-check") or r.offset is None:
                problems.append(f"flip at {off}: {r}")
            fh.seek(off)
            fh.write(bytes([base.indexed[off]]))
            fh.flush()
    assert checked > 400
    assert not problems, "\n".join(problems[:20])
    assert p.read_bytes() == base.indexed


def test_flipped_checksum_value_is_found_by_deep_verify(base: Base, tmp_path: Path) -> None:
    for alg_at, e in list(checksum_algorithm_bytes(base).items())[:10]:
        p = write(tmp_path / "t.mig", flipped(base.indexed, alg_at + 2, 0x01))
        assert savedir.verify(p).ok
        d = savedir.verify(p, deep=True)
        assert not d.ok and d.check == "deep" and d.offset == e.offset, (e.kind, e.name, d)
        assert "CRC" in d.message, d


def test_flipped_checksum_algorithm_byte(base: Base, tmp_path: Path) -> None:
    """A flipped algorithm byte (0x01 -> anything else) turns a CRC-32C into
    a checksum of an unknown algorithm.  A deep verify, which promises that
    every stored checksum matches, must not then call the file intact."""
    bad: list[str] = []
    for alg_at, e in checksum_algorithm_bytes(base).items():
        for mask in (0x01, 0xFF):
            p = write(tmp_path / "t.mig", flipped(base.indexed, alg_at, mask))
            d = savedir.verify(p, deep=True)
            if d.ok:
                bad.append(f"algorithm byte at {alg_at} ({e.kind} {e.name or ''} at {e.offset}) ^ {mask:#x}: {d.message!r}")
    assert not bad, f"{len(bad)} damaged checksum entries pass verify --deep, e.g.:\n" + "\n".join(bad[:5])


# ---------------------------------------------------------------------------
# (c) section headers in the stream


def test_flipped_section_header_bytes(base: Base, tmp_path: Path) -> None:
    fulls = [e for e in base.entries if e.kind == "full"]
    targets = [e for e in base.entries if e.kind in ("start", "part", "end", "command")]
    targets += [fulls[0], fulls[len(fulls) // 2], fulls[-1]]
    for e in targets:
        for rel in range(e.payload_offset - e.offset):
            p = write(tmp_path / "t.mig", flipped(base.indexed, e.offset + rel, 0x01))
            r = savedir.verify(p)
            assert not r.ok and r.check == "cross-check" and r.offset == e.offset, (e.kind, e.name, rel, r)
            with pytest.raises(savedir.DirectoryError) as info:
                savedir.open(p)
            assert info.value.offset == e.offset and info.value.path == str(p)


def test_flipped_name_byte_of_every_full_section(base: Base, tmp_path: Path) -> None:
    p = tmp_path / "t.mig"
    for e in [e for e in base.entries if e.kind == "full"]:
        name_at = e.offset + 1 + 4 + 1  # type, section id, name length
        write(p, flipped(base.indexed, name_at, 0x20))
        r = savedir.verify(p)
        assert (r.ok, r.check, r.offset) == (False, "cross-check", e.offset), (e.name, r)
        assert e.name in r.message, r.message


# ---------------------------------------------------------------------------
# (d) bytes inside sections: only the deep check (checksums) can tell


def test_flipped_ram_page_byte(base: Base, tmp_path: Path) -> None:
    ram = [e for e in base.entries if e.kind in ("part", "end") and e.name == "ram" and e.payload_size > 4096]
    assert ram, "no RAM item with a whole page"
    e = ram[0]
    at = e.payload_offset + e.payload_size // 2
    p = write(tmp_path / "t.mig", flipped(base.indexed, at, 0x10))
    r = savedir.verify(p)
    assert r.ok, r  # structural checks never read RAM pages
    d = savedir.verify(p, deep=True)
    assert not d.ok and d.check == "deep" and d.offset == e.offset, d
    assert "CRC" in d.message, d
    with savedir.open(p) as f:  # reading still works, and shows the new byte
        assert f.indexed
        part = next(x for x in f.entries if x.offset == e.offset)
        assert part.data[at - e.offset] == base.indexed[at] ^ 0x10


@pytest.mark.parametrize("what", ["cpu", "0000:00:03.0/virtio-net", "globalstate", "vmdesc"])
def test_flipped_payload_byte(base: Base, tmp_path: Path, what: str) -> None:
    if what == "vmdesc":
        e = base.entries[-1]
        at = e.payload_offset + e.payload_size // 2
        while base.indexed[at] in b'{}[]":,':  # a byte inside a string or a number
            at += 1
        mask = 0x01
    else:
        e = next(x for x in base.entries if x.name == what)
        at = e.payload_offset + e.payload_size // 2
        mask = 0x01
    p = write(tmp_path / "t.mig", flipped(base.indexed, at, mask))
    assert savedir.verify(p).ok
    d = savedir.verify(p, deep=True)
    assert not d.ok and d.check == "deep" and d.offset == e.offset, d


def test_damaged_vmdesc_json_is_a_savedir_error(base: Base, tmp_path: Path) -> None:
    """The vmdesc's JSON no longer parses (its second byte, a '"', flipped).
    The structural checks pass (they do not read the vmdesc), deep verify
    fails -- and reading ``SaveFile.vmdesc`` must raise a SavedirError (every
    error savedir detects is one), not a bare json.JSONDecodeError."""
    vd = base.entries[-1]
    assert base.indexed[vd.payload_offset:vd.payload_offset + 2] == b'{"'
    p = write(tmp_path / "t.mig", flipped(base.indexed, vd.payload_offset + 1, 0x5A))
    assert savedir.verify(p).ok
    d = savedir.verify(p, deep=True)
    assert not d.ok and d.check == "deep", d
    with savedir.open(p) as f:
        err = only_savedir_errors(lambda: f.vmdesc)
        assert isinstance(err, savedir.FormatError), err


def test_cli_desc_pretty_on_damaged_vmdesc(base: Base, tmp_path: Path) -> None:
    vd = base.entries[-1]
    p = write(tmp_path / "t.mig", flipped(base.indexed, vd.payload_offset + 1, 0x5A))
    r = subprocess.run(
        [sys.executable, "-m", "savedir", "desc", "--pretty", str(p)],
        capture_output=True, text=True, timeout=QUICK, check=False,
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1 and str(p) in r.stderr, (r.returncode, r.stderr)


# ---------------------------------------------------------------------------
# (e) truncated streams


def _cuts(b: Base) -> dict[str, int]:
    ram = next(e for e in b.entries if e.kind == "part" and e.name == "ram")
    cpu = next(e for e in b.entries if e.name == "cpu")
    vd = b.entries[-1]
    return {
        "in-magic": 5,
        "after-magic": 8,
        "mid-configuration": 20,
        "mid-ram": ram.payload_offset + ram.payload_size // 2,
        "mid-device": cpu.offset + 100,
        "mid-last-device": b.entries[-2].offset + 20,
        "before-eof": b.eof,
        "vmdesc-header": vd.offset + 3,
        "mid-vmdesc": vd.offset + vd.size // 2,
        "vmdesc-last-byte": vd.end - 1,
    }


CUT_NAMES = [
    "in-magic", "after-magic", "mid-configuration", "mid-ram", "mid-device",
    "mid-last-device", "before-eof", "vmdesc-header", "mid-vmdesc", "vmdesc-last-byte",
]


@pytest.mark.parametrize("where", CUT_NAMES)
def test_index_truncated_stream(base: Base, tmp_path: Path, where: str) -> None:
    cut = _cuts(base)[where]
    data = base.pristine[:cut]
    p = write(tmp_path / "t.mig", data)
    for fn in (lambda: savedir.index(p), lambda: savedir.open(p), lambda: savedir.index(p, force=True)):
        err = only_savedir_errors(fn)
        assert isinstance(err, savedir.FormatError), err
        assert err.path == str(p) and err.offset is not None and err.offset <= cut, err
        assert isinstance(err, savedir.TruncatedError), (
            f"cut at {cut} ({where}): expected TruncatedError, got {type(err).__name__}: {err}"
        )
        assert p.read_bytes() == data
    assert not savedir.verify(p).ok
    assert savedir.cli.main(["index", "-q", str(p)]) == 1
    assert p.read_bytes() == data


def test_stream_ending_at_its_eof_byte_is_complete(base: Base, tmp_path: Path) -> None:
    """Without its vmdesc a stream is still whole (the vmdesc is optional):
    it indexes, verifies deep and strips back."""
    data = base.pristine[: base.eof + 1]
    p = write(tmp_path / "t.mig", data)
    r = savedir.index(p)
    assert r.written and r.directory_offset - r.ram_map_size == base.eof + 1 and r.entries == len(base.entries) - 1
    assert savedir.verify(p, deep=True).ok
    with savedir.open(p) as f:
        assert f.vmdesc is None and f.vmdesc_json is None
        assert [(e.kind, e.offset, e.end) for e in f.entries] == [(e.kind, e.offset, e.end) for e in base.entries[:-1]]
    assert savedir.strip(p).removed == r.ram_map_size + r.directory_size and p.read_bytes() == data


# ---------------------------------------------------------------------------
# (f) bytes after the stream


GARBAGE = {
    "text": b"hello, world\n",
    "zeros": bytes(100),
    "random": random.Random(1234).randbytes(1000),
    "fake-directory": b"\x7d" + bytes(40),
    "trailer-lookalike": b"\x00" * 9 + b"\x7d" + b"\x00" * 8,
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_trailing_garbage(base: Base, tmp_path: Path, kind: str) -> None:
    g = GARBAGE[kind]
    data = base.pristine + g
    p = write(tmp_path / "t.mig", data)
    with pytest.raises(savedir.TrailingDataError) as info:
        savedir.index(p)
    assert info.value.offset == len(base.pristine) and info.value.path == str(p)
    assert not isinstance(info.value, savedir.FormatError)
    assert p.read_bytes() == data
    assert not savedir.verify(p).ok
    with savedir.open(p) as f:  # the stream itself reads fine
        assert f.indexed is False and f.stream_end == len(base.pristine)
    r = savedir.index(p, force=True)
    assert r.written and r.replaced == len(g) and r.directory_offset - r.ram_map_size == len(base.pristine)
    assert p.read_bytes() == base.indexed
    assert savedir.verify(p, deep=True).ok


def test_strip_refuses_unknown_trailing_bytes(base: Base, tmp_path: Path) -> None:
    data = base.pristine + b"not a directory"
    p = write(tmp_path / "t.mig", data)
    with pytest.raises(savedir.TrailingDataError) as info:
        savedir.strip(p)
    assert info.value.offset == len(base.pristine)
    assert p.read_bytes() == data
    assert savedir.strip(p, force=True).removed == 15
    assert p.read_bytes() == base.pristine


def test_torn_directory(base: Base, tmp_path: Path) -> None:
    # A directory of other settings (no checksums), cut in half: not the one
    # index would write now, so it is kept unless force is given.
    other = write(tmp_path / "o.mig", base.pristine)
    savedir.index(other, checksums=False, ram_map=False)
    directory = other.read_bytes()[base.d :]
    torn = directory[: len(directory) // 2]
    assert torn[0] == 0x7D
    data = base.pristine + torn
    p = write(tmp_path / "t.mig", data)
    with pytest.raises(savedir.TrailingDataError) as info:
        savedir.index(p)
    assert info.value.offset == base.d
    assert p.read_bytes() == data
    r = savedir.verify(p)
    assert not r.ok and r.check == "trailer" and r.offset is not None, r
    with savedir.open(p) as f:
        assert f.indexed is False
    s = savedir.strip(p)
    assert s.removed == len(torn) and s.stream_end == base.d
    assert p.read_bytes() == base.pristine
    # and it can be indexed again
    assert savedir.index(p).written and p.read_bytes() == base.indexed


def test_torn_write_of_the_same_directory_is_completed(base: Base, tmp_path: Path) -> None:
    # What a crash in the middle of writing leaves: the start of the very
    # directory index writes. index completes it without force.
    directory = base.indexed[base.d :]
    for n in (1, 9, len(directory) // 2, len(directory) - 1):
        p = write(tmp_path / f"t{n}.mig", base.pristine + directory[:n])
        assert not savedir.verify(p).ok
        r = savedir.index(p)
        assert r.written and r.replaced == n
        assert p.read_bytes() == base.indexed


def test_torn_directory_force_index(base: Base, tmp_path: Path) -> None:
    directory = base.indexed[base.d:]
    torn = directory[: len(directory) // 2]
    p = write(tmp_path / "t.mig", base.pristine + torn)
    r = savedir.index(p, force=True)
    assert r.written and r.replaced == len(torn)
    assert p.read_bytes() == base.indexed


# ---------------------------------------------------------------------------
# (g) opening a file whose directory is damaged


@pytest.mark.parametrize(
    "where,check",
    [
        ("first-entry-type", "directory"),  # D+1: the configuration entry's type byte
        ("first-pointer", "directory"),  # its pointer's high byte: out of range
        ("vmdesc-pointer", "directory"),
        ("ram-section-id", "cross-check"),
    ],
)
def test_open_damaged_directory(base: Base, tmp_path: Path, where: str, check: str) -> None:
    d = base.dir
    map_entry = 9 if base.dir > base.d else 0  # 7b be64, after the vmdesc entry
    vmdesc_ptr_at = len(base.indexed) - TRAILER_LEN - map_entry - 6 - 8  # before its checksum
    assert base.indexed[vmdesc_ptr_at - 1] == 0x06
    off = {
        "first-entry-type": d + 1,
        "first-pointer": d + 2,
        "vmdesc-pointer": vmdesc_ptr_at + 2,
        "ram-section-id": d + 1 + 9 + 6 + 4,  # after 07 ptr and its checksum: 01 be32(id)
    }[where]
    p = write(tmp_path / "t.mig", flipped(base.indexed, off))
    r = savedir.verify(p)
    assert not r.ok and r.check == check and r.offset is not None, r
    with pytest.raises(savedir.DirectoryError) as info:
        savedir.open(p)
    assert isinstance(info.value, savedir.FormatError) and isinstance(info.value, ValueError)
    assert info.value.path == str(p) and info.value.offset == r.offset
    with savedir.open(p, scan=True) as f:
        assert f.indexed is False
        assert [(e.kind, e.offset, e.end, e.name) for e in f.entries] == [
            (e.kind, e.offset, e.end, e.name) for e in base.entries
        ]
        assert bytes(f["cpu"].data) == base.pristine[f["cpu"].offset:f["cpu"].offset + f["cpu"].size]
    # the CLI says so too, and --scan still lists
    assert savedir.cli.main(["ls", str(p)]) == 1
    assert savedir.cli.main(["ls", "--scan", str(p)]) == 0
    # index refuses without force and rebuilds with it
    with pytest.raises(savedir.TrailingDataError):
        savedir.index(p)
    assert savedir.index(p, force=True).written
    assert p.read_bytes() == base.indexed


# ---------------------------------------------------------------------------
# random damage never escapes as a foreign exception


def test_random_damage_raises_only_savedir_errors(base: Base, tmp_path: Path) -> None:
    rng = random.Random(20240601)
    p = tmp_path / "t.mig"
    # headers and the directory, where parsing decisions are made
    hot = [e.offset + i for e in base.entries if e.kind != "part" for i in range(min(24, e.size))]
    hot += list(range(base.d, len(base.indexed)))
    for n in range(200):
        data = bytearray(base.indexed)
        for _ in range(rng.choice((1, 1, 2, 3))):
            data[rng.choice(hot)] = rng.randrange(256)
        if n % 5 == 0:
            data = data[: rng.randrange(len(data))]
        write(p, bytes(data))

        def use() -> None:
            with savedir.open(p) as f:
                for e in f.entries:
                    bytes(e.data[:1])
                f.verify(deep=True)

        only_savedir_errors(use)
        only_savedir_errors(lambda: savedir.open(p, scan=True).entries)
        only_savedir_errors(lambda: savedir.verify(p, deep=True))
        only_savedir_errors(lambda: savedir.index(p))


# ---------------------------------------------------------------------------
# (h) files that are not saves


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("foreign")
    empty = write(d / "empty.sav", b"")
    rnd = write(d / "random.sav", random.Random(7).randbytes(100_000))
    qcow2 = d / "disk.qcow2"
    qemu_harness.make_disk(qcow2, "1M")
    assert qcow2.read_bytes()[:4] == b"QFI\xfb"
    directory = d / "a-directory"
    directory.mkdir()
    fifo = d / "a-fifo"
    os.mkfifo(fifo)
    magic_only = write(d / "magic.sav", b"QEVM\x00\x00\x00\x03")
    wrong_version = write(d / "version.sav", b"QEVM\x00\x00\x00\x02" + bytes(100))
    return {
        "empty": empty, "random": rnd, "qcow2": qcow2, "directory": directory, "fifo": fifo,
        "dev-zero": Path("/dev/zero"), "magic-only": magic_only, "wrong-version": wrong_version,
    }


NOT_A_STREAM = ["empty", "random", "qcow2", "directory", "fifo", "dev-zero"]


def _snapshot(p: Path) -> bytes | None:
    return p.read_bytes() if p.is_file() else None


@pytest.mark.parametrize("kind", ["empty", "random", "qcow2", "directory", "dev-zero"])
def test_not_a_stream_api(foreign: dict[str, Path], kind: str) -> None:
    # (the FIFO is only ever touched in a subprocess: a bug could block on it)
    p = foreign[kind]
    before = _snapshot(p)
    for fn in (
        lambda: savedir.open(p), lambda: savedir.open(p, scan=True), lambda: savedir.index(p),
        lambda: savedir.index(p, force=True), lambda: savedir.strip(p), lambda: savedir.strip(p, force=True),
    ):
        err = only_savedir_errors(fn)
        assert isinstance(err, savedir.NotAStreamError), (kind, err)
        assert err.path == str(p), (kind, err.path)
        assert str(p) in str(err)
    for deep in (False, True):
        err = only_savedir_errors(lambda deep=deep: savedir.verify(p, deep=deep))
        if err is None:
            r = savedir.verify(p, deep=deep)
            assert not r.ok and r.check == "trailer", r
        else:
            assert isinstance(err, savedir.NotAStreamError), err
    assert _snapshot(p) == before


@pytest.mark.parametrize("kind", ["magic-only", "wrong-version"])
def test_almost_a_stream(foreign: dict[str, Path], kind: str) -> None:
    p = foreign[kind]
    before = p.read_bytes()
    for fn in (lambda: savedir.open(p), lambda: savedir.index(p)):
        err = only_savedir_errors(fn)
        assert isinstance(err, savedir.FormatError), err
        want = savedir.TruncatedError if kind == "magic-only" else (savedir.NotAStreamError, savedir.UnsupportedStreamError)
        assert isinstance(err, want), err
    assert p.read_bytes() == before


_PROBE = textwrap.dedent(
    """
    import sys, savedir
    p = sys.argv[1]
    for name, fn in [
        ("open", lambda: savedir.open(p)),
        ("scan", lambda: savedir.open(p, scan=True)),
        ("index", lambda: savedir.index(p)),
        ("verify", lambda: savedir.verify(p, deep=True)),
        ("strip", lambda: savedir.strip(p)),
    ]:
        try:
            fn()
            print(name, "returned")
        except (savedir.SavedirError, OSError) as e:
            print(name, type(e).__name__)
    print("done")
    """
)


@pytest.mark.parametrize("kind", NOT_A_STREAM)
def test_not_a_stream_in_a_subprocess(foreign: dict[str, Path], kind: str) -> None:
    """The API on each input, in a child: no hang (the FIFO has no writer),
    no crash, nothing but SavedirError/OSError."""
    p = foreign[kind]
    r = subprocess.run([sys.executable, "-c", _PROBE, str(p)], capture_output=True, text=True, timeout=QUICK, check=False)
    assert r.returncode == 0, (kind, r.returncode, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[-1] == "done", r.stdout
    results = dict(line.split(" ", 1) for line in lines[:-1])
    for op in ("open", "scan", "index", "strip"):
        assert results[op] == "NotAStreamError", (kind, results)
    assert results["verify"] in ("returned", "NotAStreamError"), (kind, results)


@pytest.mark.parametrize("kind", NOT_A_STREAM)
@pytest.mark.parametrize("command", [["ls"], ["index"], ["verify"], ["cat", "@", "cpu"], ["strip"]])
def test_not_a_stream_cli(foreign: dict[str, Path], kind: str, command: list[str]) -> None:
    p = foreign[kind]
    before = _snapshot(p)
    argv = [str(p) if a == "@" else a for a in command]
    if "@" not in command:
        argv.append(str(p))
    r = subprocess.run(["savedir", *argv], capture_output=True, text=True, timeout=QUICK, stdin=subprocess.DEVNULL, check=False)
    if kind == "directory" and command[0] in ("ls", "index", "verify"):
        # These take folders: the files in it are done (none here).
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (argv, r)
        assert _snapshot(p) == before
        return
    assert r.returncode == 1, (argv, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert str(p) in (r.stderr + r.stdout), (argv, r.stdout, r.stderr)
    assert _snapshot(p) == before


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "missing.sav"
    for fn in (lambda: savedir.open(p), lambda: savedir.index(p), lambda: savedir.verify(p), lambda: savedir.strip(p)):
        err = only_savedir_errors(fn)
        assert isinstance(err, FileNotFoundError), err
        assert str(p) in str(err)
    assert not p.exists()

