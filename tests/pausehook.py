"""Stop a savedir process at a named point (rust/ops/testhook.rs).

The process, run with ``SAVEDIR_TEST_PAUSE=POINT=FIFO``, opens FIFO for
reading at POINT and waits for one byte. :meth:`Pause.wait` returns once the
process is there (our open for writing succeeds only when a reader has the
FIFO open); then the test kills it, truncates the file under it, ... and
:meth:`Pause.release` lets it go on.

Nothing here depends on the machine's speed: the only deadline catches a
process that never reaches the point (a hang, or a bug), and is generous.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

HANG = 300.0  # seconds: only ever reached by a process that hangs

_count = itertools.count()


class Pause:
    def __init__(self, folder: Path, point: str) -> None:
        self.point = point
        self.fifo = folder / f"pause-{os.getpid()}-{next(_count)}.fifo"
        os.mkfifo(self.fifo)
        self._fd: Optional[int] = None

    @property
    def env(self) -> Dict[str, str]:
        """The environment of a process that stops at the point."""
        return {**os.environ, "SAVEDIR_TEST_PAUSE": f"{self.point}={self.fifo}"}

    def wait(self, proc: "Optional[subprocess.Popen[bytes]]" = None, timeout: float = HANG) -> None:
        """Returns once a process is at the point; raises if ``proc`` (a
        Popen) ends first or nothing arrives within ``timeout`` (a hang)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Non-blocking: ENXIO while no process has the FIFO open for reading.
                self._fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                return
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the process ended (status {proc.returncode}) before reaching {self.point}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no process reached {self.point} within {timeout} s (a hang?)")
            time.sleep(0.005)

    def release(self) -> None:
        """Lets the waiting process go on (harmless if it was killed)."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, b"x")
        except BrokenPipeError:
            pass  # the process was killed meanwhile
        finally:
            os.close(self._fd)
            self._fd = None
