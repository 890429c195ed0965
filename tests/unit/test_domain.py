"""Token runs: slicing at any seq returns exactly the original tokens."""

from __future__ import annotations

import pytest

from tokenstream.server.domain import TokenRun, decode_ends, join_runs
from tokenstream.server.models.echo import split_words

TOKENS = ["Hello", ",", " wörld", "", " 🚀", " a" * 3, "\n", "end"]


@pytest.mark.parametrize("max_chars", [1, 3, 7, 1000])
def test_chunks_from_every_seq_equal_the_tokens(max_chars: int) -> None:
    run = TokenRun.from_tokens(10, TOKENS)
    for k in range(10, 10 + len(TOKENS) + 1):
        chunks = list(run.chunks(k, max_chars))
        assert "".join(c.text for c in chunks) == "".join(TOKENS[k - 10 :])
        seq = k
        for chunk in chunks:  # contiguous, in order, each within the size bound or one token
            assert chunk.start_seq == seq
            assert chunk.text == "".join(TOKENS[chunk.start_seq - 10 : chunk.end_seq - 9])
            assert len(chunk.text) <= max_chars or chunk.start_seq == chunk.end_seq
            seq = chunk.end_seq + 1


def test_join_runs_compacts_consecutive_runs() -> None:
    runs = [TokenRun.from_tokens(0, TOKENS[:3]), TokenRun.from_tokens(3, TOKENS[3:])]
    full = join_runs(runs)
    assert full.text == "".join(TOKENS)
    assert full.end_seq == len(TOKENS) - 1
    assert list(full.ends) == list(TokenRun.from_tokens(0, TOKENS).ends)


def test_ends_round_trip_through_bytes() -> None:
    run = TokenRun.from_tokens(0, TOKENS)
    assert list(decode_ends(run.encode_ends())) == list(run.ends)


def test_empty_run_has_no_tokens() -> None:
    empty = join_runs([])
    assert empty.end_seq == -1
    assert list(empty.chunks(0, 10)) == []


@pytest.mark.parametrize("prompt", ["one two  three", "  lead", "trail  ", "x", "a\n\tb"])
def test_echo_tokens_concatenate_to_the_prompt(prompt: str) -> None:
    assert "".join(split_words(prompt)) == prompt
