"""The async client."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TypeVar

import grpc

from tokenstream.client._errors import TokenStreamClientError
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Codes after which re-sending the same request can succeed; everything else is final.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})

# Keepalive pings every 20 s (the server accepts one per 10 s) so a connection to a dead or
# unreachable server fails within ~30 s even when its stream is quiet.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC 1.85 only drops the connection on an unanswered ping with this set as well.
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _state_name(value: pb.StreamState.ValueType) -> str:
    return pb.StreamState.Name(value).removeprefix("STREAM_STATE_")


@dataclass(frozen=True, slots=True)
class Submitted:
    stream_id: str
    conversation_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Chunk:
    start_seq: int
    end_seq: int
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    state: str  # COMPLETED, CANCELLED or FAILED
    final_seq: int
    reason: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class CancelResult:
    state: str
    final_seq: int


@dataclass(frozen=True, slots=True)
class Turn:
    stream_id: str
    prompt: str
    response: str
    state: str
    model: str
    head_seq: int
    created_at: datetime
    finished_at: datetime | None
    reason: str
    error: str

    @classmethod
    def from_proto(cls, turn: pb.Turn) -> Turn:
        return cls(
            stream_id=turn.stream_id,
            prompt=turn.prompt,
            response=turn.response,
            state=_state_name(turn.state),
            model=turn.model,
            head_seq=turn.head_seq,
            created_at=turn.created_at.ToDatetime(),
            finished_at=turn.finished_at.ToDatetime() if turn.HasField("finished_at") else None,
            reason=turn.reason,
            error=turn.error,
        )


@dataclass(frozen=True, slots=True)
class StreamInfo:
    conversation_id: str
    turn: Turn


class TokenStreamClient:
    """Calls one tokenstream server. Use as `async with TokenStreamClient(target) as client`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        max_resumes: int = 5,
        timeout: float | None = 30.0,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.TokenStreamServiceStub(self._channel)
        self._max_resumes = max_resumes
        self._timeout = timeout

    async def __aenter__(self) -> TokenStreamClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def submit(
        self,
        prompt: str,
        *,
        conversation_id: str = "",
        request_id: str | None = None,
        model: str = "",
        max_tokens: int = 0,
    ) -> Submitted:
        """Starts a generation. Retried on UNAVAILABLE: the request_id makes that safe."""
        request = pb.SubmitPromptRequest(
            prompt=prompt,
            conversation_id=conversation_id,
            request_id=request_id or str(uuid.uuid4()),
            model=model,
            max_tokens=max_tokens,
        )
        response = await self._unary(self._stub.SubmitPrompt, request)
        return Submitted(response.stream_id, response.conversation_id, response.model)

    async def stream(self, stream_id: str, from_seq: int = 0) -> AsyncIterator[Chunk | StreamEnd]:
        """Yields the stream's chunks from `from_seq`, then its end.

        When the connection drops, re-subscribes from the last `end_seq + 1`, so every token
        arrives exactly once and in order.
        """
        next_seq = from_seq
        resumes = 0
        while True:
            call = self._stub.Subscribe(pb.SubscribeRequest(stream_id=stream_id, from_seq=next_seq))
            try:
                async for message in call:
                    kind = message.WhichOneof("event")
                    if kind == "chunk":
                        chunk = message.chunk
                        if chunk.end_seq < next_seq or chunk.start_seq != next_seq:
                            raise TokenStreamClientError(
                                grpc.StatusCode.DATA_LOSS,
                                f"expected seq {next_seq}, got {chunk.start_seq}..{chunk.end_seq}",
                            )
                        next_seq = chunk.end_seq + 1
                        resumes = 0
                        yield Chunk(chunk.start_seq, chunk.end_seq, chunk.text)
                    elif kind == "end":
                        end = message.end
                        if end.final_seq >= next_seq:
                            raise TokenStreamClientError(
                                grpc.StatusCode.DATA_LOSS,
                                f"the stream ended at seq {end.final_seq} but tokens from "
                                f"{next_seq} on never arrived",
                            )
                        yield StreamEnd(
                            _state_name(end.state), end.final_seq, end.reason, end.error
                        )
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE_CODES or resumes >= self._max_resumes:
                    raise TokenStreamClientError.from_rpc_error(error) from error
                resumes += 1
                await asyncio.sleep(min(0.1 * 2**resumes, 2.0))
                continue
            finally:
                call.cancel()
            raise TokenStreamClientError(
                grpc.StatusCode.DATA_LOSS, "the subscription ended without an end message"
            )

    async def cancel(self, stream_id: str) -> CancelResult:
        response = await self._unary(self._stub.Cancel, pb.CancelRequest(stream_id=stream_id))
        return CancelResult(_state_name(response.state), response.final_seq)

    async def get_stream(self, stream_id: str) -> StreamInfo:
        response = await self._unary(self._stub.GetStream, pb.GetStreamRequest(stream_id=stream_id))
        return StreamInfo(response.conversation_id, Turn.from_proto(response.stream))

    async def history(self, conversation_id: str, page_size: int = 0) -> AsyncIterator[Turn]:
        """All turns of a conversation, oldest first, fetching pages as needed."""
        token = ""
        while True:
            page = await self._unary(
                self._stub.GetHistory,
                pb.GetHistoryRequest(
                    conversation_id=conversation_id, page_size=page_size, page_token=token
                ),
            )
            for turn in page.turns:
                yield Turn.from_proto(turn)
            token = page.next_page_token
            if not token:
                return

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req
    ) -> Resp:
        attempts = 0
        while True:
            try:
                return await method(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as error:
                attempts += 1
                if error.code() not in RETRYABLE_CODES or attempts > self._max_resumes:
                    raise TokenStreamClientError.from_rpc_error(error) from error
                await asyncio.sleep(min(0.1 * 2**attempts, 2.0))
