"""Interactive use of ``execstream run -it`` and ``attach -it`` in a pseudo-terminal (pexpect,
in ``pty_driver.py``): detach keys, rejoining a TTY exec, and the terminal restored however
the session ends.  The detach-key matcher is tested directly."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from client_support import cli_env

from execstream._cli_client import DetachKeys, _OptionError
from execstream.client import AsyncExecClient
from execstream.server import ExecServer

DRIVER = str(Path(__file__).with_name("pty_driver.py"))


async def scenario(server: ExecServer, name: str, *args: str) -> None:
    """Run a scenario of pty_driver.py in its own process; it fails with what it saw."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        DRIVER,
        name,
        server.address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=cli_env(server.address),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 150)
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]


async def test_detach_keys_leave_the_exec_running_and_attach_it_rejoins(
    server: ExecServer,
) -> None:
    await scenario(server, "detach-and-rejoin")


async def test_a_partial_detach_sequence_reaches_the_exec(server: ExecServer) -> None:
    await scenario(server, "partial-detach-sequence")


async def test_third_ctrl_c_detaches_and_names_the_generated_exec(server: ExecServer) -> None:
    await scenario(server, "third-ctrl-c")


async def test_sigterm_restores_the_terminal_and_exits_143(server: ExecServer) -> None:
    await scenario(server, "sigterm-restores")


async def test_attach_t_resizes_and_gives_keys(server: ExecServer) -> None:
    async with AsyncExecClient(server.address) as client:
        exec_ = await client.run(
            "box", "tty", ["sh", "-c", 'read l; stty size; echo "[$l]"'], tty=True
        )
        await scenario(server, "attach-tty", "box", "tty")
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
