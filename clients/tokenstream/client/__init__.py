"""Python client for tokenstream.

`TokenStreamClient` (async) and `TokenStreamSyncClient` (blocking): submit prompts with
safe retries, and read streams that resume by themselves, on the same server or a replica,
so every token arrives exactly once and in order.
"""

from tokenstream.client._client import TERMINAL_REASONS, TokenStreamClient
from tokenstream.client._endpoints import ConnectionOptions
from tokenstream.client._errors import RetriesExhausted, TokenStreamClientError
from tokenstream.client._retry import RETRYABLE_CODES, TERMINAL_CODES, RetryPolicy
from tokenstream.client._sync import TokenStreamSyncClient
from tokenstream.client._types import (
    CancelResult,
    Chunk,
    Conversation,
    Member,
    Reconnect,
    StreamEnd,
    StreamInfo,
    Submitted,
    Turn,
)

__all__ = [
    "RETRYABLE_CODES",
    "TERMINAL_CODES",
    "TERMINAL_REASONS",
    "CancelResult",
    "Chunk",
    "ConnectionOptions",
    "Conversation",
    "Member",
    "Reconnect",
    "RetriesExhausted",
    "RetryPolicy",
    "StreamEnd",
    "StreamInfo",
    "Submitted",
    "TokenStreamClient",
    "TokenStreamClientError",
    "TokenStreamSyncClient",
    "Turn",
]
