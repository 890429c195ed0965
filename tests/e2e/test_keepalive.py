"""Keepalive: a subscriber whose network silently died is noticed and released by the server."""

from __future__ import annotations

import asyncio

import grpc

from tests.conftest import ServerFactory
from tests.e2e.tcp_proxy import TcpProxy
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc


async def test_server_drops_a_subscriber_whose_network_went_silent(
    start_server: ServerFactory,
) -> None:
    server = await start_server(
        token_rate=5.0, keepalive_time=0.3, keepalive_timeout=0.3, heartbeat_interval=60.0
    )
    sub = await server.stub.SubmitPrompt(pb.SubmitPromptRequest(prompt="quiet", max_tokens=500))
    proxy = TcpProxy(server.server.port)
    await proxy.start()
    # The client itself sends no keepalive pings: only the server's pings can find the fault.
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
    try:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(stream_id=sub.stream_id))
        first = await call.read()
        assert isinstance(first, pb.SubscribeResponse)
        engine = server.server.engine
        assert engine.subscriber_count(sub.stream_id) == 1
        proxy.freeze()
        async with asyncio.timeout(10):
            while engine.subscriber_count(sub.stream_id):  # noqa: ASYNC110  # no event exposed
                await asyncio.sleep(0.05)
        # The generation itself is unaffected.
        state = await server.stub.GetStream(pb.GetStreamRequest(stream_id=sub.stream_id))
        assert state.stream.state == pb.STREAM_STATE_RUNNING
        call.cancel()
    finally:
        await channel.close(grace=None)
        await proxy.stop()
