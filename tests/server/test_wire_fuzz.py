"""Fuzzing the wire (issue 11): hypothesis-generated request sequences for all six RPCs, and
raw payloads that need not decode, against a real ``execstream serve`` process.

Whatever arrives, every call ends with OK or a status code PROTOCOL 14.1 documents (never
UNKNOWN or INTERNAL), nothing hangs, the server logs no traceback, and once the fuzzing
stops the server holds no exec, client or subscriber and its memory is back near where it
started.  Derandomized and bounded (a few thousand calls, well under a minute here).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from execstream import wire

# PROTOCOL 14.1; DEADLINE_EXCEEDED is this test's own deadline on a stream that legitimately
# waits (a lifecycle subscription, a session on an exec that does not end by itself).
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CONTAINERS = ["fz1", "fz2"]
EXAMPLES = 450


@dataclass
class Target:
    process: subprocess.Popen[str]
    address: str
    metrics: str
    channel: grpc.Channel
    calls: int = 0
    baseline_rss_kib: int = 0
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "execstream",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--retention",
            "0",
            "--cleanup-interval",
            "0.2",
            "--max-execs",
            "64",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    metrics = process.stderr.readline().split("http://")[-1].split("/")[0]
    address = process.stdout.readline().split()[-1]
    channel = grpc.insecure_channel(address)
    fuzzed = Target(process, address, metrics, channel)
    for _ in range(20):  # warm up: what the first calls allocate once is not a leak
        _call(fuzzed, "Session", [wire.SessionRequest(start=_start("warm", ["true"]))])
        _call(fuzzed, "ContainerStatus", wire.ContainerStatusRequest(container_id="warm"))
    fuzzed.baseline_rss_kib = _rss_kib(process.pid)
    try:
        yield fuzzed
    finally:
        channel.close()
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "Traceback" not in err, err
    assert process.returncode == 0, err


# -- strategies ---------------------------------------------------------------------------

ids = st.one_of(
    st.sampled_from(["fz1", "fz2", "e1", "e2", "e3"]),
    st.sampled_from(["", "-bad", "a/b", "x" * 129, "é"]),
    st.text(max_size=12),
)
# Mostly valid, so that calls get past validation and reach execs (one_of picks uniformly).
container_ids = st.one_of(st.sampled_from(CONTAINERS), st.sampled_from(CONTAINERS), ids)
exec_ids = st.one_of(st.sampled_from(["e1", "e2", "e3"]), st.sampled_from(["e1", "e2"]), ids)
commands = st.one_of(
    st.just([]),  # attach
    st.sampled_from([["true"], ["sh", "-c", "echo out; echo err >&2; exit 3"]]),
    st.sampled_from(
        [
            ["true"],
            ["sh", "-c", "echo out; echo err >&2; exit 3"],
            ["head", "-c", "200000", "/dev/zero"],
            ["cat"],
            ["sleep", "0.2"],
            ["no-such-command"],
            ["x" * 300],
            ["/etc"],
        ]
    ),
    st.lists(st.text(max_size=20), min_size=1, max_size=3),
)
sizes = st.builds(wire.Resize, width=st.integers(-2, 300), height=st.integers(-2, 300))
starts = st.builds(
    wire.Start,
    container_id=container_ids,
    exec_id=exec_ids,
    command=commands,
    env=st.one_of(
        st.just({}), st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2)
    ),
    working_dir=st.sampled_from(["", "", "", "/", "/tmp", "no-such-dir", "d" * 300]),
    tty=st.booleans(),
    session_id=st.sampled_from(["", "s1"]),
    replay_from_sequence=st.sampled_from([0, 0, 0, 1, 2, 10**6]),
    terminal_size=st.one_of(st.none(), st.none(), sizes),
)
session_messages = st.one_of(
    st.builds(lambda s: wire.SessionRequest(start=s), starts),
    st.builds(lambda b: wire.SessionRequest(stdin=b), st.binary(max_size=64)),
    st.builds(lambda r: wire.SessionRequest(resize=r), sizes),
    st.just(wire.SessionRequest()),
)
session_calls = st.tuples(
    st.just("Session"),
    st.one_of(
        # mostly well-formed: a start first, then anything
        st.tuples(st.builds(lambda s: wire.SessionRequest(start=s), starts)).flatmap(
            lambda first: st.lists(session_messages, max_size=4).map(lambda rest: [*first, *rest])
        ),
        st.lists(session_messages, max_size=4),
    ),
)
unary_calls = st.one_of(
    st.tuples(
        st.just("ContainerStatus"),
        st.builds(
            wire.ContainerStatusRequest,
            container_id=container_ids,
            exec_id=st.one_of(st.just(""), exec_ids),
            include_resource_usage=st.booleans(),
        ),
    ),
    st.tuples(
        st.sampled_from(["ContainerPause", "ContainerResume"]),
        st.builds(wire.ContainerControlRequest, container_id=container_ids),
    ),
    st.tuples(
        st.just("ContainerSignal"),
        st.builds(
            wire.ContainerSignalRequest,
            container_id=container_ids,
            signal=st.sampled_from(["TERM", "sigkill", "HUP", "CONT", "NOPE", "", "SIG_DFL"]),
            exec_id=st.one_of(st.just(""), exec_ids),
        ),
    ),
    st.tuples(
        st.just("ContainerLifecycle"),
        st.builds(
            wire.ContainerLifecycleRequest,
            container_id=st.one_of(st.just(""), container_ids),
            exec_id=st.one_of(st.just(""), exec_ids),
            replay_from_sequence=st.one_of(st.none(), st.integers(0, 10**9)),
        ),
    ),
)
raw_calls = st.tuples(
    st.sampled_from([f"raw:{m.name}" for m in wire.METHODS]),
    st.lists(st.binary(max_size=40), min_size=1, max_size=3),
)
calls = st.lists(st.one_of(session_calls, unary_calls, raw_calls), min_size=1, max_size=8)


# -- calling ------------------------------------------------------------------------------


_warm = iter(range(10**6))


def _start(container: str, command: list[str]) -> wire.Start:
    return wire.Start(container_id=container, exec_id=f"w{next(_warm)}", command=command)


def _code(error: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    return code


def _call(target: Target, name: str, payload: Any) -> grpc.StatusCode:
    target.calls += 1
    methods = {m.name: m for m in wire.METHODS}
    raw = name.startswith("raw:")
    method = methods[name.removeprefix("raw:")]
    encode = None if raw else method.serialize
    streaming_in = method.arity in (wire.Arity.STREAM_STREAM, wire.Arity.STREAM_UNARY)
    streaming_out = method.arity in (wire.Arity.STREAM_STREAM, wire.Arity.UNARY_STREAM)
    factory = getattr(target.channel, method.arity.value)
    stub = factory(method.path, request_serializer=encode, response_deserializer=None)
    # Streams that may legitimately wait end by this deadline.
    timeout = 0.3 if method.name == "ContainerLifecycle" else 5.0
    request: Any = iter(payload) if streaming_in else payload
    if raw and not streaming_in:
        request = payload[0]
    try:
        if streaming_out:
            for _ in stub(request, timeout=timeout):
                pass
        else:
            stub(request, timeout=timeout)
    except grpc.RpcError as error:
        return _code(error)
    return grpc.StatusCode.OK


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(sequence=calls)
def test_every_call_ends_with_a_documented_code(target: Target, sequence: list[Any]) -> None:
    for name, payload in sequence:
        started = time.monotonic()
        code = _call(target, name, payload)
        target.codes[f"{name} {code.name}"] += 1
        assert code in DOCUMENTED, (name, payload, code)
        assert time.monotonic() - started < 15, f"{name} took too long"
        assert target.process.poll() is None, "the server died"


def _metrics(target: Target) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{target.metrics}/metrics", timeout=5).read().decode()
    return {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        status = file.read()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


def test_afterwards_the_server_holds_nothing(target: Target) -> None:
    """Runs after the fuzzing (same module, in file order): everything is released."""
    assert target.calls >= 1000, f"only {target.calls} calls were made"
    for container in CONTAINERS:  # a fuzzed pause must not keep execs alive
        _call(target, "ContainerResume", wire.ContainerControlRequest(container_id=container))
    deadline = time.monotonic() + 20
    while True:
        metrics = _metrics(target)
        held = {
            name: value
            for name, value in metrics.items()
            if value
            and (
                name.startswith("execstream_execs{")
                or name in ("execstream_clients_attached", "execstream_lifecycle_subscribers")
            )
        }
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert held == {}, f"still held after the fuzzing: {held}"
    errors = {
        name: value
        for name, value in metrics.items()
        if name.startswith("execstream_rpcs_total") and "UNKNOWN" in name
    }
    assert errors == {}
    # Memory: back near the warmed-up baseline (allocator noise, not output or clients).
    grown = _rss_kib(target.process.pid) - target.baseline_rss_kib
    print(f"{target.calls} calls; RSS grew {grown} KiB; {sorted(target.codes.items())}")
    assert grown < 32 * 1024, f"the server grew by {grown} KiB"
