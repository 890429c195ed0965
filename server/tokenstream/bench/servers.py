"""The servers under test, each in a process of its own so its CPU and memory are its own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from tokenstream.bench.cases import Case
from tokenstream.server.event_loop import DEFAULT_EVENT_LOOP

BASELINE = "baseline"
READY_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # "baseline", "sqlite" or "postgresql"
    database_url: str = ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _command(target: Target, case: Case, port: int, event_loop: str) -> list[str]:
    common = ["--port", str(port), "--token-rate", str(case.rate)]
    common += ["--heartbeat-interval", str(case.heartbeat_interval), "--event-loop", event_loop]
    if target.name == BASELINE:
        return [sys.executable, "-m", "tokenstream.bench.baseline", *common]
    many = str(max(case.streams, case.subscribers) + 100)
    return [
        sys.executable, "-m", "tokenstream.cli.main", "serve", *common,
        "--database-url", target.database_url,
        "--default-model", "clock",
        "--max-generations", many,
        "--max-generations-per-caller", many,
        "--max-subscribers-per-stream", many,
        "--shutdown-grace", "0",
        "--log-level", "warning",
    ]  # fmt: skip


class ServerUnderTest:
    """One server process on 127.0.0.1, with its CPU time and peak memory."""

    def __init__(
        self, target: Target, case: Case, log: Path, event_loop: str = DEFAULT_EVENT_LOOP
    ) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self._process = subprocess.Popen(
            _command(target, case, self.port, event_loop),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._ps = psutil.Process(self._process.pid)
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(f"the server did not start in {READY_TIMEOUT:g} s") from None
        self._sampler = asyncio.create_task(self._sample())

    def cpu_seconds(self) -> float:
        times = self._ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self._ps.memory_info().rss)

    async def _sample(self) -> None:
        # Peak RSS, sampled: /proc's high-water mark would include start-up.
        while True:
            self.peak_rss = max(self.peak_rss, self.rss())
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        self._process.terminate()
        try:
            await asyncio.to_thread(self._process.wait, 15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            await asyncio.to_thread(self._process.wait, 15)
        self._log.close()
