"""The outbound queue: plain files under ``<data_dir>/queue/``, readable by an operator.

One message is two files named by its id (the id its ``250`` named):

``ID.msg``
    The message as relayed: our ``Received:`` line, then the content as the client sent
    it, with LF line ends (the relay client sends CRLF).
``ID.env``
    The envelope and its delivery state, JSON (UTF-8, one object)::

        {"id": "3NB2AYQCK2ZNQ", "sender": "alice@example.org", "user": "alice@example.org",
         "created": 1767139200.0, "attempts": 1, "next_try": 1767139260.0,
         "last_error": "451 4.3.0 try later",
         "recipients": [{"address": "bob@example.net", "state": "queued",
                         "reply": "451 4.3.0 try later"}, ...]}

    A recipient's ``state`` is ``queued`` (to be tried), ``sent`` (the smarthost answered
    2xx: never sent again) or ``failed`` (5xx, or out of time: in the bounce).

Durability: the message is written to ``tmp/NODE.ID.msg``; :meth:`Incoming.commit` fsyncs
it, renames it to ``ID.msg``, writes ``ID.env`` atomically (temporary file, fsync, rename)
and fsyncs the queue directory, all before the ``250``.  A message exists once its
``.env`` does.  Leftovers of a crash before the ``250`` are removed: this node's own
``tmp/`` files at start (:meth:`Queue.clean_tmp`; the name says whose they are, since
several nodes may share the data directory), and a ``.msg`` without an ``.env`` once it
is :data:`ORPHAN_AGE` seconds old (:meth:`Queue.remove_orphans`, on every scan of the
runner; younger ones may be another node's commit in progress).

State changes rewrite ``ID.env`` atomically under the queue's ``lock`` file (``flock``),
which the ``popgate queue`` command takes too, so that a removal never races with a
state update. ``flush`` (a file) asks the runner to try every message now.  A runner
holds ``ID.lock`` (a non-blocking ``flock``) while it relays the message, so that runners
of several nodes sharing the directory never relay one message at the same time.

Everything here blocks on the disk: the server calls it from threads.  No Twisted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from popgate.fileio import fsync_directory, write_atomically

QUEUED, SENT, FAILED = "queued", "sent", "failed"
ORPHAN_AGE = 60.0  # seconds: far longer than the rename-to-envelope step of a commit
_FLUSH = "flush"


@dataclass
class QueuedRecipient:
    address: str
    state: str = QUEUED
    reply: str = ""  # the last answer about this recipient


@dataclass
class Envelope:
    """A queued message's envelope and delivery state (the ``.env`` file)."""

    id: str
    sender: str
    user: str  # the authenticated user who submitted it: bounces go to their Maildir
    recipients: list[QueuedRecipient]
    created: float = field(default_factory=time.time)
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""

    def pending(self) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state == QUEUED]

    def failed(self) -> list[QueuedRecipient]:
        return [r for r in self.recipients if r.state == FAILED]

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        raw = json.loads(data.decode("utf-8"))
        raw["recipients"] = [QueuedRecipient(**r) for r in raw["recipients"]]
        return cls(**raw)


class Incoming:
    """A message being written to ``tmp/``; :meth:`commit` queues it durably."""

    def __init__(self, queue: Queue, envelope: Envelope):
        self.queue = queue
        self.envelope = envelope
        self.tmp_path = os.path.join(queue.directory, "tmp",
                                     f"{queue.node}.{envelope.id}.msg")
        self._file = open(self.tmp_path, "xb")  # noqa: SIM115 - closed by commit/abort
        os.fchmod(self._file.fileno(), 0o640)
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def flush(self) -> None:
        self._file.flush()

    def commit(self, prepare: Callable[[bytes], bytes] | None = None) -> None:
        """Blocking: fsync, move into the queue, write the envelope, fsync the directory.

        ``prepare(data) -> data`` rewrites the message first (the submission's hygiene
        headers and DKIM signature, :func:`popgate.relay.sign.prepare`)."""
        try:
            self._file.flush()
            if prepare is not None:
                with open(self.tmp_path, "rb") as f:
                    data = prepare(f.read())
                self._file.seek(0)
                self._file.truncate()
                self._file.write(data)
                self._file.flush()
                self.size = len(data)
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        os.rename(self.tmp_path, self.queue.message_path(self.envelope.id))
        write_atomically(self.queue.envelope_path(self.envelope.id),
                         self.envelope.to_bytes(), 0o640)  # fsyncs the queue directory

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


class Queue:
    """The queue directory; every method blocks on the disk.  ``node`` names this
    process's ``tmp/`` files (the host name)."""

    def __init__(self, directory: str, node: str = "local"):
        self.directory = directory
        self.node = node

    def prepare(self) -> None:
        os.makedirs(os.path.join(self.directory, "tmp"), mode=0o750, exist_ok=True)

    def message_path(self, message_id: str) -> str:
        return os.path.join(self.directory, message_id + ".msg")

    def envelope_path(self, message_id: str) -> str:
        return os.path.join(self.directory, message_id + ".env")

    def new_message(self, envelope: Envelope) -> Incoming:
        return Incoming(self, envelope)

    def ids(self) -> list[str]:
        """Ids of the queued messages (those with an envelope), oldest name first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[:-4] for n in names if n.endswith(".env") and not n.startswith("."))

    def load(self, message_id: str) -> Envelope | None:
        """The envelope, or None if the message is gone (sent, or removed)."""
        try:
            with open(self.envelope_path(message_id), "rb") as f:
                return Envelope.from_bytes(f.read())
        except FileNotFoundError:
            return None

    def lock_path(self, message_id: str) -> str:
        return os.path.join(self.directory, message_id + ".lock")

    def try_lock(self, message_id: str) -> int | None:
        """Take the message's relay lock: a file descriptor to pass to :meth:`unlock`, or
        None while another runner (another node) holds it."""
        fd = os.open(self.lock_path(message_id), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)

    def envelopes(self) -> Iterator[Envelope]:
        for message_id in self.ids():
            envelope = self.load(message_id)
            if envelope is not None:
                yield envelope

    def read_message(self, message_id: str) -> bytes:
        with open(self.message_path(message_id), "rb") as f:
            return f.read()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The queue's lock: held while an envelope is rewritten or a message removed."""
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def save(self, envelope: Envelope) -> bool:
        """Rewrite the envelope; False (nothing written) if the message was removed."""
        with self.locked():
            if not os.path.exists(self.envelope_path(envelope.id)):
                return False
            write_atomically(self.envelope_path(envelope.id), envelope.to_bytes(), 0o640)
            return True

    def remove(self, message_id: str) -> bool:
        """Remove a message (envelope first: without it the message does not exist)."""
        if not os.path.isdir(self.directory):
            return False
        with self.locked():
            found = False
            for path in (self.envelope_path(message_id), self.message_path(message_id)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    found = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path(message_id))
            if found:
                fsync_directory(self.directory)
            return found

    def request_flush(self) -> None:
        """Ask the runner to try every message now (``popgate queue flush``)."""
        self.prepare()
        with open(os.path.join(self.directory, _FLUSH), "w"):
            pass

    def take_flush_request(self) -> bool:
        try:
            os.unlink(os.path.join(self.directory, _FLUSH))
        except FileNotFoundError:
            return False
        return True

    def clean_tmp(self) -> int:
        """At start: remove this node's ``tmp/`` files (messages a crash interrupted
        before their ``250``); how many were removed."""
        self.prepare()
        tmp = os.path.join(self.directory, "tmp")
        removed = 0
        for name in os.listdir(tmp):
            if name.startswith(self.node + "."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(tmp, name))
                    removed += 1
        return removed

    def remove_orphans(self, now: float | None = None, max_age: float = ORPHAN_AGE) -> int:
        """Remove messages without an envelope (a crash between the two renames of a
        commit, before the ``250``) and stale temporary envelopes, once ``max_age`` old."""
        now = time.time() if now is None else now
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        queued = {n[:-4] for n in names if n.endswith(".env")}
        removed = 0
        for name in names:
            orphan = name.endswith((".msg", ".lock")) and name.rpartition(".")[0] not in queued
            if orphan or name.startswith(".tmp-"):
                path = os.path.join(self.directory, name)
                with contextlib.suppress(FileNotFoundError):
                    if now - os.stat(path).st_mtime > max_age:
                        os.unlink(path)
                        removed += 1
        return removed
