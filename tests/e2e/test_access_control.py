"""Who may do what in a conversation, through a real server with API keys.

alice owns the conversation, bob is a member, carol a viewer, dave is not in it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from tests.e2e.grpc_helpers import error_info
from tokenstream.client import ConnectionOptions, TokenStreamClient
from tokenstream.server import ServerConfig, TokenStreamServer, create_server
from tokenstream.server.auth import AuthSettings
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub

USERS = ("alice", "bob", "carol", "dave")
OK, DENIED, MISSING = "OK", "PERMISSION_DENIED", "NOT_FOUND"


@dataclass
class World:
    server: TokenStreamServer
    channel: grpc.aio.Channel
    stub: TokenStreamServiceAsyncStub
    conversation_id: str
    alice_stream: str  # running, by alice
    bob_stream: str  # running, by bob

    @staticmethod
    def auth(user: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {user}-key"),)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    keys = tmp_path / "keys.toml"
    keys.write_text("".join(f'[[keys]]\nuser = "{u}"\nkey = "{u}-key"\n\n' for u in USERS))
    config = ServerConfig(
        port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        token_rate=5.0,  # streams stay running
        shutdown_grace=0.5,
        auth=AuthSettings(api_keys_file=keys),
    )
    server, _ = await create_server(config)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.TokenStreamServiceStub(channel)
    first = await stub.SubmitPrompt(
        pb.SubmitPromptRequest(prompt="alice asks", max_tokens=500), metadata=World.auth("alice")
    )
    conversation = first.conversation_id
    for user, role in (("bob", pb.ROLE_MEMBER), ("carol", pb.ROLE_VIEWER)):
        await stub.AddMember(
            pb.AddMemberRequest(conversation_id=conversation, user_id=user, role=role),
            metadata=World.auth("alice"),
        )
    second = await stub.SubmitPrompt(
        pb.SubmitPromptRequest(prompt="bob asks", conversation_id=conversation, max_tokens=500),
        metadata=World.auth("bob"),
    )
    yield World(server, channel, stub, conversation, first.stream_id, second.stream_id)
    await channel.close()
    await server.stop()


async def outcome(call: Any, request: Any, user: str) -> str:
    try:
        reply = call(request, metadata=World.auth(user))
        if hasattr(reply, "read"):  # server streaming: the first message decides
            await reply.read()
            reply.cancel()
        else:
            await reply
    except grpc.aio.AioRpcError as error:
        reason = error_info(error).reason
        # Not yours and not there read the same (nothing to probe ids with): any other
        # reason shows up in the matrix as a mismatch.
        if error.code() == grpc.StatusCode.NOT_FOUND and reason.endswith("_NOT_FOUND"):
            return MISSING
        return f"{error.code().name}:{reason}" if error.code().name != DENIED else DENIED
    return OK


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("submit", {"alice": OK, "bob": OK, "carol": DENIED, "dave": MISSING}),
        ("subscribe", {"alice": OK, "bob": OK, "carol": OK, "dave": MISSING}),
        ("get_stream", {"alice": OK, "bob": OK, "carol": OK, "dave": MISSING}),
        ("history", {"alice": OK, "bob": OK, "carol": OK, "dave": MISSING}),
        ("get_conversation", {"alice": OK, "bob": OK, "carol": OK, "dave": MISSING}),
        ("cancel_others", {"alice": OK, "bob": DENIED, "carol": DENIED, "dave": MISSING}),
        ("add_member", {"alice": OK, "bob": DENIED, "carol": DENIED, "dave": MISSING}),
    ],
)
async def test_access_matrix(world: World, action: str, expected: dict[str, str]) -> None:
    stub, conversation = world.stub, world.conversation_id
    requests: dict[str, tuple[Any, Any]] = {
        "submit": (
            stub.SubmitPrompt,
            pb.SubmitPromptRequest(prompt="me too", conversation_id=conversation, max_tokens=3),
        ),
        "subscribe": (stub.Subscribe, pb.SubscribeRequest(stream_id=world.bob_stream)),
        "get_stream": (stub.GetStream, pb.GetStreamRequest(stream_id=world.bob_stream)),
        "history": (stub.GetHistory, pb.GetHistoryRequest(conversation_id=conversation)),
        "get_conversation": (
            stub.GetConversation,
            pb.GetConversationRequest(conversation_id=conversation),
        ),
        # Everyone tries to cancel the stream of someone else; only the owner may. The
        # owner goes last, so the others meet a running stream.
        "cancel_others": (stub.Cancel, pb.CancelRequest(stream_id=world.bob_stream)),
        "add_member": (
            stub.AddMember,
            pb.AddMemberRequest(conversation_id=conversation, user_id="erin", role=pb.ROLE_VIEWER),
        ),
    }
    call, request = requests[action]
    if action == "cancel_others":
        call_as = {"bob": world.alice_stream}  # bob tries alice's stream
        got = {}
        for user in ("carol", "dave", "bob", "alice"):
            target = call_as.get(user, world.bob_stream)
            got[user] = await outcome(call, pb.CancelRequest(stream_id=target), user)
    else:
        got = {user: await outcome(call, request, user) for user in USERS}
    assert got == expected


async def test_authors_cancel_their_own_streams(world: World) -> None:
    reply = await world.stub.Cancel(
        pb.CancelRequest(stream_id=world.bob_stream), metadata=World.auth("bob")
    )
    assert reply.state == pb.STREAM_STATE_CANCELLED


async def test_listing_shows_only_the_callers_conversations(world: World) -> None:
    mine = await world.stub.SubmitPrompt(
        pb.SubmitPromptRequest(prompt="dave's own", max_tokens=1), metadata=World.auth("dave")
    )
    for user, expected in (
        ("dave", [mine.conversation_id]),
        ("carol", [world.conversation_id]),
        ("alice", [world.conversation_id]),
    ):
        listed = await world.stub.ListConversations(
            pb.ListConversationsRequest(), metadata=World.auth(user)
        )
        assert [c.conversation_id for c in listed.conversations] == expected
    conversation = (
        await world.stub.GetConversation(
            pb.GetConversationRequest(conversation_id=world.conversation_id),
            metadata=World.auth("carol"),
        )
    ).conversation
    roles = {m.user_id: m.role for m in conversation.members}
    assert roles == {"alice": pb.ROLE_OWNER, "bob": pb.ROLE_MEMBER, "carol": pb.ROLE_VIEWER}


async def test_members_are_managed_by_owners(world: World) -> None:
    stub, conversation = world.stub, world.conversation_id
    # bob leaves by himself; the last owner cannot leave.
    await stub.RemoveMember(
        pb.RemoveMemberRequest(conversation_id=conversation, user_id="bob"),
        metadata=World.auth("bob"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RemoveMember(
            pb.RemoveMemberRequest(conversation_id=conversation, user_id="alice"),
            metadata=World.auth("alice"),
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(info.value).reason == "LAST_OWNER"
    # Once out, bob reads nothing of it.
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetHistory(
            pb.GetHistoryRequest(conversation_id=conversation), metadata=World.auth("bob")
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # A viewer promoted to member may submit.
    await stub.AddMember(
        pb.AddMemberRequest(conversation_id=conversation, user_id="carol", role=pb.ROLE_MEMBER),
        metadata=World.auth("alice"),
    )
    await stub.SubmitPrompt(
        pb.SubmitPromptRequest(prompt="now I may", conversation_id=conversation, max_tokens=1),
        metadata=World.auth("carol"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad_role:
        await stub.AddMember(
            pb.AddMemberRequest(conversation_id=conversation, user_id="erin"),
            metadata=World.auth("alice"),
        )
    assert bad_role.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_library_manages_conversations(world: World) -> None:
    owner = TokenStreamClient(
        world.server.address, options=ConnectionOptions(bearer_token="alice-key")
    )
    async with owner:
        fresh = await owner.create_conversation()
        assert [(m.user_id, m.role) for m in fresh.members] == [("alice", "OWNER")]
        added = await owner.add_member(fresh.conversation_id, "dave", "viewer")
        assert (added.user_id, added.role) == ("dave", "VIEWER")
        listed = [c.conversation_id async for c in owner.conversations(page_size=1)]
        assert listed == [fresh.conversation_id, world.conversation_id]  # newest first
        await owner.remove_member(fresh.conversation_id, "dave")
        again = await owner.get_conversation(fresh.conversation_id)
        assert [m.user_id for m in again.members] == ["alice"]
