"""savedir: find any section of a saved QEMU VM in O(1).

QEMU saves a VM as one sequential migration stream in which device sections
do not carry their length. savedir appends a *section directory* after the
stream (QEMU still loads the file) so that every section can be found from
the file's tail, and reads sections zero-copy from a memory map.

>>> import savedir
>>> savedir.index("vm.sav").written
True
>>> savedir.verify("vm.sav").ok
True
>>> with savedir.open("vm.sav") as f:
...     cpu = f["cpu"]
...     (cpu.name, cpu.instance_id, f.indexed)
('cpu', 0, True)
"""

from __future__ import annotations

# Only what every command needs is imported here (the command line starts
# with this module): `io` and `os` are loaded by Python itself, and typing
# names are read by type checkers only.
import io
import os

from savedir import _core
from savedir._core import Batch, BatchResult, Entry, IndexResult, RecordResult, StripResult, VerifyResult
from savedir.errors import (
    DirectoryError,
    FileChangedError,
    FileLockedError,
    FormatError,
    NotAStreamError,
    SavedirError,
    SectionNotFoundError,
    RamError,
    TrailingDataError,
    TruncatedError,
    UnsupportedStreamError,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable, Iterator, Optional, Union

    from savedir._state import Cpu, Diff, SectionState, State
    from savedir.ram import Ram

    PathLike = Union[str, os.PathLike[str]]
    Paths = Union[PathLike, Iterable[PathLike]]

__version__: str = _core.__version__

__all__ = [
    "open",
    "index",
    "verify",
    "strip",
    "record",
    "index_many",
    "verify_many",
    "open_many",
    "Batch",
    "BatchResult",
    "Recorder",
    "diff",
    "SaveFile",
    "Section",
    "Entry",
    "IndexResult",
    "VerifyResult",
    "StripResult",
    "RecordResult",
    "State",
    "SectionState",
    "Cpu",
    "Segment",
    "Diff",
    "SectionDiff",
    "FieldDiff",
    "SavedirError",
    "FormatError",
    "NotAStreamError",
    "TruncatedError",
    "UnsupportedStreamError",
    "DirectoryError",
    "TrailingDataError",
    "SectionNotFoundError",
    "RamError",
    "FileChangedError",
    "FileLockedError",
]

#: Names loaded on first use (their modules import what a plain command
#: does not need).
_LAZY = {
    "State": "savedir._state",
    "SectionState": "savedir._state",
    "Cpu": "savedir._state",
    "Segment": "savedir._state",
    "Diff": "savedir._state",
    "SectionDiff": "savedir._state",
    "FieldDiff": "savedir._state",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'savedir' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def _fspath(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else os.fspath(p)


class Recorder(io.RawIOBase):
    """A writable binary file that records a migration stream as it arrives.

    Bytes written go to ``path`` at once and are parsed as they pass; when
    the recorder is closed, the section directory (with checksums) is
    appended, exactly as :func:`index` would have written it. Memory stays
    bounded whatever the stream's size. If the stream is incomplete or
    malformed, :meth:`close` raises (a :class:`FormatError`) and the file
    keeps every byte received, without a directory. Leaving a ``with`` block
    on an exception aborts: the bytes stay, no directory is written.

    >>> import builtins
    >>> data = builtins.open("vm.sav", "rb").read()
    >>> with Recorder("copy.sav") as rec:
    ...     for i in range(0, len(data), 65536):
    ...         _ = rec.write(data[i:i + 65536])
    >>> rec.result.stream_size == len(data), verify("copy.sav", deep=True).ok
    (True, True)
    """

    def __init__(
        self, path: PathLike, *, checksums: bool = True, sidecar: bool = False, wait: bool = False, ram_map: bool = True
    ) -> None:
        super().__init__()
        self.path: str = os.fspath(path)
        self.result: Optional[RecordResult] = None
        """Set once :meth:`close` has appended the directory."""
        self._rec = _core.Recorder(self.path, checksums=checksums, sidecar=sidecar, wait=wait, ram_map=ram_map)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed Recorder")
        return self._rec.write(b)

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return self._rec.received

    def close(self) -> None:
        """Ends the stream and appends the directory (see the class)."""
        if self.closed:
            return
        try:
            self.result = self._rec.finish()
        finally:
            super().close()

    def abort(self) -> None:
        """Stops without writing a directory; the file keeps what it received."""
        if not self.closed:
            self._rec.abort()
            super().close()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def record(
    path: PathLike,
    source: Optional[Any] = None,
    *,
    checksums: bool = True,
    progress: bool = False,
    sidecar: bool = False,
    wait: bool = False,
    ram_map: bool = True,
) -> RecordResult:
    """Records a migration stream into ``path`` and appends its directory.

    ``source`` is a binary file object to read the stream from, or None for
    this process's standard input, which is then read in Rust without the
    GIL (what ``savedir record`` does). With ``sidecar`` the directory goes
    to ``path + ".savedir"`` and ``path`` holds only the stream. See
    :class:`Recorder`. ``ram_map`` as for :func:`index`.

    >>> import builtins
    >>> with builtins.open("vm.sav", "rb") as src:
    ...     record("copy.sav", src).entries > 10
    True
    """
    if source is None:
        return _core.record_stdin(
            os.fspath(path), checksums=checksums, progress=progress, sidecar=sidecar, wait=wait, ram_map=ram_map
        )
    with Recorder(path, checksums=checksums, sidecar=sidecar, wait=wait, ram_map=ram_map) as rec:
        while True:
            chunk = source.read(1 << 20)
            if not chunk:
                break
            rec.write(chunk)
    assert rec.result is not None
    return rec.result


def index(
    path: PathLike,
    *,
    force: bool = False,
    checksums: bool = True,
    progress: bool = False,
    sidecar: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
    ram_map: bool = True,
) -> IndexResult:
    """Appends a section directory to the save file at ``path``.

    The stream is parsed to its real end (EOF byte and vmdesc); the directory
    goes right after it, under an exclusive lock, and is flushed to disk. A
    file that already has a valid directory is left as it is (``written`` is
    False) unless ``force`` asks for a rewrite. Unknown bytes after the stream
    raise :class:`TrailingDataError` unless ``force`` replaces them.

    With ``sidecar`` the directory goes to ``path + ".savedir"`` instead and
    the file stays byte for byte as it is (for tools that read the file's
    tail, such as QEMU's ``analyze-migration.py``). ``offset`` says where the
    stream starts when savedir cannot find it by itself (it finds QEMU's
    magic at 0, behind a libvirt header, or at a page boundary in the first MiB).
    ``vmdesc`` names a vmdesc to delimit device sections with when the
    stream has neither section footers nor a vmdesc of its own (machine types
    up to 2.3): a JSON file (``savedir desc`` prints one) or a save of the
    same VM (same QEMU, machine type and devices) that has one. Without it,
    such a stream's device sections end where the next well-formed section
    header begins; a stream that parses two ways is refused, never guessed.
    A file that a reader holds open (an open :class:`SaveFile`, in this or
    another process) raises :class:`FileLockedError` at once and is left as
    it is, unless ``wait`` asks to wait until the readers are gone.

    ``ram_map`` (on by default) stores the RAM page map before the
    directory, so that any guest page is found from the file's tail
    (``ram_map_size`` says how many bytes it took); mapped-ram streams need
    none, their pages lie at fixed offsets already.

    >>> r = index("vm.sav")
    >>> r.written, r.entries > 10
    (True, True)
    >>> index("vm.sav").written
    False
    """
    return _core.index(
        os.fspath(path),
        force=force,
        checksums=checksums,
        progress=progress,
        sidecar=sidecar,
        offset=offset,
        wait=wait,
        vmdesc=_fspath(vmdesc),
        ram_map=ram_map,
    )


def verify(
    path: PathLike,
    *,
    deep: bool = False,
    progress: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
) -> VerifyResult:
    """Checks the directory of ``path``: trailer, directory, cross-check, and
    with ``deep`` the whole stream and every checksum.

    A file that fails a check is not an exception: the result says which
    check failed, where, and why.

    >>> verify("vm.sav").check
    'trailer'
    >>> _ = index("vm.sav")
    >>> verify("vm.sav", deep=True).ok
    True
    """
    return _core.verify(os.fspath(path), deep=deep, progress=progress, offset=offset, wait=wait, vmdesc=_fspath(vmdesc))


def strip(
    path: PathLike,
    *,
    force: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
) -> StripResult:
    """Truncates ``path`` back to the stream's end, removing the directory:
    the file is then byte for byte what QEMU wrote. A sidecar directory is
    deleted.

    >>> before = os.path.getsize("vm.sav")
    >>> _ = index("vm.sav")
    >>> strip("vm.sav").removed > 0, os.path.getsize("vm.sav") == before
    (True, True)
    """
    return _core.strip(os.fspath(path), force=force, offset=offset, wait=wait, vmdesc=_fspath(vmdesc))


def _paths(paths: Paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def index_many(
    paths: Paths,
    *,
    jobs: Optional[int] = None,
    recursive: bool = False,
    ordered: bool = False,
    progress: bool = False,
    force: bool = False,
    checksums: bool = True,
    sidecar: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
    ram_map: bool = True,
) -> Batch:
    """Indexes many files at once: :func:`index` on each file of ``paths``
    (files, and folders: their files, with ``recursive`` those of their
    subfolders too), ``jobs`` at a time (default: one per CPU) on threads
    in Rust, with the GIL released.

    Returns a :class:`Batch`, an iterator of one :class:`BatchResult` per
    file, as each finishes (with ``ordered``, in the order of ``paths`` and of
    the folders' listings). A file that fails does not stop the others: its
    result holds the exception (``error``) instead. ``progress`` draws one
    bar on stderr for the whole batch. Memory stays bounded whatever the
    number of files. The options are :func:`index`'s.

    >>> for r in index_many(["vm.sav", "missing.sav"], ordered=True):
    ...     r.path, r.ok, type(r.error).__name__, r.entries > 10
    ('vm.sav', True, 'NoneType', True)
    ('missing.sav', False, 'FileNotFoundError', False)
    """
    return _core.index_many(
        _paths(paths),
        jobs=jobs,
        recursive=recursive,
        ordered=ordered,
        progress=progress,
        force=force,
        checksums=checksums,
        sidecar=sidecar,
        offset=offset,
        wait=wait,
        vmdesc=_fspath(vmdesc),
        ram_map=ram_map,
    )


def verify_many(
    paths: Paths,
    *,
    jobs: Optional[int] = None,
    recursive: bool = False,
    ordered: bool = False,
    progress: bool = False,
    deep: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
) -> Batch:
    """Verifies many files at once: :func:`verify` on each file of
    ``paths``, as :func:`index_many` does. A result's ``result`` is the
    :class:`VerifyResult`; ``ok`` is True for a valid file.

    >>> _ = index("vm.sav")
    >>> [(r.path, r.ok, r.result.check) for r in verify_many(["vm.sav"], deep=True)]
    [('vm.sav', True, None)]
    """
    return _core.verify_many(
        _paths(paths),
        jobs=jobs,
        recursive=recursive,
        ordered=ordered,
        progress=progress,
        deep=deep,
        offset=offset,
        wait=wait,
        vmdesc=_fspath(vmdesc),
    )


def open_many(
    paths: Paths,
    *,
    jobs: Optional[int] = None,
    recursive: bool = False,
    ordered: bool = False,
    progress: bool = False,
    scan: bool = False,
    offset: Optional[int] = None,
    mmap: bool = True,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
) -> Batch:
    """Opens many files at once: :func:`open` on each file of ``paths``, as
    :func:`index_many` does (files without a directory are parsed on the
    batch's threads). A result's ``file`` is the open :class:`SaveFile`,
    which holds its file's lock until it is closed.

    >>> for r in open_many(["vm.sav"]):
    ...     with r.file as f:
    ...         f.machine_type.startswith("pc-"), len(f.entries) == r.entries
    (True, True)
    """
    return _core.open_many(
        _paths(paths),
        SaveFile,
        jobs=jobs,
        recursive=recursive,
        ordered=ordered,
        progress=progress,
        scan=scan,
        offset=offset,
        mmap=mmap,
        wait=wait,
        vmdesc=_fspath(vmdesc),
    )


def open(  # noqa: A001
    source: Union[PathLike, Any],
    *,
    scan: bool = False,
    progress: bool = False,
    offset: Optional[int] = None,
    mmap: bool = True,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
) -> "SaveFile":
    """Opens a save file for reading: a path, or a binary file object with
    ``seek`` and ``read`` (``io.BytesIO``, an open file, an fsspec file).

    With a valid directory (appended, or for a path a sidecar
    ``path + ".savedir"``) the file is opened through it, touching only its
    tail, the directory and the headers; without one, the stream is parsed
    from the start. ``scan=True`` ignores any directory. A damaged
    directory, or a sidecar that no longer matches its file, raises
    :class:`DirectoryError`. ``offset``: see :func:`index`.

    A path is read through a memory map, and sections are zero-copy views
    into it; ``mmap=False`` reads it by positioned reads instead (for
    network file systems). A file object is read with ``seek`` and ``read``;
    its sections' bytes are copies. An open file holds a shared lock until
    it is closed: :func:`strip`, ``index(force=True)`` and :func:`record` on
    it fail with :class:`FileLockedError` meanwhile. A file that a savedir
    writer is at work on raises :class:`FileLockedError`, unless ``wait``.

    >>> with open("vm.sav") as f:
    ...     f.indexed, f.entries[0].kind, f.machine_type.startswith("pc-")
    (False, 'configuration', True)
    >>> import io, builtins
    >>> with open(io.BytesIO(builtins.open("vm.sav", "rb").read())) as g:
    ...     g.mapped, len(g.entries) == len(open("vm.sav").entries)
    (False, True)
    """
    if not (hasattr(source, "read") and hasattr(source, "seek")):
        source = os.fspath(source)
    return SaveFile(
        source, scan=scan, progress=progress, offset=offset, mmap=mmap, wait=wait, vmdesc=_fspath(vmdesc)
    )


def diff(a: Union[PathLike, "SaveFile"], b: Union[PathLike, "SaveFile"]) -> Diff:
    """Compares two saves section by section: the sections only one has,
    those whose bytes differ, and for device sections the fields that
    differ with both values. ``same`` is True when nothing differs.

    >>> import shutil
    >>> _ = shutil.copyfile("vm.sav", "copy.sav")
    >>> diff("vm.sav", "copy.sav").same
    True
    """
    fa = a if isinstance(a, SaveFile) else open(a)
    fb = b if isinstance(b, SaveFile) else open(b)
    try:
        from savedir._state import make_diff

        return make_diff(fa.path, fb.path, _core.diff(fa, fb))
    finally:
        if fa is not a:
            fa.close()
        if fb is not b:
            fb.close()


class Section:
    """One section of the stream: a device (FULL) section, or a live section
    (such as ``ram``) made of a START, PARTs and an END.

    ``data`` and ``payload`` are read-only zero-copy memoryviews into the
    file's mapping; they stay valid after the file is closed.

    >>> with open("vm.sav") as f:
    ...     timer = f["timer"]
    ...     bytes(timer.data[:1]), timer.live, len(timer.payload) < timer.size
    (b'\\x04', False, True)
    """

    __slots__ = ("entries", "_file", "_fields")

    def __init__(self, entries: list[Entry], file: Optional["SaveFile"] = None) -> None:
        self.entries: list[Entry] = entries
        """The stream items of this section, in file order."""
        self._file = file
        self._fields: Optional[dict[str, Any]] = None

    @property
    def fields(self) -> dict[str, Any]:
        """The device state, field by field, decoded through the vmdesc on
        first use: a dict keyed as the vmdesc spells the names, with
        integers, bools, bytes (buffers, timers, floats), None (a NULL
        pointer), lists (arrays) and dicts (structs, and the subsections the
        save holds, under their vmsd name). A live section such as ``ram``
        has no fields (:class:`UnsupportedStreamError`), nor has a stream
        without a vmdesc.

        >>> with open("vm.sav") as f:
        ...     cpu = f["cpu"].fields
        ...     len(cpu["env.regs"]), cpu["env.segs"][1]["selector"], cpu["env.a20_mask"]
        (16, 61440, -1)
        """
        if self._fields is None:
            if self._file is None:
                raise SavedirError("this section was made without its file: get it from SaveFile.section()")
            self._fields = self._file._state_reader().fields(self._file, self.offset)
        return self._fields

    @property
    def name(self) -> str:
        return self.entries[0].name or ""

    @property
    def instance_id(self) -> int:
        return self.entries[0].instance_id or 0

    @property
    def version_id(self) -> int:
        return self.entries[0].version_id or 0

    @property
    def section_id(self) -> int:
        return self.entries[0].section_id or 0

    @property
    def live(self) -> bool:
        """True for a live (iterative) section: START, PARTs, END."""
        return self.entries[0].kind == "start"

    @property
    def offset(self) -> int:
        return self.entries[0].offset

    @property
    def size(self) -> int:
        """Bytes of all its items, headers and footers included."""
        return sum(e.size for e in self.entries)

    def _single(self) -> Entry:
        if len(self.entries) != 1:
            raise SavedirError(
                f"section {self.name!r} is live and spans {len(self.entries)} items; "
                "use .entries, or .read() for the bytes joined"
            )
        return self.entries[0]

    @property
    def data(self) -> memoryview:
        """The section's bytes (header, payload, footer), zero-copy. Live
        sections with several items have no single view: see :meth:`read`."""
        return self._single().data

    @property
    def payload(self) -> memoryview:
        """The bytes between header and footer, zero-copy."""
        return self._single().payload

    def read(self, payload: bool = False) -> bytes:
        """All the section's bytes joined (a copy): whole items, or with
        ``payload`` only the payloads between headers and footers."""
        return b"".join(e.payload if payload else e.data for e in self.entries)

    def __repr__(self) -> str:
        kind = f"live, {len(self.entries)} items" if self.live else "full"
        return f"<Section {self.name!r} instance {self.instance_id} version {self.version_id} ({kind}, {self.size} bytes)>"


class SaveFile(_core.SaveFile):
    """An open save file. Use :func:`open` to get one.

    Sections are looked up by name and optional instance id:
    ``f["cpu"]``, ``f["cpu", 1]`` or ``f.section("cpu", 1)``. The file's
    facts (``path``, ``indexed``, ``machine_type``, ``entries``,
    ``vmdesc_json``, ``changed`` ...) come straight from the native class.

    After a truncation of the file by another program, views handed out
    before read zeros past the new end; ``changed`` then says what happened,
    and the next read through the file raises :class:`FileChangedError`.
    """

    _vmdesc: Optional[dict[str, Any]] = None
    _ram: Optional["Ram"] = None

    @property
    def ram(self) -> "Ram":
        """The guest memory: a mapping of RAM block name to
        :class:`~savedir.ram.RamBlock`, with the guest-physical view
        (:class:`~savedir.ram.Ram`). Found through the page map the
        directory stores, a mapped-ram stream's bitmaps, or else a walk of
        the RAM records (which reads them all, once)."""
        if self._ram is None:
            from .ram import Ram

            self._ram = Ram(self, self.ram_map())
        return self._ram

    def section(self, name: str, instance: Optional[int] = None) -> Section:
        """The section ``name`` (instance ``instance``, or the lowest one).
        Raises :class:`SectionNotFoundError` (a :class:`KeyError`)."""
        return Section(self.find(name, instance), self)

    def sections(self) -> list[Section]:
        """Every section, in the order the stream opens them."""
        groups: dict[int, list[Entry]] = {}
        order: list[Section] = []
        for e in self.entries:
            if e.kind in ("start", "full"):
                group: list[Entry] = [e]
                if e.kind == "start":
                    groups[e.section_id or 0] = group
                order.append(Section(group, self))
            elif e.kind in ("part", "end"):
                groups[e.section_id or 0].append(e)
        return order

    def __getitem__(self, key: Union[str, tuple[str, int]]) -> Section:
        if isinstance(key, tuple):
            name, instance = key
            return self.section(name, instance)
        return self.section(key)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (SectionNotFoundError, TypeError, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[Section]:
        return iter(self.sections())

    @property
    def vmdesc(self) -> Optional[dict[str, Any]]:
        """The vmdesc, QEMU's JSON description of the device sections, or
        None when the stream has none.

        >>> with open("vm.sav") as f:
        ...     f.vmdesc["page_size"]
        4096
        """
        if self._vmdesc is None:
            raw = self.vmdesc_json
            if raw is None:
                return None
            import json

            try:
                desc = json.loads(bytes(raw))
                if not isinstance(desc, dict):
                    raise ValueError("expected a JSON object")
                self._vmdesc = desc
            except (ValueError, UnicodeDecodeError) as e:
                offset = self.vmdesc_offset
                err = FormatError(f"{self.path}: at offset {offset}: the vmdesc is not valid JSON ({e})")
                err.path, err.offset = self.path, offset
                raise err from None
        return self._vmdesc

    _reader: Optional[_core.StateReader] = None

    def _state_reader(self) -> _core.StateReader:
        if self._reader is None:
            self._reader = _core.StateReader(self)
        return self._reader

    def state(self, *sections: Union[str, tuple[str, Optional[int]]]) -> State:
        """The state of every section (or of the ``sections`` named, each a
        name for all its instances or a ``(name, instance)`` pair), decoded
        through the vmdesc: see :attr:`Section.fields`. Only those sections
        are read (through the directory, when the file has one).

        >>> with open("vm.sav") as f:
        ...     s = f.state("cpu", ("dma", 1))
        ...     [(x.name, x.instance_id) for x in s.sections], s.sections[0].fields["env.eip"]
        ([('cpu', 0), ('dma', 1)], 65520)
        """
        want: Optional[list[tuple[str, Optional[int]]]] = None
        if sections:
            want = [(s, None) if isinstance(s, str) else (s[0], s[1]) for s in sections]
        raw = self._state_reader().state(self, want)
        from savedir._state import SectionState, State

        return State(path=self.path, sections=[SectionState(**d) for d in raw])

    @property
    def cpus(self) -> list[Cpu]:
        """Every vCPU's registers (x86), by index: general registers, rip,
        rflags, segment registers, descriptor tables, control registers,
        efer and debug registers.

        >>> with open("vm.sav") as f:
        ...     c = f.cpus[0]
        ...     hex(c.rip), hex(c.cs.base), hex(c.cr0)
        ('0xfff0', '0xffff0000', '0x60000010')
        """
        from savedir._state import Cpu

        return [Cpu.from_dict(d) for d in self._state_reader().cpus(self)]

    def __repr__(self) -> str:
        if self.closed:
            return "<savedir.SaveFile (closed)>"
        return f"<savedir.SaveFile {self.path} ({'indexed' if self.indexed else 'not indexed'})>"
