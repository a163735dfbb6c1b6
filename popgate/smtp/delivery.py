"""What happens to a message between "RCPT TO" and "250": routing and durable delivery.

* :class:`Router` decides, for one ``RCPT TO`` mailbox, which existing users get the
  message, or why it is refused:

  - source routes, ``%`` / ``!`` hacks, quoted local parts and address literals, and any
    domain that is not local: ``554 5.7.1`` relay denied (RFC 5321 §3.6.1, App. C);
  - a domain is local when a user of it exists, when ``server.domains`` lists it, or when
    an ``[aliases]`` key names it;
  - the local part is compared lowercased; a sub-address ``alice+tag`` means ``alice``
    (RFC 5233);
  - lookup order: the exact alias ``local@domain``, then (for ``postmaster``, RFC 5321
    §4.5.1) the ``server.postmaster`` user, then the user ``local@domain``, then the
    domain's catch-all ``@domain``, then (for ``postmaster`` again) the first user in the
    users file, so that ``postmaster@`` of every local domain reaches someone by default
    (:func:`describe_postmaster` names who, for ``popgate config check`` and the start-up
    log); alias targets that are not in the user database are skipped (and logged);
    nothing left: ``550 5.1.1``;
  - while the users file has never loaded (:class:`~popgate.auth.users.UsersUnavailable`):
    ``451 4.3.0``, never a permanent refusal.

* :class:`Deliverer` turns an :class:`Arrival` into a :class:`Transaction`: one Maildir
  ``tmp/`` file per recipient *user* (a user reached through several addresses gets one
  copy), each starting with its own trace headers, LF-terminated as stored::

      Return-Path: <sender>
      Delivered-To: alice@example.org
      Received: from client.example (unknown [192.0.2.1])
      \tby mail.example.org (popgate) with ESMTPS id 3NB2AYQCK2ZNQ
      \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
      \tfor <alice+tag@example.org>; Tue, 03 Mar 2026 10:00:00 +0100

  The body is then written chunk by chunk to every file, through one buffer of at most
  :data:`~popgate.store.maildir.WRITE_BUFFER` octets per message (shared by its copies: never
  N copies of the message in memory).  :meth:`Transaction.finish` makes the files
  durable: fsync, rename into ``new/``, fsync of ``new/`` (see :mod:`popgate.store.maildir`).

Concurrency: the reactor thread routes, writes body chunks to the open files (page-cache
writes, one per 64 KiB and one at the end; a small message is written once, when it
ends) and closes them once they are committed.  Creating the files and making them
durable (:class:`GroupCommitter`) block on the file system, so they run through the
injected ``run_in_thread``.  Files are created ahead of time by a
:class:`SparePool` (one thread call at a time, making every spare wanted so far), so that
:meth:`Deliverer.begin` normally needs no thread call; when a user has no spare left, the
files of that message are created in a thread call of their own.  The pool threads only
create directories and uniquely named files through
:class:`~popgate.store.maildir.MaildirStore`, whose per-user cache tolerates concurrent first uses
(the same directories created twice, ``exist_ok``), and remove spares.  At most
``max_in_flight`` commits run at once; transactions that finish while all are busy are
committed together in the next thread call, sharing the ``new/`` directory fsyncs (group
commit).  A transaction's Deferred fires only after its own files and directories are
durable, and fails on its own error without failing the others in its group.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from popgate.addresses import Mailbox
from popgate.auth.users import User, UserDB, UsersUnavailable
from popgate.loglimit import LogLimiter, log_storage_error
from popgate.smtp.reply import (
    CANNOT_STORE,
    RELAY_DENIED,
    STORAGE_FULL,
    UNKNOWN_USER,
    USERS_UNAVAILABLE,
    Reply,
)
from popgate.store import maildir
from popgate.store.maildir import IncomingMessage, MaildirStore

log = Logger()

_MAX_HEADER_LINE = 78  # RFC 5322 §2.1.1: SHOULD NOT exceed 78 characters


def storage_refusal(error: OSError, log_limiter: LogLimiter) -> Reply:
    """The temporary reply for mail that could not be stored, and one log line per cause.

    A full disk or quota (ENOSPC, EDQUOT) is ``452 4.3.1``, any other storage error
    ``451 4.3.0``.  These are expected faults: one line per cause (its errno) per
    ``log_limiter`` interval (:func:`~popgate.loglimit.log_storage_error`), never a
    traceback, however many messages are refused.
    """
    return STORAGE_FULL if log_storage_error(error, log_limiter) else CANNOT_STORE


@dataclass(frozen=True)
class Resolution:
    """Where one recipient address goes: existing users, or a refusal."""

    users: tuple[User, ...] = ()
    refusal: Reply | None = None


class Router:
    """Maps ``RCPT TO`` mailboxes to existing users (see the module docstring)."""

    def __init__(self, config, users: UserDB):
        self._users = users
        self._aliases = config.aliases
        self._postmaster = config.server.postmaster
        self._hostname = config.hostname.lower()
        self._configured_domains = frozenset(d.lower() for d in config.server.domains) | {
            key.rpartition("@")[2] for key in config.aliases
        }

    def is_local(self, domain: str) -> bool:
        return domain in self._configured_domains or self._users.has_domain(domain)

    def may_send_as(self, user: str, mailbox: Mailbox) -> bool:
        """Is ``mailbox`` one of ``user``'s addresses: their own, a sub-address of it
        (RFC 5233), or an alias whose targets include them?  (Not a domain catch-all:
        that would let a user send as every address nobody else has.)"""
        if mailbox.has_relay_hack or mailbox.is_literal:
            return False
        address = f"{_base_local(mailbox)}@{mailbox.domain}"
        return address == user or user in self._aliases.get(address, ())

    def user(self, name: str) -> User | None:
        return self._users.get(name)

    def resolve(self, mailbox: Mailbox) -> Resolution:
        try:
            return self._resolve(mailbox)
        except UsersUnavailable:
            return Resolution(refusal=USERS_UNAVAILABLE)

    def _resolve(self, mailbox: Mailbox) -> Resolution:
        if mailbox.has_relay_hack or mailbox.is_literal or not self.is_local(mailbox.domain):
            return Resolution(refusal=RELAY_DENIED)
        local = _base_local(mailbox)
        if not local:
            return Resolution(refusal=UNKNOWN_USER)
        return self._lookup(local, mailbox.domain)

    def resolve_postmaster(self) -> Resolution:
        """The bare ``<Postmaster>`` recipient, which RFC 5321 §4.5.1 requires to work.

        It is the postmaster of this host's name or, failing that, of its parent domains
        (``mx.example.org``, then ``example.org``); failing both, the default postmaster
        (the first user).
        """
        labels = self._hostname.split(".")
        domains = [".".join(labels[start:]) for start in range(max(len(labels) - 1, 1))]
        try:
            for domain in domains:
                resolution = self._lookup("postmaster", domain, default=False)
                if resolution.refusal is None:
                    return resolution
            return self._lookup("postmaster", domains[0])
        except UsersUnavailable:
            return Resolution(refusal=USERS_UNAVAILABLE)

    def _lookup(self, local: str, domain: str, default: bool = True) -> Resolution:
        address = f"{local}@{domain}"
        targets = self._aliases.get(address)
        if targets is None and local == "postmaster" and self._postmaster:
            targets = self._configured_postmaster()
        if targets is None and self._users.get(address) is not None:
            targets = (address,)
        if targets is None:
            targets = self._aliases.get("@" + domain)
        if targets is None and local == "postmaster" and default:
            targets = _default_postmaster(self._users)
        if targets is None:
            return Resolution(refusal=UNKNOWN_USER)
        users = self._existing_users(address, targets)
        if not users:
            return Resolution(refusal=UNKNOWN_USER)
        return Resolution(users=users)

    def _configured_postmaster(self) -> tuple[str, ...] | None:
        if self._users.get(self._postmaster) is not None:
            return (self._postmaster,)
        log.warn("server.postmaster {user} is not in the user database", user=self._postmaster)
        return None  # fall back to the user postmaster@<domain>, if there is one

    def _existing_users(self, address: str, targets: tuple[str, ...]) -> tuple[User, ...]:
        users: dict[str, User] = {}
        for name in targets:
            user = self._users.get(name)
            if user is None:
                log.warn("alias {address}: target {name} is not in the user database",
                         address=address, name=name)
            else:
                users.setdefault(user.name, user)
        return tuple(users.values())


def _base_local(mailbox: Mailbox) -> str:
    """The local part without an RFC 5233 sub-address (``alice+news`` -> ``alice``),
    lower-cased: the user it names."""
    return mailbox.local.lower().partition("+")[0]


def _default_postmaster(users: UserDB) -> tuple[str, ...] | None:
    first = users.first()
    return (first.name,) if first is not None else None


def describe_postmaster(config, users: UserDB) -> str:
    """Who receives ``postmaster@`` of the local domains, in one line for the operator."""
    chosen = config.server.postmaster
    if chosen and users.get(chosen) is not None:
        return f"postmaster@<every local domain> goes to {chosen} (server.postmaster)"
    fallback = _default_postmaster(users)
    if fallback is None:
        default = (f"will go to the first user added to {users.path} "
                   "(there is none yet)")
    else:
        default = f"goes to {fallback[0]}, the first user in {users.path}"
    line = (f"postmaster@<every local domain> {default}, unless an alias, a user "
            "postmaster@<domain> or a catch-all of that domain says otherwise")
    if chosen:
        return f"server.postmaster {chosen} is not a user: {line}"
    return line + "; set server.postmaster to choose"


@dataclass(frozen=True)
class Recipient:
    """One accepted ``RCPT TO``: the address as the client wrote it, and its users."""

    address: str
    users: tuple[User, ...]


@dataclass(frozen=True)
class Arrival:
    """How and for whom a message arrived: everything about it but its content, frozen
    when its files are opened (the protocol's own Session and Arrival go on changing)."""

    sender: str  # "" for the null reverse-path <>
    recipients: tuple[Recipient, ...]
    helo: str
    client_ip: str | None  # None for a UNIX socket peer
    protocol: str  # the Received "with" keyword: ESMTP, ESMTPS, LMTP, ... (RFC 3848)
    tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None = None  # submission with [submission] show_auth_user only


class GroupCommitter:
    """Runs Maildir commits in threads, grouping those that queue up behind busy ones."""

    def __init__(self, run_in_thread: Callable[..., defer.Deferred], max_in_flight: int = 4):
        self.run_in_thread = run_in_thread
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._queue: list[tuple[list[IncomingMessage], defer.Deferred]] = []

    def commit(self, messages: list[IncomingMessage]) -> defer.Deferred:
        """Make ``messages`` durable; the Deferred fires with None once they are."""
        done: defer.Deferred = defer.Deferred()
        self._queue.append((messages, done))
        if self._in_flight < self._max_in_flight:
            self._start_group()
        return done

    def _start_group(self) -> None:
        group, self._queue = self._queue, []
        self._in_flight += 1
        d = self.run_in_thread(commit_group, [messages for messages, _ in group])
        d.addBoth(self._group_done, group)

    def _group_done(self, outcomes, group) -> None:
        self._in_flight -= 1
        if isinstance(outcomes, Failure):
            # commit_group itself failed (not one delivery's OSError): fail them all.
            outcomes = [outcomes] * len(group)
            for messages, _ in group:
                for message in messages:
                    message.abort()
        for (messages, done), outcome in zip(group, outcomes, strict=True):
            for message in messages:
                message.close()
                if message.recovered:
                    log.warn("{path} was removed by another program before delivery; "
                             "written again from the open file", path=message.tmp_path)
            if outcome is None:
                done.callback(None)
            else:
                done.errback(outcome)
        if self._queue and self._in_flight < self._max_in_flight:
            self._start_group()


def commit_group(groups: list[list[IncomingMessage]]) -> list[OSError | None]:
    """Commit several deliveries in one thread call; one outcome per delivery.

    Each delivery's files are fsynced and renamed on their own (a failure aborts only that
    delivery); the ``new/`` directories of all of them are then fsynced once each.
    """
    outcomes: list[OSError | None] = []
    waiting: dict[str, list[int]] = {}  # new/ directory -> deliveries that need its fsync
    for index, messages in enumerate(groups):
        try:
            directories = maildir.publish(messages)
        except OSError as e:
            outcomes.append(e)
            continue
        outcomes.append(None)
        for directory in directories:
            waiting.setdefault(directory, []).append(index)
    for directory, indexes in waiting.items():
        try:
            maildir.fsync_directory(directory)
        except OSError as e:
            for index in indexes:
                outcomes[index] = e
    return outcomes


def make_spares(store: MaildirStore, wanted: list[tuple[User, int]],
                stale: list[IncomingMessage]) -> tuple[list[tuple[User, IncomingMessage]],
                                                       OSError | None]:
    """In a thread: remove ``stale`` spares, create ``wanted`` ones; (created, error)."""
    for message in stale:
        message.abort()
    created: list[tuple[User, IncomingMessage]] = []
    try:
        for user, count in wanted:
            directory = store.maildir(user)
            for _ in range(count):
                created.append((user, store.new_message(directory)))
    except OSError as e:
        return created, e
    return created, None


class SparePool:
    """Empty ``tmp/`` files made ahead of time, so that a message needs no thread call to
    get its files (a file creation waits for the file system; measured, it costs from a
    few tens of microseconds to milliseconds).

    Spares are made in the background, one thread call at a time, each making every spare
    wanted so far (:func:`make_spares`): each user has a target number of spares, which
    grows by one (to ``per_user`` at most) whenever a message finds none, so that it
    follows the number of messages that user receives at once; at most ``limit`` spares
    exist in all.  A spare unused for ``max_age`` seconds is removed (by the next thread
    call) rather than handed out: its name carries its creation time.  Spares left behind
    by a crash are empty ``tmp/`` files named after their dead owner, which
    :meth:`~popgate.store.maildir.MaildirStore.clean_tmp` removes at the next start or
    periodic sweep.  Reactor thread only.
    """

    def __init__(self, store: MaildirStore, run_in_thread: Callable[..., defer.Deferred],
                 now: Callable[[], float], *, limit: int = 64, per_user: int = 16,
                 max_age: float = 60.0):
        self._store = store
        self._run_in_thread = run_in_thread
        self._now = now
        self._limit = limit
        self._per_user = per_user
        self._max_age = max_age
        self._spares: dict[str, deque[tuple[float, IncomingMessage]]] = {}
        self._targets: dict[str, int] = {}
        self._pending: dict[str, int] = {}  # being made, per user
        self._count = 0  # spares in the pool or being made
        self._wanted: dict[str, tuple[User, int]] = {}  # to make in the next thread call
        self._stale: list[IncomingMessage] = []  # to remove in the next thread call
        self._refilling = False
        self._closed = False
        self._error_logged = False
        self._swept: float | None = None

    def take(self, users: list[User]) -> list[IncomingMessage] | None:
        """One spare for each of ``users``, or None (none taken) if one has none."""
        if self._closed:
            return None
        now = self._now()
        self._sweep(now)
        oldest = now - self._max_age
        queues = []
        for user in users:
            queue = self._spares.get(user.name)
            self._expire(queue, oldest)
            queues.append(queue)
        taken = None
        if all(queues):
            taken = [queue.popleft()[1] for queue in queues]
            self._count -= len(taken)
        for user in users:
            if taken is None:  # more messages for this user at once than spares
                self._targets[user.name] = min(self._targets.get(user.name, 1) + 1,
                                               self._per_user)
            self._top_up(user)
        return taken

    def _sweep(self, now: float) -> None:
        """Every second: every user's old spares become stale (not just the next
        recipient's), so that spares kept by users who get no more mail do not take the
        room of the others."""
        if self._swept is not None and now - self._swept < 1.0:
            return
        self._swept = now
        oldest = now - self._max_age
        for name, queue in list(self._spares.items()):
            self._expire(queue, oldest)
            if not queue:
                del self._spares[name]
        if len(self._targets) > 4 * self._limit:
            self._targets.clear()  # forget old bursts: targets start from 1 again

    def _expire(self, queue: deque | None, oldest: float) -> None:
        """Move the spares of ``queue`` made before ``oldest`` to the stale list."""
        while queue and queue[0][0] < oldest:
            self._stale.append(queue.popleft()[1])
            self._count -= 1

    def _top_up(self, user: User) -> None:
        have = len(self._spares.get(user.name, ())) + self._pending.get(user.name, 0)
        missing = min(self._targets.get(user.name, 1) - have, self._limit - self._count)
        if missing > 0:
            self._count += missing
            self._pending[user.name] = self._pending.get(user.name, 0) + missing
            _, before = self._wanted.get(user.name, (user, 0))
            self._wanted[user.name] = (user, before + missing)

    def refill(self) -> None:
        """Start a thread call for the wanted and stale spares, unless one is running."""
        if self._refilling or self._closed or not (self._wanted or self._stale):
            return
        wanted, stale = list(self._wanted.values()), self._stale
        self._wanted, self._stale = {}, []
        self._refilling = True
        d = self._run_in_thread(make_spares, self._store, wanted, stale)
        d.addBoth(self._refilled, wanted)

    def _refilled(self, result, wanted: list[tuple[User, int]]) -> None:
        self._refilling = False
        if isinstance(result, Failure):
            created, error = [], result.value
        else:
            created, error = result
        for user, count in wanted:
            self._pending[user.name] -= count
            if not self._pending[user.name]:
                del self._pending[user.name]
            self._count -= count
        if error is not None and not self._error_logged:
            self._error_logged = True  # the deliveries that follow report their own errors
            log.error("cannot make spare message files: {error}", error=error)
        if self._closed:
            for _, message in created:
                message.abort()
            return
        now = self._now()
        for user, message in created:
            self._spares.setdefault(user.name, deque()).append((now, message))
            self._count += 1
        self.refill()

    def close(self) -> None:
        """Remove every spare (blocking: for shutdown); make no more."""
        self._closed = True
        for queue in self._spares.values():
            for _, message in queue:
                message.abort()
        for message in self._stale:
            message.abort()
        self._spares, self._stale, self._wanted = {}, [], {}


@dataclass(frozen=True)
class Verdict:
    """What one message check decided: header lines to add at the top of the message
    (``Authentication-Results: ...``, no line end), and a reply to refuse it with."""

    headers: tuple[str, ...] = ()
    reply: Reply | None = None


class MessageCheck(Protocol):
    """A check between the end of a message's data and its ``250``: SPF, DKIM and DMARC
    verification or a spam engine plug in here, unknown to the protocol.

    ``check`` gets the :class:`Transaction` (its :attr:`~Transaction.arrival`, its
    :attr:`~Transaction.size` and :meth:`~Transaction.open_content`) and returns a
    :class:`Verdict` or a Deferred of one.  Checks run in order; the first refusal wins
    and the later checks do not run.
    """

    def check(self, transaction: Transaction) -> Verdict | defer.Deferred: ...


class Transaction:
    """One message being written to every recipient user's ``tmp/``."""

    def __init__(self, transaction_id: str, arrival: Arrival,
                 copies: list[tuple[User, IncomingMessage]], committer: GroupCommitter, *,
                 checks: Sequence[MessageCheck] = (), header_octets: int = 0):
        self.id = transaction_id
        self.arrival = arrival
        self.size = 0  # body octets written (LF line ends, trace headers excluded)
        self._copies = copies
        self._committer = committer
        self._checks = checks
        self._header_octets = header_octets  # our trace headers, before the content
        self._error: OSError | None = None
        # Several copies share one buffer (one block in memory, not one per copy).
        self._shared = bytearray() if len(copies) > 1 else None

    @property
    def users(self) -> list[User]:
        return [user for user, _ in self._copies]

    @property
    def stored_octets(self) -> int:
        """The size of each stored copy (LF line ends), trace headers included."""
        return self._copies[0][1].size

    @property
    def list_octets(self) -> int:
        """The size POP3's LIST reports for each copy (CRLF line ends, RFC 1939 §5)."""
        message = self._copies[0][1]
        return message.size + message.lines

    def write(self, data: bytes) -> None:
        """Append LF-terminated body bytes to every copy.

        A disk error aborts the transaction; :meth:`finish` then reports it.
        """
        if self._error is not None or not data:
            return
        self.size += len(data)
        try:
            if self._shared is None:
                self._copies[0][1].write(data)
                return
            self._shared += data
            if len(self._shared) >= maildir.WRITE_BUFFER:
                self._spill()
        except OSError as e:
            self._failed(e)

    def _spill(self) -> None:
        """Hand the shared buffer to every copy's file."""
        data = bytes(self._shared)
        self._shared.clear()
        for _, message in self._copies:
            message.write(data)
            message.flush()

    def _failed(self, error: OSError) -> None:
        # Not logged here: finish() fails with it, and the caller logs storage errors at
        # a bounded rate (storage_refusal); a full disk must not log a line per message.
        self._error = error
        self.abort()

    def open_content(self) -> BinaryIO:
        """The message as the client sent it (LF line ends, without our trace headers),
        for a message check to read.  Blocking: call it from a thread."""
        f = open(self._copies[0][1].tmp_path, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self._header_octets)
        return f

    def finish(self) -> defer.Deferred:
        """Run the message checks, then make every copy durable.

        Fires with None once every copy is durable, or with the :class:`Reply` a check
        refused the message with (its files are then removed).  What is still buffered
        goes to the files first, here: a page-cache write, and one system call less in the
        commit's thread (where each one waits for the GIL).
        """
        if self._error is None:
            try:
                if self._shared:
                    self._spill()
                for _, message in self._copies:
                    message.flush()
            except OSError as e:
                self._failed(e)
        if self._error is not None:
            return defer.fail(self._error)
        if not self._checks:
            return self._commit()
        return defer.ensureDeferred(self._checked_commit())

    async def _checked_commit(self) -> Reply | None:
        headers: list[str] = []
        for check in self._checks:
            verdict = await defer.maybeDeferred(check.check, self)
            if verdict.reply is not None:
                self.abort()
                return verdict.reply
            headers.extend(verdict.headers)
        if headers:
            added = "".join(line + "\n" for line in headers).encode("utf-8")
            await self._committer.run_in_thread(_prepend_to_copies, self._copies, added)
        return await self._commit()

    def _commit(self) -> defer.Deferred:
        return self._committer.commit([message for _, message in self._copies])

    def abort(self) -> None:
        """Forget the message: close and remove every ``tmp/`` file."""
        for _, message in self._copies:
            message.abort()


def _prepend_to_copies(copies: list[tuple[User, IncomingMessage]], data: bytes) -> None:
    for _, message in copies:
        message.prepend(data)


class Deliverer:
    """Opens :class:`Transaction` objects in the Maildir store."""

    def __init__(self, store: MaildirStore, run_in_thread: Callable[..., defer.Deferred], *,
                 hostname: str, now: Callable[[], float] = time.time,
                 max_in_flight: int = 4, spares: int = 64,
                 checks: Sequence[MessageCheck] = ()):
        self._store = store
        self._checks = tuple(checks)
        self._run_in_thread = run_in_thread
        self._hostname = hostname
        self._now = now
        self._spares = SparePool(store, run_in_thread, now, limit=spares)
        self._committer = GroupCommitter(run_in_thread, max_in_flight)
        self._date_second: int | None = None
        self._date_text = ""

    def _date(self) -> str:
        """The RFC 5322 date for a Received header (formatted once per second)."""
        now = self._now()
        second = int(now)
        if second != self._date_second:
            self._date_text = email.utils.formatdate(second, localtime=True)
            self._date_second = second
        return self._date_text

    def begin(self, arrival: Arrival) -> defer.Deferred:
        """Open one ``tmp/`` file per recipient user; fires with a Transaction.

        Creating files can block on the file system (other sessions' fsyncs, its inode
        allocator), so it is kept off the reactor: the files are spares made earlier in
        the background by a :class:`SparePool` (the Deferred has then fired already), or
        they are created in a thread now.  Fails with OSError, leaving nothing behind, if
        a file cannot be created.
        """
        transaction_id = new_transaction_id()
        date = self._date()
        recipients = _users_and_first_address(arrival.recipients)
        users = [user for user, _ in recipients]
        spares = self._spares.take(users)
        if spares is not None:
            d = defer.succeed(list(zip(users, spares, strict=True)))
        else:
            d = self._run_in_thread(self._open_copies, users)
        self._spares.refill()
        return d.addCallback(self._start, arrival, recipients, transaction_id, date)

    def _open_copies(self, users: list[User]) -> list[tuple[User, IncomingMessage]]:
        """Runs in a pool thread: one new ``tmp/`` file per user (none left on error)."""
        copies: list[tuple[User, IncomingMessage]] = []
        try:
            for user in users:
                copies.append((user, self._store.new_message(self._store.maildir(user))))
        except OSError:
            for _, message in copies:
                message.abort()
            raise
        return copies

    def _start(self, copies: list[tuple[User, IncomingMessage]], arrival: Arrival,
               recipients: list[tuple[User, str]], transaction_id: str,
               date: str) -> Transaction:
        """Each copy begins with its own trace headers (buffered, not yet written)."""
        header_octets = 0
        for (user, message), (_, address) in zip(copies, recipients, strict=True):
            headers = trace_headers(arrival, user, address, self._hostname, transaction_id,
                                    date)
            message.write(headers)
            header_octets = header_octets or len(headers)
        return Transaction(transaction_id, arrival, copies, self._committer,
                           checks=self._checks, header_octets=header_octets)

    def deliver(self, arrival: Arrival, data: bytes) -> defer.Deferred:
        """Deliver a whole message made here (a bounce: LF line ends); fires with None
        once it is durable, like a received one."""

        def write(transaction: Transaction) -> defer.Deferred:
            transaction.write(data)
            return transaction.finish()

        return self.begin(arrival).addCallback(write)

    def close(self) -> None:
        """Remove the spare files (blocking: for shutdown)."""
        self._spares.close()


_random_ids: list[str] = []


def new_transaction_id() -> str:
    """A short random id for "queued as", Received and the logs (base32, 13 characters).

    Made 256 at a time: one system call for the random bytes instead of one per message.
    Reactor thread only (the list is not locked).
    """
    if not _random_ids:
        # 13 digits of a random base32 stream (the last, partial and padded one dropped).
        block = base64.b32encode(secrets.token_bytes(13 * 5 * 32)).decode("ascii")
        _random_ids.extend(block[i:i + 13] for i in range(0, len(block) - 12, 13))
    return _random_ids.pop()


def _users_and_first_address(recipients) -> list[tuple[User, str]]:
    """Each user once, with the first recipient address that reached them."""
    seen: dict[str, tuple[User, str]] = {}
    for recipient in recipients:
        for user in recipient.users:
            seen.setdefault(user.name, (user, recipient.address))
    return list(seen.values())


def trace_headers(arrival: Arrival, user: User, address: str, hostname: str,
                  transaction_id: str, date: str) -> bytes:
    """``Return-Path``, ``Delivered-To`` and ``Received`` for one copy, LF-terminated."""
    lines = [
        f"Return-Path: <{arrival.sender}>",
        f"Delivered-To: {user.name}",
        received_header(arrival, address, hostname, transaction_id, date),
    ]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def received_header(arrival: Arrival, address: str | None, hostname: str,
                    transaction_id: str, date: str) -> str:
    """An RFC 5321 §4.4 ``Received:`` line (folded, no line end); without ``address``
    (a message for several remote recipients) there is no ``for`` clause."""
    clauses = [f"from {arrival.helo} ({_tcp_info(arrival.client_ip)})",
               f"by {hostname} (popgate)",
               f"with {arrival.protocol}",
               f"id {transaction_id}"]
    if arrival.tls:
        clauses.append(f"({_describe_tls(arrival.tls)})")
    if arrival.auth_user:
        clauses.append(f"(authenticated as {arrival.auth_user})")
    if address is not None:
        clauses.append(f"for <{address}>")
    clauses[-1] += ";"
    clauses.append(date)
    return fold("Received:", clauses)


@functools.lru_cache(maxsize=1024)
def _tcp_info(client_ip: str | None) -> str:
    """RFC 5321 §4.4 TCP-info; we do no reverse DNS, so the name is "unknown"."""
    if client_ip is None:
        return "local socket"
    try:
        version = ipaddress.ip_address(client_ip).version
    except ValueError:
        return f"unknown [{client_ip}]"
    return f"unknown [IPv6:{client_ip}]" if version == 6 else f"unknown [{client_ip}]"


def _describe_tls(description: str) -> str:
    version, _, cipher = description.partition(" ")
    if version.startswith("TLSv") and cipher:
        return f"using {version} with cipher {cipher}"
    return f"using {description}"


def fold(name: str, words: list[str]) -> str:
    """Join ``words`` after the header ``name``, folding with LF-TAB before 78 columns."""
    lines = [name]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > _MAX_HEADER_LINE and lines[-1] != name:
            lines.append("\t" + word)
        else:
            lines[-1] += " " + word
    return "\n".join(lines)
