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
``CRLF.CRLF`` (RFC 1939 §3).  Message bodies are read from the maildrop's stream in
:attr:`POP3Server.block_size` blocks and converted (LF -> CRLF, dot-stuffing) by
:class:`~popgate.codec.DotEncoder`, so a message of any size never sits in memory; the
sizes in STAT, LIST and the RETR ``+OK`` are the CRLF octets of the message as sent,
before dot-stuffing, as the realm reports them.

Mail is reached only through the realm's :class:`~popgate.pop3.realm.IMaildrop`; logins
only through the shared :class:`~popgate.auth.login.Authenticator` (penalty delays, the
bound per address, the portal) and :mod:`popgate.auth.sasl`.  Plaintext mechanisms
(USER/PASS, AUTH PLAIN) are refused and not advertised on a connection that is neither
TLS nor loopback unless ``tls.allow_plaintext_auth`` is set (RFC 2595 §2.3).

Flow control: the input loop, back-pressure, the push producer and closing come from
:mod:`popgate.lineproto`.  A login, a message stream and the UPDATE state are the
session's *operation*: while one is in progress, later pipelined commands wait, to run in
order afterwards; a stream pauses while the client does not read.

Everything the session does is published on the :class:`~popgate.events.EventBus`, with
secrets (PASS, APOP digests, SASL responses) replaced by ``********`` before publishing.

Timeouts (RFC 1939 §3): ``pop3.auth_timeout`` of inactivity before login,
``pop3.idle_timeout`` (at least 10 minutes) after it, and ``pop3.max_session_time`` in
total.  When one expires the connection is closed without a response and without entering
UPDATE, exactly as RFC 1939 §3 prescribes: nothing is deleted and the lock is released.
"""

from __future__ import annotations

import base64
import enum
import io
import os
import secrets
from collections.abc import Callable
from typing import BinaryIO

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, interfaces
from twisted.logger import Logger

from popgate import __version__
from popgate.auth import sasl
from popgate.auth.login import Authenticator, LoginAttempt, LoginFailed, plaintext_allowed
from popgate.auth.users import APOPCredentials, UsersUnavailable
from popgate.codec import DotEncoder, header_summary
from popgate.events import SECRET, redact
from popgate.lineproto import LineSession, SessionFactory
from popgate.loglimit import log_storage_error
from popgate.pop3.realm import IMaildrop, MailboxInUse, NoSuchMessage

MAX_COMMAND_LINE = 255  # octets including CRLF, RFC 2449 §4
MAX_SASL_LINE = 2048  # a PLAIN response with a long name and a long password
MAX_CONSECUTIVE_ERRORS = 10
BLOCK_SIZE = 64 * 1024

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

    def __init__(self, file: BinaryIO, block_size: int, body_lines: int | None):
        self._file = file
        # Stored messages never change once delivered: knowing the size lets the last
        # block carry the terminator, so a small message is a single write.  Any seekable
        # binary stream will do (IMaildrop.open), not only an OS file.
        self._remaining = file.seek(0, io.SEEK_END)
        file.seek(0)
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



class POP3Server(LineSession):
    """One POP3 session.  Built by :class:`POP3Factory`, which holds the settings."""

    block_size = BLOCK_SIZE
    # Deletions under way, and a message being sent, are finished and answered first.
    finish_on_shutdown = frozenset({"update", "retr"})

    def __init__(self, factory: POP3Factory, slot_host: str):
        super().__init__(factory, slot_host)
        self._config = factory.config.pop3
        self.state = State.AUTHORIZATION
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, waiting for its LF
        self._stream: _MessageStream | None = None
        self._retrieval: int | None = None  # the message number a RETR is sending
        self._tls_started = False
        self.disconnected = False
        self._user_name: bytes | None = None
        self._sasl: sasl.Exchange | None = None
        self._apop_timestamp = b""
        self._errors = 0
        self._auth_failures = 0
        self._maildrop = None
        self._logout: Callable[[], None] | None = None
        self._login: defer.Deferred | None = None
        self._update: defer.Deferred | None = None  # the UPDATE in progress
        self._removed = (0, 0)  # messages and octets the UPDATE state removed
        self._marked = (0, 0)  # ... and those it set out to remove
        self._idle_timer = None
        self._session_timer = None

    # -- connection life ---------------------------------------------------------------

    def greet(self) -> None:
        self._idle_timer = self.clock.callLater(self._config.auth_timeout, self._timed_out,
                                                "idle timeout")
        self._session_timer = self.clock.callLater(self._config.max_session_time,
                                                   self._timed_out, "session time limit")
        greeting = b"+OK popgate ready."
        if self._config.apop:
            self._apop_timestamp = self.factory.apop_timestamp()
            greeting += b" " + self._apop_timestamp
        self._send(greeting)
        self._publish_state()

    def ended(self, reason: str) -> None:
        self.disconnected = True
        for call in (self._idle_timer, self._session_timer):
            if call is not None and call.active():
                call.cancel()
        if self._login is not None:
            self._login.cancel()
        self._drop_stream()
        removed = self._removed
        if self._update is not None:
            # The UPDATE under way logs out when it is done; the session's end is logged
            # now (the process may stop first), with what that UPDATE is removing.
            removed = self._marked
        else:
            self._log_out()
        maildrop = self._maildrop
        self.events.publish(
            "closed", self.info, reason=reason, user=maildrop.user if maildrop else None,
            duration=self.clock.seconds() - self.started_at,
            retrieved=maildrop.retrieved_count if maildrop else 0,
            retrieved_octets=maildrop.retrieved_octets if maildrop else 0,
            deleted=removed[0], deleted_octets=removed[1], tls=self._tls_label())

    def close(self, reason: str) -> None:
        self._drop_stream()
        super().close(reason)

    def _timed_out(self, reason: str) -> None:
        # RFC 1939 §3: close without a response and without entering UPDATE.  Once QUIT
        # has entered it, the UPDATE is answered and closes the session itself.
        if self.operation != "update":
            self.close(reason)

    def _reset_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            timeout = (self._config.auth_timeout if self.state is State.AUTHORIZATION
                       else self._config.idle_timeout)
            self._idle_timer.reset(timeout)

    def _secure(self) -> bool:
        return (self.factory.implicit_tls or self._tls_started
                or interfaces.ISSLTransport.providedBy(self.transport))

    def _tls_label(self) -> str:
        return "TLS" if self._secure() else "plaintext"

    def _plaintext_allowed(self) -> bool:
        return plaintext_allowed(self._secure(), self.client_host,
                                 self.factory.config.tls.allow_plaintext_auth)

    def _publish_state(self) -> None:
        self.events.publish("state", self.info, state=self.state.value)

    # -- input ---------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        self._buffer += data

    def backlog(self) -> int:
        return len(self._buffer)

    def goodbye(self) -> None:
        # RFC 1939 §3 has no goodbye; RFC 3206 §4's SYS/TEMP says "try again later".
        self._send(b"-ERR [SYS/TEMP] Server shutting down, try again later")

    def overflow(self) -> None:
        self._send(b"-ERR Too much pipelined input")
        self.close("too much pipelined input")

    def step(self) -> bool:
        line = self._next_line()
        if line is None:
            return False
        self._handle_line(line)
        return True

    def output_resumed(self) -> None:
        self._pump_stream()

    def _line_limit(self) -> int:
        if self._sasl is not None or bytes(self._buffer[:5]).upper() == b"AUTH ":
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
                self._sasl = None
                self._fail(b"-ERR Line too long")
            elif self._sasl is not None:
                if self.events.wants("command"):
                    self.events.publish("command", self.info, line=SECRET)
                self._sasl_response(line)
            else:
                if self.events.wants("command"):
                    self.events.publish("command", self.info,
                                        line=redact(line.decode("utf-8", "replace")))
                self._command(line)
        except Exception:
            log.failure("POP3 internal error for {peer}", peer=self.info.client)
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

    def _write(self, data: bytes, lines: int = 1, summary: str | None = None) -> None:
        """Write one reply (its status line first) and show it to observers.

        Nothing is written once the session is closing: its last reply (a goodbye, the
        answer to QUIT) is out, and an answer that comes due later (a login that ends
        after a drain's goodbye) would be a second reply to one command.
        """
        if self.closing:
            return
        self.transport.write(data)
        if self.events.wants("reply"):
            first = data.split(b"\r\n", 1)[0].decode("utf-8", "replace")
            extra = {"summary": summary} if summary else {}
            self.events.publish("reply", self.info, line=first, lines=lines, **extra)

    def _send(self, line: bytes) -> None:
        self._write(line + b"\r\n")

    def _ok(self, text: bytes = b"") -> None:
        self._errors = 0
        self._send(b"+OK " + text if text else b"+OK")

    def _fail(self, line: bytes) -> None:
        """A protocol error: answer it; end the session after too many in a row."""
        self._send(line)
        self._errors += 1
        if self._errors >= MAX_CONSECUTIVE_ERRORS:
            self.close("too many errors")

    def _refuse(self, line: bytes, reason: str) -> None:
        """Answer a refused login ([IN-USE], [AUTH], [SYS/...]) and publish it."""
        self._send(line)
        self.events.publish("refused", self.info, reason=reason,
                            reply=line.decode("ascii", "replace"))

    def _multiline(self, first: bytes, lines: list[bytes]) -> None:
        # One write for the whole reply (lines never start with "." here).
        self._errors = 0
        self._write(b"\r\n".join([first, *lines, b".\r\n"]), lines=len(lines) + 2)

    def _internal_error(self) -> None:
        if self._stream is not None or self.closing:
            self.close("internal error")
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

    def _message(self, number: int):
        try:
            return self._maildrop.message(number)
        except NoSuchMessage as e:
            self._fail(b"-ERR " + str(e).encode("ascii"))
            return None

    def _message_argument(self, argument: bytes):
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
        self._start_login(LoginAttempt(self.client_host, "USER", name,
                                       UsernamePassword(name, argument), argument))

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
        self._start_login(LoginAttempt(self.client_host, "APOP", name, credentials, b"APOP"))

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
        self._sasl = sasl.exchange("PLAIN")
        self._sasl_step(lambda exchange: exchange.first(words[1] if len(words) == 2 else None))

    def _sasl_response(self, line: bytes) -> None:
        self._sasl_step(lambda exchange: exchange.step(line))

    def _sasl_step(self, step) -> None:
        """Run one step of the SASL exchange: a challenge (``+ base64``), or a login."""
        exchange = self._sasl
        try:
            result = step(exchange)
        except sasl.SASLError as e:
            self._sasl = None
            self._fail(b"-ERR " + str(e).encode("ascii"))
            return
        if isinstance(result, bytes):
            self._send(b"+ " + base64.b64encode(result))  # RFC 5034 §4
            return
        self._sasl = None
        if result.authzid and result.authzid != result.authcid:
            self._send(b"-ERR [AUTH] Logging in as another user is not supported")
            return
        self._start_login(LoginAttempt(
            self.client_host, exchange.name, result.authcid,
            UsernamePassword(result.authcid, result.password), result.password))

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
            self.close("quit")
            return
        # RFC 1939 §6: QUIT in TRANSACTION enters UPDATE.
        self.state = State.UPDATE
        self._publish_state()
        self.begin_operation("update")
        marked = self._marked = (self._maildrop.deleted_count, self._maildrop.deleted_octets)
        self._update = update = self._maildrop.commit()
        update.addCallbacks(self._updated, self._update_failed, callbackArgs=(marked,))
        update.addErrback(self._unexpected)

    def _updated(self, _, marked: tuple[int, int]) -> None:
        self._update = None
        self._removed = marked
        if marked[0]:
            self.events.publish("message", self.info, action="removed", count=marked[0],
                                octets=marked[1])
        self._log_out()
        if not self.disconnected:
            self._ok(b"popgate signing off (%d message%s deleted)"
                     % (marked[0], b"" if marked[0] == 1 else b"s"))
            self.close("quit")

    def _update_failed(self, failure) -> None:
        self._update = None
        if failure.check(OSError):  # an expected fault (a full disk): one line, no traceback
            log_storage_error(failure.value, self.factory.refusal_log)
        else:
            log.failure("POP3 UPDATE failed for {user}", failure, user=self._maildrop.user)
        self._log_out()
        if not self.disconnected:
            # RFC 1939 §6: -ERR if some deletions failed.
            self._send(b"-ERR [SYS/TEMP] Some messages could not be deleted")
            self.close("quit with errors")

    # -- logging in ----------------------------------------------------------------------

    def _start_login(self, attempt: LoginAttempt) -> None:
        """Hand the attempt to the authenticator; no input is read until it is answered."""
        self.begin_operation("login")
        self._login = d = self.factory.authenticator.login(attempt, IMaildrop,
                                                           lambda: not self.closing)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(attempt,),
                       errbackArgs=(attempt,))
        d.addErrback(self._unexpected)

    def _logged_in(self, result, attempt: LoginAttempt) -> None:
        self._login = None
        if result is None:
            return  # the session closed before its turn came
        maildrop, logout = result
        if self.disconnected:
            logout()
            return
        self._maildrop, self._logout = maildrop, logout
        self.publish_login(attempt, "ok", maildrop.user)
        if not self.closing:  # else ended() logs out
            self._enter_transaction()

    def _size_of_maildrop(self) -> bytes:
        """``3 messages (12345 octets)``: what the greeting after a login, LIST and RSET
        say of the maildrop (the messages not marked deleted, CRLF octets)."""
        count, octets = self._maildrop.stat()
        return b"%d message%s (%d octets)" % (count, b"" if count == 1 else b"s", octets)

    def _enter_transaction(self) -> None:
        self.state = State.TRANSACTION
        self._publish_state()
        self._ok(b"Logged in, " + self._size_of_maildrop())
        self._reset_idle_timer()
        self.end_operation()

    def _login_failed(self, failure, attempt: LoginAttempt) -> None:
        self._login = None
        if failure.check(defer.CancelledError):
            return  # the session went away during a wait
        if failure.check(LoginFailed):
            self.publish_login(attempt, "failed")
            self._auth_failures += 1
            self._send(b"-ERR [AUTH] Authentication failed")  # the login event records it
            if self._auth_failures >= self.factory.config.limits.auth_max_failures:
                self.close("too many authentication failures")
            else:
                self.end_operation()
            return
        if failure.check(MailboxInUse):
            self.publish_login(attempt, "in-use")
            self._refuse(b"-ERR [IN-USE] Mailbox is in use by another session",
                         "mailbox in use")
        elif failure.check(UsersUnavailable):  # UserDB has logged why, at a bounded rate
            self.publish_login(attempt, "error")
            self._refuse(b"-ERR [SYS/TEMP] User database temporarily unavailable",
                         "user database unavailable")
        else:
            if failure.check(OSError):  # an expected fault (a full disk): no traceback
                log_storage_error(failure.value, self.factory.refusal_log)
            else:
                log.failure("POP3 login failed for {peer}", failure, peer=self.info.client)
            self.publish_login(attempt, "error")
            # RFC 3206 §4: SYS/PERM when retrying will not help until an administrator acts.
            self._refuse(b"-ERR [SYS/PERM] Mailbox unavailable, please tell the administrator"
                         if failure.check(PermissionError)
                         else b"-ERR [SYS/TEMP] Mailbox temporarily unavailable",
                         "mailbox unavailable")
        self.end_operation()

    def _unexpected(self, failure) -> None:
        log.failure("POP3 internal error for {peer}", failure, peer=self.info.client)
        if self.state is State.UPDATE:
            self.close("internal error")
        elif not self.closing:
            self._internal_error()
            self.end_operation()

    def _log_out(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    # -- TRANSACTION state: RFC 1939 §5, §7 ----------------------------------------------

    def do_STAT(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._ok(b"%d %d" % self._maildrop.stat())

    def do_LIST(self, argument: bytes) -> None:
        if argument.strip():
            found = self._message_argument(argument)
            if found is not None:
                self._ok(b"%d %d" % (found[0], found[1].octets))
            return
        self._multiline(b"+OK " + self._size_of_maildrop(),
                        [b"%d %d" % (n, info.octets) for n, info in self._maildrop.listing()])

    def do_UIDL(self, argument: bytes) -> None:
        if argument.strip():
            found = self._message_argument(argument)
            if found is not None:
                self._ok(b"%d %s" % (found[0], found[1].uidl.encode("ascii")))
            return
        self._multiline(b"+OK Unique-ID listing follows",
                        [b"%d %s" % (n, info.uidl.encode("ascii"))
                         for n, info in self._maildrop.listing()])

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
            self._start_stream(number, info, b"+OK Top of message follows", body_lines)

    def do_DELE(self, argument: bytes) -> None:
        found = self._message_argument(argument)
        if found is not None:
            number, info = found
            self._maildrop.delete(number)
            self._ok(b"Message %d deleted" % number)
            self.events.publish("message", self.info, action="deleted", number=number,
                                uidl=info.uidl, octets=info.octets)

    def do_NOOP(self, argument: bytes) -> None:
        if self._no_argument(argument):
            self._ok()

    def do_RSET(self, argument: bytes) -> None:
        if self._no_argument(argument):
            marked = self._maildrop.deleted_count
            self._maildrop.undelete_all()
            self._ok(b"Maildrop has " + self._size_of_maildrop())
            if marked:
                self.events.publish("message", self.info, action="undeleted", count=marked)

    # -- streaming a message -------------------------------------------------------------

    def _start_stream(self, number: int, info, status: bytes,
                      body_lines: int | None) -> None:
        """Send ``status`` and message ``number`` (RETR, or TOP with ``body_lines``)."""
        stream = None
        try:
            stream = _MessageStream(self._maildrop.open(number), self.block_size, body_lines)
            first = stream.next_chunk()
        except OSError as e:
            if stream is not None:
                stream.close()
            log_storage_error(e, self.factory.refusal_log)
            self._send(b"-ERR [SYS/TEMP] Message temporarily unavailable")
            return
        self._errors = 0
        kind = "retrieved" if body_lines is None else "topped"
        summary = f"{kind} message {number}: {info.octets} octets as listed"
        if self.events.wants("reply"):
            headers = header_summary(first)
            summary += f"; {headers}" if headers else ""
        self._write(status + b"\r\n" + first, summary=summary)
        self._stream, self._retrieval = stream, number if body_lines is None else None
        self.events.publish("message", self.info, action=kind, number=number,
                            uidl=info.uidl, octets=info.octets)
        self.begin_operation("retr")
        if stream.done:
            self._finish_stream()
        else:
            self._pump_stream()

    def _pump_stream(self) -> None:
        """Write chunks until the message is sent or the transport asks us to pause."""
        while self._stream is not None and not self.output_full and not self.closing:
            try:
                chunk = self._stream.next_chunk()
            except OSError as e:
                # Part of the reply is out already: only closing tells the client.
                log_storage_error(e, self.factory.refusal_log)
                self.close("read error while sending a message")
                return
            self._reset_idle_timer()
            self.transport.write(chunk)
            if self._stream is not None and self._stream.done:
                self._finish_stream()

    def _finish_stream(self) -> None:
        stream, self._stream = self._stream, None
        stream.close()
        if self._retrieval is not None:
            self._maildrop.retrieved(self._retrieval)
        self.end_operation()

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def _is_hex(text: bytes) -> bool:
    return all(c in b"0123456789abcdefABCDEF" for c in text)


class POP3Factory(SessionFactory):
    """Builds POP3 sessions for one listener.

    ``tls`` is the STLS connection creator (None: no STLS); ``authenticator`` is shared by
    the POP3 and POP3S listeners (and SMTP submission): penalties and the bound per
    address are per address, not per port.
    """

    session_class = POP3Server
    protocol_name = "POP3"

    def __init__(self, *, config, authenticator: Authenticator, clock, limiter, events,
                 tls=None, implicit_tls: bool = False, sessions=None):
        super().__init__(config=config, clock=clock, limiter=limiter, events=events, tls=tls,
                         implicit_tls=implicit_tls, sessions=sessions)
        self.authenticator = authenticator

    def refusal_line(self, reason: str) -> bytes:
        return b"-ERR [SYS/TEMP] " + reason.encode("ascii") + b"\r\n"

    def apop_timestamp(self) -> bytes:
        """A new RFC 1939 §7 ``<pid.clock@hostname>`` timestamp, never repeated."""
        clock = f"{int(self.clock.seconds())}.{secrets.token_hex(8)}"
        return f"<{os.getpid()}.{clock}@{self.hostname}>".encode("ascii", "replace")
