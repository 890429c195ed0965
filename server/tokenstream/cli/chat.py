"""`tokenstream chat`: an interactive chat in one conversation.

Type a prompt and watch the answer stream in. Ctrl-C stops the running answer (the
partial text is kept) and returns to the prompt; Ctrl-D or /quit leaves. A dropped
connection resumes by itself with a quiet notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import click
from rich.live import Live
from rich.text import Text

from tokenstream.cli._connect import ClientSettings, client_options, run_async
from tokenstream.cli._output import Output
from tokenstream.client import Chunk, StreamEnd, TokenStreamClient

PROMPT = "you> "


@click.command()
@click.option(
    "--conversation", "-c", "conversation_id", default=None, help="Continue this conversation."
)
@click.option("--model", "-m", default=None, help="Token source (default: the server's).")
@click.option("--max-tokens", type=int, default=0, help="0 = the server's default.")
@client_options
@run_async
async def chat(
    conversation_id: str | None, model: str | None, max_tokens: int, settings: ClientSettings
) -> None:
    """Chat interactively; Ctrl-C stops the answer, Ctrl-D leaves."""
    output = Output(settings.json)
    async with settings.client(output) as client:
        session = ChatSession(client, output, conversation_id, model, max_tokens)
        await session.run()


class ChatSession:
    def __init__(
        self,
        client: TokenStreamClient,
        output: Output,
        conversation_id: str | None,
        model: str | None,
        max_tokens: int,
    ) -> None:
        self.client = client
        self.output = output
        self.conversation_id = conversation_id
        self.model = model
        self.max_tokens = max_tokens
        self._answer: asyncio.Task[StreamEnd | None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        lines = await _stdin_lines()
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            while True:
                self._show_prompt()
                raw = await lines.readline()
                if not raw:  # Ctrl-D / end of input
                    break
                prompt = raw.decode(errors="replace").strip()
                if prompt in ("/quit", "/exit"):
                    break
                if prompt:
                    await self._ask(prompt)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if self.output.interactive:
                self.output.out.print()

    def _show_prompt(self) -> None:
        if self.output.interactive:
            self.output.out.print(PROMPT, style="bold cyan", end="")

    def _interrupt(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()  # stop this answer, not the program
        elif self.output.interactive:
            self.output.out.print()
            self._show_prompt()

    async def _ask(self, prompt: str) -> None:
        submitted = await self.client.submit(
            prompt,
            conversation_id=self.conversation_id,
            model=self.model,
            max_tokens=self.max_tokens,
        )
        if self.conversation_id is None:
            self.conversation_id = submitted.conversation_id
            if not self.output.json:
                self.output.err.print(f"conversation {submitted.conversation_id}", style="dim")
        if self.output.json:
            self.output.submitted(submitted, following=True)
        self._answer = asyncio.create_task(self._show_answer(submitted.stream_id))
        try:
            end = await self._answer
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the whole command is being cancelled
            end = None
        finally:
            self._answer = None
        if end is None:
            result = await self.client.cancel(submitted.stream_id)
            end = StreamEnd(result.state, result.final_seq)
            if not self.output.json:
                click.echo()
        self.output.end(end)

    async def _show_answer(self, stream_id: str) -> StreamEnd | None:
        if not self.output.interactive:
            return await self._print_answer(stream_id)
        text = Text()
        with Live(text, console=self.output.live, refresh_per_second=20, transient=False):
            async for item in self.client.stream(stream_id):
                if isinstance(item, StreamEnd):
                    return item
                text.append(item.text)
        return None

    async def _print_answer(self, stream_id: str) -> StreamEnd | None:
        async for item in self.client.stream(stream_id):
            if isinstance(item, Chunk):
                self.output.chunk(item)
            else:
                return item
        return None


async def _stdin_lines() -> asyncio.StreamReader:
    """Reads stdin without blocking the event loop (a terminal or a pipe alike)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    with contextlib.suppress(ValueError):  # stdin may already be registered
        await loop.connect_read_pipe(lambda: protocol, sys.stdin)
    return reader
