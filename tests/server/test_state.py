"""The exec state machine (``_state``): the table is the whole truth (PROTOCOL 9.2, 11.2)."""

from __future__ import annotations

import itertools

import pytest

from execstream.server._state import (
    TRANSITIONS,
    ExecInput,
    ExecState,
    IllegalTransition,
    next_state,
)

ALLOWED = [
    (state, event, target) for state, row in TRANSITIONS.items() for event, target in row.items()
]
FORBIDDEN = [
    (state, event)
    for state, event in itertools.product(ExecState, ExecInput)
    if event not in TRANSITIONS.get(state, {})
]


def _name(value: object) -> str:
    return value.name if isinstance(value, ExecState | ExecInput) else str(value)


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(ExecState)


@pytest.mark.parametrize(("state", "event", "target"), ALLOWED, ids=_name)
def test_allowed_transition(state: ExecState, event: ExecInput, target: ExecState) -> None:
    assert next_state(state, event) is target


@pytest.mark.parametrize(("state", "event"), FORBIDDEN, ids=_name)
def test_forbidden_transition_raises_naming_state_and_event(
    state: ExecState, event: ExecInput
) -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_state(state, event)
    message = str(caught.value)
    assert repr(state.value) in message
    assert repr(event.value) in message
    assert caught.value.state is state
    assert caught.value.event is event
    # The message lists what the state does allow, so the caller sees its mistake.
    for allowed in TRANSITIONS[state]:
        assert allowed.value in message


def test_table_and_forbidden_cover_every_pair() -> None:
    assert len(ALLOWED) + len(FORBIDDEN) == len(ExecState) * len(ExecInput)
    assert FORBIDDEN, "some moves must be illegal"


@pytest.mark.parametrize("event", list(ExecInput), ids=_name)
def test_removed_is_terminal(event: ExecInput) -> None:
    assert TRANSITIONS[ExecState.REMOVED] == {}
    with pytest.raises(IllegalTransition, match="allowed: nothing"):
        next_state(ExecState.REMOVED, event)


def test_every_state_reaches_removed() -> None:
    """No state is a dead end short of REMOVED: retention can always clean up (11.2)."""
    for state in ExecState:
        if state is not ExecState.REMOVED:
            assert next_state(state, ExecInput.REMOVE) is ExecState.REMOVED


def test_exited_only_moves_to_removed() -> None:
    """An exited exec never runs again: only removal follows (PROTOCOL 5.1, 11.2)."""
    assert dict(TRANSITIONS[ExecState.EXITED]) == {ExecInput.REMOVE: ExecState.REMOVED}


def test_states_carry_the_wire_values() -> None:
    """PROTOCOL 8.1/9.2: the enum values are what status and lifecycle events say."""
    assert {s.value for s in ExecState} == {"pending", "running", "paused", "exited", "removed"}
