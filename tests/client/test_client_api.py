"""execstream.client against a real reference server: typed events, the sync twin, stdin,
TTY, status, lifecycle and control (see impl/client)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from client_support import ids

from execstream.client import (
    AsyncExecClient,
    ExecClient,
    ExecEvent,
    Exit,
    Gap,
    LifecycleEvent,
    Output,
    ResourceUsage,
    Status,
)
from execstream.server import ExecServer
from execstream.server.testing import serve

MIXED = "echo one; echo two >&2; sleep 0.05; printf three; sleep 0.05; printf four >&2; exit 3"


def streams(events: list[ExecEvent]) -> tuple[bytes, bytes]:
    out = b"".join(e.data for e in events if isinstance(e, Output) and e.stream == "stdout")
    err = b"".join(e.data for e in events if isinstance(e, Output) and e.stream == "stderr")
    return out, err


def assert_contiguous(events: list[ExecEvent], first: int = 1) -> None:
    sequences = [e.sequence for e in events if isinstance(e, Output)]
    assert sequences == list(range(first, first + len(sequences)))
    assert not any(isinstance(e, Gap) for e in events)


async def test_run_yields_typed_output_then_exit(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sh", "-c", MIXED])
    assert exec_.session_id and exec_.terminal_size is None
    events = [event async for event in exec_]
    assert events[-1] == Exit(3)
    assert all(isinstance(event, Output) for event in events[:-1])
    assert streams(events) == (b"one\nthree", b"two\nfour")
    assert_contiguous(events)
    outputs = [event for event in events if isinstance(event, Output)]
    assert {o.stream for o in outputs} == {"stdout", "stderr"}
    assert not any(o.is_replay for o in outputs)
    timestamps = [o.timestamp for o in outputs]
    assert timestamps == sorted(timestamps) and timestamps[0] > 1_600_000_000 * 10**9
    assert await exec_.wait() == 3 and exec_.exit_code == 3
    # Iteration is over; iterating again yields nothing.
    assert [event async for event in exec_] == []


async def test_sync_client_gives_the_same_events(
    server: ExecServer, client: AsyncExecClient
) -> None:
    c, e = ids()
    async_events = [event async for event in await client.run(c, e, ["sh", "-c", MIXED])]

    def with_sync_client() -> tuple[list[ExecEvent], list[ExecEvent], int, Status]:
        with ExecClient(server.address) as sync:
            with sync.attach(c, e) as replayed:
                replay = list(replayed)
            with sync.run(c, f"{e}-sync", ["sh", "-c", MIXED]) as ran:
                assert ran.session_id
                fresh = list(ran)
                code = ran.wait()
            return replay, fresh, code, sync.status(c, f"{e}-sync")

    replay, fresh, code, status = await asyncio.to_thread(with_sync_client)
    # The same exec attached from the sync client: the same chunks, marked as replay.
    assert all(event.is_replay for event in replay if isinstance(event, Output))
    assert [
        dataclasses.replace(event, is_replay=False) if isinstance(event, Output) else event
        for event in replay
    ] == async_events
    # The same command run by the sync client: the same streams and exit.
    assert streams(fresh) == streams(async_events) and fresh[-1] == Exit(3) and code == 3
    assert_contiguous(fresh)
    assert status.state == "exited" and status.exit_code == 3


async def test_attach_replays_from_a_sequence(client: AsyncExecClient) -> None:
    c, e = ids()
    script = "for i in 1 2 3 4 5; do echo $i; sleep 0.02; done"
    assert await (await client.run(c, e, ["sh", "-c", script])).wait() == 0
    everything = [event async for event in await client.attach(c, e)]
    last = max(o.sequence for o in everything if isinstance(o, Output))
    assert streams(everything) == (b"1\n2\n3\n4\n5\n", b"")
    tail = [event async for event in await client.attach(c, e, from_sequence=last)]
    assert [type(event) for event in tail] == [Output, Exit]
    assert tail[0] == everything[-2] and tail[0].is_replay


async def test_wait_without_iterating_drains_and_reports_what_it_dropped(
    client: AsyncExecClient,
) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sh", "-c", "head -c 12000000 /dev/zero"])
    assert await asyncio.wait_for(exec_.wait(), 30) == 0
    events = [event async for event in exec_]
    gap, rest = events[0], events[1:]
    assert isinstance(gap, Gap), events[:2]
    outputs = [event for event in rest if isinstance(event, Output)]
    assert outputs[0].sequence == gap.before_sequence
    assert_contiguous(rest, first=gap.before_sequence)
    assert gap.missed + len(outputs) == exec_.last_sequence
    assert events[-1] == Exit(0)


async def test_wait_alongside_an_iterating_task_loses_nothing() -> None:
    # Nothing is evicted on the server: a gap here could only come from the client.
    async with (
        serve() as server,
        AsyncExecClient(server.address) as client,
    ):
        await _wait_alongside(client)


async def _wait_alongside(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sh", "-c", "head -c 12000000 /dev/zero"])

    async def consume() -> list[ExecEvent]:
        seen = []
        async for event in exec_:
            seen.append(event)
            await asyncio.sleep(0.001)  # a consumer slower than the network
        return seen

    consumer = asyncio.create_task(consume())
    assert await exec_.wait() == 0
    assert exec_.missed == 0, "a slow consumer loses nothing (PROTOCOL 6.7)"
    seen = await consumer
    assert_contiguous(seen)
    assert sum(len(o.data) for o in seen if isinstance(o, Output)) == 12_000_000


async def test_break_then_wait_returns(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sh", "-c", "head -c 12000000 /dev/zero; exit 4"])
    async for _event in exec_:
        break
    assert await asyncio.wait_for(exec_.wait(), 30) == 4


async def test_stdin_reaches_the_process_and_eof_ends_it(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sh", "-c", "while read line; do echo got $line; done"])
    await exec_.write_stdin(b"alpha\nbeta\n")
    received = b""
    async for event in exec_:
        assert isinstance(event, Output)
        received += event.data
        if received == b"got alpha\ngot beta\n":
            break
    await exec_.close_stdin()
    assert await exec_.wait() == 0
    await exec_.write_stdin(b"after the exit is discarded\n")  # PROTOCOL 7.1


async def test_eof_racing_the_exit_never_costs_the_exit(client: AsyncExecClient) -> None:
    """A write that meets the server's end of the call makes grpc.aio report INTERNAL and
    drop the unread exit (grpc/grpc#36066); the client resumes and still gets it."""
    c, _ = ids()
    for n in range(60):
        exec_ = await client.run(c, f"race-{n}", ["true"])
        await exec_.close_stdin()  # EOF is resent after a resume, never lost, never raised
        assert await exec_.wait() == 0


async def test_tty_reports_size_and_follows_resize(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sh", "-c", "read _; stty size"], tty=True)
    assert exec_.terminal_size == (80, 24)  # PROTOCOL 7.3
    await exec_.resize(100, 40)
    await exec_.write_stdin(b"go\n")  # after the resize on the same stream
    events = [event async for event in exec_]
    assert all(o.stream == "stdout" for o in events if isinstance(o, Output))  # PROTOCOL 4.6
    assert b"40 100" in streams(events)[0]
    assert events[-1] == Exit(0)


async def test_status_is_typed_with_resource_usage(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["cat"])
    running = await client.status(c, e, resources=True)
    assert running.state == "running" and running.exit_code is None
    assert running.finished_at is None and running.started_at > 0
    assert running.exec_id == e and running.exec_ids == (e,)
    assert isinstance(running.resource_usage, ResourceUsage)
    assert running.resource_usage.cpu_percent >= 0
    await exec_.close_stdin()
    assert await exec_.wait() == 0
    done = await client.status(c)
    assert (done.state, done.exit_code, done.exec_id, done.resource_usage) == (
        "exited",
        0,
        None,
        None,
    )
    assert done.finished_at is not None and done.finished_at >= done.started_at


async def test_lifecycle_events_are_typed_and_filtered(client: AsyncExecClient) -> None:
    c, e = ids()
    other, _ = ids()
    async with client.events(c) as events:
        assert events.last_sequence is not None
        await (await client.run(other, "x", ["true"])).wait()  # filtered out
        assert await (await client.run(c, e, ["sh", "-c", "exit 5"])).wait() == 5
        seen: list[LifecycleEvent] = []
        async for event in events:
            seen.append(event)
            if event.event_type == "exited":
                break
    assert [(ev.event_type, ev.exec_id) for ev in seen] == [
        ("created", None),
        ("registered", e),
        ("started", e),
        ("exited", e),
    ]
    assert seen[-1].exit_code == 5 and seen[0].exit_code is None
    assert all(ev.container_id == c and not ev.is_replay and ev.gap_before == 0 for ev in seen)
    sequences = [ev.sequence for ev in seen]
    assert sequences == sorted(sequences) and sequences[0] > events.last_sequence

    # Replayed from a sequence, through the sync twin.
    def replay(server_address: str) -> list[LifecycleEvent]:
        with (
            ExecClient(server_address) as sync,
            sync.events(c, e, from_sequence=sequences[1]) as stream,
        ):
            return [next(stream) for _ in range(3)]

    replayed = await asyncio.to_thread(replay, client.target)
    assert [ev.sequence for ev in replayed] == sequences[1:]
    assert all(ev.is_replay for ev in replayed)


async def test_pause_resume_and_signal(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sleep", "30"])
    assert await client.pause(c)
    assert (await client.status(c)).state == "paused"
    assert await client.resume(c)
    assert (await client.status(c, e)).state == "running"
    assert await client.signal(c, "term", e)
    assert await exec_.wait() == 143  # PROTOCOL 5.2


async def test_closing_an_exec_detaches_and_the_exec_goes_on(client: AsyncExecClient) -> None:
    c, e = ids()
    async with await client.run(c, e, ["sh", "-c", "read _; echo done"]) as exec_:
        pass
    assert (await client.status(c, e)).state == "running"
    follower = await client.attach(c, e)
    await follower.close_stdin()
    events = [event async for event in follower]
    assert streams(events)[0] == b"done\n" and events[-1] == Exit(0)
    with pytest.raises(Exception, match="closed"):
        await exec_.wait()
