"""A server killed with SIGKILL mid-generation: the restarted server ends the stream
FAILED `interrupted` and serves every token the first one had delivered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import ServerProcess
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

PROMPT = "tell me about durable streams"
MAX_TOKENS = 2000  # at 100 tokens/s the generation would run ~20 s
TOKEN_RATE = 100.0
COLLECT_SECONDS = 1.0
RPC_TIMEOUT = 10.0


def read_subscription(
    stub: pb_grpc.TokenStreamServiceStub, stream_id: str, from_seq: int
) -> tuple[list[pb.TokenChunk], pb.StreamEnd]:
    """Reads a whole subscription; checks the chunks are contiguous from `from_seq`."""
    chunks: list[pb.TokenChunk] = []
    end: pb.StreamEnd | None = None
    expected = from_seq
    responses = stub.Subscribe(
        pb.SubscribeRequest(stream_id=stream_id, from_seq=from_seq), timeout=RPC_TIMEOUT
    )
    for response in responses:
        kind = response.WhichOneof("event")
        assert end is None, f"a {kind} arrived after the end"
        if kind == "chunk":
            assert response.chunk.start_seq == expected
            assert response.chunk.end_seq >= response.chunk.start_seq
            expected = response.chunk.end_seq + 1
            chunks.append(response.chunk)
        elif kind == "end":
            end = response.end
    assert end is not None, "the subscription completed without an end"
    return chunks, end


def append_chunks(
    responses: Iterator[pb.SubscribeResponse], chunks: list[pb.TokenChunk], expected: int
) -> None:
    """Appends the remaining chunks of a subscription; they must continue at `expected`."""
    for response in responses:
        assert response.WhichOneof("event") == "chunk"
        assert response.chunk.start_seq == expected
        expected = response.chunk.end_seq + 1
        chunks.append(response.chunk)


def collect_then_kill(
    stub: pb_grpc.TokenStreamServiceStub, stream_id: str, server: ServerProcess
) -> list[pb.TokenChunk]:
    """Subscribes from 0 for COLLECT_SECONDS, SIGKILLs the server while still subscribed,
    and returns every chunk that was delivered (including any buffered at the kill)."""
    chunks: list[pb.TokenChunk] = []
    responses: Iterator[pb.SubscribeResponse] = stub.Subscribe(
        pb.SubscribeRequest(stream_id=stream_id, from_seq=0), timeout=RPC_TIMEOUT
    )
    deadline = time.monotonic() + COLLECT_SECONDS
    expected = 0
    for response in responses:
        kind = response.WhichOneof("event")
        assert kind != "end", f"the stream ended early: {response.end}"
        if kind == "chunk":
            assert response.chunk.start_seq == expected
            expected = response.chunk.end_seq + 1
            chunks.append(response.chunk)
        if time.monotonic() >= deadline:
            break
    server.kill()
    # Whatever the client library had already received is also "delivered".
    with pytest.raises(grpc.RpcError) as failure:
        append_chunks(responses, chunks, expected)
    assert isinstance(failure.value, grpc.Call)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    return chunks


def test_sigkill_mid_stream_ends_interrupted_and_keeps_delivered_tokens(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    db_path = tmp_path / "db.sqlite"

    # -- first server: start a long generation and read part of it ----------------------
    server_process.start(db_path, TOKEN_RATE)
    with grpc.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        submitted = stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt=PROMPT, model="synthetic", max_tokens=MAX_TOKENS),
            timeout=RPC_TIMEOUT,
        )
        stream_id = submitted.stream_id
        conversation_id = submitted.conversation_id
        received_chunks = collect_then_kill(stub, stream_id, server_process)

    assert received_chunks, "no token arrived in the first second"
    received = "".join(chunk.text for chunk in received_chunks)
    last_end_seq = received_chunks[-1].end_seq
    # Far from done: the kill really interrupted the generation.
    assert last_end_seq < MAX_TOKENS // 2

    # -- second server on the same database --------------------------------------------
    server_process.start(db_path, TOKEN_RATE)
    with grpc.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)

        # (a) no longer RUNNING: recovery ended it FAILED `interrupted`.
        info = stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=RPC_TIMEOUT)
        assert info.conversation_id == conversation_id
        assert info.stream.state == pb.STREAM_STATE_FAILED
        assert info.stream.reason == "interrupted"
        assert info.stream.error
        assert info.stream.HasField("finished_at")
        final_seq = info.stream.head_seq
        assert final_seq >= last_end_seq

        # (b) from 0: a superset of what was delivered, then the FAILED end.
        chunks, end = read_subscription(stub, stream_id, 0)
        full = "".join(chunk.text for chunk in chunks)
        assert full.startswith(received), "a delivered token was lost (not durable)"
        assert end.state == pb.STREAM_STATE_FAILED
        assert end.reason == "interrupted"
        assert end.error
        assert end.final_seq == final_seq
        assert end.final_seq >= last_end_seq
        assert (chunks[-1].end_seq if chunks else -1) == end.final_seq
        # The stored text is exactly the first final_seq + 1 tokens the model produces.
        assert full == "".join(synthetic_tokens(PROMPT, end.final_seq + 1))

        # (c) resuming after the last delivered token gives exactly the rest.
        rest_chunks, rest_end = read_subscription(stub, stream_id, last_end_seq + 1)
        rest = "".join(chunk.text for chunk in rest_chunks)
        assert received + rest == full
        assert rest_end == end

        # (d) history keeps the turn, FAILED, with the whole stored response.
        history = stub.GetHistory(
            pb.GetHistoryRequest(conversation_id=conversation_id), timeout=RPC_TIMEOUT
        )
        assert [turn.stream_id for turn in history.turns] == [stream_id]
        turn = history.turns[0]
        assert turn.prompt == PROMPT
        assert turn.state == pb.STREAM_STATE_FAILED
        assert turn.reason == "interrupted"
        assert turn.response == full
        assert turn.head_seq == final_seq
        assert not history.next_page_token

    assert "ended 1 interrupted stream(s)" in server_process.log_text()


def test_sigterm_mid_stream_ends_shutdown_and_subscriber_gets_the_end(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    """The graceful counterpart: subscribers get their `end` before the process exits."""
    db_path = tmp_path / "db.sqlite"
    server_process.start(db_path, TOKEN_RATE)
    with grpc.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        submitted = stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt=PROMPT, model="synthetic", max_tokens=MAX_TOKENS),
            timeout=RPC_TIMEOUT,
        )
        stream_id = submitted.stream_id
        responses: Iterator[pb.SubscribeResponse] = stub.Subscribe(
            pb.SubscribeRequest(stream_id=stream_id, from_seq=0), timeout=RPC_TIMEOUT
        )
        first = next(responses)
        assert first.WhichOneof("event") == "chunk"
        chunks = [first.chunk]
        assert server_process.terminate() == 0
        # The call completes normally: the remaining chunks, then the end.
        end: pb.StreamEnd | None = None
        for response in responses:
            assert end is None
            if response.WhichOneof("event") == "chunk":
                assert response.chunk.start_seq == chunks[-1].end_seq + 1
                chunks.append(response.chunk)
            elif response.WhichOneof("event") == "end":
                end = response.end
    assert end is not None
    assert end.state == pb.STREAM_STATE_FAILED
    assert end.reason == "shutdown"
    assert end.final_seq == chunks[-1].end_seq
    received = "".join(chunk.text for chunk in chunks)
    assert received == "".join(synthetic_tokens(PROMPT, end.final_seq + 1))

    # The restarted server keeps that ending (it was not left active, so not `interrupted`).
    server_process.start(db_path, TOKEN_RATE)
    with grpc.insecure_channel(server_process.target) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        info = stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=RPC_TIMEOUT)
        assert info.stream.state == pb.STREAM_STATE_FAILED
        assert info.stream.reason == "shutdown"
        assert info.stream.head_seq == end.final_seq
        stored, stored_end = read_subscription(stub, stream_id, 0)
        assert "".join(chunk.text for chunk in stored) == received
        assert stored_end == end
    assert "interrupted stream" not in server_process.log_text()
