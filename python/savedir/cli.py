"""The ``savedir`` command. Everything it does goes through the public API.

Every subcommand is declared once, in :data:`COMMANDS`: its positional
arguments, its options and the function that runs it. That table builds the
``argparse`` parser, and is read directly by :func:`_parse_fast`, which
parses the common command lines (exact option names, nothing unusual)
without importing ``argparse`` (which imports ``re``, ``gettext`` ...: most
of what a short command would cost). Anything the fast path does not
recognise goes to ``argparse``, so errors, help and abbreviations behave as
they always did. Modules a command needs (``json``, ``pyarrow``) are
imported when it runs.

Adding a subcommand is one entry: ``Command(name, help, handler, args=...,
options=...)``, the handler a function of this module or a
``"module:function"`` string imported only when the command runs (see
:class:`Command`, :class:`Arg`, :class:`Opt`).
"""

from __future__ import annotations

import sys

import savedir
from savedir.errors import FileLockedError, SavedirError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable, Optional, Sequence, Union

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_ERROR = 2

EPILOG = """\
exit status:
  0  success (verify: every file is valid)
  1  a file is invalid: it fails a check, has no directory (verify), or is not
     a stream savedir can handle
  2  usage error, an I/O error (missing file, no permission), or the file is
     busy (held by a reader, or being written by savedir; --wait waits)
"""


def _progress(a: Any = None) -> bool:
    return not getattr(a, "quiet", False) and sys.stderr.isatty()


def _err(msg: str) -> None:
    print(f"savedir: {msg}", file=sys.stderr)


def _message(exc: BaseException) -> str:
    """``vm.sav: cannot open: No such file or directory``: the file and the reason, once each."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _status(exc: BaseException) -> int:
    if isinstance(exc, FileLockedError):
        return EXIT_ERROR
    return EXIT_INVALID if isinstance(exc, SavedirError) else EXIT_ERROR


def _each(paths: Sequence[str], fn: Callable[[str], int]) -> int:
    """Runs ``fn`` on every path; reports errors and returns the worst status."""
    worst = EXIT_OK
    for p in paths:
        try:
            status = fn(p)
        except (SavedirError, OSError) as e:
            _err(_message(e))
            status = _status(e)
        worst = max(worst, status)
    return worst


# ---------------------------------------------------------------------------
# batches: index, verify, ls, catalog


def result_status(r: savedir.BatchResult) -> int:
    if r.error is not None:
        return _status(r.error)
    return EXIT_OK if r.ok else EXIT_INVALID


class _Out:
    """Prints a batch's output: above its progress bar when one is drawn,
    and at once (``--jsonl`` lines are read as they come)."""

    def __init__(self, batch: savedir.Batch, a: Any) -> None:
        self.batch = batch
        self.bar = _progress(a)
        self.flush = bool(getattr(a, "jsonl", False))

    def _write(self, text: str, err: bool) -> None:
        stream = sys.stderr if err else sys.stdout
        stream.write(text)
        if self.flush or self.bar:
            stream.flush()

    def __call__(self, text: str, err: bool = False) -> None:
        if self.bar:
            self.batch.suspend(lambda: self._write(text, err))
        else:
            self._write(text, err)

    def error(self, exc: BaseException) -> None:
        self(f"savedir: {_message(exc)}\n", err=True)


def _jsonl(r: savedir.BatchResult, extra: Optional[dict[str, Any]] = None) -> str:
    import json

    d = r.to_dict()
    d["status"] = result_status(r)
    if extra:
        d.update(extra)
    return json.dumps(d) + "\n"


def _batch(a: Any, many: Callable[..., savedir.Batch], **options: Any) -> savedir.Batch:
    return many(
        a.files,
        jobs=a.jobs,
        recursive=a.recursive,
        ordered=not a.jsonl,
        progress=_progress(a),
        offset=a.offset,
        wait=a.wait,
        vmdesc=a.vmdesc,
        **options,
    )


def _index_text(p: str, r: savedir.IndexResult) -> str:
    if r.written and r.sidecar:
        ram = f"RAM page map of {r.ram_map_size} bytes and " if r.ram_map_size else ""
        return f"{p}: indexed, {r.entries} entries, {ram}directory of {r.directory_size} bytes in {r.sidecar}\n"
    if r.written:
        extra = f", replaced {r.replaced} bytes after the stream" if r.replaced else ""
        ram = f"RAM page map of {r.ram_map_size} bytes, " if r.ram_map_size else ""
        return (
            f"{p}: indexed, {r.entries} entries, {ram}directory of {r.directory_size} bytes "
            f"at offset {r.directory_offset}{extra}\n"
        )
    return f"{p}: already indexed ({r.entries} entries)\n"


def cmd_index(a: Any) -> int:
    batch = _batch(
        a, savedir.index_many, force=a.force, checksums=not a.no_checksums, sidecar=a.sidecar, ram_map=not a.no_ram_map
    )
    out, worst = _Out(batch, a), EXIT_OK
    with batch:
        for r in batch:
            status = result_status(r)
            worst = max(worst, status)
            res = r.result
            if a.jsonl:
                out(_jsonl(r, res.to_dict() if res is not None else None))
            elif r.error is not None:
                out.error(r.error)
            elif isinstance(res, savedir.IndexResult):
                if a.json:
                    import json

                    out(json.dumps(res.to_dict()) + "\n")
                elif not a.quiet:
                    out(_index_text(r.path, res))
    return worst


VERIFY_JSON = ("path", "ok", "check", "offset", "message")


def cmd_verify(a: Any) -> int:
    batch = _batch(a, savedir.verify_many, deep=a.deep)
    out, worst = _Out(batch, a), EXIT_OK
    results: list[dict[str, Any]] = []
    with batch:
        for r in batch:
            status = result_status(r)
            worst = max(worst, status)
            res = r.result
            e = r.error
            if e is not None:
                d = {"path": r.path, "ok": False, "check": None, "offset": getattr(e, "offset", None), "message": _message(e)}
            else:
                assert isinstance(res, savedir.VerifyResult)
                full = res.to_dict()
                d = {k: full[k] for k in VERIFY_JSON}
            if a.jsonl:
                out(_jsonl(r, d))
            elif a.json:
                results.append(d)
            elif e is not None:
                out.error(e)
            elif isinstance(res, savedir.VerifyResult):
                if res.ok:
                    if not a.quiet:
                        out(f"{r.path}: OK ({res.message})\n")
                else:
                    where = f" at offset {res.offset}" if res.offset is not None else ""
                    out(f"{r.path}: FAILED {res.check} check{where}: {res.message}\n")
    if a.json:
        import json

        print(json.dumps(results, indent=2))
    return worst


def _ls_row(e: savedir.Entry) -> str:
    if e.kind == "command":
        return f"{e.offset:>12} {e.size:>12}  {e.kind:<13} {'':>4}  {e.command_name or ''}"
    if e.section_id is not None:
        return (
            f"{e.offset:>12} {e.size:>12}  {e.kind:<13} {e.section_id:>4}  {e.name or '':<32} "
            f"{e.instance_id:>4} {e.version_id:>4}"
        )
    return f"{e.offset:>12} {e.size:>12}  {e.kind:<13}"


def ls_dict(path: str, f: savedir.SaveFile) -> dict[str, Any]:
    """What ``savedir ls --json`` prints for one file."""
    return {
        "path": path,
        "stream_start": f.stream_start,
        "stream_end": f.stream_end,
        "eof": f.eof,
        "indexed": f.indexed,
        "machine_type": f.machine_type,
        "sidecar": f.sidecar,
        "container": f.container,
        "entries": [e.to_dict() for e in f.entries],
    }


def _ls_text(path: str, f: savedir.SaveFile) -> str:
    if f.sidecar:
        how = f"read through the sidecar {f.sidecar}"
    elif f.indexed:
        how = f"read through its directory at offset {f.directory_offset}"
    else:
        how = "not indexed: read by parsing the stream"
    lines = [f"{path}: {f.machine_type or 'unknown machine type'}, stream {f.stream_start}..{f.stream_end}, {how}"]
    c = f.container
    if c is not None:
        lines.append(f"libvirt save image: domain {c['domain_name']!r}, uuid {c['domain_uuid']}, format {c['format']}")
    elif f.stream_found_by_scan:
        lines.append(f"stream found at offset {f.stream_start} (behind {f.stream_start} bytes of unknown header)")
    lines.append(f"{'OFFSET':>12} {'SIZE':>12}  {'KIND':<13} {'ID':>4}  {'NAME':<32} {'INST':>4} {'VER':>4}")
    # In file order: the EOF byte comes before the vmdesc that follows it.
    rows = [(e.offset, _ls_row(e)) for e in f.entries]
    rows.append((f.eof, f"{f.eof:>12} {1:>12}  eof"))
    rows.sort(key=lambda r: r[0])
    lines += [row for _, row in rows]
    return "\n".join(lines) + "\n"


def cmd_ls(a: Any) -> int:
    import os

    # One file named: one JSON object, as ever; several, or a folder: a list.
    single = len(a.files) == 1 and not os.path.isdir(a.files[0])
    batch = _batch(a, savedir.open_many, scan=a.scan)
    out, worst = _Out(batch, a), EXIT_OK
    listed: list[dict[str, Any]] = []
    first = True
    with batch:
        for r in batch:
            status = result_status(r)
            worst = max(worst, status)
            if r.error is not None:
                if a.jsonl:
                    out(_jsonl(r))
                else:
                    out.error(r.error)
                continue
            with r.file as f:
                if a.jsonl:
                    out(_jsonl(r, ls_dict(r.path, f)))
                elif a.json:
                    listed.append(ls_dict(r.path, f))
                else:
                    out(("" if first else "\n") + _ls_text(r.path, f))
                    first = False
    if a.json and (listed or not single):
        import json

        print(json.dumps(listed[0] if single else listed, indent=2))
    return worst


def cmd_catalog(a: Any) -> int:
    from savedir import catalog

    def report(r: savedir.BatchResult) -> None:
        if r.error is not None:
            _err(_message(r.error))

    try:
        summary = catalog.write(
            a.files,
            a.output,
            jobs=a.jobs,
            recursive=a.recursive,
            progress=_progress(a),
            scan=a.scan,
            offset=a.offset,
            wait=a.wait,
            vmdesc=a.vmdesc,
            on_result=report,
        )
    except catalog.CatalogError as e:
        _err(str(e))
        return EXIT_ERROR
    if not a.quiet:
        print(f"{a.output}: {summary.rows} rows from {summary.files} files")
    return summary.status


# ---------------------------------------------------------------------------
# one file at a time: cat, desc, record, strip


def cmd_cat(a: Any) -> int:
    with savedir.open(a.file, progress=_progress(), offset=a.offset, wait=a.wait, vmdesc=a.vmdesc) as f:
        sec = f.section(a.name, a.instance)
        out = sys.stdout.buffer
        for e in sec.entries:
            out.write(e.payload if a.payload else e.data)
        out.flush()
    return EXIT_OK


def cmd_desc(a: Any) -> int:
    with savedir.open(a.file, progress=_progress(), offset=a.offset, wait=a.wait, vmdesc=a.vmdesc) as f:
        raw = f.vmdesc_json
        if raw is None:
            _err(f"{a.file}: the stream has no vmdesc")
            return EXIT_INVALID
        if a.pretty:
            import json

            print(json.dumps(f.vmdesc, indent=2))
        else:
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.write(b"\n")
            sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_record(a: Any) -> int:
    r = savedir.record(
        a.file, checksums=not a.no_checksums, progress=_progress(), sidecar=a.sidecar, wait=a.wait, ram_map=not a.no_ram_map
    )
    if not a.quiet:
        print(f"{a.file}: recorded {r.stream_size} bytes, {r.entries} entries, directory of {r.directory_size} bytes")
    return EXIT_OK


def cmd_strip(a: Any) -> int:
    def one(p: str) -> int:
        r = savedir.strip(p, force=a.force, offset=a.offset, wait=a.wait, vmdesc=a.vmdesc)
        if not a.quiet:
            if r.sidecar:
                print(f"{p}: removed the sidecar {r.sidecar}")
            if r.removed or not r.sidecar:
                print(f"{p}: removed {r.removed} bytes" if r.removed else f"{p}: nothing after the stream")
        return EXIT_OK

    return _each(a.files, one)


# ---------------------------------------------------------------------------
# guest memory and device state: ram, state, regs, diff (their modules, and
# argparse, are imported only when one of them runs)


def cmd_ram(a: Any) -> int:
    from savedir import _ram_cli

    return _ram_cli.run(a, _progress())


def _ram_arguments(sp: argparse.ArgumentParser) -> None:
    from savedir import _ram_cli

    _ram_cli.add_arguments(sp)


def _state_arguments(sp: argparse.ArgumentParser) -> None:
    from savedir import _state_cli

    _state_cli.state_arguments(sp)


def _regs_arguments(sp: argparse.ArgumentParser) -> None:
    from savedir import _state_cli

    _state_cli.regs_arguments(sp)


def _diff_arguments(sp: argparse.ArgumentParser) -> None:
    from savedir import _state_cli

    _state_cli.diff_arguments(sp)


# ---------------------------------------------------------------------------
# the command table


class Opt:
    """One option: ``value`` None for a flag (store_true), else the function
    that reads its value (``str``, ``int`` ...: a ValueError refuses it),
    with its allowed ``choices`` if any. Its name in the parsed arguments is
    its first long flag's, dashes made underscores."""

    __slots__ = ("flags", "dest", "help", "value", "metavar", "default", "choices")

    def __init__(
        self,
        *flags: str,
        help: str,
        value: Optional[Callable[[str], Any]] = None,
        metavar: Optional[str] = None,
        default: Any = None,
        choices: Optional[Sequence[Any]] = None,
    ) -> None:
        self.flags = flags
        long = next((f for f in flags if f.startswith("--")), flags[0])
        self.dest = long.lstrip("-").replace("-", "_")
        self.help = help
        self.value = value
        self.metavar = metavar
        self.default = False if value is None else default
        self.choices = choices


class Arg:
    """One positional argument: ``many`` for one or more (``nargs="+"``)."""

    __slots__ = ("dest", "metavar", "help", "many")

    def __init__(self, dest: str, metavar: str, help: Optional[str] = None, many: bool = False) -> None:
        self.dest, self.metavar, self.help, self.many = dest, metavar, help, many


class Command:
    """A subcommand: its name and help, the function that runs it (given the
    parsed arguments, returns the exit status), its positional arguments and
    options; ``offset`` adds ``--offset`` and ``--vmdesc`` (every command has
    ``--wait``). ``extra``, when given, adds arguments to the command's
    argparse parser that the table cannot say; such a command is always
    parsed by argparse."""

    __slots__ = ("name", "help", "handler", "args", "options", "offset", "extra")

    def __init__(
        self,
        name: str,
        help: str,
        handler: Union[str, Callable[[Any], int]],
        args: Sequence[Arg] = (),
        options: Sequence[Opt] = (),
        offset: bool = True,
        extra: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    ) -> None:
        self.name, self.help, self.handler = name, help, handler
        self.args, self.options, self.offset, self.extra = tuple(args), tuple(options), offset, extra

    def all_options(self) -> tuple[Opt, ...]:
        common = [WAIT] + ([OFFSET, VMDESC] if self.offset else [])
        return tuple(common) + self.options

    def function(self) -> Callable[[Any], int]:
        h = self.handler
        if callable(h):
            return h
        module, _, name = h.partition(":")
        fn: Callable[[Any], int] = getattr(__import__(module, fromlist=[name]), name)
        return fn


def jobs(text: str) -> int:
    """A number of files done at once: 1 or more."""
    n = int(text)
    if n < 1:
        raise ValueError(text)
    return n


WAIT = Opt(
    "--wait",
    help="wait while the file is busy (held open by a reader, or being written by savedir) instead of failing",
)
OFFSET = Opt(
    "--offset",
    value=int,
    metavar="N",
    help="the stream starts at byte N (default: found at 0, behind a libvirt header, or at a page boundary in the first MiB)",
)
VMDESC = Opt(
    "--vmdesc",
    value=str,
    metavar="FILE",
    help="delimit device sections by this vmdesc (a JSON file, or a save of the same VM that has one) "
    "when the stream has neither section footers nor a vmdesc",
)
PATHS = Arg("files", "PATH", "a save file, or a folder of them", many=True)
JOBS = Opt("-j", "--jobs", value=jobs, metavar="N", help="files done at once (default: one per CPU)")
RECURSIVE = Opt("-r", "--recursive", help="also the files in the subfolders of the folders given")
JSONL = Opt("--jsonl", help="one JSON object per file, printed as each file is done")
#: What every command over many files takes.
BATCH = (JOBS, RECURSIVE)


COMMANDS: list[Command] = [
    Command(
        "index",
        "append a section directory after each file's stream",
        cmd_index,
        args=[PATHS],
        options=[
            Opt("--force", help="rewrite an existing directory; replace unknown bytes after the stream"),
            Opt("--no-checksums", help="write no CRC-32C entries"),
            Opt("--sidecar", help="write the directory to FILE.savedir and leave FILE unchanged"),
            Opt("--no-ram-map", help="store no RAM page map (readers then walk the RAM records)"),
            Opt("--json", help="one JSON object per file"),
            JSONL,
            *BATCH,
            Opt("-q", "--quiet", help="print nothing on success, and no progress"),
        ],
    ),
    Command(
        "verify",
        "check each file's directory (and with --deep, the whole stream)",
        cmd_verify,
        args=[PATHS],
        options=[
            Opt("--deep", help="also parse the whole stream and check every checksum"),
            Opt("--json", help="print a JSON list of results"),
            JSONL,
            *BATCH,
            Opt("-q", "--quiet", help="print only the files that fail, and no progress"),
        ],
    ),
    Command(
        "ls",
        "list the stream's items (through the directory, or by parsing)",
        cmd_ls,
        args=[PATHS],
        options=[
            Opt("--json", help="print JSON (a list for several files or a folder)"),
            JSONL,
            Opt("--scan", help="ignore any directory and parse the stream"),
            *BATCH,
            Opt("-q", "--quiet", help="no progress"),
        ],
    ),
    Command(
        "catalog",
        "write one row per item of each file to a Parquet or JSON Lines file (for DuckDB, pandas ...)",
        cmd_catalog,
        args=[PATHS],
        options=[
            Opt("-o", "--output", value=str, metavar="FILE", help="FILE.parquet (needs pyarrow) or FILE.jsonl"),
            Opt("--scan", help="ignore any directory and parse the stream"),
            *BATCH,
            Opt("-q", "--quiet", help="print nothing on success, and no progress"),
        ],
    ),
    Command(
        "cat",
        "write a section's bytes to stdout (a live section's items joined in order)",
        cmd_cat,
        args=[
            Arg("file", "FILE"),
            Arg("name", "NAME", "section name, e.g. ram, cpu, 0000:00:02.0/virtio-net"),
        ],
        options=[
            Opt("--instance", value=int, help="instance id (default: the lowest)"),
            Opt("--payload", help="only the payloads, without headers and footers"),
        ],
    ),
    Command(
        "desc",
        "print the vmdesc JSON (QEMU's description of the device sections)",
        cmd_desc,
        args=[Arg("file", "FILE")],
        options=[Opt("--pretty", help="indent the JSON")],
    ),
    Command(
        "record",
        "write the stream read on stdin to FILE and append its directory when it ends "
        '(from QEMU: migrate "exec:savedir record FILE")',
        cmd_record,
        args=[Arg("file", "FILE")],
        options=[
            Opt("--no-checksums", help="write no CRC-32C entries"),
            Opt("--sidecar", help="write the directory to FILE.savedir"),
            Opt("--no-ram-map", help="store no RAM page map (readers then walk the RAM records)"),
            Opt("-q", "--quiet", help="print nothing on success"),
        ],
        offset=False,
    ),
    Command(
        "ram",
        "show a save's guest memory: RAM blocks and guest-physical ranges; read, extract or dump it as ELF",
        cmd_ram,
        extra=_ram_arguments,
    ),
    Command(
        "state",
        "print device sections field by field, decoded through the vmdesc",
        "savedir._state_cli:cmd_state",
        extra=_state_arguments,
    ),
    Command("regs", "print every vCPU's registers (x86)", "savedir._state_cli:cmd_regs", extra=_regs_arguments),
    Command(
        "diff",
        "compare two saves: the sections, their bytes and the device fields that differ",
        "savedir._state_cli:cmd_diff",
        offset=False,
        extra=_diff_arguments,
    ),
    Command(
        "strip",
        "remove the directory: truncate each file back to its stream's end",
        cmd_strip,
        args=[Arg("files", "FILE", many=True)],
        options=[
            Opt("--force", help="also remove unknown bytes after the stream"),
            Opt("-q", "--quiet", help="print nothing on success"),
        ],
    ),
]

#: Options a command must be given (argparse reports them missing).
REQUIRED = {("catalog", "output")}


def _version(a: Any) -> int:
    print(f"savedir {savedir.__version__}")
    return EXIT_OK


class _Args:
    """What the fast path parsed (argparse's Namespace, without argparse)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _parse_fast(argv: Sequence[str]) -> Optional[_Args]:
    """Parses a plain command line without argparse, or returns None for
    anything else (which argparse then parses, errors and help included)."""
    if not argv:
        return None
    if list(argv) == ["--version"]:
        return _Args(command=None, fn=_version)
    cmd = next((c for c in COMMANDS if c.name == argv[0]), None)
    if cmd is None or cmd.extra is not None:
        return None
    opts = cmd.all_options()
    by_flag = {f: o for o in opts for f in o.flags}
    values: dict[str, Any] = {o.dest: o.default for o in opts}
    positional: list[str] = []
    block = 0  # 0: no positional yet, 1: in the positionals, 2: after them
    args = list(argv[1:])
    i = 0
    while i < len(args):
        s = args[i]
        i += 1
        if s.startswith("-") and s != "-":
            if s == "--":
                return None
            name, eq, inline = s.partition("=")
            o = by_flag.get(name if eq and s.startswith("--") else s)
            if o is None:
                return None
            if block == 1:
                block = 2
            if o.value is None:
                if eq and s.startswith("--"):
                    return None
                values[o.dest] = True
                continue
            if eq and s.startswith("--"):
                text = inline
            else:
                if i >= len(args) or args[i].startswith("-"):
                    return None
                text = args[i]
                i += 1
            try:
                values[o.dest] = o.value(text)
            except ValueError:
                return None
            if o.choices is not None and values[o.dest] not in o.choices:
                return None
            continue
        if block == 2:
            return None
        block = 1
        positional.append(s)
    # Positionals: each one, the last may take several.
    for k, a in enumerate(cmd.args):
        if a.many:
            if k != len(cmd.args) - 1 or not positional:
                return None
            values[a.dest] = positional
            positional = []
        else:
            if not positional:
                return None
            values[a.dest] = positional.pop(0)
    if positional:
        return None
    if any(values.get(dest) is None for name, dest in REQUIRED if name == cmd.name):
        return None
    return _Args(command=cmd.name, fn=cmd.function(), **values)


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="savedir",
        description="Section directories for QEMU migration streams (savevm, migrate to file, virsh save).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"savedir {savedir.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for c in COMMANDS:
        sp = sub.add_parser(
            c.name, help=c.help, description=c.help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sp.set_defaults(fn=c)
        for a in c.args:
            sp.add_argument(a.dest, nargs="+" if a.many else None, metavar=a.metavar, help=a.help)
        for o in c.all_options():
            kw: dict[str, Any] = {"help": o.help, "dest": o.dest}
            if o.value is None:
                kw["action"] = "store_true"
            else:
                kw.update(type=o.value, default=o.default)
                if o.metavar:
                    kw["metavar"] = o.metavar
                if o.choices is not None:
                    kw["choices"] = o.choices
            if (c.name, o.dest) in REQUIRED:
                kw["required"] = True
            sp.add_argument(*o.flags, **kw)
        if c.extra is not None:
            c.extra(sp)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a: Any = _parse_fast(args)
    if a is None:
        parser = build_parser()
        try:
            a = parser.parse_args(args)
        except SystemExit as e:
            return EXIT_ERROR if e.code not in (0, None) else EXIT_OK
        a.fn = a.fn.function()
    try:
        return int(a.fn(a))
    except BrokenPipeError:
        # `savedir cat ... | head`: the reader went away; not an error.
        try:
            sys.stdout.close()
        except OSError:
            pass
        return EXIT_OK
    except (SavedirError, OSError) as e:
        _err(_message(e))
        return _status(e)
    except KeyboardInterrupt:
        return 130


def script() -> None:
    """The installed ``savedir`` command: :func:`main`, its output flushed,
    then out of the process at once. Tearing the interpreter down (freeing
    every module and object one by one) would cost a short command a third
    of its time; everything the command opened is closed by then."""
    import os

    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a reader that went away (`savedir ls ... | head`)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
