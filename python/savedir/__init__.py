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

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from savedir import _core
from savedir._core import Entry
from savedir.errors import (
    DirectoryError,
    FileChangedError,
    FormatError,
    NotAStreamError,
    SavedirError,
    SectionNotFoundError,
    TrailingDataError,
    TruncatedError,
    UnsupportedStreamError,
)

__version__: str = _core.__version__

__all__ = [
    "open",
    "index",
    "verify",
    "strip",
    "record",
    "Recorder",
    "SaveFile",
    "Section",
    "Entry",
    "IndexResult",
    "VerifyResult",
    "StripResult",
    "RecordResult",
    "SavedirError",
    "FormatError",
    "NotAStreamError",
    "TruncatedError",
    "UnsupportedStreamError",
    "DirectoryError",
    "TrailingDataError",
    "SectionNotFoundError",
    "FileChangedError",
]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class IndexResult:
    """What :func:`index` did to one file."""

    path: str
    written: bool
    """False when the file already had a valid directory and was left as it was."""
    entries: int
    directory_offset: int
    """Where the directory starts: the stream's end."""
    directory_size: int
    replaced: int
    """Bytes after the stream that ``force=True`` replaced."""
    sidecar: Optional[str] = None
    """The sidecar directory (``FILE.savedir``) written or found, if any."""


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify` for one file.

    ``check`` names the first check that failed (``"trailer"``,
    ``"directory"``, ``"cross-check"`` or ``"deep"``), ``offset`` is where.
    """

    path: str
    ok: bool
    check: Optional[str]
    offset: Optional[int]
    message: str
    entries: int
    deep: bool

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        """The shape ``savedir verify --json`` prints."""
        return {
            "path": self.path,
            "ok": self.ok,
            "check": self.check,
            "offset": self.offset,
            "message": self.message,
        }


@dataclass(frozen=True)
class StripResult:
    """What :func:`strip` did to one file."""

    path: str
    removed: int
    """Bytes removed; 0 when the file already ended with the stream."""
    stream_end: int
    sidecar: Optional[str] = None
    """The sidecar directory that was deleted, if any."""


@dataclass(frozen=True)
class RecordResult:
    """What a finished :class:`Recorder` wrote."""

    path: str
    stream_size: int
    entries: int
    directory_offset: int
    directory_size: int
    reread: bool
    """True when device sections had to be re-read from the file: a footer's
    bytes inside device data fooled the one-pass parse (rare)."""
    sidecar: Optional[str] = None
    """The sidecar directory written (``sidecar=True``), if any."""


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

    def __init__(self, path: PathLike, *, checksums: bool = True, sidecar: bool = False) -> None:
        super().__init__()
        self.path: str = os.fspath(path)
        self.result: Optional[RecordResult] = None
        """Set once :meth:`close` has appended the directory."""
        self._rec = _core.Recorder(self.path, checksums, sidecar)

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
            self.result = RecordResult(**self._rec.finish())
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
) -> RecordResult:
    """Records a migration stream into ``path`` and appends its directory.

    ``source`` is a binary file object to read the stream from, or None for
    this process's standard input, which is then read in Rust without the
    GIL (what ``savedir record`` does). With ``sidecar`` the directory goes
    to ``path + ".savedir"`` and ``path`` holds only the stream. See
    :class:`Recorder`.

    >>> import builtins
    >>> with builtins.open("vm.sav", "rb") as src:
    ...     record("copy.sav", src).entries > 10
    True
    """
    if source is None:
        return RecordResult(**_core.record_stdin(os.fspath(path), checksums, progress, sidecar))
    with Recorder(path, checksums=checksums, sidecar=sidecar) as rec:
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

    >>> r = index("vm.sav")
    >>> r.written, r.entries > 10
    (True, True)
    >>> index("vm.sav").written
    False
    """
    return IndexResult(**_core.index(os.fspath(path), force, checksums, progress, sidecar, offset))


def verify(path: PathLike, *, deep: bool = False, progress: bool = False, offset: Optional[int] = None) -> VerifyResult:
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
    return VerifyResult(**_core.verify(os.fspath(path), deep, progress, offset))


def strip(path: PathLike, *, force: bool = False, offset: Optional[int] = None) -> StripResult:
    """Truncates ``path`` back to the stream's end, removing the directory:
    the file is then byte for byte what QEMU wrote. A sidecar directory is
    deleted.

    >>> before = os.path.getsize("vm.sav")
    >>> _ = index("vm.sav")
    >>> strip("vm.sav").removed > 0, os.path.getsize("vm.sav") == before
    (True, True)
    """
    return StripResult(**_core.strip(os.fspath(path), force, offset))


def open(  # noqa: A001
    path: PathLike, *, scan: bool = False, progress: bool = False, offset: Optional[int] = None
) -> "SaveFile":
    """Opens a save file for reading.

    With a valid directory (appended, or a sidecar ``path + ".savedir"``) the
    file is opened through it, touching only its tail; without one, the
    stream is parsed from the start. ``scan=True`` ignores any directory. A
    damaged directory, or a sidecar that no longer matches its file, raises
    :class:`DirectoryError`. ``offset``: see :func:`index`.

    >>> with open("vm.sav") as f:
    ...     f.indexed, f.entries[0].kind, f.machine_type.startswith("pc-")
    (False, 'configuration', True)
    """
    return SaveFile(_core.open(os.fspath(path), scan, progress, offset))


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

    __slots__ = ("entries",)

    def __init__(self, entries: list[Entry]) -> None:
        self.entries: list[Entry] = entries
        """The stream items of this section, in file order."""

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


class SaveFile:
    """An open save file. Use :func:`open` to get one.

    Sections are looked up by name and optional instance id:
    ``f["cpu"]``, ``f["cpu", 1]`` or ``f.section("cpu", 1)``.
    """

    def __init__(self, core: _core.SaveFile) -> None:
        self._core: Optional[_core.SaveFile] = core
        self._entries: Optional[list[Entry]] = None
        self._vmdesc: Optional[dict[str, Any]] = None

    @property
    def _f(self) -> _core.SaveFile:
        if self._core is None:
            raise ValueError("I/O operation on a closed save file")
        return self._core

    def close(self) -> None:
        """Drops this object's hold on the mapping. Views already handed out
        stay valid; the file is unmapped when the last one is gone."""
        self._core = None
        self._entries = None

    def __enter__(self) -> "SaveFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return str(self._f.path)

    @property
    def indexed(self) -> bool:
        """True when the file was opened through a valid directory."""
        return self._f.indexed

    @property
    def stream_start(self) -> int:
        return self._f.stream_start

    @property
    def stream_end(self) -> int:
        """One past the stream's last byte (the vmdesc included)."""
        return self._f.stream_end

    @property
    def eof(self) -> int:
        """Offset of the stream's EOF byte."""
        return self._f.eof

    @property
    def file_size(self) -> int:
        return self._f.file_size

    @property
    def footers(self) -> bool:
        """True when the stream's sections end in footers."""
        return self._f.footers

    @property
    def machine_type(self) -> Optional[str]:
        """The machine type from the configuration section, e.g. ``pc-q35-10.0``."""
        return self._f.machine_type

    @property
    def directory_offset(self) -> Optional[int]:
        return self._f.directory_offset

    @property
    def sidecar(self) -> Optional[str]:
        """The sidecar directory the file was opened through, or None."""
        p = self._f.sidecar
        return None if p is None else str(p)

    @property
    def container(self) -> Optional[dict[str, Any]]:
        """What wraps the stream: None for a bare stream, or for a libvirt
        save image ``{"kind": "libvirt", "domain_name", "domain_uuid",
        "format", "was_running", "version"}``."""
        return self._f.container()

    @property
    def stream_found_by_scan(self) -> bool:
        """True when the stream was found by looking for its magic."""
        return self._f.stream_found_by_scan

    @property
    def entries(self) -> list[Entry]:
        """Every top-level item of the stream, in file order."""
        if self._entries is None:
            self._entries = self._f.entries()
        return list(self._entries)

    def section(self, name: str, instance: Optional[int] = None) -> Section:
        """The section ``name`` (instance ``instance``, or the lowest one).
        Raises :class:`SectionNotFoundError` (a :class:`KeyError`)."""
        return Section(self._f.find(name, instance))

    def sections(self) -> list[Section]:
        """Every section, in the order the stream opens them."""
        groups: dict[int, list[Entry]] = {}
        order: list[Section] = []
        for e in self.entries:
            if e.kind in ("start", "full"):
                group: list[Entry] = [e]
                if e.kind == "start":
                    groups[e.section_id or 0] = group
                order.append(Section(group))
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
    def vmdesc_json(self) -> Optional[memoryview]:
        """The vmdesc JSON bytes as QEMU wrote them, zero-copy, or None."""
        return self._f.vmdesc_json()

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
            try:
                desc = json.loads(bytes(raw))
                if not isinstance(desc, dict):
                    raise ValueError("expected a JSON object")
                self._vmdesc = desc
            except (ValueError, UnicodeDecodeError) as e:
                offset = self._f.vmdesc_offset()
                err = FormatError(f"{self.path}: at offset {offset}: the vmdesc is not valid JSON ({e})")
                err.path, err.offset = self.path, offset
                raise err from None
        return self._vmdesc

    def view(self, start: int, end: int) -> memoryview:
        """Bytes ``start..end`` of the file, zero-copy and read-only."""
        return self._f.view(start, end)

    def verify(self, deep: bool = False, progress: bool = False) -> VerifyResult:
        """Verifies the directory of this open file (see :func:`verify`)."""
        return VerifyResult(**self._f.verify(deep, progress))

    def __repr__(self) -> str:
        state = "indexed" if self._core is not None and self.indexed else "not indexed"
        return f"<savedir.SaveFile {self.path if self._core else '(closed)'} ({state})>"
