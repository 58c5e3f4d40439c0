"""`network: true` steps: out through the filtering egress proxy only, never to this machine or private ranges.

The steps run in the real bubblewrap sandbox (no Ray). Each attack is tried by a
raw socket and through the proxy (CONNECT and a plain HTTP request), and has a
control: the same server is reachable from the host, and from the sandbox once
an admin allows it.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from factory.sandbox import run_spec
from factory.sandbox.local import PROXY_PORT, PROXY_SOCKET, LocalConfig, LocalExecutor
from factory.sandbox.netpolicy import NetworkPolicy
from factory.sandbox.netproxy import MAX_HEAD_BYTES, EgressProxy
from factory.spec import ContainerSpec

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap: apt-get install -y bubblewrap"
)
PY = "/usr/bin/python3"  # the host's python, read-only inside the sandbox
METADATA = ("169.254.169.254", 80)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[int]:
    """An HTTP server of the test on every host address (0.0.0.0): loopback and the machine's own."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch root the sandbox's host uid can enter (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="factory-net-test-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def host_address() -> str:
    """This machine's main non-loopback address (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.200", 9))  # no packet is sent: this only picks the route
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


def reachable_from_host(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def run_step(scratch: Path, code: str | list[str], logs: io.StringIO, allow: list[str] | None = None) -> dict[str, Any]:
    """A network: true step: python code, or a command."""
    config = LocalConfig(scratch_root=scratch, network_allow=allow or [])
    command = [PY, "-c", code] if isinstance(code, str) else code
    spec = ContainerSpec(image="host", command=command, network=True, timeout=120)
    return run_spec(spec, LocalExecutor(config), home=scratch / "home", logs=logs)


# What the step does for every destination: a raw TCP connection, a CONNECT tunnel and a plain
# GET through the proxy named by HTTP_PROXY; one JSON line per destination.
PROBE = """
import http.client, json, os, socket, sys, urllib.request
proxy = os.environ["HTTP_PROXY"]
proxy_host, proxy_port = proxy.rsplit("/", 1)[1].split(":")
for host, port in json.loads(sys.argv[1]):
    result = {"dest": f"{host}:{port}"}
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); result["raw"] = "CONNECTED"
    except OSError as e:
        result["raw"] = e.strerror or str(e)
    finally:
        s.close()
    tunnel = http.client.HTTPConnection(proxy_host, int(proxy_port), timeout=10)
    tunnel.set_tunnel(host, port)
    try:
        tunnel.request("GET", "/tunnel"); result["connect"] = tunnel.getresponse().read().decode()
    except OSError as e:
        result["connect"] = "REFUSED " + str(e)
    try:
        result["get"] = urllib.request.urlopen(f"http://{host}:{port}/plain", timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        result["get"] = f"HTTP {e.code} " + e.read().decode()
    except OSError as e:
        result["get"] = "ERROR " + str(e)
    print(json.dumps(result), flush=True)
"""


def probe(
    scratch: Path, destinations: list[tuple[str, int]], allow: list[str] | None = None
) -> tuple[dict[str, dict[str, str]], str]:
    logs = io.StringIO()
    out = run_step(scratch, PROBE.replace("json.loads(sys.argv[1])", repr(destinations)), logs, allow)
    results = {line["dest"]: line for line in map(json.loads, out["stdout"].splitlines())}
    return results, logs.getvalue()


@needs_bwrap
def test_loopback_private_and_this_machines_addresses_are_unreachable(scratch: Path, web: int) -> None:
    me = host_address()
    # Controls: from the host, every one of these listens (the test server on both addresses).
    assert reachable_from_host("127.0.0.1", web) and reachable_from_host(me, web)
    services = [("127.0.0.1", 5432), ("127.0.0.1", 6379)]
    if not all(reachable_from_host(*service) for service in services):
        from tests.conftest import service_missing  # CI=true: PostgreSQL and Redis must be there

        service_missing("PostgreSQL and Redis on 127.0.0.1 (the controls)", ConnectionError(str(services)))
    destinations = [("127.0.0.1", web), *services, (me, web), METADATA, ("localhost", web)]
    results, logs = probe(scratch, destinations)
    expected = {
        f"127.0.0.1:{web}": "loopback",
        "127.0.0.1:5432": "loopback",
        "127.0.0.1:6379": "loopback",
        f"{me}:{web}": "",  # "an address of this machine", or a private/reserved range it is in
        "169.254.169.254:80": "cloud metadata service",
        f"localhost:{web}": "loopback",
    }
    assert sorted(results) == sorted(expected)
    for dest, reason in expected.items():
        result = results[dest]
        assert result["raw"] != "CONNECTED", result  # the sandbox's own lo, nothing else
        assert result["connect"].startswith("REFUSED") and "403" in result["connect"], result
        assert result["get"].startswith("HTTP 403") and reason in result["get"], result
        assert "hello" not in json.dumps(result)
    assert "[network] refused 127.0.0.1:5432: loopback\n" in logs
    assert "[network] refused 127.0.0.1:6379: loopback\n" in logs
    assert "[network] refused 169.254.169.254:80: cloud metadata service\n" in logs
    assert f"[network] refused localhost:{web} (127.0.0.1): loopback\n" in logs
    assert f"[network] refused {me}:{web}: " in logs


@needs_bwrap
def test_an_allowed_destination_is_reached_through_the_proxy_and_nothing_more(scratch: Path, web: int) -> None:
    results, logs = probe(scratch, [("127.0.0.1", web), ("127.0.0.1", 5432)], allow=[f"127.0.0.1:{web}"])
    allowed = results[f"127.0.0.1:{web}"]
    assert allowed["connect"] == "hello /tunnel\n" and allowed["get"] == "hello /plain\n"  # CONNECT and plain GET
    assert allowed["raw"] != "CONNECTED"  # only through the proxy
    assert results["127.0.0.1:5432"]["get"].startswith("HTTP 403")  # another port of the same host stays closed
    assert "[network] refused 127.0.0.1:5432: loopback" in logs and f":{web}: " not in logs
    # Ordinary tools work with the variables the sandbox gets; the proxy's socket is there too.
    if shutil.which("curl"):
        url = f"http://127.0.0.1:{web}"
        curl = f"curl -sS {url}/curl; curl -sS --unix-socket {PROXY_SOCKET} {url}/unix"
        out = run_step(scratch, ["sh", "-c", curl], io.StringIO(), allow=[f"127.0.0.1:{web}"])
        assert out["stdout"] == "hello /curl\nhello /unix\n", out


@needs_bwrap
def test_network_false_still_has_no_proxy_and_no_route(scratch: Path) -> None:
    code = (
        "import os, socket\n"
        "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))\n"
        "print(os.path.exists('/run/factory'), [k for k in os.environ if 'PROXY' in k.upper()])\n"
        f"s = socket.socket(); s.settimeout(2)\n"
        f"try:\n    s.connect(('127.0.0.1', {PROXY_PORT})); print('PROXY')\n"
        "except OSError as e:\n    print('refused')\n"
    )
    spec = ContainerSpec(image="host", command=[PY, "-c", code])
    out = run_spec(spec, LocalExecutor(LocalConfig(scratch_root=scratch)), home=scratch / "home")
    assert out["stdout"].splitlines() == ["['lo']", "False []", "refused"]


# -- the proxy alone, on the host --------------------------------------------------------------------


@contextlib.contextmanager
def proxy(scratch: Path, allow: list[str] | None = None, **options: Any) -> Iterator[tuple[EgressProxy, list[str]]]:
    notices: list[str] = []
    with EgressProxy(scratch / "p.sock", NetworkPolicy(allow or []), on_notice=notices.append, **options) as p:
        yield p, notices


def ask(path: Path, request: bytes, timeout: float = 10) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        client.sendall(request)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_every_resolved_address_is_checked_and_only_a_checked_one_is_connected(
    scratch: Path, web: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the proxy resolves once, checks all answers, and connects to the address it checked."""
    answers = {"mixed.test": ["93.184.216.34", "127.0.0.1"], "rebind.test": ["127.0.0.1", "10.9.9.9"]}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        first, later = answers[host][0], answers[host][1]
        address = first if lookups.count(host) == 1 or host == "mixed.test" else later
        pairs = answers[host] if host == "mixed.test" else [address]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in pairs]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with proxy(scratch) as (p, notices):
        mixed = ask(p.path, f"GET http://mixed.test:{web}/ HTTP/1.1\r\nHost: mixed.test\r\n\r\n".encode())
        assert mixed.startswith(b"HTTP/1.1 403") and b"loopback" in mixed  # one bad answer refuses the name
    assert notices == [f"[network] refused mixed.test:{web} (127.0.0.1): loopback\n"]
    with proxy(scratch, allow=[f"127.0.0.1:{web}"]) as (p, notices):
        allowed = ask(p.path, f"GET http://rebind.test:{web}/x HTTP/1.1\r\nHost: rebind.test\r\n\r\n".encode())
        assert b"hello /x" in allowed  # it reached 127.0.0.1 (allowed), not a later answer
    assert lookups.count("rebind.test") == 1 and notices == []


def test_the_proxy_is_bounded(scratch: Path, web: int) -> None:
    with proxy(scratch, allow=[f"127.0.0.1:{web}"], max_connections=2, idle_timeout=0.5) as (p, _):
        huge = b"GET http://127.0.0.1/ HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n"
        assert ask(p.path, huge).startswith(b"HTTP/1.1 431")
        started = time.monotonic()
        assert ask(p.path, b"GET http://127.0.0.1/ HTT").startswith(b"HTTP/1.1 408")  # never finished: timed out
        assert time.monotonic() - started < 5
        holders = []
        for _ in range(2):  # two idle tunnels fill the proxy
            holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            holder.connect(str(p.path))
            holder.sendall(f"CONNECT 127.0.0.1:{web} HTTP/1.1\r\n\r\n".encode())
            assert holder.recv(100).startswith(b"HTTP/1.1 200")
            holders.append(holder)
        assert ask(p.path, f"GET http://127.0.0.1:{web}/ HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 503")
        time.sleep(1.5)  # the idle tunnels are closed after 0.5 s ...
        for holder in holders:
            holder.settimeout(2)
            assert holder.recv(100) == b""
            holder.close()
        assert b"hello /again" in ask(p.path, f"GET http://127.0.0.1:{web}/again HTTP/1.1\r\n\r\n".encode())
        assert ask(p.path, b"GET https://example.com/ HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert not p.path.exists()  # closed with the job


def test_the_proxy_stops_its_connections_when_closed(scratch: Path, web: int) -> None:
    with proxy(scratch, allow=[f"127.0.0.1:{web}"]) as (p, _):
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.connect(str(p.path))
        holder.sendall(f"CONNECT 127.0.0.1:{web} HTTP/1.1\r\n\r\n".encode())
        assert holder.recv(100).startswith(b"HTTP/1.1 200")
    holder.settimeout(5)
    assert holder.recv(100) == b""
    holder.close()
    assert p._thread is not None and not p._thread.is_alive()
