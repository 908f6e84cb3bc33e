#!/usr/bin/env python3
"""Guest-memory figures of savedir (run by hand after ``pip install .``):

    python3 benches/ram.py [--save FILE] [--ram-gib 3] [--dir DIR] [--keep] [--json]

Works on ``--save FILE`` (a real save, e.g. a q35 guest with 3 GiB of RAM;
copied, never changed) or else a synthetic stream with ``--ram-gib`` GiB of
``pc.ram`` (tests/synthetic.py). Measures, in one run, side by side:

* ``index`` with the RAM page map and with ``--no-ram-map`` (best of 3, warm):
  what building and storing the map adds;
* cold start: after ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the file, a
  fresh process opens it and reads one random 4 KiB page through
  ``read_phys`` (or the block when no layout is known): wall time of
  open + read, and bytes read from storage (``/proc/self/io`` read_bytes);
* random 4 KiB reads from Python: pages/s through ``gather`` (one call for
  1,000,000 random pages: into a new array, and into one reused with
  ``out=``; the first call's fresh memory is timed apart, with ``np.ones``
  of the same shape as its baseline) and through single ``page()`` calls;
* ``savedir ram --extract`` and ``--elf`` against ``cp`` of the save into
  the same folder (warm, best of 3).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def best(fn: Callable[[], Any], n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


COLD = r"""
import os, sys, time, random
def io():
    with open("/proc/self/io") as f:
        return dict(line.split(": ") for line in f.read().splitlines())
path = sys.argv[1]
import savedir  # start-up is not part of the figure (see benches/bench.py)
before = int(io()["read_bytes"])
t = time.perf_counter()
f = savedir.open(path)
ram = f.ram
try:
    r = max(ram.ranges, key=lambda r: r.size)
    gpa = r.gpa + random.randrange(r.size // 4096) * 4096
    data = ram.read_phys(gpa, 4096)
    how = "read_phys"
except Exception:
    blk = max(ram.values(), key=lambda b: b.size)
    data = blk.read(random.randrange(blk.pages) * 4096, 4096)
    how = "block read"
dt = time.perf_counter() - t
after = int(io()["read_bytes"])
print(dt, after - before, how.replace(" ", "-"), ram.source)

"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", type=Path, default=None)
    ap.add_argument("--ram-gib", type=float, default=3.0)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import numpy as np

    import savedir

    work = Path(tempfile.mkdtemp(prefix="savedir-ram-bench-", dir=a.dir))
    out: dict[str, Any] = {}
    try:
        src = work / "vm.sav"
        if a.save:
            shutil.copyfile(a.save, src)
            savedir.strip(src)
        else:
            import synthetic

            synthetic.write_stream(str(src), int(a.ram_gib * (1 << 30)))
        out["file_size"] = src.stat().st_size
        run("cat", str(src))  # warm

        def index(no_map: bool) -> Callable[[], None]:
            def go() -> None:
                savedir.strip(src)
                run("savedir", "index", *(["--no-ram-map"] if no_map else []), str(src))

            return go

        out["index_no_map_s"] = best(index(True))
        out["index_map_s"] = best(index(False))
        out["map_cost"] = out["index_map_s"] / out["index_no_map_s"] - 1
        out["map_bytes"] = savedir.index(src).ram_map_size
        t = time.perf_counter()
        subprocess.run(f"cat {src} > /dev/null", shell=True, check=True)
        out["cat_s"] = best(lambda: subprocess.run(f"cat {src} > /dev/null", shell=True, check=True))

        colds = []
        for _ in range(5):
            fd = os.open(src, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            r = subprocess.run([sys.executable, "-c", COLD, str(src)], check=True, capture_output=True, text=True)
            dt, nbytes, how, source = r.stdout.split()
            colds.append((float(dt), int(nbytes)))
        out["cold_open_read_s"] = sorted(c[0] for c in colds)[len(colds) // 2]
        out["cold_read_bytes"] = max(c[1] for c in colds)
        out["cold_how"] = f"{how}, map {source}"

        run("cat", str(src))  # warm again after the cold runs
        with savedir.open(src) as f:
            blk = max(f.ram.values(), key=lambda b: b.size)
            rng = random.Random(1)
            pages = [rng.randrange(blk.pages) for _ in range(1_000_000)]
            blk.gather(pages[:1000])
            # The first gather's 4 GiB array is memory this process never
            # had: its cost is the system's (np.ones of the same shape, the
            # baseline, pays it too), so the figure is of later calls, into
            # a new array each time and into one array reused (out=).
            t = time.perf_counter()
            arr = blk.gather(pages)
            out["gather_first_call_s"] = time.perf_counter() - t
            del arr
            t = time.perf_counter()
            arr = np.ones((len(pages), blk.page_size), np.uint8)
            out["np_ones_same_shape_s"] = time.perf_counter() - t
            del arr
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                arr = blk.gather(pages)
                runs.append(time.perf_counter() - t)
                del arr
            out["gather_pages_per_s"] = len(pages) / min(runs)
            buf = np.empty((len(pages), blk.page_size), np.uint8)
            blk.gather(pages, out=buf)
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                blk.gather(pages, out=buf)
                runs.append(time.perf_counter() - t)
            out["gather_out_pages_per_s"] = len(pages) / min(runs)
            del buf
            few = pages[:300_000]
            t = time.perf_counter()
            for p in few:
                blk.page(p)
            out["page_calls_per_s"] = len(few) / (time.perf_counter() - t)
            nz = blk.present()
            out["present_pages"] = int(np.asarray(nz).size)

        dest = work / "copy.sav"
        out["cp_s"] = best(lambda: run("cp", str(src), str(dest)))
        dest.unlink()
        ex = work / "extract"
        out["extract_s"] = best(lambda: run("savedir", "ram", str(src), "--extract", str(ex)))
        shutil.rmtree(ex)
        elf = work / "vm.elf"
        try:
            out["elf_s"] = best(lambda: run("savedir", "ram", str(src), "--elf", str(elf)))
        except subprocess.CalledProcessError as e:
            out["elf_s"] = f"failed: {e}"
        if elf.exists():
            elf.unlink()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    for k, v in out.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}", file=sys.stderr if a.json else sys.stdout)
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
