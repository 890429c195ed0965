"""Storage of conversations, streams and their tokens behind a small repository interface."""

from tokenstream.server.storage.errors import AlreadyExists, NotFound, StorageError
from tokenstream.server.storage.repository import (
    CommitResult,
    NewStream,
    StreamRepository,
    WriteBatch,
)

__all__ = [
    "AlreadyExists",
    "CommitResult",
    "NewStream",
    "NotFound",
    "StorageError",
    "StreamRepository",
    "WriteBatch",
]
