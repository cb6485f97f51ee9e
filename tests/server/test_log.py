"""Bounded, sequenced logs (``_log``): numbering, eviction, reads, gaps and cursors.

PROTOCOL 4.2 (one contiguous sequence from 1), 4.4 (chunks of at most 64 KiB), 5.1 (exit after
all output), 6.1 (replay from a sequence), 6.4 (gaps are reported), 6.5 (the output limit),
6.7 (reads from storage give the same chunks).  Read tests run on an open log (newest chunks
in the memory cache) and on a closed one (every read from storage).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from execstream.server._errors import ErrorCode, ExecError
from execstream.server._log import (
    MAX_CHUNK,
    MIN_OUTPUT_LIMIT,
    Chunk,
    Cursor,
    ExecLog,
    SequencedLog,
    Stream,
)
from execstream.server._storage import HEADER, MemoryStorage

KIB = 1024
#: With this limit, segments hold one full chunk each, and three of them are retained.
SMALL_LIMIT = MIN_OUTPUT_LIMIT


def exec_log(limit: int = 0, cache: int = 4 * MAX_CHUNK) -> ExecLog:
    return ExecLog(MemoryStorage(), cache_bytes=cache, max_output_bytes=limit)


def sequences(chunks: list[Chunk]) -> list[int]:
    return [c.sequence for c in chunks]


def filled(n: int, limit: int = 0, size: int = 10, *, closed: bool = False) -> ExecLog:
    """A log holding ``n`` chunks of ``size`` bytes, chunk ``i`` filled with byte ``i % 256``;
    ``closed``: with its exit code, so that it reads everything back from storage."""
    log = exec_log(limit)
    for i in range(1, n + 1):
        log.append(Stream.STDOUT, bytes([i % 256]) * size, timestamp_ns=i)
    if closed:
        log.close(0)
    return log


# -- numbering and chunking ------------------------------------------------------------------


def test_empty_log() -> None:
    log = exec_log()
    assert log.first_sequence == 1
    assert log.next_sequence == 1
    assert log.stored_bytes == 0
    assert log.exit_code is None
    assert not log.closed


def test_sequences_start_at_one_and_are_shared_by_both_streams() -> None:
    log = exec_log()
    log.append(Stream.STDOUT, b"a", 100)
    log.append(Stream.STDERR, b"b", 101)
    log.append(Stream.STDOUT, b"c", 102)
    log.append(Stream.STDERR, b"d", 103)
    chunks = log.read(1).items
    assert [(c.sequence, c.stream, c.data, c.timestamp_ns) for c in chunks] == [
        (1, Stream.STDOUT, b"a", 100),
        (2, Stream.STDERR, b"b", 101),
        (3, Stream.STDOUT, b"c", 102),
        (4, Stream.STDERR, b"d", 103),
    ]
    assert log.next_sequence == 5


@pytest.mark.parametrize(
    ("size", "pieces"),
    [
        (1, [1]),
        (MAX_CHUNK - 1, [MAX_CHUNK - 1]),
        (MAX_CHUNK, [MAX_CHUNK]),
        (MAX_CHUNK + 1, [MAX_CHUNK, 1]),
        (3 * MAX_CHUNK, [MAX_CHUNK] * 3),
        (3 * MAX_CHUNK + 17, [MAX_CHUNK] * 3 + [17]),
    ],
)
def test_append_splits_into_max_chunk_pieces(size: int, pieces: list[int]) -> None:
    data = bytes(i % 251 for i in range(size))
    log = exec_log()
    log.append(Stream.STDERR, data, 7)
    chunks = log.read(1).items
    assert [len(c.data) for c in chunks] == pieces
    assert sequences(chunks) == list(range(1, len(pieces) + 1))
    assert b"".join(c.data for c in chunks) == data
    assert all(c.stream is Stream.STDERR and c.timestamp_ns == 7 for c in chunks)


def test_a_large_write_is_cut_into_views_of_it_and_stored_in_one_write() -> None:
    """A write of several chunks (a read of the process's output) costs no copy per chunk
    and one storage write; the chunks are the same as from one write per chunk (4.4)."""
    storage = MemoryStorage()
    appends: list[int] = []
    original = storage.append

    def counted(segment: int, parts: Sequence[bytes]) -> None:
        appends.append(len(parts))
        original(segment, parts)

    storage.append = counted  # type: ignore[method-assign]
    log = ExecLog(storage, cache_bytes=4 * MAX_CHUNK, max_output_bytes=0)
    data = bytes(i % 251 for i in range(3 * MAX_CHUNK + 17))
    log.append(Stream.STDOUT, data, 7)
    chunks = log.read(1).items
    assert [len(c.data) for c in chunks] == [MAX_CHUNK] * 3 + [17]
    assert all(isinstance(c.data, memoryview) and c.data.obj is data for c in chunks)
    assert appends == [8], "one storage write: a header and the data of each chunk"
    log.close(0)  # every read from storage now: the same chunks
    assert log.read(1).items == chunks


def test_a_large_mutable_write_is_copied_not_viewed() -> None:
    """The engine may reuse its buffer once the write returns: the log keeps its own bytes."""
    log = exec_log(cache=8 * MAX_CHUNK)
    buffer = bytearray(b"a" * (2 * MAX_CHUNK + 1))
    log.append(Stream.STDOUT, buffer, 1)  # type: ignore[arg-type]
    buffer[:] = b"b" * len(buffer)
    assert b"".join(c.data for c in log.read(1).items) == b"a" * (2 * MAX_CHUNK + 1)


def test_chunks_read_back_from_storage_are_views_of_one_read() -> None:
    """PROTOCOL 6.7: the same chunks from storage, cut from one read without a copy each."""
    log = filled(10, size=1000, closed=True)
    items = Cursor(log, 1).read(max_cost=5_000).items
    assert sequences(items) == [1, 2, 3, 4, 5]
    assert [bytes(c.data) for c in items] == [bytes([i]) * 1000 for i in range(1, 6)]
    assert len({id(c.data.obj) for c in items if isinstance(c.data, memoryview)}) == 1
    assert all(isinstance(c.data, memoryview) for c in items)


def test_empty_append_adds_nothing() -> None:
    log = exec_log()
    log.append(Stream.STDOUT, b"", 1)
    assert log.next_sequence == 1
    log.append(Stream.STDOUT, b"x", 2)
    log.append(Stream.STDERR, b"", 3)
    assert log.next_sequence == 2
    assert [c.data for c in log.read(0).items] == [b"x"]


# -- budget and eviction ---------------------------------------------------------------------


def test_eviction_drops_oldest_first_and_stays_within_the_limit() -> None:
    """PROTOCOL 6.5: what storage holds never exceeds the limit, and the newest is kept."""
    log = exec_log(SMALL_LIMIT)
    for i in range(1, 61):
        log.append(Stream.STDOUT, bytes([i]) * (10 * KIB), i)
        assert log.stored_bytes <= SMALL_LIMIT
        retained = log.next_sequence - log.first_sequence
        assert log.stored_bytes == (10 * KIB + HEADER.size) * retained
    assert log.next_sequence == 61
    assert log.first_sequence > 1
    kept = log.read(log.first_sequence, max_cost=1 << 30).items
    assert sequences(kept) == list(range(log.first_sequence, 61))
    assert [c.data[0] for c in kept] == list(range(log.first_sequence, 61))
    # Whole segments go, so what is kept is at least the limit less one segment.
    assert log.stored_bytes > SMALL_LIMIT - (MAX_CHUNK + HEADER.size)


def test_no_limit_keeps_everything() -> None:
    log = exec_log(0)
    for i in range(1, 200):
        log.append(Stream.STDERR, bytes([i % 256]) * (10 * KIB), i)
    assert log.first_sequence == 1
    assert log.read(0).gap_before == 0


def test_newest_chunk_is_always_kept() -> None:
    """PROTOCOL 6.4: a gap is always followed by a chunk, so the newest is never evicted."""
    log: SequencedLog[bytes] = SequencedLog(10, len)
    log._append(b"x" * 4)
    log._append(b"y" * 25)  # alone over budget: kept anyway
    assert log.first_sequence == 2
    assert log.next_sequence == 3
    assert log.read(1).items == [b"y" * 25]
    log._append(b"z")
    assert log.read(1).items == [b"z"]
    assert log.retained_cost == 1


def test_full_size_chunks_leave_three_under_the_small_limit() -> None:
    log = exec_log(SMALL_LIMIT)
    log.append(Stream.STDOUT, b"small", 1)
    for i in range(2, 6):
        log.append(Stream.STDERR, b"s" * MAX_CHUNK, i)
    assert log.first_sequence == 3
    assert log.stored_bytes == 3 * (MAX_CHUNK + HEADER.size)
    assert log.read(0).gap_before == 2


def test_append_larger_than_the_limit_keeps_its_tail() -> None:
    """One append bigger than the limit evicts its own first pieces: a reader that was
    caught up before it gets a gap, never a silent loss (PROTOCOL 6.4, 6.5)."""
    log = exec_log(SMALL_LIMIT)
    cursor = Cursor(log, 0)
    data = bytes(range(256)) * (5 * MAX_CHUNK // 256) + b"tail"
    log.append(Stream.STDOUT, data, 1)  # pieces: five of 64 KiB, then 4 bytes
    assert log.next_sequence == 7
    # Three full chunks and the tail fit the limit; one more full chunk would not.
    assert log.first_sequence == 3
    read = cursor.read(max_cost=1 << 30)
    assert read.gap_before == 2
    assert sequences(read.items) == [3, 4, 5, 6]
    assert b"".join(c.data for c in read.items) == data[2 * MAX_CHUNK :]


def test_budget_must_be_positive_and_exec_log_settings_sane() -> None:
    with pytest.raises(ValueError, match="positive"):
        SequencedLog(0, len)
    with pytest.raises(ValueError, match=str(MAX_CHUNK)):
        exec_log(cache=MAX_CHUNK - 1)
    with pytest.raises(ValueError, match=str(MIN_OUTPUT_LIMIT)):
        exec_log(limit=MIN_OUTPUT_LIMIT - 1)


def test_compaction_keeps_sequences_and_contents() -> None:
    """Many evictions (past the internal compaction threshold) change nothing visible."""
    log: SequencedLog[int] = SequencedLog(5, lambda _: 1)
    for value in range(1, 5001):
        log._append(value)
        assert log.first_sequence == max(1, value - 4)
    assert log.next_sequence == 5001
    read = log.read(1)
    assert read.items == [4996, 4997, 4998, 4999, 5000]
    assert read.gap_before == 4995
    assert log.read(4998).items == [4998, 4999, 5000]


# -- reads -----------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["open", "closed"])
def closed(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


@pytest.mark.parametrize("start", [0, 1])
def test_read_from_zero_or_one_is_everything(start: int, closed: bool) -> None:
    log = filled(5, closed=closed)
    read = log.read(start)
    assert sequences(read.items) == [1, 2, 3, 4, 5]
    assert read.gap_before == 0
    assert read.next_sequence == 6


def test_read_from_the_middle(closed: bool) -> None:
    read = filled(5, closed=closed).read(3)
    assert sequences(read.items) == [3, 4, 5]
    assert read.gap_before == 0
    assert read.next_sequence == 6


def test_read_from_next_sequence_is_empty(closed: bool) -> None:
    log = filled(5, closed=closed)
    read = log.read(6)
    assert read.items == []
    assert read.gap_before == 0
    assert read.next_sequence == 6
    empty = exec_log().read(0)
    assert (empty.items, empty.gap_before, empty.next_sequence) == ([], 0, 1)


@pytest.mark.parametrize("beyond", [7, 8, 1000])
def test_read_past_next_sequence_is_out_of_range(beyond: int, closed: bool) -> None:
    log = filled(5, closed=closed)
    with pytest.raises(ExecError) as caught:
        log.read(beyond)
    assert caught.value.code is ErrorCode.OUT_OF_RANGE
    assert str(beyond) in caught.value.message
    assert "next sequence 6" in caught.value.message


@pytest.mark.parametrize("start", [0, 1, 2, 7])
def test_read_from_evicted_sequence_reports_the_gap(start: int, closed: bool) -> None:
    log = filled(10, SMALL_LIMIT, MAX_CHUNK, closed=closed)  # keeps 8..10
    assert log.first_sequence == 8
    read = log.read(start, max_cost=1 << 30)
    assert read.gap_before == 8 - max(start, 1)
    assert sequences(read.items) == [8, 9, 10]
    assert read.next_sequence == 11


def test_read_at_first_retained_sequence_has_no_gap(closed: bool) -> None:
    log = filled(10, SMALL_LIMIT, MAX_CHUNK, closed=closed)
    read = log.read(8)
    assert read.gap_before == 0
    assert sequences(read.items)[0] == 8


def test_max_cost_limits_a_read(closed: bool) -> None:
    log = filled(6, size=100, closed=closed)
    read = log.read(1, max_cost=250)
    assert sequences(read.items) == [1, 2]
    assert read.next_sequence == 3
    read = log.read(3, max_cost=300)
    assert sequences(read.items) == [3, 4, 5]
    assert log.read(1, max_cost=10**9).next_sequence == 7


@pytest.mark.parametrize("max_cost", [0, 1, 99])
def test_max_cost_below_one_item_still_returns_one(max_cost: int, closed: bool) -> None:
    read = filled(3, size=100, closed=closed).read(2, max_cost=max_cost)
    assert sequences(read.items) == [2]
    assert read.next_sequence == 3


def test_until_stops_before_that_sequence(closed: bool) -> None:
    log = filled(6, closed=closed)
    read = log.read(2, until=5)
    assert sequences(read.items) == [2, 3, 4]
    assert read.next_sequence == 5
    assert log.read(2, until=2).items == []
    assert log.read(2, until=100).next_sequence == 7
    assert sequences(log.read(1, max_cost=25, until=5).items) == [1, 2]


def test_until_below_the_evicted_part_reports_the_gap_without_items(closed: bool) -> None:
    log = filled(10, SMALL_LIMIT, MAX_CHUNK, closed=closed)  # keeps 8..10
    read = log.read(1, until=4)
    assert read.items == []
    assert read.gap_before == 7
    assert read.next_sequence == 8


# -- listeners and close ---------------------------------------------------------------------


def test_listeners_are_notified_on_append_and_close_not_on_empty_append() -> None:
    log = exec_log()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")

    log.add_listener(first)
    log.add_listener(lambda: calls.append("second"))
    log.append(Stream.STDOUT, b"", 1)
    assert calls == []
    log.append(Stream.STDOUT, b"x", 1)
    assert calls == ["first", "second"]
    calls.clear()
    log.append(Stream.STDOUT, b"y" * (2 * MAX_CHUNK + 1), 2)  # three chunks, one notification
    assert calls == ["first", "second"]
    calls.clear()
    log.remove_listener(first)
    log.close(0)
    assert calls == ["second"]


def test_listener_sees_the_appended_chunks() -> None:
    log = exec_log()
    seen: list[int] = []
    log.add_listener(lambda: seen.append(log.next_sequence))
    log.append(Stream.STDERR, b"abc", 1)
    assert seen == [2]


def test_listener_may_remove_itself_while_notified() -> None:
    log = exec_log()
    calls: list[str] = []

    def once() -> None:
        calls.append("once")
        log.remove_listener(once)

    log.add_listener(once)
    log.add_listener(lambda: calls.append("always"))
    log.append(Stream.STDOUT, b"a", 1)
    log.append(Stream.STDOUT, b"b", 2)
    assert calls == ["once", "always", "always"]


def test_close_sets_exit_code_and_ends_appends() -> None:
    log = filled(2)
    log.close(3)
    assert log.closed
    assert log.exit_code == 3
    with pytest.raises(ValueError, match="after the exit code"):
        log.append(Stream.STDOUT, b"late", 9)
    with pytest.raises(ValueError, match="twice"):
        log.close(4)
    assert log.exit_code == 3
    assert log.next_sequence == 3
    assert sequences(log.read(0).items) == [1, 2]


def test_close_with_exit_code_zero_is_closed() -> None:
    log = exec_log()
    log.close(0)
    assert log.closed
    assert log.exit_code == 0


# -- cursors ---------------------------------------------------------------------------------


def test_cursors_fan_out_identical_items() -> None:
    log = exec_log()
    a, b, c = Cursor(log, 0), Cursor(log, 0), Cursor(log, 1)
    log.append(Stream.STDOUT, b"one", 1)
    log.append(Stream.STDERR, b"two", 2)
    got_a = a.read().items
    log.append(Stream.STDOUT, b"three", 3)
    got_a += a.read().items
    got_b = b.read().items  # one read after all appends
    got_c: list[Chunk] = []
    while not c.caught_up:
        got_c += c.read(max_cost=1).items  # one chunk at a time
    assert got_a == got_b == got_c
    assert [(x.sequence, x.data) for x in got_a] == [(1, b"one"), (2, b"two"), (3, b"three")]
    # Reading through one cursor took nothing from the others or the log.
    assert sequences(log.read(1).items) == [1, 2, 3]


def test_cursor_from_middle_and_caught_up() -> None:
    log = filled(4)
    cursor = Cursor(log, 3)
    assert not cursor.caught_up
    read = cursor.read()
    assert sequences(read.items) == [3, 4]
    assert cursor.caught_up
    assert cursor.position == 5
    assert cursor.read().items == []
    log.append(Stream.STDOUT, b"more", 5)
    assert not cursor.caught_up
    assert sequences(cursor.read().items) == [5]
    assert cursor.caught_up


def test_cursor_at_next_sequence_is_caught_up() -> None:
    log = filled(3)
    cursor = Cursor(log, 4)
    assert cursor.caught_up
    assert cursor.read().items == []


@pytest.mark.parametrize("beyond", [5, 99])
def test_cursor_past_next_sequence_is_out_of_range(beyond: int) -> None:
    with pytest.raises(ExecError) as caught:
        Cursor(filled(3), beyond)
    assert caught.value.code is ErrorCode.OUT_OF_RANGE
    assert str(beyond) in caught.value.message


def test_lagging_cursor_gets_a_gap_only_past_the_limit_then_continues() -> None:
    log = exec_log(SMALL_LIMIT, cache=MAX_CHUNK)
    fast, slow = Cursor(log, 0), Cursor(log, 0)
    for i in range(1, 4):
        log.append(Stream.STDOUT, bytes([i]) * MAX_CHUNK, i)
    assert sequences(fast.read().items) == [1, 2, 3]
    assert sequences(slow.read(max_cost=1).items) == [1]
    for i in range(4, 11):  # the limit keeps three full chunks: 8..10
        log.append(Stream.STDOUT, bytes([i]) * MAX_CHUNK, i)
        assert fast.read().gap_before == 0
    read = slow.read(max_cost=1 << 30)
    assert read.gap_before == 6  # 2..7 were evicted
    assert sequences(read.items) == [8, 9, 10]
    assert slow.caught_up
    log.append(Stream.STDERR, b"after", 11)
    read = slow.read()
    assert read.gap_before == 0
    assert sequences(read.items) == [11]


# -- property: every sequence is accounted for exactly once ----------------------------------

_APPEND = st.tuples(
    st.just("append"), st.sampled_from(Stream), st.integers(min_value=0, max_value=200 * KIB)
)
_READ = st.tuples(
    st.just("read"),
    st.integers(min_value=0, max_value=2),  # which lagging cursor
    st.none() | st.integers(min_value=0, max_value=300 * KIB),  # max_cost
)


@settings(max_examples=100, deadline=None)
@given(
    # Small against the output (up to 40 appends of up to 200 KiB), but at least one append,
    # so that a reader who reads after every append never lags.
    limit=st.sampled_from([0, MIN_OUTPUT_LIMIT, 2 * MIN_OUTPUT_LIMIT, 5 * MIN_OUTPUT_LIMIT]),
    cache=st.integers(min_value=MAX_CHUNK, max_value=4 * MAX_CHUNK),
    operations=st.lists(st.one_of(_APPEND, _READ), max_size=40),
)
def test_cursors_account_for_every_sequence_exactly_once(
    limit: int, cache: int, operations: list[tuple[str, object, object]]
) -> None:
    """Whatever the reads and the limit: every chunk once or counted in a gap, gaps only
    where the limit evicted, and the same chunk for every reader (PROTOCOL 6.4, 6.5, 6.7)."""
    log = exec_log(limit, cache)
    by_sequence: dict[int, Chunk] = {}
    # Cursor 0 reads after every append and so never lags; 1..3 read at random times.
    live = Cursor(log, 0)
    laggards = [Cursor(log, 0) for _ in range(3)]
    received: list[list[int]] = [[] for _ in range(4)]
    gaps = [0] * 4
    written = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
    seen = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
    counter = 0

    def take(index: int, cursor: Cursor[Chunk], max_cost: int | None) -> None:
        before = cursor.position
        read = cursor.read(max_cost=max_cost)
        assert read.items or read.next_sequence == before, "a read with nothing moved"
        if read.items:
            assert read.items[0].sequence == before + read.gap_before
            assert sequences(read.items) == list(range(read.items[0].sequence, read.next_sequence))
        if max_cost is not None and len(read.items) > 1:
            assert sum(len(c.data) for c in read.items) <= max_cost
        received[index] += sequences(read.items)
        gaps[index] += read.gap_before
        if read.gap_before:
            assert before + read.gap_before <= log.first_sequence, "a gap only where evicted"
        for chunk in read.items:
            assert by_sequence.setdefault(chunk.sequence, chunk) == chunk
        if index == 0:
            assert read.gap_before == 0
            for chunk in read.items:
                seen[chunk.stream] += chunk.data

    for kind, a, b in operations:
        if kind == "append":
            assert isinstance(a, Stream) and isinstance(b, int)
            counter += 1
            data = bytes([counter % 256]) * b
            written[a] += data
            log.append(a, data, counter)
            assert not limit or log.stored_bytes <= limit
            while not live.caught_up:
                take(0, live, None)
        else:
            assert isinstance(a, int) and (b is None or isinstance(b, int))
            take(a + 1, laggards[a], b)

    for index, cursor in enumerate([live, *laggards]):
        while not cursor.caught_up:
            take(index, cursor, None)
        got = received[index]
        assert got == sorted(set(got)), "items strictly increasing"
        assert len(got) + gaps[index] == log.next_sequence - 1
        if got:
            assert got[-1] == log.next_sequence - 1  # the newest chunk is always received
    assert received[0] == list(range(1, log.next_sequence))
    assert seen == written
    if not limit:
        assert received[1:] == [received[0]] * 3, "no limit: every reader gets everything"


def test_a_kept_cache_serves_the_same_chunks_until_it_is_dropped() -> None:
    log = filled(5)
    live = log.read(1).items
    log.close(0, keep_cache=True)
    assert log.cached_from == 1
    assert log.read(1).items == live
    log.drop_cache()
    assert log.cached_from == log.next_sequence
    assert log.read(1).items == live  # the same chunks, read back from storage (6.7)


def _counted_reads(log: ExecLog) -> list[int]:
    """The offsets of every storage read ``log`` makes from now on."""
    storage = log._storage
    assert isinstance(storage, MemoryStorage)
    reads: list[int] = []
    original = storage.read

    def counted(segment: int, offset: int, size: int) -> bytes:
        reads.append(offset)
        return original(segment, offset, size)

    storage.read = counted  # type: ignore[method-assign]
    return reads


def test_readers_at_the_same_position_of_storage_share_where_it_is() -> None:
    """Clients that follow each other through storage do not each walk a segment's
    records to find their next chunk."""
    log = filled(40, size=1000, closed=True)
    cursors = [Cursor(log, 1) for _ in range(3)]
    for cursor in cursors:
        assert sequences(cursor.read(max_cost=10_000).items) == list(range(1, 11))
    log._forget_recent()  # as if other readers had gone far ahead meanwhile
    reads = _counted_reads(log)
    for cursor in cursors:
        log._forget_recent()
        assert sequences(cursor.read(max_cost=10_000).items) == list(range(11, 21))
    assert len(reads) == 3 and 0 not in reads, "each reader read once, from where it was"


def test_readers_following_each_other_through_storage_share_its_chunks() -> None:
    """PROTOCOL 4.3, 6.7: what one reader read back from storage serves the readers right
    behind it, the very same chunks (so one encoding for all), without reading it again."""
    log = filled(40, size=1000, closed=True)
    reads = _counted_reads(log)
    cursors = [Cursor(log, 1) for _ in range(3)]
    batches = [cursor.read(max_cost=10_000).items for cursor in cursors]
    assert len(reads) == 1
    assert sequences(batches[0]) == list(range(1, 11))
    assert all(a is b for batch in batches[1:] for a, b in zip(batches[0], batch, strict=True))
    # One reader further on: the others get what is shared, then the rest from storage.
    assert sequences(cursors[0].read(max_cost=15_000).items) == list(range(11, 26))
    assert sequences(cursors[1].read(max_cost=20_000).items) == list(range(11, 31))
    assert len(reads) == 3


def test_what_is_shared_from_storage_stays_within_the_cache_budget() -> None:
    log = exec_log(cache=MAX_CHUNK)
    for i in range(1, 9):
        log.append(Stream.STDOUT, bytes([i]) * (MAX_CHUNK // 4), timestamp_ns=i)
    log.close(0)
    cursor = Cursor(log, 1)
    while not cursor.caught_up:
        cursor.read(max_cost=MAX_CHUNK // 4)
    assert log._recent_bytes <= MAX_CHUNK
    assert sorted(log._recent) == [5, 6, 7, 8], "the newest kept, oldest let go"
    log.drop_cache()
    assert not log._recent
