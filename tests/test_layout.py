"""The x86 guest-physical layout rule against QEMU's own view of the guest.

For each machine below, a real QEMU starts paused (``-S``; large guests are
cheap: QEMU does not touch their memory), optionally runs its firmware for a
moment, then reports ``info mtree -f`` over QMP and saves itself to a file.
savedir's rule, given the machine type and RAM blocks from that save and its
device sections (PAM, SMRAM, BARs), must give exactly the RAM and ROM ranges
of QEMU's flat view of the address space "memory", merged the way
``dump-guest-memory`` merges them (tests/physmap.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

import physmap
import qemu_harness as h
import savedir
from savedir import _core

M = 1 << 20
G = 1 << 30

ROOT72 = Path("/opt/savedir-test/qemu-7.2")
BINARY72 = ROOT72 / "usr/bin/qemu-system-x86_64"
FIRMWARE72 = ["-L", str(ROOT72 / "usr/share/qemu"), "-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu"]


@dataclass(frozen=True)
class Case:
    id: str
    machine: str  # -machine argument
    mem: str
    args: Tuple[str, ...] = ()
    run: float = 0.0  # seconds the firmware runs before the save
    below_4g: Optional[int] = None  # max-ram-below-4g given to QEMU (and to savedir)
    qemu72: bool = False


OLD = ("-global", "migration.send-configuration=on")

CASES = [
    Case(f"pc-{m}", "pc", m) for m in ("64", "2816", "3072", "3584", "4096", "5120")
] + [
    Case(f"q35-{m}", "q35", m) for m in ("64", "2815", "2816", "3072", "4096", "5120")
] + [
    Case("pc-4096-below2G", "pc,max-ram-below-4g=2G", "4096", below_4g=2 * G),
    Case("pc-3968-below4G", "pc,max-ram-below-4g=4G", "3968", below_4g=4 * G),
    Case("q35-3072-below1G", "q35,max-ram-below-4g=1G", "3072", below_4g=1 * G),
    Case("q35-2048-below1536M", "q35,max-ram-below-4g=1536M", "2048", below_4g=1536 * M),
    Case("isapc-64", "isapc", "64"),
    Case("isapc-vga-64", "isapc", "64", ("-device", "isa-vga")),
    Case("isapc-3584", "isapc", "3584"),
    Case("microvm-256", "microvm", "256"),
    Case("microvm-3072", "microvm", "3072"),
    Case("microvm-3584", "microvm", "3584"),
    # the firmware ran: PAM segments turned to RAM, BARs programmed
    Case("pc-vga-ran", "pc", "256", ("-device", "VGA"), run=2.0),
    Case("q35-vga-ran-3G", "q35", "3072", ("-device", "VGA"), run=2.0),
    Case("pc-vga-prelaunch", "pc", "256", ("-device", "VGA")),
    Case("pc-secondary-vga-ran", "pc", "256", ("-device", "secondary-vga"), run=2.0),
    # QEMU 7.2 and older machine types (pc-i440fx-1.7: no gigabyte alignment;
    # types of 2.3 and older send neither the configuration, which names the
    # machine type, nor the vmdesc unless told to)
    Case("72-pc-1.7-4096", "pc-i440fx-1.7,suppress-vmdesc=off", "4096", OLD, qemu72=True),
    Case("72-pc-2.0-4096", "pc-i440fx-2.0,suppress-vmdesc=off", "4096", OLD, qemu72=True),
    Case("72-pc-7.2-3584", "pc-i440fx-7.2", "3584", qemu72=True),
    Case("72-q35-7.2-3072", "pc-q35-7.2", "3072", qemu72=True),
    Case("72-q35-2.4-2816-ran", "pc-q35-2.4", "2816", ("-device", "VGA"), run=2.0, qemu72=True),
]


@dataclass
class Observed:
    mtree: str
    view: List[physmap.Range]
    save: Path
    machine_type: str
    blocks: List[Tuple[str, int]]


def observe(case: Case, root: Path) -> Observed:
    args = list(case.args) + (FIRMWARE72 if case.qemu72 else [])
    save = root / f"{case.id}.sav"
    with h.VM(case.machine, args, mem=case.mem, paused=True) as vm:
        if case.run:
            vm.cont()
            time.sleep(case.run)
            vm.stop()
        mtree = vm.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
        # (QEMU 7.2 has no file: migration); wait for cat to finish writing
        vm.migrate(h.migration_uri("exec", save, outgoing=True) + f"; touch {save}.done")
    deadline = time.monotonic() + 30
    while not Path(f"{save}.done").exists():
        assert time.monotonic() < deadline, f"{save}: cat did not finish"
        time.sleep(0.05)
    with savedir.open(save) as f:
        mt = f.machine_type
    return Observed(mtree, physmap.memory_view(mtree), save, mt, physmap.ram_blocks(save))


def savedir_view(case: Case, o: Observed, below_4g: Optional[int]) -> Tuple[List[physmap.Range], list]:
    ranges, unmapped = _core._x86_layout(o.machine_type, o.blocks, below_4g, save=o.save)
    return [(g, s, physmap.leaf(b), off) for g, s, b, off in ranges], unmapped


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layout_equals_qemus_view(observed_layouts: Dict[str, tuple], case: Case) -> None:
    o, (mine, unmapped), _ = observed_layouts[case.id]
    assert mine == o.view, (
        f"{case.id} ({o.machine_type}, blocks {o.blocks}):\nsavedir {fmt(mine)}\nQEMU    {fmt(o.view)}\n"
        f"unmapped {unmapped}\n{o.mtree[:3000]}"
    )
    # every block is either in the view or listed with a reason
    names = {b for _, _, b, _ in mine}
    for block, _size in o.blocks:
        if physmap.leaf(block) not in names:
            assert any(u[0] == block and u[1] for u in unmapped), (block, unmapped)


def fmt(v: List[physmap.Range]) -> str:
    return "[" + ", ".join(f"{g:#x}+{s:#x} {n}@{off:#x}" for g, s, n, off in v) + "]"


@pytest.fixture(scope="module")
def observed_layouts(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, tuple]:
    """Observes every case and computes savedir's layout from its save."""
    h.require_qemu()
    root = tmp_path_factory.mktemp("layout")

    def one(c: Case) -> tuple:
        o = observe(c, root)
        try:
            return o, savedir_view(c, o, c.below_4g), savedir_view(c, o, None)
        finally:
            o.save.unlink()  # 5 GiB guests make big files

    def run(cases: List[Case]) -> Dict[str, tuple]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return dict(zip((c.id for c in cases), pool.map(one, cases)))

    out = run([c for c in CASES if not c.qemu72])
    if not BINARY72.exists():
        pytest.fail(f"{BINARY72} is missing: run .ci/install-qemu.sh", pytrace=False)
    # QEMU 7.2 needs its own module directory: its cases run after QEMU 10's
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h, "QEMU_BINARY", str(BINARY72))
        mp.setenv("QEMU_MODULE_DIR", str(ROOT72 / "usr/lib/x86_64-linux-gnu/qemu"))
        out.update(run([c for c in CASES if c.qemu72]))
    return out


def test_below_4g_override_is_the_rule_applied_to_another_start(observed_layouts: Dict[str, tuple]) -> None:
    """A save made with max-ram-below-4g read without the override gives the
    default layout (which QEMU's view contradicts); with it, QEMU's."""
    case = next(c for c in CASES if c.id == "q35-3072-below1G")
    o, (mine, _), (default, _) = observed_layouts[case.id]
    assert [(g, s) for g, s, _, _ in default if g >= 4 * G] == [(4 * G, 1 * G)]
    assert [(g, s) for g, s, _, _ in mine if g >= 4 * G] == [(4 * G, 2 * G)]
    assert default != o.view and mine == o.view


def test_errors_name_the_machine_and_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r'"virt-10.0".*pc, q35, isapc, microvm'):
        _core._x86_layout("virt-10.0", [("mach-virt.ram", 64 * M)])
    with pytest.raises(ValueError, match=r'"pc-q35-10.0".*no "pc.ram" block \(blocks: mem0\)'):
        _core._x86_layout("pc-q35-10.0", [("mem0", 64 * M)])
    with pytest.raises(ValueError, match=r'"pc-i440fx-10.0".*host bridge'):
        _core._x86_layout("pc-i440fx-10.0", [("pc.ram", 64 * M)])
    with pytest.raises(ValueError, match=r'"microvm".*more than 4 GiB'):
        _core._x86_layout("microvm", [("microvm.ram", 64 * M)], 5 * G)
    with pytest.raises(ValueError, match=r'"pc-q35-10.0".*HyperTransport.*give the address'):
        _core._x86_layout("pc-q35-10.0", [("pc.ram", 1000 * G)])
    ranges, _ = _core._x86_layout("microvm", [("microvm.ram", 1000 * G)], above_4g_start=1 << 40)
    assert ranges[-1] == (1 << 40, 997 * G, "microvm.ram", 3 * G)
