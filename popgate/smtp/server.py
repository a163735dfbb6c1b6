"""popgate's ESMTP / LMTP server protocol and its factory.

Implements RFC 5321 (SMTP) with PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME
(RFC 6152), ENHANCEDSTATUSCODES (RFC 2034/3463), SMTPUTF8 (RFC 6531), CHUNKING (BDAT,
RFC 3030) and STARTTLS (RFC 3207); with ``lmtp=True`` the same machine speaks LMTP
(RFC 2033: ``LHLO``, one reply per accepted recipient after the message).  There is no
AUTH: popgate's SMTP only accepts mail for its local users.

Wire format: command lines end with CRLF (a bare LF is tolerated) and are at most 512
octets (RFC 5321 §4.5.3.1.4); every reply carries an enhanced status code.  Message data
is decoded by :mod:`popgate.codec` (only ``CRLF.CRLF`` ends DATA; only the declared length
ends a BDAT chunk) and streamed to :mod:`popgate.smtp.delivery`, which stores it with LF line
ends.

The session is an explicit state machine.  ``_mode`` says how input bytes are read
(command lines, the tail of an over-long line being discarded, DATA, a BDAT chunk, or
nothing once closed); the envelope state (``_helo``, ``_sender``, ``_recipients``) says
which commands are in sequence.  Input is processed strictly in order: when a command's
answer is asynchronous (the end of a message waits for fsync) the protocol stops reading
the transport and leaves later pipelined input in its buffer until the answer is written,
so replies always come back in order.  It also stops processing input while the
transport's write buffer is full (it is the transport's push producer), and stops reading
once 64 KiB of input is waiting behind it, so a client that pipelines commands without
reading the replies cannot make the server buffer without bound.

Bounds: a partial command line is buffered up to 512 octets, the rest of a longer line is
discarded as it arrives; DATA and BDAT bytes go to disk as they arrive, counted against
``smtp.max_message_size``; at most ``smtp.max_recipients`` recipients; after
``smtp.max_errors`` protocol errors the session is closed; command, data and total session
timeouts come from the injected clock (RFC 5321 §4.5.3.2).

Concurrency: everything runs on the reactor thread; only fsync work goes to the thread
pool (through :class:`popgate.smtp.delivery.Deliverer`).
"""

from __future__ import annotations

import enum
import re

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from popgate.addresses import AddressError, parse_path
from popgate.codec import ChunkDecoder, DataDecoder
from popgate.loglimit import LogLimiter
from popgate.smtp.delivery import (
    Deliverer,
    Envelope,
    Recipient,
    Refusal,
    Router,
    storage_refusal,
)
from popgate.tls import tls_description

MAX_COMMAND_LINE = 512  # octets including CRLF, RFC 5321 §4.5.3.1.4
CLOSE_GRACE = 30.0  # seconds a closing session may take to flush its last replies
MAX_BACKLOG = 64 * 1024  # unprocessed input held while replies cannot be written
_MAX_SIZE_DIGITS = 20
# Replies sent for every message, encoded once.
_MAIL_OK = b"250 2.1.0 Ok\r\n"
_RCPT_OK = b"250 2.1.5 Ok\r\n"
_GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_HELO_NAME = re.compile(r"[\x21-\x7e]{1,255}\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")  # RFC 5321 §4.1.2 esmtp-value
# BINARYMIME (RFC 3030) is not offered: Maildir stores LF line ends, so a binary body
# could not be kept byte for byte.
_BODY_TYPES = ("7BIT", "8BITMIME")
_COMMON_COMMANDS = ("MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
                    "STARTTLS")
SMTP_COMMANDS = ("EHLO", "HELO", *_COMMON_COMMANDS)
LMTP_COMMANDS = ("LHLO", *_COMMON_COMMANDS)  # RFC 2033 §4.1: LHLO replaces EHLO and HELO


class Mode(enum.Enum):
    """How the next input bytes are read."""

    COMMAND = "command"
    DISCARD_LINE = "discarding the rest of an over-long command line"
    DATA = "DATA"
    CHUNK = "BDAT chunk"
    CLOSED = "closed"


class CommandError(Exception):
    """A command refused with a reply; 5xx ones count towards ``smtp.max_errors``."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.refusal = Refusal(code, enhanced, text)


def _syntax(text: str) -> CommandError:
    return CommandError(501, "5.5.4", f"Syntax: {text}")


def _sequence(text: str) -> CommandError:
    return CommandError(503, "5.5.1", text)


class _Chunk:
    """The BDAT chunk being read: octets still to come, and how to answer at its end."""

    def __init__(self, size: int, last: bool, refusal: Refusal | None):
        self.size = size
        self.remaining = size
        self.last = last
        self.refusal = refusal  # answered once the chunk is consumed, instead of storing it


@implementer(IPushProducer)
class SMTPServer(protocol.Protocol):
    """One SMTP or LMTP session."""

    log = Logger()

    def __init__(self, factory: SMTPFactory, client_host: str):
        self.factory = factory
        self.settings = factory.config.smtp
        self._client_host = client_host
        self._mode = Mode.COMMAND
        self._buffer = b""
        self._position = 0  # start of the unread input in _buffer
        self._processing = False
        self._pending: defer.Deferred | None = None  # the asynchronous reply owed, if any
        self._close_timer = None
        self._opening = False  # DATA accepted, its files are still being opened
        self._output_full = False  # the transport asked us to stop producing
        self._reading_paused = False
        self._buffer_seen = False  # any input arrived (the peer is final: see _peer)
        self._peer_text: str | None = None
        self._client_ip: str | None = None
        self._errors = 0
        self._messages = 0
        self._tls = factory.implicit_tls
        self._idle_timer = None
        self._session_timer = None
        self._transaction = None
        self._decoder: DataDecoder | None = None
        self._chunk: _Chunk | None = None
        self._chunk_decoder: ChunkDecoder | None = None
        self._reset_session()

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            # A reply that follows a thread hop (354, 250 after fsync) must not wait for
            # the client's delayed ACK of the previous one (Nagle); Twisted already
            # coalesces the replies written in one reactor turn into one segment.
            no_delay(True)
        self.log.info("{proto} connection from {peer}{tls}", proto=self._name,
                      peer=self._peer(), tls=" (implicit TLS)" if self._tls else "")
        kind = "LMTP" if self.factory.lmtp else "ESMTP"
        self._reply(220, None, f"{self.factory.hostname} {kind} popgate")
        clock = self.factory.clock
        self._session_timer = clock.callLater(self.settings.max_session_time,
                                              self._timed_out, "session time limit")
        self._restart_idle_timer()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._mode = Mode.CLOSED
        self._cancel_timers()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._abort_transaction()
        self.factory.limiter.release(self._client_host)
        self.log.info("{proto} connection from {peer} closed; {n} message(s) accepted, {tls}",
                      proto=self._name, peer=self._peer(), n=self._messages,
                      tls=self._tls_summary())

    @property
    def _name(self) -> str:
        return "LMTP" if self.factory.lmtp else "SMTP"

    def _peer(self) -> str:
        if self._peer_text is not None:
            return self._peer_text
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        text = f"{host}:{port}" if host is not None else "local socket"
        if self._mode is not Mode.CLOSED and self._buffer_seen:
            # Input has arrived, so a PROXY header (which changes the peer) is behind us.
            self._peer_text, self._client_ip = text, host
        return text

    def _tls_summary(self) -> str:
        if not self._tls:
            return "no TLS"
        return tls_description(self.transport) or "TLS"

    def _close(self) -> None:
        self._mode = Mode.CLOSED
        self._cancel_timers()
        self._abort_transaction()
        # A registered producer keeps the transport from closing (FileDescriptor docs).
        self.transport.unregisterProducer()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # a TLS close needs to read the peer's alert
        self.transport.loseConnection()
        # loseConnection waits for the output to drain; a peer that never reads would
        # keep the session (and its connection slot) for ever.
        self._close_timer = self.factory.clock.callLater(
            CLOSE_GRACE, self.transport.abortConnection)

    # -- IPushProducer: the transport's write buffer is full / drained --------------

    def pauseProducing(self) -> None:
        self._output_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._output_full = False
        self._update_reading()
        self._process()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the cleaning up."""

    def _update_reading(self) -> None:
        """Stop reading the transport while input waits behind an owed reply.

        Reading stops once input arrives while a reply is owed (not before: most waits end
        with nothing behind them, and each pause costs two system calls), or once 64 KiB
        waits behind a full output buffer or behind message files still being opened.  A
        full output buffer alone does not stop reading: under TLS the greeting waits in the
        TLS layer until the handshake, which needs the transport to keep reading.
        """
        backlog = len(self._buffer) - self._position
        pause = ((self._waiting and backlog > 0)
                 or ((self._output_full or self._opening) and backlog >= MAX_BACKLOG))
        if pause != self._reading_paused and self._mode is not Mode.CLOSED:
            self._reading_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # -- timers -----------------------------------------------------------------------

    def _restart_idle_timer(self) -> None:
        """Command timeout between commands, data timeout per block (RFC 5321 §4.5.3.2).

        While we owe an answer the timer keeps running but does not fire (see
        :meth:`_idle_timeout`): the client is not the one who is late.  Resetting a running
        timer is cheaper than cancelling it and making a new one, and this runs several
        times per message.
        """
        timer = self._idle_timer
        if self._mode is Mode.CLOSED:
            if timer is not None and timer.active():
                timer.cancel()
            self._idle_timer = None
            return
        in_data = self._mode in (Mode.DATA, Mode.CHUNK)
        timeout = self.settings.data_timeout if in_data else self.settings.command_timeout
        if timer is not None and timer.active():
            timer.reset(timeout)
        else:
            self._idle_timer = self.factory.clock.callLater(timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if not self._waiting:  # else the timer starts again once the answer is written
            self._timed_out("timeout")

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._session_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._session_timer = None

    def _timed_out(self, what: str) -> None:
        self.log.info("{proto} {peer}: {what} in {mode}", proto=self._name,
                      peer=self._peer(), what=what, mode=self._mode.value)
        self._reply(421, "4.4.2", f"{self.factory.hostname} Error: {what} exceeded")
        self._close()

    # -- input --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode is Mode.CLOSED:
            return
        self._buffer_seen = True
        self._buffer += data
        if self._mode in (Mode.DATA, Mode.CHUNK):
            self._restart_idle_timer()
        if self._waiting or self._output_full or self._opening:
            self._update_reading()
        self._process()

    def _process(self) -> None:
        """Consume buffered input in order until it runs out or a reply is owed."""
        if self._processing:
            return  # re-entered from a reply that fired synchronously: the loop goes on
        self._processing = True
        try:
            while (self._position < len(self._buffer) and not self._waiting
                   and not self._output_full and self._mode is not Mode.CLOSED):
                if not self._step():
                    break
            self._buffer = self._buffer[self._position:]
            self._position = 0
            self._update_reading()
        finally:
            self._processing = False

    def _step(self) -> bool:
        """Consume one unit of input; False if more input is needed first."""
        mode = self._mode
        try:
            if mode is Mode.COMMAND:
                return self._read_command_line()
            if mode is Mode.DISCARD_LINE:
                return self._discard_line()
            if mode is Mode.DATA:
                return self._read_data()
            return self._read_chunk()
        except Exception:
            self.log.failure("{proto} {peer}: internal error in {mode}", proto=self._name,
                             peer=self._peer(), mode=mode.value)
            self._reply(451, "4.3.0", "Error: internal error, try again later")
            if mode is not Mode.COMMAND:
                # Where a message ends in the stream is no longer certain: reading on
                # could run message content as commands.
                self._close()
            return True

    def _read_command_line(self) -> bool:
        start = self._position
        end = self._buffer.find(b"\n", start, start + MAX_COMMAND_LINE)
        if end < 0:
            if len(self._buffer) - start < MAX_COMMAND_LINE:
                return False
            self._position = start + MAX_COMMAND_LINE
            self._mode = Mode.DISCARD_LINE
            return True
        self._position = end + 1
        line = self._buffer[start:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._restart_idle_timer()
        self._run_command(line)
        return True

    def _discard_line(self) -> bool:
        end = self._buffer.find(b"\n", self._position)
        if end < 0:
            self._position = len(self._buffer)
            return True
        self._position = end + 1
        self._mode = Mode.COMMAND
        self._restart_idle_timer()
        self._refuse(CommandError(500, "5.5.2", "Error: line too long"))
        return True

    def _run_command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(CommandError(500, "5.5.2", "Error: invalid UTF-8 in command"))
            return
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb not in self.factory.commands:
            self._refuse(CommandError(500, "5.5.2", "Error: command not recognized"))
            return
        try:
            getattr(self, "smtp_" + verb)(argument.strip(" "))
        except CommandError as e:
            self._refuse(e)

    # -- replies ------------------------------------------------------------------------

    def _reply(self, code: int, enhanced: str | None, *lines: str) -> None:
        if self._mode is Mode.CLOSED:
            return
        prefix = f"{enhanced} " if enhanced else ""
        out = [f"{code}-{prefix}{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {prefix}{lines[-1]}\r\n")
        self.transport.write("".join(out).encode("utf-8"))

    def _answer(self, refusal: Refusal) -> None:
        self._reply(refusal.code, refusal.enhanced, refusal.text)

    def _refuse(self, error: CommandError) -> None:
        """Answer and log a refusal; too many 5xx ones end the session (enumeration brake).

        The log line names the client and the reason, at most once a minute for the same
        client and reply code, so a client hammering bad commands cannot flood the log.
        """
        refusal = error.refusal
        self._answer(refusal)
        host = self._client_host
        if self.factory.refusal_log.allow((host, refusal.code, refusal.enhanced)):
            self.log.info("{proto} {peer}: refused: {code} {enhanced} {text}",
                          proto=self._name, peer=self._peer(), code=refusal.code,
                          enhanced=refusal.enhanced, text=refusal.text)
        if refusal.code < 500:
            return
        self._errors += 1
        if self._errors >= self.settings.max_errors:
            self.log.info("{proto} {peer}: closed after {n} errors", proto=self._name,
                          peer=self._peer(), n=self._errors)
            self._reply(421, "4.7.0", f"{self.factory.hostname} Error: too many errors")
            self._close()

    @property
    def _waiting(self) -> bool:
        return self._pending is not None

    def _wait_for(self, d: defer.Deferred) -> None:
        """Stop reading input until ``d`` (which writes the reply) has fired.

        A wait started inside ``d``'s callbacks (``BDAT 0 LAST`` finishing the message
        right after its files were opened) replaces this one; only the newest wait ends
        the pause, so replies stay in order (RFC 2920 §3.1).
        """
        self._pending = d
        self._restart_idle_timer()
        d.addErrback(self._internal_error)
        d.addBoth(self._done_waiting, d)

    def _done_waiting(self, _ignored, d: defer.Deferred) -> None:
        if self._pending is not d:
            return
        self._pending = None
        self._update_reading()
        self._restart_idle_timer()
        self._process()

    def _internal_error(self, failure) -> None:
        self.log.failure("{proto} {peer}: internal error", failure, proto=self._name,
                         peer=self._peer())
        self._reply(451, "4.3.0", "Error: internal error, try again later")

    # -- session state ------------------------------------------------------------------

    def _reset_session(self) -> None:
        self._helo: str | None = None
        self._esmtp = False
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._abort_transaction()
        self._sender: str | None = None  # "" is the null reverse-path
        self._recipients: list[Recipient] = []
        self._body = "7BIT"
        self._smtputf8 = False
        self._chunking = False  # BDAT started this transaction (DATA is then out of order)
        self._size = 0  # message octets received, counted as sent (CRLF line ends)
        self._too_big = False
        self._unstorable: Refusal | None = None  # the files could not be opened

    def _abort_transaction(self) -> None:
        if self._transaction is not None:
            self._transaction.abort()
            self._transaction = None

    def _protocol_keyword(self) -> str:
        """The Received ``with`` keyword (RFC 3848, RFC 6531 §3.7.3)."""
        if self.factory.lmtp:
            keyword = "UTF8LMTP" if self._smtputf8 else "LMTP"
        elif self._esmtp:
            keyword = "UTF8SMTP" if self._smtputf8 else "ESMTP"
        else:
            return "SMTP"
        return keyword + "S" if self._tls else keyword

    # -- greetings ------------------------------------------------------------------------

    def smtp_EHLO(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def smtp_LHLO(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _greet(self, argument: str, esmtp: bool) -> None:
        if not _HELO_NAME.match(argument):
            raise _syntax("EHLO hostname" if esmtp else "HELO hostname")
        self._reset_transaction()
        self._helo, self._esmtp = argument, esmtp
        if not esmtp:
            self._reply(250, None, self.factory.hostname)
            return
        self._reply(250, None, self.factory.hostname, *self._extensions())

    def _extensions(self) -> list[str]:
        extensions = [f"SIZE {self.settings.max_message_size}", "8BITMIME", "PIPELINING",
                      "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING"]
        if self.factory.tls is not None and not self._tls:
            extensions.append("STARTTLS")
        return extensions

    # -- the envelope --------------------------------------------------------------------

    def smtp_MAIL(self, argument: str) -> None:
        if self._helo is None:
            raise _sequence("Error: send EHLO first")
        if self._sender is not None:
            raise _sequence("Error: nested MAIL command")
        path, parameters = _split_path(argument, "FROM")
        body, smtputf8 = self._parse_mail_parameters(parameters)
        sender = _parse_address(path, smtputf8, "5.1.7")
        self._sender = "" if sender is None else str(sender)
        self._body, self._smtputf8 = body, smtputf8
        self.transport.write(_MAIL_OK)

    def _parse_mail_parameters(self, parameters: list[str]) -> tuple[str, bool]:
        """Check MAIL's ESMTP parameters; return (BODY type, SMTPUTF8 given)."""
        if parameters and not self._esmtp:
            raise CommandError(555, "5.5.4", "Error: parameters need EHLO")
        values: dict[str, str | None] = {}
        for parameter in parameters:
            keyword, has_value, value = parameter.partition("=")
            keyword = keyword.upper()
            if not _ESMTP_KEYWORD.match(keyword) or (has_value and not _ESMTP_VALUE.match(value)):
                raise _syntax("MAIL FROM:<address> [SIZE=n] [BODY=type] [SMTPUTF8]")
            if keyword not in ("SIZE", "BODY", "SMTPUTF8"):
                raise CommandError(555, "5.5.4", f"Error: unsupported parameter {keyword}")
            if keyword in values:
                raise _syntax(f"{keyword} given twice")
            values[keyword] = value if has_value else None
        if "SIZE" in values:
            self._check_declared_size(values["SIZE"])
        body = values.get("BODY", "7BIT")
        if body is not None and body.upper() == "BINARYMIME":
            raise CommandError(555, "5.5.4", "Error: BODY=BINARYMIME is not supported")
        if body is None or body.upper() not in _BODY_TYPES:
            raise _syntax("BODY=7BIT|8BITMIME")
        if values.get("SMTPUTF8") is not None:
            raise _syntax("SMTPUTF8 takes no value")
        return body.upper(), "SMTPUTF8" in values

    def _check_declared_size(self, value: str | None) -> None:
        if not value or not value.isdigit() or len(value) > _MAX_SIZE_DIGITS:
            raise _syntax("SIZE=<number of octets>")
        if int(value) > self.settings.max_message_size:
            # RFC 1870 §6.1: refuse a declared size over the fixed maximum at MAIL time.
            raise CommandError(552, "5.3.4", "Error: message size exceeds fixed maximum "
                                             "message size")

    def smtp_RCPT(self, argument: str) -> None:
        if self._sender is None:
            raise _sequence("Error: need MAIL command")
        path, parameters = _split_path(argument, "TO")
        if parameters:
            raise CommandError(555, "5.5.4", "Error: RCPT parameters are not supported")
        if len(self._recipients) >= self.settings.max_recipients:
            # RFC 5321 §4.5.3.1.10: a temporary failure, not counted as a client error.
            self._reply(452, "4.5.3", "Error: too many recipients")
            return
        if path.lower() == "<postmaster>":
            address, resolution = "postmaster", self.factory.router.resolve_postmaster()
        else:
            mailbox = _parse_address(path, self._smtputf8, "5.1.3")
            if mailbox is None:
                raise CommandError(501, "5.1.3", "Error: the null path is not a recipient")
            address, resolution = str(mailbox), self.factory.router.resolve(mailbox)
        if resolution.refusal is not None:
            refusal = resolution.refusal
            raise CommandError(refusal.code, refusal.enhanced, f"<{address}>: {refusal.text}")
        self._recipients.append(Recipient(address, resolution.users))
        self.transport.write(_RCPT_OK)

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            raise _syntax("RSET")
        self._reset_transaction()
        self._reply(250, "2.0.0", "Ok")

    def smtp_NOOP(self, argument: str) -> None:
        self._reply(250, "2.0.0", "Ok")

    def smtp_VRFY(self, argument: str) -> None:
        if not argument:
            raise _syntax("VRFY address")
        # The same answer for every address: VRFY must not enumerate users.
        self._reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt "
                                  "delivery")

    def smtp_HELP(self, argument: str) -> None:
        available = [c for c in self.factory.commands
                     if c != "STARTTLS" or (self.factory.tls is not None and not self._tls)]
        self._reply(214, "2.0.0", "Commands: " + " ".join(available),
                    "See RFC 5321" if not self.factory.lmtp else "See RFC 2033")

    def smtp_EXPN(self, argument: str) -> None:
        # RFC 5321 §3.5.2 / §4.2.4: recognised, deliberately not implemented (mailing-list
        # expansion would enumerate users): 502, not "unknown command".
        raise CommandError(502, "5.5.1", "Error: EXPN is not available")

    def smtp_QUIT(self, argument: str) -> None:
        if argument:
            raise _syntax("QUIT")
        self._reply(221, "2.0.0", "Bye")
        self._close()

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            raise _syntax("STARTTLS")
        if self.factory.tls is None:
            raise CommandError(502, "5.5.1", "Error: STARTTLS is not available")
        if self._tls:
            raise _sequence("Error: TLS is already active")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 §4.2 / CVE-2011-0411: anything the client sent after STARTTLS in
        # plaintext could have been injected by an attacker; it must not run inside TLS.
        self._buffer, self._position = b"", 0
        self._tls = True
        self._reset_session()
        self.transport.startTLS(self.factory.tls)

    # -- message data ---------------------------------------------------------------------

    def _check_ready_for_data(self) -> None:
        if self._sender is None:
            raise _sequence("Error: need MAIL command")
        if not self._recipients:
            if self.factory.lmtp:
                raise _sequence("Error: no valid recipients")  # RFC 2033 §4.2
            raise CommandError(554, "5.5.1", "Error: no valid recipients")

    def _begin(self) -> defer.Deferred:
        """Start opening the message files; the Deferred fires with a Transaction."""
        envelope = Envelope(
            sender=self._sender,
            recipients=tuple(self._recipients),
            helo=self._helo,
            client_ip=self._client_ip if self._peer_text is not None else getattr(
                self.transport.getPeer(), "host", None),
            protocol=self._protocol_keyword(),
            tls=tls_description(self.transport) if self._tls else None,
        )
        return self.factory.deliverer.begin(envelope)

    def _open_transaction(self, opened, failed) -> None:
        """Open the message files (asynchronously; no input is read meanwhile).

        Then ``opened()`` runs with the transaction in place, or ``failed(refusal)``.
        """
        d = self._begin()
        d.addCallbacks(self._transaction_opened, self._transaction_not_opened,
                       callbackArgs=(opened,), errbackArgs=(failed,))
        self._wait_for(d)

    def _transaction_opened(self, transaction, opened) -> None:
        if self._mode is Mode.CLOSED:
            transaction.abort()
            return
        self._transaction = transaction
        opened()

    def _transaction_not_opened(self, failure, failed) -> None:
        if failure.check(OSError):
            failed(storage_refusal(failure.value, self.factory.refusal_log))
            return
        self.log.failure("cannot open a message", failure)
        failed(Refusal(451, "4.3.0", "Error: cannot store the message now"))

    def smtp_DATA(self, argument: str) -> None:
        if argument:
            raise _syntax("DATA")
        self._check_ready_for_data()
        if self._chunking:
            # RFC 3030 §3: DATA and BDAT do not mix in one transaction.
            raise _sequence("Error: use BDAT for this message")
        # 354 goes out at once, in the same write as the replies pipelined before DATA,
        # while the files are opened (a thread hop).  Message data that arrives first
        # waits in the input buffer (bounded, see _update_reading); if the files cannot
        # be opened, the data is read and the message refused at its end (451).
        self._opening = True
        d = self._begin()
        d.addCallbacks(self._transaction_opened, self._transaction_not_opened,
                       callbackArgs=(self._data_files_opened,),
                       errbackArgs=(self._data_files_not_opened,))
        d.addErrback(self._internal_error_in_data)
        self._start_data()

    def _data_files_opened(self) -> None:
        self._opening = False
        self._process()

    def _data_files_not_opened(self, refusal: Refusal) -> None:
        self._opening = False
        self._unstorable = refusal
        self._process()

    def _internal_error_in_data(self, failure) -> None:
        self.log.failure("{proto} {peer}: internal error in DATA", failure,
                         proto=self._name, peer=self._peer())
        self._reply(451, "4.3.0", "Error: internal error, try again later")
        self._close()

    def _start_data(self) -> None:
        self._decoder = DataDecoder()
        self._mode = Mode.DATA
        # RFC 2034 §4 allows 354 without an enhanced code; clients expect it bare.
        self.transport.write(_GO_AHEAD)
        self._restart_idle_timer()

    def _read_data(self) -> bool:
        if self._opening:
            return False  # the data waits in the buffer until there is a file for it
        data = self._buffer[self._position:] if self._position else self._buffer
        body, rest = self._decoder.feed(data)
        self._store(body)
        if rest is None:
            self._position = len(self._buffer)
            return True
        self._position = len(self._buffer) - len(rest)
        self._back_to_commands()
        self._end_of_message(self._decoder.bare_newline)
        return True

    def _store(self, body: bytes) -> None:
        """Count and write decoded (LF) body bytes; over the limit, keep only counting."""
        if not body:
            return
        self._size += len(body) + body.count(b"\n")  # as sent: CRLF line ends
        if self._transaction is None:
            return  # too big already, or no files: only counting
        if self._size > self.settings.max_message_size:
            self._too_big = True
            self._abort_transaction()
            return
        self._transaction.write(body)

    def _back_to_commands(self) -> None:
        self._mode = Mode.COMMAND
        self._restart_idle_timer()

    def _end_of_message(self, bare_newline: bool) -> None:
        """The whole message is in: refuse it, or deliver it and answer after fsync."""
        transaction, recipients = self._transaction, self._recipients
        self._transaction = None  # its fate is decided here, not by the reset below
        unstorable = self._unstorable
        self._reset_transaction()
        if transaction is None:  # no files to open, or aborted on the way: too big
            self._answer_message(recipients, unstorable or Refusal(
                552, "5.3.4", "Error: message size exceeds fixed maximum message size"))
            return
        if bare_newline and self.settings.bare_newline == "reject":
            transaction.abort()
            self._answer_message(recipients, Refusal(
                554, "5.6.0", "Error: bare <CR> or <LF> in message data is not allowed"))
            return
        d = transaction.finish()
        d.addCallbacks(self._delivered, self._not_delivered,
                       callbackArgs=(transaction,), errbackArgs=(transaction,))
        self._wait_for(d)

    def _delivered(self, _ignored, transaction) -> None:
        self._messages += 1
        envelope = transaction.envelope
        rcpts = ", ".join(u.name for u in transaction.users)
        peer = self._peer()
        # One line per message, formatted here: the fields are in the event too, but a
        # format string without fields is much cheaper for the log observer to render
        # (this runs for every message, on the reactor thread).
        text = (f"{transaction.id}: delivered from <{envelope.sender}> to {rcpts} "
                f"({transaction.size} octets) for {peer}")
        self.log.info(text.replace("{", "{{").replace("}", "}}"), id=transaction.id,
                      sender=envelope.sender, rcpts=rcpts, size=transaction.size, peer=peer)
        self._answer_message(envelope.recipients,
                             Refusal(250, "2.0.0", f"Ok: queued as {transaction.id}"))

    def _not_delivered(self, failure, transaction) -> None:
        if failure.check(OSError):
            refusal = storage_refusal(failure.value, self.factory.refusal_log)
        else:
            self.log.failure("{id}: delivery failed", failure, id=transaction.id)
            refusal = Refusal(451, "4.3.0", "Error: cannot store the message now")
        self._answer_message(transaction.envelope.recipients, refusal)

    def _answer_message(self, recipients, answer: Refusal) -> None:
        """One reply (SMTP), or one per accepted recipient in order (LMTP, RFC 2033 §4.2)."""
        if not self.factory.lmtp:
            self._answer(answer)
            return
        for recipient in recipients:
            self._reply(answer.code, answer.enhanced, f"<{recipient.address}> {answer.text}")

    # -- BDAT (RFC 3030) -----------------------------------------------------------------

    def smtp_BDAT(self, argument: str) -> None:
        size, last = _parse_bdat(argument)
        chunk = _Chunk(size, last, None)
        try:
            self._check_ready_for_data()
        except CommandError as e:
            chunk.refusal = e.refusal  # the chunk is read anyway, then refused (RFC 3030 §2)
        if chunk.refusal is not None or self._transaction is not None:
            self._start_chunk(chunk)
            return

        def opened():
            self._chunking = True
            self._chunk_decoder = ChunkDecoder()
            self._start_chunk(chunk)

        def failed(refusal: Refusal):
            chunk.refusal = refusal
            self._start_chunk(chunk)

        self._open_transaction(opened, failed)

    def _start_chunk(self, chunk: _Chunk) -> None:
        self._chunk = chunk
        self._mode = Mode.CHUNK
        self._restart_idle_timer()
        if chunk.size == 0:
            self._end_of_chunk()

    def _read_chunk(self) -> bool:
        chunk = self._chunk
        take = min(chunk.remaining, len(self._buffer) - self._position)
        data = self._buffer[self._position:self._position + take]
        self._position += take
        chunk.remaining -= take
        if chunk.refusal is None:
            self._store(self._chunk_decoder.feed(data))
        if chunk.remaining == 0:
            self._end_of_chunk()
        return True

    def _refuse_chunk(self, chunk: _Chunk) -> None:
        """RFC 3030 §2: a refused chunk fails the whole transaction, so chunks pipelined
        after it are read, discarded and refused too (503: no transaction)."""
        recipients, had_envelope = self._recipients, self._sender is not None
        if had_envelope:
            self._reset_transaction()
        refusal = chunk.refusal
        if chunk.last and self.factory.lmtp and recipients:
            self._answer_message(recipients, refusal)  # RFC 2033 §4.2: one per recipient
            return
        self._refuse(CommandError(refusal.code, refusal.enhanced, refusal.text))

    def _end_of_chunk(self) -> None:
        chunk = self._chunk
        self._back_to_commands()
        if chunk.refusal is not None:
            self._refuse_chunk(chunk)
        elif chunk.last:
            self._store(self._chunk_decoder.feed(b"", last=True))
            self._end_of_message(self._chunk_decoder.bare_newline)
        elif self._too_big:
            # RFC 3030 §2: a failed chunk fails the transaction; the client must not go on.
            self._reset_transaction()
            self._answer(Refusal(552, "5.3.4", "Error: message size exceeds fixed maximum "
                                               "message size"))
        else:
            self._reply(250, "2.0.0", f"{chunk.size} octets received")


def _parse_address(path: str, smtputf8: bool, enhanced: str):
    """Parse a MAIL/RCPT path; ``enhanced`` is 5.1.7 (sender) or 5.1.3 (recipient)."""
    if not smtputf8 and not path.isascii():
        raise CommandError(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
    try:
        return parse_path(path, utf8=smtputf8)
    except AddressError as e:
        raise CommandError(501, enhanced, f"Error: bad address syntax: {e}") from None


def _split_path(argument: str, keyword: str) -> tuple[str, list[str]]:
    """``FROM:<path> params`` -> (``<path>``, params); tolerates a space after the colon."""
    head, colon, rest = argument.partition(":")
    if not colon or head.strip(" ").upper() != keyword:
        raise _syntax(f"{'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
    rest = rest.lstrip(" ")
    end = _path_end(rest)
    if end < 0:
        raise _syntax("address must be enclosed in <>")
    path, parameters = rest[:end + 1], rest[end + 1:]
    if parameters and not parameters.startswith(" "):
        raise _syntax("parameters must follow the address after a space")
    return path, parameters.split()


def _path_end(text: str) -> int:
    """Index of the ``>`` that closes a path starting at ``text[0]``, or -1."""
    if not text.startswith("<"):
        return -1
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _parse_bdat(argument: str) -> tuple[int, bool]:
    words = argument.split()
    valid = (1 <= len(words) <= 2 and words[0].isdigit() and words[0].isascii()
             and len(words[0]) <= _MAX_SIZE_DIGITS
             and (len(words) == 1 or words[1].upper() == "LAST"))
    if not valid:
        raise _syntax("BDAT <size> [LAST]")
    return int(words[0]), len(words) == 2


class _RefusedConnection(protocol.Protocol):
    """Over a connection cap: say why (RFC 5321 §3.8: 421 at greeting) and hang up."""

    def __init__(self, hostname: str, reason: str):
        self._hostname, self._reason = hostname, reason

    def connectionMade(self) -> None:
        self.transport.write(f"421 4.7.0 {self._hostname} {self._reason}\r\n".encode())
        self.transport.loseConnection()


class SMTPFactory(protocol.Factory):
    """Builds sessions for one SMTP, implicit-TLS SMTP or LMTP listener."""

    noisy = False  # ListenerService logs where it listens; no "Starting factory" lines

    log = Logger()

    def __init__(self, *, config, users, store, clock, run_in_thread, limiter, tls=None,
                 lmtp: bool = False, implicit_tls: bool = False, spares: int = 64):
        self.config = config
        self.hostname = config.hostname
        self.clock = clock
        self.limiter = limiter
        self.tls = tls
        self.lmtp = lmtp
        self.implicit_tls = implicit_tls
        self.commands = LMTP_COMMANDS if lmtp else SMTP_COMMANDS
        self.router = Router(config, users)
        self.deliverer = Deliverer(store, run_in_thread, hostname=self.hostname,
                                   now=clock.seconds, spares=spares)
        self.refusal_log = LogLimiter(clock)

    def stopFactory(self) -> None:
        """The last listener using this factory stopped: remove the spare files."""
        self.deliverer.close()

    def buildProtocol(self, addr) -> protocol.Protocol:
        host = getattr(addr, "host", None) or "local socket"
        reason = self.limiter.acquire(host)
        if reason is not None:
            if self.refusal_log.allow((host, reason)):
                self.log.warn("refused connection from {host}: {reason}",
                              host=host, reason=reason)
            return _RefusedConnection(self.hostname, reason)
        return SMTPServer(self, host)
