"""The exec log's storage (``_storage`` and the storage side of ``_log``).

PROTOCOL 6.5 (output retained up to the limit, oldest evicted first, the server-wide cap) and
6.7 (a reader far behind gets the very same chunks back from storage), with real files.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from execstream.server._log import (
    MAX_CHUNK,
    MIN_OUTPUT_LIMIT,
    Chunk,
    Cursor,
    ExecLog,
    StorageBudget,
    Stream,
)
from execstream.server._storage import HEADER, DirectoryArea, MemoryStorage

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _remove_the_logs(tmp_path: Path) -> Iterator[None]:
    """Tens of MiB per test: removed before the kernel writes them back (pytest keeps its
    temporary directories, and the writeback would stall later tests in disk sleep)."""
    yield
    shutil.rmtree(tmp_path / "logs", ignore_errors=True)


def disk_log(
    tmp_path: Path,
    exec_id: str = "e1",
    *,
    limit: int = 0,
    cache: int = MAX_CHUNK,
    budget: StorageBudget | None = None,
) -> ExecLog:
    storage = DirectoryArea(tmp_path / "logs").open("c1", exec_id)
    return ExecLog(
        storage, cache_bytes=cache, max_output_bytes=limit, budget=budget, name=f"c1/{exec_id}"
    )


def write_random(log: ExecLog, total: int, seed: int = 1) -> list[Chunk]:
    """Appends of random sizes (1 byte to 200 KiB) on both streams; the chunks as appended."""
    rng = random.Random(seed)
    live: list[Chunk] = []
    cursor = Cursor(log, log.next_sequence)
    written = 0
    while written < total:
        size = rng.choice([1, 17, 4096, 65535, MAX_CHUNK, 200 * 1024, rng.randrange(1, 90_000)])
        stream = rng.choice([Stream.STDOUT, Stream.STDERR])
        log.append(stream, rng.randbytes(size), written)
        written += size
        while not cursor.caught_up:  # a reader that keeps up sees the chunks as they come
            live += cursor.read().items
    return live


def read_all(log: ExecLog, from_sequence: int = 0, max_cost: int | None = None) -> list[Chunk]:
    cursor = Cursor(log, from_sequence)
    chunks: list[Chunk] = []
    while not cursor.caught_up:
        read = cursor.read(max_cost)
        assert read.gap_before == 0
        chunks += read.items
    return chunks


def segment_files(tmp_path: Path, exec_id: str = "e1") -> list[Path]:
    # EXEC.SERIAL.NNNNNNNN.seg: the digits tell one exec's files from those of "EXEC.more"
    name = re.compile(re.escape(exec_id) + r"\.[0-9]+\.[0-9]+\.seg")
    return sorted(f for f in (tmp_path / "logs" / "c1").glob("*.seg") if name.fullmatch(f.name))


# -- every chunk back from storage ----------------------------------------------------------


@pytest.mark.parametrize("max_cost", [None, 1, 300_000])
def test_reader_far_behind_the_cache_gets_identical_chunks(
    tmp_path: Path, max_cost: int | None
) -> None:
    log = disk_log(tmp_path)
    live = write_random(log, 24 * MIB)
    assert log.cached_from > 100, "most chunks must have left the 64 KiB cache"
    assert read_all(log, 0, max_cost) == live
    log.close(0)
    assert read_all(log, 0, max_cost) == live, "after exit, every read is from storage"


def test_reading_can_start_at_any_sequence(tmp_path: Path) -> None:
    log = disk_log(tmp_path)
    live = write_random(log, 12 * MIB, seed=2)
    log.close(0)
    rng = random.Random(3)
    starts = [1, 2, len(live), *rng.sample(range(1, len(live) + 1), 60)]
    for start in starts:
        read = log.read(start, max_cost=1)
        assert read.gap_before == 0
        assert read.items == [live[start - 1]]
    assert read_all(log, len(live) // 2) == live[len(live) // 2 - 1 :]


def test_appends_while_a_reader_catches_up_from_storage(tmp_path: Path) -> None:
    log = disk_log(tmp_path)
    rng = random.Random(4)
    appended: list[Chunk] = []
    mirror = Cursor(log, 0)
    lagging = Cursor(log, 0)
    got: list[Chunk] = []
    for _ in range(400):
        log.append(rng.choice(list(Stream)), rng.randbytes(rng.randrange(1, 150_000)), 1)
        appended += mirror.read(max_cost=1 << 40).items
        if rng.random() < 0.3:  # reads now and then, small: stays far behind
            read = lagging.read(max_cost=rng.choice([1, 50_000, 200_000]))
            assert read.gap_before == 0
            got += read.items
    while not lagging.caught_up:
        got += lagging.read().items
    assert got == appended


def test_memory_does_not_grow_with_output_or_lag(tmp_path: Path) -> None:
    """Server memory holds the cache, not the output, however far behind a reader is."""
    cache = 1 * MIB
    log = disk_log(tmp_path, cache=cache)
    behind = Cursor(log, 0)
    block = os.urandom(200 * 1024)
    tracemalloc.start()
    try:
        for _ in range(320):  # 64 MiB
            log.append(Stream.STDOUT, block, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < cache + 4 * MIB, f"peak {peak} bytes for 64 MiB of output"
    assert behind.read(max_cost=1).items[0].sequence == 1


# -- the output limit, on disk --------------------------------------------------------------


def test_eviction_removes_whole_segment_files_oldest_first(tmp_path: Path) -> None:
    limit = 4 * MIB
    log = disk_log(tmp_path, limit=limit)
    live = write_random(log, 40 * MIB, seed=5)
    files = segment_files(tmp_path)
    on_disk = sum(f.stat().st_size for f in files)
    assert on_disk == log.stored_bytes <= limit
    assert on_disk > limit - limit // 8 - MAX_CHUNK - HEADER.size
    numbers = [int(f.name.split(".")[2]) for f in files]
    assert numbers == sorted(numbers)
    read = log.read(0, max_cost=1 << 40)
    first = log.first_sequence
    assert read.gap_before == first - 1
    assert read_all(log, first) == live[first - 1 :], "the newest chunks, unchanged"


def test_destroy_removes_the_exec_directory(tmp_path: Path) -> None:
    log = disk_log(tmp_path)
    write_random(log, 2 * MIB)
    assert segment_files(tmp_path)
    log.close(0)
    log.destroy()
    assert not (tmp_path / "logs" / "c1").exists()


def test_execs_of_a_container_share_its_directory_not_their_files(tmp_path: Path) -> None:
    """Exec IDs may hold dots: one that looks like another's segment file name still gets
    files of its own, and removing either leaves the other's output whole."""
    first, second = disk_log(tmp_path, "a", limit=4 * MIB), disk_log(tmp_path, "a.1")
    first_chunks = write_random(first, 6 * MIB, seed=9)  # several segments, some evicted
    second_chunks = write_random(second, MIB, seed=10)
    assert segment_files(tmp_path, "a") and segment_files(tmp_path, "a.1")
    first.close(0)
    second.close(0)
    first.destroy()
    assert not segment_files(tmp_path, "a")
    assert read_all(second) == second_chunks
    assert first_chunks
    second.destroy()
    assert not (tmp_path / "logs" / "c1").exists()


def test_an_exec_without_output_makes_no_directory(tmp_path: Path) -> None:
    log = disk_log(tmp_path)
    log.close(0)
    log.destroy()
    assert not (tmp_path / "logs").exists()


def test_only_two_descriptors_per_log(tmp_path: Path) -> None:
    log = disk_log(tmp_path, limit=64 * MIB)
    before = len(os.listdir("/proc/self/fd"))
    write_random(log, 40 * MIB, seed=6)
    read_all(log, 0)
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    log.close(0)
    read_all(log, 0)
    log.destroy()
    assert len(os.listdir("/proc/self/fd")) == before


# -- the server-wide cap --------------------------------------------------------------------


def test_cap_evicts_the_oldest_segments_across_execs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget = StorageBudget(cap=8 * MIB)
    old = disk_log(tmp_path, "old", limit=4 * MIB, budget=budget)
    write_random(old, 3 * MIB, seed=7)
    old.close(0)
    assert old.first_sequence == 1
    new = disk_log(tmp_path, "new", limit=8 * MIB, budget=budget)
    with caplog.at_level(logging.WARNING, logger="execstream.server"):
        write_random(new, 8 * MIB, seed=8)
    assert budget.used == old.stored_bytes + new.stored_bytes <= 8 * MIB
    assert old.first_sequence > 1, "the older exec's oldest output went first"
    assert old.read(0).gap_before == old.first_sequence - 1
    assert "over the server's cap" in caplog.text and "c1/old" in caplog.text
    old.destroy()
    assert budget.used == new.stored_bytes


def test_cap_never_takes_an_execs_newest_segment(tmp_path: Path) -> None:
    budget = StorageBudget(cap=MIN_OUTPUT_LIMIT)
    logs = [disk_log(tmp_path, f"e{i}", limit=MIN_OUTPUT_LIMIT, budget=budget) for i in range(4)]
    for log in logs:
        log.append(Stream.STDOUT, b"x" * MAX_CHUNK, 1)
    # Four newest segments over a cap of about four: nothing evictable, nothing lost.
    for log in logs:
        log.append(Stream.STDOUT, b"newest", 2)
        assert log.read(log.next_sequence - 1).items[0].data == b"newest"


def test_the_cap_forgets_every_segment_that_goes(tmp_path: Path) -> None:
    """However a segment goes (its exec's own limit, the cap, the exec's removal), the cap
    stops tracking it: a long-lived exec that rotates its output costs the cap nothing per
    segment it ever wrote."""
    budget = StorageBudget(cap=64 * MIB)
    rotating = disk_log(tmp_path, "rotating", limit=MIN_OUTPUT_LIMIT, budget=budget)
    for _ in range(200):  # 200 segments' worth through a limit that keeps a few
        rotating.append(Stream.STDOUT, b"r" * MAX_CHUNK, 1)
    held = budget.segments
    assert 1 <= held <= MIN_OUTPUT_LIMIT // MAX_CHUNK + 1
    other = disk_log(tmp_path, "other", limit=MIN_OUTPUT_LIMIT, budget=budget)
    other.append(Stream.STDOUT, b"o" * MAX_CHUNK, 1)
    assert budget.segments == held + 1
    rotating.destroy()
    assert budget.segments == 1
    other.destroy()
    assert budget.segments == 0 and budget.used == 0


# -- storage that fails ---------------------------------------------------------------------


class FailingStorage(MemoryStorage):
    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.appends = 0
        self.fail_after = fail_after

    def append(self, segment: int, parts: Sequence[bytes | memoryview]) -> None:
        self.appends += 1
        if self.appends > self.fail_after:
            raise OSError(28, "No space left on device")
        super().append(segment, parts)


def test_failed_storage_goes_on_in_memory_with_honest_gaps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = ExecLog(FailingStorage(fail_after=5), cache_bytes=MAX_CHUNK, max_output_bytes=0)
    behind = Cursor(log, 0)
    with caplog.at_level(logging.ERROR, logger="execstream.server"):
        for i in range(20):
            log.append(Stream.STDOUT, bytes([i]) * 20_000, i)
    assert "No space left on device" in caplog.text
    assert caplog.text.count("in memory only") == 1
    read = behind.read(max_cost=1 << 30)
    assert read.gap_before == log.first_sequence - 1 > 0
    assert [c.sequence for c in read.items] == list(range(log.first_sequence, 21))
    assert read.items[-1].data == bytes([19]) * 20_000
