#!/usr/bin/env python3
"""Whole-command timings of the ``savedir`` CLI on synthetic streams.

Run by hand after ``pip install .``:

    python3 benches/bench.py [--size-gib 4] [--dir DIR] [--repeat 3] [--keep] [--json]

Writes a synthetic QEMU stream of about ``--size-gib`` GiB and a 64 MiB one
(tests/synthetic.py) into a fresh folder under DIR, then times, best of N
wall-clock runs each, with the page cache warm (every file read once first):

* ``cat FILE > /dev/null`` -- the baseline: reading the file once;
* ``savedir index FILE`` (the directory removed with ``savedir strip``,
  untimed, before each run) and its ratio to cat, plus its peak RSS;
* ``savedir verify --deep`` and its ratio to cat;
* ``savedir verify`` on the 64 MiB and on the big indexed file: it reads
  only the tail and the directory, so the two must cost the same;
* ``savedir ls`` on the indexed big file;
* ``savedir --version``: the Python start-up every command above pays.

Where the page cache can be dropped (root: ``/proc/sys/vm/drop_caches``),
the file-reading commands are timed cold as well, and ``verify --deep`` once
more warm, right after its cold runs: how the cache was filled (``cat``'s
reads or savedir's own faults through its mapping) changes the warm cost. Everything is removed
afterwards unless ``--keep``. ``--json`` prints the results as JSON on stdout
and the table on stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import synthetic  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
DROP_CACHES = "/proc/sys/vm/drop_caches"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def savedir_command() -> List[str]:
    """The installed ``savedir`` script. The one beside this interpreter is
    preferred: a pyenv shim on PATH would add ~60 ms of bash to every run."""
    beside = Path(sys.executable).parent / "savedir"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("savedir")
    if found:
        return [found]
    return [sys.executable, "-m", "savedir"]


def pick_dir(requested: Optional[str], need: int) -> Path:
    if requested:
        base = Path(requested)
        base.mkdir(parents=True, exist_ok=True)
    else:
        candidates = [Path(p) for p in ("/tmp", "/work") if Path(p).is_dir()]
        base = max(candidates, key=lambda p: shutil.disk_usage(p).free)
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(f"bench: {base} has {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed")
    return Path(tempfile.mkdtemp(prefix="savedir-bench-", dir=base))


def can_drop_caches() -> bool:
    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: Sequence[str], repeat: int, before: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Best of ``repeat`` wall-clock runs of ``cmd`` (stdout to /dev/null);
    ``before`` runs, untimed, ahead of each."""
    runs = []
    for _ in range(repeat):
        if before is not None:
            before()
        c0 = children_cpu()
        t0 = time.perf_counter()
        p = subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t0
        cpu = children_cpu() - c0
        if p.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
        runs.append({"wall": wall, "cpu": cpu})
    best = min(runs, key=lambda r: r["wall"])
    return {
        "cmd": list(cmd),
        "best": best["wall"],
        "cpu_of_best": best["cpu"],
        "median": statistics.median(r["wall"] for r in runs),
        "runs": [r["wall"] for r in runs],
    }


def peak_memory(cmd: Sequence[str], before: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Peak RSS of one run of ``cmd``: ``/usr/bin/time -v``'s maximum RSS
    (which counts the file pages a mapping has touched), and the peaks of
    anonymous and file-backed RSS sampled from /proc every 2 ms."""
    out: Dict[str, Any] = {}
    gnu_time = Path("/usr/bin/time")
    if before is not None:
        before()
    if gnu_time.exists():
        with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
            p = subprocess.run([str(gnu_time), "-v", "-o", tf.name, *cmd],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if p.returncode == 0:
                for line in Path(tf.name).read_text().splitlines():
                    if "Maximum resident set size" in line:
                        out["max_rss_kib"] = int(line.rsplit(":", 1)[1])
                        out["source"] = "/usr/bin/time -v"
    else:
        before_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        now = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out["max_rss_kib"] = now if now > before_max else None  # only known if it set a new maximum
        out["source"] = "getrusage(RUSAGE_CHILDREN)"

    # a second run, sampled: which part of the RSS is the mapped file
    if before is not None:
        before()
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key = line.split(":", 1)[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.002)
    out.update({f"sampled_{k.lower()}_kib": v for k, v in peaks.items()})
    return out


def in_process_verify(path: Path, repeat: int) -> Optional[float]:
    """Best time of ``savedir.verify(path)`` in this interpreter (no start-up)."""
    try:
        import savedir
    except ImportError:
        return None
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = savedir.verify(path)
        best = min(best, time.perf_counter() - t0)
        if not r.ok:
            raise SystemExit(f"bench: verify {path}: {r.message}")
    return best


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="size of the big stream (default 4)")
    ap.add_argument("--dir", default=None,
                    help="where to write (default: a new folder under /tmp or /work, whichever has more room)")
    ap.add_argument("--repeat", "-n", type=int, default=3, help="runs per timing, best kept (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the streams")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table goes to stderr)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache timings")
    ap.add_argument("--zero-fraction", type=float, default=0.1)
    ap.add_argument("--pages-per-part", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    sd = savedir_command()
    n = a.repeat
    big_size = int(a.size_gib * GIB)
    work = pick_dir(a.dir, big_size + 256 * MIB)
    big, small = work / "big.sav", work / "small.sav"
    try:
        import savedir
        module = f"{savedir.__version__} from {Path(savedir.__file__).parent}"
    except ImportError:
        module = "(not importable here)"
    res: Dict[str, Any] = {
        "savedir": sd, "savedir_module": module, "dir": str(work), "repeat": n, "cpus": os.cpu_count(),
        "zero_fraction": a.zero_fraction, "pages_per_part": a.pages_per_part,
    }
    try:
        log(f"bench: writing {a.size_gib:g} GiB and 64 MiB synthetic streams into {work}")
        gen_big = synthetic.write_stream(big, synthetic.ram_bytes_for_file_size(big_size, a.zero_fraction),
                                         pages_per_part=a.pages_per_part, zero_fraction=a.zero_fraction, seed=a.seed)
        gen_small = synthetic.write_stream(small, synthetic.ram_bytes_for_file_size(64 * MIB, a.zero_fraction),
                                           pages_per_part=a.pages_per_part, zero_fraction=a.zero_fraction, seed=a.seed)
        t0 = time.perf_counter()
        os.sync()  # index fsyncs: leave no dirty page of the generator for it to wait on
        sync_s = time.perf_counter() - t0
        gen_null = synthetic.write_stream(os.devnull, synthetic.ram_bytes_for_file_size(big_size, a.zero_fraction),
                                          pages_per_part=a.pages_per_part, zero_fraction=a.zero_fraction, seed=a.seed)
        res["generator"] = {
            "big_bytes": gen_big["file_size"], "big_seconds": gen_big["seconds"], "big_gib_per_s": gen_big["gib_per_s"],
            "sync_after_seconds": sync_s,
            "to_devnull_seconds": gen_null["seconds"], "to_devnull_gib_per_s": gen_null["gib_per_s"],
            "parts": gen_big["part_sections"], "small_bytes": gen_small["file_size"],
        }
        log(f"bench: generator {gen_big['gib_per_s']:.2f} GiB/s to the file ({gen_big['seconds']:.1f} s, then "
            f"sync {sync_s:.1f} s), {gen_null['gib_per_s']:.2f} GiB/s to /dev/null")

        size_big = gen_big["file_size"]
        strip_big = lambda: subprocess.run([*sd, "strip", "-q", str(big)], check=True)  # noqa: E731

        def cold(prep: Optional[Callable[[], None]] = None) -> Callable[[], None]:
            def f() -> None:
                if prep is not None:
                    prep()
                drop_caches()
            return f

        # warm the cache: read each file once
        for p in (big, small):
            subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)

        t: Dict[str, Any] = {}
        log("bench: warm runs")
        t["startup"] = timed([*sd, "--version"], max(n, 5))
        t["cat"] = timed(["cat", str(big)], n)
        t["index"] = timed([*sd, "index", "-q", str(big)], n, before=strip_big)
        t["index_small"] = timed([*sd, "index", "-q", str(small)], n,
                                 before=lambda: subprocess.run([*sd, "strip", "-q", str(small)], check=True))
        t["verify_deep"] = timed([*sd, "verify", "--deep", str(big)], n)
        # Recording through a pipe, against the same pipe into cat, with and
        # without flushing the output to disk (record flushes it).
        out_file = work / "out.sav"
        sh = lambda c: ["sh", "-c", c]  # noqa: E731
        q = shlex.quote
        rm_out = lambda: out_file.unlink(missing_ok=True)  # noqa: E731
        t["pipe_cat"] = timed(sh(f"cat {q(str(big))} | cat > {q(str(out_file))}"), n, before=rm_out)
        t["pipe_cat_sync"] = timed(sh(f"cat {q(str(big))} | cat > {q(str(out_file))} && sync -d {q(str(out_file))}"), n, before=rm_out)
        t["record"] = timed(sh(f"cat {q(str(big))} | {shlex.join(sd)} record -q {q(str(out_file))}"), n, before=rm_out)
        rm_out()
        t["verify_small"] = timed([*sd, "verify", str(small)], max(n, 5))
        t["verify_big"] = timed([*sd, "verify", str(big)], max(n, 5))
        t["ls"] = timed([*sd, "ls", str(big)], max(n, 5))
        t["ls_json"] = timed([*sd, "ls", "--json", str(big)], max(n, 5))
        res["warm"] = t
        res["in_process_verify"] = {
            "small": in_process_verify(small, 20),
            "big": in_process_verify(big, 20),
        }
        log("bench: peak memory of index")
        res["index_memory"] = peak_memory([*sd, "index", "-q", str(big)], before=strip_big)

        if not a.no_cold and can_drop_caches():
            log("bench: cold runs (page cache dropped before each)")
            c: Dict[str, Any] = {}
            c["cat"] = timed(["cat", str(big)], n, before=cold())
            c["index"] = timed([*sd, "index", "-q", str(big)], n, before=cold(strip_big))
            c["verify_deep"] = timed([*sd, "verify", "--deep", str(big)], n, before=cold())
            # warm again, but with the page cache as savedir's own cold read
            # filled it (the warm runs above follow a `cat`)
            c["verify_deep_rewarm"] = timed([*sd, "verify", "--deep", str(big)], n)
            c["verify_small"] = timed([*sd, "verify", str(small)], n, before=cold())
            c["verify_big"] = timed([*sd, "verify", str(big)], n, before=cold())
            c["ls"] = timed([*sd, "ls", str(big)], n, before=cold())
            res["cold"] = c
        else:
            res["cold"] = None
        res["sizes"] = {"big": size_big, "big_indexed": big.stat().st_size, "small": small.stat().st_size}
    finally:
        if a.keep:
            log(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if a.json:
        print_table(res, file=sys.stderr)
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


def print_table(res: Dict[str, Any], file: Any = None) -> None:
    out = functools.partial(print, file=file or sys.stdout)
    size = res["sizes"]["big"]
    g = res["generator"]
    w, c = res["warm"], res["cold"]
    out(f"savedir bench: {size / GIB:.2f} GiB stream ({g['parts']} RAM PARTs), 64 MiB stream; "
        f"best of {res['repeat']}, {res['cpus']} CPUs; dir {res['dir']}")
    out(f"savedir {res['savedir_module']}, command {' '.join(res['savedir'])}")
    out(f"generator: {g['big_gib_per_s']:.2f} GiB/s into the file ({g['big_seconds']:.2f} s, sync afterwards "
        f"{g['sync_after_seconds']:.2f} s); {g['to_devnull_gib_per_s']:.2f} GiB/s to /dev/null")
    out()
    rows = [
        ("savedir --version (start-up)", "startup", None),
        ("cat BIG > /dev/null", "cat", size),
        ("savedir index BIG", "index", size),
        ("savedir index SMALL", "index_small", res["sizes"]["small"]),
        ("savedir verify --deep BIG", "verify_deep", size),
        ("cat BIG | cat > OUT", "pipe_cat", size),
        ("  ... && sync -d OUT", "pipe_cat_sync", size),
        ("cat BIG | savedir record OUT", "record", size),
        ("savedir verify SMALL", "verify_small", None),
        ("savedir verify BIG", "verify_big", None),
        ("savedir ls BIG", "ls", None),
        ("savedir ls --json BIG", "ls_json", None),
    ]
    head = f"{'command':<30} {'warm s':>8} {'cpu s':>7} {'GiB/s':>7} {'x cat':>7}"
    if c:
        head += f" {'cold s':>8} {'GiB/s':>7} {'x cat':>7}"
    out(head)
    out("-" * len(head))
    for label, key, nbytes in rows:
        r = w[key]
        line = f"{label:<30} {r['best']:>8.3f} {r['cpu_of_best']:>7.2f}"
        line += f" {nbytes / GIB / r['best']:>7.2f}" if nbytes else f" {'':>7}"
        line += f" {r['best'] / w['cat']['best']:>7.2f}" if key not in ("startup",) else f" {'':>7}"
        if c and key in c:
            cr = c[key]
            line += f" {cr['best']:>8.3f}"
            line += f" {nbytes / GIB / cr['best']:>7.2f}" if nbytes else f" {'':>7}"
            line += f" {cr['best'] / c['cat']['best']:>7.2f}"
        out(line)
    out()
    out(f"record through a pipe: {w['pipe_cat']['best'] / w['record']['best']:.2f} x the throughput of `cat | cat > OUT`, "
        f"{w['pipe_cat_sync']['best'] / w['record']['best']:.2f} x with the output flushed to disk as record does")
    vs, vb = w["verify_small"]["best"], w["verify_big"]["best"]
    out(f"verify (not deep): 64 MiB {vs * 1000:.1f} ms, {size / GIB:.1f} GiB {vb * 1000:.1f} ms, "
        f"big/small = {vb / vs:.2f} (start-up alone {w['startup']['best'] * 1000:.1f} ms)")
    ip = res["in_process_verify"]
    if ip["small"] is not None:
        out(f"verify in-process (savedir.verify, no start-up): 64 MiB {ip['small'] * 1e3:.2f} ms, "
            f"big {ip['big'] * 1e3:.2f} ms, big/small = {ip['big'] / ip['small']:.2f}")
    if c:
        r = c["verify_deep_rewarm"]
        out(f"verify --deep warm, page cache filled by savedir's cold run instead of cat: {r['best']:.3f} s "
            f"({r['best'] / w['verify_deep']['best']:.2f} x the warm run after cat, cpu {r['cpu_of_best']:.2f} s)")
        out(f"verify cold: 64 MiB {c['verify_small']['best'] * 1e3:.1f} ms, big {c['verify_big']['best'] * 1e3:.1f} ms")
    m = res["index_memory"]
    if m.get("max_rss_kib"):
        out(f"index peak RSS ({m['source']}): {m['max_rss_kib'] / 1024:.0f} MiB; sampled peaks: "
            f"anonymous {m['sampled_rssanon_kib'] / 1024:.0f} MiB, file-backed (the mapping) "
            f"{m['sampled_rssfile_kib'] / 1024:.0f} MiB")
    if not c:
        out("cold cache: not measured (cannot write /proc/sys/vm/drop_caches, or --no-cold)")


if __name__ == "__main__":
    sys.exit(main())
