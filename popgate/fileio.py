"""Durable file writes, shared by the store, the users file and the certificates.

* :func:`fsync_directory` makes a directory's entries (a new name, a rename, a removal)
  durable: on Linux a rename survives a power cut only once its directory is fsynced.
* :func:`write_atomically` replaces a file whole: the data goes to a temporary file in the
  same directory (created 0600, so a secret is never readable by others, not even for a
  moment), which is fsynced, given its final mode, renamed over the target and the
  directory fsynced.  A reader sees the old file or the new one, never a mixture; a crash
  leaves at most a ``.tmp-*`` file beside it.  With ``like=`` the new file gets the owner,
  group and owner/group permission bits of that path (the file it replaces, or for a new
  file its directory's owner and group): an administrator editing the users file as root must
  leave a file the server's own user can still read.

Bytes only: callers encode text themselves.  Everything here blocks on the disk; callers
on the reactor thread run it in a thread.  No Twisted.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, mode: int = 0o600, *,
                     like: str | None = None) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``), durably and atomically.

    ``like``: a path to take the owner and group from; when it is a regular file, its
    permission bits for owner and group replace ``mode`` (never any for others: these
    files hold secrets).  Only root can give a file to another user; anyone else keeps
    the owner and gets the group where the system allows it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    model = os.stat(like) if like is not None else None
    if model is not None and stat.S_ISREG(model.st_mode):
        mode = stat.S_IMODE(model.st_mode) & 0o770
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            if model is not None:
                _take_owner(f.fileno(), model)
            os.fchmod(f.fileno(), mode)  # after fchown, which may clear set-id bits
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    fsync_directory(directory)


def _take_owner(fd: int, model: os.stat_result) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, model.st_uid, model.st_gid)
    else:
        with contextlib.suppress(PermissionError):  # not one of our groups: keep ours
            os.fchown(fd, -1, model.st_gid)
