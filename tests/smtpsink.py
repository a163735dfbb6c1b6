"""A scripted SMTP server for relay tests: it plays the smarthost.

:class:`Sink` listens on 127.0.0.1 port 0 and answers from a script: a reply per
recipient (``rcpt``, default ``250``), a list of end-of-data replies used up one per
message (then ``250``), optional STARTTLS with a given certificate, optional AUTH PLAIN.
``greeting`` and ``interface`` script an MX host (a ``421`` greeting, its own loopback
address).  It keeps every message it accepted (sender, accepted recipients, the data as received,
dot-unstuffed, CRLF line ends) and every command line of every session, and notes
whether the client pipelined (``MAIL`` arrived with ``DATA`` already behind it).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from twisted.internet import endpoints, protocol, reactor
from twisted.protocols.basic import LineReceiver


@dataclass
class Accepted:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class Sink:
    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply line
    data_replies: list[str] = field(default_factory=list)  # one per message, then 250
    tls: object = None  # server TLS options: offer STARTTLS
    auth: tuple[str, str] | None = None  # require AUTH PLAIN with these
    pipelining: bool = True
    greeting: str = "220 sink.test ESMTP scripted"  # e.g. "421 4.3.2 busy": closes at once
    interface: str = "127.0.0.1"  # MX tests give each MX host its own loopback address
    messages: list[Accepted] = field(default_factory=list)
    sessions: list[list[str]] = field(default_factory=list)
    pipelined: list[bool] = field(default_factory=list)
    port: object = None

    def listen(self, port: int = 0):
        factory = protocol.Factory.forProtocol(lambda: _SinkSession(self))
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface=self.interface)
        d = endpoint.listen(factory)

        def listening(port):
            self.port = port
            return port.getHost().port

        return d.addCallback(listening)

    def stop(self):
        return self.port.stopListening()

    def delivered_to(self, address: str) -> list[Accepted]:
        return [m for m in self.messages if address in m.recipients]


class _SinkSession(LineReceiver):
    def __init__(self, sink: Sink):
        self.sink = sink
        self.commands: list[str] = []
        self.secure = False
        self.authenticated = False
        self.data: list[bytes] | None = None
        self.sender: str | None = None
        self.recipients: list[str] = []

    def connectionMade(self) -> None:
        self.sink.sessions.append(self.commands)
        self.sendLine(self.sink.greeting.encode())
        if not self.sink.greeting.startswith("220"):
            self.transport.loseConnection()

    def reply(self, text: str) -> None:
        self.transport.write(text.replace("\n", "\r\n").encode() + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            self.data_line(line)
            return
        text = line.decode("utf-8", "replace")
        self.commands.append(text)
        verb, _, argument = text.partition(" ")
        getattr(self, "do_" + verb.upper(), self.unknown)(argument)

    def unknown(self, argument: str) -> None:
        self.reply("500 5.5.2 unknown command")

    def do_EHLO(self, argument: str) -> None:
        lines = ["250-sink.test", "250-SIZE 100000000", "250-8BITMIME"]
        if self.sink.pipelining:
            lines.append("250-PIPELINING")
        if self.sink.tls is not None and not self.secure:
            lines.append("250-STARTTLS")
        if self.sink.auth is not None:
            lines.append("250-AUTH PLAIN")
        lines.append("250 ENHANCEDSTATUSCODES")
        self.reply("\n".join(lines))

    def do_STARTTLS(self, argument: str) -> None:
        self.reply("220 2.0.0 go ahead")
        self.transport.startTLS(self.sink.tls)
        self.secure = True

    def do_AUTH(self, argument: str) -> None:
        _, _, response = argument.partition(" ")
        _, user, password = base64.b64decode(response).split(b"\0")
        if (user.decode(), password.decode()) == self.sink.auth:
            self.authenticated = True
            self.reply("235 2.7.0 ok")
        else:
            self.reply("535 5.7.8 bad credentials")

    def do_MAIL(self, argument: str) -> None:
        self.sink.pipelined.append(b"DATA" in self._buffer)
        if self.sink.auth is not None and not self.authenticated:
            self.reply("530 5.7.0 authentication required")
            return
        self.sender = argument.split(":", 1)[1].split(">")[0].lstrip("<")
        self.recipients = []
        self.reply("250 2.1.0 ok")

    def do_RCPT(self, argument: str) -> None:
        address = argument.split(":", 1)[1].strip().strip("<>")
        answer = self.sink.rcpt.get(address, "250 2.1.5 ok")
        if answer.startswith("2"):
            self.recipients.append(address)
        self.reply(answer)

    def do_DATA(self, argument: str) -> None:
        if not self.recipients:
            self.reply("554 5.5.1 no valid recipients")
            return
        self.data = []
        self.reply("354 go ahead")

    def data_line(self, line: bytes) -> None:
        if line == b".":
            data, self.data = b"".join(self.data), None
            answer = self.sink.data_replies.pop(0) if self.sink.data_replies else "250 2.0.0 ok"
            if answer.startswith("2"):
                self.sink.messages.append(Accepted(self.sender, self.recipients, data))
            self.reply(answer)
            return
        self.data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")

    def do_RSET(self, argument: str) -> None:
        self.reply("250 2.0.0 ok")

    def do_QUIT(self, argument: str) -> None:
        self.reply("221 2.0.0 bye")
        self.transport.loseConnection()
