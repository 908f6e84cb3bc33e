"""An independent check of savedir's device state decoding.

:func:`encode` writes decoded fields back into stream bytes by the vmdesc
alone (QEMU's grammar, in Python): when that gives back a section's payload
byte for byte, the decoding consumed the section exactly to its footer and
kept every value. :func:`check_decodes` does it for every device section
(and the configuration) of an open save.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import savedir

INTS = {
    "int8": ">b", "int16": ">h", "int32": ">i", "int32 equal": ">i", "int32 le": ">i", "int64": ">q",
    "uint8": ">B", "uint8 equal": ">B", "uint16": ">H", "uint16 equal": ">H", "uint32": ">I",
    "uint32 equal": ">I", "uint64": ">Q", "int64 equal": ">Q",
}


def _element(f: dict[str, Any], v: Any) -> bytes:
    t = f["type"]
    if t == "struct":
        if not f["struct"]:
            assert v is None, (f["name"], v)
            return b"\x30"
        return encode(f["struct"], v)
    if t in ("tmp", "vstruct"):
        return encode(f, v)
    if t == "nullptr":
        assert v is None, (f["name"], v)
        return b"\x30"
    if t == "bool":
        assert isinstance(v, bool), (f["name"], v)
        return bytes([v])
    if t in INTS:
        assert isinstance(v, int) and not isinstance(v, bool), (f["name"], v)
        return struct.pack(INTS[t], v)
    if t == "capability":
        assert isinstance(v, str), (f["name"], v)
        return bytes([len(v)]) + v.encode()
    assert isinstance(v, bytes) and len(v) == f["size"], (f["name"], t, f["size"], v)
    return v


def encode(desc: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """The bytes QEMU wrote for ``fields`` (a decoded VMState) as ``desc``
    (its vmdesc entry) describes them."""
    entries = desc.get("fields", [])
    names = Counter(f["name"] for f in entries)
    used: Counter[str] = Counter()
    out = bytearray()
    for f in entries:
        name = f["name"]
        v = fields[name]
        if names[name] > 1 or "array_len" in f or "index" in f:
            n = f.get("array_len", 1)
            assert isinstance(v, list), (name, v)
            items = v[used[name]:used[name] + n]
            assert len(items) == n, (name, len(v), used[name], n)
            used[name] += n
        else:
            items = [v]
        for i, item in enumerate(items):
            b = _element(f, item)
            if f["type"] != "capability" or i == 0:
                assert len(b) == f["size"], (name, f["type"], len(b), f["size"])
            out += b
    for name, n in used.items():
        assert n == len(fields[name]), f"{name}: {len(fields[name])} elements decoded, {n} described"
    subs = desc.get("subsections", [])
    for s in subs:
        sname = s["vmsd_name"].encode()
        out += b"\x05" + bytes([len(sname)]) + sname + struct.pack(">I", s["version"]) + encode(s, fields[s["vmsd_name"]])
    described = {f["name"] for f in entries} | {s["vmsd_name"] for s in subs}
    assert set(fields) == described, (set(fields) ^ described)
    return bytes(out)


def check_decodes(f: savedir.SaveFile) -> int:
    """Every device section (and the configuration, when the vmdesc
    describes it) of ``f`` decodes, and its fields encode back to its
    payload; returns how many sections were checked."""
    desc = f.vmdesc
    assert desc is not None, f"{f.path} has no vmdesc"
    devices = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    checked = 0
    for s in f.sections():
        if s.live:
            continue
        fields = s.fields
        d = devices[(s.name, s.instance_id)]
        assert encode(d, fields) == bytes(s.payload), f"{f.path}: {s.name} instance {s.instance_id}"
        checked += 1
    state = f.state()
    conf = [e for e in f.entries if e.kind == "configuration"]
    if "configuration" in desc:
        assert state.sections[0].name == "configuration"
        fields = state.sections[0].fields
        assert fields is not None
        assert encode(desc["configuration"], fields) == bytes(conf[0].payload), f"{f.path}: the configuration"
        checked += 1
    want = [s.name for s in f.sections() if not s.live]
    got = [x.name for x in state.sections if x.fields is not None and x.name != "configuration"]
    assert got == want, (got, want)
    return checked
