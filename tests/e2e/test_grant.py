"""`tokenstream grant`: an operator gives a conversation made without authentication to a
user, through the real entry point."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import run_tokenstream as run_cli
from tests.e2e.grpc_helpers import read_all
from tokenstream.server import ServerConfig, create_server
from tokenstream.server.auth import AuthSettings
from tokenstream.v1 import tokenstream_pb2 as pb
from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc


async def test_a_conversation_from_development_mode_is_granted_to_a_user(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    open_config = ServerConfig(port=0, database_url=url, token_rate=0, shutdown_grace=0.5)
    server, _ = await create_server(open_config)  # development mode: no members recorded
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenStreamServiceStub(channel)
        old = await stub.SubmitPrompt(pb.SubmitPromptRequest(prompt="from before", model="echo"))
        await read_all(stub, old.stream_id)
    await server.stop()

    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nuser = "alice"\nkey = "alice-key"\n')
    secured = ServerConfig(
        port=0, database_url=url, shutdown_grace=0.5, auth=AuthSettings(api_keys_file=keys)
    )
    server, _ = await create_server(secured)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TokenStreamServiceStub(channel)
            request = pb.GetHistoryRequest(conversation_id=old.conversation_id)
            alice = (("authorization", "Bearer alice-key"),)
            with pytest.raises(grpc.aio.AioRpcError) as unreachable:
                await stub.GetHistory(request, metadata=alice)
            assert unreachable.value.code() == grpc.StatusCode.NOT_FOUND

            # Granted while the server runs.
            code, out, err = await run_cli(
                "grant", old.conversation_id, "alice", "--database-url", url
            )
            assert (code, err) == (0, "")
            assert out.strip() == f"alice is now owner of {old.conversation_id}"
            history = await stub.GetHistory(request, metadata=alice)
            assert [(t.prompt, t.response) for t in history.turns] == [
                ("from before", "from before")
            ]
            # The last owner cannot be demoted this way either.
            code, _, err = await run_cli(
                "grant", old.conversation_id, "alice", "--role", "viewer", "--database-url", url
            )
            assert code != 0
            assert "last owner" in err
            conversation = await stub.GetConversation(
                pb.GetConversationRequest(conversation_id=old.conversation_id), metadata=alice
            )
            assert [(m.user_id, m.role) for m in conversation.conversation.members] == [
                ("alice", pb.ROLE_OWNER)
            ]
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("conv_" + "a" * 26, "alice"), "does not exist"),
        (("not-an-id", "alice"), "CONVERSATION_ID is 'not-an-id'"),
        (("conv_" + "a" * 26, ""), "USER_ID must be 1-200 printable characters"),
    ],
)
async def test_grant_explains_bad_input(
    tmp_path: Path, args: tuple[str, str], message: str
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    code, _, err = await run_cli("grant", *args, "--database-url", url)
    assert code != 0
    assert message in err
