"""Runs the cases against each target, prints tables with ratios to the baseline, writes JSON."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import grpc

from tokenstream.bench import load
from tokenstream.bench.cases import Case
from tokenstream.bench.servers import BASELINE, ServerUnderTest, Target
from tokenstream.server.event_loop import DEFAULT_EVENT_LOOP

MIB = 1024 * 1024


@dataclass(slots=True)
class Result:
    case: str
    label: str
    kind: str
    target: str
    figures: dict[str, float]


async def run_case(
    case: Case, target: Target, folder: Path, repeats: int = 3, event_loop: str = DEFAULT_EVENT_LOOP
) -> Result:
    """One server process for the case: a small warm-up run, then `repeats` measured runs
    of a live case (1 of the others); the run with the median headline figure is kept."""
    if target.name == "sqlite":  # a fresh file per case
        target = Target("sqlite", f"sqlite+aiosqlite:///{folder / case.name}.db")
    log = folder / f"{case.name}-{target.name}.log"
    server = ServerUnderTest(target, case, log, event_loop)
    try:
        try:
            await server.ready()
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log.read_text(errors='replace')[-3000:]}") from None
        if case.kind == "live":
            await load.live(server.address, case.warmup())
        runs = [await _measured(case, server) for _ in range(repeats if case.kind == "live" else 1)]
        headline, _ = _HEADLINE[case.kind]
        figures = sorted(runs, key=lambda f: f[headline])[len(runs) // 2]
        figures["runs"] = len(runs)
        figures["peak_rss_mib"] = server.peak_rss / MIB
        return Result(case.name, case.label, case.kind, target.name, figures)
    finally:
        await server.stop()


async def _measured(case: Case, server: ServerUnderTest) -> dict[str, float]:
    """One run's figures, with the CPU both sides used meanwhile."""
    cpu, client_cpu = server.cpu_seconds(), time.process_time()
    started = time.monotonic()
    figures = await _measure(case, server)
    wall = time.monotonic() - started
    server_cpu = server.cpu_seconds() - cpu
    figures["server_cpu_pct"] = 100 * server_cpu / wall
    figures["client_cpu_pct"] = 100 * (time.process_time() - client_cpu) / wall
    if figures.get("tokens"):
        figures["server_us_per_token"] = 1e6 * server_cpu / figures["tokens"]
    return figures


async def _measure(case: Case, server: ServerUnderTest) -> dict[str, float]:
    if case.kind == "live":
        delivery = await load.live(server.address, case)
        expected = case.streams * case.tokens * case.subscribers
        if delivery.tokens != expected:
            raise RuntimeError(f"{case.name}: received {delivery.tokens} of {expected} tokens")
        half = len(delivery.latencies_ns) // 2
        late = load.Delivery(latencies_ns=delivery.latencies_ns[half:])
        return {
            "tokens": delivery.tokens,
            "chunks": delivery.chunks,
            "tokens_per_chunk": delivery.tokens / max(delivery.chunks, 1),
            "seconds": delivery.seconds,
            "tokens_per_s": delivery.tokens_per_second,
            "p50_ms": delivery.latency_ms(0.5),
            "p99_ms": delivery.latency_ms(0.99),
            # Backlog growth shows as a later half slower than the whole.
            "p99_late_half_ms": late.latency_ms(0.99),
        }
    if case.kind == "resume":
        figures: dict[str, float] = {}
        for name, delivery in (await load.resume(server.address, case)).items():
            key = name.replace(" ", "_")
            figures[f"first_chunk_ms_{key}"] = 1000 * load.median(delivery.first_chunk_s)
            figures[f"catchup_tokens_per_s_{key}"] = delivery.tokens_per_second
        return figures
    before = server.rss()
    delivery, tasks, open_load = await load.idle(server.address, case)
    try:
        await asyncio.sleep(case.hold)
        after = server.rss()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await open_load.close()
    return {
        "subscriptions": case.subscribers,
        "heartbeats": delivery.heartbeats,
        "rss_mib": after / MIB,
        "kib_per_subscription": (after - before) / 1024 / case.subscribers,
    }


# The headline figure of each kind, and whether more is better.
_HEADLINE: dict[str, tuple[str, bool]] = {
    "live": ("tokens_per_s", True),
    "resume": ("catchup_tokens_per_s_from_0", True),
    "idle": ("kib_per_subscription", False),
}

_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "live": [
        ("tokens_per_s", "tok/s", "{:,.0f}"),
        ("p50_ms", "p50 ms", "{:.1f}"),
        ("p99_ms", "p99 ms", "{:.1f}"),
        ("p99_late_half_ms", "p99 2nd half", "{:.1f}"),
        ("tokens_per_chunk", "tok/msg", "{:.0f}"),
        ("server_us_per_token", "srv us/tok", "{:.2f}"),
        ("server_cpu_pct", "srv CPU%", "{:.0f}"),
        ("client_cpu_pct", "cli CPU%", "{:.0f}"),
        ("peak_rss_mib", "srv RSS MiB", "{:.0f}"),
    ],
    "resume": [
        ("first_chunk_ms_from_0", "1st chunk ms", "{:.2f}"),
        ("catchup_tokens_per_s_from_0", "catch-up tok/s", "{:,.0f}"),
        ("first_chunk_ms_from_middle", "1st ms (middle)", "{:.2f}"),
        ("catchup_tokens_per_s_from_middle", "tok/s (middle)", "{:,.0f}"),
    ],
    "idle": [
        ("heartbeats", "heartbeats", "{:,.0f}"),
        ("rss_mib", "srv RSS MiB", "{:.0f}"),
        ("kib_per_subscription", "KiB/sub", "{:.1f}"),
    ],
}


def report(results: Sequence[Result], out: TextIO) -> None:
    """One table per case: a row per target, with its headline figure's ratio to the baseline."""
    for case in dict.fromkeys(r.case for r in results):
        rows = [r for r in results if r.case == case]
        kind = rows[0].kind
        headline, _ = _HEADLINE[kind]
        base = next((r.figures[headline] for r in rows if r.target == BASELINE), None)
        columns = _COLUMNS[kind]
        header = ["target", *(title for _, title, _ in columns), "x baseline"]
        lines = [header]
        for row in rows:
            cells = [row.target]
            cells += [fmt.format(row.figures.get(key, float("nan"))) for key, _, fmt in columns]
            ratio = row.figures[headline] / base if base else float("nan")
            cells.append(f"{ratio:.2f}")
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        print(f"\n{case}: {rows[0].label}", file=out)
        for line in lines:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)), file=out)


def machine(event_loop: str = DEFAULT_EVENT_LOOP) -> dict[str, str | int]:
    return {
        "cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "event_loop": event_loop,
        "platform": platform.platform(),
    }


async def run(
    cases: Sequence[Case],
    targets: Sequence[Target],
    progress: Callable[[str], None] = lambda _line: None,
    event_loop: str = DEFAULT_EVENT_LOOP,
) -> list[Result]:
    """Every case on every target, one fresh server process each (all on `event_loop`)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenstream-bench-") as folder:
        for case in cases:
            for target in targets:
                progress(f"{case.name} on {target.name}")
                result = await run_case(case, target, Path(folder), event_loop=event_loop)
                results.append(result)
    return results


def publish(
    results: Sequence[Result],
    out: TextIO = sys.stdout,
    json_path: Path | None = None,
    event_loop: str = DEFAULT_EVENT_LOOP,
) -> None:
    """Prints the machine and the tables; writes every figure as JSON if asked."""
    print(f"\nmachine: {machine(event_loop)}", file=out)
    report(results, out)
    if json_path is not None:
        document = {"machine": machine(event_loop), "results": [asdict(r) for r in results]}
        json_path.write_text(json.dumps(document, indent=2) + "\n")
