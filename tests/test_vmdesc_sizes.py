"""Device (FULL) sections are delimited by the vmdesc's field sizes.

An independent implementation of the size arithmetic, in Python, must agree
with the payload sizes savedir finds in every real stream, and every FULL
section must end in its footer.
"""

from __future__ import annotations

import struct
from typing import Any

import savedir
from stream_kinds import vmsd_size


def test_full_sections_match_vmdesc_sizes(qemu_streams) -> None:
    for s in qemu_streams:
        data = s.read_bytes()
        with savedir.open(s.path) as f:
            devices = f.vmdesc["devices"]
            fulls = [e for e in f.entries if e.kind == "full"]
            assert [(e.name, e.instance_id) for e in fulls] == [(d["name"], d["instance_id"]) for d in devices], s.name
            for e, d in zip(fulls, devices):
                assert e.payload_size == vmsd_size(d), (s.name, e.name)
                footer = data[e.end - 5 : e.end]
                assert footer == b"\x7e" + struct.pack(">I", e.section_id), (s.name, e.name)
            # Every section, live ones included, ends in its own footer.
            assert f.footers, s.name
