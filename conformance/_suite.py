"""The whole suite: every case module imported once, cases in clause order, and selection.

Selection works like h2spec's: ``--case`` takes ID prefixes (``session/3``, ``errors``,
``lifecycle/8.4/replay-from-sequence``) or bare clause numbers (``3.1``, ``10``); a prefix
matches only at a boundary, so ``session/3`` selects 3.x but never a hypothetical 31.x, and
``1`` selects 1.x but not 10.x.  ``--exclude-case`` takes the same forms.  ``--level must``
keeps only MUST cases.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import (  # noqa: F401 - imported for their @case registrations
    _cases_common,
    _cases_control,
    _cases_input,
    _cases_lifecycle,
    _cases_replay,
    _cases_session,
)
from ._case import REGISTRY, Case
from ._clauses import Level

__all__ = ["CASES", "matches", "select"]


def _clause_key(clause: str) -> tuple[int, ...]:
    return tuple(int(part) for part in clause.split("."))


#: Every case of the suite, ordered by clause, then as declared.
CASES: tuple[Case, ...] = tuple(sorted(REGISTRY.values(), key=lambda c: _clause_key(c.clause)))


def _prefix_of(text: str, prefix: str) -> bool:
    if not text.startswith(prefix):
        return False
    if len(text) == len(prefix) or prefix.endswith(("/", ".")):
        return True
    # Inside the slug (after AREA/CLAUSE/) any prefix is fine; before it, only at a boundary.
    return prefix.count("/") >= 2 or text[len(prefix)] in "/."


_ERROR_TABLE = {"errors", "errors/14", "errors/14.1", "14", "14.1"}


def matches(case: Case, pattern: str) -> bool:
    """``pattern`` selects ``case``: an ID prefix, or a clause-number prefix."""
    pattern = pattern.strip()
    if not pattern:
        return False
    if case.row and pattern.rstrip("/") in _ERROR_TABLE:
        return True  # the cases of the rows of 14.1, wherever their own clause is
    return _prefix_of(case.id, pattern) or _prefix_of(case.id.split("/", 1)[1], pattern)


def select(
    cases: Iterable[Case] = CASES,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    level: Level | None = None,
) -> list[Case]:
    """The cases chosen by ``include`` prefixes (all if none), minus ``exclude``, at
    ``level`` (MUST: only MUST cases; SHOULD or None: all)."""
    chosen = []
    for case in cases:
        if include and not any(matches(case, p) for p in include):
            continue
        if any(matches(case, p) for p in exclude):
            continue
        if level is Level.MUST and case.level is not Level.MUST:
            continue
        chosen.append(case)
    return chosen
