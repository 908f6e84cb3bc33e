"""Synthetic QEMU 10-style precopy migration streams, of any size, fast.

Writes a structurally valid stream (``docs/qemu-stream-format.md`` §1-§5 in
the shared notes) straight to disk, one section at a time, so a multi-GiB
file never sits in memory:

    QEVM 00000003
    07 CONFIGURATION            machine type "pc-i440fx-10.0", no subsections
    01 START "ram"              MEM_SIZE word, block list (pc.ram, ACPI tables), EOS
    02 PART "ram" * N           PAGE / ZERO records for pc.ram, EOS
    08 SWITCHOVER_START         08 00 0b 00 00
    03 END "ram"                the last few pc.ram pages and the ACPI block, EOS
    04 FULL * ~30               device sections, sized by the vmdesc
    00 EOF
    06 VMDESC                   compact JSON, one device per FULL section

Every page of every RAM block appears exactly once, as a PAGE (4096 bytes
of non-zero content) or a ZERO record; which pages are zero and what the
pages hold follow from ``seed``. The first record of each RAM PART/END names
its block (``cstr8`` id); the others use CONTINUE.

Standard library and numpy only, importable from the tests and the benches:

    >>> import os, synthetic
    >>> info = synthetic.write_stream("/tmp/vm.sav", 64 << 20, pages_per_part=2048)
    >>> info["part_sections"], info["file_size"] == os.path.getsize("/tmp/vm.sav")
    (8, True)
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

PAGE_SIZE = 4096
MACHINE_TYPE = "pc-i440fx-10.0"

# top-level types (QEMU migration/savevm.h)
EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E
CMD_SWITCHOVER_START = 11

# RAM record flags (migration/ram.c)
RAM_ZERO = 0x002
RAM_MEM_SIZE = 0x004
RAM_PAGE = 0x008
RAM_EOS = 0x010
RAM_CONTINUE = 0x020

RAM_SECTION_ID = 2
RAM_BLOCK = "pc.ram"
ACPI_BLOCK = "/rom@etc/acpi/tables"
ACPI_BYTES = 128 << 10
#: pc.ram pages held back from the PARTs and sent in the END section.
END_PAGES = 16

#: Different page patterns; each page takes one (by a hash of its number) and
#: gets its block and page number stamped into its first 8 bytes.
N_PATTERNS = 16
PAGE_RECORD = 8 + PAGE_SIZE
ZERO_RECORD = 8 + 1

IOV_MAX = 1024

#: (name, instance_id, version_id, vmsd_name, payload bytes): a pc-i440fx
#: machine with a few PCI devices, sizes of the order QEMU 10 writes.
DEVICES: Tuple[Tuple[str, int, int, str, int], ...] = (
    ("timer", 0, 2, "timer", 34),
    ("cpu_common", 0, 1, "cpu_common", 23),
    ("cpu", 0, 12, "cpu", 1859),
    ("cpu_common", 1, 1, "cpu_common", 23),
    ("cpu", 1, 12, "cpu", 1859),
    ("kvm-tpr-opt", 0, 1, "kvm-tpr-opt", 160),
    ("apic", 0, 3, "apic", 190),
    ("apic", 1, 3, "apic", 190),
    ("0000:00:00.0/I440FX", 0, 3, "I440FX", 288),
    ("PCIHost", 0, 1, "PCIHost", 16),
    ("PCIBUS", 0, 1, "PCIBUS", 31),
    ("fw_cfg", 0, 2, "fw_cfg", 88),
    ("dma", 0, 1, "dma", 86),
    ("dma", 1, 1, "dma", 86),
    ("mc146818rtc", 0, 3, "mc146818rtc", 253),
    ("0000:00:01.1/ide", 0, 3, "ide", 444),
    ("i2c_bus", 0, 1, "i2c_bus", 13),
    ("0000:00:01.3/piix4_pm", 0, 3, "piix4_pm", 2446),
    ("0000:00:01.0/PIIX3", 0, 3, "PIIX3", 304),
    ("i8259", 0, 1, "i8259", 29),
    ("i8259", 1, 1, "i8259", 29),
    ("ioapic", 0, 3, "ioapic", 220),
    ("hpet", 0, 2, "hpet", 166),
    ("i8254", 0, 3, "i8254", 121),
    ("0000:00:02.0/vga", 0, 2, "vga", 65830),
    ("0000:00:03.0/virtio-net", 0, 1, "virtio-net", 5390),
    ("0000:00:04.0/virtio-blk", 0, 2, "virtio-blk", 2210),
    ("fdc", 0, 2, "fdc", 604),
    ("ps2kbd", 0, 3, "ps2kbd", 295),
    ("ps2mouse", 0, 2, "ps2mouse", 304),
    ("pckbd", 0, 3, "pckbd", 50),
    ("port92", 0, 1, "port92", 12),
    ("acpi_build", 0, 1, "acpi_build", 16),
    ("globalstate", 0, 1, "globalstate", 120),
)


def _be32(v: int) -> bytes:
    return struct.pack(">I", v)


def _be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def _cstr8(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError(f"name too long for a cstr8: {s!r}")
    return bytes([len(b)]) + b


class _Writer:
    """Appends buffers to a file with writev, on a thread of its own so that
    generating the next section overlaps writing this one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self.q: "queue.Queue[Optional[List[Any]]]" = queue.Queue(maxsize=1)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="synthetic-writer", daemon=True)
        self.thread.start()

    def put(self, bufs: List[Any]) -> int:
        """Queues ``bufs`` (kept alive until written); returns the offset the
        first byte will have."""
        if self.error is not None:
            raise self.error
        at = self.pos
        self.pos += sum(memoryview(b).nbytes for b in bufs)
        self.q.put(bufs)
        return at

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            bufs = self.q.get()
            if bufs is None:
                return
            if self.error is not None:
                continue
            try:
                _writev_all(self.fd, bufs)
            except BaseException as e:  # re-raised in the generating thread
                self.error = e


def _writev_all(fd: int, bufs: Sequence[Any]) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        batch = views[i:i + IOV_MAX]
        want = sum(v.nbytes for v in batch)
        n = os.writev(fd, batch)
        if n == want:
            i += len(batch)
            continue
        # a short write: finish the batch piece by piece
        for v in batch:
            if n >= v.nbytes:
                n -= v.nbytes
                continue
            rest = v[n:]
            n = 0
            while rest.nbytes:
                k = os.write(fd, rest)
                rest = rest[k:]
        i += len(batch)


class _RamRecords:
    """Builds the records of one run of pages (one block, increasing page
    numbers) as a list of buffers, without copying page contents twice."""

    def __init__(self, seed: int, zero_fraction: float) -> None:
        self.zero_fraction = float(zero_fraction)
        rng = np.random.default_rng([seed, 0x5A7E])
        patterns = rng.integers(0, 256, size=(N_PATTERNS, PAGE_SIZE), dtype=np.uint8)
        patterns[:, -1] |= 1  # never an all-zero page, whatever the stamp
        self.patterns = patterns
        self.mix = int(rng.integers(1, 1 << 62)) | 1
        self.zero_rng = np.random.default_rng([seed, 0x2E20])
        # Rotating record buffers. The writer's queue holds one list of buffers
        # and its thread writes another, so a buffer is free again once two
        # more lists were queued; the END section queues two builds in one
        # list, hence one slot more.
        self.pool: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * 4
        self.turn = 0

    def _buffers(self, n_data: int, n_zero: int) -> Tuple[np.ndarray, np.ndarray]:
        i = self.turn % len(self.pool)
        self.turn += 1
        cur = self.pool[i]
        if cur is None or cur[0].shape[0] < n_data or cur[1].shape[0] < n_zero:
            old_d = 0 if cur is None else cur[0].shape[0]
            old_z = 0 if cur is None else cur[1].shape[0]
            cur = (
                np.empty((max(n_data, old_d), PAGE_RECORD), dtype=np.uint8),
                np.empty((max(n_zero, old_z), ZERO_RECORD), dtype=np.uint8),
            )
            self.pool[i] = cur
        return cur[0][:n_data], cur[1][:n_zero]

    def build(self, block_no: int, block_id: str, first_page: int, n: int,
              name_first: bool) -> Tuple[List[Any], int, int]:
        """Records for pages ``first_page .. first_page+n`` of a block.

        Returns (buffers, data pages, zero pages)."""
        if n == 0:
            return [], 0, 0
        pages = np.arange(first_page, first_page + n, dtype=np.uint64)
        if self.zero_fraction > 0:
            zero = self.zero_rng.random(n) < self.zero_fraction
        else:
            zero = np.zeros(n, dtype=bool)
        n_zero = int(zero.sum())
        n_data = n - n_zero
        data, zrec = self._buffers(n_data, n_zero)

        offsets = pages << np.uint64(12)
        if n_data:
            dpages = pages[~zero]
            words = (offsets[~zero] | np.uint64(RAM_PAGE | RAM_CONTINUE)).astype(">u8")
            data[:, :8] = words.view(np.uint8).reshape(-1, 8)
            # one boolean-masked broadcast per pattern: ~3x faster than
            # np.take into the strided rows
            h = (dpages * np.uint64(self.mix)) >> np.uint64(60)
            for k in range(N_PATTERNS):
                data[h == k, 8:] = self.patterns[k]
            stamp = (dpages | np.uint64(block_no << 56)).astype(">u8")
            data[:, 8:16] = stamp.view(np.uint8).reshape(-1, 8)
        if n_zero:
            words = (offsets[zero] | np.uint64(RAM_ZERO | RAM_CONTINUE)).astype(">u8")
            zrec[:, :8] = words.view(np.uint8).reshape(-1, 8)
            zrec[:, 8] = 0

        dflat = data.reshape(-1)
        zflat = zrec.reshape(-1)
        # runs of data / zero pages, in page order
        change = np.flatnonzero(zero[1:] != zero[:-1]) + 1
        starts = [0] + change.tolist()
        ends = change.tolist() + [n]
        bufs: List[Any] = []
        di = zi = 0
        first_zero = bool(zero[0])
        is_zero = first_zero
        for s, e in zip(starts, ends):
            k = e - s
            if is_zero:
                bufs.append(zflat[zi * ZERO_RECORD:(zi + k) * ZERO_RECORD])
                zi += k
            else:
                bufs.append(dflat[di * PAGE_RECORD:(di + k) * PAGE_RECORD])
                di += k
            is_zero = not is_zero

        if name_first:
            # the first record names its block: word without CONTINUE, then the id
            rec = ZERO_RECORD if first_zero else PAGE_RECORD
            flag = RAM_ZERO if first_zero else RAM_PAGE
            head = bufs[0]
            first = bytearray(_be64((first_page << 12) | flag)) + _cstr8(block_id)
            bufs[0:1] = [bytes(first), head[8:rec], head[rec:]]
        return bufs, n_data, n_zero


def _device_payload(rng: np.random.Generator, size: int) -> bytes:
    return rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()


def write_stream(
    path: "os.PathLike[str] | str",
    ram_bytes: int,
    *,
    pages_per_part: int = 32768,
    zero_fraction: float = 0.1,
    seed: int = 0,
    footers: bool = True,
    name_every_part: bool = True,
    devices: Sequence[Tuple[str, int, int, str, int]] = DEVICES,
) -> Dict[str, Any]:
    """Writes a synthetic QEMU 10 precopy stream to ``path`` (truncating it).

    ``ram_bytes`` is the size of the ``pc.ram`` block (a multiple of 4096);
    the guest also has a 128 KiB ACPI-tables block. Each RAM PART holds up
    to ``pages_per_part`` pages; the END holds the last :data:`END_PAGES`
    pc.ram pages and the ACPI block. ``zero_fraction`` of the pages (drawn
    per page from ``seed``) are ZERO records. ``footers=False`` writes a
    stream without section footers (QEMU <= 2.3 machine types); with
    ``name_every_part=False`` only the first PART names its block, later
    PARTs open with CONTINUE (as QEMU may do).

    Returns a description of what was written: ``file_size``, the number of
    ``part_sections``, ``entries`` (one dict per top-level item in file order,
    shaped like ``savedir ls --json``: kind, offset, size, and section id /
    name / instance / version, or command), ``eof`` (offset of the EOF byte),
    page counts, and the time taken.
    """
    if ram_bytes <= 0 or ram_bytes % PAGE_SIZE:
        raise ValueError(f"ram_bytes must be a positive multiple of {PAGE_SIZE}, got {ram_bytes}")
    if pages_per_part <= 0:
        raise ValueError("pages_per_part must be positive")
    if not 0.0 <= zero_fraction <= 1.0:
        raise ValueError("zero_fraction must lie in [0, 1]")
    t0 = time.perf_counter()
    n_pages = ram_bytes // PAGE_SIZE
    end_pages = min(END_PAGES, n_pages // 2)
    part_pages = n_pages - end_pages
    acpi_pages = ACPI_BYTES // PAGE_SIZE
    total_ram = ram_bytes + ACPI_BYTES

    entries: List[Dict[str, Any]] = []
    recs = _RamRecords(seed, zero_fraction)
    counts = {"data_pages": 0, "zero_pages": 0}

    def footer(section_id: int) -> bytes:
        return bytes([FOOTER]) + _be32(section_id) if footers else b""

    def entry(kind: str, at: int, **kw: Any) -> None:
        entries.append({"kind": kind, "offset": at, **kw})

    ram_meta = {"section_id": RAM_SECTION_ID, "name": "ram", "instance_id": 0, "version_id": 4}
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    w = _Writer(fd)
    try:
        head = b"QEVM" + _be32(3)
        w.put([head])
        mt = MACHINE_TYPE.encode()
        entry("configuration", w.put([bytes([CONFIGURATION]) + _be32(len(mt)) + mt]))

        start = bytearray([SECTION_START]) + _be32(RAM_SECTION_ID) + _cstr8("ram") + _be32(0) + _be32(4)
        start += _be64(total_ram | RAM_MEM_SIZE)
        start += _cstr8(RAM_BLOCK) + _be64(ram_bytes)
        start += _cstr8(ACPI_BLOCK) + _be64(ACPI_BYTES)
        start += _be64(RAM_EOS) + footer(RAM_SECTION_ID)
        entry("start", w.put([bytes(start)]), **ram_meta)

        eos = _be64(RAM_EOS) + footer(RAM_SECTION_ID)
        n_parts = 0
        for first in range(0, part_pages, pages_per_part):
            n = min(pages_per_part, part_pages - first)
            bufs, nd, nz = recs.build(0, RAM_BLOCK, first, n, name_every_part or n_parts == 0)
            counts["data_pages"] += nd
            counts["zero_pages"] += nz
            hdr = bytes([SECTION_PART]) + _be32(RAM_SECTION_ID)
            entry("part", w.put([hdr, *bufs, eos]), **ram_meta)
            n_parts += 1

        cmd = bytes([COMMAND]) + struct.pack(">HH", CMD_SWITCHOVER_START, 0)
        entry("command", w.put([cmd]), command=CMD_SWITCHOVER_START, command_name="SWITCHOVER_START")

        end_bufs: List[Any] = [bytes([SECTION_END]) + _be32(RAM_SECTION_ID)]
        for block_no, block_id, first, n in ((0, RAM_BLOCK, part_pages, end_pages), (1, ACPI_BLOCK, 0, acpi_pages)):
            bufs, nd, nz = recs.build(block_no, block_id, first, n, True)
            counts["data_pages"] += nd
            counts["zero_pages"] += nz
            end_bufs += bufs
        end_bufs.append(eos)
        entry("end", w.put(end_bufs), **ram_meta)

        dev_rng = np.random.default_rng([seed, 0xDE5C])
        desc_devices = []
        section_id = 0
        for name, instance, version, vmsd_name, size in devices:
            if section_id == RAM_SECTION_ID:
                section_id += 1
            hdr = bytes([SECTION_FULL]) + _be32(section_id) + _cstr8(name) + _be32(instance) + _be32(version)
            at = w.put([hdr, _device_payload(dev_rng, size), footer(section_id)])
            entry("full", at, section_id=section_id, name=name, instance_id=instance, version_id=version)
            desc_devices.append({
                "name": name, "instance_id": instance, "vmsd_name": vmsd_name, "version": version,
                "fields": [{"name": "data", "type": "buffer", "size": size}],
            })
            section_id += 1

        eof = w.put([bytes([EOF])])
        desc = json.dumps({"page_size": PAGE_SIZE, "devices": desc_devices}, separators=(",", ":")).encode()
        entry("vmdesc", w.put([bytes([VMDESCRIPTION]) + _be32(len(desc)) + desc]))
        w.close()
    except BaseException:
        try:
            w.close()
        except BaseException:
            pass
        raise
    finally:
        os.close(fd)

    file_size = w.pos
    # sizes as savedir reports them: to the next item; the last section ends at EOF
    for i, e in enumerate(entries):
        if e["kind"] == "vmdesc":
            e["size"] = file_size - e["offset"]
        else:
            nxt = entries[i + 1]["offset"] if entries[i + 1]["kind"] != "vmdesc" else eof
            e["size"] = nxt - e["offset"]
    seconds = time.perf_counter() - t0
    return {
        "path": os.fspath(path),
        "file_size": file_size,
        "stream_end": file_size,
        "ram_bytes": ram_bytes,
        "total_ram": total_ram,
        "page_size": PAGE_SIZE,
        "pages": n_pages + acpi_pages,
        "data_pages": counts["data_pages"],
        "zero_pages": counts["zero_pages"],
        "part_sections": n_parts,
        "full_sections": len(devices),
        "footers": footers,
        "machine_type": MACHINE_TYPE,
        "entries": entries,
        "eof": eof,
        "seconds": seconds,
        "gib_per_s": file_size / seconds / (1 << 30) if seconds > 0 else float("inf"),
    }


def ram_bytes_for_file_size(file_size: int, zero_fraction: float = 0.1) -> int:
    """The ``ram_bytes`` whose stream is about ``file_size`` bytes long."""
    per_page = (1 - zero_fraction) * PAGE_RECORD + zero_fraction * ZERO_RECORD
    return max(1, int(file_size / per_page)) * PAGE_SIZE


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a synthetic QEMU migration stream")
    ap.add_argument("path")
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--pages-per-part", type=int, default=32768)
    ap.add_argument("--zero-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-footers", action="store_true")
    a = ap.parse_args()
    info = write_stream(a.path, a.ram_mib << 20, pages_per_part=a.pages_per_part,
                        zero_fraction=a.zero_fraction, seed=a.seed, footers=not a.no_footers)
    print(f"wrote {info['path']}: {info['file_size']} bytes, {info['part_sections']} PART sections, "
          f"{info['seconds']:.2f} s ({info['gib_per_s']:.2f} GiB/s)")
