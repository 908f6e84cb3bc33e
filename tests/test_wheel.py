"""The release wheel and the sdist that scripts/build-wheel.sh makes.

The wheel installs, with no cargo or rustc on PATH, into a fresh venv of each
CPython this machine has (pyenv's 3.9 to 3.13, Debian's /usr/bin/python3) and
runs the README's flow there: index, verify --deep, ls, a section read with
numpy, and the package's doctests.  Its manylinux tag is checked against the
glibc symbol versions that `auditwheel show` reports.  The sdist builds and
installs in a fresh venv.

The wheel and the sdist are $SAVEDIR_WHEEL and $SAVEDIR_SDIST (scripts/test.sh
sets them) or, without them, built here by scripts/build-wheel.sh.  Every venv
shares pip's usual cache, so numpy is downloaded once per CPython version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pc-i440fx.sav"
CARGO_VERSION = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text()).group(1)  # type: ignore[union-attr]
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
MINORS = (9, 10, 11, 12, 13)
INSTALL = 600  # seconds: a venv and `pip install` (numpy may be downloaded)
SDIST_BUILD = 1200  # seconds: a release build with fat LTO from the sdist


def _interpreters() -> List[Tuple[str, Path]]:
    """(id, path): the newest pyenv CPython of each minor version from 3.9
    to 3.13 that exists, and Debian's /usr/bin/python3."""
    found = []
    for minor in MINORS:
        cands = [
            p for p in PYENV.glob(f"3.{minor}.*")
            if re.fullmatch(rf"3\.{minor}\.\d+", p.name) and (p / "bin" / "python3").exists()
        ]
        if cands:
            best = max(cands, key=lambda p: int(p.name.split(".")[2]))
            found.append((f"pyenv-{best.name}", best / "bin" / "python3"))
    if Path("/usr/bin/python3").exists():
        found.append(("usr-bin-python3", Path("/usr/bin/python3")))
    return found


INTERPRETERS = _interpreters()


def _run(cmd: List[str], timeout: float, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def _ok(p: subprocess.CompletedProcess, what: str) -> str:
    assert p.returncode == 0, f"{what}: exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def built() -> Dict[str, Path]:
    """{"wheel": ..., "sdist": ...}: from the environment, or built now."""
    wheel, sdist = os.environ.get("SAVEDIR_WHEEL"), os.environ.get("SAVEDIR_SDIST")
    if not (wheel and sdist):
        out = _ok(_run(["bash", ROOT / "scripts" / "build-wheel.sh"], timeout=SDIST_BUILD), "scripts/build-wheel.sh")
        wheel, sdist = (str(ROOT / line) for line in out.splitlines()[-2:])
    paths = {"wheel": Path(wheel), "sdist": Path(sdist)}
    for kind, p in paths.items():
        assert p.is_file(), f"{kind} {p} does not exist"
    return paths


# --- wheel tags ----------------------------------------------------------------

def wheel_tags(wheel: Path) -> Tuple[str, str, List[str]]:
    """(python tag, abi tag, platform tags) of a wheel's file name."""
    m = re.fullmatch(r"[^-]+-[^-]+(?:-\d[^-]*)?-([^-]+)-([^-]+)-([^-]+)\.whl", wheel.name)
    assert m, f"not a wheel file name: {wheel.name}"
    return m.group(1), m.group(2), m.group(3).split(".")


_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def promised_glibc(platforms: List[str]) -> Tuple[int, int]:
    """The glibc a wheel's platform tags promise to need at most: the oldest
    one they name (each tag is a promise)."""
    found = []
    for plat in platforms:
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", plat)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
        elif plat.split("_")[0] in _LEGACY:
            found.append(_LEGACY[plat.split("_")[0]])
    assert found, f"no manylinux tag among {platforms}"
    return min(found)


def serves(wheel: Path, version: Tuple[int, int]) -> bool:
    """Whether the wheel's python and abi tags let a CPython ``version`` install it."""
    py, abi, _ = wheel_tags(wheel)
    tags = py.split(".")
    if abi == "abi3":
        return any(t.startswith("cp3") and version >= (3, int(t[3:])) for t in tags)
    return f"cp{version[0]}{version[1]}" in tags and abi.startswith(f"cp{version[0]}{version[1]}")


def test_tag_reading() -> None:
    """How the tests below read a wheel's name: what it promises, whom it serves."""
    abi3 = Path("savedir-1.0.0-cp39-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    cp311 = Path("savedir-1.0.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert wheel_tags(abi3) == ("cp39", "abi3", ["manylinux2014_x86_64", "manylinux_2_17_x86_64"])
    assert promised_glibc(wheel_tags(abi3)[2]) == (2, 17)
    assert promised_glibc(["manylinux_2_28_x86_64", "manylinux_2_34_x86_64"]) == (2, 28)
    assert [serves(abi3, (3, m)) for m in (8, 9, 13)] == [False, True, True]
    assert [serves(cp311, (3, m)) for m in (9, 11, 12)] == [False, True, False]
    assert _glibc("2.3.4") > _glibc("2.3") and _glibc("2.34") > _glibc("2.17")


def test_wheel_is_abi3_from_cpython_39(built: Dict[str, Path]) -> None:
    py, abi, plats = wheel_tags(built["wheel"])
    assert (py, abi) == ("cp39", "abi3"), (
        f"{built['wheel'].name} is tagged {py}-{abi}, not cp39-abi3: it serves only CPython "
        f"{py[2]}.{py[3:]}. Build the bindings with PyO3's abi3-py39 feature."
    )


# --- auditwheel ----------------------------------------------------------------

def _auditwheel() -> str:
    exe = ROOT / ".venv-build" / "bin" / "auditwheel"
    found = str(exe) if exe.exists() else shutil.which("auditwheel")
    assert found, "auditwheel not found: scripts/build-wheel.sh installs it into .venv-build/"
    return found


def _glibc(version: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def test_auditwheel_names_the_tag_and_no_newer_glibc(built: Dict[str, Path]) -> None:
    wheel = built["wheel"]
    _, _, plats = wheel_tags(wheel)
    promise = promised_glibc(plats)
    tag = f"manylinux_{promise[0]}_{promise[1]}_x86_64"
    assert tag in plats, f"{wheel.name}: its tags {plats} do not name {tag}"
    exe = _auditwheel()
    text = _ok(_run([exe, "show", wheel], timeout=120), "auditwheel show")
    assert f'is consistent with the following platform tag: "{tag}"' in " ".join(text.split()), text
    report = json.loads(_ok(_run([exe, "show", "--json", wheel], timeout=120), "auditwheel show --json"))
    assert report["external_libs"] == {}, f"the wheel needs libraries outside the manylinux policy: {report['external_libs']}"
    glibc = sorted(
        (_glibc(v[len("GLIBC_"):]), lib, v)
        for lib, versions in report["versioned_symbols"].items()
        for v in versions if v.startswith("GLIBC_")
    )
    assert glibc, f"auditwheel found no glibc symbol versions: {report}"
    newest = glibc[-1]
    assert newest[0] <= promise, (
        f"{wheel.name} promises glibc {promise[0]}.{promise[1]} but {newest[1]} needs {newest[2]}"
    )
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", report["sym_tag"])
    assert m and (int(m.group(1)), int(m.group(2))) <= promise, report["sym_tag"]


# --- the wheel in each CPython ---------------------------------------------------

# Runs in the fresh venv, with vm.sav in its working directory.
FLOW = r'''
import doctest, importlib.metadata, os, shutil, subprocess, sys
import numpy, savedir, savedir.errors

cargo_version, venv = sys.argv[1], sys.argv[2]
assert shutil.which("cargo") is None and shutil.which("rustc") is None, os.environ["PATH"]
assert savedir.__file__.startswith(venv), savedir.__file__
assert shutil.which("savedir") == os.path.join(venv, "bin", "savedir"), shutil.which("savedir")

def run(*args):
    p = subprocess.run(["savedir", *args], capture_output=True, text=True)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout

out = run("--version").strip()
assert out == f"savedir {savedir.__version__}" == f"savedir {cargo_version}", (out, savedir.__version__)
assert importlib.metadata.version("savedir") == cargo_version
assert run("index", "vm.sav").startswith("vm.sav: indexed, ")
assert run("verify", "--deep", "vm.sav").startswith("vm.sav: OK (")
ls = run("ls", "vm.sav")
assert "pc-i440fx-10.0" in ls and " cpu " in ls, ls

with savedir.open("vm.sav") as f:
    assert f.indexed
    cpu = f["cpu"]
    arr = numpy.frombuffer(cpu.payload, dtype=numpy.uint8)
    assert arr.size == len(cpu.payload) > 0
    del arr, cpu

pristine = open("pristine.sav", "rb").read()
finder = doctest.DocTestFinder()
tests = [t for m in (savedir, savedir.errors) for t in finder.find(m) if t.examples]
assert len(tests) >= 7, [t.name for t in tests]
failed = 0
for i, t in enumerate(tests):  # each in a directory of its own, on a fresh copy
    os.mkdir(f"doctest-{i}")
    os.chdir(f"doctest-{i}")
    with open("vm.sav", "wb") as w:
        w.write(pristine)
    t.globs = dict(t.globs)
    failed += doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(t).failed
    os.chdir("..")
assert failed == 0, f"{failed} doctest examples failed"
print(f"OK {sys.version_info[0]}.{sys.version_info[1]} {savedir._core.__file__} numpy {numpy.__version__} doctests {len(tests)}")
'''


def no_rust_path(extra: Path) -> str:
    """PATH with ``extra`` first and no directory holding cargo or rustc."""
    keep = [str(extra)]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and not any(os.path.exists(os.path.join(d, exe)) for exe in ("cargo", "rustc")):
            keep.append(d)
    return os.pathsep.join(keep)


def child_env(venv: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = no_rust_path(venv / "bin")
    env["VIRTUAL_ENV"] = str(venv)
    return env


def make_venv(python: Path, venv: Path) -> None:
    p = _run([python, "-m", "venv", venv], timeout=INSTALL)
    _ok(p, f"{python} -m venv (Debian's python3 needs its python3-venv package)")


def _version(python: Path) -> Tuple[int, int]:
    out = _ok(_run([python, "-c", "import sys; print(*sys.version_info[:2])"], timeout=60), f"{python}")
    major, minor = out.split()
    return int(major), int(minor)


@pytest.mark.parametrize("python", [p for _, p in INTERPRETERS], ids=[i for i, _ in INTERPRETERS])
def test_wheel_runs_readme_flow_without_rust(python: Path, built: Dict[str, Path], tmp_path: Path) -> None:
    wheel = built["wheel"]
    version = _version(python)
    py, abi, _ = wheel_tags(wheel)
    assert serves(wheel, version), (
        f"{wheel.name} (tagged {py}-{abi}) does not install into CPython {version[0]}.{version[1]} "
        f"({python}); one wheel for CPython 3.9 to 3.13 needs PyO3's abi3-py39 feature (tag cp39-abi3)"
    )
    venv = tmp_path / "venv"
    make_venv(python, venv)
    env = child_env(venv)
    vpy = venv / "bin" / "python"
    _ok(
        _run([vpy, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", wheel, "numpy"],
             timeout=INSTALL, env=env),
        f"pip install {wheel.name} numpy into a venv of {python}",
    )
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(EXAMPLE, work / "vm.sav")
    shutil.copyfile(EXAMPLE, work / "pristine.sav")
    out = _ok(_run([vpy, "-c", FLOW, CARGO_VERSION, venv], timeout=300, cwd=work, env=env), f"README flow in {python}")
    assert out.startswith(f"OK {version[0]}.{version[1]} "), out


def test_interpreters_cover_39_to_313() -> None:
    """The machine has what the test above needs: pyenv's 3.9 to 3.13 (a
    missing one would make the wheel untested there, not pass)."""
    names = {i for i, _ in INTERPRETERS}
    for minor in MINORS:
        assert any(n.startswith(f"pyenv-3.{minor}.") for n in names), (minor, sorted(names))


# --- the sdist -----------------------------------------------------------------

def test_sdist_builds_and_installs(built: Dict[str, Path], tmp_path: Path) -> None:
    sdist = built["sdist"]
    assert sdist.name == f"savedir-{CARGO_VERSION}.tar.gz", sdist.name
    assert shutil.which("cargo"), "building the sdist needs cargo on PATH"
    venv = tmp_path / "venv"
    make_venv(Path(sys.executable), venv)
    vpy = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _ok(_run([vpy, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", sdist],
             timeout=SDIST_BUILD, env=env), f"pip install {sdist.name}")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(EXAMPLE, work / "vm.sav")
    savedir_exe = venv / "bin" / "savedir"
    assert _ok(_run([savedir_exe, "--version"], timeout=60), "savedir --version").strip() == f"savedir {CARGO_VERSION}"
    _ok(_run([savedir_exe, "index", "vm.sav"], timeout=60, cwd=work), "savedir index")
    assert "OK" in _ok(_run([savedir_exe, "verify", "--deep", "vm.sav"], timeout=60, cwd=work), "savedir verify --deep")
