"""The client subcommands of ``execstream`` (impl/_cli_client.py), run as subprocesses
against a real reference server, some under a pseudo-terminal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import struct
import sys
import termios
from dataclasses import dataclass

import pytest
from client_support import cli, cli_env, ids

from execstream._cli import build_parser
from execstream.client import AsyncExecClient
from execstream.server import ExecServer, Limits
from execstream.server.testing import serve


async def test_run_streams_both_outputs_and_exits_with_the_code(server: ExecServer) -> None:
    done = await cli(server.address, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.code, done.stdout, done.stderr) == (7, b"out\n", b"err\n")


async def test_run_forwards_piped_stdin_env_and_workdir(
    server: ExecServer, tmp_path: object
) -> None:
    done = await cli(
        server.address,
        "run",
        "-i",
        "--exec-id",
        "piped",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "box",
        "--",
        "sh",
        "-c",
        'cat; echo "$GREETING"; pwd',
        stdin=b"\x00binary\xffinput\n",
    )
    assert done.code == 0, done.stderr
    assert done.stdout == b"\x00binary\xffinput\nhi\n/tmp\n"
    async with AsyncExecClient(server.address) as client:
        assert (await client.status("box", "piped")).exit_code == 0


@dataclass
class TerminalRun:
    code: int
    output: bytes
    attributes_before: list[object]
    attributes_after: list[object]


async def run_in_pty(
    target: str, *args: str, rows: int, cols: int, keys: bytes = b"", after: bytes = b""
) -> TerminalRun:
    """Run ``execstream ARGS`` with a pseudo-terminal of rows x cols as stdin, stdout and
    stderr; type ``keys`` once ``after`` appeared in its output."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    before = termios.tcgetattr(slave)
    loop = asyncio.get_running_loop()
    output = bytearray()
    seen = asyncio.Event()

    def readable() -> None:
        with contextlib.suppress(OSError):
            output.extend(os.read(master, 65536))
        if after in output:
            seen.set()

    os.set_blocking(master, False)
    loop.add_reader(master, readable)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "execstream",
            *args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=cli_env(target),
        )
        if keys:
            if after:
                await asyncio.wait_for(seen.wait(), 30)
            os.write(master, keys)
        code = await asyncio.wait_for(proc.wait(), 30)
        await asyncio.sleep(0)  # let the reader take what is left
        readable()
        return TerminalRun(code, bytes(output), before, termios.tcgetattr(slave))
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)


async def test_run_tty_prints_the_local_terminal_size(server: ExecServer) -> None:
    """``run -t -- stty size`` under a 33x101 pseudo-terminal."""
    result = await run_in_pty(server.address, "run", "-t", "--", "stty", "size", rows=33, cols=101)
    assert result.code == 0, result.output
    # Start carries the size, so the command sees it from its first instruction (7.3).
    assert b"33 101" in result.output


async def test_run_interactive_tty_uses_raw_mode_and_restores_the_terminal(
    server: ExecServer,
) -> None:
    # The keys reach the exec after the resize (one stream, kept in order), so `stty size`
    # after `read` sees the local size whatever the timing.
    script = 'read line; stty size; echo "[$line]"; exit 3'
    result = await run_in_pty(
        server.address, "run", "-it", "--", "sh", "-c", script, rows=40, cols=132, keys=b"typed\n"
    )
    assert result.code == 3, result.output
    assert b"40 132" in result.output and b"[typed]" in result.output
    assert result.attributes_after == result.attributes_before  # raw mode was undone


async def test_run_without_i_on_a_terminal_gives_the_exec_eof(server: ExecServer) -> None:
    """As ``docker exec`` without ``-i``: stdin is not forwarded and the exec reads EOF."""
    result = await run_in_pty(server.address, "run", "--", "cat", rows=24, cols=80)
    assert (result.code, result.output) == (0, b"")


async def test_ctrl_c_sends_int_to_the_exec(server: ExecServer) -> None:
    script = 'trap "echo caught; exit 9" INT; echo ready; while :; do sleep 0.1; done'
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "execstream",
        "run",
        "--",
        "sh",
        "-c",
        script,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(server.address),
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out, err) == (9, b"caught\n", b"")


async def test_attach_status_and_events(server: ExecServer) -> None:
    c, e = ids()
    async with AsyncExecClient(server.address) as client:
        # Pauses between the writes so that each is a chunk of its own.
        script = "echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c; exit 4"
        exec_ = await client.run(c, e, ["sh", "-c", script])
        assert await exec_.wait() == 4
        last = exec_.last_sequence
    attached = await cli(server.address, "attach", c, e)
    assert (attached.code, attached.stdout, attached.stderr) == (4, b"a\nc\n", b"b\n")
    tail = await cli(server.address, "attach", c, e, "--from-sequence", str(last))
    assert (last, tail.code, tail.stdout, tail.stderr) == (3, 4, b"c\n", b"")

    as_json = await cli(server.address, "status", c, e, "--json", "--resources")
    assert as_json.code == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert (status["state"], status["exit_code"], status["exec_ids"]) == ("exited", 4, [e])
    assert set(status["resource_usage"]) >= {"cpu_percent", "memory_bytes"}
    table = await cli(server.address, "status", c)
    assert table.code == 0
    summary, execs = table.stdout.decode().split("\n\n")
    rows = dict(line.split(None, 1) for line in summary.splitlines())
    assert (rows["STATE"], rows["CONTAINER"], rows["EXECS"]) == ("exited", c, "1")
    header, row = execs.splitlines()
    assert header.split() == ["EXEC", "STATE", "EXIT", "STARTED", "FINISHED"]
    assert row.split()[:3] == [e, "exited", "4"]

    events = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "execstream",
        "events",
        c,
        "--json",
        "--from-sequence",
        "0",
        stdout=asyncio.subprocess.PIPE,
        env=cli_env(server.address),
    )
    assert events.stdout is not None
    try:
        lines = [await asyncio.wait_for(events.stdout.readline(), 30) for _ in range(4)]
    finally:
        events.kill()
        await events.wait()
    parsed = [json.loads(line) for line in lines]
    assert [p["event_type"] for p in parsed] == ["created", "registered", "started", "exited"]
    assert parsed[-1]["exit_code"] == 4 and all(p["is_replay"] for p in parsed)


async def test_control_commands(server: ExecServer) -> None:
    c, e = ids()
    async with AsyncExecClient(server.address) as client:
        exec_ = await client.run(c, e, ["sleep", "30"])
        assert (await cli(server.address, "pause", c)).code == 0
        assert (await client.status(c)).state == "paused"
        assert (await cli(server.address, "resume", c)).code == 0
        sent = await cli(server.address, "signal", c, "TERM", "--exec-id", e)
        assert sent.code == 0 and b"TERM" in sent.stdout
        assert await exec_.wait() == 143


@pytest.mark.parametrize(
    ("args", "expected_code", "message"),
    [
        (("attach", "box", "nope"), 125, "execstream: not found: exec 'nope'"),
        (("status", "no-such-box"), 1, "execstream: not found: container 'no-such-box'"),
        (("signal", "box", "NOPE"), 1, "execstream: invalid argument: unknown signal"),
        (("run", "--", "no-such-command-xyz"), 127, "execstream: invalid argument: command"),
        (("run", "--", "/etc/passwd"), 126, "execstream: invalid argument: command"),
        (("run", "--", "/"), 126, "execstream: invalid argument: command"),
        (("run", "a", "b", "--", "true"), 125, "execstream: run: 'a b' before --"),
        (("run", "--ca", "/missing.pem", "--", "true"), 125, "execstream: --ca /missing.pem:"),
        (("attach", "box", "there", "--detach-keys", "ctrl-1"), 125, "execstream: --detach-keys"),
        (("attach", "box", "there", "-t"), 125, "execstream: attach -t: exec there has no"),
        (("run",), 125, "execstream: run: give the command"),
        (("--target", "127.0.0.1:1", "status", "box"), 1, "execstream: unavailable:"),
    ],
)
async def test_failures_are_one_line_without_traceback(
    server: ExecServer, args: tuple[str, ...], expected_code: int, message: str
) -> None:
    async with AsyncExecClient(server.address) as client:
        assert await (await client.run("box", "there", ["true"])).wait() == 0
    command = list(args)
    after = [command[2], *command[3:], "--target", command[1]] if command[0] == "--target" else []
    for form in (command, after) if after else (command,):
        # Connection options go before or after the subcommand.
        done = await cli(server.address, *form)
        assert done.code == expected_code, done.stderr
        assert done.stderr.decode().startswith(message), done.stderr
        assert done.stderr.count(b"\n") == 1 and b"Traceback" not in done.stderr


async def test_token_option_and_environment() -> None:
    async with serve(token="s3cret") as server:
        refused = await cli(server.address, "run", "--", "true")
        assert refused.code == 125
        assert refused.stderr.startswith(b"execstream: unauthenticated:")
        assert b"--token or $EXECSTREAM_TOKEN" in refused.stderr
        by_flag = await cli(server.address, "run", "--token", "s3cret", "--", "true")
        assert by_flag.code == 0, by_flag.stderr
        by_env = await cli(server.address, "run", "--", "true", EXECSTREAM_TOKEN="s3cret")
        assert by_env.code == 0, by_env.stderr


async def test_stdin_is_read_only_with_i(server: ExecServer) -> None:
    """As docker: without -i, `run` leaves stdin to whoever comes next (a `while read` loop)."""
    script = 'while read l; do execstream run -- echo "hi $l"; done'
    env = cli_env(server.address)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(b"a\nb\nc\n"), 120)
    assert (proc.returncode, out, err) == (0, b"hi a\nhi b\nhi c\n", b"")


async def test_run_d_prints_the_exec_id_and_returns(server: ExecServer) -> None:
    started = await cli(server.address, "run", "-d", "box", "--", "sh", "-c", "sleep 1; exit 6")
    assert started.code == 0, started.stderr
    exec_id = started.stdout.decode().strip()
    assert exec_id.startswith("run-") and started.stderr == b""
    async with AsyncExecClient(server.address) as client:
        assert (await client.status("box", exec_id)).state in ("running", "exited")
    attached = await cli(server.address, "attach", "box", exec_id)
    assert attached.code == 6
    named = await cli(server.address, "run", "-d", "--exec-id", "mine", "--", "cat")
    assert named.stdout == b"mine\n"
    async with AsyncExecClient(server.address) as client:
        assert await (await client.attach("default", "mine")).wait() == 0  # cat read EOF


async def test_the_container_option_is_kept_as_an_alias(server: ExecServer) -> None:
    done = await cli(server.address, "run", "--container", "old", "--exec-id", "x", "--", "true")
    assert done.code == 0, done.stderr
    async with AsyncExecClient(server.address) as client:
        assert (await client.status("old", "x")).exit_code == 0


async def test_lost_output_exits_125_unless_gaps_are_allowed() -> None:
    limits = Limits(max_output_bytes=256 * 1024)
    async with (
        serve(limits=limits, retention=30) as server,
        AsyncExecClient(server.address) as client,
    ):
        script = "head -c 4000000 /dev/zero; echo; exit 3"
        assert await (await client.run("c", "loud", ["sh", "-c", script])).wait() == 3
        strict = await cli(server.address, "attach", "c", "loud")
        assert strict.code == 125
        lines = strict.stderr.decode().splitlines()
        assert len(lines) == 1 and "chunks of output were lost" in lines[0], lines
        assert "--allow-gaps" in lines[0] and "exited 3" in lines[0]
        allowed = await cli(server.address, "attach", "--allow-gaps", "c", "loud")
        assert allowed.code == 3
        assert allowed.stderr.decode().startswith("execstream: warning: ")


async def test_grpc_core_logging_is_silenced_unless_verbose(server: ExecServer) -> None:
    quiet = await cli(server.address, "--tls", "--timeout", "5", "status", "box")
    assert quiet.code == 1
    assert quiet.stderr.count(b"\n") == 1, quiet.stderr
    assert quiet.stderr.startswith(b"execstream: unavailable: TLS handshake"), quiet.stderr
    assert b"--tls" in quiet.stderr
    loud = await cli(server.address, "--tls", "--timeout", "5", "--verbose", "status", "box")
    assert loud.code == 1 and loud.stderr.count(b"\n") > 1, loud.stderr


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"execstream": parser, **sub.choices}


@pytest.mark.parametrize("name", list(_parsers()))
def test_help_is_complete(name: str) -> None:
    """Every command has a description, every option and positional a meaning."""
    parser = _parsers()[name]
    assert parser.description, name
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        # A value with a default says it; repeatable options (default []) start empty.
        takes_value = action.nargs != 0 and action.default not in (None, [])
        if action.option_strings and takes_value and action.default != argparse.SUPPRESS:
            assert "default" in action.help, f"{name} {action.option_strings}: no default"


def test_help_documents_the_exit_statuses() -> None:
    for name in ("execstream", "run", "attach"):
        text = _parsers()[name].format_help()
        for code in ("125", "126", "127"):
            assert code in text, (name, code)


async def test_a_thousand_sequential_execs_in_one_container_succeed() -> None:
    """PROTOCOL 13.3 with the default settings: exited execs never block new ones."""
    async with serve() as server, AsyncExecClient(server.address) as client:
        for n in range(1000):
            assert await (await client.run("default", f"true-{n}", ["true"])).wait() == 0
        # The retained exits are all there (the bound is 1024): attach still works.
        assert await (await client.attach("default", "true-0")).wait() == 0


@pytest.mark.parametrize("command", ["attach", "events"])
async def test_a_negative_sequence_names_the_flag(server: ExecServer, command: str) -> None:
    args = ["box", "there"] if command == "attach" else ["box"]
    done = await cli(server.address, command, *args, "--from-sequence", "-1")
    assert done.code == 2  # a usage error, as argparse's
    last = done.stderr.decode().splitlines()[-1]
    assert last.endswith("argument --from-sequence: must be >= 0, got -1"), done.stderr
