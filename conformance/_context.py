"""What a case works with: its own channel, fresh IDs, its execs, unary calls, and cleanup.

Every case runs in a :class:`CaseContext`.  It opens its own channel to the target (so a case
that breaks a connection on purpose harms no other), names its containers and execs with fresh
unique IDs (so cases share a target and run concurrently), and at the end cancels every stream
it opened and kills every exec it left running — also when the case failed or timed out.
The streams it opens are recorded (``_session_client``, ``_subscription``); every request the
case sends and every stream's outcome go to the case's log, which the JSON report keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from execstream import wire

from ._case import Case, Failure, Skip
from ._driver import ExecRequest
from ._recording import OK, WITHIN, Outcome, brief, expect_code
from ._session_client import SessionClient
from ._subscription import Subscription
from ._target import Target

__all__ = ["CaseContext", "gather_all"]

_T = TypeVar("_T")


class CaseContext:
    """The case's view of the target; ``async with`` opens and cleans up."""

    def __init__(self, target: Target, case: Case) -> None:
        self.target = target
        self.case = case
        self.lines: list[str] = []
        self._began = time.monotonic()
        self._channels: list[grpc.aio.Channel] = []
        self._sessions: list[SessionClient] = []
        self._subscriptions: list[Subscription] = []
        self._created: list[tuple[str, str]] = []
        self._paused: set[str] = set()
        self._labels = 0
        #: RPCs the target answered with UNIMPLEMENTED during the case, with the details.
        self.unimplemented: dict[str, str] = {}
        self.channel = self.new_channel()
        self.stub = wire.ExecStub(self.channel)

    async def __aenter__(self) -> CaseContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    def log(self, line: str) -> None:
        self.lines.append(f"{time.monotonic() - self._began:7.3f} {line}")

    def note_status(self, rpc: str, code: grpc.StatusCode, details: str) -> None:
        """Every call's end passes here: an UNIMPLEMENTED RPC is remembered, so that the
        runner fails the case when it checks that RPC and skips it when it only uses it."""
        if code is grpc.StatusCode.UNIMPLEMENTED:
            self.unimplemented.setdefault(rpc, details)

    @contextlib.contextmanager
    def calling(self, rpc: str) -> Iterator[None]:
        """Around a raw call of ``rpc`` (not through the helpers below): its status is noted."""
        try:
            yield
        except grpc.aio.AioRpcError as error:
            self.note_status(rpc, error.code(), error.details() or "")
            raise

    @property
    def over_wire(self) -> bool:
        """Whether execs are created by ``Start{command}`` (else the target's driver)."""
        return self.target.driver.over_wire

    # -- names --------------------------------------------------------------------------

    def container_id(self) -> str:
        """A fresh container ID, unique on the target (``cf-CLAUSE-RANDOM``)."""
        return f"cf-{self.case.clause}-{uuid.uuid4().hex[:12]}"

    @staticmethod
    def exec_id(stem: str = "x") -> str:
        return f"{stem}-{uuid.uuid4().hex[:8]}"

    def _label(self, stem: str) -> str:
        self._labels += 1
        return f"{stem}#{self._labels}"

    # -- channels and streams -----------------------------------------------------------

    def new_channel(self) -> grpc.aio.Channel:
        channel = self.target.channel()
        self._channels.append(channel)
        return channel

    def new_stub(self) -> tuple[wire.ExecStub, grpc.aio.Channel]:
        channel = self.new_channel()
        return wire.ExecStub(channel), channel

    @staticmethod
    def start_message(
        container_id: str, exec_id: str, command: Sequence[str] = (), **fields: Any
    ) -> wire.Start:
        return wire.Start(
            container_id=container_id, exec_id=exec_id, command=list(command), **fields
        )

    async def session(
        self,
        start: wire.Start | None,
        *,
        stub: wire.ExecStub | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        deadline: float | None = None,
        read: bool = True,
        label: str = "client",
        settle: float = 0.0,
    ) -> SessionClient:
        """Open a Session, send ``start`` (unless None) and read in the background.

        ``deadline`` is the call's gRPC deadline in seconds (default: the case's bound).
        ``settle``: first wait up to that many seconds for the server to end the call, and
        send ``start`` only if it has not: a server reads ``start`` first, so one that ends
        the call before has refused it, and its status then races no write of ours."""
        if start is not None and start.command and not self.over_wire:
            raise Skip(
                "creates an exec over the wire (Start with a command); the target's execs "
                f"come from the driver {self.target.driver.name}"
            )
        call = (stub or self.stub).Session(
            None,
            metadata=self.target.metadata if metadata is None else tuple(metadata),
            timeout=deadline if deadline is not None else self.case.timeout + 30,
        )
        client = SessionClient(self, call, self._label(label), start)
        self._sessions.append(client)
        if settle > 0 and start is not None:
            client.read_in_background()
            with contextlib.suppress(Failure):  # still open after ``settle``
                await client.finished(within=settle)
            if client.done:
                return client
        if start is not None:
            if start.command:
                self._created.append((start.container_id, start.exec_id))
            what = f"{start.container_id}/{start.exec_id}"
            detail = f" {list(start.command)!r}" if start.command else " (attach)"
            if start.replay_from_sequence:
                detail += f" replay_from_sequence {start.replay_from_sequence}"
            if start.tty:
                detail += " tty"
            await client.send(wire.SessionRequest(start=start), what + detail)
        if read:
            client.read_in_background()
        return client

    async def one_shot(
        self,
        start: wire.Start,
        *,
        metadata: Sequence[tuple[str, str]] | None = None,
        label: str = "client",
    ) -> SessionClient:
        """Send ``start``, half-close, and wait for the end.  For a request the server may
        refuse before reading it (a missing token): when the refusal raced the send and the
        status was lost (:attr:`SessionClient.status_lost`), try again, giving the refusal
        longer each time to come before ``start`` is sent (on a loaded machine the race can
        be lost time after time)."""
        settle = 0.0
        for attempt in range(1, 6):
            client = await self.session(start, metadata=metadata, label=label, settle=settle)
            if not client.done:
                await client.half_close()
            await client.finished()
            if not client.status_lost:
                break
            settle = 0.25 * attempt
            self.log(
                f"   {client.label}: status lost to a send race, trying again; start only "
                f"if the call is still open after {settle:g} s"
            )
        return client

    async def create(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        half_close: bool = False,
        read: bool = True,
        label: str = "creator",
        **fields: Any,
    ) -> SessionClient:
        """Create an exec and open its first client, which stays open (for stdin) unless
        ``half_close``.  Over the wire that is one ``Start{command}``; with a driver, the
        driver registers the exec and the client attaches (from sequence 1, so it sees every
        chunk as the creator would)."""
        if self.over_wire:
            start = self.start_message(container_id, exec_id, command, **fields)
        else:
            start = await self._register(container_id, exec_id, command, **fields)
        client = await self.session(start, read=read, label=label)
        if half_close:
            await client.half_close()
        return client

    async def _register(
        self, container_id: str, exec_id: str, command: Sequence[str], **fields: Any
    ) -> wire.Start:
        """Have the driver register the exec; the ``Start`` that attaches to it."""
        env = fields.pop("env", None) or {}
        working_dir = fields.pop("working_dir", "") or ""
        tty = bool(fields.pop("tty", False))
        wire_only = sorted(set(fields) - {"session_id", "client_id"})
        if wire_only:
            raise Skip(
                f"sets {', '.join(wire_only)} at create, which only Start{{command}} carries; "
                f"the target's execs come from the driver {self.target.driver.name}"
            )
        request = ExecRequest(
            container_id=container_id,
            exec_id=exec_id,
            command=tuple(command),
            env=dict(env),
            working_dir=working_dir,
            tty=tty,
        )
        self.log(f"-> driver: register {container_id}/{exec_id} {list(command)!r}")
        self._created.append((container_id, exec_id))
        await self.target.driver.register(request)
        return self.start_message(container_id, exec_id, **fields)

    async def run(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        within: float = WITHIN,
        **fields: Any,
    ) -> SessionClient:
        """Create an exec, half-close, and wait for the stream to end (any status)."""
        client = await self.create(
            container_id, exec_id, command, half_close=True, label="run", **fields
        )
        return await client.finished(within)

    async def attach(
        self,
        container_id: str,
        exec_id: str,
        *,
        replay_from: int = 0,
        half_close: bool = True,
        stub: wire.ExecStub | None = None,
        read: bool = True,
        deadline: float | None = None,
        label: str = "attach",
    ) -> SessionClient:
        start = self.start_message(container_id, exec_id, replay_from_sequence=replay_from)
        client = await self.session(start, stub=stub, read=read, deadline=deadline, label=label)
        if half_close:
            await client.half_close()
        return client

    async def subscribe(
        self,
        container_id: str = "",
        exec_id: str = "",
        *,
        replay_from: int | None = None,
        label: str = "subscriber",
        read: bool = True,
    ) -> Subscription:
        request = wire.ContainerLifecycleRequest(
            container_id=container_id, exec_id=exec_id, replay_from_sequence=replay_from
        )
        self.log(
            f"-> subscribe container {container_id!r} exec {exec_id!r} replay_from {replay_from}"
        )
        call = self.stub.ContainerLifecycle(
            request, metadata=self.target.metadata, timeout=self.case.timeout + 30
        )
        subscription = Subscription(self, call, self._label(label))
        self._subscriptions.append(subscription)
        await subscription.open()
        if read:
            subscription.read_in_background()
        return subscription

    # -- unary calls --------------------------------------------------------------------

    async def outcome(self, what: str, call: Awaitable[Any], within: float = WITHIN) -> Outcome:
        """Await a unary call; its status is recorded, not raised."""
        try:
            response = await asyncio.wait_for(call, within)
            result = Outcome(OK, "", response)
        except grpc.aio.AioRpcError as error:
            result = Outcome(error.code(), error.details() or "")
        except TimeoutError:
            raise Failure(f"{what} to answer within {within:g} s", "no answer") from None
        self.log(f"-> {what}: {result}")
        self.note_status(what.split(" ", 1)[0], result.code, result.details)
        return result

    async def status_outcome(
        self, container_id: str, exec_id: str = "", *, usage: bool = False
    ) -> Outcome:
        request = wire.ContainerStatusRequest(
            container_id=container_id, exec_id=exec_id, include_resource_usage=usage
        )
        return await self.outcome(
            f"ContainerStatus {container_id}/{exec_id or '-'}{' usage' if usage else ''}",
            self.stub.ContainerStatus(request, metadata=self.target.metadata, timeout=WITHIN),
        )

    async def status(
        self, container_id: str, exec_id: str = "", *, usage: bool = False
    ) -> wire.ContainerStatusResponse:
        """ContainerStatus that must succeed."""
        result = await self.status_outcome(container_id, exec_id, usage=usage)
        expect_code(result, OK, f"ContainerStatus of {container_id}/{exec_id or '-'}")
        response: wire.ContainerStatusResponse = result.response
        return response

    async def status_if_implemented(
        self, container_id: str, exec_id: str = ""
    ) -> wire.ContainerStatusResponse | None:
        """ContainerStatus as a helper of a case about another RPC: ``None`` when the target
        does not implement it (the case then checks what Session alone shows)."""
        result = await self.status_outcome(container_id, exec_id)
        if result.code is grpc.StatusCode.UNIMPLEMENTED:
            self.unimplemented.pop("ContainerStatus", None)
            self.log("   ContainerStatus is not implemented: that check is left out")
            return None
        expect_code(result, OK, f"ContainerStatus of {container_id}/{exec_id or '-'}")
        response: wire.ContainerStatusResponse = result.response
        return response

    async def pause(self, container_id: str) -> Outcome:
        result = await self.outcome(
            f"ContainerPause {container_id}",
            self.stub.ContainerPause(
                wire.ContainerControlRequest(container_id=container_id),
                metadata=self.target.metadata,
                timeout=WITHIN,
            ),
        )
        if result.code is OK:
            self._paused.add(container_id)
        return result

    async def resume(self, container_id: str) -> Outcome:
        result = await self.outcome(
            f"ContainerResume {container_id}",
            self.stub.ContainerResume(
                wire.ContainerControlRequest(container_id=container_id),
                metadata=self.target.metadata,
                timeout=WITHIN,
            ),
        )
        if result.code is OK:
            self._paused.discard(container_id)
        return result

    async def signal(self, container_id: str, name: str, exec_id: str = "") -> Outcome:
        return await self.outcome(
            f"ContainerSignal {container_id}/{exec_id or '-'} {name!r}",
            self.stub.ContainerSignal(
                wire.ContainerSignalRequest(
                    container_id=container_id, signal=name, exec_id=exec_id
                ),
                metadata=self.target.metadata,
                timeout=WITHIN,
            ),
        )

    async def wait_status(
        self,
        container_id: str,
        exec_id: str,
        predicate: Callable[[wire.ContainerStatusResponse], bool],
        what: str,
        within: float = 15.0,
    ) -> wire.ContainerStatusResponse:
        """Poll ContainerStatus until ``predicate`` holds (status has no stream to wait on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.02
        while True:
            response = await self.status(container_id, exec_id)
            if predicate(response):
                return response
            if loop.time() > deadline:
                raise Failure(f"{what} within {within:g} s", brief(response, 600))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    # -- cleanup ------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel every stream, kill every exec the case left running, close the channels."""
        for client in self._sessions:
            if not client.done:
                client.call.cancel()
        for subscription in self._subscriptions:
            subscription.call.cancel()
        readers = [c._reader for c in self._sessions if c._reader is not None]
        readers += [s._reader for s in self._subscriptions if s._reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kill_leftovers(), 10)
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _kill_leftovers(self) -> None:
        metadata = self.target.metadata
        for container_id in list(self._paused):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.ContainerResume(
                    wire.ContainerControlRequest(container_id=container_id),
                    metadata=metadata,
                    timeout=5,
                )
        exited = {
            (c.start.container_id, c.start.exec_id)
            for c in self._sessions
            if c.start is not None and c.exit_code is not None
        }
        for container_id, exec_id in self._created:
            if (container_id, exec_id) in exited:
                continue
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.ContainerSignal(
                    wire.ContainerSignalRequest(
                        container_id=container_id, exec_id=exec_id, signal="KILL"
                    ),
                    metadata=metadata,
                    timeout=5,
                )


async def gather_all(*awaitables: Awaitable[_T]) -> list[_T]:
    """``asyncio.gather`` that cancels the rest when one fails, and waits for them to end,
    so that no task outlives the case (and no exception goes unretrieved)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
