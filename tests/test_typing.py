"""The typing stubs match the native module, and the package type-checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    # From a folder outside the repository, so the installed package is checked.
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd="/", timeout=300)


def test_stub_matches_native_module() -> None:
    p = run("mypy.stubtest", "savedir._core")
    assert p.returncode == 0, p.stdout + p.stderr


def test_package_type_checks_strictly(tmp_path: Path) -> None:
    p = run("mypy", "--strict", "--cache-dir", str(tmp_path), "-p", "savedir")
    assert p.returncode == 0, p.stdout + p.stderr


def test_py_typed_is_installed() -> None:
    import savedir

    assert (Path(savedir.__file__).parent / "py.typed").exists()
    assert (Path(savedir.__file__).parent / "_core.pyi").exists()
