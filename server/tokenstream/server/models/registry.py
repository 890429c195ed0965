"""Named token sources and the default one."""

from __future__ import annotations

from collections.abc import Mapping

from tokenstream.server.errors import InvalidArgument
from tokenstream.server.models.base import TokenSource
from tokenstream.server.models.clock import ClockSource
from tokenstream.server.models.echo import EchoSource
from tokenstream.server.models.synthetic import SyntheticSource


class ModelRegistry:
    def __init__(self, sources: Mapping[str, TokenSource], default: str) -> None:
        if default not in sources:
            raise ValueError(f"default model {default!r} is not one of {sorted(sources)}")
        self._sources = dict(sources)
        self.default = default

    @property
    def names(self) -> list[str]:
        return sorted(self._sources)

    def resolve(self, name: str) -> tuple[str, TokenSource]:
        """The source for `name` ('' means the default); InvalidArgument lists the choices."""
        chosen = name or self.default
        source = self._sources.get(chosen)
        if source is None:
            raise InvalidArgument(
                f"unknown model {name!r}; available models: {', '.join(self.names)} "
                f"(empty selects the default, {self.default!r})",
                reason="UNKNOWN_MODEL",
                field="model",
                metadata={"available_models": ",".join(self.names)},
            )
        return chosen, source


def builtin_registry(tokens_per_second: float, default: str = "synthetic") -> ModelRegistry:
    return ModelRegistry(
        {
            "clock": ClockSource(tokens_per_second),
            "echo": EchoSource(tokens_per_second),
            "synthetic": SyntheticSource(tokens_per_second),
        },
        default,
    )
