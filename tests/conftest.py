"""Shared fixtures: real QEMU migration streams, made once per test session.

``qemu_streams`` -> list of :class:`RealStream` (pristine files: copy before
modifying, see :meth:`RealStream.copy_to`).  ``qemu_load`` -> a callable that
feeds a stream (or a modified copy of it) back into a fresh QEMU.

QEMU runs with TCG only and never gets a network connection (see
tests/qemu_harness.py).  If qemu-system-x86_64 is missing these fixtures
fail -- they never skip: run `.ci/install-qemu.sh`.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qemu_harness  # noqa: E402
from linux_guest import guest_saves  # noqa: E402,F401  (the real Linux guest's saves)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "qemu: runs qemu-system-x86_64 (TCG); needs .ci/install-qemu.sh"
    )


@dataclass(frozen=True)
class RealStream:
    """One migration stream written by a real QEMU."""

    name: str
    path: Path  # pristine: never modify, use copy_to()
    machine: str  # "pc" or "q35"
    devices: Tuple[str, ...]  # extra QEMU args (disk path included)
    uri_kind: str  # "exec" or "file": how it was written
    run_seconds: float  # 0: never ran (status prelaunch); >0: firmware ran
    capabilities: Dict[str, bool] = field(default_factory=dict)
    mem: str = "64"
    seconds_to_make: float = 0.0

    @property
    def full_devices(self) -> bool:
        return len(self.devices) > 0

    def copy_to(self, directory: os.PathLike | str, name: Optional[str] = None) -> Path:
        """Copy the stream into ``directory`` (created if needed); return the
        writable copy's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dest = directory / (name or self.path.name)
        shutil.copyfile(self.path, dest)
        dest.chmod(0o644)
        return dest

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


# name, machine, full devices?, uri kind, run seconds, capabilities
STREAM_SPECS: List[Tuple[str, str, bool, str, float, Dict[str, bool]]] = [
    # the slow ones (firmware runs) first, so the pool overlaps them
    ("pc-full-file-ran", "pc", True, "file", 3.0, {}),
    ("q35-full-exec-ran", "q35", True, "exec", 3.0, {}),
    ("pc-full-exec-paused", "pc", True, "exec", 0, {}),
    ("q35-full-file-paused", "q35", True, "file", 0, {}),
    ("pc-minimal-exec-paused", "pc", False, "exec", 0, {}),
    ("q35-minimal-file-ran", "q35", False, "file", 3.0, {}),
]

# Paused VMs need almost no CPU; the running ones need one core each.
_WORKERS = 3


def _require_qemu() -> None:
    try:
        qemu_harness.require_qemu()
    except qemu_harness.HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


def _make(root: Path, spec: Tuple[str, str, bool, str, float, Dict[str, bool]]) -> RealStream:
    name, machine, full, kind, run_seconds, caps = spec
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    # One disk per stream: QEMU locks images, and streams are made in parallel.
    devices = qemu_harness.full_devices(d) if full else list(qemu_harness.DEVICES_MINIMAL)
    path = d / f"{name}.mig"
    t0 = time.monotonic()
    qemu_harness.save_stream(
        path, machine, devices, uri_kind=kind, run_seconds=run_seconds,
        capabilities=caps or None, log_path=d / "save.log",
    )
    took = time.monotonic() - t0
    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return RealStream(
        name=name, path=path, machine=machine, devices=tuple(devices), uri_kind=kind,
        run_seconds=run_seconds, capabilities=dict(caps), seconds_to_make=took,
    )


@pytest.fixture(scope="session")
def qemu_streams(tmp_path_factory: pytest.TempPathFactory) -> List[RealStream]:
    """Real streams covering pc/q35, never-ran/ran, exec:/file:, full/minimal devices."""
    _require_qemu()
    root = tmp_path_factory.mktemp("qemu_streams")
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        streams = list(pool.map(lambda s: _make(root, s), STREAM_SPECS))
    return streams


@pytest.fixture(scope="session")
def qemu_stream_by_name(qemu_streams: List[RealStream]) -> Dict[str, RealStream]:
    return {s.name: s for s in qemu_streams}


LoadFn = Callable[..., Dict[str, Any]]


@pytest.fixture(scope="session")
def qemu_load() -> LoadFn:
    """``qemu_load(stream, path=None, uri_kind=None, **kw) -> query-status dict``.

    Loads ``path`` (default: the stream's pristine file) into a fresh QEMU
    set up like the one that wrote ``stream`` (machine, devices -- same disk
    path --, memory, capabilities), via ``exec:`` or ``file:`` (default: the
    kind the stream was written with).  A successful load returns e.g.
    ``{"status": "prelaunch" | "paused", "running": False}``; a failed one
    raises :class:`qemu_harness.MigrationError` within a second or so.
    """
    _require_qemu()

    def load(
        stream: RealStream,
        path: Optional[os.PathLike | str] = None,
        uri_kind: Optional[str] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        kwargs.setdefault("capabilities", stream.capabilities or None)
        kwargs.setdefault("mem", stream.mem)
        return qemu_harness.load_stream(
            stream.path if path is None else path,
            stream.machine,
            list(stream.devices),
            uri_kind=uri_kind or stream.uri_kind,
            **kwargs,
        )

    return load
