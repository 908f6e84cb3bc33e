"""``savedir regs`` and ``SaveFile.cpus``: each vCPU's registers from its
``cpu`` section, against what QEMU itself says at the moment of the save.

A VM with two vCPUs runs its firmware, is stopped, and QEMU is asked for
``info registers -a`` (over QMP's ``human-monitor-command``) and for an ELF
core (``dump-guest-memory``, whose notes hold each vCPU's NT_PRSTATUS and
QEMUCPUState); then it is saved. savedir's registers must be QEMU's, and the
notes savedir makes from the save must be the core's, byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import qemu_harness as h
import savedir
import savedir.cli

ROOT_72 = Path("/opt/savedir-test/qemu-7.2")
FIRMWARE_72 = ["-L", str(ROOT_72 / "usr/share/qemu"), "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"]


@pytest.fixture(params=["10", "7.2"])
def qemu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The QEMU to run (its extra arguments): Debian's 10, or bookworm's 7.2."""
    if request.param == "7.2":
        binary = ROOT_72 / "usr/bin/qemu-system-x86_64"
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run .ci/install-qemu.sh", pytrace=False)
        monkeypatch.setattr(h, "QEMU_BINARY", str(binary))
        monkeypatch.setenv("QEMU_MODULE_DIR", str(ROOT_72 / "usr/lib/x86_64-linux-gnu/qemu"))
        yield list(FIRMWARE_72)
    else:
        yield []


SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR) ?=([0-9a-f]{4}) ([0-9a-f]+) ([0-9a-f]{8}) ([0-9a-f]{8})", re.M)
TABLE = re.compile(r"^(GDT|IDT)= +([0-9a-f]+) ([0-9a-f]{8})", re.M)
REG = re.compile(r"(?<![A-Z0-9])([RE][A-Z]{2}|R\d+|EFL|RFL|CR\d|DR\d|EFER) ?=([0-9a-f]+)")


def parse_info_registers(text: str) -> dict[int, dict[str, Any]]:
    """``info registers -a``: per vCPU index, the registers by QEMU's names."""
    text = text.replace("\r\n", "\n")
    cpus: dict[int, dict[str, Any]] = {}
    for m in re.finditer(r"^CPU#(\d+)\n(.*?)(?=^CPU#|\Z)", text, re.M | re.S):
        body = m.group(2)
        regs: dict[str, Any] = {k: int(v, 16) for k, v in REG.findall(body)}
        for name, sel, base, limit, flags in SEG.findall(body):
            regs[name] = (int(sel, 16), int(base, 16), int(limit, 16), int(flags, 16))
        for name, base, limit in TABLE.findall(body):
            regs[name] = (int(base, 16), int(limit, 16))
        cpus[int(m.group(1))] = regs
    return cpus


def compare(cpu: savedir.Cpu, q: dict[str, Any]) -> None:
    wide = "RAX" in q  # QEMU prints 64-bit registers in long mode, else 32-bit ones
    mask = (1 << 64) - 1 if wide else 0xFFFFFFFF
    pre = "R" if wide else "E"
    for name in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp"):
        assert getattr(cpu, "r" + name) & mask == q[pre + name.upper()], (cpu.index, name)
    if wide:
        for i in range(8, 16):
            assert getattr(cpu, f"r{i}") == q[f"R{i}"], (cpu.index, i)
    assert cpu.rip & mask == q[pre + "IP"]
    assert cpu.rflags == q["RFL" if wide else "EFL"]
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        s = getattr(cpu, name)
        # QEMU prints the attribute bits only (flags & 0x00ffff00); the
        # notes of its core hold them whole, as the save does.
        assert (s.selector, s.base & mask, s.limit, s.flags & 0x00FFFF00) == q[name.upper()], (cpu.index, name)
    for name in ("gdt", "idt"):
        t = getattr(cpu, name)
        assert (t.base & mask, t.limit) == q[name.upper()], (cpu.index, name)
    for i in (0, 2, 3, 4):
        assert getattr(cpu, f"cr{i}") & mask == q[f"CR{i}"], (cpu.index, i)
    for i in (0, 1, 2, 3, 6, 7):  # QEMU prints no dr4 and dr5 (aliases of dr6 and dr7)
        assert getattr(cpu, f"dr{i}") == q[f"DR{i}"], (cpu.index, i)
    assert cpu.efer == q["EFER"]


def elf_notes(path: Path) -> bytes:
    """The PT_NOTE segment of an ELF core (32- or 64-bit, little-endian)."""
    d = path.read_bytes()
    assert d[:4] == b"\x7fELF" and d[5] == 1
    if d[4] == 2:
        phoff, = struct.unpack_from("<Q", d, 32)
        phentsize, phnum = struct.unpack_from("<HH", d, 54)
        phdrs = [struct.unpack_from("<IIQQQQ", d, phoff + i * phentsize) for i in range(phnum)]
        notes = [(p[2], p[5]) for p in phdrs if p[0] == 4]
    else:
        phoff, = struct.unpack_from("<I", d, 28)
        phentsize, phnum = struct.unpack_from("<HH", d, 42)
        phdrs = [struct.unpack_from("<IIIIII", d, phoff + i * phentsize) for i in range(phnum)]
        notes = [(p[1], p[4]) for p in phdrs if p[0] == 4]
    (off, size), = notes
    return d[off:off + size]


def save(vm: h.VM, path: Path) -> None:
    """Migrates to ``path`` through ``exec:`` (QEMU 7.2 has no ``file:``)
    and waits until every byte is there."""
    done = path.with_suffix(".done")
    vm.migrate(f"exec:cat > {path}; touch {done}")
    deadline = time.monotonic() + 60  # only a hang reaches it
    while not done.exists():
        assert time.monotonic() < deadline, "the save never finished"
        time.sleep(0.02)


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_registers_are_qemus(qemu: list[str], machine: str, tmp_path: Path) -> None:
    sav, core = tmp_path / "vm.sav", tmp_path / "vm.core"
    with h.VM(machine, qemu + ["-smp", "2"], paused=True) as vm:
        vm.cont()
        time.sleep(2.0)  # the firmware runs on the boot vCPU; the other waits for its SIPI
        vm.stop()
        text = vm.cmd("human-monitor-command", **{"command-line": "info registers -a"})
        vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{core}")
        save(vm, sav)
    want = parse_info_registers(text)
    assert sorted(want) == [0, 1], text
    with savedir.open(sav) as f:
        cpus = f.cpus
        notes = f._state_reader().elf_notes(f)
    assert [c.index for c in cpus] == [0, 1]
    for c in cpus:
        compare(c, want[c.index])
    # Both vCPUs ran or were set up by the firmware: not two reset states.
    assert cpus[0].rip != cpus[1].rip or cpus[0].rsp != cpus[1].rsp
    assert notes == elf_notes(core)
    # Through the directory, and from the command line.
    savedir.index(sav)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert savedir.cli.main(["regs", str(sav), "--json"]) == 0
    doc = json.loads(out.getvalue())
    assert doc == {"path": str(sav), "cpus": [c.to_dict() for c in cpus]}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert savedir.cli.main(["regs", str(sav)]) == 0
    text_out = out.getvalue()
    assert text_out.count("CPU ") == 2 and f"rip={cpus[1].rip:016x}" in text_out
    os.unlink(core)
