"""Direct delivery (``relay.mode = "mx"``): the route to a domain, and one send per domain.

:func:`mx_hosts` resolves a destination domain to its MX hosts in preference order (RFC
5321 §5.1; hosts of equal preference in random order), with the domain itself as the
only host when it has no MX record (the implicit MX), and fails with
:class:`PermanentRouteError` for a null MX (RFC 7505 §3: ``0 .``, status 5.1.10) or a
domain that does not exist (5.1.2).  Any other DNS failure is temporary.

:class:`MXSender` has the signature of the smarthost ``send`` the queue runner calls,
``send(sender, recipients, message) -> Deferred({recipient: (code, text)})``: it groups
the recipients by domain, and for each domain opens ONE session (the existing client,
:func:`popgate.relay.client.deliver`) that carries all of that domain's recipients.  It
tries the MX hosts in order and each host's addresses (A, then AAAA) in turn, moving on
when a session fails before the message's fate is known (connection refused, a ``421``
or other ``4xx``/``5xx`` greeting, a timeout, TLS refused); a reply to ``RCPT`` or to the
end of data is the answer.  A domain that fails this way gets ``451 4.4.1`` for each of
its recipients (they stay queued); a permanent route error ``5xx`` (they bounce); other
domains of the same message are unaffected.

Loops: an MX address that is one of this server's own listeners (``is_own(host, ip,
port)``, from the wiring point) ends the domain's attempt, never mailing ourselves: with
``554 5.4.6`` (RFC 3463: routing loop) when we are the best MX, else (we are a backup
MX, RFC 5321 §5.1: ourselves and every worse MX are discarded) with ``451`` after the
better ones failed.

Bounds: at most ``max_connections`` sessions at once, ``max_connections_per_domain``
to one domain (a per-domain :class:`~twisted.internet.defer.DeferredSemaphore`, dropped
when idle).  Reactor thread only.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error

from popgate.limits import KeyedSemaphore
from popgate.relay.client import Smarthost, SmarthostError

log = Logger()


class PermanentRouteError(Exception):
    """The domain cannot receive mail: ``(code, text)`` for its recipients."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


class RouteError(Exception):
    """A temporary DNS failure: the recipients stay queued."""


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


async def mx_hosts(resolver, domain: str) -> list[str]:
    """The hosts to try for ``domain``, best first (see the module docstring)."""
    try:
        name = domain.encode("idna").decode("ascii")  # an SMTPUTF8 domain (RFC 6531)
    except UnicodeError:
        raise PermanentRouteError(550, f"550 5.1.2 {domain}: bad domain name") from None
    try:
        answers, _, _ = await resolver.lookupMailExchange(name)
    except error.DNSNameError:
        raise PermanentRouteError(550, f"550 5.1.2 {domain}: no such domain") from None
    except (error.DomainError, error.DNSServerError, error.DNSQueryRefusedError,
            defer.TimeoutError, error.ResolverError) as e:
        raise RouteError(f"MX lookup for {domain} failed: {e.__class__.__name__}") from None
    records = [(r.payload.preference, str(r.payload.name).rstrip("."))
               for r in answers if r.type == dns.MX]
    if not records:
        return [domain]  # RFC 5321 §5.1: the implicit MX, the domain's own A/AAAA
    if any(not name for _, name in records):
        # RFC 7505 §3: a null MX ("0 .") says the domain accepts no mail at all.
        raise PermanentRouteError(556, f"556 5.1.10 {domain}: the domain accepts no "
                                       "mail (null MX)")
    random.shuffle(records)  # RFC 5321 §5.1: spread the load over equal preferences
    records.sort(key=lambda record: record[0])
    return [name for _, name in records]


async def addresses(resolver, host: str) -> list[str]:
    """``host``'s IPv4 then IPv6 addresses ([] when it has none or the lookups fail)."""
    found = []
    for lookup, kind in ((resolver.lookupAddress, dns.A),
                         (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _, _ = await lookup(host)
        except (error.DomainError, error.DNSServerError, error.DNSQueryRefusedError,
                error.DNSNameError, defer.TimeoutError, error.ResolverError):
            continue
        for record in answers:
            if record.type == kind == dns.A:
                found.append(record.payload.dottedQuad())
            elif record.type == kind == dns.AAAA:
                found.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
    return found


class MXSender:
    """See the module docstring; ``deliver`` is :func:`popgate.relay.client.deliver`."""

    def __init__(self, reactor, resolver, deliver: Callable[..., defer.Deferred], *,
                 port: int, tls: str, helo: str,
                 is_own: Callable[[str, str, int], bool] = lambda host, ip, port: False,
                 max_connections: int = 20, max_connections_per_domain: int = 2):
        self.reactor = reactor
        self.resolver = resolver
        self.deliver = deliver
        self.port = port
        self.tls = tls
        self.helo = helo
        self.is_own = is_own
        self._total = defer.DeferredSemaphore(max_connections)
        self._domains = KeyedSemaphore(max_connections_per_domain)

    def __call__(self, sender: str, recipients: list[str], message: bytes) -> defer.Deferred:
        groups: dict[str, list[str]] = {}
        for recipient in recipients:
            groups.setdefault(domain_of(recipient), []).append(recipient)
        sends = [self._bounded(domain, sender, rcpts, message)
                 for domain, rcpts in groups.items()]
        d = defer.gatherResults(sends, consumeErrors=True)
        return d.addCallback(lambda parts: {k: v for part in parts for k, v in part.items()})

    def _bounded(self, domain: str, sender: str, recipients: list[str],
                 message: bytes) -> defer.Deferred:
        # The domain's slot first, then one of the total: a busy domain does not hold
        # total slots while it waits for its own.
        return self._domains.run(domain, self._total.run, self._send, domain, sender,
                                 recipients, message)

    async def _send(self, domain: str, sender: str, recipients: list[str],
                    message: bytes) -> dict[str, tuple[int, str]]:
        try:
            hosts = await mx_hosts(self.resolver, domain)
        except PermanentRouteError as e:
            return dict.fromkeys(recipients, (e.code, str(e)))
        except RouteError as e:
            return dict.fromkeys(recipients, (451, f"451 4.4.3 {e}"))
        last = f"no address for the MX hosts of {domain}"
        for host in hosts:
            for ip in await addresses(self.resolver, host):
                if self.is_own(host, ip, self.port):
                    if host == hosts[0]:
                        return dict.fromkeys(recipients, (554, f"554 5.4.6 {domain}: MX "
                                                               f"{host} [{ip}] is this "
                                                               "server (loop)"))
                    # RFC 5321 §5.1: we are a backup MX; only better ones may take it.
                    return dict.fromkeys(recipients, (451, f"451 4.4.1 {last}"))
                mx = Smarthost(host, self.port, self.tls, helo=self.helo, address=ip,
                               verify=False)
                try:
                    return await self.deliver(self.reactor, mx, sender, recipients, message)
                except SmarthostError as e:
                    last = f"{host} [{ip}]: {e}"
                    log.info("{domain}: MX {host} [{ip}] failed, trying the next: {error}",
                             domain=domain, host=host, ip=ip, error=e)
        return dict.fromkeys(recipients, (451, f"451 4.4.1 {last}"))
