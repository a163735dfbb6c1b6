"""Durable file writes, shared by the store, the users file and the certificates.

* :func:`fsync_directory` makes a directory's entries (a new name, a rename, a removal)
  durable: on Linux a rename survives a power cut only once its directory is fsynced.
* :func:`write_atomically` replaces a file whole: the data goes to a temporary file in the
  same directory (created 0600, so a secret is never readable by others, not even for a
  moment), which is fsynced, given its final mode, renamed over the target and the
  directory fsynced.  A reader sees the old file or the new one, never a mixture; a crash
  leaves at most a ``.tmp-*`` file beside it.

Bytes only: callers encode text themselves.  Everything here blocks on the disk; callers
on the reactor thread run it in a thread.  No Twisted.
"""

from __future__ import annotations

import os
import tempfile


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``), durably and atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    fsync_directory(directory)
