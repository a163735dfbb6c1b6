"""Brakes on password guessing, shared by every login (POP3 now, SMTP AUTH next).

* :class:`AuthPenalty` remembers failed logins per client IP for a window and says how
  long the next answer must be delayed: ``base * 2**(failures-1)`` capped at ``maximum``
  (2 s doubling to 15 s, as Dovecot does).  The same wrong password repeated (a client
  with a stale password retrying) counts once, so it does not escalate without end.
* :class:`ChecksPerAddress` bounds the password checks in progress per client address;
  extra attempts wait in the reactor, so guessers hammering from one address cannot
  fill the password-hashing threads' queue.

All state is in memory, per process, touched only from the reactor thread; time comes
from an injected ``IReactorTime`` so tests drive it with ``task.Clock``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from twisted.internet import defer

CHECKS_PER_ADDRESS = 2  # password checks in progress at once for one client address
_REMEMBERED_SECRETS = 32  # distinct wrong passwords remembered per penalised address


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    secrets: set[bytes] = field(default_factory=set)


def penalty_key(host: str) -> str:
    """The unit that earns a penalty: the IPv4 address, or the IPv6 /64 (one subscriber
    usually has a whole /64 and could rotate through it)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


class AuthPenalty:
    """Per-IP memory of failed logins, and the delay they earn."""

    def __init__(self, clock, base: float, maximum: float, window: float):
        self._clock = clock
        self.base, self.maximum, self.window = base, maximum, window
        self._failures: dict[str, _Failures] = {}

    def delay(self, host: str) -> float:
        """Seconds to wait before answering a failed login from ``host``."""
        failures = self._current(penalty_key(host))
        if failures is None or failures.count == 0:
            return 0.0
        return min(self.base * 2 ** (failures.count - 1), self.maximum)

    def failed(self, host: str, username: bytes, password: bytes) -> None:
        """Record a failure; a repeat of the same username+password is counted once."""
        host = penalty_key(host)
        failures = self._current(host) or self._failures.setdefault(host, _Failures())
        fingerprint = hashlib.sha256(username + b"\0" + password).digest()[:8]
        if fingerprint not in failures.secrets:
            failures.count += 1
            # Past a few failures the delay is at its maximum anyway: remember a bounded
            # number of fingerprints, so a long guessing run costs no more memory.
            if len(failures.secrets) < _REMEMBERED_SECRETS:
                failures.secrets.add(fingerprint)
        failures.last = self._clock.seconds()
        self._expire_some()

    def succeeded(self, host: str) -> None:
        self._failures.pop(penalty_key(host), None)

    def _current(self, host: str) -> _Failures | None:
        failures = self._failures.get(host)
        if failures and self._clock.seconds() - failures.last > self.window:
            del self._failures[host]
            return None
        return failures

    def _expire_some(self) -> None:
        # Bounded memory under a spray from many addresses: drop expired entries as we go.
        if len(self._failures) > 10_000:
            now = self._clock.seconds()
            for host in [h for h, f in self._failures.items() if now - f.last > self.window]:
                del self._failures[host]


class ChecksPerAddress:
    """Bounds the password checks in progress for each client address.

    Password hashing runs in a small, first-come-first-served thread pool.  Unbounded,
    one address with many connections would queue hundreds of checks there, and logins
    from everyone else would wait behind all of them (issue 6).  Bounded, its extra
    attempts wait here instead, where an attempt whose client has gone is dropped
    unchecked, and another address's check waits for one hash at most.
    """

    def __init__(self, limit: int = CHECKS_PER_ADDRESS):
        self._limit = limit
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}

    def run(self, host: str, check, *args) -> defer.Deferred:
        semaphore = self._semaphores.get(host)
        if semaphore is None:
            semaphore = self._semaphores[host] = defer.DeferredSemaphore(self._limit)
        return semaphore.run(check, *args).addBoth(self._forget_if_idle, host, semaphore)

    def _forget_if_idle(self, result, host: str, semaphore: defer.DeferredSemaphore):
        idle = semaphore.tokens == semaphore.limit and not semaphore.waiting
        if idle and self._semaphores.get(host) is semaphore:
            del self._semaphores[host]
        return result

    def __len__(self) -> int:
        """How many addresses have checks in progress."""
        return len(self._semaphores)
