"""popgate's POP3 server: RFC 1939 with RFC 2449 (CAPA, response codes), RFC 2595 (STLS),
RFC 3206 (SYS and AUTH codes) and RFC 5034 (SASL AUTH, mechanism PLAIN).

A session walks through the three states of RFC 1939 §3: AUTHORIZATION (USER, PASS, APOP,
AUTH, STLS, CAPA, QUIT), TRANSACTION (STAT, LIST, RETR, DELE, NOOP, RSET, TOP, UIDL, CAPA,
QUIT) and UPDATE (QUIT after login: the marked messages are removed).  Each command is one
``do_<COMMAND>`` method; every error is a single ``-ERR`` line and the session goes on,
except that 10 consecutive errors (:data:`MAX_CONSECUTIVE_ERRORS`: a client that speaks
something else, or a fuzzer) and ``limits.auth_max_failures`` failed logins end it.

Wire format: command lines are at most 255 octets including CRLF (RFC 2449 §4); a longer
line is answered ``-ERR`` once its LF arrives and is never buffered whole (the excess is
discarded as it comes).  SASL client responses (RFC 5034 §4) may be up to
:data:`MAX_SASL_LINE` octets.  Multi-line replies are dot-stuffed and end with
``CRLF.CRLF`` (RFC 1939 §3).  Message bodies are read from the Maildir in
:attr:`POP3Server.block_size` blocks and converted (LF -> CRLF, dot-stuffing) by
:class:`~popgate.codec.DotEncoder`, so a message of any size never sits in memory; the
sizes in STAT, LIST and the RETR ``+OK`` are the CRLF octets of the message as sent,
before dot-stuffing, taken from the Maildir file name.

Authentication goes through a ``twisted.cred`` portal (:class:`twisted.cred.portal.Portal`)
with :class:`~popgate.pop3.realm.IMailbox` avatars; the realm takes the mailbox lock.  Login
timing follows :class:`~popgate.auth.penalty.AuthPenalty` (reactor timers, never a blocked
thread): an attempt from an address with earlier failures first waits out the address's
current delay, and only then is the password checked, so a guesser that hangs up early
costs no hashing and learns nothing from how fast an answer comes; a failure is answered
the address's new delay after the attempt began (2 s, 4 s, 8 s, ... with the defaults).
Plaintext mechanisms (USER/PASS, AUTH PLAIN) are refused and not advertised on a
connection that is neither TLS nor loopback unless ``tls.allow_plaintext_auth`` is set
(RFC 2595 §2.3, issue 5).

Flow control and concurrency: everything runs on the reactor thread; slow work (password
hashing, Maildir scans and updates) is done in threads by the checker and the realm, and
message files are read in bounded blocks, as ``twisted.protocols.basic.FileSender`` does.
The session registers itself with its transport as a streaming producer for its whole
life: when the client stops reading, a message stream pauses and no further command is
run, so a client that pipelines without reading gets no more replies queued; its input
waits in a buffer of at most :data:`MAX_PENDING_INPUT` octets, past which the session is
closed.  While a command is in progress (a login, a message stream, the UPDATE state)
the transport is paused and later pipelined commands wait, to run in order afterwards.

Timeouts (RFC 1939 §3): ``pop3.auth_timeout`` of inactivity before login,
``pop3.idle_timeout`` (at least 10 minutes) after it, and ``pop3.max_session_time`` in
total.  When one expires the connection is closed without a response and without entering
UPDATE, exactly as RFC 1939 §3 prescribes: nothing is deleted and the lock is released.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import os
import secrets
from collections.abc import Callable

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from zope.interface import implementer

from popgate import __version__
from popgate.auth.penalty import ChecksPerAddress
from popgate.auth.users import APOPCredentials, UsersUnavailable
from popgate.codec import DotEncoder
from popgate.limits import is_loopback
from popgate.loglimit import LogLimiter
from popgate.pop3.realm import IMailbox, NoSuchMessage
from popgate.smtp.delivery import storage_refusal
from popgate.store.maildir import MailboxLocked, MessageInfo

MAX_COMMAND_LINE = 255  # octets including CRLF, RFC 2449 §4
MAX_SASL_LINE = 2048  # a PLAIN response with a long name and a long password
MAX_CONSECUTIVE_ERRORS = 10
MAX_PENDING_INPUT = 256 * 1024  # pipelined input held while a command is in progress
BLOCK_SIZE = 64 * 1024
CLOSE_GRACE = 30.0  # seconds a closing connection may take to flush before it is cut

log = Logger()


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


_AUTHORIZATION = frozenset({State.AUTHORIZATION})
_TRANSACTION = frozenset({State.TRANSACTION})
_BOTH = _AUTHORIZATION | _TRANSACTION

# Command -> the states it is valid in (RFC 1939 §4-§7, RFC 2449 §5, RFC 2595 §4,
# RFC 5034 §4).  Anything else is an unknown command.
COMMANDS = {
    "USER": _AUTHORIZATION, "PASS": _AUTHORIZATION, "APOP": _AUTHORIZATION,
    "AUTH": _AUTHORIZATION, "STLS": _AUTHORIZATION,
    "CAPA": _BOTH, "QUIT": _BOTH,
    "STAT": _TRANSACTION, "LIST": _TRANSACTION, "RETR": _TRANSACTION,
    "DELE": _TRANSACTION, "NOOP": _TRANSACTION, "RSET": _TRANSACTION,
    "TOP": _TRANSACTION, "UIDL": _TRANSACTION,
}

_TOO_LONG = object()  # what the line reader returns for a discarded over-long line
_PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connection"


def host_of(address) -> str:
    """The client IP of an address; UNIX sockets and the like count as local."""
    return getattr(address, "host", None) or "local"


class _TopFilter:
    """Cuts a message after its header, the blank line and ``body_lines`` lines (TOP).

    Works block by block; only the first two bytes of the current line are remembered,
    to recognise the empty line (``LF`` or ``CRLF``) that ends the header.
    """

    def __init__(self, body_lines: int):
        self._in_header = True
        self._lines_left = body_lines
        self._line_start = b""

    def feed(self, block: bytes) -> tuple[bytes, bool]:
        """The part of ``block`` to send, and whether the cut has been reached."""
        position = 0
        while not self._cut_reached():
            newline = block.find(b"\n", position)
            if newline < 0:
                self._line_start = (self._line_start + block[position:position + 2])[:2]
                return block, False
            line_start = (self._line_start + block[position:min(newline, position + 2)])[:2]
            if self._in_header:
                self._in_header = line_start not in (b"", b"\r")
            else:
                self._lines_left -= 1
            self._line_start = b""
            position = newline + 1
        return block[:position], True

    def _cut_reached(self) -> bool:
        return not self._in_header and self._lines_left <= 0


class _MessageStream:
    """One message file on its way to the client, as dot-stuffed CRLF chunks."""

    def __init__(self, path: str, block_size: int, body_lines: int | None):
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        # Maildir messages never change once delivered: knowing the size lets the last
        # block carry the terminator, so a small message is a single write.
        self._remaining = os.fstat(self._file.fileno()).st_size
        self._block_size = block_size
        self._encoder = DotEncoder()
        self._top = _TopFilter(body_lines) if body_lines is not None else None
        self.done = False

    def next_chunk(self) -> bytes:
        """The next encoded chunk; the last one carries the terminating ``.CRLF``."""
        block = self._file.read(self._block_size)
        self._remaining -= len(block)
        finished = not block or self._remaining <= 0
        if self._top is not None:
            block, cut = self._top.feed(block)
            finished = finished or cut
        chunk = self._encoder.encode(block)
        if finished:
            self.done = True
            chunk += self._encoder.finish()
        return chunk

    def close(self) -> None:
        self._file.close()


@implementer(interfaces.IPushProducer)
class POP3Server(protocol.Protocol):
    """One POP3 session.  Built by :class:`POP3Factory`, which holds the settings."""

    block_size = BLOCK_SIZE

    def __init__(self, factory: POP3Factory, release: Callable[[], None]):
        self.factory = factory
        self._release_slot = release
        self._config = factory.config.pop3
        self._clock = factory.clock
        self.state = State.AUTHORIZATION
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, waiting for its LF
        self._processing = False
        self._busy = False  # a login, a delayed answer or the UPDATE state is in progress
        self._stream: _MessageStream | None = None
        self._retrieval: int | None = None  # the message number a RETR is sending
        self._output_paused = False
        self._reading = True
        self._closing = False
        self._disconnected = False
        self._close_reason = "client closed the connection"
        self._tls_started = False
        self._user_name: bytes | None = None
        self._sasl_mechanism: str | None = None
        self._apop_timestamp = b""
        self._errors = 0
        self._auth_failures = 0
        self._mailbox = None
        self._logout: Callable[[], None] | None = None
        self._update = None  # the Deferred of a commit in progress
        self._deleted_count = 0
        self._delayed = None
        self._idle_timer = None
        self._session_timer = None
        self._abort_timer = None

    # -- connection life ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self._set_no_delay()
        self.transport.registerProducer(self, True)
        self._idle_timer = self._clock.callLater(self._config.auth_timeout, self._timed_out,
                                                 "idle timeout")
        self._session_timer = self._clock.callLater(self._config.max_session_time,
                                                    self._timed_out, "session time limit")
        log.info("POP3 connection from {peer} ({tls})", peer=self._peer_host(),
                 tls=self._tls_label())
        greeting = b"+OK popgate ready."
        if self._config.apop:
            self._apop_timestamp = self.factory.apop_timestamp()
            greeting += b" " + self._apop_timestamp
        self._send(greeting)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._disconnected = self._closing = True
        for call in (self._idle_timer, self._session_timer, self._delayed, self._abort_timer):
            if call is not None and call.active():
                call.cancel()
        self._drop_stream()
        self._release_slot()
        if self._update is None:  # else the UPDATE under way logs out when it is done
            self._log_out()
        log.info("POP3 session from {peer} closed ({reason}): user={user} {tls} "
                 "retrieved={retrieved} deleted={deleted}", peer=self._peer_host(),
                 reason=self._close_reason, user=self._mailbox.user if self._mailbox else "-",
                 tls=self._tls_label(), deleted=self._deleted_count,
                 retrieved=self._mailbox.retrieved_count if self._mailbox else 0)

    def _set_no_delay(self) -> None:
        # Small replies to pipelined commands must not wait for Nagle's algorithm.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            with contextlib.suppress(OSError):  # not a TCP socket (UNIX socket)
                set_no_delay(True)

    def _close(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason
        self._drop_stream()
        # A registered producer would keep the transport open after loseConnection.
        self.transport.unregisterProducer()
        if not self._reading:
            # A TLS layer must read the peer's close_notify to finish closing.
            self.transport.resumeProducing()
        self.transport.loseConnection()
        # A peer that does not read would keep the connection (and its slot) forever.
        self._abort_timer = self._clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def _timed_out(self, reason: str) -> None:
        # RFC 1939 §3: close without a response and without entering UPDATE.
        self._close(reason)

    def _reset_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            timeout = (self._config.auth_timeout if self.state is State.AUTHORIZATION
                       else self._config.idle_timeout)
            self._idle_timer.reset(timeout)

    def _peer_host(self) -> str:
        # Asked each time, not cached: behind a PROXY-protocol listener the real peer is
        # known only once the header has been parsed.
        return host_of(self.transport.getPeer())

    def _secure(self) -> bool:
        return (self.factory.implicit_tls or self._tls_started
                or interfaces.ISSLTransport.providedBy(self.transport))

    def _tls_label(self) -> str:
        return "TLS" if self._secure() else "plaintext"

    def _plaintext_allowed(self) -> bool:
        return (self._secure() or is_loopback(self._peer_host())
                or self.factory.config.tls.allow_plaintext_auth)

    # -- IPushProducer: the transport's write buffer is full / has drained ---------------

    def pauseProducing(self) -> None:
        self._output_paused = True

    def resumeProducing(self) -> None:
        self._output_paused = False
        self._pump_stream()
        self._process_input()

    def stopProducing(self) -> None:
        self._drop_stream()

    # -- input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if len(self._buffer) > MAX_PENDING_INPUT:
            self._send(b"-ERR Too much pipelined input")
            self._close("too much pipelined input")
            return
        self._process_input()  # ends with _update_reading(): back-pressure if still full

    def _command_in_progress(self) -> bool:
        return self._busy or self._stream is not None

    def _can_process(self) -> bool:
        return not (self._command_in_progress() or self._output_paused or self._closing)

    def _process_input(self) -> None:
        """Run the complete lines in the buffer, in order, while nothing is in progress."""
        if self._processing:
            return  # an outer call on the stack continues the loop
        self._processing = True
        try:
            while self._can_process():
                line = self._next_line()
                if line is None:
                    break
                self._handle_line(line)
        finally:
            self._processing = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Stop reading while a command is in progress or half the input bound is used.

        A full output buffer alone does not stop reading: a TLS layer still handshaking
        pauses us and must read to finish.  A client that pipelines without reading our
        replies fills the input buffer instead, and reading stops at half of its bound
        (back-pressure); the session is closed only if one read overshoots the bound.
        """
        if self._closing:
            return
        want = (not self._command_in_progress()
                and len(self._buffer) < MAX_PENDING_INPUT // 2)
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def _line_limit(self) -> int:
        if self._sasl_mechanism is not None or bytes(self._buffer[:5]).upper() == b"AUTH ":
            return MAX_SASL_LINE
        return MAX_COMMAND_LINE

    def _next_line(self):
        """The next line without its line end, _TOO_LONG, or None if none is complete."""
        newline = self._buffer.find(b"\n")
        if self._discarding:
            if newline < 0:
                self._buffer.clear()
                return None
            del self._buffer[:newline + 1]
            self._discarding = False
            return _TOO_LONG
        limit = self._line_limit()
        if newline < 0:
            if len(self._buffer) >= limit:
                self._buffer.clear()
                self._discarding = True
            return None
        if newline + 1 > limit:
            del self._buffer[:newline + 1]
            return _TOO_LONG
        line = bytes(self._buffer[:newline])
        del self._buffer[:newline + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _handle_line(self, line) -> None:
        self._reset_idle_timer()
        try:
            if line is _TOO_LONG:
                self._sasl_mechanism = None
                self._fail(b"-ERR Line too long")
            elif self._sasl_mechanism is not None:
                self._sasl_response(line)
            else:
                self._command(line)
        except Exception:
            log.failure("POP3 internal error for {peer}", peer=self._peer_host())
            self._internal_error()

    def _command(self, line: bytes) -> None:
        keyword, _, argument = line.partition(b" ")
        name = keyword.upper().decode("ascii", "replace")
        states = COMMANDS.get(name)
        if states is None:
            self._fail(b"-ERR Unknown command")
        elif self.state not in states:
            self._wrong_state(name)
        else:
            getattr(self, "do_" + name)(argument)

    def _wrong_state(self, name: str) -> None:
        if self.state is State.TRANSACTION:
            self._fail(b"-ERR Already logged in: %s is not valid now" % name.encode())
        else:
            self._fail(b"-ERR Not logged in: %s is not valid before login" % name.encode())

    # -- output --------------------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def _ok(self, text: bytes = b"") -> None:
        self._errors = 0
        self._send(b"+OK " + text if text else b"+OK")

    def _fail(self, line: bytes) -> None:
        """A protocol error: answer it; end the session after too many in a row."""
        self._send(line)
        self._errors += 1
        if self._errors >= MAX_CONSECUTIVE_ERRORS:
            self._close("too many errors")

    def _multiline(self, first: bytes, lines: list[bytes]) -> None:
        # One write for the whole reply (lines never start with "." here).
        self._errors = 0
        self.transport.write(b"\r\n".join([first, *lines, b".\r\n"]))

    def _internal_error(self) -> None:
        if self._stream is not None or self._closing:
            self._close("internal error")
        else:
            self._send(b"-ERR [SYS/TEMP] internal error")

    # -- arguments -----------------------------------------------------------------------

    def _no_argument(self, argument: bytes) -> bool:
        if argument.strip():
            self._fail(b"-ERR This command takes no argument")
            return False
        return True

    def _numbers(self, argument: bytes, count: int) -> list[int] | None:
        """Exactly ``count`` decimal arguments, or None after answering -ERR."""
        words = argument.split()
        if len(words) != count or not all(w.isdigit() and len(w) <= 10 for w in words):
            self._fail(b"-ERR Syntax error: expected %d number(s)" % count)
            return None
        return [int(w) for w in words]

    def _message(self, number: int) -> MessageInfo | None:
        try:
            return self._mailbox.message(number)
        except NoSuchMessage as e:
            self._fail(b"-ERR " + str(e).encode("ascii"))
            return None

    def _message_argument(self, argument: bytes) -> tuple[int, MessageInfo] | None:
        numbers = self._numbers(argument, 1)
        if numbers is None:
            return None
        info = self._message(numbers[0])
        return None if info is None else (numbers[0], info)

    # -- AUTHORIZATION state: RFC 1939 §4, §7; RFC 5034; RFC 2595 ------------------------

    def do_CAPA(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._multiline(b"+OK Capability list follows",
                            [c.encode("ascii") for c in self.capabilities()])

    def capabilities(self) -> list[str]:
        """RFC 2449 §5: what is true for this connection in the current state."""
        capabilities = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._plaintext_allowed():
            capabilities += ["USER", "SASL PLAIN"]
        if self._stls_available():
            capabilities.append("STLS")
        capabilities.append(f"IMPLEMENTATION popgate {__version__}")
        return capabilities

    def _stls_available(self) -> bool:
        return (self.factory.tls is not None and not self._secure()
                and self.state is State.AUTHORIZATION)

    def do_USER(self, argument: bytes) -> None:
        if not self._plaintext_allowed():
            self._fail(_PLAINTEXT_REFUSED)
            return
        name = argument.strip()
        if not name or b" " in name:
            self._fail(b"-ERR Syntax error: USER name")
            return
        self._user_name = name
        self._ok(b"Send your password")  # the same answer for every name: no enumeration

    def do_PASS(self, argument: bytes) -> None:
        if not self._plaintext_allowed():
            self._fail(_PLAINTEXT_REFUSED)
            return
        if self._user_name is None:
            self._fail(b"-ERR USER first")
            return
        # RFC 1939 §7: PASS has one argument, so spaces are part of the password.
        name, self._user_name = self._user_name, None
        self._login(UsernamePassword(name, argument), name, argument)

    def do_APOP(self, argument: bytes) -> None:
        if not self._config.apop:
            self._fail(b"-ERR APOP is not enabled")
            return
        words = argument.split()
        if len(words) != 2 or len(words[1]) != 32 or not _is_hex(words[1]):
            self._fail(b"-ERR Syntax error: APOP name digest")
            return
        name, digest = words
        self._user_name = None
        credentials = APOPCredentials(name.decode("utf-8", "replace"), self._apop_timestamp,
                                      digest)
        # The digest changes with every greeting: a client repeating a stale secret would
        # look like a new guess each time, so the penalty fingerprints the name only.
        self._login(credentials, name, b"APOP")

    def do_AUTH(self, argument: bytes) -> None:
        words = argument.split()
        if not words:
            # Not in RFC 5034 but widely probed (Outlook, Thunderbird): list mechanisms.
            mechanisms = [b"PLAIN"] if self._plaintext_allowed() else []
            self._multiline(b"+OK Supported mechanisms", mechanisms)
            return
        if len(words) > 2:
            self._fail(b"-ERR Syntax error: AUTH mechanism [initial-response]")
            return
        if words[0].upper() != b"PLAIN":
            self._fail(b"-ERR Unsupported authentication mechanism")
            return
        if not self._plaintext_allowed():
            self._fail(_PLAINTEXT_REFUSED)
            return
        self._user_name = None
        if len(words) == 2:
            self._sasl_plain(words[1])
        else:
            self._sasl_mechanism = "PLAIN"
            self._send(b"+ ")  # an empty challenge (RFC 5034 §4)

    def _sasl_response(self, line: bytes) -> None:
        self._sasl_mechanism = None
        if line.strip() == b"*":
            self._fail(b"-ERR Authentication cancelled")  # RFC 5034 §4
        else:
            self._sasl_plain(line.strip())

    def _sasl_plain(self, encoded: bytes) -> None:
        """RFC 4616: base64 of ``authzid NUL authcid NUL passwd``; ``=`` is empty (RFC 5034)."""
        try:
            message = b"" if encoded == b"=" else base64.b64decode(encoded, validate=True)
        except binascii.Error:
            self._fail(b"-ERR Invalid base64 in the PLAIN response")
            return
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._fail(b"-ERR Malformed PLAIN response")
            return
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            self._send(b"-ERR [AUTH] Logging in as another user is not supported")
            return
        self._login(UsernamePassword(authcid, password), authcid, password)

    def do_STLS(self, argument: bytes) -> None:
        if not self._no_argument(argument):
            return
        if self._secure():
            self._fail(b"-ERR Already using TLS")
            return
        if self.factory.tls is None:
            self._fail(b"-ERR STLS is not available")
            return
        self._ok(b"Begin TLS negotiation")
        # RFC 2595 §4 / CVE-2011-0411: whatever the client sent after STLS, before the
        # handshake, is not trusted and is thrown away; so is what we knew of the client.
        self._buffer.clear()
        self._discarding = False
        self._user_name = None
        self._tls_started = True
        self.transport.startTLS(self.factory.tls)

    def do_QUIT(self, argument: bytes) -> None:
        if self.state is State.AUTHORIZATION:
            self._ok(b"popgate signing off")
            self._close("quit")
            return
        # RFC 1939 §6: QUIT in TRANSACTION enters UPDATE.
        self.state = State.UPDATE
        self._busy = True
        self._update = update = self._mailbox.commit()
        update.addCallbacks(self._updated, self._update_failed)
        update.addErrback(self._unexpected)

    def _updated(self, _) -> None:
        self._update = None
        self._deleted_count = self._mailbox.deleted_count
        self._log_out()
        if not self._disconnected:
            self._ok(b"popgate signing off (%d messages deleted)" % self._deleted_count)
            self._close("quit")

    def _update_failed(self, failure) -> None:
        self._update = None
        log.failure("POP3 UPDATE failed for {user}", failure, user=self._mailbox.user)
        self._log_out()
        if not self._disconnected:
            # RFC 1939 §6: -ERR if some deletions failed.
            self._send(b"-ERR [SYS/TEMP] Some messages could not be deleted")
            self._close("quit with errors")

    # -- logging in ----------------------------------------------------------------------

    def _login(self, credentials, name: bytes, secret: bytes) -> None:
        """Authenticate through the portal, once the address has served its penalty.

        The penalty is waited out *before* the password is checked: a guesser that hangs
        up without waiting for answers costs no hashing, and cannot tell a right guess
        from a wrong one by how fast the answer comes.
        """
        self._busy = True
        host = self._peer_host()
        started = self._clock.seconds()
        self._at(started + self.factory.penalty.delay(host, name), self._check_credentials,
                 credentials, started, host, name, secret)

    def _check_credentials(self, credentials, started, host, name, secret) -> None:
        self._delayed = None
        d = self.factory.password_checks.run(host, self._portal_login, credentials)
        d.addCallbacks(self._logged_in, self._login_failed,
                       errbackArgs=(started, host, name, secret))
        d.addErrback(self._unexpected)

    def _portal_login(self, credentials) -> defer.Deferred:
        if self._closing:
            return defer.succeed(None)  # gone while queued: nobody to check for
        return self.factory.portal.login(credentials, None, IMailbox)

    def _logged_in(self, result) -> None:
        if result is None:
            return  # the session closed before its turn came
        _, mailbox, logout = result
        if self._disconnected:
            logout()
            return
        self._mailbox, self._logout = mailbox, logout
        if not self._closing:  # else connectionLost logs out
            self._enter_transaction()

    def _enter_transaction(self) -> None:
        self.factory.penalty.succeeded(self._peer_host(), self._mailbox.user)
        self.state = State.TRANSACTION
        count, octets = self._mailbox.stat()
        self._ok(b"Logged in, %d messages (%d octets)" % (count, octets))
        self._reset_idle_timer()
        self._done()

    def _login_failed(self, failure, started, host, name, secret) -> None:
        if failure.check(UnauthorizedLogin):
            self.factory.penalty.failed(host, name, secret)
            self._auth_failures += 1
            self.factory.log_refusal(host, "authentication failed",
                                     name.decode("utf-8", "replace"))
            # The answer comes the (new) penalty delay after the attempt began.
            self._at(started + self.factory.penalty.delay(host, name), self._refuse_login)
        elif failure.check(MailboxLocked):
            self._at(started, self._answer,
                     b"-ERR [IN-USE] Mailbox is in use by another session")
        elif failure.check(UsersUnavailable):  # UserDB has logged why, at a bounded rate
            self._at(started, self._answer,
                     b"-ERR [SYS/TEMP] User database temporarily unavailable")
        else:
            if failure.check(OSError):  # an expected fault (a full disk): no traceback
                storage_refusal(failure.value, self.factory._log_limiter)
            else:
                log.failure("POP3 login failed for {peer}", failure, peer=host)
            # RFC 3206 §4: SYS/PERM when retrying will not help until an administrator acts.
            answer = (b"-ERR [SYS/PERM] Mailbox unavailable, please tell the administrator"
                      if failure.check(PermissionError)
                      else b"-ERR [SYS/TEMP] Mailbox temporarily unavailable")
            self._at(started, self._answer, answer)

    def _refuse_login(self) -> None:
        self._send(b"-ERR [AUTH] Authentication failed")
        if self._auth_failures >= self.factory.config.limits.auth_max_failures:
            self._close("too many authentication failures")
        else:
            self._done()

    def _at(self, when: float, step, *args) -> None:
        """Run the next ``step`` of a login at clock time ``when`` (now if that has passed);
        never once the session is closing."""
        if self._closing:
            return
        delay = when - self._clock.seconds()
        if delay > 0:
            self._delayed = self._clock.callLater(delay, step, *args)
        else:
            step(*args)

    def _answer(self, line: bytes) -> None:
        self._send(line)
        self._done()

    def _done(self) -> None:
        """The command in progress has been answered: go on with pipelined input."""
        self._busy = False
        self._delayed = None
        self._process_input()

    def _unexpected(self, failure) -> None:
        log.failure("POP3 internal error for {peer}", failure, peer=self._peer_host())
        if self.state is State.UPDATE:
            self._close("internal error")
        elif not self._closing:
            self._internal_error()
            self._done()

    def _log_out(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    # -- TRANSACTION state: RFC 1939 §5, §7 ----------------------------------------------

    def do_STAT(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._ok(b"%d %d" % self._mailbox.stat())

    def do_LIST(self, argument: bytes) -> None:
        if argument.strip():
            found = self._message_argument(argument)
            if found is not None:
                self._ok(b"%d %d" % (found[0], found[1].octets))
            return
        count, octets = self._mailbox.stat()
        self._multiline(b"+OK %d messages (%d octets)" % (count, octets),
                        [b"%d %d" % (n, info.octets) for n, info in self._mailbox.listing()])

    def do_UIDL(self, argument: bytes) -> None:
        if argument.strip():
            found = self._message_argument(argument)
            if found is not None:
                self._ok(b"%d %s" % (found[0], found[1].uidl.encode("ascii")))
            return
        self._multiline(b"+OK Unique-ID listing follows",
                        [b"%d %s" % (n, info.uidl.encode("ascii"))
                         for n, info in self._mailbox.listing()])

    def do_RETR(self, argument: bytes) -> None:
        found = self._message_argument(argument)
        if found is not None:
            number, info = found
            self._start_stream(number, info, b"+OK %d octets" % info.octets, None)

    def do_TOP(self, argument: bytes) -> None:
        numbers = self._numbers(argument, 2)
        if numbers is None:
            return
        number, body_lines = numbers
        info = self._message(number)
        if info is not None:
            self._start_stream(None, info, b"+OK Top of message follows", body_lines)

    def do_DELE(self, argument: bytes) -> None:
        found = self._message_argument(argument)
        if found is not None:
            self._mailbox.delete(found[0])
            self._ok(b"Message %d deleted" % found[0])

    def do_NOOP(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._ok()

    def do_RSET(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._mailbox.undelete_all()
            self._ok(b"Maildrop has %d messages (%d octets)" % self._mailbox.stat())

    # -- streaming a message -------------------------------------------------------------

    def _start_stream(self, retrieval: int | None, info: MessageInfo, status: bytes,
                      body_lines: int | None) -> None:
        """Send ``status`` and the message (RETR ``retrieval``, or TOP when None)."""
        stream = None
        try:
            stream = _MessageStream(info.path, self.block_size, body_lines)
            first = stream.next_chunk()
        except OSError as e:
            if stream is not None:
                stream.close()
            log.error("POP3 cannot read {path}: {error}", path=info.path, error=e)
            self._send(b"-ERR [SYS/TEMP] Message temporarily unavailable")
            return
        self._errors = 0
        self.transport.write(status + b"\r\n" + first)
        self._stream, self._retrieval = stream, retrieval
        if stream.done:
            self._finish_stream()
        else:
            self._pump_stream()

    def _pump_stream(self) -> None:
        """Write chunks until the message is sent or the transport asks us to pause."""
        while self._stream is not None and not self._output_paused and not self._closing:
            try:
                chunk = self._stream.next_chunk()
            except OSError as e:
                # Part of the reply is out already: only closing tells the client.
                log.error("POP3 read error while sending a message: {error}", error=e)
                self._close("read error while sending a message")
                return
            self._reset_idle_timer()
            self.transport.write(chunk)
            if self._stream is not None and self._stream.done:
                self._finish_stream()
        if self._stream is None:
            self._process_input()

    def _finish_stream(self) -> None:
        stream, self._stream = self._stream, None
        stream.close()
        if self._retrieval is not None:
            self._mailbox.retrieved(self._retrieval)

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def _is_hex(text: bytes) -> bool:
    return all(c in b"0123456789abcdefABCDEF" for c in text)


class _RefusedSession(protocol.Protocol):
    """Over a connection cap: one ``-ERR [SYS/TEMP]`` line, then close (issue 6)."""

    def __init__(self, reason: str):
        self.reason = reason

    def connectionMade(self) -> None:
        self.transport.write(b"-ERR [SYS/TEMP] " + self.reason.encode("ascii") + b"\r\n")
        self.transport.loseConnection()


class POP3Factory(protocol.Factory):
    """Builds POP3 sessions for one listener; counts them against the connection caps.

    ``tls`` is the STLS connection creator (None: no STLS); ``implicit_tls`` says the
    listener wraps every connection in TLS already (POP3S), so sessions are secure.
    """

    noisy = False  # ListenerService logs where it listens; no "Starting factory" lines

    def __init__(self, *, config, portal, clock, limiter, penalty, tls=None,
                 implicit_tls: bool = False, password_checks: ChecksPerAddress | None = None):
        self.config = config
        self.portal = portal
        self.clock = clock
        self.limiter = limiter
        self.penalty = penalty
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.hostname = config.hostname
        # Shared by the POP3 and POP3S listeners: the bound is per address, not per port.
        self.password_checks = password_checks or ChecksPerAddress()
        self._log_limiter = LogLimiter(clock)

    def buildProtocol(self, addr) -> protocol.Protocol:
        host = host_of(addr)
        refusal = self.limiter.acquire(host)
        if refusal is not None:
            self.log_refusal(host, refusal)
            return _RefusedSession(refusal)
        return POP3Server(self, release=lambda: self.limiter.release(host))

    def log_refusal(self, host: str, reason: str, user: str = "") -> None:
        """Log a refusal once per address and reason per minute (no log flooding)."""
        if self._log_limiter.allow((host, reason)):
            log.warn("POP3 refused {host}: {reason} {user}", host=host, reason=reason,
                     user=user)

    def apop_timestamp(self) -> bytes:
        """A new RFC 1939 §7 ``<pid.clock@hostname>`` timestamp, never repeated."""
        clock = f"{int(self.clock.seconds())}.{secrets.token_hex(8)}"
        return f"<{os.getpid()}.{clock}@{self.hostname}>".encode("ascii", "replace")

