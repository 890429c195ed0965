"""WatchConversation: several users and devices see a conversation as it happens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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

    Stub = TokenStreamServiceAsyncStub


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


@asynccontextmanager
async def three_devices(
    server: TokenStreamServer, bob_role: pb.Role.ValueType
) -> AsyncIterator[tuple[str, Stub, Stub, Stub]]:
    """A conversation of alice's with bob in it, and three devices: alice's first and
    second, and bob's phone (each its own connection)."""
    async with (
        grpc.aio.insecure_channel(server.address) as device1,
        grpc.aio.insecure_channel(server.address) as device2,
        grpc.aio.insecure_channel(server.address) as bobs_phone,
    ):
        a1: Stub = pb_grpc.TokenStreamServiceStub(device1)
        a2: Stub = pb_grpc.TokenStreamServiceStub(device2)
        b: Stub = pb_grpc.TokenStreamServiceStub(bobs_phone)
        created = await a1.CreateConversation(
            pb.CreateConversationRequest(), metadata=auth("alice")
        )
        conversation = created.conversation.conversation_id
        await a1.AddMember(
            pb.AddMemberRequest(conversation_id=conversation, user_id="bob", role=bob_role),
            metadata=auth("alice"),
        )
        yield conversation, a1, a2, b


async def test_two_users_three_devices_see_the_conversation_in_order(
    server: TokenStreamServer,
) -> None:
    async with three_devices(server, bob_role=pb.ROLE_MEMBER) as (conversation, a1, a2, b):
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


# -- include_tokens: one watch mirrors the chat ------------------------------------------


class Mirror:
    """What one device saw through a watch with include_tokens, in arrival order."""

    def __init__(self) -> None:
        self.timeline: list[tuple[str, str]] = []  # (what, stream id), e.g. ("tokens", s)
        self.events: list[pb.ConversationEvent] = []
        self.text: dict[str, str] = {}
        self.next_seq: dict[str, int] = {}
        self.token_messages = 0

    @property
    def next_event_seq(self) -> int:
        return self.events[-1].seq + 1 if self.events else 0

    def take(self, message: pb.WatchConversationResponse) -> None:
        if message.HasField("tokens"):
            stream_id, chunk = message.tokens.stream_id, message.tokens.chunk
            # Chunks of a stream are consecutive: no gap, no duplicate.
            assert chunk.start_seq == self.next_seq.get(stream_id, 0), (stream_id, chunk)
            assert chunk.end_seq >= chunk.start_seq
            self.text[stream_id] = self.text.get(stream_id, "") + chunk.text
            self.next_seq[stream_id] = chunk.end_seq + 1
            self.timeline.append(("tokens", stream_id))
            self.token_messages += 1
        for event in message.events.events:
            assert event.seq == self.next_event_seq
            self.events.append(event)
            kind = str(event.WhichOneof("kind"))
            self.timeline.append((kind, getattr(getattr(event, kind), "stream_id", "")))


async def mirror(
    stub: TokenStreamServiceAsyncStub,
    user: str,
    conversation_id: str,
    into: Mirror,
    *,
    until_ended: int = 1,
    until_tokens: int | None = None,
) -> Mirror:
    """Watches with include_tokens, resuming where `into` stands, until `until_ended` streams
    ended (or `until_tokens` token messages arrived in this call)."""
    call = stub.WatchConversation(
        pb.WatchConversationRequest(
            conversation_id=conversation_id,
            from_event_seq=into.next_event_seq,
            include_tokens=True,
            from_seq_by_stream=into.next_seq,
        ),
        metadata=auth(user),
    )
    received = 0
    async for message in call:
        into.take(message)
        received += message.HasField("tokens")
        ended = sum(kind == "stream_ended" for kind, _ in into.timeline)
        if ended >= until_ended or (until_tokens is not None and received >= until_tokens):
            call.cancel()
            return into
    raise AssertionError("the watch ended by itself")


def assert_tokens_between_start_and_end(seen: Mirror, stream_id: str) -> None:
    whats = [what for what, s in seen.timeline if s == stream_id]
    assert whats[0] == "prompt_submitted", whats
    assert whats[-1] == "stream_ended", whats
    assert whats.count("stream_ended") == 1
    assert "tokens" in whats


async def stored(stub: TokenStreamServiceAsyncStub, stream_id: str) -> pb.Turn:
    """The stream's turn as history has it (with the stored response text)."""
    found = await stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), metadata=auth("alice"))
    history = await stub.GetHistory(
        pb.GetHistoryRequest(conversation_id=found.conversation_id), metadata=auth("alice")
    )
    (turn,) = [t for t in history.turns if t.stream_id == stream_id]
    return turn


async def test_with_tokens_two_users_three_devices_mirror_the_chat(
    server: TokenStreamServer,
) -> None:
    async with three_devices(server, bob_role=pb.ROLE_VIEWER) as (conversation, a1, a2, b):
        watchers = [
            asyncio.create_task(mirror(a2, "alice", conversation, Mirror())),
            asyncio.create_task(mirror(b, "bob", conversation, Mirror())),
        ]
        await asyncio.sleep(0.3)
        submitted = await a1.SubmitPrompt(
            pb.SubmitPromptRequest(conversation_id=conversation, prompt="hi", max_tokens=40),
            metadata=auth("alice"),
        )
        sid = submitted.stream_id
        mirrors = await asyncio.gather(*watchers)
        turn = await stored(a1, sid)
        for seen in mirrors:
            assert [what for what, _ in seen.timeline if what != "tokens"] == [
                "member_added",
                "prompt_submitted",
                "stream_started",
                "stream_ended",
            ]
            assert_tokens_between_start_and_end(seen, sid)
            assert seen.text[sid] == turn.response
            assert seen.next_seq[sid] == turn.head_seq + 1 == 40
            # Delivered as generated (40 tokens at 100/s), not all at the end.
            assert seen.token_messages >= 3


async def test_with_tokens_a_watcher_that_reconnects_mid_stream_misses_nothing(
    server: TokenStreamServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        first = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="one", model="echo"), metadata=auth("alice")
        )
        conversation = first.conversation_id
        seen = await mirror(stub, "alice", conversation, Mirror())
        second = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(conversation_id=conversation, prompt="two", max_tokens=60),
            metadata=auth("alice"),
        )
        # Drops twice in the middle of the second stream, resuming from what it holds.
        for _ in range(2):
            await mirror(stub, "alice", conversation, seen, until_ended=2, until_tokens=2)
            assert 0 < seen.next_seq[second.stream_id] < 60
        await mirror(stub, "alice", conversation, seen, until_ended=2)
        for stream_id in (first.stream_id, second.stream_id):
            turn = await stored(stub, stream_id)
            assert seen.text[stream_id] == turn.response
            assert_tokens_between_start_and_end(seen, stream_id)
        assert [e.seq for e in seen.events] == list(range(6))


async def test_with_tokens_a_late_device_gets_the_running_stream_whole(
    server: TokenStreamServer,
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        running = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="long", max_tokens=80), metadata=auth("alice")
        )
        conversation = running.conversation_id
        await asyncio.sleep(0.2)  # some tokens are out before the device shows up
        snapshot = await stub.GetHistory(
            pb.GetHistoryRequest(conversation_id=conversation), metadata=auth("alice")
        )
        (turn,) = snapshot.turns
        assert turn.state == pb.STREAM_STATE_RUNNING
        assert turn.head_seq >= 0
        # The device shows the snapshot's partial text and asks for the rest after it.
        late = Mirror()
        late.events = []
        late.next_seq = {running.stream_id: turn.head_seq + 1}
        late.text = {running.stream_id: turn.response}
        call = stub.WatchConversation(
            pb.WatchConversationRequest(
                conversation_id=conversation,
                from_event_seq=snapshot.head_event_seq + 1,
                include_tokens=True,
                from_seq_by_stream=late.next_seq,
            ),
            metadata=auth("alice"),
        )
        async for message in call:
            for event in message.events.events:  # numbered on from the snapshot
                assert event.seq == snapshot.head_event_seq + 1 + len(late.events)
                late.events.append(event)
            if message.HasField("tokens"):
                late.take(message)
            if any(e.HasField("stream_ended") for e in late.events):
                call.cancel()
                break
        final = await stored(stub, running.stream_id)
        assert late.text[running.stream_id] == final.response
        assert late.next_seq[running.stream_id] == final.head_seq + 1 == 80


async def test_without_tokens_no_tokens_are_sent(server: TokenStreamServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        first = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="quiet", max_tokens=10), metadata=auth("alice")
        )
        call = stub.WatchConversation(
            pb.WatchConversationRequest(conversation_id=first.conversation_id),
            metadata=auth("alice"),
        )
        kinds_seen = []
        async for message in call:
            kinds_seen.append(message.WhichOneof("message"))
            if any(e.HasField("stream_ended") for e in message.events.events):
                call.cancel()
                break
        assert "tokens" not in kinds_seen
        assert "events" in kinds_seen


async def test_a_bad_resume_position_is_invalid_argument(server: TokenStreamServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        first = await stub.SubmitPrompt(
            pb.SubmitPromptRequest(prompt="x", model="echo"), metadata=auth("alice")
        )
        for resume in ({"not-a-stream": 0}, {first.stream_id: -1}):
            call = stub.WatchConversation(
                pb.WatchConversationRequest(
                    conversation_id=first.conversation_id,
                    include_tokens=True,
                    from_seq_by_stream=resume,
                ),
                metadata=auth("alice"),
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "from_seq_by_stream" in (info.value.details() or "")


async def test_a_removed_member_stops_receiving_at_once(server: TokenStreamServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        created = await stub.CreateConversation(
            pb.CreateConversationRequest(), metadata=auth("alice")
        )
        conversation = created.conversation.conversation_id
        await stub.AddMember(
            pb.AddMemberRequest(conversation_id=conversation, user_id="bob", role=pb.ROLE_VIEWER),
            metadata=auth("alice"),
        )
        await stub.SubmitPrompt(
            pb.SubmitPromptRequest(conversation_id=conversation, prompt="busy", max_tokens=500),
            metadata=auth("alice"),
        )
        call = stub.WatchConversation(
            pb.WatchConversationRequest(conversation_id=conversation, include_tokens=True),
            metadata=auth("bob"),
        )
        tokens_after_removal = 0
        removed = False

        async def read_until_cut_off() -> None:
            nonlocal removed, tokens_after_removal
            async for message in call:
                if message.HasField("tokens"):
                    tokens_after_removal += removed
                    if not removed and message.tokens.chunk.end_seq >= 5:
                        await stub.RemoveMember(
                            pb.RemoveMemberRequest(conversation_id=conversation, user_id="bob"),
                            metadata=auth("alice"),
                        )
                        removed = True

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(read_until_cut_off(), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Tokens flow all the time (no quiet heartbeat), yet the watch ends right after the
        # member_removed event: at most what was in flight arrives.
        assert tokens_after_removal <= 3
