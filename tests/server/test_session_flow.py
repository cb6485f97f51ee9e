"""The session flow (``_session``), driven synchronously: no grpc, no processes, no waiting.

PROTOCOL 3.1 (start first, once), 3.2 (create or attach), 3.3 (ready first), 3.6
(half-close), 4.2-4.3 (sequences, shared encodings), 5.1 (exit last), 6.1-6.4 (replay, the
second ready at N, gaps), 7.1-7.3 (stdin, resize), 13.1 (clients limit), 13.2 (shutdown).
Every message is read back with the wire classes, as a client would read it.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from execstream import wire
from execstream.server._errors import ErrorCode, ExecError
from execstream.server._log import MAX_CHUNK, MIN_OUTPUT_LIMIT, Stream
from execstream.server._registry import ExecRecord, Limits, Registry
from execstream.server._service import render
from execstream.server._session import (
    CLIENT_STEPS,
    TRANSITIONS,
    CloseStdin,
    CreateExec,
    EmptyMessage,
    HalfClose,
    IllegalSessionStep,
    Resize,
    ResizeTerminal,
    SessionFlow,
    SessionState,
    Start,
    Stdin,
    Step,
    WriteStdin,
)
from execstream.server._storage import MemoryArea

BATCH = 16 * MAX_CHUNK
C, E = "c1", "e1"


class Metrics:
    """What the flow tells the server's metrics."""

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.sources: list[str] = []
        self.gaps: list[int] = []

    def streamed(self, chunks: int, nbytes: int, source: str = "memory") -> None:
        self.chunks += chunks
        self.bytes += nbytes
        self.sources.append(source)

    def gap(self, missed: int) -> None:
        self.gaps.append(missed)


class Controls:
    """A running exec's controls that remember what they were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    async def write_stdin(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close_stdin(self) -> None:
        self.calls.append(("close",))

    def resize(self, width: int, height: int) -> None:
        self.calls.append(("resize", width, height))


@pytest.fixture
def registry() -> Iterator[Registry]:
    registry = Registry(Limits(max_clients_per_exec=4, stdin_bytes=1024), storage=MemoryArea())
    yield registry
    registry.close()


_ids = itertools.count(1)


def new_flow(
    registry: Registry, metrics: Metrics | None = None, *, creates: bool = True
) -> SessionFlow:
    return SessionFlow(
        registry,
        creates=creates,
        new_session_id=lambda: f"s-{next(_ids)}",
        render=render,
        observer=metrics,
    )


def running(registry: Registry, *, tty: bool = False, exec_id: str = E) -> ExecRecord:
    """A started exec with controls, as the runner leaves it."""
    record = registry.register(C, exec_id, tty=tty)
    registry.mark_started(record)
    record.controls = Controls()
    return record


def write(record: ExecRecord, *payloads: bytes, stream: Stream = Stream.STDOUT) -> None:
    for data in payloads:
        record.log.append(stream, data, timestamp_ns=1_000 + record.log.next_sequence)


def exit_exec(registry: Registry, record: ExecRecord, code: int = 0) -> None:
    record.controls = None
    registry.mark_exited(record, code)


def attach(flow: SessionFlow, replay_from: int = 0, session_id: str = "") -> None:
    action = flow.receive(
        Start(container_id=C, exec_id=E, replay_from_sequence=replay_from, session_id=session_id)
    )
    assert action is None


def drain(flow: SessionFlow, budget: int = BATCH) -> list[wire.SessionResponse]:
    """Everything due until the flow waits for the log or the session ended."""
    out: list[wire.SessionResponse] = []
    while not flow.finished:
        messages = flow.next_messages(budget)
        out += [wire.SessionResponse.FromString(m) for m in messages]
        if not messages and flow.waiting:
            break
    return out


def kinds(messages: list[wire.SessionResponse]) -> list[str]:
    names = []
    for m in messages:
        if m.ready is not None:
            names.append("ready+" if m.ready.replay_complete else "ready-")
        elif m.output_chunk is not None:
            names.append("replay" if m.output_chunk.is_replay else "live")
        elif m.exit is not None:
            names.append("exit")
    return names


def chunks(messages: list[wire.SessionResponse]) -> list[wire.OutputChunk]:
    return [m.output_chunk for m in messages if m.output_chunk is not None]


def sequences(messages: list[wire.SessionResponse]) -> list[int]:
    return [c.sequence for c in chunks(messages)]


# -- the happy paths ------------------------------------------------------------------------


def test_ready_first_with_a_session_id_then_live_output_then_exit(registry: Registry) -> None:
    """PROTOCOL 3.3, 4.1, 5.1: nothing to replay, so one ready, complete, at N = 1."""
    record = running(registry)
    flow = new_flow(registry)
    attach(flow)
    assert flow.state is SessionState.ATTACHED
    first = drain(flow)
    assert kinds(first) == ["ready+"]
    ready = first[0].ready
    assert ready is not None
    assert ready.session_id and ready.next_sequence == 1 and ready.terminal_size is None
    assert flow.waiting and flow.state is SessionState.LIVE
    write(record, b"out\n")
    write(record, b"err\n", stream=Stream.STDERR)
    live = drain(flow)
    assert kinds(live) == ["live", "live"]
    assert [(c.stdout, c.stderr) for c in chunks(live)] == [(b"out\n", None), (None, b"err\n")]
    exit_exec(registry, record, 7)
    assert not flow.waiting
    assert kinds(drain(flow)) == ["exit"]
    assert flow.finished and flow.state is SessionState.EXITED
    assert flow.next_messages(BATCH) == []


def test_session_id_is_the_clients_when_given_else_unique(registry: Registry) -> None:
    """PROTOCOL 3.3."""
    running(registry)
    given_id, first, second = new_flow(registry), new_flow(registry), new_flow(registry)
    attach(given_id, session_id="mine")
    attach(first)
    attach(second)
    ids = [drain(f)[0].ready.session_id for f in (given_id, first, second)]  # type: ignore[union-attr]
    assert ids[0] == "mine"
    assert ids[1] and ids[2] and ids[1] != ids[2]


def test_a_tty_exec_reports_its_terminal_size_and_a_resize_is_reported_later(
    registry: Registry,
) -> None:
    """PROTOCOL 3.3, 7.3."""
    record = running(registry, tty=True)
    write(record, b"x")
    flow = new_flow(registry)
    attach(flow)
    ready = flow.next_messages(BATCH)
    assert wire.SessionResponse.FromString(ready[0]).ready.terminal_size == wire.Resize(80, 24)  # type: ignore[union-attr]
    action = flow.receive(Resize(width=100, height=30))
    assert isinstance(action, ResizeTerminal)
    assert (action.width, action.height) == (100, 30)
    assert record.terminal_size == (100, 30)
    second = [m for m in drain(flow) if m.ready is not None]
    assert second[0].ready.terminal_size == wire.Resize(100, 30)  # type: ignore[union-attr]


def test_history_is_replayed_marked_then_the_second_ready_at_n_then_live(
    registry: Registry,
) -> None:
    """PROTOCOL 6.1-6.3: no duplicate and no hole at the switch."""
    record = running(registry)
    write(record, b"a", b"b", b"c")
    flow = new_flow(registry)
    attach(flow)
    messages = drain(flow, budget=1)  # one chunk per read: the boundary is met exactly
    assert kinds(messages) == ["ready-", "replay", "replay", "replay", "ready+"]
    readies = [m.ready for m in messages if m.ready is not None]
    assert [r.next_sequence for r in readies] == [4, 4]
    assert readies[0].session_id == readies[1].session_id
    write(record, b"d", b"e")
    live = drain(flow)
    assert kinds(live) == ["live", "live"]
    assert sequences(messages) + sequences(live) == [1, 2, 3, 4, 5]


def test_output_during_the_replay_follows_the_second_ready_as_live(registry: Registry) -> None:
    """PROTOCOL 6.2, 6.3: N is fixed at attach, not when the replay ends."""
    record = running(registry)
    write(record, b"a", b"b")
    flow = new_flow(registry)
    attach(flow)
    seen = [wire.SessionResponse.FromString(m) for m in flow.next_messages(1)]  # ready
    seen += [wire.SessionResponse.FromString(m) for m in flow.next_messages(1)]  # chunk 1
    write(record, b"c", b"d")
    seen += drain(flow, budget=1)
    assert kinds(seen) == ["ready-", "replay", "replay", "ready+", "live", "live"]
    assert sequences(seen) == [1, 2, 3, 4]


def test_replay_from_a_sequence(registry: Registry) -> None:
    """PROTOCOL 6.1."""
    record = running(registry)
    write(record, b"a", b"b", b"c", b"d")
    flow = new_flow(registry)
    attach(flow, replay_from=3)
    messages = drain(flow)
    assert kinds(messages) == ["ready-", "replay", "replay", "ready+"]
    assert sequences(messages) == [3, 4]


def test_replay_from_the_next_sequence_has_nothing_to_replay(registry: Registry) -> None:
    """PROTOCOL 6.3: the first ready is complete."""
    record = running(registry)
    write(record, b"a", b"b")
    flow = new_flow(registry)
    attach(flow, replay_from=3)
    assert kinds(drain(flow)) == ["ready+"]


def test_a_late_attach_to_an_exited_exec_gets_everything_then_exit(registry: Registry) -> None:
    """PROTOCOL 5.1, 6.7: from storage, after the cache was let go."""
    record = running(registry)
    write(record, *(bytes([i]) * 1000 for i in range(20)))
    exit_exec(registry, record, 3)
    metrics = Metrics()
    flow = new_flow(registry, metrics)
    attach(flow)
    messages = drain(flow, budget=5000)
    assert kinds(messages) == ["ready-"] + ["replay"] * 20 + ["ready+", "exit"]
    assert sequences(messages) == list(range(1, 21))
    assert messages[-1].exit == 3
    assert metrics.chunks == 20 and metrics.bytes == 20_000
    assert set(metrics.sources) == {"storage"}


def test_exit_comes_only_after_every_chunk(registry: Registry) -> None:
    """PROTOCOL 5.1: the exec exits while the client is far behind."""
    record = running(registry)
    flow = new_flow(registry)
    attach(flow)
    drain(flow)
    write(record, *(b"x" * MAX_CHUNK for _ in range(40)))
    exit_exec(registry, record, 0)
    messages = drain(flow, budget=MAX_CHUNK)
    assert kinds(messages) == ["live"] * 40 + ["exit"]
    assert sequences(messages) == list(range(1, 41))


def test_gap_before_counts_the_chunks_evicted_before_the_first_read(registry: Registry) -> None:
    """PROTOCOL 6.4: the next chunk says how many were missed, and the metrics count it."""
    small = Registry(
        Limits(max_output_bytes=MIN_OUTPUT_LIMIT, memory_cache_bytes=MAX_CHUNK),
        storage=MemoryArea(),
    )
    try:
        record = running(small)
        write(record, *(bytes([i]) * MAX_CHUNK for i in range(10)))
        first = record.log.first_sequence
        assert first > 1
        metrics = Metrics()
        flow = new_flow(small, metrics)
        attach(flow)
        messages = drain(flow)
        got = chunks(messages)
        assert got[0].sequence == first and got[0].gap_before == first - 1
        assert all(c.gap_before == 0 for c in got[1:])
        assert sequences(messages) == list(range(first, 11))
        assert metrics.gaps == [first - 1]
    finally:
        small.close()


def test_a_live_client_left_behind_by_eviction_is_told_of_the_gap(registry: Registry) -> None:
    """PROTOCOL 6.4, 4.2: consecutive sequences, or a gap_before that bridges them."""
    small = Registry(
        Limits(max_output_bytes=MIN_OUTPUT_LIMIT, memory_cache_bytes=MAX_CHUNK),
        storage=MemoryArea(),
    )
    try:
        record = running(small)
        flow = new_flow(small)
        attach(flow)
        write(record, b"first")
        seen = chunks(drain(flow))
        write(record, *(b"y" * MAX_CHUNK for _ in range(12)))
        seen += chunks(drain(flow))
        for before, after in itertools.pairwise(seen):
            assert after.sequence == before.sequence + 1 + after.gap_before
        assert sum(c.gap_before for c in seen) > 0
        assert seen[-1].sequence == 13
    finally:
        small.close()


def test_two_clients_send_the_same_encoded_bytes_for_a_live_chunk(registry: Registry) -> None:
    """PROTOCOL 4.3: a chunk is encoded once for every client."""
    record = running(registry)
    one, two = new_flow(registry), new_flow(registry)
    attach(one)
    attach(two)
    one.next_messages(BATCH)
    two.next_messages(BATCH)
    write(record, b"shared")
    [a], [b] = one.next_messages(BATCH), two.next_messages(BATCH)
    assert a is b


def test_create_asks_the_glue_to_spawn_then_attaches_from_the_start(registry: Registry) -> None:
    """PROTOCOL 3.2: the flow decides, the glue spawns, the flow attaches."""
    flow = new_flow(registry)
    start = Start(container_id=C, exec_id=E, command=["true"], env={"A": "1"}, tty=True)
    action = flow.receive(start)
    assert action == CreateExec(start)
    assert flow.state is SessionState.OPENING
    record = running(registry, tty=True)  # as the runner would
    write(record, b"early")  # output before the attach is replay for the creator too
    flow.created(record)
    assert record.clients == 1
    assert kinds(drain(flow)) == ["ready-", "replay", "ready+"]
    flow.close()
    assert record.clients == 0


# -- stdin and resize -----------------------------------------------------------------------


def test_stdin_is_written_then_eof_closes_it_and_later_stdin_is_refused(
    registry: Registry,
) -> None:
    """PROTOCOL 7.1."""
    record = running(registry)
    flow = new_flow(registry)
    attach(flow)
    write_action = flow.receive(Stdin(data=b"hello"))
    assert isinstance(write_action, WriteStdin) and write_action.data == b"hello"
    assert write_action.controls is record.controls
    assert isinstance(flow.receive(Stdin(data=b"")), CloseStdin)
    assert record.stdin_closed
    assert isinstance(flow.receive(Stdin(data=b"")), CloseStdin)  # another EOF is harmless
    other = new_flow(registry)  # stdin_closed is the exec's, for every client
    attach(other)
    with pytest.raises(ExecError) as refused:
        other.receive(Stdin(data=b"more"))
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION
    assert other.state is SessionState.FAILED


@pytest.mark.parametrize("close_stdin", [False, True])
def test_a_start_with_close_stdin_closes_it_once_created(
    registry: Registry, close_stdin: bool
) -> None:
    """PROTOCOL 7.5: the EOF comes with the start, not in a message that could be lost."""
    flow = new_flow(registry)
    start = Start(container_id=C, exec_id=E, command=["cat"], close_stdin=close_stdin)
    assert isinstance(flow.receive(start), CreateExec)
    record = running(registry)
    action = flow.created(record)
    if not close_stdin:
        assert action is None and not record.stdin_closed
        return
    assert isinstance(action, CloseStdin) and action.controls is record.controls
    assert record.stdin_closed
    with pytest.raises(ExecError) as refused:
        flow.receive(Stdin(data=b"more"))
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION


def test_close_stdin_on_an_attach_is_ignored(registry: Registry) -> None:
    """PROTOCOL 7.5, 3.2: only a start that creates closes stdin."""
    record = running(registry)
    flow = new_flow(registry)
    assert flow.receive(Start(container_id=C, exec_id=E, close_stdin=True)) is None
    assert not record.stdin_closed


def test_stdin_over_the_limit_is_invalid_argument(registry: Registry) -> None:
    """PROTOCOL 7.2: the limit is the registry's (1 KiB here)."""
    running(registry)
    flow = new_flow(registry)
    attach(flow)
    assert isinstance(flow.receive(Stdin(data=b"x" * 1024)), WriteStdin)
    with pytest.raises(ExecError) as refused:
        flow.receive(Stdin(data=b"x" * 1025))
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert "1025" in refused.value.message


def test_stdin_after_the_exit_is_discarded(registry: Registry) -> None:
    """PROTOCOL 7.1: nothing to write to, and no error."""
    record = running(registry)
    exit_exec(registry, record)
    flow = new_flow(registry)
    attach(flow)
    assert flow.receive(Stdin(data=b"late")) is None
    assert kinds(drain(flow)) == ["ready+", "exit"]
    assert flow.receive(Stdin(data=b"later")) is None  # racing the end of the stream


def test_resize_on_a_non_tty_exec_is_failed_precondition_whatever_the_size(
    registry: Registry,
) -> None:
    """PROTOCOL 7.3: the TTY is checked first."""
    running(registry)
    flow = new_flow(registry)
    attach(flow)
    with pytest.raises(ExecError) as refused:
        flow.receive(Resize(width=0, height=0))
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION


@pytest.mark.parametrize(("width", "height"), [(0, 24), (80, 0), (-1, 5)])
def test_resize_to_a_size_not_positive_is_invalid_argument(
    registry: Registry, width: int, height: int
) -> None:
    """PROTOCOL 7.3."""
    record = running(registry, tty=True)
    flow = new_flow(registry)
    attach(flow)
    with pytest.raises(ExecError) as refused:
        flow.receive(Resize(width=width, height=height))
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert record.terminal_size == (80, 24)


def test_half_close_ends_nothing(registry: Registry) -> None:
    """PROTOCOL 3.6: the client still gets everything up to exit, and stdin stays open."""
    record = running(registry)
    flow = new_flow(registry)
    attach(flow)
    assert flow.receive(HalfClose()) is None
    assert not record.stdin_closed
    write(record, b"after")
    exit_exec(registry, record, 0)
    assert kinds(drain(flow)) == ["ready+", "live", "exit"]


# -- the client breaking the spec -----------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "words"),
    [
        (Stdin(data=b"x"), "got stdin"),
        (Resize(width=1, height=1), "got resize"),
        (EmptyMessage(), "got an empty message"),
        (HalfClose(), "closed before its first message"),
    ],
    ids=["stdin", "resize", "empty", "half-close"],
)
def test_the_first_message_must_be_start(registry: Registry, first: object, words: str) -> None:
    """PROTOCOL 3.1."""
    flow = new_flow(registry)
    with pytest.raises(ExecError) as refused:
        flow.receive(first)  # type: ignore[arg-type]
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert words in refused.value.message
    assert flow.state is SessionState.FAILED


def test_a_second_start_is_invalid_argument_whatever_it_says(registry: Registry) -> None:
    """PROTOCOL 3.1."""
    running(registry)
    flow = new_flow(registry)
    attach(flow)
    drain(flow)
    with pytest.raises(ExecError) as refused:
        flow.receive(Start(container_id="", exec_id=""))
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert "twice" in refused.value.message


def test_an_empty_message_after_start_is_invalid_argument(registry: Registry) -> None:
    """PROTOCOL 3.1."""
    running(registry)
    flow = new_flow(registry)
    attach(flow)
    with pytest.raises(ExecError) as refused:
        flow.receive(EmptyMessage())
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("start", "code", "words"),
    [
        (Start(container_id="", exec_id=E), ErrorCode.INVALID_ARGUMENT, "container_id"),
        (Start(container_id=C, exec_id="-bad"), ErrorCode.INVALID_ARGUMENT, "exec_id"),
        (Start(container_id=C, exec_id="nope"), ErrorCode.NOT_FOUND, "nope"),
        (Start(container_id=C, exec_id=E, command=["x"]), ErrorCode.ALREADY_EXISTS, E),
        (
            Start(container_id=C, exec_id="new", command=["x"], replay_from_sequence=2),
            ErrorCode.OUT_OF_RANGE,
            "replay_from_sequence 2",
        ),
        (Start(container_id=C, exec_id=E, replay_from_sequence=99), ErrorCode.OUT_OF_RANGE, "99"),
    ],
    ids=["no-container", "bad-exec-id", "unknown", "exists", "create-replay", "replay-past"],
)
def test_a_start_the_server_refuses(
    registry: Registry, start: Start, code: ErrorCode, words: str
) -> None:
    """PROTOCOL 2.1, 3.2, 6.1."""
    record = running(registry)
    write(record, b"a")
    flow = new_flow(registry)
    with pytest.raises(ExecError) as refused:
        flow.receive(start)
    assert refused.value.code is code
    assert words in refused.value.message
    assert flow.state is SessionState.FAILED
    flow.close()
    assert record.clients == 0


def test_a_server_that_does_not_create_answers_not_found(registry: Registry) -> None:
    """PROTOCOL 3.2: its execs come from elsewhere."""
    flow = new_flow(registry, creates=False)
    with pytest.raises(ExecError) as refused:
        flow.receive(Start(container_id=C, exec_id=E, command=["true"]))
    assert refused.value.code is ErrorCode.NOT_FOUND


def test_past_the_clients_limit_is_resource_exhausted(registry: Registry) -> None:
    """PROTOCOL 13.1: four clients here; a fifth is refused, a leaver makes room."""
    record = running(registry)
    flows = [new_flow(registry) for _ in range(4)]
    for flow in flows:
        attach(flow)
    extra = new_flow(registry)
    with pytest.raises(ExecError) as refused:
        attach(extra)
    assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
    flows[0].close()
    flows[0].close()  # once only
    assert record.clients == 3
    attach(new_flow(registry))


def test_a_failed_session_answers_every_step_with_its_error(registry: Registry) -> None:
    """The first failure stands (a shutdown after a client error changes nothing)."""
    running(registry)
    flow = new_flow(registry)
    attach(flow)
    with pytest.raises(ExecError) as first:
        flow.receive(EmptyMessage())
    flow.fail(ExecError(ErrorCode.UNAVAILABLE, "server shutting down"))
    for step in (
        lambda: flow.next_messages(BATCH),
        lambda: flow.receive(Stdin(data=b"x")),
        lambda: flow.receive(HalfClose()),
    ):
        with pytest.raises(ExecError) as again:
            step()
        assert again.value is first.value
    assert not flow.waiting and not flow.finished


def test_shutdown_ends_a_waiting_session_with_unavailable(registry: Registry) -> None:
    """PROTOCOL 13.2: the glue fails the flow and wakes it."""
    running(registry)
    flow = new_flow(registry)
    attach(flow)
    drain(flow)
    assert flow.waiting
    flow.fail(ExecError(ErrorCode.UNAVAILABLE, "server shutting down"))
    assert not flow.waiting
    with pytest.raises(ExecError) as ended:
        flow.next_messages(BATCH)
    assert ended.value.code is ErrorCode.UNAVAILABLE


def test_shutdown_before_the_exec_is_opened_refuses_the_start_or_the_attach(
    registry: Registry,
) -> None:
    """PROTOCOL 13.2: a session waiting for its start, or for its exec to be spawned."""
    shutdown = ExecError(ErrorCode.UNAVAILABLE, "server shutting down")
    waiting_for_start = new_flow(registry)
    waiting_for_start.fail(shutdown)
    with pytest.raises(ExecError) as refused:
        attach(waiting_for_start)
    assert refused.value is shutdown
    creating = new_flow(registry)
    assert isinstance(creating.receive(Start(container_id=C, exec_id=E, command=["x"])), CreateExec)
    creating.fail(shutdown)
    record = running(registry)  # the spawn finished meanwhile
    with pytest.raises(ExecError) as refused:
        creating.created(record)
    assert refused.value is shutdown
    assert record.clients == 0  # never attached, so nothing to detach
    creating.close()
    assert record.clients == 0


def test_shutdown_after_exit_changes_nothing(registry: Registry) -> None:
    """PROTOCOL 5.1: the stream already ended well."""
    record = running(registry)
    exit_exec(registry, record)
    flow = new_flow(registry)
    attach(flow)
    drain(flow)
    flow.fail(ExecError(ErrorCode.UNAVAILABLE, "server shutting down"))
    assert flow.finished and flow.state is SessionState.EXITED


# -- the table ------------------------------------------------------------------------------


def test_every_state_has_a_row_and_only_failure_leaves_no_way_back() -> None:
    assert set(TRANSITIONS) == set(SessionState)
    for state, row in TRANSITIONS.items():
        if state is not SessionState.FAILED:
            assert Step.FAIL in row, state
    assert set(TRANSITIONS[SessionState.FAILED].values()) == {SessionState.FAILED}
    assert set(TRANSITIONS[SessionState.EXITED].values()) == {SessionState.EXITED}
    assert not any(Step.EMPTY in row for row in TRANSITIONS.values())  # never legal (3.1)


SERVER_STEPS = [s for s in Step if s not in CLIENT_STEPS and s is not Step.FAIL]
FORBIDDEN_SERVER_STEPS = [
    (state, step)
    for state, step in itertools.product(SessionState, SERVER_STEPS)
    if step not in TRANSITIONS[state] and state is not SessionState.FAILED
]


def _name(value: object) -> str:
    return value.name if isinstance(value, SessionState | Step) else str(value)


def flow_in(registry: Registry, state: SessionState) -> SessionFlow:
    """A flow brought to ``state`` through legal steps."""
    record = registry.find(C, E) or running(registry)
    flow = new_flow(registry)
    if state is SessionState.AWAIT_START:
        return flow
    if state is SessionState.OPENING:
        flow.receive(Start(container_id=C, exec_id="new", command=["true"]))
        return flow
    if state is SessionState.FAILED:
        with pytest.raises(ExecError):
            flow.receive(EmptyMessage())
        return flow
    if state is SessionState.REPLAYING and record.log.next_sequence == 1:
        write(record, b"a")
    attach(flow)
    if state is not SessionState.ATTACHED:
        flow.next_messages(BATCH)
    if state is SessionState.EXITED:
        exit_exec(registry, record)
        drain(flow)
    assert flow.state is state
    return flow


@pytest.mark.parametrize(("state", "step"), FORBIDDEN_SERVER_STEPS, ids=_name)
def test_a_server_step_out_of_turn_is_one_clear_error(
    registry: Registry, state: SessionState, step: Step
) -> None:
    """A bug of the glue, not of the client: it names the state and the step."""
    flow = flow_in(registry, state)
    with pytest.raises(IllegalSessionStep) as caught:
        flow._step(step)
    assert repr(state.value) in str(caught.value) and repr(step.value) in str(caught.value)
    assert caught.value.state is state and caught.value.step is step


HEARD = [s for s in SessionState if s not in (SessionState.OPENING, SessionState.FAILED)]
EVENT_OF = {
    Step.START: Start(container_id=C, exec_id=E),
    Step.STDIN: Stdin(data=b"x"),
    Step.RESIZE: Resize(width=1, height=1),
    Step.EMPTY: EmptyMessage(),
    Step.HALF_CLOSE: HalfClose(),
}
FORBIDDEN_CLIENT_STEPS = [
    (state, step)
    for state, step in itertools.product(HEARD, sorted(CLIENT_STEPS, key=lambda s: s.value))
    if step not in TRANSITIONS[state]
]


@pytest.mark.parametrize(("state", "step"), FORBIDDEN_CLIENT_STEPS, ids=_name)
def test_a_client_step_out_of_turn_is_the_clients_invalid_argument(
    registry: Registry, state: SessionState, step: Step
) -> None:
    """PROTOCOL 3.1: whatever the table does not allow the client ends its stream."""
    flow = flow_in(registry, state)
    with pytest.raises(ExecError) as refused:
        flow.receive(EVENT_OF[step])  # type: ignore[arg-type]
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    # A breach racing the end of the stream changes nothing: exit was sent, and it stays.
    ended = SessionState.EXITED if state is SessionState.EXITED else SessionState.FAILED
    assert flow.state is ended


@pytest.mark.parametrize("state", [SessionState.AWAIT_START, SessionState.OPENING], ids=_name)
def test_nothing_is_sent_before_the_exec_is_opened(registry: Registry, state: SessionState) -> None:
    flow = flow_in(registry, state)
    with pytest.raises(IllegalSessionStep):
        flow.next_messages(BATCH)


def test_requests_are_not_fed_while_the_exec_is_being_created(registry: Registry) -> None:
    flow = flow_in(registry, SessionState.OPENING)
    with pytest.raises(IllegalSessionStep):
        flow.receive(Stdin(data=b"x"))


def test_created_only_answers_a_create(registry: Registry) -> None:
    flow = flow_in(registry, SessionState.ATTACHED)
    with pytest.raises(IllegalSessionStep):
        flow.created(running(registry, exec_id="other"))


def test_the_core_module_imports_no_asyncio_grpc_or_wire() -> None:
    """DESIGN: the session flow is sans-IO, like the registry and the log."""
    source = Path(__file__).resolve().parents[2] / "impl" / "server" / "_session.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    roots = {name.lstrip(".").split(".")[0] for name in imported}
    assert not roots & {"asyncio", "grpc", "execstream", "betterproto2"}, imported


# -- any interleaving -----------------------------------------------------------------------

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 3 * MAX_CHUNK)),
        st.tuples(st.just("read"), st.integers(1, 4 * MAX_CHUNK)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    before=st.integers(0, 12),
    replay_from=st.integers(0, 14),
    actions=_ACTIONS,
    exits=st.booleans(),
)
def test_any_interleaving_keeps_the_session_rules(
    before: int, replay_from: int, actions: list[tuple[str, int]], exits: bool
) -> None:
    """PROTOCOL 3.3, 4.2, 5.1, 6.2, 6.3 hold whatever the order of output and reads: ready
    first; at most two readies, both with N; replay exactly below N; contiguous sequences
    from the requested one; exit last, after every chunk."""
    registry = Registry(
        Limits(max_output_bytes=0, memory_cache_bytes=2 * MAX_CHUNK), storage=MemoryArea()
    )
    try:
        record = running(registry)
        write(record, *(bytes([i % 256]) * 100 for i in range(before)))
        n = record.log.next_sequence
        flow = new_flow(registry)
        if replay_from > n:
            with pytest.raises(ExecError):
                attach(flow, replay_from)
            return
        attach(flow, replay_from)
        seen: list[wire.SessionResponse] = []
        for kind, size in actions:
            if kind == "write":
                write(record, b"w" * size)
            else:
                seen += [wire.SessionResponse.FromString(m) for m in flow.next_messages(size)]
        if exits:
            exit_exec(registry, record, 5)
        seen += drain(flow)
        names = kinds(seen)
        assert names[0] in ("ready+", "ready-")
        readies = [m.ready for m in seen if m.ready is not None]
        assert len(readies) <= 2 and all(r.next_sequence == n for r in readies)
        got = chunks(seen)
        assert [c.sequence for c in got] == list(
            range(max(replay_from, 1), record.log.next_sequence)
        )
        assert all(c.is_replay == (c.sequence < n) for c in got)
        if max(replay_from, 1) < n:
            assert names[0] == "ready-"
            assert names.index("ready+") == 1 + sum(1 for c in got if c.sequence < n)
        else:
            assert names.count("ready+") == 1 and "ready-" not in names
        if exits:
            assert names[-1] == "exit" and names.count("exit") == 1 and flow.finished
        else:
            assert "exit" not in names and flow.waiting
    finally:
        registry.close()
