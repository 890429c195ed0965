"""`tokenstream bench`: the delivery benchmark (see tokenstream.bench)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from tokenstream.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS


@click.command()
@click.option("--smoke", is_flag=True, help="Tiny sizes: checks in seconds that it all runs.")
@click.option(
    "--case", "names", multiple=True, help="Run only this case (repeatable; names as printed)."
)
@click.option(
    "--postgres-url",
    default=None,
    help="Also run on this PostgreSQL database (postgresql+asyncpg://...); it is written to.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write every figure to this JSON file too.",
)
@click.option(
    "--event-loop",
    type=click.Choice(EVENT_LOOPS),
    default=DEFAULT_EVENT_LOOP,
    show_default=True,
    help="Event loop of every server in the run, the baseline's included.",
)
def bench(
    smoke: bool,
    names: tuple[str, ...],
    postgres_url: str | None,
    json_path: Path | None,
    event_loop: str,
) -> None:
    """Measure delivery through real servers against a bare gRPC baseline, in one run.

    Each case runs against the baseline (grpc.aio fan-out from memory, same batching, no
    store), tokenstream on SQLite, and tokenstream on PostgreSQL if --postgres-url is
    given: tokens/s delivered, produce -> receive latency, server CPU per token, peak RSS,
    and the ratio to the baseline. Servers listen on 127.0.0.1 only.
    """
    from tokenstream.bench.cases import FULL, SMOKE
    from tokenstream.bench.run import publish, run
    from tokenstream.bench.servers import BASELINE, Target

    cases = SMOKE if smoke else FULL
    if names:
        unknown = set(names) - {case.name for case in cases}
        if unknown:
            choices = ", ".join(case.name for case in cases)
            raise click.BadParameter(f"unknown case(s) {sorted(unknown)}; choose from {choices}")
        cases = [case for case in cases if case.name in names]
    targets = [Target(BASELINE), Target("sqlite")]
    if postgres_url:
        targets.append(Target("postgresql", postgres_url))
    results = asyncio.run(
        run(
            cases,
            targets,
            progress=lambda line: click.echo(f"running {line}", err=True),
            event_loop=event_loop,
        )
    )
    publish(results, json_path=json_path, event_loop=event_loop)
