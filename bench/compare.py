"""Side by side in one run: the reference server, a naive grpcio server, and a plain pipe.

    python bench/compare.py [--quick] [--runs N] [--json FILE] [--only FIGURE ...]
    tox -e bench -- [the same options]

Both servers run in their own processes on 127.0.0.1 (``execstream serve``, and
``bench/naive_server.py``: plain grpcio and protoc classes, a list of chunks, one loop per
client) and are measured by the same client in this process, written with protoc classes
too, so that neither server gets a client tuned for it.  Each repetition starts fresh
servers; the servers take turns going first.  Every figure is the best of ``--runs``
repetitions (all runs are in the JSON), and every byte and line is checked: a client that
misses one fails the run (exit status 1), whatever the speed.

The figures (``--only`` takes their ids):

``throughput``  one client, ``--mib`` MiB of ``head -c`` output, MB/s (and the pipe: the same
                bytes read straight from the process in 64 KiB reads);
``fanout``      1/8/32/100 clients on one exec (``--fanout``), ``--fanout-mib`` each, MB/s in all;
``stalled``     the producer's own wall time writing ``--stalled-mib`` MiB with no client
                attached, and with 8 attached clients that never read: two execs side by
                side, whose producers run ``--stalled-runs`` times, in pairs taking turns
                going first; the medians, and the median of the pairs' ratios.  The
                clients stay attached throughout: the first run also fills their
                flow-control windows (~4 MiB each, sent while they still take data), a
                one-off cost shown on its own row; the runs after it meet clients stalled
                in full;
``latency``     write → client latency of single lines (p50, p99), idle and while another exec
                streams ``--bulk-rate`` MB/s to its client;
``start``       Start → exit of ``true``, median of sequential execs;
``burst``       300 concurrent execs x 1000 lines (a shell loop, one write per line);
``rss``         server RSS growth per retained exited exec (a fresh server, ``--rss-execs``);
``creation``    execs created and run to exit per second while 0/256/1000 lifecycle
                subscribers watch other containers (n/a for a server without the RPC).

Targets (issue 10) are marked met or not met; ``--require-targets`` makes an unmet target
exit 3.  Results depend on the machine and its load: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # grpc's C core logs an INFO line per connection a stopped server ends: noise in a table.
    # Only when run: imported (by its tests), it must not change the importer's environment.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_server import load_protos

pb, pb_grpc = load_protos()

MB = 1_000_000
MIB = 1 << 20
WORKLOAD = str(Path(__file__).resolve().parent / "workload.py")
NAIVE = str(Path(__file__).resolve().parent / "naive_server.py")
SERVERS = ("execstream", "naive")
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
#: The pause before each producer run of the stalled figure.
SETTLE_S = 0.25


class BenchError(Exception):
    """The measurement could not be made, or a client missed output: the run has failed."""


# -- parameters --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Params:
    runs: int
    mib: int
    fanout: tuple[int, ...]
    fanout_mib: int
    stalled_mib: int
    stalled_clients: int
    stalled_runs: int
    latency_samples: int
    latency_period: float
    bulk_rate: float
    start_count: int
    burst_execs: int
    burst_lines: int
    rss_execs: int
    subscribers: tuple[int, ...]
    creation_seconds: float


FULL = Params(
    runs=3,
    mib=100,
    fanout=(1, 8, 32, 100),
    fanout_mib=16,
    stalled_mib=50,
    stalled_clients=8,
    stalled_runs=7,
    latency_samples=1000,
    latency_period=0.001,
    bulk_rate=100.0,
    start_count=50,
    burst_execs=300,
    burst_lines=1000,
    rss_execs=1000,
    subscribers=(0, 256, 1000),
    creation_seconds=2.0,
)
QUICK = dataclasses.replace(
    FULL,
    runs=1,
    mib=32,
    fanout_mib=4,
    stalled_mib=16,
    stalled_runs=3,
    latency_samples=300,
    start_count=20,
    rss_execs=300,
    creation_seconds=0.5,
)
FIGURES = ("throughput", "fanout", "stalled", "latency", "start", "burst", "rss", "creation")


# -- servers -----------------------------------------------------------------------------


def _reference_output_flags(max_output: int) -> list[str]:
    """Enough per-exec output kept that every client can receive every byte.

    With a disk-backed log (``--max-output-bytes``) the memory cache stays at its default."""
    usage = subprocess.run(
        [sys.executable, "-m", "execstream", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "--max-output-bytes" in usage:
        return ["--max-output-bytes", str(max_output)]
    return ["--history-bytes", str(max_output)]


class Server:
    """One server process on 127.0.0.1, with its stderr kept for when it fails."""

    def __init__(self, kind: str, argv: list[str], logdir: Path) -> None:
        self.kind = kind
        self._log_path = logdir / f"{kind}-{uuid.uuid4().hex[:8]}.log"
        self._log = self._log_path.open("w")
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise BenchError(f"{kind} server did not start: {line!r} {self.log_tail()}")
        self.address = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise BenchError(f"{self.kind} server has no VmRSS")

    def log_tail(self) -> str:
        self._log.flush()
        return self._log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


def start_server(
    kind: str,
    *,
    retention: float,
    output_flags: list[str],
    logdir: Path,
    profile: Path | None = None,
) -> Server:
    """``profile``: run the server under cProfile (its event loop thread, where the Python
    work is) and write the stats there when it stops."""
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    if kind == "naive":
        argv += [NAIVE, "--listen", "127.0.0.1:0", "--retention", str(retention)]
    else:
        argv += ["-m", "execstream", "serve", "--listen", "127.0.0.1:0"]
        argv += ["--log-level", "WARNING", "--retention", str(retention)]
        argv += ["--cleanup-interval", str(max(min(retention / 2, 30.0), 0.1))]
        argv += ["--max-execs", "100000", "--max-execs-per-container", "100000"]
        # Every exec retained for the whole run, as the naive server does: past the bound
        # (1024 by default) each exit would remove the earliest one (PROTOCOL 11.3).
        argv += ["--max-exited-execs", "100000"]
        argv += ["--max-clients-per-exec", "1024", "--max-subscribers", "4096"]
        argv += output_flags
    return Server(kind, argv, logdir)


# -- the client, the same for both servers ---------------------------------------------------


class Client:
    """``channels`` separate connections (one per client where it matters), used round robin."""

    def __init__(self, address: str, channels: int = 1) -> None:
        self._channels = [
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(channels)
        ]
        self._stubs = [pb_grpc.ExecStub(channel) for channel in self._channels]
        self._next = 0

    def stub(self) -> Any:
        stub = self._stubs[self._next % len(self._stubs)]
        self._next += 1
        return stub

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _start(container: str, exec_id: str, command: Sequence[str] = ()) -> Any:
    return pb.SessionRequest(
        start=pb.Start(container_id=container, exec_id=exec_id, command=list(command))
    )


async def open_session(stub: Any, request: Any, *, keep_open: bool = False) -> Any:
    """A Session that the server has answered with Ready (PROTOCOL 3.3)."""
    call = stub.Session()
    await call.write(request)
    if not keep_open:
        await call.done_writing()
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        what = f"{error.code().name} {error.details()}"
        raise BenchError(f"no Ready for exec {request.start.exec_id}: {what}") from None
    if first is grpc.aio.EOF or first.WhichOneof("msg") != "ready":
        raise BenchError(f"no Ready for exec {request.start.exec_id}: {first}")
    return call


@dataclass
class Received:
    stdout: int = 0
    stderr: int = 0
    chunks: int = 0
    exit_code: int | None = None
    data: bytearray | None = None
    hole: str | None = None


async def drain(
    call: Any, *, keep: bool = False, on_chunk: Callable[[bytes, int], None] | None = None
) -> Received:
    """Read to the end, checking that the sequence has no hole (PROTOCOL 4.2, 6.4)."""
    got = Received(data=bytearray() if keep else None)
    expected = 0
    while (response := await _read(call)) is not grpc.aio.EOF:
        kind = response.WhichOneof("msg")
        if kind == "output_chunk":
            chunk = response.output_chunk
            if chunk.gap_before or (expected and chunk.sequence != expected):
                got.hole = got.hole or f"chunk {chunk.sequence} after {expected - 1}"
            expected = chunk.sequence + 1
            got.chunks += 1
            data = chunk.stdout or chunk.stderr
            if chunk.stdout:
                got.stdout += len(data)
            else:
                got.stderr += len(data)
            if got.data is not None:
                got.data += data
            if on_chunk is not None:
                on_chunk(data, time.time_ns())
        elif kind == "exit":
            got.exit_code = response.exit
    return got


async def _read(call: Any) -> Any:
    try:
        return await call.read()
    except grpc.aio.AioRpcError as error:
        raise BenchError(f"stream ended with {error.code().name}: {error.details()}") from None


def _check(what: str, got: Received, stdout: int) -> None:
    if got.hole or got.stdout != stdout or got.exit_code is None:
        raise BenchError(
            f"{what}: received {got.stdout} of {stdout} bytes, exit {got.exit_code}, "
            f"hole: {got.hole}"
        )


def _container(figure: str) -> str:
    """Each figure's execs share one fresh container, as execs of one job would."""
    return f"{figure}-{uuid.uuid4().hex[:8]}"


def _exec_id() -> str:
    return uuid.uuid4().hex[:16]


async def _cancel(calls: Sequence[Any]) -> None:
    for call in calls:
        call.cancel()
    for call in calls:
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            await call.code()


async def _poll(check: Callable[[], bool], what: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


# -- the figures -------------------------------------------------------------------------


def pipe_mb_s(nbytes: int) -> float:
    began = time.perf_counter()
    proc = subprocess.Popen(["head", "-c", str(nbytes), "/dev/zero"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd, got = proc.stdout.fileno(), 0
    while chunk := os.read(fd, 65536):
        got += len(chunk)
    proc.wait()
    proc.stdout.close()
    if got != nbytes:
        raise BenchError(f"pipe: read {got} of {nbytes} bytes")
    return nbytes / (time.perf_counter() - began) / MB


async def fanout_mb_s(address: str, nbytes: int, clients: int) -> float:
    """Aggregate MB/s of ``clients`` clients, each on its own connection, all reading live."""
    async with Client(address, channels=clients) as client:
        container, exec_id = _container("fanout"), _exec_id()
        # The exec waits for a line on stdin, sent once every client is attached.
        command = ["sh", "-c", f"read go; exec head -c {nbytes} /dev/zero"]
        creator = await open_session(
            client.stub(), _start(container, exec_id, command), keep_open=True
        )
        calls = [creator]
        calls += await asyncio.gather(
            *(open_session(client.stub(), _start(container, exec_id)) for _ in range(clients - 1))
        )
        tasks = [asyncio.create_task(drain(call)) for call in calls]
        began = time.perf_counter()
        await creator.write(pb.SessionRequest(stdin=b"go\n"))
        await creator.done_writing()
        results = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - began
        for i, got in enumerate(results):
            _check(f"client {i + 1} of {clients}", got, nbytes)
        return nbytes * clients / seconds / MB


def _producer_script(fifo: Path, result: Path, nbytes: int, runs: int) -> str:
    """``runs`` timed writes of ``nbytes``, each once a line arrives on ``fifo``: waiting
    costs no CPU while the other exec's producer is measured."""
    return (
        f"exec 3< {fifo}; for i in $(seq 1 {runs}); do read go <&3; t0=$(date +%s%N); "
        f"head -c {nbytes} /dev/zero; t1=$(date +%s%N); "
        f"echo $((t1 - t0)) > {result}-$i.part && mv {result}-$i.part {result}-$i; done"
    )


async def producer_seconds(
    address: str, nbytes: int, stalled: int, workdir: Path, runs: int = 1
) -> tuple[list[float], list[float]]:
    """The producer's own wall time writing ``nbytes``, in two execs side by side: one with
    no client, one with ``stalled`` clients that never read, attached throughout.  Each
    exec's producer runs ``runs`` times, in pairs (none, stalled) whose order alternates, so
    that the machine's load and the server's warming up fall on both alike."""
    tag = uuid.uuid4().hex
    kinds = ("none", "stalled")
    fifos = {kind: workdir / f"go-{kind}-{tag}" for kind in kinds}
    results = {kind: workdir / f"time-{kind}-{tag}" for kind in kinds}
    gates: dict[str, int] = {}
    try:
        for kind in kinds:
            os.mkfifo(fifos[kind])
            # Read and write: opening does not wait for the reader, nor the reader for us.
            gates[kind] = os.open(fifos[kind], os.O_RDWR)
        async with Client(address, channels=stalled + 2) as client:
            container = _container("stalled")
            creators, execs = [], {}
            for kind in kinds:
                execs[kind] = _exec_id()
                script = _producer_script(fifos[kind], results[kind], nbytes, runs)
                command = _start(container, execs[kind], ["sh", "-c", script])
                creators.append(await open_session(client.stub(), command))
            # Attached, read Ready, then never read again.
            calls = list(
                await asyncio.gather(
                    *(
                        open_session(client.stub(), _start(container, execs["stalled"]))
                        for _ in range(stalled)
                    )
                )
            )
            await _cancel(creators)  # "none": no client at all while its producer writes
            seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
            try:
                for run in range(1, runs + 1):
                    # The stalled exec first in the first pair: what a fresh server pays
                    # for warming up counts against the stalled clients, not for them.
                    for kind in kinds[::-1] if run % 2 else kinds:
                        # A quiet server for each run: what the server still does for the
                        # run before (sending the stalled clients their windows' worth after
                        # the first) must not land on this one.
                        await asyncio.sleep(SETTLE_S)
                        os.write(gates[kind], b"go\n")
                        done = workdir / f"time-{kind}-{tag}-{run}"
                        await _poll(done.exists, "the producer")
                        seconds[kind].append(int(done.read_text()) / 1e9)
            finally:
                await _cancel(calls)
            return seconds["none"], seconds["stalled"]
    finally:
        for fd in gates.values():
            os.close(fd)


async def latency_ms(
    address: str, params: Params, workdir: Path, *, bulk: bool
) -> tuple[float, float, float]:
    """p50 and p99 of write → client latency in ms, and the bulk MB/s delivered meanwhile."""
    stop = workdir / f"stop-{uuid.uuid4().hex}"
    latencies: list[int] = []
    partial = bytearray()

    def on_chunk(data: bytes, received_ns: int) -> None:
        partial.extend(data)
        *lines, rest = partial.split(b"\n")
        partial[:] = rest
        latencies.extend(received_ns - int(line) for line in lines)

    container = _container("latency")
    async with Client(address, channels=2) as client:
        bulk_task: asyncio.Task[Received] | None = None
        if bulk:
            command = [sys.executable, WORKLOAD, "paced", str(params.bulk_rate), str(stop)]
            bulk_call = await open_session(client.stub(), _start(container, _exec_id(), command))
            flowing = asyncio.Event()
            bulk_task = asyncio.create_task(drain(bulk_call, on_chunk=lambda *_: flowing.set()))
            # The latency is measured under the load, not while its process starts (a Python
            # process: tens of milliseconds on a busy machine, longer than a short run).
            try:
                await asyncio.wait_for(flowing.wait(), 60)
            except TimeoutError:
                raise BenchError("the bulk load sent nothing in 60 s") from None
        try:
            command = [sys.executable, WORKLOAD, "ticks", str(params.latency_samples)]
            command.append(str(params.latency_period))
            began = time.perf_counter()
            ticks = await open_session(client.stub(), _start(container, _exec_id(), command))
            got = await drain(ticks, on_chunk=on_chunk)
            seconds = time.perf_counter() - began
        finally:
            stop.touch()
        bulk_rate = 0.0
        if bulk_task is not None:
            load = await bulk_task
            if load.hole or load.exit_code is None:
                raise BenchError(f"bulk load: hole {load.hole}, exit {load.exit_code}")
            bulk_rate = load.stdout / seconds / MB
    if got.hole or len(latencies) != params.latency_samples:
        raise BenchError(f"latency: {len(latencies)} of {params.latency_samples} lines, {got.hole}")
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] / 1e6, cuts[98] / 1e6, bulk_rate


async def start_exit_ms(address: str, count: int) -> float:
    """Median Start → exit of ``true``, one exec after the other."""
    times, container = [], _container("start")
    async with Client(address) as client:
        for _ in range(count):
            began = time.perf_counter()
            call = await open_session(client.stub(), _start(container, _exec_id(), ["true"]))
            got = await drain(call)
            times.append(time.perf_counter() - began)
            _check("true", got, 0)
    return statistics.median(times) * 1000


async def burst_seconds(address: str, execs: int, lines: int) -> float:
    """``execs`` concurrent execs x ``lines`` lines, one write per line; every line checked."""
    script = f'i=1; while [ "$i" -le {lines} ]; do echo "$i"; i=$((i + 1)); done'
    expected = "".join(f"{i}\n" for i in range(1, lines + 1)).encode()
    container = _container("burst")

    async def one(client: Client, index: int) -> Received:
        request = _start(container, f"e{index}", ["sh", "-c", script])
        return await drain(await open_session(client.stub(), request), keep=True)

    async with Client(address, channels=10) as client:
        began = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(execs)))
        seconds = time.perf_counter() - began
    for i, got in enumerate(results):
        _check(f"exec {i}", got, len(expected))
        if bytes(got.data or b"") != expected:
            raise BenchError(f"exec {i}: lines delivered differ from the lines written")
    return seconds


async def _run_execs(address: str, count: int, command: list[str], concurrency: int) -> None:
    container = _container("rss")
    async with Client(address) as client:
        queue = iter(range(count))

        async def worker() -> None:
            for _ in queue:
                request = _start(container, _exec_id(), command)
                got = await drain(await open_session(client.stub(), request))
                _check(" ".join(command), got, len(b"retained\n") if command[0] == "echo" else 0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def rss_kb_per_exec(server: Server, count: int) -> float:
    """RSS growth of a fresh server per retained exited exec (one line of output each)."""
    await _run_execs(server.address, 20, ["echo", "retained"], 4)  # warm-up
    before = server.rss_bytes()
    await _run_execs(server.address, count, ["echo", "retained"], 16)
    return (server.rss_bytes() - before) / count / 1000


async def creation_rate(address: str, subscribers: int, seconds: float) -> float | None:
    """Execs created and run to exit per second while ``subscribers`` watch other containers;
    None when the server has no ContainerLifecycle RPC."""
    return (await creation_rates(address, (subscribers,), seconds))[subscribers]


async def creation_rates(
    address: str, levels: Sequence[int], seconds: float, rounds: int = 2
) -> dict[int, float | None]:
    """For each number of lifecycle subscribers in ``levels``, the execs created and run to
    exit per second while that many watch other containers (None: the server has no
    ContainerLifecycle RPC).

    The levels take turns, ``rounds`` windows of ``seconds / rounds`` each, ascending then
    descending, so that a change in the machine's load hits every level alike (measured one
    after the other, 2 s each, the rate with none swung 215-405/s between runs of one
    server).  Each window opens its subscriptions, then runs untimed execs for a moment, so
    that the server has settled from the previous window's cancellations, then the timed
    ones.  The execs go over a channel of their own, whatever the level."""
    levels = sorted(set(levels))
    counts, spent = dict.fromkeys(levels, 0), dict.fromkeys(levels, 0.0)
    unsupported: set[int] = set()
    window = seconds / rounds
    async with (
        Client(address) as execs,
        Client(address, channels=max(1, max(levels) // 100)) as watchers,
    ):

        async def run(duration: float) -> tuple[int, float]:
            # A fresh container per window, as each level had its own before they took turns.
            container = _container("creation")
            count, began = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - began) < duration or count < 3:
                request = _start(container, _exec_id(), ["true"])
                got = await drain(await open_session(execs.stub(), request))
                _check("true", got, 0)
                count += 1
            return count, elapsed

        for round_ in range(rounds):
            for subscribers in levels if round_ % 2 == 0 else levels[::-1]:
                if subscribers in unsupported:
                    continue
                calls = await _subscribe(watchers, subscribers)
                if calls is None:
                    unsupported.add(subscribers)
                    continue
                try:
                    await run(min(0.1, window / 5))
                    count, elapsed = await run(window)
                finally:
                    await _cancel(calls)
                counts[subscribers] += count
                spent[subscribers] += elapsed
    return {n: None if n in unsupported else counts[n] / spent[n] for n in levels}


async def _subscribe(client: Client, subscribers: int) -> list[Any] | None:
    """``subscribers`` lifecycle subscriptions to containers nobody uses, each in place;
    None when the server has no ContainerLifecycle RPC."""
    calls = []
    for i in range(subscribers):
        request = pb.ContainerLifecycleRequest(container_id=f"watch-{i}")
        calls.append(client.stub().ContainerLifecycle(request))
    # PROTOCOL 8.4: the headers arrive once the subscription is in place.
    try:
        await asyncio.gather(*(call.initial_metadata() for call in calls))
        if calls and calls[0].done():
            await calls[0].read()  # raises the status it ended with
    except grpc.aio.AioRpcError as error:
        await _cancel(calls)
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise BenchError(f"subscribing: {error.code().name} {error.details()}") from None
    return calls


# -- one repetition ----------------------------------------------------------------------

Values = dict[str, float | None]


Step = Callable[[Server], Awaitable[Values]]


def steps(params: Params, only: set[str], workdir: Path) -> list[Step]:
    """The measurements of one repetition, each made on both servers back to back."""
    out: list[Step] = []
    if "throughput" in only:

        async def throughput(server: Server) -> Values:
            return {"throughput": await fanout_mb_s(server.address, params.mib * MIB, 1)}

        out.append(throughput)
    if "fanout" in only:
        for clients in params.fanout:

            async def fanout(server: Server, clients: int = clients) -> Values:
                rate = await fanout_mb_s(server.address, params.fanout_mib * MIB, clients)
                return {f"fanout_{clients}": rate}

            out.append(fanout)
    if "stalled" in only:

        async def stalled(server: Server) -> Values:
            nbytes, clients = params.stalled_mib * MIB, params.stalled_clients
            runs = params.stalled_runs
            none, stalled = await producer_seconds(server.address, nbytes, clients, workdir, runs)
            return {
                "producer_none": statistics.median(none),
                "producer_stalled": statistics.median(stalled),
                # Run by run: a pair's two runs met the same load.
                "producer_slowdown": statistics.median(
                    s / n for s, n in zip(stalled, none, strict=True)
                ),
                "producer_first_slowdown": stalled[0] / none[0],
            }

        out.append(stalled)
    if "latency" in only:

        async def latency(server: Server) -> Values:
            idle50, idle99, _ = await latency_ms(server.address, params, workdir, bulk=False)
            load50, load99, rate = await latency_ms(server.address, params, workdir, bulk=True)
            return {
                "latency_idle_p50": idle50,
                "latency_idle_p99": idle99,
                "latency_load_p50": load50,
                "latency_load_p99": load99,
                "bulk_mb_s": rate,
            }

        out.append(latency)
    if "start" in only:

        async def start(server: Server) -> Values:
            return {"start_exit": await start_exit_ms(server.address, params.start_count)}

        out.append(start)
    if "burst" in only:

        async def burst(server: Server) -> Values:
            seconds = await burst_seconds(server.address, params.burst_execs, params.burst_lines)
            return {"burst": seconds}

        out.append(burst)
    if "creation" in only:

        async def creation(server: Server) -> Values:
            rates = await creation_rates(
                server.address, params.subscribers, params.creation_seconds
            )
            return {f"creation_{n}": rate for n, rate in rates.items()}

        out.append(creation)
    return out


async def _measure(server: Server, step: Step) -> Values:
    try:
        return await step(server)
    except BenchError as error:
        raise BenchError(f"{server.kind}: {error}") from None
    except grpc.RpcError as error:
        raise BenchError(f"{server.kind}: {error}\n{server.log_tail()}") from None


async def run_repetition(
    rep: int,
    params: Params,
    only: set[str],
    output_flags: list[str],
    workdir: Path,
    profile: Path | None,
) -> dict[str, Values]:
    """Both servers run side by side; each step measures one, then the other, taking turns
    going first, so that a change in the machine's load hits both alike."""
    results: dict[str, Values] = {kind: {} for kind in SERVERS}
    servers: list[Server] = []
    try:
        for kind in SERVERS:
            profile_to = profile / f"{kind}-run{rep + 1}.prof" if profile else None
            servers.append(
                start_server(
                    kind,
                    # No retention sweep during the run: removing hundreds of execs at once
                    # stalls the reference server's loop for seconds, and would land on
                    # whichever figure comes next (not measured here).
                    retention=3600.0,
                    output_flags=output_flags,
                    logdir=workdir,
                    profile=profile_to,
                )
            )
        for n, step in enumerate(steps(params, only, workdir)):
            for server in servers if (rep + n) % 2 == 0 else servers[::-1]:
                results[server.kind].update(await _measure(server, step))
    finally:
        for server in servers:
            server.stop()
    if "rss" in only:
        for kind in SERVERS if rep % 2 == 0 else SERVERS[::-1]:
            # A fresh server that retains everything for the whole measurement.
            server = start_server(kind, retention=3600.0, output_flags=output_flags, logdir=workdir)
            try:
                step = functools.partial(_rss_values, count=params.rss_execs)
                results[kind].update(await _measure(server, step))
            finally:
                server.stop()
    return results


async def _rss_values(server: Server, count: int) -> Values:
    return {"rss_per_exec": await rss_kb_per_exec(server, count)}


# -- the table ---------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    label: str
    unit: str
    higher_is_better: bool
    target: str = ""  # how the target reads in the table
    met: Callable[[float | None, float | None], bool | None] | None = None
    runs: dict[str, list[float | None]] = field(default_factory=dict)
    pipe: float | None = None
    #: A ratio of two rows (numerator, denominator): its best is the ratio of their bests.
    of: tuple[Row, Row] | None = None

    def best(self, kind: str) -> float | None:
        if self.of is not None:
            top, bottom = self.of[0].best(kind), self.of[1].best(kind)
            return top / bottom if top is not None and bottom else None
        values = [v for v in self.runs.get(kind, []) if v is not None]
        if not values:
            return None
        return max(values) if self.higher_is_better else min(values)

    @property
    def ratio(self) -> float | None:
        ours, naive = self.best("execstream"), self.best("naive")
        return ours / naive if ours is not None and naive else None

    @property
    def verdict(self) -> bool | None:
        if self.met is None:
            return None
        return self.met(self.best("execstream"), self.best("naive"))


def _vs_naive(low: float | None, high: float | None) -> Callable[[Any, Any], bool | None]:
    def met(ours: float | None, naive: float | None) -> bool | None:
        if ours is None or not naive:
            return None
        ratio = ours / naive
        return (low is None or ratio >= low) and (high is None or ratio <= high)

    return met


def _absolute(limit: float) -> Callable[[Any, Any], bool | None]:
    return lambda ours, _naive: None if ours is None else ours <= limit


def _at_least(limit: float) -> Callable[[Any, Any], bool | None]:
    return lambda ours, _naive: None if ours is None else ours >= limit


def build_rows(params: Params, runs: list[dict[str, Values]], pipe: list[float]) -> list[Row]:
    rows = [
        Row(
            "throughput",
            f"one client, {params.mib} MiB",
            "MB/s",
            True,
            "≥ 1.25x",
            _vs_naive(1.25, None),
        ),
    ]
    rows[0].pipe = max(pipe) if pipe else None
    for clients in params.fanout:
        target, met = "", None
        if clients == 8:
            target, met = "≥ 1.25x", _vs_naive(1.25, None)
        elif clients == 100:
            target, met = "≥ 1.5x", _vs_naive(1.5, None)
        label = f"fan-out {clients}, {params.fanout_mib} MiB each, in all"
        rows.append(Row(f"fanout_{clients}", label, "MB/s", True, target, met))
    no_worse = _vs_naive(None, 1.0)
    stalled = params.stalled_clients
    rows += [
        Row(
            "producer_none",
            f"producer writing {params.stalled_mib} MiB, no client, median",
            "s",
            False,
        ),
        Row("producer_stalled", f"  … with {stalled} stalled clients", "s", False),
        Row(
            "producer_slowdown",
            f"  slowdown, {stalled} stalled / none",
            "x",
            False,
            "≤ 1.05",
            _absolute(1.05),
        ),
        Row("producer_first_slowdown", "  first run, while windows fill", "x", False),
        Row("latency_idle_p50", "write → client latency p50, idle", "ms", False),
        Row(
            "latency_idle_p99", "write → client latency p99, idle", "ms", False, "≤ 1.00x", no_worse
        ),
        Row("latency_load_p50", f"  p50 under {params.bulk_rate:g} MB/s bulk", "ms", False),
        Row(
            "latency_load_p99",
            f"  p99 under {params.bulk_rate:g} MB/s bulk",
            "ms",
            False,
            "≤ 1.00x",
            no_worse,
        ),
        Row("bulk_mb_s", "  bulk output delivered meanwhile", "MB/s", True),
        Row("start_exit", "Start → exit of `true`, median", "ms", False, "≤ 1.00x", no_worse),
        Row(
            "burst",
            f"{params.burst_execs} execs x {params.burst_lines} lines",
            "s",
            False,
            "≤ 1.00x",
            no_worse,
        ),
        Row(
            "rss_per_exec", "RSS per retained exited exec", "KB", False, "≤ 20 KB", _absolute(20.0)
        ),
    ]
    for subscribers in params.subscribers:
        label = f"exec creation, {subscribers} lifecycle subscribers"
        rows.append(Row(f"creation_{subscribers}", label, "/s", True))
    if 0 in params.subscribers:
        for subscribers in params.subscribers:
            if subscribers:
                target, met = ("≥ 0.80", _at_least(0.8)) if subscribers == 256 else ("", None)
                label = f"  creation rate {subscribers} / 0 subscribers"
                rows.append(Row(f"creation_{subscribers}_vs_0", label, "x", True, target, met))
    by_id = {row.id: row for row in rows}
    for row in rows:
        if row.id.endswith("_vs_0"):
            row.of = (by_id[row.id.removesuffix("_vs_0")], by_id["creation_0"])
        for kind in SERVERS:
            row.runs[kind] = [_value(row.id, rep.get(kind, {})) for rep in runs]
    return [row for row in rows if any(v is not None for vs in row.runs.values() for v in vs)]


def _value(row_id: str, values: Values) -> float | None:
    """A figure of one repetition; a ratio row's runs are the ratios within each run."""
    if row_id.endswith("_vs_0"):
        base, this = values.get("creation_0"), values.get(row_id.removesuffix("_vs_0"))
        return this / base if base and this else None
    return values.get(row_id)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def print_table(rows: list[Row], params: Params, seconds: float, load: list[float]) -> None:
    header = ("figure", "unit", "pipe", "execstream", "naive", "exec/naive", "target", "met")
    lines = [header]
    for row in rows:
        verdict = {True: "met", False: "NOT MET", None: ""}[row.verdict]
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        pipe = _fmt(row.pipe) if row.pipe is not None else ""
        best = (_fmt(row.best("execstream")), _fmt(row.best("naive")))
        lines.append((row.label, row.unit, pipe, *best, ratio, row.target, verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    runs = f"{params.runs} run{'s' if params.runs > 1 else ''}"
    machine = f"{os.cpu_count()} CPUs, load average {load[0]:.1f} → {load[1]:.1f}"
    print(f"best of {runs}, {seconds:.0f} s in all, {machine}")
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(line[2:6], widths[2:6], strict=True)]
        cells += [line[6].ljust(widths[6]), line[7]]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))


def to_json(
    rows: list[Row], params: Params, seconds: float, argv: list[str], load: list[float]
) -> dict[str, Any]:
    return {
        "params": dataclasses.asdict(params),
        "output_flags": argv,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1min_before": load[0],
            "loadavg_1min_after": load[1],
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "seconds": seconds,
        "figures": [
            {
                "id": row.id,
                "label": row.label,
                "unit": row.unit,
                "higher_is_better": row.higher_is_better,
                "pipe": row.pipe,
                "execstream": {"best": row.best("execstream"), "runs": row.runs["execstream"]},
                "naive": {"best": row.best("naive"), "runs": row.runs["naive"]},
                "ratio": row.ratio,
                "target": row.target or None,
                "met": row.verdict,
            }
            for row in rows
        ],
    }


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Params]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[1:]),
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one run")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write every figure here")
    parser.add_argument("--only", nargs="+", choices=FIGURES, help="measure only these")
    parser.add_argument("--require-targets", action="store_true", help="exit 3 if one is unmet")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="run the servers under cProfile, one stats file per server and run (pstats); "
        "select what to profile with --only, and do not trust the figures of a profiled run",
    )
    for spec in dataclasses.fields(Params):
        kind: Callable[[str], Any] = int
        if spec.type in ("float",):
            kind = float
        nargs = "+" if spec.type.startswith("tuple") else None
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(
            flag, type=kind, nargs=nargs, help=f"default {getattr(FULL, spec.name)}"
        )
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    for spec in dataclasses.fields(Params):
        value = getattr(args, spec.name)
        if value is not None:
            overrides[spec.name] = tuple(value) if isinstance(value, list) else value
    params = dataclasses.replace(params, **overrides)
    if params.runs < 1:
        parser.error("--runs must be at least 1")
    if params.stalled_runs < 1:
        parser.error("--stalled-runs must be at least 1")
    return args, params


async def run(args: argparse.Namespace, params: Params) -> int:
    only = set(args.only or FIGURES)
    began = time.perf_counter()
    load = [os.getloadavg()[0]]  # a busy machine shows in the spread of the runs
    # Every exec keeps all its output, so that no client misses a byte however it lags: at
    # least the server's default limit (1 GiB).  Sized to the figures alone (164 MiB), the
    # latency figure's bulk exec, which writes 100 MB/s for as long as the ticks take, went
    # past it on a loaded machine, and evicted chunks its client had not read yet (a failed
    # run); the stalled figure's execs write --stalled-runs times --stalled-mib.
    largest = max(params.mib, params.fanout_mib, params.stalled_mib * params.stalled_runs) * MIB
    output_flags = _reference_output_flags(max(largest + 64 * MIB, 1 << 30))
    runs: list[dict[str, Values]] = []
    pipe: list[float] = []
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="execstream-bench-") as tmp:
        workdir = Path(tmp)
        for rep in range(params.runs):
            if "throughput" in only:
                pipe.append(pipe_mb_s(params.mib * MIB))
            runs.append(
                await run_repetition(rep, params, only, output_flags, workdir, args.profile)
            )
            print(
                f"run {rep + 1} of {params.runs} done ({time.perf_counter() - began:.0f} s)",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - began
    load.append(os.getloadavg()[0])
    rows = build_rows(params, runs, pipe)
    print_table(rows, params, seconds, load)
    if args.json is not None:
        args.json.write_text(
            json.dumps(to_json(rows, params, seconds, output_flags, load), indent=2) + "\n"
        )
    if args.require_targets and any(row.verdict is False for row in rows):
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, params = parse_args(argv)
    try:
        # One event loop for the whole run: grpc.aio binds itself to the first one.
        return asyncio.run(run(args, params))
    except (BenchError, OSError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"compare: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
