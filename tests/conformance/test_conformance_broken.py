"""The suite is itself tested: each deliberately broken server breaks one clause, and the
suite must fail it with the case(s) of that clause, while cases of other clauses pass.

Each broken server is checked with the cases of its clause's neighbourhood plus a fixed
control sample of cases from elsewhere (running the whole suite against each of them would
not fit the CI budget).  ``expect_fail`` must all be FAIL — not ERROR, which would mean the
harness rather than the server was blamed — and ``expect_pass`` plus the control sample must
all PASS.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conformance_harness import (
    MAX_EXECS_PER_CONTAINER,
    AbortWith,
    MangleProxy,
    SessionState,
    proxied,
    reference,
    target_for,
)

from execstream import wire
from execstream.conformance import Target, Verdict, run_suite, select
from execstream.server import Limits

CONTROL = [
    "status/9.1/unknown-not-found",
    "control/10.3/unknown-signal",
    "common/2.1/control-bad-container-id",
    "lifecycle/8.3/exec-without-container",
    "session/3.2/attach-unknown",
    "session/3.1/second-start",
    "session/5.2/exit-status",
]


# -- the broken servers --------------------------------------------------------------------


class DropsAChunk(MangleProxy):
    """4.2: the chunk with sequence 2 of every exec reaches no client (not renumbered)."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        chunk = response.output_chunk
        return () if chunk is not None and chunk.sequence == 2 else (response,)


class DuplicatesAtTheSwitch(MangleProxy):
    """6.3: right after the ready that ends replay, the last replayed chunk is sent again."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        if response.output_chunk is not None:
            state.extra["last"] = response.output_chunk
        if response.ready is not None and state.readies == 2 and "last" in state.extra:
            last: wire.OutputChunk = state.extra["last"]
            again = wire.OutputChunk(
                sequence=last.sequence,
                timestamp=last.timestamp,
                stdout=last.stdout,
                stderr=last.stderr,
            )
            return (response, wire.SessionResponse(output_chunk=again))
        return (response,)


class ExitBeforeLastOutput(MangleProxy):
    """5.1: output that arrives shortly before the exit is sent after it (each chunk is held
    0.2 s; an exit arriving meanwhile overtakes it)."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        held: wire.SessionResponse | None = state.extra.pop("held", None)
        if response.output_chunk is not None:
            state.extra["held"] = response
            return (held,) if held is not None else ()
        if response.exit is not None and held is not None:
            return (response, held)
        return (held, response) if held is not None else (response,)

    def idle_after(self, state: SessionState) -> float | None:
        return 0.2 if "held" in state.extra else None

    def idle(self, state: SessionState) -> Iterable[wire.SessionResponse]:
        held = state.extra.pop("held", None)
        return (held,) if held is not None else ()


class ExitToOneClient(MangleProxy):
    """5.1: only the first client of an exec to reach the end is given the exit code."""

    def __init__(self, upstream: wire.ExecStub) -> None:
        super().__init__(upstream)
        self.told: set[tuple[str, str]] = set()

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        if response.exit is not None:
            if state.key in self.told:
                return ()
            self.told.add(state.key)
        return (response,)


class CompetingClients(MangleProxy):
    """4.3: a chunk delivered to one client of an exec is withheld from the others."""

    def __init__(self, upstream: wire.ExecStub) -> None:
        super().__init__(upstream)
        self.taken: dict[tuple[str, str], set[int]] = {}

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        chunk = response.output_chunk
        if chunk is not None:
            taken = self.taken.setdefault(state.key, set())
            if chunk.sequence in taken:
                return ()
            taken.add(chunk.sequence)
        return (response,)


class EndsAllOnLeave(MangleProxy):
    """3.5: when one client of an exec leaves, every other client of it is cut off."""

    def session_left(self, state: SessionState) -> None:
        for other in list(self.sessions.get(state.key, [])):
            if other is not state and other.call is not None:
                other.call.cancel()


class WrongCodeForBadFirstMessage(MangleProxy):
    """3.1: a first message that is not start ends the stream with FAILED_PRECONDITION."""

    def first_request(self, state: SessionState, request: wire.SessionRequest) -> None:
        if request.start is None:
            raise AbortWith(grpc.StatusCode.FAILED_PRECONDITION, "start must come first")


class CountsExitedExecs(MangleProxy):
    """13.3: the per-container limit counts every retained exec, exited ones included, as
    the reference server did (it refused the 129th run within the retention period)."""

    LIMIT = MAX_EXECS_PER_CONTAINER

    def __init__(self, upstream: wire.ExecStub) -> None:
        super().__init__(upstream)
        self.created: dict[str, int] = {}

    def first_request(self, state: SessionState, request: wire.SessionRequest) -> None:
        start = request.start
        if start is None or not start.command:
            return
        held = self.created.get(start.container_id, 0)
        if held >= self.LIMIT:
            raise AbortWith(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"container {start.container_id!r} holds {held} execs, the limit "
                "(max_execs_per_container)",
            )
        self.created[start.container_id] = held + 1


class MicrosecondTimestamps(MangleProxy):
    """4.5: chunk timestamps in microseconds instead of nanoseconds."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        if response.output_chunk is not None:
            response.output_chunk.timestamp //= 1000
        return (response,)


class PauseDoesNothing(MangleProxy):
    """10.1: ContainerPause answers success but stops nothing (resume plays along)."""

    def __init__(self, upstream: wire.ExecStub) -> None:
        super().__init__(upstream)
        self.paused: set[str] = set()

    async def ContainerPause(
        self, request: wire.ContainerControlRequest, context: Any
    ) -> wire.ContainerControlResponse:
        status = await self._unary(
            context,
            self.upstream.ContainerStatus(
                wire.ContainerStatusRequest(container_id=request.container_id),
                metadata=self._metadata(context),
            ),
        )
        if request.container_id in self.paused or status.status != "running":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not running")
        self.paused.add(request.container_id)
        return wire.ContainerControlResponse(success=True, message="paused")

    async def ContainerResume(
        self, request: wire.ContainerControlRequest, context: Any
    ) -> wire.ContainerControlResponse:
        if request.container_id in self.paused:
            self.paused.discard(request.container_id)
            return wire.ContainerControlResponse(success=True, message="resumed")
        return await super().ContainerResume(request, context)


class ExitCodeWhileRunning(MangleProxy):
    """9.3: status carries exit_code 0 while the exec is still running."""

    def status_response(
        self, response: wire.ContainerStatusResponse
    ) -> wire.ContainerStatusResponse:
        if response.status in ("running", "paused"):
            response.exit_code = 0
        return response


class UnmarkedReplay(MangleProxy):
    """6.2: replayed chunks are not marked is_replay."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        if response.output_chunk is not None:
            response.output_chunk.is_replay = False
        return (response,)


class SilentGaps(MangleProxy):
    """6.4: chunks evicted before a client read them are skipped without gap_before."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        if response.output_chunk is not None:
            response.output_chunk.gap_before = 0
        return (response,)


class LosesFirstLiveEvent(MangleProxy):
    """8.4: a new subscriber misses the first event that happens after it subscribed."""

    def lifecycle_events(
        self, state: dict[str, Any], event: wire.ContainerLifecycleEvent
    ) -> Iterable[wire.ContainerLifecycleEvent]:
        if not event.is_replay and not state.get("dropped"):
            state["dropped"] = True
            return ()
        return (event,)


# -- which clause each one breaks, and which cases must say so ----------------------------


@dataclass(frozen=True)
class Broken:
    name: str
    open: Callable[[], contextlib.AbstractAsyncContextManager[Target]]
    cases: tuple[str, ...]
    expect_fail: tuple[str, ...]
    expect_pass: tuple[str, ...] = ()


def _proxy(kind: type[MangleProxy]) -> Callable[[], contextlib.AbstractAsyncContextManager[Target]]:
    return lambda: proxied(kind)


def _misconfigured(**settings: Any) -> Callable[[], contextlib.AbstractAsyncContextManager[Target]]:
    return lambda: reference(**settings)


@contextlib.asynccontextmanager
async def _open_without_token() -> AsyncIterator[Target]:
    async with reference(token=None) as target:
        yield target_for(target.address)  # the suite is told there is a token


BROKEN = [
    Broken(
        "drops-a-chunk",
        _proxy(DropsAChunk),
        ("session/4.2", "session/4.3/clients-attached-at-different-times"),
        ("session/4.2/one-counter-from-1", "session/4.3/clients-attached-at-different-times"),
    ),
    Broken(
        "duplicates-a-chunk-at-the-replay-switch",
        _proxy(DuplicatesAtTheSwitch),
        ("session/6.3", "session/6.1/replay-from-zero-is-from-one"),
        ("session/6.3/ready-marks-end-of-replay", "session/6.3/switch-under-load"),
        ("session/6.3/nothing-to-replay",),
    ),
    Broken(
        "sends-exit-before-the-last-output",
        _proxy(ExitBeforeLastOutput),
        ("session/5.1",),
        ("session/5.1/exit-last-then-ok", "session/5.1/output-right-before-exit"),
    ),
    Broken(
        "gives-the-exit-code-to-one-client",
        _proxy(ExitToOneClient),
        ("session/5.1/every-client-gets-exit", "session/3.6"),
        ("session/5.1/every-client-gets-exit",),
        ("session/3.6/half-close-receives-everything",),
    ),
    Broken(
        "clients-compete-for-chunks",
        _proxy(CompetingClients),
        ("session/4.3/clients-attached-at-different-times", "session/4.2"),
        ("session/4.3/clients-attached-at-different-times",),
        ("session/4.2/one-counter-from-1",),
    ),
    Broken(
        "forgets-exited-execs-at-once",
        _misconfigured(retention=0, cleanup_interval=0.05),
        ("retention/11.1", "session/5.1/late-attach-after-exit"),
        ("retention/11.1/attachable-during-retention",),
    ),
    Broken(
        "never-sweeps",
        _misconfigured(cleanup_interval=3600),
        ("retention",),
        ("retention/11.2/removed-after-retention-and-sweep",),
        ("retention/11.1/attachable-during-retention",),
    ),
    Broken(
        "ends-all-sessions-when-one-client-leaves",
        _proxy(EndsAllOnLeave),
        ("session/3.5", "session/3.6"),
        (
            "session/3.5/cancelled-client",
            "session/3.5/closed-channel",
            "session/3.5/deadline-exceeded",
        ),
        ("session/3.6/half-close-receives-everything",),
    ),
    Broken(
        "wrong-status-code-for-a-bad-first-message",
        _proxy(WrongCodeForBadFirstMessage),
        ("session/3.1",),
        (
            "session/3.1/first-message-stdin",
            "session/3.1/first-message-resize",
            "session/3.1/first-message-empty",
        ),
        ("session/3.1/half-close-before-start",),
    ),
    Broken(
        "ignores-the-token",
        _open_without_token,
        ("auth",),
        ("auth/12.1/missing-token", "auth/12.1/wrong-token", "auth/12.1/refused-before-effect"),
        ("auth/12.1/basic-with-any-user",),
    ),
    Broken(
        "timestamps-in-microseconds",
        _proxy(MicrosecondTimestamps),
        ("session/4.5", "session/4.2"),
        ("session/4.5/chunk-timestamps",),
        ("session/4.2/one-counter-from-1",),
    ),
    Broken(
        "pause-stops-nothing",
        _proxy(PauseDoesNothing),
        ("control/10.1", "control/10.2"),
        ("control/10.1/pause-stops-progress",),
        ("control/10.1/pause-unknown", "control/10.2/resume-unknown"),
    ),
    Broken(
        "exit-code-while-running",
        _proxy(ExitCodeWhileRunning),
        ("status/9.3", "status/9.2", "status/9.1"),
        ("status/9.3/times-and-exit-code",),
        ("status/9.2/states", "status/9.1/exec-and-container-status"),
    ),
    Broken(
        "replay-not-marked",
        _proxy(UnmarkedReplay),
        ("session/6.2", "session/6.3/ready-marks-end-of-replay"),
        ("session/6.2/replayed-chunks-marked",),
        ("session/6.3/ready-marks-end-of-replay",),
    ),
    Broken(
        "silent-gaps",
        _proxy(SilentGaps),
        ("session/6.4/evicted-output-gap", "session/6.1"),
        ("session/6.4/evicted-output-gap",),
        ("session/6.1/replay-from-sequence",),
    ),
    Broken(
        # What the reference server did before PROTOCOL 6.7: output kept in a 1 MiB window, so a
        # slow or late client gets (honest) gaps where it was promised every byte.
        "keeps-only-a-small-window-of-output",
        _misconfigured(limits=Limits(max_output_bytes=1024 * 1024, memory_cache_bytes=65536)),
        ("session/6.7", "session/6.1/replay-from-sequence"),
        ("session/6.7/stalled-client-loses-nothing", "session/6.7/replay-after-exit-complete"),
        ("session/6.1/replay-from-sequence",),
    ),
    Broken(
        "exited-execs-count-against-the-limit",
        _proxy(CountsExitedExecs),
        ("limits/13.3", "limits/13.1"),
        ("limits/13.3/exited-execs-do-not-count",),
        ("limits/13.1/clients-per-exec",),
    ),
    Broken(
        "new-subscriber-loses-the-first-live-event",
        _proxy(LosesFirstLiveEvent),
        ("lifecycle/8.4", "lifecycle/8.3"),
        ("lifecycle/8.4/headers-then-live-events", "lifecycle/8.4/subscribe-during-activity"),
        ("lifecycle/8.3/malformed-id", "lifecycle/8.4/replay-past-next-event"),
    ),
]


def test_at_least_ten_broken_servers_each_named_for_a_clause() -> None:
    assert len(BROKEN) >= 10
    assert len({b.name for b in BROKEN}) == len(BROKEN)
    for broken in BROKEN:
        clauses = {case_id.split("/")[1] for case_id in broken.expect_fail}
        assert len(clauses) == 1 or broken.name == "drops-a-chunk", (
            f"{broken.name} should break one clause, its cases name {clauses}"
        )


@pytest.mark.parametrize("broken", BROKEN, ids=lambda b: b.name)
async def test_the_suite_fails_a_broken_server_with_the_broken_clause(broken: Broken) -> None:
    cases = select(include=[*broken.cases, *CONTROL])
    chosen = {c.id for c in cases}
    assert set(broken.expect_fail) <= chosen and set(broken.expect_pass) <= chosen
    async with broken.open() as target:
        results = await run_suite(target, cases, jobs=6)
    verdicts = {r.case.id: r for r in results}
    report = "\n".join(f"{r.verdict.value} {r.case.id}: {r.message[:300]}" for r in results)
    for case_id in broken.expect_fail:
        result = verdicts[case_id]
        assert result.verdict is Verdict.FAIL, f"{case_id} should FAIL:\n{report}"
        assert result.expected and result.seen, f"{case_id}: a FAIL says expected and seen"
    for case_id in [*broken.expect_pass, *CONTROL]:
        assert verdicts[case_id].verdict is Verdict.PASS, f"{case_id} should PASS:\n{report}"
    errors = [r.case.id for r in results if r.verdict is Verdict.ERROR]
    assert not errors, f"harness errors against {broken.name}:\n{report}"
