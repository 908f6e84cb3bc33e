"""``savedir ram``: a save's guest memory (see savedir.ram)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional
from urllib.parse import quote

import savedir
from savedir.errors import SavedirError
from savedir.ram import Ram, RamRange


def _int(text: str) -> int:
    """A number in decimal, or hex with 0x (e.g. 0x100000), or with a K/M/G suffix."""
    t = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    if scale > 1:
        t = t[:-1]
    try:
        return int(t, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (decimal, 0x hex, or with K/M/G), found {text!r}") from None


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--json", action="store_true", help="print the blocks and guest-physical ranges as JSON")
    what = sp.add_mutually_exclusive_group()
    what.add_argument("--extract", metavar="DIR", help="write one raw file per RAM block into DIR (sparse where 2 MiB or more are zero)")
    what.add_argument("--elf", metavar="OUT", help="write an ELF64 core of guest-physical memory, as QEMU's dump-guest-memory")
    what.add_argument(
        "--read", nargs=2, type=_int, metavar=("GPA", "LEN"), help="write LEN bytes at guest-physical address GPA to stdout"
    )
    sp.add_argument("--hexdump", action="store_true", help="with --read: print a hex dump instead of raw bytes")
    sp.add_argument(
        "--below-4g",
        type=_int,
        default=None,
        metavar="BYTES",
        help="bytes of RAM below 4 GiB, for a guest started with max-ram-below-4g (default: the machine type's rule)",
    )


def _ranges(ram: Ram) -> tuple[list[RamRange], Optional[str]]:
    try:
        return ram.ranges, None
    except SavedirError as e:
        return [], str(e)


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % (div // 16 or 1) == 0:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def _hexdump(data: bytes, base: int) -> None:
    out = sys.stdout
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        out.write(f"{base + i:016x}  {hexes:<47}  |{text}|\n")


def run(a: argparse.Namespace, progress: bool) -> int:
    with savedir.open(a.file, offset=a.offset, wait=a.wait, vmdesc=a.vmdesc) as f:
        ram = f.ram if a.below_4g is None else f.ram.with_layout(below_4g=a.below_4g)
        if a.read is not None:
            gpa, n = a.read
            data = ram.read_phys(gpa, n)
            if a.hexdump:
                _hexdump(data, gpa)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            return 0
        if a.elf is not None:
            size = ram.write_elf(a.elf, progress=progress)
            print(f"{a.file}: wrote {a.elf}, {len(ram.ranges)} ranges, {size} bytes", file=sys.stderr)
            return 0
        if a.extract is not None:
            os.makedirs(a.extract, exist_ok=True)
            for blk in ram.values():
                name = quote(blk.name, safe="@:.,-_+=") + ".raw"
                blk._map.write_block(blk._index, os.path.join(a.extract, name), progress=progress)
                print(f"{os.path.join(a.extract, name)}: {blk.name}, {blk.size} bytes", file=sys.stderr)
            return 0
        ranges, why = _ranges(ram)
        if a.json:
            doc: dict[str, Any] = {
                "path": a.file,
                "machine_type": f.machine_type,
                "map": ram.source,
                "page_size": next(iter(ram.values())).page_size if len(ram) else None,
                "blocks": [
                    {
                        "name": b.name,
                        "size": b.size,
                        "page_size": b.page_size,
                        "host_page_size": b.host_page_size,
                        "pages_present": b.pages_present,
                        "pages_zero": b.pages_zero,
                    }
                    for b in ram.values()
                ],
                "ranges": [r._asdict() for r in ranges],
                "unmapped": [{"block": b, "reason": r} for b, r in (ram.unmapped if not why else [])],
                "layout_error": why,
            }
            print(json.dumps(doc))
            return 0
        print(f"{a.file}: {f.machine_type or 'machine type unknown'}, {len(ram)} RAM blocks, page map {ram.source}")
        print(f"  {'BLOCK':<32} {'SIZE':>10} {'PAGE':>5} {'PRESENT':>9} {'ZERO':>9}  GUEST-PHYSICAL")
        for b in ram.values():
            where = ", ".join(f"0x{r.gpa:x}-0x{r.gpa + r.size - 1:x}" for r in ranges if r.block == b.name) or "-"
            print(f"  {b.name:<32} {_size(b.size):>10} {b.page_size:>5} {b.pages_present:>9} {b.pages_zero:>9}  {where}")
        if why:
            print(f"  ({why})")
        else:
            for block, reason in ram.unmapped:
                print(f"  {block}: not in the guest-physical view: {reason}")
    return 0
