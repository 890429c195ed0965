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
    ConversationEvent,
    Member,
    Reconnect,
    StreamEnd,
    StreamInfo,
    StreamTokens,
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
    "ConversationEvent",
    "Member",
    "Reconnect",
    "RetriesExhausted",
    "RetryPolicy",
    "StreamEnd",
    "StreamInfo",
    "StreamTokens",
    "Submitted",
    "TokenStreamClient",
    "TokenStreamClientError",
    "TokenStreamSyncClient",
    "Turn",
]
