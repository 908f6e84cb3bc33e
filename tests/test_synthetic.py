"""The synthetic stream generator (tests/synthetic.py), checked against
savedir and against an independent walk of the bytes.

No QEMU needed: these streams are made with numpy in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

import savedir
import synthetic

SIZE = 64 << 20
PAGES_PER_PART = 1024  # 64 MiB -> 16 PART sections


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    path = tmp_path_factory.mktemp("synthetic") / "s64.sav"
    info = synthetic.write_stream(path, SIZE, pages_per_part=PAGES_PER_PART, zero_fraction=0.2, seed=7)
    path.chmod(0o444)  # pristine: tests work on copies
    return info


def _copy(info: Dict[str, Any], tmp_path: Path) -> Path:
    dest = tmp_path / "copy.sav"
    shutil.copyfile(info["path"], dest)
    dest.chmod(0o644)
    return dest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "savedir", *args], capture_output=True, text=True, timeout=120)


_LS_KEYS = ("kind", "offset", "size", "section_id", "name", "instance_id", "version_id", "command", "command_name")


def _ls(path: Path, *extra: str) -> Dict[str, Any]:
    r = _cli("ls", "--json", *extra, str(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _project(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: e[k] for k in _LS_KEYS if k in e} for e in entries]


def _walk(data: bytes, info: Dict[str, Any]) -> Dict[str, Any]:
    """Walks the stream by its grammar, independently of savedir and of the
    generator's bookkeeping; returns the items found and every RAM page."""
    assert data[:8] == b"QEVM\x00\x00\x00\x03"
    pos = 8
    items: List[Dict[str, Any]] = []
    pages: Dict[str, List[int]] = {}
    blocks: Dict[str, int] = {}
    last_block = None
    desc = json.loads(data[info["eof"] + 6:])
    sizes = iter(d["fields"][0]["size"] for d in desc["devices"])
    footer = 5 if info["footers"] else 0
    names: Dict[int, str] = {}

    def cstr8(at: int):
        n = data[at]
        return data[at + 1:at + 1 + n].decode(), at + 1 + n

    def ram_payload(at: int) -> int:
        nonlocal last_block
        while True:
            word = struct.unpack_from(">Q", data, at)[0]
            at += 8
            flags, addr = word & 0xFFF, word & ~0xFFF
            if flags == synthetic.RAM_EOS:
                return at
            if flags == synthetic.RAM_MEM_SIZE:
                total = 0
                while total < addr:
                    bid, at = cstr8(at)
                    blocks[bid] = struct.unpack_from(">Q", data, at)[0]
                    at += 8
                    total += blocks[bid]
                assert total == addr
                continue
            kind = flags & ~synthetic.RAM_CONTINUE
            if flags & synthetic.RAM_CONTINUE:
                assert last_block is not None
            else:
                last_block, at = cstr8(at)
            assert addr < blocks[last_block]
            pages.setdefault(last_block, []).append(addr // synthetic.PAGE_SIZE)
            if kind == synthetic.RAM_ZERO:
                assert data[at] == 0
                at += 1
            else:
                assert kind == synthetic.RAM_PAGE, hex(word)
                assert any(data[at:at + synthetic.PAGE_SIZE]), "an all-zero PAGE record"
                at += synthetic.PAGE_SIZE

    while True:
        t = data[pos]
        item: Dict[str, Any] = {"offset": pos}
        if t == synthetic.EOF:
            eof = pos
            break
        if t == synthetic.CONFIGURATION:
            n = struct.unpack_from(">I", data, pos + 1)[0]
            item["kind"] = "configuration"
            assert data[pos + 5:pos + 5 + n] == synthetic.MACHINE_TYPE.encode()
            pos += 5 + n
        elif t == synthetic.COMMAND:
            cmd, n = struct.unpack_from(">HH", data, pos + 1)
            item.update(kind="command", command=cmd)
            pos += 5 + n
        elif t in (synthetic.SECTION_START, synthetic.SECTION_FULL):
            sid = struct.unpack_from(">I", data, pos + 1)[0]
            name, at = cstr8(pos + 5)
            inst, ver = struct.unpack_from(">II", data, at)
            names[sid] = name
            item.update(kind="start" if t == synthetic.SECTION_START else "full", section_id=sid, name=name,
                        instance_id=inst, version_id=ver)
            at += 8
            at = ram_payload(at) if name == "ram" else at + next(sizes)
            if footer:
                assert data[at:at + 5] == b"\x7e" + struct.pack(">I", sid)
            pos = at + footer
        elif t in (synthetic.SECTION_PART, synthetic.SECTION_END):
            sid = struct.unpack_from(">I", data, pos + 1)[0]
            assert names[sid] == "ram"
            item.update(kind="part" if t == synthetic.SECTION_PART else "end", section_id=sid)
            at = ram_payload(pos + 5)
            if footer:
                assert data[at:at + 5] == b"\x7e" + struct.pack(">I", sid)
            pos = at + footer
        else:
            raise AssertionError(f"unknown type 0x{t:02x} at {pos}")
        items.append(item)
    assert data[eof + 1] == synthetic.VMDESCRIPTION
    n = struct.unpack_from(">I", data, eof + 2)[0]
    assert eof + 6 + n == len(data)
    return {"items": items, "eof": eof, "pages": pages, "blocks": blocks, "desc": desc}


def _check_walk(info: Dict[str, Any], data: bytes) -> None:
    w = _walk(data, info)
    assert w["eof"] == info["eof"]
    assert len(data) == info["file_size"]
    got = [{k: e[k] for k in ("kind", "offset", "section_id", "name", "instance_id", "version_id", "command") if k in e}
           for e in info["entries"] if e["kind"] != "vmdesc"]
    want = [dict(i) for i in w["items"]]
    for g in got:  # the walk names PART/END by id only
        if g["kind"] in ("part", "end"):
            del g["name"], g["instance_id"], g["version_id"]
    assert got == want
    # every page of every block exactly once, in order
    assert w["blocks"] == {synthetic.RAM_BLOCK: info["ram_bytes"], synthetic.ACPI_BLOCK: synthetic.ACPI_BYTES}
    for bid, size in w["blocks"].items():
        assert w["pages"][bid] == list(range(size // synthetic.PAGE_SIZE)), bid
    assert info["data_pages"] + info["zero_pages"] == info["pages"] == sum(len(p) for p in w["pages"].values())
    # the vmdesc: one device per FULL section, in stream order
    fulls = [e for e in info["entries"] if e["kind"] == "full"]
    assert [(d["name"], d["instance_id"], d["version"]) for d in w["desc"]["devices"]] == \
           [(e["name"], e["instance_id"], e["version_id"]) for e in fulls]
    assert w["desc"]["page_size"] == 4096


def test_generator_writes_what_it_reports(stream):
    data = Path(stream["path"]).read_bytes()
    _check_walk(stream, data)
    assert stream["part_sections"] == SIZE // 4096 // PAGES_PER_PART
    kinds = [e["kind"] for e in stream["entries"]]
    assert kinds[:2] == ["configuration", "start"] and kinds[-1] == "vmdesc"
    assert kinds.count("part") == stream["part_sections"] and kinds.count("end") == 1
    assert kinds.count("full") == stream["full_sections"] >= 30
    assert kinds.index("command") == 2 + stream["part_sections"]
    assert data[stream["entries"][kinds.index("command")]["offset"]:][:5] == bytes.fromhex("08000b0000")
    assert 0.15 < stream["zero_pages"] / stream["pages"] < 0.25


def test_same_seed_same_bytes(tmp_path):
    a = synthetic.write_stream(tmp_path / "a", 4 << 20, pages_per_part=256, seed=3)
    b = synthetic.write_stream(tmp_path / "b", 4 << 20, pages_per_part=256, seed=3)
    synthetic.write_stream(tmp_path / "c", 4 << 20, pages_per_part=256, seed=4)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert (tmp_path / "a").read_bytes() != (tmp_path / "c").read_bytes()
    assert a["entries"] == b["entries"]


def test_index_verify_deep_and_ls(stream, tmp_path):
    path = _copy(stream, tmp_path)
    want = _project(stream["entries"])

    scanned = _ls(path)
    assert not scanned["indexed"]
    assert _project(scanned["entries"]) == want
    assert (scanned["eof"], scanned["stream_end"]) == (stream["eof"], stream["file_size"])
    assert scanned["machine_type"] == synthetic.MACHINE_TYPE

    r = _cli("index", str(path))
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(path) > stream["file_size"]
    r = _cli("verify", "--deep", str(path))
    assert r.returncode == 0, r.stdout + r.stderr

    listed = _ls(path)
    assert listed["indexed"]
    assert _project(listed["entries"]) == want
    assert (listed["eof"], listed["stream_end"]) == (stream["eof"], stream["file_size"])
    # the stream's bytes are untouched
    with open(path, "rb") as f, open(stream["path"], "rb") as g:
        assert f.read(stream["file_size"]) == g.read()


def test_one_gib_stream(tmp_path):
    path = tmp_path / "s1g.sav"
    info = synthetic.write_stream(path, 1 << 30, seed=11)
    assert _project(_ls(path)["entries"]) == _project(info["entries"])
    r = _cli("index", str(path))
    assert r.returncode == 0, r.stderr
    r = _cli("verify", "--deep", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    listed = _ls(path)
    assert listed["indexed"] and listed["eof"] == info["eof"]
    assert _project(listed["entries"]) == _project(info["entries"])


@pytest.mark.parametrize("footers,name_every_part", [(False, True), (True, False)])
def test_variants_index_and_verify(tmp_path, footers, name_every_part):
    path = tmp_path / "v.sav"
    info = synthetic.write_stream(path, 16 << 20, pages_per_part=512, zero_fraction=0.5, seed=1,
                                  footers=footers, name_every_part=name_every_part)
    _check_walk(info, path.read_bytes())
    res = savedir.index(path)
    assert res.written and res.directory_offset == info["file_size"] + res.ram_map_size
    v = savedir.verify(path, deep=True)
    assert v.ok, v.message
    with savedir.open(path) as f:
        assert f.indexed and f.footers == footers and f.eof == info["eof"]
        assert [(e.kind, e.offset, e.size) for e in f.entries] == \
               [(e["kind"], e["offset"], e["size"]) for e in info["entries"]]


def test_cut_streams_raise_and_stay_unchanged(stream, tmp_path):
    data = Path(stream["path"]).read_bytes()
    first = {}
    for e in stream["entries"]:
        first.setdefault(e["kind"], e["offset"])
    rng = random.Random(20)
    # 20 cuts: 8 anywhere (mostly RAM pages), 4 in the RAM END section, 8 in
    # the devices, EOF and vmdesc; never at eof+1, where a complete stream
    # without vmdesc ends
    ranges = [(1, len(data))] * 8 + [(first["end"], first["full"])] * 4 + [(first["full"], len(data))] * 8
    cuts: List[int] = []
    for lo, hi in ranges:
        while True:
            c = rng.randrange(lo, hi)
            if c != stream["eof"] + 1 and c not in cuts:
                cuts.append(c)
                break
    path = tmp_path / "cut.sav"
    shutil.copyfile(stream["path"], path)
    path.chmod(0o644)
    raised = {}
    back = bytearray(len(data))  # reused: allocating 64 MiB per cut is what would cost
    for cut in sorted(cuts, reverse=True):  # truncating a copy is cheaper than rewriting it
        os.truncate(path, cut)
        before = os.stat(path)
        with pytest.raises(savedir.FormatError) as exc:
            savedir.index(path)
        raised[cut] = type(exc.value).__name__
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (cut, before.st_mtime_ns), cut
        with open(path, "rb") as f:
            assert f.readinto(back) == cut
        assert np.array_equal(np.frombuffer(back, np.uint8, cut), np.frombuffer(data, np.uint8, cut)), cut
    # The subclass: TruncatedError. (The build of 05da9dd said
    # UnsupportedStreamError for cuts after the RAM, where the lost vmdesc
    # leaves the device sections unsized; hence the loose check.)
    assert "TruncatedError" in raised.values(), raised
