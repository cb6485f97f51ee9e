"""``execstream serve`` and ``execstream demo`` as a user runs them: real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest

from execstream import wire
from execstream.client import AsyncExecClient, Unauthenticated


class Served:
    def __init__(self, process: subprocess.Popen[str], address: str) -> None:
        self.process = process
        self.address = address

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        _, err = self.process.communicate(timeout=20)
        return self.process.returncode, err


def ignoring(signals: Sequence[str], argv: Sequence[str]) -> list[str]:
    """``argv`` started with ``signals`` ignored, as a shell's ``&`` or ``nohup`` starts a
    command: by a shell's trap, not a ``preexec_fn``, which runs Python in a fork of a test
    process that may have grpc threads (the child can abort before its exec)."""
    return ["sh", "-c", f'trap "" {" ".join(signals)}; exec "$@"', "sh", *argv]


def signal_masks(pid: int) -> tuple[int, int]:
    """The signals ``pid`` ignores and those it handles, as bit masks (``/proc/PID/status``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return int(fields["SigIgn"], 16), int(fields["SigCgt"], 16)


@pytest.fixture
def serve_cli(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None, ignored: Sequence[str] = ()) -> Served:
        process = subprocess.Popen(
            ignoring(ignored, [sys.executable, "-m", "execstream", "serve", *args]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on "), line + (
            process.stderr.read() if process.stderr else ""
        )
        return Served(process, line.split()[-1])

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _run(address: str, command: list[str], metadata: tuple[tuple[str, str], ...] = ()) -> int:
    async def requests():  # type: ignore[no-untyped-def]
        yield wire.SessionRequest(
            start=wire.Start(container_id="cli", exec_id=uuid.uuid4().hex[:8], command=command)
        )

    async with grpc.aio.insecure_channel(address) as channel:
        code = -1
        async for response in wire.ExecStub(channel).Session(requests(), metadata=metadata):
            if response.exit is not None:
                code = response.exit
        return code


async def test_port_zero_prints_the_address_and_sigterm_stops_cleanly(serve_cli) -> None:  # type: ignore[no-untyped-def]
    served = serve_cli("--listen", "127.0.0.1:0", "--retention", "5")
    host, _, port = served.address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert await _run(served.address, ["sh", "-c", "exit 4"]) == 4
    code, err = served.stop()
    assert code == 0
    assert "started" in err and "exited with 4" in err, err


async def test_sigint_ends_streams_with_unavailable_and_kills_the_exec(
    serve_cli, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    served = serve_cli("--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"))
    pidfile = tmp_path / "pid"
    session = asyncio.create_task(
        _run(served.address, ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"])
    )
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.05)
    pid = int(pidfile.read_text())
    code, err = await asyncio.to_thread(served.stop, signal.SIGINT)
    assert code == 0, err
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await session
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (error.value.details() or "")
    assert not _alive(pid)


async def test_unix_socket_is_owner_only(serve_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    socket_path = tmp_path / "exec.sock"
    served = serve_cli("--listen", f"unix:{socket_path}")
    assert served.address == f"unix:{socket_path}"
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert await _run(served.address, ["true"]) == 0
    assert served.stop()[0] == 0
    assert not socket_path.exists()


async def test_token_from_the_environment(serve_cli) -> None:  # type: ignore[no-untyped-def]
    served = serve_cli("--listen", "127.0.0.1:0", env={"EXECSTREAM_TOKEN": "tok"})
    # Through the client library: a raw grpc.aio call whose request is still being written
    # when the server refuses it may report INTERNAL instead (grpc/grpc#36066), which the
    # library sees through.
    async with AsyncExecClient(served.address) as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.run("cli", uuid.uuid4().hex[:8], ["true"])
    async with AsyncExecClient(served.address, token="tok") as client:
        exec_ = await client.run("cli", uuid.uuid4().hex[:8], ["true"], close_stdin=True)
        assert await exec_.wait() == 0


def test_bad_flags_are_a_clear_error() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "execstream",
            "serve",
            "--retention",
            "-1",
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "retention" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "execstream", "serve", "--max-execs", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "must be > 0" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-output-bytes", "100"], "--max-output-bytes: must be 0 (no limit) or at least"),
        (["--max-output-bytes", "lots"], "--max-output-bytes: not a size in bytes: 'lots'"),
        (["--memory-cache-bytes", "1KiB"], "--memory-cache-bytes: must be at least 65536"),
        (["--history-bytes", "1000"], "--memory-cache-bytes: must be at least 65536"),
        (["--max-stored-bytes", "-5"], "--max-stored-bytes: not a size in bytes"),
    ],
)
def test_impossible_output_settings_are_one_clear_line(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "execstream", "serve", "--listen", "127.0.0.1:0", *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


async def test_sizes_with_units_are_the_server_settings(serve_cli) -> None:  # type: ignore[no-untyped-def]
    """``--max-output-bytes 256KiB``: a client that did not read sees the oldest evicted."""
    served = serve_cli("--listen", "127.0.0.1:0", "--max-output-bytes", "256KiB")
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = wire.ExecStub(channel)
        c = f"c-{uuid.uuid4().hex[:8]}"
        command = ["head", "-c", str(4 * 1024 * 1024), "/dev/zero"]
        start = wire.Start(container_id=c, exec_id="e", command=command)

        async def one(start: wire.Start) -> AsyncIterator[wire.SessionRequest]:
            yield wire.SessionRequest(start=start)

        async for response in stub.Session(one(start)):
            if response.exit is not None:
                break
        attach = wire.Start(container_id=c, exec_id="e")
        retained = gaps = 0
        async for response in stub.Session(one(attach)):
            if response.output_chunk is not None:
                retained += len(response.output_chunk.stdout or b"")
                gaps += response.output_chunk.gap_before
        assert 0 < retained <= 256 * 1024 and gaps > 0


@pytest.mark.parametrize(
    "command", [["demo"], ["conformance", "--case", "session/5.2/exit-status"]], ids=" ".join
)
def test_embedded_servers_stop_ignoring_signals_as_serve_does(command: list[str]) -> None:
    """The demo's and the suite's embedded servers, started ignoring SIGQUIT (a script's
    ``&``), handle it instead, as ``serve`` does: their execs need no trampoline."""
    bit = 1 << (signal.SIGQUIT - 1)
    process = subprocess.Popen(
        ignoring(["QUIT"], [sys.executable, "-m", "execstream", *command]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    handled = False
    try:
        deadline = time.monotonic() + 60
        while not handled and process.poll() is None and time.monotonic() < deadline:
            try:
                ignored, caught = signal_masks(process.pid)
            except OSError:
                break
            handled = not ignored & bit and bool(caught & bit)
            time.sleep(0.01)
    finally:
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    assert handled, "SIGQUIT stayed ignored while the embedded server ran"


def test_demo_shows_two_identical_streams_and_the_exit_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "execstream", "demo"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[client B] #1 stdout: tick 1 (replay)" in result.stdout
    assert "[client A] exit 3" in result.stdout and "[client B] exit 3" in result.stdout
    assert "both clients saw the same bytes in the same order" in result.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "execstream", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_version() -> None:
    from execstream import __version__

    result = subprocess.run(
        [sys.executable, "-m", "execstream", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == f"execstream {__version__}"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--history-bytes", "100"], "--memory-cache-bytes"),
        (["--max-output-bytes", "100"], "--max-output-bytes"),
        (["--max-stored-bytes", "1KiB"], "--max-stored-bytes"),
        (["--listen", "nonsense"], "--listen"),
        (["--listen", "127.0.0.1:99999"], "--listen"),
        (["--state-dir", "/proc/no-such-dir"], "--state-dir"),
        (["--tls-cert", "/etc/hostname"], "--tls-key"),
        (["--metrics-listen", "nowhere"], "--metrics-listen"),
    ],
)
def test_bad_settings_are_one_line_naming_the_flag(args: list[str], flag: str) -> None:
    result = _serve_fails(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"execstream serve: {flag}:")


async def test_a_port_in_use_is_one_line_and_a_failure(serve_cli) -> None:  # type: ignore[no-untyped-def]
    served = serve_cli("--listen", "127.0.0.1:0")
    result = _serve_fails("--listen", served.address)
    assert result.returncode == 1
    assert (
        result.stderr == f"execstream serve: --listen: {served.address}: address already in use\n"
    )
    assert await _run(served.address, ["true"]) == 0


async def test_restart_after_sigkill_ends_the_dead_servers_execs(serve_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    served = serve_cli("--listen", "127.0.0.1:0", "--state-dir", str(state))
    pids: list[int] = []

    async def leave_running() -> None:
        async def requests():  # type: ignore[no-untyped-def]
            yield wire.SessionRequest(
                start=wire.Start(
                    container_id="crash",
                    exec_id="left",
                    command=["sh", "-c", "sleep 300 & echo $!; echo $$; wait"],
                )
            )
            await asyncio.Event().wait()

        async with grpc.aio.insecure_channel(served.address) as channel:
            call = wire.ExecStub(channel).Session(requests())
            out = b""
            async for response in call:
                if response.output_chunk is not None:
                    out += response.output_chunk.stdout or b""
                    if out.count(b"\n") >= 2:
                        break
            pids.extend(int(n) for n in out.split())
            call.cancel()

    await asyncio.wait_for(leave_running(), 20)
    served.process.kill()  # SIGKILL: no cleanup at all
    served.process.wait()
    assert all(_alive(pid) for pid in pids)
    assert (state / "containers" / "crash").exists()
    restarted = serve_cli("--listen", "127.0.0.1:0", "--state-dir", str(state))
    # Ended before the new server printed its address, i.e. before it accepted anything.
    assert not any(_alive(pid) for pid in pids)
    assert not (state / "containers" / "crash").exists()
    assert await _run(restarted.address, ["true"]) == 0
    code, err = restarted.stop()
    assert code == 0 and "died" in err
    assert not (state / "server.lock").exists()


async def test_execs_of_a_nohup_server_get_sighup(serve_cli) -> None:  # type: ignore[no-untyped-def]
    """Under nohup the server ignores SIGHUP; its execs must not (signal HUP must work)."""
    served = serve_cli("--listen", "127.0.0.1:0", ignored=["HUP"])

    async def hup() -> int:
        async def requests():  # type: ignore[no-untyped-def]
            yield wire.SessionRequest(
                start=wire.Start(container_id="nohup", exec_id="e", command=["sleep", "300"])
            )
            await asyncio.Event().wait()

        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = wire.ExecStub(channel)
            call = stub.Session(requests())
            await call.read()  # ready: the exec runs
            await stub.ContainerSignal(
                wire.ContainerSignalRequest(container_id="nohup", signal="HUP")
            )
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return -1
                if response.exit is not None:
                    return response.exit

    assert await asyncio.wait_for(hup(), 20) == 128 + signal.SIGHUP


async def test_a_server_started_ignoring_signals_goes_on_ignoring_them_alone(serve_cli) -> None:  # type: ignore[no-untyped-def]
    """A shell's ``&`` and ``nohup`` start the server with signals ignored.  It goes on
    ignoring them, but as handled signals, which exec(2) resets: its execs start with the
    default action (PROTOCOL 10.4) with nothing ignored left to reset before each exec."""
    served = serve_cli("--listen", "127.0.0.1:0", ignored=["HUP", "QUIT"])
    pid = served.process.pid
    ignored, caught = signal_masks(pid)
    mask = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGQUIT - 1))
    assert ignored & mask == 0
    assert caught & mask == mask
    os.kill(pid, signal.SIGHUP)
    os.kill(pid, signal.SIGQUIT)
    # dash keeps a signal it was started ignoring ignored: only a default one ends it here.
    assert await _run(served.address, ["sh", "-c", "kill -HUP $$; sleep 30"]) == 128 + 1
    assert await _run(served.address, ["sh", "-c", "kill -QUIT $$; sleep 30"]) == 128 + 3
    assert served.process.poll() is None  # the hangup and the quit were ignored
    code, _ = served.stop()
    assert code == 0
