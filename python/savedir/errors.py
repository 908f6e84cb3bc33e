"""The exceptions savedir raises.

Every error savedir itself detects derives from :class:`SavedirError` and
carries the file's ``path`` and, where it applies, the byte ``offset`` the
error is about. Errors the operating system reports (a missing file, no
permission) are the built-in :class:`OSError` subclasses instead, such as
:class:`FileNotFoundError` and :class:`PermissionError`.

>>> issubclass(FormatError, ValueError) and issubclass(SectionNotFoundError, KeyError)
True
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

__all__ = [
    "SavedirError",
    "FormatError",
    "NotAStreamError",
    "TruncatedError",
    "UnsupportedStreamError",
    "DirectoryError",
    "TrailingDataError",
    "SectionNotFoundError",
    "RamError",
    "FileChangedError",
    "FileLockedError",
]


class SavedirError(Exception):
    """Base class of every error savedir detects."""

    path: Optional[str] = None
    """The file the error is about."""
    offset: Optional[int] = None
    """The byte offset in that file, where one applies."""

    def __str__(self) -> str:
        # KeyError would quote the message; show it as written.
        return str(self.args[0]) if self.args else ""


class FormatError(SavedirError, ValueError):
    """The bytes break QEMU's stream grammar or savedir's directory format."""


class NotAStreamError(FormatError):
    """The file is not a QEMU migration stream (or not a regular file)."""


class TruncatedError(FormatError):
    """The stream ends before it is complete (e.g. a save cut short)."""


class UnsupportedStreamError(FormatError):
    """A valid stream that uses something savedir cannot delimit."""


class DirectoryError(FormatError):
    """The file ends in a directory trailer, but the directory is damaged."""


class TrailingDataError(SavedirError):
    """Bytes that are not a valid directory follow the stream; ``force`` replaces them."""


class SectionNotFoundError(SavedirError, KeyError):
    """No section has the requested name (and instance)."""


class RamError(SavedirError, LookupError):
    """Guest memory the save does not have: an unknown RAM block, a
    guest-physical address that no RAM backs, a page past a block's end."""


class FileChangedError(SavedirError):
    """The file changed under savedir while it was being read."""


class FileLockedError(SavedirError, BlockingIOError):
    """The file is busy: a writer (``index``, ``strip``, ``record``) found it
    held open by a reader, or a reader found a savedir writer at work on it.
    Pass ``wait=True`` (``--wait``) to wait instead. An :class:`OSError`, so
    the command line exits with status 2; the file is unchanged."""
