"""Cases of PROTOCOL 8: lifecycle events, their order and numbering, filters, what a new
subscriber sees (the cut at subscription, replay), and subscribers that do not read.

Other cases run on the same target at the same time, so unfiltered subscribers see their
events too; the cases only assert what holds whatever else happens: numbering is server-wide
and contiguous, and the events of the case's own fresh containers are exactly as specified.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from execstream import wire

from . import _workloads as w
from ._case import Failure, case, expect, expect_equal
from ._checks import expect_code, expect_flow, expect_timestamps, retention_settings
from ._context import CaseContext, gather_all
from ._subscription import Subscription

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

Kind = tuple[str, str, str]  # (exec_id, event_type, status)


def _kinds(events: list[wire.ContainerLifecycleEvent]) -> list[Kind]:
    return [(e.exec_id, e.event_type, e.status) for e in events]


def expect_numbered(sub: Subscription) -> None:
    """PROTOCOL 8.2 for an unfiltered subscriber: each event is the previous + 1 + gap."""
    previous: int | None = None
    for event in sub.events:
        if previous is not None and event.sequence != previous + 1 + event.gap_before:
            raise Failure(
                f"{sub.label}: the event after #{previous} (gap_before {event.gap_before}) "
                f"to be #{previous + 1 + event.gap_before}",
                f"#{event.sequence}: {sub.describe()}",
            )
        previous = event.sequence


async def _lifecycle_status(ctx: CaseContext, request: wire.ContainerLifecycleRequest) -> str:
    """Subscribe expecting a failure; return the status code name and check the message."""
    sub = Subscription(
        ctx,
        ctx.stub.ContainerLifecycle(request, metadata=ctx.target.metadata, timeout=30),
        "subscriber",
    )
    sub.read_in_background()
    await sub.until(lambda: sub.code is not None, "the stream to end")
    if sub.code is not grpc.StatusCode.OK:
        expect(bool(sub.details.strip()), "a message saying what was wrong", "none")
    return sub.code.name if sub.code else "none"


@case(
    "8.1",
    "exec-events",
    "a new container and exec produce created, registered, started, exited (with exit_code)",
)
async def exec_events(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    sub = await ctx.subscribe(c)
    before = time.time_ns()
    done = await ctx.run(c, e, w.sh("exit 3"))
    expect_flow(done)
    exited = await sub.until_event(c, e, "exited")
    after = time.time_ns()
    expect_equal(
        _kinds(sub.of(c)),
        [
            ("", "created", "pending"),
            (e, "registered", "pending"),
            (e, "started", "running"),
            (e, "exited", "exited"),
        ],
        "events of a new container's first exec (exec_id, event_type, status)",
    )
    expect_equal(exited.exit_code, 3, "exit_code of the exited event")
    expect_timestamps([x.timestamp for x in sub.of(c)], before, after, "event timestamp")


@case(
    "8.1",
    "pause-resume-events",
    "pause and resume produce the container events paused and resumed",
)
async def pause_resume_events(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    sub = await ctx.subscribe(c)
    client = await ctx.create(c, e, ["sleep", "30"])
    await sub.until_event(c, e, "started")
    expect_code(await ctx.pause(c), grpc.StatusCode.OK, "ContainerPause")
    await sub.until_event(c, "", "paused")
    expect_code(await ctx.resume(c), grpc.StatusCode.OK, "ContainerResume")
    await sub.until_event(c, "", "resumed")
    expect_code(await ctx.signal(c, "KILL"), grpc.StatusCode.OK, "ContainerSignal KILL")
    await sub.until_event(c, e, "exited")
    await client.finished()
    expect_equal(
        [k for k in _kinds(sub.of(c)) if k[1] in ("paused", "resumed")],
        [("", "paused", "paused"), ("", "resumed", "running")],
        "container events of pause and resume (exec_id, event_type, status)",
    )


@case(
    "8.1",
    "removal-events",
    "removal after retention produces unregistered for the exec, then removed for the container",
    needs=("retention",),
)
async def removal_events(ctx: CaseContext) -> None:
    retention, interval = retention_settings(ctx)
    c, e = ctx.container_id(), ctx.exec_id()
    sub = await ctx.subscribe(c)
    expect_flow(await ctx.run(c, e, ["true"]))
    await sub.until_event(c, "", "removed", within=retention + interval + 15)
    expect_equal(
        _kinds(sub.of(c))[-2:],
        [(e, "unregistered", "removed"), ("", "removed", "removed")],
        "the last two events (exec_id, event_type, status)",
    )


@case(
    "8.2",
    "numbering-and-order",
    "events carry a server-wide sequence +1 per event; an exec's events come in order",
)
async def numbering_and_order(ctx: CaseContext) -> None:
    c = ctx.container_id()
    everything = await ctx.subscribe(label="unfiltered")
    mine = await ctx.subscribe(c, label="filtered")
    execs = [ctx.exec_id() for _ in range(3)]
    await gather_all(*(ctx.run(c, e, ["true"]) for e in execs))
    for e in execs:
        await everything.until_event(c, e, "exited")
        await mine.until_event(c, e, "exited")
    expect_numbered(everything)
    numbers = {x.sequence: _kinds([x]) for x in everything.of(c)}
    for event in mine.events:
        expect_equal(
            numbers.get(event.sequence),
            _kinds([event]),
            f"event #{event.sequence} the same for a filtered and an unfiltered subscriber",
        )
    for e in execs:
        types = [x.event_type for x in mine.events if x.exec_id == e]
        expect_equal(types, ["registered", "started", "exited"], f"event order of exec {e}")


@case(
    "8.3",
    "filters",
    "container_id filters to that container's events, exec_id as well to that exec's",
)
async def filters(ctx: CaseContext) -> None:
    c1, c2 = ctx.container_id(), ctx.container_id()
    e1, e2 = ctx.exec_id(), ctx.exec_id()
    by_container = await ctx.subscribe(c1, label="container")
    by_exec = await ctx.subscribe(c1, e1, label="exec")
    await gather_all(
        ctx.run(c1, e1, ["true"]), ctx.run(c1, e2, ["true"]), ctx.run(c2, e1, ["true"])
    )
    await by_container.until_event(c1, e2, "exited")
    await by_container.until_event(c1, e1, "exited")
    await by_exec.until_event(c1, e1, "exited")
    expect(
        all(x.container_id == c1 for x in by_container.events),
        f"only events of {c1}",
        by_container.describe(),
    )
    expect(
        all(x.container_id == c1 and x.exec_id == e1 for x in by_exec.events),
        f"only events of {c1}/{e1}",
        by_exec.describe(),
    )
    expect_equal(
        [x.event_type for x in by_exec.events],
        ["registered", "started", "exited"],
        "events of one exec",
    )


@case(
    "8.3",
    "exec-without-container",
    "a subscription with exec_id but no container_id fails with INVALID_ARGUMENT",
    row="ContainerLifecycle: `exec_id` without `container_id`, malformed ID",
    status="INVALID_ARGUMENT",
)
async def exec_without_container(ctx: CaseContext) -> None:
    code = await _lifecycle_status(ctx, wire.ContainerLifecycleRequest(exec_id="x"))
    expect_equal(code, "INVALID_ARGUMENT", "status of a subscription with only exec_id")


@case(
    "8.3",
    "malformed-id",
    "a subscription with a malformed container_id or exec_id fails with INVALID_ARGUMENT",
    row="ContainerLifecycle: `exec_id` without `container_id`, malformed ID",
    status="INVALID_ARGUMENT",
)
async def lifecycle_malformed(ctx: CaseContext) -> None:
    for request in (
        wire.ContainerLifecycleRequest(container_id="../up"),
        wire.ContainerLifecycleRequest(container_id="c" * 129),
        wire.ContainerLifecycleRequest(container_id=ctx.container_id(), exec_id="-dash"),
    ):
        code = await _lifecycle_status(ctx, request)
        expect_equal(code, "INVALID_ARGUMENT", f"status of a subscription {request!r}")


@case(
    "8.4",
    "headers-then-live-events",
    "headers carry execstream-last-sequence L; without replay the next event is L + 1",
)
async def headers_then_live(ctx: CaseContext) -> None:
    sub = await ctx.subscribe(label="unfiltered")
    last = sub.last_sequence
    c = ctx.container_id()
    expect_flow(await ctx.run(c, ctx.exec_id(), ["true"]))
    await sub.until_event(c, "", "created")
    first = sub.events[0]
    expect_equal(
        first.sequence,
        last + 1 + first.gap_before,
        f"sequence of the first event after headers with last-sequence {last}",
    )
    expect(not any(x.is_replay for x in sub.events), "no is_replay event", sub.describe())
    expect_numbered(sub)


@case(
    "8.4",
    "replay-from-sequence",
    "replay_from_sequence S replays the retained events from S (is_replay), then live ones",
)
async def lifecycle_replay(ctx: CaseContext) -> None:
    c = ctx.container_id()
    e1, e2 = ctx.exec_id(), ctx.exec_id()
    watcher = await ctx.subscribe(c, label="watcher")
    expect_flow(await ctx.run(c, e1, ["true"]))
    registered = await watcher.until_event(c, e1, "registered")
    await watcher.until_event(c, e1, "exited")
    history = await ctx.subscribe(c, replay_from=registered.sequence, label="replaying")
    last = history.last_sequence
    expect_flow(await ctx.run(c, e2, ["true"]))
    await watcher.until_event(c, e2, "exited")
    await history.until_event(c, e2, "exited")
    want = [x for x in watcher.events if x.sequence >= registered.sequence]
    expect_equal(
        [(x.sequence, x.event_type) for x in history.events],
        [(x.sequence, x.event_type) for x in want],
        f"events replayed from #{registered.sequence}, then live",
    )
    for event in history.events:
        expect(
            event.is_replay == (event.sequence <= last),
            f"is_replay exactly for events up to the headers' last-sequence {last}",
            f"#{event.sequence} is_replay {event.is_replay}",
        )
    from_zero = await ctx.subscribe(c, replay_from=0, label="from-zero")
    end = (await from_zero.until_event(c, e2, "exited")).sequence
    expect_equal(
        [x.sequence for x in from_zero.events if x.sequence <= end],
        [x.sequence for x in watcher.events if x.sequence <= end],
        "events replayed from 0 (the oldest retained)",
    )


def _has_events(sub: Subscription, count: int) -> Callable[[], bool]:
    return lambda: len(sub.events) >= count


@case(
    "8.4",
    "subscribe-during-activity",
    "subscribers that join while events happen see each event exactly once",
    timeout=120,
)
async def subscribe_during_activity(ctx: CaseContext) -> None:
    c = ctx.container_id()
    reference = await ctx.subscribe(c, label="reference")
    execs = [f"x{n:02d}" for n in range(16)]

    async def activity() -> None:
        for e in execs:
            await ctx.run(c, e, ["true"])

    task = asyncio.create_task(activity())
    live: list[Subscription] = []
    replaying: list[tuple[Subscription, int]] = []
    for n in range(1, 5):
        await reference.until(_has_events(reference, 8 * n), f"{8 * n} events")
        live.append(await ctx.subscribe(c, label=f"live{n}"))
        start = reference.events[4 * n].sequence
        replaying.append((await ctx.subscribe(c, replay_from=start, label=f"replay{n}"), start))
    await task
    final = await reference.until_event(c, execs[-1], "exited")
    for sub in live:
        await sub.until_event(c, execs[-1], "exited")
        cut = sub.last_sequence
        expect_equal(
            [x.sequence for x in sub.events],
            [x.sequence for x in reference.events if x.sequence > cut],
            f"{sub.label}: the events after its last-sequence {cut}",
        )
    for sub, start in replaying:
        await sub.until_event(c, execs[-1], "exited")
        expect_equal(
            [x.sequence for x in sub.events],
            [x.sequence for x in reference.events if x.sequence >= start],
            f"{sub.label}: the events from #{start}, each once",
        )
    expect(final.sequence > 0, "a final event", final)


@case(
    "8.4",
    "replay-past-next-event",
    "replay_from_sequence past the next event fails with OUT_OF_RANGE",
    row="ContainerLifecycle: `replay_from_sequence` past the next event",
    status="OUT_OF_RANGE",
)
async def lifecycle_replay_past(ctx: CaseContext) -> None:
    probe = await ctx.subscribe(label="probe")
    start = probe.last_sequence + 10**9
    code = await _lifecycle_status(ctx, wire.ContainerLifecycleRequest(replay_from_sequence=start))
    expect_equal(code, "OUT_OF_RANGE", f"status of a subscription replaying from {start}")


@case(
    "8.5",
    "stalled-subscriber-blocks-nothing",
    "a subscriber that does not read blocks no exec and no other subscriber; no silent loss",
    timeout=120,
)
async def stalled_subscriber(ctx: CaseContext) -> None:
    c = ctx.container_id()
    stalled = await ctx.subscribe(label="stalled", read=False)
    reader = await ctx.subscribe(c, label="reader")
    # Concurrent execs of one container: within the target's limit, however fast it starts them.
    execs = [ctx.exec_id() for _ in range(min(20, ctx.target.max_execs_per_container or 20))]
    # Output too, so that events and sessions share the target's time.
    results = await gather_all(*(ctx.run(c, e, w.sh("seq 1 2000")) for e in execs))
    for client in results:
        expect_flow(client)
    for e in execs:
        await reader.until_event(c, e, "exited", within=30)
    stalled.read_in_background()

    def all_accounted() -> bool:
        if any(x.gap_before for x in stalled.events):
            return True
        seen = {(x.exec_id, x.event_type) for x in stalled.of(c)}
        return all((e, "exited") in seen for e in execs)

    await stalled.until(all_accounted, "every exited event, or a gap_before reporting a loss")
    expect_numbered(stalled)
