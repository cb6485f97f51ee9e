"""Sequenced logs: one per exec for its output, one per server for lifecycle events.

Theory of operation.  Items are appended once and numbered from 1 with no gap (PROTOCOL 4.2,
8.2).  Readers are cursors: a reader holds only the next sequence it wants, so fan-out to N
readers stores nothing N times, and replay and live reading are the same read (PROTOCOL 6.1).
Appending never waits for a reader (PROTOCOL 6.6): it notifies listeners, plain callables,
and returns.  A log evicts only its oldest items, and always keeps the newest, so a reader that
fell behind an eviction always meets an item that can report the gap (PROTOCOL 6.4, 8.5).

:class:`SequencedLog` keeps its items in memory within a budget (the event log, 8.5).
:class:`ExecLog` keeps an exec's output in its storage, every chunk from sequence 1, up to the
per-exec output limit (PROTOCOL 6.5): the storage is the log, and memory holds only the newest
chunks as a cache, so a reader far behind reads the very same chunks back from storage
(PROTOCOL 6.7) and memory grows neither with the output nor with how far behind readers are.
What one reader read back from storage is kept too, within the same budget, for the readers
right behind it: clients that fell behind together share those chunks and their encoding.
The storage is injected (``_storage``); this module does no I/O of its own and imports neither
asyncio nor grpc.
"""

from __future__ import annotations

import bisect
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ._errors import ErrorCode, ExecError
from ._storage import HEADER, ChunkStorage

__all__ = [
    "MAX_CHUNK",
    "MIN_OUTPUT_LIMIT",
    "Chunk",
    "Cursor",
    "ExecLog",
    "Read",
    "SequencedLog",
    "StorageBudget",
    "Stream",
]

T = TypeVar("T")

log = logging.getLogger("execstream.server")

#: PROTOCOL 4.4: a chunk's data is at most 64 KiB.
MAX_CHUNK = 64 * 1024
#: The smallest per-exec output limit: room for a few full chunks, so eviction is gradual.
MIN_OUTPUT_LIMIT = 4 * MAX_CHUNK
#: The largest segment of an exec's storage; smaller limits get smaller segments (limit / 8).
MAX_SEGMENT = 8 * 1024 * 1024
#: How much one read from storage takes at most when the caller sets no budget.
STORAGE_READ = 1024 * 1024
#: Read-ahead past the caller's budget, so the record that ends a read is whole.
_SLACK = MAX_CHUNK + HEADER.size + 4096
#: Where readers behind the cache stopped, remembered per next sequence (one per lagging
#: client in practice); bounded so that departed readers cost nothing for long.
_POSITIONS = 256

Listener = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Read(Generic[T]):
    """What one read returned: ``items`` in order, the number of items evicted right before
    the first of them (``gap_before``), and the sequence to read from next."""

    items: list[T]
    gap_before: int
    next_sequence: int


class _Notifier:
    """Plain callables told of every change; telling them never waits (PROTOCOL 6.6)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()


class SequencedLog(_Notifier, Generic[T]):
    """Append-only, numbered from 1, bounded by ``budget`` in units of ``cost(item)``."""

    def __init__(self, budget: int, cost: Callable[[T], int]) -> None:
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        super().__init__()
        self._budget = budget
        self._cost = cost
        self._items: list[T] = []
        self._head = 0  # index in _items of the oldest retained item
        self._first = 1  # its sequence
        self._size = 0

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

    def _append(self, item: T) -> int:
        sequence = self.next_sequence
        self._items.append(item)
        self._size += self._cost(item)
        while self._size > self._budget and len(self._items) - self._head > 1:
            self._size -= self._cost(self._items[self._head])
            self._head += 1
            self._first += 1
        # Evicted items stay referenced until compaction: compact once they are half the
        # list, so memory stays within twice the budget's items (amortised O(1) per append).
        if self._head * 2 > len(self._items):
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


_STREAM_CODE = {Stream.STDOUT: 0, Stream.STDERR: 1}
_CODE_STREAM = {0: Stream.STDOUT, 1: Stream.STDERR}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One ``OutputChunk`` as the exec produced it (PROTOCOL 4)."""

    sequence: int
    timestamp_ns: int
    stream: Stream
    #: A view when the chunk was cut from a larger ``bytes`` (a write of several chunks, or
    #: a storage read): cutting copies nothing, and that ``bytes`` lives as long as one of its
    #: chunks does, so a cache within its budget of data holds at most one write or read more.
    #: Never a view of a mutable buffer.
    data: bytes | memoryview
    #: The chunk's encoding, made by the first reader that sends it and kept here so that
    #: every other reader sends the same bytes (PROTOCOL 4.3) without encoding them again.
    #: Opaque to this module; it lives and dies with the chunk (the memory cache's chunks, or
    #: one storage read's), so it adds at most one copy of the data the cache holds.
    encoded: bytes | None = field(default=None, compare=False, repr=False)

    def keep_encoded(self, encoded: bytes) -> None:
        object.__setattr__(self, "encoded", encoded)


@dataclass(slots=True)
class _Segment:
    number: int
    first_sequence: int
    size: int = 0  # bytes in storage, headers included


class StorageBudget:
    """The server-wide cap on stored output (PROTOCOL 6.5): past it, the oldest segment of any
    exec goes first, except an exec's newest one (it holds the chunk that reports the gap)."""

    def __init__(self, cap: int = 0) -> None:
        if cap < 0:
            raise ValueError(f"the storage cap must be >= 0, got {cap}")
        self.cap = cap
        self.used = 0
        # Every stored segment of every exec, oldest first.  A segment is taken out when it
        # goes, however it goes, so this holds no more entries than there are segments.
        self._order: dict[tuple[ExecLog, int], None] = {}

    @property
    def segments(self) -> int:
        """How many segments the cap may choose from."""
        return len(self._order)

    def added(self, owner: ExecLog, segment: int) -> None:
        if self.cap:  # without a cap nothing is ever taken in this order
            self._order[owner, segment] = None

    def removed(self, owner: ExecLog, segment: int) -> None:
        """``segment`` of ``owner`` is gone (its exec's own limit, or the cap took it)."""
        self._order.pop((owner, segment), None)

    def charge(self, size: int) -> None:
        self.used += size
        while self.cap and self.used > self.cap and self._evict_oldest():
            pass

    def release(self, size: int) -> None:
        self.used -= size

    def forget(self, owner: ExecLog, segments: Iterable[int]) -> None:
        """``owner``'s ``segments`` went all at once (its storage was dropped)."""
        for segment in segments:
            self.removed(owner, segment)

    def _evict_oldest(self) -> bool:
        for owner, segment in self._order:
            if owner.can_evict(segment):
                break
        else:
            return False
        first, last, size = owner.evict_oldest()  # which calls removed()
        log.warning(
            "stored output is over the server's cap of %d bytes: evicted chunks "
            "%d-%d (%d bytes) of exec %s",
            self.cap,
            first,
            last,
            size,
            owner.name,
        )
        return True


class ExecLog(_Notifier):
    """One exec's output: chunks of at most ``MAX_CHUNK`` bytes in ``storage``, then the exit
    code; the newest chunks also in memory, within ``cache_bytes``.

    ``max_output_bytes`` bounds what storage holds (records with their headers; 0: no bound):
    past it, whole segments go, oldest first (PROTOCOL 6.5).  Should storage fail (a full
    disk), the log says so once and carries on with the memory cache alone: readers behind it
    are then told of gaps, never silently short-changed (PROTOCOL 6.4).
    """

    def __init__(
        self,
        storage: ChunkStorage,
        *,
        cache_bytes: int = 4 * 1024 * 1024,
        max_output_bytes: int = 1024 * 1024 * 1024,
        budget: StorageBudget | None = None,
        name: str = "",
    ) -> None:
        if cache_bytes < MAX_CHUNK:
            raise ValueError(f"the memory cache must be at least {MAX_CHUNK} bytes")
        if max_output_bytes and max_output_bytes < MIN_OUTPUT_LIMIT:
            raise ValueError(
                f"the output limit must be 0 (none) or at least {MIN_OUTPUT_LIMIT} bytes"
            )
        super().__init__()
        self.name = name
        self._storage = storage
        self._max_output = max_output_bytes
        self._segment_bytes = (
            min(MAX_SEGMENT, max(max_output_bytes // 8, MAX_CHUNK + HEADER.size))
            if max_output_bytes
            else MAX_SEGMENT
        )
        self._budget = budget
        self._cache_bytes = cache_bytes
        self._cache: SequencedLog[Chunk] | None = self._new_cache()
        self._segments: list[_Segment] = []
        self._first_sequences: list[int] = []  # of _segments, for bisect
        self._stored = 0
        self._next = 1
        self._memory_only = False
        self._positions: dict[int, tuple[int, int]] = {}
        #: Chunks lately read back from storage, oldest first, within ``cache_bytes`` of
        #: data: readers that follow each other through storage (clients that fell behind
        #: together) share them, and so their encoding (PROTOCOL 4.3), instead of each
        #: reading and encoding its own copy.
        self._recent: dict[int, Chunk] = {}
        self._recent_bytes = 0
        self.exit_code: int | None = None

    def _new_cache(self) -> SequencedLog[Chunk]:
        return SequencedLog(self._cache_bytes, lambda chunk: len(chunk.data))

    # -- what is retained -------------------------------------------------------------------

    @property
    def next_sequence(self) -> int:
        """The sequence the next appended chunk will carry."""
        return self._next

    @property
    def first_sequence(self) -> int:
        """The oldest retained chunk's sequence (``next_sequence`` when none is)."""
        if self._segments:
            return self._segments[0].first_sequence
        if self._cache is not None:
            return self._cache.first_sequence
        return self._next

    @property
    def cached_from(self) -> int:
        """The oldest sequence the memory cache can serve (``next_sequence`` when none)."""
        if self._cache is None:
            return self._next
        return max(self._cache.first_sequence, self.first_sequence)

    @property
    def stored_bytes(self) -> int:
        """What storage holds for this exec, record headers included."""
        return self._stored

    @property
    def closed(self) -> bool:
        return self.exit_code is not None

    def can_evict(self, segment: int) -> bool:
        """``segment`` is the oldest and not the newest (which holds the newest chunk)."""
        return len(self._segments) > 1 and self._segments[0].number == segment

    # -- writing ------------------------------------------------------------------------------

    def append(self, stream: Stream, data: bytes, timestamp_ns: int) -> None:
        """Number and keep ``data``: storage first, then the cache, then the readers are told.

        PROTOCOL 4.1: no empty chunk; 4.4: none over 64 KiB, and no more pieces than that needs.
        A large write is cut into views of it, not copies, and stored with one write.
        """
        if self.closed:
            raise ValueError("output appended after the exit code")
        if not data:
            return
        chunks = []
        whole: bytes | memoryview = data
        if len(data) > MAX_CHUNK and type(data) is bytes:  # immutable: views of it stay true
            whole = memoryview(data)
        for offset in range(0, len(data), MAX_CHUNK):
            chunks.append(
                Chunk(self._next, timestamp_ns, stream, whole[offset : offset + MAX_CHUNK])
            )
            self._next += 1
        if not self._memory_only:
            self._store(chunks)
        if self._cache is not None:
            for chunk in chunks:
                self._cache._append(chunk)
        self._notify()

    def _store(self, chunks: list[Chunk]) -> None:
        parts: list[bytes | memoryview] = []
        segment = self._segments[-1] if self._segments else None
        added = 0
        try:
            for chunk in chunks:
                size = HEADER.size + len(chunk.data)
                if segment is None or (segment.size and segment.size + size > self._segment_bytes):
                    if parts and segment is not None:
                        self._storage.append(segment.number, parts)
                        parts = []
                    segment = self._open_segment(chunk.sequence)
                header = HEADER.pack(
                    chunk.sequence, chunk.timestamp_ns, len(chunk.data), _STREAM_CODE[chunk.stream]
                )
                parts += (header, chunk.data)
                segment.size += size
                added += size
            if parts and segment is not None:
                self._storage.append(segment.number, parts)
        except OSError as error:
            self._storage_failed(error)
            return
        self._stored += added
        while self._max_output and self._stored > self._max_output and len(self._segments) > 1:
            self.evict_oldest()
        if self._budget is not None:
            self._budget.charge(added)

    def _open_segment(self, first_sequence: int) -> _Segment:
        number = self._segments[-1].number + 1 if self._segments else 1
        segment = _Segment(number, first_sequence)
        self._segments.append(segment)
        self._first_sequences.append(first_sequence)
        if self._budget is not None:
            self._budget.added(self, number)
        return segment

    def evict_oldest(self) -> tuple[int, int, int]:
        """Remove the oldest segment; its first and last sequence and its size."""
        segment = self._segments.pop(0)
        del self._first_sequences[0]
        self._stored -= segment.size
        if self._budget is not None:
            self._budget.release(segment.size)
            self._budget.removed(self, segment.number)
        self._storage.remove(segment.number)
        return segment.first_sequence, self._segments[0].first_sequence - 1, segment.size

    def _storage_failed(self, error: OSError) -> None:
        log.error(
            "storing the output of exec %s failed (%s): it goes on in memory only, and a "
            "client behind the memory cache will be told of gaps",
            self.name,
            error,
        )
        self._memory_only = True
        self._drop_storage()

    def _drop_storage(self) -> None:
        if self._budget is not None:
            self._budget.release(self._stored)
            self._budget.forget(self, (segment.number for segment in self._segments))
        self._segments.clear()
        self._first_sequences.clear()
        self._positions.clear()
        self._forget_recent()
        self._stored = 0
        self._storage.destroy()

    def close(self, exit_code: int, *, keep_cache: bool = False) -> None:
        """PROTOCOL 5.1: the exit code follows every chunk; nothing is appended after it.

        The output is complete in storage, so the cache is let go: an exited exec costs no
        memory for its output, and late readers read it back from storage.  With
        ``keep_cache`` (readers are attached, and likely still reading the newest chunks) it
        stays until :meth:`drop_cache`, so that they keep sharing its chunks.
        """
        if self.closed:
            raise ValueError("exit code set twice")
        self.exit_code = exit_code
        self._storage.seal()
        if not keep_cache:
            self.drop_cache()
        self._notify()

    def drop_cache(self) -> None:
        """Let the memory cache of a closed log go (storage has every chunk it holds)."""
        if self.closed and not self._memory_only:
            self._cache = None
            self._forget_recent()

    def _forget_recent(self) -> None:
        self._recent.clear()
        self._recent_bytes = 0

    def destroy(self) -> None:
        """The exec is removed (PROTOCOL 11.2): its stored output goes with it."""
        self._drop_storage()
        self._cache = None

    # -- reading ------------------------------------------------------------------------------

    def read(
        self, from_sequence: int, max_cost: int | None = None, until: int | None = None
    ) -> Read[Chunk]:
        """Chunks from ``from_sequence`` on, before ``until`` if given; at least one if any,
        else within ``max_cost`` bytes of data.  Chunks evicted before ``from_sequence`` was
        reached are counted in ``gap_before`` (PROTOCOL 6.4)."""
        from_sequence = max(from_sequence, 1)
        end = self._next
        if from_sequence > end:
            raise ExecError(
                ErrorCode.OUT_OF_RANGE,
                f"sequence {from_sequence} is past the next sequence {end}",
            )
        gap = max(0, self.first_sequence - from_sequence)
        start = from_sequence + gap
        stop = end if until is None else max(start, min(until, end))
        if start >= stop:
            return Read([], gap, start)
        if self._cache is not None and start >= self._cache.first_sequence:
            cached = self._cache.read(start, max_cost, stop)
            return Read(cached.items, gap, cached.next_sequence)
        budget = STORAGE_READ if max_cost is None else max_cost
        items, spent = self._read_recent(start, stop, budget)
        following = start + len(items)
        if following < stop and following not in self._recent:
            self._read_stored(following, stop, budget, items, spent)
        return Read(items, gap, start + len(items))

    def _read_recent(self, start: int, stop: int, budget: int) -> tuple[list[Chunk], int]:
        """The chunks from ``start`` that another reader just read back from storage, and
        their size."""
        items: list[Chunk] = []
        spent = 0
        for sequence in range(start, stop):
            chunk = self._recent.get(sequence)
            if chunk is None or (items and spent + len(chunk.data) > budget):
                break
            items.append(chunk)
            spent += len(chunk.data)
        return items, spent

    def _remember(self, items: list[Chunk]) -> None:
        for index, chunk in enumerate(items):
            known = self._recent.get(chunk.sequence)
            if known is not None:
                items[index] = known
                continue
            self._recent[chunk.sequence] = chunk
            self._recent_bytes += len(chunk.data)
        while self._recent_bytes > self._cache_bytes:
            oldest = self._recent.pop(next(iter(self._recent)))
            self._recent_bytes -= len(oldest.data)

    def _read_stored(
        self, start: int, stop: int, budget: int, items: list[Chunk], spent: int
    ) -> None:
        """PROTOCOL 6.7: the same chunks, read back from storage, one segment at a time,
        appended to ``items`` (which hold ``spent`` bytes of data already)."""
        index = bisect.bisect_right(self._first_sequences, start) - 1
        expected = start
        while index < len(self._segments) and expected < stop and (not items or spent < budget):
            expected, spent = self._read_segment(
                self._segments[index], expected, stop, budget, items, spent
            )
            index += 1
            if index < len(self._segments) and expected < self._first_sequences[index]:
                break  # the budget ended inside that segment
        if not items:
            raise RuntimeError(f"the stored output of exec {self.name} is corrupt at chunk {start}")
        self._remember(items)

    def _read_segment(
        self, segment: _Segment, start: int, stop: int, budget: int, items: list[Chunk], spent: int
    ) -> tuple[int, int]:
        """Append to ``items`` the chunks of ``segment`` from ``start``: at least one if
        ``items`` is empty, else while ``spent`` stays within ``budget``.  Returns the next
        sequence to read and what is spent."""
        # Kept, not popped: clients that follow each other read from the same positions.
        hint = self._positions.get(start)
        offset = hint[1] if hint is not None and hint[0] == segment.number else None
        if offset is None:
            offset = 0 if start == segment.first_sequence else self._locate(segment, start)
        want = min(segment.size - offset, max(budget - spent, 0) + _SLACK)
        read = self._storage.read(segment.number, offset, want)
        buffer = memoryview(read)  # the chunks are views of the read: no copy each
        position = 0
        expected = start
        while position + HEADER.size <= len(buffer) and expected < stop:
            sequence, timestamp, length, code = HEADER.unpack_from(buffer, position)
            end = position + HEADER.size + length
            if end > len(buffer) or (items and spent + length > budget):
                break
            if sequence != expected:
                raise RuntimeError(
                    f"the stored output of exec {self.name} is corrupt: chunk {sequence} "
                    f"where {expected} belongs"
                )
            data = buffer[position + HEADER.size : end]
            items.append(Chunk(sequence, timestamp, _CODE_STREAM[code], data))
            spent += length
            position = end
            expected += 1
        if position and offset + position < segment.size:
            if len(self._positions) >= _POSITIONS:
                del self._positions[next(iter(self._positions))]
            self._positions[expected] = (segment.number, offset + position)
        return expected, spent

    def _locate(self, segment: _Segment, sequence: int) -> int:
        """The offset of ``sequence``'s record in ``segment``, by walking its headers."""
        offset = 0
        while offset < segment.size:
            buffer = self._storage.read(segment.number, offset, STORAGE_READ)
            position = 0
            while position + HEADER.size <= len(buffer):
                found, _, length, _ = HEADER.unpack_from(buffer, position)
                if found == sequence:
                    return offset + position
                position += HEADER.size + length
            offset += position
        raise RuntimeError(f"chunk {sequence} of exec {self.name} is missing from its storage")


class Readable(Protocol[T]):
    """What a cursor reads: a :class:`SequencedLog` or an :class:`ExecLog`."""

    @property
    def next_sequence(self) -> int: ...

    def read(
        self, from_sequence: int, max_cost: int | None = None, until: int | None = None
    ) -> Read[T]: ...


# PROTOCOL 4.3: a reader holds only its position, so reading takes no chunk from another.
class Cursor(Generic[T]):
    """One reader's position in a log."""

    def __init__(self, log: Readable[T], from_sequence: int) -> None:
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
