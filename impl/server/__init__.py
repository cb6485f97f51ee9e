"""The execstream reference server and the executor API for engines that embed it.

Run it: ``async with ExecServer(ServerSettings(listen="127.0.0.1:0")) as server: ...``.
Embed it: create an :class:`ExecAttachable`, ``add_to_server`` your ``grpc.aio.Server``, and
hand execs over with ``attachable.executor.register(...)`` (see :class:`Executor`).
"""

from ._errors import ErrorCode, ExecError
from ._executor import ExecHandle, Executor, TeeWriter
from ._log import MAX_CHUNK, Chunk, Cursor, ExecLog, Read, SequencedLog, StorageBudget, Stream
from ._metrics import ServerMetrics
from ._registry import (
    ContainerRecord,
    EventLog,
    ExecControls,
    ExecRecord,
    LifecycleEvent,
    Limits,
    Registry,
)
from ._runner import ProcessRunner
from ._server import (
    RUNTIMES,
    BindError,
    ExecAttachable,
    ExecServer,
    ListenAddress,
    RetentionSweeper,
    ServerSettings,
    SettingError,
    create_runtime,
    receive_options,
)
from ._service import STATUS_OF, ExecService, parse_signal
from ._state import ExecEvent, ExecState, IllegalTransition
from ._state_dir import StateDirInUse
from ._storage import ChunkStorage, DirectoryArea, MemoryArea, StorageArea
from .runtime import (
    ExecSpec,
    FakeRuntime,
    OutputSink,
    ProcessExec,
    ProcessRuntime,
    ResourceSample,
    RunningExec,
    Runtime,
)

__all__ = [
    "MAX_CHUNK",
    "RUNTIMES",
    "STATUS_OF",
    "BindError",
    "Chunk",
    "ChunkStorage",
    "ContainerRecord",
    "Cursor",
    "DirectoryArea",
    "ErrorCode",
    "EventLog",
    "ExecAttachable",
    "ExecControls",
    "ExecError",
    "ExecEvent",
    "ExecHandle",
    "ExecLog",
    "ExecRecord",
    "ExecServer",
    "ExecService",
    "ExecSpec",
    "ExecState",
    "Executor",
    "FakeRuntime",
    "IllegalTransition",
    "LifecycleEvent",
    "Limits",
    "ListenAddress",
    "MemoryArea",
    "OutputSink",
    "ProcessExec",
    "ProcessRunner",
    "ProcessRuntime",
    "Read",
    "Registry",
    "ResourceSample",
    "RetentionSweeper",
    "RunningExec",
    "Runtime",
    "SequencedLog",
    "ServerMetrics",
    "ServerSettings",
    "SettingError",
    "StateDirInUse",
    "StorageArea",
    "StorageBudget",
    "Stream",
    "TeeWriter",
    "create_runtime",
    "parse_signal",
    "receive_options",
]
