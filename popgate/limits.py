"""Connection caps shared by every listener, and the network tests they rest on.

* :class:`ConnectionLimiter` caps sessions in total and per client IP (trusted networks
  exempt from the per-IP cap); a refused connection is answered and closed by the caller.
* :func:`in_networks` / :func:`is_loopback` classify a peer address; a UNIX socket (no IP)
  counts as loopback, never as a member of a network.
* :class:`KeyedSemaphore` runs at most N calls at once per key (password checks per
  client address, SMTP sessions per destination domain).

All state is in memory, per process, touched only from the reactor thread.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

from twisted.internet import defer


def parse_networks(networks: Iterable[str]) -> tuple[ipaddress._BaseNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def in_networks(host: str, networks: Iterable[ipaddress._BaseNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # UNIX sockets and the like: not a network peer
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks if net.version == address.version)


def is_loopback(host: str) -> bool:
    """True for loopback peers and for UNIX sockets (local by construction)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


class ConnectionLimiter:
    """Counts open sessions; :meth:`acquire` refuses over the caps."""

    def __init__(self, max_total: int, max_per_ip: int, trusted=()):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.trusted = tuple(trusted)
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, host: str) -> str | None:
        """Count a new session from ``host``; return a refusal reason instead if over a cap."""
        if self.total >= self.max_total:
            return "too many sessions"
        if self._per_ip[host] >= self.max_per_ip and not in_networks(host, self.trusted):
            return "too many sessions from your address"
        self.total += 1
        self._per_ip[host] += 1
        return None

    def release(self, host: str) -> None:
        self.total -= 1
        self._per_ip[host] -= 1
        if self._per_ip[host] <= 0:
            del self._per_ip[host]


class KeyedSemaphore:
    """At most ``limit`` calls in progress per key; the others wait their turn.

    A key's semaphore is dropped as soon as nothing runs or waits under it, so the table
    holds only the keys in use, however many keys go by.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}

    def run(self, key: str, f, *args) -> defer.Deferred:
        """``f(*args)`` (a Deferred, coroutine or value) once ``key`` has a free slot."""
        semaphore = self._semaphores.get(key)
        if semaphore is None:
            semaphore = self._semaphores[key] = defer.DeferredSemaphore(self._limit)
        return semaphore.run(f, *args).addBoth(self._forget_if_idle, key, semaphore)

    def _forget_if_idle(self, result, key: str, semaphore: defer.DeferredSemaphore):
        idle = semaphore.tokens == semaphore.limit and not semaphore.waiting
        if idle and self._semaphores.get(key) is semaphore:
            del self._semaphores[key]
        return result

    def __len__(self) -> int:
        """How many keys have calls in progress or waiting."""
        return len(self._semaphores)
