"""The client subcommands of ``execstream``: run, attach, status, events, pause, resume, signal.

Each is a thin layer over :class:`execstream.client.AsyncExecClient` run in its own event
loop.  Every failure prints one line, ``execstream: <what>: <why>``, naming the flag or
variable to fix where there is one, and exits non-zero, never with a traceback (unless
``--verbose``).  Exit statuses, as ``docker exec``: ``run`` and ``attach`` exit with the
exec's exit code; 125 when execstream itself failed or output was lost (unless
``--allow-gaps``); 126 when the command is not executable; 127 when it is not found.  The
other commands exit 0, or 1 on failure; a usage error exits 2.

``run`` streams stdout to stdout and stderr to stderr as raw bytes.  It forwards local stdin
only with ``-i`` (as docker); without it the exec reads EOF.  With ``-t`` the exec gets a
pseudo-terminal whose size follows the local terminal (at start and on ``SIGWINCH``); with
``-it`` on a terminal, the local terminal is put in raw mode (always restored) so that keys,
Ctrl-C included, go to the exec, and the detach keys (``--detach-keys``, default
ctrl-p,ctrl-q) leave it running.  Otherwise Ctrl-C sends ``INT`` to the exec (ContainerSignal
with its exec id) and a third Ctrl-C detaches.  Detaching prints one line with the exec id
and the ``execstream attach`` command that rejoins it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import textwrap
import threading
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import (
    DEFAULT_TARGET,
    AsyncExecClient,
    Exec,
    ExecStreamError,
    Exit,
    Gap,
    LifecycleEvent,
    NotFound,
    Output,
    ServerShuttingDown,
    Status,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "CLIENT_COMMANDS",
    "EXIT_STATUS_HELP",
    "DetachKeys",
    "add_client_commands",
    "add_global_options",
    "apply_global_options",
]

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

#: Exit status of ``run``/``attach`` when execstream itself failed, or output was lost
#: (as ``docker run``'s 125).
CLIENT_FAILURE = 125
#: The command exists but cannot be executed; the command was not found (as docker, POSIX).
NOT_EXECUTABLE = 126
NOT_FOUND = 127
INTERRUPTED = 130

EXIT_STATUS_HELP = """\
exit status of run and attach (as docker exec):
  N    the exec's exit code (128+S when ended by signal S)
  0    also after detaching (the exec keeps running)
  125  execstream itself failed (connection, server refusal, bad option), or output
       was lost (chunks the server could no longer keep; --allow-gaps accepts that)
  126  the command cannot be executed (not executable, a directory)
  127  the command was not found
  130  interrupted (Ctrl-C in attach, or before the exec started)
  143  ended by SIGTERM (129: SIGHUP); the terminal is restored, the exec keeps running
other commands exit 0, or 1 on failure; a usage error exits 2"""

CLIENT_COMMANDS = ("run", "attach", "status", "events", "pause", "resume", "signal")


def add_client_commands(sub: _SubParsers) -> None:
    """Register the client subcommands on the ``execstream`` parser."""
    common = _connection_options(argparse.SUPPRESS)
    _add_run(sub, common)
    _add_attach(sub, common)
    _add_status(sub, common)
    _add_events(sub, common)
    for name, verb in (("pause", "Pause (freeze) every process of"), ("resume", "Resume")):
        p = sub.add_parser(
            name,
            parents=[common],
            help=f"{verb.split()[0].lower()} a container",
            description=f"{verb} a container (PROTOCOL 10.1, 10.2); prints the server's answer.",
        )
        p.add_argument("container", metavar="CONTAINER", help="the container id")
        p.set_defaults(run=_command(_control, 1), control=name)
    p = sub.add_parser(
        "signal",
        parents=[common],
        help="send a signal to a container or exec",
        description="Send a signal to every process of a container, or of one exec of it.",
    )
    p.add_argument("container", metavar="CONTAINER", help="the container id")
    p.add_argument("name", metavar="SIGNAL", help="TERM, INT, KILL, HUP, USR1... (SIG optional)")
    p.add_argument("--exec-id", metavar="EXEC", help="only this exec's processes (default: all)")
    p.set_defaults(run=_command(_control, 1), control="signal")


# -- options ------------------------------------------------------------------------------

#: The connection options, accepted before the subcommand as well as after it.
_GLOBAL = ("target", "token", "tls", "ca", "cert", "key", "timeout", "verbose")
#: Which of them the other commands take (``conformance`` has its own of the same meaning).
_GLOBAL_OF = {"conformance": ("target", "token", "tls", "ca", "verbose")}


def _connection_options(default: Any = None) -> argparse.ArgumentParser:
    """The connection options; with ``default=SUPPRESS`` a missing option leaves the value
    given before the subcommand (or the documented default) in place."""

    def given(value: Any) -> Any:
        return argparse.SUPPRESS if default is argparse.SUPPRESS else value

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection (before or after the subcommand)")
    group.add_argument(
        "--target",
        metavar="ADDRESS",
        default=given(None),
        help="server address, HOST:PORT or unix:PATH (default: $EXECSTREAM_TARGET or "
        f"{DEFAULT_TARGET})",
    )
    group.add_argument(
        "--token",
        default=given(None),
        help="token sent as 'authorization: Bearer TOKEN' (default: $EXECSTREAM_TOKEN)",
    )
    group.add_argument(
        "--tls", action="store_true", default=given(False), help="connect with TLS (default: no)"
    )
    group.add_argument(
        "--ca",
        metavar="FILE",
        default=given(None),
        help="PEM file of the CA to trust (implies --tls; default: the system's roots)",
    )
    group.add_argument(
        "--cert",
        metavar="FILE",
        default=given(None),
        help="PEM client certificate, with --key (implies --tls; default: none)",
    )
    group.add_argument(
        "--key",
        metavar="FILE",
        default=given(None),
        help="PEM private key of --cert, for mutual TLS (default: none)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=given(None),
        metavar="SECONDS",
        help="deadline of each unary call (default 30)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=given(False),
        help="show gRPC's own log lines and tracebacks (default: one line per error)",
    )
    return common


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """The connection options before the subcommand, kept apart (``global_*``) so that a
    subcommand's own options of the same name are not overwritten by them."""
    for action in _connection_options()._actions:
        if not action.option_strings:
            continue
        kwargs: dict[str, Any] = {"dest": f"global_{action.dest}", "default": None}
        if isinstance(action, argparse._StoreTrueAction):
            kwargs["action"] = "store_true"
        else:
            kwargs.update(metavar=action.metavar, type=action.type)
        parser.add_argument(*action.option_strings, help=argparse.SUPPRESS, **kwargs)


def apply_global_options(args: argparse.Namespace) -> None:
    """Merge the options given before the subcommand with those after it (which win), then
    fill in the environment's and the documented defaults."""
    takes = _GLOBAL if args.command in CLIENT_COMMANDS else _GLOBAL_OF.get(args.command, ())
    for name in _GLOBAL:
        before = getattr(args, f"global_{name}", None)
        if before in (None, False):
            continue
        if name not in takes:
            if hasattr(args, name):
                raise _UsageError(f"{args.command}'s --{name} goes after '{args.command}'")
            raise _UsageError(f"--{name} is not an option of {args.command}")
        if getattr(args, name, None) in (None, False):  # given after the command: it wins
            conformance_path = name == "ca" and args.command == "conformance"
            setattr(args, name, Path(before) if conformance_path else before)
    if args.command in CLIENT_COMMANDS:
        given = vars(args)
        args.target = given.get("target") or os.environ.get("EXECSTREAM_TARGET") or DEFAULT_TARGET
        args.token = given.get("token") or os.environ.get("EXECSTREAM_TOKEN") or None
        args.timeout = 30.0 if given.get("timeout") is None else given["timeout"]
        for name in ("tls", "verbose"):
            setattr(args, name, bool(given.get(name)))
        for name in ("ca", "cert", "key"):
            setattr(args, name, given.get(name))


class _UsageError(ValueError):
    """A bad combination of options: exit 2, as argparse does."""


def _connect(args: argparse.Namespace) -> AsyncExecClient:
    for flag in ("ca", "cert", "key"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise _OptionError(f"--{flag} {path}: no such file")
        if path is not None and not os.access(path, os.R_OK):
            raise _OptionError(f"--{flag} {path}: not readable")
    if (args.cert is None) != (args.key is None):
        raise _OptionError("--cert and --key go together")
    return AsyncExecClient(
        args.target,
        token=args.token or None,
        tls=args.tls,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        timeout=args.timeout,
        client_id="execstream-cli",
    )


class _OptionError(Exception):
    """An option's value is unusable; the message names the option."""


class _Detached(Exception):
    """The user detached (detach keys, third Ctrl-C): the exec keeps running."""


class _Terminated(Exception):
    """We were sent SIGTERM or SIGHUP while the terminal was raw: restored, then leave."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _explain(error: ExecStreamError, args: argparse.Namespace) -> str:
    """The one line for a failure, with the flag or variable that fixes it where known."""
    text = str(error)
    if isinstance(error, Unauthenticated):
        return f"{text} (give the server's token with --token or $EXECSTREAM_TOKEN)"
    if isinstance(error, Unavailable) and not isinstance(error, ServerShuttingDown):
        if "handshake" in text.lower() or "ssl" in text.lower():
            tls = "with --tls/--ca" if args.tls or args.ca else "without --tls"
            return (
                f"unavailable: TLS handshake with {args.target} failed ({tls}); check "
                "--tls, --ca, --cert/--key"
            )
        return (
            f"{text} (is a server listening on {args.target}? set --target or $EXECSTREAM_TARGET)"
        )
    return text


#: PROTOCOL 3.2 refusals of the command, by the reference server's wording (docker's codes).
_COMMAND_NOT_FOUND = re.compile(r"\bcommand '.*' (not found|does not exist)")
_COMMAND_NOT_EXECUTABLE = re.compile(r"\bcommand '.*' (.*\) )?(is not executable|is a directory)")


def _failure_status(error: ExecStreamError, failure: int) -> int:
    if failure == CLIENT_FAILURE:
        text = str(error)
        if _COMMAND_NOT_FOUND.search(text):
            return NOT_FOUND
        if _COMMAND_NOT_EXECUTABLE.search(text):
            return NOT_EXECUTABLE
    return failure


def _command(
    body: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], failure: int
) -> Callable[[argparse.Namespace], int]:
    """Run ``body``; every failure becomes one line on stderr and the ``failure`` status."""

    def run(args: argparse.Namespace) -> int:
        try:
            with asyncio.Runner() as runner:
                if not args.verbose:
                    # grpc.aio can report its own teardown as "Exception in callback
                    # PollerCompletionQueue..."; that is noise to a user.
                    runner.get_loop().set_exception_handler(lambda _loop, _context: None)
                return runner.run(body(args))
        except ExecStreamError as error:
            _complain(_explain(error, args))
            return _failure_status(error, failure)
        except _Detached:
            _left_running(args, "detached")
            return 0
        except _Terminated as ended:
            _left_running(args, f"ended by {signal.Signals(ended.signum).name}")
            return 128 + ended.signum
        except KeyboardInterrupt:
            _left_running(args, "interrupted")
            return INTERRUPTED
        except BrokenPipeError:
            # Our reader went away (``execstream run ... | head``): stop quietly.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except _OptionError as error:
            _complain(str(error))
        except (OSError, ValueError) as error:
            _complain(str(error))
        except Exception as error:  # never a traceback without --verbose
            if args.verbose:
                traceback.print_exc()
            _complain(f"internal error: {type(error).__name__}: {error} (--verbose shows more)")
        return failure

    return run


def _complain(message: str) -> None:
    print(f"execstream: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _left_running(args: argparse.Namespace, how: str) -> None:
    """One line saying which exec was left and how to rejoin it (run and attach)."""
    started = getattr(args, "started", None)
    if started is None:
        requested = getattr(args, "requested", None)
        if requested is not None:  # interrupted before the server answered
            container, exec_id, _ = requested
            _complain(
                f"{how} before exec {exec_id} in container {container} was confirmed; see: "
                f"execstream status {container} {exec_id}"
            )
        return
    container, exec_id, tty = started
    flags = "-it " if tty else ""
    _complain(
        f"{how}: exec {exec_id} in container {container} keeps running; rejoin with: "
        f"execstream attach {flags}{container} {exec_id}"
    )


# -- run and attach -----------------------------------------------------------------------


@dataclasses.dataclass
class DetachKeys:
    """The key sequence that leaves an interactive session, as docker's ``--detach-keys``.

    ``feed`` takes what the user typed and returns what to send to the exec and whether the
    sequence was completed.  A partial match is held back until the next key shows whether
    it was the sequence (then nothing of it is sent) or not (then it is sent, as typed).
    """

    keys: bytes
    _held: int = 0

    @classmethod
    def parse(cls, text: str) -> DetachKeys:
        r"""``ctrl-p,ctrl-q`` (``ctrl-`` with a-z, @, [, \, ], ^ or _), or single characters;
        empty: no detach keys."""
        keys = bytearray()
        for item in filter(None, text.split(",")):
            if len(item) == 1:
                keys.append(ord(item))
            elif item.lower().startswith("ctrl-") and len(item) == 6:
                char = item[5].upper()
                if not ("A" <= char <= "Z" or char in "@[\\]^_"):
                    raise _OptionError(f"--detach-keys {text!r}: ctrl-{item[5]} is not a key")
                keys.append(ord(char) & 0x1F)
            else:
                raise _OptionError(
                    f"--detach-keys {text!r}: {item!r} is neither a character nor ctrl-KEY"
                )
        return cls(bytes(keys))

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if not self.keys:
            return data, False
        out = bytearray()
        for byte in data:
            if byte == self.keys[self._held]:
                self._held += 1
                if self._held == len(self.keys):
                    self._held = 0
                    return bytes(out), True
                continue
            out += self.keys[: self._held]
            self._held = 0
            if byte == self.keys[0]:
                self._held = 1
            else:
                out.append(byte)
        return bytes(out), False


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _session_options(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help=f"forward local stdin to the exec (default: {verb})",
    )
    p.add_argument(
        "--detach-keys",
        default="ctrl-p,ctrl-q",
        metavar="KEYS",
        help="with -it on a terminal, the keys that leave the exec running: ctrl-KEY or "
        "characters, comma-separated, '' for none (default %(default)s)",
    )
    p.add_argument(
        "--allow-gaps",
        action="store_true",
        help="accept lost output: warn and exit with the exec's code (default: exit 125)",
    )


def _add_run(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a command in a container and stream its output",
        usage="execstream run [OPTIONS] [CONTAINER] -- CMD [ARG...]",
        description=textwrap.fill(
            "Create an exec in CONTAINER running CMD, stream its stdout and stderr, and exit "
            "with its exit code.  Example: execstream run demo -- sh -c 'echo hi; exit 3'"
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-t", "--tty", action="store_true", help="give the exec a pseudo-terminal (default: no)"
    )
    _session_options(p, "the exec reads EOF")
    p.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="start the exec, print its id and return (default: follow it to its exit)",
    )
    p.add_argument(
        "--container",
        dest="container_option",
        metavar="CONTAINER",
        help="the container, as the CONTAINER argument (kept for old scripts)",
    )
    p.add_argument(
        "--exec-id", metavar="EXEC", help="the exec's id (default: generated, run-XXXXXXXXXXXX)"
    )
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (KEY alone: its local value); repeatable",
    )
    p.add_argument(
        "-w",
        "--workdir",
        default="",
        metavar="DIR",
        help="working directory (default: the container's)",
    )
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="[CONTAINER] -- CMD ...",
        help="the container (default 'default') and, after --, the command and its arguments",
    )
    p.set_defaults(run=_command(_run, CLIENT_FAILURE))


def _add_attach(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "attach",
        parents=[common],
        help="follow an existing exec's output; -it rejoins a terminal",
        description=textwrap.fill(
            "Replay an exec's retained output, follow it live, exit with its code.  With -i, "
            "forward local stdin; with -t (the exec was started with -t), put the local "
            "terminal in raw mode and make the exec's terminal follow its size."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("container", metavar="CONTAINER", help="the container id")
    p.add_argument("exec_id", metavar="EXEC", help="the exec id")
    p.add_argument(
        "-t", "--tty", action="store_true", help="the exec has a terminal: use it raw (default: no)"
    )
    _session_options(p, "not forwarded")
    p.add_argument(
        "--from-sequence",
        type=_non_negative,
        default=0,
        metavar="N",
        help="replay from chunk N (default 0: all retained output)",
    )
    p.set_defaults(run=_command(_attach, CLIENT_FAILURE))


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise _OptionError(f"-e {key}: not set here; give KEY=VALUE")
            value = os.environ[key]
        env[key] = value
    return env


def _split_command(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``[CONTAINER] -- CMD ...``; without ``--`` everything is the command."""
    words = list(args.argv)
    container = args.container_option
    if "--" in words:
        cut = words.index("--")
        before, words = words[:cut], words[cut + 1 :]
        if len(before) > 1 or (before and before[0].startswith("-")):
            raise _OptionError(
                f"run: {' '.join(before)!r} before --: give options first, then at most "
                "CONTAINER, then -- CMD"
            )
        if before:
            if container is not None and container != before[0]:
                raise _OptionError("run: two containers given (CONTAINER and --container)")
            container = before[0]
    if not words:
        raise _OptionError("run: give the command after --, e.g. execstream run -- ls -l")
    return container or "default", words


async def _run(args: argparse.Namespace) -> int:
    container, argv = _split_command(args)
    env = _parse_env(args.env)
    keys = DetachKeys.parse(args.detach_keys)
    if args.detach and args.interactive:
        raise _OptionError("run: -d leaves at once, so it cannot forward stdin (-i)")
    exec_id = args.exec_id or f"run-{uuid.uuid4().hex[:12]}"
    stdin_is_tty = _isatty(0)
    raw = args.tty and args.interactive and stdin_is_tty
    async with _connect(args) as client:
        args.requested = (container, exec_id, args.tty)
        session = await client.run(
            container,
            exec_id,
            argv,
            env=env,
            working_dir=args.workdir,
            tty=args.tty,
            terminal_size=_local_size() if args.tty else None,  # PROTOCOL 7.3: from the start
            # As docker -d: stdin is empty.  Closed by the start itself (PROTOCOL 7.5): an
            # EOF sent after it could be dropped with the session this command leaves at once.
            close_stdin=args.detach and not args.tty,
        )
        args.started = (container, exec_id, args.tty)
        async with session:
            if args.detach:
                if not args.tty:
                    # For a server without 7.5 (it ignores close_stdin): the EOF as a message
                    # too, which may be lost as before; a second EOF changes nothing (7.1).
                    with contextlib.suppress(Unavailable):
                        await session.close_stdin()
                print(exec_id, flush=True)
                return 0
            return await _follow(
                client,
                session,
                tty=args.tty,
                forward_stdin=args.interactive,
                raw=raw,
                detach_keys=keys,
                forward_interrupt=not raw,  # raw: Ctrl-C reaches the exec as a key
                close_stdin=not args.tty,  # a terminal's input is left open, as docker does
                allow_gaps=args.allow_gaps,
            )


async def _attach(args: argparse.Namespace) -> int:
    keys = DetachKeys.parse(args.detach_keys)
    raw = args.tty and args.interactive and _isatty(0)
    async with _connect(args) as client:
        session = await client.attach(
            args.container, args.exec_id, from_sequence=args.from_sequence
        )
        async with session:
            if args.tty and session.terminal_size is None:
                raise _OptionError(
                    f"attach -t: exec {args.exec_id} has no terminal (it was run without -t); "
                    "attach without -t"
                )
            args.started = (args.container, args.exec_id, args.tty)
            if args.tty:
                size = _local_size()
                if size is not None and size != session.terminal_size:
                    await session.resize(*size)  # the terminal follows the rejoining one
            return await _follow(
                client,
                session,
                tty=args.tty,
                forward_stdin=args.interactive,
                raw=raw,
                detach_keys=keys,
                # Without a terminal, Ctrl-C leaves: the exec is not ours to interrupt.
                forward_interrupt=False,
                allow_gaps=args.allow_gaps,
            )


async def _follow(
    client: AsyncExecClient,
    session: Exec,
    *,
    tty: bool,
    forward_stdin: bool,
    raw: bool,
    detach_keys: DetachKeys,
    forward_interrupt: bool,
    allow_gaps: bool,
    close_stdin: bool = False,
) -> int:
    """Copy the exec's output to ours until it exits, forwarding input, size and Ctrl-C."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    background: set[asyncio.Task[None]] = set()
    handled: list[signal.Signals] = []
    detached = False
    ended_by = 0

    def later(coroutine: Awaitable[object], what: str) -> None:
        async def guarded() -> None:
            try:
                await coroutine
            except ExecStreamError as error:
                _complain(f"{what}: {error}")

        task = loop.create_task(guarded())
        background.add(task)
        task.add_done_callback(background.discard)

    def on_winch() -> None:
        size = _local_size()
        if size is not None:
            later(session.resize(*size), "resize")

    def detach() -> None:
        nonlocal detached
        detached = True
        if main is not None:
            main.cancel()

    def terminate(signum: int) -> None:
        nonlocal ended_by
        ended_by = signum
        if main is not None:
            main.cancel()

    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts >= 3:
            detach()  # the third Ctrl-C detaches
            return
        later(client.signal(session.container_id, "INT", session.exec_id), "signal INT")

    code = 0
    lost = 0
    with _raw_terminal(0 if raw else None):
        try:
            if tty:
                # The initial size went with Start; changes follow the local terminal.
                loop.add_signal_handler(signal.SIGWINCH, on_winch)
                handled.append(signal.SIGWINCH)
            if forward_interrupt:
                loop.add_signal_handler(signal.SIGINT, on_interrupt)
                handled.append(signal.SIGINT)
            if raw:
                # The terminal is restored however we are ended.
                for signum in (signal.SIGTERM, signal.SIGHUP):
                    loop.add_signal_handler(signum, terminate, signum)
                    handled.append(signum)
            if forward_stdin:
                keys = detach_keys if raw else DetachKeys(b"")
                _forward_stdin(loop, session, keys, detach)
            elif close_stdin:
                # Like `docker exec` without -i: the process reads EOF, it does not wait.
                with contextlib.suppress(Unavailable):
                    await session.close_stdin()
            async for event in session:
                if isinstance(event, Output):
                    out = sys.stdout if event.stream == "stdout" else sys.stderr
                    out.buffer.write(event.data)
                    out.buffer.flush()
                elif isinstance(event, Gap):
                    lost += event.missed  # PROTOCOL 6.4
                elif isinstance(event, Exit):
                    code = event.code
        except asyncio.CancelledError:
            if ended_by:
                raise _Terminated(ended_by) from None
            if detached:
                raise _Detached from None
            raise
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            for task in list(background):
                task.cancel()
    code = code if 0 <= code <= 255 else 255
    if lost:
        chunks = f"{lost} chunk{'s' if lost != 1 else ''} of output"
        if allow_gaps:
            _complain(f"warning: {chunks} were lost (the server no longer had them)")
            return code
        _complain(
            f"{chunks} were lost (the server no longer had them); the exec exited {code}, "
            f"exit status {CLIENT_FAILURE} (--allow-gaps accepts lost output)"
        )
        return CLIENT_FAILURE
    return code


def _forward_stdin(
    loop: asyncio.AbstractEventLoop,
    session: Exec,
    keys: DetachKeys,
    detach: Callable[[], None],
) -> None:
    """Copy our stdin to the exec from a daemon thread: a blocking read (a file, a pipe or a
    terminal alike) cannot hold up the loop, nor the exit when the exec ends first."""

    async def send(data: bytes) -> ExecStreamError | None:
        try:
            if data:
                await session.write_stdin(data)
            else:
                await session.close_stdin()
        except ExecStreamError as error:
            return error
        return None

    def pump() -> None:
        while True:
            try:
                data = os.read(0, 1 << 16)
            except OSError:
                data = b""
            typed, leave = keys.feed(data) if data else (data, False)
            try:
                if typed or not data:
                    failure = asyncio.run_coroutine_threadsafe(send(typed), loop).result()
                else:
                    failure = None
                if leave:
                    loop.call_soon_threadsafe(detach)
                    return
            except BaseException:  # the loop is gone: the exec already exited
                return
            if failure is not None:
                if session.exit_code is None:
                    _complain(f"stdin: {failure}")
                return
            if not data:
                return

    threading.Thread(target=pump, name="execstream-stdin", daemon=True).start()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _local_size() -> tuple[int, int] | None:
    """(columns, rows) of our terminal, from stdout, stdin or stderr."""
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    return None


@contextlib.contextmanager
def _raw_terminal(fd: int | None) -> Iterator[None]:
    """Put the terminal ``fd`` in raw mode and always restore it."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- status and events --------------------------------------------------------------------


def _add_status(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "status",
        parents=[common],
        help="show a container's or exec's status",
        description="Show the state of a container and a table of its execs (state, exit "
        "code, times), or of one exec.",
    )
    p.add_argument("container", metavar="CONTAINER", help="the container id")
    p.add_argument("exec_id", nargs="?", metavar="EXEC", help="one exec (default: the container)")
    p.add_argument("--resources", action="store_true", help="include resource usage (default: no)")
    p.add_argument(
        "--json", action="store_true", help="print the status as JSON (default: a table)"
    )
    p.set_defaults(run=_command(_status, 1))


def _add_events(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "events",
        parents=[common],
        help="follow lifecycle events, one line each",
        description="Print lifecycle events as they happen (Ctrl-C to stop).",
    )
    p.add_argument("container", nargs="?", metavar="CONTAINER", help="only this container's events")
    p.add_argument("--exec-id", metavar="EXEC", help="only this exec's events (needs CONTAINER)")
    p.add_argument(
        "--from-sequence",
        type=_non_negative,
        default=None,
        metavar="N",
        help="first replay the retained events from N (0: the oldest; default: only new ones)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (default: text)")
    p.set_defaults(run=_command(_events, 1))


def _time(ns: int | None) -> str:
    if not ns:
        return "-"
    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _status_rows(status: Status) -> list[tuple[str, str]]:
    rows = [("container", status.container_id)]
    if status.exec_id is not None:
        rows.append(("exec", status.exec_id))
    rows += [
        ("state", status.state),
        ("exit code", "-" if status.exit_code is None else str(status.exit_code)),
        ("started", _time(status.started_at)),
        ("finished", _time(status.finished_at)),
    ]
    if status.exec_id is None:
        rows.append(("execs", str(len(status.exec_ids))))
    usage = status.resource_usage
    if usage is not None:
        limit = "no limit" if usage.memory_limit is None else _bytes(usage.memory_limit)
        rows += [
            ("cpu", f"{usage.cpu_percent:.1f}%"),
            ("memory", f"{_bytes(usage.memory_bytes)} ({limit})"),
            ("io", f"read {_bytes(usage.io_read_bytes)}, write {_bytes(usage.io_write_bytes)}"),
        ]
    return rows


async def _exec_statuses(client: AsyncExecClient, status: Status) -> list[Status | None]:
    """The status of each exec of a container (None: removed meanwhile), a few at a time."""
    gate = asyncio.Semaphore(16)

    async def one(exec_id: str) -> Status | None:
        async with gate:
            try:
                return await client.status(status.container_id, exec_id)
            except NotFound:
                return None

    return list(await asyncio.gather(*(one(e) for e in status.exec_ids)))


def _exec_table(statuses: Sequence[Status | None], exec_ids: Sequence[str]) -> list[str]:
    rows = [("EXEC", "STATE", "EXIT", "STARTED", "FINISHED")]
    for exec_id, status in zip(exec_ids, statuses, strict=True):
        if status is None:
            rows.append((exec_id, "removed", "-", "-", "-"))
            continue
        code = "-" if status.exit_code is None else str(status.exit_code)
        rows.append(
            (exec_id, status.state, code, _time(status.started_at), _time(status.finished_at))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


async def _status(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        status = await client.status(args.container, args.exec_id, resources=args.resources)
        execs = await _exec_statuses(client, status) if args.exec_id is None else []
    if args.json:
        print(json.dumps(dataclasses.asdict(status), indent=2))
        return 0
    rows = _status_rows(status)
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.upper():<{width}}  {value}" for name, value in rows]
    if execs:
        lines += ["", *_exec_table(execs, status.exec_ids)]
    print("\n".join(lines))
    return 0


def _event_line(event: LifecycleEvent) -> str:
    subject = event.container_id + (f"/{event.exec_id}" if event.exec_id else "")
    parts = [_time(event.timestamp), f"#{event.sequence}", subject, event.event_type, event.status]
    if event.exit_code is not None:
        parts.append(f"exit_code={event.exit_code}")
    if event.message:
        parts.append(json.dumps(event.message))
    if event.is_replay:
        parts.append("(replay)")
    if event.gap_before:
        parts.append(f"({event.gap_before} events missed before this one)")
    return " ".join(parts)


async def _events(args: argparse.Namespace) -> int:
    if args.exec_id and not args.container:
        raise ValueError("events: --exec-id needs CONTAINER")
    async with (
        _connect(args) as client,
        client.events(args.container, args.exec_id, from_sequence=args.from_sequence) as stream,
    ):
        async for event in stream:
            line = json.dumps(dataclasses.asdict(event)) if args.json else _event_line(event)
            print(line, flush=True)
    return 0


# -- control ------------------------------------------------------------------------------


async def _control(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        if args.control == "pause":
            message = await client.pause(args.container)
        elif args.control == "resume":
            message = await client.resume(args.container)
        else:
            message = await client.signal(args.container, args.name, args.exec_id)
    if message:
        print(message)
    return 0
