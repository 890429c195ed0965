"""`tokenstream` console script."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import wraps
from typing import ParamSpec, TypeVar

import click

from tokenstream.client import StreamEnd, TokenStreamClient, TokenStreamClientError
from tokenstream.server.config import DEFAULT_DATABASE_URL, ServerConfig

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
def serve(
    host: str,
    port: int,
    database_url: str,
    log_level: str,
    token_rate: float,
    default_model: str,
    heartbeat_interval: float,
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
        engine=replace(base.engine, heartbeat_interval=heartbeat_interval),
    )
    from tokenstream.server.storage.sql import DatabaseInUse

    try:
        asyncio.run(run_server(config))
    except (DatabaseInUse, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


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
