"""popgate's ESMTP / LMTP server protocol and its factory.

Implements RFC 5321 (SMTP) with PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME
(RFC 6152), ENHANCEDSTATUSCODES (RFC 2034/3463), SMTPUTF8 (RFC 6531), CHUNKING (BDAT,
RFC 3030) and STARTTLS (RFC 3207); with ``lmtp=True`` the same machine speaks LMTP
(RFC 2033: ``LHLO``, one reply per accepted recipient after the message).  There is no
AUTH here: this receiver only accepts mail for its local users.  Authenticated
submission (AUTH, sender policy, the outbound queue) is :mod:`popgate.smtp.submission`,
a subclass using the hooks :meth:`SMTPServer.check_sender`, :meth:`SMTPServer.route`,
:meth:`SMTPServer.arrival` and :meth:`SMTPServer.begin_transaction`.

Wire format: command lines end with CRLF (a bare LF is tolerated) and are at most 512
octets (RFC 5321 §4.5.3.1.4); every reply carries an enhanced status code.  Message data
is decoded by :mod:`popgate.codec` (only ``CRLF.CRLF`` ends DATA; only the declared length
ends a BDAT chunk) and streamed to :mod:`popgate.smtp.delivery`, which stores it with LF
line ends.

State lives in plain objects beside the protocol (:mod:`popgate.smtp.session`): the
:class:`~popgate.smtp.session.Session` (HELO, TLS), the
:class:`~popgate.smtp.session.Envelope` of the transaction, and at most one
:class:`~popgate.smtp.session.MessageInFlight`, the message whose body is being received
or committed.  ``_mode`` says how input bytes are read (command lines, the tail of an
over-long line being discarded, DATA, a BDAT chunk).  The input loop, back-pressure, the
push producer, closing and the connection caps come from :mod:`popgate.lineproto`: when a
command's answer is asynchronous (the end of a message waits for fsync) no later input is
consumed until the answer is written, so replies always come back in order (RFC 2920
§3.1), and a client that pipelines without reading the replies cannot make the server
buffer without bound.

Bounds: a partial command line is buffered up to 512 octets, the rest of a longer line is
discarded as it arrives; DATA and BDAT bytes go to disk as they arrive, counted against
``smtp.max_message_size``; at most ``smtp.max_recipients`` recipients; after
``smtp.max_errors`` protocol errors the session is closed; command, data and total session
timeouts come from the injected clock (RFC 5321 §4.5.3.2).

Everything the session does is published on the :class:`~popgate.events.EventBus`
(connected, command, reply, tls, message, refused, closed); the log lines come from
there.  Concurrency: everything runs on the reactor thread; only file creation and fsync
go to the thread pool (through :class:`~popgate.smtp.delivery.Deliverer`).
"""

from __future__ import annotations

import enum
import re

from twisted.internet import defer
from twisted.logger import Logger

from popgate.addresses import AddressError, parse_path
from popgate.codec import SUMMARY_HEAD, ChunkDecoder, DataDecoder, header_summary
from popgate.events import redact
from popgate.lineproto import LOCAL_PEER, LineSession, SessionFactory
from popgate.smtp.delivery import (
    Arrival,
    Deliverer,
    Recipient,
    Resolution,
    Router,
    storage_refusal,
)
from popgate.smtp.reply import CANNOT_STORE, INTERNAL_ERROR, TOO_BIG, Reply
from popgate.smtp.session import Chunk, Envelope, MessageInFlight, Session, Stage

MAX_COMMAND_LINE = 512  # octets including CRLF, RFC 5321 §4.5.3.1.4
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


class SMTPCommandError(Exception):
    """A command refused with a reply; 5xx ones count towards ``smtp.max_errors``."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = Reply(code, enhanced, text)


def _syntax(text: str) -> SMTPCommandError:
    return SMTPCommandError(501, "5.5.4", f"Syntax: {text}")


def _sequence(text: str) -> SMTPCommandError:
    return SMTPCommandError(503, "5.5.1", text)


class SMTPServer(LineSession):
    """One SMTP or LMTP session."""

    log = Logger()
    finish_on_shutdown = frozenset({"commit"})  # a message being made durable is answered

    def __init__(self, factory: SMTPFactory, slot_host: str):
        super().__init__(factory, slot_host)
        self.settings = factory.config.smtp
        self.session = Session(secure=factory.implicit_tls)
        self.envelope = Envelope()
        self.message: MessageInFlight | None = None
        self._mode = Mode.COMMAND
        self._buffer = b""
        self._position = 0  # start of the unread input in _buffer
        self._owed: defer.Deferred | None = None  # the asynchronous reply owed, if any
        self._errors = 0
        self._chunk: Chunk | None = None  # the BDAT chunk being read (Mode.CHUNK)
        self._idle_timer = None
        self._session_timer = None
        self._expired: str | None = None  # the session's time ran out during a commit

    # -- connection ------------------------------------------------------------------

    def greet(self) -> None:
        kind = "LMTP" if self.factory.lmtp else "ESMTP"
        self._reply(220, None, f"{self.factory.hostname} {kind} popgate")
        self._session_timer = self.clock.callLater(self.settings.max_session_time,
                                                   self._timed_out, "session time limit")
        self._restart_idle_timer()

    def ended(self, reason: str) -> None:
        self._cancel_timers()
        self._abort_message()
        self.events.publish("closed", self.info, reason=reason, user=self.session.user,
                            duration=self.clock.seconds() - self.started_at,
                            messages=self.session.messages,
                            tls=self.session.tls if self.session.secure else None)

    def close(self, reason: str) -> None:
        self._cancel_timers()
        self._abort_message()
        super().close(reason)

    def tls_started(self, description: str) -> None:
        self.session.tls = description

    # -- timers -----------------------------------------------------------------------

    def _restart_idle_timer(self) -> None:
        """Command timeout between commands, data timeout per block (RFC 5321 §4.5.3.2).

        While we owe an answer the timer keeps running but does not fire (see
        :meth:`_idle_timeout`): the client is not the one who is late.  Resetting a running
        timer is cheaper than cancelling it and making a new one, and this runs several
        times per message.
        """
        if self.closing:
            return
        in_data = self._mode in (Mode.DATA, Mode.CHUNK)
        timeout = self.settings.data_timeout if in_data else self.settings.command_timeout
        timer = self._idle_timer
        if timer is not None and timer.active():
            timer.reset(timeout)
        else:
            self._idle_timer = self.clock.callLater(timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self._owed is None:  # else the timer starts again once the answer is written
            self._timed_out("timeout")

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._session_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._session_timer = None

    def _timed_out(self, what: str) -> None:
        if self.operation in self.finish_on_shutdown:
            # A message being made durable is answered first, as in a drain: a lost 250
            # would make the client send it again (see _done_waiting).
            self._expired = what
            return
        self._reply(421, "4.4.2", f"{self.factory.hostname} Error: {what} exceeded")
        self.close(f"{what} in {self._mode.value}")

    # -- input --------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        self._buffer += data
        if self._mode in (Mode.DATA, Mode.CHUNK):
            self._restart_idle_timer()

    def backlog(self) -> int:
        return len(self._buffer) - self._position

    def input_consumed(self) -> None:
        self._buffer = self._buffer[self._position:]
        self._position = 0

    def goodbye(self) -> None:
        # RFC 5321 §3.8: a server that must stop answers 421 to whatever comes next.
        self._reply(421, "4.3.2", f"{self.factory.hostname} Service shutting down, "
                                  f"try again later")

    def overflow(self) -> None:
        self._reply(421, "4.7.0", f"{self.factory.hostname} Error: too much pipelined input")
        self.close("too much pipelined input")

    def step(self) -> bool:
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
            self.log.failure("{proto} {peer}: internal error in {mode}",
                             proto=self.info.protocol, peer=self.info.client, mode=mode.value)
            self._answer(INTERNAL_ERROR)
            if mode is not Mode.COMMAND:
                # Where a message ends in the stream is no longer certain: reading on
                # could run message content as commands.
                self.close("internal error")
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
        self._refuse(SMTPCommandError(500, "5.5.2", "Error: line too long"))
        return True

    def _run_command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(SMTPCommandError(500, "5.5.2", "Error: invalid UTF-8 in command"))
            return
        if self.events.wants("command"):
            # No AUTH here, but a client may send one anyway, with its password in the
            # initial response (RFC 4954 §4), or a POP3 PASS: never published.
            self.events.publish("command", self.info, line=redact(text))
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb not in self.factory.commands:
            self._refuse(SMTPCommandError(500, "5.5.2", "Error: command not recognized"))
            return
        try:
            getattr(self, "smtp_" + verb)(argument.strip(" "))
        except SMTPCommandError as e:
            self._refuse(e)

    # -- replies ------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Write reply bytes (one or more complete replies) and show them to observers."""
        if self.closing:
            return
        self.transport.write(data)
        if self.events.wants("reply"):
            lines = data.decode("utf-8", "replace").split("\r\n")[:-1]
            self.events.publish("reply", self.info, line=lines[0], lines=len(lines))

    def _reply(self, code: int, enhanced: str | None, *lines: str) -> None:
        prefix = f"{enhanced} " if enhanced else ""
        out = [f"{code}-{prefix}{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {prefix}{lines[-1]}\r\n")
        self._write("".join(out).encode("utf-8"))

    def _answer(self, reply: Reply) -> None:
        self._reply(reply.code, reply.enhanced, reply.text)

    def _refuse(self, error: SMTPCommandError) -> None:
        """Answer and publish a refusal; too many 5xx ones end the session (an
        enumeration brake)."""
        reply = error.reply
        self._answer(reply)
        self.events.publish("refused", self.info, reason=reply.text,
                            reply=f"{reply.code} {reply.enhanced} {reply.text}")
        if reply.code < 500:
            return
        self._errors += 1
        if self._errors >= self.settings.max_errors:
            self._reply(421, "4.7.0", f"{self.factory.hostname} Error: too many errors")
            self.close(f"closed after {self._errors} errors")

    def _wait_for(self, d: defer.Deferred, operation: str, then=None) -> None:
        """Consume no input until ``d`` (and ``then``, its next step) has fired.

        The wait is registered before ``then`` is added, so that a wait started by
        ``then`` (``BDAT 0 LAST`` finishing the message right after its files were
        opened) replaces this one even when ``d`` has fired already; only the newest wait
        ends the pause, so replies stay in order (RFC 2920 §3.1).
        """
        self._owed = d
        self.begin_operation(operation)
        self._restart_idle_timer()
        if then is not None:
            d.addCallback(then)
        d.addErrback(self._internal_error)
        d.addBoth(self._done_waiting, d)

    def _done_waiting(self, _ignored, d: defer.Deferred) -> None:
        if self._owed is not d:
            return
        self._owed = None
        if self._expired is not None:
            self.operation = None
            self._timed_out(self._expired)
            return
        self._restart_idle_timer()
        self.end_operation()

    def _internal_error(self, failure) -> None:
        self.log.failure("{proto} {peer}: internal error", failure, proto=self.info.protocol,
                         peer=self.info.client)
        self._answer(INTERNAL_ERROR)

    # -- session state ------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._abort_message()
        self.envelope = Envelope()

    def _abort_message(self) -> None:
        message, self.message = self.message, None
        if message is not None:
            message.abort()

    def _protocol_keyword(self) -> str:
        """The Received ``with`` keyword (RFC 3848, RFC 6531 §3.7.3)."""
        smtputf8 = self.envelope.smtputf8
        if self.factory.lmtp:
            keyword = "UTF8LMTP" if smtputf8 else "LMTP"
        elif self.session.esmtp:
            keyword = "UTF8SMTP" if smtputf8 else "ESMTP"
        else:
            return "SMTP"
        return keyword + "S" if self.session.secure else keyword

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
        self.session.helo, self.session.esmtp = argument, esmtp
        if not esmtp:
            self._reply(250, None, self.factory.hostname)
            return
        self._reply(250, None, self.factory.hostname, *self._extensions())

    def _extensions(self) -> list[str]:
        extensions = [f"SIZE {self.settings.max_message_size}", "8BITMIME", "PIPELINING",
                      "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING"]
        if self.factory.tls is not None and not self.session.secure:
            extensions.append("STARTTLS")
        return extensions

    # -- the envelope --------------------------------------------------------------------

    def smtp_MAIL(self, argument: str) -> None:
        if self.session.helo is None:
            raise _sequence("Error: send EHLO first")
        if self.envelope.started:
            raise _sequence("Error: nested MAIL command")
        path, parameters = _split_path(argument, "FROM")
        body, smtputf8 = self._parse_mail_parameters(parameters)
        sender = _parse_address(path, smtputf8, "5.1.7")
        self.check_sender(sender)
        self.envelope.sender = "" if sender is None else str(sender)
        self.envelope.body, self.envelope.smtputf8 = body, smtputf8
        self._write(_MAIL_OK)

    def check_sender(self, sender) -> None:
        """Raise SMTPCommandError for a sender this listener refuses (submission does)."""

    def _parse_mail_parameters(self, parameters: list[str]) -> tuple[str, bool]:
        """Check MAIL's ESMTP parameters; return (BODY type, SMTPUTF8 given)."""
        if parameters and not self.session.esmtp:
            raise SMTPCommandError(555, "5.5.4", "Error: parameters need EHLO")
        values: dict[str, str | None] = {}
        for parameter in parameters:
            keyword, has_value, value = parameter.partition("=")
            keyword = keyword.upper()
            if not _ESMTP_KEYWORD.match(keyword) or (has_value and not _ESMTP_VALUE.match(value)):
                raise _syntax("MAIL FROM:<address> [SIZE=n] [BODY=type] [SMTPUTF8]")
            if keyword not in ("SIZE", "BODY", "SMTPUTF8"):
                raise SMTPCommandError(555, "5.5.4", f"Error: unsupported parameter {keyword}")
            if keyword in values:
                raise _syntax(f"{keyword} given twice")
            values[keyword] = value if has_value else None
        if "SIZE" in values:
            self._check_declared_size(values["SIZE"])
        body = values.get("BODY", "7BIT")
        if body is not None and body.upper() == "BINARYMIME":
            raise SMTPCommandError(555, "5.5.4", "Error: BODY=BINARYMIME is not supported")
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
            raise SMTPCommandError(TOO_BIG.code, TOO_BIG.enhanced, TOO_BIG.text)

    def smtp_RCPT(self, argument: str) -> None:
        if not self.envelope.started:
            raise _sequence("Error: need MAIL command")
        path, parameters = _split_path(argument, "TO")
        if parameters:
            raise SMTPCommandError(555, "5.5.4", "Error: RCPT parameters are not supported")
        if len(self.envelope.recipients) >= self.settings.max_recipients:
            # RFC 5321 §4.5.3.1.10: a temporary failure, not counted as a client error.
            self._reply(452, "4.5.3", "Error: too many recipients")
            return
        if path.lower() == "<postmaster>":
            address, resolution = "postmaster", self.factory.router.resolve_postmaster()
        else:
            mailbox = _parse_address(path, self.envelope.smtputf8, "5.1.3")
            if mailbox is None:
                raise SMTPCommandError(501, "5.1.3", "Error: the null path is not a recipient")
            address, resolution = str(mailbox), self.route(mailbox)
        if resolution.refusal is not None:
            refusal = resolution.refusal
            raise SMTPCommandError(refusal.code, refusal.enhanced,
                                   f"<{address}>: {refusal.text}")
        self.envelope.recipients.append(Recipient(address, resolution.users))
        self._write(_RCPT_OK)

    def route(self, mailbox) -> Resolution:
        """Where a ``RCPT TO`` mailbox goes: local users, or a refusal (relay denied)."""
        return self.factory.router.resolve(mailbox)

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
                     if c != "STARTTLS" or (self.factory.tls is not None
                                            and not self.session.secure)]
        self._reply(214, "2.0.0", "Commands: " + " ".join(available),
                    "See RFC 5321" if not self.factory.lmtp else "See RFC 2033")

    def smtp_EXPN(self, argument: str) -> None:
        # RFC 5321 §3.5.2 / §4.2.4: recognised, deliberately not implemented (mailing-list
        # expansion would enumerate users): 502, not "unknown command".
        raise SMTPCommandError(502, "5.5.1", "Error: EXPN is not available")

    def smtp_QUIT(self, argument: str) -> None:
        if argument:
            raise _syntax("QUIT")
        self._reply(221, "2.0.0", "Bye")
        self.close("quit")

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            raise _syntax("STARTTLS")
        if self.factory.tls is None:
            raise SMTPCommandError(502, "5.5.1", "Error: STARTTLS is not available")
        if self.session.secure:
            raise _sequence("Error: TLS is already active")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 §4.2 / CVE-2011-0411: anything the client sent after STARTTLS in
        # plaintext could have been injected by an attacker; it must not run inside TLS.
        self._buffer, self._position = b"", 0
        self.session.secure = True
        self.session.forget_greeting()
        self._reset_transaction()
        self.transport.startTLS(self.factory.tls)

    # -- message data ---------------------------------------------------------------------

    def _check_ready_for_data(self) -> None:
        if not self.envelope.started:
            raise _sequence("Error: need MAIL command")
        if not self.envelope.recipients:
            if self.factory.lmtp:
                raise _sequence("Error: no valid recipients")  # RFC 2033 §4.2
            raise SMTPCommandError(554, "5.5.1", "Error: no valid recipients")

    def _open_message(self, chunking: bool) -> defer.Deferred:
        """Start a :class:`MessageInFlight` and the opening of its files.

        The Deferred fires once the files are open (the message then RECEIVING, its
        transaction set) or could not be (the message then refused with ``451``), either
        way with nothing to answer yet.
        """
        message = self.message = MessageInFlight(chunking=chunking)
        d = self.begin_transaction(self.arrival())
        d.addCallbacks(self._files_opened, self._files_not_opened,
                       callbackArgs=(message,), errbackArgs=(message,))
        return d

    def arrival(self) -> Arrival:
        """What the message's trace headers say about how it arrived."""
        return Arrival(
            sender=self.envelope.sender,
            recipients=tuple(self.envelope.recipients),
            helo=self.session.helo,
            client_ip=None if self.client_host == LOCAL_PEER else self.client_host,
            protocol=self._protocol_keyword(),
            tls=self.session.tls if self.session.secure else None,  # from the handshake
        )

    def begin_transaction(self, arrival: Arrival) -> defer.Deferred:
        """Open the message's files; fires with a Transaction (see Deliverer.begin)."""
        return self.factory.deliverer.begin(arrival)

    def _files_opened(self, transaction, message: MessageInFlight) -> None:
        if self.message is not message or message.refusal is not None:
            transaction.abort()  # the session or the transaction ended meanwhile
            return
        message.transaction = transaction
        message.stage = Stage.RECEIVING

    def _files_not_opened(self, failure, message: MessageInFlight) -> None:
        if failure.check(OSError):  # an expected fault (a full disk): one line, no traceback
            refusal = storage_refusal(failure.value, self.factory.refusal_log)
        else:
            self.log.failure("cannot open a message", failure)
            refusal = CANNOT_STORE
        message.stage = Stage.RECEIVING
        message.refuse(refusal)

    def smtp_DATA(self, argument: str) -> None:
        if argument:
            raise _syntax("DATA")
        self._check_ready_for_data()
        if self.message is not None and self.message.chunking:
            # RFC 3030 §3: DATA and BDAT do not mix in one transaction.
            raise _sequence("Error: use BDAT for this message")
        # 354 goes out at once, in the same write as the replies pipelined before DATA,
        # while the files are opened (a thread hop).  Message data that arrives first
        # waits in the input buffer (bounded by lineproto's back-pressure); if the files
        # cannot be opened, the data is read and the message refused at its end (451).
        d = self._open_message(chunking=False)
        d.addCallback(lambda _: self.process_input())
        d.addErrback(self._internal_error_in_data)
        self.message.data_decoder = DataDecoder()
        self._mode = Mode.DATA
        # RFC 2034 §4 allows 354 without an enhanced code; clients expect it bare.
        self._write(_GO_AHEAD)
        self._restart_idle_timer()

    def _internal_error_in_data(self, failure) -> None:
        self.log.failure("{proto} {peer}: internal error in DATA", failure,
                         proto=self.info.protocol, peer=self.info.client)
        self._answer(INTERNAL_ERROR)
        self.close("internal error")

    def _read_data(self) -> bool:
        message = self.message
        if message.stage is Stage.OPENING:
            return False  # the data waits in the buffer until there is a file for it
        data = self._buffer[self._position:] if self._position else self._buffer
        body, rest = message.data_decoder.feed(data)
        self._write_body(body)
        if rest is None:
            self._position = len(self._buffer)
            return True
        self._position = len(self._buffer) - len(rest)
        self._back_to_commands()
        self._end_of_message(message.data_decoder.bare_newline)
        return True

    def _write_body(self, body: bytes) -> None:
        """Count and write decoded (LF) body bytes; over the limit, keep only counting."""
        if not body:
            return
        message = self.message
        message.size += len(body) + body.count(b"\n")  # as sent: CRLF line ends
        if len(message.head) < SUMMARY_HEAD:
            message.head += body[:SUMMARY_HEAD - len(message.head)]
        if message.transaction is None:
            return  # refused already: only counting
        if message.size > self.settings.max_message_size:
            message.refuse(TOO_BIG)
            return
        message.transaction.write(body)

    def _back_to_commands(self) -> None:
        self._mode = Mode.COMMAND
        self._restart_idle_timer()

    def _end_of_message(self, bare_newline: bool) -> None:
        """The whole message is in: refuse it, or deliver it and answer after fsync."""
        message, recipients = self.message, self.envelope.recipients
        self.message = None  # its fate is decided here, not by the reset below
        self._reset_transaction()
        transaction = message.transaction
        if transaction is None:  # refused on the way: too big, or no files
            self._answer_message(recipients, message.refusal or TOO_BIG)
            return
        if bare_newline and self.settings.bare_newline == "reject":
            message.abort()
            self._answer_message(recipients, Reply(
                554, "5.6.0", "Error: bare <CR> or <LF> in message data is not allowed"))
            return
        message.stage = Stage.COMMITTING
        d = transaction.finish()
        d.addCallbacks(self._delivered, self._not_delivered,
                       callbackArgs=(transaction, recipients, message, self.clock.seconds()),
                       errbackArgs=(transaction, recipients))
        self._wait_for(d, "commit")

    def _delivered(self, refusal: Reply | None, transaction, recipients,
                   message: MessageInFlight, data_ended: float) -> None:
        if refusal is not None:  # a message check said no
            self._answer_message(recipients, refusal)
            return
        self.session.messages += 1
        arrival = transaction.arrival
        if transaction.users:  # else only queued for relay (submission publishes that)
            # Only transcripts (trace, dashboard) show the summary: as for POP3's RETR,
            # the headers are parsed when something takes replies, not per message always.
            summary = header_summary(message.head) if self.events.wants("reply") else ""
            self.events.publish(
                "message", self.info, action="delivered", id=transaction.id,
                sender=arrival.sender, recipients=tuple(r.address for r in recipients),
                users=tuple(u.name for u in transaction.users),
                octets=transaction.stored_octets, list_octets=transaction.list_octets,
                tls=arrival.tls, summary=summary,
                latency=self.clock.seconds() - data_ended)  # end of data to 250
        self._answer_message(recipients, Reply(250, "2.0.0", f"Ok: queued as {transaction.id}"))

    def _not_delivered(self, failure, transaction, recipients) -> None:
        if failure.check(OSError):  # an expected fault (a full disk): one line, no traceback
            refusal = storage_refusal(failure.value, self.factory.refusal_log)
        else:
            self.log.failure("{id}: delivery failed", failure, id=transaction.id)
            refusal = CANNOT_STORE
        self._answer_message(recipients, refusal)

    def _answer_message(self, recipients, answer: Reply) -> None:
        """One reply (SMTP), or one per accepted recipient in order (LMTP, RFC 2033 §4.2)."""
        if not self.factory.lmtp:
            self._answer(answer)
            return
        for recipient in recipients:
            self._reply(answer.code, answer.enhanced, f"<{recipient.address}> {answer.text}")

    # -- BDAT (RFC 3030) -----------------------------------------------------------------

    def smtp_BDAT(self, argument: str) -> None:
        size, last = _parse_bdat(argument)
        chunk = Chunk(size, last)
        try:
            self._check_ready_for_data()
        except SMTPCommandError as e:
            chunk.refusal = e.reply  # the chunk is read anyway, then refused (RFC 3030 §2)
        if chunk.refusal is not None or self.message is not None:
            self._start_chunk(chunk)
            return
        d = self._open_message(chunking=True)
        message = self.message
        message.chunk_decoder = ChunkDecoder()
        self._wait_for(d, "opening the message files",
                       then=lambda _: self._files_ready_for_chunk(chunk, message))

    def _files_ready_for_chunk(self, chunk: Chunk, message: MessageInFlight) -> None:
        if self.message is not message:
            return  # the session closed (or was drained) while the files were opened
        self._start_chunk(chunk)

    def _start_chunk(self, chunk: Chunk) -> None:
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
            self._write_body(self.message.chunk_decoder.feed(data))
        if chunk.remaining == 0:
            self._end_of_chunk()
        return True

    def _refuse_chunk(self, chunk: Chunk) -> None:
        """RFC 3030 §2: a refused chunk fails the whole transaction, so chunks pipelined
        after it are read, discarded and refused too (503: no transaction)."""
        recipients = self.envelope.recipients
        if self.envelope.started:
            self._reset_transaction()
        refusal = chunk.refusal
        if chunk.last and self.factory.lmtp and recipients:
            self._answer_message(recipients, refusal)  # RFC 2033 §4.2: one per recipient
            return
        self._refuse(SMTPCommandError(refusal.code, refusal.enhanced, refusal.text))

    def _end_of_chunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        self._back_to_commands()
        if chunk.refusal is not None:
            self._refuse_chunk(chunk)
        elif chunk.last:
            decoder = self.message.chunk_decoder
            self._write_body(decoder.feed(b"", last=True))
            self._end_of_message(decoder.bare_newline)
        elif self.message.refusal is not None:
            # RFC 3030 §2: a failed chunk fails the transaction; the client must not go on.
            refusal = self.message.refusal
            self._reset_transaction()
            self._answer(refusal)
        else:
            self._reply(250, "2.0.0", f"{chunk.size} octets received")


def _parse_address(path: str, smtputf8: bool, enhanced: str):
    """Parse a MAIL/RCPT path; ``enhanced`` is 5.1.7 (sender) or 5.1.3 (recipient)."""
    if not smtputf8 and not path.isascii():
        raise SMTPCommandError(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
    try:
        return parse_path(path, utf8=smtputf8)
    except AddressError as e:
        raise SMTPCommandError(501, enhanced, f"Error: bad address syntax: {e}") from None


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



class SMTPFactory(SessionFactory):
    """Builds sessions for one SMTP, implicit-TLS SMTP or LMTP listener.

    The router and the deliverer are the process's own (built once by
    :func:`popgate.service.makeService`), shared by every SMTP-side listener.
    """

    session_class = SMTPServer

    def __init__(self, *, config, router: Router, deliverer: Deliverer, clock, limiter,
                 events, tls=None, lmtp: bool = False, implicit_tls: bool = False,
                 sessions=None):
        super().__init__(config=config, clock=clock, limiter=limiter, events=events, tls=tls,
                         implicit_tls=implicit_tls, sessions=sessions)
        self.lmtp = lmtp
        self.protocol_name = "LMTP" if lmtp else "SMTP"
        self.commands = LMTP_COMMANDS if lmtp else SMTP_COMMANDS
        self.router = router
        self.deliverer = deliverer

    def refusal_line(self, reason: str) -> bytes:
        # RFC 5321 §3.8: a server that cannot serve answers 421 instead of its greeting.
        return f"421 4.7.0 {self.hostname} {reason}\r\n".encode()
