"""Change notices between processes sharing one PostgreSQL database (LISTEN/NOTIFY).

A write transaction that changes what readers wait for (new tokens, an ending, conversation
events) sends `pg_notify` before it commits, so the notice is delivered exactly when the
change becomes visible, and never for a transaction that rolled back. Every process keeps
one extra connection listening on the shared channel and wakes its own readers.
Notifications are not stored: a listener that loses its connection reports "maybe missed
something" (None) once it is back, and readers keep a slow fallback poll either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenstream.server.storage.repository import ChangeHandler, StoreChange

log = logging.getLogger(__name__)

CHANNEL = "tokenstream_changes"
# How the listening connections show in pg_stat_activity.
APPLICATION_NAME = "tokenstream-listener"
# PostgreSQL refuses payloads of 8000 bytes or more; larger notices are split.
_MAX_PAYLOAD = 7000


@dataclass(slots=True)
class ChangeCollector:
    """What one write transaction changed, gathered while it runs."""

    tokens: dict[str, int] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    conversations: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.tokens or self.ended or self.conversations)


def encode(origin: str, changes: ChangeCollector) -> list[str]:
    """Payloads of at most `_MAX_PAYLOAD` bytes together carrying every change."""
    items: list[tuple[str, Any]] = [("t", item) for item in changes.tokens.items()]
    items += [("e", stream_id) for stream_id in sorted(changes.ended)]
    items += [("c", conversation_id) for conversation_id in sorted(changes.conversations)]
    payloads: list[str] = []
    current: dict[str, Any] = {}
    size = 0
    for key, item in items:
        cost = 2 + (_json_size(item[0]) + _json_size(item[1]) if key == "t" else _json_size(item))
        if current and size + cost > _MAX_PAYLOAD:
            payloads.append(json.dumps(current, separators=(",", ":")))
            current, size = {}, 0
        current.setdefault("o", origin)
        if key == "t":
            current.setdefault("t", {})[item[0]] = item[1]
        else:
            current.setdefault(key, []).append(item)
        size += cost
    if current:
        payloads.append(json.dumps(current, separators=(",", ":")))
    return payloads


def _json_size(value: str | int) -> int:
    """Characters `value` takes in JSON (ids are plain ASCII: counted, not encoded)."""
    if isinstance(value, int):
        return len(str(value))
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return len(value) + 2
    return len(json.dumps(value))


def decode(payload: str) -> tuple[str, StoreChange]:
    """The origin and the change of one payload (ValueError if it is not one of ours)."""
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("o"), str):
        raise ValueError(f"not a change notice: {payload[:80]!r}")
    change = StoreChange(
        tokens={str(k): int(v) for k, v in data.get("t", {}).items()},
        ended=frozenset(str(s) for s in data.get("e", ())),
        conversations=frozenset(str(c) for c in data.get("c", ())),
    )
    return data["o"], change


def connect_args(engine: AsyncEngine) -> dict[str, Any]:
    """What the engine's own connections are opened with (host, credentials, ssl, ...),
    as `asyncpg.connect` arguments: the listener reaches the database the same way."""
    _args, kwargs = engine.dialect.create_connect_args(engine.url)
    accepted = inspect.signature(asyncpg.connect).parameters
    return {key: value for key, value in kwargs.items() if key in accepted}


class ChangeListener:
    """One connection LISTENing on the channel, reconnecting after a database restart.

    Notices from `origin` (this process's own writes) are skipped: the process woke its
    readers itself, after updating its memory.
    """

    _BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)

    def __init__(
        self,
        connect: Mapping[str, Any],
        origin: str,
        on_change: ChangeHandler,
        check_interval: float = 5.0,
    ) -> None:
        self._connect = dict(connect)
        self._origin = origin
        self.on_change = on_change
        # How often an idle listening connection is checked; a silently dead one (no
        # reset from the network) is replaced within this many seconds.
        self._check_interval = check_interval
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait_up_to: float = 10.0) -> None:
        """Starts listening; returns once the first connection listens (or after
        `wait_up_to` seconds: it keeps trying in the background)."""
        self._task = asyncio.create_task(self._run(), name="tokenstream-change-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_up_to):
                await self._connected.wait()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failures = 0
        reconnected = False
        while True:
            problem: object = "the connection closed"
            try:
                settings = {**self._connect.get("server_settings", {})}
                settings["application_name"] = APPLICATION_NAME
                conn = await asyncpg.connect(
                    **{**self._connect, "timeout": 10, "server_settings": settings}
                )
            except Exception as exc:  # whatever it is, keep trying
                problem = exc
            else:
                try:
                    await self._listen(conn, reconnected=reconnected)
                except Exception as exc:  # lost, or refused: start over
                    problem = exc
                finally:
                    if self._connected.is_set():  # it did listen: start backing off afresh
                        self._connected.clear()
                        failures, reconnected = 0, True
                    conn.terminate()
            delay = self._BACKOFF[min(failures, len(self._BACKOFF) - 1)]
            failures += 1
            # Readers fall back to polling meanwhile: slower, never wrong.
            level = logging.WARNING if failures < len(self._BACKOFF) else logging.ERROR
            log.log(level, "change listener: %r; reconnecting in %.2fs", problem, delay)
            await asyncio.sleep(delay)

    async def _listen(self, conn: asyncpg.Connection, *, reconnected: bool) -> None:
        """Listens on `conn` until it is lost."""
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _conn: closed.set())
        await conn.add_listener(CHANNEL, self._received)
        self._connected.set()
        if reconnected:
            log.info("change listener reconnected")
            self._tell(None)  # what was sent meanwhile is lost: look again
        while not closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await closed.wait()
            if not closed.is_set():
                await conn.execute("SELECT 1", timeout=self._check_interval)

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            origin, change = decode(payload)
        except (ValueError, TypeError, AttributeError):
            log.warning("ignoring a malformed change notice: %.80r", payload)
            return
        if origin != self._origin:
            self._tell(change)

    def _tell(self, change: StoreChange | None) -> None:
        try:
            self.on_change(change)
        except Exception:
            log.exception("a change handler failed")
