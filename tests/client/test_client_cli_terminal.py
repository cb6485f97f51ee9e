"""Interactive use of ``execstream run -it`` and ``attach -it`` in a pseudo-terminal (pexpect):
detach keys, rejoining a TTY exec, and the terminal restored however the session ends.

pexpect blocks, so each interaction runs in a thread while the server runs on the loop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest
from client_support import cli_env

from execstream._cli_client import DetachKeys, _OptionError
from execstream.client import AsyncExecClient
from execstream.server import ExecServer

BIN = str(Path(sys.executable).parent)


def spawn(target: str, command: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """``sh -c COMMAND`` on a terminal of rows x cols, `execstream` on its PATH."""
    env = cli_env(target)
    env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
    return pexpect.spawn(
        "sh", ["-c", command], env=env, dimensions=(rows, cols), timeout=30, echo=False
    )


async def in_thread(work: Callable[[], None]) -> None:
    await asyncio.to_thread(work)


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None, child.signalstatus
    return int(child.exitstatus)


# A process that ignores INT and QUIT: only the detach keys get the user out.
STUBBORN = 'trap "" INT QUIT; echo ready; read line; echo "got $line"; stty size; exit 4'


async def test_detach_keys_leave_the_exec_running_and_attach_it_rejoins(
    server: ExecServer,
) -> None:
    seen: dict[str, str] = {}

    def detach() -> None:
        # `stty -g` before and after: the terminal comes back exactly as it was.
        child = spawn(
            server.address,
            f"stty -g; execstream run -it -- sh -c '{STUBBORN}'; echo \"status $?\"; stty -g",
        )
        child.expect(r"([0-9a-f:]+)\r\n")
        before = child.match.group(1)
        child.expect("ready")
        child.send(b"\x03\x1c")  # Ctrl-C, Ctrl-\: keys for the exec, which ignores them
        child.send(b"\x10\x11")  # Ctrl-P Ctrl-Q
        child.expect(
            r"detached: exec (run-[0-9a-f]+) in container default keeps running; "
            r"rejoin with: execstream attach -it default (run-[0-9a-f]+)"
        )
        seen["exec"] = child.match.group(1).decode()
        assert child.match.group(2).decode() == seen["exec"]
        child.expect(r"status 0\r\n([0-9a-f:]+)\r\n")
        assert child.match.group(1) == before
        assert finish(child) == 0

    await in_thread(detach)
    async with AsyncExecClient(server.address) as client:
        assert (await client.status("default", seen["exec"])).state == "running"

    def rejoin() -> None:
        child = spawn(server.address, f"execstream attach -it default {seen['exec']}", 33, 111)
        child.send(b"hello\r")
        child.expect("got hello")
        child.expect("33 111")  # the exec's terminal follows the rejoining one
        assert finish(child) == 4

    await in_thread(rejoin)


def _child_of(pid: int) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            return int(stat.parent.name)
    raise AssertionError(f"no child of {pid}")


async def test_sigterm_restores_the_terminal_and_exits_143(server: ExecServer) -> None:
    def run() -> None:
        child = spawn(
            server.address,
            "stty -g; execstream run -it -- sh -c 'echo ready; sleep 30'; "
            'echo "status $?"; stty -g',
        )
        child.expect(r"([0-9a-f:]+)\r\n")
        before = child.match.group(1)
        child.expect("ready")
        os.kill(_child_of(child.pid), signal.SIGTERM)
        child.expect(r"ended by SIGTERM: exec run-[0-9a-f]+ in container default keeps running")
        child.expect(r"status 143\r\n([0-9a-f:]+)\r\n")
        assert child.match.group(1) == before
        assert finish(child) == 0

    await in_thread(run)


async def test_a_partial_detach_sequence_reaches_the_exec(server: ExecServer) -> None:
    def run() -> None:
        child = spawn(
            server.address,
            "execstream run -it --detach-keys ctrl-x,q -- sh -c "
            '\'echo ready; read line; printf "%s" "$line" | od -An -c; exit 2\'',
        )
        child.expect("ready")
        child.send(b"\x18a\r")  # ctrl-x then not q: both are typed
        child.expect(r"030\s+a")
        assert finish(child) == 2

    await in_thread(run)


async def test_third_ctrl_c_detaches_and_names_the_generated_exec(server: ExecServer) -> None:
    def run() -> None:
        # execstream itself on the terminal: a shell around it would die of the SIGINT too.
        env = cli_env(server.address)
        script = "trap 'echo int' INT; echo ready; while :; do sleep 0.1; done"
        child = pexpect.spawn(
            sys.executable,
            ["-m", "execstream", "run", "--", "sh", "-c", script],
            env=env,
            timeout=30,
        )
        child.expect("ready")
        for _ in range(2):
            child.sendintr()
            child.expect("int")  # the first two reach the exec as INT
        child.sendintr()
        child.expect(
            r"detached: exec run-[0-9a-f]+ in container default keeps running; "
            r"rejoin with: execstream attach default run-[0-9a-f]+"
        )
        assert finish(child) == 0

    await in_thread(run)


async def test_attach_t_resizes_and_gives_keys(server: ExecServer) -> None:
    async with AsyncExecClient(server.address) as client:
        exec_ = await client.run(
            "box", "tty", ["sh", "-c", 'read l; stty size; echo "[$l]"'], tty=True
        )

        def attach() -> None:
            child = spawn(server.address, "execstream attach -t -i box tty", 40, 132)
            child.send(b"typed\r")
            child.expect(r"40 132")
            child.expect(r"\[typed\]")
            assert finish(child) == 0

        await in_thread(attach)
        assert await exec_.wait() == 0


@pytest.mark.parametrize(
    ("spec", "keys"),
    [("ctrl-p,ctrl-q", b"\x10\x11"), ("ctrl-@,ctrl-_", b"\x00\x1f"), ("a,b", b"ab"), ("", b"")],
)
def test_detach_keys_parse(spec: str, keys: bytes) -> None:
    assert DetachKeys.parse(spec).keys == keys


@pytest.mark.parametrize("spec", ["ctrl-1", "ctrl-pq", "alt-x"])
def test_detach_keys_reject_what_is_not_a_key(spec: str) -> None:
    with pytest.raises(_OptionError, match=re.escape(f"--detach-keys {spec!r}")):
        DetachKeys.parse(spec)


def test_detach_keys_hold_a_partial_match_and_release_it_when_it_breaks() -> None:
    keys = DetachKeys(b"\x10\x11")
    assert keys.feed(b"ab\x10") == (b"ab", False)
    assert keys.feed(b"\x10x") == (b"\x10\x10x", False)  # broken: both typed keys are sent
    assert keys.feed(b"\x10") == (b"", False)
    assert keys.feed(b"\x11rest") == (b"", True)
    assert DetachKeys(b"").feed(b"\x10\x11") == (b"\x10\x11", False)
