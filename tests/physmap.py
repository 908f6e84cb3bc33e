"""Test helpers for guest-physical memory, independent of savedir's code.

* :func:`ram_blocks` -- the RAMBlock list (idstr, used length) of a save,
  read from its RAM START section's MEM_SIZE record.
* :func:`memory_view` -- the RAM and ROM ranges of QEMU's ``info mtree -f``
  for the address space "memory", merged the way ``dump-guest-memory``
  merges them (system/memory_mapping.c: contiguous in guest-physical
  address, same memory region, contiguous offset in it).
* :class:`Elf` -- a small reader of ELF64 cores: the ``PT_LOAD`` program
  headers and their bytes.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple, Union

import savedir

PathLike = Union[str, "os.PathLike[str]"]

#: (guest-physical address, size, name, offset within the region/block)
Range = Tuple[int, int, str, int]


def ram_blocks(path: PathLike, mapped_ram: bool = False) -> List[Tuple[str, int]]:
    """The (idstr, used_length) list of the save's RAM START section.
    ``mapped_ram``: the save was made with that capability (each block
    carries a header, and the list goes on after the block's pages)."""
    with savedir.open(path) as f:
        start = next(e for e in f.entries if e.kind == "start" and e.name == "ram").payload_offset
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:

        def be(at: int, n: int) -> int:
            return int.from_bytes(data[at:at + n], "big")

        word = be(start, 8)
        assert word & 0x3FF == 0x004, f"{path}: RAM START opens with flags {word & 0x3ff:#x}, not MEM_SIZE"
        total, pos, out = word & ~0x3FF, start + 8, []
        while sum(n for _, n in out) < total:
            n = data[pos]
            name = data[pos + 1:pos + 1 + n].decode()
            size = be(pos + 1 + n, 8)
            pos += 9 + n
            if mapped_ram:  # be32 version, be64 page size, bitmap and pages offsets
                pages_offset = be(pos + 20, 8)
                pos = pages_offset + size if pages_offset else pos + 28
            out.append((name, size))
    return out


_MTREE_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-f]+))?"
)


def memory_view(mtree: str) -> List[Range]:
    """RAM and ROM ranges of the flat view of address space "memory" in the
    text of ``info mtree -f``: (gpa, size, region name, offset), merged like
    ``dump-guest-memory`` merges them.  ``ram`` and ``rom`` regions count
    (QEMU's dump takes memory_region_is_ram regions); ``romd`` (ROM devices,
    e.g. pflash), ``ramd`` (RAM devices) and ``i/o`` do not."""
    views = mtree.split("FlatView #")[1:]
    view = next((v for v in views if '\n AS "memory",' in v), None)
    assert view is not None, f"no flat view for AS \"memory\" in:\n{mtree[:2000]}"
    out: List[Range] = []
    for line in view.splitlines():
        m = _MTREE_LINE.match(line)
        if not m or m.group(3) not in ("ram", "rom"):
            continue
        start, last, name = int(m.group(1), 16), int(m.group(2), 16), m.group(4)
        off = int(m.group(5) or "0", 16)
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == name and out[-1][3] + out[-1][1] == off:
            g, s, n, o = out[-1]
            out[-1] = (g, s + last + 1 - start, n, o)
        else:
            out.append((start, last + 1 - start, name, off))
    return out


def leaf(block: str) -> str:
    """A RAMBlock's memory region name: its idstr without the device path."""
    return block.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Load:
    paddr: int
    filesz: int
    memsz: int
    offset: int  # file offset of the bytes


class Elf:
    """An ELF64 little-endian core's PT_LOAD headers (PN_XNUM aware)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            eh = f.read(64)
            assert eh[:4] == b"\x7fELF" and eh[4] == 2 and eh[5] == 1, f"{path}: not an ELF64 LE file"
            (self.e_type,) = struct.unpack_from("<H", eh, 16)
            phoff, shoff = struct.unpack_from("<QQ", eh, 32)
            phentsize, phnum, shentsize = struct.unpack_from("<HHH", eh, 54)
            if phnum == 0xFFFF:  # PN_XNUM: the real count is section 0's sh_info
                f.seek(shoff)
                (phnum,) = struct.unpack_from("<I", f.read(shentsize), 44)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
        self.loads: List[Load] = []
        self.notes = 0
        for i in range(phnum):
            p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
                "<IIQQQQQQ", table, i * phentsize
            )
            if p_type == 1:
                self.loads.append(Load(paddr, filesz, memsz, off))
            elif p_type == 4:
                self.notes += 1

    def chunks(self, load: Load, chunk: int = 64 << 20) -> Iterator[Tuple[int, bytes]]:
        """(gpa, bytes) pieces of one load, ``chunk`` bytes at most each."""
        with open(self.path, "rb") as f:
            done = 0
            while done < load.filesz:
                n = min(chunk, load.filesz - done)
                f.seek(load.offset + done)
                data = f.read(n)
                assert len(data) == n, f"{self.path}: load at {load.paddr:#x} runs past the end of the file"
                yield load.paddr + done, data
                done += n

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa`` (inside one load)."""
        for ld in self.loads:
            if ld.paddr <= gpa and gpa + n <= ld.paddr + ld.filesz:
                with open(self.path, "rb") as f:
                    f.seek(ld.offset + gpa - ld.paddr)
                    return f.read(n)
        raise KeyError(f"{self.path}: no load holds {n} bytes at {gpa:#x}")
