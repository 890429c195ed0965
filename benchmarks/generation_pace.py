"""Does the durable store slow generation down? Paced generations with the SQLite store
against the same with the in-memory store (the baseline), in one run.

    .venv/bin/python benchmarks/generation_pace.py [--streams 300 --tokens 400 --rate 200]

Prints per-stream generation time (submit to final commit) against the ideal tokens/rate,
and process CPU per token. A ratio near 1.0 means the store does not slow the models.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tokenstream.server.models import builtin_registry
from tokenstream.server.storage.memory import MemoryStreamRepository
from tokenstream.server.storage.repository import StreamRepository
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.streams import EngineSettings, StreamEngine, SubmitCommand


async def measure(
    repo: StreamRepository, streams: int, tokens: int, rate: float
) -> tuple[float, float]:
    settings = EngineSettings(max_generations=streams, max_generations_per_caller=streams)
    engine = StreamEngine(repo, builtin_registry(rate), settings)
    await engine.start()
    cpu = time.process_time()
    subs = await asyncio.gather(
        *(engine.submit(SubmitCommand(prompt=f"p{i}", max_tokens=tokens)) for i in range(streams))
    )
    for sub in subs:
        while not (await repo.get_stream(sub.stream_id)).state.is_terminal:  # noqa: ASYNC110  # the store offers no event
            await asyncio.sleep(0.05)
    cpu = time.process_time() - cpu
    durations = []
    for sub in subs:
        record = await repo.get_stream(sub.stream_id)
        assert record.finished_at is not None
        durations.append((record.finished_at - record.created_at).total_seconds())
    await engine.stop(grace=0)
    await repo.close()
    return statistics.median(durations), cpu / (streams * tokens) * 1e6


async def main(streams: int, tokens: int, rate: float) -> None:
    ideal = tokens / rate
    print(f"{streams} streams x {tokens} tokens at {rate:g} tok/s = {streams * rate:,.0f} tok/s")
    memory = await measure(MemoryStreamRepository(), streams, tokens, rate)
    with tempfile.TemporaryDirectory() as folder:
        db = create_engine(f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}")
        await upgrade_to_head(db)
        sqlite = await measure(SqlStreamRepository(db), streams, tokens, rate)
    for name, (median, cpu) in (("memory (baseline)", memory), ("sqlite", sqlite)):
        print(
            f"  {name:18s} median {median:.2f} s (ideal {ideal:.2f} s, x{median / ideal:.2f}); "
            f"{cpu:.0f} us CPU/token"
        )
    print(f"  sqlite / baseline generation time: x{sqlite[0] / memory[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.tokens, args.rate))
