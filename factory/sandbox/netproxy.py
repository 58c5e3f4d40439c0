"""The egress proxy of one ``network: true`` sandbox: HTTP ``CONNECT`` and plain HTTP, filtered.

The sandbox keeps its own network namespace (only ``lo``); its one way out is
this proxy, which the executor runs on the host for the length of the job and
listens on a unix socket that is bind-mounted into the sandbox (a forwarder
inside turns the sandbox's ``127.0.0.1:3128`` into that socket, see
:mod:`factory.sandbox.forwarder`).

For each client connection, one request:

- ``CONNECT host:port``: a tunnel (HTTPS, or any TCP protocol a client can tunnel);
- ``GET http://host[:port]/path`` (any method, absolute URI): forwarded with
  ``Connection: close``, without the ``Proxy-*`` headers;
- ``GET /path`` with a ``Host`` header (``curl --unix-socket``): the same.

The proxy resolves the name itself, checks *every* address it resolves to with
the :class:`~factory.sandbox.netpolicy.NetworkPolicy` (one refused address
refuses the request), then connects to one of the checked addresses, never to
the name again: a DNS answer that changes between the check and the connection
cannot redirect it. A refusal is answered ``403`` with the reason, and reported
once per destination to ``on_notice`` (``[network] refused 127.0.0.1:5432:
loopback``), which the executor writes into the step's log.

Bounds: at most ``max_connections`` connections at once (``503`` beyond), a
request head of at most :data:`MAX_HEAD_BYTES` (``431``), ``idle_timeout``
seconds without traffic in either direction closes a connection, and
:data:`CONNECT_TIMEOUT` bounds name resolution and connecting. :meth:`close`
stops the server and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from factory.errors import ExecutorUnavailableError
from factory.sandbox.netpolicy import IPAddress, NetworkPolicy

MAX_HEAD_BYTES = 64 * 1024
CONNECT_TIMEOUT = 10.0
MAX_NOTICES = 50
RELAY_CHUNK = 64 * 1024
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the final NUL
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate"}
_STATUS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _Refused(Exception):
    """A request the proxy answers with an error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _split_host_port(target: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (the port may be omitted when there is a default)."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _Refused(400, f"malformed destination {target!r}")
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep:
            host, port_text = target, ""
    if not port_text:
        if default_port is None:
            raise _Refused(400, f"destination {target!r} has no port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _Refused(400, f"destination {target!r} has an invalid port")
    if not host:
        raise _Refused(400, f"destination {target!r} has no host")
    return host, int(port_text)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Connection:
    def __init__(self) -> None:
        self.last_activity = time.monotonic()


class EgressProxy:
    """Serves one sandbox's egress on a unix socket, from a thread of its own; a context manager."""

    def __init__(
        self,
        path: Path,
        policy: NetworkPolicy,
        *,
        owner: int | None = None,
        max_connections: int = 64,
        idle_timeout: float = 120.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ExecutorUnavailableError(
                f"the egress proxy's socket path {path} is longer than {MAX_UNIX_PATH} bytes: "
                "choose a shorter sandbox_scratch_root"
            )
        self.path = path
        self.policy = policy
        self.owner = owner
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.on_notice = on_notice
        self._active = 0
        self._noticed: set[str] = set()  # refusals already logged (at most MAX_NOTICES + 1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> EgressProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Listen on the socket (owned by ``owner``, mode 0600) and serve from a new thread."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            if self.owner is not None:
                os.chown(self.path, self.owner, self.owner)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise ExecutorUnavailableError(f"could not start the egress proxy on {self.path}: {exc}") from exc
        self._thread = threading.Thread(target=self._serve, args=(listener,), name="factory-egress", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise ExecutorUnavailableError(f"could not start the egress proxy: {self._error}")

    def close(self) -> None:
        """Stop accepting, end every connection, and wait for the thread (a few seconds at most)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self, listener: socket.socket) -> None:
        try:
            asyncio.run(self._main(listener))
        except BaseException as exc:  # noqa: BLE001 - reported by start(), or lost after close()
            self._error = exc
        finally:
            listener.close()
            self._ready.set()

    async def _main(self, listener: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_unix_server(self._handle, sock=listener, limit=MAX_HEAD_BYTES)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one client connection ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._active += 1
        try:
            await self._serve_request(reader, writer)
        except _Refused as refused:
            with contextlib.suppress(OSError, TimeoutError):
                await self._answer(writer, refused.status, refused.reason)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:  # close() ends every connection; nothing to report
            pass
        finally:
            self._active -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        except asyncio.LimitOverrunError:
            raise _Refused(431, f"the request head is longer than {MAX_HEAD_BYTES} bytes") from None
        except TimeoutError:
            raise _Refused(408, "no request came") from None
        except asyncio.IncompleteReadError:
            return
        if self._active > self.max_connections:  # answered once the request is read, so the client sees it
            raise _Refused(503, f"more than {self.max_connections} connections at once")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _Refused(400, "not an HTTP request")
        method, target, version = parts
        headers = [line.split(":", 1) for line in header_lines if ":" in line]
        if method.upper() == "CONNECT":
            host, port = _split_host_port(target)
            upstream_reader, upstream_writer = await self._open(host, port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            host, port, path = self._plain_target(target, headers)
            upstream_reader, upstream_writer = await self._open(host, port)
            kept = [f"{name}:{value}" for name, value in headers if name.strip().lower() not in _HOP_HEADERS]
            if not any(name.strip().lower() == "host" for name, _ in headers):
                kept.append(f"Host: {_show(host, port) if port != 80 else host}")
            request = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
            upstream_writer.write(request.encode("latin-1"))
        try:
            await self._relay(reader, writer, upstream_reader, upstream_writer)
        finally:
            upstream_writer.close()

    @staticmethod
    def _plain_target(target: str, headers: list[list[str]]) -> tuple[str, int, str]:
        if target.lower().startswith("http://"):
            parts = urlsplit(target)
            if not parts.hostname:
                raise _Refused(400, f"no host in {target!r}")
            try:
                port = parts.port or 80
            except ValueError:
                raise _Refused(400, f"invalid port in {target!r}") from None
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            return parts.hostname, port, path
        if target.startswith("/"):
            host_header = next((value.strip() for name, value in headers if name.strip().lower() == "host"), "")
            if not host_header:
                raise _Refused(400, "a request without an absolute URI needs a Host header")
            host, port = _split_host_port(host_header, default_port=80)
            return host, port, target
        if target.lower().startswith("https://"):
            raise _Refused(400, "https:// through this proxy needs CONNECT (set HTTPS_PROXY, not only HTTP_PROXY)")
        raise _Refused(400, f"unsupported request target {target!r}")

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        body = f"factory sandbox proxy: {reason}\n".encode()
        head = (
            f"HTTP/1.1 {status} {_STATUS.get(status, 'Error')}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), 5)

    # -- the policy, and connecting ----------------------------------------------------------------

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve, check every address, connect to a checked one."""
        addresses = await self._resolve(host, port)
        for address in addresses:
            reason = self.policy.refusal(host, port, address)
            if reason is not None:
                shown = _show(host, port) + ("" if host == str(address) else f" ({address})")
                self._notice(f"refused {shown}: {reason}")
                raise _Refused(
                    403, f"refused {shown}: {reason}; an admin can allow a destination with sandbox_network_allow"
                )
        problem = "no address"
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=RELAY_CHUNK), self.connect_timeout
                )
            except TimeoutError:
                problem = f"connecting to {_show(str(address), port)} timed out"
            except OSError as exc:
                problem = f"connecting to {_show(str(address), port)} failed: {exc.strerror or exc}"
        raise _Refused(502, problem)

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        name = host.strip("[]")
        with contextlib.suppress(ValueError):
            return [ipaddress.ip_address(name)]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), self.connect_timeout
            )
        except TimeoutError:
            raise _Refused(504, f"resolving {name} timed out") from None
        except (OSError, UnicodeError) as exc:
            raise _Refused(502, f"cannot resolve {name}: {exc}") from None
        addresses: list[IPAddress] = []
        for *_, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise _Refused(502, f"{name} has no address")
        return addresses

    def _notice(self, text: str) -> None:
        """Log a refusal once per destination, and at most MAX_NOTICES of them."""
        if text in self._noticed or len(self._noticed) > MAX_NOTICES or self.on_notice is None:
            return
        self._noticed.add(text)
        if len(self._noticed) > MAX_NOTICES:
            text = f"more than {MAX_NOTICES} destinations refused: no more are logged"
        with contextlib.suppress(Exception):  # a log sink failing must not break the proxy
            self.on_notice(f"[network] {text}\n")

    # -- relaying ----------------------------------------------------------------------------------

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        state = _Connection()
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer, state),
            self._pipe(upstream_reader, client_writer, state),
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection) -> None:
        """Copy until EOF or until neither direction moved for ``idle_timeout``; then close the other side."""
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(RELAY_CHUNK), self.idle_timeout)
                except TimeoutError:
                    if time.monotonic() - state.last_activity < self.idle_timeout:
                        continue  # the other direction is busy
                    break
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                state.last_activity = time.monotonic()
                writer.write(data)
                await asyncio.wait_for(writer.drain(), self.idle_timeout)
        except (OSError, TimeoutError):
            pass
        writer.close()
