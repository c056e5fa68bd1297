"""A TCP↔Unix-socket forwarder: how a node in a network namespace of its own reaches a service
on the host's loopback without any network between them.

    python -m instruments.bridge unix-to-tcp SOCKET PORT  # on SOCKET, to 127.0.0.1:PORT
    python -m instruments.bridge tcp-to-unix PORT SOCKET  # on 127.0.0.1:PORT, to SOCKET

A Unix socket is a file, so it crosses network namespaces wherever its directory is visible; a
pair of bridges — `unix-to-tcp` on the host in front of the service, `tcp-to-unix` inside the
node on the node's own 127.0.0.1 — lets a client in the node use the service's usual URL. Only
loopback is ever listened on or connected to (a HOST:PORT outside 127.0.0.0/8 is refused).

Each connection is piped both ways at once; an end-of-file in one direction is passed on as a
half-close (HTTP clients and PostgreSQL's protocol both rely on it), a reset or error on either
side aborts both, so the far end sees the failure instead of a hang. The bridge prints `ready`
once it listens, and exits when its parent does (a killed test leaves no bridge behind) or on
SIGTERM, removing its socket file.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
BUFFER = 256 * 1024


def loopback(address: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` with HOST on loopback."""
    host, _, port = address.rpartition(":")
    host = host or "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address: the bridge stays on loopback")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(BUFFER):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close at once; a TCP peer gets a reset (linger 0), not an end of file it could take for
    a complete answer. A Unix socket has no reset: its peer sees the close."""
    if writer.transport.is_closing():
        return  # already gone (the peer's close came first): nothing to reset
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _splice(one: Streams, other: Streams) -> None:
    (a_reader, a_writer), (b_reader, b_writer) = one, other
    pipes = [
        asyncio.create_task(_pipe(a_reader, b_writer)),
        asyncio.create_task(_pipe(b_reader, a_writer)),
    ]
    failed = True
    try:
        done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        failed = any(not t.cancelled() and t.exception() is not None for t in done)
    finally:
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for writer in (a_writer, b_writer):
            if failed:
                # A reset (or a write after the peer went away) on one side, or the bridge
                # shutting down: both sides are reset, so nobody waits for bytes that will
                # never come.
                _reset(writer)
            else:
                writer.close()  # after what is still buffered has been sent


class _Forwarder:
    """Splices each accepted connection to a new one upstream. It holds every connection's
    task: asyncio keeps only weak references to tasks, and a connection whose both ends are
    quiet is otherwise garbage, collected (and closed) in mid-flight."""

    def __init__(self, connect: Callable[[], Awaitable[Streams]]) -> None:
        self.connect = connect
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            try:
                upstream = await self.connect()
            except OSError:
                _reset(writer)  # the client sees a reset, as with the service down
                return
            await _splice((reader, writer), upstream)
        except asyncio.CancelledError:
            # The bridge is closing (close() below; _splice reset both sides). Ending here
            # rather than as cancelled: Python 3.11's stream callback calls exception() on the
            # handler's task, which raises for a cancelled one and prints a traceback per
            # connection open at shutdown.
            return
        finally:
            self.tasks.discard(task)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    # Reparenting (to init or a subreaper) means the parent is gone: so is our purpose.
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    stop.set()


async def serve(mode: str, listen: str, connect: str) -> None:
    parent = os.getppid()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    socket_path: Path | None = None
    if mode == "unix-to-tcp":
        socket_path = Path(listen)
        host, port = loopback(connect)
        socket_path.unlink(missing_ok=True)
        forwarder = _Forwarder(lambda: asyncio.open_connection(host, port, limit=BUFFER))
        server = await asyncio.start_unix_server(
            forwarder.handle,
            path=str(socket_path),
            backlog=1024,
            limit=BUFFER,
        )
        socket_path.chmod(0o666)
    elif mode == "tcp-to-unix":
        host, port = loopback(listen)
        forwarder = _Forwarder(lambda: asyncio.open_unix_connection(connect, limit=BUFFER))
        server = await asyncio.start_server(
            forwarder.handle,
            host,
            port,
            backlog=1024,
            limit=BUFFER,
            reuse_address=True,
        )
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print("ready", flush=True)
    watcher = asyncio.create_task(_watch_parent(parent, stop))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        server.close()
        await forwarder.close()
        if socket_path is not None:
            socket_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["unix-to-tcp", "tcp-to-unix"])
    parser.add_argument("listen", help="unix-to-tcp: socket path; tcp-to-unix: [HOST:]PORT")
    parser.add_argument("connect", help="unix-to-tcp: [HOST:]PORT; tcp-to-unix: socket path")
    a = parser.parse_args(argv)
    asyncio.run(serve(a.mode, a.listen, a.connect))
    return 0


if __name__ == "__main__":
    sys.exit(main())
