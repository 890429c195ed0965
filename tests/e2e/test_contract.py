"""The TokenStreamService contract through a real server and a real gRPC channel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RunningServer, ServerFactory
from tests.e2e.grpc_helpers import error_info, read_all
from tokenstream.server import ServerConfig, create_server
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.server.storage.sql import DatabaseInUse
from tokenstream.v1 import tokenstream_pb2 as pb

PROMPT = "The quick brown fox jumps over the lazy dog, twice:  again!"


async def submit(server: RunningServer, **fields: str | int) -> pb.SubmitPromptResponse:
    response: pb.SubmitPromptResponse = await server.stub.SubmitPrompt(
        pb.SubmitPromptRequest(**fields)  # type: ignore[arg-type]
    )
    return response


async def wait_for_head(server: RunningServer, stream_id: str, seq: int) -> None:
    for _ in range(500):
        reply = await server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id))
        if reply.stream.head_seq >= seq:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"stream {stream_id} never reached seq {seq}")


async def test_echo_answer_equals_the_prompt(server: RunningServer) -> None:
    sub = await submit(server, prompt=PROMPT, model="echo")
    assert sub.stream_id.startswith("strm_")
    assert sub.conversation_id.startswith("conv_")
    assert sub.model == "echo"
    got = await read_all(server.stub, sub.stream_id)
    assert got.text == PROMPT
    got.assert_contiguous()
    assert got.end is not None
    assert got.end.state == pb.STREAM_STATE_COMPLETED
    assert got.end.final_seq == got.chunks[-1].end_seq


async def test_synthetic_is_default_and_emits_exactly_max_tokens(server: RunningServer) -> None:
    sub = await submit(server, prompt="anything", max_tokens=37)
    assert sub.model == "synthetic"
    got = await read_all(server.stub, sub.stream_id)
    assert got.text == "".join(synthetic_tokens("anything", 37))
    assert got.end is not None
    assert got.end.final_seq == 36


async def test_synthetic_default_length_is_256(server: RunningServer) -> None:
    sub = await submit(server, prompt="default length")
    got = await read_all(server.stub, sub.stream_id)
    assert got.end is not None
    assert got.end.final_seq == 255


async def test_resume_mid_stream_gets_exactly_the_rest(paced_server: RunningServer) -> None:
    server = paced_server
    sub = await submit(server, prompt="resume me", max_tokens=120)
    await wait_for_head(server, sub.stream_id, 20)
    first = await read_all(server.stub, sub.stream_id, 10, stop_after_seq=30)
    first.assert_contiguous(10)
    last = first.chunks[-1].end_seq
    rest = await read_all(server.stub, sub.stream_id, last + 1)
    rest.assert_contiguous(last + 1)
    assert first.text + rest.text == "".join(synthetic_tokens("resume me", 120)[10:])
    assert rest.end is not None
    assert rest.end.state == pb.STREAM_STATE_COMPLETED


async def test_two_subscribers_each_get_everything(paced_server: RunningServer) -> None:
    sub = await submit(paced_server, prompt="two readers", max_tokens=60)
    a, b = await asyncio.gather(
        read_all(paced_server.stub, sub.stream_id), read_all(paced_server.stub, sub.stream_id)
    )
    expected = "".join(synthetic_tokens("two readers", 60))
    assert a.text == b.text == expected
    a.assert_contiguous()
    b.assert_contiguous()


async def test_late_subscriber_gets_one_rolled_up_chunk(server: RunningServer) -> None:
    sub = await submit(server, prompt="roll up", max_tokens=500)
    await read_all(server.stub, sub.stream_id)
    got = await read_all(server.stub, sub.stream_id, 100)
    assert [(c.start_seq, c.end_seq) for c in got.chunks] == [(100, 499)]


async def test_cancel_mid_stream(paced_server: RunningServer) -> None:
    server = paced_server
    sub = await submit(server, prompt="cancel me", max_tokens=5000)
    readers = [asyncio.create_task(read_all(server.stub, sub.stream_id)) for _ in range(2)]
    await wait_for_head(server, sub.stream_id, 10)
    cancelled = await server.stub.Cancel(pb.CancelRequest(stream_id=sub.stream_id))
    assert cancelled.state == pb.STREAM_STATE_CANCELLED
    assert 10 <= cancelled.final_seq < 4999
    expected = "".join(synthetic_tokens("cancel me", cancelled.final_seq + 1))
    for reader in await asyncio.gather(*readers):
        assert reader.end is not None
        assert reader.end.state == pb.STREAM_STATE_CANCELLED
        assert reader.end.final_seq == cancelled.final_seq
        assert reader.text == expected
    await asyncio.sleep(0.1)  # nothing is written after the cancel
    state = await server.stub.GetStream(pb.GetStreamRequest(stream_id=sub.stream_id))
    assert state.stream.head_seq == cancelled.final_seq
    history = await server.stub.GetHistory(
        pb.GetHistoryRequest(conversation_id=sub.conversation_id)
    )
    assert [(t.state, t.response) for t in history.turns] == [(pb.STREAM_STATE_CANCELLED, expected)]
    again = await server.stub.Cancel(pb.CancelRequest(stream_id=sub.stream_id))
    assert (again.state, again.final_seq) == (cancelled.state, cancelled.final_seq)


async def test_submit_with_request_id_is_idempotent(server: RunningServer) -> None:
    first = await submit(server, prompt="once", request_id="5f0c7d1e-idem", max_tokens=5)
    again = await submit(server, prompt="once", request_id="5f0c7d1e-idem", max_tokens=5)
    assert (again.stream_id, again.conversation_id) == (first.stream_id, first.conversation_id)
    history = await server.stub.GetHistory(
        pb.GetHistoryRequest(conversation_id=first.conversation_id)
    )
    assert len(history.turns) == 1


async def test_history_paginates(server: RunningServer) -> None:
    first = await submit(server, prompt="turn 0", model="echo")
    for i in range(1, 7):
        await submit(
            server, prompt=f"turn {i}", model="echo", conversation_id=first.conversation_id
        )
    for turn_stream in (first.stream_id,):
        await read_all(server.stub, turn_stream)
    seen: list[pb.Turn] = []
    token = ""
    pages = 0
    while True:
        page = await server.stub.GetHistory(
            pb.GetHistoryRequest(
                conversation_id=first.conversation_id, page_size=3, page_token=token
            )
        )
        seen += page.turns
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [t.prompt for t in seen] == [f"turn {i}" for i in range(7)]
    assert seen[0].response == "turn 0"
    assert seen[0].HasField("finished_at")
    assert seen[0].created_at.ToDatetime() <= seen[-1].created_at.ToDatetime()


async def test_quiet_stream_sends_heartbeats(start_server: ServerFactory) -> None:
    server = await start_server(token_rate=4.0, heartbeat_interval=0.1)
    sub = await submit(server, prompt="slow", max_tokens=3)
    got = await read_all(server.stub, sub.stream_id)
    assert got.text == "".join(synthetic_tokens("slow", 3))
    assert got.heartbeats, "no heartbeat during ~0.5 s of quiet"
    beat = got.heartbeats[0]
    assert beat.state == pb.STREAM_STATE_RUNNING
    assert beat.head_seq >= -1
    assert beat.server_time.seconds > 0


async def test_subscribe_deadline_ends_only_that_subscription(
    paced_server: RunningServer,
) -> None:
    sub = await submit(paced_server, prompt="deadline", max_tokens=100)
    call = paced_server.stub.Subscribe(pb.SubscribeRequest(stream_id=sub.stream_id), timeout=0.1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    got = await read_all(paced_server.stub, sub.stream_id)
    assert got.end is not None
    assert got.end.state == pb.STREAM_STATE_COMPLETED
    assert got.text == "".join(synthetic_tokens("deadline", 100))


async def test_health_and_reflection_are_served(server: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "tokenstream.v1.TokenStreamService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


MISSING_STREAM = "strm_" + "q" * 26
MISSING_CONV = "conv_" + "q" * 26

BAD_UNARY = [
    ("SubmitPrompt", pb.SubmitPromptRequest(prompt=""), "INVALID_ARGUMENT", "EMPTY_PROMPT"),
    (
        "SubmitPrompt",
        pb.SubmitPromptRequest(prompt="x" * 70_000),
        "INVALID_ARGUMENT",
        "PROMPT_TOO_LARGE",
    ),
    (
        "SubmitPrompt",
        pb.SubmitPromptRequest(prompt="hi", model="nope"),
        "INVALID_ARGUMENT",
        "UNKNOWN_MODEL",
    ),
    (
        "SubmitPrompt",
        pb.SubmitPromptRequest(prompt="hi", max_tokens=-5),
        "INVALID_ARGUMENT",
        "MAX_TOKENS_OUT_OF_RANGE",
    ),
    (
        "SubmitPrompt",
        pb.SubmitPromptRequest(prompt="hi", conversation_id="../etc"),
        "INVALID_ARGUMENT",
        "MALFORMED_CONVERSATION_ID",
    ),
    (
        "SubmitPrompt",
        pb.SubmitPromptRequest(prompt="hi", request_id="x" * 200),
        "INVALID_ARGUMENT",
        "MALFORMED_REQUEST_ID",
    ),
    (
        "SubmitPrompt",
        pb.SubmitPromptRequest(prompt="hi", conversation_id=MISSING_CONV),
        "NOT_FOUND",
        "CONVERSATION_NOT_FOUND",
    ),
    ("Cancel", pb.CancelRequest(stream_id="strm_1"), "INVALID_ARGUMENT", "MALFORMED_STREAM_ID"),
    ("Cancel", pb.CancelRequest(stream_id=MISSING_STREAM), "NOT_FOUND", "STREAM_NOT_FOUND"),
    ("GetStream", pb.GetStreamRequest(stream_id=""), "INVALID_ARGUMENT", "MALFORMED_STREAM_ID"),
    ("GetStream", pb.GetStreamRequest(stream_id=MISSING_STREAM), "NOT_FOUND", "STREAM_NOT_FOUND"),
    (
        "GetHistory",
        pb.GetHistoryRequest(conversation_id=MISSING_CONV),
        "NOT_FOUND",
        "CONVERSATION_NOT_FOUND",
    ),
    (
        "GetHistory",
        pb.GetHistoryRequest(conversation_id="nope"),
        "INVALID_ARGUMENT",
        "MALFORMED_CONVERSATION_ID",
    ),
    (
        "GetHistory",
        pb.GetHistoryRequest(conversation_id=MISSING_CONV, page_size=5000),
        "INVALID_ARGUMENT",
        "PAGE_SIZE_OUT_OF_RANGE",
    ),
    (
        "GetHistory",
        pb.GetHistoryRequest(conversation_id=MISSING_CONV, page_token="%%%"),
        "INVALID_ARGUMENT",
        "INVALID_PAGE_TOKEN",
    ),
]


@pytest.mark.parametrize(("method", "request_message", "code", "reason"), BAD_UNARY)
async def test_bad_unary_requests_get_clear_statuses(
    server: RunningServer, method: str, request_message: object, code: str, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(server.stub, method)(request_message)
    assert info.value.code().name == code
    assert info.value.details()  # a message a person can act on
    detail = error_info(info.value)
    assert (detail.reason, detail.domain) == (reason, "tokenstream.v1")


async def test_unknown_model_message_lists_models(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.SubmitPrompt(pb.SubmitPromptRequest(prompt="hi", model="nope"))
    assert "echo" in (info.value.details() or "")
    assert "synthetic" in (info.value.details() or "")


async def test_reused_request_id_with_other_prompt_is_already_exists(
    server: RunningServer,
) -> None:
    await submit(server, prompt="a", request_id="dup-1", max_tokens=2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await submit(server, prompt="b", request_id="dup-1", max_tokens=2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(info.value).reason == "REQUEST_ID_REUSED"


@pytest.mark.parametrize(
    ("stream", "from_seq", "code", "reason"),
    [
        ("strm_bad", 0, "INVALID_ARGUMENT", "MALFORMED_STREAM_ID"),
        (MISSING_STREAM, 0, "NOT_FOUND", "STREAM_NOT_FOUND"),
        ("finished", -1, "INVALID_ARGUMENT", "NEGATIVE_FROM_SEQ"),
        ("finished", 6, "OUT_OF_RANGE", "FROM_SEQ_PAST_END"),
    ],
)
async def test_bad_subscriptions_get_clear_statuses(
    server: RunningServer, stream: str, from_seq: int, code: str, reason: str
) -> None:
    if stream == "finished":
        sub = await submit(server, prompt="a b c d e", model="echo")
        await read_all(server.stub, sub.stream_id)
        stream = sub.stream_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_all(server.stub, stream, from_seq)
    assert info.value.code().name == code
    assert error_info(info.value).reason == reason


async def test_bad_requests_leave_stored_data_intact(server: RunningServer) -> None:
    sub = await submit(server, prompt="keep me safe", model="echo")
    before = await read_all(server.stub, sub.stream_id)
    for request in (
        pb.SubmitPromptRequest(prompt="", conversation_id=sub.conversation_id),
        pb.SubmitPromptRequest(prompt="x", conversation_id=sub.conversation_id, model="?"),
    ):
        with pytest.raises(grpc.aio.AioRpcError):
            await server.stub.SubmitPrompt(request)
    with pytest.raises(grpc.aio.AioRpcError):
        await read_all(server.stub, sub.stream_id, 99)
    after = await read_all(server.stub, sub.stream_id)
    assert after.text == before.text == "keep me safe"
    history = await server.stub.GetHistory(
        pb.GetHistoryRequest(conversation_id=sub.conversation_id)
    )
    assert len(history.turns) == 1


async def test_running_stream_waits_for_from_seq_past_its_head(
    paced_server: RunningServer,
) -> None:
    sub = await submit(paced_server, prompt="wait for it", max_tokens=40)
    got = await read_all(paced_server.stub, sub.stream_id, 30)
    got.assert_contiguous(30)
    assert got.text == "".join(synthetic_tokens("wait for it", 40)[30:])


async def test_second_server_on_same_database_or_port_refuses_to_start(
    server: RunningServer, tmp_path: Path
) -> None:
    same_db = ServerConfig(port=0, database_url=server.server.config.database_url)
    with pytest.raises(DatabaseInUse):
        await create_server(same_db)
    same_port = ServerConfig(
        port=server.server.port, database_url=f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
    )
    with pytest.raises(OSError, match="could not listen"):
        await create_server(same_port)
    # The running server was not disturbed.
    sub = await submit(server, prompt="still here", model="echo")
    assert (await read_all(server.stub, sub.stream_id)).text == "still here"
