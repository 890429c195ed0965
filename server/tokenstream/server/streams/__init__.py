"""The stream engine: sequencing, group commit, fan-out, rollup, cancel, compaction."""

from tokenstream.server.streams.engine import HistoryPage, StreamEngine, Submission, SubmitCommand
from tokenstream.server.streams.events import End, Heartbeat, StreamEvent
from tokenstream.server.streams.settings import EngineSettings

__all__ = [
    "End",
    "EngineSettings",
    "Heartbeat",
    "HistoryPage",
    "StreamEngine",
    "StreamEvent",
    "Submission",
    "SubmitCommand",
]
