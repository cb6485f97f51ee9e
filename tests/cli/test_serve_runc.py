"""``execstream serve --runtime runc`` as a user runs it (issue 14's "done when")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from execstream.server.runtime.runc import runc_problem

PROBLEM = runc_problem()
SERVE_RUNC = [sys.executable, "-m", "execstream", "serve", "--runtime", "runc"]


def test_a_runtime_that_cannot_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [*SERVE_RUNC, "--rootfs", str(tmp_path / "none"), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    # Where runc is missing the line names the packages; else it names the bad rootfs.
    assert "apt-get install runc busybox-static" in lines[0] or "not a root filesystem" in lines[0]


@pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")
def test_run_against_serve_runtime_runc_is_in_a_container(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = subprocess.Popen(
        [*SERVE_RUNC, "--listen", "127.0.0.1:0", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), line
        address = line.split()[-1]
        script = "readlink /proc/self/ns/pid; ls /"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "execstream",
                "run",
                "--target",
                address,
                "--",
                "sh",
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        namespace, *listing = result.stdout.split()
        assert namespace.startswith("pid:[")
        assert namespace != os.readlink("/proc/self/ns/pid")
        assert {"bin", "etc", "proc", "root", "tmp"} <= set(listing)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    listed = subprocess.run(
        ["runc", "--root", str(state / "runc" / "state"), "list", "-q"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.split() == []  # shutdown deleted the container
