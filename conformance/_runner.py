"""Runs cases against a target, concurrently and bounded, and gives each a verdict.

Verdicts, as in h2spec and Autobahn: PASS; FAIL when the target broke the requirement (the
case raised :class:`Failure`, or a call ended with a status the case did not expect); SKIP when
the case cannot run against this target (no token given, retention unknown); ERROR when the
harness could not do its part — the target is unreachable, the case overran its time bound, or
the case itself broke.  A FAIL after which the target no longer answers is turned into an
ERROR, since the failure is then more likely the connection's than the server's.

Before any case runs, a preflight checks that the target answers and takes the token; if not,
every selected case is an ERROR with the reason (nothing is reported as a conformance
failure of a server the suite never reached).  A target that implements only some RPCs is
checked all the same: a case fails with "X is not implemented" when it checks an RPC the
target answers with UNIMPLEMENTED, and skips when it only uses that RPC as a helper.  Cases
run at most ``jobs`` at a time; heavy cases (tens of MiB, dozens of processes) start first and
at most a third of the slots at once, so the timing-sensitive cases are not starved.
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

__all__ = ["CaseResult", "SuiteInterrupted", "Verdict", "preflight", "run_case", "run_suite"]


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
    """Why the target cannot be checked at all, or None when it answers.

    Only reachability and the token are checked: a server that implements some RPCs and not
    others is still checked, and each RPC it does not implement fails its own cases.  It is
    refused only when it implements neither Session nor ContainerStatus (then it is not a
    ``dagger.exec.Exec`` server at all)."""
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
        unknown = f"cf-preflight-{uuid.uuid4().hex[:8]}"
        unimplemented: list[str] = []
        for rpc in ("ContainerStatus", "Session"):
            if rpc == "Session":
                code, details = await _probe_session(stub, target, unknown)
            else:
                code, details = await _probe_status(stub, target, unknown)
            if code is grpc.StatusCode.UNAVAILABLE or code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"target unreachable: {code.name} {details!r}"
            if code is grpc.StatusCode.UNAUTHENTICATED:
                if not target.token:
                    return "the target requires a token: pass --token"
                return f"the target refused the token given: {details!r}"
            if code is not grpc.StatusCode.UNIMPLEMENTED:
                return None
            unimplemented.append(f"{rpc}: {details!r}")
        return (
            "the target does not serve dagger.exec.Exec (UNIMPLEMENTED "
            + "; ".join(unimplemented)
            + ")"
        )
    finally:
        await channel.close()


async def _probe_status(
    stub: wire.ExecStub, target: Target, container_id: str
) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.ContainerStatus(
            wire.ContainerStatusRequest(container_id=container_id),
            metadata=target.metadata,
            timeout=10,
        )
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def _probe_session(
    stub: wire.ExecStub, target: Target, container_id: str
) -> tuple[grpc.StatusCode, str]:
    """Attach to an exec that does not exist: NOT_FOUND from a working server (3.2)."""
    call = stub.Session(None, metadata=target.metadata, timeout=10)
    try:
        start = wire.Start(container_id=container_id, exec_id="preflight")
        await call.write(wire.SessionRequest(start=start))
        await call.done_writing()
        while isinstance(await call.read(), wire.SessionResponse):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    except (asyncio.InvalidStateError, grpc.aio.UsageError):
        pass  # the server ended the call while we wrote: its status says how
    finally:
        call.cancel()
    code = await call.code()
    return code, await call.details() or ""


def _unimplemented_verdict(
    case: Case, unimplemented: dict[str, str]
) -> tuple[Verdict, str, str, str]:
    """A case that met an UNIMPLEMENTED RPC: FAIL when it checks that RPC, else SKIP."""
    checked = case.rpcs
    own = [rpc for rpc in unimplemented if checked is None or rpc in checked]
    if own:
        rpc = own[0]
        return (
            Verdict.FAIL,
            f"{rpc} is not implemented",
            f"{rpc} implemented (PROTOCOL {case.clause})",
            f"UNIMPLEMENTED {unimplemented[rpc]!r}",
        )
    helpers = ", ".join(sorted(unimplemented))
    return (
        Verdict.SKIP,
        f"uses {helpers} as a helper, which the target does not implement",
        "",
        "",
    )


def _cannot_run(case: Case, target: Target) -> str | None:
    """Why ``case`` skips against ``target`` before it starts, if it does."""
    if "create" in case.needs and not target.driver.over_wire:
        return (
            "checks creation over the wire (Start with a command); the target's execs come "
            f"from the driver {target.driver.name}"
        )
    return None


async def run_case(case: Case, target: Target) -> CaseResult:
    """Run one case in its own context; never raises (except cancellation)."""
    began = time.monotonic()
    reason = _cannot_run(case, target)
    if reason is not None:
        return CaseResult(case, Verdict.SKIP, 0.0, reason)
    ctx = CaseContext(target, case)
    verdict, message, expected, seen = Verdict.PASS, "", "", ""
    try:
        # The case runs in this task (asyncio.timeout, not wait_for's inner task), so a
        # cancellation reaches it directly and nothing it raises goes unretrieved.
        async with ctx, asyncio.timeout(case.timeout):
            await case.run(ctx)
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
        code, details = error.code(), error.details() or ""
        if code is grpc.StatusCode.UNAVAILABLE:
            verdict, message = Verdict.ERROR, f"target unreachable: {details!r}"
        else:
            ctx.note_status("an RPC", code, details)
            verdict = Verdict.FAIL
            expected, seen = "the call to succeed", f"{code.name} {details!r}"
            message = f"unexpected status {code.name} {details!r}"
    except Exception as error:
        verdict = Verdict.ERROR
        message = f"harness error: {type(error).__name__}: {error}"
        ctx.log(traceback.format_exc())
    if verdict in (Verdict.FAIL, Verdict.ERROR) and ctx.unimplemented:
        ctx.log(f"   the target does not implement {', '.join(sorted(ctx.unimplemented))}")
        verdict, message, expected, seen = _unimplemented_verdict(case, ctx.unimplemented)
    if verdict is Verdict.FAIL and await preflight(target) is not None:
        verdict = Verdict.ERROR
        message = f"target unreachable after: {message}"
    return CaseResult(case, verdict, time.monotonic() - began, message, expected, seen, ctx.lines)


class SuiteInterrupted(Exception):
    """The run was interrupted (Ctrl-C): ``results`` has a verdict for every case, ERROR for
    those that did not finish."""

    def __init__(self, results: list[CaseResult]) -> None:
        super().__init__("interrupted")
        self.results = results


async def run_suite(
    target: Target,
    cases: Sequence[Case],
    *,
    jobs: int = 4,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run ``cases`` against ``target``; results in the order of ``cases``.

    Every task the run starts has ended when it returns.  When the target stops answering
    mid-run, the cases not yet started are ERRORs at once rather than each waiting on a dead
    target.  When the run is cancelled (Ctrl-C), every case still running is cancelled and
    cleaned up, and :class:`SuiteInterrupted` carries the results, ERROR for the unfinished.
    """
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
    lost: list[str] = []

    async def one(case: Case) -> None:
        if case.heavy:
            async with heavy_slots, slots:
                result = await _run_unless_lost(case)
        else:
            async with slots:
                result = await _run_unless_lost(case)
        results[case.id] = result
        report(result)

    async def _run_unless_lost(case: Case) -> CaseResult:
        if lost:
            return CaseResult(case, Verdict.ERROR, 0.0, lost[0])
        result = await run_case(case, target)
        if result.verdict is Verdict.ERROR and "unreachable" in result.message and not lost:
            problem = await preflight(target)
            if problem is not None:
                lost.append(f"not run: {problem} (since {case.id})")
        return result

    # Heavy and long cases first, so the run is not left waiting for them at the end.
    order = sorted(cases, key=lambda c: (not c.heavy, -c.timeout))
    tasks = [asyncio.create_task(one(c), name=c.id) for c in order]
    interrupted = False
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        interrupted = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if interrupted:
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        for case in cases:
            if case.id not in results:
                results[case.id] = CaseResult(
                    case, Verdict.ERROR, 0.0, "interrupted before the case finished"
                )
                report(results[case.id])
        raise SuiteInterrupted([results[c.id] for c in cases])
    return [results[c.id] for c in cases]
