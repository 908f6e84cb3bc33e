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


def test_try_it_command_line() -> None:
    (cmds,) = [b for b in blocks("sh") if "pip install" in b]
    assert "examples/pc-i440fx.sav" in cmds and "savedir index" in cmds
    assert os.path.getsize(EXAMPLE) < 1 << 20
    assert EXAMPLE.read_bytes()[:8] == b"QEVM\x00\x00\x00\x03"
