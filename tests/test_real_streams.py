"""savedir on every real QEMU stream: index, verify, list, read, load, strip.

Each stream of the ``qemu_streams`` fixture is copied and indexed once per
stream (module-scoped ``case``); the tests then check the directory against
the spec (docs/directory-format.md), against an independent reading of the
pristine bytes, and against QEMU itself, which must still load the indexed
file and the stripped one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qemu_harness
import savedir
import savedir.cli
from conftest import STREAM_SPECS, RealStream

pytestmark = pytest.mark.qemu

STREAM_NAMES = [spec[0] for spec in STREAM_SPECS]
HEADER_LEN = 8  # "QEVM" + be32 version
TRAILER_LEN = 18
FOOTER = 0x7E
TYPE_BYTE = {"configuration": 0x07, "start": 0x01, "part": 0x02, "end": 0x03, "full": 0x04, "command": 0x08, "vmdesc": 0x06}
ENTRY_FIELDS = (
    "kind", "offset", "end", "size", "payload_offset", "payload_size", "section_id",
    "name", "instance_id", "version_id", "command", "command_name",
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_key(e: savedir.Entry) -> tuple[Any, ...]:
    """Every field of an entry except its checksum (a scan has none)."""
    return tuple(getattr(e, f) for f in ENTRY_FIELDS)


# ---------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78: an independent
# implementation to check the checksums savedir writes.

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def test_crc32c_reference() -> None:
    # The standard check value of CRC-32C (RFC 3720 appendix B.4).
    assert crc32c(b"123456789") == 0xE3069283


# ---------------------------------------------------------------------------
# an independent decoder of the directory, written from the spec


@dataclass
class DirEntry:
    kind: str
    ptr: int
    section_id: int | None = None
    name: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    command: int | None = None
    command_len: int | None = None
    crc: int | None = None


def decode_directory(data: bytes, ram_map: list[int] | None = None) -> tuple[int, int, list[DirEntry]]:
    """Returns (eof_ptr, D, entries) of an indexed file, by the spec alone;
    the RAM page map's pointer, if any, is appended to ``ram_map``."""
    assert len(data) >= TRAILER_LEN + 1
    t = data[-TRAILER_LEN:]
    assert t[0] == 0x00 and t[9] == 0x7D, t.hex()
    eof_ptr = struct.unpack(">Q", t[1:9])[0]
    d = struct.unpack(">Q", t[10:18])[0]
    assert data[d] == 0x7D and data[eof_ptr] == 0x00 and eof_ptr < d < len(data) - TRAILER_LEN
    pos = d + 1
    end = len(data) - TRAILER_LEN
    kinds = {v: k for k, v in TYPE_BYTE.items()}
    entries: list[DirEntry] = []
    while pos < end:
        t0 = data[pos]
        pos += 1
        if t0 == 0x7B:
            # The RAM page map entry: the last before the EOF entry.
            (ptr,) = struct.unpack(">Q", data[pos:pos + 8])
            pos += 8
            assert pos == end, "the RAM page map entry is not the last"
            assert data[ptr:ptr + 8] == b"SAVEDIRM" and ptr < d, ptr
            if ram_map is not None:
                ram_map.append(ptr)
            continue
        if t0 == 0x7C:
            alg, value = struct.unpack(">BI", data[pos:pos + 5])
            pos += 5
            assert alg == 0x01, f"unknown checksum algorithm {alg}"
            assert entries and entries[-1].crc is None
            entries[-1].crc = value
            continue
        kind = kinds[t0]
        e = DirEntry(kind=kind, ptr=0)
        if kind in ("start", "full"):
            e.section_id = struct.unpack(">I", data[pos:pos + 4])[0]
            n = data[pos + 4]
            e.name = data[pos + 5:pos + 5 + n].decode()
            pos += 5 + n
            e.instance_id, e.version_id = struct.unpack(">II", data[pos:pos + 8])
            pos += 8
        elif kind in ("part", "end"):
            e.section_id = struct.unpack(">I", data[pos:pos + 4])[0]
            pos += 4
        elif kind == "command":
            e.command, e.command_len = struct.unpack(">HH", data[pos:pos + 4])
            pos += 4
        e.ptr = struct.unpack(">Q", data[pos:pos + 8])[0]
        pos += 8
        entries.append(e)
    assert pos == end, "the directory's entries overrun the trailer"
    return eof_ptr, d, entries


def expected_header(e: savedir.Entry) -> bytes:
    """The stream header of a section item, built from the entry's fields."""
    t = bytes([TYPE_BYTE[e.kind]])
    if e.kind in ("start", "full"):
        name = e.name.encode()
        return t + struct.pack(">IB", e.section_id, len(name)) + name + struct.pack(">II", e.instance_id, e.version_id)
    assert e.kind in ("part", "end")
    return t + struct.pack(">I", e.section_id)


# ---------------------------------------------------------------------------
# fixtures


@dataclass
class Case:
    stream: RealStream
    pristine: bytes
    path: Path  # the indexed copy; tests must not modify it
    result: savedir.IndexResult
    indexed: bytes  # its bytes right after indexing


@pytest.fixture(scope="module", params=STREAM_NAMES)
def case(request: pytest.FixtureRequest, qemu_stream_by_name: dict[str, RealStream], tmp_path_factory: pytest.TempPathFactory) -> Case:
    s = qemu_stream_by_name[request.param]
    pristine = s.read_bytes()
    path = s.copy_to(tmp_path_factory.mktemp(f"indexed-{s.name}"))
    result = savedir.index(path)
    return Case(stream=s, pristine=pristine, path=path, result=result, indexed=path.read_bytes())


def test_every_stream_is_covered(qemu_streams: list[RealStream]) -> None:
    assert [s.name for s in qemu_streams] == STREAM_NAMES


# ---------------------------------------------------------------------------
# index / verify


def test_index_appends_directory_after_the_stream(case: Case) -> None:
    r, pristine, data = case.result, case.pristine, case.indexed
    assert r.written is True
    assert r.path == str(case.path)
    assert r.replaced == 0
    # After the stream: the RAM page map, then the directory.
    assert r.directory_offset == len(pristine) + r.ram_map_size
    assert len(data) == len(pristine) + r.ram_map_size + r.directory_size
    # The stream's bytes are never changed.
    assert data[: len(pristine)] == pristine
    assert data[r.directory_offset] == 0x7D
    if r.ram_map_size:
        assert data[len(pristine) : len(pristine) + 8] == b"SAVEDIRM"
    with savedir.open(case.path) as f:
        assert f.indexed is True
        assert f.directory_offset == r.directory_offset
        assert f.stream_end == len(pristine)
        assert f.file_size == len(data)
        assert r.entries == len(f.entries)
        # The trailer: 00 be64(eof_ptr) 7d be64(D).
        assert data[-TRAILER_LEN:] == b"\x00" + struct.pack(">Q", f.eof) + b"\x7d" + struct.pack(">Q", r.directory_offset)


def test_verify_and_deep_verify_ok(case: Case) -> None:
    r = savedir.verify(case.path)
    assert r.ok and bool(r), r
    assert (r.check, r.offset, r.deep) == (None, None, False), r
    assert r.entries == case.result.entries
    d = savedir.verify(case.path, deep=True)
    assert d.ok, d
    assert (d.check, d.offset, d.deep) == (None, None, True), d
    assert d.entries == case.result.entries
    with savedir.open(case.path) as f:
        assert f.verify().ok and f.verify(deep=True).ok
    assert case.path.read_bytes() == case.indexed  # verify only reads


def test_pristine_stream_has_no_directory(case: Case) -> None:
    r = savedir.verify(case.stream.path)
    assert not r.ok and r.check == "trailer" and r.entries == 0, r


def test_index_again_is_a_no_op(case: Case) -> None:
    mtime = case.path.stat().st_mtime_ns
    r = savedir.index(case.path)
    assert r.written is False, r
    assert (r.entries, r.directory_offset, r.directory_size, r.replaced) == (
        case.result.entries, case.result.directory_offset, case.result.directory_size, 0,
    )
    assert sha256(case.path.read_bytes()) == sha256(case.indexed)
    assert case.path.stat().st_mtime_ns == mtime


def test_directory_bytes_follow_the_spec(case: Case) -> None:
    """Decodes the appended directory with a decoder written from the spec
    and checks every entry, pointer and (for small items) checksum."""
    data = case.indexed
    eof_ptr, d, dir_entries = decode_directory(data)
    assert d == case.result.directory_offset
    with savedir.open(case.path) as f:
        entries = f.entries
        assert eof_ptr == f.eof
    assert len(dir_entries) == len(entries) == case.result.entries
    # file order, vmdesc right before the EOF entry
    assert [e.ptr for e in dir_entries] == sorted(e.ptr for e in dir_entries)
    assert dir_entries[-1].kind == "vmdesc"
    for de, e in zip(dir_entries, entries):
        assert de.kind == e.kind and de.ptr == e.offset, (de, e.kind, e.offset)
        assert data[de.ptr] == TYPE_BYTE[de.kind], de
        if de.kind in ("start", "full"):
            assert (de.section_id, de.name, de.instance_id, de.version_id) == (e.section_id, e.name, e.instance_id, e.version_id)
        elif de.kind in ("part", "end"):
            assert de.section_id == e.section_id
        elif de.kind == "command":
            assert de.command == e.command
            assert data[de.ptr + 1:de.ptr + 5] == struct.pack(">HH", de.command, de.command_len)
        # checksums are written by default, one per entry
        assert de.crc is not None and de.crc == e.crc32c, (de, e.crc32c)
        if e.size <= 256 << 10:
            assert crc32c(data[e.offset:e.end]) == de.crc, (e.kind, e.name, e.offset)


# ---------------------------------------------------------------------------
# listing


def test_entries_tile_the_stream(case: Case) -> None:
    pristine = case.pristine
    with savedir.open(case.path) as f:
        entries = f.entries
        eof, start = f.eof, f.stream_start
        assert start == 0
        assert pristine[eof] == 0x00
    assert entries[0].kind == "configuration" and entries[0].offset == start + HEADER_LEN
    body = [e for e in entries if e.kind != "vmdesc"]
    assert len(body) == len(entries) - 1 and entries[-1].kind == "vmdesc"
    for a, b in zip(body, body[1:]):
        assert a.end == b.offset, f"gap or overlap between {a.kind} {a.name} [{a.offset},{a.end}) and {b.kind} {b.name} at {b.offset}"
    assert body[-1].end == eof
    vd = entries[-1]
    assert vd.offset == eof + 1 and vd.end == len(pristine)
    for e in entries:
        assert e.size == e.end - e.offset > 0, (e.kind, e.name, e.offset)
        assert e.offset <= e.payload_offset <= e.payload_offset + e.payload_size <= e.end, (e.kind, e.name)
        assert len(e.data) == e.size and len(e.payload) == e.payload_size
        assert bytes(e.data) == pristine[e.offset:e.end]
        assert bytes(e.payload) == pristine[e.payload_offset:e.payload_offset + e.payload_size]


def test_full_entries_are_the_vmdesc_devices(case: Case) -> None:
    with savedir.open(case.path) as f:
        fulls = [e for e in f.entries if e.kind == "full"]
    devices = qemu_harness.vmdesc(case.pristine)["devices"]
    assert [(e.name, e.instance_id) for e in fulls] == [(d["name"], d.get("instance_id", 0)) for d in devices]
    # and they sit where the harness's footer-anchored search finds them
    found = qemu_harness.device_sections(case.pristine)
    assert [(off, name, inst, ver) for off, name, inst, ver in found] == [
        (e.offset, e.name, e.instance_id, e.version_id) for e in fulls
    ]


def test_section_headers_and_footers_match_the_stream(case: Case) -> None:
    pristine = case.pristine
    with savedir.open(case.path) as f:
        assert f.footers is True
        for e in f.entries:
            if e.kind in ("start", "full", "part", "end"):
                hdr = expected_header(e)
                assert pristine[e.offset:e.offset + len(hdr)] == hdr, (e.kind, e.name, e.offset)
                assert e.payload_offset == e.offset + len(hdr), (e.kind, e.name)
                # every section item ends in its footer: 7e be32(section_id)
                assert pristine[e.end - 5:e.end] == bytes([FOOTER]) + struct.pack(">I", e.section_id), (e.kind, e.name)
                assert e.payload_offset + e.payload_size == e.end - 5, (e.kind, e.name)
            elif e.kind == "configuration":
                n = struct.unpack(">I", pristine[e.offset + 1:e.offset + 5])[0]
                assert pristine[e.offset] == 0x07
                assert pristine[e.offset + 5:e.offset + 5 + n].decode() == f.machine_type
                assert e.end == e.offset + 5 + n
            elif e.kind == "command":
                assert pristine[e.offset] == 0x08
                cmd, length = struct.unpack(">HH", pristine[e.offset + 1:e.offset + 5])
                assert cmd == e.command and e.size == 5 + length
            elif e.kind == "vmdesc":
                n = struct.unpack(">I", pristine[e.offset + 1:e.offset + 5])[0]
                assert pristine[e.offset] == 0x06 and e.size == 5 + n
        want = "pc-q35-" if case.stream.machine == "q35" else "pc-i440fx-"
        assert f.machine_type.startswith(want), f.machine_type
        # PART/END entries carry the name of the section their START opened
        starts = {e.section_id: e for e in f.entries if e.kind == "start"}
        for e in f.entries:
            if e.kind in ("part", "end"):
                s = starts[e.section_id]
                assert (e.name, e.instance_id, e.version_id) == (s.name, s.instance_id, s.version_id)


def test_directory_and_scan_list_the_same_items(case: Case) -> None:
    with savedir.open(case.path) as f, savedir.open(case.path, scan=True) as g, savedir.open(case.stream.path) as p:
        assert (f.indexed, g.indexed, p.indexed) == (True, False, False)
        a, b, c = f.entries, g.entries, p.entries
        assert [entry_key(e) for e in a] == [entry_key(e) for e in b] == [entry_key(e) for e in c]
        assert all(e.crc32c is not None for e in a)
        assert all(e.crc32c is None for e in b + c)
        props = lambda x: (x.stream_start, x.stream_end, x.eof, x.footers, x.machine_type)
        assert props(f) == props(g) == props(p)
        assert f.vmdesc == g.vmdesc == p.vmdesc


def test_vmdesc_is_the_streams(case: Case) -> None:
    with savedir.open(case.path) as f:
        assert f.vmdesc == qemu_harness.vmdesc(case.pristine)
        vd = f.entries[-1]
        assert bytes(f.vmdesc_json) == case.pristine[vd.payload_offset:vd.end]
        assert f.vmdesc["page_size"] == 4096


def test_ram_is_a_live_section(case: Case) -> None:
    with savedir.open(case.path) as f:
        ram = f["ram"]
        assert ram is not None and ram.live is True
        assert ram.name == "ram" and ram.instance_id == 0
        kinds = [e.kind for e in ram.entries]
        assert kinds[0] == "start" and kinds[-1] == "end", kinds
        assert all(k == "part" for k in kinds[1:-1]), kinds
        assert len({e.section_id for e in ram.entries}) == 1
        offsets = [e.offset for e in ram.entries]
        assert offsets == sorted(offsets)
        # the ram items are exactly the stream's items with ram's section id
        assert [e.offset for e in f.entries if e.section_id == ram.section_id] == offsets
        assert ram.read() == b"".join(case.pristine[e.offset:e.end] for e in ram.entries)
        assert ram.read(payload=True) == b"".join(
            case.pristine[e.payload_offset:e.payload_offset + e.payload_size] for e in ram.entries
        )
        assert ram.size == sum(e.size for e in ram.entries)
        with pytest.raises(savedir.SavedirError):
            _ = ram.data  # several items: no single view


def test_full_sections_read_exactly_their_bytes(case: Case) -> None:
    pristine = case.pristine
    with savedir.open(case.path) as f:
        fulls = [e for e in f.entries if e.kind == "full"]
        assert len(fulls) > 20
        for e in fulls:
            sec = f.section(e.name, e.instance_id)
            assert sec.live is False and len(sec.entries) == 1
            assert (sec.name, sec.instance_id, sec.version_id) == (e.name, e.instance_id, e.version_id)
            assert bytes(sec.data) == pristine[e.offset:e.end], e.name
            assert bytes(sec.payload) == pristine[e.payload_offset:e.end - 5], e.name
            assert sec.read() == bytes(sec.data) and sec.read(payload=True) == bytes(sec.payload)
            assert f[e.name, e.instance_id].offset == e.offset
            assert (e.name, e.instance_id) in f
        # f["name"] is the lowest instance
        for name in {e.name for e in fulls}:
            lowest = min(e.instance_id for e in fulls if e.name == name)
            assert f[name].instance_id == lowest
        with pytest.raises(savedir.SectionNotFoundError):
            f["no-such-section"]
        with pytest.raises(KeyError):
            f["cpu", 999]
        assert "no-such-section" not in f


def test_cli_cat_full_sections(case: Case, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    pristine = case.pristine
    with savedir.open(case.path) as f:
        fulls = [e for e in f.entries if e.kind == "full"]
    for e in fulls:
        args = [str(case.path), e.name, "--instance", str(e.instance_id)]
        assert savedir.cli.main(["cat", *args]) == 0
        out = capsysbinary.readouterr().out
        assert out == pristine[e.offset:e.end], e.name
        assert savedir.cli.main(["cat", *args, "--payload"]) == 0
        out = capsysbinary.readouterr().out
        header = len(expected_header(e))
        assert len(out) == e.size - header - 5, e.name
        assert out == pristine[e.offset + header:e.end - 5], e.name


def test_views_are_zero_copy_and_read_only(case: Case) -> None:
    with savedir.open(case.path) as f:
        entries = f.entries
        e1, e2 = entries[5], entries[6]
        d1 = e1.data
        a = np.frombuffer(d1, dtype=np.uint8)
        b = np.frombuffer(e1.data, dtype=np.uint8)  # a second view of the same entry
        c = np.frombuffer(e2.data, dtype=np.uint8)
        whole = np.frombuffer(f.view(0, f.file_size), dtype=np.uint8)
        assert np.shares_memory(a, b)
        assert np.shares_memory(a, whole) and np.shares_memory(c, whole)
        addr = lambda arr: arr.__array_interface__["data"][0]
        # all views point into one mapping of the file, at the entries' offsets
        assert addr(a) - addr(whole) == e1.offset
        assert addr(c) - addr(whole) == e2.offset
        p = np.frombuffer(e1.payload, dtype=np.uint8)
        assert addr(p) - addr(whole) == e1.payload_offset
        assert a.flags.writeable is False
        assert d1.readonly is True and e1.payload.readonly is True and f.vmdesc_json.readonly is True
        with pytest.raises(TypeError):
            d1[0] = 0
        with pytest.raises(TypeError):
            e1.payload[0:1] = b"\x00"
        with pytest.raises(ValueError):
            a[0] = 0
        ram_part = f["ram"].entries[1]
        big = ram_part.data
        desc = f.vmdesc_json
    # after close (and after the SaveFile is gone) the views still read the file
    del f
    gc.collect()
    assert bytes(d1) == case.pristine[e1.offset:e1.end]
    assert a.tobytes() == case.pristine[e1.offset:e1.end]
    assert bytes(big[-5:]) == case.pristine[ram_part.end - 5:ram_part.end]
    assert json.loads(bytes(desc)) == qemu_harness.vmdesc(case.pristine)
    assert case.path.read_bytes() == case.indexed


def test_closed_file_refuses_use(case: Case) -> None:
    f = savedir.open(case.path)
    f.close()
    with pytest.raises(ValueError):
        _ = f.entries
    f.close()  # closing twice is harmless


# ---------------------------------------------------------------------------
# QEMU


@pytest.mark.parametrize("uri_kind", ["exec", "file"])
def test_qemu_loads_the_indexed_file(case: Case, qemu_load: Any, uri_kind: str) -> None:
    st = qemu_load(case.stream, case.path, uri_kind=uri_kind, timeout=30)
    assert st["status"] in qemu_harness.LOADED_STATES, st
    assert st["status"] == ("paused" if case.stream.run_seconds > 0 else "prelaunch"), st
    assert case.path.read_bytes() == case.indexed


def test_strip_gives_back_the_pristine_stream(case: Case, qemu_load: Any, tmp_path: Path) -> None:
    path = case.stream.copy_to(tmp_path)
    r = savedir.index(path)
    assert r.written and path.read_bytes() == case.indexed
    s = savedir.strip(path)
    assert s.path == str(path)
    assert s.removed == r.ram_map_size + r.directory_size and s.stream_end == len(case.pristine)
    assert sha256(path.read_bytes()) == sha256(case.pristine)
    again = savedir.strip(path)
    assert again.removed == 0 and again.stream_end == len(case.pristine)
    assert sha256(path.read_bytes()) == sha256(case.pristine)
    st = qemu_load(case.stream, path, uri_kind="file", timeout=30)
    assert st["status"] in qemu_harness.LOADED_STATES, st


def test_index_without_checksums(case: Case, tmp_path: Path) -> None:
    path = case.stream.copy_to(tmp_path)
    r = savedir.index(path, checksums=False)
    assert r.written and r.entries == case.result.entries
    # each checksum is 6 bytes: 7c u8 be32
    assert r.directory_size == case.result.directory_size - 6 * r.entries
    data = path.read_bytes()
    assert data[: len(case.pristine)] == case.pristine
    assert len(data) == len(case.pristine) + r.ram_map_size + r.directory_size
    assert all(e.crc is None for e in decode_directory(data)[2])
    v = savedir.verify(path, deep=True)
    assert v.ok and v.deep, v
    with savedir.open(path) as f:
        assert f.indexed and all(e.crc32c is None for e in f.entries)
    # already indexed: left alone even though this call asks for checksums
    assert savedir.index(path).written is False
    assert path.read_bytes() == data
    # force rewrites the directory, now with checksums
    r2 = savedir.index(path, force=True)
    assert r2.written and r2.replaced == r.ram_map_size + r.directory_size
    assert path.read_bytes() == case.indexed
    assert savedir.verify(path, deep=True).ok
