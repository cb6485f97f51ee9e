"""How the client reaches a server: target, TLS, token, keepalive, and the retry policy.

One :class:`Connection` per client holds the ``grpc.aio`` channel (created lazily, inside the
event loop that uses it), the typed stub and the metadata sent on every call.  The token
travels as ``authorization: Bearer <token>`` metadata passed explicitly on each stub call
(PROTOCOL 12.1), rather than through an interceptor: one object per call type would be
needed there (DESIGN, engineering facts) and explicit metadata cannot miss a call type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from execstream import wire

__all__ = ["DEFAULT_TARGET", "Connection", "RetryPolicy"]

DEFAULT_TARGET = "127.0.0.1:50051"

ChannelOption = tuple[str, int | str]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a broken stream is resumed: at most ``max_attempts`` reconnections in a row, the
    first after ``initial_backoff`` seconds, each wait ``multiplier`` times the previous one
    up to ``max_backoff``.  The count starts again after every successful resume.
    ``RetryPolicy(max_attempts=0)`` never resumes.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0, got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def delays(self) -> Iterator[float]:
        """The wait before each attempt, ``max_attempts`` of them."""
        delay = self.initial_backoff
        for _ in range(self.max_attempts):
            yield delay
            delay = min(delay * self.multiplier, self.max_backoff)


class Connection:
    """The channel, stub and call settings a client shares with its Exec and event streams."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        tls: bool,
        ca_file: str | Path | None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float | None,
        keepalive_time: float | None,
        keepalive_timeout: float,
        retry: RetryPolicy,
        client_id: str,
        options: Sequence[ChannelOption],
    ) -> None:
        if not target:
            raise ValueError("target must be HOST:PORT or unix:PATH")
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.client_id = client_id
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        # Read now, so that a missing CA file fails at construction and not at the first call.
        self._credentials: grpc.ChannelCredentials | None = None
        if (cert_file is None) != (key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        if tls or ca_file is not None or cert_file is not None:
            roots = Path(ca_file).read_bytes() if ca_file is not None else None
            chain = Path(cert_file).read_bytes() if cert_file is not None else None
            key = Path(key_file).read_bytes() if key_file is not None else None
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=key, certificate_chain=chain
            )
        self._options = [*_keepalive(keepalive_time, keepalive_timeout), *_reconnect(retry)]
        self._options.extend(options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: wire.ExecStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stub(self) -> wire.ExecStub:
        """The stub, opening the channel on first use (in the running loop, which grpc.aio
        binds it to)."""
        if self._stub is None:
            loop = asyncio.get_running_loop()
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(self.target, self._credentials, self._options)
            else:
                channel = grpc.aio.insecure_channel(self.target, self._options)
            self._channel, self._stub, self._loop = channel, wire.ExecStub(channel), loop
        elif self._loop is not asyncio.get_running_loop():
            raise RuntimeError("an AsyncExecClient is bound to the event loop it was first used in")
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()


def _keepalive(time_s: float | None, timeout_s: float) -> list[ChannelOption]:
    """Ping the server while a call is open, so that a dead peer is noticed; the reference
    server accepts pings every 5 s (its ``min_ping_interval_without_data``)."""
    if time_s is None:
        return []
    return [
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        # A quiet exec sends no data for minutes: keep pinging anyway.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def _reconnect(retry: RetryPolicy) -> list[ChannelOption]:
    """Align the channel's own reconnection backoff with the resume policy: grpc's default
    (1 s, then up to 120 s) would fail every fast resume attempt against a channel still in
    backoff."""
    return [
        ("grpc.initial_reconnect_backoff_ms", max(1, int(retry.initial_backoff * 1000))),
        ("grpc.min_reconnect_backoff_ms", max(1, int(retry.initial_backoff * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, int(retry.max_backoff * 1000))),
    ]
