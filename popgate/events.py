"""Session events: what every SMTP, LMTP and POP3 session does, for whoever watches.

The protocols publish; the log lines, the protocol trace, the metrics and the lab
dashboard subscribe.  A protocol never imports an observer, and an observer never reaches
into a protocol: this module is the whole contract between them.

Every event names its :class:`SessionInfo` (id, protocol, client) and has a
``kind`` and a ``data`` mapping of plain values (str, int, float, bool, None, tuples of
those), so that an observer can turn it into a log line, JSON or a metric without knowing
the protocol's classes.  The kinds and their data:

``connected``
    ``tls`` (bool: implicit TLS from the first byte).
``command``
    ``line`` (str): the command as received, **with secrets already replaced** by
    ``********`` (``PASS``, the SASL responses, APOP digests); the protocol redacts before
    it publishes, so no observer can leak what it never gets.
``reply``
    ``line`` (str): the reply's first line; ``lines`` (int): how many lines it had;
    ``summary`` (str, optional): what a message body in it was ("1234 octets, Subject: ...").
``tls``
    ``version`` and ``cipher`` (str) once a handshake completed.
``login``
    ``user`` (str, as the client named it, or the normalised name on success),
    ``mechanism`` (``USER``, ``APOP``, ``PLAIN``, ``LOGIN``) and ``result``: ``ok``,
    ``failed``, ``in-use`` or ``error``.  Never the secret.
``state``
    ``state``: ``AUTHORIZATION``, ``TRANSACTION`` or ``UPDATE`` (POP3, RFC 1939 §3).
``message``
    ``action``: ``delivered`` (``id``, ``sender``, ``recipients``, ``users``, ``octets``
    as stored with LF line ends, ``list_octets`` as POP3's LIST reports them with CRLF,
    ``tls``, ``summary`` of its From/To/Subject (empty unless something subscribes to
    ``reply``: only transcripts show it), ``latency``: seconds from the end of
    its data to the ``250``), ``queued`` (submission: ``id``, ``sender``, ``recipients``
    queued for the smarthost, ``octets`` as queued), ``retrieved`` / ``topped``
    (``number``, ``uidl``, ``octets``), ``deleted`` (``number``, ``uidl``, ``octets``:
    marked by DELE), ``undeleted`` (RSET), ``removed`` (the UPDATE state removed the
    marked messages: ``count``, ``octets``).
``refused``
    ``reason`` (str) and ``reply`` (the line sent, if any).
``closed``
    ``reason`` (str), ``user`` (str or None), ``duration`` (s), and counters:
    ``messages`` (SMTP), ``retrieved``/``retrieved_octets``/``deleted``/``deleted_octets``
    (POP3).

Concurrency: reactor thread only.  Publishing is synchronous and cheap when nobody
listens to a kind (:meth:`EventBus.wants` lets a protocol skip building the event at all,
which matters for ``command``/``reply`` on the SMTP hot path).  An observer that raises is
logged once and the others still run: watching must never break a session.
"""

from __future__ import annotations

import base64
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

SECRET = "********"  # what events show instead of a password or a SASL response
# Commands whose argument is (or holds) a secret, in POP3 and SMTP alike, and how many
# words of the argument are kept: PASS, APOP's digest, AUTH's initial response.
_SECRET_ARGUMENTS = {"PASS": 0, "APOP": 1, "AUTH": 1}

KINDS = ("connected", "command", "reply", "tls", "login", "state", "message", "refused",
         "closed")

_log = Logger()


@dataclass
class SessionInfo:
    """Who a session is: its id and its peer, as every event about it names them.

    ``client`` is ``host:port`` (``local`` for a UNIX socket); it may change once, when a
    PROXY-protocol header names the real client before the first command.
    """

    id: str
    protocol: str  # "SMTP", "LMTP", "POP3", "SUBMISSION"
    client: str
    started: float = field(default_factory=time.time)

    @property
    def client_host(self) -> str:
        host, _, port = self.client.rpartition(":")
        return host.strip("[]") if port.isdigit() and host else self.client


@dataclass(frozen=True)
class Event:
    kind: str
    session: SessionInfo
    data: Mapping[str, Any]
    time: float


Observer = Callable[[Event], None]


def redact(line: bytes | str) -> str:
    """A command line as a ``command`` event may carry it: the secret of ``PASS``,
    ``APOP`` and ``AUTH <mechanism>`` replaced by :data:`SECRET` (protocols call this
    before they publish; observers call it again, in case a path forgot)."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    keyword, _, argument = text.partition(" ")
    kept = _SECRET_ARGUMENTS.get(keyword.upper())
    if kept is None or not argument:
        return text
    words = argument.split()
    if len(words) <= kept:
        return text
    return " ".join([keyword, *words[:kept], SECRET])

class EventBus:
    """Synchronous publish/subscribe, by kind."""

    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        self._observers: dict[str, list[Observer]] = {kind: [] for kind in KINDS}
        self._failed: set[int] = set()
        self._ids = itertools.count(1)
        self._id_prefix = base64.b32encode(os.urandom(5)).decode("ascii")[:4]

    def new_session_id(self) -> str:
        """A short id, unique in this process and unlikely to repeat across restarts and
        nodes: four random base32 characters per bus, then a hexadecimal counter."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def subscribe(self, observer: Observer, kinds: Iterable[str] = KINDS) -> Callable[[], None]:
        """Call ``observer(event)`` for each event of ``kinds``; returns an unsubscribe."""
        kinds = tuple(kinds)
        for kind in kinds:
            self._observers[kind].append(observer)

        def unsubscribe() -> None:
            for kind in kinds:
                if observer in self._observers[kind]:
                    self._observers[kind].remove(observer)

        return unsubscribe

    def wants(self, kind: str) -> bool:
        return bool(self._observers[kind])

    def publish(self, kind: str, session: SessionInfo, **data: Any) -> None:
        observers = self._observers[kind]
        if not observers:
            return
        event = Event(kind, session, data, self._now())
        for observer in tuple(observers):
            try:
                observer(event)
            except Exception:
                if id(observer) not in self._failed:
                    self._failed.add(id(observer))
                    _log.failure("event observer {observer!r} failed", observer=observer)
