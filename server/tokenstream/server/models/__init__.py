"""Token sources: where a generation's tokens come from."""

from tokenstream.server.models.base import GenerationRequest, TokenSource
from tokenstream.server.models.echo import EchoSource
from tokenstream.server.models.registry import ModelRegistry, builtin_registry
from tokenstream.server.models.synthetic import SyntheticSource

__all__ = [
    "EchoSource",
    "GenerationRequest",
    "ModelRegistry",
    "SyntheticSource",
    "TokenSource",
    "builtin_registry",
]
