"""Real `tokenstream serve` processes sharing one PostgreSQL database: any replica serves
any stream, a cancel lands wherever the generation runs, a dead replica's streams end, and a
database restart loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.conftest import run_tokenstream as run_cli
from tests.postgres import PostgresCluster, running_cluster
from tokenstream.client import Chunk, StreamEnd, TokenStreamClient
from tokenstream.server.models.synthetic import synthetic_tokens

pytestmark = pytest.mark.slow

StartReplicas = Callable[..., Awaitable[list[ServerProcess]]]
LEASE_TTL = 2.0


@pytest.fixture
def start_replicas(server_factory: Callable[[], ServerProcess], tmp_path: Path) -> StartReplicas:
    """Migrates the database once, then starts `count` servers on it (--no-migrate)."""

    async def start(
        database_url: str, count: int, *, token_rate: float, extra: tuple[str, ...] = ()
    ) -> list[ServerProcess]:
        code, _, err = await run_cli("migrate", "--database-url", database_url)
        assert code == 0, err
        args = ("--database-url", database_url, "--no-migrate", *extra)
        servers = [server_factory() for _ in range(count)]
        await asyncio.gather(
            *(
                asyncio.to_thread(s.start, tmp_path / "unused.db", token_rate, extra_args=args)
                for s in servers
            )
        )
        assert not (tmp_path / "unused.db").exists()  # they really run on PostgreSQL
        return servers

    return start


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[ServerProcess], TokenStreamClient]]:
    opened: list[TokenStreamClient] = []

    def connect(server: ServerProcess) -> TokenStreamClient:
        client = TokenStreamClient(server.target, heartbeat_timeout=10)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        await client.close()


@dataclass
class Reader:
    """One subscriber's view of a stream, filled by `read`."""

    chunks: list[Chunk] = field(default_factory=list)
    end: StreamEnd | None = None
    ended_at: float = 0.0
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def head(self) -> int:
        return self.chunks[-1].end_seq if self.chunks else -1

    async def read(self, client: TokenStreamClient, stream_id: str) -> Reader:
        async for item in client.stream(stream_id):
            if isinstance(item, Chunk):
                self.chunks.append(item)
                self.progress.set()
            else:
                self.end = item
                self.ended_at = asyncio.get_running_loop().time()
        return self

    async def wait_for(self, seq: int) -> None:
        async with asyncio.timeout(20):
            while self.head < seq:
                self.progress.clear()
                await self.progress.wait()


def reading(client: TokenStreamClient, stream_id: str) -> tuple[Reader, asyncio.Task[Reader]]:
    reader = Reader()
    return reader, asyncio.create_task(reader.read(client, stream_id))


def expected_text(prompt: str, final_seq: int) -> str:
    return "".join(synthetic_tokens(prompt, final_seq + 1))


async def test_submit_on_a_read_on_b_and_c_cancel_on_c(
    postgres_url: str,
    start_replicas: StartReplicas,
    clients: Callable[[ServerProcess], TokenStreamClient],
) -> None:
    # A slow model (a token every 2 s): A's generator waits on it when the cancel comes, so
    # only the store's notice can stop it before its next token.
    a, b, c = await start_replicas(postgres_url, 3, token_rate=0.5)
    on_a, on_b, on_c = clients(a), clients(b), clients(c)
    prompt = "three replicas, one stream"
    submitted = await on_a.submit(prompt, max_tokens=3000)
    readers = [reading(client, submitted.stream_id) for client in (on_a, on_b, on_c)]
    await readers[1][0].wait_for(1)  # token 1 was just made; token 2 is 2 s away

    loop = asyncio.get_running_loop()
    asked = loop.time()
    cancelled = await on_c.cancel(submitted.stream_id)
    assert cancelled.state == "CANCELLED"
    async with asyncio.timeout(10):
        done = [await task for _, task in readers]
    texts = {reader.text for reader in done}
    assert texts == {expected_text(prompt, cancelled.final_seq)}  # identical everywhere
    for reader in done:
        assert reader.end == StreamEnd("CANCELLED", cancelled.final_seq)
    assert cancelled.final_seq == 1
    # The subscriber on A gets its end once A's generation has stopped: the cancel made on
    # C landed there, long before A's next token would have told it.
    stopped_on_a = done[0].ended_at - asked
    assert stopped_on_a < 1.0, f"A stopped {stopped_on_a:.2f} s after the cancel"
    info = await on_a.get_stream(submitted.stream_id)
    assert (info.turn.state, info.turn.head_seq) == ("CANCELLED", 1)
    print(f"\ncancel on C -> end on A's own subscriber: {stopped_on_a * 1000:.0f} ms")


async def test_a_killed_replica_s_streams_end_interrupted_on_the_others(
    postgres_url: str,
    start_replicas: StartReplicas,
    clients: Callable[[ServerProcess], TokenStreamClient],
) -> None:
    a, b = await start_replicas(
        postgres_url, 2, token_rate=20.0, extra=("--lease-ttl", str(LEASE_TTL))
    )
    on_a, on_b = clients(a), clients(b)
    prompts = [f"stream {n} of a replica that dies" for n in range(10)]
    submitted = [await on_a.submit(prompt, max_tokens=5000) for prompt in prompts]
    readers = [reading(on_b, s.stream_id) for s in submitted]
    for reader, _ in readers:
        await reader.wait_for(2)

    loop = asyncio.get_running_loop()
    a.kill()
    killed = loop.time()
    seen_before = [reader.head for reader, _ in readers]
    async with asyncio.timeout(20):
        done = [await task for _, task in readers]
    slowest = max(reader.ended_at for reader in done) - killed
    # A's claims run out LEASE_TTL after its last renewal, and B sweeps every third of it.
    assert slowest < LEASE_TTL * 2 + 1.0, f"streams ended {slowest:.1f} s after the kill"
    for prompt, stream, reader, seen in zip(prompts, submitted, done, seen_before, strict=True):
        assert reader.end is not None
        assert (reader.end.state, reader.end.reason) == ("FAILED", "interrupted")
        final = reader.end.final_seq
        assert final >= seen  # every token delivered before the kill is kept
        assert reader.text == expected_text(prompt, final)
        # Resumed reads are exact: from the middle, on the surviving replica.
        middle = final // 2
        rest = [item async for item in on_b.stream(stream.stream_id, from_seq=middle)]
        assert (
            "".join(i.text for i in rest if isinstance(i, Chunk))
            == reader.text[len(expected_text(prompt, middle - 1)) :]
        )
        assert rest[-1] == reader.end
    print(
        f"\nSIGKILL of A -> all 10 streams ended on B after {slowest:.2f} s (lease {LEASE_TTL} s)"
    )


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, since the test restarts it."""
    with running_cluster() as cluster:
        yield cluster


async def test_a_database_restart_while_streaming_loses_no_token(
    own_cluster: PostgresCluster,
    start_replicas: StartReplicas,
    clients: Callable[[ServerProcess], TokenStreamClient],
) -> None:
    url = await own_cluster.create_database()
    a, b = await start_replicas(url, 2, token_rate=100.0)
    on_a, on_b = clients(a), clients(b)
    prompts = [f"through a database restart {n}" for n in range(3)]
    submitted = [await on_a.submit(prompt, max_tokens=500) for prompt in prompts]
    readers = [reading(on_b, s.stream_id) for s in submitted]
    for reader, _ in readers:
        await reader.wait_for(50)

    await asyncio.to_thread(own_cluster.restart)
    async with asyncio.timeout(40):
        done = [await task for _, task in readers]
    for prompt, reader in zip(prompts, done, strict=True):
        # Generation went on in A's memory while the database was away; every token was
        # stored once it came back, and B's subscriber resumed where it stood.
        assert reader.end == StreamEnd("COMPLETED", 499)
        assert reader.text == expected_text(prompt, 499)
    history = [turn async for turn in on_b.history(submitted[0].conversation_id)]
    assert [turn.response for turn in history] == [expected_text(prompts[0], 499)]

    for server in (a, b):  # they saw the outage, and listen for notices again
        assert "change listener reconnected" in server.log_text()
    # Both servers recovered by themselves: a new stream on B, read on A.
    again = await on_b.submit("after the restart", max_tokens=30)
    after = await Reader().read(on_a, again.stream_id)
    assert after.end == StreamEnd("COMPLETED", 29)
    assert after.text == expected_text("after the restart", 29)
