"""The stream engine: accepts prompts, runs generations, serves subscriptions.

No gRPC and no SQL here: requests arrive as plain values, storage is a repository, and
errors are the domain errors of `tokenstream.server.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from tokenstream.server import ids
from tokenstream.server.domain import Ending, EndReason, StreamRecord, StreamState, Turn
from tokenstream.server.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from tokenstream.server.models import GenerationRequest, ModelRegistry, TokenSource
from tokenstream.server.storage import errors as storage_errors
from tokenstream.server.storage.repository import NewStream, StreamRepository, WriteBatch
from tokenstream.server.streams.events import End, Heartbeat, StreamEvent
from tokenstream.server.streams.live import LiveStream
from tokenstream.server.streams.pagination import decode_page_token, encode_page_token
from tokenstream.server.streams.settings import EngineSettings
from tokenstream.server.streams.writer import BatchWriter

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    prompt: str
    conversation_id: str = ""
    request_id: str = ""
    model: str = ""
    max_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Submission:
    stream_id: str
    conversation_id: str
    model: str
    created: bool  # False when a retried request_id returned the earlier stream


@dataclass(frozen=True, slots=True)
class HistoryPage:
    turns: list[Turn]
    next_page_token: str


def _now() -> datetime:
    return datetime.now(UTC)


class StreamEngine:
    def __init__(
        self,
        repository: StreamRepository,
        models: ModelRegistry,
        settings: EngineSettings | None = None,
        *,
        sole_writer: bool = True,
    ) -> None:
        # sole_writer: no other process generates into this store (the embedded SQLite case),
        # so streams found active at start were orphaned by a crash.
        self._sole_writer = sole_writer
        self._repository = repository
        self._models = models
        self.settings = settings or EngineSettings()
        self._writer = BatchWriter(
            repository, self.settings.flush_interval, self.settings.max_pending_tokens
        )
        self._live: dict[str, LiveStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Recovers from an earlier crash and starts the writer; returns the streams it ended.

        With a sole writer, streams left PENDING/RUNNING in the store had their generator in
        a process that is gone, so they end FAILED `interrupted` at their last durable token
        instead of staying RUNNING forever.
        """
        interrupted: list[str] = []
        if self._sole_writer:
            interrupted = await self._repository.end_active_streams(
                Ending(
                    StreamState.FAILED,
                    EndReason.INTERRUPTED,
                    "the server stopped while this stream was generating; "
                    "the tokens stored before that are kept",
                ),
                _now(),
            )
        if interrupted:
            log.warning("ended %d interrupted stream(s) from an earlier run", len(interrupted))
        self._writer.start()
        self._accepting = True
        return interrupted

    async def stop(self, give_up_after: float = 5.0) -> None:
        """Ends running generations FAILED `shutdown`, writes everything pending, stops.

        If the store stays unreachable, pending writes are abandoned after `give_up_after`
        seconds so that shutdown always finishes. Safe to call more than once.
        """
        self._accepting = False
        self._writer.begin_stop(give_up_after)
        while self._tasks:
            for live in list(self._live.values()):
                self._request_stop(live, _SHUTDOWN)
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._writer.stop(give_up_after)

    # -- submit --------------------------------------------------------------------------

    async def submit(self, command: SubmitCommand) -> Submission:
        settings = self.settings
        if not command.prompt.strip():
            raise InvalidArgument(
                "prompt is empty: send the text to answer",
                reason="EMPTY_PROMPT",
                field="prompt",
            )
        size = len(command.prompt.encode())
        if size > settings.max_prompt_bytes:
            raise InvalidArgument(
                f"prompt is {size} bytes; the limit is {settings.max_prompt_bytes} bytes "
                "(UTF-8): shorten it",
                reason="PROMPT_TOO_LARGE",
                field="prompt",
            )
        if not 0 <= command.max_tokens <= settings.max_tokens_limit:
            raise InvalidArgument(
                f"max_tokens is {command.max_tokens}; it must be between 1 and "
                f"{settings.max_tokens_limit}, or 0 for the default "
                f"({settings.default_max_tokens})",
                reason="MAX_TOKENS_OUT_OF_RANGE",
                field="max_tokens",
            )
        if command.conversation_id:
            ids.check_conversation_id(command.conversation_id)
        if command.request_id:
            ids.check_request_id(command.request_id)
        model, source = self._models.resolve(command.model)
        if not self._accepting:
            raise _shutting_down()

        request_hash = _fingerprint(command) if command.request_id else None
        if command.request_id:
            earlier = await self._store(self._repository.find_by_request_id(command.request_id))
            if earlier is not None:
                return _replay(earlier, request_hash, command.request_id)

        new = NewStream(
            stream_id=ids.new_stream_id(),
            conversation_id=command.conversation_id or ids.new_conversation_id(),
            new_conversation=not command.conversation_id,
            prompt=command.prompt,
            model=model,
            max_tokens=command.max_tokens or settings.default_max_tokens,
            request_id=command.request_id or None,
            request_hash=request_hash,
            created_at=_now(),
        )
        try:
            record = await self._store(self._repository.create_stream(new))
        except storage_errors.NotFound as exc:
            raise NotFound(
                f"conversation {command.conversation_id} does not exist; leave "
                "conversation_id empty to start a new one",
                reason="CONVERSATION_NOT_FOUND",
                field="conversation_id",
            ) from exc
        except storage_errors.AlreadyExists:
            # A concurrent call with the same request_id won the race: answer as it did.
            earlier = (
                await self._store(self._repository.find_by_request_id(command.request_id))
                if command.request_id
                else None
            )
            if earlier is None:
                raise
            return _replay(earlier, request_hash, command.request_id)

        if not self._accepting:
            # Shutdown began while the stream was being created: nobody will generate it.
            await self._store(
                self._repository.commit(
                    WriteBatch(at=_now(), endings=[(record.stream_id, _SHUTDOWN)])
                )
            )
            raise _shutting_down()
        self._start_generation(record, source)
        return Submission(record.stream_id, record.conversation_id, model, created=True)

    def _start_generation(self, record: StreamRecord, source: TokenSource) -> None:
        live = LiveStream(record)
        self._live[record.stream_id] = live
        request = GenerationRequest(record.stream_id, record.prompt, record.max_tokens)
        task = asyncio.create_task(
            self._generate(live, source, request), name=f"generate-{record.stream_id}"
        )
        live.task = task
        self._tasks.add(task)
        task.add_done_callback(self._generation_done)

    def _generation_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("generation task %s failed", task.get_name(), exc_info=exc)

    async def _generate(
        self, live: LiveStream, source: TokenSource, request: GenerationRequest
    ) -> None:
        try:
            ending = await self._produce(live, source, request)
        except asyncio.CancelledError:
            # Cancelled from outside (event loop shutdown): still record how the stream ends.
            self._writer.queue_end(live, live.stop_requested or _SHUTDOWN)
            self._live.pop(live.stream_id, None)
            raise
        try:
            await self._writer.end(live, live.stop_requested or ending)
        finally:
            self._live.pop(live.stream_id, None)

    async def _produce(
        self, live: LiveStream, source: TokenSource, request: GenerationRequest
    ) -> Ending:
        """Feeds the source's tokens to the writer; returns how generation ended by itself."""
        if live.stop_requested is not None:  # stopped before it started
            return live.stop_requested
        live.producing = True
        produced = 0
        tokens = source.generate(request)
        try:
            async for token in tokens:
                # Checked before every write: a cancelled stream gets no further token.
                if live.stop_requested is not None:
                    break
                if not token:
                    continue
                _check_token(token)
                if not self._writer.has_room:
                    await self._writer.wait_for_room()
                    if live.stop_requested is not None:
                        break
                self._writer.append(live, token)
                produced += 1
                if produced >= request.max_tokens:
                    break
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

    @staticmethod
    def _request_stop(live: LiveStream, ending: Ending) -> None:
        if live.stop_requested is None and live.final is None:
            live.stop_requested = ending
            if live.producing and live.task is not None:
                live.task.cancel()

    # -- cancel --------------------------------------------------------------------------

    async def cancel(self, stream_id: str) -> StreamRecord:
        """Stops the stream before its next token; returns its final record."""
        ids.check_stream_id(stream_id)
        live = self._live.get(stream_id)
        if live is not None:
            self._request_stop(live, Ending(StreamState.CANCELLED))
            return await live.wait_ended()
        record = await self._get_record(stream_id)
        live = self._live.get(stream_id)  # it may have started while we read
        if live is not None:
            self._request_stop(live, Ending(StreamState.CANCELLED))
            return await live.wait_ended()
        if record.state.is_terminal:
            return record
        # Active in the store but generated by no task here: end it in the store directly.
        terminal = await self._store(
            self._repository.commit(
                WriteBatch(at=_now(), endings=[(stream_id, Ending(StreamState.CANCELLED))])
            )
        )
        return terminal.get(stream_id) or await self._get_record(stream_id)

    # -- reads ---------------------------------------------------------------------------

    async def get_stream(self, stream_id: str) -> StreamRecord:
        ids.check_stream_id(stream_id)
        return await self._get_record(stream_id)

    async def history(self, conversation_id: str, page_size: int, page_token: str) -> HistoryPage:
        ids.check_conversation_id(conversation_id)
        settings = self.settings
        if not 0 <= page_size <= settings.max_page_size:
            raise InvalidArgument(
                f"page_size is {page_size}; it must be between 1 and {settings.max_page_size}, "
                f"or 0 for the default ({settings.default_page_size})",
                reason="PAGE_SIZE_OUT_OF_RANGE",
                field="page_size",
            )
        limit = page_size or settings.default_page_size
        after = decode_page_token(page_token, conversation_id)
        try:
            turns = await self._store(
                self._repository.list_turns(conversation_id, after, limit + 1)
            )
        except storage_errors.NotFound as exc:
            raise _conversation_not_found(conversation_id) from exc
        if len(turns) > limit:
            turns = turns[:limit]
            return HistoryPage(turns, encode_page_token(conversation_id, turns[-1].cursor))
        return HistoryPage(turns, "")

    async def subscribe(self, stream_id: str, from_seq: int) -> AsyncGenerator[StreamEvent, None]:
        """Validates the request, then returns the subscription's events.

        Errors in the request raise here, before the first event.
        """
        ids.check_stream_id(stream_id)
        if from_seq < 0:
            raise InvalidArgument(
                f"from_seq is {from_seq}; it must be 0 (from the start) or the last end_seq "
                "received plus 1",
                reason="NEGATIVE_FROM_SEQ",
                field="from_seq",
            )
        record = await self._get_record(stream_id)
        if record.state.is_terminal and from_seq > record.head_seq + 1:
            raise OutOfRange(
                f"from_seq is {from_seq}, past the end of stream {stream_id}: it ended "
                f"{record.state.value} with final_seq {record.head_seq}, so from_seq can be "
                f"at most {record.head_seq + 1}",
                reason="FROM_SEQ_PAST_END",
                field="from_seq",
                metadata={"final_seq": str(record.head_seq)},
            )
        return self._follow(stream_id, from_seq)

    async def _follow(self, stream_id: str, from_seq: int) -> AsyncGenerator[StreamEvent, None]:
        loop = asyncio.get_running_loop()
        settings = self.settings
        seq = from_seq
        last_sent = loop.time()
        while True:
            live = self._live.get(stream_id)
            if live is not None:
                async for event in self._follow_live(live, seq, last_sent):
                    yield event
                return
            # Not generated here: finished, or generated by a process we only see via the store.
            record = await self._get_record(stream_id)
            if record.state.is_terminal or seq <= record.head_seq:
                runs = await self._store(
                    self._repository.read_runs(stream_id, seq, settings.max_chunk_chars)
                )
                for run in runs:
                    for chunk in run.chunks(seq, settings.max_chunk_chars):
                        if chunk.end_seq > record.head_seq and not record.state.is_terminal:
                            break
                        yield chunk
                        seq = chunk.end_seq + 1
                        last_sent = loop.time()
                if not record.state.is_terminal or seq <= record.head_seq:
                    continue
                yield End.of(record)
                return
            if loop.time() - last_sent >= settings.heartbeat_interval:
                yield Heartbeat(record.head_seq, record.state, _now())
                last_sent = loop.time()
            await asyncio.sleep(settings.store_poll_interval)

    async def _follow_live(
        self, live: LiveStream, seq: int, last_sent: float
    ) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        settings = self.settings
        while True:
            changed = live.changed  # taken before looking, so no publish is missed
            if seq <= live.head_seq:
                # Everything durable since the last message goes out as one chunk (rollup).
                for chunk in live.chunks(seq, settings.max_chunk_chars):
                    yield chunk
                    seq = chunk.end_seq + 1
                last_sent = loop.time()
                continue
            if live.final is not None:
                yield End.of(live.final)
                return
            quiet_for = settings.heartbeat_interval - (loop.time() - last_sent)
            if quiet_for <= 0:
                yield Heartbeat(live.head_seq, live.state, _now())
                last_sent = loop.time()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(quiet_for):
                    await changed.wait()

    @staticmethod
    async def _store(call: Awaitable[T]) -> T:
        """Awaits a repository call; an outage becomes UNAVAILABLE, which clients retry."""
        try:
            return await call
        except storage_errors.StorageUnavailable as exc:
            raise Unavailable(
                "the database is unavailable right now; retry shortly",
                reason="STORAGE_UNAVAILABLE",
            ) from exc

    async def _get_record(self, stream_id: str) -> StreamRecord:
        try:
            return await self._store(self._repository.get_stream(stream_id))
        except storage_errors.NotFound as exc:
            raise NotFound(
                f"stream {stream_id} does not exist; stream ids come from SubmitPrompt",
                reason="STREAM_NOT_FOUND",
                field="stream_id",
            ) from exc


_SHUTDOWN = Ending(
    StreamState.FAILED,
    EndReason.SHUTDOWN,
    "the server shut down while this stream was generating; the tokens stored before that are kept",
)


def _shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down and accepts no new prompts; retry on another server "
        "or after the restart",
        reason="SHUTTING_DOWN",
    )


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


def _conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"conversation {conversation_id} does not exist; conversation ids come from SubmitPrompt",
        reason="CONVERSATION_NOT_FOUND",
        field="conversation_id",
    )


def _fingerprint(command: SubmitCommand) -> str:
    """What makes two submissions with one request_id the same request."""
    payload = json.dumps(
        [command.conversation_id, command.prompt, command.model, command.max_tokens],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _replay(earlier: StreamRecord, request_hash: str | None, request_id: str) -> Submission:
    if earlier.request_hash != request_hash:
        raise AlreadyExists(
            f"request_id {request_id!r} was already used for a different request (stream "
            f"{earlier.stream_id}); use a new request_id for a new prompt",
            reason="REQUEST_ID_REUSED",
            field="request_id",
            metadata={"stream_id": earlier.stream_id},
        )
    return Submission(earlier.stream_id, earlier.conversation_id, earlier.model, created=False)
