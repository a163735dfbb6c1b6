"""A ``twisted.names`` DNS server on 127.0.0.1 (UDP and TCP, port 0) serving zones
written as dicts, for the direct-delivery (MX) tests::

    port = serve(testcase, Zone("example", {"a.example": [dns.Record_A("127.0.0.2")]}))

A name in a zone with no record of the asked type gets an empty answer (NODATA); a name
not in it NXDOMAIN.  Long TXT values are split into 255-octet strings (:func:`txt`).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.names import authority, dns, server


class Zone(authority.FileAuthority):
    def __init__(self, origin: str, records: dict[str, list]):
        self._origin = origin.encode("ascii")
        self._zone = records
        super().__init__(None)

    def loadFile(self, filename) -> None:
        soa = dns.Record_SOA(mname=b"ns." + self._origin, rname=b"hostmaster." + self._origin,
                             serial=1, refresh=60, retry=60, expire=60, minimum=60)
        self.soa = (self._origin, soa)
        self.records = {self._origin: [soa]}
        for name, payloads in self._zone.items():
            self.records.setdefault(name.encode("ascii").lower(), []).extend(payloads)


def txt(value: str) -> dns.Record_TXT:
    data = value.encode("ascii")
    return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)])


def serve(testcase, *zones: Zone) -> int:
    """Listen on 127.0.0.1 (UDP, and TCP on the same port for truncated answers)."""
    factory = server.DNSServerFactory(authorities=list(zones))
    factory.noisy = False
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    testcase.addCleanup(udp.stopListening)
    port = udp.getHost().port
    tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
    testcase.addCleanup(tcp.stopListening)
    return port
