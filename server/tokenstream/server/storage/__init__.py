"""Storage of conversations, streams and their tokens behind a small repository interface."""

from tokenstream.server.storage.errors import AlreadyExists, NotFound, StorageError
from tokenstream.server.storage.repository import NewStream, StreamRepository, WriteBatch

__all__ = [
    "AlreadyExists",
    "NewStream",
    "NotFound",
    "StorageError",
    "StreamRepository",
    "WriteBatch",
]
