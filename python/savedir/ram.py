"""Guest memory of a save: RAM blocks page by page, and the guest-physical view.

``f.ram`` (see :class:`Ram`) maps each RAM block's name to a
:class:`RamBlock`; ``f.ram.ranges`` says where the blocks lie in the
guest's physical address space, and ``f.ram.read_phys`` reads there.

>>> import savedir
>>> with savedir.open("vm.sav") as f:
...     ram = f.ram["pc.ram"]
...     (ram.size, ram.page_size, len(ram.page(0)))
(16777216, 4096, 4096)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import os
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

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

    Pages are ``page_size`` bytes (the target page size, 4096 on x86;
    ``host_page_size`` says when the stream reports the block as backed by
    larger host pages). ``pages_present`` counts the pages whose content the
    file holds as data; ``pages_zero`` those the save records as zero; the
    rest were never sent and read as zeros, as a fresh destination holds them.

    >>> import savedir
    >>> with savedir.open("vm.sav") as f:
    ...     bios = f.ram["pc.bios"]
    ...     pages = bios.present()
    ...     arr = bios.gather(pages)
    ...     (arr.shape == (bios.pages_present, 4096), bytes(arr[0]) == bytes(bios.page(int(pages[0]))))
    (True, True)
    >>> with savedir.open("vm.sav") as f:
    ...     f.ram["pc.bios"].read(0x3fff0, 5)    # the reset vector: jmp far f000:e05b
    b'\\xea[\\xe0\\x00\\xf0'
    """

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

    def gather(
        self, pages: Union[Sequence[int], "npt.NDArray[Any]"], *, out: Optional["npt.NDArray[np.uint8]"] = None
    ) -> "npt.NDArray[np.uint8]":
        """Pages ``pages`` (page numbers: a sequence, or a numpy array, which
        is read as it is) as one ``(len(pages), page_size)`` uint8 array, read
        in one call with the GIL released, on several threads when large.
        With ``out``, a C-contiguous uint8 array of that shape, the pages are
        written into it (no new memory: for gathers in a loop) and it is
        returned.

        >>> import numpy as np, savedir
        >>> with savedir.open("vm.sav") as f:
        ...     blk = f.ram["pc.ram"]
        ...     buf = np.empty((2, blk.page_size), np.uint8)
        ...     got = blk.gather(np.array([0x100, 7]), out=buf)
        ...     got is buf, bytes(buf[0]) == bytes(blk.page(0x100))
        (True, True)
        """
        import numpy as np

        arr = np.asarray(pages)
        if arr.size == 0:
            arr = arr.astype(np.uint64)
        elif arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise TypeError(f"pages must be a sequence of page numbers, found an array of {arr.dtype} and shape {arr.shape}")
        elif arr.dtype.kind == "i" and int(arr.min()) < 0:
            raise ValueError(f"pages must not be negative, found {int(arr.min())}")
        return self._map.gather(self._index, np.ascontiguousarray(arr, dtype=np.uint64), out)

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
    ``"scanned"`` (the RAM records were walked).

    >>> import savedir
    >>> with savedir.open("vm.sav") as f:
    ...     ram = f.ram
    ...     (ram.source, ram.ranges[0], ram.read_phys(0xffff0, 5) == ram["pc.bios"].read(0x3fff0, 5))
    ('scanned', RamRange(gpa=0, size=786432, block='pc.ram', offset=0), True)
    >>> _ = savedir.index("vm.sav")
    >>> with savedir.open("vm.sav") as f:
    ...     f.ram.source
    'stored'
    """

    def __init__(
        self,
        file: _core.SaveFile,
        ram_map: _core.RamMap,
        *,
        below_4g: Optional[int] = None,
        above_4g_start: Optional[int] = None,
        ram_block: Optional[str] = None,
    ) -> None:
        self._file = file
        self._map = ram_map
        self._blocks = {row[0]: RamBlock(ram_map, i, row) for i, row in enumerate(ram_map.blocks())}
        self._names = list(self._blocks)
        self._below_4g, self._above_4g_start, self._ram_block = below_4g, above_4g_start, ram_block
        self._ranges: Optional[list[RamRange]] = None
        self._unmapped: list[tuple[str, str]] = []
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

    def with_layout(
        self, *, below_4g: Optional[int] = None, above_4g_start: Optional[int] = None, ram_block: Optional[str] = None
    ) -> "Ram":
        """The same memory with another guest-physical layout, for guests
        started with options the save does not record: ``below_4g`` bytes of
        the main RAM below 4 GiB (``-machine max-ram-below-4g``), the RAM
        above 4 GiB starting at ``above_4g_start``, or the main RAM in block
        ``ram_block`` (``-machine memory-backend=ID``)."""
        return Ram(self._file, self._map, below_4g=below_4g, above_4g_start=above_4g_start, ram_block=ram_block)

    def _load_layout(self) -> list[RamRange]:
        if self._ranges is None:
            rows, self._unmapped = self._file.ram_layout(
                self._map, below_4g=self._below_4g, above_4g_start=self._above_4g_start, ram_block=self._ram_block
            )
            self._ranges = [RamRange(gpa, size, self._names[b], off) for gpa, size, b, off in rows]
        return self._ranges

    @property
    def ranges(self) -> list[RamRange]:
        """Where the blocks lie in guest-physical memory, sorted by address,
        as QEMU's ``dump-guest-memory`` lays them out (see ``docs/api.md`` for
        the rule per machine type). Raises :class:`RamError` for a machine
        type whose layout savedir does not know."""
        return self._load_layout()

    @property
    def unmapped(self) -> list[tuple[str, str]]:
        """``(block, reason)`` for blocks (or parts) that lie nowhere in the view."""
        self._load_layout()
        return self._unmapped

    def _physmap(self) -> _core.PhysMap:
        if self._phys is None:
            index = {name: i for i, name in enumerate(self._names)}
            self._phys = _core.PhysMap(self._map, [(r.gpa, r.size, index[r.block], r.offset) for r in self.ranges])
        return self._phys

    def write_elf(self, path: Union[str, "os.PathLike[str]"], *, progress: bool = False) -> int:
        """Writes an ELF64 core of guest-physical memory to ``path``, as
        ``dump-guest-memory`` with paging off: a ``PT_NOTE`` with each vCPU's
        ``NT_PRSTATUS`` and QEMU CPU state (when the save's vCPUs can be
        read), then one ``PT_LOAD`` per range; returns its size."""
        notes, machine = self._file.core_notes()
        return self._physmap().write_elf(path, notes=notes, machine=machine, progress=progress)

    def read_phys(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical address ``gpa``. An address no RAM
        backs raises :class:`RamError`."""
        return self._physmap().read(gpa, n)

    def read_phys_many(self, gpas: Sequence[int], n: int) -> "npt.NDArray[np.uint8]":
        """``n`` bytes at each address, as one ``(len(gpas), n)`` uint8 array."""
        return self._physmap().read_many([int(g) for g in gpas], n)

    @property
    def machine_type(self) -> Optional[str]:
        return self._file.machine_type

    def __repr__(self) -> str:
        return f"<Ram {len(self)} blocks ({self.source}): {', '.join(self._blocks)}>"
