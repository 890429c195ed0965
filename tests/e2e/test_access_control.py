"""Who may do what in a conversation, through a real server with API keys.

alice owns the conversation, bob is a member, carol a viewer, dave is not in it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.grpc_helpers import error_info
from tokenstream.client import (
    ConnectionOptions,
    RetryPolicy,
    TokenStreamClient,
    TokenStreamClientError,
)
from tokenstream.server import ServerConfig, TokenStreamServer, create_server
from tokenstream.server.auth import AuthSettings
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub

USERS = ("alice", "bob", "carol", "dave")
SECRET = "matrix-secret-matrix-secret-matrix-secret"
OK, DENIED, MISSING, UNAUTHENTICATED = "OK", "PERMISSION_DENIED", "NOT_FOUND", "UNAUTHENTICATED"


def expired_jwt(user: str) -> str:
    return jwt.encode({"sub": user, "exp": time.time() - 5}, SECRET, algorithm="HS256")


# Who calls: three callers without valid credentials, then by role (owner last, so that
# the others meet running streams and existing members).
CALLERS: dict[str, tuple[tuple[str, str], ...]] = {
    "no credentials": (),
    "bad token": (("authorization", "Bearer mallory-key"),),
    "expired jwt": (("authorization", f"Bearer {expired_jwt('alice')}"),),
    **{user: (("authorization", f"Bearer {user}-key"),) for user in ("dave", "carol", "bob")},
    "alice": (("authorization", "Bearer alice-key"),),
}


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
        auth=AuthSettings(api_keys_file=keys, jwt_hs256_secret=SECRET),
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


async def outcome(call: Any, request: Any, metadata: tuple[tuple[str, str], ...]) -> str:
    try:
        reply = call(request, metadata=metadata)
        if hasattr(reply, "read"):  # server streaming: the first message decides
            await reply.read()
            reply.cancel()
        else:
            await reply
    except grpc.aio.AioRpcError as error:
        code, reason = error.code().name, error_info(error).reason
        # Each answer must carry the reason that explains it; any other reason shows up in
        # the matrix as a mismatch. Not yours and not there read the same.
        if code == MISSING and reason.endswith("_NOT_FOUND"):
            return MISSING
        if code == DENIED and reason in ("ROLE_TOO_LOW", "NOT_AUTHOR_OR_OWNER"):
            return DENIED
        if code == UNAUTHENTICATED and reason.endswith("CREDENTIALS"):
            return UNAUTHENTICATED
        return f"{code}:{reason}"
    return OK


async def first_error(
    call: Any, request: Any, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.AioRpcError:
    try:
        reply = call(request, metadata=metadata)
        await (reply.read() if hasattr(reply, "read") else reply)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{request} succeeded")


def by_role(owner: str, member: str, viewer: str, outsider: str) -> dict[str, str]:
    unauthenticated = dict.fromkeys(("no credentials", "bad token", "expired jwt"), UNAUTHENTICATED)
    return unauthenticated | {"alice": owner, "bob": member, "carol": viewer, "dave": outsider}


@pytest.mark.parametrize(
    ("rpc", "expected"),
    [
        ("SubmitPrompt", by_role(OK, OK, DENIED, MISSING)),
        ("Subscribe", by_role(OK, OK, OK, MISSING)),
        ("Cancel", by_role(OK, DENIED, DENIED, MISSING)),
        ("GetHistory", by_role(OK, OK, OK, MISSING)),
        ("GetStream", by_role(OK, OK, OK, MISSING)),
        ("CreateConversation", by_role(OK, OK, OK, OK)),
        ("GetConversation", by_role(OK, OK, OK, MISSING)),
        ("ListConversations", by_role(OK, OK, OK, OK)),
        ("AddMember", by_role(OK, DENIED, DENIED, MISSING)),
        ("RemoveMember", by_role(OK, DENIED, DENIED, MISSING)),
        ("WatchConversation", by_role(OK, OK, OK, MISSING)),
    ],
)
async def test_access_matrix(world: World, rpc: str, expected: dict[str, str]) -> None:
    stub, conversation = world.stub, world.conversation_id
    # erin is a viewer whom everyone tries to remove; only the owner may.
    await stub.AddMember(
        pb.AddMemberRequest(conversation_id=conversation, user_id="erin", role=pb.ROLE_VIEWER),
        metadata=World.auth("alice"),
    )
    requests: dict[str, Any] = {
        "SubmitPrompt": pb.SubmitPromptRequest(
            prompt="me too", conversation_id=conversation, max_tokens=3
        ),
        "Subscribe": pb.SubscribeRequest(stream_id=world.bob_stream),
        # Everyone tries to cancel someone else's stream: bob tries alice's, the others bob's.
        "Cancel": pb.CancelRequest(stream_id=world.bob_stream),
        "GetHistory": pb.GetHistoryRequest(conversation_id=conversation),
        "GetStream": pb.GetStreamRequest(stream_id=world.bob_stream),
        "CreateConversation": pb.CreateConversationRequest(),
        "GetConversation": pb.GetConversationRequest(conversation_id=conversation),
        "ListConversations": pb.ListConversationsRequest(),
        "AddMember": pb.AddMemberRequest(
            conversation_id=conversation, user_id="frank", role=pb.ROLE_VIEWER
        ),
        "RemoveMember": pb.RemoveMemberRequest(conversation_id=conversation, user_id="erin"),
        "WatchConversation": pb.WatchConversationRequest(
            conversation_id=conversation, include_tokens=True
        ),
    }
    call = getattr(stub, rpc)
    got = {}
    for caller, metadata in CALLERS.items():
        request = requests[rpc]
        if rpc == "Cancel" and caller == "bob":
            request = pb.CancelRequest(stream_id=world.alice_stream)
        got[caller] = await outcome(call, request, metadata)
    assert got == expected


@pytest.mark.parametrize(
    "rpc",
    ["Subscribe", "Cancel", "GetHistory", "GetStream", "GetConversation", "WatchConversation"],
)
async def test_not_yours_reads_exactly_like_not_there(world: World, rpc: str) -> None:
    """An outsider learns nothing from an id: the answer for another's conversation or
    stream equals the answer for an id that was never issued (apart from the id itself)."""
    unknown_stream, unknown_conversation = "strm_" + "z" * 26, "conv_" + "z" * 26
    real: dict[str, tuple[Any, Any]] = {
        "Subscribe": (
            pb.SubscribeRequest(stream_id=world.bob_stream),
            pb.SubscribeRequest(stream_id=unknown_stream),
        ),
        "Cancel": (
            pb.CancelRequest(stream_id=world.bob_stream),
            pb.CancelRequest(stream_id=unknown_stream),
        ),
        "GetHistory": (
            pb.GetHistoryRequest(conversation_id=world.conversation_id),
            pb.GetHistoryRequest(conversation_id=unknown_conversation),
        ),
        "GetStream": (
            pb.GetStreamRequest(stream_id=world.bob_stream),
            pb.GetStreamRequest(stream_id=unknown_stream),
        ),
        "GetConversation": (
            pb.GetConversationRequest(conversation_id=world.conversation_id),
            pb.GetConversationRequest(conversation_id=unknown_conversation),
        ),
        "WatchConversation": (
            pb.WatchConversationRequest(conversation_id=world.conversation_id),
            pb.WatchConversationRequest(conversation_id=unknown_conversation),
        ),
    }
    answers = []
    for request in real[rpc]:
        error = await first_error(getattr(world.stub, rpc), request, World.auth("dave"))
        details = error.details() or ""
        for leaked in ("alice", "bob", "carol", "asks"):
            assert leaked not in details
        for an_id in (
            world.bob_stream,
            world.conversation_id,
            unknown_stream,
            unknown_conversation,
        ):
            details = details.replace(an_id, "<id>")
        answers.append((error.code(), error_info(error).reason, details))
    assert answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.NOT_FOUND


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


async def test_serve_takes_a_cancel_policy(server_process: ServerProcess, tmp_path: Path) -> None:
    """`tokenstream serve --cancel-policy owner`: authors may no longer cancel, owners may."""
    keys = tmp_path / "keys.toml"
    keys.write_text("".join(f'[[keys]]\nuser = "{u}"\nkey = "{u}-key"\n\n' for u in USERS))
    extra = ("--api-keys-file", str(keys), "--cancel-policy", "owner")
    port = await asyncio.to_thread(
        server_process.start, tmp_path / "db.sqlite", 5.0, extra_args=extra
    )
    target = f"127.0.0.1:{port}"

    def as_user(user: str) -> TokenStreamClient:
        options = ConnectionOptions(bearer_token=f"{user}-key")
        return TokenStreamClient(target, options=options, retry=RetryPolicy(max_attempts=1))

    async with as_user("alice") as alice, as_user("bob") as bob:
        conversation = await alice.create_conversation()
        await alice.add_member(conversation.conversation_id, "bob", "member")
        mine = await bob.submit("bob's own", conversation_id=conversation.conversation_id)
        with pytest.raises(TokenStreamClientError) as denied:
            await bob.cancel(mine.stream_id)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.reason == "ROLE_TOO_LOW"
        assert "owner" in denied.value.message
        assert (await alice.cancel(mine.stream_id)).state == "CANCELLED"
