"""The suite reaches the servers it exists for: partial ones and engine-driven ones.

* A Session-only server (every other RPC UNIMPLEMENTED) gets its Session cases checked and
  passed, and each other RPC's cases FAIL with "X is not implemented"; no case of a clause
  about Session fails for a helper RPC the server lacks.
* An engine-style server (``engine_server.py``: execs registered through the executor API,
  ``Start{command}`` answered NOT_FOUND) is checked through ``--driver-command``: its Session
  cases pass, the cases about creation over the wire skip, and each fault injected into the
  engine is caught by the case of the clause it breaks.
* Hygiene: no task outlives its case, no exception goes unretrieved, a target that dies
  mid-run and Ctrl-C end the run cleanly with ERROR verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conformance_harness import CLEANUP_INTERVAL, OUTPUT_LIMIT, TOKEN, SessionOnly, proxied
from engine_server import FAULTS, driver_command, engine
from test_conformance_broken import EndsAllOnLeave

from execstream.conformance import CaseResult, Target, Verdict, run_suite, select
from execstream.conformance._driver import CommandDriver
from execstream.conformance._report import area_lines
from execstream.server import ExecServer, ServerSettings

#: The engine keeps exited execs this long: the suite attaches right after the driver
#: returns, and a driver process can take a second to start on a loaded machine.
ENGINE_RETENTION = 5.0


def _report(results: list[CaseResult]) -> str:
    return "\n".join(f"{r.verdict.value} {r.case.id}: {r.message[:300]}" for r in results)


# -- a Session-only server -----------------------------------------------------------------


async def test_a_session_only_server_passes_its_session_cases_and_fails_the_rest() -> None:
    session = [
        "session/3.1",
        "session/3.3/client-session-id-echoed",
        "session/3.5/cancelled-client",  # uses status as a helper: checks what Session shows
        "session/5.1/every-client-gets-exit",
        "session/6.1/replay-from-sequence",
        "common/2.1/valid-ids-accepted",
        "wire/1.3/published-client-runs-and-attaches",
    ]
    others = {
        "status/9.1/unknown-not-found": "ContainerStatus",
        "lifecycle/8.3/exec-without-container": "ContainerLifecycle",
        "control/10.1/pause-unknown": "ContainerPause",
        "control/10.2/resume-unknown": "ContainerResume",
        "control/10.3/unknown-signal": "ContainerSignal",
        "common/2.1/control-bad-container-id": "ContainerPause",
        "wire/1.3/published-lifecycle-events": "ContainerLifecycle",
    }
    cases = select(include=[*session, *others])
    async with proxied(SessionOnly) as target:
        results = await run_suite(target, cases, jobs=6)
    report = _report(results)
    verdicts = {r.case.id: r for r in results}
    for result in results:
        if result.case.id in others:
            rpc = others[result.case.id]
            assert result.verdict is Verdict.FAIL, f"{result.case.id} should FAIL:\n{report}"
            assert result.message == f"{rpc} is not implemented", report
            assert "UNIMPLEMENTED" in result.seen
        else:
            assert result.verdict is Verdict.PASS, f"{result.case.id} should PASS:\n{report}"
    assert verdicts["session/3.5/cancelled-client"].verdict is Verdict.PASS
    lines = "\n".join(area_lines(results))
    assert "control:" in lines and "ContainerPause, ContainerResume, ContainerSignal not" in lines
    assert "session:" in lines and "failed" in lines


async def test_auth_cases_check_the_rpcs_a_session_only_server_has() -> None:
    """An RPC that is not implemented has no effect with or without a token: the 12.1 cases
    check the token on what the server serves (Session) and pass."""
    async with proxied(SessionOnly) as target:
        results = await run_suite(target, select(include=["auth"]), jobs=4)
    assert {r.verdict for r in results} == {Verdict.PASS}, _report(results)


async def test_a_helper_the_target_lacks_skips_a_case_about_another_rpc() -> None:
    """Retention is about Session; a server without ContainerStatus cannot show 11.2's
    "status NOT_FOUND after removal", so that case SKIPs with the reason, never FAILs."""
    cases = select(include=["retention/11.2/removed-after-retention-and-sweep"])
    async with proxied(SessionOnly) as target:
        [result] = await run_suite(target, cases)
    assert result.verdict is Verdict.SKIP, result.message
    assert "ContainerStatus" in result.message and "helper" in result.message


# -- an engine-driven server, checked through --driver-command ----------------------------


@contextlib.contextmanager
def _short_socket_dir() -> Iterator[Path]:
    # A unix socket path is limited to 107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="es-engine-") as directory:
        yield Path(directory)


@contextlib.asynccontextmanager
async def _engine(
    faults: frozenset[str] = frozenset(), control: Path | None = None
) -> AsyncIterator[Target]:
    with _short_socket_dir() as directory:
        control = control or directory / "control.sock"
        async with engine(
            control,
            token=TOKEN,
            retention=ENGINE_RETENTION,
            cleanup_interval=CLEANUP_INTERVAL,
            max_output_bytes=OUTPUT_LIMIT,
            faults=faults,
        ) as address:
            yield Target(
                address=address,
                token=TOKEN,
                retention=ENGINE_RETENTION,
                cleanup_interval=CLEANUP_INTERVAL,
                max_output_bytes=OUTPUT_LIMIT,
                driver=CommandDriver(driver_command(control)),
            )


async def test_an_engine_driven_server_passes_its_session_cases_through_the_driver() -> None:
    cases = select(
        include=["session", "retention", "wire/1.3/published-client", "auth/12.1/basic"],
        exclude=["session/4.3/large-output-64mib"],  # heavy, and no different under a driver
    )
    async with _engine() as target:
        results = await run_suite(target, cases, jobs=6)
    report = _report(results)
    creates = {r.case.id for r in results if "create" in r.case.needs}
    assert creates, "the cases about creation over the wire are selected"
    for result in results:
        if result.case.id in creates or "terminal_size" in result.message:
            assert result.verdict is Verdict.SKIP, f"{result.case.id} should SKIP:\n{report}"
            assert "driver" in result.message
        else:
            assert result.verdict is Verdict.PASS, f"{result.case.id} should PASS:\n{report}"


ENGINE_FAULTS = {
    "exit-code-zero": ["session/5.2/exit-status", "session/5.2/killed-by-signal"],
    "drops-stderr": ["session/4.3/clients-attached-at-different-times"],
    "exit-before-output": ["session/5.1/output-right-before-exit"],
    "ignores-env": ["session/3.2/create-runs-argv-with-env-and-working-dir"],
}
ENGINE_CONTROL = [
    "session/3.1/second-start",
    "session/3.2/attach-unknown",
    "session/3.3/client-session-id-echoed",
]


def test_each_engine_fault_breaks_one_clause() -> None:
    assert set(ENGINE_FAULTS) == set(FAULTS) and len(FAULTS) >= 3
    for fault, case_ids in ENGINE_FAULTS.items():
        assert {c.split("/")[1] for c in case_ids} <= {FAULTS[fault].split(":")[0]}, fault


@pytest.mark.parametrize("fault", sorted(ENGINE_FAULTS))
async def test_the_suite_catches_a_fault_of_an_engine_driven_server(fault: str) -> None:
    expect_fail = ENGINE_FAULTS[fault]
    cases = select(include=[*expect_fail, *ENGINE_CONTROL])
    async with _engine(frozenset({fault})) as target:
        results = await run_suite(target, cases, jobs=6)
    report = _report(results)
    verdicts = {r.case.id: r for r in results}
    for case_id in expect_fail:
        result = verdicts[case_id]
        assert result.verdict is Verdict.FAIL, f"{case_id} should FAIL under {fault}:\n{report}"
        assert result.expected and result.seen
    for case_id in ENGINE_CONTROL:
        assert verdicts[case_id].verdict is Verdict.PASS, f"{case_id} should PASS:\n{report}"


async def test_a_failing_driver_is_an_error_of_the_harness_not_of_the_server() -> None:
    cases = select(include=["session/5.2/exit-status"])
    async with _engine() as healthy:
        target = Target(
            address=healthy.address,
            token=TOKEN,
            driver=CommandDriver("echo 'no engine here' >&2; exit 3"),
        )
        [result] = await run_suite(target, cases)
    assert result.verdict is Verdict.ERROR
    assert "driver command exited 3" in result.message and "no engine here" in result.message


# -- hygiene -------------------------------------------------------------------------------


async def test_no_task_outlives_its_case_and_no_exception_goes_unretrieved() -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        # Cases that fail mid-way with streams and gathered tasks open, against a server
        # that cuts every client when one leaves.
        cases = select(include=["session/3.5", "session/5.1/output-right-before-exit"])
        async with proxied(EndsAllOnLeave) as target:
            results = await run_suite(target, cases, jobs=6)
        assert any(r.verdict is Verdict.FAIL for r in results), _report(results)
        for _ in range(3):  # let callbacks of ended calls run
            await asyncio.sleep(0)
        ours = [
            t
            for t in asyncio.all_tasks()
            if t is not asyncio.current_task()
            and "/conformance/_" in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
        ]
        assert not ours, f"tasks of the suite still running: {ours}"
    finally:
        loop.set_exception_handler(previous)
    import gc

    gc.collect()  # "exception was never retrieved" is reported when a task is collected
    assert not unretrieved, [c.get("message") for c in unretrieved]


async def test_a_target_that_dies_mid_run_gives_errors_not_failures() -> None:
    server = ExecServer(
        ServerSettings(listen="127.0.0.1:0", retention=2, cleanup_interval=0.5, token=TOKEN)
    )
    address = await server.start()
    target = Target(address=address, token=TOKEN, connect_timeout=2)
    cases = select(include=["session/3", "session/4.2", "session/5"], exclude=["session/5.3"])
    stopping: list[asyncio.Task[None]] = []

    def on_result(result: CaseResult) -> None:
        if not stopping:  # the first result: the target goes away under the others
            stopping.append(asyncio.create_task(server.close()))

    began = time.monotonic()
    try:
        results = await run_suite(target, cases, jobs=6, on_result=on_result)
    finally:
        await server.close()
    report = _report(results)
    assert time.monotonic() - began < 120, report
    assert not [r for r in results if r.verdict is Verdict.FAIL], report
    errors = [r for r in results if r.verdict is Verdict.ERROR]
    assert len(errors) >= len(cases) // 2, report
    assert all("unreachable" in r.message or "shutting down" in r.message for r in errors), report


def test_ctrl_c_ends_the_run_cleanly_with_error_verdicts() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "execstream", "conformance", "--case", "session", "--jobs", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        lines = []
        for line in process.stdout:  # wait until cases are running and one has finished
            lines.append(line)
            if line.startswith(("PASS", "FAIL")):
                break
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = "".join(lines) + rest
    assert process.returncode == 130, out + errors
    assert "interrupted before the case finished" in out
    assert out.splitlines()[-1].endswith("errors"), out
    assert "Traceback" not in errors and "never retrieved" not in errors, errors
    assert "interrupted" in errors


# -- the driver options, from the command line and the pytest plugin ----------------------

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def _engine_process(*faults: str) -> Iterator[tuple[str, Path]]:
    """``engine_server.py`` in a subprocess, as the README runs it: (address, control)."""
    with _short_socket_dir() as directory:
        control = directory / "control.sock"
        extra = [arg for fault in faults for arg in ("--fault", fault)]
        process = subprocess.Popen(
            [sys.executable, str(HERE / "engine_server.py"), "--listen", "127.0.0.1:0",
             "--control", str(control), "--retention", str(ENGINE_RETENTION),
             "--cleanup-interval", str(CLEANUP_INTERVAL), *extra],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("listening on "), line
            yield line.split()[2].rstrip(","), control
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_readme_example_checks_an_engine_through_driver_command() -> None:
    with _engine_process() as (address, control):
        done = subprocess.run(
            [sys.executable, "-m", "execstream", "conformance", "--target", address,
             "--retention", str(ENGINE_RETENTION), "--cleanup-interval", str(CLEANUP_INTERVAL),
             "--driver-command", f"{sys.executable} {HERE / 'engine_driver.py'} {control}",
             "--case", "session/5.1", "session/5.2", "session/3.2", "status/9.1"],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "execs from the driver command" in done.stdout
    assert "SKIP   session/3.2/create-existing-running" in done.stdout
    assert re.search(r"^  session:\s+\d+ passed, 0 failed, \d+ skipped$", done.stdout, re.M)
    assert re.match(r"^\d+ passed, 0 failed, \d+ skipped$", done.stdout.splitlines()[-1])


def test_the_pytest_plugin_takes_the_driver_options(tmp_path: Path) -> None:
    with _engine_process("exit-code-zero") as (address, control):
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs",
             "execstream.conformance", "-q", "--execstream-target", address,
             "--execstream-driver-command", f"{sys.executable} {HERE / 'engine_driver.py'} "
             f"{control}", "--execstream-case", "session/5.2", "--execstream-case",
             "session/3.2/attach-unknown"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )  # fmt: skip
    # The engine reports exit code 0 for everything: the two 5.2 cases fail, 3.2 passes.
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"2 failed, 1 passed", done.stdout), done.stdout[-3000:]


async def test_a_python_callable_drives_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from execstream.conformance._driver import CallableDriver

    driver = CallableDriver.load("engine_server:register")
    cases = select(include=["session/5.1/exit-last-then-ok", "session/6.1/replay-from-sequence"])
    with _short_socket_dir() as directory:
        control = directory / "control.sock"
        monkeypatch.setenv("ENGINE_CONTROL", str(control))
        async with _engine(control=control) as target:
            target = Target(address=target.address, token=TOKEN, driver=driver)
            results = await run_suite(target, cases)
    assert [r.verdict for r in results] == [Verdict.PASS, Verdict.PASS], _report(results)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--driver-command", "true"], "a driver needs --target"),
        (["--target", "127.0.0.1:1", "--driver-command", "true", "--driver", "m:f"], "not both"),
        (["--target", "127.0.0.1:1", "--driver", "no_such_module_here:f"], "cannot import"),
        (["--target", "127.0.0.1:1", "--driver", "os.path"], "module:callable"),
    ],
)
def test_bad_driver_options_are_refused_before_connecting(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from execstream.conformance._cli import main

    assert main(args) == 2
    assert message in capsys.readouterr().err
