"""The blocking client is a twin of the async one (README: "a blocking twin of the same
surface"): the same public names, and each method takes the same parameters, so that the two
cannot drift apart.  Only the spelling of closing differs (``aclose``/``close``)."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

from execstream.client import (
    AsyncExecClient,
    EventStream,
    Exec,
    ExecClient,
    SyncEventStream,
    SyncExec,
)

TWINS = [(AsyncExecClient, ExecClient), (Exec, SyncExec), (EventStream, SyncEventStream)]
#: Async spelling -> blocking spelling.
RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}
#: Names only one side has, and why.
ONLY_ASYNC = {"__aiter__", "__anext__"}  # the blocking twins iterate with __iter__/__next__
ONLY_SYNC = {"__iter__", "__next__", "__del__"}


def public(cls: type) -> set[str]:
    names = {n for n in dir(cls) if not n.startswith("_")}
    # Public attributes set in __init__ (the blocking twin may offer them as properties).
    init = inspect.getsource(cls.__init__)  # type: ignore[misc]
    names |= set(re.findall(r"self\.([a-z]\w*)\s*[:=]", init))
    dunders = {"__aenter__", "__aexit__", "__enter__", "__exit__", "__aiter__", "__anext__"}
    return names | {n for n in dunders | ONLY_SYNC if n in vars(cls)}


def parameters(member: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(member, property):
        return [("<property>", None, None)]
    return [(p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()]


@pytest.mark.parametrize(("async_cls", "sync_cls"), TWINS, ids=lambda c: c.__name__)
def test_the_same_public_names(async_cls: type, sync_cls: type) -> None:
    expected = {RENAMED.get(n, n) for n in public(async_cls) - ONLY_ASYNC}
    assert public(sync_cls) - ONLY_SYNC == expected


@pytest.mark.parametrize(("async_cls", "sync_cls"), TWINS, ids=lambda c: c.__name__)
def test_the_same_parameters(async_cls: type, sync_cls: type) -> None:
    for name in sorted(public(async_cls) - ONLY_ASYNC):
        if name.startswith("__"):
            continue
        twin = RENAMED.get(name, name)
        seen = parameters(inspect.getattr_static(sync_cls, twin, property()))
        want = parameters(inspect.getattr_static(async_cls, name, property()))
        assert seen == want, f"{sync_cls.__name__}.{twin} vs {async_cls.__name__}.{name}"
