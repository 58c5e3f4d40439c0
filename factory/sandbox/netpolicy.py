"""Where a ``network: true`` step may connect: public addresses, and what an admin allows.

Every address a destination resolves to is checked (:meth:`NetworkPolicy.refusal`):

1. an admin's allow-list entry that matches lets it through (``sandbox_network_allow``:
   ``host:port``, ``IP[:port]``, ``CIDR[:port]``, ``[IPv6]:port``, ``[IPv6/len]:port``;
   without a port, every port);
2. otherwise it is refused if it is loopback, unspecified, private (10/8, 172.16/12,
   192.168/16, fc00::/7), link-local (169.254/16, fe80::/10, the cloud metadata
   service 169.254.169.254 with them), shared (100.64/10), multicast, any other
   address that is not public (documentation, benchmarking, reserved ranges...),
   or an address of this machine (its public ones included);
3. an IPv6 address that embeds an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``,
   IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is
   judged by the IPv4 address inside.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), label)
    for network, label in (
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "this network (0.0.0.0/8)"),
        ("::/128", "unspecified address"),
        ("169.254.169.254/32", "cloud metadata service"),
        ("fd00:ec2::254/128", "cloud metadata service"),
        ("10.0.0.0/8", "private network"),
        ("172.16.0.0/12", "private network"),
        ("192.168.0.0/16", "private network"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
        ("fc00::/7", "unique local IPv6 (private)"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("2001::/32", "Teredo tunnel"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_CIDR_RE = re.compile(r"^(?P<net>[0-9A-Fa-f:.]+/\d{1,3})(?::(?P<port>\d{1,5}))?$")
_BRACKET_RE = re.compile(r"^\[(?P<net>[0-9A-Fa-f:.]+(?:/\d{1,3})?)\](?::(?P<port>\d{1,5}))?$")
_NAME_RE = re.compile(r"^(?P<host>[^:\[\]/]+)(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One entry of the allow list: a host name or a network, and a port (None: any)."""

    text: str
    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, host: str, port: int, address: IPAddress) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host
        assert self.network is not None
        return address.version == self.network.version and address in self.network


def _port(text: str | None, entry: str) -> int | None:
    if text is None:
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"network allow entry {entry!r}: port {port} is not between 1 and 65535")
    return port


def parse_allow(entry: str) -> AllowRule:
    """An allow-list entry: ``host:port``, ``IP[:port]``, ``CIDR[:port]``, ``[IPv6[/len]][:port]``, bare IPv6."""
    text = entry.strip()
    hint = "use host:port, IP[:port], CIDR[:port] or [IPv6]:port, e.g. 10.0.0.5:5432 or pypi.internal:443"
    try:
        if match := _CIDR_RE.match(text) or _BRACKET_RE.match(text):
            network = ipaddress.ip_network(match["net"], strict=False)
            return AllowRule(text, network=network, port=_port(match["port"], entry))
        with contextlib.suppress(ValueError):  # a bare IPv6 address: every port
            return AllowRule(text, network=ipaddress.ip_network(text))
        if (match := _NAME_RE.match(text)) and _HOST_RE.match(match["host"]):
            host = match["host"].rstrip(".").lower()
            with contextlib.suppress(ValueError):
                return AllowRule(text, network=ipaddress.ip_network(host), port=_port(match["port"], entry))
            return AllowRule(text, host=host, port=_port(match["port"], entry))
    except ValueError as exc:
        raise ValueError(f"network allow entry {entry!r} is invalid ({exc}): {hint}") from None
    raise ValueError(f"network allow entry {entry!r} is invalid: {hint}")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, NAT64, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _nonlocal_bind() -> bool:
    """Whether the kernel lets a socket bind any address (then binding cannot tell which are ours)."""
    for version in ("ipv4", "ipv6"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/sys/net/{version}/ip_nonlocal_bind").read_text().strip() != "0":
                return True
    return False


def _listed_host_addresses() -> set[IPAddress]:
    """This machine's addresses from /proc: the LOCAL entries of the FIB, and every IPv6 interface address."""
    found: set[IPAddress] = set()
    last: str | None = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            line = line.strip()
            if line.startswith("|--"):
                last = line[3:].strip()
            elif line == "/32 host LOCAL" and last:
                found.add(ipaddress.ip_address(last))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            digits = line.split()[0]
            found.add(ipaddress.IPv6Address(int(digits, 16)))
    return found


def is_host_address(address: IPAddress) -> bool:
    """Whether ``address`` belongs to this machine (network namespace): binding to it succeeds only then."""
    if _nonlocal_bind():
        return address in _listed_host_addresses()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


class NetworkPolicy:
    """Decides, address by address, whether a sandbox may connect; see the module's documentation."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.rules = tuple(parse_allow(entry) for entry in allow)

    def refusal(self, host: str, port: int, address: IPAddress) -> str | None:
        """Why ``address`` (one of what ``host`` resolved to) may not be reached on ``port``; None if it may."""
        host = host.rstrip(".").lower()
        if any(rule.matches(host, port, address) for rule in self.rules):
            return None
        inner = embedded_ipv4(address)
        if inner is not None:
            reason = self.refusal(str(inner), port, inner)
            return None if reason is None else f"{reason} (inside {address})"
        for network, label in DENIED:
            if address.version == network.version and address in network:
                return label
        if is_host_address(address):
            return "an address of this machine"
        if not address.is_global:
            return "not a public address"
        return None
