"""`tokenstream serve` and `tokenstream purge`: commands that run against the store."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from tokenstream.server.auth import AuthSettings
from tokenstream.server.config import DEFAULT_DATABASE_URL, ServerConfig
from tokenstream.server.domain import CancelPolicy
from tokenstream.server.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from tokenstream.server.event_loop import run as run_on_loop
from tokenstream.server.storage.repository import StreamRepository
from tokenstream.server.storage.sql.database import DatabaseSettings

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Security:
    auth: AuthSettings
    insecure_no_auth: bool
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None


def _security_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Authentication and TLS options of `serve`, passed on as `security`."""
    existing = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        click.option("--api-keys-file", type=existing, help="TOML file of [[keys]] user/key."),
        click.option(
            "--jwt-secret",
            envvar="TOKENSTREAM_JWT_SECRET",
            default=None,
            help="Accept HS256 JWTs signed with this secret. Env: TOKENSTREAM_JWT_SECRET.",
        ),
        click.option("--jwt-public-key", type=existing, help="Accept RS256 JWTs (PEM key)."),
        click.option("--jwt-issuer", default=None, help="Required `iss` of JWTs."),
        click.option("--jwt-audience", default=None, help="Required `aud` of JWTs."),
        click.option(
            "--insecure-no-auth",
            is_flag=True,
            help="Serve a non-loopback address without authentication (trusted networks).",
        ),
        click.option("--tls-cert", type=existing, help="Server certificate chain (PEM)."),
        click.option("--tls-key", type=existing, help="Server private key (PEM)."),
        click.option(
            "--tls-client-ca",
            type=existing,
            help="Require client certificates signed by this CA (mutual TLS).",
        ),
    ]

    @wraps(command)
    def wrapper(
        *args: Any,
        api_keys_file: Path | None,
        jwt_secret: str | None,
        jwt_public_key: Path | None,
        jwt_issuer: str | None,
        jwt_audience: str | None,
        insecure_no_auth: bool,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_client_ca: Path | None,
        **kwargs: Any,
    ) -> Any:
        auth = AuthSettings(api_keys_file, jwt_secret, jwt_public_key, jwt_issuer, jwt_audience)
        security = _Security(auth, insecure_no_auth, tls_cert, tls_key, tls_client_ca)
        return command(*args, security=security, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, help="Port (0 picks a free one).")
@click.option(
    "--database-url",
    envvar="TOKENSTREAM_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help="SQLAlchemy async URL of the store.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--token-rate",
    type=click.FloatRange(min=0),
    default=50.0,
    show_default=True,
    help="Tokens per second of the built-in sources (0 = as fast as possible).",
)
@click.option("--default-model", default="synthetic", show_default=True)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds of quiet before a subscription gets a heartbeat.",
)
@click.option(
    "--flush-interval",
    type=click.FloatRange(min=0),
    default=0.005,
    show_default=True,
    help="Minimum seconds between group commits of generated tokens.",
)
@click.option(
    "--max-batch-tokens",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Most tokens one group commit writes.",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds without a token before a generation ends FAILED timeout (0: never).",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="Seconds after which a stream whose server stopped renewing it ends interrupted.",
)
@click.option(
    "--retention-days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Purge streams finished more than this many days ago, hourly (default: keep all).",
)
@click.option(
    "--keepalive-time",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds between keepalive pings; an unanswered ping (10 s) drops the connection.",
)
@click.option("--max-generations", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--max-generations-per-caller", type=click.IntRange(min=1), default=100, show_default=True
)
@click.option(
    "--max-subscribers-per-stream", type=click.IntRange(min=1), default=1000, show_default=True
)
@click.option(
    "--migrate/--no-migrate",
    default=True,
    show_default=True,
    help="Bring the database schema up to date on start (off: `tokenstream migrate` does it).",
)
@click.option(
    "--cancel-policy",
    type=click.Choice([p.value for p in CancelPolicy]),
    default=CancelPolicy.AUTHOR_OR_OWNER.value,
    show_default=True,
    help="Who may cancel a stream: its author or owners, owners only, or any member.",
)
@click.option(
    "--db-pool-size",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="PostgreSQL: connections kept open.",
)
@click.option(
    "--db-max-overflow",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="PostgreSQL: extra connections opened under load.",
)
@click.option(
    "--db-statement-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="PostgreSQL: seconds before a statement is aborted (0: no limit).",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds running calls get to finish on SIGTERM.",
)
@click.option(
    "--event-loop",
    type=click.Choice(EVENT_LOOPS),
    default=DEFAULT_EVENT_LOOP,
    show_default=True,
    help="asyncio event loop implementation (uvloop is faster).",
)
@_security_options
def serve(
    host: str,
    port: int,
    database_url: str,
    log_level: str,
    token_rate: float,
    default_model: str,
    heartbeat_interval: float,
    flush_interval: float,
    max_batch_tokens: int,
    stall_timeout: float,
    lease_ttl: float,
    retention_days: float | None,
    keepalive_time: float,
    max_generations: int,
    max_generations_per_caller: int,
    max_subscribers_per_stream: int,
    migrate: bool,
    cancel_policy: str,
    db_pool_size: int,
    db_max_overflow: int,
    db_statement_timeout: float,
    shutdown_grace: float,
    event_loop: str,
    security: _Security,
) -> None:
    """Run the server until SIGINT/SIGTERM.

    Without --api-keys-file or --jwt-* options, authentication is off: allowed (with a
    loud warning) only on a loopback address, or with --insecure-no-auth.
    """
    from tokenstream.server.app import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    base = ServerConfig()
    config = replace(
        base,
        host=host,
        port=port,
        database_url=database_url,
        database=DatabaseSettings(
            pool_size=db_pool_size,
            max_overflow=db_max_overflow,
            statement_timeout=db_statement_timeout,
        ),
        token_rate=token_rate,
        default_model=default_model,
        shutdown_grace=shutdown_grace,
        migrate=migrate,
        keepalive_time=keepalive_time,
        auth=security.auth,
        insecure_no_auth=security.insecure_no_auth,
        tls_cert_file=security.tls_cert,
        tls_key_file=security.tls_key,
        tls_client_ca_file=security.tls_client_ca,
        engine=replace(
            base.engine,
            heartbeat_interval=heartbeat_interval,
            flush_interval=flush_interval,
            max_batch_tokens=max_batch_tokens,
            stall_timeout=stall_timeout,
            lease_ttl=lease_ttl,
            retention_days=retention_days,
            max_generations=max_generations,
            max_generations_per_caller=max_generations_per_caller,
            max_subscribers_per_stream=max_subscribers_per_stream,
            cancel_policy=CancelPolicy(cancel_policy),
        ),
    )
    from tokenstream.server.auth import ConfigurationError
    from tokenstream.server.storage.sql import DatabaseInUse

    try:
        run_on_loop(run_server(config), event_loop)
    except (DatabaseInUse, OSError, ConfigurationError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--older-than", required=True, help="Age like 30d, 12h, 90m or 45s.")
@click.option(
    "--database-url",
    envvar="TOKENSTREAM_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
)
def purge(older_than: str, database_url: str) -> None:
    """Delete streams that finished longer ago than --older-than (and emptied conversations).

    Safe while a server runs on the same database: running streams are never touched.
    """
    age = _parse_age(older_than)
    before = datetime.now(UTC) - age
    result = asyncio.run(_on_database(database_url, lambda repo: repo.purge_finished(before)))
    click.echo(f"purged {result.streams} stream(s), {result.conversations} conversation(s)")


@click.command()
@click.option(
    "--database-url",
    envvar="TOKENSTREAM_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
)
def migrate(database_url: str) -> None:
    """Create or upgrade the database schema to the newest revision (SQLite or PostgreSQL).

    `serve` does this on start unless given --no-migrate; with several replicas, run it
    once before starting them.
    """

    async def noop(_: StreamRepository) -> None:
        return None

    asyncio.run(_on_database(database_url, noop))
    click.echo("the database schema is up to date")


@click.command()
@click.argument("conversation_id")
@click.argument("user_id")
@click.option(
    "--role",
    type=click.Choice(["owner", "member", "viewer"]),
    default="owner",
    show_default=True,
)
@click.option(
    "--database-url",
    envvar="TOKENSTREAM_DATABASE_URL",
    default=DEFAULT_DATABASE_URL,
    show_default=True,
)
def grant(conversation_id: str, user_id: str, role: str, database_url: str) -> None:
    """Make USER_ID a member of CONVERSATION_ID, directly in the database (for operators).

    For conversations that no authenticated caller can reach: those started while
    authentication was off, or before conversations had members. Safe while a server runs.
    """
    from tokenstream.server import ids
    from tokenstream.server.domain import Member, Role
    from tokenstream.server.errors import InvalidArgument
    from tokenstream.server.storage.errors import NotFound

    try:
        ids.check_conversation_id(conversation_id, "CONVERSATION_ID")
        ids.check_user_id(user_id, "USER_ID")
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from exc
    wanted = Role[role.upper()]

    async def grant_role(repository: StreamRepository) -> Member:
        conversation = await repository.get_conversation(conversation_id)
        if wanted is not Role.OWNER and conversation.is_last_owner(user_id):
            raise click.ClickException(
                f"{user_id} is the last owner of {conversation_id}; grant another user "
                "the owner role first"
            )
        return await repository.set_member(conversation_id, user_id, wanted, datetime.now(UTC))

    try:
        member = asyncio.run(_on_database(database_url, grant_role))
    except NotFound as exc:
        raise click.ClickException(f"conversation {conversation_id} does not exist") from exc
    click.echo(f"{member.user_id} is now {member.role.name.lower()} of {conversation_id}")


async def _on_database(database_url: str, work: Callable[[StreamRepository], Awaitable[T]]) -> T:
    """Runs `work` on the database (upgrading its schema first), then closes it."""
    from tokenstream.server.storage.sql import (
        SqlStreamRepository,
        create_engine,
        upgrade_to_head,
    )

    engine = create_engine(database_url)
    repository = SqlStreamRepository(engine)
    try:
        await upgrade_to_head(engine)
        return await work(repository)
    finally:
        await repository.close()


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def _parse_age(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if match is None:
        raise click.BadParameter(f"{text!r}: use a number with d, h, m or s, e.g. 30d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "d"])
