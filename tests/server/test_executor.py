"""The executor API (``_executor``): register, the tee writers, exit, unregister.

The tee writes the file copy first and keeps everything; the log is bounded and may evict
(PROTOCOL 6.5, 6.6); exit closes the log after the last chunk (5.1); unregister forgets the
exec (11.2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from execstream.server._errors import ErrorCode, ExecError
from execstream.server._executor import ExecHandle, Executor
from execstream.server._log import MAX_CHUNK, Chunk, Stream
from execstream.server._registry import Limits, Registry
from execstream.server._state import ExecState, IllegalTransition
from execstream.server._storage import DirectoryArea, MemoryArea


class FakeClock:
    def __init__(self) -> None:
        self.wall = 1_700_000_000_000_000_000
        self.mono = 50.0

    def wall_ns(self) -> int:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class FakeControls:
    """An :class:`ExecControls` that records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    async def write_stdin(self, data: bytes) -> None:
        self.calls.append(data)

    def close_stdin(self) -> None:
        self.calls.append("close")

    def resize(self, width: int, height: int) -> None:
        self.calls.append((width, height))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock, tmp_path: Path) -> Registry:
    limits = Limits(memory_cache_bytes=MAX_CHUNK, max_output_bytes=0)
    return Registry(limits, clock, storage=DirectoryArea(tmp_path / "logs"))


@pytest.fixture
def executor(registry: Registry) -> Executor:
    return Executor(registry)


def chunks(handle: ExecHandle) -> list[Chunk]:
    return handle.record.log.read(0, max_cost=1 << 30).items


def stream_data(handle: ExecHandle, stream: Stream) -> bytes:
    return b"".join(c.data for c in chunks(handle) if c.stream is stream)


def stored_files(tmp_path: Path, container_id: str, exec_id: str) -> list[Path]:
    name = re.compile(re.escape(exec_id) + r"\.[0-9]+\.[0-9]+\.seg")  # EXEC.SERIAL.NNNNNNNN.seg
    directory = tmp_path / "logs" / container_id
    return sorted(f for f in directory.glob("*.seg") if name.fullmatch(f.name))


def event_types(registry: Registry) -> list[tuple[str, str]]:
    return [(e.event_type, e.exec_id) for e in registry.events.read(0).items]


# -- register --------------------------------------------------------------------------------


def test_register_gives_a_pending_handle_whose_output_is_stored_in_its_directory(
    executor: Executor, registry: Registry, tmp_path: Path
) -> None:
    handle = executor.register("c1", "e1")
    assert (handle.container_id, handle.exec_id) == ("c1", "e1")
    assert handle.record is registry.get("c1", "e1")
    assert handle.record.state is ExecState.PENDING
    assert executor.handle(handle.record) is handle
    assert event_types(registry) == [("created", ""), ("registered", "e1")]
    handle.stdout.write(b"hello")
    files = stored_files(tmp_path, "c1", "e1")
    assert len(files) == 1
    assert b"hello" in files[0].read_bytes()
    assert files[0].stat().st_size == handle.record.log.stored_bytes


def test_register_passes_tty(executor: Executor) -> None:
    handle = executor.register("c1", "e1", tty=True)
    assert handle.record.tty
    assert handle.record.terminal_size == (80, 24)


def test_register_refused_keeps_the_existing_handle(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.stdout.write(b"first")
    with pytest.raises(ExecError) as caught:
        executor.register("c1", "e1")
    assert caught.value.code is ErrorCode.ALREADY_EXISTS
    assert executor.handle(handle.record) is handle
    handle.stdout.write(b" second")
    handle.exit(0)
    assert stream_data(handle, Stream.STDOUT) == b"first second"


def test_register_with_a_bad_id_creates_nothing(executor: Executor, tmp_path: Path) -> None:
    with pytest.raises(ExecError) as caught:
        executor.register("c1", "../escape")
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "logs").exists()


# -- the tee writers -------------------------------------------------------------------------


def test_writers_append_to_the_log_in_one_sequence(executor: Executor, clock: FakeClock) -> None:
    handle = executor.register("c1", "e1")
    handle.stdout.write(b"out1")
    clock.wall += 5
    handle.stderr.write(b"err1")
    handle.stdout.write(b"out2")
    assert [(c.sequence, c.stream, c.data) for c in chunks(handle)] == [
        (1, Stream.STDOUT, b"out1"),
        (2, Stream.STDERR, b"err1"),
        (3, Stream.STDOUT, b"out2"),
    ]
    # PROTOCOL 4.5: the time the server received the bytes, from the registry's clock.
    assert [c.timestamp_ns - 1_700_000_000_000_000_000 for c in chunks(handle)] == [0, 5, 5]
    assert handle.stdout.bytes_written == 8
    assert handle.stderr.bytes_written == 4


def test_empty_write_adds_nothing(executor: Executor, tmp_path: Path) -> None:
    handle = executor.register("c1", "e1")
    handle.stdout.write(b"")
    handle.stderr.write(b"")
    handle.exit(0)
    assert chunks(handle) == []
    assert handle.stdout.bytes_written == 0
    assert handle.record.log.stored_bytes == 0
    assert stored_files(tmp_path, "c1", "e1") == []


def test_storage_keeps_everything_the_memory_cache_let_go(executor: Executor) -> None:
    """PROTOCOL 6.7: a reader far behind the cache gets every chunk back from storage."""
    handle = executor.register("c1", "e1")
    out, err = bytearray(), bytearray()
    for i in range(40):  # 40 * 3 KiB * 2 streams: far over the 64 KiB cache
        piece = os.urandom(3 * 1024)
        out += piece
        handle.stdout.write(piece)
        err += bytes([i]) * 3000
        handle.stderr.write(bytes([i]) * 3000)
    big = os.urandom(3 * MAX_CHUNK + 5)  # one write over the chunk size
    out += big
    handle.stdout.write(big)
    log = handle.record.log
    assert log.cached_from > 1, "the memory cache must have let the oldest chunks go"
    assert log.first_sequence == 1, "nothing is evicted without an output limit"
    every = chunks(handle)
    assert [c.sequence for c in every] == list(range(1, log.next_sequence))
    assert all(len(c.data) <= MAX_CHUNK for c in every)
    assert every[-1].data == big[-5:]
    handle.exit(0)
    assert stream_data(handle, Stream.STDOUT) == out
    assert stream_data(handle, Stream.STDERR) == err
    assert handle.stdout.bytes_written == len(out)
    assert handle.stderr.bytes_written == len(err)


def test_output_is_stored_before_the_clients_are_told(executor: Executor, tmp_path: Path) -> None:
    """The tee's order: when a client is told of new output, storage already holds it, so
    the file copy is never behind what clients were sent."""
    handle = executor.register("c1", "e1")
    on_disk_at_notify: list[bytes] = []

    def look() -> None:
        on_disk_at_notify.append(
            b"".join(f.read_bytes() for f in stored_files(tmp_path, "c1", "e1"))
        )

    handle.record.log.add_listener(look)
    handle.stdout.write(b"hello")
    handle.stdout.write(b" world")
    assert [b"hello" in seen for seen in on_disk_at_notify] == [True, True]
    assert [b" world" in seen for seen in on_disk_at_notify] == [False, True]


def test_writes_after_exit_go_nowhere_and_do_not_raise(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.started()
    handle.stdout.write(b"before")
    handle.exit(0)
    log = handle.record.log
    sequence, stored = log.next_sequence, log.stored_bytes
    handle.stdout.write(b"late out")
    handle.stderr.write(b"late err")
    # The log is closed: PROTOCOL 5.1, exit is the last thing.
    assert (log.next_sequence, log.stored_bytes) == (sequence, stored)
    assert log.exit_code == 0
    assert [c.data for c in chunks(handle)] == [b"before"]


def test_unregister_removes_the_stored_output(executor: Executor, tmp_path: Path) -> None:
    handle = executor.register("c1", "e1")
    handle.stdout.write(b"x" * 1000)
    handle.exit(0)
    assert stored_files(tmp_path, "c1", "e1")
    handle.unregister()
    assert not (tmp_path / "logs" / "c1").exists()


def test_memory_area_keeps_output_without_files(clock: FakeClock, tmp_path: Path) -> None:
    registry = Registry(Limits(), clock, storage=MemoryArea())
    handle = Executor(registry).register("c1", "e1")
    handle.stdout.write(b"a")
    handle.stderr.write(b"b")
    handle.exit(1)
    assert [(c.stream, c.data) for c in chunks(handle)] == [
        (Stream.STDOUT, b"a"),
        (Stream.STDERR, b"b"),
    ]
    handle.unregister()
    assert registry.find("c1", "e1") is None
    assert list(tmp_path.iterdir()) == []


def test_writes_reach_every_client_cursor(executor: Executor, registry: Registry) -> None:
    handle = executor.register("c1", "e1")
    early = registry.attach(handle.record, 0)
    handle.stdout.write(b"x" * 100)
    late = registry.attach(handle.record, 0)
    handle.stderr.write(b"y" * 100)
    assert early.read().items == late.read().items == chunks(handle)


# -- started, exit ---------------------------------------------------------------------------


def test_started_moves_to_running_and_stores_controls(
    executor: Executor, registry: Registry, clock: FakeClock
) -> None:
    handle = executor.register("c1", "e1")
    controls = FakeControls()
    clock.wall += 42
    handle.started(controls)
    assert handle.record.state is ExecState.RUNNING
    assert handle.record.controls is controls
    assert handle.record.started_at_ns == clock.wall
    assert registry.events.read(0).items[-1].event_type == "started"
    assert registry.events.read(0).items[-1].status == "running"


def test_started_without_controls(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.started()
    assert handle.record.state is ExecState.RUNNING
    assert handle.record.controls is None


def test_started_twice_is_illegal(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.started(FakeControls())
    with pytest.raises(IllegalTransition):
        handle.started(FakeControls())
    assert handle.record.state is ExecState.RUNNING


def test_exit_closes_the_log_and_emits_exited(
    executor: Executor, registry: Registry, clock: FakeClock
) -> None:
    handle = executor.register("c1", "e1")
    handle.started(FakeControls())
    handle.stdout.write(b"output")
    notified: list[int | None] = []
    handle.record.log.add_listener(lambda: notified.append(handle.record.log.exit_code))
    clock.wall += 7
    clock.mono += 3
    handle.exit(143, "terminated")
    record = handle.record
    assert record.state is ExecState.EXITED
    assert record.log.closed
    assert record.exit_code == 143
    assert notified == [143]
    assert record.controls is None  # no stdin or resize once exited
    assert record.finished_at_ns == clock.wall
    assert record.exited_at == clock.mono
    last = registry.events.read(0).items[-1]
    assert (last.event_type, last.exec_id, last.status, last.exit_code, last.message) == (
        "exited",
        "e1",
        "exited",
        143,
        "terminated",
    )
    assert last.timestamp_ns == clock.wall
    assert [c.data for c in chunks(handle)] == [b"output"]


def test_exit_without_start_for_a_failed_spawn(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.exit(127, "not executable")
    assert handle.record.state is ExecState.EXITED
    assert handle.record.exit_code == 127


def test_exit_twice_is_illegal(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.exit(0)
    with pytest.raises(IllegalTransition):
        handle.exit(1)
    assert handle.record.exit_code == 0


# -- unregister ------------------------------------------------------------------------------


def test_unregister_forgets_everything(
    executor: Executor, registry: Registry, tmp_path: Path
) -> None:
    handle = executor.register("c1", "e1")
    other = executor.register("c1", "e2")
    handle.started()
    handle.stdout.write(b"data")
    handle.exit(0)
    other.stdout.write(b"other")
    record = handle.record
    assert stored_files(tmp_path, "c1", "e1")
    handle.unregister()
    assert record.state is ExecState.REMOVED
    assert registry.find("c1", "e1") is None
    with pytest.raises(ExecError) as caught:
        registry.get("c1", "e1")
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert not stored_files(tmp_path, "c1", "e1")
    with pytest.raises(KeyError):
        executor.handle(record)
    # The other exec of the container is untouched.
    assert executor.handle(other.record) is other
    assert stored_files(tmp_path, "c1", "e2")
    assert event_types(registry)[-1] == ("unregistered", "e1")


def test_unregister_of_the_last_exec_removes_the_container(
    executor: Executor, registry: Registry
) -> None:
    handle = executor.register("c1", "e1")
    handle.exit(0)
    handle.unregister()
    assert event_types(registry)[-2:] == [("unregistered", "e1"), ("removed", "")]
    with pytest.raises(ExecError) as caught:
        registry.container("c1")
    assert caught.value.code is ErrorCode.NOT_FOUND


def test_unregister_of_the_last_exec_leaves_no_container_directory(
    executor: Executor, tmp_path: Path
) -> None:
    """Nothing outlives its container: the output directory of a removed container goes too,
    or a long-running server collects one empty directory per container ID it ever saw."""
    first = executor.register("c1", "e1")
    second = executor.register("c1", "e2")
    first.stdout.write(b"1")
    second.stdout.write(b"2")
    first.exit(0)
    first.unregister()
    assert (tmp_path / "logs" / "c1").is_dir()  # still holds e2
    second.exit(0)
    second.unregister()
    assert list((tmp_path / "logs").iterdir()) == []


def test_unregister_of_a_running_exec(executor: Executor, registry: Registry) -> None:
    handle = executor.register("c1", "e1")
    handle.started(FakeControls())
    handle.unregister()
    assert handle.record.state is ExecState.REMOVED
    assert registry.find("c1", "e1") is None


def test_same_ids_can_be_registered_again_with_a_fresh_tee(executor: Executor) -> None:
    old = executor.register("c1", "e1")
    old.stdout.write(b"old output")
    old.exit(0)
    old.unregister()
    new = executor.register("c1", "e1")
    assert new is not old
    assert executor.handle(new.record) is new
    new.stdout.write(b"new")
    new.exit(0)
    assert [(c.sequence, c.data) for c in chunks(new)] == [(1, b"new")]


def test_unregister_twice_is_illegal(executor: Executor) -> None:
    handle = executor.register("c1", "e1")
    handle.unregister()
    with pytest.raises(IllegalTransition):
        handle.unregister()
