"""`tokenstream bench` as users run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import run_tokenstream

pytestmark = pytest.mark.slow


async def test_bench_runs_a_chosen_case_and_writes_json(tmp_path: Path) -> None:
    out_file = tmp_path / "figures.json"
    code, out, err = await run_tokenstream(
        "bench", "--smoke", "--case", "resume-200", "--json", str(out_file)
    )
    assert code == 0, err
    assert "running resume-200 on baseline" in err
    assert "resume-200: resume a finished 200-token stream" in out
    saved = json.loads(out_file.read_text())
    assert {r["target"] for r in saved["results"]} == {"baseline", "sqlite"}


async def test_an_unknown_case_is_refused_with_the_choices() -> None:
    code, _, err = await run_tokenstream("bench", "--case", "nope")
    assert code == 2
    assert "unknown case(s) ['nope']" in err
    assert "max-100x1000" in err
