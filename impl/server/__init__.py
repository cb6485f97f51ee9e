"""The execstream reference server and the executor API for engines that embed it.

Run it: ``async with ExecServer(ServerSettings(listen="127.0.0.1:0")) as server: ...``.
Embed it: create an :class:`ExecAttachable`, ``add_to_server`` your ``grpc.aio.Server``, and
hand execs over with ``attachable.executor.register(...)`` (see :class:`Executor`).

This package exports what an embedding engine uses, and nothing else: the server and the
attachable, the executor API (:class:`Executor`, :class:`ExecHandle`, :class:`TeeWriter`,
:class:`ExecControls`), the settings (:class:`ServerSettings`, :class:`Limits`, the storage
areas), the runtime contract (:class:`Runtime`, :class:`RunningExec` and their types; the
runtimes themselves are in :mod:`execstream.server.runtime`) and the errors.  The core's
parts (the log, the cursors, the state machine, the service) are private modules: tests and
tools import them from there, and they may change between releases.
"""

from ._errors import ErrorCode, ExecError
from ._executor import ExecHandle, Executor, TeeWriter
from ._log import Stream
from ._registry import ExecControls, Limits, Registry
from ._runner import ExecRunner
from ._server import BindError, ExecAttachable, ExecServer, ServerSettings, SettingError
from ._state import ExecState
from ._state_dir import StateDirInUse
from ._storage import DirectoryArea, MemoryArea, StorageArea
from .runtime import ExecSpec, OutputSink, ResourceSample, RunningExec, Runtime

__all__ = [
    "BindError",
    "DirectoryArea",
    "ErrorCode",
    "ExecAttachable",
    "ExecControls",
    "ExecError",
    "ExecHandle",
    "ExecRunner",
    "ExecServer",
    "ExecSpec",
    "ExecState",
    "Executor",
    "Limits",
    "MemoryArea",
    "OutputSink",
    "Registry",
    "ResourceSample",
    "RunningExec",
    "Runtime",
    "ServerSettings",
    "SettingError",
    "StateDirInUse",
    "StorageArea",
    "Stream",
    "TeeWriter",
]
