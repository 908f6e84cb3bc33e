"""The command line starts fast: it imports only what a command needs, and
parses plain command lines without argparse, exactly as argparse would.

(The start-up time itself is measured by benches/batch.py, not here.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import savedir
import savedir.cli as cli

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"

#: Modules that a plain command must not import (argparse, json and typing
#: cost more than the rest of the command together; numpy is for views).
HEAVY = ("argparse", "json", "re", "typing", "numpy", "gettext", "enum")


def _modules_after(tmp_path: Path, *argv: str) -> tuple[int, list[str], str]:
    code = (
        "import sys\n"
        "from savedir.cli import main\n"
        f"rc = main({list(argv)!r})\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write(repr(sorted(sys.modules)))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    mods = p.stderr.strip().splitlines()[-1]
    return p.returncode, eval(mods), p.stdout  # noqa: S307 (our own repr of a list of str)


def test_plain_commands_import_nothing_heavy(tmp_path: Path) -> None:
    sav = tmp_path / "vm.sav"
    sav.write_bytes(EXAMPLE.read_bytes())
    for argv in (["index", str(sav)], ["verify", str(sav)], ["verify", "--deep", "-q", str(sav)], ["ls", str(sav)]):
        rc, mods, out = _modules_after(tmp_path, *argv)
        assert rc == 0, (argv, out)
        assert out.startswith(str(sav)) or "-q" in argv and out == "", (argv, out)
        heavy = [m for m in HEAVY if m in mods]
        assert not heavy, f"{' '.join(argv)} imported {heavy}"
    # What needs them imports them: --json, and anything argparse parses.
    _, mods, out = _modules_after(tmp_path, "verify", "--json", str(sav))
    assert "json" in mods and json.loads(out)[0]["ok"] is True
    _, mods, _ = _modules_after(tmp_path, "verify", "--deeep", str(sav))
    assert "argparse" in mods


def test_the_installed_script_does_not_import_re(tmp_path: Path) -> None:
    """The `savedir` script that the wheel installs is our own (an
    installer's entry-point script imports `re`, most of a short command's
    cost)."""
    script = Path(sys.executable).parent / "savedir"
    text = script.read_text()
    assert "import re" not in text, text
    sav = tmp_path / "vm.sav"
    sav.write_bytes(EXAMPLE.read_bytes())
    p = subprocess.run([str(script), "verify", str(sav)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "FAILED trailer check" in p.stdout, p.stdout + p.stderr


def _argparse(argv: list[str]) -> Any:
    try:
        ns = cli.build_parser().parse_args(argv)
    except SystemExit:
        return None
    return ns


def _same(fast: cli._Args, slow: Any) -> None:
    f, s = dict(vars(fast)), dict(vars(slow))
    assert f.pop("fn") is s.pop("fn").function()
    assert f == s


def test_fast_path_examples() -> None:
    cases = [
        ["verify", "a.sav"],
        ["verify", "--deep", "a.sav", "b.sav"],
        ["verify", "a.sav", "b.sav", "--json", "-q"],
        ["index", "-j", "2", "--recursive", "dir"],
        ["index", "--jobs=3", "-r", "dir", "--offset", "4096"],
        ["ls", "--vmdesc", "d.json", "x"],
        ["catalog", "-o", "c.parquet", "dir"],
        ["cat", "f.sav", "cpu", "--instance", "1"],
        ["strip", "--force", "a", "b"],
        ["record", "out.sav", "-q"],
        ["verify", "-"],
    ]
    for argv in cases:
        fast = cli._parse_fast(argv)
        assert fast is not None, argv
        _same(fast, _argparse(argv))


def test_fast_path_leaves_the_unusual_to_argparse() -> None:
    fast = cli._parse_fast(["--version"])
    assert fast is not None and fast.fn(fast) == 0
    for argv in (
        [],
        ["--version", "x"],
        ["verify"],
        ["verify", "--help"],
        ["verify", "--dee", "a"],  # an abbreviation argparse accepts
        ["verify", "a", "--deep", "b"],  # argparse refuses
        ["verify", "--", "-a"],
        ["index", "-qj2", "a"],
        ["index", "--jobs", "0", "a"],
        ["index", "--offset", "-1", "a"],
        ["index", "--force=yes", "a"],
        ["catalog", "a"],  # -o is required
        ["cat", "a"],
        ["frobnicate", "a"],
    ):
        assert cli._parse_fast(argv) is None, argv


TOKENS = st.sampled_from(
    ["a.sav", "b", "-", "--", "-q", "--quiet", "--deep", "--dee", "--json", "--jsonl", "-j", "--jobs", "2", "0",
     "-1", "x1", "--jobs=2", "-r", "--recursive", "--offset", "--offset=8", "--vmdesc", "--wait", "--scan",
     "--force", "--no-checksums", "--sidecar", "-o", "--output", "c.jsonl", "--instance", "cpu", "--payload",
     "--pretty", "-h", "-qr", "--bogus"]
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([c.name for c in cli.COMMANDS]), st.lists(TOKENS, max_size=7))
def test_fast_path_parses_as_argparse_does(command: str, rest: list[str]) -> None:
    argv = [command, *rest]
    fast = cli._parse_fast(argv)
    if fast is None:
        return  # argparse parses it, as it always did
    slow = _argparse(argv)
    assert slow is not None, f"the fast path accepted {argv}, which argparse refuses"
    _same(fast, slow)


def test_every_command_is_in_the_parser() -> None:
    p = cli.build_parser()
    names = {c.name for c in cli.COMMANDS}
    sub = next(a for a in p._actions if a.dest == "command")
    assert set(sub.choices) == names  # type: ignore[arg-type]
    assert {"index", "verify", "ls", "catalog"} <= names
    assert savedir.__version__


def test_a_new_command_is_one_entry_of_the_table(monkeypatch: Any) -> None:
    """How the other commands join: a Command in COMMANDS, its handler
    imported when it runs; options with choices stay on the fast path, and
    a command that needs more of argparse (``extra``) is parsed by it."""

    def probe(a: Any) -> int:
        return 5 if a.level == 2 else 6

    def extra(sp: Any) -> None:
        sp.add_argument("--mode", choices=["a", "b"], default="a")

    table = [
        *cli.COMMANDS,
        cli.Command("probe", "a command of a test", probe, args=[cli.Arg("file", "FILE")],
                    options=[cli.Opt("--level", value=int, choices=[1, 2], help="how much")]),
        cli.Command("probe2", "another", "savedir.cli:_version", extra=extra),
    ]
    monkeypatch.setattr(cli, "COMMANDS", table)
    fast = cli._parse_fast(["probe", "x", "--level", "2"])
    assert fast is not None
    _same(fast, _argparse(["probe", "x", "--level", "2"]))
    assert cli.main(["probe", "x", "--level", "2"]) == 5
    assert cli._parse_fast(["probe", "x", "--level", "3"]) is None and _argparse(["probe", "x", "--level", "3"]) is None
    assert cli._parse_fast(["probe2", "--mode", "b"]) is None
    ns = _argparse(["probe2", "--mode", "b"])
    assert ns.mode == "b" and ns.fn.function() is cli._version
