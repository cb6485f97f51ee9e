"""The session flow: what one ``Session`` client may send, and what it is sent, and when.

Theory of operation.  A client's session goes through a few states: it waits for ``start``
(PROTOCOL 3.1), opens the exec (create or attach, 3.2), sends ``ready`` (3.3), replays the
history below the sequence ``N`` fixed at attach (6.1-6.3, sent once the boundary is reached:
the second ``ready``), streams live chunks, and ends with ``exit`` after every chunk (5.1), or
fails.  Everything that affects these moves lives here, as data: ``TRANSITIONS`` maps a state
and a step to the next state.  A step is either the client's (a request it sent, or its
half-close) or the server's (a message this module decides to send, the exec being opened,
a failure).  A step that is not in the table is a failed lookup, and whose fault it was
decides the error: the client breaking the spec gets the :class:`ExecError` of its clause
(INVALID_ARGUMENT for 3.1), the server's own code asking for an impossible move gets one clear
:class:`IllegalSessionStep` (a bug, which the error boundary reports as internal).

:class:`SessionFlow` is driven by the grpc glue (``_service``): it feeds the client's
requests to :meth:`~SessionFlow.receive`, performs the action that returns (spawn the exec,
write stdin, resize the terminal: the flow decides, the glue does the I/O), and writes what
:meth:`~SessionFlow.next_messages` returns, waiting for the exec's log whenever
:attr:`~SessionFlow.waiting` says so.  Every message goes out as the bytes a client reads:
chunks are encoded once for all clients (``_encoding``), ``ready`` and ``exit`` by the glue's
``render``, so this module needs no wire classes.  No I/O of its own, and no asyncio, grpc or
wire imports: every rule here is tested synchronously (``tests/server/test_session_flow.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ._encoding import encode_chunk
from ._errors import ErrorCode, ExecError
from ._log import Chunk, Cursor, ExecLog
from ._registry import ExecControls, ExecRecord, Registry, validate_id

__all__ = [
    "CLIENT_STEPS",
    "TRANSITIONS",
    "Action",
    "ClientEvent",
    "CloseStdin",
    "CreateExec",
    "EmptyMessage",
    "Exit",
    "HalfClose",
    "IllegalSessionStep",
    "Ready",
    "Resize",
    "ResizeTerminal",
    "SessionFlow",
    "SessionState",
    "Start",
    "Stdin",
    "Step",
    "StreamObserver",
    "WriteStdin",
]


class SessionState(enum.Enum):
    AWAIT_START = "awaiting start"
    #: ``start`` asked to create the exec: the glue spawns it and calls ``created``.
    OPENING = "opening"
    #: Attached, with ``N`` fixed; nothing sent yet.
    ATTACHED = "attached"
    #: The first ``ready`` said ``replay_complete = false``: chunks below ``N`` follow.
    REPLAYING = "replaying"
    LIVE = "live"
    EXITED = "exited"
    FAILED = "failed"


class Step(enum.Enum):
    # the client's
    START = "start"
    STDIN = "stdin"
    RESIZE = "resize"
    EMPTY = "an empty message"
    HALF_CLOSE = "half-close"
    # the server's
    OPENED = "open the exec"
    READY_REPLAY = "send ready (replay follows)"
    READY = "send ready (replay complete)"
    EXIT = "send exit"
    FAIL = "fail"


#: What the client sends; the rest is the server's.
CLIENT_STEPS = frozenset({Step.START, Step.STDIN, Step.RESIZE, Step.EMPTY, Step.HALF_CLOSE})

_S, _P = SessionState, Step
# PROTOCOL 7.1, 7.3, 3.6: once attached, the client may send stdin and resize, and half-close,
# until its stream ends (a request racing the exit is still judged by the same rules).
_INPUT = (_P.STDIN, _P.RESIZE, _P.HALF_CLOSE)

TRANSITIONS: Mapping[SessionState, Mapping[Step, SessionState]] = {
    _S.AWAIT_START: {_P.START: _S.OPENING, _P.FAIL: _S.FAILED},
    _S.OPENING: {_P.OPENED: _S.ATTACHED, _P.FAIL: _S.FAILED},
    _S.ATTACHED: {
        **dict.fromkeys(_INPUT, _S.ATTACHED),
        _P.READY_REPLAY: _S.REPLAYING,
        _P.READY: _S.LIVE,
        _P.FAIL: _S.FAILED,
    },
    _S.REPLAYING: {**dict.fromkeys(_INPUT, _S.REPLAYING), _P.READY: _S.LIVE, _P.FAIL: _S.FAILED},
    _S.LIVE: {**dict.fromkeys(_INPUT, _S.LIVE), _P.EXIT: _S.EXITED, _P.FAIL: _S.FAILED},
    # A failure after exit (the server shutting down) changes nothing: the session ended well.
    _S.EXITED: {**dict.fromkeys(_INPUT, _S.EXITED), _P.FAIL: _S.EXITED},
    # The first failure stands; every later step answers with it.
    _S.FAILED: {_P.FAIL: _S.FAILED},
}

#: The states in which the client's requests are read, so that a request the table does not
#: allow is the client's breach of the spec.  In the others it is a bug of the glue.
_HEARD = frozenset({_S.AWAIT_START, _S.ATTACHED, _S.REPLAYING, _S.LIVE, _S.EXITED})


class IllegalSessionStep(Exception):
    """The server's code asked for a step the table does not have: a bug in the caller."""

    def __init__(self, state: SessionState, step: Step | str) -> None:
        allowed = ", ".join(s.value for s in TRANSITIONS[state]) or "nothing"
        what = step.value if isinstance(step, Step) else step
        super().__init__(f"session in state {state.value!r} cannot {what!r} (allowed: {allowed})")
        self.state = state
        self.step = step


# -- what the client sends ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Start:
    """``SessionRequest.start``.  Checked by the flow, not here: a second ``start`` is an
    error of its own (3.1) whatever its fields say."""

    container_id: str
    exec_id: str
    command: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    tty: bool = False
    terminal_size: tuple[int, int] | None = None
    session_id: str = ""
    replay_from_sequence: int = 0
    close_stdin: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Stdin:
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Resize:
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class EmptyMessage:
    """A ``SessionRequest`` with no member set."""


@dataclass(frozen=True, slots=True)
class HalfClose:
    """The client closed its sending side."""


ClientEvent = Start | Stdin | Resize | EmptyMessage | HalfClose

_STEP_OF: Mapping[type[object], Step] = {
    Start: Step.START,
    Stdin: Step.STDIN,
    Resize: Step.RESIZE,
    EmptyMessage: Step.EMPTY,
    HalfClose: Step.HALF_CLOSE,
}


# -- what the glue must do ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateExec:
    """PROTOCOL 3.2: spawn the exec ``start`` describes, then call ``created``."""

    start: Start


@dataclass(frozen=True, slots=True)
class WriteStdin:
    """PROTOCOL 7.1: write ``data`` to the exec's stdin (discarded if it exited meanwhile)."""

    controls: ExecControls
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseStdin:
    """PROTOCOL 7.1: the client sent EOF."""

    controls: ExecControls


@dataclass(frozen=True, slots=True)
class ResizeTerminal:
    """PROTOCOL 7.3: the terminal's new size, for the process."""

    controls: ExecControls
    width: int
    height: int


Action = CreateExec | WriteStdin | CloseStdin | ResizeTerminal


# -- what the client is sent ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """``SessionResponse.ready`` (PROTOCOL 3.3, 6.3)."""

    session_id: str
    terminal_size: tuple[int, int] | None
    replay_complete: bool
    next_sequence: int


@dataclass(frozen=True, slots=True)
class Exit:
    """``SessionResponse.exit`` (PROTOCOL 5.1)."""

    code: int


class StreamObserver(Protocol):
    """Told what a client was sent, once per batch (the server's metrics)."""

    def streamed(
        self, chunks: int, nbytes: int, source: Literal["memory", "storage"] = "memory"
    ) -> None: ...

    def gap(self, missed: int) -> None: ...


class _Unobserved:
    def streamed(
        self, chunks: int, nbytes: int, source: Literal["memory", "storage"] = "memory"
    ) -> None:
        pass

    def gap(self, missed: int) -> None:
        pass


# -- the flow -------------------------------------------------------------------------------


class SessionFlow:
    """One client's session over ``registry``.

    ``creates``: whether this server spawns execs (else a create is NOT_FOUND, 3.2);
    ``new_session_id``: a session ID unique on this server, for a ``start`` without one (3.3);
    ``render``: the wire bytes of a ``ready`` or ``exit``; ``observer``: told what was sent.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        creates: bool,
        new_session_id: Callable[[], str],
        render: Callable[[Ready | Exit], bytes],
        observer: StreamObserver | None = None,
    ) -> None:
        self._registry = registry
        self._creates = creates
        self._new_session_id = new_session_id
        self._render = render
        self._observer: StreamObserver = observer or _Unobserved()
        self._state = SessionState.AWAIT_START
        self._error: Exception | None = None
        self._session_id = ""
        self._record: ExecRecord | None = None
        self._log: ExecLog | None = None
        self._cursor: Cursor[Chunk] | None = None
        self._boundary = 0  # N of PROTOCOL 6.3
        self._gap = 0  # evicted chunks not yet reported (PROTOCOL 6.4)
        self._closed = False
        self._close_stdin = False  # PROTOCOL 7.5: asked by the start that creates

    # -- where it stands ----------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def record(self) -> ExecRecord | None:
        """The exec, once opened."""
        return self._record

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def waiting(self) -> bool:
        """Nothing is due until the exec's log changes: the glue waits for it."""
        if self._state is not SessionState.LIVE:
            return False
        assert self._log is not None and self._cursor is not None
        return self._cursor.position >= self._log.next_sequence and not self._log.closed

    @property
    def finished(self) -> bool:
        """``exit`` was sent: the stream ends with OK (PROTOCOL 5.1)."""
        return self._state is SessionState.EXITED

    def _step(self, step: Step) -> None:
        try:
            self._state = TRANSITIONS[self._state][step]
        except KeyError:
            if self._state is SessionState.FAILED:
                assert self._error is not None
                raise self._error from None
            if step in CLIENT_STEPS and self._state in _HEARD:
                raise self._breach(step) from None
            raise IllegalSessionStep(self._state, step) from None

    def _breach(self, step: Step) -> ExecError:
        """The client broke PROTOCOL 3.1: this is the error that ends its stream."""
        if self._state is SessionState.AWAIT_START:
            if step is Step.HALF_CLOSE:
                message = "the stream closed before its first message, start"
            else:
                message = f"the first message must be start, got {step.value}"
        elif step is Step.START:
            message = "start sent twice in a session"
        else:
            message = "a message with no member set"
        return ExecError(ErrorCode.INVALID_ARGUMENT, message)

    def fail(self, error: Exception) -> None:
        """End the session with ``error`` (the first one stands); every later step raises it.
        After ``exit`` was sent it changes nothing (PROTOCOL 13.2 racing 5.1)."""
        self._step(Step.FAIL)
        if self._state is SessionState.FAILED and self._error is None:
            self._error = error

    def close(self) -> None:
        """The stream ended, however: the client no longer counts against the exec's limit,
        and an exec removed meanwhile lets its output go (PROTOCOL 11.2).  Call it once,
        last."""
        if self._closed:
            return
        self._closed = True
        if self._record is not None:
            self._registry.detach(self._record)

    # -- the client's requests ----------------------------------------------------------------

    def receive(self, event: ClientEvent) -> Action | None:
        """Judge one request of the client (or its half-close); what the glue must do."""
        try:
            self._step(_STEP_OF[type(event)])
            if isinstance(event, Start):
                return self._start(event)
            if isinstance(event, Stdin):
                return self._stdin(event.data)
            if isinstance(event, Resize):
                return self._resize(event)
            return None  # PROTOCOL 3.6: a half-close ends nothing; it does not close stdin
        except ExecError as error:
            self.fail(error)
            raise

    def _start(self, start: Start) -> Action | None:
        """PROTOCOL 3.2: create or attach."""
        validate_id("container_id", start.container_id)  # PROTOCOL 2.1
        validate_id("exec_id", start.exec_id)
        # PROTOCOL 1.3, 3.3: a client of the published fields only gets a session_id.
        self._session_id = start.session_id or self._new_session_id()
        if not start.command:
            record = self._registry.get(start.container_id, start.exec_id)
            self._open(record, start.replay_from_sequence)
            return None
        if not self._creates:
            raise ExecError(
                ErrorCode.NOT_FOUND,
                f"this server does not create execs: exec {start.exec_id!r} not found",
            )
        if start.replay_from_sequence > 1:  # PROTOCOL 6.1: a new exec's next chunk is 1
            raise ExecError(
                ErrorCode.OUT_OF_RANGE,
                f"replay_from_sequence {start.replay_from_sequence} is past the next "
                "sequence 1 of a new exec",
            )
        if self._registry.find(start.container_id, start.exec_id) is not None:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS,
                f"exec {start.exec_id!r} already exists in container {start.container_id!r}",
            )
        self._close_stdin = start.close_stdin
        return CreateExec(start)

    def created(self, record: ExecRecord) -> Action | None:
        """The glue spawned the exec :class:`CreateExec` asked for: attach to it from 1,
        and close its stdin at once if ``start`` asked for that (PROTOCOL 7.5)."""
        try:
            self._open(record, 0)
            return self._stdin(b"") if self._close_stdin else None
        except ExecError as error:
            self.fail(error)
            raise

    def _open(self, record: ExecRecord, replay_from: int) -> None:
        self._step(Step.OPENED)
        # PROTOCOL 6.1: the cursor (OUT_OF_RANGE past the next sequence), within the limit
        # of clients (13.1).
        self._cursor = self._registry.attach(record, replay_from)
        self._record = record
        self._log = record.log
        self._boundary = record.log.next_sequence  # PROTOCOL 6.3: N, fixed at attach

    def _stdin(self, data: bytes) -> Action | None:
        assert self._record is not None
        limit = self._registry.limits.stdin_bytes
        if len(data) > limit:  # PROTOCOL 7.2
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT,
                f"stdin message of {len(data)} bytes is over the limit of {limit} bytes",
            )
        record = self._record
        if record.stdin_closed and data:  # PROTOCOL 7.1
            raise ExecError(ErrorCode.FAILED_PRECONDITION, "stdin was already closed (EOF sent)")
        controls = record.controls
        if controls is None:  # exited, or never started by us: PROTOCOL 7.1 discards it
            return None
        if not data:
            record.stdin_closed = True
            return CloseStdin(controls)
        return WriteStdin(controls, data)

    def _resize(self, size: Resize) -> Action | None:
        assert self._record is not None
        record = self._record
        if not record.tty:  # PROTOCOL 7.3, before the size is looked at
            raise ExecError(ErrorCode.FAILED_PRECONDITION, "resize on an exec without a TTY")
        if size.width <= 0 or size.height <= 0:  # PROTOCOL 7.3
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT,
                f"terminal size must be positive, got {size.width}x{size.height}",
            )
        record.terminal_size = (size.width, size.height)  # what a later ready reports (3.3)
        if record.controls is None:
            return None
        return ResizeTerminal(record.controls, size.width, size.height)

    # -- what the client is sent --------------------------------------------------------------

    def next_messages(self, budget: int) -> list[bytes]:
        """The messages due now, as wire bytes: chunks from one read of at most ``budget``
        bytes, or a ``ready``, or ``exit``.  Empty: nothing is due (see :attr:`waiting`)."""
        state = self._state
        if state is SessionState.LIVE:  # the hot path first
            log, cursor = self._log, self._cursor
            assert log is not None and cursor is not None
            if cursor.position < log.next_sequence:
                return self._read(log, cursor, budget, None, False)
            if log.exit_code is not None:
                self._step(Step.EXIT)
                # PROTOCOL 5.1: every chunk was sent (or reported as a gap, 6.4); exit is last.
                return [self._render(Exit(log.exit_code))]
            return []
        if state is SessionState.REPLAYING:
            log, cursor = self._log, self._cursor
            assert log is not None and cursor is not None
            if cursor.position >= self._boundary:
                # PROTOCOL 6.3: the second ready exactly at N; live chunks continue from N.
                self._step(Step.READY)
                return [self._ready(True)]
            # PROTOCOL 6.2: everything below N is replay, and a replay read stops at N.
            return self._read(log, cursor, budget, self._boundary, True)
        if state is SessionState.ATTACHED:
            assert self._cursor is not None
            # PROTOCOL 3.3, 6.3: ready first; complete when nothing lies below N.
            complete = self._cursor.position >= self._boundary
            self._step(Step.READY if complete else Step.READY_REPLAY)
            return [self._ready(complete)]
        if state is SessionState.EXITED:
            return []
        if state is SessionState.FAILED:
            assert self._error is not None
            raise self._error
        raise IllegalSessionStep(state, "send output before the exec is opened")

    def _ready(self, complete: bool) -> bytes:
        assert self._record is not None
        return self._render(
            Ready(self._session_id, self._record.terminal_size, complete, self._boundary)
        )

    def _read(
        self, log: ExecLog, cursor: Cursor[Chunk], budget: int, until: int | None, replay: bool
    ) -> list[bytes]:
        """One batch read at the client's cursor, each chunk as the bytes encoded once for
        every client (PROTOCOL 4.3)."""
        # PROTOCOL 6.7: a client behind the memory cache reads the same chunks from storage.
        cached = max(cursor.position, log.first_sequence) >= log.cached_from
        read = cursor.read(budget, until)
        items = read.items
        gap = self._gap + read.gap_before
        if not items:
            self._gap = gap  # reported by the next chunk this client gets
            return []
        self._gap = 0
        if gap:
            # PROTOCOL 6.4: the next chunk the client receives says how many it missed.
            self._observer.gap(gap)
            messages = [encode_chunk(items[0], replay, gap)]
            messages += [encode_chunk(chunk, replay, 0) for chunk in items[1:]]
        else:
            messages = [encode_chunk(chunk, replay, 0) for chunk in items]
        self._observer.streamed(
            len(items), sum(len(chunk.data) for chunk in items), "memory" if cached else "storage"
        )
        return messages
