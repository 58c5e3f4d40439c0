"""The egress policy of network: true steps: what is refused, why, and what an admin may allow."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from factory.sandbox import netpolicy
from factory.sandbox.local import LocalConfig, LocalExecutor
from factory.sandbox.netpolicy import NetworkPolicy, embedded_ipv4, is_host_address, parse_allow
from factory.spec import ContainerSpec


def refusal(address: str, port: int = 443, allow: tuple[str, ...] = (), host: str | None = None) -> str | None:
    return NetworkPolicy(allow).refusal(host or address, port, ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "this network (0.0.0.0/8)"),
        ("10.1.2.3", "private network"),
        ("172.16.0.1", "private network"),
        ("172.31.255.254", "private network"),
        ("192.168.1.1", "private network"),
        ("169.254.169.254", "cloud metadata service"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "shared address space (carrier-grade NAT)"),
        ("fd00::2", "unique local IPv6 (private)"),
        ("fc00::1", "unique local IPv6 (private)"),
        ("224.0.0.1", "multicast"),
        ("192.0.2.1", "not a public address"),  # documentation range
        ("::ffff:127.0.0.1", "loopback (inside ::ffff:7f00:1)"),
        ("::ffff:10.0.0.1", "private network (inside ::ffff:a00:1)"),
        ("64:ff9b::a00:1", "private network (inside 64:ff9b::a00:1)"),
        ("2002:7f00:1::", "loopback (inside 2002:7f00:1::)"),
        ("::127.0.0.1", "loopback (inside ::7f00:1)"),
    ],
)
def test_local_and_private_addresses_are_refused_with_a_reason(address: str, reason: str) -> None:
    assert refusal(address) == reason


def test_public_addresses_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netpolicy, "is_host_address", lambda address: False)
    assert refusal("93.184.216.34") is None
    assert refusal("2606:2800:220:1:248:1893:25c8:1946") is None
    assert refusal("::ffff:93.184.216.34") is None


def test_this_machines_own_public_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netpolicy, "is_host_address", lambda address: str(address) == "93.184.216.34")
    assert refusal("93.184.216.34") == "an address of this machine"


def test_the_allow_list_opens_exactly_its_destinations() -> None:
    allow = ("127.0.0.1:8080", "10.0.0.0/8:5432", "[::1]:9000", "db.internal:5432", "fd00::/8", "192.168.1.5")
    assert refusal("127.0.0.1", 8080, allow) is None
    assert refusal("127.0.0.1", 8081, allow) == "loopback"
    assert refusal("10.9.8.7", 5432, allow) is None and refusal("10.9.8.7", 80, allow) == "private network"
    assert refusal("::1", 9000, allow) is None and refusal("::1", 9001, allow) == "loopback"
    assert refusal("10.0.0.9", 5432, allow, host="DB.Internal.") is None  # a name: every address it resolves to
    assert refusal("172.16.0.9", 5432, allow, host="db.internal") is None
    assert refusal("172.16.0.9", 5432, allow, host="other.internal") == "private network"
    assert refusal("fd00::7", 1, allow) is None and refusal("192.168.1.5", 22, allow) is None
    assert refusal("::ffff:127.0.0.1", 8080, allow) is None  # the same address, IPv4-mapped


@pytest.mark.parametrize("entry", ["", "a b:80", "10.0.0.0/33", "10.0.0.1:0", "host:70000", "[::1", "x:y", "a/b"])
def test_invalid_allow_entries_say_what_is_accepted(entry: str) -> None:
    with pytest.raises(ValueError, match="network allow entry"):
        parse_allow(entry)
    with pytest.raises(ValueError, match=r"host:port, IP\[:port\], CIDR\[:port\]"):
        LocalConfig(network_allow=["not valid!"])


def test_embedded_ipv4_and_host_addresses() -> None:
    assert embedded_ipv4(ipaddress.ip_address("::ffff:1.2.3.4")) == ipaddress.IPv4Address("1.2.3.4")
    assert embedded_ipv4(ipaddress.ip_address("2606:4700::1")) is None
    assert embedded_ipv4(ipaddress.ip_address("1.2.3.4")) is None
    assert is_host_address(ipaddress.ip_address("127.0.0.1"))
    assert not is_host_address(ipaddress.ip_address("192.0.2.254"))


def test_with_nonlocal_bind_the_host_addresses_come_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netpolicy, "_nonlocal_bind", lambda: True)
    assert is_host_address(ipaddress.ip_address("127.0.0.1"))
    assert is_host_address(ipaddress.ip_address("::1"))
    assert not is_host_address(ipaddress.ip_address("192.0.2.254"))


def test_a_rootfs_without_python_gets_no_forwarder_but_is_told_what_works(tmp_path: Path) -> None:
    executor = LocalExecutor(LocalConfig(rootfs={"bare": tmp_path}))
    assert executor._sandbox_python(ContainerSpec(image="bare", command=["true"])) is None
    assert executor._sandbox_python(ContainerSpec(image="host", command=["true"])) is not None
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "python3").touch()
    assert executor._sandbox_python(ContainerSpec(image="bare", command=["true"])) == "/usr/bin/python3"
