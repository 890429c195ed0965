"""How client commands print: plain text, a rich terminal, or JSON lines for scripts.

Answers go to stdout; ids, notices and final states go to stderr, so `> answer.txt`
captures only the text. With --json everything is one JSON object per line on stdout
(errors on stderr).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tokenstream.client import (
    CancelResult,
    Chunk,
    Reconnect,
    StreamEnd,
    StreamInfo,
    Submitted,
    TokenStreamClientError,
    Turn,
)


class Output:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        # No markup (texts contain brackets) and no wrapping (ids must stay whole).
        self.err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
        self.out = Console(highlight=False, markup=False, soft_wrap=True)
        # Live rendering needs real wrapping to know how tall the answer is on screen.
        self.live = Console(highlight=False, markup=False)
        # While an answer is rendered live, notices must go through it, or they tear it.
        self.live_display: Live | None = None

    @property
    def interactive(self) -> bool:
        return not self.json and self.out.is_terminal

    def _line(self, kind: str, **fields: Any) -> None:
        # ASCII-only JSON: no character in a line can look like a line break to a reader.
        click.echo(json.dumps({"type": kind, **fields}, default=str))

    def submitted(self, submitted: Submitted, *, following: bool) -> None:
        if self.json:
            self._line("submitted", **_fields(submitted))
        elif following:
            self.err.print(
                f"stream {submitted.stream_id} in conversation {submitted.conversation_id}",
                style="dim",
            )
        else:
            click.echo(f"stream_id: {submitted.stream_id}")
            click.echo(f"conversation_id: {submitted.conversation_id}")
            click.echo(f"model: {submitted.model}")

    def chunk(self, chunk: Chunk) -> None:
        if self.json:
            self._line("chunk", **_fields(chunk))
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()

    def end(self, end: StreamEnd) -> None:
        if self.json:
            self._line("end", **_fields(end))
            return
        click.echo()
        detail = f", {end.reason}: {end.error}" if end.reason else ""
        style = {"COMPLETED": "dim", "CANCELLED": "yellow"}.get(end.state, "red")
        self.err.print(f"[{end.state.lower()}, final_seq={end.final_seq}{detail}]", style=style)

    def reconnect(self, reconnect: Reconnect) -> None:
        if self.json:
            self._line("reconnect", **_fields(reconnect))
            return
        notice = (
            f"(connection lost; resuming from seq {reconnect.from_seq} on {reconnect.target} "
            f"in {reconnect.delay:.1f}s)"
        )
        if self.live_display is not None:
            self.live_display.console.print(notice, style="dim")
        else:
            self.err.print(notice, style="dim")

    def cancelled(self, result: CancelResult) -> None:
        if self.json:
            self._line("cancelled", **_fields(result))
        else:
            click.echo(f"{result.state.lower()} final_seq={result.final_seq}")

    def status(self, info: StreamInfo) -> None:
        turn = info.turn
        if self.json:
            self._line("stream", conversation_id=info.conversation_id, **_fields(turn))
            return
        click.echo(f"stream_id: {turn.stream_id}")
        click.echo(f"conversation_id: {info.conversation_id}")
        click.echo(f"state: {turn.state.lower()}")
        click.echo(f"head_seq: {turn.head_seq}")
        click.echo(f"model: {turn.model}")
        if turn.reason:
            click.echo(f"reason: {turn.reason}: {turn.error}")

    def history(self, turns: list[Turn]) -> None:
        if self.json:
            for turn in turns:
                self._line("turn", **_fields(turn))
        elif self.interactive:
            table = Table(show_lines=True)
            for column in ("when", "stream", "state", "prompt", "response"):
                table.add_column(column, overflow="fold")
            for turn in turns:
                table.add_row(
                    f"{turn.created_at:%Y-%m-%d %H:%M:%S}",
                    turn.stream_id,
                    turn.state.lower(),
                    turn.prompt,
                    turn.response,
                )
            self.out.print(table)
        else:
            for turn in turns:
                click.echo(
                    f"--- {turn.stream_id} [{turn.state.lower()}] "
                    f"{turn.created_at:%Y-%m-%d %H:%M:%S}"
                )
                click.echo(f"> {turn.prompt}")
                click.echo(turn.response)

    def error(self, error: TokenStreamClientError) -> None:
        if self.json:
            payload = {
                "type": "error",
                "code": error.code.name,
                "reason": error.reason,
                "message": error.message,
            }
            click.echo(json.dumps(payload), err=True)
        else:
            reason = f" [{error.reason}]" if error.reason else ""
            click.echo(f"error: {error.code.name}{reason}: {error.message}", err=True)


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__slots__}
