"""What lossless output costs: reading from storage versus memory, and memory while a client lags.

    python bench/lossless.py [--mib 512] [--lag-mib 1024] [--runs 3] [--json FILE]

In one run, against a reference server in its own process (as deployed), over 127.0.0.1:

* **memory**: one client reads an exec's output (``head -c N /dev/zero``) while it is written,
  so it is served from the memory cache as far as gRPC keeps up;
* **storage**: the same output, read by a client that attaches after the exec exited, so every
  chunk comes back from the exec's stored log (PROTOCOL 6.7);
* **lag**: a client that reads nothing while ``--lag-mib`` of output goes past it, then reads
  all of it; the server's resident memory (RSS, and its peak) above its idle baseline while
  the client lags that far behind, and the throughput of the catch-up.

Every client must receive every byte with no gap.  Figures are MB/s (10^6 bytes per second),
the best of ``--runs``, with the ratio of storage to memory: compare ratios, not absolute
figures, which depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import grpc.aio

from execstream import wire

MB = 1_000_000
MIB = 1024 * 1024


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


async def _requests(start: wire.Start) -> AsyncIterator[wire.SessionRequest]:
    yield wire.SessionRequest(start=start)


async def _read_all(responses: AsyncIterable[wire.SessionResponse]) -> int:
    got = sequence = 0
    async for response in responses:
        chunk = response.output_chunk
        if chunk is not None:
            assert chunk.gap_before == 0 and chunk.sequence == sequence + 1, "lost output"
            sequence = chunk.sequence
            got += len(chunk.stdout or b"")
        elif response.exit is not None:
            assert response.exit == 0
    return got


async def _exited(stub: wire.ExecStub, container: str, exec_id: str) -> None:
    request = wire.ContainerStatusRequest(container_id=container, exec_id=exec_id)
    # The server's state is polled: nothing local could be waited on instead.
    while (await stub.ContainerStatus(request)).status != "exited":  # noqa: ASYNC110
        await asyncio.sleep(0.02)


def _create(nbytes: int) -> wire.Start:
    command = ["head", "-c", str(nbytes), "/dev/zero"]
    return wire.Start(container_id="bench", exec_id=uuid.uuid4().hex[:12], command=command)


async def memory_and_storage(address: str, nbytes: int) -> tuple[float, float]:
    """Seconds for one client reading live, and for one attaching after the exit."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wire.ExecStub(channel)
        create = _create(nbytes)
        began = time.perf_counter()
        assert await _read_all(stub.Session(_requests(create))) == nbytes
        live = time.perf_counter() - began
        attach = wire.Start(container_id=create.container_id, exec_id=create.exec_id)
        began = time.perf_counter()
        assert await _read_all(stub.Session(_requests(attach))) == nbytes
        stored = time.perf_counter() - began
        return live, stored


async def lagging(address: str, pid: int, nbytes: int) -> dict[str, float]:
    """A client that lags ``nbytes`` behind: server memory, then the catch-up."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wire.ExecStub(channel)
        baseline, _ = _rss(pid)
        create = _create(nbytes)
        responses = stub.Session(_requests(create)).__aiter__()
        assert (await responses.__anext__()).ready is not None
        await _exited(stub, create.container_id, create.exec_id)
        lagging_rss, peak = _rss(pid)
        began = time.perf_counter()
        assert await _read_all(responses) == nbytes
        seconds = time.perf_counter() - began
        return {
            "lag_bytes": nbytes,
            "rss_above_baseline_mib": (lagging_rss - baseline) / MIB,
            "peak_rss_above_baseline_mib": (peak - baseline) / MIB,
            "catch_up_mb_s": nbytes / seconds / MB,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="output per throughput run")
    parser.add_argument("--lag-mib", type=int, default=1024, help="how far the lagging client is")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    nbytes, lag = args.mib * MIB, args.lag_mib * MIB
    settings = ["--log-level", "WARNING", "--max-output-bytes", str(max(nbytes, lag) * 2)]
    server = subprocess.Popen(
        [sys.executable, "-m", "execstream", "serve", "--listen", "127.0.0.1:0", *settings],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().split()[-1]
        runs = [asyncio.run(memory_and_storage(address, nbytes)) for _ in range(args.runs)]
        live = min(r[0] for r in runs)
        stored = min(r[1] for r in runs)
        lag_figures = asyncio.run(lagging(address, server.pid, lag))
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures = {
        "output_bytes": nbytes,
        "runs": args.runs,
        "memory_mb_s": nbytes / live / MB,
        "storage_mb_s": nbytes / stored / MB,
        "storage_vs_memory": live / stored,
        **lag_figures,
    }
    print(f"{args.mib} MiB of output, one client, best of {args.runs} runs")
    print(f"  {'read live (memory cache)':36} {figures['memory_mb_s']:8.0f} MB/s   1.00x")
    print(
        f"  {'read after exit (stored log)':36} {figures['storage_mb_s']:8.0f} MB/s   "
        f"{figures['storage_vs_memory']:.2f}x"
    )
    print(f"a client lagging {args.lag_mib} MiB behind:")
    print(f"  {'server RSS above baseline':36} {figures['rss_above_baseline_mib']:8.1f} MiB")
    print(
        f"  {'server peak RSS above baseline':36} {figures['peak_rss_above_baseline_mib']:8.1f} MiB"
    )
    print(f"  {'its catch-up from storage':36} {figures['catch_up_mb_s']:8.0f} MB/s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
