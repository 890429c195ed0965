"""The server as a generic gRPC tool sees it: `buf curl` over server reflection."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ServerProcess, subprocess_env, venv_script

pytestmark = pytest.mark.slow

SERVICE = "tokenstream.v1.TokenStreamService"
BUF_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def buf() -> Path:
    path = venv_script("buf")
    if not path.exists():
        pytest.skip(f"buf binary not found at {path} (install the buf-bin package)")
    return path


@pytest.fixture(scope="module")
def buf_server(module_server_factory: Callable[[float], ServerProcess]) -> ServerProcess:
    return module_server_factory(0.0)


def buf_curl(
    buf: Path, server: ServerProcess, *args: str, method: str = ""
) -> subprocess.CompletedProcess[str]:
    url = f"http://{server.target}"
    if method:
        url += f"/{SERVICE}/{method}"
    return subprocess.run(
        [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args, url],
        capture_output=True,
        text=True,
        timeout=BUF_TIMEOUT,
        env=subprocess_env(),
        check=False,
    )


def json_objects(text: str) -> list[dict[str, Any]]:
    """Parses concatenated (pretty-printed) JSON objects, as buf curl prints a stream."""
    decoder = json.JSONDecoder()
    objects: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return objects
        value, index = decoder.raw_decode(text, index)
        assert isinstance(value, dict), value
        objects.append(value)


def test_list_services_over_reflection(buf: Path, buf_server: ServerProcess) -> None:
    result = buf_curl(buf, buf_server, "--list-services")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert services & {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


def test_submit_then_subscribe(buf: Path, buf_server: ServerProcess) -> None:
    submitted = buf_curl(
        buf,
        buf_server,
        "-d",
        json.dumps({"prompt": "hello buf", "model": "echo"}),
        method="SubmitPrompt",
    )
    assert submitted.returncode == 0, submitted.stderr
    response = json.loads(submitted.stdout)
    stream_id = response["streamId"]
    assert stream_id.startswith("strm_")
    assert response["conversationId"].startswith("conv_")
    assert response["model"] == "echo"

    subscribed = buf_curl(
        buf,
        buf_server,
        "-d",
        json.dumps({"stream_id": stream_id, "from_seq": 1}),
        method="Subscribe",
    )
    assert subscribed.returncode == 0, subscribed.stderr
    events = json_objects(subscribed.stdout)
    assert len(events) >= 2, subscribed.stdout
    *chunks, last = events
    assert all(set(event) == {"chunk"} for event in chunks), chunks
    assert "".join(event["chunk"]["text"] for event in chunks) == " buf"
    # int64 fields are JSON strings; proto3 JSON omits defaults.
    assert chunks[0]["chunk"]["startSeq"] == "1"
    assert chunks[-1]["chunk"]["endSeq"] == "1"
    assert last == {"end": {"state": "STREAM_STATE_COMPLETED", "finalSeq": "1"}}


def test_malformed_stream_id_is_invalid_argument(buf: Path, buf_server: ServerProcess) -> None:
    result = buf_curl(buf, buf_server, "-d", json.dumps({"stream_id": "nope"}), method="Subscribe")
    assert result.returncode != 0
    assert result.stdout == ""  # not a single stream message
    assert "invalid_argument" in result.stderr
    [error] = json_objects(result.stderr)
    assert error["code"] == "invalid_argument"
    assert "not a stream id" in error["message"]
    detail_types = {detail["type"] for detail in error["details"]}
    assert detail_types == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
