"""A catalog of many saves: one row per stream item of each file, written as
Parquet (with ``pyarrow``: ``pip install savedir[catalog]``) or JSON Lines,
for DuckDB, pandas or any other reader of those formats.

The rows are those of ``savedir ls --json``, one per entry, with the file's
facts beside each: see :data:`COLUMNS`. Files are opened in parallel
(:func:`savedir.open_many`), and rows are written as the files come, a few
thousand at a time, so memory stays bounded whatever the size of the fleet.

>>> import savedir.catalog
>>> s = savedir.catalog.write(["vm.sav"], "fleet.jsonl")
>>> (s.files, s.failed, s.status), s.rows == len(savedir.open("vm.sav").entries)
((1, 0, 0), True)
>>> next(savedir.catalog.rows(["vm.sav"]))["kind"]
'configuration'
"""

from __future__ import annotations

import os

import savedir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator, Optional

    from savedir import Paths, PathLike

#: The columns, in order, with their Parquet types; None where an item has
#: no such field (``section_id``, ``name``, ``instance_id`` and
#: ``version_id`` are a section's, ``command_name`` a command's, ``crc32c``
#: when the directory stores one, ``machine_type`` when the stream says it).
COLUMNS = (
    ("path", "string"),
    ("file_size", "uint64"),
    ("machine_type", "string"),
    ("indexed", "bool_"),
    ("kind", "string"),
    ("section_id", "uint32"),
    ("name", "string"),
    ("instance_id", "uint32"),
    ("version_id", "uint32"),
    ("command_name", "string"),
    ("offset", "uint64"),
    ("size", "uint64"),
    ("crc32c", "uint32"),
)

#: Rows written at a time (one Parquet row group each).
BATCH_ROWS = 65536


class CatalogError(Exception):
    """The catalog cannot be written (an unknown format, pyarrow missing)."""


class Summary:
    """What :func:`write` wrote: ``rows`` from ``files`` files, of which
    ``failed`` gave none; ``status`` is the worst exit status of the files,
    as the command line gives it."""

    __slots__ = ("files", "failed", "rows", "status")

    def __init__(self) -> None:
        self.files = self.failed = self.rows = self.status = 0

    def __repr__(self) -> str:
        return f"Summary(files={self.files}, failed={self.failed}, rows={self.rows}, status={self.status})"


def file_rows(path: str, f: savedir.SaveFile) -> list[dict[str, Any]]:
    """The rows of one open file."""
    base = {"path": path, "file_size": f.file_size, "machine_type": f.machine_type, "indexed": f.indexed}
    out = []
    for e in f.entries:
        row = dict(base)
        row.update(
            kind=e.kind,
            section_id=e.section_id,
            name=e.name,
            instance_id=e.instance_id,
            version_id=e.version_id,
            command_name=e.command_name,
            offset=e.offset,
            size=e.size,
            crc32c=e.crc32c,
        )
        out.append(row)
    return out


def _batches(
    paths: Paths,
    summary: Summary,
    on_result: Optional[Callable[[savedir.BatchResult], None]],
    progress: bool,
    *,
    skip: tuple[str, ...] = (),
    **options: Any,
) -> Iterator[list[dict[str, Any]]]:
    from savedir.cli import result_status

    skip = tuple(os.path.realpath(p) for p in skip)
    batch = savedir.open_many(paths, ordered=True, progress=progress, **options)
    with batch:
        for r in batch:
            if skip and os.path.realpath(r.path) in skip:
                continue  # the catalog itself, in a folder it catalogs
            summary.files += 1
            summary.status = max(summary.status, result_status(r))
            if on_result is not None:
                if progress:
                    batch.suspend(lambda: on_result(r))
                else:
                    on_result(r)
            if r.file is None:
                summary.failed += 1
                continue
            with r.file as f:
                rows = file_rows(r.path, f)
            summary.rows += len(rows)
            yield rows


def rows(
    paths: Paths,
    *,
    jobs: Optional[int] = None,
    recursive: bool = False,
    scan: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
) -> Iterator[dict[str, Any]]:
    """Every row of the catalog of ``paths`` (files and folders), file by
    file in the order given; files that cannot be read give none."""
    summary = Summary()
    opts: dict[str, Any] = dict(jobs=jobs, recursive=recursive, scan=scan, offset=offset, wait=wait, vmdesc=vmdesc)
    for batch in _batches(paths, summary, None, False, **opts):
        yield from batch


def write(
    paths: Paths,
    output: PathLike,
    *,
    format: Optional[str] = None,
    jobs: Optional[int] = None,
    recursive: bool = False,
    progress: bool = False,
    scan: bool = False,
    offset: Optional[int] = None,
    wait: bool = False,
    vmdesc: Optional[PathLike] = None,
    on_result: Optional[Callable[[savedir.BatchResult], None]] = None,
) -> Summary:
    """Writes the catalog of ``paths`` (files and folders, see
    :func:`savedir.open_many`) to ``output``: Parquet or JSON Lines, by
    ``format`` (``"parquet"`` or ``"jsonl"``) or else by the name's ending
    (``.parquet``, ``.jsonl``). The file appears whole (written beside it,
    then renamed) or not at all. ``on_result`` is called with each file's
    :class:`savedir.BatchResult` (to report the files that fail)."""
    out = os.fspath(output)
    fmt = format or ("parquet" if out.endswith(".parquet") else "jsonl" if out.endswith(".jsonl") else None)
    if fmt not in ("parquet", "jsonl"):
        raise CatalogError(f"{out}: the catalog is written as FILE.parquet or FILE.jsonl")
    summary = Summary()
    opts: dict[str, Any] = dict(jobs=jobs, recursive=recursive, scan=scan, offset=offset, wait=wait, vmdesc=vmdesc)
    tmp = f"{out}.tmp{os.getpid()}"
    batches = _batches(paths, summary, on_result, progress, skip=(out, tmp), **opts)
    try:
        if fmt == "parquet":
            _write_parquet(tmp, batches)
        else:
            _write_jsonl(tmp, batches)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return summary


def _write_jsonl(path: str, batches: Iterator[list[dict[str, Any]]]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for batch in batches:
            f.write("".join(json.dumps(r) + "\n" for r in batch))


def _write_parquet(path: str, batches: Iterator[list[dict[str, Any]]]) -> None:
    import importlib

    try:
        pa: Any = importlib.import_module("pyarrow")
        pq: Any = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise CatalogError("writing Parquet needs pyarrow: pip install 'savedir[catalog]' (or write FILE.jsonl)") from None
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])
    names = [name for name, _ in COLUMNS]
    with pq.ParquetWriter(path, schema) as w:
        pending: list[dict[str, Any]] = []

        def flush() -> None:
            cols = {n: [r[n] for r in pending] for n in names}
            w.write_table(pa.Table.from_pydict(cols, schema=schema))
            pending.clear()

        for batch in batches:
            pending.extend(batch)
            if len(pending) >= BATCH_ROWS:
                flush()
        if pending:
            flush()
