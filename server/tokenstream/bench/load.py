"""The client side: submits, subscribes and measures, with bare stubs to stay cheap.

The Python gRPC client spends more CPU per message than the server; the runner reports the
CPU use of both, so it is plain which one saturated.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from tokenstream.bench.cases import Case
from tokenstream.server.models.clock import stamps
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
# Calls per HTTP/2 connection (a server may limit concurrent streams per connection).
_CALLS_PER_CHANNEL = 500


@dataclass(slots=True)
class Delivery:
    """What the subscribers of one case received."""

    tokens: int = 0
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)  # produce -> receive, sampled
    first_chunk_s: list[float] = field(default_factory=list)
    heartbeats: int = 0
    subscriptions: int = 0
    chunks: int = 0  # messages carrying tokens (rollup makes them fewer than tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def latency_ms(self, quantile: float) -> float:
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        return ordered[min(int(quantile * len(ordered)), len(ordered) - 1)] / 1e6


class Load:
    def __init__(self, target: str, calls: int) -> None:
        count = max(1, -(-calls // _CALLS_PER_CHANNEL))
        self._channels = [grpc.aio.insecure_channel(target, options=_OPTIONS) for _ in range(count)]
        self._stubs: list[TokenStreamServiceAsyncStub] = [
            pb_grpc.TokenStreamServiceStub(c) for c in self._channels
        ]
        self._next = 0

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    def _stub(self) -> TokenStreamServiceAsyncStub:
        self._next += 1
        return self._stubs[self._next % len(self._stubs)]

    async def submit(self, prompt: str, tokens: int) -> str:
        request = pb.SubmitPromptRequest(prompt=prompt, model="clock", max_tokens=tokens)
        reply = await self._stub().SubmitPrompt(request)
        return str(reply.stream_id)

    async def read(
        self,
        stream_id: str,
        delivery: Delivery,
        from_seq: int = 0,
        opened: asyncio.Semaphore | None = None,
    ) -> None:
        """Reads the stream to its end, recording what arrives; releases `opened` (held by
        the caller) at the first message."""
        started = time.monotonic()
        first = True
        call = self._stub().Subscribe(pb.SubscribeRequest(stream_id=stream_id, from_seq=from_seq))
        try:
            async for message in call:
                if opened is not None:
                    opened.release()
                    opened = None
                kind = message.WhichOneof("event")
                if kind == "chunk":
                    now = time.monotonic_ns()
                    chunk = message.chunk
                    delivery.tokens += chunk.end_seq - chunk.start_seq + 1
                    delivery.chunks += 1
                    delivery.latencies_ns.extend(now - stamp for stamp in stamps(chunk.text))
                    if first:
                        delivery.first_chunk_s.append(time.monotonic() - started)
                        first = False
                elif kind == "heartbeat":
                    delivery.heartbeats += 1
                else:
                    return
        finally:
            call.cancel()


async def live(target: str, case: Case) -> Delivery:
    """S streams submitted at once, each read by K subscribers from seq 0 as soon as it exists."""
    load = Load(target, case.streams * case.subscribers)
    delivery = Delivery(subscriptions=case.streams * case.subscribers)
    gate = asyncio.Semaphore(64)  # submissions in flight

    async def one(n: int) -> None:
        async with gate:
            stream_id = await load.submit(f"bench {n}", case.tokens)
        await asyncio.gather(*(load.read(stream_id, delivery) for _ in range(case.subscribers)))

    started = time.monotonic()
    try:
        with _no_collector_pauses():
            await asyncio.gather(*(one(n) for n in range(case.streams)))
    finally:
        delivery.seconds = time.monotonic() - started
        await load.close()
    return delivery


@contextlib.contextmanager
def _no_collector_pauses() -> Iterator[None]:
    """Keeps the bench process's own garbage collector from pausing it mid-run: a pause
    of tens of ms would read as server latency (seen at the same moment in every run)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def resume(target: str, case: Case, repeats: int = 5) -> dict[str, Delivery]:
    """A finished stream read again from seq 0 and from its middle, `repeats` times each."""
    load = Load(target, 2)
    try:
        stream_id = await load.submit("bench resume", case.tokens)
        await load.read(stream_id, Delivery())  # to its end: the stream is finished
        results = {}
        for name, from_seq in (("from 0", 0), ("from middle", case.tokens // 2)):
            delivery = Delivery(subscriptions=repeats)
            for _ in range(repeats):
                started = time.monotonic()
                await load.read(stream_id, delivery, from_seq)
                delivery.seconds += time.monotonic() - started
            results[name] = delivery
        return results
    finally:
        await load.close()


async def idle(target: str, case: Case) -> tuple[Delivery, list[asyncio.Task[None]], Load]:
    """Opens the subscriptions on quiet streams and returns once each has its first chunk;
    the caller holds them open, measures, then cancels the tasks and closes the load."""
    load = Load(target, case.subscribers)
    delivery = Delivery(subscriptions=case.subscribers)
    stream_ids = [await load.submit(f"bench idle {n}", 10) for n in range(case.streams)]
    per_stream = -(-case.subscribers // case.streams)
    # Opened a few hundred at a time: gRPC servers refuse a burst of new calls on one
    # connection that the application has not picked up yet (HTTP/2 rapid-reset defence).
    opening = asyncio.Semaphore(200)
    tasks = []
    for n in range(case.subscribers):
        await opening.acquire()
        read = load.read(stream_ids[n // per_stream], delivery, opened=opening)
        tasks.append(asyncio.create_task(read))
    while len(delivery.first_chunk_s) < case.subscribers:
        if any(task.done() for task in tasks):  # one failed: say why
            await next(task for task in tasks if task.done())
        await asyncio.sleep(0.05)
    return delivery, tasks, load


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
