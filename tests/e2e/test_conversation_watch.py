"""WatchConversation: several users and devices see a conversation as it happens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from tokenstream.server import ServerConfig, TokenStreamServer, create_server
from tokenstream.server.auth import AuthSettings
from tokenstream.server.streams import EngineSettings
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub


def auth(user: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {user}-key"),)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TokenStreamServer]:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        "".join(f'[[keys]]\nuser = "{u}"\nkey = "{u}-key"\n\n' for u in ("alice", "bob", "eve"))
    )
    config = ServerConfig(
        port=0,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        token_rate=100.0,
        shutdown_grace=0.5,
        auth=AuthSettings(api_keys_file=keys),
        engine=EngineSettings(heartbeat_interval=0.2, flush_interval=0.002),
    )
    running, _ = await create_server(config)
    await running.start()
    yield running
    await running.stop()


def kinds(events: list[pb.ConversationEvent]) -> list[str]:
    return [str(e.WhichOneof("kind")) for e in events]


async def watch_until(
    stub: TokenStreamServiceAsyncStub,
    user: str,
    conversation_id: str,
    from_seq: int,
    stop_kind: str,
    limit: int | None = None,
) -> tuple[list[pb.ConversationEvent], int]:
    """Events from `from_seq` until one of `stop_kind` (or `limit` events); heartbeats seen."""
    events: list[pb.ConversationEvent] = []
    heartbeats = 0
    call = stub.WatchConversation(
        pb.WatchConversationRequest(conversation_id=conversation_id, from_event_seq=from_seq),
        metadata=auth(user),
    )
    async for message in call:
        if message.WhichOneof("message") == "heartbeat":
            heartbeats += 1
            continue
        for event in message.events.events:
            events.append(event)
            if event.WhichOneof("kind") == stop_kind or (limit and len(events) >= limit):
                call.cancel()
                return events, heartbeats
    raise AssertionError("the watch ended by itself")


async def test_two_users_three_devices_see_the_conversation_in_order(
    server: TokenStreamServer,
) -> None:
    async with (
        grpc.aio.insecure_channel(server.address) as device1,
        grpc.aio.insecure_channel(server.address) as device2,
        grpc.aio.insecure_channel(server.address) as bobs_phone,
    ):
        a1 = pb_grpc.TokenStreamServiceStub(device1)
        a2 = pb_grpc.TokenStreamServiceStub(device2)
        b = pb_grpc.TokenStreamServiceStub(bobs_phone)
        created = await a1.CreateConversation(
            pb.CreateConversationRequest(), metadata=auth("alice")
        )
        conversation = created.conversation.conversation_id
        await a1.AddMember(
            pb.AddMemberRequest(conversation_id=conversation, user_id="bob", role=pb.ROLE_MEMBER),
            metadata=auth("alice"),
        )
        watchers = [
            asyncio.create_task(watch_until(a2, "alice", conversation, 0, "stream_ended")),
            asyncio.create_task(watch_until(b, "bob", conversation, 0, "stream_ended")),
        ]
        await asyncio.sleep(0.3)  # the watchers are waiting (and receive heartbeats)
        submitted = await a1.SubmitPrompt(
            pb.SubmitPromptRequest(
                conversation_id=conversation, prompt="hello both of you", model="echo"
            ),
            metadata=auth("alice"),
        )
        tokens = await read_all_as(b, "bob", submitted.stream_id)
        for events, heartbeats in await asyncio.gather(*watchers):
            assert kinds(events) == [
                "member_added",
                "prompt_submitted",
                "stream_started",
                "stream_ended",
            ]
            assert [e.seq for e in events] == [0, 1, 2, 3]
            assert heartbeats >= 1
            added, prompt, started, ended = events
            assert (added.actor, added.member_added.user_id) == ("alice", "bob")
            assert (prompt.actor, prompt.prompt_submitted.prompt) == ("alice", "hello both of you")
            assert prompt.prompt_submitted.stream_id == submitted.stream_id
            assert started.stream_started.model == "echo"
            assert ended.stream_ended.state == pb.STREAM_STATE_COMPLETED
            assert ended.stream_ended.final_seq == 3
        assert tokens == "hello both of you"


async def read_all_as(stub: TokenStreamServiceAsyncStub, user: str, stream_id: str) -> str:
    text = ""
    async for message in stub.Subscribe(
        pb.SubscribeRequest(stream_id=stream_id), metadata=auth(user)
    ):
        if message.WhichOneof("event") == "chunk":
            text += message.chunk.text
    return text


async def test_a_watcher_that_reconnects_misses_nothing(server: TokenStreamServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        first = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="one", model="echo"), metadata=auth("alice")
        )
        conversation = first.conversation_id
        for prompt in ("two", "three"):
            await stub.SubmitPrompt(
                pb.SubmitPromptRequest(conversation_id=conversation, prompt=prompt, model="echo"),
                metadata=auth("alice"),
            )
        early, _ = await watch_until(stub, "alice", conversation, 0, "", limit=4)
        rest, _ = await watch_until(stub, "alice", conversation, early[-1].seq + 1, "", limit=5)
        everything = early + rest
        assert [e.seq for e in everything] == list(range(9))  # no gap, no duplicate
        prompts = [e.prompt_submitted.prompt for e in everything if e.HasField("prompt_submitted")]
        assert prompts == ["one", "two", "three"]


async def test_watching_needs_membership(server: TokenStreamServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        mine = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="private", model="echo"), metadata=auth("alice")
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await watch_until(stub, "eve", mine.conversation_id, 0, "stream_ended")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_late_device_joins_from_a_snapshot_without_a_gap(
    server: TokenStreamServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        first = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="before", model="echo"), metadata=auth("alice")
        )
        conversation = first.conversation_id
        await watch_until(stub, "alice", conversation, 0, "stream_ended")  # first turn done
        snapshot = await stub.GetHistory(
            pb.GetHistoryRequest(conversation_id=conversation), metadata=auth("alice")
        )
        assert [t.prompt for t in snapshot.turns] == ["before"]
        assert snapshot.head_event_seq == 2  # submitted, started, ended
        await stub.SubmitPrompt(
            pb.SubmitPromptRequest(conversation_id=conversation, prompt="after", model="echo"),
            metadata=auth("alice"),
        )
        live, _ = await watch_until(
            stub, "alice", conversation, snapshot.head_event_seq + 1, "stream_ended"
        )
        assert [e.seq for e in live] == [3, 4, 5]
        assert live[0].prompt_submitted.prompt == "after"
