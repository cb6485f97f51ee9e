"""The broken servers' proxy forwards the reference server's status, not grpc's: when grpc
hides a refusal behind ``INTERNAL "Internal error from Core"`` on the proxy's own upstream
write (grpc/grpc#36066), the proxy learns the status again instead of passing grpc's on."""

from __future__ import annotations

from typing import Any

from conformance_harness import HIDDEN_BY_GRPC, MangleProxy, proxied

from execstream import wire
from execstream.conformance import Verdict, run_suite, select


class HiddenFirstWrite:
    """An upstream call whose first write meets grpc's race: the write fails, and from then
    on the call's status is grpc's INTERNAL, not the server's."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def write(self, request: wire.SessionRequest) -> None:
        self._call.cancel()
        raise HIDDEN_BY_GRPC

    async def read(self) -> wire.SessionResponse:
        raise HIDDEN_BY_GRPC


class RacyUpstream:
    """The reference server's stub, where every other Session loses its first write."""

    def __init__(self, stub: wire.ExecStub) -> None:
        self._stub = stub
        self.sessions = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def Session(self, **kwargs: Any) -> Any:
        self.sessions += 1
        call = self._stub.Session(**kwargs)
        return HiddenFirstWrite(call) if self.sessions % 2 else call


async def test_a_status_grpc_hid_upstream_is_learnt_not_forwarded() -> None:
    upstreams: list[RacyUpstream] = []

    def make(stub: wire.ExecStub) -> MangleProxy:
        upstreams.append(RacyUpstream(stub))
        return MangleProxy(upstreams[0])  # type: ignore[arg-type]

    cases = select(include=["auth/12.1/missing-token", "session/5.2/exit-status"])
    async with proxied(make) as target:
        results = await run_suite(target, cases, jobs=1)
    report = "\n".join(f"{r.verdict.value} {r.case.id}: {r.message[:300]}" for r in results)
    assert {r.verdict for r in results} == {Verdict.PASS}, report
    assert upstreams[0].sessions >= 2 * len(results), "every Session met the race once"
