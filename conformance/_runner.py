"""Runs cases against a target, concurrently and bounded, and gives each a verdict.

Verdicts, as in h2spec and Autobahn: PASS; FAIL when the target broke the requirement (the
case raised :class:`Failure`, or a call ended with a status the case did not expect); SKIP when
the case cannot run against this target (no token given, retention unknown); ERROR when the
harness could not do its part — the target is unreachable, the case overran its time bound, or
the case itself broke.  A FAIL after which the target no longer answers is turned into an
ERROR, since the failure is then more likely the connection's than the server's.

Before any case runs, a preflight connects to the target and makes one call; if that fails,
every selected case is an ERROR with the reason (nothing is reported as a conformance
failure of a server the suite never reached).  Cases run at most ``jobs`` at a time; heavy
cases (tens of MiB, dozens of processes) start first and at most a third of the slots at once,
so the timing-sensitive cases are not starved.
"""

from __future__ import annotations

import asyncio
import enum
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from execstream import wire

from ._case import Case, Failure, HarnessError, Skip
from ._clauses import CLAUSES, Level
from ._context import CaseContext
from ._target import Target

__all__ = ["CaseResult", "Verdict", "preflight", "run_case", "run_suite"]


class Verdict(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    ERROR = "ERROR"


@dataclass(slots=True)
class CaseResult:
    case: Case
    verdict: Verdict
    seconds: float
    message: str = ""
    expected: str = ""
    seen: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def counts(self) -> bool:
        """Whether this result makes the run fail: a MUST case that failed or errored."""
        return self.case.level is Level.MUST and self.verdict in (Verdict.FAIL, Verdict.ERROR)

    def to_json(self) -> dict[str, Any]:
        clause = CLAUSES[self.case.clause]
        return {
            "id": self.case.id,
            "clause": self.case.clause,
            "clause_title": clause.title,
            "level": self.case.level.value,
            "requirement": self.case.requirement,
            "row": self.case.row,
            "verdict": self.verdict.value,
            "seconds": round(self.seconds, 3),
            "message": self.message,
            "expected": self.expected,
            "seen": self.seen,
            "log": self.log,
        }


async def preflight(target: Target) -> str | None:
    """Why the target cannot be checked at all, or None when it answers."""
    channel = target.channel()
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), target.connect_timeout)
        except TimeoutError:
            return (
                f"target unreachable: no connection to {target.address} within "
                f"{target.connect_timeout:g} s"
            )
        stub = wire.ExecStub(channel)
        probe = wire.ContainerStatusRequest(container_id=f"cf-preflight-{uuid.uuid4().hex[:8]}")
        try:
            await stub.ContainerStatus(probe, metadata=target.metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code is grpc.StatusCode.UNAVAILABLE or code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"target unreachable: {code.name} {error.details()!r}"
            if code is grpc.StatusCode.UNIMPLEMENTED:
                return f"the target does not serve dagger.exec.Exec: {error.details()!r}"
            if code is grpc.StatusCode.UNAUTHENTICATED:
                if not target.token:
                    return "the target requires a token: pass --token"
                return f"the target refused the token given: {error.details()!r}"
        return None
    finally:
        await channel.close()


async def run_case(case: Case, target: Target) -> CaseResult:
    """Run one case in its own context; never raises (except cancellation)."""
    began = time.monotonic()
    ctx = CaseContext(target, case)
    verdict, message, expected, seen = Verdict.PASS, "", "", ""
    try:
        async with ctx:
            await asyncio.wait_for(case.run(ctx), case.timeout)
    except Failure as failure:
        verdict, expected, seen = Verdict.FAIL, failure.expected, failure.seen
        message = str(failure)
    except Skip as skip:
        verdict, message = Verdict.SKIP, str(skip)
    except TimeoutError:
        verdict = Verdict.ERROR
        message = f"harness timeout: the case did not finish within {case.timeout:g} s"
    except HarnessError as error:
        verdict, message = Verdict.ERROR, f"harness error: {error}"
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details()
        if code is grpc.StatusCode.UNAVAILABLE:
            verdict, message = Verdict.ERROR, f"target unreachable: {details!r}"
        else:
            verdict = Verdict.FAIL
            expected, seen = "the call to succeed", f"{code.name} {details!r}"
            message = f"unexpected status {code.name} {details!r}"
    except Exception as error:
        verdict = Verdict.ERROR
        message = f"harness error: {type(error).__name__}: {error}"
        ctx.log(traceback.format_exc())
    if verdict is Verdict.FAIL and await preflight(target) is not None:
        verdict = Verdict.ERROR
        message = f"target unreachable after: {message}"
    return CaseResult(case, verdict, time.monotonic() - began, message, expected, seen, ctx.lines)


async def run_suite(
    target: Target,
    cases: Sequence[Case],
    *,
    jobs: int = 4,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run ``cases`` against ``target``; results in the order of ``cases``."""
    report = on_result or (lambda _result: None)
    problem = await preflight(target)
    if problem is not None:
        failed = [CaseResult(c, Verdict.ERROR, 0.0, problem) for c in cases]
        for result in failed:
            report(result)
        return failed
    slots = asyncio.Semaphore(max(1, jobs))
    heavy_slots = asyncio.Semaphore(max(1, jobs // 3))
    results: dict[str, CaseResult] = {}

    async def one(case: Case) -> None:
        if case.heavy:
            async with heavy_slots, slots:
                result = await run_case(case, target)
        else:
            async with slots:
                result = await run_case(case, target)
        results[case.id] = result
        report(result)

    # Heavy and long cases first, so the run is not left waiting for them at the end.
    order = sorted(cases, key=lambda c: (not c.heavy, -c.timeout))
    tasks = [asyncio.create_task(one(c), name=c.id) for c in order]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return [results[c.id] for c in cases]
