"""A small program written against execstream.client's public API, as a user would.

Not a test module: ``test_client_typing.py`` runs ``mypy --strict`` on it, so a change that
breaks the typed surface (a lost annotation, a widened type, a name gone from ``__all__``)
fails the build.  It runs too: ``python typed_user.py HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import assert_never

from execstream.client import (
    AsyncExecClient,
    ExecClient,
    ExecEvent,
    ExecStreamError,
    Exit,
    Gap,
    LifecycleEvent,
    NotFound,
    Output,
    ResourceUsage,
    RetryPolicy,
    Status,
    StreamName,
    SyncExec,
)


def describe(event: ExecEvent) -> str:
    if isinstance(event, Output):
        stream: StreamName = event.stream
        data: bytes = event.data
        return f"{stream} #{event.sequence}: {data!r}"
    if isinstance(event, Gap):
        return f"{event.missed} chunks missed before #{event.before_sequence}"
    if isinstance(event, Exit):
        return f"exit {event.code}"
    assert_never(event)


async def follow(target: str) -> int:
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    async with AsyncExecClient(target, timeout=10.0, retry=retry) as client:
        exec_ = await client.run("typed", "user", ["sh", "-c", "cat; exit 2"], env={"A": "1"})
        session_id: str = exec_.session_id
        print("session", session_id)
        await exec_.write_stdin(b"typed\n")
        await exec_.close_stdin()
        async for event in exec_:
            print(describe(event))
        code: int = await exec_.wait()
        status: Status = await client.status("typed", "user", resources=True)
        usage: ResourceUsage | None = status.resource_usage
        finished: int | None = status.finished_at
        print(status.state, finished, usage.memory_bytes if usage else None)
        async with client.events("typed", from_sequence=0) as events:
            async for lifecycle in events:
                first: LifecycleEvent = lifecycle
                print(first.event_type, first.exec_id)
                break
        try:
            await client.signal("typed", "TERM", exec_id="user")
        except NotFound as error:
            print("not found:", error.message)
        except ExecStreamError as error:
            print(error.label, error.code.name)
        return code


def follow_sync(target: str) -> list[ExecEvent]:
    with ExecClient(target) as client:
        attached: SyncExec = client.attach("typed", "user", from_sequence=1)
        with attached:
            events: list[ExecEvent] = list(attached)
            print("exit", attached.wait())
        with client.events("typed", from_sequence=0) as stream:
            lifecycle: LifecycleEvent = next(stream)
            print(lifecycle.sequence)
    return events


if __name__ == "__main__":
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    print("exit code", asyncio.run(follow(address)))
    print(len(follow_sync(address)), "events")
