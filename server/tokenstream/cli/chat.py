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
import threading

import click
from rich.live import Live
from rich.text import Text

from tokenstream.cli._connect import ClientSettings, client_options, run_async
from tokenstream.cli._output import Output
from tokenstream.client import StreamEnd, TokenStreamClient, TokenStreamClientError

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
        self._turn: asyncio.Task[None] | None = None
        self._leave = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        lines = _StdinLines(loop)
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            while not self._leave.is_set():
                self._show_prompt()
                line = await lines.next(self._leave)
                if line is None:  # Ctrl-D, end of input, or Ctrl-C at a non-interactive prompt
                    break
                prompt = line.strip()
                if prompt in ("/quit", "/exit"):
                    break
                if prompt:
                    self._turn = asyncio.create_task(self._ask(prompt))
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._turn
                    self._turn = None
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if self.output.interactive:
                self.output.out.print()
        if self._leave.is_set() and not self.output.interactive:
            sys.exit(130)

    def _show_prompt(self) -> None:
        if self.output.interactive:
            self.output.out.print(PROMPT, style="bold cyan", end="")

    def _interrupt(self) -> None:
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()  # stop this answer, not the program
        elif self.output.interactive:
            self.output.out.print()
            self._show_prompt()
        else:
            self._leave.set()  # nobody types at a pipe: Ctrl-C means stop

    async def _ask(self, prompt: str) -> None:
        """One turn: submit, show the answer; Ctrl-C cancels it; errors do not end the chat."""
        stream_id: str | None = None
        try:
            submitted = await self.client.submit(
                prompt,
                conversation_id=self.conversation_id,
                model=self.model,
                max_tokens=self.max_tokens,
            )
            stream_id = submitted.stream_id
            if self.conversation_id is None:
                self.conversation_id = submitted.conversation_id
                if not self.output.json:
                    self.output.err.print(f"conversation {submitted.conversation_id}", style="dim")
            if self.output.json:
                self.output.submitted(submitted, following=True)
            self.output.end(await self._show_answer(stream_id))
        except asyncio.CancelledError:
            if stream_id is not None:
                await self._cancel(stream_id)
            raise
        except TokenStreamClientError as error:
            self.output.error(error)

    async def _cancel(self, stream_id: str) -> None:
        """Best effort, briefly: the answer is abandoned either way."""
        if not self.output.json:
            click.echo()
        try:
            async with asyncio.timeout(5):
                result = await self.client.cancel(stream_id)
        except (TokenStreamClientError, TimeoutError):
            self.output.err.print("(could not reach the server to cancel)", style="dim")
            return
        self.output.end(StreamEnd(result.state, result.final_seq))

    async def _show_answer(self, stream_id: str) -> StreamEnd:
        if not self.output.interactive:
            async for item in self.client.stream(stream_id):
                if isinstance(item, StreamEnd):
                    return item
                self.output.chunk(item)
            raise AssertionError("a stream always ends with StreamEnd")
        text = Text()
        with Live(text, console=self.output.live, refresh_per_second=20) as live:
            self.output.live_display = live  # notices go through it, not around it
            try:
                async for item in self.client.stream(stream_id):
                    if isinstance(item, StreamEnd):
                        return item
                    text.append(item.text)
            finally:
                self.output.live_display = None
        raise AssertionError("a stream always ends with StreamEnd")


class _StdinLines:
    """Lines from stdin, read by a daemon thread.

    A thread works for terminals, pipes, files and /dev/null alike, leaves the terminal in
    blocking mode, has no line-length limit, and never keeps the program from exiting.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        stdin = sys.stdin
        if stdin is None:  # closed: nothing will ever be typed
            self._queue.put_nowait(None)
            return

        def read() -> None:
            for line in stdin:
                loop.call_soon_threadsafe(self._queue.put_nowait, line)
            loop.call_soon_threadsafe(self._queue.put_nowait, None)

        threading.Thread(target=read, name="chat-stdin", daemon=True).start()

    async def next(self, leave: asyncio.Event) -> str | None:
        """The next line; None at end of input or once `leave` is set."""
        getting = asyncio.ensure_future(self._queue.get())
        leaving = asyncio.ensure_future(leave.wait())
        await asyncio.wait({getting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        leaving.cancel()
        if getting.done():
            return getting.result()
        getting.cancel()
        return None
