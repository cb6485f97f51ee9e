"""The naive baseline: the plain grpcio Exec server a user would otherwise write.

    python bench/naive_server.py [--listen 127.0.0.1:0] [--retention 300]

It speaks the ``Session`` RPC of ``spec/exec.proto`` with protoc-generated classes, generated
at run time into a temporary directory, and uses no execstream code.  The simplest correct
design: each exec is a real subprocess whose stdout and stderr are read in 64 KiB reads into
one list of sequenced chunks; each client is one loop over that list, so every client gets
every byte, late clients replay from the list, and the exec never waits for a client.  It
keeps every chunk until the exec's retention has passed.  What it leaves out: TTYs, status,
control and lifecycle events (UNIMPLEMENTED), limits, tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.resources
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio

PROTO = Path(__file__).resolve().parent.parent / "spec" / "exec.proto"
READ_SIZE = 64 * 1024
_GENERATED = ("exec_pb2", "exec_pb2_grpc")
_loaded: list[ModuleType] = []


def load_protos() -> tuple[ModuleType, ModuleType]:
    """``exec_pb2`` and ``exec_pb2_grpc``, generated from spec/exec.proto once per process.

    They are imported without leaving their generic names in ``sys.modules`` or their
    directory on ``sys.path``, so that other code compiling the same proto is not handed
    these (the descriptor pool accepts the identical file twice)."""
    if not _loaded:
        from grpc_tools import protoc  # type: ignore[import-untyped]

        with tempfile.TemporaryDirectory(prefix="naive-exec-proto-") as out:
            include = str(importlib.resources.files("grpc_tools") / "_proto")
            argv = ["protoc", f"-I{PROTO.parent}", f"-I{include}"]
            argv += [f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO)]
            if protoc.main(argv) != 0:
                raise RuntimeError(f"protoc failed on {PROTO}")
            saved = {name: sys.modules.pop(name) for name in _GENERATED if name in sys.modules}
            sys.path.insert(0, out)
            try:
                # exec_pb2_grpc imports exec_pb2 by name: both in one go.
                _loaded.extend(importlib.import_module(name) for name in _GENERATED)
            finally:
                sys.path.remove(out)
                for name in _GENERATED:
                    sys.modules.pop(name, None)
                sys.modules.update(saved)
    return _loaded[0], _loaded[1]


pb, pb_grpc = load_protos()


class Exec:
    """One exec: its process, every chunk it wrote, and its exit code."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.chunks: list[Any] = []  # pb.OutputChunk, sequence = index + 1
        self.exit_code: int | None = None
        self.changed = asyncio.Event()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while data := await stream.read(READ_SIZE):
            chunk = pb.OutputChunk(sequence=len(self.chunks) + 1, timestamp=time.time_ns())
            setattr(chunk, name, data)
            self.chunks.append(chunk)
            self._notify()

    async def run(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        await asyncio.gather(
            self.pump(self.proc.stdout, "stdout"), self.pump(self.proc.stderr, "stderr")
        )
        code = await self.proc.wait()
        self.exit_code = code if code >= 0 else 128 - code
        self._notify()


ExecServicer: Any = pb_grpc.ExecServicer  # generated at run time: no static type


class NaiveExec(ExecServicer):  # type: ignore[misc]
    def __init__(self, retention: float) -> None:
        self.execs: dict[tuple[str, str], Exec] = {}
        self.retention = retention
        self.sessions = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def _create(self, start: Any, key: tuple[str, str]) -> Exec:
        try:
            proc = await asyncio.create_subprocess_exec(
                *start.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **start.env},
                cwd=start.working_dir or None,
                start_new_session=True,
            )
        except OSError as error:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot run the command: {error}"
            ) from None
        exec_ = self.execs[key] = Exec(proc)
        task = asyncio.create_task(self._run(exec_, key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return exec_

    async def _run(self, exec_: Exec, key: tuple[str, str]) -> None:
        await exec_.run()
        asyncio.get_running_loop().call_later(self.retention, self.execs.pop, key, None)

    async def Session(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        try:
            first = await anext(aiter(requests), None)
            if first is None or first.WhichOneof("msg") != "start":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be start")
            start, key = first.start, (first.start.container_id, first.start.exec_id)
            if not start.container_id or not start.exec_id:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "container_id and exec_id are required"
                )
            if start.tty:
                raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "the naive server has no TTYs")
            exec_ = self.execs.get(key)
            if start.command:
                if exec_ is not None:
                    raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"exec {key} exists")
                exec_ = await self._create(start, key)
            elif exec_ is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"exec {key} not found")
        except _Abort as abort:
            await context.abort(abort.code, abort.message)
            return
        self.sessions += 1
        session_id = start.session_id or f"naive-{self.sessions}"
        boundary = len(exec_.chunks) + 1
        if start.replay_from_sequence > boundary:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, "replay_from_sequence is past the end"
            )
        index = max(start.replay_from_sequence, 1) - 1
        replaying = index < boundary - 1
        yield self._ready(session_id, not replaying, boundary)
        stdin = asyncio.create_task(self._stdin(exec_, requests))
        try:
            while True:
                # While replaying, stop at the boundary fixed at attach (PROTOCOL 6.3).
                while index < (boundary - 1 if replaying else len(exec_.chunks)):
                    chunk = exec_.chunks[index]
                    if replaying:
                        chunk = _copy(chunk)
                        chunk.is_replay = True
                    yield pb.SessionResponse(output_chunk=chunk)
                    index += 1
                if replaying:
                    replaying = False
                    yield self._ready(session_id, True, boundary)
                    continue
                if exec_.exit_code is not None:
                    yield pb.SessionResponse(exit=exec_.exit_code)
                    return
                await exec_.changed.wait()
        finally:
            stdin.cancel()

    @staticmethod
    def _ready(session_id: str, complete: bool, boundary: int) -> Any:
        ready = pb.Ready(session_id=session_id, replay_complete=complete, next_sequence=boundary)
        return pb.SessionResponse(ready=ready)

    async def _stdin(self, exec_: Exec, requests: AsyncIterator[Any]) -> None:
        pipe = exec_.proc.stdin
        assert pipe is not None
        with contextlib.suppress(grpc.RpcError, ConnectionError):
            async for request in requests:
                if request.WhichOneof("msg") != "stdin":
                    continue
                if not request.stdin:
                    pipe.close()
                elif not pipe.is_closing():
                    pipe.write(request.stdin)
                    await pipe.drain()

    async def ContainerLifecycle(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "the naive server has no lifecycle events"
        )
        yield  # an async generator, as a server-streaming handler must be

    def kill_all(self) -> None:
        for exec_ in self.execs.values():
            if exec_.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(exec_.proc.pid, signal.SIGKILL)


def _copy(chunk: Any) -> Any:
    copy = pb.OutputChunk()
    copy.CopyFrom(chunk)
    return copy


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def serve(listen: str, retention: float) -> None:
    server = grpc.aio.server()
    servicer = NaiveExec(retention)
    pb_grpc.add_ExecServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    servicer.kill_all()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--retention", type=float, default=300.0)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.retention))


if __name__ == "__main__":
    main()
