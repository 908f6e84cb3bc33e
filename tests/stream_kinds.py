"""Builders for the stream kinds of test_stream_kinds.py.

Everything here drives a real ``qemu-system-x86_64`` (TCG) through
``qemu_harness.VM``: QMP on a private unix socket, no NIC with a host
backend, so QEMU never gets a network connection.  The only sockets are
AF_UNIX ones: QMP, and for the return-path kinds a local unix-socket
migration through :class:`RecordingProxy`.

Pieces:

* :class:`Setup` -- how to build the VM on both sides (machine options,
  extra arguments such as ``-global``/``-object``/devices, memory,
  capabilities, parameters).  The source and the destination get the same
  setup.
* :func:`save` -- migrate a fresh VM to a URI (``file:PATH[,offset=N]`` or
  ``exec:...``), optionally after running it, or live while it runs.
* :func:`load` -- feed a file back into a fresh VM (``-incoming defer``).
* :class:`RecordingProxy` / :func:`migrate_via_proxy` -- a real migration
  over unix sockets whose source-to-destination bytes are recorded to a
  file, for streams that need a return path (postcopy-ram).
* :func:`boot_sector` / :func:`make_boot_disk` -- a hand-assembled 512-byte
  MBR that (optionally writes sectors of its own disk with int 13h, then)
  switches to protected mode and keeps dirtying ~9 MiB of guest RAM.
* ``make_*`` -- one builder per stream kind, returning a :class:`Made`.
* :func:`read_ram_item` -- an independent reader of RAM records.
* :func:`libvirt_header` -- a libvirt save image header.
* :func:`vmsd_size` -- a FULL payload's size from the vmdesc.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Union

import qemu_harness as h

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------
# setups


@dataclass(frozen=True)
class Setup:
    """One VM configuration, used identically to save and to load."""

    machine: str = "pc"
    args: tuple = ()  # devices, -global, -object, -drive ...: appended verbatim
    mem: str = "64"
    caps: Mapping[str, bool] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)  # set on both sides

    def vm(self, **kw: Any) -> h.VM:
        return h.VM(self.machine, list(self.args), mem=self.mem, **kw)

    def describe(self) -> str:
        """The QEMU options, as a human would type them (for reports)."""
        parts = [f"-machine {self.machine}", f"-m {self.mem}"] + [shlex.quote(a) for a in self.args]
        if self.caps:
            parts.append("caps " + ",".join(f"{k}={'on' if v else 'off'}" for k, v in self.caps.items()))
        if self.params:
            parts.append("params " + repr(dict(self.params)))
        return " ".join(parts)


def file_uri(path: PathLike, offset: int | None = None) -> str:
    p = os.fspath(Path(path).resolve())
    assert "," not in p, p
    return f"file:{p}" + (f",offset={offset}" if offset is not None else "")


# ---------------------------------------------------------------------------
# saving


@dataclass
class LivePlan:
    """Migrate while the guest runs.

    Migration starts with ``downtime-limit`` = ``start_downtime_ms`` (too
    small to converge while the guest dirties pages); once QEMU has synced
    the dirty bitmap ``syncs`` times, the limit is raised to
    ``final_downtime_ms`` so that the next iteration converges.
    """

    warmup_seconds: float = 1.0
    syncs: int = 4
    start_downtime_ms: int = 1
    final_downtime_ms: int = 5000
    max_bandwidth: int = 32 << 20
    # Switch to postcopy (``migrate-start-postcopy``) after the syncs instead
    # of raising the downtime limit (needs the postcopy-ram capability).
    start_postcopy: bool = False


@dataclass
class SaveInfo:
    seconds: float
    query_migrate: dict[str, Any]
    log: str


def _wait_for_syncs(vm: h.VM, syncs: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate()
        st = info.get("status")
        if st in ("failed", "cancelled"):
            raise h.MigrationError(f"migration {st}: {info}\nQEMU log:\n{vm.log()[-3000:]}")
        if st == "completed" or info.get("ram", {}).get("dirty-sync-count", 0) >= syncs:
            return info
        if time.monotonic() > deadline:
            raise h.MigrationError(f"fewer than {syncs} dirty syncs within {timeout}s: {info}")
        time.sleep(0.02)


def save(
    setup: Setup,
    uri: str,
    *,
    run_seconds: float = 0.0,
    keep_running: bool = False,
    live: LivePlan | None = None,
    before_migrate: Callable[[h.VM], None] | None = None,
    timeout: float = 90.0,
    log_path: PathLike | None = None,
) -> SaveInfo:
    """Migrate a fresh VM built from ``setup`` to ``uri`` and wait for completion.

    The VM starts paused.  ``run_seconds``: let it run that long first, then
    stop it (unless ``keep_running``: then it is migrated while running).
    ``live``: let it run and migrate live (see :class:`LivePlan`).
    """
    t0 = time.monotonic()
    with setup.vm(log_path=log_path) as vm:
        vm.set_capabilities(dict(setup.caps) or None)
        vm.set_parameters(dict(setup.params) or None)
        if live is not None:
            vm.set_parameters({"max-bandwidth": live.max_bandwidth, "downtime-limit": live.start_downtime_ms})
            vm.cont()
            time.sleep(live.warmup_seconds)
            if before_migrate:
                before_migrate(vm)
            vm.cmd("migrate", uri=uri)
            _wait_for_syncs(vm, live.syncs, timeout)
            if live.start_postcopy:
                # Still unable to converge: the switch happens at the next iteration.
                vm.cmd("migrate-start-postcopy")
            else:
                vm.set_parameters({"downtime-limit": live.final_downtime_ms})
            info = vm.wait_migration(f"live migrate to {uri}", timeout, cancel_on_timeout=True)
        else:
            if run_seconds > 0:
                vm.cont()
                time.sleep(run_seconds)
                if not keep_running:
                    vm.stop()
            if before_migrate:
                before_migrate(vm)
            info = vm.migrate(uri, timeout=timeout)
        log = vm.log()
    return SaveInfo(seconds=time.monotonic() - t0, query_migrate=info, log=log)


def save_exec(setup: Setup, command: str, done: Path, *, timeout: float = 60.0, **kw: Any) -> SaveInfo:
    """Migrate to ``exec:COMMAND; touch DONE`` and wait until DONE exists,
    so that every process in ``command`` has finished writing."""
    if done.exists():
        done.unlink()
    full = f"{command}; touch {shlex.quote(str(done))}"
    info = save(setup, "exec:" + full, timeout=timeout, **kw)
    deadline = time.monotonic() + 30
    while not done.exists():
        if time.monotonic() > deadline:
            raise h.MigrationError(f"exec command did not finish: {full}")
        time.sleep(0.02)
    return info


# ---------------------------------------------------------------------------
# loading


def load(
    setup: Setup,
    uri: str,
    *,
    timeout: float = 60.0,
    log_path: PathLike | None = None,
    inspect: Callable[[h.VM], None] | None = None,
) -> dict[str, Any]:
    """Load ``uri`` (e.g. ``file:P,offset=N``) into a fresh VM built from
    ``setup``; return ``query-status``.  Raises ``MigrationError`` on failure
    (QEMU's stderr is in the message).  ``inspect(vm)`` runs after a
    successful load, before the VM quits."""
    with setup.vm(incoming="defer", log_path=log_path) as vm:
        vm.set_capabilities(dict(setup.caps) or None)
        vm.set_parameters(dict(setup.params) or None)
        vm.migrate_incoming(uri, timeout=timeout)
        deadline = time.monotonic() + 10
        while True:
            st = vm.status()
            if st.get("status") != "inmigrate":
                if inspect is not None:
                    inspect(vm)
                return st
            if time.monotonic() > deadline:
                raise h.MigrationError(f"{uri}: still inmigrate after completion\n{vm.log()[-3000:]}")
            time.sleep(0.02)


def load_error(setup: Setup, uri: str) -> str:
    """Load ``uri`` expecting failure; return QEMU's error text."""
    try:
        st = load(setup, uri)
    except h.MigrationError as exc:
        return str(exc)
    raise AssertionError(f"QEMU loaded {uri} (status {st}) but was expected to refuse it")


# ---------------------------------------------------------------------------
# return-path migrations over unix sockets


def _short_dir() -> str:
    """A short private directory for unix sockets (paths are limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix="sk-")


class RecordingProxy:
    """Listens on a unix socket for a migration source, connects to the
    destination's unix socket, pumps both directions and writes every byte
    going from source to destination to ``record``."""

    def __init__(self, listen_path: str, dest_path: str, record: PathLike):
        self.listen_path = listen_path
        self.dest_path = dest_path
        self.record = Path(record)
        self.error: BaseException | None = None
        self.forwarded = 0
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(listen_path)
        self._srv.listen(1)
        self._srv.settimeout(60)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _connect_dest(self) -> socket.socket:
        deadline = time.monotonic() + 20
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.dest_path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _run(self) -> None:
        try:
            src, _ = self._srv.accept()
            dst = self._connect_dest()
            back = threading.Thread(target=self._pump_back, args=(dst, src), daemon=True)
            back.start()
            with open(self.record, "wb") as out:
                while True:
                    chunk = src.recv(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    self.forwarded += len(chunk)
                    dst.sendall(chunk)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            back.join(30)
            src.close()
            dst.close()
        except Exception as exc:  # noqa: BLE001 -- reported by join()
            self.error = exc
        finally:
            self._srv.close()

    @staticmethod
    def _pump_back(dst: socket.socket, src: socket.socket) -> None:
        try:
            while True:
                chunk = dst.recv(65536)
                if not chunk:
                    break
                src.sendall(chunk)
        except OSError:
            pass
        try:
            src.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise h.MigrationError("recording proxy did not finish")
        if self.error is not None:
            raise self.error


def migrate_via_proxy(
    setup: Setup,
    record: PathLike,
    *,
    run_seconds: float = 0.0,
    live: LivePlan | None = None,
    before_migrate: Callable[[h.VM], None] | None = None,
    dest_setup: Setup | None = None,
    timeout: float = 90.0,
    dest_inspect: Callable[[h.VM], None] | None = None,
) -> dict[str, Any]:
    """A real migration source -> proxy -> destination over unix sockets,
    the stream recorded to ``record``.  Returns the destination's
    ``query-status`` after it loaded the stream; ``dest_inspect(vm)`` runs
    on the destination then, before it quits."""
    d = _short_dir()
    listen, dest = os.path.join(d, "p.sock"), os.path.join(d, "d.sock")
    dest_setup = dest_setup or setup
    with dest_setup.vm(incoming="defer") as dvm:
        dvm.set_capabilities(dict(dest_setup.caps) or None)
        dvm.set_parameters(dict(dest_setup.params) or None)
        dvm.cmd("migrate-incoming", uri=f"unix:{dest}", **{"exit-on-error": False})
        proxy = RecordingProxy(listen, dest, record)
        save(setup, f"unix:{listen}", run_seconds=run_seconds, live=live, before_migrate=before_migrate, timeout=timeout)
        proxy.join()
        dvm.wait_migration("incoming via proxy", timeout)
        deadline = time.monotonic() + 10
        while dvm.status().get("status") == "inmigrate":
            if time.monotonic() > deadline:
                raise h.MigrationError("destination stuck in inmigrate")
            time.sleep(0.02)
        status = dvm.status()
        if dest_inspect is not None:
            dest_inspect(dvm)
    shutil.rmtree(d, ignore_errors=True)
    return status


# ---------------------------------------------------------------------------
# a guest that dirties memory


def boot_sector(write_sectors: int = 0, high_end: int = 0x900000) -> bytes:
    """A 512-byte MBR, assembled by hand (loaded by the BIOS at 0:7C00).

    Real mode first: a stack at 0:7C00; with ``write_sectors`` = n > 0 it
    writes n sectors of its own boot disk (BIOS int 13h, AH=03h, drive in DL
    as the BIOS passed it, cylinder 0 head 0 from sector 2, buffer 0:7C00) so
    that a dirty bitmap on that disk gets bits set.  Then it enables A20
    (port 92h), loads a 3-entry GDT (flat 4 GiB code and data), switches to
    32-bit protected mode with interrupts off, and loops forever
    incrementing the first byte of every 4 KiB page of [0x10000, 0x80000)
    (the "segments 0x1000..0x8000" of low memory) and of
    [0x100000, ``high_end``), so all those pages stay dirty.
    """
    base = 0x7C00
    c = bytearray()
    c += b"\xfa"  # cli
    c += b"\x31\xc0"  # xor ax, ax
    c += b"\x8e\xd8"  # mov ds, ax
    c += b"\x8e\xd0"  # mov ss, ax
    c += b"\xbc\x00\x7c"  # mov sp, 0x7c00
    if write_sectors:
        assert 0 < write_sectors < 64
        c += b"\xfb"  # sti (the BIOS disk code wants interrupts)
        c += b"\x8e\xc0"  # mov es, ax   (0)
        c += b"\xbb\x00\x7c"  # mov bx, 0x7c00
        c += b"\xb8" + bytes([write_sectors, 0x03])  # mov ax, 0x03nn: AH=3 write, AL=n sectors
        c += b"\xb9\x02\x00"  # mov cx, 0x0002: CH=0 cylinder, CL=2 first sector
        c += b"\x30\xf6"  # xor dh, dh: head 0; DL is still the boot drive
        c += b"\xcd\x13"  # int 0x13
        c += b"\xfa"  # cli
    c += b"\xe4\x92"  # in al, 0x92
    c += b"\x0c\x02"  # or al, 2       (fast A20)
    c += b"\xe6\x92"  # out 0x92, al
    lgdt_at = len(c)
    c += b"\x0f\x01\x16\x00\x00"  # lgdt [gdt_desc]   (address patched below)
    c += b"\x0f\x20\xc0"  # mov eax, cr0
    c += b"\x0c\x01"  # or al, 1        (PE)
    c += b"\x0f\x22\xc0"  # mov cr0, eax
    jmp_at = len(c)
    c += b"\xea\x00\x00\x08\x00"  # jmp 0x08:pm32  (offset patched below)
    pm32 = len(c)
    # ---- 32-bit code
    c += b"\x66\xb8\x10\x00"  # mov ax, 0x10
    c += b"\x8e\xd8"  # mov ds, ax
    c += b"\x8e\xc0"  # mov es, ax
    c += b"\x8e\xd0"  # mov ss, ax
    c += b"\xbc" + struct.pack("<I", base)  # mov esp, 0x7c00
    outer = len(c)
    for lo, hi in ((0x10000, 0x80000), (0x100000, high_end)):
        if hi <= lo:
            continue
        c += b"\xbb" + struct.pack("<I", lo)  # mov ebx, lo
        inner = len(c)
        c += b"\xfe\x03"  # inc byte [ebx]
        c += b"\x81\xc3" + struct.pack("<I", 0x1000)  # add ebx, 4096
        c += b"\x81\xfb" + struct.pack("<I", hi)  # cmp ebx, hi
        c += b"\x72" + struct.pack("b", inner - (len(c) + 2))  # jb inner
    c += b"\xeb" + struct.pack("b", outer - (len(c) + 2))  # jmp outer
    # ---- GDT: null, flat code (0x08), flat data (0x10); then its descriptor
    while len(c) % 8:
        c += b"\x90"
    gdt = len(c)
    c += bytes(8)
    c += bytes([0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9A, 0xCF, 0x00])
    c += bytes([0xFF, 0xFF, 0x00, 0x00, 0x00, 0x92, 0xCF, 0x00])
    desc = len(c)
    c += struct.pack("<HI", 3 * 8 - 1, base + gdt)
    c[lgdt_at + 3:lgdt_at + 5] = struct.pack("<H", base + desc)
    c[jmp_at + 1:jmp_at + 3] = struct.pack("<H", base + pm32)
    assert len(c) <= 446, len(c)
    sector = bytes(c) + bytes(510 - len(c)) + b"\x55\xaa"
    assert len(sector) == 512
    return sector


def make_boot_disk(path: PathLike, fmt: str = "raw", write_sectors: int = 0, size: int = 1 << 20) -> Path:
    """A bootable disk image whose first sector is :func:`boot_sector`."""
    path = Path(path)
    raw = path if fmt == "raw" else path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.write(boot_sector(write_sectors))
        f.truncate(size)
    if fmt != "raw":
        subprocess.run(
            [h.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)],
            check=True, capture_output=True, timeout=60,
        )
        raw.unlink()
    return path


# ---------------------------------------------------------------------------
# libvirt save image header

LIBVIRT_MAGIC = b"LibvirtQemudSave"
LIBVIRT_MAGIC_PARTIAL = b"LibvirtQemudPart"
LIBVIRT_HEADER_LEN = 92
LIBVIRT_FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}


def domain_xml(name: str, uuid: str) -> bytes:
    return (
        f"<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n"
        f"  <memory unit='KiB'>65536</memory>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n"
        f"</domain>\n"
    ).encode()


def libvirt_header(
    name: str,
    uuid: str,
    *,
    fmt: int = 0,
    magic: bytes = LIBVIRT_MAGIC,
    data_len: int = 4096 - LIBVIRT_HEADER_LEN,
    was_running: int = 0,
    version: int = 2,
) -> bytes:
    """92-byte header (host-endian u32s: this is a little-endian host) plus
    ``data_len`` bytes of NUL-terminated domain XML and zero padding."""
    xml = domain_xml(name, uuid) + b"\x00"
    assert len(xml) <= data_len
    head = magic + struct.pack("<5I", version, data_len, was_running, fmt, 0) + bytes(56)
    assert len(head) == LIBVIRT_HEADER_LEN
    return head + xml + bytes(data_len - len(xml))


# ---------------------------------------------------------------------------
# vmdesc arithmetic


def vmsd_size(d: Mapping[str, Any]) -> int:
    """Bytes of a VMState payload as the vmdesc describes it."""
    total = 0
    for f in d.get("fields", []):
        total += f["size"] * f.get("array_len", 1)
    for s in d.get("subsections", []):
        total += 1 + 1 + len(s["vmsd_name"]) + 4 + vmsd_size(s)
    return total


def field_offset(dev: Mapping[str, Any], field_name: str) -> tuple | None:
    """(offset within the payload, size) of a top-level field of a vmdesc
    device, or None."""
    off = 0
    for f in dev.get("fields", []):
        n = f["size"] * f.get("array_len", 1)
        if f["name"] == field_name:
            return off, n
        off += n
    return None


# ---------------------------------------------------------------------------
# the stream kinds


@dataclass
class Made:
    """One stream written by QEMU, and how to load it back."""

    kind: str
    path: Path
    setup: Setup
    offset: int | None = None  # QEMU wrote at file:PATH,offset=N
    savedir_offset: int | None = None  # must be passed to savedir (it cannot find the stream alone)
    vmdesc: bool = True  # the stream ends in a vmdesc
    twin_vmdesc: dict[str, Any] | None = None  # vmdesc of the same config without suppress-vmdesc
    load_refused: str | None = None  # QEMU refuses even the original file with this text
    info: SaveInfo | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return file_uri(self.path, self.offset)

    def load(self, path: PathLike | None = None, **kw: Any) -> dict[str, Any]:
        return load(self.setup, file_uri(path or self.path, self.offset), **kw)


def boot_args(disk: PathLike, fmt: str = "raw") -> tuple:
    """A guest booting :func:`boot_sector` from an IDE disk."""
    return ("-drive", f"file={disk},format={fmt},if=ide,index=0,media=disk")


def booted_setup(tmp: Path, **kw: Any) -> Setup:
    """A 32 MiB ``pc`` guest running :func:`boot_sector` (dirties ~9 MiB)."""
    disk = make_boot_disk(tmp / "boot.img")
    args = boot_args(disk) + tuple(kw.pop("args", ()))
    kw.setdefault("mem", "32")
    return Setup(args=args, **kw)


def _made(kind: str, path: Path, setup: Setup, t0: float, **kw: Any) -> Made:
    return Made(kind=kind, path=path, setup=setup, seconds=time.monotonic() - t0, **kw)


def vmdesc_of(path: PathLike) -> dict[str, Any]:
    desc = h.vmdesc(Path(path).read_bytes())
    assert desc is not None, f"{path}: no vmdesc"
    return desc


# -- 1. mapped-ram

def make_mapped_ram(tmp: Path, channels: int = 0) -> Made:
    t0 = time.monotonic()
    caps: dict[str, bool] = {"mapped-ram": True}
    params: dict[str, Any] = {}
    if channels:
        caps["multifd"] = True
        params["multifd-channels"] = channels
    setup = booted_setup(tmp, caps=caps, params=params)
    p = tmp / "mapped-ram.sav"
    info = save(setup, file_uri(p), run_seconds=0.7)
    return _made(f"mapped-ram-{channels or 'alone'}", p, setup, t0, info=info)


# -- 2. x-ignore-shared

def shared_ram_setup(tmp: Path, mapped_ram: bool, backend: str = "file") -> Setup:
    """Guest RAM in a shared memory backend.  ``file``: a file in ``tmp``,
    mapped by both sides (QEMU ignores only blocks backed by a named file,
    so this is the one where x-ignore-shared leaves the RAM out of the
    stream).  ``memfd``: an anonymous shared memfd (QEMU still sends it)."""
    disk = make_boot_disk(tmp / "boot.img")
    if backend == "file":
        obj = f"memory-backend-file,id=mem0,size=32M,mem-path={tmp / 'guest.ram'},share=on"
    else:
        obj = "memory-backend-memfd,id=mem0,size=32M,share=on"
    caps = {"x-ignore-shared": True}
    if mapped_ram:
        caps["mapped-ram"] = True
    return Setup(machine="pc,memory-backend=mem0", mem="32", args=boot_args(disk) + ("-object", obj), caps=caps)


def make_ignore_shared(tmp: Path, mapped_ram: bool = False, backend: str = "file") -> Made:
    t0 = time.monotonic()
    setup = shared_ram_setup(tmp, mapped_ram, backend)
    p = tmp / "ignore-shared.sav"
    info = save(setup, file_uri(p), run_seconds=0.7)
    m = _made("x-ignore-shared" + ("+mapped-ram" if mapped_ram else "") + f"-{backend}", p, setup, t0, info=info)
    if mapped_ram:
        # QEMU 10.0.2 cannot load its own x-ignore-shared + mapped-ram stream
        m.load_refused = "region has bad alignment"
    return m


# -- 3. no vmdesc

def make_no_vmdesc(tmp: Path, machine: str) -> Made:
    t0 = time.monotonic()
    devices = tuple(h.full_devices(tmp))
    setup = Setup(machine=f"{machine},suppress-vmdesc=on", args=devices)
    twin = Setup(machine=machine, args=devices)
    p, tp = tmp / "no-vmdesc.sav", tmp / "twin.sav"
    info = save(setup, file_uri(p))
    save(twin, file_uri(tp))
    return _made(f"no-vmdesc-{machine}", p, setup, t0, info=info, vmdesc=False,
                 twin_vmdesc=vmdesc_of(tp), extra={"twin": tp})


# -- 4. no footers

NO_FOOTERS = ("-global", "migration.send-section-footer=off")


def make_no_footers(tmp: Path, suppress_vmdesc: bool = False) -> Made:
    t0 = time.monotonic()
    devices = tuple(h.full_devices(tmp)) + NO_FOOTERS
    machine = "pc,suppress-vmdesc=on" if suppress_vmdesc else "pc"
    setup = Setup(machine=machine, args=devices)
    p = tmp / "no-footers.sav"
    info = save(setup, file_uri(p))
    return _made("no-footers" + ("-no-vmdesc" if suppress_vmdesc else ""), p, setup, t0, info=info,
                 vmdesc=not suppress_vmdesc)


def make_no_configuration(tmp: Path) -> Made:
    """No configuration section (what Xen machines write): QEMU 10 aborts
    when send-configuration is off and a vmdesc is sent, so no vmdesc."""
    t0 = time.monotonic()
    devices = tuple(h.full_devices(tmp)) + ("-global", "migration.send-configuration=off")
    setup = Setup(machine="pc,suppress-vmdesc=on", args=devices)
    p = tmp / "no-configuration.sav"
    info = save(setup, file_uri(p))
    return _made("no-configuration", p, setup, t0, info=info, vmdesc=False)


# -- 5. live saves

def make_live(tmp: Path, variant: str) -> Made:
    """``plain`` / ``xbzrle``: live migration to a file.  ``postcopy-ram``:
    a live migration with postcopy-ram enabled that completes as precopy;
    it needs a return path (to ``exec:cat > F`` the source never completes:
    it waits for the destination's SHUT), so it runs source -> recording
    proxy -> destination QEMU over unix sockets."""
    t0 = time.monotonic()
    caps = {} if variant == "plain" else {variant: True}
    setup = booted_setup(tmp, caps=caps)
    p = tmp / f"live-{variant}.sav"
    extra: dict[str, Any] = {}
    info = None
    if variant == "postcopy-ram":
        extra["proxy_destination_status"] = migrate_via_proxy(setup, p, live=LivePlan())
    else:
        info = save(setup, file_uri(p), live=LivePlan())
    return _made(f"live-{variant}", p, setup, t0, info=info, extra=extra)


# -- 6. background snapshot

def make_background_snapshot(tmp: Path) -> Made:
    """The guest keeps running during and after the save.  (From a guest
    that never ran -- runstate prelaunch -- QEMU 10.0.2 aborts instead:
    "invalid runstate transition: 'prelaunch' -> 'paused'".)"""
    t0 = time.monotonic()
    setup = booted_setup(tmp, caps={"background-snapshot": True})
    p = tmp / "background.sav"
    info = save(setup, file_uri(p), run_seconds=0.7, keep_running=True)
    return _made("background-snapshot", p, setup, t0, info=info)


# -- 7. block dirty bitmaps

def bitmap_setup(tmp: Path) -> Setup:
    disk = make_boot_disk(tmp / "boot.qcow2", fmt="qcow2", write_sectors=8)
    return Setup(
        mem="32",
        args=(
            "-blockdev", f"driver=file,node-name=boot-file,filename={disk}",
            "-blockdev", "driver=qcow2,node-name=boot0,file=boot-file",
            "-device", "ide-hd,drive=boot0,bus=ide.0,bootindex=0",
        ),
        caps={"dirty-bitmaps": True},
    )


def dirty_bitmaps(vm: h.VM, node: str = "boot0") -> list[dict[str, Any]]:
    for b in vm.cmd("query-block"):
        ins = b.get("inserted") or {}
        if ins.get("node-name") == node:
            return list(ins.get("dirty-bitmaps") or [])
    return []


def make_dirty_bitmaps(tmp: Path, persistent: bool) -> Made:
    t0 = time.monotonic()
    setup = bitmap_setup(tmp)
    p = tmp / "dirty-bitmaps.sav"
    seen: dict[str, Any] = {}

    def before(vm: h.VM) -> None:
        seen["bitmaps"] = dirty_bitmaps(vm)

    def add_bitmap(vm: h.VM) -> None:
        # (VM.cmd's own first parameter is called "name": go through a transaction)
        vm.cmd("transaction", actions=[{
            "type": "block-dirty-bitmap-add",
            "data": {"node": "boot0", "name": "bm0", "granularity": 4096, "persistent": persistent},
        }])

    with setup.vm() as vm:
        vm.set_capabilities(dict(setup.caps))
        add_bitmap(vm)
        vm.cont()
        deadline = time.monotonic() + 20
        while True:  # wait until the boot sector's int 13h write set bits
            bms = dirty_bitmaps(vm)
            if bms and bms[0].get("count", 0) > 0:
                break
            if time.monotonic() > deadline:
                raise h.MigrationError(f"no dirty bits after 20 s: {bms}")
            time.sleep(0.05)
        vm.stop()
        before(vm)
        info_q = vm.migrate(file_uri(p))
        log = vm.log()
    info = SaveInfo(seconds=time.monotonic() - t0, query_migrate=info_q, log=log)
    return _made(f"dirty-bitmaps-{'persistent' if persistent else 'transient'}", p, setup, t0,
                 info=info, extra={"source_bitmaps": seen["bitmaps"], "persistent": persistent})


# -- 8. streams at an offset

LIBVIRT_NAME = "testvm"
LIBVIRT_UUID = "6f1c7d2e-3b9a-4c55-8e21-9d0b7a4f2c13"


def make_at_offset(tmp: Path, header: bytes, kind: str, caps: dict[str, bool] | None = None,
                   savedir_offset: bool = False) -> Made:
    """QEMU writes its stream to ``file:PATH,offset=len(header)`` of a file
    that already holds ``header``."""
    t0 = time.monotonic()
    p = tmp / f"{kind}.sav"
    p.write_bytes(header)
    setup = booted_setup(tmp, caps=caps or {})
    info = save(setup, file_uri(p, len(header)), run_seconds=0.5)
    return _made(kind, p, setup, t0, info=info, offset=len(header),
                 savedir_offset=len(header) if savedir_offset else None, extra={"header": header})


def arbitrary_header(n: int, seed: int) -> bytes:
    """Deterministic junk that never contains the QEMU magic."""
    rnd = random.Random(seed)
    data = bytes(rnd.getrandbits(8) for _ in range(n))
    assert b"QEVM" not in data
    return data


def libvirt_data_len() -> int:
    """Like libvirt: the XML, its NUL, and 64 KiB of room to edit it in place."""
    return len(domain_xml(LIBVIRT_NAME, LIBVIRT_UUID)) + 1 + 65536


def make_libvirt(tmp: Path, fmt: int) -> Made:
    hdr = libvirt_header(LIBVIRT_NAME, LIBVIRT_UUID, fmt=fmt, data_len=libvirt_data_len(), was_running=1)
    caps = {"mapped-ram": True} if fmt == 6 else None
    return make_at_offset(tmp, hdr, f"libvirt-format{fmt}", caps=caps)


# -- 9. machine types

MACHINE_SETUPS = {
    "isapc": Setup(machine="isapc"),
    # microvm: no PCI, no firmware tables needed; -nodefaults leaves it bare
    "microvm": Setup(machine="microvm"),
}


def make_machine(tmp: Path, machine: str) -> Made:
    t0 = time.monotonic()
    setup = MACHINE_SETUPS[machine]
    p = tmp / f"{machine}.sav"
    info = save(setup, file_uri(p), run_seconds=0.5)
    return _made(f"machine-{machine}", p, setup, t0, info=info)


def clone(m: Made, directory: Path, name: str | None = None) -> Made:
    """A copy of ``m`` whose file is a private copy in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / (name or m.path.name)
    shutil.copyfile(m.path, dest)
    return replace(m, path=dest, extra=dict(m.extra))


# ---------------------------------------------------------------------------
# an independent reader of RAM records (docs/qemu-stream-format.md section 3)

RAM_FLAGS = {
    0x002: "zero", 0x004: "mem_size", 0x008: "page", 0x010: "eos", 0x020: "continue",
    0x040: "xbzrle", 0x080: "hook", 0x100: "compress_page", 0x200: "multifd_flush",
}


@dataclass
class RamBlock:
    name: str
    used_length: int
    addr: int | None = None  # x-ignore-shared
    mapped_version: int | None = None
    page_size: int | None = None
    bitmap_offset: int | None = None  # absolute file offsets (mapped-ram)
    pages_offset: int | None = None


def read_ram_item(
    data: bytes,
    pos: int,
    end: int,
    *,
    ignore_shared: bool = False,
    mapped_ram: bool = False,
    page_size: int = 4096,
    counts: dict[str, int] | None = None,
    blocks: list[RamBlock] | None = None,
) -> int:
    """Reads one RAM payload of ``data`` (the whole file) from ``pos`` to its
    EOS word; returns the position right after EOS.  Applies mapped-ram's
    seeks.  ``counts`` gets one count per record kind."""
    counts = counts if counts is not None else {}

    def be(n: int) -> int:
        nonlocal pos
        assert pos + n <= end, f"RAM record runs past {end} at {pos}"
        v = int.from_bytes(data[pos:pos + n], "big")
        pos += n
        return v

    def cstr() -> str:
        n = be(1)
        nonlocal pos
        s = data[pos:pos + n].decode()
        pos += n
        return s

    while True:
        word = be(8)
        flags = word & 0x3FF
        if flags & 0x010:
            counts["eos"] = counts.get("eos", 0) + 1
            return pos
        if flags == 0x200:
            counts["multifd_flush"] = counts.get("multifd_flush", 0) + 1
            continue
        if flags & 0x004:
            total = word & ~0x3FF
            counts["mem_size"] = counts.get("mem_size", 0) + 1
            seen = 0
            while seen < total:
                b = RamBlock(name=cstr(), used_length=be(8))
                seen += b.used_length
                if ignore_shared:
                    b.addr = be(8)
                if mapped_ram:
                    b.mapped_version, b.page_size = be(4), be(8)
                    b.bitmap_offset, b.pages_offset = be(8), be(8)
                    if b.pages_offset:
                        pos = b.pages_offset + b.used_length  # QEMU seeks over the pages
                if blocks is not None:
                    blocks.append(b)
            assert seen == total, (seen, total)
            continue
        kind = None
        for bit in (0x002, 0x008, 0x040):
            if flags & bit:
                kind = RAM_FLAGS[bit]
        assert kind is not None, f"unknown RAM flags {flags:#x} at {pos - 8}"
        if not flags & 0x020:
            cstr()
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "zero":
            be(1)
        elif kind == "page":
            assert pos + page_size <= end, f"page runs past {end} at {pos}"
            pos += page_size
        else:  # xbzrle
            assert be(1) == 0x01
            n = be(2)
            assert n <= page_size
            pos += n
