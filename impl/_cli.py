"""The ``execstream`` command: ``serve``, ``demo`` and the tools built on the packages."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ._cli_client import add_client_commands
from .server import RUNTIMES, ExecServer, Limits, ServerSettings

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = Limits()
    p = sub.add_parser(
        "serve",
        help="run the reference server",
        description="Run the reference Exec server: execs are real processes on this machine.",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        help="HOST:PORT (port 0 picks a free one) or unix:PATH (default %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("EXECSTREAM_TOKEN"),
        help="require 'authorization: Bearer TOKEN' on every RPC "
        "(default: $EXECSTREAM_TOKEN; none if unset)",
    )
    p.add_argument(
        "--retention",
        type=float,
        default=300.0,
        help="seconds an exited exec stays attachable (default %(default)s)",
    )
    p.add_argument(
        "--cleanup-interval",
        type=_positive_float,
        default=30.0,
        help="seconds between retention sweeps (default %(default)s)",
    )
    p.add_argument("--max-execs", type=_positive_int, default=defaults.max_execs)
    p.add_argument(
        "--max-execs-per-container", type=_positive_int, default=defaults.max_execs_per_container
    )
    p.add_argument(
        "--max-clients-per-exec", type=_positive_int, default=defaults.max_clients_per_exec
    )
    p.add_argument("--max-subscribers", type=_positive_int, default=defaults.max_subscribers)
    p.add_argument(
        "--history-bytes",
        type=_positive_int,
        default=defaults.history_bytes,
        help="output history kept per exec for replay (default %(default)s)",
    )
    p.add_argument(
        "--stdin-bytes",
        type=_positive_int,
        default=defaults.stdin_bytes,
        help="largest stdin message accepted (default %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where containers and output copies live (default: a fresh temp dir)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="process",
        help="what runs the execs: host processes, or OCI containers with runc "
        "(default %(default)s)",
    )
    p.add_argument(
        "--rootfs",
        type=Path,
        default=None,
        help="with --runtime runc: the root filesystem every container starts from, copied "
        "per container (default: one assembled from busybox-static)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=_serve)


async def _serve_async(args: argparse.Namespace) -> int:
    limits = Limits(
        max_execs=args.max_execs,
        max_execs_per_container=args.max_execs_per_container,
        max_clients_per_exec=args.max_clients_per_exec,
        max_subscribers=args.max_subscribers,
        history_bytes=args.history_bytes,
        stdin_bytes=args.stdin_bytes,
    )
    settings = ServerSettings(
        listen=args.listen,
        token=args.token or None,
        retention=args.retention,
        cleanup_interval=args.cleanup_interval,
        limits=limits,
        state_dir=args.state_dir,
        runtime=args.runtime,
        rootfs=args.rootfs,
    )
    server = ExecServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    address = await server.start()
    print(f"listening on {address}", flush=True)
    try:
        await stop.wait()
        logging.getLogger("execstream.server").info("shutting down")
    finally:
        await server.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_serve_async(args))
    except (OSError, ValueError) as error:
        print(f"execstream serve: {error}", file=sys.stderr)
        return 2


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="start a server, run a command, attach two clients")
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return asyncio.run(run_demo())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="execstream",
        description="Stream container exec output over gRPC to any number of clients.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_demo(sub)
    from .conformance._cli import add_conformance_command

    add_conformance_command(sub)
    add_client_commands(sub)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
