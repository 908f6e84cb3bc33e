"""Guest memory of a save: RAM blocks page by page, and the guest-physical view.

``f.ram`` (see :class:`Ram`) maps each RAM block's name to a
:class:`RamBlock`; ``f.ram.ranges`` says where the blocks lie in the
guest's physical address space, and ``f.ram.read_phys`` reads there.

>>> import savedir
>>> with savedir.open("vm.sav") as f:
...     ram = f.ram["pc.ram"]
...     (ram.size, ram.page_size, len(ram.page(0)))
(67108864, 4096, 4096)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from . import _core

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Ram", "RamBlock", "RamRange"]


class RamRange(NamedTuple):
    """``size`` bytes at guest-physical address ``gpa`` are bytes
    ``offset .. offset+size`` of RAM block ``block``."""

    gpa: int
    size: int
    block: str
    offset: int


class RamBlock:
    """One RAMBlock of a save (``pc.ram``, ``vga.vram``, ``pc.bios`` ...).

    Pages are ``page_size`` bytes (the target page size, 4096 on x86).
    ``pages_present`` counts the pages whose content the file holds as data;
    ``pages_zero`` those the save records as zero; the rest were never sent
    and read as zeros, as a fresh destination holds them."""

    __slots__ = ("_map", "_index", "name", "size", "page_size", "host_page_size", "pages_present", "pages_zero")

    def __init__(self, ram_map: _core.RamMap, index: int, row: tuple[Any, ...]) -> None:
        self._map = ram_map
        self._index = index
        self.name: str = row[0]
        self.size: int = row[1]
        self.page_size: int = row[2]
        self.host_page_size: Optional[int] = row[3]
        self.pages_present: int = row[4]
        self.pages_zero: int = row[5]

    @property
    def pages(self) -> int:
        """The number of pages the block spans."""
        return -(-self.size // self.page_size)

    def page(self, i: int) -> memoryview:
        """Page ``i`` as a read-only memoryview: zero-copy into the file's
        mapping when the page is stored whole, one shared zero page for zero
        pages, decoded bytes for XBZRLE and compressed pages."""
        return self._map.page(self._index, i)

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the block from ``offset``."""
        return self._map.read(self._index, offset, n)

    def present(self) -> "npt.NDArray[np.uint64]":
        """The page numbers whose content the file holds as data (uint64)."""
        return self._map.present(self._index)

    def gather(self, pages: Sequence[int]) -> "npt.NDArray[np.uint8]":
        """Pages ``pages`` as one ``(len(pages), page_size)`` uint8 array,
        read in one call with the GIL released."""
        return self._map.gather(self._index, [int(p) for p in pages])

    def array(self) -> "npt.NDArray[np.uint8]":
        """For a mapped-ram save: the whole block as a read-only uint8 array
        into the file's mapping (no copy). Other saves raise :class:`RamError`."""
        return self._map.array(self._index)

    def __repr__(self) -> str:
        return (
            f"<RamBlock {self.name!r} {self.size} bytes, {self.pages_present} pages present, "
            f"{self.pages_zero} zero>"
        )


class Ram(Mapping[str, RamBlock]):
    """The RAM blocks of a save, by name, and its guest-physical view.

    ``source`` says how the page map was found: ``"stored"`` (the directory
    carries one), ``"mapped-ram"`` (the stream's own bitmaps) or
    ``"scanned"`` (the RAM records were walked)."""

    def __init__(self, ram_map: _core.RamMap, machine_type: Optional[str], below_4g: Optional[int] = None) -> None:
        self._map = ram_map
        self._blocks = {row[0]: RamBlock(ram_map, i, row) for i, row in enumerate(ram_map.blocks())}
        self.machine_type = machine_type
        self._below_4g = below_4g
        self._ranges: Optional[list[RamRange]] = None
        self._phys: Optional[_core.PhysMap] = None

    @property
    def source(self) -> str:
        return self._map.source

    def __getitem__(self, name: str) -> RamBlock:
        try:
            return self._blocks[name]
        except KeyError:
            raise KeyError(f"no RAM block {name!r} (the save has: {', '.join(self._blocks)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def with_layout(self, below_4g: Optional[int] = None) -> "Ram":
        """The same memory with another guest-physical layout: ``below_4g``
        bytes of ``pc.ram`` below 4 GiB (as QEMU's ``max-ram-below-4g`` gives)."""
        return Ram(self._map, self.machine_type, below_4g)

    @property
    def ranges(self) -> list[RamRange]:
        """Where the blocks lie in guest-physical memory, sorted by address
        (see ``docs/api.md`` for the rule per machine type)."""
        if self._ranges is None:
            blocks = [(b.name, b.size) for b in self._blocks.values()]
            rows = _core._x86_layout(self.machine_type or "", blocks, self._below_4g)
            self._ranges = [RamRange(*r) for r in rows]
        return self._ranges

    def _physmap(self) -> _core.PhysMap:
        if self._phys is None:
            index = {name: i for i, name in enumerate(self._blocks)}
            self._phys = _core.PhysMap(self._map, [(r.gpa, r.size, index[r.block], r.offset) for r in self.ranges])
        return self._phys

    def read_phys(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical address ``gpa``. An address no RAM
        backs raises :class:`RamError`."""
        return self._physmap().read(gpa, n)

    def read_phys_many(self, gpas: Sequence[int], n: int) -> "npt.NDArray[np.uint8]":
        """``n`` bytes at each address, as one ``(len(gpas), n)`` uint8 array."""
        return self._physmap().read_many([int(g) for g in gpas], n)

    def __repr__(self) -> str:
        return f"<Ram {len(self)} blocks ({self.source}): {', '.join(self._blocks)}>"
