"""Fixtures of the client tests: a real reference server on 127.0.0.1 and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from execstream.client import AsyncExecClient
from execstream.server import ExecServer
from execstream.server.testing import serve


@pytest.fixture
async def server() -> AsyncIterator[ExecServer]:
    async with serve(retention=30, cleanup_interval=0.5) as server:
        yield server


@pytest.fixture
async def client(server: ExecServer) -> AsyncIterator[AsyncExecClient]:
    async with AsyncExecClient(server.address, timeout=30) as client:
        yield client
