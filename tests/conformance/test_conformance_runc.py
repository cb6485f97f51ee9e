"""The whole suite against the reference server on the runc runtime: real OCI containers.

One run (the process runtime's is repeated in test_conformance_reference.py); skipped with the
reason where runc cannot run.  Cases in ``RUNC_DEVIATIONS`` must FAIL, every other case PASS.

Every exec costs a ``runc`` process (a Go program starting) and a fork of this large test
process, and the server shares its event loop with the suite here; so on a loaded 2-core
machine the run takes three cases at a time, not six, and twice the suite's usual retention
and sweep (4 s, 1 s), which the retention cases sleep fractions of.
"""

from __future__ import annotations

import pytest
from conformance_harness import OUTPUT_LIMIT, TOKEN

from execstream.conformance import CASES, Target, Verdict, run_suite
from execstream.server import Limits
from execstream.server.runtime.runc import runc_problem
from execstream.server.testing import serve

PROBLEM = runc_problem()
RETENTION = 4.0
CLEANUP_INTERVAL = 1.0
RUNC_EXECS_PER_CONTAINER = 40

#: Cases the runc runtime is known to fail, with the reason.  Empty: it passes them all.
RUNC_DEVIATIONS: dict[str, str] = {}


@pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")
async def test_the_runc_runtime_passes_the_whole_suite() -> None:
    settings = {"retention": RETENTION, "cleanup_interval": CLEANUP_INTERVAL, "token": TOKEN}
    # The harness's output limit, so that the eviction cases (6.4, 6.5) run here too; a
    # runc exec takes longer to exit, so concurrent cases need room beyond the harness's 16
    # execs per container, and 13.3 runs a few more execs.
    limits = Limits(max_output_bytes=OUTPUT_LIMIT, max_execs_per_container=RUNC_EXECS_PER_CONTAINER)
    async with serve(runtime="runc", limits=limits, **settings) as server:
        target = Target(
            address=server.address,
            max_output_bytes=OUTPUT_LIMIT,
            max_execs_per_container=RUNC_EXECS_PER_CONTAINER,
            **settings,  # type: ignore[arg-type]
        )
        results = await run_suite(target, CASES, jobs=3)
    expected = {
        r.case.id: Verdict.FAIL if r.case.id in RUNC_DEVIATIONS else Verdict.PASS for r in results
    }
    bad = [r for r in results if r.verdict is not expected[r.case.id]]
    assert not bad, "\n".join(
        f"{r.verdict.value} {r.case.id}: {r.message}\n  " + "\n  ".join(r.log[-30:]) for r in bad
    )
    assert len(results) == len(CASES)
