"""The checks cases share: what every stream must show, and the settings some cases need.

Case modules import these (and ``_context``, ``_session_client``, ``_subscription``,
``_recording``, ``_workloads``), never one another, so that a section's cases can be read,
changed and selected on their own.
"""

from __future__ import annotations

import hashlib

import grpc

from execstream import wire

from ._case import Failure, Skip, expect
from ._context import CaseContext
from ._recording import expect_code
from ._session_client import SessionClient

__all__ = [
    "CLOCK_SKEW_NS",
    "ROW_UNKNOWN",
    "expect_code",
    "expect_contiguous",
    "expect_flow",
    "expect_output",
    "expect_rejected",
    "expect_same_chunks",
    "expect_timestamps",
    "retention_settings",
]

ROW_UNKNOWN = "Session: attach to an unknown or removed exec"


def expect_flow(client: SessionClient) -> None:
    """PROTOCOL 3.3 and 5.1: ready first, exit last and once, then status OK."""
    expect(
        client.ok and client.exit_code is not None,
        f"{client.label}: exit, then status OK",
        client.describe(),
    )
    expect(
        bool(client.order) and client.order[0] == "ready",
        f"{client.label}: ready as the first message",
        client.describe(),
    )
    expect(
        client.order[-1] == "exit" and client.order.count("exit") == 1,
        f"{client.label}: exit as the last message, once",
        client.describe(),
    )


def expect_contiguous(client: SessionClient, first: int = 1) -> None:
    """PROTOCOL 4.2: sequences ``first``, ``first + 1``, ... with no gap."""
    want = first
    for chunk in client.chunks:
        if chunk.sequence != want or chunk.gap_before:
            raise Failure(
                f"{client.label}: chunk #{want} (contiguous from #{first}, no gap)",
                f"chunk #{chunk.sequence} gap_before {chunk.gap_before}: {client.describe()}",
            )
        want += 1


def expect_output(client: SessionClient, out: bytes, err: bytes = b"") -> None:
    """PROTOCOL 4.3: the concatenated stdout and stderr equal what the process wrote."""
    for name, want in (("stdout", out), ("stderr", err)):
        seen = client.stream(name)
        if seen != want:
            raise Failure(
                f"{client.label}: {name} of {len(want)} bytes {_digest(want)} "
                f"starting {want[:40]!r}",
                f"{len(seen)} bytes {_digest(seen)} starting {seen[:40]!r}: {client.describe()}",
            )


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def expect_same_chunks(clients: list[SessionClient]) -> None:
    """PROTOCOL 4.3: a sequence number means the same stream, bytes and timestamp for all."""
    first = clients[0]
    by_sequence = {c.sequence: c for c in first.chunks}
    for other in clients[1:]:
        for chunk in other.chunks:
            mine = by_sequence.get(chunk.sequence)
            if mine is None:
                continue
            if (mine.stdout, mine.stderr, mine.timestamp) != (
                chunk.stdout,
                chunk.stderr,
                chunk.timestamp,
            ):
                raise Failure(
                    f"chunk #{chunk.sequence} identical for {first.label} and {other.label}",
                    f"{first.label}: {_chunk(mine)}; {other.label}: {_chunk(chunk)}",
                )


def _chunk(chunk: wire.OutputChunk) -> str:
    name = "stdout" if chunk.stdout is not None else "stderr"
    data = (chunk.stdout if chunk.stdout is not None else chunk.stderr) or b""
    return f"{name} {data[:30]!r} ({len(data)} B) timestamp {chunk.timestamp}"


async def expect_rejected(
    ctx: CaseContext,
    client: SessionClient,
    code: grpc.StatusCode,
    what: str,
    mention: str | None = None,
) -> None:
    """The stream must end with ``code`` and a message (2.2), naming ``mention`` if given."""
    await client.finished()
    expect(
        client.code is code,
        f"{what}: the stream ends with {code.name}",
        client.describe(),
    )
    expect(bool(client.details.strip()), f"{what}: a message saying what was wrong", "none")
    if mention is not None:
        expect(
            mention.lower() in client.details.lower(),
            f"{what}: a message naming {mention!r}",
            repr(client.details),
        )


#: How far the target's clock may be from the suite's (a remote target); a unit error is not.
CLOCK_SKEW_NS = 300 * 10**9


def expect_timestamps(stamps: list[int], before: int, after: int, what: str) -> None:
    """PROTOCOL 2.4: ns since the epoch, within the time the case ran (plus clock skew)."""
    for stamp in stamps:
        expect(
            before - CLOCK_SKEW_NS <= stamp <= after + CLOCK_SKEW_NS,
            f"{what} in nanoseconds since the epoch, between {before} and {after} "
            f"(give or take {CLOCK_SKEW_NS // 10**9} s)",
            stamp,
        )


def retention_settings(ctx: CaseContext) -> tuple[float, float]:
    retention, interval = ctx.target.retention, ctx.target.cleanup_interval
    if retention is None or interval is None:
        raise Skip("the target's retention is unknown: give --retention and --cleanup-interval")
    if retention + interval > 60:
        raise Skip(f"retention + sweep interval is {retention + interval:g} s (the suite waits 60)")
    return retention, interval
