"""The `tokenstream` console script against a real server process."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, subprocess_env, tokenstream_command
from tokenstream.server.models.synthetic import synthetic_tokens

pytestmark = pytest.mark.slow

TOKEN_RATE = 50.0
CLI_TIMEOUT = 30.0
PROMPT = "one two three"


@pytest.fixture(scope="module")
def cli_server(module_server_factory: Callable[[float], ServerProcess]) -> ServerProcess:
    return module_server_factory(TOKEN_RATE)


def run_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tokenstream_command(), *args, "--target", server.target],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=subprocess_env(),
        check=False,
    )


def submit(server: ServerProcess, *args: str) -> dict[str, str]:
    """`tokenstream submit` without --follow; returns its `key: value` lines."""
    result = run_cli(server, "submit", *args)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert set(fields) == {"stream_id", "conversation_id", "model"}, result.stdout
    assert re.fullmatch(r"strm_[a-z2-7]{26}", fields["stream_id"])
    assert re.fullmatch(r"conv_[a-z2-7]{26}", fields["conversation_id"])
    return fields


def test_submit_follow_prints_the_answer(cli_server: ServerProcess) -> None:
    result = run_cli(cli_server, "submit", PROMPT, "-m", "echo", "--follow")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + "\n"
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"stream strm_[a-z2-7]{26} in conversation conv_[a-z2-7]{26}", lines[0])
    assert lines[-1] == "[completed, final_seq=2]"


def test_submit_then_follow_from_seq_and_history(cli_server: ServerProcess) -> None:
    fields = submit(cli_server, PROMPT, "-m", "echo")
    assert fields["model"] == "echo"
    stream_id, conversation_id = fields["stream_id"], fields["conversation_id"]

    followed = run_cli(cli_server, "follow", stream_id, "--from-seq", "1")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == " two three\n"
    assert followed.stderr.splitlines()[-1] == "[completed, final_seq=2]"

    history = run_cli(cli_server, "history", conversation_id)
    assert history.returncode == 0, history.stderr
    lines = history.stdout.splitlines()
    assert len(lines) == 3, history.stdout
    assert re.fullmatch(
        rf"--- {stream_id} \[completed\] \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", lines[0]
    )
    assert lines[1] == f"> {PROMPT}"
    assert lines[2] == PROMPT

    status = run_cli(cli_server, "status", stream_id)
    assert status.returncode == 0, status.stderr
    assert f"conversation_id: {conversation_id}" in status.stdout.splitlines()
    assert "state: completed" in status.stdout.splitlines()
    assert "head_seq: 2" in status.stdout.splitlines()


def test_cancel_long_stream(cli_server: ServerProcess) -> None:
    prompt = "a long answer please"
    fields = submit(cli_server, prompt, "--max-tokens", "5000")
    assert fields["model"] == "synthetic"
    stream_id = fields["stream_id"]

    cancelled = run_cli(cli_server, "cancel", stream_id)
    assert cancelled.returncode == 0, cancelled.stderr
    match = re.fullmatch(r"cancelled final_seq=(-?\d+)\n", cancelled.stdout)
    assert match, cancelled.stdout
    final_seq = int(match.group(1))
    # 5000 tokens at 50/s take 100 s: the cancel came long before the end.
    assert -1 <= final_seq < 1000

    # Cancelling again reports the same final state.
    again = run_cli(cli_server, "cancel", stream_id)
    assert again.returncode == 0, again.stderr
    assert again.stdout == cancelled.stdout

    status = run_cli(cli_server, "status", stream_id)
    assert status.returncode == 0, status.stderr
    assert "state: cancelled" in status.stdout.splitlines()
    assert f"head_seq: {final_seq}" in status.stdout.splitlines()

    followed = run_cli(cli_server, "follow", stream_id)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "".join(synthetic_tokens(prompt, final_seq + 1)) + "\n"
    assert followed.stderr.splitlines()[-1] == f"[cancelled, final_seq={final_seq}]"


def test_follow_malformed_stream_id_fails(cli_server: ServerProcess) -> None:
    result = run_cli(cli_server, "follow", "strm_bad")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "INVALID_ARGUMENT" in result.stderr
    assert "MALFORMED_STREAM_ID" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "loop"), [((), "uvloop"), (("--event-loop", "asyncio"), "asyncio")]
)
def test_server_runs_on_the_chosen_event_loop(
    server_process: ServerProcess, tmp_path: Path, args: tuple[str, ...], loop: str
) -> None:
    server_process.start(tmp_path / "loop.db", TOKEN_RATE, extra_args=args)
    assert f"event loop {loop})" in server_process.log_text()
    result = run_cli(server_process, "submit", PROMPT, "-m", "echo", "--follow")
    assert (result.returncode, result.stdout) == (0, PROMPT + "\n"), result.stderr
