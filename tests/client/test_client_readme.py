"""The examples of README.md's "The client library" section, run as written against a real
server (only the address is replaced), so that they cannot rot."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest
from client_support import cli_env

from execstream.server import ExecServer

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## The client library"
DOCUMENTED_TARGET = "127.0.0.1:50051"


def blocks(language: str) -> list[str]:
    text = README.read_text()
    if SECTION not in text:
        pytest.fail(f"README.md has no {SECTION!r} section")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.S | re.M)


async def run(server: ExecServer, *argv: str) -> tuple[int, str, str]:
    env = cli_env(server.address)
    # The `execstream` command of this interpreter's environment comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def aimed(code: str, server: ExecServer) -> str:
    assert DOCUMENTED_TARGET in code
    return code.replace(DOCUMENTED_TARGET, server.address)


def test_the_section_has_the_three_examples() -> None:
    assert len(blocks("python")) == 2 and len(blocks("sh")) == 1


# Each example runs twice against one server: examples that a reader runs again must work.
TWICE = (1, 2)


async def test_async_example(server: ExecServer) -> None:
    for _ in TWICE:
        code, out, err = await run(server, sys.executable, "-c", aimed(blocks("python")[0], server))
        assert code == 0, err
        assert out.splitlines()[:3] == ["out", "exit code 3", "exited 3"]
        assert out.splitlines()[3].startswith("not found: exec 'no-such-exec'")
        assert err == "err\n"


async def test_sync_example(server: ExecServer) -> None:
    for _ in TWICE:
        code, out, err = await run(server, sys.executable, "-c", aimed(blocks("python")[1], server))
        assert code == 0, err
        assert out == "stdout 1 b'hello from stdin\\n'\nexit code 0\n"


async def test_cli_example(server: ExecServer) -> None:
    for _ in TWICE:
        code, out, err = await run(server, "sh", "-eu", "-c", aimed(blocks("sh")[0], server))
        assert code == 0, err
        assert "out\nexit status 7\n" in out
        assert "hi from /tmp\n" in out and "piped\n" in out
        # attach --from-sequence 2: the second chunk (stderr "two"), not the first.
        assert "attached; exit status 7" in out and "\none\n" not in out
        assert "two\n" in err
        assert re.search(r"^STATE\s+exited$", out, flags=re.M)
        assert '"exec_ids": [' in out
        assert err.count("err\n") >= 1 and "execstream:" not in err
