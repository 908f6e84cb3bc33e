"""Many files at once: ``savedir index|verify|ls PATH...`` over files and
folders, and ``savedir.index_many`` / ``verify_many`` / ``open_many``.

Real QEMU saves (tests/conftest.py) in a folder tree with damaged,
non-save and unreadable files; big files from the synthetic generator.
Races are arranged with the pause hook (tests/pausehook.py), never timed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

import savedir
import synthetic
from conftest import RealStream
from pausehook import HANG, Pause

pytestmark = pytest.mark.qemu

SAVEDIR = [sys.executable, "-m", "savedir"]
NOBODY = 65534


def _run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", HANG)
    return subprocess.run([*SAVEDIR, *args], capture_output=True, text=True, **kw)


def _run_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line, as nobody when we are root (who reads every file),
    so that unreadable files are unreadable: in a forked child that gives up
    root (the interpreter itself may lie where nobody cannot read)."""
    if os.geteuid() != 0:
        return _run(*args)
    import tempfile
    import traceback

    import savedir.cli

    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            code = savedir.cli.main(list(args))
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(
        list(args), os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()
    )


def _chown(p: Path) -> None:
    if os.geteuid() == 0:
        os.chown(p, NOBODY, NOBODY)


def _lines(out: str) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _open_up(p: Path) -> None:
    """Lets nobody walk down to ``p``."""
    for d in (p, *p.parents):
        if d in (Path("/tmp"), Path("/")):
            break
        d.chmod(d.stat().st_mode | 0o055)


@pytest.fixture
def tree(qemu_streams: List[RealStream], tmp_path: Path) -> Tuple[Path, Dict[str, int]]:
    """A folder tree of saves and other files, owned by nobody, and what
    `index` makes of each file: its exit status."""
    root = tmp_path / "saves"
    want: Dict[str, int] = {}
    for i, s in enumerate(qemu_streams):
        sub = root / ("" if i < 2 else "vm") / ("" if i < 4 else "old")
        p = s.copy_to(sub, f"{s.name}.sav")
        want[str(p)] = 0
    damaged = qemu_streams[0].copy_to(root / "vm", "cut.sav")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    want[str(damaged)] = 1
    notes = root / "notes.txt"
    notes.write_text("not a save\n")
    want[str(notes)] = 1
    empty = root / "vm" / "empty.sav"
    empty.write_bytes(b"")
    want[str(empty)] = 1
    secret = qemu_streams[1].copy_to(root / "vm", "secret.sav")
    want[str(secret)] = 2
    locked_dir = root / "vm" / "locked"
    locked_dir.mkdir()
    qemu_streams[1].copy_to(locked_dir, "inside.sav")
    want[str(locked_dir)] = 2
    for dirpath, dirnames, filenames in os.walk(root):
        _chown(Path(dirpath))
        for n in filenames:
            _chown(Path(dirpath) / n)
    secret.chmod(0)
    if os.geteuid() == 0:
        os.chown(secret, 0, 0)
        os.chown(locked_dir, 0, 0)
    locked_dir.chmod(0)
    _open_up(tmp_path)
    return root, want


def test_a_folder_tree_gives_one_result_per_file_and_the_worst_status(tree: Tuple[Path, Dict[str, int]]) -> None:
    root, want = tree
    r = _run_unprivileged("index", "--recursive", "--jsonl", "--jobs", "2", str(root))
    got = _lines(r.stdout)
    assert sorted(o["path"] for o in got) == sorted(want), r.stdout + r.stderr
    for o in got:
        assert o["status"] == want[o["path"]], o
        assert o["ok"] == (o["status"] == 0), o
        assert set(o) >= {"path", "ok", "error", "entries", "bytes", "seconds", "status"}
    assert r.returncode == 2, r.stderr
    by_path = {o["path"]: o for o in got}
    assert "[Errno 13]" in by_path[str(root / "vm" / "secret.sav")]["error"]
    assert "cannot read the folder: Permission denied" in by_path[str(root / "vm" / "locked")]["error"]
    assert "stream" in by_path[str(root / "notes.txt")]["error"]
    good = [p for p, s in want.items() if s == 0]
    for p in good:
        assert by_path[p]["written"] is True and by_path[p]["entries"] > 10
        assert by_path[p]["bytes"] == os.path.getsize(p) - by_path[p]["directory_size"] - by_path[p]["ram_map_size"]

    # Without --recursive, only the files in the folder itself.
    r = _run_unprivileged("verify", "--json", str(root))
    listed = json.loads(r.stdout)
    assert sorted(o["path"] for o in listed) == sorted(str(p) for p in root.iterdir() if p.is_file())
    assert r.returncode == 1 and all(set(o) == {"path", "ok", "check", "offset", "message"} for o in listed)

    # In order: the text output follows the walk, one line per file.
    r = _run_unprivileged("verify", "-r", "--deep", "-j", "2", str(root))
    assert r.returncode == 2
    ok = [line for line in r.stdout.splitlines() if ": OK (" in line]
    assert sorted(line.split(":")[0] for line in ok) == sorted(good)
    assert r.stderr.count("Permission denied") == 2, r.stderr
    again = _run_unprivileged("verify", "-r", "--deep", "-j", "1", str(root))
    assert again.stdout == r.stdout, "the same lines in the same order, whatever the jobs"

    # The readable part of the tree, given as files: exit 1 (invalid files only).
    files = [p for p, s in want.items() if s < 2]
    r = _run_unprivileged("verify", *files)
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith(files[0] + ":")


def test_ls_of_several_files_and_folders(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    paths = [s.copy_to(tmp_path / "d", f"{s.name}.sav") for s in qemu_streams[:3]]
    savedir.index(paths[0])
    one = _run("ls", "--json", str(paths[0]))
    assert one.returncode == 0 and json.loads(one.stdout)["path"] == str(paths[0])
    many = _run("ls", "--json", *map(str, paths))
    listed = json.loads(many.stdout)
    assert [o["path"] for o in listed] == [str(p) for p in paths]
    assert listed[0] == json.loads(one.stdout)
    assert [o["indexed"] for o in listed] == [True, False, False]
    folder = _run("ls", "--json", str(tmp_path / "d"))
    assert sorted(o["path"] for o in json.loads(folder.stdout)) == sorted(str(p) for p in paths)
    text = _run("ls", *map(str, paths))
    blocks = text.stdout.split("\n\n")
    assert len(blocks) == 3 and all(b.startswith(str(p) + ": ") for b, p in zip(blocks, paths))
    single = _run("ls", str(paths[1]))
    assert blocks[1] == single.stdout.rstrip("\n") + ("" if blocks[1].endswith("\n") else "")
    jl = _lines(_run("ls", "--jsonl", str(tmp_path / "d"), str(tmp_path / "missing.sav")).stdout)
    assert len(jl) == 4
    assert {o["path"]: o["status"] for o in jl}[str(tmp_path / "missing.sav")] == 2


def test_the_python_api(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    paths = [s.copy_to(tmp_path, f"{s.name}.sav") for s in qemu_streams]
    missing = tmp_path / "missing.sav"
    results = list(savedir.index_many([*paths, missing], jobs=2))
    assert sorted(r.path for r in results) == sorted(map(str, [*paths, missing]))
    for r in results:
        assert isinstance(r.seconds, float) and r.seconds >= 0
        if r.path == str(missing):
            assert not r.ok and isinstance(r.error, FileNotFoundError) and r.result is None and r.bytes == 0
        else:
            assert r.ok and r.error is None and isinstance(r.result, savedir.IndexResult)
            assert r.entries == r.result.entries and r.bytes == os.path.getsize(r.path) - r.result.directory_size - r.result.ram_map_size
            assert r.to_dict() == {
                "path": r.path, "ok": True, "error": None, "entries": r.entries, "bytes": r.bytes, "seconds": r.seconds,
            }
    ordered = list(savedir.verify_many(paths, deep=True, ordered=True, jobs=3))
    assert [r.path for r in ordered] == list(map(str, paths))
    assert all(r.ok and isinstance(r.result, savedir.VerifyResult) and r.result.deep for r in ordered)
    # One path alone, as a str or a Path.
    assert [r.ok for r in savedir.verify_many(paths[0])] == [True]
    assert [r.ok for r in savedir.verify_many(str(paths[0]))] == [True]
    for r in savedir.open_many(paths, jobs=2):
        assert isinstance(r.file, savedir.SaveFile) and r.file.indexed
        with r.file as f:
            assert len(f.entries) == r.entries and "cpu" in f
    with pytest.raises(ValueError):
        savedir.index_many(paths, jobs=0)


def test_threads_each_with_a_batch(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    folders = []
    for t in range(4):
        d = tmp_path / f"t{t}"
        for s in qemu_streams:
            s.copy_to(d, f"{s.name}.sav")
        folders.append(d)
    out: Dict[int, List[bool]] = {}

    def work(t: int) -> None:
        out[t] = [r.ok for r in savedir.index_many(folders[t], jobs=2)]
        out[t] += [r.ok for r in savedir.verify_many(folders[t], deep=True, jobs=2)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(HANG)
    assert all(not th.is_alive() for th in threads)
    assert out == {t: [True] * (2 * len(qemu_streams)) for t in range(4)}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _index_folder(folder: str) -> List[Tuple[str, bool, int]]:
    """In a worker process: a batch of its own (a big file among them, so
    that its checksums are computed on several threads)."""
    return sorted((Path(r.path).name, r.ok, r.entries) for r in savedir.index_many(folder, jobs=2))


@pytest.fixture
def worker_folders(qemu_streams: List[RealStream], tmp_path: Path) -> List[str]:
    big = tmp_path / "big.sav"
    synthetic.write_stream(big, 96 << 20, pages_per_part=4096, seed=3)
    folders = []
    for k in range(3):
        d = tmp_path / f"w{k}"
        for s in qemu_streams[:2]:
            s.copy_to(d, f"{s.name}.sav")
        shutil.copyfile(big, d / "big.sav")
        folders.append(str(d))
    return folders


def _expected(folder: str) -> List[Tuple[str, bool, int]]:
    return sorted((n, True, len(savedir.open(Path(folder) / n).entries)) for n in os.listdir(folder))


def test_index_many_in_forked_worker_processes(worker_folders: List[str], tmp_path: Path) -> None:
    # The parent runs batches first: their threads are gone when they end,
    # so the children that fork afterwards wait on no pool.
    before = _threads()
    warm = tmp_path / "warm"
    shutil.copytree(worker_folders[0], warm)
    assert all(r.ok for r in savedir.index_many(warm, jobs=2))
    assert all(r.ok for r in savedir.verify_many(warm, deep=True, jobs=2))
    savedir.index(warm / "big.sav", force=True)
    assert _threads() == before, "a batch leaves no thread behind"

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [pool.submit(_index_folder, f) for f in worker_folders]
        got = [f.result(timeout=HANG) for f in futures]
    assert got == [_expected(f) for f in worker_folders]

    for f in worker_folders:
        savedir.strip(Path(f) / "big.sav")
    with ctx.Pool(2) as mp:
        got = mp.map_async(_index_folder, worker_folders).get(timeout=HANG)
    assert [[(n, ok) for n, ok, _ in g] for g in got] == [
        [(n, True) for n, _, _ in _expected(f)] for f in worker_folders
    ]


def test_a_batch_in_progress_refuses_to_go_on_in_a_forked_child(worker_folders: List[str]) -> None:
    batch = savedir.verify_many(worker_folders, deep=True, jobs=2, recursive=True)
    first = next(batch)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            next(batch)
        except RuntimeError as e:
            code = 0 if "fork" in str(e) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert first.path and len([first, *batch]) == 9


def _truncated_at_its_scan(cmd: List[str], paths: List[Path], cut: int, tmp: Path) -> str:
    """Runs ``cmd``; truncates the second of ``paths`` to ``cut`` bytes while
    the batch holds at the start of its scan (the pause point of that file
    only); returns the command's stdout."""
    pause = Pause(tmp, f"scan:start@{paths[1].name}")
    proc = subprocess.Popen(cmd, env=pause.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pause.wait(proc)
        with open(paths[1], "r+b") as f:
            f.truncate(cut)
        pause.release()
        out, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    return out


def test_a_file_truncated_during_the_batch_fails_alone(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    paths = [qemu_streams[0].copy_to(tmp_path, f"{n}.sav") for n in "abc"]
    cut = os.path.getsize(paths[1]) // 3
    out = _truncated_at_its_scan([*SAVEDIR, "index", "--jsonl", "--jobs", "2", *map(str, paths)], paths, cut, tmp_path)
    got = {Path(o["path"]).name: o for o in _lines(out)}
    assert got["a.sav"]["ok"] and got["c.sav"]["ok"], out
    b = got["b.sav"]
    assert not b["ok"] and b["status"] == 1 and "the file changed while it was read" in b["error"], b
    assert os.path.getsize(paths[1]) == cut, "nothing was written to it"
    # In Python, the error is a FileChangedError; the others are indexed.
    paths = [qemu_streams[0].copy_to(tmp_path / "py", f"{n}.sav") for n in "abc"]
    code = (
        "import sys, savedir\n"
        "for r in savedir.index_many(sys.argv[1:], jobs=2, ordered=True):\n"
        "    print(r.path, r.ok, type(r.error).__name__, flush=True)\n"
    )
    out = _truncated_at_its_scan([sys.executable, "-c", code, *map(str, paths)], paths, 100, tmp_path)
    assert out.splitlines() == [
        f"{paths[0]} True NoneType", f"{paths[1]} False FileChangedError", f"{paths[2]} True NoneType"
    ], out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_memory_stays_bounded_whatever_the_number_of_files(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    src = qemu_streams[0].copy_to(tmp_path, "src.sav")
    savedir.index(src)
    d = tmp_path / "many"
    d.mkdir()
    n = 3000
    for i in range(n):
        os.link(src, d / f"{i:05}.sav")
    base = _open_fds()
    # Each open file holds two descriptors (its lock, its mapping's file):
    # the batch never holds more than a few files per thread, however far
    # the walk could go.
    seen = 0
    worst = 0
    for r in savedir.open_many(d, jobs=2):
        assert r.ok, r.error
        r.file.close()
        seen += 1
        worst = max(worst, _open_fds() - base)
    assert seen == n
    assert worst <= 2 * 16, worst
    # In order, at most a window of 64 open files waits for its turn.
    worst = 0
    for r in savedir.open_many(d, jobs=2, ordered=True):
        r.file.close()
        worst = max(worst, _open_fds() - base)
    assert worst <= 2 * (64 + 16), worst


def _on_pty(args: List[str], pause: Optional[Pause] = None) -> str:
    """Runs savedir with stderr on a terminal (a pty of 120 columns) and
    returns what it wrote there. With ``pause``, the process is held there
    for 0.3 s (a progress bar appears only after 0.2 s of work)."""
    import fcntl
    import pty
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = pause.env if pause is not None else None
    proc = subprocess.Popen([*SAVEDIR, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, env=env)
    os.close(slave)
    out = []
    reader = threading.Thread(target=lambda: _drain(master, out))
    reader.start()
    try:
        if pause is not None:
            pause.wait(proc)
            time.sleep(0.3)  # at least this long: no assertion on time
            pause.release()
        proc.wait(HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(HANG)
        os.close(master)
    return b"".join(out).decode(errors="replace")


def _drain(fd: int, out: List[bytes]) -> None:
    while True:
        try:
            b = os.read(fd, 65536)
        except OSError:
            return
        if not b:
            return
        out.append(b)


def test_one_progress_bar_for_the_batch_on_a_terminal_only(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    big = tmp_path / "big.sav"
    synthetic.write_stream(big, 64 << 20, pages_per_part=4096, seed=5)
    paths = [str(big), *(str(s.copy_to(tmp_path, f"{s.name}.sav")) for s in qemu_streams[:2])]
    # Held before the first file's directory is written: then the bar shows
    # the first file's bytes done, the files done, throughput and ETA.
    text = _on_pty(["index", "-j", "1", *paths], Pause(tmp_path, "index:before-write@big.sav"))
    assert "indexing: " in text and "/3 files" in text and "ETA" in text and "MiB" in text, text
    assert text.count("indexing: ") >= 1 and "big.sav: indexing" not in text, "one bar for all files"
    # -q: no bar; the same held run draws nothing.
    quiet = _on_pty(["verify", "-q", "--deep", "-j", "1", *paths], Pause(tmp_path, "scan:start@big.sav"))
    assert quiet == "", quiet
    loud = _on_pty(["verify", "--deep", "-j", "1", *paths], Pause(tmp_path, "scan:start@big.sav"))
    assert "verifying: " in loud, loud
    # Not a terminal: nothing on stderr.
    r = _run("verify", "--deep", *paths)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_closing_a_batch_stops_the_scans_in_progress(qemu_streams: List[RealStream], tmp_path: Path) -> None:
    """close() starts no new file, and a scan in progress stops at its next
    window: the big file held at the start of its scan is not indexed."""
    big = tmp_path / "big.sav"
    synthetic.write_stream(big, 64 << 20, pages_per_part=2048, seed=9)
    small = qemu_streams[0].copy_to(tmp_path, "small.sav")
    code = (
        "import sys, savedir\n"
        "b = savedir.index_many(sys.argv[1:], jobs=2)\n"
        "r = next(b)\n"
        "print(r.path, r.ok, flush=True)\n"
        "b.close()\n"
        "print('closed', list(b), flush=True)\n"
    )
    pause = Pause(tmp_path, "scan:start@big.sav")
    proc = subprocess.Popen([sys.executable, "-c", code, str(big), str(small)], env=pause.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pause.wait(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"{small} True\n"
        pause.release()
        out, err = proc.communicate(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == "closed []\n" and proc.returncode == 0, out + err
    assert savedir.verify(small).ok
    r = savedir.verify(big)
    assert not r.ok and r.check == "trailer", "the stopped scan wrote no directory"
