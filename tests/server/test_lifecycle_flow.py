"""The lifecycle flow on its own, synchronously: filter, cut, replay, live events and gaps
(PROTOCOL 8.3-8.5, 13.1).  Over gRPC the same rules are checked by tests/server/test_control.py
and the conformance suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from execstream.server._errors import ErrorCode, ExecError
from execstream.server._lifecycle import LifecycleFlow, Sent
from execstream.server._registry import Limits, Registry
from execstream.server._storage import MemoryArea


@pytest.fixture
def registry() -> Iterator[Registry]:
    registry = Registry(Limits(event_history=8, max_subscribers=3), storage=MemoryArea())
    yield registry
    registry.close()


class Wake:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def drain(flow: LifecycleFlow) -> list[Sent]:
    """Everything due now, as the glue takes it: batches until the flow waits."""
    sent: list[Sent] = []
    for _ in range(100):
        batch = flow.next_events()
        sent += batch
        if not batch and flow.waiting:
            return sent
    raise AssertionError("the flow never waits")


def described(sent: list[Sent]) -> list[tuple[str, str, bool, int]]:
    return [(s.event.exec_id, s.event.event_type, s.is_replay, s.gap_before) for s in sent]


def test_without_replay_only_what_follows_the_cut_is_sent(registry: Registry) -> None:
    """PROTOCOL 8.4: the cut is the last event so far; nothing before it is sent."""
    registry.register("c1", "e1")  # created, registered: sequences 1, 2
    wake = Wake()
    flow = LifecycleFlow(registry, "", "", None, wake)
    assert flow.last_sequence == 2
    assert flow.waiting
    assert drain(flow) == []
    registry.register("c1", "e2")
    assert wake.count == 1
    assert described(drain(flow)) == [("e2", "registered", False, 0)]
    flow.close()


def test_replay_then_live_with_nothing_lost_or_doubled(registry: Registry) -> None:
    """PROTOCOL 8.4: the history up to the cut is replayed; events after it come live, each
    once, even when they happen before the replay is read."""
    registry.register("c1", "e1")
    flow = LifecycleFlow(registry, "", "", 1, Wake())
    assert not flow.waiting
    registry.register("c1", "e2")  # after the cut, before the replay is read
    sent = drain(flow)
    assert [s.event.sequence for s in sent] == [1, 2, 3]
    assert [s.is_replay for s in sent] == [True, True, False]
    assert all(s.gap_before == 0 for s in sent)
    flow.close()


def test_the_filter_holds_for_the_replay_and_for_live_events(registry: Registry) -> None:
    """PROTOCOL 8.3: one container's events, or one exec's."""
    registry.register("c1", "e1")
    registry.register("c2", "e1")
    by_exec = LifecycleFlow(registry, "c1", "e1", 1, Wake())
    by_container_wake = Wake()
    by_container = LifecycleFlow(registry, "c2", "", 1, by_container_wake)
    registry.register("c1", "e2")
    assert described(drain(by_exec)) == [("e1", "registered", True, 0)]
    assert by_container_wake.count == 0  # c1's events never wake c2's subscriber
    assert described(drain(by_container)) == [
        ("", "created", True, 0),
        ("e1", "registered", True, 0),
    ]
    by_exec.close()
    by_container.close()


@pytest.mark.parametrize(
    ("container_id", "exec_id", "code", "words"),
    [
        ("", "e1", ErrorCode.INVALID_ARGUMENT, "exec_id needs container_id"),
        ("bad/id", "", ErrorCode.INVALID_ARGUMENT, "container_id"),
        ("c1", "bad id", ErrorCode.INVALID_ARGUMENT, "exec_id"),
    ],
)
def test_a_bad_filter_is_refused_and_not_counted(
    registry: Registry, container_id: str, exec_id: str, code: ErrorCode, words: str
) -> None:
    with pytest.raises(ExecError) as refused:
        LifecycleFlow(registry, container_id, exec_id, None, Wake())
    assert refused.value.code is code
    assert words in refused.value.message
    assert registry.subscribers == 0


def test_a_replay_past_the_history_is_out_of_range_and_not_counted(registry: Registry) -> None:
    registry.register("c1", "e1")
    with pytest.raises(ExecError) as refused:
        LifecycleFlow(registry, "", "", 4, Wake())
    assert refused.value.code is ErrorCode.OUT_OF_RANGE
    assert registry.subscribers == 0
    LifecycleFlow(registry, "", "", 3, Wake()).close()  # the next sequence itself is fine


def test_subscribers_are_counted_until_closed(registry: Registry) -> None:
    """PROTOCOL 13.1: past the limit, RESOURCE_EXHAUSTED naming it; a closed flow no longer
    counts, and closing twice changes nothing."""
    flows = [LifecycleFlow(registry, "", "", None, Wake()) for _ in range(3)]
    with pytest.raises(ExecError) as refused:
        LifecycleFlow(registry, "", "", None, Wake())
    assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "max_subscribers" in refused.value.message
    flows[0].close()
    flows[0].close()
    assert registry.subscribers == 2
    registry.register("c1", "e1")
    assert drain(flows[0]) == []  # closed: no longer handed events
    flows.append(LifecycleFlow(registry, "", "", None, Wake()))
    for flow in flows[1:]:
        flow.close()
    assert registry.subscribers == 0


def test_events_evicted_before_the_replay_reached_them_are_the_first_gap(
    registry: Registry,
) -> None:
    """PROTOCOL 8.5: the history keeps 8 events; a replay from 1 after 10 is told of 2."""
    for i in range(5):
        registry.register("c1", f"e{i}")  # created + 5 registered = 6
    for i in range(4):
        registry.register("c2", f"e{i}")  # created + 4 registered = 5: 11 in all
    flow = LifecycleFlow(registry, "c1", "", 1, Wake())
    sent = drain(flow)
    # 1-3 are gone; 4-6 are c1's (e2..e4), 7-11 are c2's: filtered out, never a gap
    assert [(s.event.sequence, s.gap_before) for s in sent] == [(4, 3), (5, 0), (6, 0)]
    flow.close()


def test_a_gap_with_no_matching_event_after_it_waits_for_the_next_one(
    registry: Registry,
) -> None:
    """PROTOCOL 8.5: missed events are reported on the next event sent, even a live one."""
    for i in range(9):
        registry.register("c2", f"e{i}")  # created + 9 = 10 events; 1 and 2 are evicted
    flow = LifecycleFlow(registry, "c1", "", 1, Wake())
    assert drain(flow) == []  # the rest of the history is c2's
    registry.register("c1", "e1")
    assert described(drain(flow)) == [("", "created", False, 2), ("e1", "registered", False, 0)]
    flow.close()


def test_a_subscriber_that_falls_behind_is_told_what_it_dropped(registry: Registry) -> None:
    """PROTOCOL 8.5: at most the history bound of live events waits for a subscriber."""
    flow = LifecycleFlow(registry, "c1", "", None, Wake())
    for i in range(10):
        registry.register("c1", f"e{i}")  # created + 10 registered = 11, 8 kept
    sent = drain(flow)
    assert [s.event.sequence for s in sent] == list(range(4, 12))
    assert [s.gap_before for s in sent] == [3] + [0] * 7
    flow.close()
