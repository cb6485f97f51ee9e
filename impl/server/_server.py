"""The reference server: settings, the retention sweep, and a grpc.aio server around them.

Lifecycle is explicit, as in grpclib: :meth:`ExecServer.start` binds and serves,
:meth:`ExecServer.close` stops accepting, ends open streams with UNAVAILABLE, kills the execs
it runs and frees its state directory, and ``async with`` does both.  An engine that has its
own ``grpc.aio.Server`` uses :class:`ExecAttachable` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import grpc.aio

from execstream import wire

from ._errors import SettingError
from ._executor import Executor
from ._metrics import MetricsEndpoint, ServerMetrics
from ._registry import Clock, ExecRecord, Limits, Registry
from ._runner import ExecRunner
from ._service import ExecService
from ._standard import HEALTH_SERVICE, HealthReporter, add_reflection
from ._state_dir import StateDirLock
from ._storage import DirectoryArea
from .runtime import Runtime
from .runtime.process import ProcessRuntime
from .runtime.runc import RuncRuntime

__all__ = [
    "RUNTIMES",
    "BindError",
    "ExecAttachable",
    "ExecServer",
    "ListenAddress",
    "RetentionSweeper",
    "ServerSettings",
    "SettingError",
    "create_runtime",
    "receive_options",
]

log = logging.getLogger("execstream.server")

#: gRPC's default receive limit; raised when the stdin limit needs more (PROTOCOL 7.2).
_GRPC_RECEIVE_LIMIT = 4 * 1024 * 1024
#: Room for a SessionRequest's framing around the largest stdin accepted.
_FRAMING = 64 * 1024


class BindError(OSError):
    """The address of ``setting`` cannot be served: in use, taken by a live server, not a
    socket."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class _ClientGone(logging.Filter):
    """grpc.aio logs ``ERROR ... ExecuteBatchError raised in core by servicer method`` with a
    traceback when a client cancels or disconnects while a handler writes to it.  That is a
    client leaving (PROTOCOL 3.5), not a server fault: logged at DEBUG, without traceback."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith(self.PREFIX):
            return True
        method = text.removeprefix(self.PREFIX).strip(" []") or "?"
        record.msg, record.args = "client went away during %s", (method,)
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_CLIENT_GONE = _ClientGone()


def quiet_client_cancels() -> None:
    """Install the filter on grpc's logger (process-wide, idempotent)."""
    logging.getLogger("grpc._cython.cygrpc").addFilter(_CLIENT_GONE)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """``HOST:PORT`` (``host``, ``port``) or ``unix:PATH`` (``unix_path``)."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    @classmethod
    def parse(cls, text: str, setting: str = "listen", *, unix: bool = True) -> ListenAddress:
        if text.startswith("unix:"):
            path = text.removeprefix("unix:").removeprefix("//")
            if not unix:
                raise SettingError(setting, f"expected HOST:PORT, got {text!r}")
            if not path:
                raise SettingError(setting, "unix: needs a path (unix:/run/exec.sock)")
            return cls(unix_path=path)
        host, colon, port = text.rpartition(":")
        what = "HOST:PORT or unix:PATH" if unix else "HOST:PORT"
        if not colon or not host or not port.isdigit():
            raise SettingError(setting, f"expected {what}, got {text!r}")
        if int(port) > 65535:
            raise SettingError(setting, f"port {port} is out of range 0-65535")
        return cls(host=host, port=int(port))

    @property
    def bare_host(self) -> str:
        return self.host.removeprefix("[").removesuffix("]")

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """Everything ``execstream serve`` takes as flags (a field ``x_y`` is flag ``--x-y``)."""

    listen: str = "127.0.0.1:0"
    token: str | None = None
    retention: float = 300.0  # PROTOCOL 11.1
    cleanup_interval: float = 30.0  # PROTOCOL 11.2
    limits: Limits = field(default_factory=Limits)
    state_dir: Path | None = None  # None: a fresh temporary directory, removed at close
    drain_timeout: float = 2.0  # PROTOCOL 5.3
    shutdown_grace: float = 2.0
    #: TLS: the server's certificate chain and key (PEM); with a client CA, clients must
    #: present a certificate it signed (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    health: bool = True  # grpc.health.v1.Health
    reflection: bool = True  # grpc.reflection.v1 and v1alpha
    metrics_listen: str | None = None  # HOST:PORT serving Prometheus text at /metrics
    #: Server pings after this many idle seconds and drops a client that does not answer
    #: within keepalive_timeout: a frozen client is noticed within about their sum.
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0
    #: What runs the execs: one of :data:`RUNTIMES`.
    runtime: str = "process"
    #: The root filesystem of runc containers; None: one assembled from busybox.
    rootfs: Path | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise SettingError(
                "runtime", f"unknown runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}"
            )
        if self.retention < 0:
            raise SettingError("retention", f"must be >= 0 seconds, got {self.retention}")
        for name in ("cleanup_interval", "keepalive_time", "keepalive_timeout"):
            if not getattr(self, name) > 0:
                raise SettingError(name, f"must be > 0 seconds, got {getattr(self, name)}")
        for name in ("drain_timeout", "shutdown_grace"):
            if not getattr(self, name) >= 0:
                raise SettingError(name, f"must be >= 0 seconds, got {getattr(self, name)}")

    def validate(self) -> None:
        """Check every setting that can be checked before binding (files included); raise
        :class:`SettingError` naming the first that cannot work."""
        ListenAddress.parse(self.listen)
        if self.metrics_listen is not None:
            ListenAddress.parse(self.metrics_listen, "metrics_listen", unix=False)
        _check_limits(self.limits)
        if self.state_dir is not None:
            _check_writable_dir(self.state_dir)
        _check_tls(self)

    def grpc_options(self) -> list[tuple[str, int]]:
        """Keepalive (DESIGN: a frozen client is otherwise never noticed), no port sharing,
        and a receive limit that fits the largest stdin accepted."""
        return [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout)),
            ("grpc.http2.ping_timeout_ms", _ms(self.keepalive_timeout)),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
            *receive_options(self.limits),
        ]


def receive_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC's receive limit, raised so that a stdin message up to ``limits.stdin_bytes`` is
    judged by PROTOCOL 7.2 (INVALID_ARGUMENT beyond it), not refused by gRPC first: PROTOCOL 7.4.
    """
    return [
        (
            "grpc.max_receive_message_length",
            max(_GRPC_RECEIVE_LIMIT, limits.stdin_bytes + _FRAMING),
        )
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _check_limits(limits: Limits) -> None:
    # Limits checks its ranges when it is made; what can still slip in is a wrong type.
    for item in dataclasses.fields(limits):
        value = getattr(limits, item.name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SettingError(f"limits.{item.name}", f"must be an integer, got {value!r}")


def _check_writable_dir(path: Path) -> None:
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError("state_dir", f"{existing} is not a directory")
    try:
        # A real probe: permission bits say nothing to root, nor about a read-only mount.
        probe = tempfile.mkdtemp(prefix=".execstream-probe-", dir=existing)
    except OSError as error:
        raise SettingError(
            "state_dir", f"cannot write to {existing}: {error.strerror or error}"
        ) from None
    os.rmdir(probe)


def _check_tls(settings: ServerSettings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        missing = "tls_key" if settings.tls_key is None else "tls_cert"
        raise SettingError(missing, "TLS needs both a certificate and its key")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SettingError("tls_client_ca", "verifying clients needs TLS (tls_cert, tls_key)")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(settings, name)
        if path is not None:
            _read_pem(name, path)


def _read_pem(setting: str, path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SettingError(setting, f"cannot read {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise SettingError(setting, f"{path} is not a PEM file")
    return data


def _server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca
    return grpc.ssl_server_credentials(
        [(_read_pem("tls_key", settings.tls_key), _read_pem("tls_cert", settings.tls_cert))],
        root_certificates=_read_pem("tls_client_ca", client_ca) if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def _why_unbindable(address: ListenAddress) -> str | None:
    """Why a TCP bind fails (gRPC only logs it), or None when it would succeed."""
    try:
        infos = socket.getaddrinfo(address.bare_host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"cannot resolve {address.host!r}: {error.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                return (error.strerror or str(error)).lower()
    return None


def _claim_unix_path(path: str) -> None:
    """Refuse a path that is not a socket, or a socket a live server answers on; remove a
    stale socket (its server died)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BindError("listen", f"unix:{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a server that died
            return
        except OSError as error:
            raise BindError("listen", f"unix:{path}: {error.strerror or error}") from None
    raise BindError("listen", f"unix:{path}: a server is listening on it")


#: The runtimes ``ServerSettings.runtime`` (and ``execstream serve --runtime``) can name.
RUNTIMES = ("process", "runc")


def create_runtime(settings: ServerSettings, state_dir: Path) -> Runtime:
    """The runtime ``settings.runtime`` names, keeping its state under ``state_dir``.

    A runtime that cannot run here raises ``RuntimeUnavailable`` (an ``OSError``) saying
    what to install.
    """
    if settings.runtime == "runc":
        return RuncRuntime(state_dir, rootfs=settings.rootfs, drain_timeout=settings.drain_timeout)
    return ProcessRuntime(state_dir, drain_timeout=settings.drain_timeout)


class RetentionSweeper:
    """PROTOCOL 11.2: every ``interval`` seconds, remove execs exited ``retention`` ago.

    PROTOCOL 11.3: past the registry's bound on retained exited execs, those that exited
    first are removed as well, at once (soon after the exit that crossed the bound) rather
    than at the next sweep.
    """

    def __init__(
        self,
        registry: Registry,
        remove: Callable[[ExecRecord], None],
        *,
        retention: float,
        interval: float,
    ) -> None:
        self._registry = registry
        self._remove = remove
        self.retention = retention
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep_soon: asyncio.Handle | None = None

    def sweep(self) -> int:
        expired = self._registry.expired(self.retention)
        expired += [r for r in self._registry.over_exited_bound() if r not in expired]
        return self._remove_all(expired)

    def _sweep_over_bound(self) -> None:
        # Only the bound: once the server retains its maximum, this runs for every exit, and
        # looking for expired execs is a pass over all of them (the periodic sweep's job).
        self._sweep_soon = None
        self._remove_all(self._registry.over_exited_bound())

    def _remove_all(self, records: list[ExecRecord]) -> int:
        for record in records:
            try:
                self._remove(record)
            except Exception:
                log.exception("could not remove %r", record)
        return len(records)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()

    def _on_event(self) -> None:
        # Called inside the registry's transition: removal waits for the next loop turn.
        loop = self._loop
        if loop is not None and self._sweep_soon is None and self._registry.over_exited_bound():
            self._sweep_soon = loop.call_soon(self._sweep_over_bound)

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._registry.events.add_listener(self._on_event)
            self._task = asyncio.create_task(self._run(), name="execstream-retention-sweep")

    async def stop(self) -> None:
        if self._sweep_soon is not None:
            self._sweep_soon.cancel()
            self._sweep_soon = None
        if self._task is not None:
            self._registry.events.remove_listener(self._on_event)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class ExecAttachable:
    """The Exec service for a ``grpc.aio.Server`` that an embedding engine already has.

    The engine registers execs through :attr:`executor` (the executor API) and calls
    :meth:`add_to_server` (and, if it wants them, :meth:`add_standard_services`) before
    starting its server, then ``await start()`` for the retention sweep and ``await close()``
    when it shuts down.  Its server should be created with :meth:`server_options` so that
    gRPC's receive limit fits the stdin limit.  With a ``runner``, execs can also be created
    over the wire (what ``execstream serve`` does).  :attr:`metrics` holds its Prometheus
    metrics (``metrics.collectors`` is a ``CollectorRegistry``).
    """

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        runner: ExecRunner | None = None,
        token: str | None = None,
        retention: float = 300.0,
        cleanup_interval: float = 30.0,
    ) -> None:
        self.executor = executor or (runner.executor if runner else Executor(Registry()))
        self.registry = self.executor.registry
        self.runner = runner
        self.metrics = ServerMetrics(self.registry)
        self.service = ExecService(self.registry, runner, token=token, metrics=self.metrics)
        self.sweeper = RetentionSweeper(
            self.registry, self._remove, retention=retention, interval=cleanup_interval
        )
        self.health: HealthReporter | None = None

    def _remove(self, record: ExecRecord) -> None:
        if self.runner is not None:
            self.runner.remove(record)
        else:
            self.executor.handle(record).unregister()

    def server_options(self) -> list[tuple[str, int]]:
        """Options for ``grpc.aio.server(options=...)``: the receive limit (PROTOCOL 7.2)."""
        return receive_options(self.registry.limits)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        quiet_client_cancels()
        wire.add_ExecServicer_to_server(self.service, server)

    def add_standard_services(
        self, server: grpc.aio.Server, *, health: bool = True, reflection: bool = True
    ) -> None:
        """Add ``grpc.health.v1.Health`` (SERVING from :meth:`start`, NOT_SERVING from
        :meth:`close`) and server reflection (v1, v1alpha) describing ``dagger.exec.Exec``."""
        names = [wire.SERVICE_NAME]
        if health:
            self.health = HealthReporter()
            self.health.add_to_server(server)
            names.append(HEALTH_SERVICE)
        if reflection:
            add_reflection(server, names)

    async def start(self) -> None:
        self.sweeper.start()
        if self.health is not None:
            await self.health.serving()

    async def close(self) -> None:
        """End open streams with UNAVAILABLE, kill the execs the runner started, remove the
        stored output."""
        if self.health is not None:
            await self.health.shutting_down()
        self.service.begin_shutdown()
        await self.sweeper.stop()
        if self.runner is not None:
            await self.runner.close()
        self.registry.close()


class ExecServer:
    """``execstream serve`` as an object: ``async with ExecServer(settings) as server:``.

    The settings are checked when it is created (:class:`SettingError`, before anything is
    created on disk); :meth:`start` takes the state directory (ending what a dead server left
    in it), binds (:class:`BindError`) and serves.  A failed start leaves nothing behind.
    """

    def __init__(
        self,
        settings: ServerSettings | None = None,
        *,
        runtime: Runtime | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``runtime`` replaces the one ``settings.runtime`` names (a test's fake); ``clock``
        the system clock of the registry (a test moves retention time with it)."""
        self.settings = settings or ServerSettings()
        self.settings.validate()
        self._listen = ListenAddress.parse(self.settings.listen)
        self._own_state_dir = self.settings.state_dir is None
        self.state_dir = self.settings.state_dir or Path(tempfile.mkdtemp(prefix="execstream-"))
        registry = Registry(
            self.settings.limits, storage=DirectoryArea(self.state_dir / "logs"), clock=clock
        )
        executor = Executor(registry)
        if runtime is None:
            try:
                runtime = create_runtime(self.settings, self.state_dir)
            except BaseException:
                if self._own_state_dir:  # a failed start leaves nothing behind
                    shutil.rmtree(self.state_dir, ignore_errors=True)
                raise
        self.runtime = runtime
        self.attachable = ExecAttachable(
            executor,
            runner=ExecRunner(executor, self.runtime),
            token=self.settings.token,
            retention=self.settings.retention,
            cleanup_interval=self.settings.cleanup_interval,
        )
        self._lock = StateDirLock(self.state_dir)
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._server: grpc.aio.Server | None = None
        self._socket_id: tuple[int, int] | None = None
        self._closed = asyncio.Event()
        self.address = ""
        self.metrics_address = ""

    @property
    def registry(self) -> Registry:
        return self.attachable.registry

    async def start(self) -> str:
        """Bind, serve, and return the address clients use (``host:port`` or ``unix:PATH``)."""
        try:
            return await self._start()
        except BaseException:
            await self._abandon()
            raise

    async def _start(self) -> str:
        self._lock.acquire(self.runtime.token)
        settings = self.settings
        server = grpc.aio.server(options=settings.grpc_options())
        self._server = server
        self.attachable.add_to_server(server)
        self.attachable.add_standard_services(
            server, health=settings.health, reflection=settings.reflection
        )
        credentials = _server_credentials(settings)
        if settings.metrics_listen is not None:
            self._start_metrics(settings.metrics_listen)
        listen = self._listen
        if listen.unix_path is not None:
            path = listen.unix_path
            _claim_unix_path(path)
            # gRPC unlinks its socket path at bind and at shutdown, whatever is there by
            # then: it binds a private name, which is renamed into place (atomically) and
            # which is all it can remove later.
            private = os.path.join(
                os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.bind"
            )
            old = os.umask(0o177)  # the socket is created owner-only, never wider
            try:
                self._bind(server, f"unix:{private}", credentials)
                await server.start()
            finally:
                os.umask(old)
            os.chmod(private, 0o600)
            info = os.stat(private)
            self._socket_id = (info.st_dev, info.st_ino)
            os.rename(private, path)
            self.address = f"unix:{path}"
        else:
            if listen.port != 0 and (why := _why_unbindable(listen)) is not None:
                raise BindError("listen", f"{listen}: {why}")  # before gRPC logs its own error
            port = self._bind(server, str(listen), credentials)
            await server.start()
            self.address = f"{listen.host}:{port}"
        await self.attachable.start()
        return self.address

    def _bind(
        self, server: grpc.aio.Server, target: str, credentials: grpc.ServerCredentials | None
    ) -> int:
        try:
            if credentials is None:
                port = server.add_insecure_port(target)
            else:
                port = server.add_secure_port(target, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            why = None if self._listen.unix_path else _why_unbindable(self._listen)
            raise BindError("listen", f"{self._listen}: {why or 'cannot bind'}")
        return port

    def _start_metrics(self, text: str) -> None:
        address = ListenAddress.parse(text, "metrics_listen", unix=False)
        endpoint = MetricsEndpoint(self.attachable.metrics)
        try:
            bound = endpoint.start(address.bare_host, address.port)
        except OSError as error:
            why = (error.strerror or str(error)).lower()
            raise BindError("metrics_listen", f"{address}: {why}") from None
        self._metrics_endpoint = endpoint
        self.metrics_address = f"{address.host}:{bound.rpartition(':')[2]}"

    async def _abandon(self) -> None:
        """Undo a start that failed part-way: nothing stays bound, running or on disk."""
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        if self._server is not None:
            await self._server.stop(0)
        await self.attachable.close()
        self._release_state_dir()
        self._remove_own_socket()
        self._closed.set()

    def _release_state_dir(self) -> None:
        self._lock.release()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _remove_own_socket(self) -> None:
        """Only the socket this server created: another may have replaced it meanwhile."""
        path = self._listen.unix_path
        if path is None or self._socket_id is None:
            return
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == self._socket_id:
                os.unlink(path)

    async def close(self) -> None:
        """PROTOCOL 13.2: streams end with UNAVAILABLE, execs are killed, nothing is left."""
        if self._server is None or self._closed.is_set():
            return
        await self.attachable.close()
        await self._server.stop(self.settings.shutdown_grace)
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        self._release_state_dir()
        self._remove_own_socket()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> ExecServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
