"""Client commands: submit, follow, cancel, status, history."""

from __future__ import annotations

import sys

import click

from tokenstream.cli._connect import ClientSettings, client_options, run_async
from tokenstream.cli._output import Output
from tokenstream.client import StreamEnd, TokenStreamClient

# Exit status of `follow` (and `submit --follow`) when the stream ended FAILED.
EXIT_STREAM_FAILED = 3


@click.command()
@click.argument("prompt")
@click.option(
    "--conversation", "-c", "conversation_id", default=None, help="Add to this conversation."
)
@click.option("--model", "-m", default=None, help="Token source (default: the server's).")
@click.option("--max-tokens", type=int, default=0, help="0 = the server's default.")
@click.option("--request-id", default=None, help="Idempotency key (default: a new UUID).")
@click.option("--follow/--no-follow", "-f", default=False, help="Stream the answer to stdout.")
@client_options
@run_async
async def submit(
    prompt: str,
    conversation_id: str | None,
    model: str | None,
    max_tokens: int,
    request_id: str | None,
    follow: bool,
    settings: ClientSettings,
) -> None:
    """Submit PROMPT; print the stream id (and with --follow, the answer)."""
    output = Output(settings.json)
    async with settings.client(output) as client:
        submitted = await client.submit(
            prompt,
            conversation_id=conversation_id,
            model=model,
            max_tokens=max_tokens,
            request_id=request_id,
        )
        output.submitted(submitted, following=follow)
        if follow:
            await print_stream(client, output, submitted.stream_id, 0)


@click.command()
@click.argument("stream_id")
@click.option("--from-seq", type=int, default=0, show_default=True, help="First seq wanted.")
@client_options
@run_async
async def follow(stream_id: str, from_seq: int, settings: ClientSettings) -> None:
    """Print a stream's text from --from-seq until it ends (resuming after failures)."""
    output = Output(settings.json)
    async with settings.client(output) as client:
        await print_stream(client, output, stream_id, from_seq)


async def print_stream(
    client: TokenStreamClient, output: Output, stream_id: str, from_seq: int
) -> StreamEnd:
    async for item in client.stream(stream_id, from_seq):
        if isinstance(item, StreamEnd):
            output.end(item)
            if item.state == "FAILED":
                sys.exit(EXIT_STREAM_FAILED)
            return item
        output.chunk(item)
    raise AssertionError("a stream always ends with StreamEnd")


@click.command()
@click.argument("stream_id")
@client_options
@run_async
async def cancel(stream_id: str, settings: ClientSettings) -> None:
    """Cancel a running stream (keeps what it wrote)."""
    output = Output(settings.json)
    async with settings.client(output) as client:
        output.cancelled(await client.cancel(stream_id))


@click.command()
@click.argument("stream_id")
@client_options
@run_async
async def status(stream_id: str, settings: ClientSettings) -> None:
    """Show a stream's state and head seq."""
    output = Output(settings.json)
    async with settings.client(output) as client:
        output.status(await client.get_stream(stream_id))


@click.command()
@click.argument("conversation_id")
@click.option("--page-size", type=int, default=0, help="Turns fetched per call.")
@client_options
@run_async
async def history(conversation_id: str, page_size: int, settings: ClientSettings) -> None:
    """Show a conversation's prompts and responses, oldest first."""
    output = Output(settings.json)
    async with settings.client(output) as client:
        turns = [turn async for turn in client.history(conversation_id, page_size)]
    output.history(turns)
