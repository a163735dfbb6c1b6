"""PROXY-protocol listeners (``haproxy:`` endpoints) accept only trusted proxies.

:class:`TrustedProxyFactory` sits inside Twisted's ``haproxy:`` wrapper, whose
``buildProtocol`` passes the address of the TCP peer (the proxy) before any header is
read, and drops connections from peers outside ``limits.trusted_proxies``: an untrusted
peer could otherwise name any client address in its header.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from popgate.limits import in_networks
from popgate.loglimit import LogLimiter

_log = Logger()


class TrustedProxyFactory(Factory):
    """Builds protocols only for connections from trusted proxies.

    It sits inside Twisted's ``haproxy:`` wrapper, whose ``buildProtocol`` passes the
    address of the TCP peer, i.e. the proxy, before any header is read.
    """

    noisy = False

    def __init__(self, wrapped, proxies, log_limiter: LogLimiter):
        self.wrapped = wrapped
        self.proxies = tuple(proxies)
        self._log_limiter = log_limiter

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if not in_networks(host, self.proxies):
            if self._log_limiter.allow(("untrusted proxy", host)):
                _log.warn("dropped connection from {host}: not a trusted proxy", host=host)
            return None
        return self.wrapped.buildProtocol(addr)
