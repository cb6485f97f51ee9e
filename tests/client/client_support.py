"""Helpers of the client tests: fresh IDs and the ``execstream`` command as a subprocess."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass


def ids() -> tuple[str, str]:
    return f"c-{uuid.uuid4().hex[:8]}", f"e-{uuid.uuid4().hex[:8]}"


def cli_env(target: str, **extra: str) -> dict[str, str]:
    """The environment of an ``execstream`` subprocess aimed at ``target``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECSTREAM_")}
    env["EXECSTREAM_TARGET"] = target
    env.update(extra)
    return env


@dataclass
class Completed:
    code: int
    stdout: bytes
    stderr: bytes


async def cli(
    target: str,
    *args: str,
    stdin: bytes | None = None,
    timeout: float = 60,
    **env: str,
) -> Completed:
    """Run ``python -m execstream ARGS`` without blocking the loop the server runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "execstream",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(target, **env),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return Completed(proc.returncode, out, err)
