"""A real reference server on a free local port, for tests and the embedded conformance target.

async with serve(retention=2, cleanup_interval=0.5) as server:
    channel = grpc.aio.insecure_channel(server.address)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from ._registry import Clock, Limits
from ._server import ExecServer, ServerSettings
from .runtime import Runtime

__all__ = ["serve"]


@contextlib.asynccontextmanager
async def serve(
    *,
    limits: Limits | None = None,
    runtime: str | Runtime = "process",
    clock: Clock | None = None,
    **settings: Any,
) -> AsyncIterator[ExecServer]:
    """Start an :class:`ExecServer` on ``127.0.0.1:0`` (unless ``listen`` is given).

    ``runtime`` is a runtime's name (``ServerSettings.runtime``) or a runtime object, such
    as a :class:`~execstream.server.runtime.FakeRuntime`; ``clock`` replaces the system clock
    of the registry, so a test can move retention time without waiting (PROTOCOL 11.1).
    """
    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    unknown = set(settings) - fields
    if unknown:
        raise TypeError(f"unknown server settings: {', '.join(sorted(unknown))}")
    settings.setdefault("listen", "127.0.0.1:0")
    if isinstance(runtime, str):
        settings["runtime"] = runtime
    config = ServerSettings(limits=limits or Limits(), **settings)
    instance = None if isinstance(runtime, str) else runtime
    async with ExecServer(config, runtime=instance, clock=clock) as server:
        yield server
