"""The SQL repository against real databases (an SQLite file and a PostgreSQL cluster),
schema created by the Alembic migrations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenstream.server.domain import Ending, Role, StreamState, TokenRun
from tokenstream.server.storage.errors import AlreadyExists, NotFound, StorageUnavailable
from tokenstream.server.storage.repository import NewStream, PurgeResult, WriteBatch
from tokenstream.server.storage.sql import SqlStreamRepository, create_engine, upgrade_to_head
from tokenstream.server.storage.sql import repository as sql_repository
from tokenstream.server.storage.sql.migrate import run_alembic
from tokenstream.server.storage.sql.schema import metadata, streams, token_runs

CONV = "conv_" + "c" * 26
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def stream_id(n: int) -> str:
    return "strm_" + "a" * 25 + "abcdefghij"[n]


def new_stream(
    n: int, *, new_conversation: bool = False, request_id: str | None = None
) -> NewStream:
    return NewStream(
        stream_id=stream_id(n),
        conversation_id=CONV,
        new_conversation=new_conversation,
        prompt=f"prompt {n}",
        model="echo",
        max_tokens=100,
        request_id=request_id,
        request_hash="h" if request_id else None,
        created_at=NOW,
    )


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    db = create_engine(database_url)
    await upgrade_to_head(db)
    yield db
    await db.dispose()


@pytest.fixture
async def repo(engine: AsyncEngine) -> AsyncIterator[SqlStreamRepository]:
    repository = SqlStreamRepository(engine)
    await repository.create_stream(new_stream(0, new_conversation=True))
    yield repository
    await repository.close()


async def test_migrations_match_the_schema(engine: AsyncEngine) -> None:
    def diff(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))

    async with engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_upgrade_is_idempotent(engine: AsyncEngine) -> None:
    await upgrade_to_head(engine)  # a second start on the same file changes nothing


async def test_runs_are_read_back_from_any_seq(repo: SqlStreamRepository) -> None:
    tokens = [f"<{i}>" for i in range(12)]
    for start in range(0, 12, 4):
        await repo.commit(
            WriteBatch(
                NOW, runs=[(stream_id(0), TokenRun.from_tokens(start, tokens[start : start + 4]))]
            )
        )
    assert (await repo.get_stream(stream_id(0))).head_seq == 11
    for k in range(13):
        runs = await repo.read_runs(stream_id(0), k, 1_000_000)
        text = "".join(c.text for run in runs for c in run.chunks(k, 1_000_000))
        assert text == "".join(tokens[k:])


async def test_read_runs_stops_near_max_chars(repo: SqlStreamRepository) -> None:
    for start in range(0, 100, 10):
        run = TokenRun.from_tokens(start, ["abcd"] * 10)
        await repo.commit(WriteBatch(NOW, runs=[(stream_id(0), run)]))
    runs = await repo.read_runs(stream_id(0), 0, 50)
    assert [run.start_seq for run in runs] == [0, 10]


async def test_ending_compacts_runs_into_one_row(
    repo: SqlStreamRepository, engine: AsyncEngine
) -> None:
    tokens = ["a", "bb", "ccc", "dddd", "e"]
    await repo.commit(WriteBatch(NOW, runs=[(stream_id(0), TokenRun.from_tokens(0, tokens[:2]))]))
    ended = (
        await repo.commit(
            WriteBatch(
                NOW,
                runs=[(stream_id(0), TokenRun.from_tokens(2, tokens[2:]))],
                endings=[(stream_id(0), Ending(StreamState.COMPLETED))],
            )
        )
    ).terminal
    record = ended[stream_id(0)]
    assert set(ended) == {stream_id(0)}
    assert (record.state, record.head_seq, record.finished_at) == (StreamState.COMPLETED, 4, NOW)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(token_runs)) == 0
        assert await conn.scalar(select(streams.c.text)) == "".join(tokens)
    for k in range(6):  # slicing the compacted row gives exactly tokens k..
        runs = await repo.read_runs(stream_id(0), k, 10)
        assert len(runs) == 1
        assert "".join(c.text for c in runs[0].chunks(k, 3)) == "".join(tokens[k:])
    turns = (await repo.list_turns(CONV, 0, 10)).turns
    assert [t.response for t in turns] == ["".join(tokens)]


async def test_many_streams_ending_in_one_commit_are_each_compacted(
    repo: SqlStreamRepository,
) -> None:
    other = "conv_" + "d" * 26
    await repo.create_stream(new_stream(1, request_id="kept"))
    await repo.create_stream(new_stream(2, request_id="let-go"))
    await repo.create_stream(replace(new_stream(3), conversation_id=other, new_conversation=True))
    texts = {n: [f"{n}:{i} " for i in range(n + 2)] for n in range(4)}
    before = (await repo.read_events(CONV, 0, 100))[1]
    await repo.commit(
        WriteBatch(
            NOW, runs=[(stream_id(n), TokenRun.from_tokens(0, t[:1])) for n, t in texts.items()]
        )
    )
    unstarted = Ending(StreamState.FAILED, "shutdown", forget_request=True)
    endings = {0: Ending(StreamState.COMPLETED), 1: Ending(StreamState.CANCELLED)}
    endings |= {2: unstarted, 3: Ending(StreamState.COMPLETED)}
    ended = (
        await repo.commit(
            WriteBatch(
                NOW,
                runs=[(stream_id(n), TokenRun.from_tokens(1, t[1:])) for n, t in texts.items()],
                endings=[(stream_id(n), ending) for n, ending in endings.items()],
            )
        )
    ).terminal
    for n, tokens in texts.items():
        record = ended[stream_id(n)]
        assert (record.state, record.head_seq) == (endings[n].state, len(tokens) - 1)
        runs = await repo.read_runs(stream_id(n), 1, 1000)
        assert "".join(c.text for c in runs[0].chunks(1, 1000)) == "".join(tokens[1:])
    # The request id let go can be used again; the kept one cannot.
    assert await repo.find_by_request_id("let-go") is None
    assert (await repo.find_by_request_id("kept")) is not None
    # Each conversation numbers its endings after its own newest event, without gaps.
    events, head = await repo.read_events(CONV, before + 1, 100)
    assert [e.seq for e in events] == list(range(before + 1, head + 1))
    assert [e.data["stream_id"] for e in events] == [stream_id(n) for n in range(3)]
    other_events, _ = await repo.read_events(other, 0, 100)
    assert [e.kind for e in other_events][-1] == events[-1].kind
    assert other_events[-1].data["stream_id"] == stream_id(3)


@pytest.mark.parametrize("last_token_in_the_ending_batch", [True, False])
async def test_an_ending_uses_the_writers_whole_response_only_when_it_fits(
    repo: SqlStreamRepository, last_token_in_the_ending_batch: bool
) -> None:
    """Stream 0: the response given ends where the stream's stored tokens end (this batch's
    run, or, with no run in it, the stored head: the writer ends a few streams per commit),
    so it is stored as given (no read-back). Stream 1: one token short, so it is ignored."""
    await repo.create_stream(new_stream(1))
    tokens = ["a", "bb", "ccc"]
    earlier = tokens[:2] if last_token_in_the_ending_batch else tokens
    for n in (0, 1):
        run = TokenRun.from_tokens(0, earlier)
        await repo.commit(WriteBatch(NOW, runs=[(stream_id(n), run)]))
    last = TokenRun.from_tokens(2, tokens[2:])
    given = TokenRun.from_tokens(0, ["A", "BB", "CCC"])
    short = TokenRun.from_tokens(0, ["X", "YY"])
    await repo.commit(
        WriteBatch(
            NOW,
            runs=[(stream_id(n), last) for n in (0, 1) if last_token_in_the_ending_batch],
            endings=[(stream_id(n), Ending(StreamState.COMPLETED)) for n in (0, 1)],
            responses={stream_id(0): given, stream_id(1): short},
        )
    )
    texts = {}
    for n in (0, 1):
        (run,) = await repo.read_runs(stream_id(n), 0, 100)
        texts[n] = [c.text for c in run.chunks(0, 1)]
    assert texts == {0: ["A", "BB", "CCC"], 1: tokens}
    assert (await repo.get_stream(stream_id(1))).head_seq == 2


async def test_first_ending_wins(repo: SqlStreamRepository) -> None:
    await repo.commit(WriteBatch(NOW, endings=[(stream_id(0), Ending(StreamState.CANCELLED))]))
    late = (
        await repo.commit(
            WriteBatch(
                NOW,
                runs=[(stream_id(0), TokenRun.from_tokens(0, ["late"]))],
                endings=[(stream_id(0), Ending(StreamState.COMPLETED))],
            )
        )
    ).terminal
    # The batch reports the state the store holds; the late tokens were not stored.
    assert (late[stream_id(0)].state, late[stream_id(0)].head_seq) == (StreamState.CANCELLED, -1)
    record = await repo.get_stream(stream_id(0))
    assert (record.state, record.head_seq) == (StreamState.CANCELLED, -1)
    assert [list(run.ends) for run in await repo.read_runs(stream_id(0), 0, 100)] == [[]]


async def test_active_streams_are_absent_from_the_commit_result(
    repo: SqlStreamRepository,
) -> None:
    result = await repo.commit(
        WriteBatch(NOW, runs=[(stream_id(0), TokenRun.from_tokens(0, ["a"]))])
    )
    assert result.terminal == {}


async def test_a_commit_of_tokens_only_skips_ended_streams(
    repo: SqlStreamRepository, engine: AsyncEngine
) -> None:
    await repo.create_stream(new_stream(1))
    await repo.commit(WriteBatch(NOW, endings=[(stream_id(1), Ending(StreamState.CANCELLED))]))
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        result = await repo.commit(
            WriteBatch(
                NOW,
                runs=[
                    (stream_id(0), TokenRun.from_tokens(0, ["a", "b"])),
                    (stream_id(1), TokenRun.from_tokens(0, ["late"])),
                ],
            )
        )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert list(result.terminal) == [stream_id(1)]
    assert (result.terminal[stream_id(1)].state, result.terminal[stream_id(1)].head_seq) == (
        StreamState.CANCELLED,
        -1,
    )
    assert [run.text for run in await repo.read_runs(stream_id(0), 0, 100)] == ["ab"]
    assert [run.text for run in await repo.read_runs(stream_id(1), 0, 100)] == [""]
    if engine.dialect.name == "postgresql":
        # One statement locks, writes and notifies; then a read fetches the ended record.
        write, read = statements
        assert "FOR UPDATE" in write
        assert "INSERT INTO token_runs" in write
        assert "pg_notify" in write
        assert read.lstrip().startswith("SELECT")


async def test_creations_in_one_commit_succeed_or_fail_each_on_its_own(
    repo: SqlStreamRepository,
) -> None:
    taken = replace(new_stream(1), request_id="dup")
    await repo.create_stream(taken)
    batch = WriteBatch(
        NOW,
        creations=[
            replace(new_stream(2), request_id="dup"),  # request id taken
            replace(new_stream(3), conversation_id="conv_" + "n" * 26),  # no such conversation
            new_stream(4),
        ],
        runs=[(stream_id(0), TokenRun.from_tokens(0, ["ok"]))],
    )
    result = await repo.commit(batch)
    assert isinstance(result.created[stream_id(2)], AlreadyExists)
    assert isinstance(result.created[stream_id(3)], NotFound)
    created = result.created[stream_id(4)]
    assert not isinstance(created, Exception)
    assert (created.stream_id, created.state) == (stream_id(4), StreamState.RUNNING)
    assert (await repo.get_stream(stream_id(4))).prompt == "prompt 4"
    assert (await repo.get_stream(stream_id(0))).head_seq == 0  # the rest of the batch landed
    for missing in (stream_id(2), stream_id(3)):
        with pytest.raises(NotFound):
            await repo.get_stream(missing)


async def test_reads_see_one_snapshot_while_a_stream_is_compacted(
    repo: SqlStreamRepository,
) -> None:
    """History never shows a running turn without its tokens, however commits interleave."""
    tokens = [f"{i} " for i in range(400)]

    async def write() -> None:
        for start in range(0, 400, 4):
            run = TokenRun.from_tokens(start, tokens[start : start + 4])
            await repo.commit(WriteBatch(NOW, runs=[(stream_id(0), run)]))
        await repo.commit(WriteBatch(NOW, endings=[(stream_id(0), Ending(StreamState.COMPLETED))]))

    writer = asyncio.create_task(write())
    while not writer.done():
        (turn,) = (await repo.list_turns(CONV, 0, 10)).turns
        assert turn.response == "".join(tokens[: turn.stream.head_seq + 1])
    await writer


async def test_request_id_is_unique(repo: SqlStreamRepository) -> None:
    await repo.create_stream(new_stream(1, request_id="r1"))
    with pytest.raises(AlreadyExists):
        await repo.create_stream(new_stream(2, request_id="r1"))
    found = await repo.find_by_request_id("r1")
    assert found is not None
    assert found.stream_id == stream_id(1)
    with pytest.raises(NotFound):  # the failed insert left nothing behind
        await repo.get_stream(stream_id(2))


async def test_missing_things_raise_not_found(repo: SqlStreamRepository) -> None:
    with pytest.raises(NotFound):
        await repo.get_stream(stream_id(9))
    with pytest.raises(NotFound):
        await repo.list_turns("conv_" + "z" * 26, 0, 10)
    with pytest.raises(NotFound):
        await repo.create_stream(
            NewStream(stream_id(3), "conv_" + "z" * 26, False, "p", "echo", 1, None, None, NOW)
        )


async def test_running_turns_show_their_durable_prefix(repo: SqlStreamRepository) -> None:
    await repo.commit(WriteBatch(NOW, runs=[(stream_id(0), TokenRun.from_tokens(0, ["x", "y"]))]))
    await repo.create_stream(new_stream(1))
    turns = (await repo.list_turns(CONV, 0, 10)).turns
    assert [(t.stream.prompt, t.response, t.stream.state) for t in turns] == [
        ("prompt 0", "xy", StreamState.RUNNING),
        ("prompt 1", "", StreamState.RUNNING),
    ]
    assert (await repo.list_turns(CONV, turns[0].cursor, 10)).turns[0].stream.prompt == "prompt 1"


async def test_end_active_streams_compacts_them(repo: SqlStreamRepository) -> None:
    await repo.commit(WriteBatch(NOW, runs=[(stream_id(0), TokenRun.from_tokens(0, ["x", "y"]))]))
    ended = await repo.end_active_streams(Ending(StreamState.FAILED, "interrupted", "gone"), NOW)
    assert ended == [stream_id(0)]
    record = await repo.get_stream(stream_id(0))
    assert (record.state, record.reason, record.head_seq) == (StreamState.FAILED, "interrupted", 1)
    assert await repo.end_active_streams(Ending(StreamState.FAILED), NOW) == []


async def test_ending_more_streams_than_one_id_list_holds_ends_them_all(
    repo: SqlStreamRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_repository, "_MAX_IDS", 2)  # recovery may end tens of thousands
    for n in range(1, 5):
        await repo.create_stream(new_stream(n))
    runs = [(stream_id(n), TokenRun.from_tokens(0, [f"{n}"] * (n + 1))) for n in range(5)]
    await repo.commit(WriteBatch(NOW, runs=runs))
    ended = await repo.end_active_streams(Ending(StreamState.FAILED, "interrupted"), NOW)
    assert sorted(ended) == [stream_id(n) for n in range(5)]
    for n in range(5):
        record = await repo.get_stream(stream_id(n))
        assert (record.state, record.head_seq) == (StreamState.FAILED, n)
        (run,) = await repo.read_runs(stream_id(n), 0, 100)
        assert run.text == f"{n}" * (n + 1)
    events, _ = await repo.read_events(CONV, 0, 100)
    assert [e.seq for e in events] == list(range(len(events)))


async def test_leases_are_renewed_and_expired_ones_end(repo: SqlStreamRepository) -> None:
    mine = replace(new_stream(1), owner_id="srv_me", lease_expires_at=NOW)
    theirs = replace(new_stream(2), owner_id="srv_dead", lease_expires_at=NOW)
    await repo.create_stream(mine)
    await repo.create_stream(theirs)
    await repo.commit(WriteBatch(NOW, runs=[(stream_id(2), TokenRun.from_tokens(0, ["a", "b"]))]))
    # Only named streams are renewed: srv_me generates stream 1, not stream 2.
    assert (
        await repo.renew_leases("srv_me", [stream_id(1), stream_id(2)], NOW + timedelta(seconds=30))
        == 1
    )
    ended = await repo.end_expired_leases(
        NOW + timedelta(seconds=1), Ending(StreamState.FAILED, "interrupted")
    )
    # Stream 0 has no lease at all (as if made before leases existed): swept too.
    assert ended == [stream_id(0), stream_id(2)]
    record = await repo.get_stream(stream_id(2))
    assert (record.state, record.reason, record.head_seq) == (StreamState.FAILED, "interrupted", 1)
    assert (await repo.get_stream(stream_id(1))).state is StreamState.RUNNING
    assert await repo.renew_leases("srv_dead", [stream_id(2)], NOW + timedelta(seconds=30)) == 0


async def test_purge_deletes_old_finished_streams_and_empty_conversations(
    repo: SqlStreamRepository, engine: AsyncEngine
) -> None:
    other_conv = "conv_" + "d" * 26
    lonely = replace(new_stream(1), conversation_id=other_conv, new_conversation=True)
    await repo.create_stream(lonely)
    await repo.create_stream(new_stream(2))  # stays running in CONV
    for sid in (stream_id(0), stream_id(1)):
        await repo.commit(WriteBatch(NOW, endings=[(sid, Ending(StreamState.COMPLETED))]))
    assert await repo.purge_finished(NOW) == PurgeResult(0, 0)  # nothing older than NOW
    result = await repo.purge_finished(NOW + timedelta(seconds=1))
    assert result == PurgeResult(streams=2, conversations=1)  # CONV still has a stream
    with pytest.raises(NotFound):
        await repo.get_stream(stream_id(0))
    assert (await repo.get_stream(stream_id(2))).state is StreamState.RUNNING
    assert not await repo.conversation_exists(other_conv)
    assert await repo.conversation_exists(CONV)


async def test_upgrade_from_the_first_revision_keeps_data(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"

    db = create_engine(url)
    async with db.begin() as conn:
        await conn.run_sync(run_alembic, command.upgrade, "0001")
        await conn.exec_driver_sql(
            "INSERT INTO conversations (conversation_id, created_at) VALUES (?, ?)",
            (CONV, "2026-01-01 00:00:00"),
        )
        await conn.exec_driver_sql(
            "INSERT INTO streams (stream_id, conversation_id, prompt, model, max_tokens, state,"
            " final_seq, text, token_ends, created_at) VALUES (?, ?, 'old', 'echo', 5,"
            " 'completed', 1, 'ab', ?, '2026-01-01 00:00:00')",
            (stream_id(7), CONV, TokenRun.from_tokens(0, ["a", "b"]).encode_ends()),
        )
        await conn.exec_driver_sql(
            "INSERT INTO streams (stream_id, conversation_id, prompt, model, max_tokens, state,"
            " created_at) VALUES (?, ?, 'live', 'echo', 5, 'running', '2026-01-01 00:00:00')",
            (stream_id(8), CONV),
        )
        for run in (TokenRun.from_tokens(0, ["x", "y"]), TokenRun.from_tokens(2, ["z"])):
            await conn.exec_driver_sql(
                "INSERT INTO token_runs (stream_id, start_seq, end_seq, text, token_ends)"
                " VALUES (?, ?, ?, ?, ?)",
                (stream_id(8), run.start_seq, run.end_seq, run.text, run.encode_ends()),
            )
    await upgrade_to_head(db)
    async with db.connect() as conn:
        created = await conn.scalar(text("SELECT sql FROM sqlite_master WHERE name = 'token_runs'"))
    assert "WITHOUT ROWID" in created  # runs clustered by their key (revision 0005)
    repository = SqlStreamRepository(db)
    record = await repository.get_stream(stream_id(7))
    assert (record.prompt, record.state, record.head_seq) == ("old", StreamState.COMPLETED, 1)
    runs = await repository.read_runs(stream_id(7), 1, 100)
    assert [c.text for c in runs[0].chunks(1, 100)] == ["b"]
    live = await repository.get_stream(stream_id(8))
    assert (live.state, live.head_seq) == (StreamState.RUNNING, 2)
    runs = await repository.read_runs(stream_id(8), 1, 100)
    assert "".join(c.text for run in runs for c in run.chunks(1, 100)) == "yz"
    await repository.close()


async def test_concurrent_writers_number_conversation_events_without_gaps(
    database_url: str,
) -> None:
    """Replicas writing to one conversation at once (members added, streams created and
    ended) never give two events one seq, and never fail for it."""
    engines = [create_engine(database_url) for _ in range(3)]
    await upgrade_to_head(engines[0])
    replicas = [SqlStreamRepository(e) for e in engines]
    try:
        await replicas[0].commit(WriteBatch(NOW, creations=[new_stream(0, new_conversation=True)]))

        async def busy(replica: SqlStreamRepository, k: int) -> None:
            for i in range(8):
                await replica.set_member(CONV, f"user-{k}-{i}", Role.MEMBER, NOW)

        async def streams_come_and_go(replica: SqlStreamRepository) -> None:
            for n in range(1, 9):
                await replica.commit(WriteBatch(NOW, creations=[new_stream(n)]))
                ending = Ending(StreamState.COMPLETED)
                await replica.commit(WriteBatch(NOW, endings=[(stream_id(n), ending)]))

        await asyncio.gather(
            busy(replicas[0], 0), busy(replicas[1], 1), streams_come_and_go(replicas[2])
        )
        events, head = await replicas[0].read_events(CONV, 0, 1000)
        # 2 for stream 0's creation, 16 members, and 3 per other stream (prompt, start, end).
        assert [e.seq for e in events] == list(range(head + 1))
        assert head + 1 == 2 + 16 + 8 * 3
    finally:
        for replica in replicas:
            await replica.close()


async def test_calls_after_close_are_unavailable(engine: AsyncEngine) -> None:
    repository = SqlStreamRepository(engine)
    await repository.create_stream(new_stream(0, new_conversation=True))
    await repository.close()
    with pytest.raises(StorageUnavailable, match="closed"):
        await repository.get_stream(stream_id(0))
    with pytest.raises(StorageUnavailable, match="closed"):
        await repository.commit(
            WriteBatch(NOW, endings=[(stream_id(0), Ending(StreamState.FAILED))])
        )


async def test_migrations_go_down_a_revision_and_up_again_keeping_runs(
    repo: SqlStreamRepository, engine: AsyncEngine
) -> None:
    run = TokenRun.from_tokens(0, ["x", "y"])
    await repo.commit(WriteBatch(NOW, runs=[(stream_id(0), run)]))

    async with engine.begin() as conn:
        await conn.run_sync(run_alembic, command.downgrade, "0004")
    await upgrade_to_head(engine)
    (stored,) = await repo.read_runs(stream_id(0), 0, 100)
    assert (stored.start_seq, stored.text) == (0, "xy")
