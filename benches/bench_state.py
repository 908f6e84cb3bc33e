#!/usr/bin/env python3
"""Timings of ``savedir state`` and ``savedir diff`` on multi-GiB real saves.

Run by hand after ``pip install .`` (needs qemu-system-x86_64):

    python3 benches/bench_state.py [--ram-gib 4] [--dir DIR] [--repeat 5] [--keep] [--json]

Per mode, two real saves of a paused ``pc`` VM (never started, full device
set) whose RAM is a file of ``--ram-gib`` GiB of non-zero bytes (a private
``memory-backend-file``, so every page is sent whole); the second VM's file
differs from the first's in three pages near its end. Both saves are
indexed. Modes: ``mapped-ram`` (pages at fixed file offsets: the two files
line up byte for byte up to the changed pages, so ``cmp`` reads almost all
of them before it finds the first difference, a fair baseline) and
``plain`` precopy (QEMU cuts the RAM section into PARTs where time says, so
the files stop lining up early and ``cmp`` stops there, while ``savedir
diff`` compares the RAM records across the cuts, to the changed pages).
Then, with the page cache warm (each file read once first):

* ``state`` of every section in this interpreter (open through the
  directory and ``SaveFile.state()``; and ``state()`` alone on an open
  file), and the ``savedir state --json`` command;
* ``savedir.diff`` in this interpreter, the ``savedir diff`` command, and
  ``cmp`` on the same two files.

``--json`` prints the figures as JSON on stdout (the table goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from bench import GIB, MIB, log, pick_dir, savedir_command  # noqa: E402

import qemu_harness as h  # noqa: E402
import stream_kinds as sk  # noqa: E402

PAGE = 4096


def ram_file(path: Path, size: int) -> None:
    """``size`` bytes of non-zero data (a random MiB, repeated)."""
    block = os.urandom(MIB).replace(b"\0", b"\1")
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(block)


def make_save(tmp: Path, name: str, ram: Path, size: int, mapped_ram: bool) -> Path:
    devices = tuple(h.full_devices(tmp / name)) + (
        "-object", f"memory-backend-file,id=ram0,mem-path={ram},size={size},share=off",
        "-machine", "memory-backend=ram0",
    )
    setup = sk.Setup(machine="pc", args=devices, mem=f"{size // MIB}M", caps={"mapped-ram": mapped_ram},
                     params={"max-bandwidth": 1 << 40})
    p = tmp / f"{name}.sav"
    sk.save(setup, sk.file_uri(p), timeout=900)
    return p


def warm(*paths: Path) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 * MIB):
                pass


def best_of(repeat: int, fn: Callable[[], Any]) -> Dict[str, Any]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"best": min(runs), "runs": runs}


def command(cmd: List[str], repeat: int, ok: Sequence[int] = (0,)) -> Dict[str, Any]:
    def run() -> None:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if p.returncode not in ok:
            raise SystemExit(f"bench: {' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    r = best_of(repeat, run)
    r["cmd"] = cmd
    return r


def run_mode(tmp: Path, size: int, mapped_ram: bool, repeat: int) -> Dict[str, Any]:
    import savedir

    results: Dict[str, Any] = {}
    log(f"bench: writing two RAM files of {size / GIB:.1f} GiB in {tmp}")
    ram1, ram2 = tmp / "ram1.bin", tmp / "ram2.bin"
    ram_file(ram1, size)
    shutil.copyfile(ram1, ram2)
    with open(ram2, "r+b") as f:
        for at in (size - 3 * MIB, size - 2 * MIB, size - MIB + 5 * PAGE):
            f.seek(at)
            f.write(bytes([0xA5]) * PAGE)
    log("bench: saving two VMs" + (" (mapped-ram)" if mapped_ram else ""))
    t0 = time.perf_counter()
    a_sav = make_save(tmp, "a", ram1, size, mapped_ram)
    b_sav = make_save(tmp, "b", ram2, size, mapped_ram)
    results["save_seconds"] = time.perf_counter() - t0
    for p in (ram1, ram2):
        p.unlink()
    for p in (a_sav, b_sav):
        savedir.index(p)
    results["file_bytes"] = [a_sav.stat().st_size, b_sav.stat().st_size]
    warm(a_sav, b_sav)

    def open_and_state() -> None:
        with savedir.open(a_sav) as f:
            f.state()

    with savedir.open(a_sav) as f:
        results["sections"] = len(f.state().sections)
        results["state_open_file"] = best_of(repeat, f.state)
    results["state_in_process"] = best_of(repeat, open_and_state)
    exe = savedir_command()
    results["state_cli"] = command(exe + ["state", "--json", str(a_sav)], repeat)
    results["version_cli"] = command(exe + ["--version"], repeat)
    d = savedir.diff(a_sav, b_sav)
    results["diff_sections"] = [s.name for s in d.sections]
    ram = next(s for s in d.sections if s.name == "ram")
    results["ram_first_difference"] = ram.first_difference
    results["ram_pages_differing"] = ram.pages
    results["diff_in_process"] = best_of(repeat, lambda: savedir.diff(a_sav, b_sav))
    results["diff_cli"] = command(exe + ["diff", str(a_sav), str(b_sav)], repeat, ok=(1,))
    results["cmp"] = command(["cmp", str(a_sav), str(b_sav)], repeat, ok=(1,))
    p = subprocess.run(["cmp", str(a_sav), str(b_sav)], capture_output=True, text=True)
    results["cmp_says"] = p.stdout.strip()
    for x in (a_sav, b_sav):
        x.unlink()
    return results


def table(mode: str, r: Dict[str, Any]) -> List[tuple[str, str]]:
    fd = r["ram_first_difference"] or {}
    return [
        (f"[{mode}] files", f"{r['file_bytes'][0] / GIB:.2f} + {r['file_bytes'][1] / GIB:.2f} GiB, "
                            f"{r['sections']} sections"),
        ("state(), file open", f"{r['state_open_file']['best'] * 1e3:.1f} ms"),
        ("open + state() in process", f"{r['state_in_process']['best'] * 1e3:.1f} ms"),
        ("savedir state --json", f"{r['state_cli']['best'] * 1e3:.1f} ms"
                                 f" (savedir --version: {r['version_cli']['best'] * 1e3:.1f} ms)"),
        ("differing sections", ", ".join(r["diff_sections"])),
        ("ram first differs at", f"file offset {fd.get('offset_a')}"),
        ("ram pages differing", f"{(r['ram_pages_differing'] or {}).get('pages')} in {(r['ram_pages_differing'] or {}).get('ranges')}"),
        ("cmp says", r["cmp_says"]),
        ("savedir.diff in process", f"{r['diff_in_process']['best']:.3f} s"),
        ("savedir diff", f"{r['diff_cli']['best']:.3f} s"),
        ("cmp", f"{r['cmp']['best']:.3f} s"),
        ("cmp / savedir diff", f"{r['cmp']['best'] / r['diff_cli']['best']:.2f}x"),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-gib", type=float, default=4.0, help="guest RAM of each save (default 4)")
    ap.add_argument("--dir", default=None, help="where to write (default: under /tmp or /work)")
    ap.add_argument("--repeat", "-n", type=int, default=5, help="runs per timing, best kept (default 5)")
    ap.add_argument("--modes", default="mapped-ram,plain", help="which saves (default mapped-ram,plain)")
    ap.add_argument("--keep", action="store_true", help="keep the folder (the saves are removed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    a = ap.parse_args(argv)

    size = int(a.ram_gib * GIB) // MIB * MIB
    tmp = pick_dir(a.dir, 4 * size + GIB)
    results: Dict[str, Any] = {"ram_bytes": size}
    try:
        for mode in a.modes.split(","):
            results[mode] = run_mode(tmp, size, mode == "mapped-ram", a.repeat)
    finally:
        if a.keep:
            log(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out = sys.stderr if a.json else sys.stdout
    for mode in a.modes.split(","):
        for k, v in table(mode, results[mode]):
            print(f"{k:<28} {v}", file=out)
    if a.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
