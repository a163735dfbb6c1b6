"""The state of one SMTP/LMTP session as plain objects, beside the protocol.

* :class:`Session` is what lasts for the whole connection: its HELO name, TLS, the
  authenticated user (submission, later) and the messages accepted so far (the client is
  the protocol's :class:`~popgate.events.SessionInfo`).
* :class:`Envelope` is one mail transaction (RFC 5321 §3.3): sender, accepted recipients
  and the MAIL parameters; a new one starts the next transaction.
* :class:`Chunk` is a BDAT chunk being read (RFC 3030), refused or not.
* :class:`MessageInFlight` is the one operation that can be in flight in a transaction:
  a message body from ``DATA``/first ``BDAT`` to its reply, through opening its files,
  receiving its bytes and committing it.  Everything that used to be a loose flag on the
  protocol (files opening, too big, unstorable, chunking) is here.

None of these touch the network or the disk; :mod:`popgate.smtp.server` drives them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from popgate.codec import ChunkDecoder, DataDecoder
from popgate.smtp.delivery import Recipient, Transaction
from popgate.smtp.reply import Reply


@dataclass
class Session:
    """One connection's lasting state."""

    helo: str | None = None
    esmtp: bool = False
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once under TLS
    secure: bool = False  # under TLS (implicit, or after STARTTLS)
    user: str | None = None  # the authenticated user (submission)
    messages: int = 0  # accepted so far

    def forget_greeting(self) -> None:
        """After STARTTLS: the client must greet again (RFC 3207 §4.2)."""
        self.helo, self.esmtp = None, False


@dataclass
class Envelope:
    """One mail transaction: MAIL's sender and parameters, RCPT's accepted recipients."""

    sender: str | None = None  # None before MAIL; "" is the null reverse-path
    recipients: list[Recipient] = field(default_factory=list)
    body: str = "7BIT"
    smtputf8: bool = False

    @property
    def started(self) -> bool:
        return self.sender is not None


class Stage(enum.Enum):
    OPENING = "opening the message files"
    RECEIVING = "receiving the message"
    COMMITTING = "committing the message"


@dataclass
class Chunk:
    """The BDAT chunk being read: octets still to come, and how to answer at its end."""

    size: int
    last: bool
    refusal: Reply | None = None  # answered once the chunk is consumed, instead of storing
    remaining: int = -1

    def __post_init__(self) -> None:
        if self.remaining < 0:
            self.remaining = self.size


@dataclass
class MessageInFlight:
    """The message of the current transaction, from DATA or its first BDAT to its reply.

    ``transaction`` holds the open ``tmp/`` files once they exist; it is None while they
    are being opened (:attr:`stage` OPENING) and once the message was refused on the way
    (``refusal``: too big, or files that could not be opened), in which case the rest of
    the body is read and counted, not stored, and the refusal is the message's reply.
    """

    chunking: bool  # BDAT (RFC 3030) rather than DATA; the two do not mix
    stage: Stage = Stage.OPENING
    transaction: Transaction | None = None
    refusal: Reply | None = None
    size: int = 0  # octets received, counted as sent (CRLF line ends)
    head: bytes = b""  # the first octets of the body (LF), for the trace's summary
    data_decoder: DataDecoder | None = None
    chunk_decoder: ChunkDecoder | None = None

    def abort(self) -> None:
        """Forget the message: its ``tmp/`` files are removed."""
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            transaction.abort()

    def refuse(self, reply: Reply) -> None:
        """Keep reading the body, store nothing more, answer ``reply`` at its end."""
        if self.refusal is None:
            self.refusal = reply
        self.abort()
