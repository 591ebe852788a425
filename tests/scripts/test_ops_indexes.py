"""`runs` and `cancel --key` answer from the indexes the scripts keep (ended streams, queue and
active zsets, counts), never from a scan of the run records (issue 13, item 5)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.lookups import cancel_key
from supersede.protocol import RunRequest, Strategy
from supersede.registry import register
from supersede.scripts import Scripts
from supersede.services import ops
from supersede.services.ops import list_runs, runs_page, scan_runs
from tests.support import make_request


async def _calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _admit(scripts: Scripts, reqs: list[tuple[int, RunRequest]], now: int) -> None:
    by_shard: dict[int, list[tuple[str, bytes]]] = {}
    for shard, req in reqs:
        by_shard.setdefault(shard, []).append(("0-1", req.pack()))
    for shard, items in by_shard.items():
        await scripts.admit(shard, items, now=now)


def _wf(version: str, max_runs: int) -> dict[str, object]:
    return {"id": "wf", "events": ["e"], "version": version,
            "concurrency": {"expression": "input.k", "max_runs": max_runs}}  # fmt: skip


async def test_runs_and_cancel_key_answer_from_the_indexes_without_scanning_records(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await register(redis, keys, _wf("v1", 1))

    # 6 admissions of 500 runs of key "hot" (each keeps only its newest) and 50 other keys
    def v1(key: str, event: str, seq: int) -> tuple[int, RunRequest]:
        return make_request(keys, workflow="wf", version="v1", key=key, event=event, seq=seq)

    for batch in range(6):
        reqs = [v1("hot", f"h{batch}-{i}", batch * 1000 + i) for i in range(500)]
        reqs += [v1(f"k{i}", f"o{batch}-{i}", batch * 1000 + i) for i in range(50)]
        await _admit(scripts, reqs, now=10_000 + batch)
    # a new version of the workflow: the same key is another group, with its own live run
    await register(redis, keys, _wf("v2", 2))
    v2 = make_request(keys, workflow="wf", version="v2", key="hot", event="v2", seq=99_999)
    await _admit(scripts, [v2], now=20_000)

    await redis.config_resetstat()
    newest = await list_runs(redis, keys, limit=20)
    assert len(newest) == 20
    assert [r["state"] for r in newest[:51]].count("ASSIGNED") == 20  # live runs come first
    cancelled = await list_runs(redis, keys, workflow="wf", key="hot", state="cancelled", limit=5)
    assert len(cancelled) == 5
    assert {r["event_id"].split("-")[0] for r in cancelled} == {"h5"}  # the newest ended first
    assert all(r["key"] == "hot" and r["state"] == "CANCELLED" for r in cancelled)
    flags = await cancel_key(redis, scripts, "wf", "hot")
    assert sorted(flags) == sorted([v1("hot", "h5-499", 5499)[1].run_id, v2[1].run_id])
    assert all(flags.values())
    calls = await _calls(redis)
    assert "hscan" not in calls and "scan" not in calls  # (HGETALL reads only the counts)
    # a handful of commands for 3,301 retained runs: what the answers need, not every record
    # (a script loaded for the first time on this server, and the reset, are not the answers')
    asked = sum(n for name, n in calls.items() if name not in ("script|load", "config|resetstat"))
    assert asked < 80, calls


async def _busy_and_quiet(keys: Keys, scripts: Scripts, quiet: int) -> None:
    """3,000 runs of one key of workflow `busy` (one assigned, the others queued), then one
    run of each of `quiet` keys of workflow `quiet` (assigned)."""
    busy = [make_request(keys, workflow="busy", key="b", event=f"b{i}", seq=i,
                         strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=1)
            for i in range(3_000)]  # fmt: skip
    few = [make_request(keys, workflow="quiet", key=f"q{i}", event=f"q{i}", seq=10_000 + i,
                        strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=1)
           for i in range(quiet)]  # fmt: skip
    await _admit(scripts, busy, now=10)
    await _admit(scripts, few, now=20)


async def test_runs_of_a_quiet_workflow_are_found_behind_a_busy_one(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Live runs are read from zsets ordered by group or lease time, not by workflow: a
    filter must page on until it has its answer, not judge the first page."""
    await _busy_and_quiet(keys, scripts, 6)
    quiet = [make_request(keys, workflow="quiet", key=f"q{i}", event=f"q{i}-2", seq=20_000 + i,
                          strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=1)
             for i in range(3)]  # fmt: skip
    await _admit(scripts, quiet, now=30)
    queued = await list_runs(redis, keys, workflow="quiet", state="queued", limit=20)
    assert sorted(r["event_id"] for r in queued) == ["q0-2", "q1-2", "q2-2"]
    everything = await list_runs(redis, keys, workflow="quiet", limit=20)
    assert len(everything) == 9
    newest = await list_runs(redis, keys, state="queued", limit=3)
    assert all(r["workflow"] == "quiet" for r in newest)  # created last, listed first


async def test_a_quiet_workflows_runs_are_listed_without_reading_a_busy_ones_backlog(
    redis: Redis, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past LIVE_SORTED live runs, a list stopped reading only once it had a page of matches:
    a quiet workflow's list (the dashboard's links of each workflow) read every queued run of a
    busy one, and so did a list of running or cancelling runs, which are never queued (a
    probe: 11 s behind 150,000 queued, every 2 s while the page was open). Reading stops
    once the counts' matching runs are found, and reads only the zsets of the states asked."""
    monkeypatch.setattr(ops, "LIVE_SORTED", 100)  # (3,000 queued stand for 150,000)
    await _busy_and_quiet(keys, scripts, 3)
    for state in (None, "assigned"):
        await redis.config_resetstat()
        rows, _ = await runs_page(redis, keys, workflow="quiet", state=state, limit=50)
        assert sorted(r["event_id"] for r in rows) == ["q0", "q1", "q2"], state
        zranges = (await _calls(redis)).get("zrange", 0)
        # (one round over each shard's zsets: 32 of both kinds, 16 lease zsets; it was 15
        # rounds of every queue zset's 200 members)
        assert zranges <= (2 if state is None else 1) * keys.shards, (state, zranges)
    queued = await list_runs(redis, keys, workflow="busy", state="queued", limit=5)
    assert len(queued) == 5  # (a busy workflow's list still finds its queued runs)


async def test_runs_and_cancel_key_find_the_live_run_of_a_workflow_without_a_limit(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Such a run is in no queue or active zset; its key is its event id, from which its run
    id follows, so `runs --key` lists it and `cancel --key` stops it."""
    await register(redis, keys, {"id": "free", "events": ["e"], "version": "v1"})
    shard, req = make_request(
        keys, workflow="free", version="v1", key="order-7", event="order-7", seq=1,
        unlimited=True, strategy=Strategy.GROUP_ROUND_ROBIN,
    )  # fmt: skip
    await _admit(scripts, [(shard, req)], now=1_000)
    [live] = await list_runs(redis, keys, workflow="free", key="order-7", limit=10)
    assert live["id"] == req.run_id and live["state"] == "ASSIGNED"
    assert await list_runs(redis, keys, workflow="free", key="order-8", limit=10) == []
    assert await cancel_key(redis, scripts, "free", "order-7") == {req.run_id: True}
    [ended] = await list_runs(redis, keys, workflow="free", key="order-7", limit=10)
    assert ended["state"] == "CANCELLED"
    assert await cancel_key(redis, scripts, "free", "order-7") == {}


@pytest.mark.parametrize("key_scan", [ops.KEY_SCAN, 3])
async def test_pages_of_runs_cover_every_ended_run_once_even_inside_one_large_end_entry(
    redis: Redis, keys: Keys, scripts: Scripts, key_scan: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cursor of `runs_page` (the UI's pages, its "ended before" filter) splits an end
    entry of 499 runs without losing or repeating one, over every shard and for one key; also
    when a key's search stops at its scan limit (3 runs: before most pages reach their size)."""
    monkeypatch.setattr(ops, "KEY_SCAN", key_scan)
    for version in ("v1", "v2"):  # a key's runs in two groups (versions): two shards' streams
        await register(redis, keys, _wf(version, 1))
        for batch in range(4):
            reqs = [
            make_request(keys, workflow="wf", version=version, key=key,
                         event=f"{version}{key}{batch}-{i}", seq=batch * 1000 + i)
            for key, n in (("hot", 500), *((f"k{j}", 1) for j in range(30)))
            for i in range(n)
        ]  # fmt: skip
            await _admit(scripts, reqs, now=10_000 + batch + (version == "v2") * 100)
    every = await scan_runs(redis, keys)
    cancelled = {r.id for r in every if r.state.name == "CANCELLED"}
    hot = {r.id for r in every if r.state.name == "CANCELLED" and r.key == "hot"}
    k5 = {r.id for r in every if r.state.name == "CANCELLED" and r.key == "k5"}
    assert len(hot) >= 4 * 499
    assert len(k5) == 6
    for key, want in ((None, cancelled), ("hot", hot), ("k5", k5)):
        seen: list[str] = []
        before = None
        for _ in range(5000):  # (a scan limit of 3 makes pages of at most 3)
            rows, before = await runs_page(redis, keys, workflow="wf", key=key,
                                           state="cancelled", limit=37, before=before)  # fmt: skip
            assert len(rows) <= 37
            seen += [r["id"] for r in rows]
            if before is None:
                break
        assert len(seen) == len(set(seen)), key
        assert set(seen) == want, (key, len(want - set(seen)), len(set(seen) - want))
    # a time: the runs that ended before it (the first batch ended at 10,000 ms)
    rows, _ = await runs_page(redis, keys, state="cancelled", limit=1000, before="10001-0")
    assert rows and all(r["ended_ms"] <= 10_000 for r in rows)
    # a page full of live runs points at the ended ones
    live, before = await runs_page(redis, keys, workflow="wf", limit=5)
    assert [r["state"] for r in live] == ["ASSIGNED"] * 5 and before is not None
    rows, _ = await runs_page(redis, keys, workflow="wf", limit=5, before=before)
    assert len(rows) == 5 and all(r["state"] == "CANCELLED" for r in rows)


async def test_a_page_of_a_key_with_a_long_queue_loads_its_newest_and_its_cancel_goes_in_parts(
    redis: Redis, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key of GROUP_ROUND_ROBIN with a long queue: a page of its runs read every queued
    member and loaded every record before it kept 20 (a scale probe: 4 s at 200,000, and the
    UI's 503 past about 250,000), and `cancel --key` cancelled them all in one script call
    (6.6 s at 300,000, BUSY to every service). A page loads the newest of the queue only; the
    cancel goes CANCEL_CHUNK runs a call."""

    await register(
        redis,
        keys,
        {
            **_wf("v1", 1),
            "concurrency": {
                "expression": "input.k",
                "max_runs": 1,
                "limit_strategy": "GROUP_ROUND_ROBIN",
            },
        },
    )
    reqs = [make_request(keys, workflow="wf", version="v1", key="deep", event=f"e{i}", seq=i,
                         strategy=Strategy.GROUP_ROUND_ROBIN) for i in range(2_500)]  # fmt: skip
    for i in range(0, len(reqs), 500):
        await _admit(scripts, reqs[i : i + 500], now=10_000 + i)
    loaded: list[int] = []
    records_of = ops.records_of  # type: ignore[attr-defined]

    async def counted(redis: Redis, keys: Keys, rids: list[str]) -> list[object]:
        loaded.append(len(rids))
        return await records_of(redis, keys, rids)  # type: ignore[return-value]

    monkeypatch.setattr(ops, "records_of", counted)
    rows, _ = await runs_page(redis, keys, workflow="wf", key="deep", limit=20)
    assert [r["event_id"] for r in rows] == [f"e{i}" for i in range(2_499, 2_479, -1)]
    assert max(loaded) <= 21 + 2, loaded  # (the newest 20 queued, the one assigned, candidates)
    running, _ = await runs_page(redis, keys, workflow="wf", key="deep", state="assigned")
    assert [r["event_id"] for r in running] == ["e0"]
    calls: list[list[str]] = []
    cancel = scripts.cancel

    async def sized(shard: int, rids: list[str], **kw: object) -> list[bool]:
        calls.append(rids)
        return await cancel(shard, rids, **kw)

    monkeypatch.setattr(scripts, "cancel", sized)
    flags = await cancel_key(redis, scripts, "wf", "deep")
    assert len(flags) == 2_500 and all(flags.values())
    assert [len(c) for c in calls] == [1_000, 1_000, 500], calls
    # (the assigned run last: cancelled first, its slot started the head of the queue, which
    # a later part then cancelled as it ran)
    assert calls[-1][-1] == reqs[0][1].run_id
    from supersede.protocol import RunRecord

    raw = await redis.hgetall(keys.shard(reqs[0][0]).runs_hash)
    runs = [RunRecord.decode(k.decode(), v) for k, v in raw.items()]
    assert {r.state.value for r in runs} == {"C"}
    assert [r.event_id for r in runs if r.assigned_ms] == ["e0"]  # (none of the queue started)


async def test_status_reads_every_stream_in_round_trips_that_do_not_grow_with_them(
    redis: Redis,
) -> None:
    """`status` read each stream's group and consumers call after call: 269 round trips with
    16 shards and three workflows, 28 s from a server 100 ms away, and the dashboard's
    overview, which reads it, gave up at 20 ms (a latency probe). Its round trips are the same
    for 2 shards and one workflow as for 16 and three now, and its figures are those of the
    streams: lags and pending entries summed, the executors that read each workflow, the dead
    letters."""
    import uuid

    from supersede.protocol import ADMISSION_GROUP, EXECUTOR_GROUP
    from tests.support import RoundTrips, workflow_body

    async def measured(keys: Keys, workflows: list[str]) -> tuple[int, dict[str, Any]]:
        for wid in workflows:
            await register(redis, keys, workflow_body(id=wid))
        for i in range(3):  # (the inbox: no ingress group yet, every entry waits)
            await redis.xadd(keys.events_stream, {"name": "e", "data": str(i)})
        last = keys.shard(keys.shards - 1)
        await redis.xadd(last.requests_stream, {"r": "x"})
        await redis.xgroup_create(last.requests_stream, ADMISSION_GROUP, id="$")
        await redis.xadd(last.requests_stream, {"r": "y"})
        stream = last.assignments_stream(workflows[-1])
        await redis.xadd(stream, {"id": "r", "a": "1"})
        await redis.xgroup_create(stream, EXECUTOR_GROUP, id="0")
        await redis.xreadgroup(EXECUTOR_GROUP, "ex-1", {stream: ">"})  # (one pending)
        await redis.xadd(keys.dead_stream, {"reason": "malformed"})
        await redis.ping()  # (the connection is open: what follows is status's own)
        with RoundTrips() as trips:
            got = await ops.status(redis, keys)
        return trips.sent, got

    small, s = await measured(Keys(f"st{uuid.uuid4().hex[:8]}", 2), ["w1"])
    large, big = await measured(Keys(f"st{uuid.uuid4().hex[:8]}", 16), ["w1", "w2", "w3"])
    assert small == large and large <= 8, (small, large)
    for got, wf in ((s, "w1"), (big, "w3")):
        streams = got["streams"]
        assert streams["inbox"] == {"pending": 0, "lag": 3}
        assert streams["requests"] == {"pending": 0, "lag": 1}
        assert streams["assignments"] == {"pending": 1, "lag": 0}
        assert got["executors"] == {"ex-1": [wf]} and got["dead_letters"] == 1
