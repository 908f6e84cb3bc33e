#!/usr/bin/env python3
"""Batches, memory, page cache and start-up of the ``savedir`` command.

Run by hand after ``pip install .``:

    python3 benches/batch.py [--dir DIR] [--repeat 5] [--only NAME,...] [--keep] [--json]

Each figure is the median of ``--repeat`` wall-clock runs (the machine may
be shared: medians, not best runs), beside its CPU time:

* ``jobs``: ``savedir index --force`` and ``verify --deep`` of 8 files of
  512 MiB, page cache warm, ``--jobs 2`` against ``--jobs 1`` (goal: 1.8 x);
* ``small``: 1,000 copies of a real save (examples/pc-i440fx.sav): one
  ``savedir index --jobs 2 DIR`` against a shell loop of ``savedir index
  FILE`` (goal: 20 x); the directories are stripped, untimed, before each;
* ``rss``: peak RSS (``/usr/bin/time -v``, file-backed pages included) of
  ``index`` and ``verify --deep`` of an 8 GiB stream (goal: 128 MiB);
* ``cat``: ``index`` and ``verify --deep`` of that stream against ``cat FILE
  > /dev/null``, warm and cold (the file alone taken out of the page cache
  with ``posix_fadvise(DONTNEED)``; nothing else is dropped), and what is
  left of it in the page cache after a cold run (goal: not slower than cat);
* ``startup``: ``savedir verify FILE`` on a small indexed save, whole
  process, against ``python -c pass`` (goal: 30 ms).

Everything written is removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import synthetic  # noqa: E402
from bench import GIB, MIB, children_cpu, log, peak_memory, pick_dir, savedir_command  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "pc-i440fx.sav"


def timed(cmd: Sequence[str], repeat: int, before: Optional[Callable[[], None]] = None, shell: bool = False) -> Dict[str, Any]:
    """Median of ``repeat`` wall-clock runs of ``cmd`` (stdout to /dev/null),
    with the CPU time of each; ``before`` runs, untimed, ahead of each."""
    walls, cpus = [], []
    for _ in range(repeat):
        if before is not None:
            before()
        c0 = children_cpu()
        t0 = time.perf_counter()
        p = subprocess.run(cmd if not shell else ["sh", "-c", cmd[0]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - t0)
        cpus.append(children_cpu() - c0)
        if p.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
    return {"median": statistics.median(walls), "min": min(walls), "cpu": statistics.median(cpus), "runs": walls}


def uncache(*paths: Path) -> None:
    """Takes these files, and only them, out of the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cache(*paths: Path) -> None:
    for p in paths:
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)


def cached_pages(p: Path) -> Optional[int]:
    fincore = shutil.which("fincore")
    if not fincore:
        return None
    out = subprocess.run([fincore, "-b", "-n", "-o", "PAGES", str(p)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.strip() else None


def bench_jobs(sd: List[str], work: Path, n: int) -> Dict[str, Any]:
    files = []
    for i in range(8):
        p = work / f"jobs{i}.sav"
        synthetic.write_stream(p, synthetic.ram_bytes_for_file_size(512 * MIB), pages_per_part=8192, seed=i)
        files.append(p)
    os.sync()
    names = [str(p) for p in files]
    subprocess.run([*sd, "index", "-q", *names], check=True)
    cache(*files)
    r: Dict[str, Any] = {"files": 8, "bytes": sum(p.stat().st_size for p in files)}
    for op, args in (("index", ["index", "-q", "--force"]), ("verify_deep", ["verify", "-q", "--deep"])):
        for jobs in (1, 2):
            r[f"{op}_j{jobs}"] = timed([*sd, *args, "--jobs", str(jobs), *names], n)
        r[f"{op}_speedup"] = r[f"{op}_j1"]["median"] / r[f"{op}_j2"]["median"]
    r["cat_all"] = timed(["cat", *names], n)
    for p in files:
        p.unlink()
    return r


def bench_small(sd: List[str], work: Path, n: int) -> Dict[str, Any]:
    d = work / "small"
    d.mkdir()
    for i in range(1000):
        shutil.copyfile(EXAMPLE, d / f"vm{i:04}.sav")
    strip = lambda: subprocess.run([*sd, "strip", "-q", *map(str, sorted(d.iterdir()))], check=True)  # noqa: E731
    loop = f"for f in {d}/*.sav; do {' '.join(sd)} index -q \"$f\" || exit 1; done"
    r: Dict[str, Any] = {"files": 1000, "bytes_each": EXAMPLE.stat().st_size}
    r["batch_j2"] = timed([*sd, "index", "-q", "--jobs", "2", str(d)], n, before=strip)
    r["loop"] = timed([loop], max(1, min(n, 3)), before=strip, shell=True)
    r["speedup"] = r["loop"]["median"] / r["batch_j2"]["median"]
    shutil.rmtree(d)
    return r


def bench_big(sd: List[str], work: Path, n: int, size_gib: float) -> Dict[str, Any]:
    big = work / "big.sav"
    info = synthetic.write_stream(big, synthetic.ram_bytes_for_file_size(int(size_gib * GIB)), pages_per_part=32768)
    os.sync()
    r: Dict[str, Any] = {"bytes": info["file_size"]}
    strip = lambda: subprocess.run([*sd, "strip", "-q", str(big)], check=True)  # noqa: E731
    log("bench: peak RSS")
    r["rss_index"] = peak_memory([*sd, "index", "-q", str(big)], before=strip)
    r["rss_verify_deep"] = peak_memory([*sd, "verify", "-q", "--deep", str(big)])
    log("bench: warm, against cat")
    cache(big)
    r["warm_cat"] = timed(["cat", str(big)], n)
    r["warm_index"] = timed([*sd, "index", "-q", "--force", str(big)], n)
    r["warm_verify_deep"] = timed([*sd, "verify", "-q", "--deep", str(big)], n)
    r["warm_left_cached"] = cached_pages(big)
    log("bench: cold, against cat")
    r["cold_cat"] = timed(["cat", str(big)], n, before=lambda: uncache(big))
    r["cold_index"] = timed([*sd, "index", "-q", "--force", str(big)], n, before=lambda: uncache(big))
    r["cold_left_cached"] = cached_pages(big)
    r["cold_verify_deep"] = timed([*sd, "verify", "-q", "--deep", str(big)], n, before=lambda: uncache(big))
    r["cold_verify_left_cached"] = cached_pages(big)
    r["pages"] = -(-big.stat().st_size // os.sysconf("SC_PAGE_SIZE"))
    big.unlink()
    return r


def bench_startup(sd: List[str], work: Path, n: int) -> Dict[str, Any]:
    p = work / "vm.sav"
    shutil.copyfile(EXAMPLE, p)
    subprocess.run([*sd, "index", "-q", str(p)], check=True)
    runs = max(n * 10, 50)
    r: Dict[str, Any] = {"runs": runs}
    r["python_pass"] = timed([sys.executable, "-c", "pass"], runs)
    r["verify"] = timed([*sd, "verify", str(p)], runs)
    r["verify_json"] = timed([*sd, "verify", "--json", str(p)], runs)
    r["version"] = timed([*sd, "--version"], runs)
    return r


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: /tmp or /work, whichever has more room)")
    ap.add_argument("--repeat", "-n", type=int, default=5, help="runs per timing, median kept (default 5)")
    ap.add_argument("--size-gib", type=float, default=8.0, help="size of the big stream (default 8)")
    ap.add_argument("--only", default="startup,small,jobs,big", help="which benches (default: all)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args(argv)
    sd = savedir_command()
    only = set(a.only.split(","))
    work = pick_dir(a.dir, int(a.size_gib * GIB) + 5 * GIB)
    res: Dict[str, Any] = {"savedir": sd, "repeat": a.repeat, "cpus": os.cpu_count(), "load": os.getloadavg()}
    try:
        if "startup" in only:
            log("bench: start-up")
            res["startup"] = bench_startup(sd, work, a.repeat)
        if "small" in only:
            log("bench: 1,000 small saves")
            res["small"] = bench_small(sd, work, a.repeat)
        if "jobs" in only:
            log("bench: 8 files of 512 MiB, --jobs 1 and 2")
            res["jobs"] = bench_jobs(sd, work, a.repeat)
        if "big" in only:
            log(f"bench: a {a.size_gib:g} GiB stream")
            res["big"] = bench_big(sd, work, a.repeat, a.size_gib)
        res["load_after"] = os.getloadavg()
    finally:
        if a.keep:
            log(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(res, indent=2))
    report(res)
    return 0


def ms(r: Dict[str, Any]) -> str:
    return f"{r['median'] * 1e3:7.1f} ms (min {r['min'] * 1e3:.1f}, cpu {r['cpu'] * 1e3:.1f})"


def s(r: Dict[str, Any]) -> str:
    return f"{r['median']:7.3f} s (min {r['min']:.3f}, cpu {r['cpu']:.2f})"


def report(res: Dict[str, Any]) -> None:
    out = lambda *x: print(*x, file=sys.stderr)  # noqa: E731
    out(f"savedir batch bench: medians of {res['repeat']} runs, {res['cpus']} CPUs, load {res['load'][0]:.1f} "
        f"before, {res.get('load_after', (0,))[0]:.1f} after")
    if "startup" in res:
        r = res["startup"]
        out(f"start-up ({r['runs']} runs): python -c pass {ms(r['python_pass'])}; savedir verify FILE {ms(r['verify'])}; "
            f"--json {ms(r['verify_json'])}; --version {ms(r['version'])}")
    if "small" in res:
        r = res["small"]
        out(f"1,000 small saves: index --jobs 2 DIR {s(r['batch_j2'])}; shell loop {s(r['loop'])}; "
            f"{r['speedup']:.1f} x (goal 20 x)")
    if "jobs" in res:
        r = res["jobs"]
        gib = r["bytes"] / GIB
        for op in ("index", "verify_deep"):
            out(f"8 x 512 MiB warm, {op}: --jobs 1 {s(r[op + '_j1'])}, --jobs 2 {s(r[op + '_j2'])}: "
                f"{r[op + '_speedup']:.2f} x (goal 1.8 x); {gib / r[op + '_j2']['median']:.2f} GiB/s")
        out(f"  cat of the 8 files: {s(r['cat_all'])}")
    if "big" in res:
        r = res["big"]
        gib = r["bytes"] / GIB
        for k in ("rss_index", "rss_verify_deep"):
            m = r[k]
            out(f"{gib:.1f} GiB {k[4:]}: peak RSS {m.get('max_rss_kib', 0) / 1024:.0f} MiB ({m.get('source')}); sampled "
                f"anon {m['sampled_rssanon_kib'] / 1024:.0f} MiB, file {m['sampled_rssfile_kib'] / 1024:.0f} MiB (goal 128 MiB)")
        for temp in ("warm", "cold"):
            cat = r[f"{temp}_cat"]["median"]
            out(f"{temp}: cat {s(r[temp + '_cat'])}; index {s(r[temp + '_index'])} = {r[temp + '_index']['median'] / cat:.2f} x cat; "
                f"verify --deep {s(r[temp + '_verify_deep'])} = {r[temp + '_verify_deep']['median'] / cat:.2f} x cat")
        out(f"pages of the file cached: after warm runs {r['warm_left_cached']} of {r['pages']}; after a cold index "
            f"{r['cold_left_cached']}, after a cold verify --deep {r['cold_verify_left_cached']}")


if __name__ == "__main__":
    sys.exit(main())
