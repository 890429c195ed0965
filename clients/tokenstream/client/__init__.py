"""Python client for tokenstream: submit prompts and read streams that resume by themselves."""

from tokenstream.client._client import (
    CancelResult,
    Chunk,
    StreamEnd,
    StreamInfo,
    Submitted,
    TokenStreamClient,
    Turn,
)
from tokenstream.client._errors import TokenStreamClientError

__all__ = [
    "CancelResult",
    "Chunk",
    "StreamEnd",
    "StreamInfo",
    "Submitted",
    "TokenStreamClient",
    "TokenStreamClientError",
    "Turn",
]
