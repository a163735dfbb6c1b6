"""Login attempts: one path for every way a user proves who they are.

POP3's USER/PASS, APOP and AUTH, and SMTP AUTH on submission, all hand a
:class:`LoginAttempt` to the :class:`Authenticator`, which applies the same rules:

1. **The penalty first.**  An attempt for a user name that failed before from the same
   address (or from an address that guessed many names) waits out its current delay
   (:class:`~popgate.auth.penalty.AuthPenalty`) *before* its password is checked: a
   guesser that hangs up early costs no hashing, and a right guess cannot be told from a
   wrong one by how fast the answer comes.
2. **A bound per address.**  At most :data:`~popgate.auth.penalty.CHECKS_PER_ADDRESS`
   checks per address run at once (:class:`~popgate.auth.penalty.ChecksPerAddress`), so
   one address cannot fill the hashing threads' queue.
3. **The check** goes through the ``twisted.cred`` portal (checker, then realm).
4. **The answer**: success at once; a wrong name or password is recorded and answered
   (:class:`LoginFailed`) the address's *new* delay after the attempt began; any other
   error (a mailbox in use, storage unavailable) at once, as the realm raised it.

:func:`plaintext_allowed` is the policy for mechanisms that send the password itself
(USER/PASS, PLAIN, LOGIN): only under TLS or from loopback, unless the configuration says
otherwise (RFC 2595 §2.3, RFC 4954 §4).

Secrets: an attempt carries the credentials for the portal and a short fingerprint for
the penalty (so that a client retrying one stale password counts once); its ``repr``
shows neither (command lines are redacted by :func:`popgate.events.redact`).
Concurrency: reactor thread; time from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure

from popgate.auth.penalty import AuthPenalty, ChecksPerAddress
from popgate.limits import is_loopback


class LoginFailed(Exception):
    """Wrong user name or password; the answer is already due (penalty served)."""


@dataclass(frozen=True)
class LoginAttempt:
    """One attempt to log in, as a protocol hands it over."""

    host: str  # the client's address: what the penalty counts
    mechanism: str  # "USER", "APOP", "PLAIN", "LOGIN"
    name: bytes  # the user name as the client gave it
    credentials: Any = field(repr=False)  # for the portal
    repeat_key: bytes = field(repr=False, default=b"")  # the same guess again counts once


def plaintext_allowed(secure: bool, host: str, allow_plaintext_auth: bool) -> bool:
    """May a password travel in the clear on this connection?"""
    return secure or is_loopback(host) or allow_plaintext_auth


class Authenticator:
    """Runs :class:`LoginAttempt` objects through the penalty, the bound and the portal."""

    def __init__(self, portal, penalty: AuthPenalty, checks: ChecksPerAddress, clock):
        self.portal = portal
        self.penalty = penalty
        self.checks = checks
        self.clock = clock

    def login(self, attempt: LoginAttempt, interface,
              wanted: Callable[[], bool]) -> defer.Deferred:
        """Fires with ``(avatar, logout)``, or None if ``wanted()`` turned False (the
        session went away) before the check; fails with :class:`LoginFailed` once the
        penalty is served, or with the realm's error.  Cancelling it during a wait ends
        the attempt; a check already running finishes, and its avatar is logged out."""
        return defer.ensureDeferred(self._login(attempt, interface, wanted))

    async def _login(self, attempt: LoginAttempt, interface, wanted):
        started = self.clock.seconds()
        await self._until(started + self.penalty.delay(attempt.host, attempt.name))
        if not wanted():
            return None
        try:
            result = await _finish_even_if_cancelled(
                self.checks.run(attempt.host, self._check, attempt, interface, wanted))
        except UnauthorizedLogin:
            self.penalty.failed(attempt.host, attempt.name, attempt.repeat_key)
            await self._until(started + self.penalty.delay(attempt.host, attempt.name))
            raise LoginFailed() from None
        if result is None:
            return None
        _, avatar, logout = result
        self.penalty.succeeded(attempt.host, attempt.name)
        return avatar, logout

    def _check(self, attempt: LoginAttempt, interface, wanted) -> defer.Deferred:
        if not wanted():
            return defer.succeed(None)  # gone while queued: nobody to check for
        return self.portal.login(attempt.credentials, None, interface)

    def _until(self, when: float) -> defer.Deferred:
        delay = when - self.clock.seconds()
        return task.deferLater(self.clock, delay) if delay > 0 else defer.succeed(None)


def _finish_even_if_cancelled(d: defer.Deferred) -> defer.Deferred:
    """A Deferred for ``d``'s result that can be cancelled without cancelling ``d``: a
    password check runs to its end, and an avatar that arrives after the cancellation is
    logged out at once (it holds the mailbox lock)."""
    out: defer.Deferred = defer.Deferred()

    def deliver(result):
        if out.called:  # cancelled meanwhile
            if isinstance(result, tuple):
                result[2]()
            return None
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(deliver)
    return out
