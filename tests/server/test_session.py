"""The Session RPC over real gRPC on 127.0.0.1 with real processes (PROTOCOL 3-6, 11, 14)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from sessions import (
    REFUSAL_TRIES,
    SessionResult,
    SteppedClock,
    attach,
    collect,
    hidden_by_grpc,
    requests,
    run,
    start,
    until_removed,
)

from execstream import wire
from execstream.server import ExecServer, Limits, Stream
from execstream.server.testing import serve

pytestmark = pytest.mark.asyncio

# 1.5 MiB of binary stdout and stderr, interleaved, with pauses so clients attach mid-run.
MIXED = (
    "i=0; while [ $i -lt 12 ]; do "
    "head -c 65536 /dev/urandom; head -c 65536 /dev/urandom >&2; "
    "i=$((i+1)); sleep 0.05; done"
)


def ids() -> tuple[str, str]:
    return f"c-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def server() -> AsyncIterator[ExecServer]:
    async with serve(retention=30, cleanup_interval=0.2) as server:
        yield server


@pytest.fixture
async def stub(server: ExecServer) -> AsyncIterator[wire.ExecStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield wire.ExecStub(channel)


def stored(server: ExecServer, container: str, exec_id: str, stream: Stream) -> bytes:
    """What the server's log holds of one stream, read back from its storage."""
    log = server.registry.get(container, exec_id).log
    chunks = log.read(0, max_cost=1 << 40).items
    return b"".join(chunk.data for chunk in chunks if chunk.stream is stream)


async def test_ready_first_then_output_then_exit(stub: wire.ExecStub) -> None:
    """PROTOCOL 3.3, 4.1, 5.1, 5.2."""
    c, e = ids()
    result = await run(stub, c, e, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.code == grpc.StatusCode.OK, result.details
    assert result.order[0] == "ready" and result.order[-1] == "exit"
    assert result.readies[0].session_id
    assert result.readies[0].replay_complete
    assert result.readies[0].terminal_size is None
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 7)
    result.assert_contiguous()
    assert all(not chunk.is_replay for chunk in result.chunks)


async def test_three_clients_attached_at_different_times_get_identical_streams(
    server: ExecServer, stub: wire.ExecStub
) -> None:
    """PROTOCOL 4.2, 4.3, 6.1-6.3: 1.5 MiB of binary output; the stored log agrees."""
    c, e = ids()
    first_ready = asyncio.Event()
    creator = asyncio.create_task(
        collect(stub, requests(start(c, e, "sh", "-c", MIXED)), on_ready=first_ready)
    )
    await first_ready.wait()
    await asyncio.sleep(0.2)
    second = asyncio.create_task(attach(stub, c, e))
    await asyncio.sleep(0.3)
    third = asyncio.create_task(attach(stub, c, e))
    results = await asyncio.gather(creator, second, third)
    want_out = stored(server, c, e, Stream.STDOUT)
    want_err = stored(server, c, e, Stream.STDERR)
    assert len(want_out) == len(want_err) == 12 * 65536
    for result in results:
        assert result.code == grpc.StatusCode.OK, result.details
        result.assert_contiguous()
        assert result.stdout == want_out
        assert result.stderr == want_err
        assert result.exit_code == 0
    # Every client saw the same chunk under each sequence number (only is_replay differs).
    first, second, third = (
        [(c.sequence, c.timestamp, c.stdout, c.stderr) for c in r.chunks] for r in results
    )
    assert first == second == third
    assert any(c.is_replay for c in results[2].chunks)


async def test_late_attacher_replays_then_switches_to_live_without_hole(
    stub: wire.ExecStub,
) -> None:
    """PROTOCOL 6.2, 6.3: replay marked, a second Ready at N, live from N."""
    c, e = ids()
    script = "for i in $(seq 1 40); do echo line $i; sleep 0.02; done"
    first_ready = asyncio.Event()
    creator = asyncio.create_task(
        collect(stub, requests(start(c, e, "sh", "-c", script)), on_ready=first_ready)
    )
    await first_ready.wait()
    await asyncio.sleep(0.3)
    late = await attach(stub, c, e)
    await creator
    assert late.code == grpc.StatusCode.OK
    first, second = late.readies
    assert (first.replay_complete, second.replay_complete) == (False, True)
    assert first.session_id == second.session_id
    boundary = first.next_sequence
    assert boundary == second.next_sequence > 1
    switch = late.order.index("ready", 1)
    replayed = late.chunks[: switch - 1]
    assert [c.sequence for c in replayed] == list(range(1, boundary))
    assert all(chunk.is_replay for chunk in replayed)
    assert all(not chunk.is_replay for chunk in late.chunks[switch - 1 :])
    late.assert_contiguous()
    assert late.stdout == b"".join(f"line {i}\n".encode() for i in range(1, 41))


async def test_replay_from_sequence_and_out_of_range(stub: wire.ExecStub) -> None:
    """PROTOCOL 6.1."""
    c, e = ids()
    done = await run(stub, c, e, "sh", "-c", "for i in 1 2 3 4 5; do echo $i; sleep 0.01; done")
    total = len(done.chunks)
    assert total >= 1
    tail = await attach(stub, c, e, replay_from_sequence=total)
    assert [chunk.sequence for chunk in tail.chunks] == [total]
    assert tail.exit_code == 0
    at_end = await attach(stub, c, e, replay_from_sequence=total + 1)
    assert at_end.chunks == [] and at_end.readies[0].replay_complete and at_end.exit_code == 0
    past = await attach(stub, c, e, replay_from_sequence=total + 2)
    assert past.code == grpc.StatusCode.OUT_OF_RANGE
    assert str(total + 2) in past.details


async def test_output_right_before_exit_is_delivered_before_exit(stub: wire.ExecStub) -> None:
    """PROTOCOL 5.1: many short execs, each printing a unique marker as its last act."""
    c = ids()[0]
    for n in range(40):
        marker = f"marker-{n}-{uuid.uuid4().hex}"
        result = await run(stub, c, f"short-{n}", "printf", marker)
        assert result.code == grpc.StatusCode.OK, result.details
        assert result.stdout == marker.encode()
        assert result.order[-1] == "exit" and result.exit_code == 0


async def test_exit_codes_and_signal_deaths(stub: wire.ExecStub) -> None:
    """PROTOCOL 5.2."""
    c = ids()[0]
    assert (await run(stub, c, "a", "sh", "-c", "exit 42")).exit_code == 42
    assert (await run(stub, c, "b", "sh", "-c", "kill -TERM $$")).exit_code == 143
    assert (await run(stub, c, "c", "sh", "-c", "kill -KILL $$")).exit_code == 137


async def test_stalled_client_delays_neither_the_exec_nor_other_clients(
    stub: wire.ExecStub,
) -> None:
    """PROTOCOL 6.6: a client that stops reading while 20 MiB is produced.

    The output is paced (64 KiB per 4 ms, about 16 MB/s: far below what one client can
    read) so that the reading client's time measures the exec, not gRPC; the stalled one
    falls behind by megabytes and must not hold anything up."""
    produce = "sleep 0.5; for i in $(seq 1 320); do head -c 65536 /dev/zero; sleep 0.004; done"
    c = ids()[0]
    began = time.monotonic()
    alone = await run(stub, c, "alone", "sh", "-c", produce)
    alone_time = time.monotonic() - began
    assert len(alone.stdout) == 20 * 1024 * 1024

    call = stub.Session(requests(start(c, "watched", "sh", "-c", produce + "; sleep 0.5")))
    stalled = call.__aiter__()
    await stalled.__anext__()  # Ready, then it reads nothing more
    began = time.monotonic()
    reader = await attach(stub, c, "watched")
    watched_time = time.monotonic() - began
    assert reader.code == grpc.StatusCode.OK
    assert len(reader.stdout) == 20 * 1024 * 1024
    reader.assert_contiguous()
    # Generous: the point is that the exec does not wait for the stalled client at all.
    assert watched_time < alone_time * 4 + 3
    status = await stub.ContainerStatus(
        wire.ContainerStatusRequest(container_id=c, exec_id="watched")
    )
    assert status.status == "exited"
    call.cancel()


async def test_stalled_client_resumes_and_loses_nothing(stub: wire.ExecStub) -> None:
    """PROTOCOL 6.6, 6.7: 12 MiB (three times the memory cache) went past a client that did
    not read; it then gets every chunk, from storage, with no gap."""
    c, e = ids()
    call = stub.Session(requests(start(c, e, "sh", "-c", "head -c 12582912 /dev/urandom")))
    stream = call.__aiter__()
    await stream.__anext__()
    done = await attach(stub, c, e)  # wait for the exec to finish
    assert done.exit_code == 0
    received: list[wire.OutputChunk] = []
    async for response in stream:
        if response.output_chunk is not None:
            received.append(response.output_chunk)
        elif response.exit is not None:
            assert response.exit == 0
            break
    assert [chunk.gap_before for chunk in received] == [0] * len(received)
    assert [(x.sequence, x.timestamp, x.stdout) for x in received] == [
        (x.sequence, x.timestamp, x.stdout) for x in done.chunks
    ]
    assert len(b"".join(x.stdout or b"" for x in received)) == 12582912


async def test_attach_after_exit_then_not_found_after_retention() -> None:
    """PROTOCOL 11.1, 11.2; retention time is moved by the test's clock, not slept through."""
    clock = SteppedClock()
    async with (
        serve(retention=300, cleanup_interval=0.05, clock=clock) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = wire.ExecStub(channel)
        c, e = ids()
        first = await run(stub, c, e, "sh", "-c", "echo one; echo two >&2; exit 3")
        late = await attach(stub, c, e)
        assert late.code == grpc.StatusCode.OK
        assert (late.stdout, late.stderr, late.exit_code) == (b"one\n", b"two\n", 3)
        assert [c.sequence for c in late.chunks] == [c.sequence for c in first.chunks]
        assert all(chunk.is_replay for chunk in late.chunks)
        clock.advance(299)
        assert server.attachable.sweeper.sweep() == 0  # within retention: kept
        still = await attach(stub, c, e)
        assert still.code == grpc.StatusCode.OK and still.exit_code == 3
        clock.advance(1)
        await until_removed(server.registry, e)  # by the background sweep
        gone = await attach(stub, c, e)
        assert gone.code == grpc.StatusCode.NOT_FOUND
        assert e in gone.details
        again = await run(stub, c, e, "true")  # the IDs are free again
        assert again.code == grpc.StatusCode.OK and again.exit_code == 0


async def test_half_close_still_receives_everything(stub: wire.ExecStub) -> None:
    """PROTOCOL 3.6: requests() half-closes right after start."""
    c, e = ids()
    result = await run(stub, c, e, "sh", "-c", "sleep 0.3; echo after")
    assert result.stdout == b"after\n" and result.exit_code == 0


async def test_cancelled_client_affects_no_other_client(stub: wire.ExecStub) -> None:
    """PROTOCOL 3.5."""
    c, e = ids()
    script = "for i in $(seq 1 30); do echo $i; sleep 0.02; done"
    hold = asyncio.Event()
    creator = stub.Session(requests(start(c, e, "sh", "-c", script), hold=hold))
    async for _ in creator:  # Ready: the exec exists
        break
    other = asyncio.create_task(attach(stub, c, e))
    await asyncio.sleep(0.05)
    creator.cancel()
    result = await other
    assert result.code == grpc.StatusCode.OK
    assert result.stdout == b"".join(f"{i}\n".encode() for i in range(1, 31))
    assert result.exit_code == 0


# -- errors (PROTOCOL 14.1, Session rows) --------------------------------------------------


async def test_first_message_must_be_start(stub: wire.ExecStub) -> None:
    for first in (
        wire.SessionRequest(stdin=b"x"),
        wire.SessionRequest(resize=wire.Resize(width=1, height=1)),
        wire.SessionRequest(),
        None,  # half-close before anything
    ):
        result = await collect(stub, requests(first))
        assert result.code == grpc.StatusCode.INVALID_ARGUMENT, first
        assert "start" in result.details


# (bytes, whether the parser itself must reject them).
GARBAGE = [
    (b"\x08\xff", True),  # truncated varint
    (b"\x12\x01a\x1a\x00", True),  # two members of one oneof (stdin and resize)
    (b"\x0a\x05\x0a\x02\xff\xfe", True),  # start.container_id is not UTF-8
    (b"\x0a\x02\xff\xfe", True),  # a Start whose first key is a truncated varint
    (b"\x0f", True),  # wire type 7
    (b"\x0a\x20\x0a\x01c", True),  # start runs past the end of the message
]


@pytest.mark.parametrize(("data", "parser_rejects"), GARBAGE)
async def test_malformed_session_request_is_invalid_argument(
    server: ExecServer, data: bytes, parser_rejects: bool
) -> None:
    """PROTOCOL 2.5: never UNKNOWN with a Python traceback, never a silent guess."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        raw = channel.stream_stream(wire.SESSION.path)

        async def one() -> AsyncIterator[bytes]:
            yield data

        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in raw(one()):
                pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    if parser_rejects:
        assert "SessionRequest" in (error.value.details() or "")


@pytest.mark.parametrize("method", [m for m in wire.METHODS if m.name != "Session"])
async def test_malformed_unary_requests_are_invalid_argument(
    server: ExecServer, method: wire.Method[object, object]
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        if method.arity is wire.Arity.UNARY_STREAM:
            call = channel.unary_stream(method.path)(b"\x0a\x02\xff\xfe")
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in call:
                    pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await channel.unary_unary(method.path)(b"\x0a\x02\xff\xfe")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method.request_type.__name__ in (error.value.details() or "")


async def test_second_start_is_invalid(stub: wire.ExecStub) -> None:
    c, e = ids()
    hold = asyncio.Event()
    result = await collect(
        stub,
        requests(start(c, e, "sleep", "5"), [start(c, e)], hold=hold),
    )
    hold.set()
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in result.details
    await collect(stub, requests(start(c, "killer", "sh", "-c", "true")))


@pytest.mark.parametrize(
    ("container", "exec_id", "field"),
    [
        ("", "e", "container_id"),
        ("c", "", "exec_id"),
        ("../etc", "e", "container_id"),
        ("c", "x" * 129, "exec_id"),
        ("c", "-dash", "exec_id"),
    ],
)
async def test_malformed_ids(stub: wire.ExecStub, container: str, exec_id: str, field: str) -> None:
    result = await run(stub, container, exec_id, "true")
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in result.details


async def test_create_existing_is_already_exists_and_unknown_attach_not_found(
    stub: wire.ExecStub,
) -> None:
    c, e = ids()
    assert (await run(stub, c, e, "true")).exit_code == 0
    again = await run(stub, c, e, "true")
    assert again.code == grpc.StatusCode.ALREADY_EXISTS and e in again.details
    missing = await attach(stub, c, "nope")
    assert missing.code == grpc.StatusCode.NOT_FOUND and "nope" in missing.details
    unknown = await attach(stub, "no-such-container", "nope")
    assert unknown.code == grpc.StatusCode.NOT_FOUND


async def test_bad_working_dir_command_and_env(stub: wire.ExecStub, tmp_path: Path) -> None:
    c = ids()[0]
    missing_dir = str(tmp_path / "missing")
    result = await run(stub, c, "wd", "true", working_dir=missing_dir)
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT and "missing" in result.details
    result = await run(stub, c, "cmd", "no-such-command-xyz")
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-command-xyz" in result.details
    for key in ("", "A=B", "NUL\0"):
        result = await run(stub, c, "env", "true", env={key: "v"})
        assert result.code == grpc.StatusCode.INVALID_ARGUMENT, key
    # Nothing was created by the failures: the same IDs work now.
    ok = await run(
        stub,
        c,
        "wd",
        "sh",
        "-c",
        'echo "$GREETING" && pwd',
        env={"GREETING": "hi"},
        working_dir=str(tmp_path),
    )
    assert ok.exit_code == 0
    assert ok.stdout == f"hi\n{tmp_path}\n".encode()


async def test_resize_on_non_tty_and_stdin_limits(stub: wire.ExecStub) -> None:
    c, e = ids()
    hold = asyncio.Event()
    ready = asyncio.Event()
    creator = asyncio.create_task(
        collect(
            stub, requests(start(c, e, "sh", "-c", "sleep 1; echo ok"), hold=hold), on_ready=ready
        )
    )
    await ready.wait()
    resize = await collect(
        stub,
        requests(
            start(c, e), [wire.SessionRequest(resize=wire.Resize(width=80, height=24))], hold=hold
        ),
    )
    assert resize.code == grpc.StatusCode.FAILED_PRECONDITION and "TTY" in resize.details
    big = await collect(
        stub,
        requests(start(c, e), [wire.SessionRequest(stdin=b"x" * (1024 * 1024 + 1))], hold=hold),
    )
    assert big.code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in big.details
    hold.set()
    result = await creator  # the exec and its first client were unaffected
    assert result.code == grpc.StatusCode.OK
    assert result.stdout == b"ok\n" and result.exit_code == 0


async def test_client_limit_is_resource_exhausted() -> None:
    async with (
        serve(limits=Limits(max_clients_per_exec=2)) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = wire.ExecStub(channel)
        c, e = ids()
        hold = asyncio.Event()
        ready = asyncio.Event()
        first = asyncio.create_task(
            collect(stub, requests(start(c, e, "sleep", "0.5"), hold=hold), on_ready=ready)
        )
        await ready.wait()
        second_ready = asyncio.Event()
        second = asyncio.create_task(
            collect(stub, requests(start(c, e), hold=hold), on_ready=second_ready)
        )
        await second_ready.wait()
        third = await attach(stub, c, e)
        assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_clients_per_exec" in third.details
        hold.set()
        assert (await first).exit_code == 0
        assert (await second).exit_code == 0


async def test_token_required_when_configured() -> None:
    """PROTOCOL 12.1: Bearer and Basic(":" + token) accepted; missing or wrong refused."""
    import base64

    async with (
        serve(token="s3cret") as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = wire.ExecStub(channel)
        c, e = ids()

        async def with_metadata(metadata: list[tuple[str, str]]) -> SessionResult:
            for _ in range(REFUSAL_TRIES):
                result = SessionResult()
                try:
                    async for response in stub.Session(
                        requests(start(c, f"{e}-{len(metadata)}-{uuid.uuid4().hex[:4]}", "true")),
                        metadata=metadata,
                    ):
                        if response.exit is not None:
                            result.exit_code = response.exit
                    result.code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    result.code, result.details = error.code(), error.details() or ""
                    if hidden_by_grpc(error):
                        continue
                break
            return result

        missing = await with_metadata([])
        assert missing.code == grpc.StatusCode.UNAUTHENTICATED
        wrong = await with_metadata([("authorization", "Bearer nope")])
        assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
        assert "s3cret" not in wrong.details
        bearer = await with_metadata([("authorization", "Bearer s3cret")])
        assert bearer.code == grpc.StatusCode.OK and bearer.exit_code == 0
        basic = base64.b64encode(b":s3cret").decode()
        assert (await with_metadata([("authorization", f"Basic {basic}")])).exit_code == 0
        with pytest.raises(grpc.aio.AioRpcError) as status_error:
            await stub.ContainerStatus(wire.ContainerStatusRequest(container_id=c))
        assert status_error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_shutdown_ends_streams_with_unavailable_and_kills_execs() -> None:
    """PROTOCOL 13.2."""
    async with serve() as server, grpc.aio.insecure_channel(server.address) as channel:
        stub = wire.ExecStub(channel)
        c, e = ids()
        ready = asyncio.Event()
        hold = asyncio.Event()
        script = "setsid sleep 60 & sleep 60"
        session = asyncio.create_task(
            collect(stub, requests(start(c, e, "sh", "-c", script), hold=hold), on_ready=ready)
        )
        await ready.wait()
        runner = server.attachable.runner
        assert runner is not None
        for _ in range(100):
            pids = runner.runtime.processes_of(c)
            if len(pids) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(pids) >= 3, pids  # sh, its sleep, and the setsid sleep
        await server.close()
        result = await session
        assert result.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in result.details
    assert [pid for pid in pids if _alive(pid)] == []


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
