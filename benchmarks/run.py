"""`make bench`: `tokenstream bench` on the baseline, SQLite and a throw-away PostgreSQL.

    .venv/bin/python -m benchmarks.run [--smoke] [--case NAME ...] [--json FILE]
                                         [--event-loop uvloop|asyncio]

The PostgreSQL cluster keeps its durable defaults (fsync on, synchronous commit), listens
on 127.0.0.1 only, and is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tests.postgres import PostgresCluster
from tokenstream.bench.cases import FULL, SMOKE
from tokenstream.bench.run import publish, run
from tokenstream.bench.servers import BASELINE, Target
from tokenstream.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--case", dest="names", action="append", default=[])
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP)
    args = parser.parse_args()
    cases = [c for c in (SMOKE if args.smoke else FULL) if not args.names or c.name in args.names]
    cluster = PostgresCluster(durable=True)
    try:
        cluster.start()
        url = asyncio.run(cluster.create_database())
        targets = [Target(BASELINE), Target("sqlite"), Target("postgresql", url)]
        results = asyncio.run(
            run(
                cases,
                targets,
                progress=lambda line: print("running", line),
                event_loop=args.event_loop,
            )
        )
    finally:
        cluster.remove()
    publish(results, json_path=args.json, event_loop=args.event_loop)


if __name__ == "__main__":
    main()
