"""`tokenstream purge` through its real entry point, beside a running server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.conftest import RunningServer
from tests.e2e.conftest import run_tokenstream as run_cli
from tests.e2e.grpc_helpers import read_all
from tokenstream.v1 import tokenstream_pb2 as pb


async def test_purge_deletes_finished_streams_but_not_running_ones(
    paced_server: RunningServer,
) -> None:
    stub = paced_server.stub
    done = await stub.SubmitPrompt(pb.SubmitPromptRequest(prompt="old news", model="echo"))
    await read_all(stub, done.stream_id)
    running = await stub.SubmitPrompt(pb.SubmitPromptRequest(prompt="busy", max_tokens=5000))
    url = paced_server.server.config.database_url

    code, out, _ = await run_cli("purge", "--older-than", "1d", "--database-url", url)
    assert (code, out.strip()) == (0, "purged 0 stream(s), 0 conversation(s)")
    code, out, _ = await run_cli("purge", "--older-than", "0s", "--database-url", url)
    assert (code, out.strip()) == (0, "purged 1 stream(s), 1 conversation(s)")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetStream(pb.GetStreamRequest(stream_id=done.stream_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    alive = await stub.GetStream(pb.GetStreamRequest(stream_id=running.stream_id))
    assert alive.stream.state == pb.STREAM_STATE_RUNNING


async def test_purge_rejects_an_unreadable_age(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    code, _, err = await run_cli("purge", "--older-than", "soon", "--database-url", url)
    assert code == 2
    assert "use a number with d, h, m or s" in err
