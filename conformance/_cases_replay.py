"""Cases of PROTOCOL 6 and 11: replay, the switch to live output, gaps, the output limit,
clients that do not read, and retention and cleanup of exited execs.

The cases that depend on a server setting take it from the target description
(``--max-output-bytes``, ``--retention``, ``--cleanup-interval``); retention cases skip when the
retention is unknown rather than wait for the reference default of five minutes, and eviction
cases skip when the output limit is too large to overflow in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from . import _workloads as w
from ._case import Failure, Skip, case, expect, expect_equal
from ._checks import (
    ROW_UNKNOWN,
    expect_code,
    expect_contiguous,
    expect_flow,
    expect_output,
    expect_rejected,
    expect_same_chunks,
    retention_settings,
)
from ._context import CaseContext
from ._session_client import SessionClient

OK = grpc.StatusCode.OK


def expect_honest(client: SessionClient, first: int = 1) -> int:
    """PROTOCOL 4.2 and 6.4: each chunk's sequence is the previous + 1 + its gap_before,
    counting from ``first`` (the replay start).  Returns the number reported missing."""
    previous = max(first, 1) - 1
    missing = 0
    for chunk in client.chunks:
        want = previous + 1 + chunk.gap_before
        if chunk.sequence != want:
            raise Failure(
                f"{client.label}: chunk after #{previous} with gap_before {chunk.gap_before} "
                f"to be #{want}",
                f"#{chunk.sequence}: {client.describe()}",
            )
        missing += chunk.gap_before
        previous = chunk.sequence
    return missing


async def _finished_exec(ctx: CaseContext, count: int = 8) -> tuple[str, str, SessionClient]:
    """An exec that wrote ``count`` lines 20 ms apart (so ``count`` chunks) and exited 0."""
    c, e = ctx.container_id(), ctx.exec_id()
    client = await ctx.run(c, e, w.sh(f"for i in $(seq 1 {count}); do echo $i; sleep 0.02; done"))
    expect_flow(client)
    expect_contiguous(client)
    return c, e, client


# -- 6.1 Replay from a sequence ------------------------------------------------------------


@case(
    "6.1",
    "replay-from-sequence",
    "an attach with replay_from_sequence S receives exactly the chunks from S on",
)
async def replay_from_sequence(ctx: CaseContext) -> None:
    c, e, first = await _finished_exec(ctx)
    last = first.chunks[-1].sequence
    for start in sorted({2, last // 2 + 1, last}):
        client = await (await ctx.attach(c, e, replay_from=start)).finished()
        expect_flow(client)
        expect_equal(
            [x.sequence for x in client.chunks],
            list(range(start, last + 1)),
            f"sequences replayed from {start}",
        )
        expect_same_chunks([first, client])
        expect_equal(client.exit_code, 0, "exit code")


@case(
    "6.1",
    "replay-from-zero-is-from-one",
    "replay_from_sequence 0 and 1 both replay the whole history",
)
async def replay_from_zero(ctx: CaseContext) -> None:
    c, e, first = await _finished_exec(ctx, 5)
    for start in (0, 1):
        client = await (await ctx.attach(c, e, replay_from=start)).finished()
        expect_flow(client)
        expect_contiguous(client)
        expect_same_chunks([first, client])
        expect_equal(len(client.chunks), len(first.chunks), f"chunks replayed from {start}")


@case(
    "6.1",
    "replay-past-next-sequence",
    "replay_from_sequence past the next sequence fails with OUT_OF_RANGE",
    row="Session: `replay_from_sequence` past the next sequence",
    status="OUT_OF_RANGE",
)
async def replay_past_next(ctx: CaseContext) -> None:
    c, e, first = await _finished_exec(ctx, 3)
    following = first.chunks[-1].sequence + 1
    at_next = await (await ctx.attach(c, e, replay_from=following)).finished()
    expect_flow(at_next)
    expect(not at_next.chunks, f"no chunk from the next sequence {following}", at_next.describe())
    for start in (following + 1, 2**63):
        past = await ctx.attach(c, e, replay_from=start, label=f"from-{start}")
        await expect_rejected(
            ctx, past, grpc.StatusCode.OUT_OF_RANGE, f"replay_from_sequence {start}"
        )


# -- 6.2 / 6.3 The switch from replay to live ----------------------------------------------


async def _attach_mid_run(ctx: CaseContext) -> tuple[SessionClient, SessionClient, bytes]:
    c, e = ctx.container_id(), ctx.exec_id()
    out, _ = w.interleaved_expected(50)
    creator = await ctx.create(c, e, w.interleaved(50, 0.02, " 2>/dev/null"), half_close=True)
    await creator.until_chunks(10)
    late = await ctx.attach(c, e, label="late")
    await creator.completed()
    await late.completed()
    expect_flow(late)
    return creator, late, out


@case(
    "6.2",
    "replayed-chunks-marked",
    "chunks produced before the attach are is_replay, live chunks are not",
)
async def replayed_marked(ctx: CaseContext) -> None:
    creator, late, _ = await _attach_mid_run(ctx)
    if ctx.over_wire:
        expect(
            not any(c.is_replay for c in creator.chunks),
            "no is_replay chunk for the creator (all live)",
            creator.describe(),
        )
    boundary = late.readies[0].next_sequence
    expect(boundary > 1, "the late client attached after some output", late.describe())
    # With a driver the "creator" attached too, after the exec began: the same rule holds.
    for client in (creator, late):
        mark = client.readies[0].next_sequence
        for chunk in client.chunks:
            expect(
                chunk.is_replay == (chunk.sequence < mark),
                f"{client.label}: is_replay exactly for sequences below next_sequence {mark}",
                f"chunk #{chunk.sequence} is_replay {chunk.is_replay}",
            )


@case(
    "6.3",
    "ready-marks-end-of-replay",
    "replay, then a second ready (replay_complete, same session and N), then live from N",
)
async def ready_marks_end(ctx: CaseContext) -> None:
    creator, late, out = await _attach_mid_run(ctx)
    expect_equal(len(late.readies), 2, "number of ready messages")
    first, second = late.readies
    expect_equal((first.replay_complete, second.replay_complete), (False, True), "replay_complete")
    expect_equal(second.session_id, first.session_id, "session_id of the second ready")
    boundary = first.next_sequence
    expect_equal(second.next_sequence, boundary, "next_sequence of the second ready")
    switch = late.order.index("ready", 1)
    expect_equal(
        [c.sequence for c in late.chunks[: switch - 1]],
        list(range(1, boundary)),
        "sequences before the second ready",
    )
    expect_contiguous(late)
    expect_output(late, out)
    expect_same_chunks([creator, late])


@case(
    "6.3",
    "nothing-to-replay",
    "with nothing to replay the first ready has replay_complete and next_sequence N",
)
async def nothing_to_replay(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    creator = await ctx.create(c, e, w.sh("echo a; read x; echo b"))
    ready = await creator.until_ready()
    if ctx.over_wire:  # with a driver the exec may have written before the first attach
        expect_equal((ready.replay_complete, ready.next_sequence), (True, 1), "the creator's ready")
    await creator.until_chunks(1)
    tail = await ctx.attach(c, e, replay_from=2, label="from-next")
    ready = await tail.until_ready()
    expect_equal((ready.replay_complete, ready.next_sequence), (True, 2), "ready at next")
    await creator.stdin(b"go\n")
    await tail.completed()
    expect_flow(tail)
    expect_equal(len(tail.readies), 1, "ready messages when nothing is replayed")
    expect_equal([c.sequence for c in tail.chunks], [2], "sequences after the attach")
    expect(not tail.chunks[0].is_replay, "live chunk not is_replay", tail.describe())
    expect_output(tail, b"b\n")


@case(
    "6.3",
    "switch-under-load",
    "clients attaching while output streams get no duplicate and no hole at the switch",
    timeout=120,
)
async def switch_under_load(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    blocks = 60
    script = (
        f"i=0; while [ $i -lt {blocks} ]; do seq $((i*1000+1)) $((i*1000+1000)); "
        "i=$((i+1)); sleep 0.01; done"
    )
    out = w.seq_expected(1, blocks * 1000)
    creator = await ctx.create(c, e, w.sh(script), half_close=True)
    clients = [creator]
    for n in range(1, 7):
        await creator.until(_at_least(creator, len(out) * n // 8), f"{n}/8 of the output")
        clients.append(await ctx.attach(c, e, label=f"attach{n}"))
    for client in clients:
        await client.completed()
        expect_flow(client)
        expect_contiguous(client)
        expect_output(client, out)
    expect_same_chunks(clients)


def _at_least(client: SessionClient, size: int) -> Callable[[], bool]:
    return lambda: client.stdout_bytes >= size


# -- 6.4 / 6.5 Gaps and the output limit ----------------------------------------------------

#: The largest output limit the eviction cases overflow (they write twice or three times it).
_MAX_OVERFLOWED_LIMIT = 64 * w.MIB


def _output_limit(ctx: CaseContext) -> int:
    """The target's output limit, where the suite can overflow it in seconds."""
    limit = ctx.target.max_output_bytes
    if limit == 0:
        raise Skip("the target has no output limit (--max-output-bytes 0): nothing is evicted")
    if limit > _MAX_OVERFLOWED_LIMIT:
        raise Skip(
            f"the target's output limit is {limit} bytes: overflowing it takes too long; check "
            f"a server whose limit is at most {_MAX_OVERFLOWED_LIMIT} (--max-output-bytes)"
        )
    return limit


async def _overflowed_exec(ctx: CaseContext) -> tuple[str, str, bytes, SessionClient]:
    """An exec that wrote twice its output limit and then some, and then waits on stdin: the
    caller attaches while it runs (no race with a short retention), then ``_let_exit``."""
    c, e = ctx.container_id(), ctx.exec_id()
    lines = w.seq_lines_for(2 * _output_limit(ctx) + w.MIB)
    out = w.seq_expected(1, lines)
    creator = await ctx.create(c, e, w.sh(f"seq 1 {lines}; read _"), half_close=False)
    # The creator may itself fall behind the limit (and be told of a gap): wait for the end.
    ending = f"{lines}\n".encode()
    await creator.until(
        lambda: _tail(creator, len(ending)).endswith(ending), f"the last line {lines}", within=90
    )
    expect_honest(creator)
    return c, e, out, creator


def _tail(client: SessionClient, size: int) -> bytes:
    """The last ``size`` bytes (or fewer) of a client's stdout, without joining all of it."""
    tail = b""
    for chunk in reversed(client.chunks):
        tail = (chunk.stdout or b"") + tail
        if len(tail) >= size:
            break
    return tail


async def _replayed(ctx: CaseContext, c: str, e: str, start: int, last: int) -> SessionClient:
    """An attach from ``start`` that has received the replay up to chunk ``last``."""
    client = await ctx.attach(c, e, replay_from=start)
    await client.until(
        lambda: bool(client.chunks) and client.chunks[-1].sequence >= last,
        f"the replay up to #{last}",
        within=90,
    )
    return client


async def _let_exit(creator: SessionClient, clients: list[SessionClient]) -> None:
    await creator.stdin(b"\n")
    await creator.completed(within=60)
    for client in clients:
        await client.finished(within=60)


@case(
    "6.4",
    "evicted-output-gap",
    "a client that missed chunks evicted by the output limit is told how many in gap_before",
    timeout=120,
    heavy=True,
)
async def evicted_output_gap(ctx: CaseContext) -> None:
    c, e, _, creator = await _overflowed_exec(ctx)
    last = creator.chunks[-1].sequence
    starts = (0, 2)
    clients = [await _replayed(ctx, c, e, start, last) for start in starts]
    await _let_exit(creator, clients)
    for start, client in zip(starts, clients, strict=True):
        expect_flow(client)
        first = client.chunks[0]
        expect_equal(
            first.gap_before,
            first.sequence - max(start, 1),
            f"gap_before of the first chunk replayed from {start} (#{first.sequence})",
        )
        expect(first.gap_before > 0, "a gap (the output was twice the limit)", first.sequence)
        expect_honest(client, start)
        expect_equal(client.chunks[-1].sequence, last, "the last sequence")


async def _stalled_and_reader(
    ctx: CaseContext, c: str, e: str, script: str, within: float
) -> tuple[SessionClient, SessionClient]:
    """An exec running ``script`` once told to go; its creator reads only its ``ready`` and
    then nothing, while a second client tells it to go and reads it all to the exit."""
    stalled = await ctx.create(c, e, w.sh(f"read go; {script}"), read=False, label="stalled")
    kind = await stalled.read_one()
    expect(kind == "ready", "ready first", stalled.describe())
    reader = await ctx.attach(c, e, half_close=False, label="reader")
    await reader.until_ready()
    await reader.stdin(b"go\n")
    await reader.completed(within=within)
    return stalled, reader


@case(
    "6.4",
    "stalled-client-gap-past-the-limit",
    "a client that stopped reading while the output limit evicted chunks it had not read gets "
    "every other chunk and an honest gap_before",
    timeout=150,
    heavy=True,
)
async def stalled_client_gap(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    lines = w.seq_lines_for(3 * _output_limit(ctx))
    stalled, reader = await _stalled_and_reader(ctx, c, e, f"seq 1 {lines}", within=90)
    expect_honest(reader)
    stalled.read_in_background()
    await stalled.completed(within=60)
    missing = expect_honest(stalled)
    expect(missing > 0, "a gap (three times the limit went past the client)", missing)
    expect_equal(stalled.chunks[-1].sequence, reader.chunks[-1].sequence, "the last sequence")
    ctx.log(f"the stalled client was told of {missing} missing chunks")


@case(
    "6.5",
    "output-limit-oldest-first",
    "the retained output is bounded by the output limit and eviction removes the oldest first",
    timeout=120,
    heavy=True,
)
async def output_limit_oldest_first(ctx: CaseContext) -> None:
    c, e, out, creator = await _overflowed_exec(ctx)
    last = creator.chunks[-1].sequence
    client = await _replayed(ctx, c, e, 0, last)
    await _let_exit(creator, [client])
    expect_flow(client)
    retained = sum(len(x.stdout or x.stderr or b"") for x in client.chunks)
    limit = ctx.target.max_output_bytes
    expect(
        0 < retained <= limit,
        f"retained output of at most {limit} bytes (--max-output-bytes)",
        f"{retained} bytes",
    )
    expect(
        out.endswith(client.stdout),
        "the retained chunks are the newest output (a suffix of it)",
        f"{len(client.stdout)} bytes starting {client.stdout[:30]!r}",
    )
    expect_equal(client.chunks[-1].sequence, last, "the last retained sequence")


@case(
    "6.6",
    "stalled-client-delays-nobody",
    "a client that does not read delays neither the exec nor the other clients",
    timeout=150,
    heavy=True,
)
async def stalled_delays_nobody(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    size = 8 * w.MIB
    # The stalled client holds at most the transport's window; the rest must not wait for it.
    stalled, reader = await _stalled_and_reader(
        ctx, c, e, f"head -c {size} /dev/zero; echo end", within=60
    )
    expect_honest(reader)
    expect(reader.stdout.endswith(b"end\n"), "the output's last line 'end'", reader.describe())
    status = await ctx.status(c, e)
    expect_equal((status.status, status.exit_code), ("exited", 0), "exec status")
    late = await (await ctx.attach(c, e, replay_from=reader.chunks[-1].sequence)).finished()
    expect_flow(late)
    stalled.cancel()


# -- 6.7 Slow clients lose nothing ----------------------------------------------------------


@case(
    "6.7",
    "stalled-client-loses-nothing",
    "a client that reads nothing until the exec has exited then receives every chunk (within "
    "the output limit), identical to a fast client's, with no gap",
    timeout=180,
    heavy=True,
)
async def stalled_loses_nothing(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    lines = w.seq_lines_for(w.within_limit(ctx.target.max_output_bytes, 32 * w.MIB))
    out = w.seq_expected(1, lines)
    stalled, reader = await _stalled_and_reader(ctx, c, e, f"seq 1 {lines}", within=120)
    expect_contiguous(reader)
    expect_output(reader, out)
    status = await ctx.status(c, e)
    expect_equal((status.status, status.exit_code), ("exited", 0), "exec status")
    stalled.read_in_background()
    await stalled.completed(within=120)
    expect_flow(stalled)
    expect_contiguous(stalled)
    expect_output(stalled, out)
    expect_same_chunks([reader, stalled])
    ctx.log(f"the stalled client received all {len(out)} bytes after the exit")


@case(
    "6.7",
    "replay-after-exit-complete",
    "a client attaching after the exec exited receives all of its output (within the output "
    "limit) from sequence 1, the same chunks, then exit; replay from a middle sequence too",
    timeout=150,
    heavy=True,
)
async def replay_after_exit_complete(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    # Small enough to replay twice well within a short retention, larger than a memory cache.
    lines = w.seq_lines_for(w.within_limit(ctx.target.max_output_bytes, 6 * w.MIB))
    out = w.seq_expected(1, lines)
    creator = await ctx.run(c, e, ["seq", "1", str(lines)], within=120)
    expect_flow(creator)
    expect_contiguous(creator)
    expect_output(creator, out)
    # Both attach at once, right after the exit: well within any retention.
    middle = creator.chunks[len(creator.chunks) // 2].sequence
    late = await ctx.attach(c, e)
    rest = await ctx.attach(c, e, replay_from=middle)
    await late.finished(within=120)
    await rest.finished(within=120)
    expect_flow(late)
    expect_contiguous(late)
    expect_output(late, out)
    expect_same_chunks([creator, late])
    expect_equal(late.exit_code, creator.exit_code, "exit code")
    expect_flow(rest)
    expect_contiguous(rest, middle)
    expect_same_chunks([creator, rest])


# -- 11 Retention and cleanup --------------------------------------------------------------


@case(
    "11.1",
    "attachable-during-retention",
    "an exited exec stays attachable (replay, then exit) during the retention period",
    needs=("retention",),
)
async def attachable_during_retention(ctx: CaseContext) -> None:
    retention, _ = retention_settings(ctx)
    clock = asyncio.get_running_loop().time
    for _attempt in range(3):
        began = clock()
        c, e, first = await _finished_exec(ctx, 4)
        # The server times the retention from the exit, which came before this client saw
        # it: an exec that took half the retention to run leaves no safe moment to attach
        # (a loaded machine, a short retention), so it proves nothing; another one might.
        if clock() - began < retention * 0.5:
            break
    else:
        raise Skip(
            f"three execs each took over half the retention ({retention:g} s) to run: "
            "too slow to check it; give the target a longer retention"
        )
    # Well into the retention, counted from before the exec started.
    await asyncio.sleep(max(0.0, began + retention * 0.5 - clock()))
    late = await (await ctx.attach(c, e)).finished()
    expect_flow(late)
    expect_same_chunks([first, late])
    expect_equal(len(late.chunks), len(first.chunks), "replayed chunks")
    expect_equal(late.exit_code, 0, "exit code")


@case(
    "11.2",
    "removed-after-retention-and-sweep",
    "after retention + sweep interval attach is NOT_FOUND, the container is gone, IDs are free",
    row=ROW_UNKNOWN,
    status="NOT_FOUND",
    needs=("retention",),
)
async def removed_after_retention(ctx: CaseContext) -> None:
    retention, interval = retention_settings(ctx)
    c, e, _ = await _finished_exec(ctx, 2)
    await asyncio.sleep(retention + interval + 0.4 + 0.1 * (retention + interval))
    gone = await ctx.attach(c, e)
    await expect_rejected(ctx, gone, grpc.StatusCode.NOT_FOUND, "attach to a removed exec")
    expect_code(
        await ctx.status_outcome(c, e), grpc.StatusCode.NOT_FOUND, "status of a removed exec"
    )
    expect_code(
        await ctx.status_outcome(c),
        grpc.StatusCode.NOT_FOUND,
        "status of a container whose last exec was removed",
    )
    again = await ctx.run(c, e, w.sh("echo again"))
    expect_flow(again)
    expect_output(again, b"again\n")
