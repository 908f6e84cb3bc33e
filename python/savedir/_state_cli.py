"""The ``state``, ``regs`` and ``diff`` commands (see savedir/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional

import savedir
from savedir._state import GENERAL_REGISTERS, SEGMENT_REGISTERS, Cpu, Diff, Segment, SectionState, jsonable
from savedir.errors import SavedirError

DIFF_EPILOG = """\
exit status:
  0  the two saves do not differ
  1  they differ
  2  usage error, or a file cannot be read (missing, not a save, busy)
"""

#: Bytes shown of a long value in the readable tree (--json shows all).
SHOWN_BYTES = 32


def _open(a: argparse.Namespace) -> savedir.SaveFile:
    return savedir.open(a.file, offset=a.offset, wait=a.wait, vmdesc=a.vmdesc)


def _selectors(f: savedir.SaveFile, specs: list[str]) -> list[tuple[str, Optional[int]]]:
    """``NAME`` or ``NAME:INSTANCE``; names hold colons (PCI addresses), so a
    suffix counts as an instance only when the whole is not a section name."""
    names = {s.name for s in f.sections()} | {"configuration"}
    out: list[tuple[str, Optional[int]]] = []
    for spec in specs:
        name, sep, inst = spec.rpartition(":")
        if spec not in names and sep and inst.isdigit():
            out.append((name, int(inst)))
        else:
            out.append((spec, None))
    return out


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, int):
        return str(v) if -10 < v < 10 or v < 0 else hex(v)
    if isinstance(v, (bytes, bytearray)):
        if len(v) > SHOWN_BYTES:
            return f"{bytes(v[:SHOWN_BYTES]).hex()}... ({len(v)} bytes)"
        return bytes(v).hex() if v else "(0 bytes)"
    return str(v)


def _tree(value: Any, indent: int, out: list[str], name: str) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        out.append(f"{pad}{name}:")
        for k, v in value.items():
            _tree(v, indent + 1, out, k)
    elif isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value):
        out.append(f"{pad}{name}:")
        for i, v in enumerate(value):
            _tree(v, indent + 1, out, f"[{i}]")
    elif isinstance(value, list):
        out.append(f"{pad}{name}: [{', '.join(_scalar(x) for x in value)}]")
    else:
        out.append(f"{pad}{name}: {_scalar(value)}")


def _heading(s: SectionState) -> str:
    if s.section_id is None:
        return f"{s.name} (version {s.version_id})"
    return f"{s.name} (instance {s.instance_id}, section {s.section_id}, version {s.version_id})"


def cmd_state(a: argparse.Namespace) -> int:
    with _open(a) as f:
        sel = _selectors(f, a.sections)
        state = f.state(*sel)
        if a.json:
            print(json.dumps(state.to_dict(), indent=2))
            return 0
        lines: list[str] = []
        for s in state.sections:
            if s.fields is not None:
                lines.append(_heading(s))
                for k, v in s.fields.items():
                    _tree(v, 1, lines, k)
            else:
                live = s.live or {}
                lines.append(f"{_heading(s)}: live section, {live.get('items')} items, "
                             f"{live.get('payload_size')} payload bytes")
                for b in live.get("ram_blocks") or []:
                    lines.append(f"  block {b['id']}: {b['used_length']} bytes")
        print("\n".join(lines))
    return 0


def _seg(name: str, s: Segment) -> str:
    return f"{name:<3}={s.selector:04x} base={s.base:016x} limit={s.limit:08x} flags={s.flags:08x}"


def _regs_text(c: Cpu) -> list[str]:
    mode = "long mode" if c.long_mode else ("protected mode" if c.cr0 & 1 else "real mode")
    lines = [f"CPU {c.index} ({mode})"]
    regs = [f"{n:<3}={getattr(c, n):016x}" for n in GENERAL_REGISTERS]
    for i in range(0, len(regs), 4):
        lines.append("  " + " ".join(regs[i:i + 4]))
    lines.append(f"  rip={c.rip:016x} rflags={c.rflags:016x}")
    for n in SEGMENT_REGISTERS + ("ldt", "tr"):
        lines.append("  " + _seg(n, getattr(c, n)))
    for n in ("gdt", "idt"):
        t = getattr(c, n)
        lines.append(f"  {n}=     base={t.base:016x} limit={t.limit:08x}")
    lines.append(f"  cr0={c.cr0:016x} cr2={c.cr2:016x} cr3={c.cr3:016x} cr4={c.cr4:016x}")
    lines.append(f"  efer={c.efer:016x}")
    drs = [f"dr{i}={getattr(c, f'dr{i}'):016x}" for i in range(8)]
    lines.append("  " + " ".join(drs[:4]))
    lines.append("  " + " ".join(drs[4:]))
    return lines


def cmd_regs(a: argparse.Namespace) -> int:
    with _open(a) as f:
        cpus = f.cpus
        if a.json:
            print(json.dumps({"path": f.path, "cpus": [c.to_dict() for c in cpus]}, indent=2))
            return 0
        print("\n".join(line for c in cpus for line in _regs_text(c)))
    return 0


def _diff_text(d: Diff) -> list[str]:
    lines: list[str] = []
    for k in d.only_in_a:
        lines.append(f"only in {d.a}: {k['name']} (instance {k['instance_id']})")
    for k in d.only_in_b:
        lines.append(f"only in {d.b}: {k['name']} (instance {k['instance_id']})")
    for s in d.sections:
        what = f"{s.name} (instance {s.instance_id})"
        if s.version_id[0] != s.version_id[1]:
            lines.append(f"{what}: version {s.version_id[0]} in {d.a}, {s.version_id[1]} in {d.b}")
        fd = s.first_difference
        if fd is not None:
            where = ", ".join(f"offset {o} in {p}" for o, p in ((fd["offset_a"], d.a), (fd["offset_b"], d.b))
                              if o is not None)
            sizes = "" if s.payload_size[0] == s.payload_size[1] else (
                f"; payloads of {s.payload_size[0]} and {s.payload_size[1]} bytes")
            lines.append(f"{what}: bytes differ from payload byte {fd['at']} ({where}){sizes}")
        if s.pages is not None:
            ranges = s.pages["ranges"]
            shown = ", ".join(f"0x{lo:x}-0x{hi - 1:x}" for lo, hi in ranges[:8])
            more = f" and {len(ranges) - 8} more ranges" if len(ranges) > 8 else ""
            lines.append(f"  {s.pages['pages']} pages differ; guest-physical: {shown or '-'}{more}")
        if s.error is not None:
            lines.append(f"  fields not compared: {s.error}")
        for x in s.fields or []:
            if x.only_in == "a":
                lines.append(f"  {x.path}: only in {d.a}: {_scalar(x.a)}")
            elif x.only_in == "b":
                lines.append(f"  {x.path}: only in {d.b}: {_scalar(x.b)}")
            else:
                lines.append(f"  {x.path}: {_scalar(x.a)} -> {_scalar(x.b)}")
    return lines


def cmd_diff(a: argparse.Namespace) -> int:
    try:
        with savedir.open(a.a, wait=a.wait) as fa, savedir.open(a.b, wait=a.wait) as fb:
            d = savedir.diff(fa, fb)
    except (SavedirError, OSError) as e:
        from savedir.cli import _err, _message

        _err(_message(e))
        return 2
    if a.json:
        print(json.dumps(jsonable(d.to_dict()), indent=2))
    elif not d.same:
        print("\n".join(_diff_text(d)))
    return 0 if d.same else 1


def state_arguments(sp: argparse.ArgumentParser) -> None:
    """The arguments of ``savedir state`` (see savedir/cli.py)."""
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("sections", nargs="*", metavar="SECTION[:INSTANCE]",
                    help="the sections to show (default: all); without an instance, every instance")
    sp.add_argument("--json", action="store_true", help="print JSON: bytes as hex, a NULL pointer as null")


def regs_arguments(sp: argparse.ArgumentParser) -> None:
    """The arguments of ``savedir regs``."""
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--json", action="store_true", help="print JSON")


def diff_arguments(sp: argparse.ArgumentParser) -> None:
    """The arguments of ``savedir diff``."""
    sp.epilog = DIFF_EPILOG
    sp.add_argument("a", metavar="A")
    sp.add_argument("b", metavar="B")
    sp.add_argument("--json", action="store_true", help="print JSON (also when nothing differs)")
