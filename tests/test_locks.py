"""The lock promise: an open SaveFile holds a shared lock until it is
closed; writers (strip, index --force, record) on a file a reader holds fail
at once with a clear error and exit 2, leaving the file unchanged, or wait
when asked; readers of a file savedir is writing fail at once or wait."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import savedir
from pausehook import HANG, Pause

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"
SAVEDIR = [sys.executable, "-m", "savedir"]

# A reader in another process: opens the file, says so, waits for a line.
READER = """
import sys, savedir
f = savedir.open(sys.argv[1])
print("open", flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
sys.stdin.readline()
"""


def start_reader(p: Path) -> "subprocess.Popen[str]":
    r = subprocess.Popen([sys.executable, "-c", READER, str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert r.stdout is not None and r.stdout.readline() == "open\n"
    return r


def finish(r: "subprocess.Popen[str]") -> None:
    assert r.stdin is not None
    r.stdin.write("\n\n")
    r.stdin.flush()
    r.communicate(timeout=HANG)


def test_writers_fail_at_once_while_another_process_reads(tmp_path: Path) -> None:
    p = tmp_path / "vm.sav"
    p.write_bytes(EXAMPLE.read_bytes())
    savedir.index(p)
    before = p.read_bytes()
    reader = start_reader(p)
    try:
        for argv in (["strip", str(p)], ["index", "--force", str(p)], ["index", "--sidecar", "--force", str(p)]):
            r = subprocess.run(SAVEDIR + argv, capture_output=True, text=True, timeout=HANG)
            assert r.returncode == 2, (argv, r.stdout, r.stderr)
            assert str(p) in r.stderr and "busy" in r.stderr and "reader" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        r = subprocess.run(SAVEDIR + ["record", str(p)], input=b"", capture_output=True, timeout=HANG)
        assert r.returncode == 2, r.stderr
        assert p.read_bytes() == before
        # Readers do not stop each other.
        assert subprocess.run(SAVEDIR + ["verify", "--deep", str(p)], capture_output=True, timeout=HANG).returncode == 0
        # --wait waits for the reader to go.
        w = subprocess.Popen(SAVEDIR + ["strip", "--wait", str(p)], stdout=subprocess.PIPE, text=True)
        assert w.poll() is None or w.returncode != 0  # cannot have stripped while the reader holds the file
        assert p.read_bytes() == before
        finish(reader)
        out, _ = w.communicate(timeout=HANG)
        assert w.returncode == 0 and "removed" in out
        assert len(p.read_bytes()) < len(before)
    finally:
        if reader.poll() is None:
            reader.kill()


def test_in_process_reader_and_writer(tmp_path: Path) -> None:
    p = tmp_path / "vm.sav"
    p.write_bytes(EXAMPLE.read_bytes())
    savedir.index(p)
    f = savedir.open(p)
    view = f["cpu"].data
    with pytest.raises(savedir.FileLockedError) as info:
        savedir.strip(p)
    assert isinstance(info.value, BlockingIOError) and info.value.path == str(p)
    with pytest.raises(savedir.FileLockedError):
        savedir.index(p, force=True)
    f.close()
    assert f.closed
    # Views outlive the file (and its lock).
    assert bytes(view[:1]) == b"\x04"
    assert savedir.strip(p).removed > 0
    with pytest.raises(ValueError):
        f.entries


def test_readers_fail_at_once_while_savedir_writes(tmp_path: Path) -> None:
    p = tmp_path / "vm.sav"
    p.write_bytes(EXAMPLE.read_bytes())
    pause = Pause(tmp_path, "index:before-write")
    w = subprocess.Popen(SAVEDIR + ["index", "-q", str(p)], env=pause.env)
    try:
        pause.wait(w)
        r = subprocess.run(SAVEDIR + ["ls", str(p)], capture_output=True, text=True, timeout=HANG)
        assert r.returncode == 2 and "busy" in r.stderr and "writing" in r.stderr, r.stderr
        with pytest.raises(savedir.FileLockedError):
            savedir.open(p)
        waiting = subprocess.Popen(SAVEDIR + ["verify", "--wait", str(p)], stdout=subprocess.PIPE, text=True)
        pause.release()
        assert w.wait(timeout=HANG) == 0
        out, _ = waiting.communicate(timeout=HANG)
        # It waited for the writer, so it sees the directory.
        assert waiting.returncode == 0 and "OK" in out, out
    finally:
        pause.release()
        if w.poll() is None:
            w.kill()


def test_changed_after_truncation(tmp_path: Path) -> None:
    import os

    p = tmp_path / "vm.sav"
    p.write_bytes(EXAMPLE.read_bytes())
    savedir.index(p)
    with savedir.open(p) as f:
        assert f.changed is None
        last = f.entries[-1]
        os.truncate(p, 4096)
        assert f.changed is not None and "shrank" in f.changed
        with pytest.raises(savedir.FileChangedError):
            f.view(0, 16)
        with pytest.raises(savedir.FileChangedError):
            last.data
