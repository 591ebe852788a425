"""Streams trimmed by consumption (supersede.trim) on a real server and a real cluster, and a
backlog far larger than one trim holds through an executor outage."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from supersede.keys import Keys
from supersede.registry import register
from supersede.server import EmbeddedCluster
from supersede.trim import trim_consumed, trim_older_than
from tests.support import APP, System, eventually, records


async def _fill(redis: Redis | RedisCluster, stream: str, n: int) -> list[Any]:
    ids = []
    for i in range(n):
        ids.append(await redis.xadd(stream, {"i": i}))
    return ids


async def _check_trims_only_what_every_group_acknowledged(
    redis: Redis | RedisCluster, tag: str
) -> None:
    read, ungrouped, done = f"{{{tag}a}}:s", f"{{{tag}b}}:s", f"{{{tag}c}}:s"
    ids = await _fill(redis, read, 300)
    await redis.xgroup_create(read, "g", id="0")
    await redis.xgroup_create(read, "slow", id="0")
    await redis.xreadgroup("g", "c", {read: ">"}, count=200)
    await redis.xack(read, "g", *ids[:150])
    await redis.xreadgroup("slow", "c", {read: ">"}, count=250)
    await redis.xack(read, "slow", *ids[:250])
    await _fill(redis, ungrouped, 50)
    done_ids = await _fill(redis, done, 40)
    await redis.xgroup_create(done, "g", id="0")
    await redis.xreadgroup("g", "c", {done: ">"})
    await redis.xack(done, "g", *done_ids)

    removed = await trim_consumed(redis, [read, ungrouped, done, f"{{{tag}d}}:missing"])
    # `g` still has entries 150..199 pending and 200..299 unread; `slow` acknowledged 250.
    assert [e[0] for e in await redis.xrange(read)] == ids[150:]
    assert await redis.xlen(ungrouped) == 50  # nobody has read it: kept whole
    assert await redis.xlen(done) == 0  # all acknowledged: nothing left
    assert removed == {read: 150, done: 40}
    await redis.xreadgroup("g", "c", {read: ">"})  # the unread ones are still readable
    assert (await redis.xpending(read, "g"))["pending"] == 150


async def test_streams_are_trimmed_only_below_what_every_group_acknowledged(
    redis: Redis,
) -> None:
    await _check_trims_only_what_every_group_acknowledged(redis, uuid.uuid4().hex[:8])


async def test_trimming_by_consumption_on_a_cluster(redis_cluster: EmbeddedCluster) -> None:
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        await _check_trims_only_what_every_group_acknowledged(client, uuid.uuid4().hex[:8])
    finally:
        await client.aclose()


async def test_control_messages_and_dead_letters_are_trimmed_by_age(redis: Redis) -> None:
    stream = f"{uuid.uuid4().hex[:8]}:control"
    old = int(time.time() * 1000) - 120_000
    for i in range(5):
        await redis.xadd(stream, {"op": "cancel"}, id=f"{old + i}-0")
    await redis.xadd(stream, {"op": "cancel"})
    assert await trim_older_than(redis, [stream], 60_000) == {stream: 5}
    assert await redis.xlen(stream) == 1


async def test_a_backlog_larger_than_any_cap_survives_an_executor_outage(
    redis: Redis, keys: Keys, system: System
) -> None:
    """3,000 runs are admitted while no executor runs, and the streams are trimmed every
    0.2 s meanwhile: only what every group acknowledged goes (the inbox and the requests,
    once read), the assignments wait for their executor. Then one starts: every run succeeds.
    (With the old length cap set below the backlog, `--stream-maxlen 100`, runs were lost.)"""
    system.start("admission", "--block-ms", "100", "--trim-interval", "0.2")
    body = {"id": "work", "events": ["work.item"], "steps": [{"name": "x"}]}

    await register(redis, keys, body)
    system.start("ingress", "--block-ms", "100", "--trim-interval", "0.2")
    n = 3_000
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(keys.events_stream, {"name": "work.item", "data": orjson.dumps({"i": i})})
        await pipe.execute()

    async def trimmed() -> bool:
        assigned = sum(1 for r in (await records(redis, keys)).values() if r["st"] == "A")
        inbox = await redis.xlen(keys.events_stream)
        requests = sum([await redis.xlen(sk.requests_stream) for sk in keys.all_shards()])
        return assigned == n and inbox == 0 and requests == 0

    await eventually(trimmed, timeout=60)
    waiting = sum([await redis.xlen(sk.assignments_stream("work")) for sk in keys.all_shards()])
    assert waiting == n
    system.start("executor", APP)

    async def all_done() -> bool:
        return sum(1 for r in (await records(redis, keys)).values() if r["st"] == "S") == n

    await eventually(all_done, timeout=120)


def test_a_group_with_pending_entries_of_unknown_age_keeps_the_whole_stream() -> None:
    """XPENDING is a second round trip: when it failed (or raced), the cut must not fall back
    to the last delivered entry, which would remove entries still pending."""
    from supersede.trim import consumed_below

    groups = [{"name": b"g", "pending": 3, "last-delivered-id": b"100-0"}]
    assert consumed_below(groups, {}) is None
    assert consumed_below(groups, {"g": b"90-1"}) == "90-1"
    idle = [{"name": b"g", "pending": 0, "last-delivered-id": b"100-0"}]
    assert consumed_below(idle, {}) == "100-1"


async def _consumers(redis: Redis, stream: str, group: str) -> dict[str, int]:
    """Consumer name -> its pending entries."""
    return {
        c["name"].decode(): int(c["pending"]) for c in await redis.xinfo_consumers(stream, group)
    }


async def test_only_idle_consumers_with_nothing_pending_are_forgotten(
    redis: Redis, keys: Keys
) -> None:
    """`gone` read and acknowledged long ago, `holding` read an entry it never acknowledged,
    `live` just read: only `gone` is deleted, and `holding`'s entry stays pending with it. A
    missing stream or group is no error."""
    from supersede.scripts import Scripts

    stream = f"{uuid.uuid4().hex[:8]}:s"
    ids = await _fill(redis, stream, 3)
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xreadgroup("g", "gone", {stream: ">"}, count=1)
    await redis.xack(stream, "g", ids[0])
    await redis.xreadgroup("g", "holding", {stream: ">"}, count=1)

    async def idle() -> bool:
        return all(int(c["idle"]) >= 300 for c in await redis.xinfo_consumers(stream, "g"))

    await eventually(idle, timeout=10)
    await redis.xreadgroup("g", "live", {stream: ">"}, count=1)
    await redis.xack(stream, "g", ids[2])
    scripts = Scripts(redis, keys)
    groups = [(stream, "g"), (stream, "nogroup"), (f"{stream}:missing", "g")]
    assert await scripts.forget_consumers(groups, idle_ms=300) == 1
    assert await _consumers(redis, stream, "g") == {"holding": 1, "live": 0}
    assert await scripts.forget_consumers(groups, idle_ms=300) == 0


async def test_the_consumers_of_gone_processes_are_forgotten_by_the_services(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Processes that are gone left consumers in the inbox's group, a requests stream's and an
    assignment stream's (as every restart and rolling deploy does): ingress and admission
    delete them once idle for --forget-consumers-after, and events still run.
    (Before, consumers were never deleted: each stream kept one per process that ever read.)"""
    from supersede.protocol import ADMISSION_GROUP, EXECUTOR_GROUP, INGRESS_GROUP
    from supersede.streams import ensure_group

    await register(redis, keys, {"id": "work", "events": ["work.item"], "steps": [{"name": "x"}]})
    sk = keys.shard(0)
    left = [
        (keys.events_stream, INGRESS_GROUP),
        (sk.requests_stream, ADMISSION_GROUP),
        (sk.assignments_stream("work"), EXECUTOR_GROUP),
    ]
    for stream, group in left:
        await ensure_group(redis, stream, group)
        for n in range(3):
            await redis.xreadgroup(group, f"gone-{n}", {stream: ">"}, count=1)
    fast = ("--block-ms", "100", "--trim-interval", "0.1", "--forget-consumers-after", "0.5")
    system.start("admission", *fast)
    system.start("ingress", *fast)

    async def forgotten() -> bool:
        for stream, group in left:
            if any(name.startswith("gone-") for name in await _consumers(redis, stream, group)):
                return False
        return True

    await eventually(forgotten, timeout=30)
    # (a live process's consumer may go too, when it sat idle: its next read makes it again)
    system.start("executor", APP)
    await redis.xadd(keys.events_stream, {"name": "work.item", "data": b"{}"})

    async def ran() -> bool:
        return [r["st"] for r in (await records(redis, keys)).values()] == ["S"]

    await eventually(ran, timeout=60)


async def test_dead_letters_are_capped_at_the_newest(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A flood of bad input: 300 dead letters within their retention. Admission keeps the
    newest --max-dead-letters of them. (Before, only their age trimmed them: 7 days of a flood,
    each up to 4 KiB a field.)"""
    ids = await _fill(redis, keys.dead_stream, 300)
    system.start("admission", "--block-ms", "100", "--trim-interval", "0.1",
                 "--max-dead-letters", "10")  # fmt: skip

    async def capped() -> bool:
        return int(await redis.xlen(keys.dead_stream)) == 10

    await eventually(capped, timeout=30)
    assert [e[0] for e in await redis.xrange(keys.dead_stream)] == ids[-10:]


async def test_ingress_caps_the_dead_letters_it_writes_while_admission_is_down(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A flood of bad input while admission (which trims the dead letters) is down: ingress
    writes them with MAXLEN ~ its --max-dead-letters, so they stay about that many (3,000
    kept before, every one until admission came back)."""
    await register(redis, keys, {"id": "w", "events": ["w.ev"]})  # (the inbox waits without)
    system.start("ingress", "--block-ms", "100", "--max-dead-letters", "100")
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.xadd(keys.events_stream, {"name": "w.ev", "data": f"not json {i}"})
        await pipe.execute()

    async def handled() -> bool:
        groups = await redis.xinfo_groups(keys.events_stream)
        return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0

    await eventually(handled, timeout=60)
    kept = int(await redis.xlen(keys.dead_stream))
    assert 100 <= kept <= 300, kept  # (about: whole nodes of 100 entries are trimmed)
    newest = await redis.xrevrange(keys.dead_stream, count=1)
    assert newest[0][1][b"data"] == b"not json 2999"


async def test_explicit_event_ids_past_the_window_are_forgotten_with_no_traffic(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Ids are forgotten by the next claim on their shard: once no event carries an id any
    more, the last window's ids stayed for good. Ingress's trim forgets them too."""
    from supersede.scripts import Scripts

    scripts = Scripts(redis, keys)
    old_ms = int(time.time() * 1000) - 60_000
    for shard in range(keys.shards):
        pairs = [(f"d{shard}-{i}", f"1-{i}") for i in range(50)]
        await scripts.claim_ids(shard, pairs, window_ms=86_400_000, now=old_ms)
    await register(redis, keys, {"id": "w", "events": ["w.ev"]})
    system.start("ingress", "--block-ms", "100", "--dedup-window", "10", "--trim-interval", "0.2")

    async def forgotten() -> bool:
        sizes = [await redis.hlen(sk.ids_hash) + await redis.zcard(sk.ids_at_zset)
                 for sk in keys.all_shards()]  # fmt: skip
        return sum(sizes) == 0

    await eventually(forgotten, timeout=30)


async def test_a_trim_the_server_refuses_fails_its_task_rather_than_passing_over_it(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """An ACL user without XTRIM (or XINFO): the refusal was one of a pipeline's replies, not
    looked at, and the inbox grew with no line, no failed task, a ready service (a security
    probe). It is raised now: the periodic task fails, its line names the right it lacks."""
    import pytest
    from redis.exceptions import NoPermissionError

    from supersede.config import connect

    stream = keys.events_stream
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    for _ in range(3):
        await redis.xadd(stream, {"f": "v"})
    await redis.xreadgroup("g", "c", {stream: ">"})
    await redis.xack(stream, "g", *[e[0] for e in await redis.xrange(stream)])
    user, password = f"trim-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await redis.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all",
                                "-xtrim")  # fmt: skip
    limited = connect(redis_url.replace("redis://", f"redis://{user}:{password}@"))
    try:
        with pytest.raises(NoPermissionError, match="xtrim"):
            await trim_consumed(limited, [stream])
        assert await trim_consumed(redis, [stream]) == {stream: 3}
        assert await trim_consumed(redis, [f"{stream}-not-made"]) == {}  # (nothing to trim)
    finally:
        await limited.aclose()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_a_trim_by_age_counts_it_on_the_servers_clock(redis: Redis, keys: Keys) -> None:
    """Entry ids are the server's milliseconds: admission trimmed the control streams by its
    own clock, and an hour ahead it deleted every cancel message at each trim (a clock probe).
    It gives the server's time now."""
    stream = keys.shard(0).control_stream
    await redis.xadd(stream, {"op": "cancel"})
    server_now = float((await redis.time())[0]) * 1000
    assert await trim_older_than(redis, [stream], 600_000, server_now) == {}
    assert await trim_older_than(redis, [stream], 600_000, server_now + 3_600_000) == {stream: 1}
