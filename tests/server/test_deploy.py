"""What an operator relies on (issue 11): TLS, health, reflection, metrics, safe binding,
settings checked before anything is created, the state-dir lock, the receive limit, and
clients that leave quietly.  Real servers on 127.0.0.1 or unix sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import trustme
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from sessions import REFUSAL_TRIES, hidden_by_grpc

from execstream import wire
from execstream.client import AsyncExecClient, Output, Unavailable
from execstream.server import (
    BindError,
    ExecAttachable,
    ExecServer,
    Limits,
    ServerSettings,
    SettingError,
    StateDirInUse,
)
from execstream.server.testing import serve

TIMEOUT = 20.0


async def _run(address: str, command: list[str], **kwargs: object) -> tuple[int, bytes]:
    async with AsyncExecClient(address, **kwargs) as client:  # type: ignore[arg-type]
        exec_ = await client.run("deploy", uuid.uuid4().hex[:12], command)
        out = b""
        async for event in exec_:
            if isinstance(event, Output):
                out += event.data
        return await exec_.wait(), out


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.com")
    files = {
        "ca": base / "ca.pem",
        "cert": base / "server.pem",
        "key": base / "server.key",
        "client_cert": base / "client.pem",
        "client_key": base / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    files["client_cert"].write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    return files


async def test_tls_server_serves_tls_and_refuses_plaintext(pki: dict[str, Path]) -> None:
    async with serve(tls_cert=pki["cert"], tls_key=pki["key"]) as server:
        code, out = await _run(server.address, ["echo", "secure"], ca_file=pki["ca"])
        assert (code, out) == (0, b"secure\n")
        with pytest.raises(Unavailable):
            await _run(server.address, ["true"], timeout=3, retry=None)


async def test_mtls_requires_a_client_certificate(pki: dict[str, Path]) -> None:
    async with serve(tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"]) as server:
        with pytest.raises(Unavailable):
            await _run(server.address, ["true"], ca_file=pki["ca"], timeout=3)
        code, _ = await _run(
            server.address,
            ["true"],
            ca_file=pki["ca"],
            cert_file=pki["client_cert"],
            key_file=pki["client_key"],
        )
        assert code == 0


# -- health and reflection ----------------------------------------------------------------


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_health_is_serving_then_not_serving_on_shutdown() -> None:
    """An engine's own server gets the standard services from ExecAttachable."""
    attachable = ExecAttachable()
    server = grpc.aio.server(options=attachable.server_options())
    attachable.add_to_server(server)
    attachable.add_standard_services(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await attachable.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name in ("", wire.SERVICE_NAME):
                assert await _health(channel, name) == health_pb2.HealthCheckResponse.SERVING
            await attachable.close()
            for name in ("", wire.SERVICE_NAME):
                assert await _health(channel, name) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)


async def _reflect(
    channel: grpc.aio.Channel, service: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    # v1 and v1alpha have the same messages and field numbers: one pair of classes for both.
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )(iter(requests), timeout=5)
    return [response async for response in call]


@pytest.mark.parametrize(
    "service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]
)
async def test_reflection_describes_the_exec_service(service: str) -> None:
    async with serve() as server, grpc.aio.insecure_channel(server.address) as channel:
        listed, described = await _reflect(
            channel,
            service,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="dagger.exec.Exec"),
        )
        names = {s.name for s in listed.list_services_response.service}
        assert {wire.SERVICE_NAME, "grpc.health.v1.Health", service} <= names
        (raw,) = described.file_descriptor_response.file_descriptor_proto
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        (exec_service,) = proto.service
        assert proto.package == "dagger.exec"
        assert {m.name for m in exec_service.method} == {m.name for m in wire.METHODS}


async def test_health_and_reflection_can_be_turned_off() -> None:
    async with (
        serve(health=False, reflection=False) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _health(channel)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _reflect(
                channel,
                "grpc.reflection.v1.ServerReflection",
                reflection_pb2.ServerReflectionRequest(list_services=""),
            )
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- metrics -----------------------------------------------------------------------------


def _scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_count_execs_rpcs_output_and_spawns() -> None:
    async with serve(metrics_listen="127.0.0.1:0") as server:
        code, out = await _run(server.address, ["head", "-c", "300000", "/dev/zero"])
        assert code == 0 and len(out) == 300000
        async with AsyncExecClient(server.address) as client:
            with pytest.raises(Exception, match="not found"):
                await client.status("no-such-container")
        live = await asyncio.to_thread(_scrape, server.metrics_address)
        async with AsyncExecClient(server.address) as client:
            (container_id, exec_id) = next((r.container_id, r.exec_id) for r in server.registry)
            late = await client.attach(container_id, exec_id)  # after the exit: from storage
            assert await late.wait() == 0
        metrics = await asyncio.to_thread(_scrape, server.metrics_address)
    streamed = 'execstream_streamed_bytes_total{source="%s"}'
    # Live, from the memory cache (or storage, had the exit come first); then all from storage.
    assert live.get(streamed % "memory", 0) + live.get(streamed % "storage", 0) == 300000
    assert metrics[streamed % "storage"] - live.get(streamed % "storage", 0) == 300000
    assert metrics['execstream_streamed_chunks_total{source="storage"}'] >= 1
    assert metrics['execstream_execs{state="exited"}'] == 1
    assert metrics['execstream_rpcs_total{code="OK",method="Session"}'] == 2
    assert metrics['execstream_rpcs_total{code="NOT_FOUND",method="ContainerStatus"}'] == 1
    assert metrics["execstream_spawn_duration_seconds_count"] == 1
    assert metrics["execstream_clients_attached"] == 0
    assert metrics["execstream_lifecycle_subscribers"] == 0
    assert metrics["execstream_gaps_total"] == 0


# -- safe binding ------------------------------------------------------------------------


async def test_a_port_in_use_is_refused_not_shared() -> None:
    async with serve() as first:
        with pytest.raises(BindError, match="address already in use"):
            async with serve(listen=first.address):
                pass
        assert (await _run(first.address, ["true"]))[0] == 0


async def test_unix_socket_never_replaces_a_file_or_a_live_server(tmp_path: Path) -> None:
    path = tmp_path / "exec.sock"
    path.write_text("precious")
    with pytest.raises(BindError, match="not a socket"):
        async with serve(listen=f"unix:{path}"):
            pass
    assert path.read_text() == "precious"
    path.unlink()
    async with serve(listen=f"unix:{path}") as live:
        with pytest.raises(BindError, match="a server is listening"):
            async with serve(listen=f"unix:{path}"):
                pass
        assert (await _run(live.address, ["true"]))[0] == 0


async def test_unix_socket_stale_is_replaced_and_only_ours_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "exec.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a dead server leaves
    async with serve(listen=f"unix:{path}") as server:
        assert (await _run(server.address, ["true"]))[0] == 0
        path.unlink()  # an operator moved ours away and another took the path
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(path))
    assert path.exists(), "close removed a socket that was not its own"


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"listen": "nonsense"}, "listen"),
        ({"listen": "127.0.0.1:99999"}, "listen"),
        ({"listen": "unix:"}, "listen"),
        ({"metrics_listen": "localhost"}, "metrics_listen"),
        ({"state_dir": Path("/proc/no-such-dir")}, "state_dir"),
        ({"state_dir": Path("/etc/hostname/sub")}, "state_dir"),
        ({"tls_cert": Path("/etc/hostname")}, "tls_key"),
        ({"tls_cert": Path("/etc/hostname"), "tls_key": Path("/etc/hostname")}, "tls_cert"),
        ({"tls_cert": Path("/no/cert"), "tls_key": Path("/no/key")}, "tls_cert"),
        ({"tls_client_ca": Path("/etc/hostname")}, "tls_client_ca"),
    ],
)
def test_bad_settings_fail_before_anything_is_created(
    settings: dict[str, object], setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SettingError) as error:
        ExecServer(ServerSettings(**settings))  # type: ignore[arg-type]
    assert error.value.setting == setting
    assert list(tmp_path.iterdir()) == [], "a temp dir was left behind"


@pytest.mark.parametrize(
    ("limits", "setting"),
    [
        ({"memory_cache_bytes": 100}, "limits.memory_cache_bytes"),
        ({"max_output_bytes": 100}, "limits.max_output_bytes"),
        ({"stdin_bytes": 0}, "limits.stdin_bytes"),
        ({"max_execs": -1}, "limits.max_execs"),
    ],
)
def test_impossible_limits_are_a_setting_error_when_made(
    limits: dict[str, int], setting: str
) -> None:
    with pytest.raises(SettingError) as error:
        Limits(**limits)  # type: ignore[arg-type]
    assert error.value.setting == setting


def test_keepalive_settings_become_grpc_options() -> None:
    options = dict(ServerSettings(keepalive_time=1.5, keepalive_timeout=0.5).grpc_options())
    assert options["grpc.keepalive_time_ms"] == 1500
    assert options["grpc.keepalive_timeout_ms"] == 500
    assert options["grpc.so_reuseport"] == 0
    with pytest.raises(SettingError, match="keepalive_time"):
        ServerSettings(keepalive_time=0)


async def test_a_failed_start_leaves_no_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ExecServer(ServerSettings(listen=f"127.0.0.1:{port}"))
        with pytest.raises(BindError):
            await server.start()
    assert list(tmp_path.iterdir()) == []


# -- state dir ---------------------------------------------------------------------------


async def test_a_state_dir_serves_one_live_server(tmp_path: Path) -> None:
    async with serve(state_dir=tmp_path / "state"):
        with pytest.raises(StateDirInUse, match="in use by a running server"):
            async with serve(state_dir=tmp_path / "state"):
                pass
    async with serve(state_dir=tmp_path / "state") as again:  # a clean close frees it
        assert (await _run(again.address, ["true"]))[0] == 0
    assert not (tmp_path / "state" / "server.lock").exists()


# -- limits and auth over the wire ---------------------------------------------------------


async def _session(
    address: str, *requests: wire.SessionRequest, metadata: tuple[tuple[str, str], ...] = ()
) -> list[wire.SessionResponse]:
    async def sent() -> AsyncIterator[wire.SessionRequest]:
        for request in requests:
            yield request

    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        for tries_left in reversed(range(REFUSAL_TRIES)):
            call = wire.ExecStub(channel).Session(sent(), metadata=metadata, timeout=TIMEOUT)
            try:
                return [response async for response in call]
            except grpc.aio.AioRpcError as error:
                if not (tries_left and hidden_by_grpc(error)):
                    raise
    raise AssertionError("not reached: the last try returns or raises")


def _start(command: list[str]) -> wire.SessionRequest:
    return wire.SessionRequest(
        start=wire.Start(container_id="deploy", exec_id=uuid.uuid4().hex[:12], command=command)
    )


async def test_stdin_limit_above_4_mib_is_what_decides() -> None:
    """PROTOCOL 7.2: up to the limit is accepted; beyond is INVALID_ARGUMENT, not gRPC's
    RESOURCE_EXHAUSTED."""
    limit = 5 * 1024 * 1024
    async with serve(limits=Limits(stdin_bytes=limit)) as server:
        responses = await _session(
            server.address,
            _start(["wc", "-c"]),
            wire.SessionRequest(stdin=b"x" * limit),
            wire.SessionRequest(stdin=b""),
        )
        out = b"".join(r.output_chunk.stdout or b"" for r in responses if r.output_chunk)
        assert out.strip() == str(limit).encode()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _session(
                server.address, _start(["cat"]), wire.SessionRequest(stdin=b"x" * (limit + 1))
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_duplicate_authorization_headers_are_unauthenticated() -> None:
    async with serve(token="tok") as server:
        both = (("authorization", "Bearer tok"), ("authorization", "Bearer tok"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _session(server.address, _start(["true"]), metadata=both)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "tok" not in (error.value.details() or "").replace("token", "")
        ok = await _session(server.address, _start(["true"]), metadata=both[:1])
        assert ok[-1].exit == 0


async def test_a_name_too_long_is_invalid_argument_over_the_wire() -> None:
    async with serve() as server:
        for command in (["x" * 300], ["/" + "/".join(["d" * 250] * 20)]):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await _session(server.address, _start(command))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value


def test_client_cancels_are_logged_at_debug_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What grpc.aio logs when a client leaves while its handler writes (grpc PR 32551)."""
    from execstream.server._server import quiet_client_cancels

    quiet_client_cancels()
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("Failed execute_batch")
    except RuntimeError:
        with caplog.at_level(logging.INFO):
            grpc_log.exception(
                "ExecuteBatchError raised in core by servicer method [%s]",
                "/dagger.exec.Exec/Session",
            )
        assert caplog.records == []
        with caplog.at_level(logging.DEBUG):
            grpc_log.exception(
                "ExecuteBatchError raised in core by servicer method [%s]",
                "/dagger.exec.Exec/Session",
            )
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert re.search("client went away during /dagger.exec.Exec/Session", record.getMessage())
    with caplog.at_level(logging.INFO):
        grpc_log.error("something else")
    assert caplog.records[-1].levelno == logging.ERROR


async def test_a_frozen_client_is_dropped_by_keepalive(tmp_path: Path) -> None:
    """A client that stops answering (SIGSTOP) is noticed within keepalive time + timeout."""
    script = tmp_path / "client.py"
    script.write_text(
        "import asyncio, sys, grpc.aio\n"
        "from execstream import wire\n"
        "async def main():\n"
        "    async def requests():\n"
        "        yield wire.SessionRequest(start=wire.Start(container_id='deploy',"
        " exec_id='frozen', command=['sh', '-c', 'while :; do echo tick; sleep 0.2; done']))\n"
        "        await asyncio.Event().wait()\n"
        "    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:\n"
        "        call = wire.ExecStub(channel).Session(requests())\n"
        "        await call.read()\n"
        "        print('attached', flush=True)\n"
        "        await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    async with serve(keepalive_time=1, keepalive_timeout=1) as server:
        client = await asyncio.create_subprocess_exec(
            os.sys.executable, str(script), server.address, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert client.stdout is not None
            assert await asyncio.wait_for(client.stdout.readline(), TIMEOUT) == b"attached\n"
            record = server.registry.get("deploy", "frozen")
            assert record.clients == 1
            client.send_signal(19)  # SIGSTOP: the process is frozen, its socket stays open
            frozen_at = time.monotonic()
            for _ in range(int(TIMEOUT / 0.1)):  # poll with a deadline
                if not record.clients:
                    break
                await asyncio.sleep(0.1)
            assert record.clients == 0, "the frozen client was never dropped"
            assert time.monotonic() - frozen_at < 10
        finally:
            client.kill()
            await client.wait()
