"""An exec's standard streams: output read in large non-blocking reads, input queued in order.

See the package docstring ("Draining").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable

from ..._errors import ErrorCode, ExecError
from .._base import OutputSink

__all__ = ["PIPE_SIZE", "InputWriter", "OutputReader", "grow_pipe", "winsize"]

log = logging.getLogger("execstream.server.process")

PIPE_SIZE = 1 << 20
#: The most one reader takes in one turn of the event loop.
TURN_BYTES = 4 * PIPE_SIZE

# A turn's reads go into a buffer shared by the readers of a thread (they run one at a time,
# on its event loop, and copy out what they read).
_buffers = threading.local()


def _read_buffer() -> memoryview:
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        # Anonymous memory: a page is only taken once a read reaches it, so a server whose
        # execs write little never holds the whole buffer (a bytearray is zero-filled).
        view = _buffers.view = memoryview(mmap.mmap(-1, TURN_BYTES))
    return view


def winsize(width: int, height: int) -> bytes:
    return struct.pack("HHHH", height, width, 0, 0)


def grow_pipe(fd: int) -> None:
    # Larger pipes mean fewer, larger reads (the cost is per message, DESIGN "Engineering
    # facts"); an unprivileged server may be refused beyond /proc/sys/fs/pipe-max-size.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class OutputReader:
    """One output stream of an exec: each turn of the event loop it reads until the pipe is
    empty (within ``TURN_BYTES``), and what it read goes to the sink in whole pieces of
    ``read_size`` bytes, the turn's last piece shorter.

    The producer is never held back by what else the loop serves, its clients' writers
    included (PROTOCOL 6.6): while it keeps the pipe filling, the reader keeps reading and
    storing, and each turn's pieces are full-sized but for one (the cost is per message,
    DESIGN "Engineering facts").  The full pieces of one read go to the sink as one write,
    which the log splits into its chunks (at most 64 KiB, PROTOCOL 4.4) and stores with one
    system call: storing 64 KiB at a time cost twice as much per byte as storing a read of
    1 MiB at once, and a turn that stores less keeps the lines of other execs waiting less."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        sink: OutputSink,
        read_size: int,
        on_closed: Callable[[], None],
        *,
        owns_fd: bool,
        label: str,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._sink = sink
        self._read_size = read_size
        self._on_closed = on_closed
        self._owns_fd = owns_fd
        self._label = label
        self.open = True
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self, limit: int = TURN_BYTES) -> None:
        """One turn's reads: until the pipe is empty (or a read is short of a piece), its
        end, or ``limit`` bytes.

        The full pieces of each read go to the sink at once, while the producer refills the
        pipe; what is left over waits for the turn's next read, so that a turn ends with
        one short piece at most."""
        buffer = _read_buffer()[:limit]
        size = sent = 0
        ended = False
        while size < len(buffer):
            try:
                got = os.readv(self._fd, (buffer[size:],))
            except BlockingIOError:
                break
            except OSError as exc:
                # A pty master reads EIO once no process holds the terminal: its end of file.
                if exc.errno != errno.EIO:
                    log.warning("reading %s failed: %s", self._label, exc)
                got = 0
            if not got:
                ended = True
                break
            size += got
            sent = self._deliver(buffer, sent, size - (size - sent) % self._read_size)
            if got < self._read_size:
                break  # a producer that writes little: the pipe is empty, no read to say so
        self._deliver(buffer, sent, size)
        if ended:
            self.close()

    def _deliver(self, buffer: memoryview, start: int, end: int) -> int:
        if end > start:
            try:
                self._sink.write(bytes(buffer[start:end]))
            except Exception:
                log.exception("the output sink of %s failed", self._label)
        return end

    def finish(self) -> None:
        """Bounded drain: deliver what the pipe holds now, then stop reading.

        The read budget covers a full pipe, and no more: a writer that never stops is not
        chased.
        """
        if self.open:
            self._read_once(PIPE_SIZE + self._read_size)
        self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self._loop.remove_reader(self._fd)
        if self._owns_fd:
            os.close(self._fd)
        self._on_closed()


class InputWriter:
    """An exec's standard input: writes go out in call order and never block the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        *,
        owns_fd: bool,
        eof_char: Callable[[], bytes] | None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._owns_fd = owns_fd
        self._eof_char = eof_char
        self._queue: deque[tuple[memoryview, asyncio.Future[None] | None]] = deque()
        self._watching = False
        #: Why writes are refused, once they are.
        self.refusal: str | None = None

    def write(self, data: bytes) -> asyncio.Future[None]:
        if self.refusal is not None:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, self.refusal)
        done: asyncio.Future[None] = self._loop.create_future()
        if not data:
            done.set_result(None)
            return done
        self._queue.append((memoryview(data), done))
        self._flush()
        return done

    def close(self, refusal: str) -> None:
        """End of input after what is queued: EOF on a pipe, the EOF character on a TTY."""
        if self.refusal is not None:
            return
        self.refusal = refusal
        if self._eof_char is not None:
            self._queue.append((memoryview(self._eof_char()), None))
        self._flush()

    def abort(self, refusal: str) -> None:
        """Nothing more will be written: pending writes fail with ``refusal``."""
        self.refusal = refusal
        pending, self._queue = self._queue, deque()
        for _, done in pending:
            if done is not None and not done.done():
                done.set_exception(ExecError(ErrorCode.FAILED_PRECONDITION, refusal))
        self._stop_watching()
        self._release_fd()

    def _flush(self) -> None:
        while self._queue:
            view, done = self._queue[0]
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                break
            except OSError:
                # EPIPE: nothing reads it any more; EIO: the terminal hung up.
                self.abort("the process no longer reads its standard input")
                return
            if written < len(view):
                self._queue[0] = (view[written:], done)
                break
            self._queue.popleft()
            if done is not None and not done.done():
                done.set_result(None)
        if self._queue:
            if not self._watching:
                self._loop.add_writer(self._fd, self._flush)
                self._watching = True
            return
        self._stop_watching()
        if self.refusal is not None:
            self._release_fd()

    def _stop_watching(self) -> None:
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False

    def _release_fd(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
