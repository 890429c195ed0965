"""Channels to one or more servers (replicas), and which one is in use."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from tokenstream.v1 import tokenstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """How to reach the servers.

    `tls` turns on TLS (with the system's roots unless `root_certificates` is given);
    `client_certificate` and `client_key` (PEM) add mutual TLS. `bearer_token` is sent as
    `authorization: Bearer ...` on every call. Keepalive pings notice a dead connection
    even while a stream is quiet.
    """

    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    bearer_token: str | None = None
    keepalive_time: float = 20.0
    keepalive_timeout: float = 10.0
    # gRPC's own reconnection backoff (default up to 120 s) would keep failing calls with
    # a cached error after a restarted server is back; keep it short.
    max_reconnect_backoff: float = 1.0

    def channel_options(self) -> list[tuple[str, int]]:
        reconnect_ms = int(self.max_reconnect_backoff * 1000)
        return [
            ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, reconnect_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_ms),
            # History pages and chunks can be large; the default 4 MB is not a useful limit.
            ("grpc.max_receive_message_length", -1),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            # gRPC 1.85 only drops the connection on an unanswered ping with this set too.
            ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.bearer_token:
            return (("authorization", f"Bearer {self.bearer_token}"),)
        return ()


class Endpoints:
    """The servers to use, a channel per server (opened on first use), and the one that
    worked last. Each call keeps its own position, so one call's failover does not move
    another's."""

    def __init__(self, targets: Sequence[str], options: ConnectionOptions) -> None:
        if not targets:
            raise ValueError("give at least one server address (host:port)")
        self.targets = list(targets)
        self._options = options
        self.preferred = 0  # index of the server that answered last
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def target(self) -> str:
        return self.targets[self.preferred]

    def stub(self, index: int) -> TokenStreamServiceAsyncStub:
        target = self.targets[index]
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = self._open(target)
        return pb_grpc.TokenStreamServiceStub(channel)

    def after(self, index: int) -> int:
        """The server to try after `index` failed."""
        return (index + 1) % len(self.targets)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    def _open(self, target: str) -> grpc.aio.Channel:
        options = self._options.channel_options()
        if not self._options.tls:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._options.root_certificates,
            private_key=self._options.client_key,
            certificate_chain=self._options.client_certificate,
        )
        return grpc.aio.secure_channel(target, credentials, options=options)
