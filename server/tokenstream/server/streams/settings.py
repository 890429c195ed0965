"""Tunables of the stream engine."""

from __future__ import annotations

from dataclasses import dataclass

from tokenstream.server.domain import CancelPolicy


@dataclass(frozen=True, slots=True)
class EngineSettings:
    # A quiet subscription gets a heartbeat this often (seconds).
    heartbeat_interval: float = 10.0
    # Minimum spacing of group commits (seconds). A commit starts as soon as the previous one
    # returned and this much time has passed, so batches grow with load, not latency.
    flush_interval: float = 0.005
    # Most tokens written by one commit; more waits for the next one (keeps commits short).
    max_batch_tokens: int = 10_000
    # Most streams ended by one commit; later endings wait for the next one (their tokens
    # do not). Ending a stream compacts and deletes its runs: ~0.1-0.25 ms of commit each,
    # and a hundred streams ending at once would hold up every other stream's tokens.
    max_batch_endings: int = 16
    # Generators wait when this many tokens are waiting for a commit (the store is behind).
    max_pending_tokens: int = 50_000
    # Upper bound on the text of one chunk sent to a subscriber (characters).
    max_chunk_chars: int = 256 * 1024
    # Tokens generated when a request leaves max_tokens at 0, and the most it may ask for.
    default_max_tokens: int = 256
    max_tokens_limit: int = 32_768
    # Largest prompt accepted (UTF-8 bytes).
    max_prompt_bytes: int = 64 * 1024
    # A reader of a stream or conversation changed by another process is woken by the store's
    # notice (PostgreSQL); it also re-reads this often (seconds) in case a notice was lost,
    # and stores that send none rely on it alone.
    store_poll_interval: float = 1.0
    # History page size when the request leaves it at 0, and the largest allowed.
    default_page_size: int = 50
    max_page_size: int = 1000
    # A generation whose model produces no token for this long ends FAILED `timeout`
    # (seconds; 0 disables the check).
    stall_timeout: float = 60.0
    # Durable tokens kept in memory per running stream for live subscribers (between this
    # and twice this many); a subscriber further behind reads from the store.
    live_tail_tokens: int = 8192
    # A stream that ended here, with every token still in memory (its live tail), stays
    # there this long (seconds) for subscribers that arrive just after its end, within
    # about this much memory for all of them (0 of either: none is kept). A purge by
    # another process is not seen here: such a stream may be served for that long still.
    recent_ended_seconds: float = 10.0
    recent_ended_bytes: int = 32 * 1024 * 1024
    # Capacity limits (RESOURCE_EXHAUSTED when reached): concurrent generations on this
    # server and per caller, and subscribers of one stream on this server.
    max_generations: int = 1000
    max_generations_per_caller: int = 100
    max_subscribers_per_stream: int = 1000
    # A generating server renews its claim on its streams three times per TTL; a claim not
    # renewed for this long (seconds) marks a dead server, and its streams end `interrupted`.
    lease_ttl: float = 15.0
    # Finished streams older than this many days are purged in the background (None: never).
    retention_days: float | None = None
    retention_interval: float = 3600.0
    # Who may cancel a stream (with authentication on).
    cancel_policy: CancelPolicy = CancelPolicy.AUTHOR_OR_OWNER
