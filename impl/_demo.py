"""``execstream demo``: one server, one exec, two clients (one joining late), both streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import betterproto2
import grpc.aio

from . import wire
from .server import ExecServer, ServerSettings

SCRIPT = (
    'for i in 1 2 3 4 5; do echo "tick $i"; echo "warn $i" >&2; sleep 0.3; done; '
    'echo "done"; exit 3'
)


@dataclass
class Seen:
    name: str
    chunks: list[tuple[int, str, bytes]] = field(default_factory=list)
    exit_code: int | None = None


async def _requests(start: wire.Start) -> AsyncIterator[wire.SessionRequest]:
    yield wire.SessionRequest(start=start)  # then half-close: PROTOCOL 3.6 keeps the output


async def _follow(stub: wire.ExecStub, seen: Seen, start: wire.Start) -> None:
    async for response in stub.Session(_requests(start)):
        kind, value = betterproto2.which_one_of(response, "msg")
        if isinstance(value, wire.Ready):
            note = "replay complete" if value.replay_complete else "replaying history"
            print(f"  [{seen.name}] ready session={value.session_id} ({note})")
        elif isinstance(value, wire.OutputChunk):
            stream = "stdout" if value.stdout is not None else "stderr"
            data = value.stdout if value.stdout is not None else value.stderr or b""
            seen.chunks.append((value.sequence, stream, data))
            replay = " (replay)" if value.is_replay else ""
            print(f"  [{seen.name}] #{value.sequence} {stream}: {data.decode().rstrip()}{replay}")
        elif kind == "exit" and isinstance(value, int):
            seen.exit_code = value
            print(f"  [{seen.name}] exit {value}")


async def run_demo() -> int:
    async with ExecServer(ServerSettings(listen="127.0.0.1:0", retention=30)) as server:
        print(f"execstream reference server listening on {server.address}")
        print(f"exec demo/hello runs: sh -c '{SCRIPT}'")
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = wire.ExecStub(channel)
            early, late = Seen("client A"), Seen("client B")
            create = wire.Start(container_id="demo", exec_id="hello", command=["sh", "-c", SCRIPT])
            first = asyncio.create_task(_follow(stub, early, create))
            await asyncio.sleep(0.8)
            print("  -- client B attaches now, from the start of the history --")
            attach = wire.Start(container_id="demo", exec_id="hello", replay_from_sequence=0)
            await asyncio.gather(first, _follow(stub, late, attach))
    same = early.chunks == late.chunks and early.exit_code == late.exit_code
    print()
    print(f"client A received {len(early.chunks)} chunks, exit code {early.exit_code}")
    print(f"client B received {len(late.chunks)} chunks, exit code {late.exit_code}")
    print("both clients saw the same bytes in the same order" if same else "STREAMS DIFFER")
    return 0 if same and early.exit_code == 3 else 1
