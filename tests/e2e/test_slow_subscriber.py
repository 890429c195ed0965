"""A slow subscriber holds up neither the generation nor the other subscribers, and still
gets every token exactly once, served from the store once it falls behind the live tail.

The slow subscriber's channel has a small HTTP/2 window, so the server cannot push the
stream into its buffers; it pauses after its first message (the generation runs far past
the live tail meanwhile), then handles one message per 20 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from tests.conftest import RunningServer, ServerFactory
from tests.e2e.grpc_helpers import Received
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

TOKENS = 3000
TOKEN_RATE = 2000.0  # the generation takes ~1.5 s
LIVE_TAIL_TOKENS = 64  # the server keeps 64-128 durable tokens in memory per stream
FAST_SUBSCRIBERS = 3
SLOW_DELAY = 0.02  # the slow subscriber handles one message per 20 ms ...
SLOW_PAUSE = 0.5  # ... after pausing this long after its first one (~1000 tokens generated)
POLL_INTERVAL = 0.005
RPC_TIMEOUT = 30.0
# By default HTTP/2 flow control lets the server push a whole 3000-token stream (~21 KB)
# into the client's buffers at once, so a client that reads slowly never makes the server
# wait and never falls behind the live tail. A 1 KB window without BDP probing makes the
# server's writes wait for the slow reader, as they would for a large response.
WINDOW_BYTES = 1024
SLOW_CHANNEL_OPTIONS = [("grpc.http2.lookahead_bytes", WINDOW_BYTES), ("grpc.http2.bdp_probe", 0)]
# How far the server can be ahead of what the slow subscriber has read: what the window
# lets be in flight (synthetic tokens have at least 6 bytes) plus the one message the
# server may hold while it waits for the window (at most the whole live tail).
MAX_IN_FLIGHT_TOKENS = WINDOW_BYTES // 6 + 2 * LIVE_TAIL_TOKENS
TERMINAL = (pb.STREAM_STATE_COMPLETED, pb.STREAM_STATE_CANCELLED, pb.STREAM_STATE_FAILED)


@dataclass
class Run:
    generator: float  # seconds from submit until GetStream reported a terminal state
    fast: list[float]  # seconds from submit until each fast subscriber had its end
    slow: float | None
    slow_received: Received | None
    # After its pause: how many durable tokens the slow subscriber had not received yet.
    slow_lag: int | None


async def wait_terminal(stub: pb_grpc.TokenStreamServiceAsyncStub, stream_id: str) -> int:
    while True:
        info = await stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=RPC_TIMEOUT)
        if info.stream.state in TERMINAL:
            return info.stream.state
        await asyncio.sleep(POLL_INTERVAL)


async def read_whole(
    stub: pb_grpc.TokenStreamServiceAsyncStub,
    stream_id: str,
    delay: float = 0.0,
    after_first: Callable[[Received], Awaitable[None]] | None = None,
) -> Received:
    """Reads a subscription from 0 to its end, waiting `delay` after every message and
    calling `after_first` after the first one."""
    received = Received()
    call = stub.Subscribe(pb.SubscribeRequest(stream_id=stream_id, from_seq=0), timeout=RPC_TIMEOUT)
    async for message in call:
        kind = message.WhichOneof("event")
        assert received.end is None, f"a {kind} arrived after the end"
        if kind == "chunk":
            received.chunks.append(message.chunk)
        elif kind == "heartbeat":
            received.heartbeats.append(message.heartbeat)
        else:
            received.end = message.end
        if after_first is not None:
            await after_first(received)
            after_first = None
        if delay:
            await asyncio.sleep(delay)
    return received


def check_complete(received: Received, prompt: str) -> None:
    received.assert_contiguous(0)
    assert received.text == "".join(synthetic_tokens(prompt, TOKENS))
    assert received.end is not None
    assert received.end.state == pb.STREAM_STATE_COMPLETED
    assert received.end.final_seq == TOKENS - 1


async def generate_and_read(
    server: RunningServer, prompt: str, slow_stub: pb_grpc.TokenStreamServiceAsyncStub | None
) -> Run:
    """Submits a stream and reads it with the fast (and slow) subscribers; times each from
    the submit to its end, and checks that every subscriber got every token exactly."""
    stub = server.stub
    started = time.monotonic()
    submitted = await stub.SubmitPrompt(
        pb.SubmitPromptRequest(prompt=prompt, model="synthetic", max_tokens=TOKENS),
        timeout=RPC_TIMEOUT,
    )
    stream_id = submitted.stream_id

    async def generator() -> float:
        assert await wait_terminal(stub, stream_id) == pb.STREAM_STATE_COMPLETED
        return time.monotonic() - started

    lags: list[int] = []

    async def pause(received: Received) -> None:
        await asyncio.sleep(SLOW_PAUSE)
        info = await stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=RPC_TIMEOUT)
        lags.append(info.stream.head_seq - received.chunks[-1].end_seq)

    async def subscriber(
        reader: pb_grpc.TokenStreamServiceAsyncStub, slow: bool = False
    ) -> tuple[float, Received]:
        if slow:
            received = await read_whole(reader, stream_id, SLOW_DELAY, pause)
        else:
            received = await read_whole(reader, stream_id)
        finished = time.monotonic() - started
        check_complete(received, prompt)
        return finished, received

    async with asyncio.TaskGroup() as group:
        generating = group.create_task(generator())
        fast = [group.create_task(subscriber(stub)) for _ in range(FAST_SUBSCRIBERS)]
        slow = None if slow_stub is None else group.create_task(subscriber(slow_stub, True))
    fast_times = [task.result()[0] for task in fast]
    if slow is None:
        return Run(generating.result(), fast_times, None, None, None)
    slow_time, slow_received = slow.result()
    return Run(generating.result(), fast_times, slow_time, slow_received, lags[0])


async def test_slow_subscriber_holds_up_neither_generator_nor_fast_subscribers(
    start_server: ServerFactory,
) -> None:
    server = await start_server(token_rate=TOKEN_RATE, live_tail_tokens=LIVE_TAIL_TOKENS)
    baseline = await generate_and_read(server, "baseline: tell me about rivers", None)
    async with grpc.aio.insecure_channel(server.target, options=SLOW_CHANNEL_OPTIONS) as slow:
        loaded = await generate_and_read(
            server, "with a slow reader: tell me about rivers", pb_grpc.TokenStreamServiceStub(slow)
        )
    assert loaded.slow is not None
    assert loaded.slow_received is not None
    assert loaded.slow_lag is not None
    slow_chunks = loaded.slow_received.chunks
    largest = max(chunk.end_seq - chunk.start_seq + 1 for chunk in slow_chunks)
    print(
        f"\nbaseline:          generator {baseline.generator:.3f} s, fast subscribers "
        + ", ".join(f"{t:.3f}" for t in baseline.fast)
        + f" s\nwith slow reader:  generator {loaded.generator:.3f} s, fast subscribers "
        + ", ".join(f"{t:.3f}" for t in loaded.fast)
        + f" s, slow subscriber {loaded.slow:.3f} s"
        + f"\nslow subscriber:   {len(slow_chunks)} chunks, largest {largest} tokens, "
        + f"{loaded.slow_lag} tokens behind the durable head after its pause"
    )

    # The slow subscriber got everything exactly once (checked in `timed`), in many chunks,
    # and finished last: it was really slow.
    assert len(slow_chunks) > 1
    assert loaded.slow > loaded.generator
    assert loaded.slow > max(loaded.fast)
    # After its pause it was further behind the durable head than the live tail (at most
    # 2 * LIVE_TAIL_TOKENS tokens) plus what can be in flight: the server had to read the
    # tokens it was sent next back from the store (and it got them all, in order).
    assert loaded.slow_lag > 2 * LIVE_TAIL_TOKENS + MAX_IN_FLIGHT_TOKENS
    # Neither the generation nor the fast subscribers waited for it (generous bounds: the
    # machine may be busy).
    assert loaded.generator < 3 * baseline.generator + 0.5
    assert max(loaded.fast) < 3 * max(baseline.fast) + 0.5
