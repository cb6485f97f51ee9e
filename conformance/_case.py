"""What a case is, how it says it failed, and the registry the case modules fill.

A case is an async function of a :class:`~execstream.conformance._context.CaseContext`,
declared with :func:`case`: it gets a stable ID (``AREA/CLAUSE/SLUG``, see ``_clauses``), a
level, a one-line requirement and, when it checks a row of PROTOCOL 14.1, that row.  It
passes by returning.  It fails by raising :class:`Failure` with what was expected and what was
seen — a *conformance* failure, the target broke the clause — which the runner reports apart
from a harness problem (:class:`HarnessError`, an unreachable target, a timeout, a bug in the
case), as h2spec and Autobahn do.  :class:`Skip` says the case cannot run against this target
(for example no token was given for 12.1) and why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._clauses import CLAUSES, Level, area_of, case_id

if TYPE_CHECKING:
    from ._context import CaseContext

__all__ = [
    "REGISTRY",
    "RPCS_OF_AREA",
    "Case",
    "Failure",
    "HarnessError",
    "Skip",
    "case",
    "expect",
    "expect_equal",
]

CaseFunction = Callable[["CaseContext"], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One check of one clause."""

    id: str
    clause: str
    level: Level
    requirement: str
    run: CaseFunction = field(repr=False, compare=False)
    #: The row of PROTOCOL 14.1 this case checks, as ``"RPC: condition"`` of the table.
    row: str | None = None
    #: The status code name the row prescribes (``"NOT_FOUND"``), with ``row``.
    status: str | None = None
    #: Seconds after which the runner gives up on the case (a harness ERROR).
    timeout: float = 90.0
    #: Heavy cases (many MiB, many processes) are started first and fewer at a time.
    heavy: bool = False
    #: What the case needs of the target: settings (``"retention"``, ``"token"``), or
    #: ``"create"``: it checks creation over the wire (``Start{command}``, 3.2), so it skips
    #: when the target's execs come from a driver.
    needs: tuple[str, ...] = ()
    #: The RPCs whose behaviour the case checks (default: those of its clause, see
    #: :data:`RPCS_OF_AREA`); ``None`` for all it calls.  An RPC the target answers with
    #: UNIMPLEMENTED fails the cases that check it and skips those that only use it as a helper.
    checks_rpcs: tuple[str, ...] | None = ()

    @property
    def rpcs(self) -> tuple[str, ...] | None:
        """The RPCs the case checks; ``None``: every RPC it calls."""
        if self.checks_rpcs is None or self.checks_rpcs:
            return self.checks_rpcs
        return RPCS_OF_CLAUSE.get(self.clause) or RPCS_OF_AREA.get(area_of(self.clause))

    @property
    def clauses(self) -> tuple[str, ...]:
        """The clauses the case checks: its own, and 14.1 when it checks an error row."""
        return (self.clause, "14.1") if self.row else (self.clause,)


#: The RPCs each area's cases check (PROTOCOL 3-7 and 11 are about Session, 8 lifecycle, ...);
#: areas not listed (wire, common, auth, limits) check every RPC their cases call.
RPCS_OF_AREA: dict[str, tuple[str, ...]] = {
    "session": ("Session",),
    "retention": ("Session",),
    "lifecycle": ("ContainerLifecycle",),
    "status": ("ContainerStatus",),
    "control": ("ContainerPause", "ContainerResume", "ContainerSignal"),
}
RPCS_OF_CLAUSE: dict[str, tuple[str, ...]] = {
    "10.1": ("ContainerPause",),
    "10.2": ("ContainerResume",),
    "10.3": ("ContainerSignal",),
}

#: Every case, in declaration order, filled by the case modules when they are imported.
REGISTRY: dict[str, Case] = {}


def case(
    clause: str,
    slug: str,
    requirement: str,
    *,
    level: Level | None = None,
    row: str | None = None,
    status: str | None = None,
    timeout: float = 90.0,
    heavy: bool = False,
    needs: tuple[str, ...] = (),
    rpcs: tuple[str, ...] | None = (),
) -> Callable[[CaseFunction], CaseFunction]:
    """Declare the decorated function a case of ``clause`` named ``slug``."""
    identifier = case_id(clause, slug)
    chosen = level or CLAUSES[clause].level
    if chosen is Level.MAY:
        raise ValueError(f"{identifier}: cases are MUST or SHOULD")
    if (row is None) != (status is None):
        raise ValueError(f"{identifier}: give both row and status, or neither")

    def register(run: CaseFunction) -> CaseFunction:
        if identifier in REGISTRY:
            raise ValueError(f"two cases are named {identifier}")
        REGISTRY[identifier] = Case(
            id=identifier,
            clause=clause,
            level=chosen,
            requirement=requirement,
            run=run,
            row=row,
            status=status,
            timeout=timeout,
            heavy=heavy,
            needs=needs,
            checks_rpcs=rpcs,
        )
        return run

    return register


class Failure(Exception):
    """The target broke the requirement: ``expected`` is what the spec asks, ``seen`` what came
    back."""

    def __init__(self, expected: str, seen: str) -> None:
        super().__init__(f"expected {expected}; seen {seen}")
        self.expected = expected
        self.seen = seen


class Skip(Exception):
    """The case cannot run against this target; the message says why."""


class HarnessError(Exception):
    """The suite could not do its part (target unreachable, timed out, broken case)."""


def expect(condition: bool, expected: str, seen: object) -> None:
    if not condition:
        raise Failure(expected, seen if isinstance(seen, str) else repr(seen))


def expect_equal(seen: Any, want: Any, what: str) -> None:
    if seen != want:
        raise Failure(f"{what} = {_short(want)}", f"{what} = {_short(seen)}")


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
