"""`synthetic`: exactly `max_tokens` tokens of deterministic text at a configured pace."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

from tokenstream.server.models.base import GenerationRequest, Pacer

_WORDS = (
    "stream",
    "token",
    "model",
    "answer",
    "river",
    "signal",
    "packet",
    "window",
    "buffer",
    "commit",
    "replica",
    "sequence",
    "cursor",
    "resume",
    "heartbeat",
    "chunk",
    "rollup",
    "ledger",
    "quorum",
    "lease",
    "shard",
    "fanout",
    "latency",
    "socket",
    "frame",
    "header",
    "trailer",
    "deadline",
    "retry",
    "backoff",
    "jitter",
    "journal",
    "segment",
    "offset",
    "compact",
    "archive",
    "ocean",
    "forest",
    "lantern",
    "harbor",
    "meadow",
    "summit",
    "canyon",
    "glacier",
    "comet",
    "orbit",
    "prism",
    "vector",
    "matrix",
    "kernel",
    "thread",
    "fiber",
    "channel",
    "beacon",
    "anchor",
)


def synthetic_tokens(prompt: str, count: int) -> list[str]:
    """The text `synthetic` produces: the same prompt and count always give the same tokens."""
    rng = random.Random(f"tokenstream:{prompt}")
    return [" " + rng.choice(_WORDS) for _ in range(count)]


class SyntheticSource:
    def __init__(self, tokens_per_second: float = 50.0) -> None:
        self._rate = tokens_per_second

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        rng = random.Random(f"tokenstream:{request.prompt}")
        pacer = Pacer(self._rate)
        for index in range(request.max_tokens):
            await pacer.wait(index)
            yield " " + rng.choice(_WORDS)
