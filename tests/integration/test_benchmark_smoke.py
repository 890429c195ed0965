"""The benchmark scripts still run (tiny sizes; figures are not judged here)."""

from __future__ import annotations

import pytest

from benchmarks.generation_pace import main


async def test_generation_pace_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    await main(streams=3, tokens=10, rate=500.0)
    out = capsys.readouterr().out
    assert "memory (baseline)" in out
    assert "sqlite / baseline generation time: x" in out
