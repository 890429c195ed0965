"""The event loop the server runs on: uvloop by default, the standard one on request.

uvloop (libuv) runs the same asyncio code with less overhead per callback and per socket
event; on the delivery benchmark it saves several percent of server CPU per token. The
standard loop stays available for platforms without uvloop and for comparison.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP = EVENT_LOOPS[0]


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"unknown event loop {name!r}; choose from {', '.join(EVENT_LOOPS)}")


def run(main: Coroutine[Any, Any, T], loop: str = DEFAULT_EVENT_LOOP) -> T:
    """Runs `main` to completion on a new event loop of the named kind."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
