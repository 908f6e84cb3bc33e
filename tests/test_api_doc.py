"""The Python examples in docs/api.md run, in order, in a folder that holds
``vm.sav``, ``saves/vm.sav`` and ``saves/old/vm.sav`` (copies of
examples/pc-i440fx.sav, a real QEMU save) and ``saves/notes.txt``, which is
not a save. (Its ``>>>`` examples are doctests: tests/test_doctests.py.)"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pc-i440fx.sav"


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    return [b for b in blocks if not b.lstrip().startswith(">>>")]


def test_the_examples_of_docs_api_md_run(tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) >= 3
    (tmp_path / "saves" / "old").mkdir(parents=True)
    shutil.copyfile(EXAMPLE, tmp_path / "vm.sav")
    shutil.copyfile(EXAMPLE, tmp_path / "saves" / "vm.sav")
    shutil.copyfile(EXAMPLE, tmp_path / "saves" / "old" / "vm.sav")
    (tmp_path / "saves" / "notes.txt").write_text("not a save\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    out = io.StringIO()
    try:
        ns: dict[str, object] = {}
        with contextlib.redirect_stdout(out):
            for code in blocks:
                exec(compile(code, "docs/api.md", "exec"), ns)  # noqa: S102 (the project's own docs)
    finally:
        os.chdir(cwd)
    text = out.getvalue()
    assert "saves/notes.txt: " in text and "saves/vm.sav pc-i440fx-10.0" in text, text
    assert "Summary(files=3, failed=1, rows=72, status=1)" in text, text
