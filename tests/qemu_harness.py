"""Drive a real QEMU (TCG, no network) to write and read migration streams.

Standard library only.  The pieces:

* :class:`QMP` -- a minimal QMP client over an AF_UNIX socket; every read has
  a deadline, so nothing here can hang forever.
* :class:`VM` -- a context manager around one ``qemu-system-x86_64`` process
  (paused with ``-S`` by default, no default devices, no display, QMP on a
  private unix socket, stdout+stderr in a log file).
* :func:`save_stream` / :func:`load_stream` -- write a real stream with
  ``migrate`` to ``exec:`` or ``file:``, and feed one back with
  ``migrate-incoming``.
* :data:`DEVICES_MINIMAL`, :data:`DEVICES_FULL`, :func:`full_devices` -- the
  device sets used by the tests.

QEMU never gets a network connection: NICs sit on their own ``hubport``
backend with nothing else on the hub, QMP is a unix socket, and there is no
``-nic``/``-netdev user``/tap anywhere.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

QEMU_BINARY = os.environ.get("QEMU_SYSTEM_X86_64", "qemu-system-x86_64")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
INSTALL_HINT = "run `.ci/install-qemu.sh` (as root) to install qemu-system-x86 >= 10"

#: ``query-status`` of a destination after a successful load (with -S, or
#: when the source was not running -- always the case here): "prelaunch" if
#: the source never ran, "paused" if it ran and was stopped.
LOADED_STATES = frozenset({"prelaunch", "paused"})

#: First bytes of every stream: QEMU_VM_FILE_MAGIC "QEVM" + QEMU_VM_FILE_VERSION 3.
STREAM_MAGIC = b"QEVM\x00\x00\x00\x03"

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------
# errors


class HarnessError(RuntimeError):
    """Something went wrong driving QEMU; the message carries QEMU's log."""


class QMPError(HarnessError):
    """A QMP command answered with ``{"error": ...}``."""

    def __init__(self, command: str, error: Mapping[str, Any]):
        self.command = command
        self.error_class = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"QMP {command}: {self.error_class}: {self.desc}")


class QMPTimeout(HarnessError):
    """No (complete) QMP message arrived in time, or the socket closed."""


class MigrationError(HarnessError):
    """An outgoing or incoming migration failed or did not finish in time."""


class QEMUExited(MigrationError):
    """QEMU exited while the harness was talking to it (e.g. a failed load
    with ``exit-on-error=true``, QEMU's default)."""


def _tail(text: str, limit: int = 4000) -> str:
    text = text.strip()
    if len(text) > limit:
        text = "...\n" + text[-limit:]
    return text or "(empty)"


# --------------------------------------------------------------------------
# QMP


class QMP:
    """A minimal QMP client over a unix socket.

    ``QMP(path)`` connects (retrying until ``connect_timeout``), reads the
    greeting and negotiates ``qmp_capabilities``.  :meth:`cmd` sends one
    command and returns its ``return`` value; asynchronous events that arrive
    meanwhile are appended to :attr:`events`.
    """

    def __init__(
        self,
        path: PathLike,
        connect_timeout: float = 15.0,
        timeout: float = 30.0,
        alive: Optional[Callable[[], bool]] = None,
    ):
        self.path = os.fspath(path)
        self.timeout = timeout
        self.events: List[Dict[str, Any]] = []
        self.greeting: Dict[str, Any] = {}
        self._buf = b""
        self._next_id = 0
        self._sock: Optional[socket.socket] = None
        self._connect(connect_timeout, alive)
        try:
            self.greeting = self._read_message(self.timeout)
            if "QMP" not in self.greeting:
                raise QMPTimeout(f"unexpected QMP greeting: {self.greeting!r}")
            self.cmd("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    # -- connection ---------------------------------------------------------

    def _connect(self, connect_timeout: float, alive: Optional[Callable[[], bool]]) -> None:
        deadline = time.monotonic() + connect_timeout
        last: Optional[BaseException] = None
        while True:
            if alive is not None and not alive():
                raise QMPTimeout(f"QEMU exited before its QMP socket {self.path} accepted a connection")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
            try:
                sock.connect(self.path)
            except OSError as exc:  # not there yet / refused
                sock.close()
                last = exc
                if time.monotonic() >= deadline:
                    raise QMPTimeout(f"cannot connect to QMP socket {self.path}: {last}") from None
                time.sleep(0.02)
                continue
            self._sock = sock
            return

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- wire ---------------------------------------------------------------

    def _read_message(self, timeout: float) -> Dict[str, Any]:
        if self._sock is None:
            raise QMPTimeout("QMP socket is closed")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"no QMP message within {timeout:.1f}s")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout(f"no QMP message within {timeout:.1f}s") from None
            except OSError as exc:
                raise QMPTimeout(f"QMP socket error: {exc}") from None
            if not chunk:
                raise QMPTimeout("QMP socket closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        line = line.strip()
        if not line:
            return self._read_message(max(0.0, deadline - time.monotonic()) or 0.001)
        return json.loads(line.decode("utf-8"))

    def _send(self, obj: Mapping[str, Any]) -> None:
        if self._sock is None:
            raise QMPTimeout("QMP socket is closed")
        data = json.dumps(obj).encode("utf-8") + b"\n"
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise QMPTimeout(f"QMP send failed: {exc}") from None

    # -- API ----------------------------------------------------------------

    def cmd(self, name: str, timeout: Optional[float] = None, **args: Any) -> Any:
        """Run one command; return its ``return`` value or raise QMPError.

        Argument names with dashes are passed as ``**{"exit-on-error": False}``.
        (``timeout`` is the harness's own read deadline, never sent to QEMU.)
        """
        self._next_id += 1
        cid = f"h{self._next_id}"
        msg: Dict[str, Any] = {"execute": name, "id": cid}
        if args:
            msg["arguments"] = args
        self._send(msg)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"no answer to QMP {name} within {limit:.1f}s")
            reply = self._read_message(left)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") not in (cid, None):
                continue  # answer to an older command we gave up on
            if "error" in reply:
                raise QMPError(name, reply["error"])
            if "return" in reply:
                return reply["return"]

    def poll_events(self, timeout: float = 0.0) -> List[Dict[str, Any]]:
        """Read events that are already queued (waiting at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._read_message(max(0.001, deadline - time.monotonic()))
            except QMPTimeout:
                break
            if "event" in msg:
                self.events.append(msg)
            if time.monotonic() >= deadline:
                break
        return list(self.events)


# --------------------------------------------------------------------------
# VM


def qemu_available() -> bool:
    return shutil.which(QEMU_BINARY) is not None and shutil.which(QEMU_IMG) is not None


def require_qemu() -> None:
    """Raise a loud error when QEMU is not installed."""
    missing = [b for b in (QEMU_BINARY, QEMU_IMG) if shutil.which(b) is None]
    if missing:
        raise HarnessError(f"{', '.join(missing)} not found on PATH: {INSTALL_HINT}")


_LIVE: "set[subprocess.Popen]" = set()


@atexit.register
def _kill_leftovers() -> None:
    """Never leave a QEMU behind when the test process exits."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class VM:
    """One ``qemu-system-x86_64`` process, as a context manager.

    The command line is ``-machine M -accel tcg -m MEM -nodefaults -display
    none -serial none -monitor none -no-user-config -qmp unix:SOCK,server=on,
    wait=off [-S] [-incoming X] DEVICES...``.  Stdout and stderr go to a log
    file (``log_path``, or a private temporary one); :meth:`log` reads it.
    Leaving the context sends ``quit`` and kills QEMU if it has not exited
    within ``shutdown_timeout`` seconds.
    """

    def __init__(
        self,
        machine: str = "pc",
        devices: Sequence[str] = (),
        mem: Union[str, int] = "64",
        paused: bool = True,
        incoming: Optional[str] = None,
        extra_args: Sequence[str] = (),
        log_path: Optional[PathLike] = None,
        qmp_timeout: float = 30.0,
        shutdown_timeout: float = 10.0,
    ):
        self.machine = machine
        self.devices = list(devices)
        self.mem = str(mem)
        self.paused = paused
        self.incoming = incoming
        self.extra_args = list(extra_args)
        self.qmp_timeout = qmp_timeout
        self.shutdown_timeout = shutdown_timeout
        self._given_log = os.fspath(log_path) if log_path is not None else None
        self._rundir: Optional[str] = None
        self.log_path: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QMP] = None
        self.exitcode: Optional[int] = None
        self._log_text: Optional[str] = None
        self.args: List[str] = []

    # -- lifecycle ------------------------------------------------------------

    def command_line(self, sock: str) -> List[str]:
        args = [
            QEMU_BINARY,
            "-machine", self.machine,
            "-accel", "tcg",
            "-m", self.mem,
            "-nodefaults",
            "-display", "none",
            "-serial", "none",
            "-monitor", "none",
            "-no-user-config",
            "-qmp", f"unix:{sock},server=on,wait=off",
        ]
        if self.paused:
            args.append("-S")
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args + self.devices + self.extra_args

    def launch(self) -> "VM":
        require_qemu()
        # A short private directory: AF_UNIX paths are limited to ~107 bytes
        # and pytest's tmp paths can be long.
        self._rundir = tempfile.mkdtemp(prefix="qh-")
        sock = os.path.join(self._rundir, "qmp.sock")
        self.log_path = self._given_log or os.path.join(self._rundir, "qemu.log")
        self.args = self.command_line(sock)
        with open(self.log_path, "wb") as log:
            log.write(("# " + shlex.join(self.args) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _LIVE.add(self.proc)
        try:
            self.qmp = QMP(sock, timeout=self.qmp_timeout, alive=self.alive)
        except BaseException as exc:
            self.shutdown(kill_after=0.5)
            raise HarnessError(
                f"QEMU did not come up ({exc}); exit code {self.exitcode}; "
                f"log:\n{_tail(self.log())}"
            ) from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reap(self, kill_after: float) -> None:
        if self.proc is None:
            return
        try:
            self.exitcode = self.proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.exitcode = self.proc.wait(timeout=10)
        _LIVE.discard(self.proc)

    def shutdown(self, kill_after: Optional[float] = None) -> None:
        """``quit`` via QMP, wait (``shutdown_timeout``), then SIGKILL."""
        if self.proc is None or self._log_text is not None:
            return
        if self.qmp is not None:
            if self.alive():
                try:
                    self.qmp.cmd("quit", timeout=5.0)
                except HarnessError:
                    pass
            self.qmp.close()
            self.qmp = None
        self._reap(kill_after=self.shutdown_timeout if kill_after is None else kill_after)
        self._log_text = self._read_log()
        if self._rundir is not None:
            if self.log_path is not None and self.log_path.startswith(self._rundir):
                self.log_path = None
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def __enter__(self) -> "VM":
        return self.launch()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _read_log(self) -> str:
        if self.log_path is None or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log(self) -> str:
        """QEMU's stdout+stderr so far (after shutdown: what it was)."""
        if self._log_text is not None:
            return self._log_text
        return self._read_log()

    # -- QMP wrappers ---------------------------------------------------------

    def cmd(self, name: str, **args: Any) -> Any:
        if self.qmp is None:
            raise HarnessError("VM is not running")
        try:
            return self.qmp.cmd(name, **args)
        except QMPTimeout as exc:
            # A reset/closed socket usually means QEMU is exiting: give it a
            # moment so the error can say so and carry its last words.
            try:
                code = self.proc.wait(timeout=2.0) if self.proc else None
            except subprocess.TimeoutExpired:
                raise exc from None
            raise QEMUExited(
                f"QEMU exited with code {code} during {name} ({exc})\nQEMU log:\n{_tail(self.log())}"
            ) from None

    def cont(self) -> None:
        self.cmd("cont")

    def stop(self) -> None:
        self.cmd("stop")

    def status(self) -> Dict[str, Any]:
        return self.cmd("query-status")

    def set_capabilities(self, caps: Optional[Mapping[str, bool]]) -> None:
        if caps:
            self.cmd(
                "migrate-set-capabilities",
                capabilities=[{"capability": k, "state": bool(v)} for k, v in caps.items()],
            )

    def set_parameters(self, params: Optional[Mapping[str, Any]]) -> None:
        if params:
            self.cmd("migrate-set-parameters", **dict(params))

    def query_migrate(self) -> Dict[str, Any]:
        return self.cmd("query-migrate")

    def _fail(self, what: str, info: Mapping[str, Any]) -> MigrationError:
        desc = info.get("error-desc", "")
        return MigrationError(
            f"{what}: status {info.get('status')!r}"
            + (f", error-desc: {desc}" if desc else "")
            + f"\nQEMU log:\n{_tail(self.log())}"
        )

    def wait_migration(
        self, what: str, timeout: float, poll: float = 0.05, cancel_on_timeout: bool = False
    ) -> Dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; raise on failure/exit/timeout."""
        deadline = time.monotonic() + timeout
        info: Dict[str, Any] = {}
        while True:
            if not self.alive():
                code = self.proc.poll() if self.proc else None
                raise QEMUExited(
                    f"{what}: QEMU exited with code {code}\nQEMU log:\n{_tail(self.log())}"
                )
            try:
                info = self.cmd("query-migrate")
            except QEMUExited as exc:
                raise QEMUExited(f"{what}: {exc}") from None
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise self._fail(what, info)
            if time.monotonic() >= deadline:
                if cancel_on_timeout and status not in (None, "none"):
                    try:
                        self.cmd("migrate_cancel")
                    except HarnessError:
                        pass
                raise MigrationError(
                    f"{what}: not completed within {timeout:.0f}s (last status {status!r}, "
                    f"{json.dumps(info)[:500]})\nQEMU log:\n{_tail(self.log())}"
                )
            time.sleep(poll)

    def migrate(self, uri: str, timeout: float = 120.0) -> Dict[str, Any]:
        """Start an outgoing migration to ``uri`` and wait for ``completed``."""
        self.cmd("migrate", uri=uri)
        return self.wait_migration(f"migrate to {uri}", timeout, cancel_on_timeout=True)

    def migrate_incoming(self, uri: str, timeout: float = 120.0) -> Dict[str, Any]:
        """``migrate-incoming`` from ``uri`` (VM started with ``-incoming defer``).

        Uses ``exit-on-error=false`` so a failed load shows up as status
        ``failed`` with an ``error-desc`` rather than QEMU exiting; either way
        this raises :class:`MigrationError` promptly.
        """
        try:
            self.cmd("migrate-incoming", uri=uri, **{"exit-on-error": False})
        except QMPError as exc:
            if "exit-on-error" not in exc.desc:
                raise
            self.cmd("migrate-incoming", uri=uri)  # older QEMU
        return self.wait_migration(f"migrate-incoming from {uri}", timeout)


# --------------------------------------------------------------------------
# devices

#: No devices beyond what the machine type always has (with -nodefaults).
DEVICES_MINIMAL: tuple = ()

#: Full device set; ``{disk}`` is replaced by a qcow2 path (see full_devices).
#: Works unchanged on ``pc`` and ``q35``.  Each NIC is the only port of its
#: own hub, so it has a backend but nothing can leave the VM.
DEVICES_FULL: tuple = (
    "-device", "VGA,id=vga0",
    "-netdev", "hubport,id=net0,hubid=0",
    "-device", "virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:12:34:56",
    "-netdev", "hubport,id=net1,hubid=1",
    "-device", "e1000,id=nic1,netdev=net1,mac=52:54:00:12:34:57",
    "-blockdev", "driver=file,node-name=disk0-file,filename={disk}",
    "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
    "-device", "virtio-blk-pci,id=blk0,drive=disk0",
    "-device", "qemu-xhci,id=usb0",
    "-device", "usb-tablet,id=tablet0,bus=usb0.0",
    "-device", "virtio-balloon-pci,id=balloon0",
)

DISK_NAME = "disk0.qcow2"


def make_disk(path: PathLike, size: str = "16M") -> Path:
    """Create an empty qcow2 image at ``path`` (kept if it already exists)."""
    require_qemu()
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            [QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), size],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        if res.returncode != 0:
            raise HarnessError(f"qemu-img create {path} failed: {res.stderr.strip()}")
    return path


def full_devices(disk_dir: PathLike) -> List[str]:
    """:data:`DEVICES_FULL` with its disk at ``disk_dir/disk0.qcow2`` (created if missing).

    Use the same list (hence the same disk path) for saving and loading.
    Do not run two VMs on one disk at once: QEMU locks the image.
    """
    disk = make_disk(Path(disk_dir).resolve() / DISK_NAME)
    escaped = str(disk).replace(",", ",,")  # QEMU option syntax
    return [a.replace("{disk}", escaped) for a in DEVICES_FULL]


# --------------------------------------------------------------------------
# streams


def migration_uri(kind: str, path: PathLike, outgoing: bool) -> str:
    path = os.fspath(Path(path).resolve())
    if kind == "exec":
        return ("exec:cat > " if outgoing else "exec:cat ") + shlex.quote(path)
    if kind == "file":
        if ",offset=" in path:
            raise HarnessError(f"file: URI cannot carry a path containing ',offset=': {path}")
        return "file:" + path
    raise ValueError(f"uri_kind must be 'exec' or 'file', not {kind!r}")


def stream_end_ok(path: PathLike) -> bool:
    """True when the file ends like a finished precopy stream.

    QEMU ends a precopy stream with QEMU_VM_EOF (0x00), then
    QEMU_VM_VMDESCRIPTION (0x06), a be32 length and that many bytes of JSON
    (x86 machines never suppress the description).  JSON holds no NUL byte,
    so the marker is the last ``00 06`` whose length reaches the file's end.
    """
    data = Path(path).read_bytes()
    return data.startswith(STREAM_MAGIC) and isinstance(vmdesc(data), dict)


def vmdesc(data: bytes) -> Optional[Dict[str, Any]]:
    """The JSON device description at the end of a finished stream, or None."""
    last_nul = data.rfind(b"\x00")
    for pos in range(max(len(STREAM_MAGIC), last_nul - 5), last_nul + 1):
        if data[pos:pos + 2] == b"\x00\x06":
            (length,) = struct.unpack(">I", data[pos + 2:pos + 6].rjust(4, b"\xff"))
            if pos + 6 + length == len(data):
                try:
                    return json.loads(data[pos + 6:])
                except ValueError:
                    return None
    return None


def device_sections(data: bytes) -> List[Tuple[int, str, int, int]]:
    """Locate the QEMU_VM_SECTION_FULL device sections of a stream.

    Returns ``(offset, idstr, instance_id, version_id)`` per section, in
    stream order, for the devices the trailing JSON description names.  A
    hit only counts when the previous section's footer (0x7e + be32 id)
    sits right before it, so RAM contents cannot produce false matches.
    This is test scaffolding, not a parser: it needs the JSON description.
    """
    desc = vmdesc(data)
    if desc is None:
        raise HarnessError("stream has no (complete) JSON device description")
    found: List[Tuple[int, str, int, int]] = []
    start = 0
    for dev in desc.get("devices", []):
        name = dev["name"].encode()
        needle = bytes([len(name)]) + name
        pos = data.find(needle, start)
        while pos != -1:
            off = pos - 5  # 0x04 + be32 section id
            if off >= 5 and data[off] == 0x04 and data[off - 5] == 0x7E:
                inst, ver = struct.unpack(">II", data[pos + len(needle):pos + len(needle) + 8])
                if inst == dev.get("instance_id", 0):
                    found.append((off, dev["name"], inst, ver))
                    start = pos + len(needle)
                    break
            pos = data.find(needle, pos + 1)
    return found


def save_stream(
    path: PathLike,
    machine: str,
    devices: Sequence[str],
    uri_kind: str = "exec",
    run_seconds: float = 0,
    capabilities: Optional[Mapping[str, bool]] = None,
    parameters: Optional[Mapping[str, Any]] = None,
    mem: Union[str, int] = "64",
    timeout: float = 120.0,
    log_path: Optional[PathLike] = None,
) -> Path:
    """Write a real migration stream of a fresh VM to ``path``; return ``path``.

    The VM starts paused (-S); with ``run_seconds > 0`` it runs (firmware
    only: nothing to boot) for that long and is stopped again.  Then it
    migrates to ``exec:cat > PATH`` or ``file:PATH`` and quits.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    uri = migration_uri(uri_kind, path, outgoing=True)
    with VM(machine, devices, mem=mem, paused=True, log_path=log_path) as vm:
        vm.set_capabilities(capabilities)
        vm.set_parameters(parameters)
        if run_seconds > 0:
            vm.cont()
            time.sleep(run_seconds)
            vm.stop()
        vm.migrate(uri, timeout=timeout)
        log = vm.log
    # For exec:, QEMU closes the pipe after reporting "completed" and the
    # writer (cat) may still be draining it: wait until the tail is there.
    deadline = time.monotonic() + 10
    while not (path.exists() and stream_end_ok(path)):
        if time.monotonic() >= deadline:
            size = path.stat().st_size if path.exists() else None
            raise MigrationError(
                f"stream {path} is incomplete after migrate completed (size {size})\n"
                f"QEMU log:\n{_tail(log())}"
            )
        time.sleep(0.05)
    return path


def load_stream(
    path: PathLike,
    machine: str,
    devices: Sequence[str],
    uri_kind: str = "exec",
    capabilities: Optional[Mapping[str, bool]] = None,
    parameters: Optional[Mapping[str, Any]] = None,
    mem: Union[str, int] = "64",
    paused: bool = True,
    timeout: float = 60.0,
    log_path: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Load ``path`` into a fresh VM (``-incoming defer``); return ``query-status``.

    The VM must be built like the one that saved the stream (same machine,
    devices -- the same disk path -- memory and capabilities).

    On success QEMU 10 reports ``query-migrate`` ``{"status": "completed"}``
    and the runstate leaves ``inmigrate``; the returned ``query-status`` is
    ``{"status": "prelaunch", "running": False}`` when the source had never
    run and ``{"status": "paused", "running": False}`` when it ran and was
    stopped (see :data:`LOADED_STATES`).  The destination does not start a
    guest whose source was stopped, even with ``paused=False``.

    A failed load raises :class:`MigrationError` within about a second:
    ``migrate-incoming`` runs with ``exit-on-error=false``, so
    ``query-migrate`` turns ``failed`` with an ``error-desc`` like "load of
    migration failed: Invalid argument"; the real reason ("Unknown savevm
    section ...", "Missing section footer for ...") is only in QEMU's stderr,
    which the message includes.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise HarnessError(f"no stream at {path}")
    uri = migration_uri(uri_kind, path, outgoing=False)
    with VM(machine, devices, mem=mem, paused=paused, incoming="defer", log_path=log_path) as vm:
        vm.set_capabilities(capabilities)
        vm.set_parameters(parameters)
        vm.migrate_incoming(uri, timeout=timeout)
        # "completed" is set just before the runstate leaves "inmigrate".
        deadline = time.monotonic() + 10
        while True:
            st = vm.status()
            if st.get("status") != "inmigrate":
                return st
            if time.monotonic() >= deadline:
                raise MigrationError(
                    f"load of {path}: still 'inmigrate' after completion\nQEMU log:\n{_tail(vm.log())}"
                )
            time.sleep(0.02)
