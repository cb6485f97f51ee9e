"""The synchronous client: the surface of :class:`AsyncExecClient`, streaming for real.

Design (the sync bridge).  Each :class:`ExecClient` starts one daemon thread that runs an
asyncio event loop, the *portal*; the client's :class:`AsyncExecClient`, its ``grpc.aio``
channel and every stream live on that loop.  A sync call submits the matching coroutine
with ``asyncio.run_coroutine_threadsafe`` and blocks on its result, so exceptions are the
same :class:`ExecStreamError` classes.  It is not ``asyncio.run`` per call: the channel and
the streams stay open between calls, and a stream keeps flowing while the caller's thread
does other things.

Iterators cross the thread boundary in batches: each ``next()`` that finds the local batch
empty takes, in one round trip, every event the async :class:`Exec` has buffered (at least
one, at most 64).  The async side's bounded buffer still applies, so a slow sync consumer is
treated like a slow async one (flow control; the server keeps the output meanwhile), and
resume after a broken connection happens on the portal without the caller noticing.

Ctrl-C in the calling thread interrupts the blocking wait and cancels the coroutine on the
portal.  Use ``with ExecClient(...) as client:`` or call :meth:`ExecClient.close`, which
detaches every stream, closes the channel and stops the thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ._client import AsyncExecClient, EventStream
from ._connection import DEFAULT_TARGET, ChannelOption, RetryPolicy
from ._events import ExecEvent, LifecycleEvent, Status
from ._exec import BUFFER_EVENTS, Exec

__all__ = ["ExecClient", "SyncEventStream", "SyncExec"]

_T = TypeVar("_T")


class _Portal:
    """An event loop in a daemon thread, and a blocking way to run coroutines on it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="execstream-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a sync execstream client cannot be used from its own loop")
        if self._closed:
            coroutine.close()
            raise RuntimeError("this ExecClient is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): stop the work on the portal too
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


class ExecClient:
    """The synchronous twin of :class:`AsyncExecClient`: same arguments, same methods.

    >>> with ExecClient("127.0.0.1:50051") as client:  # doctest: +SKIP
    ...     with client.run("default", "hello", ["echo", "hi"]) as exec_:
    ...         for event in exec_:
    ...             print(event)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float | None = 30.0,
        keepalive_time: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        client_id: str = "execstream-python",
        options: Sequence[ChannelOption] = (),
    ) -> None:
        self._client = AsyncExecClient(
            target,
            token=token,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            timeout=timeout,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            retry=retry,
            client_id=client_id,
            options=options,
        )
        self._portal = _Portal()

    @property
    def target(self) -> str:
        return self._client.target

    def run(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        tty: bool = False,
        terminal_size: tuple[int, int] | None = None,
        close_stdin: bool = False,
        timeout: float | None = None,
    ) -> SyncExec:
        """See :meth:`AsyncExecClient.run`."""
        opened = self._portal.call(
            self._client.run(
                container_id,
                exec_id,
                command,
                env=env,
                working_dir=working_dir,
                tty=tty,
                terminal_size=terminal_size,
                close_stdin=close_stdin,
                timeout=timeout,
            )
        )
        return SyncExec(self._portal, opened)

    def attach(
        self,
        container_id: str,
        exec_id: str,
        *,
        from_sequence: int = 0,
        timeout: float | None = None,
    ) -> SyncExec:
        """See :meth:`AsyncExecClient.attach`."""
        opened = self._portal.call(
            self._client.attach(container_id, exec_id, from_sequence=from_sequence, timeout=timeout)
        )
        return SyncExec(self._portal, opened)

    def status(
        self,
        container_id: str,
        exec_id: str | None = None,
        *,
        resources: bool = False,
        timeout: float | None = None,
    ) -> Status:
        """See :meth:`AsyncExecClient.status`."""
        return self._portal.call(
            self._client.status(container_id, exec_id, resources=resources, timeout=timeout)
        )

    def events(
        self,
        container_id: str | None = None,
        exec_id: str | None = None,
        *,
        from_sequence: int | None = None,
    ) -> SyncEventStream:
        """See :meth:`AsyncExecClient.events`."""

        async def make() -> EventStream:
            return self._client.events(container_id, exec_id, from_sequence=from_sequence)

        return SyncEventStream(self._portal, self._portal.call(make()))

    def pause(self, container_id: str, *, timeout: float | None = None) -> str:
        """See :meth:`AsyncExecClient.pause`."""
        return self._portal.call(self._client.pause(container_id, timeout=timeout))

    def resume(self, container_id: str, *, timeout: float | None = None) -> str:
        """See :meth:`AsyncExecClient.resume`."""
        return self._portal.call(self._client.resume(container_id, timeout=timeout))

    def signal(
        self,
        container_id: str,
        name: str,
        exec_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> str:
        """See :meth:`AsyncExecClient.signal`."""
        return self._portal.call(self._client.signal(container_id, name, exec_id, timeout=timeout))

    def close(self) -> None:
        """Detach every stream, close the channel, stop the portal thread."""
        try:
            self._portal.call(self._client.aclose())
        except RuntimeError:
            pass  # already closed
        finally:
            self._portal.close()

    def __enter__(self) -> ExecClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ExecClient {self.target}>"


class SyncExec:
    """The synchronous twin of :class:`Exec`: ``for event in exec_``, ``exec_.wait()``."""

    def __init__(self, portal: _Portal, session: Exec) -> None:
        self._portal = portal
        self._exec = session
        self._batch: collections.deque[ExecEvent] = collections.deque()
        self._over = False

    @property
    def container_id(self) -> str:
        return self._exec.container_id

    @property
    def exec_id(self) -> str:
        return self._exec.exec_id

    @property
    def session_id(self) -> str:
        return self._exec.session_id

    @property
    def terminal_size(self) -> tuple[int, int] | None:
        return self._exec.terminal_size

    @property
    def exit_code(self) -> int | None:
        return self._exec.exit_code

    @property
    def last_sequence(self) -> int:
        return self._exec.last_sequence

    @property
    def missed(self) -> int:
        """See :attr:`Exec.missed`."""
        return self._exec.missed

    @property
    def resumes(self) -> int:
        return self._exec.resumes

    def __iter__(self) -> Iterator[ExecEvent]:
        return self

    def __next__(self) -> ExecEvent:
        if not self._batch:
            if self._over:
                raise StopIteration
            batch = self._portal.call(self._exec._take(BUFFER_EVENTS))
            if not batch:
                self._over = True
                raise StopIteration
            self._batch.extend(batch)
        return self._batch.popleft()

    def wait(self) -> int:
        """See :meth:`Exec.wait`."""
        return self._portal.call(self._exec.wait())

    def write_stdin(self, data: bytes) -> None:
        """See :meth:`Exec.write_stdin`."""
        self._portal.call(self._exec.write_stdin(data))

    def close_stdin(self) -> None:
        """See :meth:`Exec.close_stdin`."""
        self._portal.call(self._exec.close_stdin())

    def resize(self, width: int, height: int) -> None:
        """See :meth:`Exec.resize`."""
        self._portal.call(self._exec.resize(width, height))

    def close(self) -> None:
        """Detach (the exec keeps running)."""
        self._portal.call(self._exec.aclose())

    def __enter__(self) -> SyncExec:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._exec).replace("<Exec", "<SyncExec", 1)


class SyncEventStream:
    """The synchronous twin of :class:`EventStream`."""

    def __init__(self, portal: _Portal, stream: EventStream) -> None:
        self._portal = portal
        self._stream = stream

    @property
    def container_id(self) -> str | None:
        return self._stream.container_id

    @property
    def exec_id(self) -> str | None:
        return self._stream.exec_id

    @property
    def last_sequence(self) -> int | None:
        return self._stream.last_sequence

    @property
    def resumes(self) -> int:
        return self._stream.resumes

    def open(self) -> None:
        """See :meth:`EventStream.open`."""
        self._portal.call(self._stream.open())

    def __iter__(self) -> Iterator[LifecycleEvent]:
        return self

    def __next__(self) -> LifecycleEvent:
        try:
            return self._portal.call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._portal.call(self._stream.aclose())

    def __enter__(self) -> SyncEventStream:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
