"""The server under test: where it is, how to reach it, and what the suite assumes of it.

The suite talks to the target only over the network (DESIGN: "the conformance suite talks to
servers only over the network").  What it cannot learn over the wire it is told: the token,
TLS, how its execs come to be (a driver, ``_driver``), and the server settings some clauses
depend on (retention and sweep interval, 11.1 and 11.2; the output limit, 6.5; the stdin limit,
7.2; clients per exec, 13.1).  A setting left unknown (``None``) makes the cases that need it
SKIP with a reason rather than guess.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from ._driver import WIRE, Driver

__all__ = ["CHANNEL_OPTIONS", "DEFAULT_OUTPUT_LIMIT", "MIN_OUTPUT_LIMIT", "Target"]

#: The smallest output limit the suite can check a target with (PROTOCOL 6.5).
MIN_OUTPUT_LIMIT = 1024 * 1024
#: The reference server's output limit, assumed when the target's is not given.
DEFAULT_OUTPUT_LIMIT = 1024 * 1024 * 1024

#: The suite accepts any message size, so that an oversized chunk is reported by the case that
#: checks chunk sizes (4.4) instead of breaking every case with a client-side error.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """How to reach the target and what the suite assumes about its settings."""

    address: str
    token: str | None = None
    tls: bool = False
    ca: Path | None = None
    #: A client certificate and its key (PEM), for a target that requires one (mTLS).
    cert: Path | None = None
    key: Path | None = None
    #: Seconds an exited exec stays attachable (11.1); ``None``: unknown, the cases skip.
    retention: float | None = None
    #: Seconds between retention sweeps (11.2); ``None``: unknown, the cases skip.
    cleanup_interval: float | None = None
    #: Output retained per exec, bytes (6.5; 0: no limit); the reference server's default.
    max_output_bytes: int = DEFAULT_OUTPUT_LIMIT
    #: Largest stdin message accepted, bytes (7.2); the reference server's default.
    stdin_bytes: int = 1024 * 1024
    #: Clients one exec accepts (13.1); ``None``: unknown, the case skips.
    max_clients_per_exec: int | None = 64
    #: Execs one container runs at once (13.3); ``None``: unknown, the case skips.
    max_execs_per_container: int | None = 128
    #: Seconds to wait for the target to accept a connection before every case is an ERROR.
    connect_timeout: float = 10.0
    #: How the suite obtains its execs: created over the wire (the default), or registered by
    #: the engine through a driver (``_driver``).
    driver: Driver = WIRE

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("the target address is empty")
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        if 0 < self.max_output_bytes < MIN_OUTPUT_LIMIT:
            raise ValueError("the suite needs an output limit of at least 1 MiB per exec, or none")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the token, when there is one (12.1)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def basic_metadata(self, user: str = "") -> tuple[tuple[str, str], ...]:
        """The token the way published clients send it: ``Basic base64(user ":" token)``."""
        credential = base64.b64encode(f"{user}:{self.token or ''}".encode()).decode()
        return (("authorization", f"Basic {credential}"),)

    def channel(self) -> grpc.aio.Channel:
        """A new channel to the target (each case opens its own, so cases stay apart)."""
        if self.tls:
            root = self.ca.read_bytes() if self.ca is not None else None
            chain = self.cert.read_bytes() if self.cert is not None else None
            key = self.key.read_bytes() if self.key is not None else None
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=chain
            )
            return grpc.aio.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    def describe(self) -> str:
        parts = [self.address, "TLS" if self.tls else "plaintext"]
        parts.append("token" if self.token else "no token")
        if self.retention is not None and self.cleanup_interval is not None:
            parts.append(f"retention {self.retention:g}s, sweep {self.cleanup_interval:g}s")
        else:
            parts.append("retention unknown")
        if not self.driver.over_wire:
            parts.append(f"execs from the driver {self.driver.name}")
        return ", ".join(parts)
