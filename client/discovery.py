"""Finding Triton replicas through DNS: one name, every address behind it (a Kubernetes headless Service).

  dns:///triton-grpc.inspection.svc.cluster.local:8001     the system resolver (/etc/hosts, resolv.conf search)
  dns://10.96.0.10/triton-grpc.inspection.svc:8001         ask that DNS server (port 53), gRPC's URI form
  dns://127.0.0.1:5353/triton.test:8001                    ask a DNS server on another port

Every address becomes one server `ADDRESS:PORT`. The server pool (servers.py) resolves the names again every few
seconds and after a failure, and adds and drops servers as the answers change.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

DNS_SCHEME = "dns:"
_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")
_AUTHORITY = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")


class ResolveError(RuntimeError):
    """A name that resolves to no address (unknown name, DNS server unreachable or refusing)."""


@dataclass(frozen=True)
class DnsTarget:
    name: str
    port: int
    dns_server: tuple[str, int] | None  # None: the system resolver

    @property
    def url(self) -> str:
        """The canonical form, as given on the command line (`dns:///NAME:PORT` or `dns://HOST:PORT/NAME:PORT`)."""
        authority = "" if self.dns_server is None else f"{_host_text(self.dns_server[0])}:{self.dns_server[1]}"
        return f"dns://{authority}/{self.name}:{self.port}"


def is_dns_url(url: str) -> bool:
    """Whether a --url names servers to find through DNS (dns:///NAME:PORT or dns://DNSHOST/NAME:PORT)."""
    return url.strip().lower().startswith(DNS_SCHEME)


def parse_dns_url(url: str) -> DnsTarget:
    """`dns:[//[DNSHOST[:DNSPORT]]/]NAME:PORT` (gRPC's form). Raises ValueError naming the problem."""
    text = url.strip()
    if not is_dns_url(text):
        raise ValueError(f"{url!r} is not a dns: URL (e.g. dns:///triton-grpc.inspection.svc.cluster.local:8001)")
    rest = text[len(DNS_SCHEME):]
    dns_server = None
    if rest.startswith("//"):
        authority, slash, rest = rest[2:].partition("/")
        if not slash:
            raise ValueError(f"server URL {url!r}: write dns:///NAME:PORT (three slashes) or dns://DNSHOST/NAME:PORT")
        if authority:
            match = _AUTHORITY.match(authority)
            if not match:
                raise ValueError(f"server URL {url!r}: the DNS server {authority!r} is not HOST[:PORT]")
            dns_port = int(match.group(2) or 53)
            if not 0 < dns_port < 65536:
                raise ValueError(f"server URL {url!r}: DNS server port {dns_port} is out of range")
            dns_server = (match.group(1).strip("[]"), dns_port)
    name, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server URL {url!r}: give the name and Triton's gRPC port, e.g. dns:///{rest or 'NAME'}:8001")
    if not _NAME.match(name) or len(name) > 253:
        raise ValueError(f"server URL {url!r}: {name!r} is not a DNS name")
    return DnsTarget(name.rstrip(".").lower(), int(port), dns_server)


def resolve(target: DnsTarget, timeout: float = 2.0) -> list[str]:
    """Every `ADDRESS:PORT` behind the name, sorted; raises ResolveError when there is none."""
    if target.dns_server is None:
        addresses = _system_addresses(target)
    else:
        addresses = _ask_server(target, timeout)
    if not addresses:
        raise ResolveError(f"{target.url}: {target.name} has no address")
    return sorted(f"{_host_text(a)}:{target.port}" for a in set(addresses))


def _system_addresses(target: DnsTarget) -> list[str]:
    try:
        infos = socket.getaddrinfo(target.name, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolveError(f"{target.url}: cannot resolve {target.name}: {exc}") from exc
    return [info[4][0] for info in infos]


def _ask_server(target: DnsTarget, timeout: float) -> list[str]:
    """A and AAAA records from the DNS server the URL names (dnslib builds and parses the messages)."""
    from dnslib import QTYPE, RCODE, DNSRecord

    assert target.dns_server is not None
    host, port = target.dns_server
    addresses: list[str] = []
    for qtype in ("A", "AAAA"):
        question = DNSRecord.question(target.name, qtype)
        try:
            reply = DNSRecord.parse(question.send(host, port, timeout=timeout, ipv6=":" in host))
            if reply.header.tc:  # truncated over UDP: ask again over TCP
                reply = DNSRecord.parse(question.send(host, port, tcp=True, timeout=timeout, ipv6=":" in host))
        except Exception as exc:  # a socket error or timeout, or dnslib's DNSError on a malformed reply
            raise ResolveError(f"{target.url}: DNS server {host}:{port} did not answer: {exc}") from exc
        if reply.header.id != question.header.id:
            raise ResolveError(f"{target.url}: DNS server {host}:{port} answered another question")
        rcode = reply.header.rcode
        if rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            raise ResolveError(f"{target.url}: DNS server {host}:{port} answered {RCODE.get(rcode)}")
        wanted = getattr(QTYPE, qtype)
        addresses += [str(record.rdata) for record in reply.rr if record.rtype == wanted]
    return addresses


def _host_text(address: str) -> str:
    """IPv6 addresses in brackets, as HOST:PORT needs them."""
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address
