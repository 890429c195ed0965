"""The async client: safe retries, and streams that resume by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from tokenstream.client._endpoints import ConnectionOptions, Endpoints
from tokenstream.client._errors import RetriesExhausted, TokenStreamClientError
from tokenstream.client._retry import (
    RETRYABLE_CODES,
    RETRYABLE_EXHAUSTION_REASONS,
    RetryPolicy,
)
from tokenstream.client._types import (
    CancelResult,
    Chunk,
    Conversation,
    ConversationEvent,
    Member,
    Reconnect,
    StreamEnd,
    StreamInfo,
    StreamTokens,
    Submitted,
    Turn,
    state_name,
)
from tokenstream.v1 import tokenstream_pb2 as pb

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub

# A server-streaming call in progress (Subscribe or WatchConversation).
_Call = grpc.aio.UnaryStreamCall[Any, Any]

# Errors whose code is retryable but whose cause a retry cannot remove.
TERMINAL_REASONS = frozenset({"TOO_MANY_GENERATIONS_FOR_CALLER", "REQUEST_ID_REUSED"})

DEFAULT_TARGET = "127.0.0.1:50051"


class _Silent(Exception):
    """The subscription went quiet (no message, not even a heartbeat) or ended early."""


class TokenStreamClient:
    """Client for one server or several replicas. Use as `async with TokenStreamClient(...)`.

    - `targets`: one address or a list of replicas; after a failure the client moves on to
      the next one and resumes there.
    - `timeout`: deadline of each unary call (seconds).
    - `heartbeat_timeout`: a subscription that receives nothing (not even a heartbeat) for
      this long is treated as dead and resumed (default: 3 server heartbeat intervals).
    - `on_reconnect`: called before each reconnection, e.g. to show a notice.
    """

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        options: ConnectionOptions | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = 30.0,
        heartbeat_timeout: float = 30.0,
        on_reconnect: Callable[[Reconnect], None] | None = None,
    ) -> None:
        self.options = options or ConnectionOptions()
        self._endpoints = Endpoints(
            [targets] if isinstance(targets, str) else targets, self.options
        )
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.on_reconnect = on_reconnect
        self._metadata = self.options.metadata()

    @property
    def target(self) -> str:
        """The server in use now."""
        return self._endpoints.target

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
        await self._endpoints.close()

    # -- calls ----------------------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        conversation_id: str | None = None,
        request_id: str | None = None,
        model: str | None = None,
        max_tokens: int = 0,
    ) -> Submitted:
        """Starts a generation. Retries are safe: they carry the same `request_id`."""
        request = pb.SubmitPromptRequest(
            prompt=prompt,
            conversation_id=conversation_id or "",
            request_id=request_id or str(uuid.uuid4()),
            model=model or "",
            max_tokens=max_tokens,
        )
        reply: pb.SubmitPromptResponse = await self._unary("SubmitPrompt", request)
        return Submitted(reply.stream_id, reply.conversation_id, reply.model)

    async def cancel(self, stream_id: str) -> CancelResult:
        reply: pb.CancelResponse = await self._unary(
            "Cancel", pb.CancelRequest(stream_id=stream_id)
        )
        return CancelResult(state_name(reply.state), reply.final_seq)

    async def get_stream(self, stream_id: str) -> StreamInfo:
        reply: pb.GetStreamResponse = await self._unary(
            "GetStream", pb.GetStreamRequest(stream_id=stream_id)
        )
        return StreamInfo(reply.conversation_id, Turn.from_proto(reply.stream))

    async def history(self, conversation_id: str, page_size: int = 0) -> AsyncIterator[Turn]:
        """All turns of a conversation, oldest first, fetching pages as needed."""
        token = ""
        while True:
            page: pb.GetHistoryResponse = await self._unary(
                "GetHistory",
                pb.GetHistoryRequest(
                    conversation_id=conversation_id, page_size=page_size, page_token=token
                ),
            )
            for turn in page.turns:
                yield Turn.from_proto(turn)
            token = page.next_page_token
            if not token:
                return

    async def create_conversation(self) -> Conversation:
        reply: pb.CreateConversationResponse = await self._unary(
            "CreateConversation", pb.CreateConversationRequest()
        )
        return Conversation.from_proto(reply.conversation)

    async def get_conversation(self, conversation_id: str) -> Conversation:
        reply: pb.GetConversationResponse = await self._unary(
            "GetConversation", pb.GetConversationRequest(conversation_id=conversation_id)
        )
        return Conversation.from_proto(reply.conversation)

    async def conversations(self, page_size: int = 0) -> AsyncIterator[Conversation]:
        """The caller's conversations, newest first, fetching pages as needed."""
        token = ""
        while True:
            page: pb.ListConversationsResponse = await self._unary(
                "ListConversations",
                pb.ListConversationsRequest(page_size=page_size, page_token=token),
            )
            for conversation in page.conversations:
                yield Conversation.from_proto(conversation)
            token = page.next_page_token
            if not token:
                return

    async def add_member(self, conversation_id: str, user_id: str, role: str) -> Member:
        """Adds `user_id` as OWNER, MEMBER or VIEWER (or changes their role)."""
        reply: pb.AddMemberResponse = await self._unary(
            "AddMember",
            pb.AddMemberRequest(
                conversation_id=conversation_id,
                user_id=user_id,
                role=pb.Role.Value(f"ROLE_{role.upper()}"),
            ),
        )
        return Member.from_proto(reply.member)

    async def remove_member(self, conversation_id: str, user_id: str) -> None:
        await self._unary(
            "RemoveMember",
            pb.RemoveMemberRequest(conversation_id=conversation_id, user_id=user_id),
        )

    async def stream(
        self, stream_id: str, from_seq: int = 0
    ) -> AsyncGenerator[Chunk | StreamEnd, None]:
        """Yields the stream's chunks from `from_seq` on, then its `StreamEnd`.

        Every token arrives exactly once and in order: when the connection fails, the
        server restarts or goes silent, the client re-subscribes (to the next replica, if
        several were given) from the last `end_seq + 1`. Raises `RetriesExhausted` when that
        keeps failing, and `TokenStreamClientError` for errors a retry cannot fix.
        """
        next_seq = from_seq

        def subscribe(stub: TokenStreamServiceAsyncStub) -> _Call:
            request = pb.SubscribeRequest(stream_id=stream_id, from_seq=next_seq)
            return stub.Subscribe(request, metadata=self._metadata)

        messages = self._resuming(subscribe, lambda: next_seq)
        async with contextlib.aclosing(messages):
            async for message in messages:
                assert isinstance(message, pb.SubscribeResponse)
                kind = message.WhichOneof("event")
                if kind == "chunk":
                    next_seq = _checked_chunk(message.chunk, next_seq)
                    chunk = message.chunk
                    yield Chunk(chunk.start_seq, chunk.end_seq, chunk.text)
                elif kind == "end":
                    yield _checked_end(message.end, next_seq)
                    return

    async def watch(
        self,
        conversation_id: str,
        from_event_seq: int = 0,
        *,
        include_tokens: bool = False,
        from_seq_by_stream: Mapping[str, int] | None = None,
    ) -> AsyncGenerator[ConversationEvent | StreamTokens, None]:
        """Yields what happens in a conversation from `from_event_seq` on, without end.

        With `include_tokens`, also the token chunks of its streams: a stream's chunks come
        after its `prompt_submitted` event and before its `stream_ended` event. Resumes by
        itself like `stream()`: after a failure it watches on from the next event seq and,
        for each stream, from the next token seq, so nothing is missed or repeated.
        `from_seq_by_stream` says where to start streams whose tokens the caller already
        holds (e.g. from a GetHistory snapshot); the others start at seq 0.
        """
        next_event = from_event_seq
        next_seq = dict(from_seq_by_stream or {})

        def watch(stub: TokenStreamServiceAsyncStub) -> _Call:
            request = pb.WatchConversationRequest(
                conversation_id=conversation_id,
                from_event_seq=next_event,
                include_tokens=include_tokens,
                from_seq_by_stream=next_seq,
            )
            return stub.WatchConversation(request, metadata=self._metadata)

        messages = self._resuming(watch, lambda: next_event)
        async with contextlib.aclosing(messages):
            async for message in messages:
                assert isinstance(message, pb.WatchConversationResponse)
                if message.HasField("tokens"):
                    stream_id, chunk = message.tokens.stream_id, message.tokens.chunk
                    next_seq[stream_id] = _checked_chunk(chunk, next_seq.get(stream_id, 0))
                    yield StreamTokens(stream_id, Chunk(chunk.start_seq, chunk.end_seq, chunk.text))
                for event in message.events.events:
                    if event.seq != next_event:
                        raise TokenStreamClientError(
                            grpc.StatusCode.DATA_LOSS,
                            f"expected event seq {next_event}, got {event.seq}",
                        )
                    next_event = event.seq + 1
                    if event.HasField("stream_ended"):
                        next_seq.pop(event.stream_ended.stream_id, None)  # done with it
                    yield ConversationEvent.from_proto(event)

    async def _resuming(
        self, start: Callable[[TokenStreamServiceAsyncStub], _Call], position: Callable[[], int]
    ) -> AsyncGenerator[Message, None]:
        """Messages of a server-streaming call, restarted by `start` (from wherever the caller
        stands then) after a retryable failure or silence, on the next replica if several
        were given. Any message but a heartbeat is progress and renews the retry budget."""
        attempt = 0
        index = self._endpoints.preferred
        while True:
            call = start(self._endpoints.stub(index))
            try:
                while True:
                    try:
                        async with asyncio.timeout(self.heartbeat_timeout):
                            message = await call.read()
                    except TimeoutError:
                        raise _Silent(
                            f"no message or heartbeat from {self._endpoints.targets[index]} "
                            f"for {self.heartbeat_timeout:g} s"
                        ) from None
                    if message is grpc.aio.EOF:
                        raise _Silent("the server closed the stream without its end")
                    assert isinstance(message, Message)
                    self._endpoints.preferred = index
                    if not message.HasField("heartbeat"):
                        attempt = 0
                    yield message
            except grpc.aio.AioRpcError as rpc_error:
                error = TokenStreamClientError.from_rpc_error(rpc_error)
                if not _retryable(error, reads=True):
                    raise error from rpc_error
                cause = f"{error.code.name}: {error.message}"
            except _Silent as silent:
                error = TokenStreamClientError(grpc.StatusCode.UNAVAILABLE, str(silent))
                cause = error.message
            finally:
                call.cancel()
            attempt += 1
            index = self._endpoints.after(index)
            await self._before_retry(attempt, error, cause, index, position())

    # -- retries ---------------------------------------------------------------------------

    async def _unary(self, method: str, request: Any) -> Any:
        attempt = 0
        index = self._endpoints.preferred
        while True:
            call = getattr(self._endpoints.stub(index), method)
            try:
                reply = await call(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as rpc_error:
                error = TokenStreamClientError.from_rpc_error(rpc_error)
                if not _retryable(error, reads=False):
                    raise error from rpc_error
                attempt += 1
                index = self._endpoints.after(index)
                await self._before_retry(attempt, error, error.code.name, index, None)
            else:
                self._endpoints.preferred = index
                return reply

    async def _before_retry(
        self,
        attempt: int,
        error: TokenStreamClientError,
        cause: str,
        index: int,
        from_seq: int | None,
    ) -> None:
        if attempt >= self.retry.max_attempts:
            raise RetriesExhausted(attempt, error) from error
        delay = self.retry.backoff(attempt)
        if self.on_reconnect is not None and from_seq is not None:
            target = self._endpoints.targets[index]
            self.on_reconnect(Reconnect(attempt, cause, target, from_seq, delay))
        await asyncio.sleep(delay)


def _retryable(error: TokenStreamClientError, *, reads: bool) -> bool:
    if error.reason in TERMINAL_REASONS:
        return False
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error.reason in RETRYABLE_EXHAUSTION_REASONS
    if reads and error.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        # A subscription is a read: a proxy's RST_STREAM or a torn connection is safe to
        # retry (the server's own errors carry ErrorInfo and are not these).
        return not error.reason
    return error.code in RETRYABLE_CODES


def _checked_chunk(chunk: pb.TokenChunk, next_seq: int) -> int:
    """The seq after `chunk`, which must start at `next_seq`."""
    if chunk.start_seq != next_seq or chunk.end_seq < chunk.start_seq:
        raise TokenStreamClientError(
            grpc.StatusCode.DATA_LOSS,
            f"expected seq {next_seq}, got {chunk.start_seq}..{chunk.end_seq}",
        )
    return chunk.end_seq + 1


def _checked_end(end: pb.StreamEnd, next_seq: int) -> StreamEnd:
    if end.final_seq >= next_seq:
        raise TokenStreamClientError(
            grpc.StatusCode.DATA_LOSS,
            f"the stream ended at seq {end.final_seq} but tokens from {next_seq} on never arrived",
        )
    return StreamEnd(state_name(end.state), end.final_seq, end.reason, end.error)
