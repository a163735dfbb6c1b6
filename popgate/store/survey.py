"""A read-only look at every Maildir, for the lab dashboard and the per-user metrics.

:func:`survey` lists ``tmp/``, ``new/`` and ``cur/`` of each user's Maildir under a mail
root (layout as in :mod:`popgate.store.maildir`) and changes nothing: no directory is
created, no file opened.  Sizes come from the ``S=``/``W=`` fields of the names; a name
without ``W=`` (a file from another tool) is ``stat``-ed for its stored size instead
of being read.  ``tmp/`` entries are ``stat``-ed (there are few), so that a file that is
being written can be told from popgate's empty spare files.

Bounds: at most ``max_users`` Maildirs (the named users first, then any other found
under the root, in name order) and ``max_files`` names per directory, the most recent;
counts and totals cover every file.  Cost: one ``scandir`` per directory.  Blocking: run
it in a thread.  Thread-safe (it shares nothing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from popgate.store.maildir import parse_name

_STORED_SIZE = re.compile(r",S=(\d+)(?:,|:|\Z)")


@dataclass(frozen=True)
class FileEntry:
    name: str
    uidl: str
    octets: int  # as POP3 LIST reports it (CRLF), or the file's size in tmp/
    stored: int  # as stored (LF line ends)
    kind: str  # "message" (new/, cur/); "spare", "writing" or "empty" (tmp/)


@dataclass(frozen=True)
class MaildirSurvey:
    user: str
    exists: bool
    tmp: tuple[FileEntry, ...]
    new: tuple[FileEntry, ...]
    cur: tuple[FileEntry, ...]
    counts: tuple[int, int, int]  # every file in tmp/, new/, cur/ (not only those listed)
    messages: int  # new/ + cur/
    octets: int  # new/ + cur/, as LIST reports them


def survey(root: str, users: Iterable[str] = (), max_users: int = 200,
           max_files: int = 40) -> list[MaildirSurvey]:
    """Every named user's Maildir (whether or not it exists yet) and any other found."""
    names = list(dict.fromkeys(users))
    known = set(names)
    names += sorted(found for found in _found_users(root) if found not in known)
    return [_survey_one(root, name, max_files) for name in names[:max_users]]


def _found_users(root: str) -> list[str]:
    found = []
    for domain in _entries(root):
        if domain.startswith("."):
            continue  # popgate's own (.popgate-owners), never a domain
        for local in _entries(os.path.join(root, domain)):
            if os.path.isdir(os.path.join(root, domain, local, "Maildir")):
                found.append(f"{local}@{domain}")
    return found


def _survey_one(root: str, user: str, max_files: int) -> MaildirSurvey:
    local, _, domain = user.partition("@")
    path = os.path.join(root, domain, local, "Maildir")
    listed = {sub: _list(os.path.join(path, sub), sub) for sub in ("tmp", "new", "cur")}
    stored = listed["new"] + listed["cur"]
    return MaildirSurvey(
        user=user, exists=os.path.isdir(path),
        tmp=tuple(listed["tmp"][-max_files:]), new=tuple(listed["new"][-max_files:]),
        cur=tuple(listed["cur"][-max_files:]),
        counts=(len(listed["tmp"]), len(listed["new"]), len(listed["cur"])),
        messages=len(stored), octets=sum(entry.octets for entry in stored))


def _list(directory: str, sub: str) -> list[FileEntry]:
    entries = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                made = _tmp_entry(entry) if sub == "tmp" else _message_entry(entry)
                if made is not None:
                    entries.append(made)
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries.sort(key=lambda e: e.name)  # names start with the delivery time
    return entries


def _message_entry(entry: os.DirEntry) -> FileEntry | None:
    uidl, crlf_size = parse_name(entry.name)
    stored = _STORED_SIZE.search(entry.name.partition(":")[0])
    if stored is None or crlf_size is None:
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            return None  # gone since the listing (a POP3 QUIT)
        stored_size = int(stored.group(1)) if stored else size
        crlf_size = size if crlf_size is None else crlf_size
    else:
        stored_size = int(stored.group(1))
    return FileEntry(entry.name, uidl, crlf_size, stored_size, "message")


def _tmp_entry(entry: os.DirEntry) -> FileEntry | None:
    try:
        size = entry.stat().st_size
    except FileNotFoundError:
        return None  # renamed into new/ since the listing
    return FileEntry(entry.name, "", size, size, tmp_kind(entry.name, size))


def tmp_kind(name: str, size: int) -> str:
    """What a ``tmp/`` file is, for someone watching: ``writing`` once it has content;
    ``empty`` otherwise.  An empty file is a spare made ahead of time
    (:class:`popgate.smtp.delivery.SparePool`) or a message being received whose first
    block is still buffered in memory (a small message reaches its file in one write,
    at its end): the name cannot tell them apart (a message takes over a spare's file),
    so the dashboard tells them apart by the SMTP sessions in DATA."""
    return "writing" if size else "empty"


def _entries(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
