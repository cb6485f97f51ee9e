"""The exec state machine: every state an exec can be in and every move between them.

Theory of operation.  An exec is registered (``PENDING``) before its process starts, runs,
may be paused with its container, exits, and is finally removed after retention
(PROTOCOL 9.2, 11.2).  Everything that affects these transitions lives here, as data: the
table ``TRANSITIONS`` maps a state and an event to the next state.  A move that is not in the
table is a failed lookup, turned into one clear :class:`IllegalTransition`.

No I/O and no asyncio or grpc imports: the registry drives this module synchronously.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = ["TRANSITIONS", "ExecInput", "ExecState", "IllegalTransition", "next_state"]


class ExecState(enum.Enum):
    """PROTOCOL 9.2; the value is what status and lifecycle events say on the wire."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    REMOVED = "removed"


class ExecInput(enum.Enum):
    """What moves an exec from one state to the next: the machine's inputs (not to be
    confused with the client's ``ExecEvent``, what a client receives)."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    EXIT = "exit"
    REMOVE = "remove"


_S, _E = ExecState, ExecInput

TRANSITIONS: Mapping[ExecState, Mapping[ExecInput, ExecState]] = {
    # An exec whose process never started (spawn failed) exits without running.
    _S.PENDING: {_E.START: _S.RUNNING, _E.EXIT: _S.EXITED, _E.REMOVE: _S.REMOVED},
    _S.RUNNING: {_E.PAUSE: _S.PAUSED, _E.EXIT: _S.EXITED, _E.REMOVE: _S.REMOVED},
    # A paused process can still die (SIGKILL reaches stopped processes).
    _S.PAUSED: {_E.RESUME: _S.RUNNING, _E.EXIT: _S.EXITED, _E.REMOVE: _S.REMOVED},
    _S.EXITED: {_E.REMOVE: _S.REMOVED},
    _S.REMOVED: {},
}


class IllegalTransition(Exception):
    """A caller asked for a move the table does not have: a bug in the caller."""

    def __init__(self, state: ExecState, event: ExecInput) -> None:
        allowed = ", ".join(e.value for e in TRANSITIONS[state]) or "nothing"
        super().__init__(
            f"exec in state {state.value!r} cannot {event.value!r} (allowed: {allowed})"
        )
        self.state = state
        self.event = event


def next_state(state: ExecState, event: ExecInput) -> ExecState:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None
