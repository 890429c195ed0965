"""`tokenstream` console script."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import ParamSpec, TypeVar

import click

from tokenstream.client import StreamEnd, TokenStreamClient, TokenStreamClientError
from tokenstream.server.config import DEFAULT_DATABASE_URL, ServerConfig
from tokenstream.server.storage.repository import PurgeResult

P = ParamSpec("P")
T = TypeVar("T")

_target_option = click.option(
    "--target",
    envvar="TOKENSTREAM_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    help="Server address (host:port). Env: TOKENSTREAM_TARGET.",
)


def _run(main: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """Runs an async command; client errors become a one-line message and exit code 1."""

    @wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return asyncio.run(main(*args, **kwargs))  # type: ignore[arg-type]
        except TokenStreamClientError as error:
            reason = f" [{error.reason}]" if error.reason else ""
            click.echo(f"error: {error.code.name}{reason}: {error.message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="tokenstream")
def cli() -> None:
    """Durable, resumable LLM token streams over gRPC."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, help="Port (0 picks a free one).")
@click.option(
    "--database-url",
    envvar="TOKENSTREAM_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="SQLAlchemy async URL of the store.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--token-rate",
    type=float,
    default=50.0,
    show_default=True,
    help="Tokens per second of the built-in sources (0 = as fast as possible).",
)
@click.option("--default-model", default="synthetic", show_default=True)
@click.option(
    "--heartbeat-interval",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds of quiet before a subscription gets a heartbeat.",
)
@click.option(
    "--flush-interval",
    type=float,
    default=0.005,
    show_default=True,
    help="Minimum seconds between group commits of generated tokens.",
)
@click.option(
    "--max-batch-tokens",
    type=int,
    default=10_000,
    show_default=True,
    help="Most tokens one group commit writes.",
)
@click.option(
    "--stall-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds without a token before a generation ends FAILED timeout (0: never).",
)
@click.option(
    "--lease-ttl",
    type=float,
    default=15.0,
    show_default=True,
    help="Seconds after which a stream whose server stopped renewing it ends interrupted.",
)
@click.option(
    "--retention-days",
    type=float,
    default=None,
    help="Purge streams finished more than this many days ago, hourly (default: keep all).",
)
@click.option(
    "--keepalive-time",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds between keepalive pings; an unanswered ping (10 s) drops the connection.",
)
@click.option("--max-generations", type=int, default=1000, show_default=True)
@click.option("--max-generations-per-caller", type=int, default=100, show_default=True)
@click.option("--max-subscribers-per-stream", type=int, default=1000, show_default=True)
@click.option(
    "--shutdown-grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds running calls get to finish on SIGTERM.",
)
def serve(
    host: str,
    port: int,
    database_url: str,
    log_level: str,
    token_rate: float,
    default_model: str,
    heartbeat_interval: float,
    flush_interval: float,
    max_batch_tokens: int,
    stall_timeout: float,
    lease_ttl: float,
    retention_days: float | None,
    keepalive_time: float,
    max_generations: int,
    max_generations_per_caller: int,
    max_subscribers_per_stream: int,
    shutdown_grace: float,
) -> None:
    """Run the server until SIGINT/SIGTERM."""
    from tokenstream.server.app import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    base = ServerConfig()
    config = replace(
        base,
        host=host,
        port=port,
        database_url=database_url,
        token_rate=token_rate,
        default_model=default_model,
        shutdown_grace=shutdown_grace,
        keepalive_time=keepalive_time,
        engine=replace(
            base.engine,
            heartbeat_interval=heartbeat_interval,
            flush_interval=flush_interval,
            max_batch_tokens=max_batch_tokens,
            stall_timeout=stall_timeout,
            lease_ttl=lease_ttl,
            retention_days=retention_days,
            max_generations=max_generations,
            max_generations_per_caller=max_generations_per_caller,
            max_subscribers_per_stream=max_subscribers_per_stream,
        ),
    )
    from tokenstream.server.storage.sql import DatabaseInUse

    try:
        asyncio.run(run_server(config))
    except (DatabaseInUse, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option("--older-than", required=True, help="Age like 30d, 12h, 90m or 45s.")
@click.option(
    "--database-url",
    envvar="TOKENSTREAM_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
)
def purge(older_than: str, database_url: str) -> None:
    """Delete streams that finished longer ago than --older-than (and emptied conversations).

    Safe while a server runs on the same database: running streams are never touched.
    """
    age = _parse_age(older_than)
    result = asyncio.run(_purge(database_url, age))
    click.echo(f"purged {result.streams} stream(s), {result.conversations} conversation(s)")


async def _purge(database_url: str, age: timedelta) -> PurgeResult:
    from tokenstream.server.storage.sql import (
        SqlStreamRepository,
        create_engine,
        upgrade_to_head,
    )

    engine = create_engine(database_url)
    repository = SqlStreamRepository(engine)
    try:
        await upgrade_to_head(engine)
        return await repository.purge_finished(datetime.now(UTC) - age)
    finally:
        await repository.close()


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def _parse_age(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if match is None:
        raise click.BadParameter(f"{text!r}: use a number with d, h, m or s, e.g. 30d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "d"])


@cli.command()
@click.argument("prompt")
@click.option(
    "--conversation", "-c", "conversation_id", default="", help="Add to this conversation."
)
@click.option("--model", "-m", default="", help="Token source (default: the server's).")
@click.option("--max-tokens", type=int, default=0, help="0 = the server's default.")
@click.option("--request-id", default=None, help="Idempotency key (default: a new UUID).")
@click.option("--follow/--no-follow", "-f", default=False, help="Stream the answer to stdout.")
@_target_option
@_run
async def submit(
    prompt: str,
    conversation_id: str,
    model: str,
    max_tokens: int,
    request_id: str | None,
    follow: bool,
    target: str,
) -> None:
    """Submit PROMPT; print the stream id (and with --follow, the answer)."""
    async with TokenStreamClient(target) as client:
        submitted = await client.submit(
            prompt,
            conversation_id=conversation_id,
            model=model,
            max_tokens=max_tokens,
            request_id=request_id,
        )
        if not follow:
            click.echo(f"stream_id: {submitted.stream_id}")
            click.echo(f"conversation_id: {submitted.conversation_id}")
            click.echo(f"model: {submitted.model}")
            return
        click.echo(
            f"stream {submitted.stream_id} in conversation {submitted.conversation_id}", err=True
        )
        await _follow(client, submitted.stream_id, 0)


@cli.command()
@click.argument("stream_id")
@click.option("--from-seq", type=int, default=0, show_default=True, help="First seq wanted.")
@_target_option
@_run
async def follow(stream_id: str, from_seq: int, target: str) -> None:
    """Print a stream's text from --from-seq until it ends."""
    async with TokenStreamClient(target) as client:
        await _follow(client, stream_id, from_seq)


async def _follow(client: TokenStreamClient, stream_id: str, from_seq: int) -> None:
    async for item in client.stream(stream_id, from_seq):
        if isinstance(item, StreamEnd):
            click.echo()
            detail = f", {item.reason}: {item.error}" if item.reason else ""
            click.echo(f"[{item.state.lower()}, final_seq={item.final_seq}{detail}]", err=True)
            if item.state == "FAILED":
                sys.exit(3)
        else:
            click.echo(item.text, nl=False)
            sys.stdout.flush()


@cli.command()
@click.argument("stream_id")
@_target_option
@_run
async def cancel(stream_id: str, target: str) -> None:
    """Cancel a running stream (keeps what it wrote)."""
    async with TokenStreamClient(target) as client:
        result = await client.cancel(stream_id)
        click.echo(f"{result.state.lower()} final_seq={result.final_seq}")


@cli.command()
@click.argument("stream_id")
@_target_option
@_run
async def status(stream_id: str, target: str) -> None:
    """Show a stream's state and head seq."""
    async with TokenStreamClient(target) as client:
        info = await client.get_stream(stream_id)
        turn = info.turn
        click.echo(f"stream_id: {turn.stream_id}")
        click.echo(f"conversation_id: {info.conversation_id}")
        click.echo(f"state: {turn.state.lower()}")
        click.echo(f"head_seq: {turn.head_seq}")
        click.echo(f"model: {turn.model}")
        if turn.reason:
            click.echo(f"reason: {turn.reason}: {turn.error}")


@cli.command()
@click.argument("conversation_id")
@click.option("--page-size", type=int, default=0, help="Turns fetched per call.")
@_target_option
@_run
async def history(conversation_id: str, page_size: int, target: str) -> None:
    """Print a conversation's prompts and responses, oldest first."""
    async with TokenStreamClient(target) as client:
        async for turn in client.history(conversation_id, page_size):
            click.echo(
                f"--- {turn.stream_id} [{turn.state.lower()}] {turn.created_at:%Y-%m-%d %H:%M:%S}"
            )
            click.echo(f"> {turn.prompt}")
            click.echo(turn.response)


if __name__ == "__main__":
    cli()
