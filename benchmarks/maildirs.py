"""Create and fill Maildir mailboxes directly on disk for the POP3 workloads.

Files are written with LF line ends (the Maildir convention) and named
``<secs>.M<usecs>P<pid>Q<seq>R<rand>.<host>,S=<bytes>,W=<crlf-octets>`` into ``new/``,
the naming popgate uses and that Dovecot understands (S= is the file size, W= the CRLF
size POP3 sends).  No fsync: the mailboxes are test fixtures.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from benchmarks.loadgen import make_message, to_maildir

SUBDIRS = ("tmp", "new", "cur")


def make_maildir(path: Path, owner: tuple[int, int] | None = None) -> Path:
    """Create an empty Maildir (removing any previous content) and its parents."""
    if path.exists():
        shutil.rmtree(path)
    for sub in SUBDIRS:
        (path / sub).mkdir(parents=True, exist_ok=True)
    if owner:
        chown_tree(path, owner)
    return path


def chown_tree(path: Path, owner: tuple[int, int]) -> None:
    """chown `path` and everything below it."""
    uid, gid = owner
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


def maildir_name(seq: int, lf_size: int, crlf_size: int, host: str = "bench") -> str:
    """A unique Maildir file name carrying S= and W=."""
    now = time.time()
    secs, usecs = int(now), int((now % 1) * 1e6)
    return (f"{secs}.M{usecs}P{os.getpid()}Q{seq}R{secrets.token_hex(8)}.{host}"
            f",S={lf_size},W={crlf_size}")


def fill(path: Path, count: int, size: int, owner: tuple[int, int] | None = None,
         tag: str = "m") -> int:
    """Write `count` messages of `size` CRLF octets into path/new; return octets."""
    new = path / "new"
    total = 0
    for seq in range(count):
        message = make_message(size, f"{tag}{seq:010d}")
        data = to_maildir(message)
        target = new / maildir_name(seq, len(data), len(message))
        with open(target, "wb") as fh:
            fh.write(data)
        if owner:
            os.chown(target, *owner)
        total += len(message)
    return total
