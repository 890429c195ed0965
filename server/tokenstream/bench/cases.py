"""The workloads: W(S, T, K) at full speed or paced like a model, resume, and idle scale."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["live", "resume", "idle"]


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    kind: Kind
    streams: int = 1  # S (idle: streams the subscriptions are spread over)
    tokens: int = 100  # T per stream
    subscribers: int = 1  # K per stream (idle: in all)
    rate: float = 0.0  # tokens/s of each stream; 0 = as fast as the source may
    heartbeat_interval: float = 10.0
    hold: float = 0.0  # idle: seconds the subscriptions stay open

    def warmup(self) -> Case:
        """The same shape, small: run first so start-up costs (SQL statement compilation,
        first connections) are not charged to the measured run."""
        return replace(self, streams=min(self.streams, 10), tokens=min(self.tokens, 100))

    @property
    def label(self) -> str:
        if self.kind == "resume":
            return f"resume a finished {self.tokens}-token stream"
        if self.kind == "idle":
            return f"{self.subscribers} idle subscriptions"
        pace = "max rate" if not self.rate else f"{self.rate:g} tok/s each"
        return f"S={self.streams} T={self.tokens} K={self.subscribers}, {pace}"


FULL = [
    Case("max-1x20000", "live", streams=1, tokens=20_000),
    Case("max-100x1000", "live", streams=100, tokens=1000),
    Case("max-100x1000-k3", "live", streams=100, tokens=1000, subscribers=3),
    Case("max-1000x100", "live", streams=1000, tokens=100),
    Case("paced-100x50", "live", streams=100, tokens=250, rate=50.0),
    Case("paced-1000x20", "live", streams=1000, tokens=100, rate=20.0),
    Case("resume-20000", "resume", tokens=20_000),
    Case(
        "idle-10000",
        "idle",
        streams=100,
        subscribers=10_000,
        rate=0.001,
        heartbeat_interval=2.0,
        hold=5.0,
    ),
]

# The same shapes, tiny: `make test` runs them so the bench cannot rot.
SMOKE = [
    Case("max-2x50", "live", streams=2, tokens=50, subscribers=2),
    Case("paced-3x200", "live", streams=3, tokens=20, rate=200.0),
    Case("resume-200", "resume", tokens=200),
    Case(
        "idle-20", "idle", streams=2, subscribers=20, rate=0.001, heartbeat_interval=0.2, hold=0.5
    ),
]
