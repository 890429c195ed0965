"""Options shared by the client commands, and the client they configure."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from tokenstream.cli._output import Output
from tokenstream.client import (
    ConnectionOptions,
    Reconnect,
    TokenStreamClient,
    TokenStreamClientError,
)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    targets: list[str]
    json: bool
    token: str | None
    tls: bool
    ca_file: Path | None
    timeout: float
    heartbeat_timeout: float

    def client(self, output: Output) -> TokenStreamClient:
        options = ConnectionOptions(
            tls=self.tls or self.ca_file is not None,
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            bearer_token=self.token,
        )

        def notice(reconnect: Reconnect) -> None:
            output.reconnect(reconnect)

        return TokenStreamClient(
            self.targets,
            options=options,
            timeout=self.timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            on_reconnect=notice,
        )


def client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --target/--json/--token/--tls/... and passes them as `settings`."""
    options = [
        click.option(
            "--target",
            "targets",
            envvar="TOKENSTREAM_TARGET",
            multiple=True,
            default=["127.0.0.1:50051"],
            show_default=True,
            help="Server address host:port; repeat (or comma-separate) for replicas. "
            "Env: TOKENSTREAM_TARGET.",
        ),
        click.option("--json", "as_json", is_flag=True, help="JSON output for scripts."),
        click.option("--token", envvar="TOKENSTREAM_TOKEN", default=None, help="Bearer token."),
        click.option("--tls", is_flag=True, help="Use TLS (system root certificates)."),
        click.option(
            "--ca-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="PEM root certificates for TLS (implies --tls).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=30.0,
            show_default=True,
            help="Seconds per call.",
        ),
        click.option(
            "--heartbeat-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=30.0,
            show_default=True,
            help="Resume a stream silent for this long (3 server heartbeats).",
        ),
    ]

    @wraps(command)
    def wrapper(
        *args: Any,
        targets: tuple[str, ...],
        as_json: bool,
        token: str | None,
        tls: bool,
        ca_file: Path | None,
        timeout: float,
        heartbeat_timeout: float,
        **kwargs: Any,
    ) -> Any:
        addresses = [
            part.strip() for target in targets for part in target.split(",") if part.strip()
        ]
        if not addresses:
            raise click.BadParameter("give at least one host:port", param_hint="--target")
        if token is not None and (not token.isascii() or not token.isprintable()):
            raise click.BadParameter(
                "a bearer token is printable ASCII on one line", param_hint="--token"
            )
        settings = ClientSettings(
            addresses, as_json, token, tls, ca_file, timeout, heartbeat_timeout
        )
        return command(*args, settings=settings, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def run_async(main: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """Runs an async command; client errors become a clear message and exit code 1."""

    @wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        settings = kwargs.get("settings")
        as_json = isinstance(settings, ClientSettings) and settings.json
        try:
            return asyncio.run(main(*args, **kwargs))  # type: ignore[arg-type]
        except TokenStreamClientError as error:
            Output(as_json).error(error)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper
