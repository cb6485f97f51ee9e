"""How the suite obtains the execs it checks: a driver.

Most servers create an exec when a client sends ``Start{command}`` (PROTOCOL 3.2), and that is
the default driver: :data:`WIRE`, the suite creates over the wire.  An engine whose execs are
started by the engine itself (the executor registers them, clients only attach) answers such a
``Start`` with ``NOT_FOUND``, which 3.2 allows.  For such a target a driver asks the engine,
by a way of its own, to register and run each exec the suite needs; the suite then attaches
with a ``Start`` without a command, and the cases that are about creation over the wire skip.

Two drivers besides the default, with one contract (the README's "Driving an engine"):

* :class:`CommandDriver` (``--driver-command CMD``) runs ``CMD`` through the shell once per
  exec with ``EXECSTREAM_CONTAINER_ID``, ``EXECSTREAM_EXEC_ID``, ``EXECSTREAM_COMMAND`` (a JSON
  array), ``EXECSTREAM_ENV`` (a JSON object), ``EXECSTREAM_WORKING_DIR`` and
  ``EXECSTREAM_TTY`` (``0``/``1``) in its environment.  It exits 0 once the exec is registered
  (attachable, maybe still pending), non-zero with a message otherwise.
* :class:`CallableDriver` (``--driver module:callable``) awaits
  ``callable(container_id=, exec_id=, command=, env=, working_dir=, tty=)`` in the suite's
  event loop; it returns once the exec is registered and raises otherwise.

A driver that fails is a harness problem (the suite could not obtain the exec), never a
conformance failure of the server: the case is an ERROR with the driver's message.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._case import HarnessError

__all__ = [
    "WIRE",
    "CallableDriver",
    "CommandDriver",
    "Driver",
    "DriverError",
    "ExecRequest",
    "WireDriver",
    "driver_from_options",
]

#: How long a driver may take to register one exec before the case is an ERROR.
DRIVER_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecRequest:
    """One exec the suite needs: what ``Start`` would carry when creating it (3.2)."""

    container_id: str
    exec_id: str
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    tty: bool = False

    def environment(self) -> dict[str, str]:
        """The fields as the ``EXECSTREAM_*`` variables of the command driver."""
        return {
            "EXECSTREAM_CONTAINER_ID": self.container_id,
            "EXECSTREAM_EXEC_ID": self.exec_id,
            "EXECSTREAM_COMMAND": json.dumps(list(self.command)),
            "EXECSTREAM_ENV": json.dumps(dict(self.env)),
            "EXECSTREAM_WORKING_DIR": self.working_dir,
            "EXECSTREAM_TTY": "1" if self.tty else "0",
        }


class DriverError(HarnessError):
    """The driver could not register an exec; the message says what it reported."""


class Driver(Protocol):
    #: How the driver is shown in reports (``wire``, ``command 'CMD'``).
    name: str
    #: True when execs are created by ``Start{command}`` over the wire.
    over_wire: bool

    async def register(self, request: ExecRequest) -> None:
        """Return once the exec is attachable (it may still be pending)."""
        ...


class WireDriver:
    """The default: the suite itself creates each exec with ``Start{command}``."""

    name = "wire"
    over_wire = True

    async def register(self, request: ExecRequest) -> None:
        raise DriverError("the wire driver creates execs with Start{command}, in the session")


#: The default driver.
WIRE = WireDriver()


class CommandDriver:
    """Runs a shell command per exec (``--driver-command``)."""

    over_wire = False

    def __init__(self, command: str, *, timeout: float = DRIVER_TIMEOUT) -> None:
        if not command.strip():
            raise ValueError("the driver command is empty")
        self.command = command
        self.timeout = timeout
        self.name = f"command {command!r}"

    async def register(self, request: ExecRequest) -> None:
        process = await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **request.environment()},
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            raise DriverError(
                f"driver command did not finish within {self.timeout:g} s for "
                f"{request.container_id}/{request.exec_id}"
            ) from None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            said = output.decode(errors="replace").strip().splitlines()
            message = said[-1] if said else "no message"
            raise DriverError(
                f"driver command exited {process.returncode} for "
                f"{request.container_id}/{request.exec_id}: {message}"
            )


RegisterCallable = Callable[..., Awaitable[Any]]


class CallableDriver:
    """Awaits a Python callable per exec (``--driver module:callable``)."""

    over_wire = False

    def __init__(
        self, function: RegisterCallable, *, name: str = "", timeout: float = DRIVER_TIMEOUT
    ) -> None:
        self.function = function
        self.timeout = timeout
        self.name = f"callable {name or getattr(function, '__qualname__', repr(function))}"

    @classmethod
    def load(cls, spec: str) -> CallableDriver:
        """``module:callable`` (``package.module:object.attribute`` works too)."""
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"--driver wants module:callable, got {spec!r}")
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"--driver {spec}: cannot import {module_name!r}: {error}") from None
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ValueError(f"--driver {spec}: {module_name} has no {attribute!r}") from None
        if not callable(target):
            raise ValueError(f"--driver {spec}: {attribute!r} is not callable")
        return cls(target, name=spec)

    async def register(self, request: ExecRequest) -> None:
        try:
            result = self.function(
                container_id=request.container_id,
                exec_id=request.exec_id,
                command=list(request.command),
                env=dict(request.env),
                working_dir=request.working_dir,
                tty=request.tty,
            )
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, self.timeout)
        except TimeoutError:
            raise DriverError(
                f"driver {self.name} did not return within {self.timeout:g} s for "
                f"{request.container_id}/{request.exec_id}"
            ) from None
        except Exception as error:
            raise DriverError(
                f"driver {self.name} failed for {request.container_id}/{request.exec_id}: "
                f"{type(error).__name__}: {error}"
            ) from None


def driver_from_options(command: str | None, spec: str | None) -> Driver:
    """The driver the options name: ``--driver-command``, ``--driver``, or the wire."""
    if command and spec:
        raise ValueError("give --driver-command or --driver, not both")
    if command:
        return CommandDriver(command)
    if spec:
        return CallableDriver.load(spec)
    return WIRE
