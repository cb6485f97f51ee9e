"""The process runtime, with real processes: exit codes, output, stdin, TTYs, control, usage.

Every runtime here is closed by its fixture, which then checks that no process started with
that runtime's state dir as ``HOME`` is left on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from cpu import BURN_SECONDS, BURNER, TICK_TOLERANCE, assert_percent_matches, bracketed, cpu_seconds

from execstream.server._errors import ErrorCode, ExecError
from execstream.server._log import ExecLog, Stream
from execstream.server._storage import MemoryStorage
from execstream.server.runtime import ExecSpec, ProcessExec, ProcessRuntime
from execstream.server.runtime.process import (
    _finder,
    _freezer,
    _procfs,
    _runtime,
    _spawn,
    end_leftovers,
)
from execstream.server.runtime.process._stdio import OutputReader, grow_pipe

TIMEOUT = 10.0


class Recorder:
    """An output sink that keeps every write."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.chunks.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


class Run:
    """One exec started by a test, with its two recorders."""

    def __init__(self, proc: ProcessExec, stdout: Recorder, stderr: Recorder) -> None:
        self.proc = proc
        self.stdout = stdout
        self.stderr = stderr

    async def wait(self, timeout: float = TIMEOUT) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def pids(self) -> list[int]:
        """The numbers the command printed on lines of their own (``echo $!``)."""
        return [int(n) for n in re.findall(rb"^(\d+)\r?$", self.stdout.data, re.M)]


_ids = itertools.count(1)


async def start(
    runtime: ProcessRuntime,
    command: Sequence[str],
    *,
    container: str = "c1",
    exec_id: str | None = None,
    **spec: object,
) -> Run:
    stdout, stderr = Recorder(), Recorder()
    proc = await runtime.spawn(
        container,
        exec_id or f"e{next(_ids)}",
        ExecSpec(command=command, **spec),  # type: ignore[arg-type]
        stdout,
        stderr,
    )
    return Run(proc, stdout, stderr)


async def eventually(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def state_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    return raw[raw.rfind(b")") + 2 :].split()[0].decode()


def processes_with_home_under(directory: Path) -> list[int]:
    needle = b"HOME=" + str(directory).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(needle) for item in environ.split(b"\0")):
            found.append(int(name))
    return found


async def closed_and_clean(runtime: ProcessRuntime) -> None:
    await runtime.close()
    await eventually(
        lambda: not processes_with_home_under(runtime.state_dir),
        "every process of the runtime to be gone",
        timeout=5,
    )


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(tmp_path / "state", drain_timeout=1.0)
    yield rt
    await closed_and_clean(rt)


@pytest.fixture(params=["freezer", "signals"])
async def any_runtime(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ProcessRuntime]:
    """A runtime of each pause method: the freezer (where writable) and signals."""
    rt = ProcessRuntime(
        tmp_path / "state", drain_timeout=1.0, cgroup_freezer=request.param == "freezer"
    )
    try:
        assert rt.pause_method == request.param
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield rt
    await closed_and_clean(rt)


def expect_error(code: ErrorCode, *words: str) -> Callable[[ExecError], None]:
    def check(exc: ExecError) -> None:
        assert exc.code is code, exc
        for word in words:
            assert word in exc.message, exc

    return check


# --- exit and output ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (["true"], 0),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -KILL $$"], 128 + 9),
        (["sh", "-c", "kill -TERM $$"], 128 + 15),
    ],
)
async def test_exit_code(runtime: ProcessRuntime, command: list[str], code: int) -> None:
    run = await start(runtime, command)
    assert await run.wait() == code
    assert run.proc.exit_code == code


async def test_stdout_and_stderr_are_separate_and_complete(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    out, err = os.urandom(1_500_000), os.urandom(1_300_000) + b"\0\xff\r\n"
    (tmp_path / "out").write_bytes(out)
    (tmp_path / "err").write_bytes(err)
    run = await start(
        runtime,
        ["sh", "-c", 'cat "$0" & cat "$1" >&2; wait', str(tmp_path / "out"), str(tmp_path / "err")],
    )
    assert await run.wait() == 0
    assert run.stdout.data == out
    assert run.stderr.data == err
    # Each read's full 64 KiB pieces in one write, or a short last piece: the log cuts
    # either into the chunks of PROTOCOL 4.4.
    assert all(len(c) % 65536 == 0 or len(c) < 65536 for c in run.stdout.chunks + run.stderr.chunks)


async def test_each_read_is_one_sink_write_of_at_most_read_size(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path / "state", read_size=4096)
    try:
        run = await start(rt, ["head", "-c", "200000", "/dev/zero"])
        assert await run.wait() == 0
        assert len(run.stdout.data) == 200_000
        assert all(0 < len(chunk) <= 4096 for chunk in run.stdout.chunks)
    finally:
        await closed_and_clean(rt)


async def test_one_read_takes_what_the_pipe_holds_in_full_sized_writes() -> None:
    """A producer ahead of the server: the pipe is emptied in one read, and the sink gets
    full ``read_size`` writes, the last one shorter (PROTOCOL 4.4: no more pieces than that)."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    grow_pipe(write_fd)
    os.set_blocking(read_fd, False)
    sink, closed = _Signalling(), loop.create_future()
    payload = os.urandom(200_000)
    assert os.write(write_fd, payload) == len(payload)
    reader = OutputReader(
        loop, read_fd, sink, 4096, lambda: closed.set_result(None), owns_fd=True, label="test"
    )
    try:
        await asyncio.wait_for(sink.written.wait(), TIMEOUT)
        # All of it at once: one turn of the loop, one read.
        assert [len(c) for c in sink.chunks] == [4096] * 48 + [3392]
        assert sink.data == payload
        os.close(write_fd)
        write_fd = -1
        await asyncio.wait_for(closed, TIMEOUT)  # end of file closes the reader
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        reader.close()


async def test_pieces_of_the_log_chunk_size_go_to_the_sink_in_one_write_per_read() -> None:
    """With ``read_size`` a multiple of the log's 64 KiB chunks, a read's full pieces are one
    write (one storage write, not one per piece), which the log cuts into the same chunks."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    grow_pipe(write_fd)
    os.set_blocking(read_fd, False)
    sink = _Signalling()
    payload = os.urandom(200_000)
    assert os.write(write_fd, payload) == len(payload)
    reader = OutputReader(loop, read_fd, sink, 65536, lambda: None, owns_fd=True, label="test")
    try:
        await asyncio.wait_for(sink.written.wait(), TIMEOUT)
        assert [len(c) for c in sink.chunks] == [3 * 65536, 3392]
        assert sink.data == payload
        log = ExecLog(MemoryStorage(), max_output_bytes=0)
        for data in sink.chunks:
            log.append(Stream.STDOUT, data, 1)
        assert [len(c.data) for c in log.read(1).items] == [65536] * 3 + [3392]
    finally:
        os.close(write_fd)
        reader.close()


async def test_what_the_producer_writes_while_a_turn_is_stored_joins_that_turn() -> None:
    """The reader stores each read's full pieces at once and reads on: the producer refilling
    the pipe meanwhile is read in the same turn, and the leftovers of both reads make one
    piece, not two short ones (PROTOCOL 4.4)."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    grow_pipe(write_fd)
    os.set_blocking(read_fd, False)
    payload = os.urandom(15_000)
    refilled: list[bool] = []

    class Refilling(_Signalling):
        def write(self, data: bytes) -> None:
            super().write(data)
            if not refilled:  # the producer, running while the first piece is stored
                refilled.append(True)
                os.write(write_fd, payload[10_000:])

    sink = Refilling()
    os.write(write_fd, payload[:10_000])
    reader = OutputReader(loop, read_fd, sink, 4096, lambda: None, owns_fd=True, label="test")
    try:
        await asyncio.wait_for(sink.written.wait(), TIMEOUT)
        assert [len(c) for c in sink.chunks] == [4096, 4096, 4096, 2712]
        assert sink.data == payload
    finally:
        os.close(write_fd)
        reader.close()


class _Signalling(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.written.set()


async def test_output_written_right_before_exit_is_delivered_before_wait(
    runtime: ProcessRuntime,
) -> None:
    async def one(i: int) -> None:
        run = await start(runtime, ["sh", "-c", f"printf out-{i}; printf err-{i} >&2; exit 3"])
        assert await run.wait() == 3
        assert run.stdout.data == f"out-{i}".encode()
        assert run.stderr.data == f"err-{i}".encode()
        run.proc.release()

    for batch in range(5):
        await asyncio.gather(*(one(batch * 10 + i) for i in range(10)))


async def test_tty_output_right_before_exit_is_delivered(runtime: ProcessRuntime) -> None:
    for i in range(15):
        run = await start(runtime, ["printf", f"tty-marker-{i}"], tty=True)
        assert await run.wait() == 0
        assert run.stdout.data == f"tty-marker-{i}".encode()
        run.proc.release()


async def test_drain_is_bounded_when_a_descendant_keeps_the_pipes(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path / "state", drain_timeout=0.5)
    try:
        run = await start(rt, ["sh", "-c", "sleep 30 & echo $!; echo hi"])
        began = time.monotonic()
        assert await run.wait(timeout=5) == 0
        assert time.monotonic() - began < 4
        assert b"hi\n" in run.stdout.data
        (sleeper,) = run.pids()
        assert sleeper in rt.processes_of("c1")
        await run.proc.kill()
        assert not exists(sleeper)

        # release() also kills what is left of an exec.
        run = await start(rt, ["sh", "-c", "setsid sleep 30 & echo $!"])
        assert await run.wait(timeout=5) == 0
        (sleeper,) = run.pids()
        assert exists(sleeper)
        run.proc.release()
        await eventually(lambda: not exists(sleeper), "the released exec's sleep to be gone")
    finally:
        await closed_and_clean(rt)


async def test_wait_survives_a_cancelled_waiter(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sh", "-c", "sleep 0.2; echo done"])
    waiter = asyncio.ensure_future(run.proc.wait())
    await asyncio.sleep(0.01)
    waiter.cancel()
    assert await run.wait() == 0
    assert run.stdout.data == b"done\n"


# --- environment, working dir, errors -------------------------------------------------------


async def test_env_and_working_dir(runtime: ProcessRuntime, tmp_path: Path) -> None:
    container = runtime.container_dir("c1")
    (container / "sub").mkdir(parents=True)
    script = 'echo "$FOO|$PATH|$HOME|$EXECSTREAM_CONTAINER|$EXECSTREAM_EXEC|$TERM"; pwd'
    run = await start(
        runtime, ["sh", "-c", script], exec_id="x1", env={"FOO": "b a r"}, working_dir="sub"
    )
    assert await run.wait() == 0
    line, cwd = run.stdout.text.splitlines()
    assert line == f"b a r|{_spawn.BASE_PATH}|{container}|c1|x1|"
    assert Path(cwd) == container / "sub"

    run = await start(runtime, ["pwd"], working_dir=str(tmp_path), env={"PATH": "/bin:/usr/bin"})
    assert await run.wait() == 0
    assert Path(run.stdout.text.strip()) == tmp_path

    run = await start(runtime, ["pwd"])
    assert await run.wait() == 0
    assert Path(run.stdout.text.strip()) == container


async def test_tty_env_has_term(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sh", "-c", "echo $TERM; tty"], tty=True)
    assert await run.wait() == 0
    term, tty = run.stdout.text.splitlines()
    assert term == "xterm"
    assert tty.startswith("/dev/pts/")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"command": ["true"], "working_dir": "no-such-dir"}, ["working_dir", "no-such-dir"]),
        ({"command": ["true"], "working_dir": "/etc/hostname"}, ["/etc/hostname", "directory"]),
        ({"command": ["no-such-command-x"]}, ["no-such-command-x", "not found"]),
        ({"command": ["/no/such/file"]}, ["/no/such/file"]),
        ({"command": ["/etc"]}, ["/etc", "directory"]),
    ],
)
async def test_spawn_refuses_what_cannot_run(
    runtime: ProcessRuntime, spec: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ExecError) as caught:
        await runtime.spawn("fresh", "e", ExecSpec(**spec), Recorder(), Recorder())  # type: ignore[arg-type]
    expect_error(ErrorCode.INVALID_ARGUMENT, *words)(caught.value)
    assert not runtime.container_dir("fresh").exists()
    assert runtime.processes_of("fresh") == []


async def test_spawn_refuses_a_file_that_is_not_executable(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    for command, env in ([str(script)], {}), (["script"], {"PATH": str(tmp_path)}):
        with pytest.raises(ExecError) as caught:
            await start(runtime, command, container="fresh", env=env)
        expect_error(ErrorCode.INVALID_ARGUMENT, str(script), "not executable")(caught.value)
    script.chmod(0o755)
    run = await start(runtime, ["script"], container="fresh", env={"PATH": str(tmp_path)})
    assert await run.wait() == 0
    assert run.stdout.data == b"hi\n"


async def test_failed_spawn_keeps_a_container_dir_in_use(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sleep", "30"], container="busy")
    with pytest.raises(ExecError):
        await start(runtime, ["no-such-command-x"], container="busy")
    assert runtime.container_dir("busy").is_dir()
    await run.proc.kill()


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ({"command": []}, "command"),
        ({"command": ["a\0b"]}, "NUL"),
        ({"command": ["true"], "env": {"A=B": "x"}}, "A=B"),
        ({"command": ["true"], "env": {"": "x"}}, "env key"),
        ({"command": ["true"], "tty": True, "width": 0}, "terminal size"),
    ],
)
def test_exec_spec_validates_itself(spec: dict[str, object], word: str) -> None:
    with pytest.raises(ExecError) as caught:
        ExecSpec(**spec)  # type: ignore[arg-type]
    expect_error(ErrorCode.INVALID_ARGUMENT, word)(caught.value)


async def test_ids_and_duplicates(runtime: ProcessRuntime) -> None:
    with pytest.raises(ExecError) as caught:
        await start(runtime, ["true"], container="../escape")
    expect_error(ErrorCode.INVALID_ARGUMENT, "container_id")(caught.value)
    run = await start(runtime, ["sleep", "30"], exec_id="same")
    with pytest.raises(ExecError) as caught:
        await start(runtime, ["true"], exec_id="same")
    expect_error(ErrorCode.ALREADY_EXISTS, "same")(caught.value)
    await run.proc.kill()


async def test_unknown_container_or_exec(runtime: ProcessRuntime) -> None:
    for call in (
        lambda: runtime.signal("nope", signal.SIGTERM),
        lambda: runtime.usage("nope"),
    ):
        with pytest.raises(ExecError) as caught:
            call()
        expect_error(ErrorCode.NOT_FOUND, "nope")(caught.value)
    with pytest.raises(ExecError) as caught:
        await runtime.pause("nope")
    expect_error(ErrorCode.NOT_FOUND)(caught.value)
    with pytest.raises(ExecError):
        await runtime.resume("nope")
    run = await start(runtime, ["sleep", "30"])
    with pytest.raises(ExecError) as caught:
        runtime.usage("c1", "other")
    expect_error(ErrorCode.NOT_FOUND, "other")(caught.value)
    with pytest.raises(ExecError) as caught:
        runtime.signal("c1", 12345)
    expect_error(ErrorCode.INVALID_ARGUMENT, "12345")(caught.value)
    assert runtime.processes_of("nope") == []
    await run.proc.kill()


async def test_closed_runtime_refuses_spawn(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path / "state")
    await rt.close()
    with pytest.raises(ExecError) as caught:
        await start(rt, ["true"])
    expect_error(ErrorCode.UNAVAILABLE)(caught.value)
    await rt.close()


# --- stdin --------------------------------------------------------------------------------


async def test_stdin_reaches_the_process_in_order(runtime: ProcessRuntime) -> None:
    data = os.urandom(1 << 20)
    run = await start(runtime, ["cat"])
    sizes = [1, 65536, 300_000, 7, 200_000]
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size
    pieces.append(data[at:])
    # Started together: order is the order of the calls.
    await asyncio.gather(*(run.proc.write_stdin(piece) for piece in pieces))
    run.proc.close_stdin()
    assert await run.wait() == 0
    assert run.stdout.data == data
    with pytest.raises(ExecError) as caught:
        await run.proc.write_stdin(b"late")
    expect_error(ErrorCode.FAILED_PRECONDITION)(caught.value)


async def test_write_after_close_stdin_fails(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sh", "-c", "cat; sleep 30"])
    await run.proc.write_stdin(b"before\n")
    run.proc.close_stdin()
    with pytest.raises(ExecError) as caught:
        await run.proc.write_stdin(b"after\n")
    expect_error(ErrorCode.FAILED_PRECONDITION, "closed")(caught.value)
    await eventually(lambda: run.stdout.data == b"before\n", "cat to echo")
    await run.proc.kill()


async def test_large_stdin_to_a_slow_reader_does_not_block_the_loop(
    runtime: ProcessRuntime,
) -> None:
    data = os.urandom(4 << 20)
    run = await start(runtime, ["sh", "-c", "sleep 0.5; wc -c"])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    try:
        began = time.monotonic()
        await asyncio.wait_for(run.proc.write_stdin(data), TIMEOUT)
        assert time.monotonic() - began >= 0.3
        assert ticks >= 10
    finally:
        ticking.cancel()
    run.proc.close_stdin()
    assert await run.wait() == 0
    assert run.stdout.text.strip() == str(len(data))


async def test_write_to_an_exited_exec_fails(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["true"])
    assert await run.wait() == 0
    with pytest.raises(ExecError) as caught:
        await run.proc.write_stdin(b"x")
    expect_error(ErrorCode.FAILED_PRECONDITION, "exited")(caught.value)


async def test_pending_stdin_fails_when_the_process_exits(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sleep", "0.3"])  # never reads its input
    with pytest.raises(ExecError) as caught:
        await asyncio.wait_for(run.proc.write_stdin(os.urandom(4 << 20)), TIMEOUT)
    expect_error(ErrorCode.FAILED_PRECONDITION)(caught.value)
    assert await run.wait() == 0


# --- TTY ----------------------------------------------------------------------------------


async def test_tty_initial_size(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["stty", "size"], tty=True)
    assert await run.wait() == 0
    assert run.stdout.data == b"24 80\r\n"
    assert run.proc.terminal_size == (80, 24)
    run = await start(runtime, ["stty", "size"], tty=True, width=132, height=43)
    assert await run.wait() == 0
    assert run.stdout.data == b"43 132\r\n"


async def test_tty_resize_is_seen_with_sigwinch(runtime: ProcessRuntime) -> None:
    script = 'trap "echo WINCH; stty size" WINCH; echo ready; while :; do sleep 0.05; done'
    run = await start(runtime, ["sh", "-c", script], tty=True)
    await eventually(lambda: b"ready" in run.stdout.data, "the shell to start")
    run.proc.resize(120, 40)
    assert run.proc.terminal_size == (120, 40)
    await eventually(lambda: b"WINCH\r\n40 120\r\n" in run.stdout.data, "SIGWINCH and new size")
    await run.proc.kill()
    assert await run.wait() == 128 + 9


async def test_tty_interactive_shell_answers(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sh", "-i"], tty=True)
    await run.proc.write_stdin(b"echo $((6 * 7))\n")
    await eventually(lambda: b"42\r\n" in run.stdout.data, "the shell's answer")
    await run.proc.write_stdin(b"exit 3\n")
    assert await run.wait() == 3


async def test_tty_merges_stderr_and_close_stdin_sends_eof(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sh", "-c", "echo err >&2; cat"], tty=True)
    await run.proc.write_stdin(b"hello\n")
    await eventually(lambda: run.stdout.data.count(b"hello") == 2, "echo and cat output")
    run.proc.close_stdin()
    assert await run.wait() == 0
    assert b"err\r\n" in run.stdout.data
    assert run.stderr.data == b""
    with pytest.raises(ExecError) as caught:
        await run.proc.write_stdin(b"x")
    expect_error(ErrorCode.FAILED_PRECONDITION)(caught.value)


async def test_resize_errors(runtime: ProcessRuntime) -> None:
    run = await start(runtime, ["sleep", "30"])
    with pytest.raises(ExecError) as caught:
        run.proc.resize(100, 30)
    expect_error(ErrorCode.FAILED_PRECONDITION, "terminal")(caught.value)
    assert run.proc.terminal_size is None
    tty = await start(runtime, ["sleep", "30"], tty=True)
    with pytest.raises(ExecError) as caught:
        tty.proc.resize(0, 30)
    expect_error(ErrorCode.INVALID_ARGUMENT)(caught.value)
    await run.proc.kill()
    await tty.proc.kill()


async def test_tty_through_the_python_trampoline(
    runtime: ProcessRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where util-linux ``setsid -c`` is missing, a Python trampoline sets the terminal."""
    trampoline = (sys.executable, "-I", "-S", "-c", _spawn.CTTY_TRAMPOLINE)
    monkeypatch.setattr(_spawn, "ctty_prefix", lambda: trampoline)
    run = await start(runtime, ["sh", "-c", "stty size; exec tty"], tty=True, width=90, height=20)
    assert await run.wait() == 0
    size, tty = run.stdout.text.splitlines()
    assert size == "20 90"
    assert tty.startswith("/dev/pts/")


# --- control ------------------------------------------------------------------------------


async def test_pause_stops_every_process_and_resume_restarts_them(
    any_runtime: ProcessRuntime, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    script = (
        f"setsid sh -c 'while :; do echo >> {ticks}; sleep 0.01; done' & "
        "i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done"
    )
    run = await start(any_runtime, ["sh", "-c", script])
    await eventually(
        lambda: run.stdout.data.count(b"\n") > 3 and ticks.exists(), "the counters to count"
    )

    def counts() -> tuple[int, int]:
        return run.stdout.data.count(b"\n"), ticks.stat().st_size

    await any_runtime.pause("c1")
    await asyncio.sleep(0.1)  # output already in the pipe still arrives
    paused = counts()
    await asyncio.sleep(0.5)
    assert counts() == paused
    await any_runtime.resume("c1")
    await eventually(
        lambda: all(now > then + 3 for now, then in zip(counts(), paused, strict=True)),
        "both counters to advance again",
    )
    await run.proc.kill()


async def test_signal_one_exec_or_the_whole_container(any_runtime: ProcessRuntime) -> None:
    script = 'trap "echo got; exit 3" USR1; echo ready; while :; do sleep 0.05; done'
    first = await start(any_runtime, ["sh", "-c", script])
    second = await start(any_runtime, ["sh", "-c", "setsid sleep 100 & echo $!; sleep 100"])
    await eventually(lambda: first.stdout.data and second.pids(), "both execs to start")
    (escaped,) = second.pids()

    any_runtime.signal("c1", signal.SIGUSR1, first.proc.exec_id)
    assert await first.wait() == 3
    assert first.stdout.data == b"ready\ngot\n"
    assert second.proc.exit_code is None and exists(escaped)

    any_runtime.signal("c1", signal.SIGTERM)
    assert await second.wait() == 128 + 15
    await eventually(lambda: not exists(escaped), "the setsid grandchild to die of SIGTERM")


async def test_kill_kills_the_whole_tree(any_runtime: ProcessRuntime) -> None:
    script = "setsid sleep 100 & echo $!; sleep 100 & echo $!; env -i setsid sleep 100 & wait"
    run = await start(any_runtime, ["sh", "-c", script])
    await eventually(lambda: len(run.pids()) == 2, "the sleeps to start")
    await eventually(lambda: len(any_runtime.processes_of("c1")) == 4, "four processes")
    tree = any_runtime.processes_of("c1")
    assert run.proc.pid in tree
    assert set(run.pids()) < set(tree)
    await run.proc.kill()
    assert await run.wait() == 128 + 9
    assert not [pid for pid in tree if exists(pid)]
    assert any_runtime.processes_of("c1") == []


async def test_kill_and_sigkill_while_paused(any_runtime: ProcessRuntime) -> None:
    first = await start(any_runtime, ["sh", "-c", "setsid sleep 100 & sleep 100"])
    second = await start(any_runtime, ["sleep", "100"])
    await eventually(lambda: len(any_runtime.processes_of("c1")) == 4, "four processes")
    await any_runtime.pause("c1")
    await first.proc.kill()
    assert await first.wait() == 128 + 9
    any_runtime.signal("c1", signal.SIGKILL, second.proc.exec_id)
    assert await second.wait() == 128 + 9
    assert any_runtime.processes_of("c1") == []
    await any_runtime.resume("c1")


async def test_spawn_into_a_paused_container_fails(any_runtime: ProcessRuntime) -> None:
    run = await start(any_runtime, ["sleep", "100"])
    await any_runtime.pause("c1")
    with pytest.raises(ExecError) as caught:
        await start(any_runtime, ["true"])
    expect_error(ErrorCode.FAILED_PRECONDITION, "paused")(caught.value)
    await any_runtime.resume("c1")
    await run.proc.kill()


async def test_close_leaves_no_process_and_no_dir(any_runtime: ProcessRuntime) -> None:
    runs = [
        await start(any_runtime, ["sh", "-c", "setsid sleep 100 & echo $!; sleep 100"]),
        await start(any_runtime, ["sh", "-c", "sleep 100 & echo $!; exit 0"], container="c2"),
        await start(any_runtime, ["sh", "-c", "echo $$; sleep 100"], container="c3", tty=True),
    ]
    await eventually(lambda: all(run.pids() for run in runs), "every exec to start")
    pids = [pid for run in runs for pid in [run.proc.pid, *run.pids()]]
    await any_runtime.pause("c1")
    await any_runtime.close()
    assert not [pid for pid in pids if exists(pid)]
    assert not (any_runtime.state_dir / "containers").exists()
    for run in runs:
        await run.wait()  # resolves: nothing is left to wait for
    await any_runtime.close()  # idempotent


async def test_orphans_are_reaped_while_the_exec_is_kept(any_runtime: ProcessRuntime) -> None:
    quiet = ">/dev/null 2>&1"
    script = f"setsid sleep 2 {quiet} & echo $!; sleep 2 {quiet} & echo $!"
    run = await start(any_runtime, ["sh", "-c", script])
    assert await run.wait() == 0
    orphans = run.pids()
    assert len(orphans) == 2
    # The server is their subreaper: once they exit the sweep reaps them, no zombie stays.
    parents = [Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] for p in orphans]
    assert parents == [str(os.getpid())] * 2
    await eventually(lambda: not any(exists(pid) for pid in orphans), "the orphans to be reaped")


async def test_a_zombie_left_in_the_session_is_reaped(any_runtime: ProcessRuntime) -> None:
    # sleep never waits for the true it inherits: once sleep exits, true is our zombie.
    run = await start(any_runtime, ["sh", "-c", "true & echo $!; exec sleep 0.3"])
    assert await run.wait() == 0
    (zombie,) = run.pids()
    await eventually(lambda: not exists(zombie), "the zombie to be reaped")


async def test_a_sweep_scan_older_than_what_the_runtime_knows_loses_nothing(
    any_runtime: ProcessRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep scans /proc on a thread; by the time that scan is read on the loop, an exec
    may have started, forked, been signalled and exited.  Read as the truth, the older scan
    would drop the exec's orphan from what the exec is known to have, and its zombie would
    never be reaped (seen: conformance 10.3, the detached sleep still a zombie 10 s on)."""
    held, release = threading.Event(), threading.Event()
    scan = _runtime.scan_proc

    def slow_on_a_thread() -> dict[int, _procfs.ProcStat]:
        stats = scan()
        if threading.current_thread() is not threading.main_thread() and not release.is_set():
            held.set()
            release.wait(TIMEOUT)
        return stats

    monkeypatch.setattr(_runtime, "scan_proc", slow_on_a_thread)
    other = await start(any_runtime, ["sleep", "100"], container="c2")  # starts the sweep
    try:
        await eventually(held.is_set, "the sweep's scan")
        run = await start(any_runtime, ["sh", "-c", "set -m; sleep 60 & echo $!; wait"], tty=True)
        await eventually(run.pids, "the background sleep to start")
        (sleeper,) = run.pids()
        os.kill(run.proc.pid, signal.SIGKILL)
        assert await run.wait() == 128 + 9  # its exit scanned: the orphaned sleep is known
        os.kill(sleeper, signal.SIGKILL)
        await eventually(lambda: state_of(sleeper) == "Z", "the sleep to be a zombie")
    finally:
        release.set()
    await eventually(lambda: not exists(sleeper), "the sleep's zombie to be reaped", timeout=5)
    await other.proc.kill()


async def test_an_orphan_that_left_its_session_and_died_unseen_is_reaped_after_a_grace(
    any_runtime: ProcessRuntime,
) -> None:
    """``setsid true &`` leaves a zombie of the server that nothing ties to its exec (a new
    session, and a zombie keeps no environment or cgroup): reaped once it has stayed
    unreaped for the grace, so a client cannot leave the server a zombie per exec.  A zombie
    in the server's own session (its own code's child) is left to its waiter."""
    finder = any_runtime._finder
    sweeps = 0
    sweep = any_runtime._sweep

    def counted(stats: object = None) -> None:
        nonlocal sweeps
        sweeps += 1
        sweep(stats)  # type: ignore[arg-type]

    any_runtime._sweep = counted  # type: ignore[method-assign]
    finder.stray_grace = 3600.0
    ours = subprocess.Popen(["sh", "-c", "exit 7"])  # this process's child: not the runtime's
    run = await start(any_runtime, ["sh", "-c", "setsid true & echo $!; exec sleep 0.2"])
    assert await run.wait() == 0
    (escaped,) = run.pids()
    assert state_of(escaped) == "Z" and state_of(ours.pid) == "Z"
    assert os.getsid(0) != int(Path(f"/proc/{escaped}/stat").read_text().split()[5])
    await eventually(lambda: finder.strays_waiting, "the stray to be seen")
    seen = sweeps  # a sweep runs whole once counted: no await inside
    await eventually(lambda: sweeps > seen, "another sweep")
    assert state_of(escaped) == "Z", "reaped before its grace was out"
    finder.stray_grace = 0.0
    await eventually(lambda: not exists(escaped), "the stray zombie to be reaped")
    seen = sweeps
    await eventually(lambda: sweeps > seen, "another sweep")
    assert state_of(ours.pid) == "Z"
    assert ours.wait(TIMEOUT) == 7  # its status was left to its own waiter
    assert not finder.strays_waiting


async def test_execs_ending_together_keep_their_exit_codes(
    any_runtime: ProcessRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    # Spawning never yields to the loop: every exec may have exited before any exit is
    # noticed, so the first one noticed reaps the others (see note_exit).
    runs = [await start(any_runtime, ["sh", "-c", f"exit {n}"]) for n in range(24)]
    codes = await asyncio.gather(*(run.wait() for run in runs))
    assert codes == list(range(24))
    assert "reaped by someone else" not in caplog.text


#: Set in the pytest process that :func:`rerun_alone` starts for one test.
ALONE = "EXECSTREAM_TEST_ALONE"


def foreign_children(*, zombies_only: bool) -> str | None:
    """What this process has of children that the calling test did not make (other tests'
    leftovers: the subreaper adopts their orphans), said for a report; None when nothing."""
    if (zombie := _spawn.first_zombie_child()) is not None:
        return f"a zombie child {zombie}"
    if zombies_only:
        return None
    children = _procfs.main_thread_children()
    if children is None:
        pytest.skip("the kernel keeps no list of children (CONFIG_PROC_CHILDREN)")
    return f"children {sorted(children)}" if children else None


def rerun_alone(request: pytest.FixtureRequest, why: str) -> None:
    """Run the calling test again in a pytest process of its own, and pass or fail with it:
    for a test that needs a process without children it did not make, when earlier tests
    left some (``why``).  A run that still finds some fails rather than skipping."""
    if os.environ.get(ALONE):
        raise AssertionError(f"a pytest process of its own has {why}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        cwd=request.config.rootpath,
        env={**os.environ, ALONE: "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and " passed" in result.stdout, (
        f"run alone (this process has {why}):\n{result.stdout[-3000:]}{result.stderr[-1000:]}"
    )


async def test_a_zombie_that_may_be_a_child_being_forked_is_not_taken_for_an_orphan(
    request: pytest.FixtureRequest,
) -> None:
    """A child can exit before the spawner thread has recorded its pid: while a fork is under
    way, an unknown zombie is undecided (None), not an orphan to scan for (True)."""
    if (foreign := foreign_children(zombies_only=True)) is not None:
        return rerun_alone(request, foreign)
    child = subprocess.Popen(["true"])
    try:
        await eventually(lambda: _spawn.first_zombie_child() == child.pid, "the child's zombie")
        assert _finder.reap_exited_mains({}, set(), lambda: True) is None
        assert _finder.reap_exited_mains({}, {child.pid}, lambda: False) is None
        assert _finder.reap_exited_mains({}, set(), lambda: False) is True
    finally:
        child.wait()


def test_a_child_that_may_be_a_fork_under_way_leaves_an_exit_undecided(
    request: pytest.FixtureRequest,
) -> None:
    """An exit is sure to have left nothing only when every child of the server is a live
    exec's main process; a child that may be one being forked leaves it undecided (no scan,
    not passed by), any other child makes it scanned."""
    if _procfs.main_thread_children() is None:
        pytest.skip("the kernel keeps no list of children (CONFIG_PROC_CHILDREN)")
    if (foreign := foreign_children(zombies_only=False)) is not None:
        return rerun_alone(request, foreign)
    finder = _finder.ProcessFinder()
    finder.subreaper = True
    exited = cast(ProcessExec, SimpleNamespace(ended=False, exit_code=0, known={}, group=None))
    assert finder.may_have_left([exited], {}, set(), lambda: False) == ([], True)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert finder.may_have_left([exited], {}, set(), lambda: True) == ([], False)
        # Undecided, an exec whose freezer group holds a process has left one.
        grouped = cast(
            ProcessExec, SimpleNamespace(ended=False, exit_code=0, known={}, group=Path("g"))
        )
        finder.freezer = cast(_freezer.Freezer, SimpleNamespace(procs=lambda group: [child.pid]))
        assert finder.may_have_left([exited, grouped], {}, set(), lambda: True) == (
            [grouped],
            False,
        )
        finder.freezer = None
        assert finder.may_have_left([exited], {}, set(), lambda: False) == ([exited], True)
        assert finder.may_have_left([exited], {}, {child.pid}, lambda: False) == ([], True)
        main = cast(ProcessExec, SimpleNamespace(exit_code=None))
        assert finder.may_have_left([exited], {child.pid: main}, set(), lambda: False) == (
            [],
            True,
        )
        finder.subreaper = False  # orphans went elsewhere: only a scan can tell
        assert finder.may_have_left([exited], {}, set(), lambda: False) == ([exited], True)
    finally:
        child.kill()
        child.wait()


def test_the_main_thread_lists_its_children_and_every_orphan_until_reaped() -> None:
    """The runtime looks for what an exec left behind among the main thread's children: the
    orphans a subreaper adopts land there, whichever thread forked their ancestor, and so do
    the children of a thread that ended."""
    if _procfs.main_thread_children() is None:
        pytest.skip("the kernel keeps no list of children (CONFIG_PROC_CHILDREN)")
    _spawn.become_subreaper()  # as a runtime makes its server
    here = subprocess.Popen(["sleep", "30"])
    there: list[subprocess.Popen[bytes]] = []
    forker = threading.Thread(target=lambda: there.append(subprocess.Popen(["true"])))
    forker.start()
    forker.join()  # ended: its child moved to the main thread
    orphans: list[int] = []
    leave_one = threading.Event()
    done = threading.Event()

    def leaving_an_orphan() -> None:
        # A child of this thread that leaves a child of its own and exits, while the
        # thread lives on: the orphan goes to the main thread, not to this one.
        child = subprocess.run(
            ["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True
        )
        orphans.append(int(child.stdout))
        leave_one.set()
        done.wait(TIMEOUT)

    alive = threading.Thread(target=leaving_an_orphan)
    alive.start()
    try:
        assert leave_one.wait(TIMEOUT)
        listed = _procfs.main_thread_children() or set()
        assert {here.pid, there[0].pid, *orphans} <= listed
    finally:
        done.set()
        alive.join()
        here.kill()
        here.wait()
        there[0].wait()
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert not {here.pid, there[0].pid, *orphans} & (_procfs.main_thread_children() or set())


@pytest.mark.parametrize("mode", ["freezer", "signals"])
async def test_exits_with_nothing_left_need_no_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, mode: str
) -> None:
    """An exit that leaves nothing behind costs no /proc scan, even when other execs' main
    processes wait to be reaped: the server has no child but live execs' main processes
    (and, with the freezer, the exec's group is empty).  An exit that leaves a process or an
    orphan zombie behind is still scanned: the process is recorded and the zombie reaped."""
    # A child of the process that no exec knows needs a scan.
    if (foreign := foreign_children(zombies_only=False)) is not None:
        return rerun_alone(request, foreign)
    rt = ProcessRuntime(tmp_path / "state", cgroup_freezer=mode == "freezer")
    try:
        assert rt.pause_method == mode
    except RuntimeError as exc:
        pytest.skip(str(exc))
    scans_in_note_exit = 0
    noting = False
    scan, note_exit = _runtime.scan_proc, rt.note_exit

    def counted_scan() -> dict[int, _procfs.ProcStat]:
        nonlocal scans_in_note_exit
        scans_in_note_exit += noting
        return scan()

    def noted(proc: ProcessExec) -> None:
        nonlocal noting
        noting = True
        try:
            note_exit(proc)
        finally:
            noting = False

    monkeypatch.setattr(_runtime, "scan_proc", counted_scan)
    monkeypatch.setattr(rt, "note_exit", noted)
    try:
        runs = [await start(rt, ["true"]) for _ in range(16)]
        assert await asyncio.gather(*(run.wait() for run in runs)) == [0] * 16
        assert scans_in_note_exit == 0
        # Later scans pass them by.  Not all: an exit seen while the next exec was being
        # forked stays undecided (its zombie could be that exec's), and costs no scan either.
        assert any(run.proc.ended for run in runs)
        escaped = await start(rt, ["sh", "-c", "setsid sleep 30 & echo $!"])
        assert await escaped.wait() == 0
        assert scans_in_note_exit == 1
        (sleeper,) = escaped.pids()
        assert sleeper in escaped.proc.known and not escaped.proc.ended
        zombie = await start(rt, ["sh", "-c", "true & echo $!; exec sleep 0.3"])
        assert await zombie.wait() == 0
        (pid,) = zombie.pids()
        await eventually(lambda: not exists(pid), "the zombie to be reaped")
        assert scans_in_note_exit >= 2
    finally:
        await closed_and_clean(rt)
    assert not exists(sleeper), "the escaped process outlived its runtime"


@pytest.fixture
async def freezer_runtime(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(tmp_path / "state", cgroup_freezer=True)
    try:
        assert rt.pause_method == "freezer"
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield rt
    await closed_and_clean(rt)


async def test_an_empty_freezer_group_does_not_hide_an_exiting_orphan(
    freezer_runtime: ProcessRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process leaves its freezer group on its way out, a moment before it is a zombie.
    An orphan there when its exec's main process is reaped is in no group and no zombie:
    taken for "nothing left", its exec was passed by from then on and the zombie never reaped
    (seen: 1 in about 1200 execs of ``sleep 0.02 & exec sleep 0.02``).  Here the group
    always shows empty, as it does in that moment."""
    assert freezer_runtime._freezer is not None
    monkeypatch.setattr(freezer_runtime._freezer, "procs", lambda group: [])
    run = await start(freezer_runtime, ["sh", "-c", "sleep 0.5 & echo $!"])
    assert await run.wait() == 0
    (orphan,) = run.pids()
    assert orphan in run.proc.known and not run.proc.ended
    await eventually(lambda: not exists(orphan), "the orphan's zombie to be reaped")


async def test_concurrent_spawns_are_born_each_in_a_group_of_its_own(
    freezer_runtime: ProcessRuntime,
) -> None:
    runs = await asyncio.gather(*(start(freezer_runtime, ["sleep", "100"]) for _ in range(12)))
    groups = {run.proc.group for run in runs}
    assert None not in groups
    assert len(groups) == len(runs)

    def members(run: Run) -> list[int]:
        assert run.proc.group is not None
        return [int(pid) for pid in (run.proc.group / "cgroup.procs").read_text().split()]

    # The spawner thread forked each one there and moved on: the group holds the exec only.
    await eventually(lambda: all(members(run) == [run.proc.pid] for run in runs), "one each")
    await freezer_runtime.pause("c1")
    await freezer_runtime.resume("c1")
    for run in runs:
        await run.proc.kill()


async def test_a_spawn_cancelled_while_forking_leaves_no_process(
    freezer_runtime: ProcessRuntime,
) -> None:
    for i in range(5):
        task = asyncio.create_task(start(freezer_runtime, ["sleep", "100"], exec_id=f"x{i}"))
        await asyncio.sleep(0)  # the fork is under way on the spawner thread
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    home = freezer_runtime.state_dir
    await eventually(lambda: not processes_with_home_under(home), "the abandoned execs to end")
    # Dead is not yet reaped: a zombie shows no environment, but is still the container's
    # until its pidfd callback reaps it.
    await eventually(lambda: freezer_runtime.processes_of("c1") == [], "them to be reaped")


async def test_stale_freezer_groups_of_a_dead_server_are_removed(tmp_path: Path) -> None:
    mount = _procfs.cgroup_mount("freezer")
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v1 freezer")
    stale = mount / "execstream" / "999999999.deadbeef"  # beyond pid_max: never alive
    (stale / "1").mkdir(parents=True)
    rt = ProcessRuntime(tmp_path / "state", cgroup_freezer=True)
    try:
        assert rt.pause_method == "freezer"
        assert not stale.exists()
    finally:
        await closed_and_clean(rt)
        if (stale / "1").exists():
            (stale / "1").rmdir()
            stale.rmdir()


async def test_processes_left_by_a_dead_server_are_killed(tmp_path: Path) -> None:
    """Nothing outlives its container, even when the server died without closing."""
    mount = _procfs.cgroup_mount("freezer")
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v1 freezer")
    stale = mount / "execstream" / "999999998.deadbeef"  # beyond pid_max: never alive
    (stale / "1").mkdir(parents=True)
    leftover = subprocess.Popen(["sleep", "100"], start_new_session=True)
    try:
        (stale / "1" / "cgroup.procs").write_text(str(leftover.pid))
        (stale / "1" / "freezer.state").write_text("FROZEN")
        _freezer.remove_stale_groups(mount / "execstream")
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert not stale.exists()
    finally:
        if leftover.poll() is None:
            if (stale / "1").exists():  # a frozen v1 task dies only once thawed
                (stale / "1" / "freezer.state").write_text("THAWED")
            leftover.kill()
            leftover.wait()
        for group in (stale / "1", stale):
            if group.exists():
                group.rmdir()


async def test_processes_of_finds_an_escaped_process_with_a_clean_env(
    any_runtime: ProcessRuntime,
) -> None:
    # The escapee's parent exits at once, so only the subreaper and earlier scans keep it.
    run = await start(any_runtime, ["sh", "-c", "env -i setsid sleep 100 & echo $!"])
    assert await run.wait() == 0
    (escaped,) = run.pids()
    assert escaped in any_runtime.processes_of("c1")
    await run.proc.kill()
    assert not exists(escaped)


async def test_container_dir_lives_as_long_as_its_execs(runtime: ProcessRuntime) -> None:
    directory = runtime.container_dir("c9")
    assert directory == runtime.state_dir / "containers" / "c9"
    assert not directory.exists()
    first = await start(runtime, ["sh", "-c", "echo data > file"], container="c9")
    second = await start(runtime, ["sleep", "100"], container="c9")
    assert await first.wait() == 0
    assert (directory / "file").read_text() == "data\n"
    first.proc.release()
    assert directory.is_dir()
    await second.proc.kill()
    second.proc.release()
    assert not directory.exists()


# --- usage --------------------------------------------------------------------------------


async def test_usage_counts_memory_and_cpu(runtime: ProcessRuntime) -> None:
    """cpu_percent is the CPU time used over the window (PROTOCOL 9.4), checked as an identity
    that holds however loaded the machine is (see cpu.py), for the container and the exec."""
    idle = await start(runtime, ["sleep", "100"])
    run = await start(runtime, ["python3", "-c", BURNER])
    await eventually(lambda: b"ready" in run.stdout.data, "the burner to allocate")
    pid = int(run.stdout.data.split()[1])
    exec_id = run.proc.exec_id
    cpu_before = cpu_seconds(pid)
    first, container_opened = bracketed(lambda: runtime.usage("c1"))
    _, exec_opened = bracketed(lambda: runtime.usage("c1", exec_id))
    assert first.memory_bytes >= 40 << 20
    assert first.cpu_percent >= 0
    await run.proc.write_stdin(b"go\n")
    await eventually(lambda: b"burnt" in run.stdout.data, "the burner to spend its CPU")
    used = cpu_seconds(pid) - cpu_before
    assert used >= BURN_SECONDS - TICK_TOLERANCE
    second, container_closed = bracketed(lambda: runtime.usage("c1"))
    own, exec_closed = bracketed(lambda: runtime.usage("c1", exec_id))
    assert second.memory_bytes >= 40 << 20
    assert second.memory_limit >= 0
    assert second.io_read_bytes >= 0 and second.io_write_bytes >= 0
    # The idle `sleep` shares the container: it adds at most a tick.
    assert_percent_matches(second.cpu_percent, used, container_opened, container_closed)
    assert_percent_matches(own.cpu_percent, used, exec_opened, exec_closed)
    assert own.memory_bytes >= 40 << 20
    quiet = runtime.usage("c1", idle.proc.exec_id)
    assert quiet.memory_bytes < 20 << 20
    assert quiet.cpu_percent < 20
    await run.proc.kill()
    await idle.proc.kill()
    after = runtime.usage("c1")
    assert after.memory_bytes == 0


def _signal_state(status: str) -> dict[str, int]:
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return {name: int(fields[name], 16) for name in ("SigIgn", "SigBlk")}


@pytest.mark.parametrize("tty", [False, True])
async def test_execs_start_with_default_signals_and_an_empty_mask(
    runtime: ProcessRuntime, tty: bool
) -> None:
    """Whatever the server inherited (``nohup``, a blocked mask), execs start clean."""
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    quit_ = signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        run = await start(runtime, ["cat", "/proc/self/status"], tty=tty)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGQUIT, quit_)
    assert await run.wait() == 0
    assert _signal_state(run.stdout.text.replace("\r\n", "\n")) == {"SigIgn": 0, "SigBlk": 0}


def test_ignored_signals_handled_instead_need_no_trampoline() -> None:
    """What ``execstream serve`` does at start: signals it was started ignoring, named or
    real-time, get a handler that does nothing, and spawning then needs no trampoline."""
    realtime = signal.SIGRTMIN + 6  # no name in signal.Signals
    previous = {
        signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGHUP, realtime)
    }
    changed: list[int] = []
    try:
        assert _spawn.clean_signals_prefix() != ()
        changed = _spawn.handle_ignored_signals()
        assert {signal.SIGHUP, realtime} <= set(changed)
        assert signal.SIGPIPE not in changed  # Popen restores it itself
        assert _spawn.clean_signals_prefix() == ()
        os.kill(os.getpid(), signal.SIGHUP)  # handled by doing nothing: still alive
    finally:
        for signum in changed:  # others this process was started ignoring, as they were
            signal.signal(signum, signal.SIG_IGN)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("source", ["proc", "signal module"])
def test_clean_server_signal_state_needs_no_trampoline(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source != "proc":

        def no_proc(*args: object, **kwargs: object) -> object:
            raise FileNotFoundError("/proc/thread-self/status")

        monkeypatch.setattr(_spawn, "open", no_proc, raising=False)
    # Started with `&` from a script, this process itself ignores SIGINT and SIGQUIT.
    ignored = [
        signum
        for signum in signal.valid_signals()
        if signum not in _spawn.RESTORED_BY_POPEN and signal.getsignal(signum) == signal.SIG_IGN
    ]
    mask = signal.pthread_sigmask(signal.SIG_SETMASK, ())
    try:
        for signum in ignored:
            signal.signal(signum, signal.SIG_DFL)
        assert _spawn.clean_signals_prefix() == ()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        assert _spawn.clean_signals_prefix() != ()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        assert _spawn.clean_signals_prefix() != ()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        assert _spawn.clean_signals_prefix() == ()
    finally:
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.mark.parametrize(
    "spec",
    [
        {"command": ["x" * 300]},
        {"command": ["true"], "working_dir": "d" * 300},
        {"command": ["sh", "-c", "true"], "env": {"PATH": "/" + "p" * 300}},
        {"command": ["/" + "/".join(["a" * 250] * 20)]},
    ],
)
async def test_names_the_system_refuses_are_invalid_argument(
    runtime: ProcessRuntime, spec: dict[str, object]
) -> None:
    """ENAMETOOLONG and friends are the request's fault (PROTOCOL 3.2), never UNKNOWN."""
    with pytest.raises(ExecError) as caught:
        await runtime.spawn("fresh", "e", ExecSpec(**spec), Recorder(), Recorder())  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT, caught.value
    assert not runtime.container_dir("fresh").exists()


async def test_end_leftovers_kills_the_processes_of_a_dead_runtime(tmp_path: Path) -> None:
    """A restart after a crash ends what the dead server's runtime started."""
    dead = ProcessRuntime(tmp_path / "state", cgroup_freezer=False)
    run = await start(dead, ["sh", "-c", "sleep 100 & echo $!; exec sleep 100"])
    await eventually(lambda: len(run.pids()) == 1, "the background pid")
    (background,) = run.pids()
    main = run.proc.pid
    assert end_leftovers(dead.token) >= 2

    def alive(pid: int) -> bool:
        stat = _procfs.read_stat(pid)
        return stat is not None and stat.alive

    await eventually(lambda: not alive(background) and not alive(main), "the leftovers to die")
    await closed_and_clean(dead)


async def test_killing_or_removing_an_exited_exec_scans_no_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the freezer, an empty group answers that nothing of an exited exec is left, so
    its removal costs no /proc scan on the event loop; a group with a process left in it
    still has that process killed."""
    from execstream.server.runtime.process import _runtime

    rt = ProcessRuntime(tmp_path / "state", drain_timeout=1.0, cgroup_freezer=True)
    try:
        try:
            assert rt.pause_method == "freezer"
        except RuntimeError as exc:
            pytest.skip(str(exc))
        scans: list[int] = []

        def counted() -> dict[int, _procfs.ProcStat]:
            scans.append(1)
            return _procfs.scan_proc()

        monkeypatch.setattr(_runtime, "scan_proc", counted)
        done = await start(rt, ["true"])
        assert await done.wait() == 0
        before = len(scans)
        await done.proc.kill()  # what closing the server does to every exec it retains
        done.proc.release()
        assert len(scans) == before, "killed or released an exec with nothing left by a scan"

        run = await start(rt, ["sh", "-c", "setsid sleep 30 & echo $!"])
        assert await run.wait(timeout=5) == 0
        (sleeper,) = run.pids()
        run.proc.release()
        await eventually(lambda: not exists(sleeper), "the released exec's sleep to be gone")
    finally:
        await closed_and_clean(rt)


def test_a_freeze_that_times_out_says_who_held_it_out() -> None:
    """The UNAVAILABLE message of a pause names the tasks not frozen and their state."""
    me = _freezer._describe_task(threading.get_native_id())
    assert me.startswith(f"{threading.get_native_id()} a thread of the server, ")
    assert " state=R" in me  # this thread, running as it reads its own state
    child = subprocess.Popen(["sleep", "30"])
    try:
        shown = _freezer._describe_task(child.pid)
        assert shown.startswith(f"{child.pid} sleep state=") and "server" not in shown
    finally:
        child.kill()
        child.wait()
    assert _freezer._describe_task(child.pid) == f"{child.pid} (gone)"
