"""Cases of PROTOCOL 1, 2, 12 and 13: wire compatibility, identifiers, errors as status codes,
robustness, time units, authentication and limits.

The wire-compatibility cases (1.3) speak raw protobuf through ``_protowire`` as a client built
from the published ``.proto`` would, so they see exactly what such a client sees.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from execstream import wire

from . import _protowire as pw
from . import _workloads as w
from ._case import Failure, Skip, case, expect, expect_equal
from ._checks import expect_code, expect_flow, expect_output, expect_rejected, expect_timestamps
from ._context import CaseContext, gather_all
from ._recording import WITHIN, Outcome
from ._session_client import SessionClient

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

# -- 1.3 Wire compatibility ----------------------------------------------------------------


def _start_bytes(container_id: str, exec_id: str, command: list[str]) -> bytes:
    """A published ``SessionRequest{start: Start{container_id, exec_id, command}}``."""
    start = pw.encode_bytes(1, container_id.encode()) + pw.encode_bytes(2, exec_id.encode())
    for arg in command:
        start += pw.encode_bytes(3, arg.encode())
    return pw.encode_bytes(1, start)


class _PublishedSession:
    """What a published-only client makes of a Session's responses."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.stdout = b""
        self.stderr = b""
        self.exit: int | None = None
        self.errors: list[str] = []

    def take(self, data: bytes) -> None:
        self.errors += pw.shape_errors("SessionResponse", data)
        for number, _, value in pw.decode(data):
            if number == 3 and isinstance(value, int):
                self.kinds.append("exit")
                self.exit = value - (1 << 64) if value >= 1 << 63 else value
            elif number == 4:
                self.kinds.append("ready")
            elif number == 5 and isinstance(value, bytes):
                self.kinds.append("chunk")
                for inner, _, data_ in pw.decode(value):
                    if inner == 3 and isinstance(data_, bytes):
                        self.stdout += data_
                    elif inner == 4 and isinstance(data_, bytes):
                        self.stderr += data_
            elif number in (1, 2):
                self.kinds.append("published stdout/stderr")

    def describe(self) -> str:
        return f"{self.kinds[:20]}, stdout {self.stdout[:60]!r}, exit {self.exit}"


async def _raw_session(ctx: CaseContext, request: bytes) -> _PublishedSession:
    method: Any = ctx.channel.stream_stream("/dagger.exec.Exec/Session")
    call: Any = method(metadata=ctx.target.metadata, timeout=WITHIN)
    seen = _PublishedSession()
    await call.write(request)
    await call.done_writing()
    try:
        async for data in call:
            seen.take(data)
    except grpc.aio.AioRpcError as error:
        raise Failure(
            "a published-only client's session to end with OK",
            f"{error.code().name} {error.details()!r} after {seen.describe()}",
        ) from None
    return seen


@case(
    "1.3",
    "published-client-runs-and-attaches",
    "a client that knows only the published fields runs and attaches to execs",
)
async def published_client(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    command = w.sh("echo published; echo err >&2; exit 3")
    if ctx.over_wire:
        sessions = [("create", await _raw_session(ctx, _start_bytes(c, e, command)))]
    else:  # the driver creates; the published client attaches (twice, as over the wire)
        await (await ctx.create(c, e, command, half_close=True)).completed()
        sessions = [("attach", await _raw_session(ctx, _start_bytes(c, e, [])))]
    sessions.append(("attach", await _raw_session(ctx, _start_bytes(c, e, []))))
    for name, seen in sessions:
        expect(not seen.errors, f"{name}: responses in the published shape", seen.errors[:3])
        expect(
            seen.kinds[:1] == ["ready"] and seen.kinds[-1:] == ["exit"],
            f"{name}: ready first and exit last, as a published client decodes them",
            seen.describe(),
        )
        expect_equal(
            (seen.stdout, seen.stderr, seen.exit),
            (b"published\n", b"err\n", 3),
            f"{name}: (stdout, stderr, exit) decoded from published fields",
        )
    method: Any = ctx.channel.unary_unary("/dagger.exec.Exec/ContainerStatus")
    call: Any = method(pw.encode_bytes(1, c.encode()), metadata=ctx.target.metadata, timeout=30)
    try:
        data: bytes = await call
    except grpc.aio.AioRpcError as error:
        ctx.note_status("ContainerStatus", error.code(), error.details() or "")
        if error.code() is grpc.StatusCode.UNIMPLEMENTED:
            ctx.log("   ContainerStatus is not implemented: its published shape is not checked")
            return
        raise
    errors = pw.shape_errors("ContainerStatusResponse", data)
    expect(not errors, "ContainerStatusResponse in the published shape", errors)
    fields = {number: value for number, _, value in pw.decode(data)}
    expect_equal(fields.get(2), b"exited", "ContainerStatusResponse.status (field 2)")
    expect_equal(fields.get(3), 3, "ContainerStatusResponse.exit_code (field 3)")


@case(
    "1.3",
    "published-lifecycle-events",
    "a published-only subscriber receives events in the published shape",
)
async def published_lifecycle(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    method: Any = ctx.channel.unary_stream("/dagger.exec.Exec/ContainerLifecycle")
    call: Any = method(pw.encode_bytes(1, c.encode()), metadata=ctx.target.metadata, timeout=60)
    with ctx.calling("ContainerLifecycle"):
        await asyncio.wait_for(call.initial_metadata(), WITHIN)
    expect_flow(await ctx.run(c, e, ["true"]))
    types: list[bytes] = []

    async def read() -> None:
        async for data in call:
            errors = pw.shape_errors("ContainerLifecycleEvent", data)
            expect(not errors, "ContainerLifecycleEvent in the published shape", errors)
            fields = {number: value for number, _, value in pw.decode(data)}
            expect_equal(fields.get(1), c.encode(), "container_id (field 1)")
            kind = fields.get(2)
            types.append(kind if isinstance(kind, bytes) else b"")
            if kind == b"exited":
                return

    try:
        with ctx.calling("ContainerLifecycle"):
            await asyncio.wait_for(read(), WITHIN)
    except TimeoutError:
        raise Failure("an 'exited' event", f"event types {types}") from None
    finally:
        call.cancel()
    expect_equal(types, [b"created", b"registered", b"started", b"exited"], "event_type (field 2)")


# -- 2.1 Identifiers -----------------------------------------------------------------------


@case(
    "2.1",
    "session-bad-ids",
    "a Session with an empty or malformed container_id or exec_id fails with "
    "INVALID_ARGUMENT naming the field",
    row="Session: `container_id` or `exec_id` empty or malformed",
    status="INVALID_ARGUMENT",
)
async def session_bad_ids(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    bad = [
        ("", e, "container_id"),
        (c, "", "exec_id"),
        ("../etc", e, "container_id"),
        ("-dash", e, "container_id"),
        ("a b", e, "container_id"),
        (c, "x" * 129, "exec_id"),
        (c, "_under", "exec_id"),
        (c, "sl/ash", "exec_id"),
        (c, "é", "exec_id"),
    ]
    for container_id, exec_id, field in bad:
        # Under a driver only the attach form is ours to send (creation is the driver's).
        for command in (["true"], []) if ctx.over_wire else ([],):
            start = ctx.start_message(container_id, exec_id, command)
            client = await ctx.one_shot(start, label="bad-id")
            what = f"{'create' if command else 'attach'} {container_id!r}/{exec_id!r}"
            await expect_rejected(ctx, client, INVALID_ARGUMENT, what, field)


@case(
    "2.1",
    "valid-ids-accepted",
    "IDs of 1 to 128 characters of A-Z a-z 0-9 _ . - starting alphanumeric are accepted",
)
async def valid_ids(ctx: CaseContext) -> None:
    stem = ctx.container_id()
    for container_id, exec_id in (
        (stem + "-" + "c" * (127 - len(stem)), "E" * 128),
        ("9" + stem[1:] + "._-", "0"),
        (stem + ".Z", "a.b_c-D"),
    ):
        client = await ctx.run(container_id, exec_id, w.sh("echo ok"))
        expect_flow(client)
        expect_output(client, b"ok\n")
        status = await ctx.status_if_implemented(container_id, exec_id)
        if status is not None:
            expect_equal(status.exec_id, exec_id, "exec_id echoed by status")


@case(
    "2.1",
    "control-bad-container-id",
    "Pause, Resume and Signal with an empty or malformed container_id fail with INVALID_ARGUMENT",
    row="Pause, Resume, Signal: empty or malformed `container_id`",
    status="INVALID_ARGUMENT",
)
async def control_bad_ids(ctx: CaseContext) -> None:
    for bad in ("", "../x", "-x", "x" * 129):
        expect_code(await ctx.pause(bad), INVALID_ARGUMENT, f"ContainerPause {bad!r}")
        expect_code(await ctx.resume(bad), INVALID_ARGUMENT, f"ContainerResume {bad!r}")
        expect_code(await ctx.signal(bad, "TERM"), INVALID_ARGUMENT, f"ContainerSignal {bad!r}")


# -- 2.2 Errors are status codes -----------------------------------------------------------


@case(
    "2.2",
    "failures-are-status-codes",
    "a failed control request is a non-OK status with a message, never success = false",
)
async def failures_are_codes(ctx: CaseContext) -> None:
    c = ctx.container_id()
    expect_flow(await ctx.run(c, ctx.exec_id(), ["true"]))
    failures = {
        "ContainerPause with nothing running": await ctx.pause(c),
        "ContainerResume, not paused": await ctx.resume(c),
        "ContainerSignal 'NOPE'": await ctx.signal(c, "NOPE"),
        "ContainerSignal, nothing alive": await ctx.signal(c, "TERM"),
    }
    for what, outcome in failures.items():
        expect(
            outcome.code is not OK and bool(outcome.details.strip()),
            f"{what}: a non-OK status with a message",
            str(outcome),
        )


# -- 2.3 Robustness ------------------------------------------------------------------------


@case(
    "2.3",
    "client-churn-leaves-nothing",
    "clients that cancel, stall, half-close or drop leave nothing held behind",
    timeout=150,
    heavy=True,
)
async def client_churn(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, ["cat"])
    await creator.until_ready()
    rounds = (ctx.target.max_clients_per_exec or 64) + 8

    async def come_and_go(n: int) -> None:
        way = n % 4
        if way == 3:
            stub, channel = ctx.new_stub()
        else:
            stub, channel = ctx.stub, None
        client = await ctx.attach(
            c, e, half_close=way == 1, read=way != 2, stub=stub, label=f"churn{n}"
        )
        if way == 2:
            await client.read_one()  # then stalls
        else:
            await client.until_ready()
        if channel is not None:
            await channel.close(grace=None)
        else:
            client.cancel()
        await client.finished()

    for batch in range(0, rounds, 16):
        await gather_all(*(come_and_go(n) for n in range(batch, min(batch + 16, rounds))))
    # Every client left: the exec must take a new one (no slot leaked) and work as before.
    # Leaving is asynchronous on the server, so a refusal is retried for a few seconds.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        final = await ctx.attach(c, e, label="after-churn")
        await final.until_ready_or_end()
        if final.readies or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    expect(bool(final.readies), "a new client accepted after the others left", final.describe())
    await creator.stdin(b"bye\n")
    await creator.stdin(b"")
    for client in (creator, final):
        await client.completed()
        expect_flow(client)
        expect_output(client, b"bye\n")


@case(
    "2.3",
    "undecodable-request",
    "an undecodable request ends only its own call with an error; the server carries on",
)
async def undecodable_request(ctx: CaseContext) -> None:
    garbage = b"\xff\xff\xff\xff\xff"
    method: Any = ctx.channel.stream_stream("/dagger.exec.Exec/Session")
    call: Any = method(metadata=ctx.target.metadata, timeout=30)
    outcome = "OK"
    try:
        await call.write(garbage)
        await call.done_writing()
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        outcome = error.code().name
    except (asyncio.InvalidStateError, grpc.aio.UsageError):
        outcome = (await call.code()).name
    expect(outcome != "OK", "an undecodable Session request ends with an error status", outcome)
    unary: Any = ctx.channel.unary_unary("/dagger.exec.Exec/ContainerStatus")
    unary_call: Any = unary(garbage, metadata=ctx.target.metadata, timeout=30)
    result = await ctx.outcome("ContainerStatus with an undecodable request", unary_call)
    expect(result.code is not OK, "an undecodable status request fails", str(result))
    client = await ctx.run(ctx.container_id(), ctx.exec_id(), w.sh("echo alive"))
    expect_flow(client)
    expect_output(client, b"alive\n")


# -- 2.4 Time ------------------------------------------------------------------------------


@case(
    "2.4",
    "timestamps-in-ns",
    "chunk, event and status timestamps are integer ns since the Unix epoch",
)
async def timestamps_in_ns(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    sub = await ctx.subscribe(c)
    before = time.time_ns()
    client = await ctx.run(c, e, w.sh("echo a; sleep 0.2; echo b"))
    expect_flow(client)
    await sub.until_event(c, e, "exited")
    status = await ctx.status(c, e)
    after = time.time_ns()
    expect_timestamps([x.timestamp for x in client.chunks], before, after, "chunk timestamp")
    expect_timestamps([x.timestamp for x in sub.of(c)], before, after, "event timestamp")
    expect_timestamps([status.started_at], before, after, "started_at")
    expect_timestamps([status.finished_at or 0], before, after, "finished_at")


# -- 2.5 Malformed messages ----------------------------------------------------------------

ROW_MALFORMED = "any: a request that does not parse as its message"


async def _malformed(ctx: CaseContext, what: str, session: bytes, status: bytes) -> None:
    """``session`` as a Session's first message and ``status`` as a ContainerStatus request
    must each fail with INVALID_ARGUMENT naming the message type."""
    method: Any = ctx.channel.stream_stream("/dagger.exec.Exec/Session")
    call: Any = method(metadata=ctx.target.metadata, timeout=30)
    code, details = "OK", ""
    try:
        await call.write(session)
        await call.done_writing()
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        code, details = error.code().name, error.details() or ""
    except (asyncio.InvalidStateError, grpc.aio.UsageError):
        code, details = (await call.code()).name, await call.details()
    expect(
        code == "INVALID_ARGUMENT" and "SessionRequest" in details,
        f"a Session whose first message is {what}: INVALID_ARGUMENT naming SessionRequest",
        f"{code} {details!r}",
    )
    unary: Any = ctx.channel.unary_unary("/dagger.exec.Exec/ContainerStatus")
    result = await ctx.outcome(
        f"ContainerStatus with {what}", unary(status, metadata=ctx.target.metadata, timeout=30)
    )
    expect(
        result.code is INVALID_ARGUMENT and "ContainerStatusRequest" in result.details,
        f"a ContainerStatus request that is {what}: INVALID_ARGUMENT naming ContainerStatusRequest",
        str(result),
    )


@case(
    "2.5",
    "truncated",
    "a truncated request fails with INVALID_ARGUMENT naming its message type",
    row=ROW_MALFORMED,
    status="INVALID_ARGUMENT",
)
async def truncated(ctx: CaseContext) -> None:
    start = _start_bytes(ctx.container_id(), ctx.exec_id(), ["true"])
    status = pw.encode_bytes(1, ctx.container_id().encode())
    await _malformed(ctx, "truncated", start[:-3], status[:-3])


@case(
    "2.5",
    "wrong-wire-type",
    "a field sent with the wrong wire type fails with INVALID_ARGUMENT naming the message",
    row=ROW_MALFORMED,
    status="INVALID_ARGUMENT",
)
async def wrong_wire_type(ctx: CaseContext) -> None:
    # SessionRequest.start (a message) and ContainerStatusRequest.container_id (a string)
    # sent as varints.
    await _malformed(
        ctx, "of the wrong wire type", pw.encode_varint_field(1, 7), pw.encode_varint_field(1, 7)
    )


@case(
    "2.5",
    "invalid-utf8",
    "a string field with invalid UTF-8 fails with INVALID_ARGUMENT naming the message",
    row=ROW_MALFORMED,
    status="INVALID_ARGUMENT",
)
async def invalid_utf8(ctx: CaseContext) -> None:
    bad = b"cf-\xff\xfe"
    start = pw.encode_bytes(1, pw.encode_bytes(1, bad) + pw.encode_bytes(2, b"x"))
    await _malformed(ctx, "invalid UTF-8", start, pw.encode_bytes(1, bad))


@case(
    "2.5",
    "two-oneof-members",
    "a request with two members of one oneof set fails with INVALID_ARGUMENT",
    row=ROW_MALFORMED,
    status="INVALID_ARGUMENT",
)
async def two_oneof_members(ctx: CaseContext) -> None:
    start = _start_bytes(ctx.container_id(), ctx.exec_id(), ["true"])
    both = start + pw.encode_bytes(2, b"stdin too")  # SessionRequest.start and .stdin
    method: Any = ctx.channel.stream_stream("/dagger.exec.Exec/Session")
    call: Any = method(metadata=ctx.target.metadata, timeout=30)
    code, details = "OK", ""
    try:
        await call.write(both)
        await call.done_writing()
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        code, details = error.code().name, error.details() or ""
    expect(
        code == "INVALID_ARGUMENT" and "SessionRequest" in details,
        "a SessionRequest with both start and stdin: INVALID_ARGUMENT naming SessionRequest",
        f"{code} {details!r}",
    )


# -- 12.1 Tokens ---------------------------------------------------------------------------

ROW_TOKEN = "any: token configured, and missing or wrong"


def _token(ctx: CaseContext) -> str:
    if not ctx.target.token:
        raise Skip("no token given to the suite (--token): the target is assumed open")
    return ctx.target.token


async def _every_rpc(
    ctx: CaseContext, metadata: tuple[tuple[str, str], ...]
) -> dict[str, Outcome | SessionClient]:
    """Call each of the six RPCs with ``metadata``; their outcomes by name."""
    c = ctx.container_id()
    stub = ctx.stub
    session = await ctx.one_shot(
        ctx.start_message(c, ctx.exec_id(), ["true"]), metadata=metadata, label="session"
    )
    lifecycle = ctx.stub.ContainerLifecycle(
        wire.ContainerLifecycleRequest(container_id=c), metadata=metadata, timeout=30
    )

    async def first_event() -> Any:
        # A server that lets the call through sends nothing (no event of a fresh container).
        try:
            return await asyncio.wait_for(lifecycle.read(), 3)
        except TimeoutError:
            return "the stream stayed open (no error)"

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "ContainerLifecycle": first_event,
        "ContainerStatus": lambda: stub.ContainerStatus(
            wire.ContainerStatusRequest(container_id=c), metadata=metadata, timeout=30
        ),
        "ContainerPause": lambda: stub.ContainerPause(
            wire.ContainerControlRequest(container_id=c), metadata=metadata, timeout=30
        ),
        "ContainerResume": lambda: stub.ContainerResume(
            wire.ContainerControlRequest(container_id=c), metadata=metadata, timeout=30
        ),
        "ContainerSignal": lambda: stub.ContainerSignal(
            wire.ContainerSignalRequest(container_id=c, signal="TERM"),
            metadata=metadata,
            timeout=30,
        ),
    }
    outcomes: dict[str, Outcome | SessionClient] = {"Session": session}
    for name, call in calls.items():
        outcomes[name] = await ctx.outcome(name, call(), within=10)
    lifecycle.cancel()
    return outcomes


def _not_implemented(ctx: CaseContext, name: str, code: grpc.StatusCode | None) -> bool:
    """An RPC the target does not implement has no effect, with or without a token: there is
    nothing for 12.1 to check (its own cases report it as not implemented)."""
    if code is not grpc.StatusCode.UNIMPLEMENTED or name == "Session":
        return False
    ctx.unimplemented.pop(name.split(" ", 1)[0], None)
    ctx.log(f"   {name} is not implemented: nothing to refuse")
    return True


async def _expect_refused(
    ctx: CaseContext, metadata: tuple[tuple[str, str], ...], how: str
) -> None:
    token = _token(ctx)
    outcomes = await _every_rpc(ctx, metadata)
    # What the target does not implement is set aside first, so that a failure of another
    # RPC is reported as what it is, not as the UNIMPLEMENTED ones still pending.
    implemented = {n: o for n, o in outcomes.items() if not _not_implemented(ctx, n, o.code)}
    for name, outcome in implemented.items():
        code, details = outcome.code, outcome.details
        expect(
            code is UNAUTHENTICATED,
            f"{name} {how}: UNAUTHENTICATED",
            outcome.describe() if isinstance(outcome, SessionClient) else str(outcome),
        )
        expect(token not in details, f"{name}: a message without the token", repr(details))


@case(
    "12.1",
    "missing-token",
    "every RPC without the token fails with UNAUTHENTICATED",
    row=ROW_TOKEN,
    status="UNAUTHENTICATED",
    needs=("token",),
)
async def missing_token(ctx: CaseContext) -> None:
    await _expect_refused(ctx, (), "without authorization")


@case(
    "12.1",
    "wrong-token",
    "every RPC with another token, Bearer or Basic, fails with UNAUTHENTICATED",
    row=ROW_TOKEN,
    status="UNAUTHENTICATED",
    needs=("token",),
)
async def wrong_token(ctx: CaseContext) -> None:
    token = _token(ctx)
    wrong = token[:-1] + ("x" if token[-1:] != "x" else "y")
    await _expect_refused(ctx, (("authorization", f"Bearer {wrong}"),), "with a wrong Bearer")
    basic = base64.b64encode(f":{wrong}".encode()).decode()
    await _expect_refused(ctx, (("authorization", f"Basic {basic}"),), "with a wrong Basic")
    await _expect_refused(ctx, (("authorization", f"Bearer {token}x"),), "with token + 'x'")


@case(
    "12.2",
    "one-authorization-header",
    "every RPC with two authorization entries fails with UNAUTHENTICATED, even both right",
    row="any: token configured, and more than one `authorization` entry",
    status="UNAUTHENTICATED",
    needs=("token",),
)
async def one_authorization_header(ctx: CaseContext) -> None:
    token = _token(ctx)
    right = ("authorization", f"Bearer {token}")
    await _expect_refused(ctx, (right, right), "with the right token twice")
    wrong = ("authorization", "Bearer not-the-token")
    await _expect_refused(ctx, (wrong, right), "with a wrong and a right token")


@case(
    "12.1",
    "basic-with-any-user",
    "the token is accepted as Basic base64(user:token) with any user, as published clients do",
    needs=("token",),
)
async def basic_any_user(ctx: CaseContext) -> None:
    _token(ctx)
    c = ctx.container_id()
    for user in ("", "someone"):
        metadata = ctx.target.basic_metadata(user)
        e, command = ctx.exec_id(), w.sh("echo in")
        if ctx.over_wire:
            start = ctx.start_message(c, e, command)
        else:  # the driver creates (with the suite's own token); Basic attaches
            await (await ctx.create(c, e, command, half_close=True)).finished()
            start = ctx.start_message(c, e)
        client = await ctx.one_shot(start, metadata=metadata, label=f"basic-{user or 'empty'}")
        expect_flow(client)
        expect_output(client, b"in\n")
        status = await ctx.outcome(
            "ContainerStatus with Basic",
            ctx.stub.ContainerStatus(
                wire.ContainerStatusRequest(container_id=c), metadata=metadata, timeout=30
            ),
        )
        if not _not_implemented(ctx, "ContainerStatus", status.code):
            expect_code(status, OK, f"ContainerStatus with Basic user {user!r}")


@case(
    "12.1",
    "refused-before-effect",
    "an unauthenticated request has no effect: nothing created, paused or signalled",
    row=ROW_TOKEN,
    status="UNAUTHENTICATED",
    needs=("token",),
)
async def refused_before_effect(ctx: CaseContext) -> None:
    token = _token(ctx)
    wrong = (("authorization", f"Bearer not-{token}"),)
    c, e = ctx.container_id(), ctx.exec_id()
    refused = await ctx.one_shot(ctx.start_message(c, e, ["true"]), metadata=wrong, label="wrong")
    await expect_rejected(ctx, refused, UNAUTHENTICATED, "create with a wrong token")
    missing = await ctx.attach(c, e)
    await expect_rejected(
        ctx, missing, grpc.StatusCode.NOT_FOUND, "attach to what a refused create named"
    )
    running = await ctx.create(c, ctx.exec_id(), w.sh("echo up; sleep 30"), half_close=True)
    await running.until_output(b"up\n")
    for name, call in (
        (
            "ContainerPause",
            ctx.stub.ContainerPause(
                wire.ContainerControlRequest(container_id=c), metadata=wrong, timeout=30
            ),
        ),
        (
            "ContainerSignal KILL",
            ctx.stub.ContainerSignal(
                wire.ContainerSignalRequest(container_id=c, signal="KILL"),
                metadata=wrong,
                timeout=30,
            ),
        ),
    ):
        outcome = await ctx.outcome(name, call)
        if not _not_implemented(ctx, name, outcome.code):
            expect_code(outcome, UNAUTHENTICATED, f"{name}, wrong token")
    await asyncio.sleep(0.2)
    status = await ctx.status_if_implemented(c, running.start.exec_id if running.start else "")
    if status is not None:
        expect_equal(status.status, "running", "the exec's state after refused pause and KILL")
    expect(running.exit_code is None, "the exec still running", running.describe())


# -- 13.3 Exited execs do not count ------------------------------------------------------------


@case(
    "13.3",
    "exited-execs-do-not-count",
    "one more exec than the per-container limit, run one after the other, all succeed",
    timeout=180,
    heavy=True,
    needs=("max_execs_per_container",),
)
async def exited_execs_do_not_count(ctx: CaseContext) -> None:
    limit = ctx.target.max_execs_per_container
    if limit is None:
        raise Skip("the target's execs-per-container limit is unknown (--max-execs-per-container)")
    c = ctx.container_id()
    # A few at a time, never near the limit: each starts only after an earlier one exited,
    # so more than `limit` run in the container in all but far fewer at once.
    at_once = max(1, min(8, limit // 2))
    live = asyncio.Semaphore(at_once)

    async def one(n: int) -> None:
        async with live:
            done = await ctx.run(c, ctx.exec_id(f"n{n}"), ["true"])
        if done.code != grpc.StatusCode.OK or done.exit_code != 0:
            raise Failure(
                f"exec {n + 1} of {limit + 1} (at most {at_once} at a time, the others exited) "
                "to run and exit 0",
                done.describe(),
            )

    await gather_all(*(one(n) for n in range(limit + 1)))


# -- 13.1 Limits ---------------------------------------------------------------------------


@case(
    "13.1",
    "clients-per-exec",
    "attaching beyond the clients-per-exec limit fails with RESOURCE_EXHAUSTED naming it",
    row="any: a limit would be exceeded",
    status="RESOURCE_EXHAUSTED",
    timeout=120,
    heavy=True,
    needs=("max_clients_per_exec",),
)
async def clients_per_exec(ctx: CaseContext) -> None:
    limit = ctx.target.max_clients_per_exec
    if limit is None:
        raise Skip("the target's clients-per-exec limit is unknown (--max-clients-per-exec)")
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, ["cat"])
    await creator.until_ready()
    clients = [creator]
    for n in range(1, limit):
        clients.append(await ctx.attach(c, e, label=f"attach{n}"))
    for client in clients:
        await client.until_ready()
    extra = await ctx.attach(c, e, label="one-too-many")
    await expect_rejected(ctx, extra, grpc.StatusCode.RESOURCE_EXHAUSTED, "attach past the limit")
    expect(
        "client" in extra.details.lower(),
        "a message naming the limit (clients per exec)",
        repr(extra.details),
    )
    await creator.stdin(b"unaffected\n")
    await creator.stdin(b"")
    for client in clients:
        await client.completed()
        expect_output(client, b"unaffected\n")
