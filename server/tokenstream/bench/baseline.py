"""The ceiling to compare against: bare `grpc.aio` fan-out from memory, no store.

It speaks the same SubmitPrompt/Subscribe contract and batches like the real server (a
flush every `flush_interval` publishes what was generated meanwhile, and each subscriber
sends everything new as one chunk), so the only difference left is the durable store and
the engine around it.

    python -m tokenstream.bench.baseline --port 50061 --token-rate 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import grpc

from tokenstream.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from tokenstream.server.event_loop import run as run_on_loop
from tokenstream.server.models import GenerationRequest
from tokenstream.server.models.clock import ClockSource
from tokenstream.server.streams.live import chunked
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

MAX_CHUNK_CHARS = 256 * 1024


class _Stream:
    def __init__(self) -> None:
        self.tokens: list[str] = []  # published (what the real server would have committed)
        self.pending: list[str] = []
        self.done = False
        self.finishing = False
        self.changed = asyncio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class BaselineServicer(pb_grpc.TokenStreamServiceServicer):
    def __init__(self, token_rate: float, flush_interval: float, heartbeat: float) -> None:
        self._source = ClockSource(token_rate)
        self._flush_interval = flush_interval
        self._heartbeat = heartbeat
        self._streams: dict[str, _Stream] = {}
        self._dirty: set[_Stream] = set()
        self._wake_flusher = asyncio.Event()
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher = asyncio.create_task(self._flush())

    async def SubmitPrompt(
        self, request: pb.SubmitPromptRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.SubmitPromptResponse:
        stream_id = f"base_{next(self._ids)}"
        stream = self._streams[stream_id] = _Stream()
        generation = GenerationRequest(stream_id, request.prompt, request.max_tokens or 256)
        task = asyncio.create_task(self._generate(stream, generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pb.SubmitPromptResponse(stream_id=stream_id, conversation_id="base", model="clock")

    async def _generate(self, stream: _Stream, request: GenerationRequest) -> None:
        async for token in self._source.generate(request):
            stream.pending.append(token)
            self._mark(stream)
        stream.finishing = True
        self._mark(stream)

    def _mark(self, stream: _Stream) -> None:
        self._dirty.add(stream)
        self._wake_flusher.set()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        last = float("-inf")
        while True:
            await self._wake_flusher.wait()
            self._wake_flusher.clear()
            wait = last + self._flush_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last = loop.time()
            dirty, self._dirty = self._dirty, set()
            for stream in dirty:
                stream.tokens.extend(stream.pending)
                stream.pending = []
                stream.done = stream.finishing
                stream.wake()

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.SubscribeResponse]:
        stream = self._streams.get(request.stream_id)
        if stream is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no stream {request.stream_id}")
            return
        seq = request.from_seq
        while True:
            changed = stream.changed
            if seq < len(stream.tokens):
                # Sliced before sending, like the real server's subscriptions.
                for chunk in list(chunked(stream.tokens, 0, seq, MAX_CHUNK_CHARS)):
                    message = pb.TokenChunk(
                        start_seq=chunk.start_seq, end_seq=chunk.end_seq, text=chunk.text
                    )
                    yield pb.SubscribeResponse(chunk=message)
                    seq = chunk.end_seq + 1
                continue
            if stream.done:
                end_message = pb.StreamEnd(state=pb.STREAM_STATE_COMPLETED, final_seq=seq - 1)
                yield pb.SubscribeResponse(end=end_message)
                return
            try:
                async with asyncio.timeout(self._heartbeat):
                    await changed.wait()
            except TimeoutError:
                beat = pb.Heartbeat(head_seq=len(stream.tokens) - 1)
                yield pb.SubscribeResponse(heartbeat=beat)


async def serve(port: int, token_rate: float, flush_interval: float, heartbeat: float) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # Only the two RPCs the bench calls; the others answer UNIMPLEMENTED (inherited).
    servicer = BaselineServicer(token_rate, flush_interval, heartbeat)  # type: ignore[abstract]
    pb_grpc.add_TokenStreamServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-rate", type=float, default=0.0)
    parser.add_argument("--flush-interval", type=float, default=0.005)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    # The same loop as the server under test, so the comparison is of the store alone.
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run_on_loop(
            serve(args.port, args.token_rate, args.flush_interval, args.heartbeat_interval),
            args.event_loop,
        )


if __name__ == "__main__":
    main()
