"""Device state, vCPU registers and the difference between two saves.

The classes here are what :meth:`savedir.SaveFile.state`,
:attr:`savedir.SaveFile.cpus` and :func:`savedir.diff` return; the decoding
itself is done in Rust (``savedir._core.StateReader``, ``savedir._core.diff``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields as dc_fields
from typing import Any, Optional

#: The general registers, in the order x86 documentation lists them.
GENERAL_REGISTERS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
#: The segment registers.
SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss")
#: The descriptor table registers (and the LDT and task registers).
TABLE_REGISTERS = ("gdt", "idt", "ldt", "tr")


def jsonable(value: Any) -> Any:
    """``value`` with bytes as lowercase hex strings (what ``--json`` prints)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Segment:
    """A segment register or descriptor table register, as QEMU caches it:
    ``flags`` holds the descriptor's attribute bits where the descriptor
    holds them (bits 8-23 of its high word)."""

    selector: int
    base: int
    limit: int
    flags: int

    def to_dict(self) -> dict[str, int]:
        return {"selector": self.selector, "base": self.base, "limit": self.limit, "flags": self.flags}


@dataclass(frozen=True)
class Cpu:
    """One vCPU's registers, read from its ``cpu`` section (x86)."""

    index: int
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rbp: int
    rsp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    ldt: Segment
    tr: Segment
    gdt: Segment
    idt: Segment
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    dr0: int
    dr1: int
    dr2: int
    dr3: int
    dr4: int
    dr5: int
    dr6: int
    dr7: int
    kernel_gs_base: int
    long_mode: bool
    """True when the vCPU is in 64-bit long mode."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cpu":
        kw: dict[str, Any] = {k: (Segment(**v) if isinstance(v, dict) else v) for k, v in d.items()}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (getattr(self, f.name).to_dict() if isinstance(getattr(self, f.name), Segment)
                         else getattr(self, f.name)) for f in dc_fields(self)}


@dataclass(frozen=True)
class SectionState:
    """One section's state: ``fields`` for a device section or the
    configuration (a dict keyed as the vmdesc spells the names), ``live``
    for a live section (``items``, ``payload_size``, and for ``ram`` its
    ``ram_blocks``), which the vmdesc does not describe."""

    name: str
    instance_id: Optional[int]
    section_id: Optional[int]
    version_id: Optional[int]
    fields: Optional[dict[str, Any]]
    live: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        """The section as ``savedir state --json`` prints it (bytes as hex)."""
        d: dict[str, Any] = {
            "name": self.name,
            "instance_id": self.instance_id,
            "section_id": self.section_id,
            "version_id": self.version_id,
            "fields": jsonable(self.fields),
        }
        if self.live is not None:
            d["live"] = jsonable(self.live)
        return d


@dataclass(frozen=True)
class State:
    """What :meth:`savedir.SaveFile.state` returns."""

    path: str
    sections: list[SectionState]

    def to_dict(self) -> dict[str, Any]:
        """``{"path", "sections": [...]}``, as ``savedir state --json`` prints it."""
        return {"path": self.path, "sections": [s.to_dict() for s in self.sections]}


@dataclass(frozen=True)
class FieldDiff:
    """A field whose value differs: ``path`` as text (``env.segs[1].base``),
    ``keys`` as the names and indices that lead to it, the value in each
    save, and ``only_in`` ("a" or "b") when only one save has the field."""

    path: str
    keys: list[Any]
    a: Any
    b: Any
    only_in: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "keys": self.keys, "a": jsonable(self.a), "b": jsonable(self.b),
                "only_in": self.only_in}


@dataclass(frozen=True)
class SectionDiff:
    """A section both saves have whose bytes differ. ``first_difference``:
    where (``at``: the offset into the section's payload; ``offset_a``,
    ``offset_b``: in each file). ``fields``: for a device section or the
    configuration, the fields that differ (None when a side cannot be
    decoded: ``error`` says why). ``pages``: for RAM, ``{"pages": N,
    "ranges": [(start, end), ...]}``: how many pages' final content differs
    (through the page maps) and the guest-physical ranges they lie in, in
    ``a``'s layout (None for other sections)."""

    name: str
    instance_id: int
    live: bool
    section_id: tuple[int, int]
    version_id: tuple[int, int]
    payload_size: tuple[int, int]
    first_difference: Optional[dict[str, Any]]
    fields: Optional[list[FieldDiff]]
    error: Optional[str] = None
    pages: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dc_fields(self)}
        d["section_id"], d["version_id"], d["payload_size"] = (list(self.section_id), list(self.version_id),
                                                               list(self.payload_size))
        d["fields"] = None if self.fields is None else [x.to_dict() for x in self.fields]
        return d


@dataclass(frozen=True)
class Diff:
    """What :func:`savedir.diff` returns: ``same`` when nothing differs."""

    a: str
    b: str
    same: bool
    only_in_a: list[dict[str, Any]] = field(default_factory=list)
    only_in_b: list[dict[str, Any]] = field(default_factory=list)
    sections: list[SectionDiff] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """As ``savedir diff --json`` prints it (bytes as hex)."""
        return {"a": self.a, "b": self.b, "same": self.same, "only_in_a": self.only_in_a,
                "only_in_b": self.only_in_b, "sections": [s.to_dict() for s in self.sections]}


def make_diff(a: str, b: str, raw: dict[str, Any]) -> Diff:
    """A :class:`Diff` from what ``savedir._core.diff`` returns."""
    sections = [
        SectionDiff(
            name=s["name"], instance_id=s["instance_id"], live=s["live"], section_id=tuple(s["section_id"]),
            version_id=tuple(s["version_id"]), payload_size=tuple(s["payload_size"]),
            first_difference=s["first_difference"],
            fields=None if s["fields"] is None else [FieldDiff(**x) for x in s["fields"]],
            error=s["error"], pages=s["pages"],
        )
        for s in raw["sections"]
    ]
    return Diff(a=a, b=b, same=raw["same"], only_in_a=raw["only_in_a"], only_in_b=raw["only_in_b"],
                sections=sections)
