"""Generations running in this process: start, stop on request, and stop when stalled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from tokenstream.server.domain import Ending, EndReason, StreamRecord, StreamState
from tokenstream.server.models import GenerationRequest, TokenSource
from tokenstream.server.streams.live import LiveStream
from tokenstream.server.streams.recent import RecentlyEnded
from tokenstream.server.streams.writer import BatchWriter

log = logging.getLogger(__name__)

CANCELLED = Ending(StreamState.CANCELLED)
# Stops a generation whose stream another server already ended in the store; the ending
# stored there is the one that counts (the first ending wins), this one is never written.
ENDED_ELSEWHERE = Ending(
    StreamState.FAILED,
    "ended_elsewhere",
    "another server ended this stream while it was generating here",
)
SHUTDOWN = Ending(
    StreamState.FAILED,
    EndReason.SHUTDOWN,
    "the server shut down while this stream was generating; the tokens stored before that are kept",
)


class Generations:
    """The live streams of this process and the tasks that feed them; hands those that
    end on to `recent`."""

    def __init__(
        self,
        writer: BatchWriter,
        stall_timeout: float,
        tail_limit: int,
        recent: RecentlyEnded,
    ) -> None:
        self._writer = writer
        self._stall_timeout = stall_timeout
        self._tail_limit = tail_limit
        self.live: dict[str, LiveStream] = {}
        # Those that ended here a moment ago, whole (see `RecentlyEnded`).
        self._recent = recent
        # Not yet ended: a stream leaves as its ending commits (before its task is done).
        self._running: set[LiveStream] = set()
        self._by_caller: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    def in_memory(self, stream_id: str) -> LiveStream | None:
        """The stream in this process's memory for a subscriber: generating here, or
        ended here a moment ago."""
        live = self.live.get(stream_id)
        return live if live is not None else self._recent.get(stream_id)

    def count(self, caller: str | None = None) -> int:
        """Generations running here, in all or of one caller (kept as counts: every
        submission asks, and scanning thousands of live streams each time adds up)."""
        return len(self._running) if caller is None else self._by_caller[caller]

    def start(self, record: StreamRecord, source: TokenSource, caller: str) -> LiveStream:
        live = LiveStream(record, caller, self._tail_limit)
        live.last_progress = asyncio.get_running_loop().time()
        self.live[record.stream_id] = live
        self._running.add(live)
        self._by_caller[caller] += 1
        live.on_end = self._ended
        request = GenerationRequest(record.stream_id, record.prompt, record.max_tokens)
        task = asyncio.create_task(
            self._generate(live, source, request), name=f"generate-{record.stream_id}"
        )
        live.task = task
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if self._watchdog is None and self._stall_timeout > 0:
            self._watchdog = asyncio.create_task(self._watch(), name="tokenstream-stall-watchdog")
        return live

    async def drain(self, grace: float) -> None:
        """Waits up to `grace` seconds for the running generations to finish by themselves."""
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def stop_all(self, ending: Ending) -> None:
        """Stops every generation with `ending` and waits until each has ended."""
        while self._tasks:
            for live in list(self.live.values()):
                live.request_stop(ending)
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("generation task %s failed", task.get_name(), exc_info=exc)

    async def _watch(self) -> None:
        """Ends generations whose model produced nothing for `stall_timeout` seconds."""
        loop = asyncio.get_running_loop()
        period = min(1.0, self._stall_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for live in list(self.live.values()):
                if live.stop_requested is not None:
                    live.interrupt()  # e.g. ended through the store while the model waits
                    continue
                # Progress is a count the generator bumps (cheaper per token than a clock
                # read); it is timed here, so a stall shows within a period of the timeout.
                if live.received != live.received_seen or live.waiting_for_store:
                    live.received_seen = live.received
                    live.last_progress = now
                elif live.producing and now - live.last_progress > self._stall_timeout:
                    log.warning("model stalled on stream %s; ending it", live.stream_id)
                    live.request_stop(
                        Ending(
                            StreamState.FAILED,
                            EndReason.TIMEOUT,
                            f"the model produced no token for {self._stall_timeout:g} s; "
                            "the tokens produced before that are kept",
                        ),
                    )

    async def _generate(
        self, live: LiveStream, source: TokenSource, request: GenerationRequest
    ) -> None:
        try:
            ending = await self._produce(live, source, request)
        except asyncio.CancelledError:
            # Cancelled from outside (event loop shutdown): still record how the stream ends.
            self._writer.queue_end(live, live.stop_requested or SHUTDOWN)
            self._forget(live)
            raise
        try:
            await self._writer.end(live, live.stop_requested or ending)
        finally:
            self._forget(live)

    def _forget(self, live: LiveStream) -> None:
        if self.live.get(live.stream_id) is live:
            del self.live[live.stream_id]
        self._ended(live)

    def _ended(self, live: LiveStream) -> None:
        if live in self._running:
            self._running.discard(live)
            self._by_caller[live.caller] -= 1
            if not self._by_caller[live.caller]:
                del self._by_caller[live.caller]
            # Kept from the moment its end is published (a purge after that forgets it).
            self._recent.keep(live)

    async def _produce(
        self, live: LiveStream, source: TokenSource, request: GenerationRequest
    ) -> Ending:
        """Feeds the source's tokens to the writer; returns how generation ended by itself."""
        if live.stop_requested is not None:  # stopped before it started
            return live.stop_requested
        writer = self._writer
        live.producing = True
        produced = 0
        tokens = source.generate(request)
        # The loop below runs once per token of every stream: it is kept lean.
        try:
            async for token in tokens:
                live.received += 1
                # Checked before every write: a cancelled stream gets no further token.
                if live.stop_requested is not None:
                    break
                if not token:
                    continue
                if token.__class__ is not str or not token.isascii() or "\x00" in token:
                    _check_token(token)
                room = writer.append(live, token)
                produced += 1
                if produced >= request.max_tokens:
                    break
                if not room:
                    live.waiting_for_store = True  # a slow store is not a stalled model
                    try:
                        await writer.wait_for_room()
                    finally:
                        live.waiting_for_store = False
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if live.stop_requested is not None and current is not None:
                # We cancelled ourselves to interrupt a source that was waiting for a token.
                current.uncancel()
            elif current is not None and current.cancelling():
                raise
            else:
                return _model_failed("it raised CancelledError on its own")
        except Exception as exc:
            log.warning("model failed on stream %s: %r", live.stream_id, exc)
            return _model_failed(str(exc) or type(exc).__name__)
        finally:
            live.producing = False
            with contextlib.suppress(Exception):
                # Lets the source release what it holds (e.g. an HTTP stream to a model).
                close = getattr(tokens, "aclose", None)
                if close is not None:
                    await close()
        return live.stop_requested or Ending(StreamState.COMPLETED)


def _model_failed(detail: str) -> Ending:
    return Ending(
        StreamState.FAILED,
        EndReason.MODEL_ERROR,
        f"the model failed: {detail}; the tokens produced before that are kept",
    )


class _UnstorableToken(Exception):
    pass


def _check_token(token: object) -> None:
    """Refuses model output no store can hold, before it can poison a group commit."""
    if not isinstance(token, str):
        raise _UnstorableToken(f"it produced a {type(token).__name__}, not text")
    if "\x00" in token:
        raise _UnstorableToken("it produced a NUL character")
    try:
        token.encode()
    except UnicodeEncodeError as exc:
        raise _UnstorableToken("it produced text that is not valid Unicode") from exc
