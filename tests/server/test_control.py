"""Lifecycle, status, pause/resume/signal, stdin and TTY over real gRPC (PROTOCOL 7-10)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from cpu import BURN_SECONDS, BURNER, TICK_TOLERANCE, Bracket, assert_percent_matches, cpu_seconds
from sessions import SessionResult, attach, collect, requests, run, start

from execstream import wire
from execstream.server import ExecServer
from execstream.server.testing import serve

pytestmark = pytest.mark.asyncio


def cid() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def server() -> AsyncIterator[ExecServer]:
    async with serve(retention=0.5, cleanup_interval=0.2) as server:
        yield server


@pytest.fixture
async def stub(server: ExecServer) -> AsyncIterator[wire.ExecStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield wire.ExecStub(channel)


async def status_code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- lifecycle (PROTOCOL 8) --------------------------------------------------------------


class Subscriber:
    def __init__(self, stub: wire.ExecStub, request: wire.ContainerLifecycleRequest) -> None:
        self.call = stub.ContainerLifecycle(request)
        self.events: list[wire.ContainerLifecycleEvent] = []
        self.last_sequence = -1
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        metadata = await self.call.initial_metadata()
        self.last_sequence = int(dict(metadata)["execstream-last-sequence"])
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.call:
            self.events.append(event)

    async def until(self, predicate: object, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out; saw {self.types()}"
            await asyncio.sleep(0.02)

    def types(self, container: str | None = None) -> list[tuple[str, str]]:
        return [
            (e.exec_id, e.event_type)
            for e in self.events
            if container is None or e.container_id == container
        ]

    def stop(self) -> None:
        self.call.cancel()


def exec_history(exec_id: str) -> list[tuple[str, str]]:
    return [(exec_id, t) for t in ("registered", "started", "exited", "unregistered")]


async def test_subscribers_before_and_during_activity_see_every_transition_once(
    stub: wire.ExecStub,
) -> None:
    c = cid()
    early = Subscriber(stub, wire.ContainerLifecycleRequest(container_id=c))
    await early.start()
    runs = [asyncio.create_task(run(stub, c, f"e{i}", "sh", "-c", "sleep 0.2")) for i in range(3)]
    await asyncio.sleep(0.1)
    during = Subscriber(stub, wire.ContainerLifecycleRequest(replay_from_sequence=0))
    await during.start()
    await asyncio.gather(*runs)
    await early.until(lambda events: any(e.event_type == "removed" for e in events))
    await during.until(
        lambda events: any(e.event_type == "removed" and e.container_id == c for e in events)
    )
    for subscriber in (early, during):
        mine = [e for e in subscriber.events if e.container_id == c]
        sequences = [e.sequence for e in mine]
        assert sequences == sorted(set(sequences)), "each event once, in order"
        assert mine[0].event_type == "created" and mine[-1].event_type == "removed"
        for i in range(3):
            assert [t for t in subscriber.types(c) if t[0] == f"e{i}"] == exec_history(f"e{i}")
        exited = [e for e in mine if e.event_type == "exited"]
        assert all(e.exit_code == 0 and e.status == "exited" for e in exited)
    # The replaying subscriber's events split cleanly at its cut.
    replayed = [e for e in during.events if e.is_replay]
    live = [e for e in during.events if not e.is_replay]
    assert all(e.sequence <= during.last_sequence for e in replayed)
    assert all(e.sequence > during.last_sequence for e in live)
    all_sequences = [e.sequence for e in during.events]
    assert all_sequences == list(range(1, all_sequences[-1] + 1)), "no event lost or doubled"
    early.stop()
    during.stop()


async def test_lifecycle_filters_and_errors(stub: wire.ExecStub) -> None:
    c, other = cid(), cid()
    only = Subscriber(stub, wire.ContainerLifecycleRequest(container_id=c, exec_id="x"))
    await only.start()
    await run(stub, other, "x", "true")
    await run(stub, c, "y", "true")
    await run(stub, c, "x", "true")
    await only.until(lambda events: any(e.event_type == "exited" for e in events))
    assert {(e.container_id, e.exec_id) for e in only.events} == {(c, "x")}
    only.stop()
    bad = stub.ContainerLifecycle(wire.ContainerLifecycleRequest(exec_id="x"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in bad:
            pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    past = stub.ContainerLifecycle(wire.ContainerLifecycleRequest(replay_from_sequence=10**9))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in past:
            pass
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE


# -- status (PROTOCOL 9) -----------------------------------------------------------------


async def test_status_with_real_resource_usage(stub: wire.ExecStub) -> None:
    """cpu_percent through the RPC is the CPU time the exec used over the window (PROTOCOL
    9.4), checked as an identity that holds however loaded the machine is (see cpu.py)."""
    c = cid()
    go = asyncio.Event()
    hold = asyncio.Event()
    created = asyncio.Event()

    async def session_requests() -> AsyncIterator[wire.SessionRequest]:
        yield start(c, "burn", "python3", "-c", BURNER)
        await go.wait()
        yield wire.SessionRequest(stdin=b"go\n")
        await hold.wait()

    session = asyncio.create_task(collect(stub, session_requests(), on_ready=created))
    await created.wait()
    printed = await _wait_for_output(stub, c, "burn", b"ready", asyncio.Event())
    pid = int(printed.split()[printed.split().index(b"ready") + 1])
    before = time.time_ns()
    request = wire.ContainerStatusRequest(container_id=c, include_resource_usage=True)
    cpu_before = cpu_seconds(pid)
    opened = time.monotonic()
    await stub.ContainerStatus(request)  # the first sample opens the window
    opened_by = Bracket(opened, time.monotonic())
    go.set()
    await _wait_for_output(stub, c, "burn", b"burnt", asyncio.Event())
    used = cpu_seconds(pid) - cpu_before
    assert used >= BURN_SECONDS - TICK_TOLERANCE
    closed = time.monotonic()
    status = await stub.ContainerStatus(request)
    closed_by = Bracket(closed, time.monotonic())
    assert status.status == "running" and status.exec_ids == ["burn"]
    assert status.exit_code is None and status.finished_at is None
    assert 0 < status.started_at <= before
    usage = status.resource_usage
    assert usage is not None
    assert usage.memory_bytes >= 40 * 1024 * 1024
    assert_percent_matches(usage.cpu_percent, used, opened_by, closed_by)
    exec_status = await stub.ContainerStatus(
        wire.ContainerStatusRequest(container_id=c, exec_id="burn")
    )
    assert exec_status.exec_id == "burn" and exec_status.resource_usage is None
    await stub.ContainerSignal(wire.ContainerSignalRequest(container_id=c, signal="KILL"))
    result = await session
    hold.set()
    assert result.exit_code == 137
    done = await stub.ContainerStatus(wire.ContainerStatusRequest(container_id=c, exec_id="burn"))
    assert done.status == "exited" and done.exit_code == 137
    assert done.finished_at is not None and done.finished_at >= done.started_at
    container = await stub.ContainerStatus(wire.ContainerStatusRequest(container_id=c))
    assert container.status == "exited" and container.exit_code == 137


async def _wait_for_output(
    stub: wire.ExecStub, c: str, e: str, marker: bytes, event: asyncio.Event
) -> bytes:
    """Attach (the exec must exist), set ``event`` once ``marker`` was printed, and return
    the stdout seen up to then."""
    seen = b""
    async with asyncio.timeout(30):
        async for response in stub.Session(requests(start(c, e), hold=asyncio.Event())):
            if response.output_chunk is not None:
                seen += response.output_chunk.stdout or b""
                if marker in seen:
                    event.set()
                    return seen
    raise AssertionError(f"{marker!r} never came; got {seen[-200:]!r}")


async def test_status_errors(stub: wire.ExecStub) -> None:
    assert (
        await status_code_of(stub.ContainerStatus(wire.ContainerStatusRequest(container_id="")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await status_code_of(stub.ContainerStatus(wire.ContainerStatusRequest(container_id="no")))
        == grpc.StatusCode.NOT_FOUND
    )


# -- pause, resume, signal (PROTOCOL 10) -------------------------------------------------

COUNTER = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.01; done"


async def _count_lines(stub: wire.ExecStub, c: str, e: str, seconds: float) -> int:
    """Lines the exec prints during ``seconds``: live chunks only, replay is skipped."""
    lines = 0
    call = stub.Session(requests(start(c, e), hold=asyncio.Event()))
    try:
        async with asyncio.timeout(seconds):
            async for response in call:
                chunk = response.output_chunk
                if chunk is not None and not chunk.is_replay:
                    lines += (chunk.stdout or b"").count(b"\n")
    except TimeoutError:
        pass
    finally:
        call.cancel()
    return lines


async def test_pause_stops_all_progress_and_resume_continues(stub: wire.ExecStub) -> None:
    c = cid()
    marker = f"/tmp/execstream-test-{uuid.uuid4().hex}"
    grandchild = f"setsid sh -c 'while true; do echo x >> {marker}; sleep 0.01; done' & "
    hold = asyncio.Event()
    created = asyncio.Event()
    session = asyncio.create_task(
        collect(
            stub,
            requests(start(c, "count", "sh", "-c", grandchild + COUNTER), hold=hold),
            on_ready=created,
        )
    )
    await created.wait()
    try:
        assert await _count_lines(stub, c, "count", 0.5) > 5
        reply = await stub.ContainerPause(wire.ContainerControlRequest(container_id=c))
        assert reply.success
        await asyncio.sleep(0.1)
        status = await stub.ContainerStatus(wire.ContainerStatusRequest(container_id=c))
        assert status.status == "paused"
        size_paused = os.path.getsize(marker)
        assert await _count_lines(stub, c, "count", 0.6) == 0
        assert os.path.getsize(marker) == size_paused, "the setsid grandchild was paused too"
        again = stub.ContainerPause(wire.ContainerControlRequest(container_id=c))
        assert await status_code_of(again) == grpc.StatusCode.FAILED_PRECONDITION
        creating = await run(stub, c, "while-paused", "true")
        assert creating.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (await stub.ContainerResume(wire.ContainerControlRequest(container_id=c))).success
        assert await _count_lines(stub, c, "count", 0.5) > 5
        assert os.path.getsize(marker) > size_paused
        not_paused = stub.ContainerResume(wire.ContainerControlRequest(container_id=c))
        assert await status_code_of(not_paused) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await stub.ContainerSignal(wire.ContainerSignalRequest(container_id=c, signal="KILL"))
        hold.set()
        result = await session
        if os.path.exists(marker):
            os.unlink(marker)
    assert result.exit_code == 137


@pytest.mark.parametrize("name", ["TERM", "SIGTERM", "sigterm", "Term"])
async def test_signal_names_reach_a_trapping_process(stub: wire.ExecStub, name: str) -> None:
    c = cid()
    ready = asyncio.Event()
    script = "trap 'echo caught; exit 42' TERM; echo ready; while true; do sleep 0.05; done"
    session = asyncio.create_task(
        collect(stub, requests(start(c, "trap", "sh", "-c", script)), on_ready=ready)
    )
    await ready.wait()
    await _wait_for_output(stub, c, "trap", b"ready", asyncio.Event())
    reply = await stub.ContainerSignal(
        wire.ContainerSignalRequest(container_id=c, signal=name, exec_id="trap")
    )
    assert reply.success and "SIGTERM" in reply.message
    result = await session
    assert result.exit_code == 42 and result.stdout.endswith(b"caught\n")


async def test_signal_errors(stub: wire.ExecStub) -> None:
    c = cid()
    hold = asyncio.Event()
    ready = asyncio.Event()
    session = asyncio.create_task(
        collect(stub, requests(start(c, "s", "sleep", "30"), hold=hold), on_ready=ready)
    )
    await ready.wait()
    bad = stub.ContainerSignal(wire.ContainerSignalRequest(container_id=c, signal="NOPE"))
    assert await status_code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
    missing = stub.ContainerSignal(wire.ContainerSignalRequest(container_id="none", signal="TERM"))
    assert await status_code_of(missing) == grpc.StatusCode.NOT_FOUND
    await stub.ContainerSignal(wire.ContainerSignalRequest(container_id=c, signal="KILL"))
    hold.set()
    assert (await session).exit_code == 137
    dead = stub.ContainerSignal(wire.ContainerSignalRequest(container_id=c, signal="TERM"))
    assert await status_code_of(dead) == grpc.StatusCode.FAILED_PRECONDITION
    idle = stub.ContainerPause(wire.ContainerControlRequest(container_id=c))
    assert await status_code_of(idle) == grpc.StatusCode.FAILED_PRECONDITION


# -- stdin (PROTOCOL 7.1) ----------------------------------------------------------------


async def test_stdin_from_one_client_reaches_cat_and_both_readers_see_it(
    stub: wire.ExecStub,
) -> None:
    c = cid()
    payload = os.urandom(1024 * 1024)
    pieces = [payload[i : i + 100_000] for i in range(0, len(payload), 100_000)]
    ready = asyncio.Event()
    hold = asyncio.Event()
    writer_stream = requests(start(c, "cat", "cat"), hold=hold)
    writer = asyncio.create_task(collect(stub, writer_stream, on_ready=ready))
    await ready.wait()
    reader = asyncio.create_task(attach(stub, c, "cat"))

    async def feed() -> AsyncIterator[wire.SessionRequest]:
        yield wire.SessionRequest(start=wire.Start(container_id=c, exec_id="cat"))
        for piece in pieces:
            yield wire.SessionRequest(stdin=piece)
        yield wire.SessionRequest(stdin=b"")  # EOF
        await hold.wait()

    feeder = asyncio.create_task(collect(stub, feed()))
    results: list[SessionResult] = await asyncio.gather(writer, reader, feeder)
    hold.set()
    for result in results:
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.exit_code == 0
        assert result.stdout == payload
    after_eof = await collect(
        stub, requests(start(c, "cat"), [wire.SessionRequest(stdin=b"more")], hold=hold)
    )
    assert after_eof.code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION)


async def test_stdin_after_eof_is_failed_precondition(stub: wire.ExecStub) -> None:
    c = cid()
    hold = asyncio.Event()
    result = await collect(
        stub,
        requests(
            start(c, "s", "sh", "-c", "cat; sleep 1"),
            [wire.SessionRequest(stdin=b""), wire.SessionRequest(stdin=b"late")],
            hold=hold,
        ),
    )
    hold.set()
    assert result.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "EOF" in result.details


# -- TTY (PROTOCOL 7.3, 4.6) -------------------------------------------------------------


async def test_tty_resize_reaches_stty_and_sigwinch(stub: wire.ExecStub) -> None:
    c = cid()
    script = (
        "trap 'stty size; echo winch' WINCH; stty size; echo go; while true; do sleep 0.05; done"
    )
    got = b""
    saw_winch = asyncio.Event()
    send_resize = asyncio.Event()

    async def feed() -> AsyncIterator[wire.SessionRequest]:
        yield start(c, "tty", "sh", "-c", script, tty=True)
        await send_resize.wait()
        yield wire.SessionRequest(resize=wire.Resize(width=132, height=43))
        await saw_winch.wait()

    readies = []
    async for response in stub.Session(feed()):
        if response.ready is not None:
            readies.append(response.ready)
        elif response.output_chunk is not None:
            chunk = response.output_chunk
            assert chunk.stderr is None, "a TTY exec has only stdout (PROTOCOL 4.6)"
            got += chunk.stdout or b""
            if b"go" in got:
                send_resize.set()
            if b"winch" in got and not saw_winch.is_set():
                saw_winch.set()
                await stub.ContainerSignal(
                    wire.ContainerSignalRequest(container_id=c, signal="KILL")
                )
        elif response.exit is not None:
            assert response.exit == 137
    assert readies[0].terminal_size == wire.Resize(width=80, height=24)
    assert b"24 80" in got
    assert b"43 132" in got
    bad = await collect(
        stub,
        requests(
            start(c, "tty2", "sleep", "1", tty=True),
            [wire.SessionRequest(resize=wire.Resize(width=0, height=10))],
            hold=asyncio.Event(),
        ),
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_initial_terminal_size_from_start(stub: wire.ExecStub) -> None:
    """PROTOCOL 7.3: the process sees Start.terminal_size from its first instruction."""
    c = cid()
    sized = await run(
        stub, c, "sized", "stty", "size", tty=True, terminal_size=wire.Resize(width=100, height=30)
    )
    assert sized.exit_code == 0 and sized.stdout.strip() == b"30 100"
    assert sized.readies[0].terminal_size == wire.Resize(width=100, height=30)
    bad = await run(
        stub, c, "bad", "stty", "size", tty=True, terminal_size=wire.Resize(width=0, height=30)
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "terminal_size" in bad.details


async def test_interactive_shell_on_a_tty_answers_stdin(stub: wire.ExecStub) -> None:
    c = cid()
    answered = asyncio.Event()

    async def feed() -> AsyncIterator[wire.SessionRequest]:
        yield start(c, "sh", "sh", "-i", tty=True)
        yield wire.SessionRequest(stdin=b"echo $((6*7))-answer\n")
        await answered.wait()
        yield wire.SessionRequest(stdin=b"exit 5\n")

    got = b""
    code = None
    async for response in stub.Session(feed(), timeout=30):
        if response.output_chunk is not None:
            got += response.output_chunk.stdout or b""
            if b"42-answer" in got:
                answered.set()
        elif response.exit is not None:
            code = response.exit
    assert b"42-answer" in got
    assert code == 5


async def test_lifecycle_subscriber_behind_the_history_is_told_the_gap() -> None:
    """PROTOCOL 8.4, 8.5: events evicted before a subscriber read them are counted."""
    from execstream.server import Limits

    async with (
        serve(limits=Limits(event_history=8)) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = wire.ExecStub(channel)
        c = cid()
        for i in range(4):  # 4 execs: created + 4 x (registered, started, exited) = 13 events
            assert (await run(stub, c, f"e{i}", "true")).exit_code == 0
        call = stub.ContainerLifecycle(wire.ContainerLifecycleRequest(replay_from_sequence=1))
        metadata = dict(await call.initial_metadata())
        last = int(metadata["execstream-last-sequence"])
        events = []
        async for event in call:
            events.append(event)
            if event.sequence == last:
                break
        call.cancel()
        assert events[0].gap_before == last - 8, "the evicted events are counted, not hidden"
        assert events[0].sequence == last - 8 + 1
        assert [e.sequence for e in events] == list(range(last - 7, last + 1))
        assert all(e.is_replay for e in events)
