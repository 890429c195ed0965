"""The engine's wake-ups for readers of streams and conversations."""

from __future__ import annotations

import gc

from tokenstream.server.streams.changes import ChangeFeed


async def test_a_change_sets_the_taken_event_and_a_new_one_follows() -> None:
    feed = ChangeFeed()
    stream, conversation = feed.stream("s1"), feed.conversation("c1")
    assert feed.stream("s1") is stream  # one event per id until it is set
    feed.publish(streams=["s1"])
    assert stream.is_set()
    assert not conversation.is_set()
    assert not feed.stream("s1").is_set()  # the next change needs a fresh event
    feed.publish(conversations=["c1", "c2"])
    assert conversation.is_set()


async def test_others_ids_do_not_wake_a_reader() -> None:
    feed = ChangeFeed()
    stream = feed.stream("s1")
    feed.publish(streams=["s2"], conversations=["s1"])  # a conversation id is another space
    assert not stream.is_set()


async def test_everything_wakes_every_waiting_reader() -> None:
    feed = ChangeFeed()
    events = [feed.stream("s1"), feed.stream("s2"), feed.conversation("c1")]
    feed.publish_everything()
    assert all(event.is_set() for event in events)


async def test_an_id_nobody_waits_on_keeps_nothing() -> None:
    feed = ChangeFeed()
    feed.publish(streams=["never-waited"])
    for n in range(100):
        feed.stream(f"s{n}")  # taken and dropped at once, like a reader that left
    gc.collect()
    assert len(feed._streams) == 0
