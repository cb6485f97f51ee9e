"""The registry (``_registry``): IDs, lookup, limits, lifecycle events, states and retention.

PROTOCOL 2.1 (identifiers), 3.2 (create or attach), 6.1 (replay range), 8.1-8.2 (events),
9.2-9.3 (states and times), 10.1-10.2 (pause, resume), 11.2 (cleanup), 13.1 (limits).
"""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import pytest

from execstream.server._errors import ErrorCode, ExecError
from execstream.server._log import MIN_OUTPUT_LIMIT, Stream
from execstream.server._registry import (
    ContainerRecord,
    EventSubscription,
    ExecRecord,
    LifecycleRecord,
    Limits,
    Registry,
    validate_id,
)
from execstream.server._state import ExecState, IllegalTransition
from execstream.server._storage import DirectoryArea, MemoryArea

RETENTION = 300.0


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.wall = 1_700_000_000_000_000_000
        self.mono = 1000.0

    def wall_ns(self) -> int:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += round(seconds * 1e9)
        self.mono += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(clock=clock)


def events(registry: Registry) -> list[LifecycleRecord]:
    return registry.events.read(0).items


def summary(registry: Registry, since: int = 0) -> list[tuple[str, str, str, int]]:
    """(event_type, exec_id, status, exit_code) of the events after sequence ``since``."""
    return [
        (e.event_type, e.exec_id, e.status, e.exit_code)
        for e in registry.events.read(since + 1).items
    ]


def snapshot(registry: Registry) -> tuple[object, ...]:
    """Everything a refused request must leave as it was (PROTOCOL 13.1)."""
    return (
        [astuple(e) for e in events(registry)],
        [(r.container_id, r.exec_id, r.state, r.clients) for r in registry],
        registry.subscribers,
        registry.events.next_sequence,
    )


def expect_error(code: ErrorCode, *words: str) -> pytest.RaisesExc[ExecError]:
    """An ExecError with ``code`` whose message contains every one of ``words``."""

    def check(error: ExecError) -> bool:
        assert error.code is code, repr(error)
        for word in words:
            assert word in error.message, f"{word!r} not in {error.message!r}"
        return True

    return pytest.raises(ExecError, check=check)


def state_of(container: ContainerRecord) -> ExecState:
    """The derived state, read afresh (a function, so type checkers do not narrow it)."""
    return container.state


def running(registry: Registry, container_id: str = "c1", exec_id: str = "e1") -> ExecRecord:
    record = registry.register(container_id, exec_id)
    registry.mark_started(record)
    return record


# -- identifiers (PROTOCOL 2.1) --------------------------------------------------------------

VALID_IDS = ["a", "Z", "0", "a" * 128, "9" * 128, "a.b_c-D9", "x..", "x-_.", "web-1.log_2"]
INVALID_IDS = [
    "a" * 129,
    ".a",
    "..",
    ".",
    "-a",
    "_a",
    "a/b",
    "/a",
    "../x",
    "a b",
    "a\n",
    "a\x00",
    "\u00e9",  # é
    "a\u00e9",
    "\uff41",  # fullwidth a
    "\u0663",  # Arabic-Indic digit three: a unicode digit, not 0-9
    "a:b",
    "a*",
]


@pytest.mark.parametrize("value", VALID_IDS)
def test_validate_id_accepts(value: str) -> None:
    assert validate_id("exec_id", value) == value


@pytest.mark.parametrize("field", ["container_id", "exec_id"])
@pytest.mark.parametrize("value", ["", *INVALID_IDS])
def test_validate_id_rejects_naming_the_field(field: str, value: str) -> None:
    with expect_error(ErrorCode.INVALID_ARGUMENT, field):
        validate_id(field, value)


def test_validate_id_empty_says_required() -> None:
    with expect_error(ErrorCode.INVALID_ARGUMENT, "container_id is required"):
        validate_id("container_id", "")


def test_validate_id_quotes_a_long_value_truncated() -> None:
    with pytest.raises(ExecError) as caught:
        validate_id("exec_id", "/" * 10_000)
    assert len(caught.value.message) < 400


@pytest.mark.parametrize("value", ["", ".hidden", "a/b", "é"])
def test_register_rejects_bad_ids_naming_the_field(registry: Registry, value: str) -> None:
    with expect_error(ErrorCode.INVALID_ARGUMENT, "container_id"):
        registry.register(value, "e1")
    with expect_error(ErrorCode.INVALID_ARGUMENT, "exec_id"):
        registry.register("c1", value)
    assert events(registry) == []
    assert list(registry) == []


@pytest.mark.parametrize("value", ["", "..", "a/b"])
def test_lookups_reject_bad_ids_naming_the_field(registry: Registry, value: str) -> None:
    registry.register("c1", "e1")
    with expect_error(ErrorCode.INVALID_ARGUMENT, "container_id"):
        registry.container(value)
    with expect_error(ErrorCode.INVALID_ARGUMENT, "container_id"):
        registry.get(value, "e1")
    with expect_error(ErrorCode.INVALID_ARGUMENT, "exec_id"):
        registry.get("c1", value)


def test_get_rejects_a_bad_exec_id_even_in_an_unknown_container(registry: Registry) -> None:
    """PROTOCOL 2.1: a malformed identifier MUST fail with INVALID_ARGUMENT, whatever else
    the request names; the container's existence must not turn it into NOT_FOUND."""
    with expect_error(ErrorCode.INVALID_ARGUMENT, "exec_id"):
        registry.get("nosuch", "../etc")


# -- register, get, find ---------------------------------------------------------------------


def test_register_get_find(registry: Registry, clock: FakeClock) -> None:
    record = registry.register("c1", "e1")
    assert record.container_id == "c1"
    assert record.exec_id == "e1"
    assert record.state is ExecState.PENDING
    assert record.registered_at_ns == clock.wall
    assert record.started_at_ns == 0
    assert record.finished_at_ns is None
    assert record.exit_code is None
    assert record.clients == 0
    assert not record.tty
    assert record.terminal_size is None
    assert registry.get("c1", "e1") is record
    assert registry.find("c1", "e1") is record
    assert registry.container("c1") is record.container
    assert registry.find("c1", "nope") is None
    assert registry.find("nope", "e1") is None
    assert registry.find("", "") is None
    assert list(registry) == [record]


def test_execs_are_listed_in_registration_order(registry: Registry) -> None:
    b = registry.register("c1", "b")
    a = registry.register("c1", "a")
    other = registry.register("c2", "a")
    assert list(registry.container("c1").execs) == ["b", "a"]
    assert list(registry) == [b, a, other]


def test_tty_exec_has_a_terminal_size(registry: Registry) -> None:
    record = registry.register("c1", "e1", tty=True)
    assert record.tty
    assert record.terminal_size == (80, 24)


def test_output_limit_and_cache_come_from_limits(clock: FakeClock) -> None:
    limits = Limits(max_output_bytes=MIN_OUTPUT_LIMIT, memory_cache_bytes=65536)
    registry = Registry(limits, clock, storage=MemoryArea())
    record = registry.register("c1", "e1")
    for _ in range(5):
        record.log.append(Stream.STDOUT, b"x" * 65536, 1)
    assert record.log.stored_bytes <= MIN_OUTPUT_LIMIT
    assert record.log.first_sequence == 3  # three full chunks fit the limit
    assert record.log.cached_from == 5  # the cache holds one


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_output_bytes", MIN_OUTPUT_LIMIT - 1),
        ("max_output_bytes", -1),
        ("max_stored_bytes", 1000),
        ("memory_cache_bytes", 65535),
        ("max_execs", 0),
        ("stdin_bytes", -5),
    ],
)
def test_impossible_limits_are_refused_naming_the_setting(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_removal_destroys_the_stored_output(clock: FakeClock, tmp_path: Path) -> None:
    registry = Registry(Limits(), clock, storage=DirectoryArea(tmp_path))
    record = registry.register("c1", "e1")
    record.log.append(Stream.STDOUT, b"kept until removed", 1)
    assert list((tmp_path / "c1").glob("e1.*.seg"))
    registry.mark_started(record)
    registry.mark_exited(record, 0)
    registry.remove(record)
    assert not (tmp_path / "c1").exists()


def test_duplicate_register_is_already_exists(registry: Registry) -> None:
    record = registry.register("c1", "e1")
    before = snapshot(registry)
    with expect_error(ErrorCode.ALREADY_EXISTS, "'e1'", "'c1'"):
        registry.register("c1", "e1")
    assert snapshot(registry) == before
    assert registry.get("c1", "e1") is record


def test_exited_but_retained_exec_still_exists(registry: Registry) -> None:
    record = running(registry)
    registry.mark_exited(record, 0)
    with expect_error(ErrorCode.ALREADY_EXISTS):
        registry.register("c1", "e1")


def test_unknown_container_is_not_found_naming_it(registry: Registry) -> None:
    with expect_error(ErrorCode.NOT_FOUND, "'ghost'"):
        registry.container("ghost")
    with expect_error(ErrorCode.NOT_FOUND, "container 'ghost'"):
        registry.get("ghost", "e1")


def test_unknown_exec_is_not_found_naming_it_and_its_container(registry: Registry) -> None:
    registry.register("c1", "e1")
    with expect_error(ErrorCode.NOT_FOUND, "'e2'", "'c1'"):
        registry.get("c1", "e2")


# -- limits (PROTOCOL 13.1) ------------------------------------------------------------------


def test_max_execs(clock: FakeClock) -> None:
    registry = Registry(Limits(max_execs=2), clock)
    registry.register("c1", "e1")
    registry.register("c2", "e1")
    before = snapshot(registry)
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs"):
        registry.register("c3", "e1")  # a new container is not created either
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs"):
        registry.register("c1", "e2")
    assert snapshot(registry) == before
    with expect_error(ErrorCode.NOT_FOUND):
        registry.container("c3")
    # Removing one frees a place.
    registry.remove(registry.get("c2", "e1"))
    registry.register("c3", "e1")


def test_max_execs_per_container(clock: FakeClock) -> None:
    registry = Registry(Limits(max_execs_per_container=2), clock)
    registry.register("c1", "e1")
    registry.register("c1", "e2")
    before = snapshot(registry)
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs_per_container", "'c1'"):
        registry.register("c1", "e3")
    assert snapshot(registry) == before
    assert list(registry.container("c1").execs) == ["e1", "e2"]
    registry.register("c2", "e3")  # other containers are unaffected


def test_removing_a_live_exec_frees_its_place_in_the_container(clock: FakeClock) -> None:
    """The per-container count follows every way an exec stops being live: exit, and
    removal before exit (a failed spawn is unregistered while pending)."""
    registry = Registry(Limits(max_execs_per_container=2), clock)
    pending = registry.register("c1", "pending")
    running(registry, "c1", "live")
    registry.remove(pending)
    registry.register("c1", "again")
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs_per_container", "2 execs"):
        registry.register("c1", "third")
    registry.remove(registry.get("c1", "live"))  # removed while running
    registry.mark_exited(registry.get("c1", "again"), 0)
    running(registry, "c1", "one")
    running(registry, "c1", "two")
    assert registry.container("c1").live == 2


def test_exited_execs_do_not_count_against_limits(clock: FakeClock) -> None:
    """PROTOCOL 13.3: a container can run execs one after the other without end."""
    registry = Registry(Limits(max_execs=3, max_execs_per_container=2), clock)
    for n in range(50):
        record = running(registry, "c1", f"e{n}")
        registry.mark_exited(record, 0)
    assert len(registry.container("c1").execs) == 50  # all retained (PROTOCOL 11.1)
    running(registry, "c1", "live1")
    running(registry, "c1", "live2")
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs_per_container", "2 execs"):
        registry.register("c1", "live3")
    running(registry, "c2", "live3")
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs"):
        registry.register("c3", "live4")
    # A pending exec counts too; one exiting frees its place.
    registry.mark_exited(registry.get("c1", "live1"), 0)
    registry.register("c1", "pending")
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_execs"):
        registry.register("c3", "live4")


def test_removing_a_pending_exec_frees_its_place(clock: FakeClock) -> None:
    registry = Registry(Limits(max_execs=1), clock)
    registry.remove(registry.register("c1", "e1"))  # a spawn that failed
    registry.register("c1", "e2")


def test_over_exited_bound_lists_the_earliest_exits_first(clock: FakeClock) -> None:
    """PROTOCOL 11.3: past the bound, the execs that exited first go, not the first registered."""
    registry = Registry(Limits(max_exited_execs=2), clock)
    records = [running(registry, "c1", f"e{n}") for n in range(4)]
    live = running(registry, "c2", "live")
    for n in (2, 0, 3):
        registry.mark_exited(records[n], 0)
    assert registry.over_exited_bound() == [records[2]]
    registry.mark_exited(records[1], 0)
    assert registry.over_exited_bound() == [records[2], records[0]]
    registry.remove(records[2])
    assert registry.over_exited_bound() == [records[0]]
    registry.remove(records[0])
    assert registry.over_exited_bound() == []
    assert live.state is ExecState.RUNNING  # never evicted


def test_max_clients_per_exec(clock: FakeClock) -> None:
    registry = Registry(Limits(max_clients_per_exec=2), clock)
    record = registry.register("c1", "e1")
    registry.attach(record, 0)
    registry.attach(record, 0)
    assert record.clients == 2
    before = snapshot(registry)
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_clients_per_exec", "'e1'"):
        registry.attach(record, 0)
    assert record.clients == 2
    assert snapshot(registry) == before
    registry.detach(record)
    assert record.clients == 1
    registry.attach(record, 0)
    assert record.clients == 2


def test_max_clients_is_per_exec(clock: FakeClock) -> None:
    registry = Registry(Limits(max_clients_per_exec=1), clock)
    a = registry.register("c1", "a")
    b = registry.register("c1", "b")
    registry.attach(a, 0)
    registry.attach(b, 0)
    assert (a.clients, b.clients) == (1, 1)


def test_max_subscribers(clock: FakeClock) -> None:
    registry = Registry(Limits(max_subscribers=2), clock)
    registry.subscribe()
    registry.subscribe()
    before = snapshot(registry)
    with expect_error(ErrorCode.RESOURCE_EXHAUSTED, "max_subscribers"):
        registry.subscribe()
    assert registry.subscribers == 2
    assert snapshot(registry) == before
    registry.unsubscribe()
    registry.subscribe()
    assert registry.subscribers == 2


def test_register_in_paused_container_is_failed_precondition(registry: Registry) -> None:
    record = running(registry)
    registry.pause(record.container)
    before = snapshot(registry)
    with expect_error(ErrorCode.FAILED_PRECONDITION, "'c1'", "paused"):
        registry.register("c1", "e2")
    assert snapshot(registry) == before
    registry.resume(record.container)
    assert registry.register("c1", "e2").state is ExecState.PENDING


# -- lifecycle events (PROTOCOL 8.1, 8.2) ----------------------------------------------------


def test_lifecycle_of_one_exec(registry: Registry, clock: FakeClock) -> None:
    t0 = clock.wall
    record = registry.register("c1", "e1")
    clock.advance(1)
    registry.mark_started(record)
    clock.advance(1)
    registry.pause(record.container)
    clock.advance(1)
    registry.resume(record.container)
    clock.advance(1)
    registry.mark_exited(record, 7, "bye")
    clock.advance(1)
    registry.remove(record)

    got = events(registry)
    assert [e.sequence for e in got] == list(range(1, 9))
    assert all(e.container_id == "c1" for e in got)
    assert summary(registry) == [
        ("created", "", "pending", 0),
        ("registered", "e1", "pending", 0),
        ("started", "e1", "running", 0),
        ("paused", "", "paused", 0),
        ("resumed", "", "running", 0),
        ("exited", "e1", "exited", 7),
        ("unregistered", "e1", "removed", 0),
        ("removed", "", "removed", 0),
    ]
    # PROTOCOL 2.4: event timestamps are the wall clock, in nanoseconds.
    assert [(e.timestamp_ns - t0) // 1_000_000_000 for e in got] == [0, 0, 1, 2, 3, 4, 5, 5]
    assert all((e.timestamp_ns - t0) % 1_000_000_000 == 0 for e in got)
    assert got[5].message == "bye"
    assert registry.events.next_sequence == 9


def test_two_execs_share_one_created_and_one_removed(registry: Registry) -> None:
    a = registry.register("c1", "a")
    b = registry.register("c1", "b")
    registry.mark_exited(a, 1)  # a spawn that failed: exits without starting
    registry.remove(a)
    mark = registry.events.next_sequence - 1
    assert registry.container("c1").execs == {"b": b}
    registry.remove(b)
    assert summary(registry) == [
        ("created", "", "pending", 0),
        ("registered", "a", "pending", 0),
        ("registered", "b", "pending", 0),
        ("exited", "a", "exited", 1),
        ("unregistered", "a", "removed", 0),
        ("unregistered", "b", "removed", 0),
        ("removed", "", "removed", 0),
    ]
    assert summary(registry, mark) == [
        ("unregistered", "b", "removed", 0),
        ("removed", "", "removed", 0),
    ]


def test_events_of_containers_are_numbered_server_wide(registry: Registry) -> None:
    registry.register("c1", "e1")
    registry.register("c2", "e1")
    got = events(registry)
    assert [(e.sequence, e.container_id, e.event_type) for e in got] == [
        (1, "c1", "created"),
        (2, "c1", "registered"),
        (3, "c2", "created"),
        (4, "c2", "registered"),
    ]


def test_event_history_is_bounded_by_count(clock: FakeClock) -> None:
    registry = Registry(Limits(event_history=3), clock)
    for i in range(3):
        registry.register(f"c{i}", "e1")  # two events each
    assert registry.events.next_sequence == 7
    assert registry.events.first_sequence == 4
    read = registry.events.read(1)
    assert read.gap_before == 3
    assert [e.sequence for e in read.items] == [4, 5, 6]


def test_emit_notifies_listeners(registry: Registry) -> None:
    seen: list[int] = []
    registry.events.add_listener(lambda: seen.append(registry.events.next_sequence - 1))
    registry.register("c1", "e1")
    assert seen == [1, 2]


def test_illegal_move_changes_nothing(registry: Registry) -> None:
    record = running(registry)
    before = snapshot(registry)
    started_at = record.started_at_ns
    with pytest.raises(IllegalTransition):
        registry.mark_started(record)
    assert snapshot(registry) == before
    assert record.started_at_ns == started_at
    registry.mark_exited(record, 0)
    before = snapshot(registry)
    with pytest.raises(IllegalTransition):
        registry.mark_exited(record, 1)
    assert snapshot(registry) == before
    assert record.exit_code == 0


def test_removing_twice_is_illegal(registry: Registry) -> None:
    record = registry.register("c1", "e1")
    registry.remove(record)
    before = snapshot(registry)
    with pytest.raises(IllegalTransition):
        registry.remove(record)
    assert snapshot(registry) == before


# -- pause and resume (PROTOCOL 10.1, 10.2) --------------------------------------------------


def test_pause_already_paused_is_failed_precondition(registry: Registry) -> None:
    record = running(registry)
    registry.pause(record.container)
    before = snapshot(registry)
    with expect_error(ErrorCode.FAILED_PRECONDITION, "'c1'", "already paused"):
        registry.pause(record.container)
    assert snapshot(registry) == before
    assert record.container.paused


@pytest.mark.parametrize("state", ["pending", "exited"])
def test_pause_without_running_exec_is_failed_precondition(registry: Registry, state: str) -> None:
    record = registry.register("c1", "e1")
    if state == "exited":
        registry.mark_started(record)
        registry.mark_exited(record, 0)
    before = snapshot(registry)
    with expect_error(ErrorCode.FAILED_PRECONDITION, "'c1'", "no running exec"):
        registry.pause(record.container)
    assert snapshot(registry) == before
    assert not record.container.paused


def test_resume_not_paused_is_failed_precondition(registry: Registry) -> None:
    record = running(registry)
    before = snapshot(registry)
    with expect_error(ErrorCode.FAILED_PRECONDITION, "'c1'", "not paused"):
        registry.resume(record.container)
    with expect_error(ErrorCode.FAILED_PRECONDITION, "not paused"):
        registry.check_paused(record.container)
    assert snapshot(registry) == before


def test_pause_moves_only_running_execs(registry: Registry) -> None:
    run = running(registry, "c1", "run")
    pending = registry.register("c1", "pending")
    done = running(registry, "c1", "done")
    registry.mark_exited(done, 0)
    registry.pause(run.container)
    assert (run.state, pending.state, done.state) == (
        ExecState.PAUSED,
        ExecState.PENDING,
        ExecState.EXITED,
    )
    registry.resume(run.container)
    assert (run.state, pending.state, done.state) == (
        ExecState.RUNNING,
        ExecState.PENDING,
        ExecState.EXITED,
    )
    assert not run.container.paused


def test_paused_exec_can_exit(registry: Registry) -> None:
    """A paused process can be killed (SIGKILL reaches stopped processes)."""
    record = running(registry)
    registry.pause(record.container)
    registry.mark_exited(record, 137)
    assert record.state is ExecState.EXITED
    assert record.exit_code == 137
    assert state_of(record.container) is ExecState.PAUSED  # still paused until resumed
    registry.resume(record.container)
    assert state_of(record.container) is ExecState.EXITED


# -- container state (PROTOCOL 9.2) ----------------------------------------------------------


def container_with(registry: Registry, *states: str) -> ContainerRecord:
    """A container ``c1`` with one exec per state in ``states``."""
    for i, state in enumerate(states):
        record = registry.register("c1", f"e{i}")
        if state in ("running", "exited"):
            registry.mark_started(record)
        if state == "exited":
            registry.mark_exited(record, 0)
    return registry.container("c1")


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (("pending",), ExecState.PENDING),
        (("running",), ExecState.RUNNING),
        (("exited",), ExecState.EXITED),
        (("exited", "exited"), ExecState.EXITED),
        (("pending", "running"), ExecState.RUNNING),
        (("exited", "running"), ExecState.RUNNING),
        (("running", "exited", "pending"), ExecState.RUNNING),
        (("exited", "pending"), ExecState.PENDING),
    ],
)
def test_container_state(registry: Registry, states: tuple[str, ...], expected: ExecState) -> None:
    assert container_with(registry, *states).state is expected


@pytest.mark.parametrize("others", [(), ("exited",), ("pending",), ("exited", "pending")])
def test_paused_container_is_paused_whatever_its_execs(
    registry: Registry, others: tuple[str, ...]
) -> None:
    container = container_with(registry, "running", *others)
    registry.pause(container)
    assert state_of(container) is ExecState.PAUSED
    registry.resume(container)
    assert state_of(container) is ExecState.RUNNING


def test_container_without_execs_is_pending() -> None:
    assert ContainerRecord("c1").state is ExecState.PENDING


def test_container_times_come_from_first_started_and_last_exited(
    registry: Registry, clock: FakeClock
) -> None:
    a = registry.register("c1", "a")
    b = registry.register("c1", "b")
    container = registry.container("c1")
    assert container.first_started() is None
    assert container.last_exited() is None
    clock.advance(1)
    registry.mark_started(b)
    clock.advance(1)
    registry.mark_started(a)
    assert container.first_started() is b
    assert b.started_at_ns == a.started_at_ns - 1_000_000_000
    clock.advance(1)
    registry.mark_exited(b, 2)
    clock.advance(1)
    registry.mark_exited(a, 3)
    assert container.last_exited() is a
    assert a.finished_at_ns == clock.wall
    assert a.exit_code == 3


# -- retention and removal (PROTOCOL 11.2) ---------------------------------------------------


def test_expired_honours_retention_exactly(registry: Registry, clock: FakeClock) -> None:
    record = running(registry)
    alive = running(registry, "c1", "alive")
    never = registry.register("c2", "never")
    clock.advance(5)
    registry.mark_exited(record, 0)
    exited_at = clock.mono
    assert record.exited_at == exited_at
    assert registry.expired(RETENTION) == []
    clock.mono = exited_at + RETENTION - 1e-6
    assert registry.expired(RETENTION) == []
    clock.mono = exited_at + RETENTION
    assert registry.expired(RETENTION) == [record]
    clock.mono = exited_at + 10 * RETENTION
    assert registry.expired(RETENTION) == [record]  # running and pending execs never expire
    assert alive not in registry.expired(0) and never not in registry.expired(0)


def test_expired_with_zero_retention_is_immediate(registry: Registry) -> None:
    record = running(registry)
    registry.mark_exited(record, 0)
    assert registry.expired(0) == [record]


def test_expired_lists_each_exec_by_its_own_exit(registry: Registry, clock: FakeClock) -> None:
    first = running(registry, "c1", "first")
    second = running(registry, "c2", "second")
    registry.mark_exited(first, 0)
    clock.advance(10)
    registry.mark_exited(second, 0)
    clock.advance(RETENTION - 10)
    assert registry.expired(RETENTION) == [first]
    clock.advance(10)
    assert registry.expired(RETENTION) == [first, second]


def test_removing_the_last_exec_removes_the_container(registry: Registry) -> None:
    old = running(registry)
    registry.mark_exited(old, 0)
    registry.remove(old)
    assert old.state is ExecState.REMOVED
    assert list(registry) == []
    with expect_error(ErrorCode.NOT_FOUND, "'c1'"):
        registry.container("c1")
    with expect_error(ErrorCode.NOT_FOUND):
        registry.get("c1", "e1")
    assert registry.find("c1", "e1") is None
    mark = registry.events.next_sequence - 1

    new = registry.register("c1", "e1")
    assert new is not old
    assert new.container is not old.container
    assert new.state is ExecState.PENDING
    assert new.log.next_sequence == 1
    assert new.exit_code is None
    assert registry.get("c1", "e1") is new
    assert summary(registry, mark) == [
        ("created", "", "pending", 0),
        ("registered", "e1", "pending", 0),
    ]


def test_removing_one_of_two_execs_keeps_the_container(registry: Registry) -> None:
    a = registry.register("c1", "a")
    b = registry.register("c1", "b")
    registry.remove(a)
    assert registry.container("c1").execs == {"b": b}
    assert [e.event_type for e in events(registry)][-1] == "unregistered"
    with expect_error(ErrorCode.NOT_FOUND, "'a'"):
        registry.get("c1", "a")


# -- attach (PROTOCOL 6.1) -------------------------------------------------------------------


def test_attach_replays_from_the_requested_sequence(registry: Registry) -> None:
    record = registry.register("c1", "e1")
    for data in (b"a", b"b", b"c"):
        record.log.append(Stream.STDOUT, data, 1)
    assert [c.data for c in registry.attach(record, 0).read().items] == [b"a", b"b", b"c"]
    assert [c.data for c in registry.attach(record, 2).read().items] == [b"b", b"c"]
    assert registry.attach(record, 4).read().items == []
    assert record.clients == 3


@pytest.mark.parametrize("beyond", [5, 1000])
def test_attach_past_the_end_is_out_of_range_and_counts_no_client(
    registry: Registry, beyond: int
) -> None:
    record = registry.register("c1", "e1")
    for data in (b"a", b"b", b"c"):
        record.log.append(Stream.STDOUT, data, 1)
    registry.attach(record, 0)
    before = snapshot(registry)
    with expect_error(ErrorCode.OUT_OF_RANGE, str(beyond)):
        registry.attach(record, beyond)
    assert record.clients == 1
    assert snapshot(registry) == before


def test_attach_after_exit_sees_exit_code(registry: Registry) -> None:
    record = running(registry)
    record.log.append(Stream.STDERR, b"last words", 1)
    registry.mark_exited(record, 3)
    cursor = registry.attach(record, 0)
    assert [c.data for c in cursor.read().items] == [b"last words"]
    assert cursor.caught_up
    assert cursor.log is record.log
    assert record.log.exit_code == 3


def ran(registry: Registry, exec_id: str, marks: range) -> ExecRecord:
    """Exec ``c1/exec_id``, started and exited after writing a 10,000-byte chunk of each
    byte in ``marks``."""
    record = running(registry, "c1", exec_id)
    for i, mark in enumerate(marks):
        record.log.append(Stream.STDOUT, bytes([mark]) * 10_000, i)
    registry.mark_exited(record, 0)
    return record


def test_output_of_a_removed_exec_stays_for_the_clients_still_reading_it(
    clock: FakeClock, tmp_path: Path
) -> None:
    """PROTOCOL 6.7 and 11.2: removal makes the exec NOT_FOUND at once, but a client already
    attached and behind still reads every chunk; the files go with the last client."""
    registry = Registry(Limits(memory_cache_bytes=65536), clock, storage=DirectoryArea(tmp_path))
    record = ran(registry, "e1", range(50))
    slow = registry.attach(record, 0)
    registry.remove(record)
    with expect_error(ErrorCode.NOT_FOUND):
        registry.get("c1", "e1")
    got = []
    while not slow.caught_up:
        read = slow.read(max_cost=30_000)
        assert read.gap_before == 0
        got += read.items
    assert [c.data[0] for c in got] == list(range(50))
    assert list((tmp_path / "c1").glob("e1.*.seg"))
    registry.detach(record)
    assert not (tmp_path / "c1").exists()


def test_a_new_exec_with_the_ids_of_a_removed_one_still_read_has_files_of_its_own(
    clock: FakeClock, tmp_path: Path
) -> None:
    """PROTOCOL 11.2: the IDs are free again at once, while a client still reads the removed
    exec's output: neither exec's output is mixed with, or removed with, the other's."""
    registry = Registry(Limits(memory_cache_bytes=65536), clock, storage=DirectoryArea(tmp_path))
    old = ran(registry, "e1", range(20))
    slow = registry.attach(old, 0)
    registry.remove(old)
    new = ran(registry, "e1", range(100, 120))
    got = []
    while not slow.caught_up:
        got += slow.read(max_cost=30_000).items
    assert [c.data[0] for c in got] == list(range(20))
    registry.detach(old)
    assert [c.data[0] for c in new.log.read(0, max_cost=1 << 30).items] == list(range(100, 120))


def test_an_event_goes_only_to_the_subscriptions_it_matches(registry: Registry) -> None:
    """PROTOCOL 8.3: everything, a container's events, an exec's events; each subscription
    is handed only what matches, and woken only for that."""
    woken: list[str] = []
    log = registry.events
    everything = log.subscribe("", "", lambda: woken.append("all"))
    container = log.subscribe("c1", "", lambda: woken.append("c1"))
    one_exec = log.subscribe("c1", "e2", lambda: woken.append("c1/e2"))
    other = log.subscribe("c9", "", lambda: woken.append("c9"))
    registry.register("c1", "e1")  # created, registered
    registry.register("c1", "e2")  # registered
    assert woken == ["all", "c1", "all", "c1", "all", "c1", "c1/e2"]

    def kinds(subscription: EventSubscription) -> list[tuple[str, str]]:
        taken, dropped = subscription.take()
        assert dropped == 0
        return [(e.exec_id, e.event_type) for e in taken]

    assert kinds(everything) == [("", "created"), ("e1", "registered"), ("e2", "registered")]
    assert kinds(everything) == []  # taken once
    assert kinds(container) == [("", "created"), ("e1", "registered"), ("e2", "registered")]
    assert kinds(one_exec) == [("e2", "registered")]
    assert kinds(other) == []
    log.unsubscribe(one_exec)
    registry.register("c1", "e3")
    assert kinds(one_exec) == []


def test_a_subscription_that_is_not_taken_counts_what_it_drops(clock: FakeClock) -> None:
    """PROTOCOL 8.5: at most the history bound waits; the dropped are the gap before the
    first event taken.  Events of other containers never count (8.3)."""
    registry = Registry(Limits(event_history=3), clock)
    subscription = registry.events.subscribe("c1", "", lambda: None)
    for i in range(4):
        registry.register("c2", f"e{i}")  # not c1's: never held, never a gap
    for i in range(5):
        registry.register("c1", f"e{i}")  # created + 5 registered = 6 events
    taken, dropped = subscription.take()
    assert dropped == 3
    assert [e.exec_id for e in taken] == ["e2", "e3", "e4"]
    assert subscription.take() == ([], 0)


def test_clients_reading_when_the_exec_exits_keep_its_cache_until_the_last_leaves(
    registry: Registry,
) -> None:
    """The newest chunks stay shared by the clients still reading them when the exec exits;
    once nobody reads, the exited exec holds no output in memory (its storage has it all)."""
    record = running(registry)
    record.log.append(Stream.STDOUT, b"x" * 100, 1)
    first, second = registry.attach(record, 0), registry.attach(record, 0)
    registry.mark_exited(record, 0)
    assert record.log.cached_from == 1
    assert [c.data for c in first.read().items] == [b"x" * 100]
    registry.detach(record)
    assert record.log.cached_from == 1, "one client is still reading"
    registry.detach(record)
    assert record.log.cached_from == record.log.next_sequence == 2
    assert [c.data for c in second.read().items] == [b"x" * 100]  # from storage


def test_an_exec_that_exits_without_clients_lets_its_cache_go(registry: Registry) -> None:
    record = running(registry)
    record.log.append(Stream.STDOUT, b"x" * 100, 1)
    registry.mark_exited(record, 0)
    assert record.log.cached_from == record.log.next_sequence
