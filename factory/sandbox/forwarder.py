"""Runs inside a ``network: true`` sandbox: its own ``127.0.0.1:PORT`` relayed to the egress proxy's socket.

``python3 forwarder.py PORT SOCKET -- COMMAND...``: listens on ``127.0.0.1:PORT``
(the sandbox's own loopback, where ``HTTP_PROXY`` points), forks a child that
relays every connection to the unix socket ``SOCKET`` (the proxy on the host,
bind-mounted in), and replaces itself with ``COMMAND``, whose exit status is the
step's. The child is one process with one thread whatever the number of
connections; it dies with the sandbox's PID namespace when the command ends.

The executor copies this file into the sandbox and runs it with the sandbox's
own ``python3``: it must not import the factory package, and it stays within
what Python 3.8's standard library offers.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # asyncio is imported by the relaying child only: the command starts sooner
    import asyncio

CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except OSError:
        writer.close()


async def _relay(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    import asyncio

    try:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        sys.stderr.write(f"[network] the egress proxy is unreachable: {exc}\n")
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
    finally:
        upstream_writer.close()
        writer.close()


async def _serve(listener: socket.socket, path: str) -> None:
    import asyncio

    server = await asyncio.start_server(lambda r, w: _relay(path, r, w), sock=listener)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: forwarder.py PORT SOCKET -- COMMAND...\n")
        return 2
    port, path, command = int(argv[0]), argv[1], argv[3:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)  # bound before the command starts: its first connection waits in the backlog
    if os.fork() == 0:
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            import asyncio

            asyncio.run(_serve(listener, path))
        finally:
            os._exit(0)
    listener.close()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"{command[0]}: {exc.strerror}\n")
        return 127 if exc.errno == errno.ENOENT else 126
    return 0  # not reached: execvp replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
