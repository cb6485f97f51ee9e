"""Prometheus metrics of a server, behind one small object so that nothing else imports
``prometheus_client``.

The grpc glue reports what it does (:meth:`ServerMetrics.rpc`, :meth:`ServerMetrics.streamed`,
:meth:`ServerMetrics.gap`), the runner how long spawning took; the gauges (execs by state,
clients, subscribers) are read from the registry when scraped, so they cannot drift from it.
Every server has its own ``CollectorRegistry``: two servers in one process do not mix.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_wsgi_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ._registry import Registry
from ._state import ExecState

__all__ = ["MetricsEndpoint", "ServerMetrics", "Source"]

#: Where streamed output came from: the memory cache or the exec's file (issue 9).
Source = Literal["memory", "storage"]

# Seconds: unary RPCs take well under a millisecond here, streams up to hours.
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300, 3600)
_SPAWN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _RegistryGauges(Collector):
    """Execs by state, clients attached and lifecycle subscribers, read at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def _snapshot(self) -> tuple[Tally[str], int]:
        # Scrapes run on the metrics thread while the event loop changes the registry: a
        # dict resized under the iteration is read again.
        for _ in range(10):
            states: Tally[str] = Tally({state.value: 0 for state in ExecState})
            clients = 0
            try:
                for record in self._registry:
                    states[record.state.value] += 1
                    clients += record.clients
            except RuntimeError:
                continue
            return states, clients
        return Tally(), 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states, clients = self._snapshot()
        execs = GaugeMetricFamily(
            "execstream_execs", "Execs known to the server, by state", labels=["state"]
        )
        for state, count in sorted(states.items()):
            execs.add_metric([state], count)
        yield execs
        yield GaugeMetricFamily(
            "execstream_clients_attached", "Session clients attached to execs", value=clients
        )
        yield GaugeMetricFamily(
            "execstream_lifecycle_subscribers",
            "Open ContainerLifecycle streams",
            value=self._registry.subscribers,
        )


class ServerMetrics:
    """The ``execstream_*`` metrics of one server."""

    def __init__(self, registry: Registry) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self.collectors.register(_RegistryGauges(registry))
        self._bytes = Counter(
            "execstream_streamed_bytes",
            "Output bytes sent to Session clients",
            ["source"],
            registry=self.collectors,
        )
        self._chunks = Counter(
            "execstream_streamed_chunks",
            "Output chunks sent to Session clients",
            ["source"],
            registry=self.collectors,
        )
        self._streamed = {
            source: (self._chunks.labels(source), self._bytes.labels(source))
            for source in get_args(Source)
        }
        self._gaps = Counter(
            "execstream_gaps",
            "Gaps reported to Session clients (PROTOCOL 6.4)",
            registry=self.collectors,
        )
        self._missed = Counter(
            "execstream_gap_chunks",
            "Chunks Session clients missed, as reported in gap_before",
            registry=self.collectors,
        )
        self._rpcs = Counter(
            "execstream_rpcs",
            "Finished RPCs by method and status code",
            ["method", "code"],
            registry=self.collectors,
        )
        self._rpc_seconds = Histogram(
            "execstream_rpc_duration_seconds",
            "RPC duration by method (streams: until they end)",
            ["method"],
            buckets=_RPC_BUCKETS,
            registry=self.collectors,
        )
        self._spawn_seconds = Histogram(
            "execstream_spawn_duration_seconds",
            "Time to register and start an exec's process",
            buckets=_SPAWN_BUCKETS,
            registry=self.collectors,
        )

    def streamed(self, chunks: int, nbytes: int, source: Source = "memory") -> None:
        # Once per batch a client is sent: the labelled children are looked up once
        # (``labels`` costs four times what ``inc`` does).
        chunk_counter, byte_counter = self._streamed[source]
        chunk_counter.inc(chunks)
        byte_counter.inc(nbytes)

    def gap(self, missed: int) -> None:
        self._gaps.inc()
        self._missed.inc(missed)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        self._rpcs.labels(method, code).inc()
        self._rpc_seconds.labels(method).observe(seconds)

    def spawned(self, seconds: float) -> None:
        self._spawn_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.collectors)


class MetricsEndpoint:
    """``GET /metrics`` in Prometheus text format, served by ``prometheus_client``'s own
    WSGI server on a daemon thread."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    def start(self, host: str, port: int) -> str:
        """Bind and serve; ``OSError`` when the address is taken or not available."""
        self._server, self._thread = start_wsgi_server(
            port, addr=host, registry=self._metrics.collectors
        )
        self.address = f"{host}:{self._server.server_port}"
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
