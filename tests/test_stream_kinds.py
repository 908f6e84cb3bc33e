"""savedir on every kind of stream a real QEMU 10 writes.

Each test makes its stream with real QEMU (tests/stream_kinds.py), then runs
:func:`check_stream`: index, verify --deep, entries tiling the stream, a scan
agreeing with the directory, FULL sections agreeing with the vmdesc, reads of
every section, the CLI, QEMU loading the indexed file (with the same machine,
devices, capabilities, parameters, -global options and ``file:`` offset), and
strip giving back QEMU's bytes.  Kind-specific checks follow.

No skips, no xfails: where savedir misbehaves, the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shlex
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import savedir
import savedir.cli

import qemu_harness as h
import state_check
import stream_kinds as sk

pytestmark = pytest.mark.qemu

TYPE_BYTE = {"configuration": 0x07, "start": 0x01, "part": 0x02, "end": 0x03, "full": 0x04, "command": 0x08, "vmdesc": 0x06}
SAVEDIR = [sys.executable, "-m", "savedir"]


# ---------------------------------------------------------------------------
# helpers


def sha256_file(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            d.update(chunk)
    return d.hexdigest()


def key(e: savedir.Entry) -> tuple[Any, ...]:
    return (e.kind, e.offset, e.size, e.name, e.instance_id)


def cli(*args: str) -> tuple[int, bytes, str]:
    """Runs ``savedir ARGS`` in this process; returns (status, stdout bytes, stderr)."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = savedir.cli.main(list(args))
        out.flush()
        err.flush()
    return rc, out_b.getvalue(), err_b.getvalue().decode()


def offset_args(m: sk.Made) -> list[str]:
    return ["--offset", str(m.savedir_offset)] if m.savedir_offset is not None else []


def section_header(e: savedir.Entry) -> bytes:
    t = bytes([TYPE_BYTE[e.kind]])
    if e.kind in ("start", "full"):
        n = e.name.encode()
        return t + struct.pack(">IB", e.section_id, len(n)) + n + struct.pack(">II", e.instance_id, e.version_id)
    return t + struct.pack(">I", e.section_id)


def entries_summary(entries: list[savedir.Entry]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        k = f"{e.kind}:{e.name or e.command_name or ''}"
        out[k] = out.get(k, 0) + 1
    return out


def strip_copy(m: sk.Made, directory: Path) -> Path:
    """A copy of ``m``'s file without its directory (QEMU's bytes)."""
    c = sk.clone(m, directory, "original-" + m.path.name)
    savedir.strip(c.path, offset=m.savedir_offset)
    return c.path


def load_checked(m: sk.Made, tmp: Path, **kw: Any) -> dict[str, Any] | None:
    """QEMU loads the indexed file.  If it does not, say whether it loads
    the original (then savedir broke it) or refuses that too."""
    if m.load_refused:
        refused = sk.load_error(m.setup, m.uri)
        assert m.load_refused in refused, refused
        orig = strip_copy(m, tmp / "orig")
        refused_orig = sk.load_error(m.setup, sk.file_uri(orig, m.offset))
        assert m.load_refused in refused_orig, refused_orig
        return None
    try:
        st = m.load(**kw)
    except h.MigrationError as exc:
        orig = strip_copy(m, tmp / "orig")
        try:
            ost = m.load(orig)
            verdict = f"QEMU loads the original file (status {ost}): savedir's appended directory broke the load"
        except h.MigrationError as exc2:
            verdict = f"QEMU refuses the original too: {str(exc2)[-800:]}"
        raise AssertionError(f"QEMU does not load the indexed file {m.path} ({m.uri}): {exc}\n{verdict}") from None
    assert st["status"] in ("prelaunch", "paused", "running", "postmigrate"), st
    return st


# ---------------------------------------------------------------------------
# the common checks


def check_stream(m: sk.Made, tmp: Path, *, sidecar: bool = False, load_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything every kind must pass; returns facts for kind-specific checks."""
    p, off = m.path, m.savedir_offset
    size0, sha0 = p.stat().st_size, sha256_file(p)
    facts: dict[str, Any] = {"size": size0}
    problems: list[str] = []

    @contextlib.contextmanager
    def soft(what: str) -> Any:
        """Records a failing sub-check and goes on (only its text is kept:
        a live traceback would keep entries, hence the file's lock)."""
        try:
            yield
        except (AssertionError, savedir.SavedirError, h.HarnessError) as exc:
            problems.append(f"{what}: {type(exc).__name__}: {exc}")

    # -- before indexing: parse the stream
    with savedir.open(p, offset=off) as f0:
        assert not f0.indexed
        unindexed = [key(e) for e in f0.entries]
        assert f0.stream_start == (m.offset or 0), (f0.stream_start, m.offset)

    # -- index
    r = savedir.index(p, offset=off, sidecar=sidecar)
    assert r.written is True, r
    assert r.replaced == 0, r
    assert r.directory_offset == size0 + r.ram_map_size, r
    side = Path(str(p) + ".savedir")
    if sidecar:
        assert r.sidecar == str(side), r
        assert p.stat().st_size == size0 and sha256_file(p) == sha0, "sidecar indexing changed the file"
        assert side.stat().st_size == r.ram_map_size + r.directory_size
    else:
        assert r.sidecar is None and not side.exists()
        assert p.stat().st_size == size0 + r.ram_map_size + r.directory_size
        with open(p, "rb") as fh:
            h0 = hashlib.sha256()
            left = size0
            while left:
                chunk = fh.read(min(left, 1 << 20))
                h0.update(chunk)
                left -= len(chunk)
        assert h0.hexdigest() == sha0, "index changed the stream's bytes"
    assert savedir.index(p, offset=off, sidecar=sidecar).written is False  # idempotent

    # -- verify
    v = savedir.verify(p, deep=True, offset=off)
    assert v.ok, v
    assert v.entries == r.entries

    def inspect() -> tuple[list[tuple[Any, ...]], str, bytes, bytes | None]:
        # (a function, so that no Entry outlives it: entries and views
        #  keep the file mapped and shared-locked, and strip() below
        #  would wait for that lock forever)
        data = p.read_bytes()[:size0]
        with savedir.open(p, offset=off) as f:
            assert f.indexed is True
            assert f.directory_offset == size0 + r.ram_map_size and f.stream_end == size0
            if sidecar:
                assert f.sidecar == str(side), f.sidecar
            else:
                assert f.sidecar is None
            E = f.entries
            assert len(E) == r.entries
            facts.update(stream_start=f.stream_start, eof=f.eof, footers=f.footers, machine_type=f.machine_type,
                         container=f.container, found_by_scan=f.stream_found_by_scan, summary=entries_summary(E))
            assert f.stream_start == (m.offset or 0)
            assert data[f.stream_start:f.stream_start + 8] == h.STREAM_MAGIC
            assert f.stream_end == size0, (f.stream_end, size0)
            assert data[f.eof] == 0x00

            # -- the entries tile the stream, up to the EOF byte
            assert E[0].offset == f.stream_start + 8
            for a, b in zip(E, E[1:]):
                if b.kind == "vmdesc":
                    assert a.end == f.eof, (a.kind, a.name, a.end, f.eof)
                    assert b.offset == f.eof + 1
                else:
                    assert a.end == b.offset, (a.kind, a.name, a.offset, a.end, b.kind, b.offset)
            if m.vmdesc:
                assert E[-1].kind == "vmdesc" and E[-1].end == f.stream_end
                assert f.vmdesc is not None
                assert f.vmdesc == h.vmdesc(data[f.stream_start:]), "vmdesc differs from the file's"
            else:
                assert E[-1].kind != "vmdesc" and E[-1].end == f.eof
                assert f.stream_end == f.eof + 1
                assert f.vmdesc is None
            for e in E:
                assert data[e.offset] == TYPE_BYTE[e.kind], (e.kind, e.offset)
                if e.kind in ("start", "full", "part", "end"):
                    hdr = section_header(e)
                    assert data[e.offset:e.offset + len(hdr)] == hdr, (e.kind, e.name, e.offset)
                    if f.footers:
                        assert data[e.end - 5:e.end] == b"\x7e" + struct.pack(">I", e.section_id), (e.kind, e.name)

            # -- a scan of the stream finds the same entries as the directory
            direct = [key(e) for e in E]
            assert unindexed == direct, first_difference(unindexed, direct)
            with soft("open(scan=True) of the indexed file"):
                with savedir.open(p, scan=True, offset=off) as fs:
                    assert not fs.indexed
                    scanned = [key(e) for e in fs.entries]
                assert scanned == direct, first_difference(scanned, direct)

            # -- FULL entries agree with the vmdesc (or the vmdesc of the twin
            #    saved without suppress-vmdesc)
            desc = f.vmdesc if m.vmdesc else m.twin_vmdesc
            fulls = [e for e in E if e.kind == "full"]
            with soft("FULL sections vs the vmdesc" + ("" if m.vmdesc else " of the twin saved with a vmdesc")):
                check_fulls(fulls, desc, f.footers)
            del fulls
            if m.vmdesc:
                with soft("device sections decoded through the vmdesc"):
                    state_check.check_decodes(f)

            # -- cat-like reads
            with soft("section reads"):
                check_reads(f, data)
            first_full = next(e for e in E if e.kind == "full")
            cat_name = first_full.name
            cat_bytes = f.section(cat_name, first_full.instance_id).read()
            vm_json = bytes(f.vmdesc_json) if f.vmdesc_json is not None else None
            return direct, cat_name, cat_bytes, vm_json

    direct, cat_name, cat_bytes, vm_json = inspect()

    # -- the CLI, through the directory
    with soft("CLI"):
        rc, out, err = cli("verify", "--deep", *offset_args(m), str(p))
        assert rc == 0, (out, err)
        rc, out, err = cli("ls", *offset_args(m), str(p))
        assert rc == 0, err
        ls_text = out.decode()
        facts["ls"] = ls_text
        first = ls_text.splitlines()[0]
        assert ("sidecar" in first) if sidecar else ("read through its directory" in first), first
        rc, out, err = cli("ls", "--json", *offset_args(m), str(p))
        assert rc == 0, err
        facts["ls_json"] = json.loads(out)
        assert [(e["kind"], e["offset"], e["size"]) for e in facts["ls_json"]["entries"]] == [(k[0], k[1], k[2]) for k in direct]
        rc, out, err = cli("cat", *offset_args(m), str(p), cat_name, "--instance", str(first_full_instance(direct, cat_name)))
        assert rc == 0, err
        assert out == cat_bytes
        rc, out, err = cli("desc", *offset_args(m), str(p))
        if m.vmdesc:
            assert rc == 0 and out.rstrip(b"\n") == vm_json, err
        else:
            assert rc == 1 and "no vmdesc" in err, (rc, err)

    # -- QEMU loads the indexed file
    with soft("QEMU load"):
        facts["load_status"] = load_checked(m, tmp, **(load_kw or {}))

    # -- strip gives back QEMU's bytes
    s = savedir.strip(p, offset=off)
    if sidecar:
        assert s.sidecar == str(side) and not side.exists(), s
    else:
        assert s.removed == r.ram_map_size + r.directory_size, s
    assert p.stat().st_size == size0 and sha256_file(p) == sha0, "strip did not restore QEMU's bytes"
    assert not problems, f"{m.kind}: " + "\n".join(problems)
    return facts


def check_fulls(fulls: list[savedir.Entry], desc: dict[str, Any] | None, footers: bool) -> None:
    if desc is None:
        return
    devs = desc["devices"]
    got = [(e.name, e.instance_id) for e in fulls]
    want = [(d["name"], d["instance_id"]) for d in devs]
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        around = [(e.name, e.instance_id, e.offset, e.size) for e in fulls[max(0, i - 1):i + 2]]
        raise AssertionError(
            f"FULL section #{i}: savedir has {got[i] if i < len(got) else None}, the vmdesc "
            f"{want[i] if i < len(want) else None}; savedir's entries there (name, instance, offset, size): {around}; "
            f"{len(got)} FULL entries, {len(want)} vmdesc devices"
        )
    for e, d in zip(fulls, devs):
        assert e.payload_size == sk.vmsd_size(d), (e.name, e.payload_size, sk.vmsd_size(d))
        assert e.size == len(section_header(e)) + sk.vmsd_size(d) + (5 if footers else 0), e.name


def check_reads(f: savedir.SaveFile, data: bytes) -> None:
    """Every section reads back as the bytes of its items (a cat)."""
    sections = f.sections()
    assert sections
    for sec in sections:
        want = b"".join(data[e.offset:e.end] for e in sec.entries)
        assert sec.read() == want, sec.name
        want_p = b"".join(data[e.payload_offset:e.payload_offset + e.payload_size] for e in sec.entries)
        assert sec.read(payload=True) == want_p, sec.name
        assert f.section(sec.name, sec.instance_id).read() == want, sec.name


def first_full_instance(keys: list[tuple[Any, ...]], name: str) -> int:
    return min(k[4] for k in keys if k[0] == "full" and k[3] == name)


def first_difference(a: list[Any], b: list[Any]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at #{i}: {x} != {y}"
    return f"lengths {len(a)} != {len(b)}"


def ram_counts(m: sk.Made, data: bytes, entries: list[savedir.Entry], **kw: Any) -> dict[str, int]:
    """Reads every RAM item with the independent reader; each must end
    exactly at its payload's end."""
    counts: dict[str, int] = {}
    for e in entries:
        if e.name != "ram":
            continue
        end = e.payload_offset + e.payload_size
        pos = sk.read_ram_item(data, e.payload_offset, end, counts=counts, **kw)
        assert pos == end, (e.kind, e.offset, pos, end)
    return counts


# ---------------------------------------------------------------------------
# 1. mapped-ram


@pytest.mark.parametrize("channels", [0, 2, 4], ids=["alone", "multifd-2", "multifd-4"])
def test_mapped_ram(tmp_path: Path, channels: int) -> None:
    m = sk.make_mapped_ram(tmp_path, channels)
    facts = check_stream(m, tmp_path)
    savedir.index(m.path)
    assert savedir.verify(m.path, deep=True).ok
    data = m.path.read_bytes()
    with savedir.open(m.path) as f:
        start = f.section("ram").entries[0]
        assert start.kind == "start"
        s_off, s_end = start.offset, start.end
        entries = [e for e in f.entries if e.name == "ram"]
        blocks: list[sk.RamBlock] = []
        pos = sk.read_ram_item(data, start.payload_offset, s_end, mapped_ram=True, blocks=blocks)
        assert pos == start.payload_offset + start.payload_size
        rest = ram_counts(m, data, entries[1:], mapped_ram=True)
        del start, entries
    # The ram START's extent holds every block's bitmap and page region.
    assert blocks and {b.mapped_version for b in blocks} == {1}
    for b in blocks:
        assert s_off < b.bitmap_offset < b.pages_offset, b
        assert b.pages_offset % 4096 == 0
        assert b.pages_offset + b.used_length <= s_end, (b, s_end)
    assert s_end - s_off > sum(b.used_length for b in blocks)
    # PARTs and END carry no pages with mapped-ram, only EOS
    assert set(rest) <= {"eos", "multifd_flush"}, rest
    # The guest's dirtied pages are in the file: their bitmap bits are set.
    ram = next(b for b in blocks if b.name == "pc.ram")
    bitmap = data[ram.bitmap_offset:ram.bitmap_offset + ram.used_length // 4096 // 8]
    dirtied = list(range(0x10, 0x80)) + list(range(0x100, 0x900))
    stored = sum(1 for i in dirtied if bitmap[i // 8] >> (i % 8) & 1)
    assert stored >= 0.9 * len(dirtied), (stored, len(dirtied))
    print(f"\n{m.kind}: {m.setup.describe()}; file {facts['size']} bytes; made in {m.seconds:.1f}s")


# ---------------------------------------------------------------------------
# 2. x-ignore-shared


@pytest.mark.parametrize(
    "mapped_ram,backend", [(False, "file"), (True, "memfd")], ids=["file-backend", "mapped-ram-memfd"]
)
def test_ignore_shared(tmp_path: Path, mapped_ram: bool, backend: str) -> None:
    m = sk.make_ignore_shared(tmp_path, mapped_ram, backend)
    facts = check_stream(m, tmp_path)  # with mapped-ram: QEMU refuses original and indexed alike
    savedir.index(m.path)
    data = m.path.read_bytes()

    def ram() -> tuple[dict[str, int], dict[str, int], list[sk.RamBlock], int]:
        with savedir.open(m.path) as f:
            entries = [e for e in f.entries if e.name == "ram"]
            blocks: list[sk.RamBlock] = []
            first = ram_counts(m, data, entries[:1], ignore_shared=True, mapped_ram=mapped_ram, blocks=blocks)
            rest = ram_counts(m, data, entries[1:], ignore_shared=True, mapped_ram=mapped_ram)
            return first, rest, blocks, sum(e.size for e in entries)

    first, rest, blocks, ram_bytes = ram()
    mem0 = next(b for b in blocks if b.name == "mem0")
    assert mem0.used_length == 32 << 20 and mem0.addr == 0, mem0
    assert first["mem_size"] == 1
    if backend == "file":
        # the shared block's pages are not in the stream
        assert ram_bytes < 4 << 20, ram_bytes
        assert rest.get("page", 0) < 1024, rest
    print(f"\n{m.kind}: {m.setup.describe()}; {facts['summary']}; ram records {rest}")


def test_ignore_shared_mapped_ram_file_backend_refused_by_qemu(tmp_path: Path) -> None:
    """x-ignore-shared + mapped-ram with the RAM in a shared file (the case
    where QEMU really leaves the block out): QEMU 10.0.2 fails the save."""
    setup = sk.shared_ram_setup(tmp_path, mapped_ram=True, backend="file")
    with pytest.raises(h.MigrationError) as ei:
        sk.save(setup, sk.file_uri(tmp_path / "s.sav"), run_seconds=0.3)
    assert "Failed to write bitmap to file: Unable to write to file: Bad address" in str(ei.value), str(ei.value)


# ---------------------------------------------------------------------------
# 3. no vmdesc


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_no_vmdesc(tmp_path: Path, machine: str) -> None:
    m = sk.make_no_vmdesc(tmp_path, machine)
    assert h.vmdesc(m.path.read_bytes()) is None
    facts = check_stream(m, tmp_path)
    assert facts["footers"] is True


def locate_full_section(data: bytes, twin_data: bytes, twin_desc: dict[str, Any], name: str) -> tuple[int, bytes, dict[str, Any]]:
    """Finds device ``name``'s FULL header in ``data`` using the header
    bytes of the twin stream (same config, with vmdesc)."""
    found = [s for s in h.device_sections(twin_data) if s[1] == name]
    assert len(found) == 1, found
    toff, _, inst, _ver = found[0]
    hdr = twin_data[toff:toff + 1 + 4 + 1 + len(name) + 8]
    assert hdr[0] == 0x04
    assert data.count(hdr) == 1, "header not unique"
    dev = next(d for d in twin_desc["devices"] if d["name"] == name and d["instance_id"] == inst)
    return data.index(hdr), hdr, dev


# (device, field, bytes written over the start of the field -- {sid} is the
#  device's section id, {ram} the ram section's id)
FOOTER_TRICKS = {
    # timer's 8 unused bytes: its own footer, then an EOF byte
    "timer-footer-then-eof": ("timer", "unused", lambda sid, ram, hdr_of: b"\x7e" + struct.pack(">I", sid) + b"\x00\x00\x00"),
    # the RTC's 28 unused bytes: its footer, then a complete END of the
    # (opened) ram section with an EOS payload and its footer, then a
    # SWITCHOVER_START command -- three valid items in a row
    "rtc-footer-then-ram-end-and-command": (
        "mc146818rtc", "unused[0]",
        lambda sid, ram, hdr_of: b"\x7e" + struct.pack(">I", sid) + b"\x03" + struct.pack(">I", ram)
        + struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", ram) + b"\x08\x00\x0b\x00\x00",
    ),
    # the RTC's 28 unused bytes: its footer, then the exact FULL header of a
    # real device section that comes later in the stream (i2c_bus, with its
    # real section id, instance and version)
    "rtc-footer-then-real-i2c_bus-header": (
        "mc146818rtc", "unused[0]",
        lambda sid, ram, hdr_of: b"\x7e" + struct.pack(">I", sid) + hdr_of("i2c_bus"),
    ),
}


# Tricks that give the stream two complete readings.
AMBIGUOUS = {"rtc-footer-then-real-i2c_bus-header"}


@pytest.mark.parametrize("trick", list(FOOTER_TRICKS))
def test_no_vmdesc_footer_bytes_inside_device_state(tmp_path: Path, trick: str) -> None:
    """A real suppress-vmdesc stream whose device state holds its own
    section footer (and more valid-looking items) in a field QEMU ignores."""
    device, field_name, payload = FOOTER_TRICKS[trick]
    m = sk.make_no_vmdesc(tmp_path, "pc")
    twin: Path = m.extra["twin"]
    data = bytearray(m.path.read_bytes())
    twin_data = twin.read_bytes()
    at, hdr, dev = locate_full_section(bytes(data), twin_data, m.twin_vmdesc, device)
    sid = struct.unpack(">I", hdr[1:5])[0]
    ram_hdr = twin_data.index(b"\x03ram\x00\x00\x00\x00") - 5  # 01 be32(id) cstr8 "ram" be32(0)
    assert twin_data[ram_hdr] == 0x01
    ram_sid = struct.unpack(">I", twin_data[ram_hdr + 1:ram_hdr + 5])[0]
    fo = sk.field_offset(dev, field_name)
    assert fo is not None, dev
    foff, fsize = fo
    fake = payload(sid, ram_sid, lambda name: locate_full_section(bytes(data), twin_data, m.twin_vmdesc, name)[1])
    assert len(fake) <= fsize
    pos = at + len(hdr) + foff
    assert data[pos:pos + fsize] == bytes(fsize), "the unused field is not all zeros"
    data[pos:pos + len(fake)] = fake
    m.path.write_bytes(bytes(data))
    # QEMU ignores the field: the modified original still loads
    st = m.load()
    assert st["status"] in h.LOADED_STATES, st
    if trick in AMBIGUOUS:
        # Both readings parse to the end: without a vmdesc nothing tells
        # which is right, so savedir says so instead of guessing.
        before = bytes(data)
        with pytest.raises(savedir.UnsupportedStreamError) as info:
            savedir.index(m.path)
        msg = str(info.value)
        assert device in msg and "cannot tell which is right" in msg, msg
        assert m.path.read_bytes() == before
        return
    facts = check_stream(m, tmp_path)
    savedir.index(m.path)
    with savedir.open(m.path) as f:
        e = f.section(device).entries[0]
        assert e.offset == at
        assert e.size == len(hdr) + sk.vmsd_size(dev) + 5, (e.size, len(hdr) + sk.vmsd_size(dev) + 5)
        del e
    assert savedir.verify(m.path, deep=True).ok
    print(f"\n{trick}: wrote {fake.hex()} at file offset {pos} ({device}.{field_name}); {facts['summary']}")


# ---------------------------------------------------------------------------
# 4. no footers


def test_no_footers_with_vmdesc(tmp_path: Path) -> None:
    # the property exists in QEMU 10 (`-global migration.help` is refused:
    # "Invalid parameter 'migration.help'"; QMP lists it)
    with sk.Setup().vm() as vm:
        props = {p["name"]: p for p in vm.cmd("qom-list-properties", typename="migration")}
    assert props["send-section-footer"]["type"] == "bool", props.get("send-section-footer")
    m = sk.make_no_footers(tmp_path)
    facts = check_stream(m, tmp_path)
    assert facts["footers"] is False


def test_no_footers_no_vmdesc_is_indexed(tmp_path: Path) -> None:
    # Device sections end where the next well-formed header begins (see
    # test_nofooters.py for the comparison with the same state described).
    m = sk.make_no_footers(tmp_path, suppress_vmdesc=True)
    facts = check_stream(m, tmp_path)
    assert facts["footers"] is False
    with savedir.open(m.path) as f:
        assert f.vmdesc is None and not f.footers
        assert len([e for e in f.entries if e.kind == "full"]) > 20


def test_no_configuration(tmp_path: Path) -> None:
    m = sk.make_no_configuration(tmp_path)
    assert m.path.read_bytes()[8] != 0x07, "expected no configuration section"
    facts = check_stream(m, tmp_path)
    with savedir.open(m.path) as f:
        assert f.machine_type is None
        assert f.entries[0].kind == "start" and f.entries[0].name == "ram"
    assert facts["size"] > 0


# ---------------------------------------------------------------------------
# 5. live saves


@pytest.mark.parametrize("variant", ["plain", "xbzrle", "postcopy-ram"])
def test_live(tmp_path: Path, variant: str) -> None:
    m = sk.make_live(tmp_path, variant)
    facts = check_stream(m, tmp_path)
    ls = facts["ls_json"]
    parts = [e for e in ls["entries"] if e["kind"] == "part" and e.get("name") == "ram"]
    assert len(parts) > 5, facts["summary"]
    savedir.index(m.path)
    data = m.path.read_bytes()
    with savedir.open(m.path) as f:
        counts = ram_counts(m, data, f.entries)
    assert counts.get("page", 0) > 2000, counts
    if variant == "xbzrle":
        assert counts.get("xbzrle", 0) > 0, counts
        assert m.info.query_migrate["xbzrle-cache"]["pages"] > 0
    else:
        assert counts.get("xbzrle", 0) == 0, counts
    commands = [e.get("command_name") for e in ls["entries"] if e["kind"] == "command"]
    if variant == "postcopy-ram":
        assert m.extra["proxy_destination_status"]["status"] in h.LOADED_STATES
        for name in ("OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"):
            assert name in commands, commands
            assert name in facts["ls"]
        assert "command" in facts["ls"]
    else:
        assert "POSTCOPY_ADVISE" not in commands
        q = m.info.query_migrate
        assert q["ram"]["dirty-sync-count"] >= 3, q["ram"]
    print(f"\n{m.kind}: {m.setup.describe()}; {len(parts)} ram PARTs; records {counts}; commands {commands}")


# ---------------------------------------------------------------------------
# 6. background snapshot


def test_background_snapshot(tmp_path: Path) -> None:
    m = sk.make_background_snapshot(tmp_path)
    facts = check_stream(m, tmp_path)
    assert "start:ram" in facts["summary"]
    print(f"\n{m.kind}: {facts['summary']}; loaded as {facts['load_status']}")


# ---------------------------------------------------------------------------
# 7. block dirty bitmaps


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_dirty_bitmaps(tmp_path: Path, persistent: bool) -> None:
    m = sk.make_dirty_bitmaps(tmp_path, persistent)
    src = m.extra["source_bitmaps"]
    assert [b["name"] for b in src] == ["bm0"] and src[0]["count"] > 0, src
    loaded: dict[str, Any] = {}
    facts = check_stream(m, tmp_path, load_kw={"inspect": lambda vm: loaded.update(b=sk.dirty_bitmaps(vm))})
    summary = facts["summary"]
    assert summary.get("start:dirty-bitmap") == 1 and summary.get("end:dirty-bitmap") == 1, summary
    assert summary.get("command:POSTCOPY_ADVISE") == 1, summary
    got = loaded["b"]
    assert [(b["name"], b["count"], b["persistent"], b["granularity"]) for b in got] == [
        ("bm0", src[0]["count"], persistent, 4096)
    ], got
    print(f"\n{m.kind}: {m.setup.describe()}; {sum(summary.values())} entries; bitmap {src}")


# ---------------------------------------------------------------------------
# 8. streams at an offset


@pytest.mark.parametrize("n", [4096, 65536])
def test_offset_arbitrary_header(tmp_path: Path, n: int) -> None:
    header = sk.arbitrary_header(n, seed=n)
    m = sk.make_at_offset(tmp_path, header, f"offset-{n}")
    assert m.path.read_bytes()[:n] == header, "QEMU did not keep the bytes before the offset"
    with savedir.open(m.path) as f:
        assert f.stream_start == n and f.container is None and f.stream_found_by_scan
    facts = check_stream(m, tmp_path)
    assert f"stream found at offset {n}" in facts["ls"], facts["ls"]


@pytest.mark.parametrize("fmt", [0, 6], ids=["raw", "sparse-mapped-ram"])
def test_libvirt_save_image(tmp_path: Path, fmt: int) -> None:
    m = sk.make_libvirt(tmp_path, fmt)
    n = m.offset
    assert n == 92 + sk.libvirt_data_len()
    assert m.path.read_bytes()[:n] == m.extra["header"], "QEMU did not keep the libvirt header"
    with savedir.open(m.path) as f:
        assert f.stream_start == n
        c = f.container
    assert c is not None and c["kind"] == "libvirt", c
    assert (c["domain_name"], c["domain_uuid"], c["format"], c["version"]) == (sk.LIBVIRT_NAME, sk.LIBVIRT_UUID, fmt, 2), c
    facts = check_stream(m, tmp_path)
    assert facts["container"] == c
    assert sk.LIBVIRT_NAME in facts["ls"] and sk.LIBVIRT_UUID in facts["ls"], facts["ls"]
    if fmt == 6:  # mapped-ram offsets are absolute file offsets, header included
        savedir.index(m.path)
        data = m.path.read_bytes()
        with savedir.open(m.path) as f:
            start = f.section("ram").entries[0]
            blocks: list[sk.RamBlock] = []
            sk.read_ram_item(data, start.payload_offset, start.end, mapped_ram=True, blocks=blocks)
            s_off, s_end = start.offset, start.end
            del start
        for b in blocks:
            assert s_off < b.bitmap_offset < b.pages_offset and b.pages_offset + b.used_length <= s_end, b


@pytest.fixture(scope="module")
def libvirt_raw(tmp_path_factory: pytest.TempPathFactory) -> sk.Made:
    return sk.make_libvirt(tmp_path_factory.mktemp("libvirt-raw"), 0)


@pytest.mark.parametrize("variant", ["part-magic"] + [f"format-{i}" for i in range(1, 6)])
def test_libvirt_refused(tmp_path: Path, libvirt_raw: sk.Made, variant: str) -> None:
    m = sk.clone(libvirt_raw, tmp_path)
    data = bytearray(m.path.read_bytes())
    if variant == "part-magic":
        data[:16] = sk.LIBVIRT_MAGIC_PARTIAL
        word = "LibvirtQemudPart"
    else:
        fmt = int(variant.split("-")[1])
        data[28:32] = struct.pack("<I", fmt)
        word = sk.LIBVIRT_FORMATS[fmt]
    m.path.write_bytes(bytes(data))
    before = sha256_file(m.path)
    errors = []
    for call in (lambda: savedir.index(m.path), lambda: savedir.open(m.path), lambda: savedir.open(m.path, scan=True)):
        with pytest.raises(savedir.FormatError) as ei:
            call()
        errors.append(ei.value)
    for e in errors:
        assert type(e) is savedir.UnsupportedStreamError, type(e)
        assert word in str(e), str(e)
    rc, _out, err = cli("index", str(m.path))
    assert rc == 1 and word in err, (rc, err)
    assert not savedir.verify(m.path).ok  # no directory was written
    assert sha256_file(m.path) == before
    print(f"\n{variant}: {type(errors[0]).__name__}: {errors[0]}")


@pytest.fixture(scope="module")
def unknown_header(tmp_path_factory: pytest.TempPathFactory) -> sk.Made:
    n = 8192 + 108  # an 8 KiB header, not at a page boundary
    return sk.make_at_offset(tmp_path_factory.mktemp("unknown"), sk.arbitrary_header(n, seed=7), "unknown-8300",
                             savedir_offset=True)


def test_unknown_header_needs_offset(tmp_path: Path, unknown_header: sk.Made) -> None:
    m = sk.clone(unknown_header, tmp_path)
    with pytest.raises(savedir.NotAStreamError):
        savedir.open(m.path)
    with pytest.raises(savedir.NotAStreamError):
        savedir.index(m.path)
    check_stream(m, tmp_path)  # every call with offset=N


def test_unknown_header_indexed_file_is_not_reported_damaged(tmp_path: Path, unknown_header: sk.Made) -> None:
    """After ``index(p, offset=N)`` the file is valid; ``verify(p)`` without
    the offset may say it cannot find the stream, but must not report the
    valid file as failing a check."""
    m = sk.clone(unknown_header, tmp_path)
    savedir.index(m.path, offset=m.savedir_offset)
    assert savedir.verify(m.path, offset=m.savedir_offset, deep=True).ok
    try:
        r = savedir.verify(m.path)
    except savedir.NotAStreamError:
        return
    assert r.ok, f"verify without offset on a valid indexed file: {r}"


# ---------------------------------------------------------------------------
# 9. machine types


@pytest.mark.parametrize("machine", ["isapc", "microvm"])
def test_machine_types(tmp_path: Path, machine: str) -> None:
    m = sk.make_machine(tmp_path, machine)
    facts = check_stream(m, tmp_path)
    assert facts["machine_type"].startswith(machine), facts["machine_type"]


# ---------------------------------------------------------------------------
# 10. sidecar directories


def test_sidecar(tmp_path: Path) -> None:
    setup = sk.booted_setup(tmp_path)
    p = tmp_path / "vm.sav"
    info = sk.save(setup, sk.file_uri(p), run_seconds=0.5)
    m = sk.Made(kind="sidecar", path=p, setup=setup, info=info)
    check_stream(m, tmp_path, sidecar=True)  # strips at the end: index again
    size0, sha0 = p.stat().st_size, sha256_file(p)
    r = savedir.index(p, sidecar=True)
    side = Path(r.sidecar)
    assert side == Path(str(p) + ".savedir")
    assert sha256_file(p) == sha0
    sc = side.read_bytes()
    # the RAM page map, then the directory, as if appended at offset size0
    n = r.ram_map_size
    assert (sc[:8] == b"SAVEDIRM") == (n > 0) and sc[n] == 0x7D and sc[-9] == 0x7D
    assert struct.unpack(">Q", sc[-8:])[0] == size0 + n
    # CLI through the sidecar
    rc, out, err = cli("ls", str(p))
    assert rc == 0 and "sidecar" in out.decode().splitlines()[0], out
    rc, out, err = cli("verify", "--deep", str(p))
    assert rc == 0, (out, err)
    rc, out, err = cli("cat", str(p), "timer")
    assert rc == 0 and out[:1] == b"\x04"
    rc, out, err = cli("desc", str(p))
    assert rc == 0 and json.loads(out)["devices"]
    # QEMU loads the data file (unchanged)
    assert m.load()["status"] in h.LOADED_STATES
    # the data file changes: the sidecar no longer matches
    original = p.read_bytes()
    problems = []
    changes = {
        "append a 0x00 byte": original + b"\x00",
        "append a 0x7d byte": original + b"\x7d",
        "truncate by 1 byte": original[:-1],
    }
    for change, data in changes.items():
        p.write_bytes(data)
        v = savedir.verify(p)
        assert not v.ok and v.check == "trailer", (change, v)
        if "no longer matches" not in v.message:
            problems.append(f"{change}: verify says {v.message!r}")
        with pytest.raises(savedir.DirectoryError) as ei:
            savedir.open(p)
        if "no longer matches" not in str(ei.value):
            problems.append(f"{change}: open raises {ei.value}")
        rc, out, err = cli("verify", str(p))
        assert rc == 1, (change, out, err)
        # put it back: the sidecar is valid again
        p.write_bytes(original)
        assert savedir.verify(p, deep=True).ok
    assert not problems, "the sidecar no longer matches its file, but savedir does not say so:\n" + "\n".join(problems)
    with savedir.open(p) as f:
        assert f.sidecar == str(side) and f.indexed


def test_record_sidecar_from_qemu_equals_index_sidecar(tmp_path: Path) -> None:
    setup = sk.booted_setup(tmp_path)
    plain, rec, done = tmp_path / "plain.sav", tmp_path / "rec.sav", tmp_path / "done"
    cmd = f"tee {shlex.quote(str(plain))} | {shlex.join(SAVEDIR)} record --sidecar -q {shlex.quote(str(rec))}"
    sk.save_exec(setup, cmd, done, run_seconds=0.5)
    rec_side, plain_side = Path(str(rec) + ".savedir"), Path(str(plain) + ".savedir")
    assert rec_side.exists(), "savedir record --sidecar wrote no sidecar"
    assert rec.read_bytes() == plain.read_bytes(), "record changed the stream"
    r = savedir.index(plain, sidecar=True)
    assert r.written and Path(r.sidecar) == plain_side
    assert rec_side.read_bytes() == plain_side.read_bytes()
    assert savedir.verify(rec, deep=True).ok
    m = sk.Made(kind="record-sidecar", path=rec, setup=setup)
    assert m.load()["status"] in h.LOADED_STATES
