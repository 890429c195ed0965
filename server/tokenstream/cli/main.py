"""`tokenstream` console script: the server, maintenance, and client commands."""

from __future__ import annotations

import click

from tokenstream.cli.bench_command import bench
from tokenstream.cli.chat import chat
from tokenstream.cli.client_commands import cancel, follow, history, status, submit
from tokenstream.cli.describe import describe
from tokenstream.cli.server_commands import grant, migrate, purge, serve


@click.group()
@click.version_option(package_name="tokenstream")
def cli() -> None:
    """Durable, resumable LLM token streams over gRPC."""


for command in (
    serve,
    migrate,
    purge,
    grant,
    submit,
    follow,
    cancel,
    status,
    history,
    chat,
    describe,
    bench,
):
    cli.add_command(command)


if __name__ == "__main__":
    cli()
