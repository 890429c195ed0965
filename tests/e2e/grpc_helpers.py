"""Reading subscriptions and error details over a real gRPC channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from google.rpc import error_details_pb2, status_pb2

from tokenstream.v1 import tokenstream_pb2 as pb

if TYPE_CHECKING:
    from tokenstream.v1.tokenstream_pb2_grpc import TokenStreamServiceAsyncStub


@dataclass
class Received:
    chunks: list[pb.TokenChunk] = field(default_factory=list)
    heartbeats: list[pb.Heartbeat] = field(default_factory=list)
    end: pb.StreamEnd | None = None

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    def assert_contiguous(self, first: int = 0) -> None:
        seq = first
        for chunk in self.chunks:
            assert chunk.start_seq == seq, f"gap or duplicate at {seq}: {chunk}"
            assert chunk.end_seq >= chunk.start_seq
            seq = chunk.end_seq + 1


async def read_all(
    stub: TokenStreamServiceAsyncStub,
    stream_id: str,
    from_seq: int = 0,
    *,
    stop_after_seq: int | None = None,
) -> Received:
    """Reads a subscription to its end (or until a chunk reaches `stop_after_seq`)."""
    received = Received()
    call = stub.Subscribe(pb.SubscribeRequest(stream_id=stream_id, from_seq=from_seq))
    async for message in call:
        kind = message.WhichOneof("event")
        if kind == "chunk":
            received.chunks.append(message.chunk)
            if stop_after_seq is not None and message.chunk.end_seq >= stop_after_seq:
                call.cancel()  # the client drops the connection
                break
        elif kind == "heartbeat":
            received.heartbeats.append(message.heartbeat)
        else:
            received.end = message.end
    return received


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (fails the test when there is none)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0]
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {error!r}")
