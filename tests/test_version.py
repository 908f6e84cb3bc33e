"""The version is written once, in Cargo.toml, and every place agrees with it:
the installed package's metadata, savedir.__version__ (the native module's
CARGO_PKG_VERSION) and `savedir --version`."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import savedir

ROOT = Path(__file__).resolve().parent.parent


def cargo_version() -> str:
    package = (ROOT / "Cargo.toml").read_text().split("\n[", 1)[0]  # the [package] table comes first
    (version,) = re.findall(r'(?m)^version\s*=\s*"([^"]+)"', package)
    return version


def test_pyproject_takes_the_version_from_cargo() -> None:
    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"(?m)^version\s*=", project), "pyproject.toml writes a version of its own"
    assert re.search(r'(?m)^dynamic\s*=\s*\[[^]]*"version"', project), "pyproject.toml does not take the version from Cargo.toml"


def test_every_version_is_cargos() -> None:
    version = cargo_version()
    assert savedir.__version__ == version
    assert importlib.metadata.version("savedir") == version
    for cmd in ([sys.executable, "-m", "savedir"], [str(Path(sys.executable).parent / "savedir")]):
        p = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == f"savedir {version}", (cmd, p.stdout, p.stderr)
