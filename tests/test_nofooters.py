"""Streams with neither section footers nor a vmdesc, written by real QEMU.

QEMU 7.2 (Debian bookworm's, unpacked by .ci/install-qemu.sh) writes them for
the machine types pc-i440fx-2.0 to 2.2 by default, and for 1.4 to 1.7 and
2.3 with ``suppress-vmdesc=on``; QEMU 10 writes them with
``-global migration.send-section-footer=off`` and ``suppress-vmdesc=on``.
savedir ends each device section where the next well-formed section header
begins. The truth to compare with: the same VM state loaded into a second
QEMU that writes a vmdesc (``suppress-vmdesc=off``) and saved again.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

import qemu_harness as h
import savedir
import state_check
import stream_kinds as sk

ROOT = Path("/opt/savedir-test/qemu-7.2")
BINARY = ROOT / "usr/bin/qemu-system-x86_64"
FIRMWARE = ("-L", str(ROOT / "usr/share/qemu"), "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu")


@pytest.fixture
def qemu72(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: run .ci/install-qemu.sh", pytrace=False)
    monkeypatch.setattr(h, "QEMU_BINARY", str(BINARY))
    monkeypatch.setenv("QEMU_MODULE_DIR", str(ROOT / "usr/lib/x86_64-linux-gnu/qemu"))
    yield


def facts(p: Path, **kw: Any) -> list[tuple[Any, ...]]:
    """Every item's header and payload size (offsets differ between saves)."""
    with savedir.open(p, **kw) as f:
        return [(e.kind, e.section_id, e.name, e.instance_id, e.version_id, e.payload_size) for e in f.entries
                if e.kind != "vmdesc"]


def _exec_out(path: Path) -> tuple[str, Path]:
    """An ``exec:`` URI that writes ``path`` (QEMU 7.2 has no ``file:``),
    and the file that says every byte is written."""
    done = path.with_suffix(".done")
    if done.exists():
        done.unlink()
    return f"exec:cat > {path}; touch {done}", done


def _wait(done: Path) -> None:
    import time

    deadline = time.monotonic() + 60  # only a hang reaches it
    while not done.exists():
        assert time.monotonic() < deadline, f"{done} never appeared"
        time.sleep(0.02)


def make_pair(tmp: Path, machine: str, options: str, args: tuple[str, ...], run_seconds: float) -> tuple[Path, Path]:
    """A stream without footers and vmdesc, and its twin: the same state
    loaded into a QEMU that writes a vmdesc, saved again."""
    bare = sk.Setup(machine=machine + options, args=args)
    described = sk.Setup(machine=machine + ",suppress-vmdesc=off", args=args)
    p, twin = tmp / "bare.sav", tmp / "twin.sav"
    uri, done = _exec_out(p)
    sk.save(bare, uri, run_seconds=run_seconds)
    _wait(done)
    uri, done = _exec_out(twin)
    sk.load(described, f"exec:cat {p}", inspect=lambda vm: vm.migrate(uri))
    _wait(done)
    data = p.read_bytes()
    assert data[8] != 0x07 or machine in ("pc", "q35"), "old machine types send no configuration"
    assert not data.endswith(b"}"), "expected no vmdesc"
    assert twin.read_bytes().endswith(b"}"), "the twin has a vmdesc"
    return p, twin


def check(tmp: Path, p: Path, twin: Path, setup: sk.Setup) -> None:
    pristine = p.read_bytes()
    want = facts(twin)
    with savedir.open(twin) as f:
        assert state_check.check_decodes(f) > 20
    try:
        with savedir.open(p) as f:
            assert not f.indexed and not f.footers and f.vmdesc is None
    except savedir.UnsupportedStreamError as e:
        # A running guest's device data may hold bytes that read as a
        # section header where a second reading parses to the end: savedir
        # refuses such a stream rather than guess, and the twin's vmdesc
        # settles it (checked below).
        assert "cannot tell which is right" in str(e) and "--vmdesc" in str(e), e
        ambiguous = True
    else:
        ambiguous = False
        assert facts(p) == want
        r = savedir.index(p)
        assert r.written and r.entries == len(want)
        assert p.read_bytes()[: len(pristine)] == pristine
        assert savedir.verify(p, deep=True).ok
        assert facts(p) == want
    # The twin's vmdesc delimits the sections the same way.
    q = tmp / "with-vmdesc.sav"
    q.write_bytes(pristine)
    assert savedir.index(q, vmdesc=twin).entries == len(want)
    assert facts(q) == want
    desc = tmp / "vmdesc.json"
    with savedir.open(twin) as f:
        assert f.vmdesc_json is not None
        desc.write_bytes(bytes(f.vmdesc_json))
    assert facts(q, scan=True, vmdesc=desc) == want
    # QEMU loads the indexed file; strip gives back its bytes.
    indexed = q if ambiguous else p
    st = sk.load(setup, f"exec:cat {indexed}")
    assert st["status"] in h.LOADED_STATES, st
    savedir.strip(indexed, vmdesc=twin)
    assert indexed.read_bytes() == pristine


CASES_72 = [
    # machine, machine options for "no vmdesc", full devices?, seconds run
    ("pc-i440fx-1.4", ",suppress-vmdesc=on", True, 0.0),
    ("pc-i440fx-1.4", ",suppress-vmdesc=on", False, 3.0),
    ("pc-i440fx-2.0", "", True, 3.0),
    ("pc-i440fx-2.0", "", False, 0.0),
    ("pc-i440fx-2.2", "", False, 0.0),
    ("pc-i440fx-2.2", "", True, 3.0),
    ("pc-i440fx-2.3", ",suppress-vmdesc=on", True, 3.0),
    ("pc-i440fx-2.3", ",suppress-vmdesc=on", True, 0.0),
]


@pytest.mark.parametrize("machine,options,full,run_seconds", CASES_72, ids=[f"{c[0]}-{'full' if c[2] else 'min'}-{'ran' if c[3] else 'paused'}" for c in CASES_72])
def test_qemu_7_2_old_machine_types(qemu72: None, tmp_path: Path, machine: str, options: str, full: bool,
                                    run_seconds: float) -> None:
    args = FIRMWARE + (tuple(h.full_devices(tmp_path)) if full else ())
    p, twin = make_pair(tmp_path, machine, options, args, run_seconds)
    check(tmp_path, p, twin, sk.Setup(machine=machine + options, args=args))


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_qemu_10_without_footers_and_vmdesc(tmp_path: Path, machine: str) -> None:
    args = tuple(h.full_devices(tmp_path)) + sk.NO_FOOTERS
    p, twin = make_pair(tmp_path, machine, ",suppress-vmdesc=on", args, 0.0)
    with savedir.open(p) as f:
        assert f.machine_type is not None
    check(tmp_path, p, twin, sk.Setup(machine=machine + ",suppress-vmdesc=on", args=args))


def test_a_planted_header_in_real_device_data_is_refused(qemu72: None, tmp_path: Path) -> None:
    args = FIRMWARE + tuple(h.full_devices(tmp_path))
    p, _twin = make_pair(tmp_path, "pc-i440fx-2.2", "", args, 0.0)
    with savedir.open(p) as f:
        sections = [s for s in f.sections() if not s.live]
        names = [s.name for s in sections]
        # A large device section, and the one after it.
        i = max(range(len(sections) - 1), key=lambda k: sections[k].size)
        big, after = sections[i], sections[i + 1]
        at = big.entries[0].payload_offset + big.entries[0].payload_size // 2
        header = bytes(f.view(after.offset, after.entries[0].payload_offset))
        real = after.offset
    data = bytearray(p.read_bytes())
    data[at : at + len(header)] = header
    bad = tmp_path / "planted.sav"
    bad.write_bytes(bytes(data))
    before = bad.read_bytes()
    with pytest.raises(savedir.UnsupportedStreamError) as info:
        savedir.index(bad)
    msg = str(info.value)
    assert f'"{big.name}"' in msg and f"offset {at}" in msg and f"offset {real}" in msg, msg
    assert bad.read_bytes() == before
    print(f"\n{names[i]} at {big.offset}: planted {after.name}'s header at {at}: {msg}")


def test_many_false_headers_in_real_device_data_end_in_bounded_work(qemu72: None, tmp_path: Path) -> None:
    # Thousands of header-like bytes in a real device section: headers of a
    # section whose id is used again right after (so none parses on).
    args = FIRMWARE + tuple(h.full_devices(tmp_path))
    p, _twin = make_pair(tmp_path, "pc-i440fx-2.2", "", args, 0.0)
    with savedir.open(p) as f:
        sections = [s for s in f.sections() if not s.live]
        i = max(range(len(sections) - 1), key=lambda k: sections[k].size)
        big = sections[i]
        start = big.entries[0].payload_offset
        room = big.entries[0].payload_size
    fake = b"\x04" + struct.pack(">I", 0x7fff0000) + b"\x01x" + struct.pack(">II", 0, 1)
    data = bytearray(p.read_bytes())
    n = min(3000, room // len(fake) - 1)
    data[start : start + n * len(fake)] = fake * n
    bad = tmp_path / "false-headers.sav"
    bad.write_bytes(bytes(data))
    # The first false header would end the section and swallow the rest of
    # the stream; so would the second: two readings, refused. (Going back
    # is capped at MAX_BACKTRACKS choices, and at most 64 device sections
    # are checked for a second reading, each by one parse of the rest.)
    before = bad.read_bytes()
    with pytest.raises(savedir.UnsupportedStreamError) as info:
        savedir.index(bad)
    assert f'"{big.name}"' in str(info.value)
    assert bad.read_bytes() == before
    print(f"\n{n} false headers: {str(info.value)[:300]}")


def test_record_a_stream_without_footers_and_vmdesc(qemu72: None, tmp_path: Path) -> None:
    import sys

    args = FIRMWARE + tuple(h.full_devices(tmp_path))
    setup = sk.Setup(machine="pc-i440fx-2.2", args=args)
    plain, rec = tmp_path / "plain.sav", tmp_path / "rec.sav"
    done = tmp_path / "rec.done"
    cmd = f"tee {plain} | {sys.executable} -m savedir record -q {rec}; touch {done}"
    sk.save(setup, "exec:" + cmd)
    _wait(done)
    assert not plain.read_bytes().endswith(b"}")
    savedir.index(plain)
    assert rec.read_bytes() == plain.read_bytes()
    assert savedir.verify(rec, deep=True).ok
    st = sk.load(setup, f"exec:cat {rec}")
    assert st["status"] in h.LOADED_STATES, st
