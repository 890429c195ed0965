"""Which failures are worth retrying, and how long to wait between attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

# Re-sending the same request can succeed after these: the server (or the path to it) was
# down, overloaded, or too slow; another replica may do better. For Subscribe the client
# adds its own: no message and no heartbeat within the heartbeat timeout.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

# RESOURCE_EXHAUSTED is retried only for these server reasons (capacity that frees up); a
# message too large for the channel, say, fails the same way every time.
RETRYABLE_EXHAUSTION_REASONS = frozenset({"TOO_MANY_GENERATIONS", "TOO_MANY_SUBSCRIBERS"})

# The same request will fail the same way: report it.
TERMINAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped, within a budget of attempts.

    The budget counts consecutive failures without progress: a stream that delivered
    tokens since its last failure starts again from one.
    """

    max_attempts: int = 12  # with the defaults, about 25 s of trying
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based): in [cap / 2, cap]."""
        exponent = min(attempt - 1, 64)  # the cap is reached long before; avoids overflow
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)
        return cap / 2 + random.uniform(0, cap / 2)  # jitter, not cryptography
