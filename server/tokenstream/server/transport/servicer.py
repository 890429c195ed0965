"""TokenStreamService: converts requests, calls the engine, converts answers. Nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from tokenstream.server.streams import StreamEngine, SubmitCommand
from tokenstream.server.transport.auth import current_principal
from tokenstream.server.transport.convert import (
    conversation_to_proto,
    event_to_proto,
    history_turn_to_proto,
    member_to_proto,
    role_from_proto,
    state_to_proto,
    turn_to_proto,
    watch_event_to_proto,
)
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc


def caller_of(context: grpc.aio.ServicerContext[object, object]) -> str:
    """Who is calling, for per-caller limits: the authenticated user, or in development
    mode (no authentication) the peer's address without its port."""
    principal = current_principal()
    if principal is not None and principal.method != "development":
        return principal.user_id
    peer = context.peer() or ""
    host, _, _port = peer.rpartition(":")
    return host or peer


def user_of() -> str | None:
    """The authenticated user, or None in development mode (no access control)."""
    principal = current_principal()
    if principal is None or principal.method == "development":
        return None
    return principal.user_id


class TokenStreamServicer(pb_grpc.TokenStreamServiceServicer):
    def __init__(self, engine: StreamEngine) -> None:
        self._engine = engine

    async def SubmitPrompt(
        self, request: pb.SubmitPromptRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.SubmitPromptResponse:
        submission = await self._engine.submit(
            SubmitCommand(
                prompt=request.prompt,
                conversation_id=request.conversation_id,
                request_id=request.request_id,
                model=request.model,
                max_tokens=request.max_tokens,
                caller=caller_of(context),
                user=user_of(),
            )
        )
        return pb.SubmitPromptResponse(
            stream_id=submission.stream_id,
            conversation_id=submission.conversation_id,
            model=submission.model,
        )

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.SubscribeResponse]:
        events = await self._engine.subscribe(request.stream_id, request.from_seq, user_of())
        # Closed at once when the call ends, so its subscriber slot is given back promptly.
        async with contextlib.aclosing(events):
            async for event in events:
                yield event_to_proto(event)

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CancelResponse:
        record = await self._engine.cancel(request.stream_id, user_of())
        return pb.CancelResponse(state=state_to_proto(record.state), final_seq=record.head_seq)

    async def GetHistory(
        self, request: pb.GetHistoryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetHistoryResponse:
        page = await self._engine.history(
            request.conversation_id, request.page_size, request.page_token, user_of()
        )
        return pb.GetHistoryResponse(
            turns=[history_turn_to_proto(turn) for turn in page.turns],
            next_page_token=page.next_page_token,
            head_event_seq=page.head_event_seq,
        )

    async def GetStream(
        self, request: pb.GetStreamRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetStreamResponse:
        record = await self._engine.get_stream(request.stream_id, user_of())
        return pb.GetStreamResponse(
            stream=turn_to_proto(record), conversation_id=record.conversation_id
        )

    async def CreateConversation(
        self,
        request: pb.CreateConversationRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.CreateConversationResponse:
        conversation = await self._engine.create_conversation(user_of())
        return pb.CreateConversationResponse(conversation=conversation_to_proto(conversation))

    async def GetConversation(
        self, request: pb.GetConversationRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetConversationResponse:
        conversation = await self._engine.get_conversation(request.conversation_id, user_of())
        return pb.GetConversationResponse(conversation=conversation_to_proto(conversation))

    async def ListConversations(
        self,
        request: pb.ListConversationsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.ListConversationsResponse:
        page = await self._engine.list_conversations(
            user_of(), request.page_size, request.page_token
        )
        return pb.ListConversationsResponse(
            conversations=[conversation_to_proto(c) for c in page.conversations],
            next_page_token=page.next_page_token,
        )

    async def AddMember(
        self, request: pb.AddMemberRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.AddMemberResponse:
        member = await self._engine.add_member(
            request.conversation_id, request.user_id, role_from_proto(request.role), user_of()
        )
        return pb.AddMemberResponse(member=member_to_proto(member))

    async def RemoveMember(
        self, request: pb.RemoveMemberRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RemoveMemberResponse:
        await self._engine.remove_member(request.conversation_id, request.user_id, user_of())
        return pb.RemoveMemberResponse()

    async def WatchConversation(
        self,
        request: pb.WatchConversationRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.WatchConversationResponse]:
        events = await self._engine.watch(
            request.conversation_id,
            request.from_event_seq,
            user_of(),
            include_tokens=request.include_tokens,
            from_seq_by_stream=request.from_seq_by_stream,
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield watch_event_to_proto(event)
