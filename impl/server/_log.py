"""Bounded, sequenced logs: one per exec for its output, one per server for lifecycle events.

Theory of operation.  Items are appended once and numbered from 1 with no gap (PROTOCOL 4.2,
8.2).  The log keeps the newest items within a budget (bytes for output, a count for events)
and evicts the oldest first, but always keeps the newest item, so that a reader that fell
behind always meets an item that can report the gap (PROTOCOL 6.4).  Readers are cursors: a
reader holds only the next sequence it wants, so fan-out to N readers stores nothing N times,
and replay and live reading are the same read (PROTOCOL 6.1).  Appending never waits for a
reader (PROTOCOL 6.6): it notifies listeners, plain callables, and returns.

No I/O and no asyncio or grpc imports.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ._errors import ErrorCode, ExecError

__all__ = ["MAX_CHUNK", "Chunk", "Cursor", "ExecLog", "Read", "SequencedLog", "Stream"]

T = TypeVar("T")

#: PROTOCOL 4.4: a chunk's data is at most 64 KiB.
MAX_CHUNK = 64 * 1024

Listener = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Read(Generic[T]):
    """What one read returned: ``items`` in order, the number of items evicted right before
    the first of them (``gap_before``), and the sequence to read from next."""

    items: list[T]
    gap_before: int
    next_sequence: int


class SequencedLog(Generic[T]):
    """Append-only, numbered from 1, bounded by ``budget`` in units of ``cost(item)``."""

    def __init__(self, budget: int, cost: Callable[[T], int]) -> None:
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        self._budget = budget
        self._cost = cost
        self._items: list[T] = []
        self._head = 0  # index in _items of the oldest retained item
        self._first = 1  # its sequence
        self._size = 0
        self._listeners: list[Listener] = []

    @property
    def first_sequence(self) -> int:
        """The sequence of the oldest retained item (``next_sequence`` when none is)."""
        return self._first

    @property
    def next_sequence(self) -> int:
        """The sequence the next appended item will carry."""
        return self._first + len(self._items) - self._head

    @property
    def retained_cost(self) -> int:
        return self._size

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _append(self, item: T) -> int:
        sequence = self.next_sequence
        self._items.append(item)
        self._size += self._cost(item)
        while self._size > self._budget and len(self._items) - self._head > 1:
            self._size -= self._cost(self._items[self._head])
            self._head += 1
            self._first += 1
        if self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]
            self._head = 0
        return sequence

    def read(
        self, from_sequence: int, max_cost: int | None = None, until: int | None = None
    ) -> Read[T]:
        """Items from ``from_sequence`` on, before ``until`` if given; at least one if any,
        else within ``max_cost``."""
        if from_sequence < 1:
            from_sequence = 1
        end = self.next_sequence
        if from_sequence > end:
            raise ExecError(
                ErrorCode.OUT_OF_RANGE,
                f"sequence {from_sequence} is past the next sequence {end}",
            )
        gap = max(0, self._first - from_sequence)
        start = from_sequence + gap
        index = self._head + (start - self._first)
        stop = len(self._items)
        if until is not None:
            stop = max(index, min(stop, self._head + (until - self._first)))
        if max_cost is not None:
            spent, i = 0, index
            while i < stop:
                spent += self._cost(self._items[i])
                if spent > max_cost and i > index:
                    break
                i += 1
            stop = i
        items = self._items[index:stop]
        return Read(items, gap, start + len(items))


class Stream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One ``OutputChunk`` as the exec produced it (PROTOCOL 4)."""

    sequence: int
    timestamp_ns: int
    stream: Stream
    data: bytes


class ExecLog(SequencedLog[Chunk]):
    """One exec's output: chunks of at most ``MAX_CHUNK`` bytes, then the exit code."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < MAX_CHUNK:
            raise ValueError(f"history budget must be at least {MAX_CHUNK} bytes")
        super().__init__(budget_bytes, lambda chunk: len(chunk.data))
        self.exit_code: int | None = None

    @property
    def closed(self) -> bool:
        return self.exit_code is not None

    def append(self, stream: Stream, data: bytes, timestamp_ns: int) -> None:
        """Number and keep ``data``; PROTOCOL 4.1: no empty chunk, 4.4: none over 64 KiB."""
        if self.closed:
            raise ValueError("output appended after the exit code")
        for offset in range(0, len(data), MAX_CHUNK):
            piece = data[offset : offset + MAX_CHUNK]
            self._append(Chunk(self.next_sequence, timestamp_ns, stream, piece))
        if data:
            self._notify()

    def close(self, exit_code: int) -> None:
        """PROTOCOL 5.1: the exit code follows every chunk; nothing is appended after it."""
        if self.closed:
            raise ValueError("exit code set twice")
        self.exit_code = exit_code
        self._notify()


class Cursor(Generic[T]):
    """One reader's position in a log."""

    def __init__(self, log: SequencedLog[T], from_sequence: int) -> None:
        self.log = log
        self.position = max(from_sequence, 1)
        if self.position > log.next_sequence:
            raise ExecError(
                ErrorCode.OUT_OF_RANGE,
                f"replay_from_sequence {from_sequence} is past the next sequence "
                f"{log.next_sequence}",
            )

    @property
    def caught_up(self) -> bool:
        return self.position >= self.log.next_sequence

    def read(self, max_cost: int | None = None, until: int | None = None) -> Read[T]:
        result = self.log.read(self.position, max_cost, until)
        self.position = result.next_sequence
        return result
