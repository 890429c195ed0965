"""Leases: a generating server keeps renewing its claim on its streams in the store.

If the server dies, the claims run out and any server sweeping the store ends those
streams FAILED `interrupted` at their last durable token, so nobody waits on them forever.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tokenstream.server.domain import Ending, EndReason, StreamState
from tokenstream.server.storage.repository import StreamRepository

log = logging.getLogger(__name__)

INTERRUPTED = Ending(
    StreamState.FAILED,
    EndReason.INTERRUPTED,
    "the server generating this stream stopped; the tokens stored before that are kept",
)


class LeaseKeeper:
    def __init__(
        self,
        repository: StreamRepository,
        ttl: float,
        generating: Callable[[], list[str]],
        on_ended: Callable[[list[str]], None] = lambda _ids: None,
    ) -> None:
        self._repository = repository
        self._generating = generating  # ids of the streams this server is generating
        self._on_ended = on_ended  # told which streams a sweep ended
        self.ttl = ttl
        # Names this server process in the store (a new one every start).
        self.owner_id = f"srv_{uuid.uuid4().hex}"
        self._task: asyncio.Task[None] | None = None

    def expires_at(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.ttl)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tokenstream-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> list[str]:
        """Ends the active streams whose lease ran out; returns their ids."""
        ended = await self._repository.end_expired_leases(datetime.now(UTC), INTERRUPTED)
        if ended:
            log.warning("ended %d stream(s) whose server stopped renewing them", len(ended))
            self._on_ended(ended)
        return ended

    async def _run(self) -> None:
        # Renew three times per TTL, so two lost renewals in a row still keep the claim.
        period = self.ttl / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self._repository.renew_leases(
                    self.owner_id, self._generating(), self.expires_at()
                )
                await self.sweep()
            except Exception:
                log.warning("lease renewal or sweep failed; retrying", exc_info=True)
