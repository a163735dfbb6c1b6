"""The POP3 realm: what a successful login opens, and what logging out releases.

This is the only way the POP3 protocol reaches mail: it never imports the store.
:class:`MaildropRealm` is the ``twisted.cred`` realm behind the POP3 portal.  For an
authenticated user it takes the user's exclusive Maildir lock (a ``flock``, so a second
session in this process or in another popgate process on the same mail root is refused
with :class:`MailboxInUse`), scans the Maildir once and hands back a :class:`Maildrop`:
the maildrop snapshot of RFC 1939 §4, whose :meth:`Maildrop.open` gives a message's
stored bytes as a binary stream.  Messages delivered after the scan are not seen until
the next session.

A :class:`Maildrop` only *marks* messages.  The Maildir changes in one place,
:meth:`Maildrop.commit`, which the protocol calls in the UPDATE state (QUIT); it unlinks
the marked files and moves the retrieved ones from ``new/`` to ``cur/``.  The logout
callable returned with the avatar releases the lock and deletes nothing, which is what a
dropped connection or a timeout must do (RFC 1939 §6).

Concurrency: everything here runs on the reactor thread except the disk work handed to
the injected ``run_in_thread(f, *args) -> Deferred``: the login's (creating the Maildir
on first use, opening and ``flock``-ing its lock file, the scan: on GlusterFS or NFS each
is a round trip to the servers) and the commit.  The lock's release, at logout, runs on
the reactor thread, before a QUIT's ``+OK`` (see :class:`~popgate.store.maildir.MailboxLock`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from popgate.auth.users import User, UserDB
from popgate.store.maildir import (
    MailboxLock,
    MailboxLocked,
    Maildir,
    MaildirStore,
    MessageInfo,
)

RunInThread = Callable[..., defer.Deferred]


class NoSuchMessage(Exception):
    """A message number the client may not use; ``str()`` is the text for ``-ERR``."""


class MailboxInUse(Exception):
    """Another session (in this process or another one on the same mail root) holds the
    user's mailbox: RFC 2449 §8.1.2 ``[IN-USE]``."""


class IMaildrop(Interface):
    """A POP3 maildrop: a numbered snapshot of one user's messages, with deletion marks.

    Message numbers are those of RFC 1939: 1 to :meth:`count`, fixed for the session;
    a message marked deleted keeps its number but may not be used again.
    """

    user = Attribute("The normalised name of the user (local@domain).")
    retrieved_count = Attribute("How many distinct messages RETR has sent so far.")
    retrieved_octets = Attribute("Their octets, as LIST reports them.")
    deleted_count = Attribute("How many messages are marked deleted.")
    deleted_octets = Attribute("Their octets, as LIST reports them.")

    def count() -> int:
        """The number of messages in the snapshot, deleted ones included."""

    def stat() -> tuple[int, int]:
        """``(messages, octets)`` of the messages not marked deleted."""

    def message(number: int) -> MessageInfo:
        """The message ``number``; raise NoSuchMessage if it does not exist or is deleted."""

    def open(number: int) -> BinaryIO:
        """Message ``number`` as stored (LF line ends), a seekable binary stream (a file
        or not) that the caller closes; raise NoSuchMessage as :meth:`message` does,
        OSError if it cannot be read."""

    def listing() -> list[tuple[int, MessageInfo]]:
        """``(number, message)`` for every message not marked deleted, in order."""

    def delete(number: int) -> None:
        """Mark message ``number`` deleted (raise NoSuchMessage as :meth:`message` does)."""

    def undelete_all() -> None:
        """Unmark every message (RSET)."""

    def retrieved(number: int) -> None:
        """Note that message ``number`` was sent whole, so that commit marks it seen."""

    def commit() -> defer.Deferred:
        """UPDATE state: remove the marked messages, mark the retrieved ones seen."""


@implementer(IMaildrop)
class Maildrop:
    """The maildrop snapshot of one POP3 session."""

    def __init__(self, user: str, maildir: Maildir, messages: list[MessageInfo],
                 run_in_thread: RunInThread):
        self.user = user
        self._maildir = maildir
        self._messages = list(messages)
        self._total_octets = sum(info.octets for info in self._messages)
        self._deleted_octets = 0  # kept up to date: STAT must not walk a huge maildrop
        self._deleted: set[int] = set()
        self._retrieved: set[int] = set()
        self._run_in_thread = run_in_thread

    @property
    def retrieved_count(self) -> int:
        return len(self._retrieved)

    @property
    def retrieved_octets(self) -> int:
        return sum(self._messages[n - 1].octets for n in self._retrieved)

    @property
    def deleted_octets(self) -> int:
        return self._deleted_octets

    @property
    def deleted_count(self) -> int:
        return len(self._deleted)

    def count(self) -> int:
        return len(self._messages)

    def stat(self) -> tuple[int, int]:
        return (len(self._messages) - len(self._deleted),
                self._total_octets - self._deleted_octets)

    def message(self, number: int) -> MessageInfo:
        if not 1 <= number <= len(self._messages):
            raise NoSuchMessage("No such message")
        if number in self._deleted:
            raise NoSuchMessage(f"Message {number} is deleted")
        return self._messages[number - 1]

    def open(self, number: int) -> BinaryIO:
        return open(self.message(number).path, "rb")  # noqa: SIM115 - the caller closes it

    def listing(self) -> list[tuple[int, MessageInfo]]:
        if not self._deleted:
            return list(enumerate(self._messages, 1))
        return [(number, info) for number, info in enumerate(self._messages, 1)
                if number not in self._deleted]

    def delete(self, number: int) -> None:
        info = self.message(number)
        self._deleted.add(number)
        self._deleted_octets += info.octets

    def undelete_all(self) -> None:
        self._deleted.clear()
        self._deleted_octets = 0

    def retrieved(self, number: int) -> None:
        self.message(number)
        self._retrieved.add(number)

    def commit(self) -> defer.Deferred:
        doomed = [self._messages[n - 1] for n in sorted(self._deleted)]
        seen = [self._messages[n - 1] for n in sorted(self._retrieved - self._deleted)]
        if not doomed and not seen:
            return defer.succeed(None)
        return self._run_in_thread(apply_update, self._maildir, doomed, seen)


def apply_update(maildir: Maildir, doomed: list[MessageInfo], seen: list[MessageInfo]):
    """Runs in a thread: the Maildir side of the UPDATE state (RFC 1939 §6)."""
    maildir.remove(doomed)
    maildir.mark_seen(seen)


@implementer(IRealm)
class MaildropRealm:
    """Opens a locked :class:`Maildrop` for a user the checker has authenticated."""

    def __init__(self, users: UserDB, store: MaildirStore, run_in_thread: RunInThread):
        self._users = users
        self._store = store
        self._run_in_thread = run_in_thread

    def requestAvatar(self, avatarId, mind, *interfaces) -> defer.Deferred:
        """Fire with ``(IMaildrop, maildrop, logout)``.

        Fails with MailboxInUse when another session holds the mailbox, with
        UnauthorizedLogin when the user was removed since the password check, and with
        the underlying error when the Maildir cannot be read (the lock is then released).
        """
        if IMaildrop not in interfaces:
            return defer.fail(NotImplementedError("popgate's realm only serves IMaildrop"))
        return defer.maybeDeferred(self._open, avatarId)

    def _open(self, name: str) -> defer.Deferred:
        user = self._users.get(name)
        if user is None:
            raise UnauthorizedLogin()

        def opened(result: tuple[Maildir, MailboxLock, list[MessageInfo]]):
            maildir, lock, messages = result
            maildrop = Maildrop(user.name, maildir, messages, self._run_in_thread)
            return IMaildrop, maildrop, lock.release

        return self._run_in_thread(lock_and_scan, self._store, user).addCallback(opened)


def lock_and_scan(store: MaildirStore, user: User):
    """Runs in a thread: the user's Maildir (made on first use), its lock (MailboxInUse if
    another session holds it) and a scan; the lock is released if the scan fails."""
    maildir = store.maildir(user)
    try:
        lock = maildir.lock()
    except MailboxLocked:
        raise MailboxInUse() from None
    try:
        return maildir, lock, maildir.scan()
    except BaseException:
        lock.release()
        raise
