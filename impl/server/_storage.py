"""Where an exec's output log keeps its chunks: numbered segments of self-describing records.

Theory of operation.  An :class:`~execstream.server._log.ExecLog` writes every chunk once, as
one record (a fixed header, then the data), to the newest of its numbered segments, and reads
records back by segment and offset.  Whole segments are removed, oldest first, when the output
limit or the server-wide cap evicts them (PROTOCOL 6.5), as Docker's json-file driver rotates
whole files; a record never moves, so a reader's (segment, offset) stays valid until its
segment goes.

Two areas hold segments: :class:`DirectoryArea` (the reference server: one directory per
container under the state directory, one file per segment of each of its execs, written with
one ``writev`` per append and read with ``pread``, so the page cache serves readers that are
just behind the writer) and
:class:`MemoryArea` (tests, and engines that want no files).  Both are plain blocking calls,
bounded in size by the caller: no asyncio and no grpc imports.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import struct
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

__all__ = [
    "HEADER",
    "ChunkStorage",
    "DirectoryArea",
    "MemoryArea",
    "StorageArea",
]

#: A record's header: sequence, timestamp (ns), data length, stream (0 stdout, 1 stderr).
HEADER = struct.Struct("<QqIB")


class ChunkStorage(Protocol):
    """One exec's segments."""

    def append(self, segment: int, parts: Sequence[bytes | memoryview]) -> None:
        """Write ``parts`` at the end of ``segment`` (created on first use); all or raise.

        A part is ``bytes`` or a view of ``bytes`` (a chunk cut from a larger write)."""

    def read(self, segment: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of ``segment`` from ``offset`` (fewer at its end)."""

    def remove(self, segment: int) -> None:
        """Forget a segment; reading it afterwards is an error."""

    def seal(self) -> None:
        """No more appends: release what writing held (the output ended)."""

    def destroy(self) -> None:
        """Remove every segment and whatever holds them."""


class StorageArea(Protocol):
    """Hands out one :class:`ChunkStorage` per exec."""

    def open(self, container_id: str, exec_id: str) -> ChunkStorage: ...

    def close(self) -> None:
        """Release what the area itself holds (a temporary directory it made)."""


class MemoryStorage:
    """Segments as byte arrays: for tests and for engines that want no files."""

    def __init__(self) -> None:
        self._segments: dict[int, bytearray] = {}

    def append(self, segment: int, parts: Sequence[bytes | memoryview]) -> None:
        self._segments.setdefault(segment, bytearray()).extend(b"".join(parts))

    def read(self, segment: int, offset: int, size: int) -> bytes:
        return bytes(self._segments[segment][offset : offset + size])

    def remove(self, segment: int) -> None:
        self._segments.pop(segment, None)

    def seal(self) -> None:
        pass

    def destroy(self) -> None:
        self._segments.clear()


class MemoryArea:
    def open(self, container_id: str, exec_id: str) -> ChunkStorage:
        return MemoryStorage()

    def close(self) -> None:
        pass


class DirectoryStorage:
    """Segments as files ``NAME.NNNNNNNN.seg`` in their container's directory, ``NAME``
    unique to this storage (the area makes it ``EXEC.SERIAL``).

    No directory per exec: on ext4 making one, the first file in it, and removing both cost
    0.4-0.8 ms per exec (a micro-benchmark; the 300-exec burst under cProfile), where a file
    in a shared directory costs a create and an unlink.  The name parses from the right
    (IDs hold no ``/``; serial and segment number no ``.``), so two execs never share a
    file.

    Only two descriptors are ever open: the newest segment's, for appending, and the one last
    read, since followers of one exec mostly read the same segment.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self._prefix = f"{name}."
        self._segments: set[int] = set()  # on disk, for destroy to remove without a listing
        self._writing: tuple[int, int] | None = None  # (segment, fd)
        self._reading: tuple[int, int] | None = None

    def _path(self, segment: int) -> str:
        return f"{self.directory}/{self._prefix}{segment:08d}.seg"

    def append(self, segment: int, parts: Sequence[bytes | memoryview]) -> None:
        if self._writing is None or self._writing[0] != segment:
            self._close_writer()
            path = self._path(segment)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:  # the container's first output, or its directory went
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, flags, 0o600)
            self._segments.add(segment)
            self._writing = (segment, fd)
        fd = self._writing[1]
        total = sum(len(part) for part in parts)
        written = os.writev(fd, parts)
        if written != total:  # a short write: finish it, or raise trying
            rest = b"".join(parts)[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]

    def read(self, segment: int, offset: int, size: int) -> bytes:
        if self._reading is None or self._reading[0] != segment:
            self._close_reader()
            self._reading = (segment, os.open(self._path(segment), os.O_RDONLY))
        return os.pread(self._reading[1], size, offset)

    def remove(self, segment: int) -> None:
        if self._writing is not None and self._writing[0] == segment:
            self._close_writer()
        if self._reading is not None and self._reading[0] == segment:
            self._close_reader()
        self._segments.discard(segment)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(segment))

    def seal(self) -> None:
        self._close_writer()

    def destroy(self) -> None:
        self._close_writer()
        self._close_reader()
        for segment in sorted(self._segments):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(segment))
        if self._segments:
            self._segments.clear()
            with contextlib.suppress(OSError):  # the container's directory, once empty
                self.directory.rmdir()

    def _close_writer(self) -> None:
        if self._writing is not None:
            os.close(self._writing[1])
            self._writing = None

    def _close_reader(self) -> None:
        if self._reading is not None:
            os.close(self._reading[1])
            self._reading = None


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class DirectoryArea:
    """One directory per container, ``ROOT/CONTAINER``, made when its first output is
    stored (``ROOT`` with it).  One area per root: the serials in the file names are its own.

    Without a root, a fresh temporary directory is made on first use and removed when the
    area is closed or garbage-collected.
    """

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        # In each exec's file names: an exec removed while a client still reads its output
        # (PROTOCOL 11.2) keeps its files apart from a new exec registered with its IDs.
        self._serials = itertools.count(1)
        self._finalizer: weakref.finalize[[str], DirectoryArea] | None = None

    @property
    def root(self) -> Path:
        if self._root is None:
            path = tempfile.mkdtemp(prefix="execstream-logs-")
            self._finalizer = weakref.finalize(self, _remove_tree, path)
            self._root = Path(path)
        return self._root

    def open(self, container_id: str, exec_id: str) -> ChunkStorage:
        # IDs are validated before an exec is registered (PROTOCOL 2.1); checked again here
        # because they become path components.
        if not (_SAFE.fullmatch(container_id) and _SAFE.fullmatch(exec_id)):
            raise ValueError(f"not a safe path component: {container_id!r}/{exec_id!r}")
        return DirectoryStorage(self.root / container_id, f"{exec_id}.{next(self._serials)}")

    def close(self) -> None:
        """Remove the temporary root, if this area made one."""
        if self._finalizer is not None:
            self._finalizer()


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
