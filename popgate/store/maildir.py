"""A Twisted-free Maildir store: durable delivery, cheap listings, a cross-process lock.

Layout: ``<root>/<domain>/<local>/Maildir/{tmp,new,cur}``, built only from a
:class:`~popgate.auth.users.User` that exists, never from client input.

File names (https://cr.yp.to/proto/maildir.html plus Dovecot's size fields)::

    <secs>.M<usecs>P<pid>Q<seq>R<random>.<host>,S=<bytes>,W=<crlf-octets>[:2,<flags>]

``S=`` is the stored size (LF line ends, the Maildir convention) and ``W=`` the size with
CRLF line ends, i.e. what POP3 sends; so STAT and LIST need one directory scan and no
``open`` or ``stat`` per message.  Files written by other tools without ``W=`` are sized
by reading them once per process.  The UIDL of a message is the unique part of its name
(before ``,`` and ``:``), so it survives ``new/`` -> ``cur/`` renames and restarts.

Listings are cached per directory (:class:`_Listing`): a message's name never changes
its content, so a name already parsed is not parsed again, and a directory whose stamp
(device, inode, mtime, ctime) has not changed since a listing taken when that stamp was
already :data:`SETTLED` seconds old is not even read again.  The age rule is what makes
the stamp trustworthy: a change made after the listing gets an mtime of "now" (within
the file system's timestamp granularity and, on NFS, the clock skew, both far below
:data:`SETTLED`), which cannot equal a stamp that old.  A login to an unchanged
10,000-message Maildir then costs two ``open``/``fstat`` pairs instead of a 50 ms scan.
:class:`ListingBudget` caps the messages held in these caches over all Maildirs; a
Maildir that lost its cache is parsed again in full, which for names without ``W=``
(files from other tools) means reading each file again to size it.

Durability: a message is written in ``tmp/``, fsynced, renamed into ``new/`` and the
directory fsynced (:func:`commit`); a crash leaves the whole message in ``new/`` or only a
stale ``tmp/`` file.  (The SMTP side also keeps a few empty ``tmp/`` files made ahead of
time, see :class:`popgate.smtp.delivery.SparePool`.)  If another program removes a ``tmp/``
file before its rename, its data is still in the open file: it is written again into a
new ``tmp/`` file (:attr:`IncomingMessage.recovered`) and the rename goes on.

Stale ``tmp/`` files (:meth:`MaildirStore.clean_tmp`, at start and periodically).  Several
popgate processes may share one mail root (one host or many, on NFS or GlusterFS, with
the same host name or not, pids reused across containers), so neither a host name nor a
pid says whether a file is still in use.  A process that has called
:meth:`MaildirStore.claim_owner` names its ``tmp/`` files ``<unique>,O=<owner>``
(``<unique>`` already says the host and pid, see above; ``<owner>`` is random, one per
process start) and holds, for its whole life, an exclusive ``flock`` on
``<root>/.popgate-owners/<owner>`` (a text file: host and pid, for operators).  The
kernel, or the NFS/GlusterFS lock manager, drops that lock when the process dies, even by
``kill -9``.  The lock file is left behind when the process ends (then it is unlocked),
and removed by the next sweep.  The rule:

* a file ``,O=<owner>`` of another owner is removed if that owner's lock file is gone, or
  can be locked (its process is dead): at the next start of any node, after a crash, and
  by the periodic sweep; a live owner's files are never touched, whatever the host;
* every other file in ``tmp/`` (other programs', older popgate's, and any file at all
  after that long) is removed once it is :data:`STALE_TMP_AGE` (36 hours, the Maildir
  specification's rule) old;
* lock files of dead owners are removed by the same sweep.

The lock file is created under a temporary name, locked, then renamed into place, so a
sweeper never sees an unlocked lock file of a live process; a process makes ``tmp/``
files only after its lock is in place, so a sweeper that sees a file finds its lock.

Concurrency: any number of writers may deliver at once (unique names).  A POP3 session
holds :class:`MailboxLock`, an ``flock`` on ``<Maildir>/popgate.lock``, which also excludes
other popgate processes sharing the mail root.  Every method here may block on the disk;
the Twisted layer calls the slow ones (:func:`commit`, :meth:`Maildir.scan`,
:meth:`Maildir.remove`) from a thread.  Scans of one Maildir are serialised by its lock;
scans of different Maildirs share only the :class:`ListingBudget`, which has its own lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import operator
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from popgate.fileio import fsync_directory

STALE_TMP_AGE = 36 * 3600  # the Maildir specification's 36 hours
SETTLED = 2.0  # seconds: a directory stamp this old is trusted to change on any change
LOCK_NAME = "popgate.lock"
OWNERS = ".popgate-owners"  # under the mail root: one locked file per live process
_CLAIM_TIME = 60.0  # seconds: a ".new" owner file older than this is a failed claim
_OWNER_FIELD = re.compile(r",O=([0-9a-f]{16})\Z")
_UIDL = re.compile(r"[\x21-\x7e]{1,70}\Z")  # RFC 1939 §7 unique-id
_CRLF_SIZE_FIELD = re.compile(r",W=(\d+)(?:,|\Z)")
_ORDER = re.compile(r"(\d+)\.M(\d+)P\d+Q(\d+)")
_READ_BLOCK = 1 << 20
WRITE_BUFFER = 64 * 1024  # message bytes buffered before a write to the tmp/ file
# Read and write: a message whose tmp/ file vanished is read back from its descriptor,
# and a message check's header lines are put before its content (IncomingMessage.prepend).
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


_pid = os.getpid()  # for message names: os.getpid() is a system call on each use


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class MailboxLocked(Exception):
    """Another session (in this process or another) holds the mailbox lock."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message as listed by a scan."""

    path: str
    uidl: str
    octets: int  # size with CRLF line ends: what POP3 LIST reports and RETR sends
    seen: bool  # in cur/ (a POP3 client has already retrieved it)


@dataclass(frozen=True)
class _Listing:
    """One of ``new/`` or ``cur/`` as last read: its stamp and its parsed entries."""

    stamp: tuple[int, int, int, int] | None  # (st_dev, st_ino, st_mtime_ns, st_ctime_ns)
    settled: bool  # the stamp was SETTLED seconds old when the directory was read
    # (delivery-order key, info) in delivery order; the key ends with the file name.
    ordered: list[tuple[tuple, MessageInfo]] = field(default_factory=list)


_EMPTY = _Listing(None, False)
_KEY = operator.itemgetter(0)


class Maildir:
    """One user's Maildir directory."""

    def __init__(self, path: str, budget: ListingBudget | None = None,
                 now: Callable[[], float] = time.time):
        self.path = path
        self._budget = budget
        self._now = now
        self._listings: dict[str, _Listing] = {}
        self._merged: list[MessageInfo] | None = None  # the last scan of both listings

    def create(self) -> None:
        # makedirs gives its mode only to the leaf: create each level 0700 ourselves so
        # that no directory on the way reveals user names.
        _makedirs_private(self.path)
        for sub in ("tmp", "new", "cur"):
            _makedirs_private(os.path.join(self.path, sub))

    def lock(self) -> MailboxLock:
        """Take the exclusive POP3 lock, or raise MailboxLocked at once."""
        return MailboxLock(os.path.join(self.path, LOCK_NAME))

    def scan(self) -> list[MessageInfo]:
        """List ``new/`` and ``cur/`` in delivery order, without opening any message.

        Runs once per POP3 login over every file name, so it is written for speed: one
        ``scandir`` per changed directory (no ``stat`` per message), names parsed once
        (see the module docstring on the listing cache).
        """
        previous = self._listings
        listings = {sub: self._list(sub, previous.get(sub, _EMPTY)) for sub in ("new", "cur")}
        if self._merged is not None and all(
                listings[sub] is previous.get(sub) for sub in listings):
            merged = self._merged  # neither directory was read again
        else:
            entries = listings["new"].ordered + listings["cur"].ordered
            entries.sort(key=_KEY)  # two sorted runs: a linear merge
            merged = [info for _, info in entries]
        # Cache first, then report: an eviction racing with this scan (from another
        # Maildir's scan thread) can then only leave the budget counting too much.
        self._listings, self._merged = listings, merged
        if self._budget is not None and not self._budget.hold(self, len(merged)):
            self.forget_listings()
        return list(merged)

    def forget_listings(self) -> None:
        """Drop the listing cache (the next scan reads and parses everything)."""
        self._listings, self._merged = {}, None

    def _list(self, sub: str, previous: _Listing) -> _Listing:
        """``previous`` itself if the directory is known not to have changed, else a
        fresh listing that reuses ``previous``'s parsed entries by name."""
        try:
            # open + fstat, not stat: opening revalidates an NFS client's cached
            # attributes (close-to-open), a bare stat may answer from a minute-old cache.
            fd = os.open(f"{self.path}/{sub}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _EMPTY
        try:
            st = os.fstat(fd)
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            if previous.settled and previous.stamp == stamp:
                return previous
            settled = self._now() - max(st.st_mtime, st.st_ctime) >= SETTLED
            with os.scandir(fd) as it:
                # is_file() uses the directory entry's type: no stat per message.
                names = [e.name for e in it if not e.name.startswith(".") and e.is_file()]
        finally:
            os.close(fd)
        present = set(names)
        ordered = [item for item in previous.ordered if item[0][-1] in present]
        if len(ordered) < len(present):
            known = {item[0][-1] for item in ordered}
            fresh = [self._parse(sub, name) for name in names if name not in known]
            fresh.sort(key=_KEY)
            ordered += fresh
            ordered.sort(key=_KEY)  # two sorted runs: a linear merge
        return _Listing(stamp, settled, ordered)

    def _parse(self, sub: str, name: str) -> tuple[tuple, MessageInfo]:
        """(delivery-order key, info) for one directory entry."""
        path = f"{self.path}/{sub}/{name}"
        uidl, size = parse_name(name)
        info = MessageInfo(path, uidl, crlf_size(path) if size is None else size, sub == "cur")
        return _order_key(name), info

    def remove(self, messages: Iterable[MessageInfo]) -> None:
        """Unlink messages (already gone is fine) and make the removal durable."""
        directories = set()
        for message in messages:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(message.path)
            directories.add(os.path.dirname(message.path))
        for directory in directories:
            fsync_directory(directory)

    def mark_seen(self, messages: Iterable[MessageInfo]) -> None:
        """Move retrieved messages from ``new/`` to ``cur/`` with the Seen flag."""
        cur = os.path.join(self.path, "cur")
        moved = False
        for message in messages:
            if message.seen:
                continue
            name = os.path.basename(message.path)
            try:
                os.rename(message.path, os.path.join(cur, name + ":2,S"))
                moved = True
            except FileNotFoundError:
                pass
        if moved:
            fsync_directory(cur)
            fsync_directory(os.path.join(self.path, "new"))


class MailboxLock:
    """An exclusive, non-blocking ``flock`` held until :meth:`release`."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MailboxLocked(path) from None
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # Unlock before closing: on a FUSE file system (GlusterFS) the unlock that a
            # close implies reaches the server after close() has returned, so a session
            # opened through another node just after QUIT's answer could still find the
            # mailbox locked (measured: 2-6 % of immediate handovers); LOCK_UN waits.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class ListingBudget:
    """Caps the messages held in :class:`Maildir` listing caches, over all Maildirs.

    Each scan reports its Maildir's size; when the total goes over ``limit``, the least
    recently scanned Maildirs drop their caches.  A Maildir bigger than the whole budget
    keeps none.  Thread-safe (scans run in a thread pool).
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._lock = threading.Lock()
        self._held: OrderedDict[Maildir, int] = OrderedDict()
        self._total = 0

    def hold(self, maildir: Maildir, count: int) -> bool:
        """Record that ``maildir`` caches ``count`` messages; False: it must not."""
        evicted = []
        with self._lock:
            self._total -= self._held.pop(maildir, 0)
            if count > self._limit:
                return False
            self._held[maildir] = count
            self._total += count
            while self._total > self._limit:
                oldest, held = self._held.popitem(last=False)
                self._total -= held
                evicted.append(oldest)
        for oldest in evicted:
            oldest.forget_listings()
        return True


class MaildirStore:
    """All Maildirs under one mail root, and the names of new messages."""

    def __init__(self, root: str, hostname: str, listing_cache: int = 50_000):
        self.root = root
        # Maildir names must not contain '/' or ':' (cr.yp.to/proto/maildir.html).
        self._host = hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"
        self._sequence = itertools.count(1)
        self._maildirs: dict[str, Maildir] = {}
        self._budget = ListingBudget(listing_cache)
        self.owner: str | None = None  # see claim_owner
        self._owner_fd: int | None = None

    def maildir(self, user) -> Maildir:
        """The Maildir of an existing :class:`~popgate.auth.users.User` (created on first use)."""
        maildir = self._maildirs.get(user.name)
        if maildir is None:
            path = os.path.join(self.root, user.domain, user.local, "Maildir")
            maildir = Maildir(path, self._budget)
            maildir.create()
            self._maildirs[user.name] = maildir
        return maildir

    def unique_name(self) -> str:
        now = time.time()
        secs, usecs = int(now), int((now % 1) * 1_000_000)
        return (f"{secs}.M{usecs}P{_pid}Q{next(self._sequence)}"
                f"R{secrets.token_hex(8)}.{self._host}")

    def new_message(self, maildir: Maildir) -> IncomingMessage:
        """Open a new message in ``maildir``'s ``tmp/``; nothing is visible until commit."""
        unique = self.unique_name()
        tmp_name = unique if self.owner is None else f"{unique},O={self.owner}"
        return IncomingMessage(maildir, unique, tmp_name)

    def claim_owner(self) -> None:
        """Mark this process's ``tmp/`` files as its own, and hold the lock that says it
        is alive (see the module docstring).  Call it once, in the process that delivers
        (after any fork), before making files."""
        owners = os.path.join(self.root, OWNERS)
        _makedirs_private(owners)
        owner = secrets.token_hex(8)
        path = os.path.join(owners, owner)
        fd = os.open(path + ".new", _CREATE_FLAGS, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(OSError):  # for operators only: not on a full disk
                os.write(fd, f"{self._host} {_pid}\n".encode("utf-8", "replace"))
            os.rename(path + ".new", path)  # only now visible, and locked
            fsync_directory(owners)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path + ".new")
            raise
        self.owner, self._owner_fd = owner, fd

    def clean_tmp(self, max_age: float = STALE_TMP_AGE, now: float | None = None) -> int:
        """Remove stale ``tmp/`` files in every Maildir (see the module docstring): the
        files of dead owners, and any file older than ``max_age`` seconds.  Blocks on
        the disk (a thread, or before the reactor runs); any thread."""
        now = time.time() if now is None else now
        owners = _OwnerCheck(os.path.join(self.root, OWNERS), self.owner)
        removed = 0
        try:
            for tmp in self._tmp_directories():
                removed += _clean_directory(tmp, owners, now - max_age)
            owners.remove_dead_locks(now - _CLAIM_TIME)
        finally:
            owners.close()
        return removed

    def _tmp_directories(self) -> Iterable[str]:
        for domain in _subdirectories(self.root):
            for local in _subdirectories(domain):
                tmp = os.path.join(local, "Maildir", "tmp")
                if os.path.isdir(tmp):
                    yield tmp


def _clean_directory(tmp: str, owners: _OwnerCheck, oldest: float) -> int:
    removed = 0
    with os.scandir(tmp) as it:
        for entry in it:
            found = _OWNER_FIELD.search(entry.name)
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if ((found is not None and owners.is_dead(found.group(1)))
                        or entry.stat(follow_symlinks=False).st_mtime < oldest):
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
    return removed


class _OwnerCheck:
    """Which owners (see the module docstring) are dead, for one sweep.

    A dead owner's lock stays held by this sweep until :meth:`close`, so that another
    node sweeping at the same time takes it for alive (and keeps its files) rather than
    racing us.
    """

    def __init__(self, directory: str, mine: str | None):
        self._directory = directory
        self._mine = mine
        self._alive: set[str] = set()
        self._dead: dict[str, int | None] = {}  # owner -> fd holding its lock, if any

    def is_dead(self, owner: str) -> bool:
        if owner == self._mine or owner in self._alive:
            return False
        if owner not in self._dead:
            try:
                self._dead[owner] = _try_lock(os.path.join(self._directory, owner))
            except FileNotFoundError:
                self._dead[owner] = None  # no lock file: ended, or swept already
            except BlockingIOError:
                self._alive.add(owner)
                return False
        return True

    def remove_dead_locks(self, oldest: float) -> None:
        """Remove the lock files of dead owners (with files left or not), and those of
        processes that died while claiming (``.new``, older than ``oldest``)."""
        try:
            names = os.listdir(self._directory)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self._directory, name)
            with contextlib.suppress(FileNotFoundError, BlockingIOError):
                if name.endswith(".new"):
                    if os.stat(path).st_mtime < oldest:
                        os.close(_try_lock(path))
                        os.unlink(path)
                elif self.is_dead(name):
                    os.unlink(path)  # while we hold its lock

    def close(self) -> None:
        for fd in self._dead.values():
            if fd is not None:
                os.close(fd)
        self._dead.clear()


def _try_lock(path: str) -> int:
    """An fd holding ``path``'s exclusive lock; BlockingIOError if someone holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


class IncomingMessage:
    """A message being written to ``tmp/``; the caller feeds LF-terminated bytes.

    Writes collect in a buffer of :data:`WRITE_BUFFER` octets, so a typical message
    reaches the file (the page cache) in one ``write`` call, at :meth:`flush`; a bigger
    message is written out in blocks of that size as it arrives, so no more than one
    block per message is ever held in memory.  :meth:`sync` (slow: in a thread) makes
    the content durable; :meth:`close` then only releases the descriptor.
    """

    def __init__(self, maildir: Maildir, unique: str, tmp_name: str | None = None):
        self.maildir = maildir
        self.unique = unique
        self.tmp_path = os.path.join(maildir.path, "tmp", tmp_name or unique)
        self.recovered = False  # its tmp/ file vanished and was written again
        # 0600: mail is private even if a directory above is opened up by mistake.
        self._fd: int | None = os.open(self.tmp_path, _CREATE_FLAGS, 0o600)
        self._buffer = bytearray()
        self.size = 0
        self.lines = 0
        self.final_path: str | None = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        self.lines += data.count(b"\n")
        if len(self._buffer) >= WRITE_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered bytes to the file (page cache, not yet durable)."""
        buffer = self._buffer
        if not buffer:
            return
        with memoryview(buffer) as view:
            written = 0
            while written < len(buffer):
                written += os.write(self._fd, view[written:])
        buffer.clear()

    def prepend(self, data: bytes) -> None:
        """Put ``data`` before everything written so far (header lines that a message
        check adds once the whole message is in).  The content is shifted in place, block
        by block from the end: slow for a big message, so run it in a thread.  The file
        is still in ``tmp/``, invisible: a crash half-way leaves only a stale file."""
        self.flush()
        shift = len(data)
        end = os.fstat(self._fd).st_size
        while end > 0:
            start = max(0, end - _READ_BLOCK)
            os.pwrite(self._fd, os.pread(self._fd, end - start, start), start + shift)
            end = start
        os.pwrite(self._fd, data, 0)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.size += shift
        self.lines += data.count(b"\n")

    @property
    def final_name(self) -> str:
        return f"{self.unique},S={self.size},W={self.size + self.lines}"

    def sync(self) -> None:
        """Write out the buffer and fsync the file (slow: run it in a thread)."""
        self.flush()
        os.fsync(self._fd)

    def recover(self) -> None:
        """Its ``tmp/`` file was removed by someone else: write the data, still in the
        open file, into a new ``tmp/`` file of the same name, durably.  Slow: a thread."""
        self.flush()
        fd = os.open(self.tmp_path, _CREATE_FLAGS, 0o600)
        try:
            offset = 0
            while block := os.pread(self._fd, _READ_BLOCK, offset):
                with memoryview(block) as view:
                    written = 0
                    while written < len(block):
                        written += os.write(fd, view[written:])
                offset += len(block)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self.recovered = True

    def close(self) -> None:
        """Release the file descriptor (after :meth:`sync`, or to give up on the file)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # after fsync, nothing is left to report
                os.close(fd)

    def abort(self) -> None:
        """Forget the message: close and remove the ``tmp/`` file."""
        self._buffer = bytearray()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # (NFS reports write errors here) not kept
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


def commit(messages: list[IncomingMessage]) -> None:
    """Make messages durable and visible: fsync each, rename into ``new/``, fsync ``new/``.

    Several messages (the copies of one delivery, or a group of deliveries) share the
    directory fsyncs.  Slow: run it in a thread.  On error, every message is aborted.
    """
    for directory in publish(messages):
        fsync_directory(directory)
    for message in messages:
        message.close()


def publish(messages: list[IncomingMessage]) -> set[str]:
    """fsync each message and rename it into ``new/``; return the ``new/`` directories.

    The renames are durable only once the caller has fsynced every returned directory
    (:func:`commit` does; a group committer fsyncs the union for many deliveries).  The
    files stay open: the caller closes them.  Slow: run it in a thread.  On error, every
    message not yet in ``new/`` is aborted.
    """
    try:
        for message in messages:
            message.sync()
        directories = set()
        for message in messages:
            new = os.path.join(message.maildir.path, "new")
            message.final_path = os.path.join(new, message.final_name)
            try:
                os.rename(message.tmp_path, message.final_path)
            except FileNotFoundError:
                if not os.path.isdir(new):
                    raise
                message.recover()  # removed from tmp/ by another program
                os.rename(message.tmp_path, message.final_path)
            directories.add(new)
        return directories
    except BaseException:
        for message in messages:
            if message.final_path is None or not os.path.exists(message.final_path):
                message.abort()
        raise


def parse_name(name: str) -> tuple[str, int | None]:
    """(UIDL, size with CRLF line ends from its ``,W=`` field, or None without one) of a
    message's file name in ``new/`` or ``cur/``."""
    base = name.partition(":")[0]
    found = _CRLF_SIZE_FIELD.search(base)
    return make_uidl(base.partition(",")[0]), int(found.group(1)) if found else None


def make_uidl(unique: str) -> str:
    """An RFC 1939 §7 unique-id: 1-70 characters in 0x21-0x7E; hashed if the name is not."""
    if _UIDL.match(unique):
        return unique
    return hashlib.sha1(unique.encode("utf-8", "surrogateescape")).hexdigest()


def crlf_size(path: str) -> int:
    """Octets of a file once every bare LF is sent as CRLF (for names without ``W=``),
    plus the CRLF that POP3 adds to a file without a final line end (RFC 1939 §3)."""
    total = 0
    previous_cr = False
    last = b"\n"
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            total += len(block) + block.count(b"\n") - block.count(b"\r\n")
            if previous_cr and block.startswith(b"\n"):
                total -= 1
            previous_cr = block.endswith(b"\r")
            last = block[-1:]
    return total if last == b"\n" else total + 2


def _order_key(name: str) -> tuple[int, int, int, str]:
    """Delivery order from the name's ``<secs>.M<usecs>P<pid>Q<seq>`` prefix (``Q`` orders
    one process's deliveries within a clock tick); other names sort by their leading
    seconds, then by name."""
    found = _ORDER.match(name)
    if found:
        secs, usecs, seq = found.groups()
        return int(secs), int(usecs), int(seq), name
    secs = name.partition(".")[0]
    return (int(secs) if secs.isdigit() else 0), 0, 0, name


def _makedirs_private(path: str) -> None:
    """mkdir -p with mode 0700 at every level; each new entry is made durable (its parent
    directory fsynced), so a first delivery's rename into new/ cannot outlive new/."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _makedirs_private(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    fsync_directory(parent)


def _subdirectories(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
