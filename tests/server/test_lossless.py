"""No client loses a byte for being slow (PROTOCOL 6.6, 6.7), end to end.

A real ``execstream serve`` process, 200 MiB of random bytes through ``cat``: a client that
reads nothing until the exec has exited, then a client that attaches after the exit, each
gets every byte (sha256) with no gap, while the server's memory stays within its cache plus a
constant.  Then the command line: ``execstream run -- cat`` into a pipe nobody reads until
the exec has exited.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from sessions import requests, start

from execstream import wire

MIB = 1024 * 1024


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MIB):
            block = os.urandom(MIB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def rss(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def big_file(tmp_path: Path) -> Iterator[Path]:
    """Where a test writes its input; removed at the end, before the kernel writes it back
    (pytest keeps temporary directories, and 300 MiB of writeback would stall later tests'
    processes in disk sleep)."""
    path = tmp_path / "big.bin"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "execstream", "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on "), line
        yield process, line.split()[-1]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def stub(server: tuple[subprocess.Popen[str], str]) -> AsyncIterator[wire.ExecStub]:
    async with grpc.aio.insecure_channel(server[1]) as channel:
        yield wire.ExecStub(channel)


async def wait_exited(stub: wire.ExecStub, c: str, e: str, within: float = 120) -> None:
    """Until the exec exists and has exited (it may not be created yet)."""
    deadline = time.monotonic() + within
    request = wire.ContainerStatusRequest(container_id=c, exec_id=e)
    while True:
        try:
            if (await stub.ContainerStatus(request)).status == "exited":
                return
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.NOT_FOUND, error
        assert time.monotonic() < deadline, "the exec did not exit in time"
        await asyncio.sleep(0.05)


async def drain(
    responses: AsyncIterator[wire.SessionResponse],
) -> tuple[str, int, int, int | None]:
    """Hash stdout as it comes: (sha256, chunks, gaps reported, exit code); contiguous."""
    digest = hashlib.sha256()
    chunks = gaps = 0
    async for response in responses:
        if response.output_chunk is not None:
            chunk = response.output_chunk
            chunks += 1
            gaps += chunk.gap_before
            assert chunk.sequence == chunks + gaps, "contiguous, or a gap said how many"
            digest.update(chunk.stdout or b"")
        elif response.exit is not None:
            return digest.hexdigest(), chunks, gaps, response.exit
    return digest.hexdigest(), chunks, gaps, None


async def test_stalled_and_late_clients_get_every_byte_of_200_mib(
    server: tuple[subprocess.Popen[str], str], stub: wire.ExecStub, big_file: Path
) -> None:
    size = 200 * MIB
    want = random_file(big_file, size)
    pid = server[0].pid
    baseline = rss(pid, "VmRSS")
    c, e = f"c-{uuid.uuid4().hex[:8]}", "cat"
    call = stub.Session(requests(start(c, e, "cat", str(big_file))))
    stalled = call.__aiter__()
    assert (await stalled.__anext__()).ready is not None
    # It reads nothing more until the exec has exited: 200 MiB go past it.
    await wait_exited(stub, c, e)
    assert await drain(stalled) == (want, size // (64 * 1024), 0, 0)
    late = await drain(
        stub.Session(requests(wire.SessionRequest(start=wire.Start(container_id=c, exec_id=e))))
    )
    assert late == (want, size // (64 * 1024), 0, 0)
    peak = rss(pid, "VmHWM") - baseline
    print(f"server peak RSS above its baseline: {peak / MIB:.1f} MiB for 400 MiB streamed")
    # The memory cache is 4 MiB, gRPC buffers a few MiB per stream: nowhere near the output.
    assert peak < 64 * MIB, f"the server grew by {peak / MIB:.0f} MiB"


def test_cli_run_into_a_pipe_read_only_after_exit_gets_identical_bytes(
    server: tuple[subprocess.Popen[str], str], big_file: Path
) -> None:
    size = 100 * MIB
    want = random_file(big_file, size)
    address = server[1]
    c, e = f"c-{uuid.uuid4().hex[:8]}", "cli-cat"
    command = ["run", "--target", address, "--container", c, "--exec-id", e]
    run = subprocess.Popen(
        [sys.executable, "-m", "execstream", *command, "--", "cat", str(big_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:

        async def exited() -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                await wait_exited(wire.ExecStub(channel), c, e)

        # The reader of the pipe sleeps until the exec is over: the CLI falls 100 MiB behind.
        asyncio.run(exited())
        assert run.stdout is not None
        digest = hashlib.sha256()
        while block := run.stdout.read(MIB):
            digest.update(block)
        assert run.stderr is not None
        err = run.stderr.read().decode()
        assert run.wait(timeout=60) == 0, err
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert digest.hexdigest() == want
    assert "lost" not in err
