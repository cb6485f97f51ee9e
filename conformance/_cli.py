"""``execstream conformance``: check a server endpoint against spec/PROTOCOL.md.

With ``--target`` the suite checks that endpoint; without, it starts the embedded reference
server (``execstream.server.testing.serve``, imported only here) on a free local port with a
short retention (2 s) and sweep (0.5 s) and a random token, and checks that — so the command
with no arguments passes from a fresh install.  ``--list`` prints the cases without
connecting.

Importing this module is cheap (argparse only); the suite is imported when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._runner import CaseResult
    from ._target import Target

__all__ = ["add_conformance_command", "main", "spec_file"]

#: Settings of the embedded reference server (seconds).
EMBEDDED_RETENTION = 2.0
EMBEDDED_CLEANUP_INTERVAL = 0.5
#: The embedded server's output limit: small, so that the eviction cases (6.4, 6.5) run in
#: seconds, and large enough for every other case to stay within it.
EMBEDDED_OUTPUT_LIMIT = 8 * 1024 * 1024


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target")
    target.add_argument(
        "--target",
        metavar="HOST:PORT|unix:PATH",
        help="the server to check (default: start the embedded reference server)",
    )
    target.add_argument("--token", help="the target's token (sent as 'authorization: Bearer')")
    target.add_argument("--tls", action="store_true", help="connect with TLS")
    target.add_argument("--ca", type=Path, metavar="FILE", help="CA certificates for --tls (PEM)")
    target.add_argument(
        "--cert", type=Path, metavar="FILE", help="client certificate for mTLS (PEM; with --key)"
    )
    target.add_argument("--key", type=Path, metavar="FILE", help="private key of --cert (PEM)")
    target.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="give up on an unreachable target after this long (default %(default)s)",
    )
    driver = p.add_argument_group(
        "how the suite obtains its execs (default: Start with a command, over the wire)"
    )
    driver.add_argument(
        "--driver-command",
        metavar="CMD",
        help="run CMD through the shell to have the target register each exec "
        "(EXECSTREAM_CONTAINER_ID, _EXEC_ID, _COMMAND, _ENV, _WORKING_DIR, _TTY in its "
        "environment); it exits 0 once the exec is attachable",
    )
    driver.add_argument(
        "--driver",
        metavar="MODULE:CALLABLE",
        help="the same in Python: an async callable taking container_id, exec_id, command, "
        "env, working_dir, tty",
    )
    settings = p.add_argument_group("what the suite assumes of the target's settings")
    settings.add_argument(
        "--retention",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds an exited exec stays attachable (unknown: the 11.x cases skip)",
    )
    settings.add_argument(
        "--cleanup-interval",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds between retention sweeps (unknown: the 11.x cases skip)",
    )
    settings.add_argument(
        "--max-output-bytes",
        type=_non_negative_int,
        default=None,
        metavar="BYTES",
        help="the target's output limit per exec (PROTOCOL 6.5; 0: none; default 1 GiB, the "
        "reference server's; the embedded server uses 8 MiB so that eviction is checked)",
    )
    settings.add_argument(
        "--stdin-bytes",
        type=_positive_int,
        default=1024 * 1024,
        metavar="BYTES",
        help="largest stdin message accepted (default %(default)s)",
    )
    settings.add_argument(
        "--max-clients-per-exec",
        type=int,
        default=64,
        metavar="N",
        help="clients one exec accepts; 0 if unknown (default %(default)s)",
    )
    settings.add_argument(
        "--max-execs-per-container",
        type=int,
        default=128,
        metavar="N",
        help="execs one container runs at once; 0 if unknown (default %(default)s)",
    )
    which = p.add_argument_group("which cases")
    which.add_argument(
        "--case",
        action="extend",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="run only cases whose ID (or clause number) starts with PREFIX: session/3, 6.1",
    )
    which.add_argument(
        "--exclude-case",
        action="extend",
        nargs="+",
        default=[],
        metavar="ID",
        help="leave out these cases (IDs or prefixes)",
    )
    which.add_argument(
        "--level",
        choices=["must", "should"],
        default="should",
        help="must: only MUST cases; should: MUST and SHOULD (default)",
    )
    which.add_argument(
        "--list", action="store_true", help="list the cases (ID, level, requirement) and exit"
    )
    out = p.add_argument_group("reports")
    out.add_argument("--junit-xml", type=Path, metavar="FILE", help="write a JUnit XML report")
    out.add_argument("--json", type=Path, metavar="FILE", help="write a JSON report with logs")
    out.add_argument(
        "--jobs", type=_positive_int, default=6, metavar="N", help="cases at once (default 6)"
    )
    out.add_argument("--verbose", action="store_true", help="print each failed case's log as well")


def spec_file(name: str) -> str:
    """Where the installed copy of ``spec/NAME`` is (package data ``execstream.spec``)."""
    from importlib.resources import files

    try:
        return str(files("execstream.spec").joinpath(name))
    except ModuleNotFoundError:  # an editable install maps no data-only package: the source
        return str(Path(__file__).resolve().parents[1] / "spec" / name)


def add_conformance_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    protocol, proto = spec_file("PROTOCOL.md"), spec_file("exec.proto")
    p = sub.add_parser(
        "conformance",
        help="check a server against spec/PROTOCOL.md",
        description="Check an Exec server against spec/PROTOCOL.md, one case per clause. "
        "Without --target, start the embedded reference server and check it.  The spec is "
        f"installed with the package: {protocol} (the clauses) and {proto} (the wire "
        "contract).",
    )
    add_arguments(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ._clauses import Level
    from ._suite import select

    if args.ca is not None and not args.tls:
        print("execstream conformance: --ca needs --tls", file=sys.stderr)
        return 2
    if (args.cert is None) != (args.key is None) or (args.cert is not None and not args.tls):
        print("execstream conformance: --cert and --key go together, with --tls", file=sys.stderr)
        return 2
    if args.target is None and (args.driver_command or args.driver):
        print(
            "execstream conformance: a driver needs --target (the engine it drives)",
            file=sys.stderr,
        )
        return 2
    if args.target is None and args.tls:
        print("execstream conformance: --tls needs --target", file=sys.stderr)
        return 2
    if args.driver_command and args.driver:
        print(
            "execstream conformance: give --driver-command or --driver, not both", file=sys.stderr
        )
        return 2
    from ._target import MIN_OUTPUT_LIMIT

    if args.max_output_bytes is not None and 0 < args.max_output_bytes < MIN_OUTPUT_LIMIT:
        print(
            "execstream conformance: the suite needs --max-output-bytes 0 (none) or >= 1 MiB",
            file=sys.stderr,
        )
        return 2
    cases = select(
        include=args.case,
        exclude=args.exclude_case,
        level=Level.MUST if args.level == "must" else None,
    )
    if args.list:
        for case in cases:
            print(f"{case.id:<58} {case.level.value:<6} {case.requirement}")
        print(f"{len(cases)} cases")
        return 0
    if not cases:
        print("execstream conformance: no case selected", file=sys.stderr)
        return 2
    from ._driver import driver_from_options

    try:
        args.driver_object = driver_from_options(args.driver_command, args.driver)
    except ValueError as error:
        print(f"execstream conformance: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_check(args, [c.id for c in cases]))
    except KeyboardInterrupt:  # a second Ctrl-C, while the first one's cleanup ran
        print("execstream conformance: interrupted", file=sys.stderr)
        return 130


def _target_from(args: argparse.Namespace, address: str, **overrides: Any) -> Target:
    from ._target import DEFAULT_OUTPUT_LIMIT, Target

    fields: dict[str, Any] = {
        "address": address,
        "token": args.token or None,
        "tls": args.tls,
        "ca": args.ca,
        "cert": args.cert,
        "key": args.key,
        "retention": args.retention,
        "cleanup_interval": args.cleanup_interval,
        "max_output_bytes": (
            DEFAULT_OUTPUT_LIMIT if args.max_output_bytes is None else args.max_output_bytes
        ),
        "stdin_bytes": args.stdin_bytes,
        "max_clients_per_exec": args.max_clients_per_exec or None,
        "max_execs_per_container": args.max_execs_per_container or None,
        "connect_timeout": args.connect_timeout,
        "driver": args.driver_object,
    }
    fields.update(overrides)
    return Target(**fields)


async def _check(args: argparse.Namespace, case_ids: list[str]) -> int:
    if args.target is not None:
        return await _check_target(args, _target_from(args, args.target), case_ids)
    # The embedded reference server: the one place the suite imports the server.
    from execstream.server import Limits
    from execstream.server.runtime.process._spawn import handle_ignored_signals
    from execstream.server.testing import serve

    handle_ignored_signals()  # its server spawns as fast as `serve` does when started by `&`
    token = args.token or secrets.token_urlsafe(16)
    retention = EMBEDDED_RETENTION if args.retention is None else args.retention
    interval = EMBEDDED_CLEANUP_INTERVAL if args.cleanup_interval is None else args.cleanup_interval
    output_limit = EMBEDDED_OUTPUT_LIMIT if args.max_output_bytes is None else args.max_output_bytes
    limits = Limits(max_output_bytes=output_limit)
    async with serve(
        retention=retention, cleanup_interval=interval, token=token, limits=limits
    ) as server:
        target = _target_from(
            args,
            server.address,
            token=token,
            retention=retention,
            cleanup_interval=interval,
            max_output_bytes=limits.max_output_bytes,
            stdin_bytes=limits.stdin_bytes,
            max_clients_per_exec=limits.max_clients_per_exec,
            max_execs_per_container=limits.max_execs_per_container,
        )
        print(f"embedded reference server on {server.address}", flush=True)
        return await _check_target(args, target, case_ids)


async def _check_target(args: argparse.Namespace, target: Target, case_ids: list[str]) -> int:
    from ._case import REGISTRY
    from ._report import (
        area_lines,
        case_line,
        exit_status,
        failure_lines,
        json_report,
        junit_xml,
        skip_lines,
        summary,
    )
    from ._runner import SuiteInterrupted, run_suite

    cases = [REGISTRY[i] for i in case_ids]
    print(f"checking {target.describe()}: {len(cases)} cases, {args.jobs} at a time", flush=True)

    def show(result: CaseResult) -> None:
        lines = [case_line(result), *failure_lines(result), *skip_lines(result)]
        if args.verbose and result.verdict.value in ("FAIL", "ERROR"):
            lines += [f"       | {line}" for line in result.log]
        print("\n".join(lines), flush=True)

    began = time.monotonic()
    interrupted = False
    try:
        results = await run_suite(target, cases, jobs=args.jobs, on_result=show)
    except SuiteInterrupted as stop:
        results, interrupted = stop.results, True
    seconds = time.monotonic() - began
    for line in area_lines(results):
        print(line)
    print(summary(results), flush=True)
    if args.json is not None:
        args.json.write_text(json_report(results, target, seconds))
    if args.junit_xml is not None:
        args.junit_xml.write_text(junit_xml(results, target, seconds))
    if interrupted:
        print("execstream conformance: interrupted", file=sys.stderr)
        return 130
    return exit_status(results)


def main(argv: list[str] | None = None) -> int:
    """``python -m execstream.conformance`` and tests: the command without ``execstream``."""
    parser = argparse.ArgumentParser(prog="execstream conformance")
    add_arguments(parser)
    return _run(parser.parse_args(argv))
