"""`echo`: streams the prompt back word by word; the concatenated answer equals the prompt."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from tokenstream.server.models.base import GenerationRequest, Pacer

# Each token is one word with the whitespace before it; trailing whitespace is a last token.
_TOKEN = re.compile(r"\s*\S+|\s+$")


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text)


class EchoSource:
    def __init__(self, tokens_per_second: float = 0.0) -> None:
        self._rate = tokens_per_second

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        pacer = Pacer(self._rate)
        for index, token in enumerate(split_words(request.prompt)):
            await pacer.wait(index)
            yield token
