"""Resume after a broken connection (impl/client/_exec.py): a TCP proxy on 127.0.0.1 sits
between client and server and the test cuts it mid-stream, for real."""

from __future__ import annotations

import asyncio

import pytest
from client_support import ids
from tcp_proxy import TcpProxy

from execstream.client import (
    AsyncExecClient,
    ExecClient,
    ExecEvent,
    Exit,
    Gap,
    Output,
    RetryPolicy,
    ServerShuttingDown,
    Unavailable,
)
from execstream.server import Limits
from execstream.server.testing import serve

FAST_RETRY = RetryPolicy(max_attempts=50, initial_backoff=0.02, max_backoff=0.2)

# 6 MB of random stdout and stderr, interleaved, over about a second.
SEVERAL_MB = (
    "i=0; while [ $i -lt 40 ]; do head -c 100000 /dev/urandom; "
    "head -c 50000 /dev/urandom >&2; i=$((i+1)); sleep 0.02; done"
)


def chunks(events: list[ExecEvent]) -> list[tuple[str, int, bytes]]:
    return [(e.stream, e.sequence, e.data) for e in events if isinstance(e, Output)]


async def test_cut_connection_is_resumed_with_every_byte_once() -> None:
    async with (
        serve() as server,
        TcpProxy(server.address) as proxy,
        AsyncExecClient(proxy.address, retry=FAST_RETRY) as client,
    ):
        c, e = ids()
        exec_ = await client.run(c, e, ["sh", "-c", SEVERAL_MB])
        received: list[ExecEvent] = []
        total, cut_at = 0, [1_000_000, 3_000_000]
        async for event in exec_:
            received.append(event)
            if isinstance(event, Output):
                total += len(event.data)
                if cut_at and total >= cut_at[0]:
                    cut_at.pop(0)
                    assert proxy.cut() == 1
        assert exec_.resumes == 2 and proxy.connections == 3
        async with AsyncExecClient(server.address) as direct:
            everything = [event async for event in await direct.attach(c, e)]
    assert received[-1] == Exit(0) == everything[-1]
    assert not any(isinstance(event, Gap) for event in received)
    assert chunks(received) == chunks(everything)  # every chunk once, in order
    assert total == 6_000_000


async def test_sync_client_resumes_through_the_portal() -> None:
    async with (
        serve() as server,
        TcpProxy(server.address) as proxy,
    ):
        c, e = ids()
        loop = asyncio.get_running_loop()

        def consume() -> tuple[list[ExecEvent], int]:
            with ExecClient(proxy.address, retry=FAST_RETRY) as client:
                exec_ = client.run(c, e, ["sh", "-c", SEVERAL_MB])
                received, total, cut = [], 0, False
                for event in exec_:
                    received.append(event)
                    if isinstance(event, Output):
                        total += len(event.data)
                        if not cut and total >= 2_000_000:
                            cut = True
                            asyncio.run_coroutine_threadsafe(_cut(proxy), loop).result()
                return received, exec_.resumes

        received, resumes = await asyncio.to_thread(consume)
        async with AsyncExecClient(server.address) as direct:
            everything = [event async for event in await direct.attach(c, e)]
    assert resumes == 1
    assert chunks(received) == chunks(everything) and received[-1] == Exit(0)


async def _cut(proxy: TcpProxy) -> None:
    assert proxy.cut() == 1


async def test_output_lost_while_disconnected_is_reported_as_a_gap() -> None:
    async with (
        serve(limits=Limits(max_output_bytes=256 * 1024)) as server,
        TcpProxy(server.address) as proxy,
        AsyncExecClient(proxy.address, retry=FAST_RETRY) as client,
        AsyncExecClient(server.address) as direct,
    ):
        c, e = ids()
        script = "head -c 100000 /dev/zero; read _; head -c 3000000 /dev/urandom; echo end"
        exec_ = await client.run(c, e, ["sh", "-c", script])
        received: list[ExecEvent] = []
        async for event in exec_:
            received.append(event)
            if sum(len(o.data) for o in received if isinstance(o, Output)) == 100_000:
                break
        # Disconnect and keep the client out while 3 MB go past a 256 KiB output limit.
        proxy.accepting = False
        assert proxy.cut() == 1
        witness = await direct.attach(c, e)
        await witness.write_stdin(b"\n")
        assert await witness.wait() == 0
        proxy.accepting = True
        received += [event async for event in exec_]
    assert exec_.resumes == 1 and received[-1] == Exit(0)
    gaps = [event for event in received if isinstance(event, Gap)]
    assert gaps and all(gap.missed > 0 for gap in gaps)
    assert exec_.missed == sum(gap.missed for gap in gaps), "what wait() callers check"
    # Every chunk is accounted for exactly once: received, or counted in the gap before it.
    last = 0
    for event in received:
        if isinstance(event, Gap):
            assert event.before_sequence == last + event.missed + 1
            last += event.missed
        elif isinstance(event, Output):
            assert event.sequence == last + 1
            last = event.sequence
    assert last == exec_.last_sequence
    tail = received[-2]
    assert isinstance(tail, Output) and tail.sequence == last and tail.data.endswith(b"end\n")


async def test_server_shutting_down_is_not_resumed() -> None:
    async with serve() as server, AsyncExecClient(server.address, retry=FAST_RETRY) as client:
        c, e = ids()
        exec_ = await client.run(c, e, ["sleep", "30"])
        await server.close()
        with pytest.raises(ServerShuttingDown) as raised:
            async for _event in exec_:
                pass
        assert "shutting down" in raised.value.message and exec_.resumes == 0
        with pytest.raises(ServerShuttingDown):
            await exec_.wait()


async def test_resume_attempts_are_bounded() -> None:
    async with serve() as server, TcpProxy(server.address) as proxy:
        retry = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
        async with AsyncExecClient(proxy.address, retry=retry) as client:
            c, e = ids()
            exec_ = await client.run(c, e, ["sleep", "30"])
            proxy.accepting = False
            proxy.cut()
            with pytest.raises(Unavailable, match="gave up after 3 attempts"):
                await exec_.wait()
        async with AsyncExecClient(server.address) as direct:
            await direct.signal(c, "KILL")


async def test_lifecycle_subscription_is_resumed_without_duplicates() -> None:
    async with (
        serve() as server,
        TcpProxy(server.address) as proxy,
        AsyncExecClient(proxy.address, retry=FAST_RETRY) as client,
        AsyncExecClient(server.address) as direct,
    ):
        c, _ = ids()
        async with client.events(c) as events:
            assert await (await direct.run(c, "one", ["true"])).wait() == 0
            first = [await anext(events) for _ in range(4)]  # created, registered, ...
            proxy.cut()
            assert await (await direct.run(c, "two", ["true"])).wait() == 0
            second = [await anext(events) for _ in range(3)]
        assert events.resumes == 1
        sequences = [event.sequence for event in first + second]
        assert sequences == list(range(sequences[0], sequences[0] + 7))
        assert [event.exec_id for event in second] == ["two"] * 3
