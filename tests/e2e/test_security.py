"""Authentication and TLS through real servers and real channels."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.certificates import make_certificates
from tests.e2e.grpc_helpers import error_info
from tokenstream.client import (
    ConnectionOptions,
    RetryPolicy,
    StreamEnd,
    TokenStreamClient,
    TokenStreamClientError,
)
from tokenstream.server import ServerConfig, TokenStreamServer, create_server
from tokenstream.server.auth import AuthSettings, ConfigurationError
from tokenstream.server.streams import EngineSettings
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

SECRET = "e2e-secret-e2e-secret-e2e-secret-e2e"
ONE_TRY = RetryPolicy(max_attempts=1)

Starter = Callable[..., Awaitable[TokenStreamServer]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Starter]:
    servers: list[TokenStreamServer] = []

    async def run(**overrides: object) -> TokenStreamServer:
        config = ServerConfig(
            port=0,
            database_url=f"sqlite+aiosqlite:///{tmp_path / f'db{len(servers)}.sqlite'}",
            token_rate=0,
            shutdown_grace=0.5,
        )
        server, _ = await create_server(replace(config, **overrides))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        await server.stop()


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    bob = hashlib.sha256(b"bob-key").hexdigest()
    path.write_text(
        '[[keys]]\nuser = "alice"\nkey = "alice-key"\n\n'
        f'[[keys]]\nuser = "bob"\nkey_sha256 = "{bob}"\n'
    )
    return path


def jwt_for(user: str, **claims: object) -> str:
    payload: dict[str, object] = {"sub": user, "aud": "tokenstream", "exp": time.time() + 60}
    payload.update(claims)
    return jwt.encode(payload, SECRET, algorithm="HS256")


async def test_every_rpc_needs_valid_credentials(start: Starter, tmp_path: Path) -> None:
    auth = AuthSettings(
        api_keys_file=keys_file(tmp_path), jwt_hs256_secret=SECRET, jwt_audience="tokenstream"
    )
    server = await start(auth=auth)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        calls = {
            "SubmitPrompt": (stub.SubmitPrompt, pb.SubmitPromptRequest(prompt="hi")),
            "Cancel": (stub.Cancel, pb.CancelRequest(stream_id="strm_" + "a" * 26)),
            "GetStream": (stub.GetStream, pb.GetStreamRequest(stream_id="strm_" + "a" * 26)),
            "GetHistory": (
                stub.GetHistory,
                pb.GetHistoryRequest(conversation_id="conv_" + "a" * 26),
            ),
        }
        bad_headers = {
            "none": (),
            "malformed": (("authorization", "Token alice-key"),),
            "unknown key": (("authorization", "Bearer mallory-key"),),
            "expired jwt": (("authorization", f"Bearer {jwt_for('carol', exp=time.time() - 5)}"),),
            "jwt for another audience": (
                ("authorization", f"Bearer {jwt_for('carol', aud='elsewhere')}"),
            ),
        }
        for name, (method, request) in calls.items():
            for label, metadata in bad_headers.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await method(request, metadata=metadata)  # type: ignore[operator]
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, label)
                assert error_info(info.value).reason.endswith("CREDENTIALS"), (name, label)
        with pytest.raises(grpc.aio.AioRpcError) as streaming:
            async for _ in stub.Subscribe(pb.SubscribeRequest(stream_id="strm_" + "a" * 26)):
                pass
        assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for load balancers.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    for credential in ("alice-key", "bob-key", jwt_for("carol")):
        options = ConnectionOptions(bearer_token=credential)
        async with TokenStreamClient(server.address, options=options) as client:
            sub = await client.submit("secured", model="echo")
            items = [item async for item in client.stream(sub.stream_id)]
            assert isinstance(items[-1], StreamEnd)
            assert items[-1].state == "COMPLETED"


async def test_per_caller_limits_follow_the_authenticated_user(
    start: Starter, tmp_path: Path
) -> None:
    server = await start(
        auth=AuthSettings(api_keys_file=keys_file(tmp_path)),
        token_rate=5.0,
        engine=EngineSettings(max_generations_per_caller=1, flush_interval=0.002),
    )
    alice = TokenStreamClient(
        server.address, options=ConnectionOptions(bearer_token="alice-key"), retry=ONE_TRY
    )
    bob = TokenStreamClient(
        server.address, options=ConnectionOptions(bearer_token="bob-key"), retry=ONE_TRY
    )
    async with alice, bob:
        await alice.submit("long", max_tokens=100)
        with pytest.raises(TokenStreamClientError) as info:
            await alice.submit("another", max_tokens=100)
        assert info.value.reason == "TOO_MANY_GENERATIONS_FOR_CALLER"
        await bob.submit("mine", max_tokens=100)  # same address, another user: allowed


async def test_public_address_without_auth_is_refused(tmp_path: Path) -> None:
    config = ServerConfig(
        host="0.0.0.0", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    )
    with pytest.raises(ConfigurationError, match=r"refusing to serve 0\.0\.0\.0"):
        await create_server(config)
    assert not (tmp_path / "x.db").exists()  # refused before touching anything


async def test_tls_and_mutual_tls(start: Starter, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    tls = await start(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    trusted = ConnectionOptions(tls=True, root_certificates=certs.ca.read_bytes())
    async with TokenStreamClient(tls.address, options=trusted) as client:
        sub = await client.submit("over tls", model="echo")
        assert (await client.get_stream(sub.stream_id)).turn.prompt == "over tls"
    async with TokenStreamClient(tls.address, retry=ONE_TRY, timeout=2) as plain:
        with pytest.raises(TokenStreamClientError):
            await plain.submit("plaintext to a TLS port", model="echo")

    mutual = await start(
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca,
    )
    async with TokenStreamClient(
        mutual.address, options=trusted, retry=ONE_TRY, timeout=2
    ) as anonymous:
        with pytest.raises(TokenStreamClientError):
            await anonymous.submit("no client certificate", model="echo")
    with_cert = replace(
        trusted,
        client_certificate=certs.client_cert.read_bytes(),
        client_key=certs.client_key.read_bytes(),
    )
    async with TokenStreamClient(mutual.address, options=with_cert) as client:
        sub = await client.submit("mutual tls", model="echo")
        items = [item async for item in client.stream(sub.stream_id)]
        assert "".join(i.text for i in items if not isinstance(i, StreamEnd)) == "mutual tls"
