"""The skeleton every popgate session stands on: SMTP, LMTP and POP3 alike.

:class:`LineSession` owns what does not depend on the protocol:

* **who the peer is**: ``host:port`` (``local`` for a UNIX socket), fixed once the first
  input has arrived, because behind a ``haproxy:`` listener the PROXY header that names
  the real client is parsed before the first byte reaches us; the session id and the
  :class:`~popgate.events.SessionInfo` every event names;
* **the input loop**: input is consumed strictly in order, one protocol step at a time,
  while no reply is owed (:attr:`operation` is None), the output is not full and the
  session is not closing; a step started from inside the loop never re-enters it;
* **back-pressure and the input bound**: reading stops while input waits behind an owed
  reply, or once :attr:`max_backlog` octets wait unconsumed (behind a full output
  buffer, or behind message files still being opened); a single
  read that overshoots four times that bound closes the session (the peer ignored
  back-pressure), so a client that pipelines without reading cannot make the server
  buffer without bound;
* **the push producer**: the session is registered with its transport for its whole life;
  a full write buffer pauses it (:meth:`pauseProducing`) and stops the input loop;
* **closing**: :meth:`close` unregisters the producer, lets a paused TLS layer read the
  peer's close alert and cuts the connection after :data:`CLOSE_GRACE` seconds if the
  peer stops reading, so a closing session cannot hold its slot for ever;
* **the drain on shutdown**: every session is in its factory's :class:`SessionRegistry`;
  :meth:`SessionRegistry.drain` answers idle sessions with the protocol's goodbye
  (:meth:`LineSession.goodbye`: ``421`` / ``-ERR [SYS/TEMP]``, RFC 5321 §3.8) and closes
  them, lets the operations named in :attr:`LineSession.finish_on_shutdown` (a commit, a
  POP3 UPDATE) finish and be answered first, and cuts what is left after the drain time;
* **the connection caps**: :class:`SessionFactory` counts sessions in a
  :class:`~popgate.limits.ConnectionLimiter` and answers a connection over a cap with one
  protocol-specific line (:class:`RefusedConnection`), logged at a bounded rate.

A subclass provides the protocol: ``greet()``, ``receive(data)`` (buffer the bytes),
``backlog()`` (octets buffered and not consumed), ``step()`` (consume one unit; False when
more input is needed), ``overflow()`` (answer an over-full buffer), ``goodbye()`` (the
line that says the server is going away) and ``ended(reason)``.

Concurrency: reactor thread only.  Time comes from the factory's injected clock.
"""

from __future__ import annotations

import contextlib
import time

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from popgate.events import EventBus, SessionInfo
from popgate.loglimit import LogLimiter
from popgate.tls import tls_description

CLOSE_GRACE = 30.0  # seconds a closing session may take to flush its last replies
LOCAL_PEER = "local"  # the peer of a UNIX socket: local by construction

_log = Logger()


def host_of(address) -> str:
    """The client IP of an address; UNIX sockets and the like count as local."""
    return getattr(address, "host", None) or LOCAL_PEER


def describe_peer(address) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return LOCAL_PEER
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IPushProducer, IHandshakeListener)
class LineSession(protocol.Protocol):
    """One session of a line protocol; see the module docstring for the split of work."""

    max_backlog = 64 * 1024
    finish_on_shutdown: frozenset[str] = frozenset()  # operations a drain lets finish

    def __init__(self, factory: SessionFactory, slot_host: str):
        self.factory = factory
        self.clock = factory.clock
        self.events: EventBus = factory.events
        self.info = SessionInfo(factory.events.new_session_id(), factory.protocol_name, "?",
                                started=time.time())
        self._slot_host = slot_host  # what the connection cap counted (the TCP peer)
        self.operation: str | None = None  # what owes a reply: "login", "commit", ...
        self.started_at = factory.clock.seconds()
        self.closing = False
        self.draining = False
        self.close_reason = "client closed the connection"
        self._peer_final = False
        self._processing = False
        self._output_full = False
        self._reading_paused = False
        self._close_timer = None

    # -- the connection ----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            # A reply that follows a thread hop (a login, a commit) must not wait for the
            # client's delayed ACK of the previous one (Nagle); Twisted already coalesces
            # the replies written in one reactor turn into one segment.
            with contextlib.suppress(OSError):  # not a TCP socket (UNIX socket)
                no_delay(True)
        self.info.client = describe_peer(self.transport.getPeer())
        self.events.publish("connected", self.info, tls=self.factory.implicit_tls)
        self.greet()
        self.factory.sessions.add(self)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: a TLS handshake (implicit, STARTTLS or STLS) finished."""
        description = tls_description(self.transport) or "TLS"
        self.tls_started(description)
        version, _, cipher = description.partition(" ")
        self.events.publish("tls", self.info, version=version, cipher=cipher)

    def tls_started(self, description: str) -> None:
        """Note the TLS in use (``"TLSv1.3 TLS_AES_256_GCM_SHA384"``)."""

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.closing = True
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self.factory.limiter.release(self._slot_host)
        self.ended(self.close_reason)
        self.factory.sessions.remove(self)

    @property
    def client_host(self) -> str:
        """The client's IP (the PROXY header's, once known), or ``local``."""
        self._fix_peer()
        return self.info.client_host

    def _fix_peer(self) -> None:
        if not self._peer_final:
            self.info.client = describe_peer(self.transport.getPeer())

    def close(self, reason: str) -> None:
        """Close once the replies written so far are flushed; cut after the grace."""
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        # A registered producer keeps the transport from closing (FileDescriptor docs).
        self.transport.unregisterProducer()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # a TLS close needs to read the peer's alert
        self.transport.loseConnection()
        self._close_timer = self.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    # -- input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if not self._peer_final:
            self._fix_peer()  # a PROXY header, if any, is behind us now
            self._peer_final = True
        self.receive(data)
        if self.backlog() > 4 * self.max_backlog:
            self.overflow()
            return
        self.process_input()

    def process_input(self) -> None:
        """Consume buffered input in order until it runs out or a reply is owed."""
        if self._processing:
            return  # re-entered from a reply that fired synchronously: the loop goes on
        self._processing = True
        try:
            while (self.backlog() and self.operation is None and not self._output_full
                   and not self.closing):
                if not self.step():
                    break
        finally:
            self._processing = False
        self.input_consumed()
        self.update_reading()

    def publish_login(self, attempt, result: str, user: str | None = None) -> None:
        """A ``login`` event for an :class:`~popgate.auth.login.LoginAttempt`: the user
        (as given, or the normalised name on success), the mechanism; never the secret."""
        self.events.publish("login", self.info, user=user or attempt.name.decode(
            "utf-8", "replace"), mechanism=attempt.mechanism, result=result)

    def begin_operation(self, name: str) -> None:
        """A reply is owed (a login, a commit): no further input is consumed until
        :meth:`end_operation`."""
        self.operation = name

    def end_operation(self) -> None:
        """The owed reply is written: go on with pipelined input (or, in a drain, close)."""
        self.operation = None
        if self.draining:
            self._leave()
            return
        self.process_input()

    def shutdown(self) -> None:
        """The server is stopping: say goodbye now, or once the operation in progress (if
        it is one of :attr:`finish_on_shutdown`) has been answered."""
        self.draining = True
        if self.operation not in self.finish_on_shutdown:
            self._leave()

    def _leave(self) -> None:
        if not self.closing:
            self.goodbye()
            self.close("server shutdown")

    def cut(self, reason: str) -> None:
        """Drop the connection now, whatever it was doing."""
        self.close_reason = reason
        self.closing = True
        self.transport.abortConnection()

    def update_reading(self) -> None:
        """Stop reading the transport while input waits behind an owed reply, or once
        :attr:`max_backlog` octets wait unconsumed (behind a full output buffer, or behind
        message files still being opened).

        Reading stops only once input actually waits (most waits end with nothing behind
        them, and each pause costs two system calls).  A full output buffer alone does not
        stop reading: under TLS the greeting waits in the TLS layer until the handshake,
        which needs the transport to keep reading.
        """
        if self.closing:
            return
        backlog = self.backlog()
        pause = ((self.operation is not None and backlog > 0)
                 or backlog >= self.max_backlog)
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # -- IPushProducer: the transport's write buffer is full / drained ------------------

    def pauseProducing(self) -> None:
        self._output_full = True

    def resumeProducing(self) -> None:
        self._output_full = False
        self.output_resumed()
        self.process_input()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the cleaning up."""

    @property
    def output_full(self) -> bool:
        return self._output_full

    # -- for subclasses ------------------------------------------------------------------

    def output_resumed(self) -> None:
        """The write buffer drained: a streaming reply may go on."""

    def input_consumed(self) -> None:
        """The input loop stopped: a chance to drop consumed bytes from the buffer."""

    def greet(self) -> None:
        raise NotImplementedError

    def receive(self, data: bytes) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def overflow(self) -> None:
        raise NotImplementedError

    def goodbye(self) -> None:
        raise NotImplementedError

    def ended(self, reason: str) -> None:
        raise NotImplementedError


class SessionRegistry:
    """The open sessions of a process (every listener's), for a drain on shutdown."""

    def __init__(self, clock):
        self._clock = clock
        self._sessions: set[LineSession] = set()
        self._drained: list[defer.Deferred] = []
        self.draining = False

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: LineSession) -> None:
        self._sessions.add(session)
        if self.draining:
            session.shutdown()  # connected in the last moments before listening stopped

    def remove(self, session: LineSession) -> None:
        self._sessions.discard(session)
        if self.draining and not self._sessions:
            self._done()

    def drain(self, timeout: float) -> defer.Deferred:
        """Shut every session down; fires once all have ended, or ``timeout`` seconds
        later, when those left are cut."""
        self.draining = True
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        for session in list(self._sessions):
            session.shutdown()
        if not self._sessions:
            self._done()
            return d
        timer = self._clock.callLater(timeout, self._cut)
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d

    def _cut(self) -> None:
        for session in list(self._sessions):
            session.cut("server shutdown: drain time exceeded")
        self._done()

    def _done(self) -> None:
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)


class RefusedConnection(protocol.Protocol):
    """Over a connection cap: one line saying why (SMTP ``421``, POP3 ``-ERR``), then close."""

    def __init__(self, line: bytes):
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()


class SessionFactory(protocol.Factory):
    """Builds sessions for one listener and counts them against the connection caps.

    ``implicit_tls`` says the listener wraps every connection in TLS already (SMTPS,
    POP3S), so its sessions are secure from the first byte.
    """

    noisy = False  # ListenerService logs where it listens; no "Starting factory" lines
    session_class: type[LineSession]
    protocol_name: str  # "SMTP", "LMTP", "POP3": what events and log lines call it

    def __init__(self, *, config, clock, limiter, events: EventBus, tls=None,
                 implicit_tls: bool = False, sessions: SessionRegistry | None = None):
        self.config = config
        self.sessions = sessions if sessions is not None else SessionRegistry(clock)
        self.hostname = config.hostname
        self.clock = clock
        self.limiter = limiter
        self.events = events
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.refusal_log = LogLimiter(clock)

    def buildProtocol(self, addr) -> protocol.Protocol:
        host = host_of(addr)
        reason = self.limiter.acquire(host)
        if reason is None:
            return self.session_class(self, host)
        if self.refusal_log.allow((host, reason)):
            _log.warn("{proto} refused connection from {host}: {reason}",
                      proto=self.protocol_name, host=host, reason=reason)
        info = SessionInfo(self.events.new_session_id(), self.protocol_name,
                           describe_peer(addr))
        line = self.refusal_line(reason)
        self.events.publish("refused", info, reason=reason, reply=line.decode().rstrip())
        return RefusedConnection(line)

    def refusal_line(self, reason: str) -> bytes:
        raise NotImplementedError
