"""Cases of PROTOCOL 3-5: establishing a session, the output it carries, exit and end.

Each case creates its own execs with fresh IDs, drives one or more Session streams, and
compares what every client received with the bytes the workload must have written.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import grpc

from execstream import wire

from . import _workloads as w
from ._case import Failure, case, expect, expect_equal
from ._checks import (
    ROW_UNKNOWN,
    expect_code,
    expect_contiguous,
    expect_flow,
    expect_output,
    expect_rejected,
    expect_same_chunks,
    expect_timestamps,
)
from ._clauses import Level
from ._context import CaseContext, gather_all
from ._session_client import SessionClient

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

# -- 3.1 First message ---------------------------------------------------------------------

ROW_FIRST = "Session: first message not `start`, or none before half-close"
ROW_SECOND = "Session: a second `start`"


async def _bad_first(ctx: CaseContext, first: wire.SessionRequest, what: str) -> None:
    client = await ctx.session(None)
    await client.send(first)
    # No half-close: the server must refuse on the message itself, not wait for more.
    await expect_rejected(ctx, client, INVALID_ARGUMENT, what)


@case(
    "3.1",
    "first-message-stdin",
    "a first message that is stdin ends the stream with INVALID_ARGUMENT",
    row=ROW_FIRST,
    status="INVALID_ARGUMENT",
)
async def first_message_stdin(ctx: CaseContext) -> None:
    await _bad_first(ctx, wire.SessionRequest(stdin=b"x"), "stdin before start")


@case(
    "3.1",
    "first-message-resize",
    "a first message that is resize ends the stream with INVALID_ARGUMENT",
    row=ROW_FIRST,
    status="INVALID_ARGUMENT",
)
async def first_message_resize(ctx: CaseContext) -> None:
    await _bad_first(
        ctx,
        wire.SessionRequest(resize=wire.Resize(width=80, height=24)),
        "resize before start",
    )


@case(
    "3.1",
    "first-message-empty",
    "a first message with no member set ends the stream with INVALID_ARGUMENT",
    row=ROW_FIRST,
    status="INVALID_ARGUMENT",
)
async def first_message_empty(ctx: CaseContext) -> None:
    await _bad_first(ctx, wire.SessionRequest(), "an empty first message")


@case(
    "3.1",
    "half-close-before-start",
    "half-closing before any message ends the stream with INVALID_ARGUMENT",
    row=ROW_FIRST,
    status="INVALID_ARGUMENT",
)
async def half_close_before_start(ctx: CaseContext) -> None:
    client = await ctx.session(None)
    await client.half_close()
    await expect_rejected(ctx, client, INVALID_ARGUMENT, "half-close before start")


@case(
    "3.1",
    "second-start",
    "a second start on the same stream ends it with INVALID_ARGUMENT",
    row=ROW_SECOND,
    status="INVALID_ARGUMENT",
)
async def second_start(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.create(c, e, ["sleep", "30"])
    await client.until_ready()
    await client.send(wire.SessionRequest(start=ctx.start_message(c, e)), "second start")
    await expect_rejected(ctx, client, INVALID_ARGUMENT, "a second start")


# -- 3.2 Create or attach ------------------------------------------------------------------

ROW_EXISTS = "Session: create of an existing exec"
ROW_PAUSED = "Session: create in a paused container"
ROW_BAD_CREATE = "Session: `working_dir` missing, command not executable, bad `env` key"


@case(
    "3.2",
    "create-runs-argv-with-env-and-working-dir",
    "create runs command as argv (no shell) with env added and working_dir as its directory",
)
async def create_runs_argv(ctx: CaseContext) -> None:
    c = ctx.container_id()
    literal = "a b;$(echo no)*'\""
    argv = await ctx.run(c, ctx.exec_id(), ["printf", "%s", literal])
    expect_flow(argv)
    expect_output(argv, literal.encode())
    script = 'printf "%s|%s" "$CF_GREETING" "$(pwd)"'
    env = await ctx.run(
        c, ctx.exec_id(), w.sh(script), env={"CF_GREETING": "hello there"}, working_dir="/"
    )
    expect_flow(env)
    expect_output(env, b"hello there|/")


@case(
    "3.2",
    "create-existing-running",
    "creating an exec that is running fails with ALREADY_EXISTS and leaves it running",
    row=ROW_EXISTS,
    status="ALREADY_EXISTS",
    needs=("create",),
)
async def create_existing_running(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    first = await ctx.create(c, e, w.sh("read x; echo first:$x"))
    await first.until_ready()
    again = await ctx.create(c, e, w.sh("echo second"), label="again")
    await expect_rejected(ctx, again, grpc.StatusCode.ALREADY_EXISTS, "create of a running exec")
    await first.stdin(b"ok\n")
    await first.completed()
    expect_output(first, b"first:ok\n")


@case(
    "3.2",
    "create-existing-exited",
    "creating an exec that exited and is retained fails with ALREADY_EXISTS",
    row=ROW_EXISTS,
    status="ALREADY_EXISTS",
    needs=("create",),
)
async def create_existing_exited(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    done = await ctx.run(c, e, ["true"])
    expect_flow(done)
    again = await ctx.create(c, e, ["true"], half_close=True, label="again")
    await expect_rejected(ctx, again, grpc.StatusCode.ALREADY_EXISTS, "create of an exited exec")


@case(
    "3.2",
    "attach-unknown",
    "attaching to an exec that was never created fails with NOT_FOUND",
    row=ROW_UNKNOWN,
    status="NOT_FOUND",
)
async def attach_unknown(ctx: CaseContext) -> None:
    c = ctx.container_id()
    nowhere = await ctx.attach(c, "never-created")
    await expect_rejected(ctx, nowhere, grpc.StatusCode.NOT_FOUND, "attach in an unknown container")
    await ctx.run(c, ctx.exec_id(), ["true"])
    missing = await ctx.attach(c, "never-created")
    await expect_rejected(
        ctx, missing, grpc.StatusCode.NOT_FOUND, "attach to an unknown exec of a known container"
    )


ROW_REFUSED_NAME = "Session: a name the system refuses (too long, a link loop, permission denied)"


@case(
    "3.7",
    "name-too-long",
    "a command or working_dir longer than the system allows fails with INVALID_ARGUMENT",
    row=ROW_REFUSED_NAME,
    status="INVALID_ARGUMENT",
    needs=("create",),
)
async def name_too_long(ctx: CaseContext) -> None:
    c = ctx.container_id()
    long_name = "x" * 300  # over NAME_MAX (255) of every common file system
    long_path = "/" + "/".join(["d" * 250] * 20)  # over PATH_MAX (4096)
    for label, command, working_dir in (
        ("command name", [long_name], ""),
        ("command path", [long_path], ""),
        ("working_dir", ["true"], long_name),
    ):
        e = ctx.exec_id()
        refused = await ctx.create(
            c, e, command, half_close=True, working_dir=working_dir, label=label
        )
        await expect_rejected(ctx, refused, INVALID_ARGUMENT, f"a {label} too long")
        expect_flow(await ctx.run(c, e, ["true"]))  # 3.2: the exec was not created


@case(
    "3.2",
    "attach-ignores-create-fields",
    "an attach (empty command) ignores env, working_dir and tty",
)
async def attach_ignores_create_fields(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, w.sh("read x; echo got-$x"), half_close=True)
    await creator.until_ready()
    start = ctx.start_message(c, e, env={"": "bad key"}, working_dir=f"/nonexistent-{e}", tty=True)
    attached = await ctx.session(start, label="attach-with-create-fields")
    await attached.until_ready_or_end()
    expect(
        bool(attached.readies) and attached.readies[0].terminal_size is None,
        "ready for the attach, without terminal_size (the exec is not a TTY)",
        attached.describe(),
    )
    await attached.stdin(b"it\n")
    await attached.completed()
    expect_output(attached, b"got-it\n")


@case(
    "3.2",
    "create-in-paused-container",
    "creating an exec in a paused container fails with FAILED_PRECONDITION",
    row=ROW_PAUSED,
    status="FAILED_PRECONDITION",
    needs=("create",),
)
async def create_in_paused(ctx: CaseContext) -> None:
    c = ctx.container_id()
    running = await ctx.create(c, ctx.exec_id(), ["sleep", "30"])
    await running.until_ready()
    expect_code(await ctx.pause(c), OK, "ContainerPause of a running container")
    refused = await ctx.create(c, ctx.exec_id(), ["true"], half_close=True, label="refused")
    await expect_rejected(
        ctx, refused, grpc.StatusCode.FAILED_PRECONDITION, "create in a paused container"
    )
    expect_code(await ctx.resume(c), OK, "ContainerResume")


async def _refused_then_free(
    ctx: CaseContext, what: str, command: list[str], mention: str | None, **fields: Any
) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    refused = await ctx.create(c, e, command, half_close=True, label="refused", **fields)
    await expect_rejected(ctx, refused, INVALID_ARGUMENT, what, mention)
    # "the exec is then not created (a later create of the same IDs may succeed)"
    again = await ctx.run(c, e, ["true"])
    expect(
        again.ok and again.exit_code == 0,
        f"after {what}, a create of the same IDs succeeds (nothing was created)",
        again.describe(),
    )


@case(
    "3.2",
    "missing-working-dir",
    "a working_dir that does not exist fails with INVALID_ARGUMENT and creates nothing",
    row=ROW_BAD_CREATE,
    status="INVALID_ARGUMENT",
    needs=("create",),
)
async def missing_working_dir(ctx: CaseContext) -> None:
    missing = f"/nonexistent-{ctx.exec_id('dir')}"
    await _refused_then_free(
        ctx, "a missing working_dir", ["true"], "working_dir", working_dir=missing
    )


@case(
    "3.2",
    "command-not-executable",
    "a command that cannot be executed fails with INVALID_ARGUMENT and creates nothing",
    row=ROW_BAD_CREATE,
    status="INVALID_ARGUMENT",
    needs=("create",),
)
async def command_not_executable(ctx: CaseContext) -> None:
    name = f"no-such-command-{ctx.exec_id('cmd')}"
    await _refused_then_free(ctx, "a command that does not exist", [name], None)
    await _refused_then_free(ctx, "a directory as the command", ["/"], None)


@case(
    "3.2",
    "bad-env-key",
    "an env key that is empty or contains '=' or NUL fails with INVALID_ARGUMENT",
    row=ROW_BAD_CREATE,
    status="INVALID_ARGUMENT",
    needs=("create",),
)
async def bad_env_key(ctx: CaseContext) -> None:
    for key in ("", "A=B", "NUL\0KEY"):
        await _refused_then_free(ctx, f"env key {key!r}", ["true"], None, env={key: "v"})


# -- 3.3 Ready first -----------------------------------------------------------------------


@case(
    "3.3",
    "ready-first-with-session-id",
    "the first message of a session is ready with a non-empty session_id",
)
async def ready_first(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.run(c, e, w.sh("echo hi"))
    expect_flow(client)
    expect(bool(client.readies[0].session_id), "a non-empty session_id", client.describe())
    late = await (await ctx.attach(c, e)).finished()
    expect_flow(late)
    expect(bool(late.readies[0].session_id), "a non-empty session_id", late.describe())


@case(
    "3.3",
    "client-session-id-echoed",
    "ready carries start.session_id when the client gave one",
)
async def client_session_id(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    chosen = f"cf-session-{ctx.exec_id('s')}"
    client = await ctx.run(c, e, ["true"], session_id=chosen)
    expect_flow(client)
    expect_equal(client.readies[0].session_id, chosen, "ready.session_id")
    other = f"cf-session-{ctx.exec_id('t')}"
    start = ctx.start_message(c, e, session_id=other)
    late = await ctx.session(start, label="attach")
    await late.half_close()
    await late.finished()
    expect_flow(late)
    expect_equal({r.session_id for r in late.readies}, {other}, "session_id of every ready")


@case(
    "3.3",
    "server-session-ids-unique",
    "session_ids the server chooses are unique among its sessions",
)
async def session_ids_unique(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, w.sh("read x"))
    await creator.until_ready()
    others = [await ctx.attach(c, e, half_close=False, label=f"attach{i}") for i in range(5)]
    for other in others:
        await other.until_ready()
    ids = [creator.readies[0].session_id] + [o.readies[0].session_id for o in others]
    expect(all(ids), "non-empty session_ids", ids)
    expect(len(set(ids)) == len(ids), "six different session_ids", ids)
    await creator.stdin(b"\n")
    await creator.completed()


@case(
    "3.3",
    "terminal-size-in-ready",
    "ready.terminal_size is the current size for a TTY exec and unset otherwise",
)
async def terminal_size_in_ready(ctx: CaseContext) -> None:
    c = ctx.container_id()
    plain = await ctx.run(c, ctx.exec_id(), ["true"])
    expect_flow(plain)
    expect(
        plain.readies[0].terminal_size is None,
        "no terminal_size for a non-TTY exec",
        plain.describe(),
    )
    e = ctx.exec_id()
    tty = await ctx.create(c, e, w.sh("read x"), tty=True)
    await tty.until_ready()
    size = tty.readies[0].terminal_size
    expect(
        size is not None and (size.width, size.height) == (80, 24),
        "terminal_size 80x24 (the initial size, 7.3) for a TTY exec",
        tty.describe(),
    )
    await tty.resize(100, 40)
    # Resize is not acknowledged; a later attach sees the new size once it is applied.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        late = await ctx.attach(c, e, half_close=False, label="late")
        await late.until_ready()
        size = late.readies[0].terminal_size
        late.cancel()
        if size is not None and (size.width, size.height) == (100, 40):
            break
        if loop.time() > deadline:
            raise Failure("terminal_size 100x40 after a resize to 100x40", late.describe())
        await asyncio.sleep(0.05)
    await tty.stdin(b"\n")
    await tty.completed()


# -- 3.5 Isolation of clients --------------------------------------------------------------

_ISOLATION_LINES = 60


async def _isolation(ctx: CaseContext, how: str) -> None:
    """A creator, an observer and one client that leaves by ``how`` while the exec runs."""
    c, e = ctx.container_id(), ctx.exec_id()
    out, err = w.interleaved_expected(_ISOLATION_LINES)
    creator = await ctx.create(c, e, w.interleaved(_ISOLATION_LINES, 0.03), half_close=True)
    await creator.until_chunks(1)
    observer = await ctx.attach(c, e, label="observer")
    stub, channel = ctx.new_stub()
    deadline = 0.5 if how == "deadline" else None
    leaver = await ctx.attach(
        c, e, stub=stub, half_close=False, deadline=deadline, label=f"leaver-by-{how}"
    )
    if how == "cancel":
        await leaver.until_chunks(3)
        leaver.cancel()
    elif how == "channel":
        await leaver.until_chunks(3)
        ctx.log("-> closing the leaver's channel")
        await channel.close(grace=None)
    await leaver.finished()
    expect(
        leaver.exit_code is None,
        "the exec still running when the client left (the workload runs 1.8 s)",
        leaver.describe(),
    )
    for client in (creator, observer):
        await client.completed()
        expect_flow(client)
        expect_contiguous(client)
        expect_output(client, out, err)
        expect_equal(client.exit_code, 0, f"{client.label} exit code")
    status = await ctx.status_if_implemented(c, e)
    if status is not None:
        expect_equal((status.status, status.exit_code), ("exited", 0), "the exec's status")


@case(
    "3.5",
    "cancelled-client",
    "a client that cancels affects neither the other clients nor the exec",
)
async def cancelled_client(ctx: CaseContext) -> None:
    await _isolation(ctx, "cancel")


@case(
    "3.5",
    "closed-channel",
    "a client whose connection closes abruptly affects neither the other clients nor the exec",
)
async def closed_channel(ctx: CaseContext) -> None:
    await _isolation(ctx, "channel")


@case(
    "3.5",
    "deadline-exceeded",
    "a client whose deadline passes affects neither the other clients nor the exec",
)
async def deadline_client(ctx: CaseContext) -> None:
    await _isolation(ctx, "deadline")


# -- 3.6 Half-close ------------------------------------------------------------------------


@case(
    "3.6",
    "half-close-receives-everything",
    "a client that half-closes after start still receives all output and exit",
)
async def half_close_receives(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.run(c, e, w.sh("sleep 0.3; echo after; echo err >&2; exit 3"))
    expect_flow(client)
    expect_output(client, b"after\n", b"err\n")
    expect_equal(client.exit_code, 3, "exit code")


@case(
    "3.6",
    "half-close-keeps-stdin-open",
    "half-close does not close the exec's stdin",
)
async def half_close_keeps_stdin(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, ["cat"], half_close=True)
    await creator.until_ready()
    writer = await ctx.attach(c, e, half_close=False, label="writer")
    await writer.until_ready()
    await writer.stdin(b"still open\n")
    await creator.until_output(b"still open\n")
    await writer.stdin(b"")
    await creator.completed()
    expect_output(creator, b"still open\n")
    expect_equal(creator.exit_code, 0, "exit code of cat")


# -- 4.1 - 4.6 Output ----------------------------------------------------------------------


@case(
    "4.1",
    "output-as-output-chunks",
    "all output travels as output_chunk with one non-empty data member; never stdout/stderr",
)
async def output_as_chunks(ctx: CaseContext) -> None:
    client = await ctx.run(ctx.container_id(), ctx.exec_id(), w.interleaved(10, 0.01))
    expect(client.ok, "status OK", client.describe())
    published = [k for k in client.order if k in ("stdout", "stderr", "empty")]
    expect(not published, "only ready, output_chunk and exit messages", client.describe())
    for chunk in client.chunks:
        data = chunk.stdout if chunk.stdout is not None else chunk.stderr
        expect(
            bool(data),
            "each chunk carries data.stdout or data.stderr with at least one byte",
            f"chunk #{chunk.sequence}: {chunk!r}"[:300],
        )
    out, err = w.interleaved_expected(10)
    expect_output(client, out, err)


@case(
    "4.2",
    "one-counter-from-1",
    "stdout and stderr chunks share one sequence counter from 1, contiguous, in order",
)
async def one_counter(ctx: CaseContext) -> None:
    client = await ctx.run(ctx.container_id(), ctx.exec_id(), w.interleaved(20, 0.01))
    expect_flow(client)
    expect_contiguous(client)
    kinds = {("out" if c.stdout is not None else "err") for c in client.chunks}
    expect(kinds == {"out", "err"}, "chunks of both streams", client.describe())


@case(
    "4.3",
    "clients-attached-at-different-times",
    "clients attached at different times receive identical chunks and every byte",
    timeout=120,
)
async def clients_at_different_times(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    lines = 40
    tail = f"; printf '{w.ALL_BYTES_PRINTF}'; printf '{w.ALL_BYTES_PRINTF}' >&2"
    out, err = w.interleaved_expected(lines)
    out, err = out + bytes(range(256)), err + bytes(range(256))
    creator = await ctx.create(c, e, w.interleaved(lines, 0.02, tail), half_close=True)
    # With a driver the exec may be done before its first client attached: then every
    # client attaches after the exit, which the case checks as well.
    await creator.until(lambda: len(creator.chunks) >= 5 or creator.done, "5 chunks, or the end")
    second = await ctx.attach(c, e, label="second")
    # Mid-run; a server whose reads merge writes (or an exec that began before a driver's
    # creator attached) may send fewer chunks, so the exit also ends the wait.
    await creator.until(lambda: len(creator.chunks) >= 40 or creator.done, "40 chunks, or the end")
    third = await ctx.attach(c, e, label="third")
    await creator.completed()
    after = await ctx.attach(c, e, label="after-exit")
    clients = [creator, second, third, after]
    for client in clients:
        await client.completed()
        expect_flow(client)
        expect_contiguous(client)
        expect_output(client, out, err)
    expect_same_chunks(clients)
    expect(
        len({c.exit_code for c in clients}) == 1,
        "the same exit code for every client",
        [c.exit_code for c in clients],
    )


def _stdout_reaches(client: SessionClient, size: int) -> Callable[[], bool]:
    return lambda: client.stdout_bytes >= size


@case(
    "4.3",
    "large-output",
    "64 MiB (or 3/4 of the target's output limit) written as fast as the exec can, read as fast "
    "as the client can, arrive complete and in order (sha256 of the expected bytes)",
    timeout=240,
    heavy=True,
)
async def large_output(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    blocks = max(1, w.within_limit(ctx.target.max_output_bytes, 64 * w.MIB) // w.BLOCK)
    client = await ctx.create(c, e, w.block_generator(), label="reader")
    await client.until_ready()
    digest = hashlib.sha256()
    expected = hashlib.sha256()
    received = 0
    consumed = 0
    began = time.monotonic()
    # Every block asked for at once: the exec writes as fast as it can and never waits for the
    # client (6.6), and a client behind it still gets every byte (6.7).
    await client.stdin(b"\n" * blocks)
    while consumed < blocks * w.BLOCK:
        await client.until(
            _stdout_reaches(client, consumed + w.BLOCK),
            f"stdout byte {consumed + w.BLOCK} (block {consumed // w.BLOCK})",
            within=60,
        )
        # Hash and drop what arrived, so 64 MiB are never held at once.
        while received < len(client.chunks):
            chunk = client.chunks[received]
            data = chunk.stdout or b""
            digest.update(data)
            client.chunks[received] = wire.OutputChunk(
                sequence=chunk.sequence,
                timestamp=chunk.timestamp,
                stdout=b"x" if chunk.stdout is not None else None,
                stderr=chunk.stderr,
                gap_before=chunk.gap_before,
                is_replay=chunk.is_replay,
            )
            received += 1
        while consumed + w.BLOCK <= client.stdout_bytes:
            expected.update(w.block_bytes(consumed // w.BLOCK))
            consumed += w.BLOCK
    await client.stdin(b"")
    await client.completed(within=60)
    seconds = time.monotonic() - began
    ctx.log(f"{blocks} MiB in {seconds:.2f} s ({blocks * w.BLOCK / seconds / 2**20:.0f} MiB/s)")
    expect_flow(client)
    expect_contiguous(client)
    expect_equal(client.stdout_bytes, blocks * w.BLOCK, "stdout bytes")
    expect_equal(
        "sha256:" + digest.hexdigest(), "sha256:" + expected.hexdigest(), "sha256 of stdout"
    )
    expect_equal(client.exit_code, 0, "exit code")


@case(
    "4.3",
    "fifty-concurrent-execs",
    "10 containers x 5 execs streaming at once all complete with exactly their own output",
    timeout=180,
    heavy=True,
)
async def concurrent_execs(ctx: CaseContext) -> None:
    containers = [ctx.container_id() for _ in range(10)]

    def command(n: int) -> tuple[list[str], bytes, bytes]:
        first, last = n * 10000 + 1, n * 10000 + 3000
        script = f"seq {first} {last}; seq {n} {n + 300} >&2; sleep 0.2; seq 1 {n + 500}"
        out = w.seq_expected(first, last) + w.seq_expected(1, n + 500)
        return w.sh(script), out, w.seq_expected(n, n + 300)

    async def one(container: str, index: int) -> None:
        argv, out, err = command(index)
        client = await ctx.create(container, f"x{index}", argv, half_close=True, label=f"x{index}")
        await client.completed(within=120)
        expect_flow(client)
        expect_contiguous(client)
        expect_output(client, out, err)

    await gather_all(
        *(one(container, i * 5 + j) for i, container in enumerate(containers) for j in range(5))
    )


@case(
    "4.4",
    "chunks-at-most-64kib",
    "no chunk carries more than 64 KiB of data",
    level=Level.SHOULD,
)
async def chunks_at_most_64k(ctx: CaseContext) -> None:
    size = 2 * 1024 * 1024
    client = await ctx.run(ctx.container_id(), ctx.exec_id(), w.sh(f"head -c {size} /dev/zero"))
    expect_flow(client)
    biggest = max((len(c.stdout or c.stderr or b"") for c in client.chunks), default=0)
    expect(biggest <= 64 * 1024, "chunks of at most 65536 bytes", f"a chunk of {biggest} bytes")


@case(
    "4.4",
    "small-write-one-chunk",
    "output is not split into more chunks than the reads that produced it",
    level=Level.SHOULD,
)
async def small_write_one_chunk(ctx: CaseContext) -> None:
    text = "0123456789" * 20
    # One write of 200 bytes (below PIPE_BUF, so one read takes it whole) is one chunk.
    client = await ctx.run(ctx.container_id(), ctx.exec_id(), ["printf", text])
    expect_flow(client)
    expect_output(client, text.encode())
    expect_equal(len(client.chunks), 1, "number of chunks for one 200-byte write")


@case(
    "4.5",
    "chunk-timestamps",
    "chunk timestamps are the receive time in ns since the epoch and never decrease",
)
async def chunk_timestamps(ctx: CaseContext) -> None:
    before = time.time_ns()
    client = await ctx.run(
        ctx.container_id(), ctx.exec_id(), w.sh("echo a; sleep 0.4; echo b >&2; sleep 0.1; echo c")
    )
    after = time.time_ns()
    expect_flow(client)
    stamps = [c.timestamp for c in client.chunks]
    expect(len(stamps) >= 2, "at least two chunks", client.describe())
    expect(stamps == sorted(stamps), "non-decreasing timestamps along the sequence", stamps)
    expect_timestamps(stamps, before, after, "chunk timestamp")
    expect(
        stamps[-1] - stamps[0] >= 300_000_000,
        "chunks written 0.5 s apart carry timestamps about 5e8 ns apart",
        f"{stamps[-1] - stamps[0]} ns apart",
    )


@case(
    "4.6",
    "tty-stdout-only",
    "a TTY exec's output, stderr included, is sent as data.stdout only",
)
async def tty_stdout_only(ctx: CaseContext) -> None:
    client = await ctx.run(
        ctx.container_id(), ctx.exec_id(), w.sh("echo to-out; echo to-err >&2"), tty=True
    )
    expect_flow(client)
    expect(
        all(c.stderr is None for c in client.chunks),
        "no chunk with data.stderr",
        client.describe(),
    )
    expect(
        b"to-out" in client.stdout and b"to-err" in client.stdout,
        "both lines in stdout",
        repr(client.stdout[:200]),
    )


# -- 5 Exit and end of stream --------------------------------------------------------------


@case(
    "5.1",
    "exit-last-then-ok",
    "ready first, then output, then exit as the last message, then status OK",
)
async def exit_last(ctx: CaseContext) -> None:
    client = await ctx.run(
        ctx.container_id(), ctx.exec_id(), w.sh("echo out; echo err >&2; exit 7")
    )
    expect_flow(client)
    expect_output(client, b"out\n", b"err\n")
    expect_equal(client.exit_code, 7, "exit code")


@case(
    "5.1",
    "output-right-before-exit",
    "output written right before the process exits is delivered before exit",
)
async def output_before_exit(ctx: CaseContext) -> None:
    c = ctx.container_id()

    async def one(n: int) -> None:
        marker = f"last-words-{n}-{ctx.exec_id('m')}"
        if n % 2:
            argv = ["printf", marker]
            out, err = marker.encode(), b""
        else:
            argv = w.sh(f"printf {marker}; printf {marker} >&2; exit {n}")
            out, err = marker.encode(), marker.encode()
        client = await ctx.run(c, f"x{n}", argv)
        expect_flow(client)
        expect_output(client, out, err)

    # Concurrent execs of one container: within the target's limit, however fast it starts them.
    await gather_all(*(one(n) for n in range(min(20, ctx.target.max_execs_per_container or 20))))


@case(
    "5.1",
    "every-client-gets-exit",
    "every attached client receives all output and then the exit code",
)
async def every_client_gets_exit(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, w.sh("read x; echo done; exit 5"))
    await creator.until_ready()
    others = [await ctx.attach(c, e, label=f"attach{i}") for i in range(3)]
    for other in others:
        await other.until_ready()
    await creator.stdin(b"go\n")
    for client in [creator, *others]:
        await client.completed()
        expect_flow(client)
        expect_output(client, b"done\n")
        expect_equal(client.exit_code, 5, f"{client.label} exit code")


@case(
    "5.1",
    "late-attach-after-exit",
    "a client attaching after the exit receives the whole output, then the exit code",
)
async def late_attach_after_exit(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    first = await ctx.run(c, e, w.sh("echo one; echo two >&2; exit 3"))
    expect_flow(first)
    late = await (await ctx.attach(c, e)).finished()
    expect_flow(late)
    expect_output(late, b"one\n", b"two\n")
    expect_equal(late.exit_code, 3, "exit code on late attach")
    expect_same_chunks([first, late])


@case("5.2", "exit-status", "the exit code is the main process's exit status")
async def exit_status(ctx: CaseContext) -> None:
    c = ctx.container_id()
    for code in (0, 1, 42, 255):
        client = await ctx.run(c, f"exit-{code}", w.sh(f"exit {code}"))
        expect_flow(client)
        expect_equal(client.exit_code, code, f"exit code of 'exit {code}'")


@case("5.2", "killed-by-signal", "a process ended by signal N gives 128 + N (KILL 137, TERM 143)")
async def killed_by_signal(ctx: CaseContext) -> None:
    c = ctx.container_id()
    for name, code in (("KILL", 137), ("TERM", 143)):
        client = await ctx.run(c, f"self-{name.lower()}", w.sh(f"kill -{name} $$"))
        expect_flow(client)
        expect_equal(client.exit_code, code, f"exit code of a process killed by SIG{name}")


@case(
    "5.3",
    "bounded-drain",
    "exit is not held back for long by a descendant that keeps the output open",
    level=Level.SHOULD,
)
async def bounded_drain(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    # The background sleep holds stdout for 8 s after the main process exited.
    client = await ctx.create(c, e, w.sh("sleep 8 & echo main-done"), half_close=True)
    await client.until_output(b"main-done\n")
    seen = time.monotonic()
    await client.finished(within=15)
    waited = time.monotonic() - seen
    expect_flow(client)
    expect(waited < 6, "exit within 6 s of the main process's exit", f"{waited:.1f} s")
