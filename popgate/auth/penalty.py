"""Brakes on password guessing, shared by every login (POP3 now, SMTP AUTH next).

* :class:`AuthPenalty` remembers failed logins for a window and says how long the next
  answer to a login must be delayed.  It is keyed by **client address and user name**,
  so that one stuck client (a phone with an old password) does not slow its colleagues
  behind the same NAT, with a cap **per address** so that a guesser who rotates user
  names is slowed all the same:

  - per (address, user name): ``base * 2**(failures-1)`` capped at ``maximum`` (2 s
    doubling to 15 s, as Dovecot does).  The same wrong password repeated (a client
    with a stale password retrying) counts once, so it does not escalate without end;
  - per address: once failures there name more than :data:`FREE_NAMES` distinct users,
    or add up to more than :data:`FREE_FAILURES` distinct guesses, every login from it
    (any user name) waits ``base * 2**(excess-1)`` capped at ``maximum``, where
    ``excess`` is how far past either bound it is.

  A success clears only that user's own record (and its share of the address's): a
  guesser cannot wipe the address's record by logging in to an account of its own.
  Guessing stays slow: one name at a time waits up to ``maximum`` per guess, many names
  bring the whole address to ``maximum``; :class:`ChecksPerAddress` and the
  per-address session cap bound the guesses waiting at once.
* :class:`ChecksPerAddress` bounds the password checks in progress per client address;
  extra attempts wait in the reactor, so guessers hammering from one address cannot
  fill the password-hashing threads' queue.

All state is in memory, per process, touched only from the reactor thread; time comes
from an injected ``IReactorTime`` so tests drive it with ``task.Clock``.  Memory is
bounded: at most :data:`_REMEMBERED_SECRETS` fingerprints and :data:`_REMEMBERED_NAMES`
names per record, and expired records are dropped once there are more than 10,000.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from popgate.limits import KeyedSemaphore

CHECKS_PER_ADDRESS = 2  # password checks in progress at once for one client address
FREE_NAMES = 4  # distinct failing user names an address may have before it is slowed
FREE_FAILURES = 16  # distinct failed guesses an address may make before it is slowed
_REMEMBERED_SECRETS = 32  # distinct wrong passwords remembered per record
_REMEMBERED_NAMES = 64  # distinct failing names remembered per address
_MAX_NAME = 320  # characters of a user name kept as a key (RFC 5321 path length)
_EXPIRE_ABOVE = 10_000  # records kept before expired ones are swept


@dataclass
class _Failures:
    """Failed guesses of one (address, user name)."""

    count: int = 0
    last: float = 0.0
    secrets: set[bytes] = field(default_factory=set)


@dataclass
class _AddressFailures:
    """Failed guesses of one address, over all user names."""

    count: int = 0
    last: float = 0.0
    names: dict[str, int] = field(default_factory=dict)  # name -> its guesses counted


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


def _name_key(name: bytes | str) -> str:
    """A user name as typed (``Alice@Example.org``) and as stored compare equal."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name.strip().lower()[:_MAX_NAME]


class AuthPenalty:
    """Memory of failed logins per (address, user name) and per address; the delay
    they earn (see the module docstring)."""

    def __init__(self, clock, base: float, maximum: float, window: float):
        self._clock = clock
        self.base, self.maximum, self.window = base, maximum, window
        self._failures: dict[tuple[str, str], _Failures] = {}
        self._addresses: dict[str, _AddressFailures] = {}

    def delay(self, host: str, name: bytes | str) -> float:
        """Seconds to wait before answering a login as ``name`` from ``host``."""
        address = penalty_key(host)
        failures = self._current(self._failures, (address, _name_key(name)))
        steps = failures.count if failures else 0
        at_address = self._current(self._addresses, address)
        if at_address:
            steps = max(steps, len(at_address.names) - FREE_NAMES,
                        at_address.count - FREE_FAILURES)
        if steps <= 0:
            return 0.0
        return min(self.base * 2 ** (steps - 1), self.maximum)

    def failed(self, host: str, username: bytes, password: bytes) -> None:
        """Record a failure; a repeat of the same username+password is counted once."""
        address, name = penalty_key(host), _name_key(username)
        now = self._clock.seconds()
        failures = (self._current(self._failures, (address, name))
                    or self._failures.setdefault((address, name), _Failures()))
        at_address = (self._current(self._addresses, address)
                      or self._addresses.setdefault(address, _AddressFailures()))
        failures.last = at_address.last = now
        fingerprint = hashlib.sha256(username + b"\0" + password).digest()[:8]
        if fingerprint not in failures.secrets:
            failures.count += 1
            at_address.count += 1
            if name in at_address.names or len(at_address.names) < _REMEMBERED_NAMES:
                at_address.names[name] = at_address.names.get(name, 0) + 1
            # Past a few failures the delay is at its maximum anyway: remember a bounded
            # number of fingerprints, so a long guessing run costs no more memory.
            if len(failures.secrets) < _REMEMBERED_SECRETS:
                failures.secrets.add(fingerprint)
        self._expire_some(now)

    def succeeded(self, host: str, name: bytes | str) -> None:
        """``name`` logged in from ``host``: forget its failures there, not the others'."""
        address, name = penalty_key(host), _name_key(name)
        self._failures.pop((address, name), None)
        at_address = self._addresses.get(address)
        if at_address is not None:
            at_address.count -= at_address.names.pop(name, 0)

    def _current(self, table: dict, key):
        failures = table.get(key)
        if failures and self._clock.seconds() - failures.last > self.window:
            del table[key]
            return None
        return failures

    def _expire_some(self, now: float) -> None:
        # Bounded memory under a spray from many addresses: drop expired entries as we go.
        for table in (self._failures, self._addresses):
            if len(table) > _EXPIRE_ABOVE:
                for key in [k for k, f in table.items() if now - f.last > self.window]:
                    del table[key]


class ChecksPerAddress(KeyedSemaphore):
    """Bounds the password checks in progress for each client address.

    Password hashing runs in a small, first-come-first-served thread pool.  Unbounded,
    one address with many connections would queue hundreds of checks there, and logins
    from everyone else would wait behind all of them (issue 6).  Bounded, its extra
    attempts wait here instead, where an attempt whose client has gone is dropped
    unchecked, and another address's check waits for one hash at most.
    """

    def __init__(self, limit: int = CHECKS_PER_ADDRESS):
        super().__init__(limit)
