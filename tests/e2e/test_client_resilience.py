"""The client's `stream()` against real faults: the caller's text always equals the stored
answer exactly, whatever happens to servers and connections in between."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from tests.conftest import RunningServer, ServerFactory
from tests.e2e.conftest import ServerProcess, free_port
from tests.e2e.tcp_proxy import TcpProxy
from tokenstream.client import (
    Chunk,
    ConversationEvent,
    Reconnect,
    RetryPolicy,
    StreamEnd,
    StreamTokens,
    TokenStreamClient,
)
from tokenstream.server.models.synthetic import synthetic_tokens

QUICK_RETRY = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.3)


async def stored_text(target: str, stream_id: str) -> tuple[str, StreamEnd]:
    """The answer as the server stores it, read in one go by a fresh client."""
    async with TokenStreamClient(target) as reader:
        items = [item async for item in reader.stream(stream_id)]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    return "".join(i.text for i in items if isinstance(i, Chunk)), end


class CuttingProxy:
    """A proxy in front of a server that cuts every connection every 0.15-0.4 s."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.cuts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"


@asynccontextmanager
async def cutting_proxy(server: RunningServer, seed: int) -> AsyncIterator[CuttingProxy]:
    cutting = CuttingProxy(TcpProxy(server.server.port))
    await cutting.proxy.start()
    rng = random.Random(seed)

    async def cut_now_and_then() -> None:
        while True:
            await asyncio.sleep(rng.uniform(0.15, 0.4))
            cutting.proxy.cut()
            cutting.cuts += 1

    cutter = asyncio.create_task(cut_now_and_then())
    try:
        yield cutting
    finally:
        cutter.cancel()
        await cutting.proxy.stop()


class Collector:
    """Reads a stream through the client, running `fault` once `trigger_seq` is reached."""

    def __init__(self, client: TokenStreamClient) -> None:
        self.client = client
        self.chunks: list[Chunk] = []
        self.reconnects: list[Reconnect] = []
        client.on_reconnect = self.reconnects.append

    async def read(
        self,
        stream_id: str,
        trigger_seq: int = -1,
        fault: Callable[[], object] | None = None,
    ) -> StreamEnd:
        fault_task: asyncio.Future[object] | None = None
        async for item in self.client.stream(stream_id):
            if isinstance(item, StreamEnd):
                if fault_task is not None:
                    await fault_task
                return item
            self.chunks.append(item)
            if fault is not None and fault_task is None and item.end_seq >= trigger_seq:
                fault_task = asyncio.ensure_future(asyncio.to_thread(fault))
        raise AssertionError("stream() ended without a StreamEnd")

    @property
    def text(self) -> str:
        seq = self.chunks[0].start_seq if self.chunks else 0
        for chunk in self.chunks:  # exactly once, in order
            assert chunk.start_seq == seq
            seq = chunk.end_seq + 1
        return "".join(c.text for c in self.chunks)


async def test_stream_survives_a_server_killed_and_restarted(
    server_factory: Callable[[], ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    db = tmp_path / "store.db"
    port = await asyncio.to_thread(server.start, db, 100.0)

    def kill_and_restart() -> None:
        server.kill()
        server.start(db, 100.0, port=port)

    async with TokenStreamClient(f"127.0.0.1:{port}", retry=QUICK_RETRY) as client:
        sub = await client.submit("survive a crash", max_tokens=1000)
        collector = Collector(client)
        end = await collector.read(sub.stream_id, trigger_seq=40, fault=kill_and_restart)
    assert collector.reconnects, "the client never noticed the crash"
    stored, stored_end = await stored_text(f"127.0.0.1:{port}", sub.stream_id)
    assert collector.text == stored
    assert end == stored_end
    assert (end.state, end.reason) == ("FAILED", "interrupted")
    assert stored == "".join(synthetic_tokens("survive a crash", end.final_seq + 1))


async def test_stream_survives_connections_cut_at_random_points(
    start_server: ServerFactory,
) -> None:
    server = await start_server(token_rate=400.0)
    async with (
        cutting_proxy(server, seed=7) as proxy,
        TokenStreamClient(proxy.target, retry=QUICK_RETRY) as client,
    ):
        sub = await client.submit("cut me often", max_tokens=1200)  # ~3 s
        collector = Collector(client)
        end = await collector.read(sub.stream_id)
    assert proxy.cuts >= 4
    assert len(collector.reconnects) >= 3
    assert end.state == "COMPLETED"
    assert collector.text == "".join(synthetic_tokens("cut me often", 1200))


async def test_stream_resumes_after_a_frozen_server_goes_silent(
    server_factory: Callable[[], ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    port = await asyncio.to_thread(
        server.start, tmp_path / "store.db", 50.0, heartbeat_interval=0.2
    )

    def freeze_for_a_while() -> None:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(2.0)  # in a worker thread: the client's event loop keeps running
        finally:
            os.kill(server.pid, signal.SIGCONT)

    async with TokenStreamClient(
        f"127.0.0.1:{port}", retry=QUICK_RETRY, heartbeat_timeout=0.6
    ) as client:
        sub = await client.submit("freeze", max_tokens=150)  # ~3 s of generation
        collector = Collector(client)
        end = await collector.read(sub.stream_id, trigger_seq=20, fault=freeze_for_a_while)
    silent = [r for r in collector.reconnects if "no message or heartbeat" in r.error]
    assert silent, f"no reconnect for silence: {collector.reconnects}"
    assert end.state == "COMPLETED"
    assert collector.text == "".join(synthetic_tokens("freeze", 150))


async def test_stream_fails_over_to_the_other_address(
    server_factory: Callable[[], ServerProcess], tmp_path: Path
) -> None:
    db = tmp_path / "store.db"
    first, second = server_factory(), server_factory()
    first_port = await asyncio.to_thread(first.start, db, 100.0)
    second_port = free_port()
    targets = [f"127.0.0.1:{first_port}", f"127.0.0.1:{second_port}"]

    def first_dies_second_takes_over() -> None:
        first.kill()  # its lock on the SQLite file goes with it
        second.start(db, 100.0, port=second_port)

    async with TokenStreamClient(targets, retry=QUICK_RETRY) as client:
        sub = await client.submit("fail over", max_tokens=1000)
        collector = Collector(client)
        end = await collector.read(
            sub.stream_id, trigger_seq=30, fault=first_dies_second_takes_over
        )
        assert client.target == targets[1]
    assert any(r.target == targets[1] for r in collector.reconnects)
    stored, stored_end = await stored_text(targets[1], sub.stream_id)
    assert collector.text == stored
    assert end == stored_end
    assert (end.state, end.reason) == ("FAILED", "interrupted")


async def test_watch_with_tokens_survives_connections_cut_at_random_points(
    start_server: ServerFactory,
) -> None:
    server = await start_server(token_rate=400.0)
    events: list[ConversationEvent] = []
    texts: dict[str, str] = {}
    reconnects: list[Reconnect] = []
    async with TokenStreamClient(server.target) as direct:
        first = await direct.submit("first of two", max_tokens=600)
        second = await direct.submit(
            "second of two", conversation_id=first.conversation_id, max_tokens=600
        )
    async with (
        cutting_proxy(server, seed=11) as proxy,
        TokenStreamClient(
            proxy.target, retry=QUICK_RETRY, on_reconnect=reconnects.append
        ) as client,
    ):
        async for item in client.watch(first.conversation_id, include_tokens=True):
            if isinstance(item, StreamTokens):
                texts[item.stream_id] = texts.get(item.stream_id, "") + item.chunk.text
                continue
            events.append(item)
            if sum(e.kind == "stream_ended" for e in events) == 2:
                break
    assert proxy.cuts >= 4
    assert len(reconnects) >= 3
    assert [e.seq for e in events] == list(range(6))  # no gap, no duplicate
    for sub, prompt in ((first, "first of two"), (second, "second of two")):
        stored, end = await stored_text(server.target, sub.stream_id)
        assert end.state == "COMPLETED"
        assert texts[sub.stream_id] == stored == "".join(synthetic_tokens(prompt, 600))
