"""Capacity limits: RESOURCE_EXHAUSTED with a stable reason once a configured limit is
reached, and capacity comes back as soon as what held it ends.

(The stall timeout is not covered here: the built-in sources never stall; the engine's
unit tests cover it.)
"""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from tests.conftest import RunningServer, ServerFactory
from tests.e2e.grpc_helpers import error_info, read_all
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

TOKEN_RATE = 200.0
MAX_TOKENS = 10_000  # ~50 s at 200 tokens/s: running for the whole test unless cancelled
RPC_TIMEOUT = 10.0
RELEASE_TIMEOUT = 5.0
ERROR_DOMAIN = "tokenstream.v1"


def prompt_of(name: str) -> str:
    return f"{name}: tell me about limits"


def mentions(details: str | None, number: int) -> bool:
    """Whether an error message states `number` (as a word of its own)."""
    return re.search(rf"\b{number}\b", details or "") is not None


async def submit(stub: pb_grpc.TokenStreamServiceAsyncStub, name: str, request_id: str = "") -> str:
    response = await stub.SubmitPrompt(
        pb.SubmitPromptRequest(
            prompt=prompt_of(name), model="synthetic", max_tokens=MAX_TOKENS, request_id=request_id
        ),
        timeout=RPC_TIMEOUT,
    )
    return response.stream_id


async def refused_submit(
    stub: pb_grpc.TokenStreamServiceAsyncStub, name: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(stub, name)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return refused.value


async def cancel(stub: pb_grpc.TokenStreamServiceAsyncStub, stream_id: str) -> None:
    response = await stub.Cancel(pb.CancelRequest(stream_id=stream_id), timeout=RPC_TIMEOUT)
    assert response.state == pb.STREAM_STATE_CANCELLED


async def state_of(stub: pb_grpc.TokenStreamServiceAsyncStub, stream_id: str) -> int:
    info = await stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=RPC_TIMEOUT)
    return info.stream.state


async def next_chunk(
    call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse], expected: int
) -> pb.TokenChunk:
    """The subscription's next chunk (skipping heartbeats); it must start at `expected`."""
    while True:
        response = await asyncio.wait_for(call.read(), timeout=RPC_TIMEOUT)
        assert response is not grpc.aio.EOF, "the subscription ended early"
        assert isinstance(response, pb.SubscribeResponse)
        kind = response.WhichOneof("event")
        assert kind != "end", f"the subscription ended early: {response.end}"
        if kind == "chunk":
            assert response.chunk.start_seq == expected, f"gap or duplicate: {response.chunk}"
            return response.chunk


async def drain_to_end(
    call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse], expected: int
) -> pb.StreamEnd:
    """Reads the rest of a subscription (chunks continuing at `expected`); returns its end."""
    end: pb.StreamEnd | None = None
    while (
        response := await asyncio.wait_for(call.read(), timeout=RPC_TIMEOUT)
    ) is not grpc.aio.EOF:
        assert isinstance(response, pb.SubscribeResponse)
        kind = response.WhichOneof("event")
        assert end is None, f"a {kind} arrived after the end"
        if kind == "chunk":
            assert response.chunk.start_seq == expected, f"gap or duplicate: {response.chunk}"
            expected = response.chunk.end_seq + 1
        elif kind == "end":
            end = response.end
    assert end is not None, "the subscription completed without an end"
    assert end.final_seq == expected - 1
    assert await call.code() == grpc.StatusCode.OK
    return end


async def test_max_generations_refuses_the_next_submit(start_server: ServerFactory) -> None:
    server = await start_server(token_rate=TOKEN_RATE, max_generations=2)
    stub = server.stub
    running = [await submit(stub, "first", "req-first"), await submit(stub, "second")]

    error = await refused_submit(stub, "third")
    info = error_info(error)
    assert info.reason == "TOO_MANY_GENERATIONS"
    assert info.domain == ERROR_DOMAIN
    assert info.metadata["limit"] == "2"
    assert mentions(error.details(), 2), error.details()

    # The refused submit started nothing; the two generations keep running.
    for stream_id in running:
        assert await state_of(stub, stream_id) == pb.STREAM_STATE_RUNNING
    # Retrying an accepted request (same request_id) at the limit returns its stream.
    assert await submit(stub, "first", "req-first") == running[0]

    # Ending one generation frees its place.
    await cancel(stub, running[0])
    third = await submit(stub, "third")
    assert await state_of(stub, third) == pb.STREAM_STATE_RUNNING
    await refused_submit(stub, "fourth")
    for stream_id in (running[1], third):
        await cancel(stub, stream_id)


async def test_max_generations_per_caller_refuses_that_callers_next_submit(
    start_server: ServerFactory,
) -> None:
    server = await start_server(token_rate=TOKEN_RATE, max_generations_per_caller=1)
    stub = server.stub
    first = await submit(stub, "first")

    error = await refused_submit(stub, "second")
    info = error_info(error)
    assert info.reason == "TOO_MANY_GENERATIONS_FOR_CALLER"
    assert info.domain == ERROR_DOMAIN
    assert info.metadata["limit"] == "1"
    assert mentions(error.details(), 1), error.details()

    # The caller is the client's address, not its connection: a new channel is no way round.
    async with grpc.aio.insecure_channel(server.target) as channel:
        other = await refused_submit(pb_grpc.TokenStreamServiceStub(channel), "second")
        assert error_info(other).reason == "TOO_MANY_GENERATIONS_FOR_CALLER"

    await cancel(stub, first)
    second = await submit(stub, "second")
    assert await state_of(stub, second) == pb.STREAM_STATE_RUNNING
    await cancel(stub, second)


async def subscribe_when_free(
    server: RunningServer, stream_id: str, from_seq: int
) -> tuple[grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse], pb.TokenChunk]:
    """Subscribes, retrying while the server still counts a subscription the client dropped
    (it learns of the drop asynchronously); returns the call and its first chunk."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELEASE_TIMEOUT
    while True:
        call = server.stub.Subscribe(
            pb.SubscribeRequest(stream_id=stream_id, from_seq=from_seq), timeout=RPC_TIMEOUT
        )
        try:
            return call, await next_chunk(call, from_seq)
        except grpc.aio.AioRpcError as error:
            refused = error
        assert error_info(refused).reason == "TOO_MANY_SUBSCRIBERS"
        assert loop.time() < deadline, "the dropped subscription still counts"
        await asyncio.sleep(0.01)


async def test_max_subscribers_per_stream_refuses_the_next_subscriber(
    start_server: ServerFactory,
) -> None:
    server = await start_server(token_rate=TOKEN_RATE, max_subscribers_per_stream=1)
    stub = server.stub
    stream_id = await submit(stub, "watched")

    first = stub.Subscribe(
        pb.SubscribeRequest(stream_id=stream_id, from_seq=0), timeout=RPC_TIMEOUT
    )
    chunk = await next_chunk(first, 0)

    # A second subscriber of the same stream is refused (at its first read) ...
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read_all(stub, stream_id)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused.value)
    assert info.reason == "TOO_MANY_SUBSCRIBERS"
    assert info.domain == ERROR_DOMAIN
    assert info.metadata["limit"] == "1"
    assert mentions(refused.value.details(), 1), refused.value.details()

    # ... while the first keeps receiving, without a gap,
    for _ in range(3):
        chunk = await next_chunk(first, chunk.end_seq + 1)
    # and the limit is per stream: another stream can still be read.
    other_id = await submit(stub, "other")
    other = stub.Subscribe(pb.SubscribeRequest(stream_id=other_id, from_seq=0), timeout=RPC_TIMEOUT)
    await next_chunk(other, 0)
    other.cancel()
    await cancel(stub, other_id)

    # A client that drops its subscription frees the place (once the server notices).
    first.cancel()
    resumed_at = chunk.end_seq + 1
    second, chunk = await subscribe_when_free(server, stream_id, resumed_at)
    chunk = await next_chunk(second, chunk.end_seq + 1)

    # A subscription that ends frees its place before the call completes: subscribing
    # again right after needs no retry.
    await cancel(stub, stream_id)
    end = await drain_to_end(second, chunk.end_seq + 1)
    assert end.state == pb.STREAM_STATE_CANCELLED
    final = await read_all(stub, stream_id)
    final.assert_contiguous(0)
    assert final.end is not None
    assert final.end.state == pb.STREAM_STATE_CANCELLED
    assert final.end == end
    assert final.text == "".join(synthetic_tokens(prompt_of("watched"), end.final_seq + 1))
