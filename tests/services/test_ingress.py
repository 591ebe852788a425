"""The ingress service on a real server: the inbox contract, dead letters, de-duplication,
registry changes without restart, and a real process killed with SIGKILL (invariant 2 of
docs/design.md: every event ends as runs or a dead letter, a replayed id creates no second run)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import orjson
import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from supersede import client, codec
from supersede.config import Settings
from supersede.errors import DefinitionError
from supersede.keys import Keys
from supersede.model import event_digest, group_id, shard_of_digest, shard_of_group
from supersede.protocol import INGRESS_GROUP, Dead, request_payloads
from supersede.registry import register
from supersede.scripts import Scripts
from supersede.services.ingress.service import Ingress, IngressConfig
from tests.support import eventually, requests_in_streams, scrape

CHAT = {
    "id": "chat-reply",
    "events": ["chat.message"],
    "concurrency": {"expression": "input.userId", "max_runs": 1},
}
AUDIT = {"id": "audit", "events": ["chat.message", "user.signup"]}


@contextlib.asynccontextmanager
async def running_ingress(
    redis: Redis, redis_url: str, keys: Keys, **config: Any
) -> AsyncIterator[Ingress]:
    """An in-process ingress service on `keys`, ready; stopped on exit."""
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    config = {"block_ms": 20, "refresh_interval": 0.05, **config}
    service = Ingress(redis, settings, IngressConfig(**config))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await eventually(lambda: asyncio.sleep(0, service.ready))
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def ingress(redis: Redis, redis_url: str, keys: Keys):  # type: ignore[no-untyped-def]
    await register(redis, keys, CHAT)
    await register(redis, keys, AUDIT)
    async with running_ingress(redis, redis_url, keys) as service:
        yield service


async def inbox_done(redis: Redis, keys: Keys) -> bool:
    """Ingress read every inbox entry and acknowledged it. (By the last id it was delivered:
    the group's lag is unknown, None, until it read to the end, and read as 0 it said done
    after a first batch of a flood: a flaky test.)"""
    last = (await redis.xinfo_stream(keys.events_stream))["last-generated-id"]
    for g in await redis.xinfo_groups(keys.events_stream):
        if g["name"] == INGRESS_GROUP.encode():
            return int(g["pending"]) == 0 and g["last-delivered-id"] == last
    return False


async def settle(redis: Redis, keys: Keys, timeout: float = 20.0) -> None:
    await eventually(lambda: inbox_done(redis, keys), timeout=timeout)


async def test_an_event_of_a_workflow_registered_since_the_last_refresh_is_routed(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """A workflow registered between two refreshes of ingress's routes: its first events were
    acknowledged as unrouted, lost though `publish_runs` had planned their runs from the
    registry (an API-user probe lost 3 of 20). An unrouted event now makes ingress look at the
    registry's epoch before it acknowledges the batch."""
    await register(redis, keys, AUDIT)
    async with running_ingress(redis, redis_url, keys, refresh_interval=3600) as service:
        await register(redis, keys, CHAT)
        _, planned, _ = await client.publish_runs(
            redis, "chat.message", {"userId": "new"}, namespace=keys.namespace
        )
        assert {p.workflow for p in planned} == {"audit", "chat-reply"}
        await settle(redis, keys)
        reqs = await requests_in_streams(redis, keys)
        assert sorted(r["w"] for r in reqs) == ["audit", "chat-reply"]
        assert {r["id"] for r in reqs} == {p.run_id for p in planned}
        await redis.xadd(keys.events_stream, {"name": "nobody.listens", "data": "{}"})
        await settle(redis, keys)
        assert service.epoch == int(await redis.get(keys.registry_epoch) or 0)
        # The registry emptied (a server that lost its data): an event read after it is left
        # pending, not acknowledged as unrouted with no workflow to run it.
        await redis.delete(keys.workflows_hash)
        await redis.incr(keys.registry_epoch)
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": "{}"})

        async def held() -> bool:
            info = await redis.xpending(keys.events_stream, INGRESS_GROUP)
            return int(info["pending"]) == 1 and not service.routes

        await eventually(held, timeout=10)
        assert await redis.xlen(keys.dead_stream) == 0


async def test_publish_runs_says_which_entry_it_published_when_a_later_read_fails(
    redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis failure after the event is in the inbox (looking up an explicit id's first
    event) raised the bare error: the caller could not tell the event was published, and a
    retry published it twice. PublishedError carries the entry (the CLI says "do not publish
    it again" with it)."""
    await register(redis, keys, CHAT)
    await redis.hset(keys.config_hash, "shards", keys.shards)  # (as a service pins it)

    async def lost(*_: Any, **__: Any) -> None:
        raise redis_sync.ConnectionError("connection lost")

    monkeypatch.setattr(client, "duplicate_of", lost)
    with pytest.raises(client.PublishedError) as caught:
        await client.publish_runs(
            redis, "chat.message", {"userId": "p"}, id="once", namespace=keys.namespace
        )
    [(entry, _)] = await redis.xrange(keys.events_stream)
    assert caught.value.entry == entry.decode()
    assert "published (inbox entry " in str(caught.value)
    assert isinstance(caught.value.__cause__, redis_sync.ConnectionError)


async def test_the_contract_json_and_msgpack_with_and_without_id_and_metadata(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    inbox = keys.events_stream
    plain = await redis.xadd(inbox, {"name": "chat.message", "data": '{"userId":"u1","text":"hi"}'})
    await redis.xadd(
        inbox,
        {
            "name": "chat.message",
            "data": '{"userId":7}',
            "id": "evt-7",
            "metadata": '{"tenant":"t"}',
        },
    )
    await redis.xadd(
        inbox,
        {"name": "chat.message", "encoding": "msgpack",
         "data": msgpack.packb({"userId": "u3", "blob": b"\x00\xff", "text": b"abc"})},
    )  # fmt: skip
    await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    by = {(r["w"], r["k"]): r for r in reqs}
    assert len(reqs) == 6  # three events, two workflows each
    assert {k for w, k in by if w == "chat-reply"} == {"u1", "7", "u3"}
    first = by[("chat-reply", "u1")]
    assert first["ev"] == plain.decode()
    body = codec.unpack(codec.blob(first["in"]))
    assert body == {
        "input": {"userId": "u1", "text": "hi"},
        "metadata": {},
        "event": "chat.message",
        "event_id": plain.decode(),
    }
    second = codec.unpack(codec.blob(by[("chat-reply", "7")]["in"]))
    assert second["event_id"] == "evt-7" and second["metadata"] == {"tenant": "t"}
    # msgpack's bin values are bytes for the handler, as for the key expression (they were
    # str with surrogate escapes, b"abc" a str: a producer probe)
    third = codec.unpack(codec.blob(by[("chat-reply", "u3")]["in"]))
    assert third["input"] == {"userId": "u3", "blob": b"\x00\xff", "text": b"abc"}
    # routed to the shard of its group; the unlimited workflow gets one group per event
    assert shard_of_group(first["g"], keys.shards) == int(first["id"].split("-")[0])
    assert first["g"] == group_id("chat-reply", first["v"], "u1")
    audit_keys = {k for w, k in by if w == "audit"}
    assert len(audit_keys) == 3


async def test_the_python_client_writes_the_same_contract(
    redis: Redis, redis_url: str, keys: Keys, ingress: Ingress
) -> None:
    await client.publish(redis, "chat.message", {"userId": "a"}, id="x1", namespace=keys.namespace)
    sync = redis_sync.Redis.from_url(redis_url)
    try:
        client.publish_sync(
            sync, "chat.message", {"userId": "b"}, metadata={"m": 1}, namespace=keys.namespace
        )
    finally:
        sync.close()
    await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    assert sorted(r["k"] for r in reqs if r["w"] == "chat-reply") == ["a", "b"]
    with pytest.raises(TypeError):
        client.event_fields("n", ["not", "a", "dict"])


BAD_EVENTS: list[tuple[dict[str, Any], str]] = [
    ({"name": "chat.message", "data": "not json"}, "bad_json"),
    ({"name": "chat.message", "data": "[1, 2]"}, "bad_json"),
    ({"name": "chat.message", "data": b'{"userId": "\xff"}'}, "bad_encoding"),
    ({"name": "chat.message", "encoding": "msgpack", "data": b"\xc1\xc1"}, "bad_msgpack"),
    ({"name": "chat.message", "encoding": "msgpack", "data": msgpack.packb([1])}, "bad_msgpack"),
    ({"data": '{"userId": "u"}'}, "missing_name"),
    (
        {"name": "chat.message", "data": orjson.dumps({"userId": "u", "pad": "x" * (1 << 20)})},
        "too_large",
    ),
    ({"name": "chat.message", "data": '{"text": "no user"}'}, "key_error"),
    ({"name": "chat.message", "data": '{"userId": {"nested": 1}}'}, "key_error"),
    ({"name": "chat.message", "data": orjson.dumps({"userId": "k" * 1025})}, "key_too_large"),
    ({"name": "chat.message", "data": "{}", "metadata": "[]"}, "bad_json"),
    ({"name": "chat.message", "encoding": "yaml", "data": '{"userId": "u"}'}, "bad_encoding"),
    ({"name": "chat.message", "encoding": "yaml"}, "bad_encoding"),  # (no data: was routed)
]


@pytest.mark.parametrize(("fields", "reason"), BAD_EVENTS, ids=[r for _, r in BAD_EVENTS])
async def test_a_bad_event_is_dead_lettered_and_the_next_one_is_processed(
    redis: Redis, keys: Keys, ingress: Ingress, fields: dict[str, Any], reason: str
) -> None:
    bad_id = await redis.xadd(keys.events_stream, fields)
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId": "next"}'})
    await settle(redis, keys)
    dead = await redis.xrange(keys.dead_stream)
    assert len(dead) == 1
    body = dead[0][1]
    assert body[b"reason"] == reason.encode() and body[b"detail"] and body[b"entry"] == bad_id
    # (the detail says what was wrong: msgpack's errors without a message left "... msgpack: ")
    assert not body[b"detail"].rstrip().endswith(b":"), body[b"detail"]
    cut = []
    for k, v in fields.items():  # the original fields travel with it, each at most 4 KiB
        raw = v if isinstance(v, bytes) else str(v).encode()
        assert body[k.encode()] == raw[: Dead.FIELD_MAX]
        if len(raw) > Dead.FIELD_MAX:
            cut.append(k)
    assert body.get(b"truncated", b"").decode() == ",".join(cut)
    assert (reason == "too_large") == bool(cut)

    chat = [r for r in await requests_in_streams(redis, keys) if r["w"] == "chat-reply"]
    assert [r["k"] for r in chat] == ["next"]


async def test_a_dynamic_max_runs_is_computed_per_event_and_a_bad_one_dead_lettered(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """`max_runs` as a CEL expression: each request carries the limit its event computed; an
    event it fails for (or gives no 1..10000 integer for) is a `max_runs_error` dead letter
    naming the workflow, and its batch-mates run."""
    plans = {
        "id": "plans",
        "events": ["job"],
        "concurrency": {"expression": "input.user", "max_runs": "input.plan == 'pro' ? 5 : 1"},
    }
    await register(redis, keys, plans)
    await register(redis, keys, {**plans, "id": "raw", "concurrency": {
        "expression": "input.user", "max_runs": "input.n"}})  # fmt: skip
    async with running_ingress(redis, redis_url, keys):
        for data in ({"user": "a", "plan": "pro", "n": 2}, {"user": "b", "n": 0},
                     {"user": "c", "plan": "free", "n": "3"}):  # fmt: skip
            await redis.xadd(keys.events_stream, {"name": "job", "data": orjson.dumps(data)})
        await settle(redis, keys)
    got = {(r["w"], r["k"]): r["max"] for r in await requests_in_streams(redis, keys)}
    assert got == {("plans", "a"): 5, ("plans", "c"): 1, ("raw", "a"): 2}
    dead = [f for _, f in await redis.xrange(keys.dead_stream)]
    # b has no plan (the expression fails) and n = 0; c's n is a string
    assert sorted(f[b"workflow"] for f in dead) == [b"plans", b"raw", b"raw"]
    assert {f[b"reason"] for f in dead} == {b"max_runs_error"}
    assert b"gave 0" in b" ".join(f[b"detail"] for f in dead)


@pytest.mark.parametrize(
    ("max_runs", "words"),
    [("input.", "invalid CEL"), ("", "non-empty"), (0, "between 1 and 10000"), (True, "integer")],
)
async def test_a_bad_max_runs_fails_at_registration_naming_the_field(
    redis: Redis, keys: Keys, max_runs: Any, words: str
) -> None:
    body = {**CHAT, "concurrency": {"expression": "input.userId", "max_runs": max_runs}}
    with pytest.raises(DefinitionError, match=words) as err:
        await register(redis, keys, body)
    assert err.value.field == "concurrency.max_runs"


def test_a_dead_letter_keeps_a_bounded_copy_cut_at_character_boundaries() -> None:
    from supersede.protocol import dead_letter

    fields = {b"name": b"n", b"data": ("\u00e9" * 5000).encode()}  # 2-byte characters
    fields |= {f"f{i}".encode(): b"x" * 4000 for i in range(40)}
    body = dead_letter(fields, b"1-1", "too_large", "detail")
    data = body[b"data"]
    assert len(data) <= Dead.FIELD_MAX and data.decode() == "\u00e9" * (len(data) // 2)
    originals = {k: v for k, v in body.items() if isinstance(k, bytes)}
    assert sum(len(k) + len(v) for k, v in originals.items()) <= Dead.TOTAL_MAX
    named = body[Dead.TRUNCATED].split(",")
    assert "data" in named and "f39" in named and b"f39" not in body  # left out past the total


async def test_an_entry_large_by_its_field_names_is_refused_and_its_dead_letter_stays_small(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """The size limit counted values only, and a dead letter kept every field whose value was
    empty, names whole: 1,500 fields of 2,000-byte names and empty values (3 MB) were not
    too_large, and their dead letter was 3 MB (the README promises about 20 KiB each). Names
    count now, an entry of more than 64 fields is too_large, and a dead letter keeps at most
    64 fields and 16 KiB of names and values."""
    wide: dict[Any, Any] = {f"{i:04d}".encode() + b"n" * 1996: b"" for i in range(1500)}
    many: dict[Any, Any] = {f"f{i}".encode(): b"v" for i in range(100)}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(keys.events_stream, {b"name": b"chat.message", b"data": b"{}", **wide})
        pipe.xadd(keys.events_stream, {b"name": b"chat.message", b"data": b"{}", **many})
        pipe.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"ok"}'})
        await pipe.execute()  # fmt: skip
    await settle(redis, keys)
    chat = [r for r in await requests_in_streams(redis, keys) if r["w"] == "chat-reply"]
    assert [r["k"] for r in chat] == ["ok"]  # (its batch-mates are routed)
    dead = [f for _, f in await redis.xrange(keys.dead_stream)]
    assert [f[b"reason"] for f in dead] == [b"too_large", b"too_large"]
    assert b"3000022 bytes" in dead[0][b"detail"] and b"102 fields" in dead[1][b"detail"]
    for letter in dead:
        originals = {k: v for k, v in letter.items() if k not in Dead.ADDED}
        assert len(originals) <= Dead.FIELDS_MAX
        assert sum(len(k) + len(v) for k, v in originals.items()) <= Dead.TOTAL_MAX
        assert len(letter[b"truncated"]) <= 1024
    assert int(await redis.memory_usage(keys.dead_stream) or 0) < 64 * 1024


async def test_one_hostile_event_is_dead_lettered_alone_and_its_batch_mates_run(
    redis: Redis, keys: Keys, ingress: Ingress, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unforeseen exception while routing one entry (here injected) dead-letters that
    entry as `internal`, naming the exception, per workflow; before, it failed the whole batch,
    which was read again forever. JSON nested 1,023 levels deep (orjson's limit) is routed."""
    from supersede.services.ingress import service as ingress_module

    real_digest = ingress_module.event_digest  # type: ignore[attr-defined]

    def digest(event_id: str, workflow: str, explicit: bool = False) -> str:
        if event_id == "boom":
            raise RuntimeError("injected")
        return real_digest(event_id, workflow, explicit)

    monkeypatch.setattr(ingress_module, "event_digest", digest)
    deep = "[" * 1023 + "]" * 1023
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(20):
            pipe.xadd(keys.events_stream, {"name": "chat.message", "data": f'{{"userId":"u{i}"}}'})
            if i == 7:
                pipe.xadd(
                    keys.events_stream,
                    {"name": "chat.message", "data": f'{{"userId":"x","deep":{deep}}}'},
                )
                pipe.xadd(
                    keys.events_stream,
                    {"name": "chat.message", "data": '{"userId":"y"}', "id": "boom"},
                )
        await pipe.execute()  # fmt: skip
    await settle(redis, keys)
    chat = [r for r in await requests_in_streams(redis, keys) if r["w"] == "chat-reply"]
    assert sorted(r["k"] for r in chat) == sorted([*(f"u{i}" for i in range(20)), "x"])
    dead = [f for _, f in await redis.xrange(keys.dead_stream)]
    assert sorted((f[b"reason"], f[b"workflow"]) for f in dead) == [
        (b"internal", b"audit"), (b"internal", b"chat-reply")
    ]  # fmt: skip
    assert all(f[b"detail"] == b"RuntimeError: injected" for f in dead)


async def test_an_entry_that_repeats_a_field_name_is_judged_by_all_it_holds(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """Redis keeps every pair of an entry, a name given twice too; a dict keeps the last. So
    5,000 repeats of one field passed the 64-field limit, 30 fields of 900 KB under one name
    (27 MB) the 1 MiB one, and `name chat.message name user.signup` ran as user.signup. Now
    the count and the size are those of the whole entry, and a repeated name is a
    `repeated_field` dead letter; the good event between them makes its run."""
    chat = {"name": "chat.message", "data": '{"userId": "u"}'}
    flat = [b"name", b"chat.message", b"name", b"user.signup", b"data", b'{"userId": "x"}']
    entries = [
        flat,
        [b"name", b"chat.message", b"data", b"{}", *[b"pad", b"v"] * 5_000],
        [b"name", b"chat.message", b"data", b"{}", *[b"pad", b"p" * 400_000] * 3],
    ]
    ids = [await redis.execute_command("XADD", keys.events_stream, "*", *e) for e in entries]
    good = await redis.xadd(keys.events_stream, chat)
    await settle(redis, keys)
    letters = {f[b"entry"]: f for _, f in await redis.xrange(keys.dead_stream)}
    assert set(letters) == set(ids)
    repeated, many, large = (letters[i] for i in ids)
    assert repeated[b"reason"] == b"repeated_field", repeated
    assert b"'name'" in repeated[b"detail"] and repeated[b"name"] == b"user.signup"
    assert (many[b"reason"], large[b"reason"]) == (b"too_large", b"too_large")
    assert b"5002 fields" in many[b"detail"], many[b"detail"]
    assert b"byte limit" in large[b"detail"], large[b"detail"]
    requests = await requests_in_streams(redis, keys)
    assert [(r["w"], r["k"]) for r in requests if r["w"] == "chat-reply"] == [("chat-reply", "u")]
    assert {r["ev"] for r in requests} == {good.decode()}


async def test_costly_events_do_not_hold_back_the_events_read_before_them(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read of 40 plain events, then 100 whose key expression walks a 499-item list
    (about 14 ms each): the plain ones' requests are written while the costly ones are still
    being routed. Before, a read was routed whole before any of it was written, so the events
    read before costly ones waited for all of them (1.4 s here; a read holds up to --batch).
    A read routed for longer than --claim-idle-ms is not taken over by its own process: it
    was, and handled twice at once (165 requests of 140 events, on a loaded machine)."""
    from supersede.services.ingress import service as ingress_module

    costly = {
        "id": "costly",
        "events": ["doc.saved"],
        "concurrency": {
            "expression": "input.items.map(x, x).join(',').size() > 0 ? 'k' : 'k'",
            "max_runs": 1,
        },
    }
    await register(redis, keys, costly)
    monkeypatch.setattr(ingress_module, "FIRST_READ", 500)  # (the whole burst in one read)
    async with running_ingress(redis, redis_url, keys, claim_idle_ms=100):
        items = [f"item-{i:05d}-" + "y" * 50 for i in range(499)]
        async with redis.pipeline(transaction=True) as pipe:  # (one read takes them all)
            for _ in range(40):
                pipe.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"items": []}'})
            for i in range(100):
                data = orjson.dumps({"items": items, "n": i})
                pipe.xadd(keys.events_stream, {"name": "doc.saved", "data": data})
            ids = [e.decode() for e in await pipe.execute()]
        plain = set(ids[:40])
        seen: list[int] = []

        async def plain_written() -> bool:
            written = {r["ev"] for r in await requests_in_streams(redis, keys)}
            seen.append(len(written - plain))
            return plain <= written

        await eventually(plain_written, timeout=30)
        # (the costly ones: 1.4 s on a quiet machine, past 20 s on a loaded one)
        await settle(redis, keys, timeout=90)
    assert seen[-1] < 100, seen  # (the costly ones were still being routed)
    assert len(await requests_in_streams(redis, keys)) == 140
    assert not await redis.xlen(keys.dead_stream)


async def test_an_invalid_stored_definition_is_skipped_and_the_valid_ones_served(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """A stored definition with `parents: [{}]` (written by hand, bypassing registration) made
    load_all raise TypeError, so ingress could neither start nor reload."""
    await register(redis, keys, CHAT)
    bad = {"id": "bad", "events": ["chat.message"], "steps": [{"name": "a", "parents": [{}]}]}
    await redis.hset(keys.workflows_hash, "bad", orjson.dumps(bad))
    with pytest.raises(DefinitionError, match=r"steps\[0\]\.parents"):
        await register(redis, keys, bad)
    async with running_ingress(redis, redis_url, keys):
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"u"}'})
        await settle(redis, keys)
        assert [r["w"] for r in await requests_in_streams(redis, keys)] == ["chat-reply"]
        from supersede.services.ingress import metrics

        assert metrics.INVALID_WORKFLOWS._value.get() == 1


async def test_workflows_of_a_scope_must_agree_on_its_limits(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """Registering a workflow whose scope another workflow uses with other limits fails naming
    `concurrency.scope`; one stored anyway (a race) is skipped by ingress, the first served."""
    conc = {"expression": "input.user", "max_runs": 1, "scope": "chat"}
    await register(redis, keys, {"id": "a", "events": ["go"], "concurrency": conc})
    await register(redis, keys, {"id": "b", "events": ["go"], "concurrency": conc})
    clash = {"id": "c", "events": ["go"], "concurrency": {**conc, "max_runs": 2}}
    with pytest.raises(DefinitionError, match="shared with workflow 'a'") as err:
        await register(redis, keys, clash)
    assert err.value.field == "concurrency.scope"
    await redis.hset(keys.workflows_hash, "c", orjson.dumps({**clash, "version": "v1"}))
    async with running_ingress(redis, redis_url, keys):
        await redis.xadd(keys.events_stream, {"name": "go", "data": '{"user": "u"}'})
        await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    assert sorted(r["w"] for r in reqs) == ["a", "b"]
    assert len({r["g"] for r in reqs}) == 1  # one group for both workflows
    # (a scope's group may keep another version's queue: admission reads it, see admit.lua)
    assert [r.get("sc") for r in reqs] == [1, 1]


async def test_an_ingress_with_no_workflow_registered_warns_naming_its_namespace(
    redis: Redis,
    redis_url: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ingress pointed at another namespace or server than the executors' reads nothing,
    and nothing rang: its own inbox is empty, it is ready, one INFO line at its start (a probe:
    1,000 events waited unread). After a while with no workflow it warns, and again, naming
    the namespace and the server; the alert reads its workflows gauge, 0."""
    from supersede.services.ingress import metrics
    from supersede.services.ingress import service as ingress_service

    monkeypatch.setattr(ingress_service, "NO_WORKFLOWS_WARN_EVERY", 0.2)
    said = "no valid workflow is registered in this namespace on this server"

    async def warned(n: int) -> bool:
        return sum(said in r.getMessage() for r in caplog.records) >= n

    with caplog.at_level(logging.WARNING, logger="supersede"):
        async with running_ingress(redis, redis_url, keys):
            await eventually(lambda: warned(2), timeout=10)
            assert metrics.WORKFLOWS._value.get() == 0
    line = next(r for r in caplog.records if said in r.getMessage())
    assert line.namespace == keys.namespace  # type: ignore[attr-defined]
    assert "SUPERSEDE_NAMESPACE" in line.getMessage()


async def test_an_event_no_workflow_listens_to_is_acknowledged_not_dead_lettered(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    await redis.xadd(keys.events_stream, {"name": "nobody.listens", "data": "{}"})
    await settle(redis, keys)
    assert await redis.xlen(keys.dead_stream) == 0
    assert await requests_in_streams(redis, keys) == []


async def test_a_field_the_contract_does_not_define_is_ignored_counted_and_said(
    redis: Redis, keys: Keys, ingress: Ingress, caplog: pytest.LogCaptureFixture
) -> None:
    """`metdata` for `metadata`: the field was ignored without a word, so the key expression
    read no metadata and a misspelt `id` made a run per publish (an API-user probe). The event
    still runs (a producer may add fields of its own), and the field is counted and named."""
    from prometheus_client import REGISTRY

    def unknown() -> float:
        return REGISTRY.get_sample_value("supersede_ingress_unknown_fields_total") or 0.0

    before = unknown()
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await redis.xadd(
            keys.events_stream,
            {"name": "chat.message", "data": '{"userId":"u"}', "metdata": '{"t": 1}'},
        )
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"v"}'})
        await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    assert sorted(r["k"] for r in reqs if r["w"] == "chat-reply") == ["u", "v"]
    assert unknown() - before == 1
    said = [r for r in caplog.records if "does not define" in r.getMessage()]
    assert len(said) == 1 and said[0].fields == ["metdata"], said  # type: ignore[attr-defined]


async def test_replays_of_one_id_give_one_request_per_workflow(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    for _ in range(3):
        await redis.xadd(
            keys.events_stream, {"name": "chat.message", "data": '{"userId":"u"}', "id": "same"}
        )
    await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    assert sorted(r["w"] for r in reqs) == ["audit", "chat-reply"]


async def test_one_id_is_one_run_per_workflow_whatever_its_key(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """The same `id` with other payloads and keys (so other groups and shards): the first
    entry's requests only. Before, the seen set was per shard and each shard made a run."""
    users = [f"u{i}" for i in range(12)]
    [chat] = [r for r in ingress.routes["chat.message"] if r.workflow.id == "chat-reply"]
    shards = {chat.group_of(u, keys.shards)[1] for u in users}
    for user in users:
        data = orjson.dumps({"userId": user})
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data, "id": "once"})
    await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    assert sorted(r["w"] for r in reqs) == ["audit", "chat-reply"]
    assert [r["k"] for r in reqs if r["w"] == "chat-reply"] == ["u0"]
    assert len(shards) > 1  # the keys did spread over shards


async def test_an_id_claimed_by_an_entry_that_crashed_before_appending_still_runs(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """A crash between the id claim and the append leaves the claim: the redelivered entry
    still owns its ids and appends; an entry whose id another entry owns appends nothing."""

    async def claim(event_id: str, workflow: str, entry: bytes) -> bool:
        digest = event_digest(event_id, workflow)
        shard = shard_of_digest(digest, keys.shards)
        [owned] = await ingress.scripts.claim_ids(shard, [(digest, entry)], window_ms=60_000)
        return owned

    data = orjson.dumps({"userId": "u"})
    entry = await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data, "id": "x"})
    # Whether ingress read the entry before this claim or after, the entry owns its ids.
    assert await claim("x", "chat-reply", entry)
    assert await claim("y", "audit", b"1-1")  # owned by an entry that is not the next one
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data, "id": "y"})
    await settle(redis, keys)
    reqs = await requests_in_streams(redis, keys)
    assert sorted((r["ev"], r["w"]) for r in reqs) == [
        ("x", "audit"), ("x", "chat-reply"), ("y", "chat-reply")
    ]  # fmt: skip


async def test_a_workflow_registered_while_running_is_picked_up(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"doc": "d1"}'})
    await settle(redis, keys)
    await register(redis, keys, {"id": "reindex", "events": ["doc.saved"],
                                 "concurrency": {"expression": "input.doc"}})  # fmt: skip

    async def routed() -> bool:
        await redis.xadd(keys.events_stream, {"name": "doc.saved", "data": '{"doc": "d2"}'})
        await settle(redis, keys)
        return any(r["w"] == "reindex" for r in await requests_in_streams(redis, keys))

    await eventually(routed, timeout=3)


async def test_sigkill_mid_batch_then_restart_gives_exactly_one_run_or_dead_letter(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    await register(redis, keys, CHAT)
    await register(redis, keys, AUDIT)
    n = 6_000
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            if i % 50 == 0:
                pipe.xadd(keys.events_stream, {"name": "chat.message", "data": "broken"})
            else:
                data = orjson.dumps({"userId": f"u{i % 100}"})
                pipe.xadd(keys.events_stream, {"name": "chat.message", "data": data, "id": f"e{i}"})
        await pipe.execute()
    env = {**os.environ, "SUPERSEDE_REDIS_URL": redis_url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": str(keys.shards)}  # fmt: skip
    cmd = [sys.executable, "-m", "supersede", "ingress", "--metrics-port", "0", "--batch", "25",
           "--block-ms", "100"]  # fmt: skip

    async def appended() -> int:
        return len(await requests_in_streams(redis, keys))

    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        for threshold in (1, n // 3):
            await eventually(lambda t=threshold: _at_least(appended, t), timeout=30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            assert await appended() < 2 * n * 49 // 50, "killed too late to prove anything"
            proc = subprocess.Popen(
                [*cmd, "--claim-idle-ms", "200"], env=env, stderr=subprocess.DEVNULL
            )
        await eventually(lambda: inbox_done(redis, keys), timeout=60)
    finally:
        proc.kill()
        proc.wait(5)
    reqs = await requests_in_streams(redis, keys)
    # A batch re-read after the kill appends its requests again; admission makes each run once.
    expected_events = {f"e{i}" for i in range(n) if i % 50}
    for workflow in ("chat-reply", "audit"):
        assert {r["ev"] for r in reqs if r["w"] == workflow} == expected_events
    scripts = Scripts(redis, keys)
    created = duplicates = 0
    for sk in keys.all_shards():
        entries = [(e, p) for e, f in await redis.xrange(sk.requests_stream)
                   for p in request_payloads(f) or []]  # fmt: skip
        for i in range(0, len(entries), 500):
            result = await scripts.admit(sk.shard, entries[i : i + 500])
            created, duplicates = created + result.created, duplicates + result.duplicates
    assert created == 2 * len(expected_events) and created + duplicates == len(reqs)
    runs = [r for sk in keys.all_shards() for r in (await redis.hgetall(sk.runs_hash)).values()]
    assert len(runs) == created
    dead = await redis.xrange(keys.dead_stream)
    assert len(dead) == n // 50
    assert len({f[b"entry"] for _, f in dead}) == n // 50


async def _at_least(count: Any, threshold: int) -> bool:
    return bool(await count() >= threshold)


async def test_two_ingress_processes_share_the_inbox_and_stop_on_sigterm(
    redis: Redis, redis_url: str, keys: Keys
) -> None:

    from supersede.server import free_port

    await register(redis, keys, CHAT)
    n = 3_000
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(
                keys.events_stream,
                {"name": "chat.message", "data": orjson.dumps({"userId": f"u{i}"})},
            )
        await pipe.execute()
    env = {**os.environ, "SUPERSEDE_REDIS_URL": redis_url, "SUPERSEDE_NAMESPACE": keys.namespace,
           "SUPERSEDE_SHARDS": str(keys.shards)}  # fmt: skip
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supersede",
                "ingress",
                "--metrics-port",
                str(port),
                "--batch",
                "20",
                "--block-ms",
                "100",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        await eventually(lambda: inbox_done(redis, keys), timeout=60)

        requested = 'supersede_ingress_runs_requested_total{workflow="chat-reply"}'
        bodies: list[str] = []

        async def counted() -> float:  # (the counter moves after the inbox acknowledgement)
            bodies[:] = [
                await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
                for port in ports
            ]
            prefix = "supersede_ingress_events_total "
            lines = [x for body in bodies for x in body.splitlines() if x.startswith(prefix)]
            return sum(float(x.split()[1]) for x in lines)

        await eventually(lambda: _at_least(counted, n), timeout=10)
        assert await counted() == n  # each event read once, by one of the two
        # (by either: how the events split between the two depends on timing; one may get none)
        assert any(requested in body for body in bodies)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(10) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)
    reqs = await requests_in_streams(redis, keys)
    assert len(reqs) == n and len({r["id"] for r in reqs}) == n


async def test_a_failed_batch_is_read_again_at_once_not_after_the_takeover_delay(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """The writes of a batch fail (a shard key of the wrong type stands in for a failover):
    the entries stay pending for this consumer, which reads them again from '0' after each
    failure, so they land as soon as the cause is gone, not after the 30 s XAUTOCLAIM idle."""
    assert ingress.config.claim_idle_ms >= 30_000
    for sk in keys.all_shards():
        await redis.set(sk.requests_stream, "not a stream")  # every append script call fails
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId":"u1"}'})
    await redis.xadd(keys.events_stream, {"name": "user.signup", "data": "{}"})

    async def pending() -> bool:
        return int((await redis.xpending(keys.events_stream, INGRESS_GROUP))["pending"]) == 2

    await eventually(pending)
    await asyncio.sleep(1.0)  # a few failed attempts
    assert {await redis.type(sk.requests_stream) for sk in keys.all_shards()} == {b"string"}
    for sk in keys.all_shards():
        await redis.delete(sk.requests_stream)
    await eventually(lambda: inbox_done(redis, keys), timeout=15)
    reqs = await requests_in_streams(redis, keys)
    assert sorted((r["w"], r["k"]) for r in reqs if r["w"] == "chat-reply") == [
        ("chat-reply", "u1")
    ]
    assert len(reqs) == 3  # chat-reply + audit for the message, audit for the signup; no repeats


# -- fuzz -----------------------------------------------------------------------------------------
def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # (a named function: hypothesis 6.170 takes a lambda here for one that ignores `inner`)
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    _containers,
    max_leaves=20,
)  # fmt: skip
_data = st.one_of(
    st.builds(lambda v: orjson.dumps({"userId": v}), st.text(max_size=30) | st.integers(0, 99)),
    st.just(b'{"userId": 123456789012345678901234567890}'),
    st.builds(lambda v: orjson.dumps(v), _json),
    st.builds(lambda n: ("[" * n + "]" * n).encode(), st.integers(1, 1100)),
    st.binary(max_size=60),
)
_entry = st.fixed_dictionaries(
    {"name": st.sampled_from([b"chat.message", b"user.signup"]) | st.binary(max_size=10)},
    optional={
        "data": _data,
        "id": st.binary(max_size=10) | st.binary(min_size=1020, max_size=1030),
        "encoding": st.sampled_from([b"json", b"msgpack"]) | st.binary(max_size=6),
        "metadata": _data,
        "other": st.text(max_size=10).map(str.encode),
    },
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=st.lists(_entry, min_size=1, max_size=10))
def test_fuzzed_inbox_entries_each_end_as_requests_or_dead_letters(
    redis_url: str, entries: list[dict[str, bytes]]
) -> None:  # fmt: skip
    """Random field maps, encodings, nesting, sizes and unicode through the real ingress on a
    real server: nothing stays pending, and each entry ends as one outcome per workflow it
    triggers (a request or a dead letter naming it), or one dead letter, or (a name nobody
    listens to) nothing."""
    asyncio.run(_fuzz_once(redis_url, entries))


async def _fuzz_once(redis_url: str, entries: list[dict[str, bytes]]) -> None:
    keys = Keys(f"fz{uuid.uuid4().hex[:10]}", 4)
    redis = Redis.from_url(redis_url)
    await register(redis, keys, CHAT)
    await register(redis, keys, AUDIT)
    try:
        async with running_ingress(redis, redis_url, keys):
            await _fuzz_check(redis, keys, entries)
    finally:
        await redis.aclose()


async def _fuzz_check(redis: Redis, keys: Keys, entries: list[dict[str, bytes]]) -> None:
    ids = [await redis.xadd(keys.events_stream, dict(e)) for e in entries]
    await eventually(lambda: inbox_done(redis, keys), timeout=20)
    dead: dict[bytes, list[bytes]] = {}
    for _, f in await redis.xrange(keys.dead_stream):
        dead.setdefault(f[b"entry"], []).append(f.get(b"workflow", b""))
    requested: Counter[str] = Counter()
    for r in await requests_in_streams(redis, keys):
        requested[r["w"]] += 1
    routed = {b"chat.message": ("audit", "chat-reply"), b"user.signup": ("audit",)}
    explicit_ids: set[tuple[bytes, str]] = set()
    expected_requests: Counter[str] = Counter()
    for entry_id, fields in zip(ids, entries, strict=True):
        got = dead.get(entry_id, [])
        workflows = routed.get(fields["name"], ())
        if got == [b""]:
            continue  # refused as a whole: one dead letter
        assert b"" not in got, (fields, got)
        assert len(got) == len(set(got)), got  # at most one per workflow
        event_id = fields.get("id", entry_id)
        for wf in workflows:
            if wf.encode() not in got and (event_id, wf) not in explicit_ids:
                expected_requests[wf] += 1
                explicit_ids.add((event_id, wf))
        if not workflows:
            assert got == [], (fields, got)
    assert requested == expected_requests


async def test_the_inbox_lag_counts_entries_read_and_not_handled(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """An ingress that reads but cannot write (its user lost a right, say) keeps reading, so its
    entries pile up pending, not unread: the gauge counts both (it counted the unread only, so
    it read 0 while nothing was handled)."""
    from prometheus_client import REGISTRY

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    service = Ingress(redis, settings, IngressConfig())
    await redis.xgroup_create(keys.events_stream, INGRESS_GROUP, id="0", mkstream=True)
    for _ in range(5):
        await redis.xadd(keys.events_stream, {"name": "x", "data": "{}"})
    await redis.xreadgroup(INGRESS_GROUP, "stuck", {keys.events_stream: ">"}, count=3)
    await service._measure_lag()
    assert REGISTRY.get_sample_value("supersede_ingress_inbox_lag") == 5  # 3 pending, 2 unread


async def test_with_no_workflow_registered_the_inbox_waits(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """An empty registry (a namespace whose executors have not started, a server that lost its
    data) routes nothing: ingress reads nothing then, rather than acknowledge every event with
    no workflow to run it; once a workflow is registered, the events waiting are routed."""
    # (a stored definition no version of ingress can read counts for nothing)
    await redis.hset(keys.workflows_hash, "broken", b'{"id": "broken"}')
    async with running_ingress(redis, redis_url, keys):
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId": "u"}'})
        await asyncio.sleep(0.5)  # (a negative needs the chance: ingress polls every 50 ms)
        [group] = await redis.xinfo_groups(keys.events_stream)
        assert int(group["lag"]) == 1 and int(group["pending"]) == 0
        await register(redis, keys, CHAT)
        await settle(redis, keys)
    assert [r["w"] for r in await requests_in_streams(redis, keys)] == ["chat-reply"]


async def test_a_dead_letter_names_the_runs_it_stands_for(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """`wait_for_run(..., entry=)` gives up at once on a run whose event was dead-lettered: for
    the whole event (it is too large), or for the run's own workflow (its key failed); not for
    another workflow's key, whose run of the same event is still made, nor for a dead letter of
    admission's (an id of another stream)."""
    from supersede.client import dead_letter_of

    no_user = await redis.xadd(keys.events_stream, {"name": "chat.message", "data": "{}"})
    big = await redis.xadd(keys.events_stream, {"name": "chat.message", "data": "x" * 2_000_000})
    await settle(redis, keys)
    ns = keys.namespace
    entry = no_user.decode()
    assert (await dead_letter_of(redis, entry, "chat-reply", namespace=ns) or ("",))[0] == (
        "key_error"
    )
    assert await dead_letter_of(redis, entry, "audit", namespace=ns) is None
    assert await dead_letter_of(redis, entry, namespace=ns) is None
    assert [r["w"] for r in await requests_in_streams(redis, keys)] == ["audit"]
    for workflow in ("chat-reply", "audit", None):
        found = await dead_letter_of(redis, big.decode(), workflow, namespace=ns)
        assert found is not None and found[0] == "too_large"
    # admission's dead letters carry the id of an entry of another stream: not this event's
    await redis.xadd(keys.dead_stream, {"reason": "malformed", "detail": "x", "entry": entry,
                                        "stream": "elsewhere"})  # fmt: skip
    assert await dead_letter_of(redis, entry, "audit", namespace=ns) is None


async def test_a_flood_of_bad_events_writes_a_line_per_kind_not_per_event(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Each dead letter wrote a log line (a probe: 10,767 lines for as many bad events); now
    the first of each reason and workflow in 5 s, and the next says how many were not written."""
    import logging

    await register(redis, keys, CHAT)
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(500):
            pipe.xadd(keys.events_stream, {"name": "chat.message", "data": "{not json"})
            pipe.xadd(keys.events_stream, {"name": "chat.message", "data": '{"noUser": 1}'})
        await pipe.execute()
    with caplog.at_level(logging.WARNING, logger="supersede"):
        async with running_ingress(redis, redis_url, keys) as service:
            await settle(redis, keys)
            lines = [r for r in caplog.records if r.getMessage() == "event dead-lettered"]
            assert sorted((r.reason, r.workflow) for r in lines) == [  # type: ignore[attr-defined]
                ("bad_json", None), ("key_error", "chat-reply")
            ]  # fmt: skip
            service.dead_lines.every = 0.0  # (the window passed)
            await redis.xadd(keys.events_stream, {"name": "chat.message", "data": "{not json"})
            await settle(redis, keys)
    last = [r for r in caplog.records if r.getMessage() == "event dead-lettered"][-1]
    # (the 499 other bad_json letters of the flood were not written)
    assert (last.reason, last.repeats) == ("bad_json", 499)  # type: ignore[attr-defined]
    assert int(await redis.xlen(keys.dead_stream)) == 1001


async def test_a_dead_letter_is_said_once_written_not_while_the_server_refuses_it(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad event's line was written as it was routed, before its letter was: a server at
    its maxmemory refused the letter, the batch was tried again and again, and each 5 s the
    log said "event dead-lettered" of a letter that was not (a probe). It is said once
    written."""
    await register(redis, keys, CHAT)
    async with running_ingress(redis, redis_url, keys):
        pass  # (its group created)
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": "{not json"})
    await redis.config_set("maxmemory", 1)
    try:
        with caplog.at_level(logging.WARNING, logger="supersede"):
            async with running_ingress(redis, redis_url, keys):

                async def refused() -> bool:
                    return any("batch failed" in r.getMessage() for r in caplog.records)

                await eventually(refused)
                said = [r for r in caplog.records if r.getMessage() == "event dead-lettered"]
                assert not said and int(await redis.xlen(keys.dead_stream)) == 0
                await redis.config_set("maxmemory", 0)
                await settle(redis, keys)
    finally:
        await redis.config_set("maxmemory", 0)
    said = [r for r in caplog.records if r.getMessage() == "event dead-lettered"]
    assert [r.reason for r in said] == ["bad_json"]  # type: ignore[attr-defined]
    assert int(await redis.xlen(keys.dead_stream)) == 1


async def test_a_burst_of_large_entries_after_a_backlog_of_small_ones_is_read_a_few_at_a_time(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a backlog of small entries the reads asked for --batch, and a burst of large ones
    that came after a quiet moment was read --batch at once (here 30 x 300 KB, 9 MB, in one
    read). A read that finds nothing sends the next back to FIRST_READ; a second burst after
    another quiet moment, and the own-pending sweeps between reads of a backlog (they find
    nothing), leave the count the size of the entries allows."""
    from supersede import streams
    from supersede.services.ingress import service as module

    monkeypatch.setattr(module, "READ_BYTES", 1 << 20, raising=False)
    monkeypatch.setattr(module, "FIRST_READ", 2, raising=False)
    sweeps = functools.partial(streams.OwnPending, sweep_every=0.01)
    monkeypatch.setattr(module, "OwnPending", sweeps, raising=False)
    reads: list[tuple[int, int]] = []  # (entries, bytes) of each read
    real = module.read_then  # type: ignore[attr-defined]

    async def measured(*args: Any, **kwargs: Any) -> Any:
        reply, then = await real(*args, **kwargs)
        reads.append((
            sum(len(es) for _, es in reply or []),
            sum(len(v) for _, es in reply or [] for _, f in es for v in f.values()),
        ))  # fmt: skip
        return reply, then

    async def burst(n: int) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(n):
                data = orjson.dumps({"userId": f"big{i}", "pad": "x" * 300_000})
                pipe.xadd(keys.events_stream, {"name": "chat.message", "data": data})
            await pipe.execute()

    monkeypatch.setattr(module, "read_then", measured)
    await register(redis, keys, CHAT)
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.xadd(keys.events_stream, {"name": "chat.message", "data": f'{{"userId": "s{i}"}}'})
        await pipe.execute()
    async with running_ingress(redis, redis_url, keys) as service:
        await settle(redis, keys)
        assert max(n for n, _ in reads) >= 500  # (the backlog: up to --batch a read)
        await eventually(lambda: asyncio.sleep(0, getattr(service, "count", 0) == 2))
        before = len(reads)
        await burst(30)
        await settle(redis, keys)
        await asyncio.sleep(0.1)  # (a quiet moment: reads that find nothing)
        await burst(60)
        await settle(redis, keys)
    sizes = [size for _, size in reads[before:]]
    assert sum(sizes) > 90 * 300_000 and max(sizes) <= 3 * 300_100, sizes
    reqs = await requests_in_streams(redis, keys)
    assert len({r["k"] for r in reqs}) == 3060


async def test_a_backlog_of_large_entries_is_read_a_few_at_a_time(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads were bounded by count only: a backlog of large entries (anyone may XADD them;
    those over --max-payload are dead-lettered, but read first) was read a thousand at a time
    (a probe: 40 entries of 25 MiB, 1.1 GB of memory kept). Each read now holds about
    READ_BYTES (here 1 MiB) of entries the size of the last read's, and every event is still
    accounted for."""
    from supersede.services.ingress import service as module

    monkeypatch.setattr(module, "READ_BYTES", 1 << 20, raising=False)
    monkeypatch.setattr(module, "FIRST_READ", 2, raising=False)
    reads: list[int] = []  # bytes of each read
    asked: list[int] = []  # the count each read asked for
    real = module.read_then  # type: ignore[attr-defined]

    async def measured(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["count"])
        reply, then = await real(*args, **kwargs)
        reads.append(sum(len(v) for _, es in reply or [] for _, f in es for v in f.values()))
        return reply, then

    monkeypatch.setattr(module, "read_then", measured)
    await register(redis, keys, CHAT)
    for i in range(30):
        data = orjson.dumps({"userId": f"big{i}", "pad": "x" * 300_000})
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data})
    for i in range(5):  # over --max-payload: dead-lettered
        data = orjson.dumps({"userId": f"huge{i}", "pad": "x" * (2 << 20)})
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data})
    for i in range(50):
        await redis.xadd(
            keys.events_stream, {"name": "chat.message", "data": f'{{"userId": "s{i}"}}'}
        )
    async with running_ingress(redis, redis_url, keys):
        await settle(redis, keys)
    assert max(reads) <= 3 * (2 << 20) + 3 * 400, reads  # (all 18.6 MiB in one read before)
    # small entries again: the reads ask for more (entries of 300 KB allow 3 at most; the
    # count after settling may be back to FIRST_READ, a read having found the inbox empty)
    assert max(asked) > 3, asked
    reqs = await requests_in_streams(redis, keys)
    assert len({r["k"] for r in reqs}) == 80
    dead = await redis.xrange(keys.dead_stream)
    assert sorted(d[b"reason"] for _, d in dead) == [b"too_large"] * 5


async def test_a_huge_entry_taken_over_comes_back_cut_and_is_dead_lettered(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry of 250 MB took the ingress process that read it past its memory limit (killed,
    no dead letter), and each process that took it over 30 s later was killed the same way:
    intake stopped for good (a security probe). A take-over now gets such an entry cut (its
    first fields, each value cut, with its true size), never whole, dead-letters it
    `too_large`, and handles its page-mates as before."""
    handed: list[int] = []
    handle = Ingress.handle

    async def measured(self: Ingress, entries: Any) -> None:
        handed.extend(sum(len(k) + len(v) for k, v in f.items()) for _, f in entries)
        await handle(self, entries)

    monkeypatch.setattr(Ingress, "handle", measured)
    await register(redis, keys, CHAT)
    stream = keys.events_stream
    await redis.xgroup_create(stream, INGRESS_GROUP, id="$", mkstream=True)
    huge = await redis.xadd(stream, {"name": "chat.message", "data": b"x" * (40 << 20), "n": "1"})
    await redis.xadd(stream, {"name": "chat.message", "data": '{"userId": "mate"}'})
    await redis.xreadgroup(INGRESS_GROUP, "ingress-that-died", {stream: ">"})
    async with running_ingress(redis, redis_url, keys, claim_idle_ms=50):

        async def dead_lettered() -> bool:
            return bool(await redis.xlen(keys.dead_stream))

        await eventually(dead_lettered)
        await settle(redis, keys)
    assert [r["k"] for r in await requests_in_streams(redis, keys)] == ["mate"]
    assert len(handed) == 2 and max(handed) < Dead.TOTAL_MAX, handed
    [(_, letter)] = await redis.xrange(keys.dead_stream)
    assert letter[b"reason"] == b"too_large" and letter[b"entry"] == huge
    assert f"entry of {(40 << 20) + 22} bytes".encode() in letter[b"detail"], letter[b"detail"]
    assert len(letter[b"data"]) == Dead.FIELD_MAX and letter[b"n"] == b"1"
    assert letter[b"truncated"] == b"data"  # (said cut: a replay is refused)


async def test_entries_a_take_over_handles_are_not_handled_again_by_a_sweep(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A take-over claims a dead process's entries, which makes them this process's own
    pending entries: the main loop's sweep of those (every 2 s) read them while the take-over
    was still handling them, and each was dead-lettered twice (4 runs in 12 of a security
    probe). The sweep leaves them to the take-over."""
    handle = Ingress.handle

    async def slow(self: Ingress, entries: Any) -> None:
        await asyncio.sleep(2.5)  # (past a sweep of own pending entries)
        await handle(self, entries)

    await register(redis, keys, CHAT)
    stream = keys.events_stream
    await redis.xgroup_create(stream, INGRESS_GROUP, id="$", mkstream=True)
    for _ in range(3):
        await redis.xadd(stream, {"name": "chat.message", "data": "{not json"})
    await redis.xreadgroup(INGRESS_GROUP, "ingress-that-died", {stream: ">"})
    async with running_ingress(redis, redis_url, keys, claim_idle_ms=50) as service:
        monkeypatch.setattr(Ingress, "handle", slow)

        async def handled() -> bool:
            taking = getattr(service, "taking", {})
            return await redis.xlen(keys.dead_stream) >= 3 and math.inf not in taking.values()

        await eventually(handled, timeout=20)
        await asyncio.sleep(3)  # (the take-over's handling ends, and another sweep comes)
    letters = [f[b"entry"] for _, f in await redis.xrange(keys.dead_stream)]
    assert len(letters) == 3 == len(set(letters)), letters


async def test_an_inbox_lag_redis_restored_wrong_is_set_right_and_said(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """After a restart from its AOF, Redis before 7.2.4 can keep a group's lag wrong for good
    though it read to the end (a soak probe: the inbox's lag 10,103; the gauge read the
    stream's length, `status` said entries were unread). Ingress sets it right (lua/heal_lag.lua)
    and says so; the state is made here with XGROUP SETID ... ENTRIESREAD."""
    await register(redis, keys, CHAT)
    stream = keys.events_stream
    await redis.xgroup_create(stream, INGRESS_GROUP, id="$", mkstream=True)
    for i in range(30):
        await redis.xadd(stream, {"name": "nobody.listens", "data": f'{{"n": {i}}}'})
    await redis.xreadgroup(INGRESS_GROUP, "gone", {stream: ">"}, count=30)
    [g] = await redis.xinfo_groups(stream)
    await redis.xack(stream, INGRESS_GROUP, *[e[0] for e in await redis.xrange(stream)])
    await redis.execute_command("XGROUP", "SETID", stream, INGRESS_GROUP,
                                g["last-delivered-id"], "ENTRIESREAD", 2)  # fmt: skip
    assert (await redis.xinfo_groups(stream))[0]["lag"] == 28

    async def set_right() -> bool:
        return bool((await redis.xinfo_groups(stream))[0]["lag"] == 0)

    with caplog.at_level(logging.WARNING, logger="supersede"):
        async with running_ingress(redis, redis_url, keys):
            await eventually(set_right, timeout=10)
    said = [r for r in caplog.records if r.getMessage().startswith("consumer groups' lags")]
    assert len(said) == 1 and said[0].said == {f"{stream} {INGRESS_GROUP}": 28}, said  # type: ignore[attr-defined]
    # under a user of a role from before it (no xgroup|setid): a warning naming the fix, and
    # the tick goes on (the refusal inside the script is a ResponseError, not NoPermissionError)
    await redis.execute_command("XGROUP", "SETID", stream, INGRESS_GROUP, "$", "ENTRIESREAD", 2)
    user = f"old-{uuid.uuid4().hex[:6]}"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all",
                                "-xgroup|setid")  # fmt: skip
    url = redis_url.replace("redis://", f"redis://{user}:pw@")
    old = Redis.from_url(url)
    try:
        settings = Settings(redis_url=url, namespace=keys.namespace, shards=keys.shards)
        service = Ingress(old, settings, IngressConfig())
        with caplog.at_level(logging.WARNING, logger="supersede"):
            await service.heal_lags([(stream, INGRESS_GROUP)])
        [line] = [r for r in caplog.records if "lags Redis reports are not" in r.getMessage()]
        assert "supersede acl --apply" in line.getMessage()
    finally:
        await old.aclose()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_entries_a_dead_ingress_read_and_a_producer_trimmed_are_reported_lost(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """An ingress process died holding five entries; a producer's XADD with MAXLEN then
    deleted them. The take-over found nothing and said nothing (the events were lost without
    a trace); now it counts them, names the cause in an error line, and the alert fires."""
    from prometheus_client import REGISTRY

    def deleted() -> float:
        labels = {"service": "ingress"}
        return REGISTRY.get_sample_value("supersede_pending_entries_deleted_total", labels) or 0

    await register(redis, keys, CHAT)
    stream = keys.events_stream
    await redis.xgroup_create(stream, INGRESS_GROUP, id="$", mkstream=True)
    for i in range(5):
        await redis.xadd(stream, {"name": "chat.message", "data": f'{{"userId": "lost{i}"}}'})
    await redis.xreadgroup(INGRESS_GROUP, "ingress-that-died", {stream: ">"})
    await redis.xadd(stream, {"name": "chat.message", "data": '{"userId": "kept"}'},
                     maxlen=1, approximate=False)  # fmt: skip
    before = deleted()
    async with running_ingress(redis, redis_url, keys, claim_idle_ms=50):
        await eventually(lambda: asyncio.sleep(0, deleted() - before >= 5))
        await settle(redis, keys)
    assert deleted() - before == 5
    assert [r["k"] for r in await requests_in_streams(redis, keys)] == ["kept"]
    [line] = [r for r in caplog.records if r.getMessage().startswith("pending entries were")]
    assert "MAXLEN" in line.getMessage() and line.entries == 5  # type: ignore[attr-defined]


async def test_an_inbox_id_ahead_of_the_clock_is_reported_with_its_repair(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer's XADD with an explicit id an hour ahead moved every later event's id (runs
    then showed negative times); the largest id stops every XADD. Nothing said so: now a gauge
    (against the server's clock) and an error line that names the repair, again when the
    largest id comes, not every check."""
    from prometheus_client import REGISTRY

    def ahead() -> float:
        return REGISTRY.get_sample_value("supersede_ingress_inbox_id_ahead_seconds") or 0.0

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "ahead of the clock" in r.getMessage()]

    await register(redis, keys, CHAT)
    async with running_ingress(redis, redis_url, keys, inbox_check_interval=0.1):
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId": "n"}'})
        await settle(redis, keys)
        await asyncio.sleep(0.3)  # (checks)
        assert ahead() == 0 and lines() == []
        hour = int(time.time() * 1000) + 3_600_000
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId": "l"}'},
                         id=f"{hour}-0")  # fmt: skip
        await eventually(lambda: asyncio.sleep(0, 3000 < ahead() <= 3600 and bool(lines())))
        assert "every later entry gets an id after it" in lines()[0] and "XSETID" in lines()[0]
        await asyncio.sleep(0.5)  # (five checks more: no line more)
        assert len(lines()) == 1
        top = 2**64 - 1
        await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId": "e"}'},
                         id=f"{top}-{top}")  # fmt: skip
        with pytest.raises(redis_sync.ResponseError, match="exhausted the last possible ID"):
            await redis.xadd(keys.events_stream, {"name": "chat.message", "data": "{}"})
        await eventually(lambda: asyncio.sleep(0, len(lines()) == 2))
        assert "every XADD to the inbox fails" in lines()[1]


async def test_the_last_id_check_resumes_once_the_acl_user_may_run_it(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An ingress user from before the check (no XINFO STREAM) said so once and never checked
    again, though the roles were applied again (an upgrade probe: it took a restart)."""
    from prometheus_client import REGISTRY
    from redis.exceptions import NoPermissionError

    from supersede.services.ingress import metrics as ingress_metrics
    from supersede.services.ingress import service as ingress_module

    monkeypatch.setattr(ingress_module, "UNCHECKED_RETRY", 0.2)
    ingress_metrics.INBOX_ID_AHEAD.set(0)  # (another test's check, this process)
    refused = [True]
    real = Redis.xinfo_stream

    async def xinfo_stream(self: Redis, name: str, full: bool = False) -> Any:
        if refused[0]:
            raise NoPermissionError("this user has no permissions to run the 'xinfo|stream'")
        return await real(self, name, full)

    monkeypatch.setattr(Redis, "xinfo_stream", xinfo_stream)
    await register(redis, keys, CHAT)
    hour = int(time.time() * 1000) + 3_600_000
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": '{"userId": "l"}'},
                     id=f"{hour}-0")  # fmt: skip

    def ahead() -> float:
        return REGISTRY.get_sample_value("supersede_ingress_inbox_id_ahead_seconds") or 0.0

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "is not checked" in r.getMessage()]

    async with running_ingress(redis, redis_url, keys, inbox_check_interval=0.05):
        await eventually(lambda: asyncio.sleep(0, bool(said())))
        await asyncio.sleep(0.5)  # (tried again twice: said once)
        assert len(said()) == 1
        refused[0] = False  # the roles applied again
        await eventually(lambda: asyncio.sleep(0, ahead() > 3000))


async def test_an_event_for_a_silent_shard_waits_whole_and_is_read_again_when_it_answers(
    redis: Redis, keys: Keys, ingress: Ingress
) -> None:
    """A cluster's silent shards (forced here): an event with a request for one stays pending,
    and none of its requests is appended, not even those for the shards that answer (the
    sweep of own pending entries re-read it every 2 s and appended those again, a review: 1.2
    million entries re-read in a probe of a long silence). The others are acknowledged. When
    one of two silent shards answers, the events held for it alone are read again at once and
    appended once (they waited for every shard to answer, a review); the others wait on."""
    from supersede.services.ingress import metrics

    routes = {r.workflow.id: r for r in ingress.routes["chat.message"]}
    a = routes["chat-reply"].group_of("held-a", keys.shards)[1]
    b_user = next(u for u in (f"held-b{i}" for i in range(100))
                  if routes["chat-reply"].group_of(u, keys.shards)[1] != a)  # fmt: skip
    b = routes["chat-reply"].group_of(b_user, keys.shards)[1]
    ingress.health.enabled = True  # (as on a cluster)
    ingress.health.silent = {a, b}
    held_before = metrics.EVENTS_HELD._value.get()
    shards_of: dict[str, set[int]] = {}  # entry -> the shards of its requests (chat, audit)
    for user in ["held-a", b_user, *(f"u{i}" for i in range(8))]:
        data = orjson.dumps({"userId": user})
        entry = await redis.xadd(keys.events_stream, {"name": "chat.message", "data": data})
        entry = entry.decode()
        shards_of[entry] = {routes["chat-reply"].group_of(user, keys.shards)[1],
                            routes["audit"].group_of(entry, keys.shards)[1]}  # fmt: skip
    n = len(shards_of)

    async def handled() -> tuple[set[str], Counter[str]]:
        """The entries pending (None among them: some not read yet), and the requests of each
        entry."""
        [group] = await redis.xinfo_groups(keys.events_stream)
        if int(group.get("lag") or 0):
            return {"-1"}, Counter()
        pending = {p["message_id"].decode() for p in await redis.xpending_range(
            keys.events_stream, INGRESS_GROUP, "-", "+", 100)}  # fmt: skip
        return pending, Counter(r["ev"] for r in await requests_in_streams(redis, keys))

    def touching(silent: set[int]) -> set[str]:
        return {e for e, shards in shards_of.items() if shards & silent}

    async def held_for(silent: set[int]) -> bool:
        pending, reqs = await handled()
        return pending == touching(silent) and sum(reqs.values()) == 2 * (n - len(pending))

    await eventually(lambda: held_for({a, b}))
    await asyncio.sleep(4.5)  # (two sweeps of own pending entries, had they run)
    pending, reqs = await handled()
    assert pending == touching({a, b}) and all(v == 2 for v in reqs.values())
    assert not pending & set(reqs)  # (nothing of a held event appended)
    assert metrics.EVENTS_HELD._value.get() - held_before == len(pending)  # (held once each)
    ingress.health.silent = {b}
    await eventually(lambda: held_for({b}), timeout=5)
    ingress.health.silent = set()
    await settle(redis, keys)
    _, reqs = await handled()
    assert len(reqs) == n and all(v == 2 for v in reqs.values())
