"""Authenticated message submission (RFC 6409) on the SMTP skeleton.

:class:`SubmissionServer` is :class:`~popgate.smtp.server.SMTPServer` with a policy:

* **AUTH** (RFC 4954) with ``PLAIN`` and ``LOGIN`` (:mod:`popgate.auth.sasl`), through
  the same :class:`~popgate.auth.login.Authenticator` as POP3 (penalty delays, the bound
  per address, ``login`` events).  It is offered only under TLS or from loopback
  (:func:`~popgate.auth.login.plaintext_allowed`); elsewhere AUTH answers ``538 5.7.11``.
  Challenges are ``334 base64``; ``*`` cancels (``501 5.0.0``); success ``235 2.7.0``,
  a wrong password ``535 5.7.8`` after the penalty; ``limits.auth_max_failures`` failures
  end the session.  AUTH lines and SASL responses reach ``command`` events as
  ``********``.
* **MAIL needs AUTH** (``530 5.7.0``).  The sender must be one of the user's addresses
  (:meth:`~popgate.smtp.delivery.Router.may_send_as`), else ``553 5.7.1``; the null
  sender is refused (a user's program has no reason to send a bounce).
* **A rate limit** per user: at most ``submission.max_messages_per_hour`` recipients in
  any hour (:class:`SendingLimit`), counted when a message is accepted; a ``RCPT`` over
  it gets ``450 4.7.1``.
* **Recipients**: local ones as on port 25; others, with ``relay.mode = "smarthost"``,
  go to the outbound queue (:mod:`popgate.relay.queue`); with ``mode = "none"`` they are
  refused as on port 25 (``554 5.7.1``).
* **The message** is written to the recipients' Maildirs and to the queue at once
  (:class:`SubmittedTransaction`); the ``250`` comes only when both are durable.  The
  queue's copy gets ``Message-ID``/``Date`` when missing and a DKIM signature
  (:func:`popgate.relay.sign.prepare`) in the commit's thread, once, before the ``250``:
  the queued file is what every attempt sends.
  ``Received:`` says ``ESMTPSA``/``ESMTPA`` (RFC 3848) and names the user only with
  ``submission.show_auth_user``.

Bounds: a SASL response is read like a command line, at most 512 octets (RFC 4954 §4
lets a server accept up to 12288; PLAIN with an address and a password of a few hundred
characters fits); an over-long one is refused with ``500 5.5.2`` and ends the exchange.
The rate limit keeps one timestamped count per accepted message and user for an hour.

Concurrency: reactor thread; file creation and fsync run through ``run_in_thread``.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
from collections import deque
from functools import partial

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer

from popgate.auth import sasl
from popgate.auth.account import IAccount
from popgate.auth.login import Authenticator, LoginAttempt, LoginFailed, plaintext_allowed
from popgate.events import SECRET
from popgate.relay import sign
from popgate.relay.queue import Envelope as QueuedEnvelope
from popgate.relay.queue import Queue, QueuedRecipient
from popgate.smtp.delivery import (
    Arrival,
    Resolution,
    Transaction,
    new_transaction_id,
    received_header,
)
from popgate.smtp.reply import Reply
from popgate.smtp.server import SMTP_COMMANDS, SMTPCommandError, SMTPFactory, SMTPServer

HOUR = 3600.0
_AUTH_REQUIRED = SMTPCommandError(530, "5.7.0", "Authentication required")


class SendingLimit:
    """Recipients each user was accepted for in the last hour (a sliding window)."""

    def __init__(self, clock, per_hour: int):
        self._clock = clock
        self.per_hour = per_hour
        self._sent: dict[str, deque[tuple[float, int]]] = {}

    def used(self, user: str) -> int:
        window = self._sent.get(user)
        if not window:
            return 0
        start = self._clock.seconds() - HOUR
        while window and window[0][0] <= start:
            window.popleft()
        if not window:
            del self._sent[user]
            return 0
        return sum(count for _, count in window)

    def record(self, user: str, recipients: int) -> None:
        self._sent.setdefault(user, deque()).append((self._clock.seconds(), recipients))


class SubmittedTransaction:
    """One submitted message: a Maildir :class:`Transaction` for the local recipients, a
    queue file for the remote ones, or both; it is durable when both parts are."""

    def __init__(self, transaction_id: str, arrival: Arrival, local: Transaction | None,
                 queued, run_in_thread, prepare=None):
        self.id = transaction_id
        self._prepare = prepare  # queue file bytes -> bytes, in the commit's thread
        self.arrival = arrival
        self._local = local
        self._queued = queued  # a popgate.relay.queue.Incoming, or None
        self._run_in_thread = run_in_thread
        self._error: OSError | None = None

    @property
    def queued(self) -> bool:
        return self._queued is not None

    @property
    def queued_octets(self) -> int:
        return self._queued.size

    @property
    def users(self):
        return self._local.users if self._local is not None else []

    @property
    def stored_octets(self) -> int:
        return self._local.stored_octets if self._local is not None else self._queued.size

    @property
    def list_octets(self) -> int:
        return self._local.list_octets if self._local is not None else self._queued.size

    def write(self, data: bytes) -> None:
        if self._local is not None:
            self._local.write(data)
        if self._queued is not None and self._error is None:
            try:
                self._queued.write(data)
            except OSError as e:
                self._error = e

    def finish(self) -> defer.Deferred:
        """Fires with None once every part is durable, or with a check's refusal.

        The Maildir part is committed first: if the queue part then fails, the client is
        told ``451`` and its retry may deliver the local copies twice (never zero times).
        """
        if self._error is not None:
            self.abort()
            return defer.fail(self._error)
        d = self._local.finish() if self._local is not None else defer.succeed(None)
        return d.addCallback(self._commit_queued)

    def _commit_queued(self, refusal: Reply | None):
        if self._queued is None:
            return refusal
        if refusal is not None:
            self._queued.abort()
            return refusal
        try:
            self._queued.flush()
        except OSError:
            self._queued.abort()
            raise
        d = self._run_in_thread(self._queued.commit, self._prepare)
        d.addErrback(self._queue_failed)
        return d

    def _queue_failed(self, failure):
        self._queued.abort()
        return failure

    def abort(self) -> None:
        if self._local is not None:
            self._local.abort()
        if self._queued is not None:
            self._queued.abort()


class SubmissionServer(SMTPServer):
    """One submission session (see the module docstring)."""

    def __init__(self, factory: SubmissionFactory, slot_host: str):
        super().__init__(factory, slot_host)
        self._sasl: sasl.Exchange | None = None
        self._login: defer.Deferred | None = None
        self._auth_failures = 0

    def ended(self, reason: str) -> None:
        if self._login is not None:
            self._login.cancel()
        super().ended(reason)

    # -- what the session offers and says -------------------------------------------

    def _plaintext_allowed(self) -> bool:
        return plaintext_allowed(self.session.secure, self.client_host,
                                 self.factory.config.tls.allow_plaintext_auth)

    def _extensions(self) -> list[str]:
        extensions = super()._extensions()
        if self.session.user is None and self._plaintext_allowed():
            extensions.append("AUTH " + " ".join(sasl.MECHANISMS))
        return extensions

    def _protocol_keyword(self) -> str:
        keyword = super()._protocol_keyword()
        # RFC 3848 §2: ESMTPA / ESMTPSA (and UTF8SMTPA / UTF8SMTPSA, RFC 6531 §3.7.3).
        return keyword + "A" if self.session.user and keyword != "SMTP" else keyword

    def arrival(self) -> Arrival:
        arrival = super().arrival()
        if self.factory.config.submission.show_auth_user:
            arrival = dataclasses.replace(arrival, auth_user=self.session.user)
        return arrival

    # -- AUTH (RFC 4954) ----------------------------------------------------------------

    def _run_command(self, line: bytes) -> None:
        if self._sasl is None:
            super()._run_command(line)
            return
        if self.events.wants("command"):
            self.events.publish("command", self.info, line=SECRET)
        try:
            self._sasl_step(lambda exchange: exchange.step(line))
        except SMTPCommandError as e:
            self._refuse(e)

    def _refuse(self, error: SMTPCommandError) -> None:
        self._sasl = None  # any refusal (an over-long line too) ends a SASL exchange
        super()._refuse(error)

    def smtp_AUTH(self, argument: str) -> None:
        if self.session.helo is None or not self.session.esmtp:
            raise SMTPCommandError(503, "5.5.1", "Error: send EHLO first")
        if self.session.user is not None:
            raise SMTPCommandError(503, "5.5.1", "Error: already authenticated")
        if self.envelope.started:
            # RFC 4954 §4: AUTH is not permitted during a mail transaction.
            raise SMTPCommandError(503, "5.5.1", "Error: AUTH not allowed in a transaction")
        words = argument.split(" ")
        if not argument or len(words) > 2:
            raise SMTPCommandError(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if words[0].upper() not in sasl.MECHANISMS:
            raise SMTPCommandError(504, "5.5.4", "Error: unrecognized authentication type")
        if not self._plaintext_allowed():
            raise SMTPCommandError(538, "5.7.11", "Error: encryption required for "
                                                  "requested authentication mechanism")
        self._sasl = sasl.exchange(words[0])
        initial = words[1].encode("ascii", "replace") if len(words) == 2 else None
        self._sasl_step(lambda exchange: exchange.first(initial))

    def _sasl_step(self, step) -> None:
        exchange = self._sasl
        try:
            result = step(exchange)
        except sasl.SASLCancelled:
            self._sasl = None
            raise SMTPCommandError(501, "5.0.0", "Authentication cancelled") from None
        except sasl.SASLError as e:
            self._sasl = None
            raise SMTPCommandError(501, "5.5.2", f"Error: {e}") from None
        if isinstance(result, bytes):
            self._write(b"334 " + base64.b64encode(result) + b"\r\n")
            return
        self._sasl = None
        if result.authzid and result.authzid != result.authcid:
            raise SMTPCommandError(535, "5.7.8", "Error: authorization identity refused")
        attempt = LoginAttempt(self.client_host, exchange.name, result.authcid,
                               UsernamePassword(result.authcid, result.password),
                               result.password)
        self._login = d = self.factory.authenticator.login(attempt, IAccount,
                                                           lambda: not self.closing)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(attempt,),
                       errbackArgs=(attempt,))
        self._wait_for(d, "login")

    def _logged_in(self, result, attempt: LoginAttempt) -> None:
        self._login = None
        if result is None:
            return  # the session closed before the check
        account, logout = result
        logout()  # an account holds nothing
        self.session.user = account.name
        self.publish_login(attempt, "ok", account.name)
        self._reply(235, "2.7.0", "Authentication successful")

    def _login_failed(self, failure, attempt: LoginAttempt) -> None:
        self._login = None
        if failure.check(defer.CancelledError):
            return
        if not failure.check(LoginFailed):
            self.log.failure("{proto} {peer}: login error", failure, proto=self.info.protocol,
                             peer=self.info.client)
            self.publish_login(attempt, "error")
            self._reply(454, "4.7.0", "Temporary authentication failure")
            return
        self.publish_login(attempt, "failed")
        self._auth_failures += 1
        self._answer(Reply(535, "5.7.8", "Authentication credentials invalid"))
        if self._auth_failures >= self.factory.config.limits.auth_max_failures:
            self._reply(421, "4.7.0", f"{self.factory.hostname} Error: too many "
                                      "authentication failures")
            self.close("too many authentication failures")

    def smtp_STARTTLS(self, argument: str) -> None:
        super().smtp_STARTTLS(argument)
        self.session.user = None  # RFC 3207 §4.2: forget what was learnt before TLS

    # -- the envelope ---------------------------------------------------------------------

    def smtp_MAIL(self, argument: str) -> None:
        if self.session.user is None and self.session.helo is not None:
            raise _AUTH_REQUIRED
        super().smtp_MAIL(argument)

    def check_sender(self, sender) -> None:
        if sender is None:
            raise SMTPCommandError(553, "5.7.1", "Error: the null sender is not allowed "
                                                 "on submission")
        if not self.factory.router.may_send_as(self.session.user, sender):
            raise SMTPCommandError(553, "5.7.1", f"<{sender}>: sender address not owned "
                                                 f"by {self.session.user}")

    def smtp_RCPT(self, argument: str) -> None:
        limit = self.factory.sending_limit
        if (self.envelope.started and limit.used(self.session.user)
                + len(self.envelope.recipients) >= limit.per_hour):
            raise SMTPCommandError(450, "4.7.1", "Error: sending limit of "
                                   f"{limit.per_hour} recipients per hour reached, "
                                   "try again later")
        super().smtp_RCPT(argument)

    def route(self, mailbox) -> Resolution:
        router = self.factory.router
        if (self.factory.queue is not None and not router.is_local(mailbox.domain)
                and not mailbox.has_relay_hack and not mailbox.is_literal):
            return Resolution()  # remote: no local users, no refusal
        return router.resolve(mailbox)

    # -- the message ----------------------------------------------------------------------

    def begin_transaction(self, arrival: Arrival) -> defer.Deferred:
        local = tuple(r for r in arrival.recipients if r.users)
        remote = tuple(r for r in arrival.recipients if not r.users)
        if not remote:
            d = self.factory.deliverer.begin(arrival)
        elif local:
            d = self.factory.deliverer.begin(dataclasses.replace(arrival, recipients=local))
        else:
            d = defer.succeed(None)
        return d.addCallback(self._open_queued, arrival, remote)

    def _open_queued(self, local: Transaction | None, arrival: Arrival, remote):
        if not remote:
            return local
        transaction_id = local.id if local is not None else new_transaction_id()
        envelope = QueuedEnvelope(
            id=transaction_id, sender=arrival.sender, user=self.session.user,
            recipients=[QueuedRecipient(r.address) for r in remote],
            created=self.clock.seconds())
        first = remote[0].address if len(remote) == 1 else None
        header = received_header(arrival, first, self.factory.hostname, transaction_id,
                                 email.utils.formatdate(localtime=True))
        trace = (header + "\n").encode("utf-8")
        d = self.factory.run_in_thread(_open_queue_file, self.factory.queue, envelope, trace)
        prepare = partial(sign.prepare, trace_octets=len(trace),
                          message_id=transaction_id, hostname=self.factory.hostname,
                          now=self.clock.seconds(), key_dir=self.factory.config.dkim_key_dir,
                          selector=self.factory.config.dkim.selector,
                          warn=lambda text: self.log.warn("{text}", text=text))

        def opened(queued):
            return SubmittedTransaction(transaction_id, arrival, local, queued,
                                        self.factory.run_in_thread, prepare)

        def failed(failure):
            if local is not None:
                local.abort()
            return failure

        return d.addCallbacks(opened, failed)

    def _delivered(self, refusal, transaction, recipients, *when) -> None:
        if refusal is None:
            self.factory.sending_limit.record(self.session.user, len(recipients))
            if isinstance(transaction, SubmittedTransaction) and transaction.queued:
                self.events.publish(
                    "message", self.info, action="queued", id=transaction.id,
                    sender=transaction.arrival.sender,
                    recipients=tuple(r.address for r in recipients if not r.users),
                    octets=transaction.queued_octets)
                self.factory.on_queued(transaction.id)
        super()._delivered(refusal, transaction, recipients, *when)


def _open_queue_file(queue: Queue, envelope: QueuedEnvelope, header: bytes):
    """In a thread: the queue's ``tmp/`` file, starting with our Received line."""
    incoming = queue.new_message(envelope)
    try:
        incoming.write(header)
    except OSError:
        incoming.abort()
        raise
    return incoming


class SubmissionFactory(SMTPFactory):
    """Builds submission sessions for one STARTTLS or implicit-TLS listener.

    ``queue`` is None when ``relay.mode`` is ``"none"`` (remote recipients refused);
    ``on_queued(id)`` is called after a message was queued (the runner tries it at once).
    """

    session_class = SubmissionServer

    def __init__(self, *, authenticator: Authenticator, sending_limit: SendingLimit,
                 run_in_thread, queue: Queue | None = None, on_queued=lambda _: None,
                 **kwargs):
        super().__init__(**kwargs)
        self.protocol_name = "SUBMISSION"
        self.commands = (*SMTP_COMMANDS, "AUTH")
        self.authenticator = authenticator
        self.sending_limit = sending_limit
        self.run_in_thread = run_in_thread
        self.queue = queue
        self.on_queued = on_queued
