"""The smarthost client: one SMTP session that hands one queued message over.

Why not ``twisted.mail.smtp.ESMTPSenderFactory``: the queue needs each recipient's own
answer (a ``550`` bounces that recipient, a ``451`` keeps it queued, a ``250`` is never
sent again), and Twisted's sender fails the whole message with one
``SMTPDeliveryError("No recipients accepted")`` when no recipient was accepted, losing
which answers were temporary and which permanent (tests/test_relay.py shows it); it also
retries connections itself (the runner owns retries) and does not pipeline.  What it
does well (reading multi-line replies, ``startTLS``) is a few lines here.

One session (:func:`deliver`):

1. connect (``connect_timeout``), read the ``220`` greeting, ``EHLO``;
2. ``STARTTLS`` when ``tls`` is ``"required"`` (a smarthost that does not offer it is a
   temporary failure) or ``"opportunistic"`` and offered; the certificate is checked
   with ``service-identity`` against the configured host name, against ``trust_root``
   (a private CA) or the system's CAs; then ``EHLO`` again (RFC 3207 §4.2);
3. ``AUTH PLAIN`` when a user is configured (only under TLS or to loopback);
4. ``MAIL``, every ``RCPT`` and ``DATA``, in one write when the smarthost offers
   PIPELINING (RFC 2920), else one at a time; the message (LF line ends as queued) is
   sent with CRLF and dot-stuffed (RFC 5321 §4.5.2);
5. ``QUIT``.

The Deferred fires with ``{recipient: (code, "code text")}``: the ``RCPT`` refusal for a
refused recipient, the end-of-data answer for an accepted one (or ``MAIL``'s or
``DATA``'s refusal, for every recipient it concerns).  Anything that ends the session
before that (no connection, a bad certificate, a ``4xx``/``5xx`` greeting, a failed
AUTH, a timeout) fails it with :class:`SmarthostError`, which the runner treats as
temporary for every recipient: a misconfigured relay must not bounce the users' mail.
Every reply has :data:`REPLY_TIMEOUT` seconds, the end of data
:data:`END_OF_DATA_TIMEOUT`.  Reactor thread only.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from popgate.codec import DotEncoder

REPLY_TIMEOUT = 300.0  # RFC 5321 §4.5.3.2: the longest a client waits for most replies
END_OF_DATA_TIMEOUT = 600.0  # RFC 5321 §4.5.3.2.6
CONNECT_TIMEOUT = 30.0
QUIT_GRACE = 10.0  # seconds the smarthost has to close the connection after QUIT
MAX_REPLY_LINES = 100

log = Logger()


class SmarthostError(Exception):
    """The session ended before the message's fate was known: retry later."""


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int
    tls: str = "required"  # "required" | "opportunistic" | "none"
    trust_root: bytes | None = None  # PEM of a private CA
    user: str = ""
    password: bytes = b""
    helo: str = "localhost"
    address: str = ""  # the IP address to connect to ("" = look ``host`` up)
    verify: bool = True  # False: check the certificate and log the result, never refuse

    def tls_options(self):
        root = (ssl.Certificate.loadPEM(self.trust_root) if self.trust_root
                else ssl.platformTrust())
        if not self.verify:
            return UncheckedTLS(self.host, root)
        return ssl.optionsForClientTLS(self.host, trustRoot=root)


@implementer(IOpenSSLClientConnectionCreator)
class UncheckedTLS:
    """Client TLS that checks the chain (against ``trust_root``) and the host name, but
    only records the outcome (:meth:`verified`): opportunistic TLS to MX hosts, where
    encryption without authentication still beats plaintext (RFC 7435 §1.3).  One
    instance per connection."""

    def __init__(self, hostname: str, trust_root):
        self.hostname = hostname
        self._context = ssl.CertificateOptions(trustRoot=trust_root).getContext()
        self._context.set_verify(SSL.VERIFY_PEER, self._check_chain)
        self._chain_ok = True
        self.connection: SSL.Connection | None = None

    def _check_chain(self, connection, certificate, errno, depth, ok) -> bool:
        if not ok:
            self._chain_ok = False
        return True  # go on: the result is only recorded

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        connection.set_connect_state()
        connection.set_tlsext_host_name(self.hostname.encode("idna"))
        self.connection = connection
        return connection

    def verified(self) -> bool:
        if not self._chain_ok:
            return False
        try:
            verify_hostname(self.connection, self.hostname)
        except (VerificationError, CertificateError):
            return False
        return True


Results = dict[str, tuple[int, str]]


class _Session(LineOnlyReceiver):
    """One session; see the module docstring.  ``self.done`` fires once."""

    MAX_LENGTH = 4096

    def __init__(self, smarthost: Smarthost, sender: str, recipients: list[str],
                 message: bytes, clock):
        self.smarthost = smarthost
        self.sender = sender
        self.recipients = recipients
        self.message = message
        self.clock = clock
        self.done: defer.Deferred = defer.Deferred()
        self.results: Results = {}
        self._lines: list[str] = []
        self._expect: deque = deque()  # what each awaited reply goes to, in order
        self._unsent: deque[bytes] = deque()  # commands waiting for a reply (no PIPELINING)
        self._extensions: dict[str, str] = {}
        self._secure = False
        self._tls = None  # the connection creator, once STARTTLS started
        self._accepted: list[str] = []
        self._mail_refusal: tuple[int, str] | None = None
        self._timer = None
        self._complete = False

    # -- the connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._await(self._greeting)

    def connectionLost(self, reason) -> None:
        self._stop_timer()
        if self._complete and not self.done.called:
            self.done.callback(self.results)
        self._fail(f"connection lost: {reason.getErrorMessage()}")

    def _fail(self, why: str) -> None:
        if not self.done.called:
            self.done.errback(SmarthostError(why))
        if self.transport is not None and self.transport.connected:
            self.transport.abortConnection()

    def _finish(self) -> None:
        """Every answer is in: QUIT, and report once the connection is closed (so that
        nothing of the session outlives its result)."""
        self._complete = True
        self.sendLine(b"QUIT")
        self._stop_timer()
        self.transport.loseConnection()
        self._timer = self.clock.callLater(QUIT_GRACE, self.transport.abortConnection)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _await(self, handler, timeout: float = REPLY_TIMEOUT) -> None:
        """Send the next reply to ``handler``; the reply at the head of the line has
        its ``timeout`` (the timer starts when it becomes the one awaited)."""
        self._expect.append((handler, timeout))
        if self._timer is None:
            self._timer = self.clock.callLater(timeout, self._fail, "timeout")

    # -- replies -------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._fail(f"malformed reply {text[:100]!r}")
            return
        self._lines.append(text)
        if text[3:4] == "-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._fail("reply too long")
            return
        lines, self._lines = self._lines, []
        code = int(text[:3])
        if not self._expect:
            self._fail(f"unexpected reply {text[:100]!r}")
            return
        self._stop_timer()
        handler, _ = self._expect.popleft()
        if self._expect:
            self._timer = self.clock.callLater(self._expect[0][1], self._fail, "timeout")
        handler(code, [line[4:] for line in lines])

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail("reply line too long")

    @staticmethod
    def _text(code: int, lines: list[str]) -> str:
        return f"{code} {' '.join(lines)}".strip()

    # -- greeting, TLS, AUTH -------------------------------------------------------------

    def _greeting(self, code: int, lines: list[str]) -> None:
        if code != 220:
            self._fail(f"greeting: {self._text(code, lines)}")
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self.sendLine(b"EHLO " + self.smarthost.helo.encode("ascii"))
        self._await(self._ehlo_reply)

    def _ehlo_reply(self, code: int, lines: list[str]) -> None:
        if code != 250:
            self._fail(f"EHLO: {self._text(code, lines)}")
            return
        if self._secure:
            self._log_tls()
        self._extensions = {}
        for line in lines[1:]:
            keyword, _, value = line.partition(" ")
            self._extensions[keyword.upper()] = value
        tls = self.smarthost.tls
        if not self._secure and tls != "none":
            if "STARTTLS" in self._extensions:
                self.sendLine(b"STARTTLS")
                self._await(self._starttls_reply)
                return
            if tls == "required":
                self._fail(f"{self.smarthost.host} does not offer STARTTLS (TLS required)")
                return
        self._authenticate()

    def _starttls_reply(self, code: int, lines: list[str]) -> None:
        if code != 220:
            self._fail(f"STARTTLS: {self._text(code, lines)}")
            return
        self._tls = self.smarthost.tls_options()
        self.transport.startTLS(self._tls)
        self._secure = True
        self._ehlo()  # RFC 3207 §4.2: everything learnt before TLS is forgotten

    def _log_tls(self) -> None:
        """The handshake is over (the EHLO reply came through it): say how it went."""
        if isinstance(self._tls, UncheckedTLS):
            log.info("{host} [{address}]: {version}, certificate {verified}",
                     host=self.smarthost.host, address=self.smarthost.address,
                     version=self._tls.connection.get_protocol_version_name(),
                     verified="verified" if self._tls.verified() else "NOT verified")

    def _authenticate(self) -> None:
        if not self.smarthost.user:
            self._send_envelope()
            return
        mechanisms = self._extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms:
            self._fail("the smarthost does not offer AUTH PLAIN")
            return
        response = b"\0" + self.smarthost.user.encode("utf-8") + b"\0" + self.smarthost.password
        self.sendLine(b"AUTH PLAIN " + base64.b64encode(response))
        self._await(self._auth_reply)

    def _auth_reply(self, code: int, lines: list[str]) -> None:
        if code != 235:
            self._fail(f"AUTH: {self._text(code, lines)}")
            return
        self._send_envelope()

    # -- the envelope and the message ----------------------------------------------------

    def _send_envelope(self) -> None:
        mail = f"MAIL FROM:<{self.sender}>"
        if "8BITMIME" in self._extensions and not self.message.isascii():
            mail += " BODY=8BITMIME"
        if "SMTPUTF8" in self._extensions and not (self.sender + "".join(
                self.recipients)).isascii():
            mail += " SMTPUTF8"
        commands = [(mail, self._mail_reply)]
        commands += [(f"RCPT TO:<{r}>", self._rcpt_reply(r)) for r in self.recipients]
        commands.append(("DATA", self._data_reply))
        pipelining = "PIPELINING" in self._extensions
        for command, handler in commands:
            self._await(handler)
            self._unsent.append(command.encode("utf-8") + b"\r\n")
        if pipelining:
            self.transport.write(b"".join(self._unsent))  # RFC 2920 §3.1: one write
            self._unsent.clear()
        else:
            self.transport.write(self._unsent.popleft())

    def _next_command(self) -> None:
        if self._unsent:
            self.transport.write(self._unsent.popleft())

    def _mail_reply(self, code: int, lines: list[str]) -> None:
        if code // 100 != 2:
            self._mail_refusal = (code, self._text(code, lines))
        self._next_command()

    def _rcpt_reply(self, recipient: str):
        def handle(code: int, lines: list[str]) -> None:
            if self._mail_refusal is not None:
                self.results[recipient] = self._mail_refusal
            elif code // 100 == 2:
                self._accepted.append(recipient)
            else:
                self.results[recipient] = (code, self._text(code, lines))
            self._next_command()
        return handle

    def _data_reply(self, code: int, lines: list[str]) -> None:
        if code == 354 and not self._accepted:
            # Pipelined DATA accepted with no recipient: send an empty message to end it.
            self.transport.write(b".\r\n")
            self._await(lambda code, lines: self._finish())
            return
        if code != 354:
            for recipient in self._accepted:
                self.results[recipient] = (code, self._text(code, lines))
            self._finish()
            return
        encoder = DotEncoder()
        self.transport.write(encoder.encode(self.message) + encoder.finish())
        self._await(self._end_of_data_reply, END_OF_DATA_TIMEOUT)

    def _end_of_data_reply(self, code: int, lines: list[str]) -> None:
        for recipient in self._accepted:
            self.results[recipient] = (code, self._text(code, lines))
        self._finish()


class _OneSession(Factory):
    """connectProtocol's factory, without a "Starting factory" log line per message."""

    noisy = False

    def __init__(self, session: _Session):
        self.session = session

    def buildProtocol(self, addr) -> _Session:
        return self.session


def deliver(reactor, smarthost: Smarthost, sender: str, recipients: list[str],
            message: bytes) -> defer.Deferred:
    """One session with the smarthost; fires with the results (see the module docstring)
    or fails with :class:`SmarthostError`."""
    endpoint = endpoints.HostnameEndpoint(reactor, smarthost.address or smarthost.host,
                                          smarthost.port, timeout=CONNECT_TIMEOUT)
    session = _Session(smarthost, sender, recipients, message, reactor)
    connecting = endpoint.connect(_OneSession(session))

    def not_connected(failure):
        raise SmarthostError(f"cannot connect to {smarthost.host}:{smarthost.port}: "
                             f"{failure.getErrorMessage()}")

    connecting.addErrback(not_connected)
    return connecting.addCallback(lambda _: session.done)

