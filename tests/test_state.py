"""``savedir state`` and ``Section.fields``: device sections decoded field
by field through the vmdesc, on streams real QEMU wrote.

Every device section must decode exactly to its footer: the decoded fields,
written back by an independent encoder (tests/state_check.py), give the
section's payload byte for byte. (QEMU 7.2 streams and the other stream
kinds are checked the same way in test_qemu72.py, test_nofooters.py and
test_stream_kinds.py.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import savedir
import savedir.cli
import state_check
import stream_kinds as sk


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = savedir.cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


def leaves(v: Any) -> Any:
    if isinstance(v, dict):
        for x in v.values():
            yield from leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from leaves(x)
    else:
        yield v


def test_every_device_section_decodes_to_its_footer(qemu_streams: list[Any], tmp_path: Path) -> None:
    for s in qemu_streams:
        with savedir.open(s.path) as f:
            assert state_check.check_decodes(f) >= 20, s.name
        # Through the directory, the same.
        p = s.copy_to(tmp_path / s.name)
        savedir.index(p)
        with savedir.open(p) as f, savedir.open(s.path) as g:
            assert f.indexed
            assert f.state().to_dict()["sections"] == g.state().to_dict()["sections"], s.name


def test_values_are_typed(qemu_stream_by_name: dict[str, Any]) -> None:
    s = qemu_stream_by_name["pc-full-file-ran"]
    with savedir.open(s.path) as f:
        cpu = f["cpu", 0].fields
        regs = cpu["env.regs"]
        assert len(regs) == 16 and all(type(r) is int and r >= 0 for r in regs)
        assert cpu["env.a20_mask"] == -1  # an int32: signed
        assert [sorted(seg) for seg in cpu["env.segs"]] == [["base", "flags", "limit", "selector"]] * 6
        # Subsections sent are nested under their vmsd name.
        subs = [k for k in cpu if k.startswith("cpu/")]
        assert subs and all(isinstance(cpu[k], dict) for k in subs)
        assert [k for d in f.vmdesc["devices"] if d["name"] == "cpu" and d["instance_id"] == 0
                for k in (x["vmsd_name"] for x in d.get("subsections", []))] == subs
        rtc = f["mc146818rtc"].fields
        assert isinstance(rtc["periodic_timer"], bytes) and len(rtc["periodic_timer"]) == 8  # a timer: bytes
        assert rtc["unused[0]"] == bytes(28)  # unused_buffer, named as the vmdesc names it
        piix = f["0000:00:01.3/piix4_pm"].fields
        assert any(type(v) is bool for v in leaves(piix)), "piix4_pm has bool fields"
        assert isinstance(f["0000:00:03.0/virtio-net"].fields["virtio"], bytes)
        # Decoded on first use, then kept.
        sec = f["timer"]
        assert sec.fields is sec.fields


def test_state_json_shape(qemu_stream_by_name: dict[str, Any]) -> None:
    s = qemu_stream_by_name["q35-full-exec-ran"]
    rc, out, err = cli("state", str(s.path), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) == {"path", "sections"} and doc["path"] == str(s.path)
    with savedir.open(s.path) as f:
        want = [("configuration", None)] + [(x.name, x.instance_id) for x in f.sections()]
        state = f.state()
        runstate = f["globalstate"].fields["runstate"]
    assert [(x["name"], x["instance_id"]) for x in doc["sections"]] == want
    for x in doc["sections"]:
        base = {"name", "instance_id", "section_id", "version_id", "fields"}
        assert set(x) == (base | {"live"} if x["fields"] is None else base), x["name"]
    glob = next(x for x in doc["sections"] if x["name"] == "globalstate")["fields"]
    assert glob["runstate"] == runstate.hex() and glob["runstate"].startswith(b"paused".hex())
    assert glob["size"] == 7 and type(glob["size"]) is int
    cpu = next(x for x in doc["sections"] if x["name"] == "cpu")["fields"]
    assert type(cpu["env.a20_mask"]) is int and cpu["env.a20_mask"] == -1
    assert doc == json.loads(json.dumps(state.to_dict()))


def test_state_selects_sections(qemu_stream_by_name: dict[str, Any]) -> None:
    s = qemu_stream_by_name["pc-full-exec-paused"]
    rc, out, err = cli("state", str(s.path), "cpu:0", "dma", "0000:00:02.0/vga", "--json")
    assert rc == 0, err
    got = [(x["name"], x["instance_id"]) for x in json.loads(out)["sections"]]
    assert got == [("cpu", 0), ("dma", 0), ("dma", 1), ("0000:00:02.0/vga", 0)]
    rc, out, err = cli("state", str(s.path), "cpu:0")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("cpu (instance 0, section ") and "version 12" in lines[0]
    assert any(line.startswith("  env.eip: ") for line in lines)
    assert "  env.segs:" in lines and "    [1]:" in lines
    rc, out, err = cli("state", str(s.path), "nosuch")
    assert rc == 1 and "no section is named \"nosuch\"" in err
    rc, out, err = cli("state", str(s.path), "cpu:7")
    assert rc == 1 and "has no instance 7" in err


def test_live_sections_are_described_not_decoded(qemu_stream_by_name: dict[str, Any]) -> None:
    s = qemu_stream_by_name["pc-full-file-ran"]
    data = s.read_bytes()
    with savedir.open(s.path) as f:
        ram = f["ram"]
        with pytest.raises(savedir.UnsupportedStreamError, match="live section"):
            ram.fields
        (x,) = f.state("ram").sections
        assert x.fields is None and x.live is not None
        assert x.live["items"] == len(ram.entries)
        assert x.live["payload_size"] == sum(e.payload_size for e in ram.entries)
        blocks: list[sk.RamBlock] = []
        start = ram.entries[0]
        sk.read_ram_item(data, start.payload_offset, start.end, blocks=blocks)
    assert [(b["id"], b["used_length"]) for b in x.live["ram_blocks"]] == [(b.name, b.used_length) for b in blocks]
    assert any(b.name == "pc.ram" and b.used_length == 64 << 20 for b in blocks)


@pytest.mark.parametrize("kind", ["mapped-ram", "x-ignore-shared"])
def test_ram_blocks_of_streams_with_capabilities(kind: str, tmp_path: Path) -> None:
    # The block list's layout depends on the capabilities the configuration
    # section names (mapped-ram: a header and a page region per block).
    m = sk.make_mapped_ram(tmp_path) if kind == "mapped-ram" else sk.make_ignore_shared(tmp_path)
    data = m.path.read_bytes()
    with savedir.open(m.path) as f:
        (conf,) = f.state("configuration").sections
        assert conf.fields is not None and conf.fields["configuration/capabilities"]["capabilities"] == kind
        (x,) = f.state("ram").sections
        start = f["ram"].entries[0]
        blocks: list[sk.RamBlock] = []
        sk.read_ram_item(data, start.payload_offset, start.end, blocks=blocks, mapped_ram=kind == "mapped-ram",
                         ignore_shared=kind == "x-ignore-shared")
    assert x.live is not None and len(blocks) > 3
    assert [(b["id"], b["used_length"]) for b in x.live["ram_blocks"]] == [(b.name, b.used_length) for b in blocks]


class Recorder(io.RawIOBase):
    """A binary file over bytes that records every range read from it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.reads = data, 0, []  # type: ignore[var-annotated]
        self.name = "recorded.sav"

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else min(len(self.data), self.pos + n)
        self.reads.append((self.pos, end))
        b = self.data[self.pos:end]
        self.pos = end
        return b


def test_state_reads_only_device_sections(qemu_stream_by_name: dict[str, Any], tmp_path: Path) -> None:
    s = qemu_stream_by_name["pc-full-file-ran"]
    p = s.copy_to(tmp_path)
    savedir.index(p)
    src = Recorder(p.read_bytes())
    with savedir.open(src) as f:
        assert f.indexed
        ram = f["ram"].entries
        src.reads.clear()
        state = f.state()
        assert len(state.sections) > 30
    # The RAM pages are never read: only the block list at the START's head.
    start_head = ram[0].payload_offset + (1 << 20)
    for a, b in src.reads:
        for e in ram:
            lo = max(e.offset, start_head) if e is ram[0] else e.offset
            assert b <= lo or a >= e.end, ((a, b), e.kind, e.offset, e.end)


def rewrite_vmdesc(src: Path, dst: Path, desc: Any) -> None:
    """``src``'s stream with its vmdesc replaced by ``desc`` (JSON)."""
    data = src.read_bytes()
    with savedir.open(src) as f:
        at = f.vmdesc_offset
    body = json.dumps(desc).encode()
    dst.write_bytes(data[:at] + b"\x06" + struct.pack(">I", len(body)) + body)


def mutations() -> st.SearchStrategy[tuple[str, Any]]:
    big = st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1]))
    return st.one_of(
        st.tuples(st.just("size"), big),
        st.tuples(st.just("array_len"), big),
        st.tuples(st.just("index"), big),
        st.tuples(st.just("type"), st.one_of(st.text(max_size=12), st.integers(), st.sampled_from(
            ["struct", "tmp", "nullptr", "bool", "uint64", "int8", "capability", "vstruct", "buffer"]))),
        st.tuples(st.just("nest"), st.integers(min_value=1, max_value=200)),
        st.tuples(st.just("drop"), st.sampled_from(["name", "type", "size", "struct", "fields"])),
        st.tuples(st.just("subsection"), st.text(max_size=300)),
    )


def mutate(desc: dict[str, Any], device: int, field: int, how: tuple[str, Any]) -> None:
    dev = desc["devices"][device % len(desc["devices"])]
    fields = dev.setdefault("fields", [])
    if not fields:
        fields.append({"name": "x", "type": "uint8", "size": 1})
    f = fields[field % len(fields)]
    kind, arg = how
    if kind in ("size", "array_len", "index", "type"):
        f[kind] = arg
    elif kind == "nest":
        inner = {"name": "leaf", "type": "uint8", "size": 1}
        for _ in range(arg):
            inner = {"name": "s", "type": "struct", "struct": {"vmsd_name": "s", "version": 1, "fields": [inner]},
                     "size": 1}
        fields[field % len(fields)] = inner
    elif kind == "drop":
        f.pop(arg, None)
    else:
        dev.setdefault("subsections", []).insert(0, {"vmsd_name": arg, "version": 1, "fields": []})


@pytest.fixture(scope="module")
def small_save(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    src = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"
    with savedir.open(src) as f:
        assert f.vmdesc is not None
        return src, f.vmdesc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device=st.integers(min_value=0, max_value=1000), field=st.integers(min_value=0, max_value=1000),
       how=mutations())
def test_hostile_vmdesc_ends_in_a_clear_error(small_save: tuple[Path, dict[str, Any]], tmp_path: Path, device: int,
                                             field: int, how: tuple[str, Any]) -> None:
    src, desc = small_save
    desc = json.loads(json.dumps(desc))
    mutate(desc, device, field, how)
    p = tmp_path / "hostile.sav"
    rewrite_vmdesc(src, p, desc)
    try:
        with savedir.open(p) as f:
            f.state()
    except savedir.SavedirError as e:
        msg = str(e)
        assert msg.startswith(str(p)) and "at offset" in msg, msg
        if "device \"" in msg and "field " in msg:
            assert isinstance(e, savedir.FormatError) and e.offset is not None


HOSTILE = r"""
import resource, sys, json, struct
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import savedir
src, dst = sys.argv[1], sys.argv[2]
with savedir.open(src) as f:
    desc, at = f.vmdesc, f.vmdesc_offset
data = open(src, "rb").read()
for dev in desc["devices"]:
    dev["fields"] = [{"name": "zero", "array_len": 10**15, "type": "buffer", "size": 0},
                     {"name": "many", "array_len": 2**63, "type": "uint64", "size": 8}]
body = json.dumps(desc).encode()
open(dst, "wb").write(data[:at] + b"\x06" + struct.pack(">I", len(body)) + body)
errors = 0
with savedir.open(dst) as f:
    for s in f.sections():
        if s.live:
            continue
        try:
            s.fields
        except savedir.FormatError as e:
            assert "far more values" in str(e), e
            errors += 1
print(errors)
"""


def test_hostile_vmdesc_stays_within_bounded_memory(small_save: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    src, desc = small_save
    # In a child limited to 1 GiB of address space: 10**15 empty elements
    # per device would need far more, if they were ever made.
    r = subprocess.run([sys.executable, "-c", HOSTILE, str(src), str(tmp_path / "h.sav")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == len(desc["devices"])


def test_stream_without_vmdesc_says_so(tmp_path: Path, qemu_stream_by_name: dict[str, Any]) -> None:
    s = qemu_stream_by_name["pc-minimal-exec-paused"]
    data = s.read_bytes()
    with savedir.open(s.path) as f:
        at = f.vmdesc_offset
    p = tmp_path / "bare.sav"
    p.write_bytes(data[:at])
    with savedir.open(p) as f:
        with pytest.raises(savedir.UnsupportedStreamError, match="no vmdesc"):
            f["cpu"].fields
    rc, out, err = cli("state", str(p))
    assert rc == 1 and "no vmdesc" in err
