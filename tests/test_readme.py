"""The README's examples work as shown, on the real save it names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE = ROOT / "examples" / "pc-i440fx.sav"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_example_runs(tmp_path: Path) -> None:
    (code,) = blocks("python")
    shutil.copyfile(EXAMPLE, tmp_path / "vm.sav")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "pc-i440fx-10.0 True" in p.stdout


def test_console_example_output_is_what_savedir_prints(tmp_path: Path) -> None:
    console = blocks("console")[0]
    shutil.copyfile(EXAMPLE, tmp_path / "vm.sav")
    lines = console.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("$ "):
            continue
        cmd = line[2:].split("#")[0].strip()
        expected = []
        for out in lines[i + 1 :]:
            if out.startswith("$ ") or out == "...":
                break
            expected.append(out)
        args = cmd.split()
        assert args[0] == "savedir"
        redirect = None
        if ">" in args:
            redirect = args[args.index(">") + 1]
            args = args[: args.index(">")]
        p = subprocess.run([sys.executable, "-m", "savedir", *args[1:]], cwd=tmp_path, capture_output=True, timeout=60)
        assert p.returncode == 0, (cmd, p.stderr)
        if redirect:
            (tmp_path / redirect).write_bytes(p.stdout)
            continue
        got = [l.rstrip() for l in p.stdout.decode(errors="replace").splitlines()]
        assert got[: len(expected)] == expected, cmd


def _try_it() -> str:
    (cmds,) = [b for b in blocks("sh") if "pip install" in b]
    return cmds.strip()


def test_try_it_command_line() -> None:
    cmds = _try_it()
    assert "\n" not in cmds, "the first command is one command line"
    assert "examples/pc-i440fx.sav" in cmds and "savedir index" in cmds
    assert "python3 -m venv" in cmds, "Debian's python3 refuses pip install outside a venv"
    assert os.path.getsize(EXAMPLE) < 1 << 20
    assert EXAMPLE.read_bytes()[:8] == b"QEVM\x00\x00\x00\x03"


# What a clone holds: the repository without what builds and tests leave in it.
_NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", "target", "dist", ".venv", ".venv-*", "__pycache__", ".pytest_cache", ".hypothesis", "corpus", "artifacts", "coverage", "seeds"
)


def _newcomer_env(tmp: Path) -> dict[str, str]:
    """The environment of a newcomer's shell: no venv active (not this test
    run's either), and as root with no sudo installed, a `sudo` that runs
    the command (what sudo does for root)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    active = {os.environ.get("VIRTUAL_ENV", ""), sys.prefix if sys.prefix != sys.base_prefix else ""} - {""}
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and not any(Path(d) == Path(v) / "bin" for v in active)]
    if shutil.which("sudo", path=os.pathsep.join(path)) is None:
        assert os.geteuid() == 0, "the README's first command needs sudo, which is not installed"
        shim = tmp / "sudo-as-root"
        shim.mkdir()
        (shim / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (shim / "sudo").chmod(0o755)
        path.insert(0, str(shim))
    env["PATH"] = os.pathsep.join(path)
    return env


def test_try_it_command_runs_as_written(tmp_path: Path) -> None:
    """The README's first command, as written, with sh in a copy of the
    repository: it makes .venv/, builds savedir from source into it and runs
    it on the example save."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=_NOT_IN_A_CLONE)
    p = subprocess.run(["sh", "-c", _try_it()], cwd=clone, env=_newcomer_env(tmp_path), capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
    assert "/tmp/vm.sav: indexed, 36 entries" in p.stdout, p.stdout
    assert "/tmp/vm.sav: OK (36 entries, stream and checksums match)" in p.stdout, p.stdout
    assert "pc-i440fx-10.0, stream 0..358982, read through its directory" in p.stdout, p.stdout
    installed = list((clone / ".venv" / "lib").glob("python3*/site-packages/savedir/__init__.py"))
    assert len(installed) == 1, "savedir is not installed into .venv/ (an editable install?)"
