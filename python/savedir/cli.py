"""The ``savedir`` command. Everything it does goes through the public API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional, Sequence

import savedir
from savedir.errors import FileLockedError, SavedirError

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


def _progress() -> bool:
    return sys.stderr.isatty()


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


def cmd_index(a: argparse.Namespace) -> int:
    def one(p: str) -> int:
        r = savedir.index(
            p,
            force=a.force,
            checksums=not a.no_checksums,
            progress=_progress(),
            sidecar=a.sidecar,
            offset=a.offset,
            wait=a.wait,
            vmdesc=a.vmdesc,
            ram_map=not a.no_ram_map,
        )
        if a.json:
            print(json.dumps(r.to_dict()))
        elif not a.quiet:
            if r.written and r.sidecar:
                ram = f"RAM page map of {r.ram_map_size} bytes and " if r.ram_map_size else ""
                print(f"{p}: indexed, {r.entries} entries, {ram}directory of {r.directory_size} bytes in {r.sidecar}")
            elif r.written:
                extra = f", replaced {r.replaced} bytes after the stream" if r.replaced else ""
                ram = f"RAM page map of {r.ram_map_size} bytes, " if r.ram_map_size else ""
                print(
                    f"{p}: indexed, {r.entries} entries, {ram}directory of {r.directory_size} bytes "
                    f"at offset {r.directory_offset}{extra}"
                )
            else:
                print(f"{p}: already indexed ({r.entries} entries)")
        return EXIT_OK

    return _each(a.files, one)


def cmd_verify(a: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []

    def one(p: str) -> int:
        try:
            r = savedir.verify(p, deep=a.deep, progress=_progress(), offset=a.offset, wait=a.wait, vmdesc=a.vmdesc)
        except (SavedirError, OSError) as e:
            if not a.json:
                raise
            results.append({"path": p, "ok": False, "check": None, "offset": getattr(e, "offset", None), "message": _message(e)})
            return _status(e)
        d = r.to_dict()
        results.append({k: d[k] for k in ("path", "ok", "check", "offset", "message")})
        if not a.json:
            if r.ok:
                print(f"{p}: OK ({r.message})")
            else:
                where = f" at offset {r.offset}" if r.offset is not None else ""
                print(f"{p}: FAILED {r.check} check{where}: {r.message}")
        return EXIT_OK if r.ok else EXIT_INVALID

    status = _each(a.files, one)
    if a.json:
        print(json.dumps(results, indent=2))
    return status


def _ls_row(e: savedir.Entry) -> str:
    if e.kind == "command":
        return f"{e.offset:>12} {e.size:>12}  {e.kind:<13} {'':>4}  {e.command_name or ''}"
    if e.section_id is not None:
        return (
            f"{e.offset:>12} {e.size:>12}  {e.kind:<13} {e.section_id:>4}  {e.name or '':<32} "
            f"{e.instance_id:>4} {e.version_id:>4}"
        )
    return f"{e.offset:>12} {e.size:>12}  {e.kind:<13}"


def cmd_ls(a: argparse.Namespace) -> int:
    with savedir.open(a.file, scan=a.scan, progress=_progress(), offset=a.offset, wait=a.wait, vmdesc=a.vmdesc) as f:
        entries = f.entries
        if a.json:
            out = {
                "path": a.file,
                "stream_start": f.stream_start,
                "stream_end": f.stream_end,
                "eof": f.eof,
                "indexed": f.indexed,
                "machine_type": f.machine_type,
                "sidecar": f.sidecar,
                "container": f.container,
                "entries": [e.to_dict() for e in entries],
            }
            print(json.dumps(out, indent=2))
            return EXIT_OK
        if f.sidecar:
            how = f"read through the sidecar {f.sidecar}"
        elif f.indexed:
            how = f"read through its directory at offset {f.directory_offset}"
        else:
            how = "not indexed: read by parsing the stream"
        print(f"{a.file}: {f.machine_type or 'unknown machine type'}, stream {f.stream_start}..{f.stream_end}, {how}")
        c = f.container
        if c is not None:
            print(f"libvirt save image: domain {c['domain_name']!r}, uuid {c['domain_uuid']}, format {c['format']}")
        elif f.stream_found_by_scan:
            print(f"stream found at offset {f.stream_start} (behind {f.stream_start} bytes of unknown header)")
        print(f"{'OFFSET':>12} {'SIZE':>12}  {'KIND':<13} {'ID':>4}  {'NAME':<32} {'INST':>4} {'VER':>4}")
        # In file order: the EOF byte comes before the vmdesc that follows it.
        rows = [(e.offset, _ls_row(e)) for e in entries]
        rows.append((f.eof, f"{f.eof:>12} {1:>12}  eof"))
        rows.sort(key=lambda r: r[0])
        for _, row in rows:
            print(row)
    return EXIT_OK


def cmd_cat(a: argparse.Namespace) -> int:
    with savedir.open(a.file, progress=_progress(), offset=a.offset, wait=a.wait, vmdesc=a.vmdesc) as f:
        sec = f.section(a.name, a.instance)
        out = sys.stdout.buffer
        for e in sec.entries:
            out.write(e.payload if a.payload else e.data)
        out.flush()
    return EXIT_OK


def cmd_desc(a: argparse.Namespace) -> int:
    with savedir.open(a.file, progress=_progress(), offset=a.offset, wait=a.wait, vmdesc=a.vmdesc) as f:
        raw = f.vmdesc_json
        if raw is None:
            _err(f"{a.file}: the stream has no vmdesc")
            return EXIT_INVALID
        if a.pretty:
            print(json.dumps(f.vmdesc, indent=2))
        else:
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.write(b"\n")
            sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_record(a: argparse.Namespace) -> int:
    r = savedir.record(
        a.file, checksums=not a.no_checksums, progress=_progress(), sidecar=a.sidecar, wait=a.wait, ram_map=not a.no_ram_map
    )
    if not a.quiet:
        print(f"{a.file}: recorded {r.stream_size} bytes, {r.entries} entries, directory of {r.directory_size} bytes")
    return EXIT_OK


def cmd_ram(a: argparse.Namespace) -> int:
    from savedir import _ram_cli

    return _ram_cli.run(a, _progress())


def cmd_strip(a: argparse.Namespace) -> int:
    def one(p: str) -> int:
        r = savedir.strip(p, force=a.force, offset=a.offset, wait=a.wait, vmdesc=a.vmdesc)
        if not a.quiet:
            if r.sidecar:
                print(f"{p}: removed the sidecar {r.sidecar}")
            if r.removed or not r.sidecar:
                print(f"{p}: removed {r.removed} bytes" if r.removed else f"{p}: nothing after the stream")
        return EXIT_OK

    return _each(a.files, one)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="savedir",
        description="Section directories for QEMU migration streams (savevm, migrate to file, virsh save).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"savedir {savedir.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, offset: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(fn=fn)
        sp.add_argument(
            "--wait",
            action="store_true",
            help="wait while the file is busy (held open by a reader, or being written by savedir) instead of failing",
        )
        if offset:
            sp.add_argument(
                "--offset",
                type=int,
                default=None,
                metavar="N",
                help="the stream starts at byte N (default: found at 0, behind a libvirt header, "
                "or at a page boundary in the first MiB)",
            )
            sp.add_argument(
                "--vmdesc",
                default=None,
                metavar="FILE",
                help="delimit device sections by this vmdesc (a JSON file, or a save of the same VM that has one) "
                "when the stream has neither section footers nor a vmdesc",
            )
        return sp

    sp = add("index", cmd_index, "append a section directory after each file's stream")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--force", action="store_true", help="rewrite an existing directory; replace unknown bytes after the stream")
    sp.add_argument("--no-checksums", action="store_true", help="write no CRC-32C entries")
    sp.add_argument("--sidecar", action="store_true", help="write the directory to FILE.savedir and leave FILE unchanged")
    sp.add_argument("--no-ram-map", action="store_true", help="store no RAM page map (readers then walk the RAM records)")
    sp.add_argument("--json", action="store_true", help="one JSON object per file")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    sp = add("verify", cmd_verify, "check each file's directory (and with --deep, the whole stream)")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--deep", action="store_true", help="also parse the whole stream and check every checksum")
    sp.add_argument("--json", action="store_true", help="print a JSON list of results")

    sp = add("ls", cmd_ls, "list the stream's items (through the directory, or by parsing)")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--scan", action="store_true", help="ignore any directory and parse the stream")

    sp = add("cat", cmd_cat, "write a section's bytes to stdout (a live section's items joined in order)")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("name", metavar="NAME", help="section name, e.g. ram, cpu, 0000:00:02.0/virtio-net")
    sp.add_argument("--instance", type=int, default=None, help="instance id (default: the lowest)")
    sp.add_argument("--payload", action="store_true", help="only the payloads, without headers and footers")

    sp = add("desc", cmd_desc, "print the vmdesc JSON (QEMU's description of the device sections)")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--pretty", action="store_true", help="indent the JSON")

    sp = add(
        "record",
        cmd_record,
        "write the stream read on stdin to FILE and append its directory when it ends "
        '(from QEMU: migrate "exec:savedir record FILE")',
        offset=False,
    )
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--no-checksums", action="store_true", help="write no CRC-32C entries")
    sp.add_argument("--sidecar", action="store_true", help="write the directory to FILE.savedir")
    sp.add_argument("--no-ram-map", action="store_true", help="store no RAM page map (readers then walk the RAM records)")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    sp = add("ram", cmd_ram, "show a save's guest memory: RAM blocks and guest-physical ranges; read, extract or dump it as ELF")
    from savedir import _ram_cli

    _ram_cli.add_arguments(sp)

    sp = add("strip", cmd_strip, "remove the directory: truncate each file back to its stream's end")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--force", action="store_true", help="also remove unknown bytes after the stream")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    from savedir import _state_cli

    _state_cli.register(add)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_ERROR if e.code not in (0, None) else EXIT_OK
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


if __name__ == "__main__":
    sys.exit(main())
