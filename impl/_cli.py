"""The ``execstream`` command: ``serve``, ``demo`` and the tools built on the packages."""

from __future__ import annotations

import os
import sys


def _quiet_grpc_core() -> None:
    """gRPC's C core logs (``E1130 ... ssl_transport_security.cc``) go to stderr ahead of
    our one-line errors; it reads GRPC_VERBOSITY once, when grpc is imported, so this runs
    before that.  ``--verbose`` (or a GRPC_VERBOSITY of the user's) keeps them."""
    if "GRPC_VERBOSITY" not in os.environ and not {"-v", "--verbose"} & set(sys.argv[1:]):
        os.environ["GRPC_VERBOSITY"] = "NONE"
        import grpc  # noqa: F401  (reads the variable now)

        del os.environ["GRPC_VERBOSITY"]  # not inherited by what we start


_quiet_grpc_core()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import textwrap  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from . import __version__  # noqa: E402
from ._cli_client import (  # noqa: E402
    EXIT_STATUS_HELP,
    add_client_commands,
    add_global_options,
    apply_global_options,
)
from .server import BindError, ExecServer, Limits, ServerSettings, SettingError  # noqa: E402
from .server._server import RUNTIMES  # noqa: E402
from .server.runtime.process._spawn import handle_ignored_signals  # noqa: E402
from .server.runtime.runc import RuntimeUnavailable  # noqa: E402

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_UNITS.update({"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40})


def _bytes(text: str) -> int:
    """A size: ``1048576``, ``64KiB``, ``4MiB``, ``1GiB`` (or ``k``/``M``/``G``, powers of 1000)."""
    number = text.strip().rstrip("bB")
    unit = ""
    while number and number[-1].isalpha():
        unit = number[-1].lower() + unit
        number = number[:-1]
    if unit not in _UNITS or not number.strip().isdigit():
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 1048576, 64MiB)")
    return int(number) * _UNITS[unit]


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
    p.add_argument(
        "--max-execs",
        type=_positive_int,
        default=defaults.max_execs,
        metavar="N",
        help="execs that have not exited, in all (default %(default)s)",
    )
    p.add_argument(
        "--max-execs-per-container",
        type=_positive_int,
        default=defaults.max_execs_per_container,
        metavar="N",
        help="execs that have not exited, per container (default %(default)s)",
    )
    p.add_argument(
        "--max-exited-execs",
        type=_positive_int,
        default=defaults.max_exited_execs,
        metavar="N",
        help="exited execs kept for attach; past it the earliest exits are removed before "
        "their retention ends (default %(default)s)",
    )
    p.add_argument(
        "--max-clients-per-exec",
        type=_positive_int,
        default=defaults.max_clients_per_exec,
        metavar="N",
        help="clients attached to one exec at once (default %(default)s)",
    )
    p.add_argument(
        "--max-subscribers",
        type=_positive_int,
        default=defaults.max_subscribers,
        metavar="N",
        help="lifecycle event subscribers at once (default %(default)s)",
    )
    p.add_argument(
        "--max-output-bytes",
        type=_bytes,
        default=defaults.max_output_bytes,
        metavar="SIZE",
        help="output retained per exec, on disk, for slow and late clients; past it the "
        "oldest output is evicted and clients that miss it are told of a gap "
        "(PROTOCOL 6.5; 0: no limit; default %(default)s = 1GiB)",
    )
    p.add_argument(
        "--memory-cache-bytes",
        "--history-bytes",  # its name before output was retained on disk
        dest="memory_cache_bytes",
        type=_bytes,
        default=defaults.memory_cache_bytes,
        metavar="SIZE",
        help="newest output of each running exec also kept in memory: a cache, clients "
        "behind it read from disk and lose nothing (default %(default)s = 4MiB)",
    )
    p.add_argument(
        "--max-stored-bytes",
        type=_bytes,
        default=defaults.max_stored_bytes,
        metavar="SIZE",
        help="cap on the output stored for all execs together; past it the oldest output "
        "of any exec is evicted first (0: no cap; default %(default)s)",
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
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    tls.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )
    p.add_argument(
        "--no-health",
        dest="health",
        action="store_false",
        help="do not serve grpc.health.v1.Health (default: served)",
    )
    p.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        help="do not serve gRPC server reflection, v1 and v1alpha (default: served)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--keepalive-time",
        type=_positive_float,
        default=ServerSettings().keepalive_time,
        metavar="S",
        help="seconds of silence before the server pings a client (default %(default)s)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=_positive_float,
        default=ServerSettings().keepalive_timeout,
        metavar="S",
        help="seconds a client has to answer a ping before it is dropped (default %(default)s)",
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
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="server log on stderr: DEBUG, INFO, WARNING or ERROR (default %(default)s)",
    )
    p.set_defaults(run=_serve)


async def _serve_async(args: argparse.Namespace) -> int:
    limits = Limits(
        max_execs=args.max_execs,
        max_execs_per_container=args.max_execs_per_container,
        max_exited_execs=args.max_exited_execs,
        max_clients_per_exec=args.max_clients_per_exec,
        max_subscribers=args.max_subscribers,
        max_output_bytes=args.max_output_bytes,
        memory_cache_bytes=args.memory_cache_bytes,
        max_stored_bytes=args.max_stored_bytes,
        stdin_bytes=args.stdin_bytes,
    )
    settings = ServerSettings(
        listen=args.listen,
        token=args.token or None,
        retention=args.retention,
        cleanup_interval=args.cleanup_interval,
        limits=limits,
        state_dir=args.state_dir,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        health=args.health,
        reflection=args.reflection,
        metrics_listen=args.metrics_listen,
        keepalive_time=args.keepalive_time,
        keepalive_timeout=args.keepalive_timeout,
        runtime=args.runtime,
        rootfs=args.rootfs,
    )
    # Signals this process was started ignoring (a shell's `&`, nohup) stay ignored in
    # effect, but execs no longer inherit them, so spawning needs no trampoline.
    handle_ignored_signals()
    server = ExecServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    address = await server.start()
    if server.metrics_address:
        print(f"metrics on http://{server.metrics_address}/metrics", file=sys.stderr, flush=True)
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
    except (SettingError, BindError) as error:
        # ServerSettings field ``x_y`` (or ``limits.x_y``) is the flag ``--x-y``.
        flag = "--" + error.setting.rpartition(".")[2].replace("_", "-")
        print(f"execstream serve: {flag}: {error.problem}", file=sys.stderr)
        return 2 if isinstance(error, SettingError) else 1
    except RuntimeUnavailable as error:  # what to install, or a --rootfs that cannot work
        print(f"execstream serve: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"execstream serve: {error}", file=sys.stderr)
        return 1


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="start a server, run a command, attach two clients",
        description="Start a reference server on a free local port, run one exec, and show "
        "two clients (one joining late) receiving the same output and exit code.",
    )
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    handle_ignored_signals()  # its server spawns as fast as `serve` does when started by `&`
    return asyncio.run(run_demo())


def build_parser() -> argparse.ArgumentParser:
    """The ``execstream`` parser and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="execstream",
        usage="execstream [CONNECTION OPTIONS] COMMAND [OPTIONS] [ARGS]",
        description=textwrap.fill(
            "Stream container exec output over gRPC to any number of clients.  The connection "
            "options (--target, --token, --tls, --ca, --cert, --key, --timeout, --verbose; see "
            "'execstream run --help') go before or after the command."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser)
    parser.add_argument("--version", action="version", version=f"execstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog="execstream")
    _add_serve(sub)
    _add_demo(sub)
    from .conformance._cli import add_conformance_command

    add_conformance_command(sub)
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        apply_global_options(args)
    except ValueError as error:
        parser.error(str(error))
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
