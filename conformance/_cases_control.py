"""Cases of PROTOCOL 9 and 10: status (states, times, exit codes, resource usage) and control
(pause, resume, signal) acting on real processes.

Control is checked by its effect, not by its answer: a paused counter stops counting, a
signalled process dies with 128 + N or runs its trap.  Waiting for the absence of progress is
the one place the suite sleeps on purpose.
"""

from __future__ import annotations

import asyncio
import re
import time

import grpc

from execstream import wire

from . import _workloads as w
from ._case import case, expect, expect_equal
from ._checks import expect_code, expect_flow, expect_timestamps
from ._context import CaseContext
from ._recording import Outcome
from ._session_client import SessionClient

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

COUNTER = w.sh("i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done")


def expect_done(outcome: Outcome, what: str) -> None:
    """PROTOCOL 10: success = true with status OK when it did what was asked."""
    expect_code(outcome, OK, what)
    response: wire.ContainerControlResponse = outcome.response
    expect(response.success, f"{what} answers success = true", str(outcome))


async def _running(ctx: CaseContext, c: str, e: str, command: list[str]) -> SessionClient:
    client = await ctx.create(c, e, command, half_close=True)
    await client.until_ready()
    return client


# -- 9 Status ------------------------------------------------------------------------------


@case(
    "9.1",
    "exec-and-container-status",
    "status answers at once, echoes exec_id, and lists a container's execs in order",
)
async def exec_and_container_status(ctx: CaseContext) -> None:
    c = ctx.container_id()
    first, second = ctx.exec_id("a"), ctx.exec_id("b")
    await _running(ctx, c, first, ["sleep", "30"])
    expect_flow(await ctx.run(c, second, ["true"]))
    began = time.monotonic()
    exec_status = await ctx.status(c, first, usage=True)
    took = time.monotonic() - began
    expect(took < 5, "an answer at once (not after the exec)", f"{took:.1f} s")
    expect_equal(
        (exec_status.container_id, exec_status.exec_id, exec_status.status),
        (c, first, "running"),
        "(container_id, exec_id, status) of a running exec",
    )
    container = await ctx.status(c)
    expect_equal(container.container_id, c, "container_id")
    expect_equal(container.exec_ids, [first, second], "exec_ids in registration order")
    expect_equal((await ctx.status(c, second)).status, "exited", "status of the exited exec")


@case(
    "9.1",
    "unknown-not-found",
    "status of an unknown container or exec fails with NOT_FOUND",
    row="ContainerStatus: unknown container or exec",
    status="NOT_FOUND",
)
async def status_unknown(ctx: CaseContext) -> None:
    c = ctx.container_id()
    expect_code(await ctx.status_outcome(c), NOT_FOUND, "status of an unknown container")
    expect_flow(await ctx.run(c, ctx.exec_id(), ["true"]))
    expect_code(await ctx.status_outcome(c, "no-such-exec"), NOT_FOUND, "status of an unknown exec")


@case(
    "9.1",
    "empty-or-malformed-container-id",
    "status with an empty or malformed container_id fails with INVALID_ARGUMENT",
    row="ContainerStatus: empty or malformed `container_id`",
    status="INVALID_ARGUMENT",
)
async def status_malformed(ctx: CaseContext) -> None:
    for bad in ("", "../etc", "-x", "x" * 129, "sp ace"):
        expect_code(await ctx.status_outcome(bad), INVALID_ARGUMENT, f"status of container {bad!r}")


@case(
    "9.2",
    "states",
    "exec and container states follow running, paused, exited as the processes do",
)
async def states(ctx: CaseContext) -> None:
    c = ctx.container_id()
    a, b = ctx.exec_id("a"), ctx.exec_id("b")
    expect_flow(await ctx.run(c, a, ["true"]))
    expect_equal((await ctx.status(c)).status, "exited", "container state, every exec exited")
    runner = await ctx.create(c, b, w.sh("read x; exit 0"))
    await runner.until_ready()
    expect_equal((await ctx.status(c, b)).status, "running", "state of a running exec")
    expect_equal((await ctx.status(c)).status, "running", "container state, one exec running")
    expect_done(await ctx.pause(c), "ContainerPause")
    expect_equal((await ctx.status(c, b)).status, "paused", "exec state in a paused container")
    expect_equal((await ctx.status(c)).status, "paused", "state of a paused container")
    expect_equal((await ctx.status(c, a)).status, "exited", "an exited exec stays exited")
    expect_done(await ctx.resume(c), "ContainerResume")
    expect_equal((await ctx.status(c, b)).status, "running", "exec state after resume")
    await runner.stdin(b"\n")
    await runner.completed()
    await ctx.wait_status(c, b, lambda s: s.status == "exited", "exec state 'exited'")
    expect_equal((await ctx.status(c)).status, "exited", "container state, every exec exited")


@case(
    "9.3",
    "times-and-exit-code",
    "exit_code and finished_at are set exactly when exited; times are ns since the epoch",
)
async def times_and_exit_code(ctx: CaseContext) -> None:
    c = ctx.container_id()
    a, b = ctx.exec_id("a"), ctx.exec_id("b")
    before = time.time_ns()
    first = await ctx.create(c, a, w.sh("read x; exit 4"))
    await first.until_ready()
    running = await ctx.status(c, a)
    expect(
        running.exit_code is None and running.finished_at is None,
        "no exit_code and no finished_at while running",
        running,
    )
    expect_timestamps([running.started_at], before, time.time_ns(), "started_at")
    await first.stdin(b"\n")
    await first.completed()
    second = await ctx.create(c, b, w.sh("read x; exit 6"))
    await second.until_ready()
    container = await ctx.status(c)
    expect(
        container.status == "running" and container.exit_code is None,
        "a container with a running exec has no exit_code",
        container,
    )
    await second.stdin(b"\n")
    await second.completed()
    after = time.time_ns()
    done = await ctx.wait_status(c, a, lambda s: s.status == "exited", "exec state 'exited'")
    expect_equal(done.exit_code, 4, "exit_code of the exited exec")
    expect(done.finished_at is not None, "finished_at once exited", done)
    assert done.finished_at is not None
    expect_timestamps([done.started_at, done.finished_at], before, after, "exec times")
    expect(done.started_at <= done.finished_at, "started_at <= finished_at", done)
    last = await ctx.wait_status(c, "", lambda s: s.status == "exited", "container 'exited'")
    later = await ctx.status(c, b)
    expect_equal(
        (last.exit_code, last.finished_at),
        (6, later.finished_at),
        "a container's exit_code and finished_at: those of its exec that exited last",
    )
    expect_equal(last.started_at, done.started_at, "a container's started_at: its first exec's")


@case(
    "9.4",
    "resource-usage",
    "resource_usage is set only when asked: CPU as percent of one CPU, resident memory",
)
async def resource_usage(ctx: CaseContext) -> None:
    c = ctx.container_id()
    busy, idle = ctx.exec_id("busy"), ctx.exec_id("idle")
    await _running(ctx, c, busy, w.sh("while :; do :; done"))
    await _running(ctx, c, idle, ["sleep", "30"])
    plain = await ctx.status(c, busy)
    expect(plain.resource_usage is None, "no resource_usage unless asked", plain)
    samples: list[wire.ResourceUsage] = []
    for _ in range(4):
        await asyncio.sleep(0.4)
        response = await ctx.status(c, busy, usage=True)
        expect(response.resource_usage is not None, "resource_usage when asked", response)
        assert response.resource_usage is not None
        samples.append(response.resource_usage)
    cpu = [s.cpu_percent for s in samples]
    expect(
        max(cpu) > 10 and all(0 <= x <= 250 for x in cpu),
        "a busy single-threaded loop uses 10-100% of one CPU (a percentage, not a fraction)",
        f"cpu_percent samples {cpu}",
    )
    memory = samples[-1].memory_bytes
    expect(
        64 * 1024 <= memory <= 64 * 2**30,
        "memory_bytes: the resident memory of a shell (between 64 KiB and 64 GiB)",
        memory,
    )
    limit = samples[-1].memory_limit
    expect(limit == 0 or limit >= memory, "memory_limit 0 (none) or above the usage", limit)
    await ctx.status(c, idle, usage=True)
    await asyncio.sleep(0.4)
    quiet = (await ctx.status(c, idle, usage=True)).resource_usage
    expect(quiet is not None and quiet.cpu_percent < 50, "an idle sleep uses little CPU", quiet)
    whole = await ctx.status(c, usage=True)
    expect(whole.resource_usage is not None, "resource_usage of the container", whole)
    # CPU of processes that ended within the window counts; memory is the live ones' (0).
    brief = ctx.exec_id("brief")
    burner = await ctx.create(
        c, brief, w.sh("read x; i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
    )
    await burner.until_ready()
    await ctx.status(c, brief, usage=True)
    await burner.stdin(b"go\n")
    await burner.completed()
    after = (await ctx.status(c, brief, usage=True)).resource_usage
    expect(
        after is not None and after.cpu_percent > 5 and after.memory_bytes == 0,
        "for an exec that burned CPU and ended within the window: cpu_percent counting it "
        "(> 5) and memory_bytes 0 (no live process)",
        after,
    )


# -- 10 Control ----------------------------------------------------------------------------


def _last_number(counter: SessionClient) -> int:
    lines = counter.stdout.split(b"\n")
    complete = [line.strip() for line in lines[:-1] if line.strip().isdigit()]
    return int(complete[-1]) if complete else 0


async def _pause_and_expect_no_progress(
    ctx: CaseContext, container_id: str, counter: SessionClient
) -> int:
    """Pause the container and expect no progress while paused; the counter's last number.

    The window is measured on the running counter first: the time it takes to write 20
    lines on this machine now.  A window of fixed length would let a loaded machine, where
    the counter is starved, pass a server whose pause stops nothing.  From that long after
    the pause (for what was written before the stop to arrive), and for 3 such times but at
    least 1 s, at most 5 more lines may come, where running the counter writes about 60."""
    loop = asyncio.get_running_loop()
    first, began = _last_number(counter), loop.time()
    await counter.until(lambda: _last_number(counter) >= first + 20, "20 lines of the counter")
    twenty = loop.time() - began
    expect_done(await ctx.pause(container_id), "ContainerPause")
    settle, window = max(0.3, twenty), max(1.0, 3 * twenty)
    await asyncio.sleep(settle)
    paused_at = _last_number(counter)
    await asyncio.sleep(window)
    later = _last_number(counter)
    expect(
        later - paused_at <= 5,
        f"no progress while paused: the counter, {settle:.1f} s after the pause, moves by at "
        f"most 5 (lines already written) in the next {window:.1f} s; running, it wrote 20 "
        f"lines in {twenty:.2f} s",
        f"from {paused_at} to {later}",
    )
    return later


#: A counter in a background job of its own process group (job control on a terminal).
DETACHED_COUNTER = w.sh("set -m; (i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done) & wait")


@case(
    "10.1",
    "pause-stops-progress",
    "pause stops every process of the container until resume",
)
async def pause_stops_progress(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    counter = await _running(ctx, c, e, COUNTER)
    await counter.until_chunks(5)
    later = await _pause_and_expect_no_progress(ctx, c, counter)
    expect_done(await ctx.resume(c), "ContainerResume")
    await counter.until(lambda: _last_number(counter) > later + 20, "progress after resume")
    expect_done(await ctx.signal(c, "KILL"), "ContainerSignal KILL")
    await counter.completed()
    expect_equal(counter.exit_code, 137, "exit code after KILL")


@case(
    "10.1",
    "pause-reaches-other-process-groups",
    "pause also stops processes that left the exec's process group",
)
async def pause_other_groups(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    counter = await ctx.create(c, e, DETACHED_COUNTER, half_close=True, tty=True)
    await counter.until(lambda: _last_number(counter) > 5, "the counter running")
    later = await _pause_and_expect_no_progress(ctx, c, counter)
    expect_done(await ctx.resume(c), "ContainerResume")
    await counter.until(lambda: _last_number(counter) > later + 20, "progress after resume")
    expect_done(await ctx.signal(c, "KILL"), "ContainerSignal KILL")
    await counter.completed()


@case(
    "10.1",
    "pause-paused",
    "pausing a paused container fails with FAILED_PRECONDITION",
    row="Pause: already paused, or nothing running",
    status="FAILED_PRECONDITION",
)
async def pause_paused(ctx: CaseContext) -> None:
    c = ctx.container_id()
    await _running(ctx, c, ctx.exec_id(), ["sleep", "30"])
    expect_done(await ctx.pause(c), "ContainerPause")
    expect_code(await ctx.pause(c), FAILED_PRECONDITION, "ContainerPause of a paused container")
    expect_done(await ctx.resume(c), "ContainerResume")


@case(
    "10.1",
    "pause-nothing-running",
    "pausing a container with no running exec fails with FAILED_PRECONDITION",
    row="Pause: already paused, or nothing running",
    status="FAILED_PRECONDITION",
)
async def pause_nothing_running(ctx: CaseContext) -> None:
    c = ctx.container_id()
    expect_flow(await ctx.run(c, ctx.exec_id(), ["true"]))
    expect_code(await ctx.pause(c), FAILED_PRECONDITION, "ContainerPause with nothing running")


ROW_CONTROL_UNKNOWN = "Pause, Resume, Signal: unknown container (or exec, for Signal)"


@case(
    "10.1",
    "pause-unknown",
    "pausing an unknown container fails with NOT_FOUND",
    row=ROW_CONTROL_UNKNOWN,
    status="NOT_FOUND",
)
async def pause_unknown(ctx: CaseContext) -> None:
    expect_code(await ctx.pause(ctx.container_id()), NOT_FOUND, "ContainerPause, unknown")


@case(
    "10.2",
    "resume-not-paused",
    "resuming a container that is not paused fails with FAILED_PRECONDITION",
    row="Resume: not paused",
    status="FAILED_PRECONDITION",
)
async def resume_not_paused(ctx: CaseContext) -> None:
    c = ctx.container_id()
    await _running(ctx, c, ctx.exec_id(), ["sleep", "30"])
    expect_code(await ctx.resume(c), FAILED_PRECONDITION, "ContainerResume, not paused")


@case(
    "10.2",
    "resume-unknown",
    "resuming an unknown container fails with NOT_FOUND",
    row=ROW_CONTROL_UNKNOWN,
    status="NOT_FOUND",
)
async def resume_unknown(ctx: CaseContext) -> None:
    expect_code(await ctx.resume(ctx.container_id()), NOT_FOUND, "ContainerResume, unknown")


@case("10.3", "kill", "signal KILL ends the exec with exit code 137")
async def kill(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await _running(ctx, c, e, w.sh("echo up; sleep 30"))
    await client.until_output(b"up\n")
    expect_done(await ctx.signal(c, "SIGKILL"), "ContainerSignal SIGKILL")
    await client.completed()
    expect_equal(client.exit_code, 137, "exit code")


@case("10.3", "term-runs-trap", "signal TERM reaches the process, whose trap sets the exit code")
async def term_runs_trap(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    script = 'trap "echo trapped; exit 7" TERM; echo up; while :; do sleep 0.05; done'
    client = await _running(ctx, c, e, w.sh(script))
    await client.until_output(b"up\n")
    expect_done(await ctx.signal(c, "term"), "ContainerSignal 'term'")
    await client.completed()
    expect_equal(client.exit_code, 7, "exit code set by the TERM trap")
    expect(b"trapped" in client.stdout, "the trap's output", client.text())


@case(
    "10.4",
    "default-dispositions",
    "an exec that does not handle HUP is ended by it (exit code 129)",
)
async def default_dispositions(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await _running(ctx, c, e, w.sh("echo up; exec sleep 30"))
    await client.until_output(b"up\n")
    expect_done(await ctx.signal(c, "HUP", e), "ContainerSignal HUP")
    await client.completed()
    expect_equal(client.exit_code, 129, "exit code after HUP")


@case(
    "10.3",
    "signal-names",
    "every listed signal name is accepted with or without SIG, in any case",
)
async def signal_names(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    ignored = "HUP INT QUIT USR1 USR2 TERM ALRM PIPE"
    client = await _running(
        ctx, c, e, w.sh(f"trap '' {ignored}; echo up; while :; do sleep 0.05; done")
    )
    await client.until_output(b"up\n")
    names = ["hup", "SIGINT", "Quit", "sigusr1", "USR2", "SigTerm", "winch", "ALRM", "pipe"]
    names += ["sigchld", "STOP", "cont"]
    for name in names:
        expect_done(await ctx.signal(c, name, e), f"ContainerSignal {name!r}")
    expect(client.exit_code is None, "the exec survives signals it ignores", client.describe())
    expect_done(await ctx.signal(c, "Kill", e), "ContainerSignal 'Kill'")
    await client.completed()
    expect_equal(client.exit_code, 137, "exit code after KILL")


@case(
    "10.3",
    "exec-scoped-signal",
    "a signal with exec_id reaches only that exec's processes",
)
async def exec_scoped(ctx: CaseContext) -> None:
    c = ctx.container_id()
    a, b = ctx.exec_id("a"), ctx.exec_id("b")
    first = await _running(ctx, c, a, w.sh("echo up; sleep 30"))
    second = await _running(ctx, c, b, w.sh("echo up; sleep 30"))
    await first.until_output(b"up\n")
    await second.until_output(b"up\n")
    expect_done(await ctx.signal(c, "KILL", a), f"ContainerSignal KILL to {a}")
    await first.completed()
    expect_equal(first.exit_code, 137, f"exit code of {a}")
    expect_equal((await ctx.status(c, b)).status, "running", f"state of {b}")
    expect(second.exit_code is None, f"{b} still running", second.describe())
    expect_done(await ctx.signal(c, "KILL", b), f"ContainerSignal KILL to {b}")
    await second.completed()


@case(
    "10.3",
    "signal-reaches-other-process-groups",
    "a container-wide signal also reaches processes that left the exec's process group",
)
async def signal_other_groups(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    script = 'set -m; sleep 60 & echo "bg=$!."; wait'
    client = await ctx.create(c, e, w.sh(script), half_close=True, tty=True)
    await client.until_output(b".")
    found = re.search(rb"bg=(\d+)\.", client.stdout)
    expect(found is not None, "the background job's pid", client.text())
    assert found is not None
    pid = found.group(1).decode()
    expect_done(await ctx.signal(c, "KILL"), "ContainerSignal KILL")
    await client.completed()
    expect_equal(client.exit_code, 137, "exit code of the exec's main process")
    # The detached sleep must be gone too; ask from a new exec of the same container, a few
    # times, since a killed orphan may take a moment to be reaped.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        probe = await ctx.run(
            c, ctx.exec_id("probe"), w.sh(f"kill -0 {pid} 2>/dev/null && echo alive || echo gone")
        )
        expect_flow(probe)
        if probe.stdout == b"gone\n" or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    expect_equal(probe.stdout, b"gone\n", f"pid {pid} (the detached sleep) after KILL")


@case(
    "10.3",
    "unknown-signal",
    "an unknown signal name fails with INVALID_ARGUMENT",
    row="Signal: unknown signal name",
    status="INVALID_ARGUMENT",
)
async def unknown_signal(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    client = await _running(ctx, c, e, w.sh("echo up; sleep 30"))
    await client.until_output(b"up\n")
    for name in ("NOSUCHSIGNAL", "SIG", "", "9x"):
        expect_code(await ctx.signal(c, name), INVALID_ARGUMENT, f"ContainerSignal {name!r}")
    expect(client.exit_code is None, "the exec unaffected", client.describe())


@case(
    "10.3",
    "signal-unknown",
    "signalling an unknown container or exec fails with NOT_FOUND",
    row=ROW_CONTROL_UNKNOWN,
    status="NOT_FOUND",
)
async def signal_unknown(ctx: CaseContext) -> None:
    c = ctx.container_id()
    expect_code(await ctx.signal(c, "TERM"), NOT_FOUND, "ContainerSignal, unknown container")
    await _running(ctx, c, ctx.exec_id(), ["sleep", "30"])
    expect_code(
        await ctx.signal(c, "TERM", "no-such-exec"), NOT_FOUND, "ContainerSignal, unknown exec"
    )


@case(
    "10.3",
    "no-live-process",
    "signalling a container or exec with no live process fails with FAILED_PRECONDITION",
    row="Signal: no live process",
    status="FAILED_PRECONDITION",
)
async def no_live_process(ctx: CaseContext) -> None:
    c, e = ctx.container_id(), ctx.exec_id()
    expect_flow(await ctx.run(c, e, ["true"]))
    expect_code(await ctx.signal(c, "TERM"), FAILED_PRECONDITION, "ContainerSignal, nothing alive")
    expect_code(
        await ctx.signal(c, "TERM", e), FAILED_PRECONDITION, "ContainerSignal to an exited exec"
    )
