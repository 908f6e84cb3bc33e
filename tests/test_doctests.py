"""The examples in savedir's docstrings run, each on a fresh copy of a real save."""

from __future__ import annotations

import doctest
import os
import shutil
from pathlib import Path

import pytest

import savedir
import savedir.catalog
import savedir.errors
import savedir.ram

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = []
    for mod in (savedir, savedir.errors, savedir.ram, savedir.catalog):
        tests += [t for t in finder.find(mod) if t.examples]
    return tests


DOCTESTS = _doctests()


def test_docstrings_have_examples() -> None:
    names = {t.name.split(".")[-1] for t in DOCTESTS}
    assert {"savedir", "index", "verify", "strip", "open", "Section", "vmdesc", "ram", "Ram", "RamBlock"} <= names, names
    assert {"index_many", "verify_many", "open_many", "catalog"} <= names, names


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example(test: doctest.DocTest, tmp_path: Path) -> None:
    shutil.copyfile(EXAMPLE, tmp_path / "vm.sav")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        test.globs = dict(test.globs)
        result = runner.run(test, out=lambda s: print(s, end=""))
    finally:
        os.chdir(cwd)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {test.name}"


API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_md_examples(tmp_path: Path) -> None:
    """The ``>>>`` examples of docs/api.md run, on a fresh copy of a real save."""
    # A fence ends an example's expected output, as a blank line does.
    text = "\n".join("" if line.startswith("```") else line for line in API_MD.read_text().splitlines())
    test = doctest.DocTestParser().get_doctest(text, {"savedir": savedir}, "api.md", str(API_MD), 0)
    assert len(test.examples) >= 5
    shutil.copyfile(EXAMPLE, tmp_path / "vm.sav")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test, out=lambda s: print(s, end=""))
    finally:
        os.chdir(cwd)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in docs/api.md"
