"""A TCP proxy on 127.0.0.1 that a test can cut, to break a client's connection for real."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class TcpProxy:
    """Forwards connections to ``upstream`` (``host:port``).

    :meth:`cut` aborts every open connection (both sides, like a network failure);
    while :attr:`accepting` is False, new connections are aborted at once.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.connections = 0
        self.address = ""

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> int:
        """Abort every open connection; returns how many there were."""
        links = list(self._links)
        for client, upstream in links:
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()
        return len(links)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        link = (writer, up_writer)
        self._links.add(link)
        forward = asyncio.create_task(self._pipe(reader, up_writer))
        backward = asyncio.create_task(self._pipe(up_reader, writer))
        self._tasks.update((forward, backward))
        try:
            await asyncio.gather(forward, backward, return_exceptions=True)
        finally:
            self._tasks.difference_update((forward, backward))
            self._links.discard(link)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
