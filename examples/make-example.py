#!/usr/bin/env python3
"""Writes examples/pc-i440fx.sav: a real save of a small paused pc VM.

The file in the repository was made by this script with Debian's QEMU 10.0
(TCG, 16 MiB of RAM, no devices beyond the machine's own, never started):

    python3 examples/make-example.py

It needs qemu-system-x86_64 (`.ci/install-qemu.sh`). QEMU gets no network.
"""

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent / "tests"))

import qemu_harness  # noqa: E402

out = here / "pc-i440fx.sav"
qemu_harness.save_stream(out, "pc", [], uri_kind="exec", mem="16")
print(f"wrote {out} ({out.stat().st_size} bytes)")
