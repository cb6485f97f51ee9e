"""``mypy --strict`` on a user's program (typed_user.py): the public API is typed, and
misuse of it is caught."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from execstream.server import ExecServer

HERE = Path(__file__).resolve().parent

MISUSE = """\
from execstream.client import AsyncExecClient, ExecClient, Output

Output("stdin", 1, b"", 0)  # line 3: not a stream name
ExecClient("127.0.0.1:1").status(42)  # line 4: not a container id
async def f(client: AsyncExecClient) -> str:
    return await client.status("c")  # line 6: a Status, not a str
"""


def _search_path(root: Path) -> str | None:
    """Where mypy finds ``execstream``: nothing to add for a normal install; for an editable
    install, whose packages are mapped from impl/ and generated/ by an import hook mypy
    cannot follow, a tree of links laid out as installed."""
    import execstream

    package = Path(execstream.__file__).resolve().parent
    if package.name == "execstream":
        return None
    tree = root / "execstream"
    tree.mkdir(parents=True)
    for entry in package.iterdir():
        (tree / entry.name).symlink_to(entry)
    wire = importlib.import_module("execstream.wire")
    (tree / "wire").symlink_to(Path(wire.__file__).resolve().parent)
    return str(root)


async def test_mypy_strict_accepts_the_user_program_and_rejects_misuse(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mypy")
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSE)
    env = dict(os.environ)
    search_path = _search_path(tmp_path / "typing-root")
    if search_path is not None:
        env["MYPYPATH"] = search_path
    cache = Path(tempfile.gettempdir()) / f"execstream-typing-cache-{sys.version_info[:2]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--no-error-summary",
        "--hide-error-context",
        "--cache-dir",
        str(cache),
        "--config-file",
        "",
        str(HERE / "typed_user.py"),
        str(misuse),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    report = out.decode()
    errors = re.findall(r"^(\S+?):(\d+): error: (.*)$", report, flags=re.M)
    # Only the two programs count: an installed package's own modules are not reported
    # to its users (the link tree of an editable install would show them; `mypy --strict
    # -p execstream` checks them with the project's settings).
    assert [e for e in errors if e[0].endswith("typed_user.py")] == [], report + err.decode()
    misused = {int(line) for path, line, _ in errors if path.endswith("misuse.py")}
    assert misused == {3, 4, 6}, report


async def test_the_user_program_runs(server: ExecServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "typed_user.py"),
        server.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "stdout #1: b'typed\\n'" in lines and "exit 2" in lines
    assert "exit code 2" in lines and lines[-1] == "2 events"
