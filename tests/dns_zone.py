"""A real DNS server for tests (dnslib's UDP/TCP server on loopback) that answers one name with A records the test
changes while it runs, as Kubernetes' DNS does for a headless Service when replicas come and go."""
from __future__ import annotations

import threading

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):
    """Answers `name` with the current `addresses` (TTL 1 s); every other name: NXDOMAIN."""

    def __init__(self, name: str, addresses: list[str]):
        self.name = name.rstrip(".").lower()
        self._addresses = list(addresses)
        self._lock = threading.Lock()
        self.queries = 0

    def set(self, addresses: list[str]) -> None:
        with self._lock:
            self._addresses = list(addresses)

    def resolve(self, request, handler):
        reply = request.reply()
        qname = request.q.qname
        with self._lock:
            self.queries += 1
            addresses = list(self._addresses)
        if str(qname).rstrip(".").lower() != self.name:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


class DnsServer:
    """with DnsServer("triton.test", ["127.0.0.2"]) as dns: dns.port, dns.zone.set([...])"""

    def __init__(self, name: str, addresses: list[str]):
        self.zone = Zone(name, addresses)
        self._server = DNSServer(self.zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda s: None))

    @property
    def port(self) -> int:
        return self._server.server.server_address[1]

    def __enter__(self) -> "DnsServer":
        self._server.start_thread()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
