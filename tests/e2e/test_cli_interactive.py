"""`tokenstream chat` and `--json` through the real entry point, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import RunningServer, ServerFactory
from tests.e2e.conftest import run_tokenstream
from tokenstream.server.models.synthetic import synthetic_tokens
from tokenstream.v1 import tokenstream_pb2 as pb

TOKENSTREAM = str(Path(sys.executable).with_name("tokenstream"))


async def run_cli(target: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    return await run_tokenstream(*args, "--target", target, stdin=stdin)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_chat_over_a_pipe_answers_each_line_in_one_conversation(
    server: RunningServer,
) -> None:
    code, out, err = await run_cli(
        server.target, "chat", "-m", "echo", stdin=b"first question\n\nsecond  one\n"
    )
    assert code == 0, err
    assert out == "first question\nsecond  one\n"
    conversation = err.split("conversation ")[1].split()[0]
    assert err.count("[completed") == 2
    history = await server.stub.GetHistory(pb.GetHistoryRequest(conversation_id=conversation))
    assert [t.prompt for t in history.turns] == ["first question", "second  one"]


async def test_ctrl_c_in_chat_cancels_the_answer_not_the_program(
    start_server: ServerFactory,
) -> None:
    server = await start_server(token_rate=20.0)
    process = await asyncio.create_subprocess_exec(
        TOKENSTREAM,
        "chat",
        "--max-tokens",
        "30",
        "--target",
        server.target,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(b"a long answer please\n")
    await process.stdin.drain()
    first = await asyncio.wait_for(process.stdout.read(20), 10)  # the answer is streaming
    assert first
    process.send_signal(signal.SIGINT)
    process.stdin.write(b"and another\n")
    await process.stdin.drain()
    process.stdin.close()
    rest, err_bytes = await asyncio.wait_for(process.communicate(), 20)
    err = err_bytes.decode()
    assert process.returncode == 0, err  # the program went on after Ctrl-C
    assert "[cancelled, final_seq=" in err
    assert "[completed, final_seq=29]" in err  # the second answer ran to its end
    answer = "".join(synthetic_tokens("and another", 30))
    assert (first + rest).decode().endswith(answer + "\n")


def _drive_terminal(argv: list[str], script: list[tuple[bytes, float]]) -> tuple[int, str]:
    """Runs `argv` on a pseudo-terminal, typing each input then reading for its seconds."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover  # the child becomes the CLI
        os.execv(argv[0], argv)
    screen = b""
    for keys, seconds in script:
        os.write(fd, keys)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


async def test_chat_on_a_terminal_streams_cancels_and_quits(start_server: ServerFactory) -> None:
    server = await start_server(token_rate=50.0)
    argv = [TOKENSTREAM, "chat", "--max-tokens", "400", "--target", server.target]
    code, screen = await asyncio.to_thread(
        _drive_terminal,
        argv,
        [
            (b"", 1.5),  # start-up: the prompt appears
            (b"tell me everything\r", 1.5),  # ~75 of 400 tokens arrive
            (b"\x03", 1.0),  # Ctrl-C: stop that answer
            (b"\x04", 2.0),  # Ctrl-D: leave
        ],
    )
    assert code == 0, screen
    assert screen.count("you> ") >= 2  # the prompt came back after the cancel
    assert "[cancelled, final_seq=" in screen
    words = "".join(synthetic_tokens("tell me everything", 5)).split()
    assert all(word in screen for word in words)  # the answer was rendered as it came


async def test_json_output_for_scripts(paced_server: RunningServer) -> None:
    target = paced_server.target
    code, out, _ = await run_cli(target, "submit", "one two", "-m", "echo", "-f", "--json")
    assert code == 0
    lines = json_lines(out)
    assert lines[0]["type"] == "submitted"
    assert lines[-1] == {
        "type": "end",
        "state": "COMPLETED",
        "final_seq": 1,
        "reason": "",
        "error": "",
    }
    assert "".join(line["text"] for line in lines if line["type"] == "chunk") == "one two"
    stream_id, conversation = lines[0]["stream_id"], lines[0]["conversation_id"]

    code, out, _ = await run_cli(target, "status", stream_id, "--json")
    (status,) = json_lines(out)
    assert (status["state"], status["head_seq"], status["conversation_id"]) == (
        "COMPLETED",
        1,
        conversation,
    )
    code, out, _ = await run_cli(target, "history", conversation, "--json")
    (turn,) = json_lines(out)
    assert (turn["type"], turn["prompt"], turn["response"]) == ("turn", "one two", "one two")

    code, out, _ = await run_cli(target, "submit", "long", "--max-tokens", "5000", "--json")
    (submitted,) = json_lines(out)
    code, out, _ = await run_cli(target, "cancel", submitted["stream_id"], "--json")
    (cancelled,) = json_lines(out)
    assert cancelled["type"] == "cancelled"
    assert cancelled["state"] == "CANCELLED"

    code, out, err = await run_cli(target, "follow", "strm_nope", "--json")
    assert (code, out) == (1, "")
    (error,) = json_lines(err)
    assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "MALFORMED_STREAM_ID")


async def test_several_targets_reach_the_live_one(server: RunningServer) -> None:
    dead = "127.0.0.1:1"  # nothing listens there
    code, out, err = await run_cli(
        f"{dead},{server.target}", "submit", "via the second", "-m", "echo", "-f"
    )
    assert code == 0, err
    assert out == "via the second\n"


async def test_describe_reads_the_contract_through_reflection(server: RunningServer) -> None:
    code, out, _ = await run_cli(server.target, "describe")
    assert code == 0
    assert "tokenstream.v1.TokenStreamService" in out.splitlines()
    code, out, _ = await run_cli(server.target, "describe", "tokenstream.v1.TokenStreamService")
    assert (
        "rpc Subscribe(tokenstream.v1.SubscribeRequest) returns "
        "(stream tokenstream.v1.SubscribeResponse);" in out
    )
    code, out, _ = await run_cli(server.target, "describe", "tokenstream.v1.SubscribeRequest")
    assert "int64 from_seq = 2;" in out
    code, _, err = await run_cli(server.target, "describe", "tokenstream.v1.Nope")
    assert code == 1
    assert "is not known" in err


async def test_chat_reads_files_and_empty_input(server: RunningServer, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("from a file\n")
    for source in (prompts, Path("/dev/null")):
        with source.open("rb") as stdin:
            process = await asyncio.create_subprocess_exec(
                TOKENSTREAM,
                "chat",
                "-m",
                "echo",
                "--target",
                server.target,
                stdin=stdin,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0
        assert out.decode() == ("from a file\n" if source == prompts else "")


async def test_a_failed_turn_does_not_end_the_chat(server: RunningServer) -> None:
    code, _, err = await run_cli(
        server.target, "chat", "-m", "no-such-model", stdin=b"first\nsecond\n"
    )
    assert code == 0
    assert err.count("INVALID_ARGUMENT [UNKNOWN_MODEL]") == 2  # both turns tried and reported


async def test_ctrl_c_at_a_piped_prompt_leaves(server: RunningServer) -> None:
    process = await asyncio.create_subprocess_exec(
        TOKENSTREAM,
        "chat",
        "--target",
        server.target,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(1.0)  # started, waiting for a line that never comes
    process.send_signal(signal.SIGINT)
    await asyncio.wait_for(process.wait(), 10)
    assert process.returncode == 130
