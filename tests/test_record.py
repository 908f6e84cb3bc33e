"""`savedir record`: the directory built while QEMU writes the stream.

QEMU migrates to ``exec:tee PLAIN | savedir record REC``: both files get the
very same stream, so ``index(PLAIN)`` must give REC byte for byte.
"""

from __future__ import annotations

import io
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qemu_harness as h
import savedir
import synthetic
from pausehook import Pause

SAVEDIR = [sys.executable, "-m", "savedir"]


def record_with_qemu(tmp: Path, machine: str, devices: list[str], run_seconds: float) -> tuple[Path, Path]:
    plain, rec = tmp / "plain.sav", tmp / "rec.sav"
    cmd = f"tee {shlex.quote(str(plain))} | {shlex.join(SAVEDIR)} record -q {shlex.quote(str(rec))}"
    with h.VM(machine, devices, log_path=tmp / "qemu.log") as vm:
        if run_seconds:
            vm.cont()
            time.sleep(run_seconds)
            if run_seconds > 1:
                vm.stop()
        vm.migrate(f"exec:{cmd}")
    # QEMU reports completion when it has written the stream; the recorder
    # appends the directory after its input ends.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if rec.exists() and savedir.verify(rec).ok:
            break
        time.sleep(0.05)
    return plain, rec


CASES = [
    ("pc", False, 0),
    ("q35", False, 0),
    ("pc", True, 2.5),  # firmware ran, then paused
    ("q35", True, 1.0),  # migrated while the guest runs
]


@pytest.mark.parametrize("machine,full,run_seconds", CASES, ids=[f"{m}-{'full' if f else 'min'}-{r}" for m, f, r in CASES])
def test_record_from_qemu_equals_index(tmp_path: Path, machine: str, full: bool, run_seconds: float) -> None:
    devices = h.full_devices(tmp_path) if full else []
    plain, rec = record_with_qemu(tmp_path, machine, devices, run_seconds)
    r = savedir.verify(rec, deep=True)
    assert r.ok, r
    stream = plain.read_bytes()
    assert rec.read_bytes()[: len(stream)] == stream
    savedir.index(plain)
    assert plain.read_bytes() == rec.read_bytes()
    for kind in ("exec", "file"):
        st = h.load_stream(rec, machine, devices, uri_kind=kind)
        assert st["status"] in h.LOADED_STATES, st


def test_recorder_object_equals_index(qemu_streams, tmp_path: Path) -> None:
    for s in qemu_streams[:3]:
        data = s.read_bytes()
        want = s.copy_to(tmp_path / "want")
        savedir.index(want)
        out = tmp_path / f"{s.name}.rec"
        with savedir.Recorder(out) as rec:
            i, n = 0, 1
            while i < len(data):  # chunks of growing, odd sizes
                rec.write(memoryview(data)[i : i + n])
                i += n
                n = n * 3 + 1 if n < 100_000 else 7
        assert rec.result is not None and not rec.result.reread
        assert out.read_bytes() == want.read_bytes(), s.name
        # The same from a file object, through record().
        out2 = tmp_path / f"{s.name}.rec2"
        assert savedir.record(out2, io.BytesIO(data)).entries == rec.result.entries
        assert out2.read_bytes() == want.read_bytes()


def cut_points(path: Path) -> list[int]:
    with savedir.open(path) as f:
        entries = f.entries
        eof = f.eof
    # (eof + 1 is a whole stream without a vmdesc, which QEMU writes too)
    points = {0, 3, 8, eof, eof + 3, eof + 20}
    for e in entries:
        points.update({e.offset, e.offset + 1, e.offset + e.size // 2, e.end - 1})
    ram = [e for e in entries if e.name == "ram" and e.payload_size > 3 * 4096]
    for e in ram[:2]:
        points.update({e.payload_offset + 4096 + 100, e.payload_offset + 2 * 4096 + 4})
    points.discard(eof + 1)
    return sorted(p for p in points if p < os.path.getsize(path))


def test_cut_stream_keeps_bytes_and_writes_no_directory(qemu_stream_by_name, tmp_path: Path) -> None:
    s = qemu_stream_by_name["pc-full-exec-paused"]
    data = s.read_bytes()
    points = cut_points(s.path)
    assert len(points) > 100
    for cut in points:
        out = tmp_path / "cut.sav"
        with pytest.raises(savedir.FormatError) as info:
            savedir.record(out, io.BytesIO(data[:cut]))
        msg = str(info.value)
        assert "no directory was written" in msg and str(out) in msg, (cut, msg)
        assert info.value.offset is not None and info.value.offset <= cut, (cut, info.value.offset)
        assert out.read_bytes() == data[:cut], cut
        # index then says the same thing about the same file, and changes nothing.
        with pytest.raises(savedir.FormatError) as again:
            savedir.index(out)
        assert type(again.value) is type(info.value), (cut, again.value, info.value)
        assert again.value.offset == info.value.offset, (cut, again.value, info.value)
        assert out.read_bytes() == data[:cut], cut


def test_cli_record_cut_stream_exits_nonzero(qemu_stream_by_name, tmp_path: Path) -> None:
    s = qemu_stream_by_name["q35-full-file-paused"]
    data = s.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        out = tmp_path / "cli.sav"
        p = subprocess.run(SAVEDIR + ["record", str(out)], input=data[:cut], capture_output=True, timeout=60)
        assert p.returncode == 1, p
        err = p.stderr.decode()
        assert "stopped after" in err or "stream" in err, err
        assert "no directory was written" in err, err
        assert out.read_bytes() == data[:cut]


def test_record_memory_stays_bounded(tmp_path: Path) -> None:
    src = tmp_path / "big.sav"
    info = synthetic.write_stream(str(src), 1 << 30, pages_per_part=32768)
    out = tmp_path / "rec.sav"
    code = (
        "import resource, subprocess, sys;"
        f"p = subprocess.run({SAVEDIR + ['record', '-q', str(out)]!r}, stdin=open({str(src)!r}, 'rb'));"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    peak_kib = int(p.stdout.split()[-1])
    # A 1 GiB stream with 128 MiB RAM sections: memory must not follow either.
    assert peak_kib < 120 * 1024, f"peak RSS {peak_kib} KiB"
    assert savedir.verify(out, deep=True).ok
    assert out.stat().st_size > info["file_size"]


_WRITER_AND_POLLER = """
import sys, threading, savedir
src, out = sys.argv[1:]
data = open(src, "rb").read()
rec = savedir.Recorder(out)
writer = threading.Thread(target=rec.write, args=(data,))
writer.start()
sys.stdin.readline()  # the parent: the writer is inside write, without the GIL
print("reading received", flush=True)
n = rec.received
writer.join()
rec.close()
print("OK", n, rec.result.stream_size, flush=True)
"""


def test_reading_received_while_another_thread_writes(tmp_path: Path) -> None:
    """A thread inside Recorder.write (its lock held, the GIL released) and
    another reading ``received`` must not wait for each other."""
    src = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"
    want = tmp_path / "want.sav"
    want.write_bytes(src.read_bytes())
    savedir.index(want)
    out = tmp_path / "out.sav"
    pause = Pause(tmp_path, "record:write")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_AND_POLLER, str(src), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=pause.env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        pause.wait(proc)  # the writer thread is stopped inside write
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "reading received\n"
        # Let the main thread get into `received` before the writer goes on
        # (were it slower, the test could only pass wrongly, never fail wrongly).
        time.sleep(0.5)
        pause.release()
        try:
            out_, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("deadlock: the writer and the thread reading `received` wait for each other")
    finally:
        pause.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out_.startswith("OK "), (out_, err)
    assert out.read_bytes() == want.read_bytes()
