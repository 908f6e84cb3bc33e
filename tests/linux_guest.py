"""A real Linux guest for the guest-memory tests, and the saves made of it.

* :func:`kernel` -- Debian's cloud kernel (package ``linux-image-*-cloud-
  amd64``, the one ``linux-image-cloud-amd64`` depends on), fetched with
  ``apt-get download`` once and unpacked into the cache directory
  (``$SAVEDIR_TEST_CACHE``, default ``~/.cache/savedir-tests``). The cloud
  flavour boots in half the time of the generic one under TCG.
* :func:`initramfs` -- a newc cpio written here: ``/dev/console`` and
  ``/init``, the static program of tests/guest_init.c (built with
  ``gcc -static -O2`` into the cache). It fills most of the free memory
  with checkable pages, prints ``READY <pages>`` and sleeps or rewrites.
* :class:`Guest` -- how to start that guest (kernel, initrd, serial console
  to a file) on ``pc`` or ``q35``; :func:`boot` waits for READY.
* :func:`make_saves` -- the saves the tests read (see :class:`GuestSaves`):
  at one paused moment ``dump-guest-memory`` (ELF, paging off) and a
  migration to a file, reloaded and saved again with ``mapped-ram``; and
  live saves (plain, XBZRLE, postcopy-ram) of a guest that keeps
  rewriting, each loaded into a fresh QEMU and dumped there.
* :func:`check_pattern` -- verifies the guest's pages in a dump (numpy).

QEMU runs under TCG, without a NIC; QMP and the postcopy migration use
unix sockets only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import physmap
import qemu_harness as h
import stream_kinds as sk

HERE = Path(__file__).resolve().parent
INIT_SOURCE = HERE / "guest_init.c"
KERNEL_META = "linux-image-cloud-amd64"
MAGIC = b"SAVEDIR!"
PAGE = 4096
MIB = 1 << 20


class GuestError(h.HarnessError):
    """The guest could not be built or booted."""


def cache_dir() -> Path:
    d = Path(os.environ.get("SAVEDIR_TEST_CACHE") or Path.home() / ".cache" / "savedir-tests")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(args: List[str], cwd: Optional[Path] = None, timeout: float = 600) -> str:
    r = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise GuestError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def kernel_package() -> str:
    """The kernel package Debian's cloud meta-package depends on now."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)\b", out)
    if not m:
        raise GuestError(f"apt-cache knows no kernel for {KERNEL_META} (run `apt-get update`):\n{out}")
    return m.group(1)


def kernel() -> Path:
    """The unpacked vmlinuz of :func:`kernel_package` (cached)."""
    pkg = kernel_package()
    d = cache_dir() / "kernel" / pkg
    vmlinuz = d / "vmlinuz"
    if vmlinuz.exists():
        return vmlinuz
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        t = Path(tmp)
        os.chmod(t, 0o755)  # apt's _apt user downloads into it
        _run(["apt-get", "download", "-qq", pkg], cwd=t)
        deb = next(t.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(t / "root")])
        found = sorted((t / "root" / "boot").glob("vmlinuz-*"))
        if not found:
            raise GuestError(f"{deb.name} holds no boot/vmlinuz-*")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found[0], d / "vmlinuz.part")
        os.replace(d / "vmlinuz.part", vmlinuz)
    return vmlinuz


def init_binary() -> Path:
    """tests/guest_init.c built static (cached by the source's hash)."""
    src = INIT_SOURCE.read_bytes()
    out = cache_dir() / f"init-{hashlib.sha256(src).hexdigest()[:16]}"
    if not out.exists():
        part = out.with_suffix(".part")
        _run(["gcc", "-static", "-O2", "-o", str(part), str(INIT_SOURCE)])
        os.replace(part, out)
    return out


def _cpio_entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: Tuple[int, int] = (0, 0)) -> bytes:
    nb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
    head = b"070701" + "".join(f"{v:08x}" for v in fields).encode() + nb
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def initramfs() -> Path:
    """A newc cpio with /dev/console and /init (cached next to the binary)."""
    init = init_binary()
    out = init.with_name(init.name + ".cpio")
    if not out.exists():
        blob = b"".join([
            _cpio_entry(1, "dev", 0o040755),
            _cpio_entry(2, "dev/console", 0o020600, rdev=(5, 1)),
            _cpio_entry(3, "init", 0o100755, init.read_bytes()),
            _cpio_entry(4, "TRAILER!!!", 0),
        ])
        blob += b"\0" * (-len(blob) % 512)
        part = out.with_suffix(".part")
        part.write_bytes(blob)
        os.replace(part, out)
    return out


# ---------------------------------------------------------------------------
# booting


@dataclass(frozen=True)
class Guest:
    """A Linux guest on ``machine`` with ``mem`` MiB."""

    machine: str
    mem: str
    rewrite: bool = False  # keep rewriting pages after READY
    fill_mib: Optional[int] = None  # None: most of the free memory
    caps: Tuple[Tuple[str, bool], ...] = ()

    def setup(self, console: Path) -> sk.Setup:
        """The QEMU setup; the destination of a migration needs the same
        (-kernel adds a linuxboot option ROM block), its console elsewhere."""
        append = "console=ttyS0 quiet panic=-1 mitigations=off"
        append += " sdmode=rewrite" if self.rewrite else ""
        append += f" sdfill={self.fill_mib}" if self.fill_mib else ""
        args = (
            "-kernel", str(kernel()), "-initrd", str(initramfs()), "-append", append,
            "-chardev", f"file,id=con0,path={console}", "-device", "isa-serial,chardev=con0",
            "-no-reboot",
        )
        return sk.Setup(machine=self.machine, mem=self.mem, args=args, caps=dict(self.caps))


def wait_ready(vm: h.VM, console: Path, timeout: float = 300.0) -> int:
    """Waits for the guest's READY line; returns the pages it filled."""
    deadline = time.monotonic() + timeout
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        m = re.search(r"READY (\d+)", text)
        if m:
            return int(m.group(1))
        if not vm.alive():
            raise GuestError(f"QEMU exited before the guest was ready\nconsole:\n{text[-3000:]}\nQEMU log:\n{vm.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise GuestError(f"the guest was not ready within {timeout:.0f} s\nconsole:\n{text[-3000:]}")
        time.sleep(0.1)


def dump(vm: h.VM, path: Path) -> Path:
    """QMP dump-guest-memory: ELF, paging off, synchronous."""
    vm.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}", format="elf", timeout=600)
    return path


# ---------------------------------------------------------------------------
# the saves


@dataclass
class Snapshot:
    """One paused moment: QEMU's dump and the save made right after it."""

    name: str
    guest: Guest
    dump: Path
    save: Path  # plain file: migration
    mapped: Path  # ``save`` loaded by a second QEMU and saved with mapped-ram
    pages: int  # pages the guest filled
    reload_dump: Optional[Path] = None  # the second QEMU's dump after the load (pc only)
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    mtree: str = ""  # `info mtree -f` at the paused moment


@dataclass
class LiveSave:
    """A stream QEMU wrote while the guest ran, and the dump of a fresh QEMU
    that loaded it (the oracle)."""

    kind: str  # "live", "xbzrle", "postcopy"
    guest: Guest
    save: Path
    dump: Path
    pages: int
    query_migrate: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class GuestSaves:
    pc: Snapshot
    q35: Snapshot
    live: Dict[str, LiveSave]
    seconds: float = 0.0

    @property
    def snapshots(self) -> List[Snapshot]:
        return [self.pc, self.q35]


def _console(d: Path, name: str) -> Path:
    p = d / f"{name}.console"
    p.unlink(missing_ok=True)
    return p


def _load_and(setup: sk.Setup, save: Path, then: Any, caps: Optional[Dict[str, bool]] = None) -> Any:
    """Loads ``save`` into a fresh paused QEMU built from ``setup``; returns
    ``then(vm)``."""
    with setup.vm(incoming="defer") as vm:
        vm.set_capabilities(caps)
        vm.migrate_incoming(f"file:{save}", timeout=600)
        deadline = time.monotonic() + 30
        while vm.status().get("status") == "inmigrate":
            if time.monotonic() > deadline:
                raise h.MigrationError(f"{save}: still inmigrate after the load\n{vm.log()[-3000:]}")
            time.sleep(0.05)
        st = vm.status()
        if st.get("status") not in h.LOADED_STATES:
            raise h.MigrationError(f"{save}: loaded into status {st}")
        return then(vm)


def _mapped_resave(setup: sk.Setup, save: Path, mapped: Path, reload_dump: Optional[Path]) -> None:
    def resave(vm: h.VM) -> None:
        if reload_dump is not None:
            dump(vm, reload_dump)
        vm.set_capabilities({"mapped-ram": True})
        vm.set_parameters(FAST)
        mapped.unlink(missing_ok=True)
        vm.migrate(f"file:{mapped}", timeout=600)

    _load_and(setup, save, resave)


#: QEMU limits a migration to 128 MiB/s by default, even to a file
FAST = {"max-bandwidth": 1 << 40}


def make_snapshot(root: Path, name: str, guest: Guest, reload_dump: bool = False) -> Snapshot:
    t0 = time.monotonic()
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    setup = guest.setup(_console(d, "source"))
    snap = Snapshot(name, guest, d / f"{name}.dump", d / f"{name}.sav", d / f"{name}-mapped.sav", 0,
                    d / f"{name}-reload.dump" if reload_dump else None)
    with setup.vm(log_path=d / "source.log") as vm:
        vm.cont()
        snap.pages = wait_ready(vm, d / "source.console")
        snap.timings["boot"] = time.monotonic() - t0
        vm.stop()
        snap.mtree = vm.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
        t = time.monotonic()
        dump(vm, snap.dump)
        snap.timings["dump"] = time.monotonic() - t
        vm.set_parameters(FAST)
        t = time.monotonic()
        vm.migrate(f"file:{snap.save}", timeout=600)
        snap.timings["save"] = time.monotonic() - t
    dest = guest.setup(_console(d, "reload"))
    t = time.monotonic()
    _mapped_resave(dest, snap.save, snap.mapped, snap.reload_dump)
    snap.timings["reload+mapped"] = time.monotonic() - t
    snap.seconds = time.monotonic() - t0
    return snap


def _live_migrate(vm: h.VM, uri: str, plan: sk.LivePlan, timeout: float = 300) -> Dict[str, Any]:
    """Migrates the running ``vm`` live to ``uri``: a downtime limit too small
    to converge for ``plan.syncs`` dirty-bitmap syncs, then a large one."""
    vm.set_parameters({"max-bandwidth": plan.max_bandwidth, "downtime-limit": plan.start_downtime_ms})
    vm.cmd("migrate", uri=uri)
    sk._wait_for_syncs(vm, plan.syncs, timeout)
    vm.set_parameters({"downtime-limit": plan.final_downtime_ms})
    return vm.wait_migration(f"live migrate to {uri}", timeout, cancel_on_timeout=True)


LIVE_PLAN = sk.LivePlan(warmup_seconds=0.0, syncs=4, start_downtime_ms=1, final_downtime_ms=60000,
                        max_bandwidth=1 << 30)


def make_live_saves(root: Path, guest: Guest) -> Dict[str, LiveSave]:
    """One booted guest that keeps rewriting, migrated live three times (it
    runs again after each): plain, XBZRLE, and postcopy-ram (through a
    recording proxy to a destination QEMU, as it needs a return path);
    each stream then loaded into a fresh QEMU and dumped."""
    d = root / "live"
    d.mkdir(parents=True, exist_ok=True)
    out: Dict[str, LiveSave] = {}
    with guest.setup(_console(d, "source")).vm(log_path=d / "source.log") as vm:
        vm.cont()
        pages = wait_ready(vm, d / "source.console")
        for kind in ("live", "xbzrle", "postcopy"):
            t0 = time.monotonic()
            save = d / f"{kind}.sav"
            save.unlink(missing_ok=True)
            if vm.status().get("status") != "running":
                vm.cont()
            vm.set_capabilities({"xbzrle": kind == "xbzrle", "postcopy-ram": kind == "postcopy"})
            if kind == "xbzrle":
                vm.set_parameters({"xbzrle-cache-size": 2 * int(guest.mem) * MIB})
            if kind == "postcopy":
                info = _postcopy_via_proxy(vm, guest, d, save)
            else:
                info = _live_migrate(vm, f"file:{save}", LIVE_PLAN)
            out[kind] = LiveSave(kind, guest, save, d / f"{kind}.dump", pages, info, time.monotonic() - t0)
    for ls in out.values():
        caps = {"postcopy-ram": True} if ls.kind == "postcopy" else None
        _load_and(guest.setup(_console(d, f"{ls.kind}-load")), ls.save, lambda vm, p=ls.dump: dump(vm, p), caps)
    return out


def _postcopy_via_proxy(vm: h.VM, guest: Guest, d: Path, record: Path) -> Dict[str, Any]:
    sockdir = tempfile.mkdtemp(prefix="pc-")
    listen, dest_sock = os.path.join(sockdir, "p.sock"), os.path.join(sockdir, "d.sock")
    try:
        with guest.setup(_console(d, "postcopy-dest")).vm(incoming="defer") as dvm:
            dvm.set_capabilities({"postcopy-ram": True})
            dvm.cmd("migrate-incoming", uri=f"unix:{dest_sock}", **{"exit-on-error": False})
            proxy = sk.RecordingProxy(listen, dest_sock, record)
            info = _live_migrate(vm, f"unix:{listen}", LIVE_PLAN)
            proxy.join(120)
            dvm.wait_migration("postcopy destination", 120)
        return info
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


PC = Guest("pc", "256")
# 1.5 GiB of the 3: Linux hands out the RAM above 4 GiB (its zone NORMAL)
# first, so the fill covers all of it and part of the RAM below, and the
# rest stays zero pages; cheaper to fill, save and load than all of it.
Q35 = Guest("q35", "3072", fill_mib=1536)
PC_LIVE = Guest("pc", "256", rewrite=True)


def make_saves(root: Path) -> GuestSaves:
    """Everything, in two parallel chains: the q35 3 GiB snapshot; the pc
    256 MiB snapshot then the live saves."""
    t0 = time.monotonic()
    kernel()  # fetch once, before the chains race for it
    initramfs()

    def pc_chain() -> Tuple[Snapshot, Dict[str, LiveSave]]:
        return make_snapshot(root, "pc", PC, reload_dump=True), make_live_saves(root, PC_LIVE)

    with ThreadPoolExecutor(max_workers=2) as pool:
        q35 = pool.submit(make_snapshot, root, "q35", Q35)
        pc = pool.submit(pc_chain)
        snap_pc, live = pc.result()
        snap_q35 = q35.result()
    return GuestSaves(snap_pc, snap_q35, live, time.monotonic() - t0)


# ---------------------------------------------------------------------------
# checking the guest's pattern


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _gen_deltas(gen: int) -> np.ndarray:
    """XOR of the generations 1..gen that touched each word (index 0..511)."""
    d = np.zeros(512, dtype=np.uint64)
    for g in range(1, gen + 1):
        d[3 + g % 509] ^= np.uint64(g)
    return d


def check_pattern(elf: physmap.Elf, pages: int) -> Dict[str, Any]:
    """Finds every page of the guest's fill in the dump's loads and checks
    each one word for word; raises AssertionError on any damage. Returns
    counts: pages found, the generations seen, and pages per load (by its
    guest-physical address)."""
    magic = np.frombuffer(MAGIC, dtype=np.uint64)[0]
    seen = np.zeros(pages, dtype=bool)
    words = np.arange(512, dtype=np.uint64)
    deltas: Dict[int, np.ndarray] = {}
    gens: Dict[int, int] = {}
    per_load: Dict[int, int] = {}
    with np.errstate(over="ignore"):
        for ld in elf.loads:
            for gpa, data in elf.chunks(ld):
                if len(data) % PAGE:
                    data = data[: len(data) - len(data) % PAGE]
                a = np.frombuffer(data, dtype=np.uint64).reshape(-1, 512)
                hit = np.nonzero(a[:, 0] == magic)[0]
                if not len(hit):
                    continue
                p = a[hit]
                idx = p[:, 2]
                assert (idx < pages).all(), f"page index out of range near {gpa:#x}"
                assert not seen[idx.astype(np.int64)].any(), f"a page of the fill appears twice near {gpa:#x}"
                seen[idx.astype(np.int64)] = True
                per_load[ld.paddr] = per_load.get(ld.paddr, 0) + len(hit)
                want = _mix(idx[:, None] * np.uint64(512) + words[None, :])
                for g in np.unique(p[:, 1]).tolist():
                    if g not in deltas:
                        deltas[g] = _gen_deltas(int(g))
                    rows = p[:, 1] == g
                    gens[int(g)] = gens.get(int(g), 0) + int(rows.sum())
                    bad = (p[rows, 3:] != (want[rows] ^ deltas[g][None, :])[:, 3:]).any(axis=1)
                    assert not bad.any(), (
                        f"{int(bad.sum())} damaged pages of generation {g} near {gpa:#x} "
                        f"(first at {gpa + int(hit[rows][bad][0]) * PAGE:#x})"
                    )
    missing = int((~seen).sum())
    assert missing == 0, f"{elf.path}: {missing} of the {pages} pages of the guest's fill are missing"
    return {"pages": pages, "generations": len(gens), "per_load": per_load}


# ---------------------------------------------------------------------------
# the fixture (imported by conftest.py)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def guest_saves(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """:class:`GuestSaves` of the real Linux guest, made once per session;
    the files (several GiB) are deleted when the session ends."""
    h.require_qemu()
    root = tmp_path_factory.mktemp("linux_guest")
    try:
        yield make_saves(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
