"""``execstream conformance`` and the pytest plugin, as users run them.

The command against a server started separately (``execstream serve`` in a subprocess, as the
issue asks), against nothing reachable (ERROR, not FAIL), and with no target (the embedded
reference server); ``--list`` without connecting; the report formats; and the pytest plugin,
both pointed at a server and, for every other pytest session, inert.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conformance_harness import (
    MAX_EXECS_PER_CONTAINER,
    REFERENCE_DEVIATIONS,
    TOKEN,
    MangleProxy,
    proxied,
)

from execstream._cli import main
from execstream.conformance import CASES, Level
from execstream.conformance._case import REGISTRY
from execstream.conformance._report import (
    exit_status,
    failure_lines,
    json_report,
    junit_xml,
    summary,
)
from execstream.conformance._runner import CaseResult, Verdict
from execstream.conformance._target import Target

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"^\d+ passed, \d+ failed(, \d+ skipped)?(, \d+ errors)?$", re.MULTILINE)


@contextmanager
def serving(*extra: str, log: Path) -> Iterator[str]:
    """``execstream serve`` in a subprocess; yields the address it prints."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "execstream", "serve", "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("listening on "), line + log.read_text()
            yield line.removeprefix("listening on ").strip()
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _known_deviations() -> list[str]:
    """Leave out the cases the reference server is known to fail (reported, see harness)."""
    return ["--exclude-case", *REFERENCE_DEVIATIONS] if REFERENCE_DEVIATIONS else []


def conformance(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "execstream", "conformance", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_against_a_server_started_separately(tmp_path: Path) -> None:
    report = tmp_path / "out.json"
    settings = ("--retention", "2", "--cleanup-interval", "0.5")
    with serving(*settings, "--max-output-bytes", "16MiB", log=tmp_path / "serve.log") as addr:
        done = conformance(
            "--target", addr, *settings, "--max-output-bytes", str(16 * 1024 * 1024),
            "--json", str(report), *_known_deviations(),
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    document = json.loads(report.read_text())
    verdicts = {c["id"]: c["verdict"] for c in document["cases"]}
    checked = [c for c in CASES if c.id not in REFERENCE_DEVIATIONS]
    assert set(verdicts) == {c.id for c in checked}
    # No token was given: the 12.1 cases skip, saying why; everything else passes.
    skipped = {i for i, v in verdicts.items() if v == "SKIP"}
    assert skipped == {c.id for c in checked if "token" in c.needs}
    assert all(v == "PASS" for i, v in verdicts.items() if i not in skipped)
    for entry in document["cases"]:
        assert {"id", "clause", "level", "requirement", "verdict", "seconds", "log"} <= set(entry)
        if entry["verdict"] == "SKIP":
            assert "--token" in entry["message"]
    lines = done.stdout.splitlines()
    expected = f"{len(checked) - len(skipped)} passed, 0 failed, {len(skipped)} skipped"
    assert lines[-1] == expected
    assert document["summary"]["line"] == expected
    for case in checked:
        assert any(
            re.match(rf"(PASS|SKIP)\s+{re.escape(case.id)}\b.*\d+\.\d\ds$", x) for x in lines
        )
    # Under each SKIP, the reason (what to give the suite).
    for index, line in enumerate(lines):
        if line.startswith("SKIP"):
            assert lines[index + 1].startswith("       reason:      "), lines[index : index + 2]
            assert "--token" in lines[index + 1]


def test_no_target_checks_the_embedded_reference_server(tmp_path: Path) -> None:
    xml_path, json_path = tmp_path / "junit.xml", tmp_path / "report.json"
    done = conformance(
        "--case", "session/5.1", "auth", "--exclude-case", "session/5.1/output-right-before-exit",
        "--junit-xml", str(xml_path), "--json", str(json_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "embedded reference server on 127.0.0.1:" in done.stdout
    chosen = [c for c in CASES if c.id.startswith(("session/5.1/", "auth/"))]
    chosen = [c for c in chosen if c.id != "session/5.1/output-right-before-exit"]
    assert done.stdout.splitlines()[-1] == f"{len(chosen)} passed, 0 failed"
    suite = ET.parse(xml_path).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == str(len(chosen)) and suite.get("failures") == "0"
    assert {t.get("name") for t in suite.iter("testcase")} == {c.id for c in chosen}
    assert json.loads(json_path.read_text())["summary"]["passed"] == len(chosen)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_target_is_an_error_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "out.json"
    target = f"127.0.0.1:{_closed_port()}"
    code = main(
        ["conformance", "--target", target, "--connect-timeout", "1", "--case", "session/3.1",
         "--json", str(report)]
    )  # fmt: skip
    out = capsys.readouterr().out
    selected = [c for c in CASES if c.clause == "3.1"]
    assert code == 1
    assert out.splitlines()[-1] == f"0 passed, 0 failed, {len(selected)} errors"
    cases = json.loads(report.read_text())["cases"]
    assert {c["verdict"] for c in cases} == {"ERROR"}
    assert all("unreachable" in c["message"] for c in cases)


def test_list_needs_no_connection(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--list", "--target", f"127.0.0.1:{_closed_port()}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"{len(CASES)} cases"
    for case, line in zip(CASES, lines, strict=False):
        assert line.split()[:2] == [case.id, case.level.value]
        assert line.endswith(case.requirement)


def test_list_selects_by_prefix_exclusion_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    main(["conformance", "--list", "--case", "session/3.1", "--exclude-case", "3.1/second-start"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert listed == [
        c.id for c in CASES if c.clause == "3.1" and c.id.split("/")[2] != "second-start"
    ]
    main(["conformance", "--list", "--level", "must"])
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert lines and all(line.split()[1] == "MUST" for line in lines)
    assert len(lines) == len([c for c in CASES if c.level is Level.MUST])


def _result(case_id: str, verdict: Verdict) -> CaseResult:
    failed = verdict is Verdict.FAIL
    return CaseResult(
        REGISTRY[case_id],
        verdict,
        0.5,
        "expected a; seen b" if failed else "why",
        "exit as the last message" if failed else "",
        "a chunk after exit" if failed else "",
        ["-> something", "<- something else"],
    )


def test_reports_say_clause_requirement_expected_and_seen() -> None:
    fail = _result("session/5.1/exit-last-then-ok", Verdict.FAIL)
    text = "\n".join(failure_lines(fail))
    assert "PROTOCOL 5.1 Exit after all output [MUST]" in text
    assert fail.case.requirement in text
    assert "expected:    exit as the last message" in text
    assert "seen:        a chunk after exit" in text
    target = Target(address="127.0.0.1:1")
    root = ET.fromstring(junit_xml([fail], target, 1.0))
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None and "[MUST]" in (failure.get("message") or "")
    assert "a chunk after exit" in (failure.text or "")
    entry = json.loads(json_report([fail], target, 1.0))["cases"][0]
    assert entry["clause"] == "5.1" and entry["verdict"] == "FAIL" and entry["log"]


def test_summary_line_and_exit_status() -> None:
    should = next(c.id for c in CASES if c.level is Level.SHOULD)
    must = "session/5.1/exit-last-then-ok"
    assert summary([_result(must, Verdict.PASS)]) == "1 passed, 0 failed"
    mixed = [
        _result(must, Verdict.PASS),
        _result(should, Verdict.FAIL),
        _result("auth/12.1/missing-token", Verdict.SKIP),
        _result("session/3.1/second-start", Verdict.ERROR),
    ]
    assert summary(mixed) == "1 passed, 1 failed, 1 skipped, 1 errors"
    assert exit_status(mixed[:3]) == 0  # a SHOULD failure does not fail the run
    assert exit_status(mixed) == 1  # a MUST error does
    assert exit_status([_result(must, Verdict.FAIL)]) == 1
    assert SUMMARY.search(summary(mixed))


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def test_pytest_plugin_runs_the_cases_against_a_target(tmp_path: Path) -> None:
    with serving("--token", "plugin-token", log=tmp_path / "serve.log") as addr:
        done = _pytest(
            "--pyargs", "execstream.conformance", "-q", "-rs",
            "--execstream-target", addr, "--execstream-token", "plugin-token",
            "--execstream-case", "session/5.1", "--execstream-case", "auth",
            cwd=tmp_path,
        )  # fmt: skip
    chosen = [c for c in CASES if c.id.startswith(("session/5.1/", "auth/"))]
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert f"{len(chosen)} passed, {len(CASES) - len(chosen)} deselected" in done.stdout


def test_pytest_plugin_errors_only_the_selected_cases_when_unreachable(tmp_path: Path) -> None:
    done = _pytest(
        "--pyargs", "execstream.conformance", "-q",
        "--execstream-target", "127.0.0.1:1", "--execstream-connect-timeout", "0.5",
        "--execstream-case", "session/5.1",
        cwd=tmp_path,
    )  # fmt: skip
    chosen = [c for c in CASES if c.id.startswith("session/5.1/")]
    assert done.returncode == 1, done.stdout[-3000:]
    assert f"{len(CASES) - len(chosen)} deselected, {len(chosen)} errors" in done.stdout
    assert "HarnessError" in done.stdout and "127.0.0.1:1" in done.stdout


def test_pytest_plugin_without_a_target_skips_saying_why(tmp_path: Path) -> None:
    done = _pytest("--pyargs", "execstream.conformance", "-q", "-rs", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(CASES)} skipped" in done.stdout
    assert "no --execstream-target given" in done.stdout


def test_pytest_plugin_is_inert_for_other_sessions() -> None:
    """Installed as an entry point, it must not change what another session collects."""
    with_plugin = _pytest("--collect-only", "-q", "tests/wire", cwd=ROOT)
    without = _pytest(
        "--collect-only", "-q", "-p", "no:execstream_conformance", "tests/wire", cwd=ROOT
    )
    assert with_plugin.returncode == without.returncode == 0, with_plugin.stdout + without.stdout
    assert with_plugin.stdout.splitlines()[:-1] == without.stdout.splitlines()[:-1]
    help_text = _pytest("--help", cwd=ROOT).stdout
    assert "--execstream-target" in help_text


async def test_tls_target_with_a_ca(tmp_path: Path) -> None:
    """``--tls --ca FILE`` against a TLS endpoint (a pass-through proxy of the reference)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-300:]!r}")
    async with proxied(MangleProxy, tls=(key.read_bytes(), cert.read_bytes())) as target:
        port = target.address.rsplit(":", 1)[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "execstream", "conformance",
            "--target", f"localhost:{port}", "--tls", "--ca", str(cert), "--token", TOKEN,
            "--max-execs-per-container", str(MAX_EXECS_PER_CONTAINER),
            "--case", "session/5.1", "auth/12.1/missing-token",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 120)
    chosen = [c for c in CASES if c.id.startswith("session/5.1/")]
    assert process.returncode == 0, out.decode()[-3000:] + err.decode()[-2000:]
    assert out.decode().splitlines()[-1] == f"{len(chosen) + 1} passed, 0 failed"
    assert "TLS" in out.decode()
