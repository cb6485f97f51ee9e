"""The clauses of spec/PROTOCOL.md that the suite knows, and how case IDs are formed.

PROTOCOL.md is the document the suite checks; this module mirrors its clause headings
(``#### N.M Title [LEVEL]``) so that an installed suite, which has no copy of the spec, can
print a clause's number, title and level next to a failure.  A test of the project
(``tests/conformance/test_conformance_spec.py``) parses PROTOCOL.md and fails when this table
drifts from it, when a MUST clause has no case, or when a case names a clause that does not
exist.

Case IDs are ``AREA/CLAUSE/SLUG``, for example ``session/3.1/first-message-stdin``: the area is
derived from the clause's section (PROTOCOL 1.1 names cases ``session/3.2``), the clause is
the number of the heading, and the slug says what the case does.  IDs are never positional,
so adding a case never renames another; selecting by prefix (``session/3``, ``errors``)
respects the ``/`` and ``.`` boundaries, so ``session/3`` never selects ``session/31.x``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["AREAS", "CLAUSES", "NOT_CHECKED", "Clause", "Level", "area_of", "case_id"]


class Level(enum.Enum):
    """A clause's strongest keyword (PROTOCOL 1.1); cases are MUST or SHOULD."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"


@dataclass(frozen=True, slots=True)
class Clause:
    number: str
    title: str
    level: Level

    def __str__(self) -> str:
        return f"{self.number} {self.title} [{self.level.value}]"


_M, _S, _Y = Level.MUST, Level.SHOULD, Level.MAY

CLAUSES: dict[str, Clause] = {
    c.number: c
    for c in (
        Clause("1.1", "Keywords", _Y),
        Clause("1.2", "Terms", _Y),
        Clause("1.3", "Wire compatibility", _M),
        Clause("2.1", "Identifiers", _M),
        Clause("2.2", "Errors are status codes", _M),
        Clause("2.3", "Robustness", _M),
        Clause("2.4", "Time", _M),
        Clause("2.5", "Malformed messages", _M),
        Clause("3.1", "First message", _M),
        Clause("3.2", "Create or attach", _M),
        Clause("3.3", "Ready first", _M),
        Clause("3.4", "Client identity", _Y),
        Clause("3.5", "Isolation of clients", _M),
        Clause("3.6", "Half-close", _M),
        Clause("3.7", "Names the system refuses", _M),
        Clause("4.1", "Output travels as output_chunk", _M),
        Clause("4.2", "Sequence numbers", _M),
        Clause("4.3", "Every client gets every byte", _M),
        Clause("4.4", "Chunk size", _S),
        Clause("4.5", "Timestamps of chunks", _M),
        Clause("4.6", "TTY output", _M),
        Clause("5.1", "Exit after all output", _M),
        Clause("5.2", "Exit codes", _M),
        Clause("5.3", "Bounded drain", _S),
        Clause("6.1", "Replay from a sequence", _M),
        Clause("6.2", "Replayed chunks are marked", _M),
        Clause("6.3", "Ready marks the end of replay", _M),
        Clause("6.4", "Gaps are reported", _M),
        Clause("6.5", "Output is retained up to a limit", _M),
        Clause("6.6", "The exec never waits for clients", _M),
        Clause("6.7", "Slow clients lose nothing", _M),
        Clause("7.1", "Stdin", _M),
        Clause("7.2", "Stdin size", _M),
        Clause("7.3", "TTY and resize", _M),
        Clause("7.4", "The receive limit fits the stdin limit", _M),
        Clause("7.5", "Stdin closed from the start", _M),
        Clause("8.1", "Event types", _M),
        Clause("8.2", "Order and numbering", _M),
        Clause("8.3", "Filter", _M),
        Clause("8.4", "What a new subscriber sees", _M),
        Clause("8.5", "Slow subscribers", _M),
        Clause("9.1", "Container or exec", _M),
        Clause("9.2", "States", _M),
        Clause("9.3", "Times and exit code", _M),
        Clause("9.4", "Resource usage", _M),
        Clause("10.1", "Pause", _M),
        Clause("10.2", "Resume", _M),
        Clause("10.3", "Signal", _M),
        Clause("10.4", "Execs start with default signal handling", _M),
        Clause("11.1", "Exited execs stay attachable", _M),
        Clause("11.2", "Cleanup", _M),
        Clause("11.3", "Bounded retention", _Y),
        Clause("12.1", "Tokens", _M),
        Clause("12.2", "One authorization header", _M),
        Clause("13.1", "Limits are explicit", _M),
        Clause("13.2", "Shutdown", _S),
        Clause("13.3", "Exited execs do not count", _M),
        Clause("14.1", "Error table", _M),
    )
}

#: Clauses with no case, and why.  Only MAY and SHOULD clauses may appear here.
NOT_CHECKED: dict[str, str] = {
    "1.1": "defines the keywords; nothing to observe on the wire",
    "1.2": "defines terms; nothing to observe on the wire",
    "3.4": "client_id has no effect on the protocol (free-form, for logs)",
    "11.3": "the bound is optional and the target's value unknown; 13.3 checks what matters",
    "13.2": "needs the target to shut down; the suite does not control the target's process",
}

#: The area of each section, the first part of a case ID.
AREAS: dict[int, str] = {
    1: "wire",
    2: "common",
    3: "session",
    4: "session",
    5: "session",
    6: "session",
    7: "session",
    8: "lifecycle",
    9: "status",
    10: "control",
    11: "retention",
    12: "auth",
    13: "limits",
    14: "errors",
}


def area_of(clause: str) -> str:
    return AREAS[int(clause.split(".", 1)[0])]


def case_id(clause: str, slug: str) -> str:
    """``AREA/CLAUSE/SLUG`` for a case of ``clause`` (which must be in :data:`CLAUSES`)."""
    if clause not in CLAUSES:
        raise ValueError(f"no clause {clause} in PROTOCOL.md")
    return f"{area_of(clause)}/{clause}/{slug}"
