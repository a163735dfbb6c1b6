"""One transcript fixture for both protocols: bytes in, bytes out, events seen.

A :class:`Connection` builds a session from a factory, as the reactor would, over a
:class:`WireTransport` (a ``StringTransport`` that records ``startTLS``, ``TCP_NODELAY``
and each write, and that can fill up like a socket's send buffer).  ``send`` feeds bytes
to the session and returns what it wrote since the last call; :class:`SMTPConnection`
splits that into SMTP replies.  :class:`EventRecorder` keeps what the session published
on its :class:`~popgate.events.EventBus`, the same bus the session log renders.

Time is a ``MemoryReactorClock`` (a ``task.Clock``); disk work runs through the
``run_in_thread`` stand-ins of :mod:`tests.fakes`.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from popgate.events import Event, EventBus
from popgate.observe.log import SessionLog


class WireTransport(StringTransport):
    """A StringTransport that records startTLS, TCP_NODELAY and each write.

    With a ``socket_buffer`` size it behaves like a socket whose send buffer fills: past
    that many unsent octets it pauses its producer; :meth:`Connection.drain` empties it.
    """

    def __init__(self, peer: str, port: int = 40000, socket_buffer: int | None = None):
        super().__init__(peerAddress=IPv4Address("TCP", peer, port))
        self.socket_buffer = socket_buffer
        self.unsent = 0
        self.tls_creator = None
        self.written_before_tls: bytes | None = None
        self.no_delay = None
        self.writes: list[bytes] = []

    def startTLS(self, creator) -> None:
        self.tls_creator = creator
        self.written_before_tls = self.value()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(data)
        self.unsent += len(data)
        full = self.socket_buffer is not None and self.unsent > self.socket_buffer
        if full and self.producer is not None:
            self.producer.pauseProducing()


class Connection:
    """One client connection to a session built by ``factory``: bytes in, bytes out."""

    def __init__(self, factory, host: str = "192.0.2.10", **transport_options):
        address = IPv4Address("TCP", host, 40000)
        self.transport = WireTransport(host, **transport_options)
        self.protocol = factory.buildProtocol(address)
        self.protocol.makeConnection(self.transport)
        self.dropped = False
        self.history = b""  # everything the session wrote, taken or not

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.take()

    def command(self, line: str) -> str:
        return self.send(line.encode() + b"\r\n").decode("utf-8", "replace")

    def take(self) -> bytes:
        """What the session wrote since the last call (the transport is emptied)."""
        value = self.transport.value()
        self.transport.clear()
        self.history += value
        return value

    @property
    def output(self) -> bytes:
        """Everything the session wrote so far."""
        return self.history + self.transport.value()

    def drain(self) -> bytes:
        """Let a paused stream run to its end, as a client reading everything would."""
        while self.protocol.output_full and not self.closed:
            self.transport.unsent = 0
            self.protocol.resumeProducing()
        return self.take()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def drop(self) -> None:
        """The connection goes away (what the reactor does after loseConnection, too)."""
        if not self.dropped:
            self.dropped = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


class SMTPConnection(Connection):
    """A connection whose output is read as SMTP replies."""

    def __init__(self, factory, host: str = "192.0.2.10", **transport_options):
        super().__init__(factory, host, **transport_options)
        self._partial = b""

    def send(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.replies()

    def command(self, line: str) -> list[str]:
        return self.send(line.encode() + b"\r\n")

    def replies(self) -> list[str]:
        """New complete replies; a multi-line reply is one item, its lines joined by LF."""
        self._partial += self.take()
        replies, current, consumed = [], [], 0
        lines = self._partial.split(b"\r\n")[:-1]
        for line in lines:
            current.append(line.decode("utf-8"))
            if line[3:4] != b"-":
                replies.append("\n".join(current))
                consumed += sum(len(part) + 2 for part in current)
                current = []
        self._partial = self._partial[consumed:]
        return replies

    disconnect = Connection.drop


class EventRecorder:
    """Subscribes to a bus and keeps every event, in order."""

    def __init__(self, bus: EventBus):
        self.events: list[Event] = []
        bus.subscribe(self.events.append)

    def of(self, kind: str, **match) -> list[Event]:
        return [e for e in self.events if e.kind == kind
                and all(e.data.get(k) == v for k, v in match.items())]


def observed_bus(clock) -> tuple[EventBus, EventRecorder]:
    """A bus as makeService builds it (the session log subscribed), and a recorder."""
    bus = EventBus(now=clock.seconds)
    SessionLog(clock).subscribe(bus)
    return bus, EventRecorder(bus)
