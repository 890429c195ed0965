"""Real `tokenstream serve` processes for end-to-end tests.

`ServerProcess` starts the console script on 127.0.0.1 with a free port, waits until the
gRPC health check answers SERVING, and is always killed at fixture teardown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"
SERVICE_NAME = "tokenstream.v1.TokenStreamService"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# A free port can be taken by someone else between probing and binding: try a few.
START_ATTEMPTS = 3


def venv_script(name: str) -> Path:
    """A console script installed next to the running interpreter (the venv's bin/)."""
    return Path(sys.executable).parent / name


def tokenstream_command() -> list[str]:
    """How to run the `tokenstream` console script."""
    script = venv_script("tokenstream")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tokenstream.cli.main"]


def subprocess_env() -> dict[str, str]:
    """The environment for child processes, without settings that would redirect them."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TOKENSTREAM_") and key not in ("GRPC_TRACE", "GRPC_VERBOSITY")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_tokenstream(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """Runs `tokenstream ARGS` to completion (within 30 s): exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        *tokenstream_command(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def sqlite_url(db_path: Path) -> str:
    return f"sqlite+aiosqlite:///{db_path}"


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One `tokenstream serve` process at a time; start again after kill() or terminate()."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._starts = 0
        self.port: int | None = None

    @property
    def target(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running")
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    def log_text(self) -> str:
        """The server's output so far (stdout and stderr)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def start(
        self,
        db_path: Path,
        token_rate: float,
        *,
        heartbeat_interval: float | None = None,
        extra_args: tuple[str, ...] = (),
        port: int | None = None,
    ) -> int:
        """Starts the server on `db_path` and returns its port once it answers health checks.

        `port` pins the port (e.g. to restart where clients expect the server); otherwise a
        free one is picked.
        """
        if self.running:
            raise RuntimeError("the server is already running; kill or terminate it first")
        error: ServerStartError | None = None
        for _ in range(START_ATTEMPTS):
            try:
                return self._start_once(db_path, token_rate, heartbeat_interval, extra_args, port)
            except ServerStartError as exc:
                error = exc
        assert error is not None
        raise error

    def _start_once(
        self,
        db_path: Path,
        token_rate: float,
        heartbeat_interval: float | None,
        extra_args: tuple[str, ...],
        fixed_port: int | None = None,
    ) -> int:
        port = fixed_port or free_port()
        command = [
            *tokenstream_command(),
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--database-url",
            sqlite_url(db_path),
            "--token-rate",
            str(token_rate),
            # Streams in these tests outlast any grace; keep SIGTERM tests quick.
            "--shutdown-grace",
            "1",
        ]
        if heartbeat_interval is not None:
            command += ["--heartbeat-interval", str(heartbeat_interval)]
        command += extra_args
        self._starts += 1
        self._log_path = self._log_dir / f"server-{self._starts}.log"
        self._log = self._log_path.open("wb")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        self.port = port
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return port

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise ServerStartError(
                        f"server exited with {self._process.returncode} before it was ready:\n"
                        + self.log_text()
                    )
                try:
                    response = stub.Check(request, timeout=0.5)
                except grpc.RpcError:
                    pass
                else:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"server on {self.target} not ready after {READY_TIMEOUT}s:\n"
                        + self.log_text()
                    )
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        self._stop(signal.SIGKILL)

    def terminate(self) -> int:
        """SIGTERM (graceful stop); falls back to SIGKILL. Returns the exit code."""
        return self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> int:
        process, self._process = self._process, None
        returncode = 0
        if process is not None:
            if process.poll() is None:
                process.send_signal(sig)
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=STOP_TIMEOUT)
            returncode = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        self.port = None
        return returncode


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """Makes `ServerProcess`es whose logs go to tmp_path; kills all of them at teardown."""
    servers: list[ServerProcess] = []

    def make() -> ServerProcess:
        log_dir = tmp_path / f"server-logs-{len(servers)}"
        log_dir.mkdir()
        server = ServerProcess(log_dir)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def server_process(server_factory: Callable[[], ServerProcess]) -> ServerProcess:
    """A `ServerProcess`, not started yet."""
    return server_factory()


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[float], ServerProcess]]:
    """Starts servers shared by a module's tests: make(token_rate) -> a running server."""
    servers: list[ServerProcess] = []

    def make(token_rate: float) -> ServerProcess:
        directory = tmp_path_factory.mktemp("e2e-server")
        server = ServerProcess(directory)
        servers.append(server)
        server.start(directory / "db.sqlite", token_rate)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.kill()
