"""The standard gRPC services next to ``dagger.exec.Exec``: health and server reflection.

Both come from the maintained packages (``grpcio-health-checking``, ``grpcio-reflection``).
Reflection describes ``spec/exec.proto`` from the descriptor the generator compiled
(``execstream.wire._descriptor``), in a private descriptor pool, so that an engine whose own
protobuf classes are in the default pool is not disturbed.  grpcio-reflection implements
``v1alpha`` only; ``v1`` has the same messages and field numbers, so the same servicer answers
both names (grpcurl asks for ``v1`` first).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from execstream import wire
from execstream.wire import _descriptor

__all__ = ["HEALTH_SERVICE", "REFLECTION_SERVICES", "HealthReporter", "add_reflection"]

HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_V1ALPHA: str = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_SERVICES = (_V1, _V1ALPHA)


class HealthReporter:
    """``grpc.health.v1.Health``: SERVING while the server accepts work, NOT_SERVING once it
    shuts down, for the overall server (``""``) and for ``dagger.exec.Exec``."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def serving(self) -> None:
        for name in ("", wire.SERVICE_NAME):
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        # Sets NOT_SERVING everywhere and ignores later changes.
        await self.servicer.enter_graceful_shutdown()


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for serialized in (
        _descriptor.FILE_DESCRIPTOR,
        health_pb2.DESCRIPTOR.serialized_pb,
        reflection_pb2.DESCRIPTOR.serialized_pb,
    ):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    return pool


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1 and v1alpha) listing ``service_names`` and both reflection names."""
    names = [*service_names, *REFLECTION_SERVICES]
    servicer: Any = ReflectionServicer(names, pool=_pool())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        _V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
