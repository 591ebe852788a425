"""Fencing tokens on a real server: the fences the admit script keeps per group (what
`ctx.still_current()` reads), their expiry, and the `set_if_newer` compare-and-set."""

from __future__ import annotations

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from supersede.fencing import fence_of, read_fenced, set_if_newer
from supersede.keys import Keys
from supersede.protocol import Strategy
from supersede.scripts import Scripts
from tests.scripts.test_scripts import admit
from tests.support import make_request, records


@pytest.mark.parametrize("strategy", list(Strategy))
async def test_admit_keeps_each_groups_newest_sequence_as_its_fence(
    redis: Redis, keys: Keys, scripts: Scripts, strategy: Strategy
) -> None:
    a, b = (make_request(keys, event=f"e{i}", seq=i, strategy=strategy) for i in (5, 9))
    shard = a[0]
    sk = keys.shard(shard)
    await admit(scripts, a)
    assert await redis.hget(sk.fences_hash, a[1].group) == a[1].seq.encode()
    await admit(scripts, b, now=2)
    # CANCEL_NEWEST turns b away (no slot): it never runs, so it is not the newest run
    moved = b if strategy is not Strategy.CANCEL_NEWEST else a
    assert await redis.hget(sk.fences_hash, a[1].group) == moved[1].seq.encode()
    late = make_request(keys, event="late", seq=7, strategy=strategy)  # older, admitted late
    await admit(scripts, late, now=3)
    assert await redis.hget(sk.fences_hash, a[1].group) == moved[1].seq.encode()
    assert fence_of(a[1].seq) < fence_of(late[1].seq) < fence_of(b[1].seq)
    # an idle group's fence goes with its other memory, after the retention; a run that
    # still holds a slot keeps its group's memory
    await scripts.reap(shard, retention_ms=1_000, now=500)
    assert await redis.hexists(sk.fences_hash, a[1].group)
    await scripts.reap(shard, retention_ms=1_000, now=10_000)
    assert await redis.hexists(sk.fences_hash, a[1].group)
    live = [rid for rid, rec in (await records(redis, keys)).items() if str(rec["st"]) in "QAR"]
    await scripts.cancel(shard, live, now=10_000)
    await scripts.reap(shard, retention_ms=1_000, now=20_000)
    assert await redis.hlen(sk.fences_hash) == 0 and await redis.zcard(sk.newest_at_zset) == 0


async def test_a_run_without_a_limit_leaves_no_fence(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    shard, req = make_request(keys, event="free", seq=1, unlimited=True)
    await admit(scripts, (shard, req))
    assert await redis.hlen(keys.shard(shard).fences_hash) == 0


def test_a_fence_orders_like_the_inbox_entry_ids() -> None:
    from supersede.model import encode_seq

    ids = ["1700000000000-0", "1700000000000-1", "1700000000000-70000", "1700000000001-0"]
    fences = [fence_of(encode_seq(i)) for i in ids]
    assert fences == sorted(fences) and len(set(fences)) == len(fences)


async def test_set_if_newer_keeps_the_newest_writer(redis: Redis, namespace: str) -> None:
    key = f"{namespace}:doc"
    assert await set_if_newer(redis, key, "from 10", 10)
    assert not await set_if_newer(redis, key, "from 9", 9)  # superseded run, writing late
    assert await read_fenced(redis, key) == (b"from 10", 10)
    assert await set_if_newer(redis, key, "again", 10)  # a retry of the same run
    assert await set_if_newer(redis, key, "from 11", 11)
    big = 2**127 + 5  # fences are 128-bit: compared exactly, not as doubles
    assert await set_if_newer(redis, key, "big", big)
    assert not await set_if_newer(redis, key, "big - 1", big - 1)
    assert await read_fenced(redis, key) == (b"big", big)
    assert await set_if_newer(redis, f"{namespace}:ttl", "v", 1, ttl_ms=60_000)
    assert 0 < await redis.pttl(f"{namespace}:ttl") <= 60_000
    assert await read_fenced(redis, f"{namespace}:none") == (None, None)


def test_set_if_newer_with_a_blocking_client(redis_url: str, namespace: str) -> None:
    client = SyncRedis.from_url(redis_url)
    try:
        key = f"{namespace}:sync"
        assert set_if_newer(client, key, b"new", 2) is True
        assert set_if_newer(client, key, b"old", 1) is False
        assert read_fenced(client, key) == (b"new", 2)
    finally:
        client.close()


@pytest.mark.parametrize("bad", [-1, 2**128, 1.5, "7", True])
def test_a_bad_fence_is_refused_before_any_call(bad: object) -> None:
    with pytest.raises(ValueError, match=r"ctx\.fence"):
        set_if_newer(object(), "k", "v", bad)  # type: ignore[call-overload]


async def test_the_readme_user_for_fenced_writes_may_make_them(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """The README's ACL user for workflow code's own fenced writes (the executor's user may
    not touch keys outside the namespace, and the README's fencing example was refused under
    it, a security probe): with exactly its rules, `set_if_newer` (with an expiry) and
    `read_fenced` work, and other keys are refused."""
    import re
    from pathlib import Path

    from redis.exceptions import NoPermissionError

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    [rules] = re.findall(r"`ACL SETUSER app-replies on >PASSWORD ([^`]+)`", readme)
    user = f"{namespace}-app"
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw-app", *rules.split())
    scheme, _, rest = redis_url.partition("://")
    app = Redis.from_url(f"{scheme}://{user}:pw-app@{rest}")
    try:
        key = f"reply:{namespace}"
        assert await set_if_newer(app, key, "hi", 5, ttl_ms=60_000)
        assert await read_fenced(app, key) == (b"hi", 5)
        assert not await set_if_newer(app, key, "late", 4)
        # redis-py loads the script when the server lost it (a restart): allowed too
        dry = await redis.execute_command("ACL", "DRYRUN", user, "SCRIPT", "LOAD", "return 1")
        assert dry in (b"OK", "OK"), dry
        with pytest.raises(NoPermissionError):
            await app.hset(f"{namespace}:other", "k", "v")
    finally:
        await app.aclose()
        await redis.execute_command("ACL", "DELUSER", user)
