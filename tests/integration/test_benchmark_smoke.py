"""The benchmarks still run (tiny sizes; figures are not judged here)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from benchmarks.generation_pace import main
from tokenstream.bench.cases import SMOKE
from tokenstream.bench.run import publish, run
from tokenstream.bench.servers import BASELINE, Target

pytestmark = pytest.mark.slow


async def test_generation_pace_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    await main(streams=3, tokens=10, rate=500.0)
    out = capsys.readouterr().out
    assert "memory (baseline)" in out
    assert "sqlite / baseline generation time: x" in out


@pytest.mark.timeout(180)
async def test_delivery_benchmark_runs_every_case_on_every_target(
    postgres_url: str, tmp_path: Path
) -> None:
    targets = [Target(BASELINE), Target("sqlite"), Target("postgresql", postgres_url)]
    results = await run(SMOKE, targets)
    assert [(r.case, r.target) for r in results] == [
        (case.name, target.name) for case in SMOKE for target in targets
    ]
    for result in results:
        figures = result.figures
        assert figures["peak_rss_mib"] > 10  # a real process was measured
        if result.kind == "live":
            assert figures["tokens_per_s"] > 0
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
        elif result.kind == "resume":
            assert figures["catchup_tokens_per_s_from_0"] > 0
        else:
            # Quiet streams: the subscriptions stayed open and got heartbeats.
            assert figures["heartbeats"] >= figures["subscriptions"]
    out = io.StringIO()
    publish(results, out, tmp_path / "bench.json")
    text = out.getvalue()
    assert "x baseline" in text
    assert all(case.name in text for case in SMOKE)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["results"]) == len(results)
    assert saved["machine"]["cpus"] >= 1
