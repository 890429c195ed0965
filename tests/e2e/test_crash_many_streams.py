"""SIGKILL while 20 streams generate and 20 subscribers read them: after the restart every
stream ends FAILED `interrupted`, every token any subscriber received is stored, and each
subscriber resumes from its last `end_seq + 1` to exactly the rest."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import ServerProcess
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

STREAMS = 20
MAX_TOKENS = 1500  # at 100 tokens/s each generation would run ~15 s
TOKEN_RATE = 100.0
COLLECT_SECONDS = 1.5
RPC_TIMEOUT = 15.0


def prompt_of(index: int) -> str:
    return f"stream {index}: tell me about durable streams"


@dataclass
class Delivered:
    """What one subscriber of the first server received before the kill."""

    stream_id: str
    prompt: str
    chunks: list[pb.TokenChunk] = field(default_factory=list)
    failure: grpc.StatusCode | None = None

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def last_end_seq(self) -> int:
        return self.chunks[-1].end_seq if self.chunks else -1


@dataclass
class Read:
    """A whole subscription of the restarted server."""

    chunks: list[pb.TokenChunk]
    end: pb.StreamEnd

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)


async def subscribe_until_killed(stub: pb_grpc.TokenStreamServiceAsyncStub, got: Delivered) -> None:
    """Records every chunk (checking contiguity from 0) until the connection breaks."""
    call = stub.Subscribe(
        pb.SubscribeRequest(stream_id=got.stream_id, from_seq=0), timeout=RPC_TIMEOUT
    )
    try:
        async for response in call:
            kind = response.WhichOneof("event")
            assert kind != "end", f"stream {got.stream_id} ended before the kill: {response.end}"
            if kind == "chunk":
                chunk = response.chunk
                assert chunk.start_seq == got.last_end_seq + 1, f"gap or duplicate: {chunk}"
                assert chunk.end_seq >= chunk.start_seq
                got.chunks.append(chunk)
    except grpc.aio.AioRpcError as error:
        got.failure = error.code()
    else:
        raise AssertionError(f"subscription of {got.stream_id} completed without an error")


async def read_to_end(
    stub: pb_grpc.TokenStreamServiceAsyncStub, stream_id: str, from_seq: int
) -> Read:
    """Reads a whole subscription from `from_seq`, checking contiguity; it must end."""
    chunks: list[pb.TokenChunk] = []
    end: pb.StreamEnd | None = None
    expected = from_seq
    call = stub.Subscribe(
        pb.SubscribeRequest(stream_id=stream_id, from_seq=from_seq), timeout=RPC_TIMEOUT
    )
    async for response in call:
        kind = response.WhichOneof("event")
        assert end is None, f"a {kind} arrived after the end"
        if kind == "chunk":
            assert response.chunk.start_seq == expected, f"gap or duplicate: {response.chunk}"
            assert response.chunk.end_seq >= response.chunk.start_seq
            expected = response.chunk.end_seq + 1
            chunks.append(response.chunk)
        elif kind == "end":
            end = response.end
    assert end is not None, f"the subscription of {stream_id} completed without an end"
    return Read(chunks, end)


async def check_recovered(stub: pb_grpc.TokenStreamServiceAsyncStub, got: Delivered) -> int:
    """Checks one stream after the restart; returns its final_seq."""
    info = await stub.GetStream(pb.GetStreamRequest(stream_id=got.stream_id), timeout=RPC_TIMEOUT)
    assert info.stream.state == pb.STREAM_STATE_FAILED, info
    assert info.stream.reason == "interrupted"
    assert info.stream.error
    assert info.stream.HasField("finished_at")
    final_seq = info.stream.head_seq

    stored = await read_to_end(stub, got.stream_id, 0)
    assert stored.end.state == pb.STREAM_STATE_FAILED
    assert stored.end.reason == "interrupted"
    assert stored.end.final_seq == final_seq, "GetStream and Subscribe disagree on final_seq"
    assert (stored.chunks[-1].end_seq if stored.chunks else -1) == final_seq
    assert final_seq >= got.last_end_seq, "a delivered token is past the stored end"
    # The stored text is exactly what the model produced, and the delivered text a prefix.
    assert stored.text == "".join(synthetic_tokens(got.prompt, final_seq + 1))
    assert stored.text.startswith(got.text), f"a delivered token of {got.stream_id} was lost"

    rest = await read_to_end(stub, got.stream_id, got.last_end_seq + 1)
    assert got.text + rest.text == stored.text
    assert rest.end == stored.end
    return final_seq


async def test_sigkill_with_many_streams_and_subscribers(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    db_path = tmp_path / "db.sqlite"

    # -- first server: 20 long generations, each with a subscriber from seq 0 -------------
    server_process.start(db_path, TOKEN_RATE)
    delivered: list[Delivered] = []
    async with grpc.aio.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        readers: list[asyncio.Task[None]] = []
        for index in range(STREAMS):
            submitted = await stub.SubmitPrompt(
                pb.SubmitPromptRequest(
                    prompt=prompt_of(index), model="synthetic", max_tokens=MAX_TOKENS
                ),
                timeout=RPC_TIMEOUT,
            )
            got = Delivered(submitted.stream_id, prompt_of(index))
            delivered.append(got)
            readers.append(asyncio.create_task(subscribe_until_killed(stub, got)))
        assert len({got.stream_id for got in delivered}) == STREAMS

        await asyncio.sleep(COLLECT_SECONDS)
        killed_at = time.monotonic()
        await asyncio.to_thread(server_process.kill)
        # Each reader keeps what the client library had buffered, then sees the broken call.
        await asyncio.wait_for(asyncio.gather(*readers), timeout=10.0)
        assert time.monotonic() - killed_at < 10.0

    for got in delivered:
        assert got.failure == grpc.StatusCode.UNAVAILABLE, got.stream_id
        assert got.chunks, f"no token of {got.stream_id} arrived in {COLLECT_SECONDS} s"
        # Far from done: the kill really interrupted every generation.
        assert got.last_end_seq < MAX_TOKENS // 2

    # -- second server on the same file --------------------------------------------------
    server_process.start(db_path, TOKEN_RATE)
    async with grpc.aio.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        final_seqs = await asyncio.gather(*(check_recovered(stub, got) for got in delivered))

    received = [got.last_end_seq + 1 for got in delivered]
    stored = [final_seq + 1 for final_seq in final_seqs]
    print(
        f"\n{STREAMS} streams: tokens received before the kill {min(received)}-{max(received)}, "
        f"stored {min(stored)}-{max(stored)}, "
        f"stored beyond the delivered {max(s - r for s, r in zip(stored, received, strict=True))}"
    )

    assert f"ended {STREAMS} interrupted stream(s)" in server_process.log_text()
