"""Throughput of one exec's output through execstream, against the physical limit.

    python bench/throughput.py [--mib 100] [--clients 1 8] [--runs 3]

In one run, for the same bytes (``head -c N /dev/zero``):

* **pipe**: the bytes read straight from the process pipe in 64 KiB reads (the limit);
* **execstream, K clients**: a reference server in its own process (as deployed) runs the
  command; K clients attached over 127.0.0.1 each receive every byte.  The exec never waits
  for its clients (PROTOCOL 6.6) and a pipe produces faster than gRPC delivers, so clients
  fall behind and read from the server's stored output (6.7): every client must receive every
  byte, and the time until the last one has them is what is measured.

It prints MB/s (10^6 bytes per second, per client) and the ratio to the pipe, the best of
``--runs``.  Results depend on the machine; compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio

from execstream import wire

MB = 1_000_000


def pipe_seconds(nbytes: int) -> float:
    began = time.perf_counter()
    proc = subprocess.Popen(["head", "-c", str(nbytes), "/dev/zero"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd, got = proc.stdout.fileno(), 0
    while chunk := os.read(fd, 65536):
        got += len(chunk)
    proc.wait()
    assert got == nbytes
    return time.perf_counter() - began


async def _requests(start: wire.Start) -> AsyncIterator[wire.SessionRequest]:
    yield wire.SessionRequest(start=start)


async def _receive(stub: wire.ExecStub, start: wire.Start, ready: asyncio.Event) -> int:
    got = 0
    async for response in stub.Session(_requests(start)):
        if response.ready is not None:
            ready.set()
        elif response.output_chunk is not None:
            got += len(response.output_chunk.stdout or b"")
        elif response.exit is not None:
            assert response.exit == 0
    return got


async def execstream_seconds(address: str, nbytes: int, clients: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wire.ExecStub(channel)
        container, exec_id = "bench", uuid.uuid4().hex[:12]
        # The exec waits for its readers' attach before producing, so all clients read live.
        gate = f"/tmp/execstream-bench-{exec_id}"
        command = [
            "sh",
            "-c",
            f"while [ ! -e {gate} ]; do sleep 0.01; done; rm -f {gate}; head -c {nbytes} /dev/zero",
        ]
        first = asyncio.Event()
        create = wire.Start(container_id=container, exec_id=exec_id, command=command)
        tasks = [asyncio.create_task(_receive(stub, create, first))]
        await first.wait()
        for _ in range(clients - 1):
            ready = asyncio.Event()
            attach = wire.Start(container_id=container, exec_id=exec_id)
            tasks.append(asyncio.create_task(_receive(stub, attach, ready)))
            await ready.wait()
        began = time.perf_counter()
        await asyncio.to_thread(Path(gate).touch)
        counts = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - began
        assert counts == [nbytes] * clients, counts
        return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    nbytes = args.mib * 1024 * 1024
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "execstream",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "WARNING",
            "--max-clients-per-exec",
            "256",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().split()[-1]
        pipe = min(pipe_seconds(nbytes) for _ in range(args.runs))
        print(f"{args.mib} MiB of output, best of {args.runs} runs")
        print(f"  {'pipe (64 KiB reads)':28} {nbytes / pipe / MB:8.0f} MB/s   1.00x")
        for clients in args.clients:
            best = min(
                asyncio.run(execstream_seconds(address, nbytes, clients)) for _ in range(args.runs)
            )
            rate = nbytes / best / MB
            label = f"execstream, {clients} client{'s' if clients > 1 else ''}"
            print(f"  {label:28} {rate:8.0f} MB/s   {pipe / best:.2f}x  (per client)")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
