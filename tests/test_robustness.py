"""Hostile input, torn writes, concurrent writers, read-only files.

Nothing may crash the interpreter, hang, raise anything but a SavedirError
or an OSError, or change bytes it must not change.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qemu_harness as h
import savedir
import synthetic
from pausehook import HANG, Pause

SAVEDIR = [sys.executable, "-m", "savedir"]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"


def _make_indexed() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "vm.sav"
        p.write_bytes(EXAMPLE.read_bytes())
        savedir.index(p)
        return p.read_bytes()


_INDEXED = _make_indexed()
_STREAM_LEN = EXAMPLE.stat().st_size


def exercise(path: Path) -> None:
    """Every reading operation, plus index on the file: savedir's own errors
    allowed; anything else (a panic, another exception) fails the test."""
    for fn in (
        lambda: savedir.verify(path),
        lambda: savedir.verify(path, deep=True),
        lambda: [e.data for e in savedir.open(path).entries],
        lambda: savedir.open(path, scan=True).vmdesc,
        lambda: savedir.index(path),
    ):
        try:
            fn()
        except savedir.SavedirError:
            pass


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(_INDEXED) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(_INDEXED) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(_INDEXED)), st.integers(0, 255)),
    st.tuples(st.just("pointer"), st.integers(0, 10_000), st.sampled_from([0, 1, 2**63, 2**64 - 1, _STREAM_LEN, 7])),
    st.tuples(st.just("length"), st.integers(0, 10_000), st.sampled_from([0xFF, 0xFFFF, 0xFFFFFFFF])),
)


def mutate(data: bytes, m: tuple) -> bytes:
    kind, at, val = m
    b = bytearray(data)
    if not b:
        return bytes([val & 0xFF]) if kind == "insert" else data
    if kind in ("flip", "cut"):
        at %= len(b)
    elif kind == "insert":
        at %= len(b) + 1
    if kind == "flip":
        b[at] ^= val
    elif kind == "cut":
        del b[at:]
    elif kind == "insert":
        b[at:at] = bytes([val])
    elif kind == "pointer":
        # Rewrite the 8 bytes that follow an entry header in the directory:
        # a pointer of the directory, chosen among the directory's bytes.
        if len(b) < 40:
            return bytes(b)
        d = len(b) - 18
        start = min(struct.unpack(">Q", bytes(b[-8:]))[0], d - 9)
        pos = start + 1 + (at % max(1, d - start - 9))
        b[pos : pos + 8] = struct.pack(">Q", val)
    elif kind == "length":
        # A length field anywhere in the stream claims a huge size.
        if len(b) < 8:
            return bytes(b)
        pos = at % (len(b) - 4)
        b[pos : pos + 4] = struct.pack(">I", val)
    return bytes(b)


# No per-example deadline: how long an example takes depends on the machine.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_indexed_streams(tmp_path: Path, ms: list) -> None:
    data = _INDEXED
    for m in ms:
        data = mutate(data, m)
    p = tmp_path / "m.sav"
    p.write_bytes(data)
    exercise(p)


_EXERCISE = """
import sys
import savedir
for p in sys.argv[1:]:
    for fn in (
        lambda: savedir.verify(p),
        lambda: savedir.verify(p, deep=True),
        lambda: [e.data for e in savedir.open(p).entries],
        lambda: savedir.open(p, scan=True).vmdesc,
        lambda: savedir.index(p),
    ):
        try:
            fn()
        except savedir.SavedirError:
            pass
# The peak of this process since its exec (VmHWM), not ru_maxrss, which a
# child may inherit from the parent it was forked from.
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def exercise_in_child(paths: list[Path]) -> int:
    """:func:`exercise` in a child process, which must end (a generous
    timeout catches a hang, whatever the machine's speed); its peak RSS in KiB."""
    p = subprocess.run([sys.executable, "-c", _EXERCISE, *map(str, paths)], capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.split()[-1])


def test_billions_of_claimed_entries_and_huge_names(tmp_path: Path) -> None:
    stream = EXAMPLE.read_bytes()
    d = len(stream)
    cases = {
        # A trailer pointing at a directory that claims 2^32 - 1 byte names.
        "name255": stream + b"\x7d" + b"\x04\x00\x00\x00\x01\xff" + b"A" * 255 + bytes(8) + b"\x00" + struct.pack(">Q", d - 1) + b"\x7d" + struct.pack(">Q", d),
        # A directory pointer of 2^64 - 1.
        "ptrmax": stream + b"\x7d\x00" + struct.pack(">Q", 2**64 - 1) + b"\x7d" + struct.pack(">Q", 2**64 - 1),
        # A vmdesc claiming 4 GiB of JSON.
        "vmdesc4g": stream[: stream.rfind(b"\x00\x06")] + b"\x00\x06\xff\xff\xff\xff{",
        # A RAM block list claiming 2^64 bytes of RAM in 4 billion blocks.
        "ramtotal": stream[:35] + b"\xff" * 8 + stream[43:],
        # A PACKAGED command claiming 4 GiB of nested stream.
        "packaged": stream[:27] + b"\x08\x00\x07\x00\x04\xff\xff\xff\xff" + stream[27:],
    }
    paths = []
    for name, data in cases.items():
        p = tmp_path / f"{name}.sav"
        p.write_bytes(data)
        paths.append(p)
    # No claimed length made savedir loop over it or allocate it.
    peak_kib = exercise_in_child(paths)
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib} KiB"


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


_RSS_AT_START: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def _peak_of_this_module() -> None:
    """Earlier test files (guest memory) legitimately grow this process: the
    peak is reset when this module's first test starts (Linux: 5 >
    /proc/self/clear_refs sets VmHWM to the current RSS), so that
    test_memory_stayed_bounded is about this module alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _RSS_AT_START.append(_status_kib("VmRSS"))


def test_memory_stayed_bounded() -> None:
    # Runs after the mutated inputs above (pytest keeps file order): no
    # claimed length made savedir allocate what the file does not hold.
    grew = _status_kib("VmHWM") - _RSS_AT_START[0]
    assert grew < 1 << 20, f"peak RSS grew by {grew} KiB while this module ran"


def test_not_a_stream_fast(tmp_path: Path) -> None:
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(random.Random(1).randbytes(8 << 20))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # In a child that must end: /dev/zero or a folder must not be read
    # forever (a generous timeout catches a hang, whatever the machine's speed).
    code = (
        "import sys, savedir\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        savedir.open(p)\n"
        "    except savedir.NotAStreamError as e:\n"
        "        print(repr(str(e)))\n"
    )
    paths = (rnd, empty, Path("/dev/zero"), tmp_path)
    r = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stderr
    msgs = [ast.literal_eval(line) for line in r.stdout.splitlines()]
    assert len(msgs) == len(paths), r.stdout
    for p, msg in zip(paths, msgs):
        assert "not a QEMU migration stream" in msg or "regular files" in msg
        assert str(p) in msg


# ---------------------------------------------------------------------------
# torn writes and concurrent writers


def sha(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def kill_at(point: str, p: Path, tmp_path: Path) -> None:
    """Runs `savedir index P` and SIGKILLs it at `point` (rust/ops/testhook.rs)."""
    pause = Pause(tmp_path, point)
    proc = subprocess.Popen(SAVEDIR + ["index", "-q", str(p)], env=pause.env)
    try:
        pause.wait(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG)
    finally:
        pause.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_while_indexing_synthetic(tmp_path: Path) -> None:
    src = tmp_path / "big.sav"
    info = synthetic.write_stream(str(src), 64 << 20, pages_per_part=64)  # ~250 parts
    n = info["file_size"]
    want = sha(src, n)
    full = tmp_path / "full.sav"
    full.write_bytes(src.read_bytes())
    savedir.index(full)
    full_bytes = full.read_bytes()
    p = tmp_path / "k.sav"
    for point in ("index:before-write", "index:mid-write"):
        p.write_bytes(src.read_bytes())
        kill_at(point, p, tmp_path)
        size = p.stat().st_size
        if point == "index:before-write":
            assert size == n, (point, size)
        else:
            # Half a directory: not valid, but the start of the right one.
            assert n < size < len(full_bytes), (point, size)
            assert not savedir.verify(p).ok
        assert sha(p, n) == want, "stream bytes changed"
        r = savedir.index(p)  # completes what the kill left, without force
        assert r.written and r.replaced == size - n, (point, r)
        assert p.read_bytes() == full_bytes, point


def test_kill_9_real_stream_still_loads(qemu_stream_by_name, tmp_path: Path) -> None:
    s = qemu_stream_by_name["q35-full-file-paused"]
    pristine = s.read_bytes()
    want = s.copy_to(tmp_path / "want")
    savedir.index(want)
    full_bytes = want.read_bytes()
    p = s.copy_to(tmp_path)
    for point in ("index:before-write", "index:mid-write"):
        p.write_bytes(pristine)
        kill_at(point, p, tmp_path)
        size = p.stat().st_size
        if point == "index:before-write":
            assert size == len(pristine), (point, size)
        else:
            assert len(pristine) < size < len(full_bytes), (point, size)
        assert p.read_bytes()[: len(pristine)] == pristine
        # QEMU loads the file whatever the kill left after the stream.
        st_ = h.load_stream(p, s.machine, list(s.devices), uri_kind="file")
        assert st_["status"] in h.LOADED_STATES, (point, st_)
        r = savedir.index(p)
        assert r.written, (point, r)
        assert p.read_bytes() == full_bytes, point
        assert savedir.verify(p, deep=True).ok
    st_ = h.load_stream(p, s.machine, list(s.devices), uri_kind="file")
    assert st_["status"] in h.LOADED_STATES, st_


def test_concurrent_indexers_leave_one_directory(qemu_stream_by_name, tmp_path: Path) -> None:
    s = qemu_stream_by_name["pc-full-exec-paused"]
    want = s.copy_to(tmp_path / "want")
    savedir.index(want)
    for i in range(5):
        p = s.copy_to(tmp_path / f"c{i}")
        procs = [subprocess.Popen(SAVEDIR + ["index", "--json", str(p)], stdout=subprocess.PIPE) for _ in range(3)]
        outs = [pr.communicate(timeout=60)[0] for pr in procs]
        assert all(pr.returncode == 0 for pr in procs), outs
        assert sum(b'"written": true' in o for o in outs) == 1, outs
        assert p.read_bytes() == want.read_bytes()


# ---------------------------------------------------------------------------
# read-only files and folders


def test_read_only_file_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import savedir.cli

    folder = tmp_path / "ro"
    folder.mkdir()
    p = folder / "vm.sav"
    p.write_bytes(EXAMPLE.read_bytes())
    savedir.index(p)
    before = p.read_bytes()
    p.chmod(0o444)
    for fn in (lambda: savedir.index(p, force=True), lambda: savedir.strip(p), lambda: savedir.index(p, sidecar=True)):
        with pytest.raises(PermissionError) as info:
            fn()
        assert str(p) in str(info.value) or str(folder) in str(info.value)
    assert p.read_bytes() == before
    # Reading works.
    assert savedir.verify(p, deep=True).ok
    assert savedir.cli.main(["ls", str(p)]) == 0
    assert savedir.cli.main(["desc", str(p)]) == 0
    capsys.readouterr()
    assert subprocess.run(SAVEDIR + ["cat", str(p), "cpu"], capture_output=True).returncode == 0
    assert savedir.cli.main(["strip", str(p)]) == 2
    assert "read-only" in capsys.readouterr().err
    # A writable file in a read-only folder: nothing is changed or created.
    p.chmod(0o644)
    savedir.strip(p)
    stripped = p.read_bytes()
    folder.chmod(0o555)
    try:
        for fn in (lambda: savedir.index(p), lambda: savedir.index(p, sidecar=True)):
            with pytest.raises(PermissionError):
                fn()
        assert p.read_bytes() == stripped
        assert sorted(os.listdir(folder)) == ["vm.sav"]
        with pytest.raises(PermissionError):
            savedir.record(folder / "new.sav", open(p, "rb"))
        assert sorted(os.listdir(folder)) == ["vm.sav"]
    finally:
        folder.chmod(stat.S_IRWXU)


# ---------------------------------------------------------------------------
# a file changed under a reader


def test_file_truncated_under_open_views(tmp_path: Path) -> None:
    p = tmp_path / "vm.sav"
    synthetic.write_stream(str(p), 64 << 20, pages_per_part=2048)
    savedir.index(p)
    with savedir.open(p) as f:
        part = [e for e in f.entries if e.kind == "part"][-1]
        view = part.data
        assert bytes(view[-4096:]) != bytes(4096)
        os.truncate(p, 1 << 20)
        # Reading past the new end would be a SIGBUS: it reads zeros instead.
        assert bytes(view[-4096:]) == bytes(4096)
        with pytest.raises(savedir.FileChangedError) as info:
            f.verify(deep=True)
        assert str(p) in str(info.value)


@pytest.mark.parametrize("command", [["verify", "--deep"], ["index"], ["ls", "--scan"]])
def test_file_truncated_while_a_command_reads_it(tmp_path: Path, command: list[str]) -> None:
    p = tmp_path / "t.sav"
    synthetic.write_stream(str(p), 64 << 20, pages_per_part=4096)
    if command[0] == "verify":
        savedir.index(p)
    # Stopped with the file mapped, just before the stream is parsed: the
    # truncation lands under the mapping, always.
    pause = Pause(tmp_path, "scan:start")
    proc = subprocess.Popen(SAVEDIR + command + [str(p)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=pause.env)
    try:
        pause.wait(proc)
        os.truncate(p, 8 << 20)
    finally:
        pause.release()
    try:
        err = proc.communicate(timeout=HANG)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Never killed by a signal, never a traceback: a clean report.
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert f"{p}: the file changed while it was read" in err, err
    assert p.stat().st_size == 8 << 20


def test_many_false_footers_end_in_bounded_time(tmp_path: Path) -> None:
    # A device section without vmdesc whose data holds thousands of copies
    # of its own footer, each followed by a plausible section header whose
    # own footer never comes: every choice fails, going back is capped.
    fake = b"\x7e" + struct.pack(">I", 6) + b"\x04" + struct.pack(">I", 9) + b"\x01x" + struct.pack(">II", 0, 1)
    payload = fake * 20000 + b"\x00" * 100
    data = (
        b"QEVM\x00\x00\x00\x03"
        + b"\x04" + struct.pack(">I", 6) + b"\x03cpu" + struct.pack(">II", 0, 1)
        + payload + b"\x7e" + struct.pack(">I", 6)
        + b"\x00"
    )
    p = tmp_path / "hostile.sav"
    p.write_bytes(data)
    # Ends at all: a generous timeout catches going back without a cap,
    # whatever the machine's speed. Exit 0 or 1 (a SavedirError), never 2.
    r = subprocess.run(SAVEDIR + ["index", "-q", str(p)], capture_output=True, text=True, timeout=HANG)
    assert r.returncode in (0, 1), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert p.read_bytes()[: len(data)] == data
