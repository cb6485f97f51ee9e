"""The reference server: settings, the retention sweep, and a grpc.aio server around them.

Lifecycle is explicit, as in grpclib: :meth:`ExecServer.start` binds and serves,
:meth:`ExecServer.close` stops accepting, ends open streams with UNAVAILABLE, kills the execs
it runs and frees its state directory, and ``async with`` does both.  An engine that has its
own ``grpc.aio.Server`` uses :class:`ExecAttachable` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import grpc.aio

from execstream import wire

from ._executor import Executor
from ._registry import ExecRecord, Limits, Registry
from ._runner import ProcessRunner
from ._service import ExecService
from .runtime import Runtime
from .runtime.process import ProcessRuntime
from .runtime.runc import RuncRuntime

__all__ = [
    "RUNTIMES",
    "ExecAttachable",
    "ExecServer",
    "RetentionSweeper",
    "ServerSettings",
    "create_runtime",
]

log = logging.getLogger("execstream.server")

#: Server-side keepalive, so that a frozen client is noticed (DESIGN: engineering facts).
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Everything ``execstream serve`` takes as flags."""

    listen: str = "127.0.0.1:0"
    token: str | None = None
    retention: float = 300.0  # PROTOCOL 11.1
    cleanup_interval: float = 30.0  # PROTOCOL 11.2
    limits: Limits = field(default_factory=Limits)
    state_dir: Path | None = None  # None: a fresh temporary directory, removed at close
    drain_timeout: float = 2.0  # PROTOCOL 5.3
    shutdown_grace: float = 2.0
    #: What runs the execs: one of :data:`RUNTIMES`.
    runtime: str = "process"
    #: The root filesystem of runc containers; None: one assembled from busybox.
    rootfs: Path | None = None

    def __post_init__(self) -> None:
        if self.retention < 0 or self.cleanup_interval <= 0:
            raise ValueError("retention must be >= 0 and cleanup_interval > 0 seconds")
        if self.runtime not in RUNTIMES:
            raise ValueError(
                f"unknown runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}"
            )


#: The runtimes ``ServerSettings.runtime`` (and ``execstream serve --runtime``) can name.
RUNTIMES = ("process", "runc")


def create_runtime(settings: ServerSettings, state_dir: Path) -> Runtime:
    """The runtime ``settings.runtime`` names, keeping its state under ``state_dir``.

    A runtime that cannot run here raises ``RuntimeUnavailable`` (an ``OSError``) saying
    what to install.
    """
    if settings.runtime == "runc":
        return RuncRuntime(state_dir, rootfs=settings.rootfs, drain_timeout=settings.drain_timeout)
    return ProcessRuntime(state_dir, drain_timeout=settings.drain_timeout)


class RetentionSweeper:
    """PROTOCOL 11.2: every ``interval`` seconds, remove execs exited ``retention`` ago."""

    def __init__(
        self,
        registry: Registry,
        remove: Callable[[ExecRecord], None],
        *,
        retention: float,
        interval: float,
    ) -> None:
        self._registry = registry
        self._remove = remove
        self.retention = retention
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def sweep(self) -> int:
        expired = self._registry.expired(self.retention)
        for record in expired:
            try:
                self._remove(record)
            except Exception:
                log.exception("could not remove %r", record)
        return len(expired)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="execstream-retention-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class ExecAttachable:
    """The Exec service for a ``grpc.aio.Server`` that an embedding engine already has.

    The engine registers execs through :attr:`executor` (the executor API) and calls
    :meth:`add_to_server` before starting its server, then ``await start()`` for the
    retention sweep and ``await close()`` when it shuts down.  With a ``runner``, execs can
    also be created over the wire (what ``execstream serve`` does).
    """

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        runner: ProcessRunner | None = None,
        token: str | None = None,
        retention: float = 300.0,
        cleanup_interval: float = 30.0,
    ) -> None:
        self.executor = executor or (runner.executor if runner else Executor(Registry()))
        self.registry = self.executor.registry
        self.runner = runner
        self.service = ExecService(self.registry, runner, token=token)
        self.sweeper = RetentionSweeper(
            self.registry, self._remove, retention=retention, interval=cleanup_interval
        )

    def _remove(self, record: ExecRecord) -> None:
        if self.runner is not None:
            self.runner.remove(record)
        else:
            self.executor.handle(record).unregister()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        wire.add_ExecServicer_to_server(self.service, server)

    async def start(self) -> None:
        self.sweeper.start()

    async def close(self) -> None:
        """End open streams with UNAVAILABLE, kill the execs the runner started."""
        self.service.begin_shutdown()
        await self.sweeper.stop()
        if self.runner is not None:
            await self.runner.close()


class ExecServer:
    """``execstream serve`` as an object: ``async with ExecServer(settings) as server:``."""

    def __init__(
        self, settings: ServerSettings | None = None, *, runtime: Runtime | None = None
    ) -> None:
        """``runtime`` replaces the one ``settings.runtime`` names (a test's fake)."""
        self.settings = settings or ServerSettings()
        self._own_state_dir = self.settings.state_dir is None
        self.state_dir = self.settings.state_dir or Path(tempfile.mkdtemp(prefix="execstream-"))
        registry = Registry(self.settings.limits)
        executor = Executor(registry, self.state_dir / "logs")
        if runtime is None:
            runtime = create_runtime(self.settings, self.state_dir)
        self.attachable = ExecAttachable(
            executor,
            runner=ProcessRunner(executor, runtime),
            token=self.settings.token,
            retention=self.settings.retention,
            cleanup_interval=self.settings.cleanup_interval,
        )
        self._server: grpc.aio.Server | None = None
        self._closed = asyncio.Event()
        self.address = ""

    @property
    def registry(self) -> Registry:
        return self.attachable.registry

    async def start(self) -> str:
        """Bind, serve, and return the address clients use (``host:port`` or ``unix:PATH``)."""
        server = grpc.aio.server(options=KEEPALIVE_OPTIONS)
        self.attachable.add_to_server(server)
        listen = self.settings.listen
        if listen.startswith("unix:"):
            path = listen.removeprefix("unix:").removeprefix("//")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            old = os.umask(0o177)  # the socket is created owner-only, never wider
            try:
                server.add_insecure_port(f"unix:{path}")
                await server.start()
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self.address = f"unix:{path}"
        else:
            host, _, _ = listen.rpartition(":")
            port = server.add_insecure_port(listen)
            if port == 0:
                raise OSError(f"could not listen on {listen}")
            await server.start()
            self.address = f"{host}:{port}"
        self._server = server
        await self.attachable.start()
        return self.address

    async def close(self) -> None:
        """PROTOCOL 13.2: streams end with UNAVAILABLE, execs are killed, nothing is left."""
        if self._server is None or self._closed.is_set():
            return
        await self.attachable.close()
        await self._server.stop(self.settings.shutdown_grace)
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.settings.listen.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.removeprefix("unix:"))
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> ExecServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
