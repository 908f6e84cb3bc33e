"""``savedir catalog``: one row per item of each save, as Parquet or JSON
Lines, checked against ``savedir ls --json`` and queried with DuckDB.

Real QEMU saves (tests/conftest.py), some indexed, some not, in a folder
tree with a file that is not a save.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import duckdb
import pyarrow.parquet as pq
import pytest

import savedir
import savedir.catalog
from conftest import RealStream

pytestmark = pytest.mark.qemu

SAVEDIR = [sys.executable, "-m", "savedir"]
ENTRY_KEYS = ("kind", "section_id", "name", "instance_id", "version_id", "command_name", "offset", "size", "crc32c")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SAVEDIR, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def fleet(qemu_streams: List[RealStream], tmp_path: Path) -> Tuple[Path, List[Path]]:
    root = tmp_path / "fleet"
    paths = []
    for i, s in enumerate(qemu_streams):
        p = s.copy_to(root / ("a" if i % 2 else "b"), f"{s.name}.sav")
        if i % 3 != 2:
            savedir.index(p)
        paths.append(p)
    (root / "a" / "readme.txt").write_text("not a save\n")
    return root, paths


def _ls(paths: List[Path]) -> Dict[str, Dict[str, Any]]:
    r = _run("ls", "--json", *map(str, paths))
    assert r.returncode == 0, r.stderr
    return {o["path"]: o for o in json.loads(r.stdout)}


def _expected_rows(ls: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for path, o in ls.items():
        for e in o["entries"]:
            row = {"path": path, "file_size": Path(path).stat().st_size, "machine_type": o["machine_type"],
                   "indexed": o["indexed"]}
            row.update({k: e.get(k) for k in ENTRY_KEYS})
            rows.append(row)
    return rows


def _key(r: Dict[str, Any]) -> Tuple[str, int]:
    return (r["path"], r["offset"])


def test_catalog_rows_equal_ls_json(fleet: Tuple[Path, List[Path]], tmp_path: Path) -> None:
    root, paths = fleet
    want = sorted(_expected_rows(_ls(paths)), key=_key)
    out = tmp_path / "fleet.parquet"
    r = _run("catalog", "-r", "-o", str(out), str(root))
    # The text file gives no rows and the worst status.
    assert r.returncode == 1, r.stderr
    assert "readme.txt" in r.stderr and f"{out}: {len(want)} rows from {len(paths) + 1} files" in r.stdout
    table = pq.read_table(out)
    assert table.column_names == [name for name, _ in savedir.catalog.COLUMNS]
    got = sorted(table.to_pylist(), key=_key)
    assert got == want
    # JSON Lines: the same rows, without pyarrow.
    jl = tmp_path / "fleet.jsonl"
    r = _run("catalog", "--recursive", "--jobs", "1", "-q", "-o", str(jl), str(root))
    assert r.returncode == 1 and r.stdout == ""
    got = sorted((json.loads(line) for line in jl.read_text().splitlines()), key=_key)
    assert got == want
    # Files in the order given, their rows in file order.
    listed = list(savedir.catalog.rows(paths))
    assert [r["path"] for r in listed] == [r["path"] for r in sorted(listed, key=lambda r: paths.index(Path(r["path"])))]
    assert sorted(listed, key=_key) == want


def test_duckdb_queries_over_a_catalog(fleet: Tuple[Path, List[Path]], tmp_path: Path) -> None:
    root, paths = fleet
    ls = _ls(paths)
    out = tmp_path / "fleet.parquet"
    assert _run("catalog", "-r", "-q", "-o", str(out), str(root)).returncode == 1
    db = duckdb.connect()
    table = f"read_parquet('{out}')"

    # Which saves hold device X at version Y?
    holders: Dict[Tuple[str, int], Set[str]] = defaultdict(set)
    for path, o in ls.items():
        for e in o["entries"]:
            if e["kind"] == "full":
                holders[(e["name"], e["version_id"])].add(path)
    # Devices that some saves hold and others do not, or at other versions.
    asked = [k for k, v in holders.items() if len(v) < len(paths)] or list(holders)
    assert asked
    for name, version in asked:
        rows = db.execute(
            f"SELECT DISTINCT path FROM {table} WHERE kind = 'full' AND name = ? AND version_id = ? ORDER BY path",
            [name, version],
        ).fetchall()
        assert {p for (p,) in rows} == holders[(name, version)], (name, version)

    # RAM bytes per machine type: the ram section's items, headers included.
    ram: Dict[str, int] = defaultdict(int)
    for o in ls.values():
        for e in o["entries"]:
            if e.get("name") == "ram":
                ram[o["machine_type"]] += e["size"]
    rows = db.execute(
        f"SELECT machine_type, sum(size) FROM {table} WHERE name = 'ram' GROUP BY machine_type ORDER BY machine_type"
    ).fetchall()
    assert {m: int(n) for m, n in rows} == dict(ram)
    assert len(ram) >= 2, "pc and q35 machine types"

    # Saves per machine type that are indexed, and the largest device section.
    rows = db.execute(f"SELECT count(DISTINCT path) FROM {table} WHERE indexed").fetchall()
    assert rows[0][0] == sum(1 for o in ls.values() if o["indexed"])
    big = db.execute(f"SELECT name, max(size) FROM {table} WHERE kind = 'full' GROUP BY name ORDER BY 2 DESC LIMIT 1").fetchone()
    assert big is not None
    assert big[1] == max(e["size"] for o in ls.values() for e in o["entries"] if e["kind"] == "full")


def test_catalog_errors(fleet: Tuple[Path, List[Path]], tmp_path: Path) -> None:
    _, paths = fleet
    r = _run("catalog", "-o", str(tmp_path / "fleet.csv"), str(paths[0]))
    assert r.returncode == 2 and "FILE.parquet or FILE.jsonl" in r.stderr
    assert not (tmp_path / "fleet.csv").exists()
    # Without pyarrow, Parquet is refused with what to install; JSON Lines works.
    code = (
        "import sys\n"
        "sys.modules['pyarrow'] = None\n"
        "from savedir.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, "catalog", "-o", str(tmp_path / "x.parquet"), str(paths[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install 'savedir[catalog]'" in r.stderr, r.stderr
    assert not list(tmp_path.glob("x.parquet*")), "nothing is left behind"
    r = subprocess.run([sys.executable, "-c", code, "catalog", "-o", str(tmp_path / "x.jsonl"), str(paths[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # A catalog written into a folder it catalogs is not one of its files.
    inside = paths[0].parent / "fleet.jsonl"
    for _ in range(2):
        r = _run("catalog", "-o", str(inside), str(paths[0].parent))
        assert r.returncode == 0, r.stderr
        assert "fleet.jsonl" not in r.stderr and {json.loads(line)["path"] for line in inside.read_text().splitlines()} \
            == {str(p) for p in paths[0].parent.iterdir() if p.suffix == ".sav"}
    # Missing files: no rows, exit 2.
    r = _run("catalog", "-o", str(tmp_path / "y.jsonl"), str(paths[0]), str(tmp_path / "missing.sav"))
    assert r.returncode == 2 and "missing.sav: cannot open" in r.stderr
    assert {json.loads(line)["path"] for line in (tmp_path / "y.jsonl").read_text().splitlines()} == {str(paths[0])}
