"""What every recorded call shares: the default bound, the wake-up on change, outcomes.

Streams are *recorded*, not interpreted: a recorded stream (a Session in
``_session_client``, a lifecycle subscription in ``_subscription``) keeps every message the
server sent, in order, and its final status; a unary call's end is an :class:`Outcome`.
Cases wait on recorded streams through :class:`Changes`, which wakes on every message (no
polling, no fixed sleeps) and turns a bound that passes into a :class:`Failure` that shows
what the stream held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ._case import Failure

__all__ = ["OK", "WITHIN", "Changes", "Outcome", "brief", "expect_code"]

OK = grpc.StatusCode.OK

#: Default bound for the server to finish something the case waits for.
WITHIN = 45.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a unary call ended: the status code and details, and the response if OK."""

    code: grpc.StatusCode
    details: str
    response: Any = None

    def __str__(self) -> str:
        if self.code is OK:
            return f"OK {brief(self.response)}"
        return f"{self.code.name} {self.details!r}"


def expect_code(outcome: Outcome, code: grpc.StatusCode, what: str) -> None:
    """``what`` must end with status ``code``, and a failure must say what was wrong (2.2)."""
    if outcome.code is not code:
        raise Failure(f"{what} fails with {code.name}", f"{outcome}")
    if code is not OK and not outcome.details.strip():
        raise Failure(f"{what} fails with {code.name} and a message", "an empty message")


def brief(message: Any, limit: int = 200) -> str:
    if message is None:
        return ""
    text = repr(message)
    return text if len(text) <= limit else text[:limit] + "..."


class Changes:
    """Wakes waiters whenever a recorded stream changes; :meth:`until` bounds the wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.done = False

    def notify(self) -> None:
        self._event.set()

    async def until(
        self, predicate: Callable[[], bool], what: str, within: float, seen: Callable[[], str]
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            if self.done:
                raise Failure(what, f"the stream ended first: {seen()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Failure(f"{what} within {within:g} s", seen())
            self._event.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and the case would run on after Ctrl-C.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._event.wait()
