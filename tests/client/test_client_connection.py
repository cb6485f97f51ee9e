"""How the client connects: TLS with a CA file, unix sockets, tokens, clean close."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import grpc.aio
import pytest
from client_support import ids

from execstream.client import AsyncExecClient, ExecClient, Exit, Output, RetryPolicy, Unavailable
from execstream.server import ExecAttachable
from execstream.server.testing import serve


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


async def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    key, cert = await asyncio.to_thread(make_certificate, tmp_path)
    # The embeddable service on a TLS port of our own grpc.aio server (the executor API).
    attachable = ExecAttachable()
    server = grpc.aio.server()
    attachable.add_to_server(server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await attachable.start()
    try:
        handle = attachable.executor.register("tls", "one")
        handle.started()
        handle.stdout.write(b"over tls\n")
        handle.exit(5)
        async with AsyncExecClient(f"127.0.0.1:{port}", ca_file=cert) as client:
            events = [event async for event in await client.attach("tls", "one")]
        assert [type(e) for e in events] == [Output, Exit]
        assert isinstance(events[0], Output) and events[0].data == b"over tls\n"
        assert events[1] == Exit(5)
        # Without the CA the server's certificate is not trusted.
        no_retry = RetryPolicy(max_attempts=0)
        async with AsyncExecClient(f"127.0.0.1:{port}", tls=True, retry=no_retry) as untrusted:
            with pytest.raises(Unavailable):
                await untrusted.status("tls", timeout=5)
    finally:
        await attachable.close()
        await server.stop(None)


async def test_unix_socket_target(tmp_path: Path) -> None:
    socket_path = tmp_path / "exec.sock"
    async with (
        serve(listen=f"unix:{socket_path}") as server,
        AsyncExecClient(server.address) as client,
    ):
        assert server.address == f"unix:{socket_path}"
        c, e = ids()
        assert await (await client.run(c, e, ["echo", "via unix"])).wait() == 0
        assert (await client.status(c, e)).exit_code == 0


def portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "execstream-client"]


async def test_sync_client_closes_its_thread_and_detaches(tmp_path: Path) -> None:
    async with serve() as server, AsyncExecClient(server.address) as client:
        c, e = ids()
        before = len(portal_threads())

        def use() -> int:
            with ExecClient(server.address) as sync:
                running = sync.run(c, e, ["cat"])  # left open: close() detaches it
                assert running.session_id
                assert len(portal_threads()) == before + 1
            return len(portal_threads())

        assert await asyncio.to_thread(use) == before
        assert (await client.status(c, e)).state == "running"  # detached, not killed
        follower = await client.attach(c, e)
        await follower.close_stdin()
        assert await follower.wait() == 0
