"""The side-by-side benchmark is an instrument: its baseline must be correct, its checks must
catch a lost byte, and a tiny run must produce every figure for both servers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


compare = _load()
pb = compare.pb


@pytest.fixture
def naive(tmp_path: Path) -> Iterator[Any]:
    server = compare.Server(
        "naive",
        [sys.executable, str(BENCH / "naive_server.py"), "--listen", "127.0.0.1:0"],
        tmp_path,
    )
    yield server
    server.stop()


@pytest.fixture
async def stub(naive: Any) -> AsyncIterator[Any]:
    async with compare.Client(naive.address) as client:
        yield client.stub()


async def test_naive_server_delivers_every_byte_to_every_client(naive: Any) -> None:
    # fanout_mb_s checks that each of 3 clients got every byte, in sequence, then exit 0.
    assert await compare.fanout_mb_s(naive.address, 3 * compare.MIB + 17, 3) > 0


async def test_naive_server_replays_a_finished_exec_in_full(stub: Any) -> None:
    script = "head -c 300000 /dev/zero; printf err >&2; printf tail; exit 3"
    exec_id = uuid.uuid4().hex
    live = await compare.drain(
        await compare.open_session(stub, compare._start("c", exec_id, ["sh", "-c", script])),
        keep=True,
    )
    assert (live.stdout, live.stderr, live.exit_code, live.hole) == (300004, 3, 3, None)

    call = stub.Session()
    await call.write(pb.SessionRequest(start=pb.Start(container_id="c", exec_id=exec_id)))
    await call.done_writing()
    responses = [r async for r in call]
    kinds = [r.WhichOneof("msg") for r in responses]
    # PROTOCOL 6.3: Ready (replay incomplete), every chunk marked replay, Ready, exit.
    assert kinds[0] == kinds[-2] == "ready" and kinds[-1] == "exit"
    assert not responses[0].ready.replay_complete and responses[-2].ready.replay_complete
    chunks = [r.output_chunk for r in responses[1:-2]]
    assert [c.sequence for c in chunks] == list(range(1, live.chunks + 1))
    assert all(c.is_replay for c in chunks)
    assert b"".join(c.stdout for c in chunks) == b"\0" * 300000 + b"tail"
    assert b"".join(c.stderr for c in chunks) == b"err"
    assert responses[-1].exit == 3


async def test_naive_server_refuses_what_it_does_not_do(naive: Any, stub: Any) -> None:
    with pytest.raises(compare.BenchError, match="NOT_FOUND"):
        await compare.open_session(stub, compare._start("c", uuid.uuid4().hex))
    # No lifecycle RPC: the creation figures with subscribers are n/a.
    assert await compare.creation_rate(naive.address, 1, 0.01) is None


class _Replay:
    """A finished call that returns ``responses`` and then OK."""

    def __init__(self, responses: list[Any]) -> None:
        self._responses = iter(responses)

    async def read(self) -> Any:
        return next(self._responses, grpc.aio.EOF)

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK


def _chunk(sequence: int, data: bytes, gap: int = 0) -> Any:
    chunk = pb.OutputChunk(sequence=sequence, stdout=data, gap_before=gap)
    return pb.SessionResponse(output_chunk=chunk)


@pytest.mark.parametrize(
    "responses",
    [
        [_chunk(1, b"ab"), _chunk(3, b"cd"), pb.SessionResponse(exit=0)],  # a hole
        [_chunk(1, b"ab"), _chunk(3, b"cd", gap=1), pb.SessionResponse(exit=0)],  # a gap
        [_chunk(1, b"ab"), pb.SessionResponse(exit=0)],  # too few bytes
        [_chunk(1, b"ab"), _chunk(2, b"cd")],  # no exit
    ],
    ids=["hole", "gap", "short", "no-exit"],
)
async def test_the_checks_catch_lost_output(responses: list[Any]) -> None:
    got = await compare.drain(_Replay(responses))
    with pytest.raises(compare.BenchError):
        compare._check("client", got, 4)


async def test_the_checks_pass_complete_output() -> None:
    responses = [_chunk(1, b"ab"), _chunk(2, b"cd"), pb.SessionResponse(exit=0)]
    compare._check("client", await compare.drain(_Replay(responses)), 4)


def test_a_tiny_run_reports_every_figure_for_both_servers(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    tiny = ["--runs", "1", "--mib", "1", "--fanout", "1", "2", "--fanout-mib", "1"]
    tiny += ["--stalled-mib", "1", "--stalled-clients", "2", "--stalled-runs", "2"]
    tiny += ["--latency-samples", "20"]
    tiny += ["--bulk-rate", "20", "--start-count", "3", "--burst-execs", "4"]
    tiny += ["--burst-lines", "50", "--rss-execs", "10", "--subscribers", "0", "3"]
    tiny += ["--creation-seconds", "0.1", "--json", str(report)]
    done = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), *tiny],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    figures = {f["id"]: f for f in json.loads(report.read_text())["figures"]}
    assert set(figures) == {
        "throughput",
        "fanout_1",
        "fanout_2",
        "producer_none",
        "producer_stalled",
        "producer_slowdown",
        "producer_first_slowdown",
        "latency_idle_p50",
        "latency_idle_p99",
        "latency_load_p50",
        "latency_load_p99",
        "bulk_mb_s",
        "start_exit",
        "burst",
        "rss_per_exec",
        "creation_0",
        "creation_3",
        "creation_3_vs_0",
    }
    for figure_id, figure in figures.items():
        assert figure["execstream"]["best"] is not None, figure_id
        assert len(figure["execstream"]["runs"]) == 1
        # The naive server has no lifecycle RPC: those figures are n/a, never made up.
        naive_has_it = figure_id not in {"creation_3", "creation_3_vs_0"}
        assert (figure["naive"]["best"] is not None) == naive_has_it, figure_id
        assert (figure["ratio"] is not None) == naive_has_it, figure_id
    assert figures["throughput"]["pipe"] > 0
    assert figures["rss_per_exec"]["target"] == "≤ 20 KB"
    assert figures["rss_per_exec"]["met"] in (True, False)
    # The table names every figure, with its verdict where there is a target.
    assert "exec/naive" in done.stdout and "RSS per retained exited exec" in done.stdout


def test_profile_writes_stats_of_both_servers(tmp_path: Path) -> None:
    import pstats

    argv = [sys.executable, str(BENCH / "compare.py"), "--runs", "1", "--only", "start"]
    argv += ["--start-count", "2", "--profile", str(tmp_path / "prof")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for kind in ("execstream", "naive"):
        stats = pstats.Stats(str(tmp_path / "prof" / f"{kind}-run1.prof"))
        assert stats.total_calls > 0  # type: ignore[attr-defined]


def test_a_bad_option_is_one_line_not_a_traceback() -> None:
    argv = [sys.executable, str(BENCH / "compare.py"), "--runs", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--runs must be at least 1" in done.stderr
