"""The ``savedir`` command, end to end on real streams.

A few cases run the installed ``savedir`` script (and ``python -m
savedir``) in a subprocess; the rest call ``savedir.cli.main`` in process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Any

import pytest
import qemu_harness
import savedir
import savedir.cli
from conftest import RealStream

pytestmark = pytest.mark.qemu

STREAM = "pc-full-exec-paused"
QUICK = 30.0

VERIFY_KEYS = {"path", "ok", "check", "offset", "message"}
INDEX_KEYS = {"path", "written", "entries", "directory_offset", "directory_size", "replaced", "sidecar", "ram_map_size"}
LS_KEYS = {"path", "stream_start", "stream_end", "eof", "indexed", "machine_type", "sidecar", "container", "entries"}
LS_ENTRY_REQUIRED = {"kind", "offset", "size"}
LS_ENTRY_OPTIONAL = {"section_id", "name", "instance_id", "version_id", "command", "command_name", "crc32c"}


def run(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    if "stdout" in kw:
        kw.setdefault("stderr", subprocess.PIPE)
    else:
        kw.setdefault("capture_output", True)
    kw.setdefault("timeout", QUICK)
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("check", False)
    return subprocess.run(["savedir", *args], **kw)  # noqa: PLW1510 (check=False is set above)


@pytest.fixture(scope="module")
def stream(qemu_stream_by_name: dict[str, RealStream]) -> RealStream:
    return qemu_stream_by_name[STREAM]


@pytest.fixture
def plain(stream: RealStream, tmp_path: Path) -> Path:
    """A fresh, writable, not yet indexed copy."""
    return stream.copy_to(tmp_path, "plain.sav")


@pytest.fixture
def indexed(stream: RealStream, tmp_path: Path) -> Path:
    p = stream.copy_to(tmp_path, "indexed.sav")
    assert savedir.index(p).written
    return p


# ---------------------------------------------------------------------------
# subprocess: the installed script


def test_index_verify_strip_end_to_end(stream: RealStream, plain: Path) -> None:
    pristine = stream.read_bytes()
    r = run("index", str(plain), text=True)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(
        rf"{re.escape(str(plain))}: indexed, (\d+) entries, RAM page map of (\d+) bytes, directory of (\d+) bytes "
        rf"at offset (\d+)\n",
        r.stdout,
    )
    assert m, r.stdout
    entries, map_size, size, offset = map(int, m.groups())
    assert offset == len(pristine) + map_size and plain.stat().st_size == offset + size
    with savedir.open(plain) as f:
        assert len(f.entries) == entries

    r = run("index", str(plain), text=True)
    assert r.returncode == 0 and r.stdout == f"{plain}: already indexed ({entries} entries)\n", r.stdout

    r = run("verify", str(plain), text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{plain}: OK"), r.stdout
    r = run("verify", "--deep", str(plain), text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{plain}: OK"), r.stdout

    r = run("strip", str(plain), text=True)
    assert r.returncode == 0 and r.stdout == f"{plain}: removed {map_size + size} bytes\n", r.stdout
    assert plain.read_bytes() == pristine
    r = run("strip", str(plain), text=True)
    assert r.returncode == 0 and r.stdout == f"{plain}: nothing after the stream\n", r.stdout
    assert plain.read_bytes() == pristine

    r = run("verify", str(plain), text=True)
    assert r.returncode == 1 and f"{plain}: FAILED trailer check" in r.stdout, r.stdout


def json_shape(r: savedir.VerifyResult) -> dict[str, object]:
    """What `verify --json` prints of a result: five of its fields."""
    d = r.to_dict()
    return {k: d[k] for k in VERIFY_KEYS}


def test_verify_json_shape_and_exit_codes(stream: RealStream, indexed: Path, plain: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.sav"
    r = run("verify", "--json", str(indexed), text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out, list) and len(out) == 1
    assert set(out[0]) == VERIFY_KEYS
    assert out[0] == json_shape(savedir.verify(indexed))
    assert out[0]["ok"] is True and out[0]["check"] is None and out[0]["offset"] is None

    r = run("verify", "--deep", "--json", str(indexed), str(plain), text=True)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert [set(o) for o in out] == [VERIFY_KEYS, VERIFY_KEYS]
    assert [o["path"] for o in out] == [str(indexed), str(plain)]
    assert out[0]["ok"] is True
    assert out[1]["ok"] is False and out[1]["check"] == "trailer" and isinstance(out[1]["offset"], int)
    assert out[1] == json_shape(savedir.verify(plain, deep=True))

    # an I/O error beats an invalid file: exit 2, and the missing file is still listed
    r = run("verify", "--json", str(indexed), str(plain), str(missing), text=True)
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert [o["path"] for o in out] == [str(indexed), str(plain), str(missing)]
    assert [set(o) for o in out] == [VERIFY_KEYS] * 3
    assert out[2]["ok"] is False and str(missing) in out[2]["message"]


def test_cat_to_stdout(indexed: Path, stream: RealStream) -> None:
    pristine = stream.read_bytes()
    with savedir.open(indexed) as f:
        cpu = f["cpu"]
        cpu_bytes = bytes(cpu.data)
        ram = f["ram"]
        ram_items = [(e.offset, e.end, e.payload_offset, e.payload_size) for e in ram.entries]
        dma1 = bytes(f["dma", 1].data)
    r = run("cat", str(indexed), "cpu", stdout=subprocess.PIPE)
    assert r.returncode == 0 and r.stdout == cpu_bytes == pristine[cpu.offset:cpu.offset + cpu.size]
    r = run("cat", str(indexed), "dma", "--instance", "1")
    assert r.returncode == 0 and r.stdout == dma1
    r = run("cat", str(indexed), "ram")
    assert r.returncode == 0
    assert r.stdout == b"".join(pristine[a:b] for a, b, _, _ in ram_items)
    assert r.stdout[:1] == b"\x01" and len(ram_items) >= 2
    r = run("cat", "--payload", str(indexed), "ram")
    assert r.returncode == 0
    assert r.stdout == b"".join(pristine[p:p + n] for _, _, p, n in ram_items)


def test_cat_into_a_closed_pipe(indexed: Path) -> None:
    """``savedir cat FILE ram | head -c 10``: the reader going away is not an error."""
    p = subprocess.Popen(["savedir", "cat", str(indexed), "ram"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = p.stdout.read(10)
    p.stdout.close()
    try:
        rc = p.wait(timeout=QUICK)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    p.stderr.close()
    assert head[:1] == b"\x01"
    assert rc == 0 and "Traceback" not in err, (rc, err)


def test_desc_prints_the_vmdesc(indexed: Path, stream: RealStream) -> None:
    want = qemu_harness.vmdesc(stream.read_bytes())
    r = run("desc", str(indexed), text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == want
    assert r.stdout.count("\n") == 1  # QEMU's bytes, one line
    r = run("desc", "--pretty", str(indexed), text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == want
    assert r.stdout.count("\n") > 100


def test_python_dash_m_version() -> None:
    r = subprocess.run([sys.executable, "-m", "savedir", "--version"], capture_output=True, text=True, timeout=QUICK, check=False)
    assert r.returncode == 0
    assert r.stdout.strip() == f"savedir {savedir.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", savedir.__version__)
    r = run("--version", text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"savedir {savedir.__version__}"


def test_python_dash_m_runs_commands(indexed: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "savedir", "verify", str(indexed)], capture_output=True, text=True, timeout=QUICK, check=False)
    assert r.returncode == 0 and r.stdout.startswith(f"{indexed}: OK")
    r = subprocess.run([sys.executable, "-m", "savedir", "verify"], capture_output=True, text=True, timeout=QUICK, check=False)
    assert r.returncode == 2 and "usage:" in r.stderr


# ---------------------------------------------------------------------------
# in process: savedir.cli.main


def main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple:
    rc = savedir.cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_index_json_and_quiet(plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = main(capsys, "index", "--json", str(plain))
    assert rc == 0 and err == ""
    d = json.loads(out)
    assert set(d) == INDEX_KEYS
    assert d["written"] is True and d["path"] == str(plain) and d["replaced"] == 0
    with savedir.open(plain) as f:
        assert d["entries"] == len(f.entries) and d["directory_offset"] == f.directory_offset
    rc, out, err = main(capsys, "index", "--json", str(plain))
    assert rc == 0 and json.loads(out) == {**d, "written": False}
    rc, out, err = main(capsys, "index", "-q", str(plain))
    assert (rc, out, err) == (0, "", "")
    rc, out, err = main(capsys, "index", "--force", "--no-checksums", "--json", str(plain))
    d2 = json.loads(out)
    assert rc == 0 and d2["written"] is True and d2["replaced"] == d["ram_map_size"] + d["directory_size"]
    assert d2["directory_size"] == d["directory_size"] - 6 * d["entries"]
    assert main(capsys, "verify", "--deep", str(plain))[0] == 0


def test_index_several_files(stream: RealStream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = stream.copy_to(tmp_path, "a.sav")
    b = stream.copy_to(tmp_path, "b.sav")
    junk = tmp_path / "junk.sav"
    junk.write_bytes(b"not a save file at all")
    missing = tmp_path / "missing.sav"
    rc, out, err = main(capsys, "index", str(a), str(junk), str(b))
    assert rc == 1
    assert f"{a}: indexed" in out and f"{b}: indexed" in out  # one bad file does not stop the others
    assert str(junk) in err and "savedir:" in err
    assert junk.read_bytes() == b"not a save file at all"
    rc, out, err = main(capsys, "index", str(missing), str(a))
    assert rc == 2 and str(missing) in err and f"{a}: already indexed" in out
    rc, out, err = main(capsys, "verify", str(a), str(b))
    assert rc == 0 and out.count(": OK") == 2


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["index"],
        ["verify"],
        ["verify", "--deeep", "x"],
        ["ls"],
        ["ls", "a", "--jobs", "0"],
        ["catalog", "a"],
        ["cat", "a"],
        ["cat", "a", "cpu", "--instance", "one"],
        ["desc"],
        ["strip"],
    ],
    ids=lambda a: " ".join(a) or "(none)",
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = main(capsys, *argv)
    assert rc == 2 and out == ""
    assert "usage:" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = main(capsys, "--help")
    assert rc == 0 and err == "" and "exit status" in out
    for cmd in ("index", "verify", "ls", "cat", "desc", "strip"):
        assert cmd in out


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.sav")
    for argv in (["index", missing], ["verify", missing], ["verify", "--deep", missing], ["ls", missing],
                 ["cat", missing, "cpu"], ["desc", missing], ["strip", missing]):
        rc, out, err = main(capsys, *argv)
        assert rc == 2 and out == "", argv
        assert missing in err and "Traceback" not in err, (argv, err)


def test_missing_file_names_the_file_and_the_reason_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.sav")
    line = f"{missing}: cannot open: No such file or directory"
    for argv in (["verify", missing], ["index", missing], ["ls", missing], ["strip", missing]):
        rc, out, err = main(capsys, *argv)
        assert (rc, out, err) == (2, "", f"savedir: {line}\n"), argv
    rc, out, err = main(capsys, "verify", "--json", missing)
    assert rc == 2 and json.loads(out)[0]["message"] == line
    r = run("verify", missing, text=True)
    assert (r.returncode, r.stderr) == (2, f"savedir: {line}\n")
    for fn in (savedir.verify, savedir.open, savedir.index, savedir.strip):
        with pytest.raises(FileNotFoundError) as info:
            fn(missing)
        e = info.value
        assert (e.errno, e.strerror, e.filename) == (errno.ENOENT, "cannot open: No such file or directory", missing)
        assert str(e) == f"[Errno 2] cannot open: No such file or directory: {missing!r}"


def test_read_only_file_names_the_file_and_the_reason_once(plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain.chmod(0o444)
    reason = "cannot write: the file is read-only (no write permission bits)"
    with pytest.raises(PermissionError) as info:
        savedir.index(plain)
    e = info.value
    assert (e.errno, e.strerror, e.filename) == (errno.EACCES, reason, str(plain))
    assert str(e) == f"[Errno 13] {reason}: {str(plain)!r}"
    rc, out, err = main(capsys, "index", str(plain))
    assert (rc, out, err) == (2, "", f"savedir: {plain}: {reason}\n")


def _as_unprivileged(fn: "Callable[[], None]") -> None:
    """Runs ``fn`` as is, or, for root (who reads any file), in a forked
    child that has given up root; an assertion there fails the test."""
    if os.geteuid() != 0:
        fn()
        return
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the check failed in the unprivileged child (see stderr)"


def test_unreadable_file_names_the_file_and_the_reason_once(plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain.chmod(0)
    for d in (plain.parent, *plain.parent.parents):
        if d == Path("/tmp") or d == Path("/"):
            break
        d.chmod(d.stat().st_mode | 0o055)  # the unprivileged child may look in

    def check() -> None:
        with pytest.raises(PermissionError) as info:
            savedir.verify(plain)
        assert (info.value.errno, info.value.strerror) == (errno.EACCES, "cannot open: Permission denied")
        rc, out, err = main(capsys, "verify", str(plain))
        assert (rc, err) == (2, f"savedir: {plain}: cannot open: Permission denied\n"), err

    _as_unprivileged(check)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, world\n" * 100, random.Random(7).randbytes(65536), b"QEV"],
    ids=["empty", "text", "random", "magic-cut-short"],
)
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_verify_a_file_that_is_not_a_stream(content: bytes, deep: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "junk.bin"
    p.write_bytes(content)
    opts = ["--deep"] if deep else []
    rc, out, err = main(capsys, "verify", *opts, str(p))
    assert rc == 1 and err == ""
    assert out.startswith(f"{p}: FAILED trailer check at offset 0: not a QEMU migration stream"), out
    assert "no section directory" not in out
    rc, out, err = main(capsys, "verify", "--json", *opts, str(p))
    assert rc == 1
    (d,) = json.loads(out)
    assert (d["ok"], d["check"], d["offset"]) == (False, "trailer", 0)
    assert d["message"].startswith("not a QEMU migration stream")
    assert d == json_shape(savedir.verify(p, deep=deep))
    assert p.read_bytes() == content


def test_verify_exit_codes(indexed: Path, plain: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(capsys, "verify", str(indexed))[0] == 0
    rc, out, _ = main(capsys, "verify", str(plain))
    assert rc == 1 and out.startswith(f"{plain}: FAILED trailer check at offset ")
    assert "no section directory" in out  # a real stream, not indexed
    assert main(capsys, "verify", str(indexed), str(plain))[0] == 1
    assert main(capsys, "verify", str(plain), str(tmp_path / "missing"))[0] == 2
    # a RAM byte changed: only --deep notices
    with savedir.open(indexed) as f:
        part = f["ram"].entries[1]
    data = bytearray(indexed.read_bytes())
    data[part.payload_offset + part.payload_size // 2] ^= 1
    indexed.write_bytes(bytes(data))
    assert main(capsys, "verify", str(indexed))[0] == 0
    rc, out, _ = main(capsys, "verify", "--deep", str(indexed))
    assert rc == 1 and f"FAILED deep check at offset {part.offset}" in out, out


def test_ls_human(indexed: Path, plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with savedir.open(indexed) as f:
        n, d, eof, mt = len(f.entries), f.directory_offset, f.eof, f.machine_type
    rc, out, err = main(capsys, "ls", str(indexed))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{indexed}: {mt}")
    assert f"read through its directory at offset {d}" in lines[0]
    assert "OFFSET" in lines[1] and "KIND" in lines[1]
    assert len(lines) == 2 + n + 1
    assert any(line.split()[2:4] == ["start", "1"] and "ram" in line for line in lines[2:])
    assert_file_order(lines[2:], eof)

    rc, out, _ = main(capsys, "ls", "--scan", str(indexed))
    assert rc == 0 and "not indexed: read by parsing the stream" in out.splitlines()[0]
    assert_file_order(out.splitlines()[2:], eof)
    rc, out, _ = main(capsys, "ls", str(plain))
    assert rc == 0 and "not indexed: read by parsing the stream" in out.splitlines()[0]
    assert len(out.splitlines()) == 2 + n + 1
    assert_file_order(out.splitlines()[2:], eof)


def assert_file_order(rows: list[str], eof: int) -> None:
    """The rows of ``ls`` are in offset order: the vmdesc, after the EOF byte, comes last."""
    offsets = [int(r.split()[0]) for r in rows]
    assert offsets == sorted(offsets), rows
    kinds = [r.split()[2] for r in rows]
    assert kinds[-2:] == ["eof", "vmdesc"], rows
    assert rows[-2].split() == [str(eof), "1", "eof"]
    assert offsets[-1] == eof + 1


def test_ls_without_vmdesc_ends_with_eof(stream: RealStream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with savedir.open(stream.path) as f:
        eof = f.eof
    p = tmp_path / "novmdesc.sav"
    p.write_bytes(stream.read_bytes()[: eof + 1])
    rc, out, err = main(capsys, "ls", str(p))
    assert rc == 0 and err == ""
    rows = out.splitlines()[2:]
    assert rows[-1].split() == [str(eof), "1", "eof"]
    assert "vmdesc" not in [r.split()[2] for r in rows]


@pytest.mark.parametrize("which,scan", [("indexed", False), ("indexed", True), ("plain", False)])
def test_ls_json_matches_the_api(which: str, scan: bool, indexed: Path, plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = indexed if which == "indexed" else plain
    argv = ["ls", "--json", str(path)] + (["--scan"] if scan else [])
    rc, out, err = main(capsys, *argv)
    assert rc == 0 and err == ""
    d = json.loads(out)
    assert set(d) == LS_KEYS
    with savedir.open(path, scan=scan) as f:
        assert d["path"] == str(path)
        assert (d["stream_start"], d["stream_end"], d["eof"], d["indexed"], d["machine_type"]) == (
            f.stream_start, f.stream_end, f.eof, f.indexed, f.machine_type,
        )
        assert d["indexed"] is (which == "indexed" and not scan)
        entries = f.entries
    assert len(d["entries"]) == len(entries)
    for j, e in zip(d["entries"], entries):
        keys = set(j)
        assert LS_ENTRY_REQUIRED <= keys <= LS_ENTRY_REQUIRED | LS_ENTRY_OPTIONAL, keys
        assert (j["kind"], j["offset"], j["size"]) == (e.kind, e.offset, e.size)
        for k in LS_ENTRY_OPTIONAL:
            assert j.get(k) == getattr(e, k), (e.kind, e.offset, k)
        assert ("section_id" in j) == (e.section_id is not None)
        assert ("command" in j) == (e.command is not None)
        assert ("crc32c" in j) == d["indexed"]


def test_cat_unknown_section(indexed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = main(capsys, "cat", str(indexed), "no-such-device")
    assert rc == 1 and out == ""
    assert "no-such-device" in err and str(indexed) in err
    rc, out, err = main(capsys, "cat", str(indexed), "cpu", "--instance", "7")
    assert rc == 1 and out == "" and "cpu" in err


def test_cat_reads_an_unindexed_file(plain: Path, stream: RealStream, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert savedir.cli.main(["cat", str(plain), "timer"]) == 0
    out = capsysbinary.readouterr().out
    with savedir.open(plain) as f:
        t = f["timer"]
        assert out == bytes(t.data) and out[:1] == b"\x04"
    assert plain.read_bytes() == stream.read_bytes()  # cat never writes


def test_desc_without_vmdesc(stream: RealStream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = stream.read_bytes()
    with savedir.open(stream.path) as f:
        eof = f.eof
    p = tmp_path / "novmdesc.sav"
    p.write_bytes(data[: eof + 1])
    rc, out, err = main(capsys, "desc", str(p))
    assert rc == 1 and out == "" and "no vmdesc" in err and str(p) in err


def test_strip_force(stream: RealStream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = stream.copy_to(tmp_path)
    pristine = stream.read_bytes()
    p.write_bytes(pristine + b"garbage after the stream")
    rc, out, err = main(capsys, "strip", str(p))
    assert rc == 1 and "--force" in err and str(p) in err
    assert p.read_bytes() == pristine + b"garbage after the stream"
    rc, out, err = main(capsys, "index", str(p))
    assert rc == 1 and "--force" in err
    rc, out, err = main(capsys, "strip", "--force", str(p))
    assert rc == 0 and out == f"{p}: removed 24 bytes\n"
    assert p.read_bytes() == pristine
    rc, out, err = main(capsys, "strip", "-q", str(p))
    assert (rc, out, err) == (0, "", "")
