"""The runc runtime on real OCI containers (skipped with the reason where runc cannot run)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from execstream.server import ErrorCode, ExecError
from execstream.server.runtime import ExecSpec, ProcessExec
from execstream.server.runtime.runc import RuncRuntime, RuntimeUnavailable, runc_problem

PROBLEM = runc_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")

TIMEOUT = 30.0


class Recorder:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


class Run:
    def __init__(self, proc: ProcessExec, stdout: Recorder, stderr: Recorder) -> None:
        self.proc, self.stdout, self.stderr = proc, stdout, stderr

    async def wait(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), TIMEOUT)


async def start(rt: RuncRuntime, container: str, exec_id: str, *argv: str, **spec: object) -> Run:
    stdout, stderr = Recorder(), Recorder()
    proc = await rt.spawn(
        container,
        exec_id,
        ExecSpec(command=argv, **spec),  # type: ignore[arg-type]
        stdout,
        stderr,
    )
    return Run(proc, stdout, stderr)


async def eventually(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def containers(state_dir: Path) -> list[str]:
    """The containers runc lists.  A listing that races a deletion fails (runc cannot read
    the state of a container deleted while it lists): it is asked again, briefly."""
    for _ in range(100):
        done = subprocess.run(
            ["runc", "--root", str(state_dir / "runc" / "state"), "list", "--format", "json"],
            capture_output=True,
        )
        if done.returncode == 0:
            return [c["id"] for c in json.loads(done.stdout or b"null") or []]
        time.sleep(0.01)
    raise AssertionError(f"runc list keeps failing: {done.stderr.decode(errors='replace')}")


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[RuncRuntime]:
    rt = RuncRuntime(tmp_path / "state", drain_timeout=1.0)
    yield rt
    await rt.close()
    assert containers(tmp_path / "state") == []


async def test_an_exec_runs_in_its_own_pid_namespace_on_the_busybox_rootfs(
    runtime: RuncRuntime,
) -> None:
    run = await start(runtime, "c1", "e1", "sh", "-c", "readlink /proc/self/ns/pid; ls /; echo $$")
    assert await run.wait() == 0
    namespace, *listing = run.stdout.text.split()
    assert namespace != os.readlink("/proc/self/ns/pid")
    assert {"bin", "proc", "tmp", "root"} <= set(listing)
    assert os.readlink(f"{runtime.home}/busybox-rootfs/bin/sh") == "busybox"


async def test_exit_codes_streams_env_and_working_dir(runtime: RuncRuntime) -> None:
    script = 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 7'
    run = await start(
        runtime, "c1", "e1", "sh", "-c", script, env={"GREETING": "hi"}, working_dir="/tmp"
    )
    assert await run.wait() == 7
    assert (run.stdout.text, run.stderr.text) == ("hi from /tmp\n", "oops\n")
    killed = await start(runtime, "c1", "e2", "sh", "-c", "kill -TERM $$")
    assert await killed.wait() == 128 + signal.SIGTERM


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"command": ["no-such-command"]}, ["no-such-command", "not found"]),
        ({"command": ["/etc/passwd"]}, ["not executable"]),
        ({"command": ["sh"], "working_dir": "/nope"}, ["working_dir", "does not exist"]),
    ],
)
async def test_what_cannot_run_is_invalid_argument_before_it_runs(
    runtime: RuncRuntime, spec: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ExecError) as caught:
        await runtime.spawn("c1", "e1", ExecSpec(**spec), Recorder(), Recorder())  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    for word in words:
        assert word in caught.value.message
    await eventually(lambda: containers(runtime.state_dir) == [], "the unused container to go")


async def test_execs_of_a_container_share_it_and_a_container_goes_with_its_last_exec(
    runtime: RuncRuntime,
) -> None:
    first = await start(runtime, "c1", "e1", "sh", "-c", "echo $$ > /tmp/pid; exec sleep 100")
    await eventually(lambda: "c1" in containers(runtime.state_dir), "the container")
    second = await start(runtime, "c1", "e2", "sh", "-c", "sleep 0.2; kill -0 $(cat /tmp/pid)")
    assert await second.wait() == 0
    other = await start(runtime, "c2", "e1", "sh", "-c", "test ! -e /tmp/pid")
    assert await other.wait() == 0  # another container has another filesystem
    second.proc.release()
    other.proc.release()
    await first.proc.kill()
    assert await first.wait() == 128 + signal.SIGKILL
    assert "c1" in containers(runtime.state_dir)
    first.proc.release()
    await eventually(lambda: containers(runtime.state_dir) == [], "the containers to be deleted")
    again = await start(runtime, "c1", "e1", "sh", "-c", "test ! -e /tmp/pid")
    assert await again.wait() == 0


async def test_tty_size_resize_and_eof(runtime: RuncRuntime) -> None:
    # read is interrupted by the trapped SIGWINCH: read again.
    script = (
        "stty size; trap 'stty size' WINCH; echo ready; until read line; do :; done; "
        "echo got=$line; cat; echo cat-done"
    )
    run = await start(runtime, "c1", "e1", "sh", "-c", script, tty=True, width=100, height=30)
    await eventually(lambda: "ready" in run.stdout.text, "the shell")
    assert run.stdout.text.startswith("30 100\r")
    run.proc.resize(120, 40)
    await eventually(lambda: "40 120" in run.stdout.text, "the new size after SIGWINCH")
    await run.proc.write_stdin(b"abc\n")
    await eventually(lambda: "got=abc" in run.stdout.text, "the line read")
    run.proc.close_stdin()  # PROTOCOL 7.1: the EOF character ends cat
    assert await run.wait() == 0
    assert "cat-done" in run.stdout.text
    assert run.stderr.chunks == []


async def test_pause_stops_every_process_and_resume_restarts_them(runtime: RuncRuntime) -> None:
    counter = "(while :; do echo x; sleep 0.01; done) & setsid sh -c 'sleep 100' & wait"
    run = await start(runtime, "c1", "e1", "sh", "-c", counter)
    await eventually(lambda: len(run.stdout.chunks) > 5, "the counter")
    await runtime.pause("c1")
    with pytest.raises(ExecError) as paused:
        await start(runtime, "c1", "e2", "true")
    assert paused.value.code is ErrorCode.FAILED_PRECONDITION
    await asyncio.sleep(0.1)
    before = len(run.stdout.chunks)
    await asyncio.sleep(0.3)
    assert len(run.stdout.chunks) == before
    await runtime.resume("c1")
    await eventually(lambda: len(run.stdout.chunks) > before + 5, "progress after resume")
    runtime.signal("c1", signal.SIGKILL)
    assert await run.wait() == 128 + signal.SIGKILL


async def test_signals_reach_one_exec_or_the_whole_container(runtime: RuncRuntime) -> None:
    script = "trap 'echo usr1' USR1; echo ready; while :; do sleep 0.05; done"
    first = await start(runtime, "c1", "e1", "sh", "-c", script)
    second = await start(runtime, "c1", "e2", "sh", "-c", script)
    await eventually(
        lambda: "ready" in first.stdout.text + "" and "ready" in second.stdout.text, "both"
    )
    runtime.signal("c1", signal.SIGUSR1, "e1")
    await eventually(lambda: "usr1" in first.stdout.text, "USR1 in the first exec")
    await asyncio.sleep(0.2)
    assert "usr1" not in second.stdout.text
    runtime.signal("c1", signal.SIGTERM)
    assert (await first.wait(), await second.wait()) == (143, 143)
    with pytest.raises(ExecError) as unknown:
        runtime.signal("c1", signal.SIGTERM, "nope")
    assert unknown.value.code is ErrorCode.NOT_FOUND


async def test_usage_of_the_container_and_of_an_exec(runtime: RuncRuntime) -> None:
    idle = await start(runtime, "c1", "idle", "sleep", "100")
    burner = await start(
        runtime, "c1", "burn", "sh", "-c", "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done"
    )
    assert await burner.wait() == 0
    container = runtime.usage("c1")
    assert container.memory_bytes > 0
    assert container.cpu_percent > 0
    ended = runtime.usage("c1", "burn")
    assert ended.cpu_percent > 0  # PROTOCOL 9.4: CPU of what ended within the window
    assert ended.memory_bytes == 0
    alive = runtime.usage("c1", "idle")
    assert alive.memory_bytes > 0
    await idle.proc.kill()


async def test_a_restart_deletes_the_containers_of_a_dead_server(tmp_path: Path) -> None:
    dead = RuncRuntime(tmp_path / "state")
    await start(dead, "left", "e1", "sleep", "100")
    assert containers(tmp_path / "state") == ["left"]
    # The first server "dies": a second one on the same state directory starts.
    fresh = RuncRuntime(tmp_path / "state")
    try:
        run = await start(fresh, "c1", "e1", "true")
        assert await run.wait() == 0
        assert containers(tmp_path / "state") == ["c1"]
    finally:
        await fresh.close()
        await dead.close()  # what is left of it: its exec objects
    assert containers(tmp_path / "state") == []


def test_a_missing_rootfs_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="not a root filesystem"):
        RuncRuntime(tmp_path / "state", rootfs=tmp_path / "nothing-here")


def test_what_is_missing_is_named_with_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    from execstream.server.runtime.runc import _runtime

    monkeypatch.setattr(_runtime, "find_tool", lambda name: None)
    problem = _runtime.runc_problem()
    assert problem is not None
    assert re.search(r"runc and busybox: apt-get install runc busybox-static", problem)


async def test_kill_in_a_paused_container_kills_and_close_deletes_it(
    runtime: RuncRuntime,
) -> None:
    run = await start(runtime, "c1", "e1", "sleep", "100")
    await runtime.pause("c1")
    await asyncio.wait_for(run.proc.kill(), TIMEOUT)  # thaws the container to let it die
    assert await run.wait() == 128 + signal.SIGKILL
    other = await start(runtime, "c1", "e2", "sleep", "100")
    await runtime.pause("c1")
    await runtime.close()  # deletes the paused container: its processes go too
    assert await other.wait() == 128 + signal.SIGKILL
    assert containers(runtime.state_dir) == []


async def test_signals_reach_the_command_of_a_tty_exec_and_its_exit_code(
    runtime: RuncRuntime,
) -> None:
    script = "trap 'echo got-usr1' USR1; echo ready; while :; do sleep 0.05; done"
    run = await start(runtime, "c1", "e1", "sh", "-c", script, tty=True)
    await eventually(lambda: "ready" in run.stdout.text, "the shell")
    runtime.signal("c1", signal.SIGUSR1, "e1")
    await eventually(lambda: "got-usr1" in run.stdout.text, "USR1 at the command")
    runtime.signal("c1", signal.SIGTERM)  # container-wide: the command, not the trampoline
    assert await run.wait() == 128 + signal.SIGTERM
    job = await start(
        runtime, "c1", "e2", "sh", "-c", "set -m; sleep 0.1 & wait; echo job-ok", tty=True
    )
    assert await job.wait() == 0
    assert "job-ok" in job.stdout.text  # job control: the terminal is the controlling one
