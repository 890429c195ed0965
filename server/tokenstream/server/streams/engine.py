"""The stream engine: accepts prompts, runs generations, serves subscriptions.

No gRPC and no SQL here: requests arrive as plain values, storage is a repository, and
errors are the domain errors of `tokenstream.server.errors`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tokenstream.server import ids
from tokenstream.server.domain import (
    Conversation,
    Ending,
    EndReason,
    Member,
    Role,
    StreamRecord,
    StreamState,
    Turn,
)
from tokenstream.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from tokenstream.server.models import ModelRegistry, TokenSource
from tokenstream.server.storage import errors as storage_errors
from tokenstream.server.storage.repository import (
    NewStream,
    PurgeResult,
    StoreChange,
    StreamRepository,
    WriteBatch,
)
from tokenstream.server.streams._store import (
    conversation_not_found,
    get_record,
    guarded,
    stream_not_found,
)
from tokenstream.server.streams.changes import ChangeFeed
from tokenstream.server.streams.events import (
    StreamEvent,
    WatchEvent,
)
from tokenstream.server.streams.generation import (
    CANCELLED,
    ENDED_ELSEWHERE,
    SHUTDOWN,
    Generations,
)
from tokenstream.server.streams.leases import INTERRUPTED, LeaseKeeper
from tokenstream.server.streams.pagination import decode_page_token, encode_page_token
from tokenstream.server.streams.recent import RecentlyEnded
from tokenstream.server.streams.settings import EngineSettings
from tokenstream.server.streams.subscription import Subscription
from tokenstream.server.streams.watch import ConversationWatch
from tokenstream.server.streams.writer import BatchWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    prompt: str
    conversation_id: str = ""
    request_id: str = ""
    model: str = ""
    max_tokens: int = 0
    # Who asks, for per-caller limits (the authenticated principal, else the peer address).
    caller: str = ""
    # The authenticated user (None without authentication: no access control).
    user: str | None = None


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
    head_event_seq: int = -1  # the conversation's newest event as of this read


@dataclass(frozen=True, slots=True)
class ConversationPage:
    conversations: list[Conversation]
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
        self.settings = settings = settings or EngineSettings()
        self._writer = BatchWriter(
            repository,
            settings.flush_interval,
            settings.max_pending_tokens,
            settings.max_batch_tokens,
            settings.max_batch_endings,
        )
        self._recent = RecentlyEnded(settings.recent_ended_bytes, settings.recent_ended_seconds)
        self._generations = Generations(
            self._writer, settings.stall_timeout, settings.live_tail_tokens, self._recent
        )
        # Wakes readers of streams and conversations changed here or (notified) elsewhere.
        self._changes = ChangeFeed()
        self._writer.on_commit = self._changes.publish
        self._leases = LeaseKeeper(
            repository,
            settings.lease_ttl,
            lambda: list(self._generations.live),
            # Rare (a replica died): every reader here looks rather than a lookup of whose.
            on_ended=lambda _ids: self._changes.publish_everything(),
        )
        self._subscribers: Counter[str] = Counter()
        self._reserved_total = 0
        self._reserved_by: Counter[str] = Counter()
        self._creating: set[asyncio.Future[Submission]] = set()
        self._retention: asyncio.Task[None] | None = None
        self._accepting = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Recovers from an earlier crash, starts background work; returns the streams ended.

        With a sole writer, every stream left PENDING/RUNNING had its generator in a process
        that is gone; otherwise only those whose lease ran out. They end FAILED
        `interrupted` at their last durable token instead of staying RUNNING forever.
        """
        if self._sole_writer:
            interrupted = await self._repository.end_active_streams(INTERRUPTED, _now())
        else:
            interrupted = await self._leases.sweep()
        if interrupted:
            log.warning("ended %d interrupted stream(s) from an earlier run", len(interrupted))
        if not await self._repository.listen(self._on_store_change) and not self._sole_writer:
            log.warning(
                "this store sends no change notices: other servers' tokens are found by "
                "polling every %g s",
                self.settings.store_poll_interval,
            )
        self._writer.start()
        self._leases.start()
        if self.settings.retention_days is not None:
            self._retention = asyncio.create_task(self._retain(), name="tokenstream-retention")
        self._accepting = True
        return interrupted

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking prompts, lets running generations finish for up to `grace` seconds,
        ends the rest FAILED `shutdown` at their last durable token, and writes everything.

        Ending them (rather than handing them over) is deliberate: a token source cannot
        resume a generation from the middle, so another server could only start it again.
        If the store stays unreachable, pending writes are abandoned after `grace` seconds
        so that shutdown always finishes. Safe to call more than once.
        """
        self._accepting = False
        if self._creating:  # they end their streams themselves (not accepting any more)
            await asyncio.gather(*self._creating, return_exceptions=True)
        await self._generations.drain(grace)
        self._writer.begin_stop(grace)
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.gather(self._retention, return_exceptions=True)
        await self._generations.stop_all(SHUTDOWN)
        await self._writer.stop(grace)
        await self._leases.stop()
        self._recent.clear()

    # -- submit --------------------------------------------------------------------------

    async def submit(self, command: SubmitCommand) -> Submission:
        self._validate(command)
        model, source = self._models.resolve(command.model)
        self._check_accepting()
        if command.conversation_id:
            await self._require(command.conversation_id, command.user, Role.MEMBER)
        request_hash = _fingerprint(command) if command.request_id else None
        if command.request_id:
            earlier = await guarded(self._repository.find_by_request_id(command.request_id))
            if earlier is not None:
                return _replay(earlier, request_hash, command.request_id)
            self._check_accepting()
        self._reserve(command.caller)  # released once the generation runs, or on failure
        new = NewStream(
            stream_id=ids.new_stream_id(),
            conversation_id=command.conversation_id or ids.new_conversation_id(),
            new_conversation=not command.conversation_id,
            prompt=command.prompt,
            model=model,
            max_tokens=command.max_tokens or self.settings.default_max_tokens,
            request_id=command.request_id or None,
            request_hash=request_hash,
            created_at=_now(),
            owner_id=self._leases.owner_id,
            lease_expires_at=self._leases.expires_at(),
            author=command.user,
        )
        # Created and started by a task of its own: a caller that goes away meanwhile
        # (deadline, disconnect) cannot leave behind a stream that nobody generates; its
        # retry with the same request_id finds the stream running.
        task = asyncio.ensure_future(self._create_and_start(new, source, command))
        self._creating.add(task)
        task.add_done_callback(self._creating.discard)
        return await asyncio.shield(task)

    async def _create_and_start(
        self, new: NewStream, source: TokenSource, command: SubmitCommand
    ) -> Submission:
        try:
            try:
                record = await guarded(self._writer.create(new))
            except storage_errors.NotFound as exc:
                raise NotFound(
                    f"conversation {command.conversation_id} does not exist; leave "
                    "conversation_id empty to start a new one",
                    reason="CONVERSATION_NOT_FOUND",
                    field="conversation_id",
                ) from exc
            except storage_errors.AlreadyExists as exc:
                # A concurrent call with the same request_id won the race: answer as it did.
                earlier = (
                    await guarded(self._repository.find_by_request_id(command.request_id))
                    if command.request_id
                    else None
                )
                if earlier is None:
                    raise Unavailable(
                        "the stream could not be created; retry", reason="CREATE_CONFLICT"
                    ) from exc
                return _replay(earlier, new.request_hash, command.request_id)
            if not self._accepting:
                # Shutdown began meanwhile: nobody will generate it. Its request_id is let
                # go, so the client's retry on another server starts it afresh.
                await guarded(
                    self._repository.commit(
                        WriteBatch(at=_now(), endings=[(record.stream_id, _UNSTARTED)])
                    )
                )
                raise _shutting_down()
            self._generations.start(record, source, command.caller)
            return Submission(record.stream_id, record.conversation_id, new.model, created=True)
        finally:
            self._release(command.caller)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise _shutting_down()

    def _validate(self, command: SubmitCommand) -> None:
        settings = self.settings
        if not command.prompt.strip():
            raise InvalidArgument(
                "prompt is empty: send the text to answer", reason="EMPTY_PROMPT", field="prompt"
            )
        if "\x00" in command.prompt:
            raise InvalidArgument(
                "prompt contains a NUL character, which cannot be stored; remove it",
                reason="INVALID_PROMPT",
                field="prompt",
            )
        try:
            size = len(command.prompt.encode())
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                "prompt is not valid Unicode text (it has a lone surrogate); send UTF-8 text",
                reason="INVALID_PROMPT",
                field="prompt",
            ) from exc
        if size > settings.max_prompt_bytes:
            raise InvalidArgument(
                f"prompt is {size} bytes; the limit is {settings.max_prompt_bytes} bytes "
                "(UTF-8): shorten it",
                reason="PROMPT_TOO_LARGE",
                field="prompt",
                metadata={"limit": str(settings.max_prompt_bytes)},
            )
        if not 0 <= command.max_tokens <= settings.max_tokens_limit:
            raise InvalidArgument(
                f"max_tokens is {command.max_tokens}; it must be between 1 and "
                f"{settings.max_tokens_limit}, or 0 for the default "
                f"({settings.default_max_tokens})",
                reason="MAX_TOKENS_OUT_OF_RANGE",
                field="max_tokens",
                metadata={"limit": str(settings.max_tokens_limit)},
            )
        if command.conversation_id:
            ids.check_conversation_id(command.conversation_id)
        if command.request_id:
            ids.check_request_id(command.request_id)

    def _reserve(self, caller: str) -> None:
        """Takes a generation slot, counting submissions still being created."""
        settings = self.settings
        if self._generations.count() + self._reserved_total >= settings.max_generations:
            raise ResourceExhausted(
                f"this server is at its limit of {settings.max_generations} concurrent "
                "generations; retry shortly or on another server",
                reason="TOO_MANY_GENERATIONS",
                metadata={"limit": str(settings.max_generations)},
            )
        mine = self._generations.count(caller) + self._reserved_by[caller]
        if caller and mine >= settings.max_generations_per_caller:
            raise ResourceExhausted(
                f"you are at the limit of {settings.max_generations_per_caller} concurrent "
                "generations per caller; wait for one to finish or cancel one",
                reason="TOO_MANY_GENERATIONS_FOR_CALLER",
                metadata={"limit": str(settings.max_generations_per_caller)},
            )
        self._reserved_total += 1
        self._reserved_by[caller] += 1

    def _release(self, caller: str) -> None:
        self._reserved_total -= 1
        self._reserved_by[caller] -= 1
        if not self._reserved_by[caller]:
            del self._reserved_by[caller]

    # -- cancel --------------------------------------------------------------------------

    async def cancel(self, stream_id: str, user: str | None = None) -> StreamRecord:
        """Stops the stream before its next token; returns its final record.

        Who may is the server's cancel policy (by default the stream's author and the
        conversation's owners).
        """
        ids.check_stream_id(stream_id)
        record = await get_record(self._repository, stream_id)
        if user is not None:
            role = await self._stream_role(record, user)
            policy = self.settings.cancel_policy
            if not policy.allows(role, is_author=record.author == user):
                raise PermissionDenied(
                    f"only {policy.describe()} can cancel stream {stream_id} (this server's "
                    f"cancel policy is {policy.value})",
                    reason=policy.refusal_reason,
                    metadata={"policy": policy.value, "role": role.name},
                )
        live = self._generations.live.get(stream_id)
        if live is None:
            if record.state.is_terminal:
                return record
            return await self._cancel_in_store(record)
        live.request_stop(CANCELLED)
        return await live.wait_ended()

    async def _cancel_in_store(self, record: StreamRecord) -> StreamRecord:
        """Cancels a stream generated elsewhere. Its server hears of it from the store's
        notice (or at its next commit, which the store refuses) and stops generating."""
        stream_id = record.stream_id
        result = await guarded(
            self._repository.commit(WriteBatch(at=_now(), endings=[(stream_id, CANCELLED)]))
        )
        self._changes.publish([stream_id], [record.conversation_id])  # readers here look now
        return result.terminal.get(stream_id) or await get_record(self._repository, stream_id)

    # -- reads ---------------------------------------------------------------------------

    async def get_stream(self, stream_id: str, user: str | None = None) -> StreamRecord:
        ids.check_stream_id(stream_id)
        record = await get_record(self._repository, stream_id)
        await self._stream_role(record, user)
        return record

    async def history(
        self, conversation_id: str, page_size: int, page_token: str, user: str | None = None
    ) -> HistoryPage:
        ids.check_conversation_id(conversation_id)
        limit = self._page_size(page_size)
        await self._require(conversation_id, user, Role.VIEWER)
        after = decode_page_token(page_token, conversation_id)
        try:
            found = await guarded(self._repository.list_turns(conversation_id, after, limit + 1))
        except storage_errors.NotFound as exc:
            raise conversation_not_found(conversation_id) from exc
        turns, head = found.turns, found.head_event_seq
        if len(turns) > limit:
            turns = turns[:limit]
            return HistoryPage(turns, encode_page_token(conversation_id, turns[-1].cursor), head)
        return HistoryPage(turns, "", head)

    async def subscribe(
        self, stream_id: str, from_seq: int, user: str | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        """Validates the request, then returns the subscription's events.

        Errors in the request raise here; a full stream raises at the first event.
        """
        ids.check_stream_id(stream_id)
        if from_seq < 0:
            raise InvalidArgument(
                f"from_seq is {from_seq}; it must be 0 (from the start) or the last end_seq "
                "received plus 1",
                reason="NEGATIVE_FROM_SEQ",
                field="from_seq",
            )
        live = self._generations.in_memory(stream_id)
        # A stream generated here, now or a moment ago, is known without a store read
        # (many subscribe at once).
        record = (
            (live.final or live.record)
            if live is not None
            else await get_record(self._repository, stream_id)
        )
        await self._stream_role(record, user)
        if record.state.is_terminal and from_seq > record.head_seq + 1:
            raise OutOfRange(
                f"from_seq is {from_seq}, past the end of stream {stream_id}: it ended "
                f"{record.state.value} with final_seq {record.head_seq}, so from_seq can be "
                f"at most {record.head_seq + 1}",
                reason="FROM_SEQ_PAST_END",
                field="from_seq",
                metadata={"final_seq": str(record.head_seq)},
            )
        final = record if record.state.is_terminal else None
        return self._counted(stream_id, from_seq, final)

    def subscriber_count(self, stream_id: str) -> int:
        """Open subscriptions of `stream_id` on this server."""
        return self._subscribers[stream_id]

    async def _counted(
        self, stream_id: str, from_seq: int, final: StreamRecord | None
    ) -> AsyncGenerator[StreamEvent, None]:
        limit = self.settings.max_subscribers_per_stream
        if self._subscribers[stream_id] >= limit:
            raise ResourceExhausted(
                f"stream {stream_id} is at its limit of {limit} subscribers on this server; "
                "retry shortly or on another server",
                reason="TOO_MANY_SUBSCRIBERS",
                metadata={"limit": str(limit)},
            )
        self._subscribers[stream_id] += 1
        try:
            subscription = Subscription(
                self._repository,
                self._generations,
                self._changes,
                self.settings,
                stream_id,
                from_seq,
                final,
            )
            async for event in subscription.events():
                yield event
        finally:
            self._subscribers[stream_id] -= 1
            if not self._subscribers[stream_id]:
                del self._subscribers[stream_id]

    # -- conversations and access --------------------------------------------------------

    async def create_conversation(self, user: str | None) -> Conversation:
        self._check_accepting()
        return await guarded(
            self._repository.create_conversation(ids.new_conversation_id(), user, _now())
        )

    async def get_conversation(self, conversation_id: str, user: str | None) -> Conversation:
        ids.check_conversation_id(conversation_id)
        await self._require(conversation_id, user, Role.VIEWER)
        try:
            return await guarded(self._repository.get_conversation(conversation_id))
        except storage_errors.NotFound as exc:
            raise conversation_not_found(conversation_id) from exc

    async def list_conversations(
        self, user: str | None, page_size: int, page_token: str
    ) -> ConversationPage:
        limit = self._page_size(page_size)
        owner = f"user:{user or ''}"
        before = decode_page_token(page_token, owner)
        found = await guarded(self._repository.list_conversations(user, before, limit + 1))
        if len(found) > limit:
            found = found[:limit]
            return ConversationPage(found, encode_page_token(owner, found[-1].cursor))
        return ConversationPage(found, "")

    async def add_member(
        self, conversation_id: str, member: str, role: Role | None, user: str | None
    ) -> Member:
        ids.check_conversation_id(conversation_id)
        ids.check_user_id(member)
        if role is None:
            raise InvalidArgument(
                "role must be OWNER, MEMBER or VIEWER", reason="MISSING_ROLE", field="role"
            )
        await self._require(conversation_id, user, Role.OWNER)
        if role is not Role.OWNER:
            await self._keep_an_owner(conversation_id, member)
        try:
            added = await guarded(
                self._repository.set_member(conversation_id, member, role, _now(), user)
            )
            self._changes.publish(conversations=[conversation_id])
            return added
        except storage_errors.NotFound as exc:
            raise conversation_not_found(conversation_id) from exc

    async def remove_member(self, conversation_id: str, member: str, user: str | None) -> None:
        """Owners remove anyone; anyone may leave. The last owner cannot go."""
        ids.check_conversation_id(conversation_id)
        ids.check_user_id(member)
        await self._require(conversation_id, user, Role.OWNER if member != user else Role.VIEWER)
        await self._keep_an_owner(conversation_id, member)
        removed = await guarded(self._repository.remove_member(conversation_id, member, user))
        self._changes.publish(conversations=[conversation_id])
        if not removed:
            raise NotFound(
                f"{member} is not a member of conversation {conversation_id}",
                reason="MEMBER_NOT_FOUND",
                field="user_id",
            )

    async def _keep_an_owner(self, conversation_id: str, leaving: str) -> None:
        conversation = await guarded(self._repository.get_conversation(conversation_id))
        if conversation.is_last_owner(leaving):
            raise FailedPrecondition(
                f"{leaving} is the last owner of conversation {conversation_id}; make someone "
                "else an owner first",
                reason="LAST_OWNER",
            )

    async def _require(self, conversation_id: str, user: str | None, needed: Role) -> Role:
        """The user's role if it allows `needed`; NOT_FOUND for non-members (ids cannot be
        probed), PERMISSION_DENIED for members whose role is too low. No user: no checks."""
        if user is None:
            return Role.OWNER
        role = await guarded(self._repository.role_of(conversation_id, user))
        if role is None:
            raise conversation_not_found(conversation_id)
        if not role.allows(needed):
            raise PermissionDenied(
                f"your role in conversation {conversation_id} is {role.name.lower()}; this "
                f"needs {needed.name.lower()}",
                reason="ROLE_TOO_LOW",
                metadata={"role": role.name, "needed": needed.name},
            )
        return role

    async def _stream_role(self, record: StreamRecord, user: str | None) -> Role:
        """The user's role in the stream's conversation; a non-member gets the same NOT_FOUND
        as for a stream that does not exist."""
        try:
            return await self._require(record.conversation_id, user, Role.VIEWER)
        except NotFound:
            raise stream_not_found(record.stream_id) from None

    def _page_size(self, page_size: int) -> int:
        settings = self.settings
        if not 0 <= page_size <= settings.max_page_size:
            raise InvalidArgument(
                f"page_size is {page_size}; it must be between 1 and {settings.max_page_size}, "
                f"or 0 for the default ({settings.default_page_size})",
                reason="PAGE_SIZE_OUT_OF_RANGE",
                field="page_size",
            )
        return page_size or settings.default_page_size

    # -- conversation events --------------------------------------------------------------

    async def watch(
        self,
        conversation_id: str,
        from_event_seq: int,
        user: str | None,
        *,
        include_tokens: bool = False,
        from_seq_by_stream: Mapping[str, int] | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Validates the request, then returns the conversation's events from
        `from_event_seq` on (what was missed as one batch, then each commit's events), and
        with `include_tokens` the token chunks of its streams."""
        ids.check_conversation_id(conversation_id)
        if from_event_seq < 0:
            raise InvalidArgument(
                f"from_event_seq is {from_event_seq}; it must be 0 or the last seq received plus 1",
                reason="NEGATIVE_FROM_SEQ",
                field="from_event_seq",
            )
        resume_at = dict(from_seq_by_stream or {})
        for stream_id, seq in resume_at.items():
            ids.check_stream_id(stream_id, field="from_seq_by_stream")
            if seq < 0:
                raise InvalidArgument(
                    f"from_seq_by_stream[{stream_id}] is {seq}; it must be 0 or the last "
                    "end_seq received plus 1",
                    reason="NEGATIVE_FROM_SEQ",
                    field="from_seq_by_stream",
                )
        await self._require(conversation_id, user, Role.VIEWER)
        if not await guarded(self._repository.conversation_exists(conversation_id)):
            raise conversation_not_found(conversation_id)  # now, not at the first read
        watch = ConversationWatch(
            self._repository,
            self._generations,
            self.settings,
            conversation_id,
            from_event_seq,
            include_tokens=include_tokens,
            from_seq_by_stream=resume_at,
            changes=self._changes,
            check_access=lambda: self._require(conversation_id, user, Role.VIEWER),
        )
        return watch.events()

    # -- other servers' writes ------------------------------------------------------------

    def _on_store_change(self, change: StoreChange | None) -> None:
        """Another process wrote to the store (None: it may have, unseen): readers look."""
        if change is None:
            self._changes.publish_everything()
            return
        self._changes.publish(change.streams, change.conversations)
        for stream_id in change.ended:
            live = self._generations.live.get(stream_id)
            if live is not None:
                # Ended through the store (a cancel on another server): stop generating now
                # rather than at the next commit, which the store would refuse anyway.
                live.request_stop(ENDED_ELSEWHERE)

    # -- retention -----------------------------------------------------------------------

    async def purge(self, older_than: timedelta) -> PurgeResult:
        """Deletes streams that ended more than `older_than` ago (and emptied conversations)."""
        result = await guarded(self._repository.purge_finished(_now() - older_than))
        if result.streams:
            self._recent.clear()  # none of them may be served from memory
        if result.streams or result.conversations:
            log.info(
                "purged %d stream(s) and %d conversation(s) older than %s",
                result.streams,
                result.conversations,
                older_than,
            )
        return result

    async def _retain(self) -> None:
        assert self.settings.retention_days is not None
        older_than = timedelta(days=self.settings.retention_days)
        while True:
            try:
                await self.purge(older_than)
            except Exception:
                log.warning("retention purge failed; retrying later", exc_info=True)
            await asyncio.sleep(self.settings.retention_interval)


_UNSTARTED = Ending(
    StreamState.FAILED,
    EndReason.SHUTDOWN,
    "the server shut down before this stream started; submit it again",
    forget_request=True,
)


def _shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down and accepts no new prompts; retry on another server "
        "or after the restart",
        reason="SHUTTING_DOWN",
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
