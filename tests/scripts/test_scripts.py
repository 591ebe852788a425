"""The Lua scripts on a real server: strategies, transitions, idempotency and bad input
(invariant 5 of docs/design.md: claim refuses a run cancelled before it started)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from supersede import acl, codec
from supersede.errors import BadArguments, MalformedItem, UnknownRun, WrongShard
from supersede.keys import Keys
from supersede.protocol import Outcome, RunRecord, RunRequest, RunResult, Strategy, pack_input
from supersede.scripts import Assigned, HandOver, Scripts
from supersede.streams import ensure_groups
from tests.support import make_request, records, snapshot

LEASE = 1_000


async def admit(scripts: Scripts, *reqs: tuple[int, RunRequest], now: int = 1) -> None:
    by_shard: dict[int, list[tuple[str, bytes]]] = {}
    for shard, req in reqs:
        by_shard.setdefault(shard, []).append(("0-1", req.pack()))
    for shard, entries in by_shard.items():
        await scripts.admit(shard, entries, now=now)


async def claim(scripts: Scripts, shard: int, req: RunRequest, attempt: int = 1, now: int = 2):  # type: ignore[no-untyped-def]
    stream = scripts.keys.shard(shard).assignments_stream(req.workflow)
    [c] = await scripts.claim(
        shard, "ex", [(stream, "0-1", req.run_id, attempt)], lease_ms=LEASE, now=now
    )
    return c


async def finish(
    scripts: Scripts, shard: int, req: RunRequest, outcome: Outcome, attempt: int = 1
) -> None:
    await scripts.finish(shard, [("0-1", RunResult(req.run_id, attempt, outcome).pack())], now=5)


async def count_script_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the scripts called from now on, one per call to the server."""
    names: list[str] = []
    original = Scripts._call

    async def spy(
        self: Scripts, name: str, call_keys: list[str], args: list[object]
    ) -> list[object]:
        names.append(name)
        return await original(self, name, call_keys, args)

    monkeypatch.setattr(Scripts, "_call", spy)
    return names


def states(recs: dict[str, dict[str, object]], *reqs: tuple[int, RunRequest]) -> list[object]:
    return [recs[r.run_id]["st"] for _, r in reqs]


# -- strategies -------------------------------------------------------------------------------


async def test_a_run_named_twice_in_one_cancel_counts_as_cancelled(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """`retire` listed a run twice (a lease rescored while its zset was read) and its second
    flag, False (already ended), was the one kept: "679164 live runs cancelled" of 1,000,000
    (a probe)."""
    from supersede.lookups import cancel_runs

    a, b = (make_request(keys, event=f"e{i}", seq=i, max_runs=2) for i in (1, 2))
    await admit(scripts, a, b)
    flags = await cancel_runs(scripts, [a[1].run_id, b[1].run_id, a[1].run_id])
    assert flags == {a[1].run_id: True, b[1].run_id: True}


async def test_cancel_in_progress_keeps_the_newest_and_stops_the_running(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    a, b, c = (make_request(keys, event=f"e{i}", seq=i, max_runs=2) for i in (1, 2, 3))
    shard = a[0]
    await admit(scripts, a, b)
    assert (await claim(scripts, shard, a[1])).claimed
    await admit(scripts, c, now=3)
    recs = await records(redis, keys)
    assert states(recs, a, b, c) == ["X", "A", "A"]  # a was running: told to stop
    assert recs[a[1].run_id]["by"] == c[1].run_id
    [(_, msg)] = await redis.xrange(keys.shard(shard).control_stream)
    assert msg[b"id"].decode() == a[1].run_id and msg[b"op"] == b"cancel"
    assert int(await redis.hget(keys.shard(shard).slots_hash, a[1].group)) == 2


@pytest.mark.parametrize("earlier", ["round_robin", "strict"])
async def test_cancel_in_progress_in_a_scope_ends_the_queue_an_earlier_version_left(
    redis: Redis, keys: Keys, scripts: Scripts, earlier: str
) -> None:
    """A scope's groups span versions. A version that queued runs (GROUP_ROUND_ROBIN, or
    CANCEL_IN_PROGRESS in strict mode) left a queue behind when the next version made the
    scope CANCEL_IN_PROGRESS; its arrivals skipped the queue read, so the older queued runs
    were never superseded and ran after the newest one had succeeded (a probe: 390 stale runs,
    78 per key). The newest run ranks them now."""
    first = dict(version="1", scope="chat-user", max_runs=1)
    if earlier == "round_robin":
        first["strategy"] = Strategy.GROUP_ROUND_ROBIN
    else:
        first["strict"] = True
    old = [make_request(keys, event=f"o{i}", seq=i, **first) for i in (1, 2, 3)]
    shard = old[0][0]
    await admit(scripts, old[0])
    assert (await claim(scripts, shard, old[0][1])).claimed
    await admit(scripts, old[1])
    await admit(scripts, old[2])
    # (round robin: the last two wait; strict: the running one holds its slot while it stops,
    # the second was superseded by the third, which waits)
    waiting = ["R", "Q", "Q"] if earlier == "round_robin" else ["X", "C", "Q"]
    assert states(await records(redis, keys), *old) == waiting
    newest = make_request(keys, event="n", seq=9, version="2", scope="chat-user", max_runs=1)
    assert newest[1].group == old[0][1].group  # (one group across the versions)
    await admit(scripts, newest, now=3)
    recs = await records(redis, keys)
    assert "Q" not in states(recs, *old)  # none left to run after the newest
    assert recs[old[2][1].run_id]["by"] == newest[1].run_id
    assert recs[newest[1].run_id]["st"] in ("A", "Q")  # (strict: once the running one stopped)


async def test_cancel_newest_in_a_scope_fills_free_slots_with_the_queue_left_first(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A GROUP_ROUND_ROBIN version of a scope queued two runs behind a running one; the next
    version is CANCEL_NEWEST with a higher limit. Its arrival took a free slot ahead of the
    older queued runs, and the other free slots waited for a run's end (a review). The older
    runs start first now, and the arrival, with no slot left, ends."""
    first = dict(version="1", scope="s", max_runs=1, strategy=Strategy.GROUP_ROUND_ROBIN)
    old = [make_request(keys, event=f"o{i}", seq=i, **first) for i in (1, 2, 3)]
    await admit(scripts, old[0])
    assert (await claim(scripts, old[0][0], old[0][1])).claimed
    await admit(scripts, old[1], old[2])
    newest = make_request(keys, event="n", seq=9, version="2", scope="s", max_runs=3,
                          strategy=Strategy.CANCEL_NEWEST)  # fmt: skip
    await admit(scripts, newest, now=3)
    recs = await records(redis, keys)
    assert states(recs, *old, newest) == ["R", "A", "A", "C"]
    assert recs[newest[1].run_id]["why"] == "no_slot"


async def test_cancel_in_progress_cancels_an_older_event_admitted_late(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    new, old = make_request(keys, event="new", seq=10), make_request(keys, event="old", seq=5)
    await admit(scripts, new)
    await admit(scripts, old)
    assert states(await records(redis, keys), new, old) == ["A", "C"]


@pytest.mark.parametrize("max_runs", [1, 3])
async def test_cancel_in_progress_cancels_a_late_older_event_after_the_newer_runs_ended(
    redis: Redis, keys: Keys, scripts: Scripts, max_runs: int
) -> None:
    """A redelivery or a slow ingress brings an older request after the newest max_runs of its
    group already ended: it is cancelled on arrival, superseded by the newest run. Once the
    group admitted nothing for the retention, the reaper forgets it."""
    newer = [make_request(keys, event=f"n{i}", seq=10 + i, max_runs=max_runs)
             for i in range(max_runs)]  # fmt: skip
    shard = newer[0][0]
    await admit(scripts, *newer)
    for _, req in newer:
        await claim(scripts, shard, req)
        await finish(scripts, shard, req, Outcome.SUCCEEDED)
    late = make_request(keys, event="late", seq=5, max_runs=max_runs)
    between = make_request(keys, event="mid", seq=10 + max_runs, max_runs=max_runs)
    await admit(scripts, late)
    recs = await records(redis, keys)
    assert recs[late[1].run_id]["st"] == "C" and recs[late[1].run_id]["why"] == "superseded"
    assert recs[late[1].run_id]["by"] == newer[-1][1].run_id
    await admit(scripts, between)  # newer than every ended one: it runs
    assert states(await records(redis, keys), between) == ["A"]
    sk = keys.shard(shard)
    assert await redis.hlen(sk.newest_hash) == 1
    await scripts.reap(shard, retention_ms=1_000, now=10_000)  # `between` holds a slot
    assert await redis.hlen(sk.newest_hash) == 1
    await claim(scripts, shard, between[1])
    await finish(scripts, shard, between[1], Outcome.SUCCEEDED)
    await scripts.reap(shard, retention_ms=1_000, now=20_000)
    assert await redis.hlen(sk.newest_hash) == 0 and await redis.zcard(sk.newest_at_zset) == 0


async def test_cancel_in_progress_ranks_runs_ended_in_one_call_as_if_ended_one_by_one(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The runs a call ends are merged into the group's newest at once (each end split, sorted
    and joined the list): ended out of order in one finish call, the newest max_runs of them
    are remembered, in order, and rank late arrivals as before."""
    runs = [make_request(keys, event=f"r{i}", seq=10 + i, max_runs=3) for i in range(5)]
    shard = runs[0][0]
    await admit(scripts, *runs)  # (the newest 3 start, the 2 older end)
    assert states(await records(redis, keys), *runs) == ["C", "C", "A", "A", "A"]
    started = [req for _, req in runs[2:]]
    for req in started:
        await claim(scripts, shard, req)
    order = [started[2], started[0], started[1]]
    await scripts.finish(shard, [("0-1", RunResult(r.run_id, 1, Outcome.SUCCEEDED).pack())
                                 for r in order], now=5)  # fmt: skip
    [stored] = (await redis.hgetall(keys.shard(shard).newest_hash)).values()
    assert [m.split(b"|")[-1].decode() for m in stored.split(b",")] == [r.run_id for r in started]
    late = make_request(keys, event="late", seq=11, max_runs=3)
    newer = make_request(keys, event="newer", seq=20, max_runs=3)
    await admit(scripts, late, newer)
    recs = await records(redis, keys)
    assert states(recs, late, newer) == ["C", "A"]
    assert recs[late[1].run_id]["by"] == newer[1].run_id


async def test_runs_ended_in_one_call_with_computed_max_runs_keep_the_largest_of_theirs(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """max_runs computed per event: the runs one call ends are kept up to the largest max_runs
    among them (the least cut the group's newest to one, and a late, older arrival of the
    larger limit survived though three newer runs ended)."""
    runs = [make_request(keys, event=f"m{i}", seq=10 + i, max_runs=3 if i else 1)
            for i in range(3)]  # fmt: skip
    shard = runs[0][0]
    for run in runs:
        await admit(scripts, run)  # (each alone: the first's limit of 1 ranks none after)
    started = [req for _, req in runs]
    for req in started:
        await claim(scripts, shard, req)
    await scripts.finish(shard, [("0-1", RunResult(r.run_id, 1, Outcome.SUCCEEDED).pack())
                                 for r in started], now=5)  # fmt: skip
    [stored] = (await redis.hgetall(keys.shard(shard).newest_hash)).values()
    assert stored.count(b",") == 2
    late = make_request(keys, event="late", seq=9, max_runs=3)
    await admit(scripts, late)
    assert states(await records(redis, keys), late) == ["C"]


async def test_a_finish_of_many_runs_of_a_group_at_the_largest_max_runs_stays_short(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """CANCEL_IN_PROGRESS at max_runs 10,000 (the largest): each run's end split, sorted and
    joined the group's newest list, so a finish of 500 of its runs held the server for seconds
    (a scale probe: 8.5 s, BUSY to every service). Merged once a call, it is milliseconds;
    the bound here is 1 s, the server's busy-script threshold is 5 s."""
    mx, batch = 10_000, 500
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=mx)[1] for i in range(mx + batch)]
    shard = make_request(keys, event="x", seq=0, max_runs=mx)[0]
    stream = keys.shard(shard).assignments_stream("wf")
    for i in range(0, len(reqs), batch):
        part = reqs[i : i + batch]
        await scripts.admit(shard, [("0-1", r.pack()) for r in part], now=1)
        await scripts.claim(shard, "ex", [(stream, "0-1", r.run_id, 1) for r in part],
                            lease_ms=60_000, now=2)  # fmt: skip
        took = time.perf_counter()
        await scripts.finish(shard, [("0-1", RunResult(r.run_id, 1, Outcome.SUCCEEDED).pack())
                                     for r in part], now=5)  # fmt: skip
        assert time.perf_counter() - took < 1.0, i
    [stored] = (await redis.hgetall(keys.shard(shard).newest_hash)).values()
    assert stored.count(b",") == mx - 1


async def test_beyond_the_cap_the_least_recently_admitting_idle_groups_are_forgotten(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Eight groups of one shard: one with a RUNNING run, one with a debounce window open, six
    whose runs ended. With a cap of one group, the reaper forgets the six idle ones (their
    newest runs and fences), none while they are within the floor, and keeps the two live
    ones, which count as admitting now. (Before, groups went only after the retention, 24 h
    by default: a workflow with a new key per event held rate x 24 h of them.)"""
    first = make_request(keys, key="k0", event="e0", seq=1)
    shard, names = first[0], ["k0"]
    for n in range(1, 500):
        if len(names) < 8 and make_request(keys, key=f"k{n}", event="x", seq=1)[0] == shard:
            names.append(f"k{n}")
    reqs = [first]
    reqs.append(make_request(keys, key=names[1], event="e1", seq=2, debounce_ms=86_400_000))
    reqs += [make_request(keys, key=k, event=f"e{i}", seq=i + 1) for i, k in enumerate(names)][2:]
    for i, req in enumerate(reqs):
        await admit(scripts, req, now=1_000 + 10 * i)
    await claim(scripts, shard, reqs[0][1])
    for _, ended in reqs[2:]:
        await claim(scripts, shard, ended)
        await finish(scripts, shard, ended, Outcome.SUCCEEDED)
    sk = keys.shard(shard)
    assert await redis.zcard(sk.newest_at_zset) == 8 and await redis.hlen(sk.fences_hash) == 8

    r = await scripts.reap(shard, max_groups=1, min_retention_ms=10_000, now=5_000)
    assert r.forgotten == 0 and await redis.zcard(sk.newest_at_zset) == 8  # within the floor
    r = await scripts.reap(shard, max_groups=1, min_retention_ms=100, now=5_000)
    assert r.forgotten == 6
    r = await scripts.reap(shard, max_groups=1, min_retention_ms=100, now=6_000)
    assert r.forgotten == 0  # both left are live
    live = {reqs[0][1].group, reqs[1][1].group}
    assert {g.decode() for g in await redis.zrange(sk.newest_at_zset, 0, -1)} == live
    assert {g.decode() for g in await redis.hkeys(sk.fences_hash)} == live
    assert set(await redis.hkeys(sk.newest_hash)) <= {g.encode() for g in live}
    assert await redis.zscore(sk.newest_at_zset, reqs[0][1].group) == 5_000


async def test_a_run_without_a_concurrency_limit_stays_out_of_every_group_book(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A workflow without a limit: its runs are assigned at once and hold no slot, no queue
    or active member (the work a limit costs is not paid); they still lease, end and cancel."""
    reqs = [make_request(keys, key=f"own{i}", event=f"e{i}", seq=i, unlimited=True,
                         strategy=Strategy.GROUP_ROUND_ROBIN) for i in range(3)]  # fmt: skip
    await admit(scripts, *reqs)
    recs = await records(redis, keys)
    assert states(recs, *reqs) == ["A", "A", "A"] and all(recs[r.run_id]["u"] == 1 for _, r in reqs)
    for sk in keys.all_shards():
        assert await redis.hlen(sk.slots_hash) == 0 and await redis.zcard(sk.active_zset) == 0
    (s0, r0), (s1, r1), (s2, r2) = reqs
    assert (await claim(scripts, s0, r0)).claimed and (await claim(scripts, s1, r1)).claimed
    await finish(scripts, s0, r0, Outcome.SUCCEEDED)
    assert await scripts.cancel(s1, [r1.run_id], now=6) == [True]  # RUNNING: told to stop
    assert await scripts.cancel(s2, [r2.run_id], now=6) == [True]  # ASSIGNED: ends at once
    assert states(await records(redis, keys), *reqs) == ["S", "X", "C"]
    await finish(scripts, s1, r1, Outcome.CANCELLED)
    assert states(await records(redis, keys), *reqs) == ["S", "C", "C"]
    counts: dict[bytes, int] = {}
    for sk in keys.all_shards():
        assert await redis.hlen(sk.slots_hash) == 0 and await redis.zcard(sk.leases_zset) == 0
        for field, n in (await redis.hgetall(sk.counts_hash)).items():
            counts[field] = counts.get(field, 0) + int(n)
    assert counts == {b"wf|S": 1, b"wf|C": 2}


async def test_a_hand_over_claims_runs_for_the_executor_within_its_free_slots(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """`supersede serve`: an admit call of requests read from no stream (entry id '') claims
    the runs it assigns for the executor of its process, at most its free slots and only of
    its workflows, as claim.lua would; the others take their assignment streams. A run the same
    call cancelled is handed over as X, so that the executor reports it."""
    reqs = [make_request(keys, key="one", event=f"e{i}", seq=i, unlimited=True) for i in range(4)]
    other = make_request(keys, key="one", event="o", seq=9, unlimited=True, workflow="other")
    shards = {s for s, _ in [*reqs, other]}
    handed: list[str] = []
    for shard in shards:
        entries = [("", r.pack()) for s, r in [*reqs, other] if s == shard]
        ho = HandOver("ex", LEASE, 2 - len(handed), ("wf",))
        result = await scripts.admit(shard, entries, now=1000, hand_over=ho)
        assert all(c.claimed and c.state == "R" and c.attempt == 1 for c in result.handed)
        assert all(c.input == b"{}" and c.workflow == "wf" for c in result.handed)
        handed += [c.run_id for c in result.handed]
    assert len(handed) == 2  # the free slots, whatever the shards
    recs = await records(redis, keys)
    for _, r in [*reqs, other]:
        rec = recs[r.run_id]
        if r.run_id in handed:
            assert rec["st"] == "R" and rec["e"] == "ex" and "pe" not in rec
            assert rec["pc"] == rec["pg"]  # claimed as it was assigned
        else:
            assert rec["st"] == "A" and "e" not in rec  # for its assignment stream
    lanes = {s: keys.shard(s) for s in shards}
    for sk in lanes.values():
        for rid in handed:
            lease = await redis.zscore(sk.leases_zset, rid)
            assert lease is None or lease == 1000 + LEASE
        assert await redis.xlen(sk.requests_stream) == 0  # nothing written there, nothing acked
    assigned = sum(
        [await redis.xlen(sk.assignments_stream("wf")) for sk in lanes.values()]
        + [await redis.xlen(sk.assignments_stream("other")) for sk in lanes.values()]
    )
    assert assigned == 3
    # the heartbeat knows the handed runs as this executor's, and finish ends them
    for s, r in [*reqs]:
        if r.run_id in handed:
            assert await scripts.heartbeat(s, "ex", [(r.run_id, 1)], lease_ms=LEASE) == []
            await finish(scripts, s, r, Outcome.SUCCEEDED)
    counts: dict[bytes, int] = {}
    for sk in keys.all_shards():
        for field, n in (await redis.hgetall(sk.counts_hash)).items():
            counts[field] = counts.get(field, 0) + int(n)
    assert counts == {b"wf|S": 2, b"wf|A": 2, b"other|A": 1}

    # CANCEL_IN_PROGRESS: a newer run supersedes a handed-over one (told to stop, as any other)
    a, b = (make_request(keys, key="chat", event=f"c{i}", seq=20 + i) for i in (1, 2))
    ho = HandOver("ex", LEASE, 5, ("wf",))
    [first] = (await scripts.admit(a[0], [("", a[1].pack())], now=2000, hand_over=ho)).handed
    assert first.run_id == a[1].run_id
    [second] = (await scripts.admit(b[0], [("", b[1].pack())], now=2001, hand_over=ho)).handed
    assert second.run_id == b[1].run_id
    recs = await records(redis, keys)
    assert recs[a[1].run_id]["st"] == "X" and recs[a[1].run_id]["by"] == b[1].run_id


async def test_a_hand_over_with_no_free_slot_or_a_bad_spec(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    shard, req = make_request(keys, event="e", seq=1)
    r = await scripts.admit(shard, [("", req.pack())], hand_over=HandOver("ex", LEASE, 0, ("wf",)))
    assert r.handed == () and r.assigned == 1
    assert await redis.xlen(keys.shard(shard).assignments_stream("wf")) == 1
    before = await snapshot(redis, keys)
    with pytest.raises(BadArguments):
        await scripts.admit(shard, [("", req.pack())], hand_over=HandOver("ex", 0, 1, ("wf",)))
    assert await snapshot(redis, keys) == before


async def test_cancel_newest_never_interrupts_and_sheds_what_cannot_start(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    reqs = [
        make_request(keys, event=f"e{i}", seq=i, max_runs=2, strategy=Strategy.CANCEL_NEWEST)
        for i in range(4)
    ]
    await admit(scripts, reqs[0])
    assert (await claim(scripts, reqs[0][0], reqs[0][1])).claimed
    await admit(scripts, *reqs[1:])
    assert states(await records(redis, keys), *reqs) == ["R", "A", "C", "C"]


async def test_cancel_queued_except_newest_keeps_only_the_latest_waiting_run(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Hatchet's CANCEL_QUEUED_EXCEPT_NEWEST: running runs are never interrupted; of the runs
    of a full group that wait, only the newest stays queued, and it starts when a slot frees."""
    strategy = Strategy.CANCEL_QUEUED_EXCEPT_NEWEST
    reqs = [make_request(keys, event=f"e{i}", seq=i, strategy=strategy) for i in range(5)]
    shard = reqs[0][0]
    await admit(scripts, reqs[0])
    assert (await claim(scripts, shard, reqs[0][1])).claimed
    await admit(scripts, reqs[1], reqs[2])  # one batch: the older waiting one ends at once
    assert states(await records(redis, keys), *reqs[:3]) == ["R", "C", "Q"]
    await admit(scripts, reqs[3], now=2)  # a later batch replaces the waiting run
    recs = await records(redis, keys)
    assert states(recs, *reqs[:4]) == ["R", "C", "C", "Q"]
    assert recs[reqs[2][1].run_id]["why"] == "superseded"
    assert recs[reqs[2][1].run_id]["by"] == reqs[3][1].run_id
    await finish(scripts, shard, reqs[0][1], Outcome.SUCCEEDED)
    assert states(await records(redis, keys), *reqs[:4]) == ["S", "C", "C", "A"]
    assert await redis.zcard(keys.shard(shard).queue_zset) == 0


async def test_cancel_queued_except_oldest_keeps_the_first_waiting_run(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    strategy = Strategy.CANCEL_QUEUED_EXCEPT_OLDEST
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=2, strategy=strategy)
            for i in range(6)]  # fmt: skip
    shard = reqs[0][0]
    await admit(scripts, *reqs[:4])  # two start, the oldest of the others waits
    assert states(await records(redis, keys), *reqs[:4]) == ["A", "A", "Q", "C"]
    assert (await records(redis, keys))[reqs[3][1].run_id]["why"] == "no_slot"
    await admit(scripts, reqs[4], now=2)
    assert states(await records(redis, keys), *reqs[:5]) == ["A", "A", "Q", "C", "C"]
    await claim(scripts, shard, reqs[0][1])
    await finish(scripts, shard, reqs[0][1], Outcome.SUCCEEDED)  # the waiting one starts
    await admit(scripts, reqs[5], now=3)  # and a new one may wait again
    assert states(await records(redis, keys), *reqs) == ["S", "A", "A", "C", "C", "Q"]


async def test_group_round_robin_is_fifo_and_cancels_nothing(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    reqs = [
        make_request(keys, event=f"e{i}", seq=i, max_runs=2, strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in range(5)
    ]
    shard = reqs[0][0]
    await admit(scripts, *reversed(reqs))  # arrival order does not matter, sequence does
    assert states(await records(redis, keys), *reqs) == ["A", "A", "Q", "Q", "Q"]
    await claim(scripts, shard, reqs[0][1])
    await finish(scripts, shard, reqs[0][1], Outcome.SUCCEEDED)
    assert states(await records(redis, keys), *reqs) == ["S", "A", "A", "Q", "Q"]


@pytest.mark.parametrize(
    "strategy",
    [Strategy.CANCEL_IN_PROGRESS, Strategy.CANCEL_NEWEST, Strategy.GROUP_ROUND_ROBIN,
     Strategy.CANCEL_QUEUED_EXCEPT_NEWEST],
)  # fmt: skip
async def test_a_run_whose_record_is_gone_leaves_its_group_and_its_slot(
    redis: Redis, keys: Keys, scripts: Scripts, strategy: Strategy
) -> None:
    """A record evicted (an evicting maxmemory-policy) or deleted by hand: admit failed on its
    member at every call ("attempt to index a nil value"), its shard's requests stuck for
    good, and a GROUP_ROUND_ROBIN group's queue waited behind the slot it held (a probe). An
    arrival drops such a member; the reaper drops one it finds by its lease, with its slot."""
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=1, strategy=strategy)
            for i in range(4)]  # fmt: skip
    shard = reqs[0][0]
    sk = keys.shard(shard)
    await admit(scripts, reqs[0], reqs[1])
    await redis.hdel(sk.runs_hash, reqs[0][1].run_id, reqs[1][1].run_id)  # (active; queued)
    await admit(scripts, reqs[2], now=2)
    r = await scripts.reap(shard, now=10**12)  # (every lease lapsed: the gone one's too)
    await admit(scripts, reqs[3], now=3)
    recs = await records(redis, keys)
    assert reqs[0][1].run_id not in recs and reqs[1][1].run_id not in recs
    live = [m.decode().rsplit("|", 1)[1] for z in (sk.active_zset, sk.queue_zset)
            for m in await redis.zrange(z, 0, -1)]  # fmt: skip
    assert reqs[0][1].run_id not in live and reqs[1][1].run_id not in live, live
    if strategy in (Strategy.CANCEL_IN_PROGRESS, Strategy.CANCEL_NEWEST):
        assert recs[reqs[3][1].run_id]["st"] == "A"  # (the ended r2 may be reaped: 10**12)
    else:  # (FIFO: the queued run first, once the reaper freed the slot the gone one held)
        assert r.records_gone >= 1  # (the active one by its lease; the queued one maybe)
        assert states(recs, reqs[2], reqs[3]) == ["A", "Q"]


async def test_a_cancel_in_progress_group_whose_active_runs_were_evicted_admits_again(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """An eviction took a shard's active zset and leases (and a record) while a run held the
    group's slot: each arrival found the slot full and no run to cancel, and queued, and the
    next arrival did not read the queue (a CANCEL_IN_PROGRESS group keeps none): a max_runs 1
    group held 23 queued runs, for good, with no line (a Redis-operator probe). The slot
    held by no active member is given back at the next arrival, which reads the queue: the
    newest starts, the queued ones are superseded."""
    import msgpack

    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=1) for i in range(4)]
    shard = reqs[0][0]
    sk = keys.shard(shard)

    async def evicted(run: RunRequest) -> None:  # (its record and the shard's indexes)
        await redis.delete(sk.active_zset, sk.leases_zset)
        await redis.hdel(sk.runs_hash, run.run_id)

    await admit(scripts, reqs[0])
    await evicted(reqs[0][1])
    gone = await scripts.admit(shard, [("0-1", reqs[1][1].pack())], now=2)
    assert states(await records(redis, keys), reqs[1]) == ["A"] and gone.records_gone == 1
    # What an arrival did before: it queued behind the slot no run held, where the next one
    # never looked. Made by hand from the run just started.
    [member] = [bytes(m) for m in await redis.zrange(sk.active_zset, 0, -1)]
    rid = reqs[1][1].run_id
    rec = msgpack.unpackb(await redis.hget(sk.runs_hash, rid), raw=False)
    rec["st"] = "Q"
    await redis.hset(sk.runs_hash, rid, msgpack.packb(rec))
    await redis.zrem(sk.active_zset, member)
    await redis.zrem(sk.leases_zset, rid)
    await redis.zadd(sk.queue_zset, {member: 0})
    await scripts.admit(shard, [("0-1", reqs[2][1].pack())], now=3)
    recs = await records(redis, keys)
    assert states(recs, reqs[1], reqs[2]) == ["C", "A"], recs
    assert recs[rid]["why"] == "superseded" and not await redis.zcard(sk.queue_zset)
    await admit(scripts, reqs[3], now=4)
    assert states(await records(redis, keys), reqs[2], reqs[3]) == ["C", "A"]
    assert await redis.zcard(sk.active_zset) == 1


async def test_a_run_whose_member_alone_was_lost_gives_its_slot_back_once(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The active zset alone lost (records and leases kept): the arrival's repair gives back
    the slot of a run still running, and when that run ended it gave it back again: slots 0
    with a run active, and the next arrival started beside it (a review). A slot goes back
    with its member only."""
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=1) for i in range(3)]
    shard = reqs[0][0]
    sk = keys.shard(shard)
    await admit(scripts, reqs[0])
    await claim(scripts, shard, reqs[0][1])
    await redis.delete(sk.active_zset)
    await admit(scripts, reqs[1], now=3)
    assert states(await records(redis, keys), *reqs[:2]) == ["R", "A"]
    await finish(scripts, shard, reqs[0][1], Outcome.SUCCEEDED)
    assert int(await redis.hget(sk.slots_hash, reqs[1][1].group) or 0) == 1
    await admit(scripts, reqs[2], now=4)
    assert states(await records(redis, keys), *reqs) == ["S", "C", "A"]


async def test_a_queued_run_whose_record_is_gone_never_waits_in_a_live_ones_place(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """CANCEL_QUEUED_EXCEPT_OLDEST keeps the oldest waiting run: a queued one whose record was
    gone was kept, and the live arrival was turned away `no_slot` (a review)."""
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=1,
                         strategy=Strategy.CANCEL_QUEUED_EXCEPT_OLDEST)
            for i in range(3)]  # fmt: skip
    shard = reqs[0][0]
    await admit(scripts, reqs[0], reqs[1])
    assert states(await records(redis, keys), reqs[0], reqs[1]) == ["A", "Q"]
    await redis.hdel(keys.shard(shard).runs_hash, reqs[1][1].run_id)
    await admit(scripts, reqs[2], now=2)
    assert states(await records(redis, keys), reqs[0], reqs[2]) == ["A", "Q"]


async def test_a_strict_cancelling_run_whose_record_is_gone_is_counted(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A strict run cancelled holds its slot outside the active zset: with its record gone its
    slot cannot be found, but the reaper counts it (its error line says so)."""
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=1, strict=True) for i in range(2)]
    shard = reqs[0][0]
    await admit(scripts, reqs[0])
    await claim(scripts, shard, reqs[0][1])
    await admit(scripts, reqs[1], now=3)
    assert states(await records(redis, keys), *reqs) == ["X", "Q"]
    await redis.hdel(keys.shard(shard).runs_hash, reqs[0][1].run_id)
    r = await scripts.reap(shard, now=10**12)
    assert r.records_gone == 1


async def test_strict_mode_holds_the_slot_until_the_executor_confirms(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    old, new = (make_request(keys, event=f"e{i}", seq=i, strict=True) for i in (1, 2))
    shard = old[0]
    await admit(scripts, old)
    await claim(scripts, shard, old[1])
    await admit(scripts, new, now=3)
    recs = await records(redis, keys)
    assert states(recs, old, new) == ["X", "Q"] and recs[old[1].run_id]["h"] == 1
    await finish(scripts, shard, old[1], Outcome.CANCELLED)
    assert states(await records(redis, keys), old, new) == ["C", "A"]


async def test_default_mode_frees_the_slot_at_cancel_time(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    old, new = (make_request(keys, event=f"e{i}", seq=i) for i in (1, 2))
    await admit(scripts, old)
    await claim(scripts, old[0], old[1])
    await admit(scripts, new, now=3)
    assert states(await records(redis, keys), old, new) == ["X", "A"]


# -- transitions ------------------------------------------------------------------------------


async def test_claim_refuses_a_cancelled_run_and_an_old_attempt(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    old, new = (make_request(keys, event=f"e{i}", seq=i) for i in (1, 2))
    await admit(scripts, old, new)
    refused = await claim(scripts, old[0], old[1])
    assert not refused.claimed and refused.state == "C"
    assert not (await claim(scripts, new[0], new[1], attempt=2)).claimed
    got = await claim(scripts, new[0], new[1])
    assert got.claimed and got.input == b"{}" and got.workflow == "wf" and got.key == "k"


async def test_claim_acknowledges_the_assignment_entries(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(redis, keys, ["wf"])
    shard, req = make_request(keys, event="e", seq=1)
    await admit(scripts, (shard, req))
    stream = keys.shard(shard).assignments_stream(req.workflow)
    [[_, [(entry_id, fields)]]] = await redis.xreadgroup("executors", "c", {stream: ">"})
    assert fields == {b"id": req.run_id.encode(), b"a": b"1", b"r": b"1"}
    await scripts.claim(shard, "ex", [(stream, entry_id, req.run_id, 1)], lease_ms=LEASE)
    assert (await redis.xpending(stream, "executors"))["pending"] == 0


async def test_claims_of_several_shards_go_in_one_call_and_survive_a_script_flush(
    redis: Redis, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    reqs = [make_request(keys, event=f"e{i}", seq=i, key=f"k{i}") for i in range(40)]
    await admit(scripts, *reqs)
    batches: dict[int, list[Assigned]] = {}
    for shard, req in reqs:
        batches.setdefault(shard, []).append(("s", "0-1", req.run_id, 1))
    assert len(batches) > 2
    first = next(iter(batches))
    batches[first].append(("s", "0-1", "missing-run", 1))  # refused, the rest still claimed
    await redis.script_flush()  # a restarted server forgets scripts: reloaded, not an error
    calls = await count_script_calls(monkeypatch)
    got = await scripts.claim_shards("ex", batches, lease_ms=LEASE, now=2)
    assert calls == ["claim"]  # one call for every shard: its fixed cost is paid once
    assert set(got) == set(batches)
    for shard, triples in batches.items():
        assert [c.run_id for c in got[shard]] == [rid for _, _, rid, _ in triples]
    claimed = [c for claims in got.values() for c in claims if c.claimed]
    assert len(claimed) == 40 and not got[first][-1].claimed
    recs = await records(redis, keys)
    assert all(recs[req.run_id]["st"] == "R" and recs[req.run_id]["e"] == "ex" for _, req in reqs)
    other = next(s for s in batches if s != first)
    with pytest.raises(BadArguments):  # a script error of one shard is raised, as per shard
        await scripts.claim_shards(
            "ex", {first: [("s", "0-1", "x", 1)], other: [("s", "0-1", "y", "nan")]}, lease_ms=LEASE
        )


async def test_take_reads_and_claims_new_assignments_of_several_shards_in_one_call(
    redis: Redis, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """take.lua: the XREADGROUP and the claim of its entries in one call. Every entry read is
    acknowledged: a claimed run is RUNNING under the lease, a cancelled one is refused, an
    entry that is not an assignment is reported; COUNT applies per stream."""
    await ensure_groups(redis, keys, ["wf"])
    reqs = [make_request(keys, event=f"e{i}", seq=i, key=f"k{i}") for i in range(12)]
    await admit(scripts, *reqs)
    doomed_shard, doomed = reqs[0]
    await scripts.cancel(doomed_shard, [doomed.run_id], now=1)
    shards = sorted({shard for shard, _ in reqs})
    streams = [(keys.shard(s).assignments_stream("wf"), s) for s in shards]
    bad_stream = streams[-1][0]
    bad_id = await redis.xadd(bad_stream, {"id": "", "a": "x"})
    calls = await count_script_calls(monkeypatch)
    taken = await scripts.take("ex", streams, want=100, lease_ms=LEASE, now=2)
    assert calls == ["take"]
    assert taken.refused == 1 and len(taken.claimed) == 11
    assert taken.malformed == [(bad_stream, bad_id)]
    assert {c.run_id for _, _, c in taken.claimed} == {r.run_id for _, r in reqs[1:]}
    assert all(c.claimed and c.workflow == "wf" and c.input == b"{}" for _, _, c in taken.claimed)
    shard_of = {r.run_id: s for s, r in reqs}
    assert all(shard_of[c.run_id] == s for s, _, c in taken.claimed)
    assert len(taken) == 13 and taken.reached == len(streams)
    for stream, _ in streams:
        assert (await redis.xpending(stream, "executors"))["pending"] == 0
        [[last, _]] = await redis.xrevrange(stream, count=1)
        assert (stream, last) in {(s, lid) for s, _, lid, _ in taken.reads}
    recs = await records(redis, keys)
    assert all(recs[r.run_id]["st"] == "R" and recs[r.run_id]["e"] == "ex" for _, r in reqs[1:])
    assert recs[doomed.run_id]["st"] == "C"
    again = await scripts.take("ex", streams, want=100, lease_ms=LEASE, now=3)
    assert not again.claimed and not again.reads  # new entries only
    for i in range(3):  # well-formed, but their runs are gone: refused
        await redis.xadd(streams[0][0], {"id": f"gone{i}", "a": "1"})
    # want 2: the first two streams one entry each, then the others (only one came); a refused
    # entry takes no slot: the stream that gave all it was asked is read again, with COUNT 2
    two = await scripts.take("ex", streams, want=2, lease_ms=LEASE, now=4)
    assert [(s, n, asked) for s, n, _, asked in two.reads] == [
        (streams[0][0], 1, 1), (streams[0][0], 2, 2),
    ]  # fmt: skip
    assert two.reached == len(streams) and two.refused == 3 and not two.claimed
    with pytest.raises(BadArguments):
        await scripts.take("ex", streams, want=0, lease_ms=LEASE)


async def test_a_take_reads_past_the_entries_of_superseded_runs_to_the_live_ones(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A busy pool: a CANCEL_IN_PROGRESS key's runs are assigned and superseded before a slot
    frees, and their entries pile up in the assignment stream. Each counted as a slot, so a
    free slot read one of them (refused) and the newest run behind them waited for as many
    reads (a probe: 16,000 entries, its newest runs ASSIGNED for many minutes). Refused
    entries take no slot: one call reads past them, up to STALE_MAX beyond what it wants and
    MAX_ROUNDS rounds."""
    await ensure_groups(redis, keys, ["wf"])
    shard, first = make_request(keys, event="e0", seq=0, key="hot")
    await admit(scripts, (shard, first))
    stream = keys.shard(shard).assignments_stream("wf")
    stale = [first.run_id]
    for i in range(1, 60):  # each supersedes the one assigned before it (max_runs 1)
        _, req = make_request(keys, event=f"e{i}", seq=i, key="hot")
        await admit(scripts, (shard, req))
        stale.append(req.run_id)
    newest = stale.pop()
    assert await redis.xlen(stream) == 60
    # one free slot: a round per entry, MAX_ROUNDS (32) of them per call (the call's time bound)
    first_call = await scripts.take("ex", [(stream, shard)], want=1, lease_ms=LEASE, now=2)
    assert not first_call.claimed and first_call.refused == 32
    taken = await scripts.take("ex", [(stream, shard)], want=1, lease_ms=LEASE, now=2)
    assert [c.run_id for _, _, c in taken.claimed] == [newest]
    assert taken.refused == 27 and (await redis.xpending(stream, "executors"))["pending"] == 0
    # ten free slots: rounds of ten, until STALE_MAX (256) beyond what it wants
    for i in range(60, 1160):
        _, req = make_request(keys, event=f"e{i}", seq=i, key="hot")
        await admit(scripts, (shard, req))
    calls = []
    while not calls or not calls[-1].claimed:
        calls.append(await scripts.take("ex", [(stream, shard)], want=10, lease_ms=LEASE, now=3))
    assert all(266 <= c.refused <= 276 for c in calls[:-1]) and len(calls) == 5
    assert sum(c.refused for c in calls) == 1099 and len(calls[-1].claimed) == 1


async def test_an_assignment_says_whether_its_bell_rang_and_take_counts_those_that_did_not(
    redis: Redis, redis_url: str, keys: Keys, scripts: Scripts
) -> None:
    """An entry whose bell rang carries r = '1'. One written by a writer that could not ring
    (a user without the channel right, as an earlier `supersede acl` made; a build before the
    bells writes none either) has no mark, and take.lua counts it: the executor that reads it
    goes back to its blocking reads instead of waiting for bells that never come."""
    await ensure_groups(redis, keys, ["wf"])
    rung_shard, rung = make_request(keys, event="e0", seq=0, key="k0", unlimited=True)
    stream = keys.shard(rung_shard).assignments_stream("wf")
    async with redis.pubsub() as bells:
        await bells.execute_command("SSUBSCRIBE", stream)
        await admit(scripts, (rung_shard, rung))
        heard = [await bells.get_message(timeout=5) for _ in range(2)]
    assert [m["type"] for m in heard if m] == ["ssubscribe", "smessage"]
    [(_, fields)] = await redis.xrange(stream)
    assert fields[b"r"] == b"1"

    user = f"{keys.namespace}-no-channels"
    rights = [r for r in acl.rules(keys.namespace, "admission") if not r.startswith("&")]
    await redis.execute_command("ACL", "SETUSER", user, *rights, ">pw")
    scheme, _, rest = redis_url.partition("://")
    silent = Redis.from_url(f"{scheme}://{user}:pw@{rest}")
    try:
        _, quiet = make_request(keys, event="e1", seq=1, key="k0", unlimited=True)
        await admit(Scripts(silent, keys), (rung_shard, quiet))
    finally:
        await silent.aclose()
        await redis.execute_command("ACL", "DELUSER", user)
    [_, (_, unmarked)] = await redis.xrange(stream)
    assert unmarked is not None and unmarked[b"id"] == quiet.run_id.encode()
    assert b"r" not in unmarked
    taken = await scripts.take("ex", [(stream, rung_shard)], want=10, lease_ms=LEASE, now=2)
    assert [c.run_id for _, _, c in taken.claimed] == [rung.run_id, quiet.run_id]
    assert taken.unrung == 1


async def test_a_deep_take_fills_from_the_first_stream_with_a_backlog_before_the_next(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """take.lua's deep reads (the streams an executor found with a backlog): each stream in
    turn is asked for all still wanted, so a backlog fills the call from one shard; a wide
    read of the same streams takes a few entries from each and touches every shard."""
    await ensure_groups(redis, keys, ["wf"])
    by_shard: dict[int, list[str]] = {}
    i = 0
    while len(by_shard) < 3 or min(len(v) for v in by_shard.values()) < 6:
        shard, req = make_request(keys, event=f"e{i}", seq=i, key=f"k{i}")
        i += 1
        if len(by_shard.get(shard, [])) < 6 and (shard in by_shard or len(by_shard) < 3):
            await admit(scripts, (shard, req))
            by_shard.setdefault(shard, []).append(req.run_id)
    first, second, third = sorted(by_shard)
    streams = [(keys.shard(s).assignments_stream("wf"), s) for s in (first, second, third)]
    deep = await scripts.take("ex", streams, want=8, lease_ms=LEASE, deep=True, now=2)
    assert [c.run_id for _, _, c in deep.claimed] == by_shard[first] + by_shard[second][:2]
    assert [(s, n, asked) for s, n, _, asked in deep.reads] == [
        (streams[0][0], 6, 8),  # drained: fewer than asked
        (streams[1][0], 2, 2),  # gave all it was asked: likely more
    ]
    assert deep.reached == 2
    wide = await scripts.take("ex", streams[1:], want=4, lease_ms=LEASE, now=3)
    assert [(s, n) for s, n, _, _ in wide.reads] == [(streams[1][0], 2), (streams[2][0], 2)]
    with pytest.raises(BadArguments):  # the mode is '1' or '0'
        keys_of_one = [*scripts._claim_keys(first), streams[0][0]]
        await scripts._call("take", keys_of_one, [0, "executors", "ex", LEASE, 1, 1, "x", 1])


async def test_an_input_of_at_most_1_kib_lives_in_its_run_record_until_the_run_ends(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A short input is kept in the run's record while the run is live (no inputs-hash entry
    to write at admission, read at the claim and delete at the end: about 5 µs of server CPU
    per run); a longer one, and one stored by an earlier version, is in the inputs hash. Each
    claim hands the run its input, and the end of a run drops it either way; so does a cancel
    of a queued run."""
    await ensure_groups(redis, keys, ["wf"])
    small, big = codec.pack({"input": {"x": 1}}), codec.pack({"input": {"x": "y" * 2000}})
    reqs = [
        make_request(keys, event=f"e{i}", seq=i, key=f"k{i}", payload=p, unlimited=True)
        for i, p in enumerate([small, big, small])
    ]
    (_, r0), (_, r1), (s2, r2) = reqs
    await admit(scripts, *reqs)
    holder = make_request(keys, event="h", seq=9, key="q", payload=small,
                          strategy=Strategy.GROUP_ROUND_ROBIN)  # fmt: skip
    queued = make_request(keys, event="q", seq=10, key="q", payload=small,
                          strategy=Strategy.GROUP_ROUND_ROBIN)  # fmt: skip
    await admit(scripts, holder, queued)
    recs = await records(redis, keys)
    assert codec.blob(recs[r0.run_id]["in"]) == small and "in" not in recs[r1.run_id]
    inputs = {sk.shard: await redis.hgetall(sk.inputs_hash) for sk in keys.all_shards()}
    assert {rid for h in inputs.values() for rid in h} == {r1.run_id.encode()}
    # an earlier version's run: its input in the inputs hash, none in the record
    sk2 = keys.shard(s2)
    rec2 = recs[r2.run_id]
    del rec2["in"]
    await redis.hset(sk2.runs_hash, r2.run_id, codec.pack(rec2))
    await redis.hset(sk2.inputs_hash, r2.run_id, small)
    got = {req.run_id: (await claim(scripts, shard, req)).input for shard, req in reqs}
    assert got == {r0.run_id: small, r1.run_id: big, r2.run_id: small}
    for shard, req in reqs:
        await finish(scripts, shard, req, Outcome.SUCCEEDED)
    await scripts.cancel(queued[0], [queued[1].run_id], now=6)
    recs = await records(redis, keys)
    for rid in (r0.run_id, r1.run_id, r2.run_id, queued[1].run_id):
        assert recs[rid]["st"] in ("S", "C") and "in" not in recs[rid], recs[rid]
    assert "in" in recs[holder[1].run_id]  # (still live)
    for sk in keys.all_shards():
        assert await redis.hkeys(sk.inputs_hash) == []


async def test_a_cancel_of_a_running_run_is_timed_in_microseconds(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The cancel latency target is 2 ms, and the decision's time was kept in whole ms (the
    record's tc, the control entry's id): up to a ms of every measured latency was rounding.
    The record's px and the control message's du keep it in µs (server clock)."""
    shard, req = make_request(keys, event="e", seq=1)
    await admit(scripts, (shard, req))
    assert (await claim(scripts, shard, req)).claimed
    assert await scripts.cancel(shard, [req.run_id]) == [True]  # (the server's clock)
    rec = (await records(redis, keys))[req.run_id]
    run = RunRecord.from_map(req.run_id, rec)
    assert run.state == "X" and isinstance(run.cancel_decided_ms, float)
    assert int(run.cancel_decided_ms) == rec["tc"]  # (the inbox entry of seq 1 is at 0 ms)
    [(_, fields)] = await redis.xrange(keys.shard(shard).control_stream)
    assert int(fields[b"du"]) == rec["px"] == round(run.cancel_decided_ms * 1000)


async def test_finish_keeps_the_range_of_an_executors_turns_with_no_gap(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """An executor's turn key says which of its turns in the shard all have their writes
    there: the range goes on while each turn names the last one the key holds, and starts
    again at a turn that names another (the server lost a turn, or the key expired)."""
    from supersede.scripts import Turn

    made = [make_request(keys, event=f"e{i}", seq=i, key=f"k{i}", unlimited=True)
            for i in range(40)]  # fmt: skip
    shard = made[0][0]
    reqs = [req for s, req in made if s == shard][:4]
    assert len(reqs) == 4
    await admit(scripts, *[(shard, req) for req in reqs])
    for req in reqs:
        assert (await claim(scripts, shard, req)).claimed
    key = keys.shard(shard).turn_string("ex")

    async def turn(n: int, previous: int, i: int) -> bytes:
        payload = RunResult(reqs[i].run_id, 1, Outcome.SUCCEEDED).pack()
        t = Turn("ex", n, 60_000, {shard: previous})
        assert (await scripts.finish_shards({shard: [("", payload)]}, now=5, turn=t)).applied
        return bytes(await redis.get(key))

    assert await turn(1, 0, 0) == b"1|1"
    assert await turn(2, 1, 1) == b"1|2"
    await redis.set(key, "1|1")  # the server lost turn 2 (a failover to a lagging replica)
    assert await turn(3, 2, 2) == b"3|3"  # so turn 2 lies in no range: asked about, resent
    await redis.delete(key)  # a crash lost the key, or it expired
    assert await turn(4, 3, 3) == b"4|4"
    assert 0 < await redis.pttl(key) <= 60_000


async def test_results_of_several_shards_are_recorded_in_one_call(
    redis: Redis, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One finish call for every shard's results (a single server): each shard's runs end,
    its slots refill from its own queue, and its results stream is acknowledged; a malformed
    result is named by its position over all shards, and then nothing is written."""
    reqs = [
        make_request(keys, event=f"e{i}", seq=i, key=f"k{i % 6}",
                     strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in range(24)
    ]  # fmt: skip
    await ensure_groups(redis, keys)
    await admit(scripts, *reqs)
    running = [(s, r) for s, r in reqs if (await records(redis, keys))[r.run_id]["st"] == "A"]
    for shard, req in running:
        assert (await claim(scripts, shard, req)).claimed
    batches: dict[int, list[tuple[str | bytes, bytes]]] = {}
    for shard, req in running:
        stream = keys.shard(shard).results_stream
        entry = await redis.xadd(stream, {"p": RunResult(req.run_id, 1, Outcome.SUCCEEDED).pack()})
        await redis.xreadgroup("admission", "a", {stream: ">"})
        batches.setdefault(shard, []).append(
            (entry, RunResult(req.run_id, 1, Outcome.SUCCEEDED).pack())
        )
    assert len(batches) > 2
    shards = list(batches)
    bad = {s: list(items) for s, items in batches.items()}
    bad[shards[1]].insert(1, ("0-1", codec.pack({"id": "x", "a": 1, "o": "?"})))
    before = await snapshot(redis, keys)
    with pytest.raises(MalformedItem) as info:
        await scripts.finish_shards(bad, now=5)
    assert info.value.index == len(batches[shards[0]]) + 1
    assert await snapshot(redis, keys) == before
    calls = await count_script_calls(monkeypatch)
    r = await scripts.finish_shards(batches, now=5, assign_deadline_ms=30_000)
    assert calls == ["finish"]
    assert r.applied == len(running) == 6 and r.assigned == 6  # each group's next run
    recs = await records(redis, keys)
    assert (
        sorted(str(recs[req.run_id]["st"]) for _, req in reqs) == ["A"] * 6 + ["Q"] * 12 + ["S"] * 6
    )
    for shard, req in reqs:  # each run started in a freed slot is assigned in its own shard
        if recs[req.run_id]["st"] == "A":
            entries = await redis.xrange(keys.shard(shard).assignments_stream("wf"))
            assert req.run_id.encode() in [fields[b"id"] for _, fields in entries]
    for shard in batches:
        assert (await redis.xpending(keys.shard(shard).results_stream, "admission"))["pending"] == 0


async def test_heartbeat_renews_and_reports_cancelled_runs(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    a, b = (make_request(keys, event=f"e{i}", seq=i) for i in (1, 2))
    shard = a[0]
    await admit(scripts, a)
    await claim(scripts, shard, a[1])
    assert await scripts.heartbeat(shard, "ex", [(a[1].run_id, 1)], lease_ms=LEASE, now=900) == []
    lease = await redis.zscore(keys.shard(shard).leases_zset, a[1].run_id)
    assert lease == 900 + LEASE
    assert await scripts.heartbeat(shard, "other", [(a[1].run_id, 1)], lease_ms=LEASE) == [
        a[1].run_id
    ]
    await admit(scripts, b, now=950)
    stop = await scripts.heartbeat(shard, "ex", [(a[1].run_id, 1), ("0-gone", 1)], lease_ms=LEASE)
    assert stop == [a[1].run_id, "0-gone"]


async def test_reap_retries_with_the_same_sequence_then_fails(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    shard, req = make_request(keys, event="e", seq=7, max_attempts=2)
    await admit(scripts, (shard, req))
    await claim(scripts, shard, req, now=10)
    result = await scripts.reap(shard, now=10 + LEASE)
    assert result.retried == 1
    rec = (await records(redis, keys))[req.run_id]
    assert (rec["st"], rec["a"], rec["s"]) == ("A", 2, req.seq)
    await claim(scripts, shard, req, attempt=2, now=2_000)
    # A late result of the first attempt changes nothing.
    await finish(scripts, shard, req, Outcome.FAILED, attempt=1)
    assert (await records(redis, keys))[req.run_id]["st"] == "R"
    result = await scripts.reap(shard, now=2_000 + LEASE)
    assert result.failed == 1
    assert result.failed_by == (("wf", 1),)  # (by workflow: SupersedeRunsFailing counts them)
    rec = (await records(redis, keys))[req.run_id]
    assert (rec["st"], rec["why"]) == ("F", "lease_expired")
    assert await redis.hget(keys.shard(shard).slots_hash, req.group) is None


async def test_a_hand_back_retries_at_once_without_using_an_attempt(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A run a draining executor stopped is handed back: assigned again at once (attempt + 1,
    same sequence, a fresh entry) without waiting for its lease, and its max attempts are not
    spent on it: stopped by three drains in a row, a run of max_attempts 2 still has both
    left (before, each drain's lapsed lease used one: a rolling deploy FAILED it). Only the
    caller's own attempt is touched."""
    shard, req = make_request(keys, event="e", seq=7, max_attempts=2)
    stream = keys.shard(shard).assignments_stream(req.workflow)
    await admit(scripts, (shard, req))
    for attempt in (1, 2, 3):
        c = await claim(scripts, shard, req, attempt=attempt, now=10 * attempt)
        assert c.handed_back == (attempt > 1)  # (the new start says so, once: it is counted)
        for executor, which in (("other", attempt), ("ex", attempt + 1)):  # not its own
            r = await scripts.hand_back(shard, executor, [(req.run_id, which)])
            assert (r.handed, r.stale) == (0, 1)
        r = await scripts.hand_back(shard, "ex", [(req.run_id, attempt)], now=10 * attempt + 1)
        assert (r.handed, r.cancelled, r.failed, r.stale) == (1, 0, 0, 0)
        rec = (await records(redis, keys))[req.run_id]
        assert (rec["st"], rec["a"], rec["hb"], rec["s"]) == ("A", attempt + 1, attempt, req.seq)
        # its path ends at the new assignment: the handed-back attempt's claim came before it
        # (`supersede run` showed "executor read ... (+-32155 ms)")
        path = [p for p, _ in RunRecord.decode(req.run_id, codec.pack(rec)).path()]
        assert path[-1] == "assigned" and "claimed" not in path, path
        lease = await redis.zscore(keys.shard(shard).leases_zset, req.run_id)
        assert lease is not None and lease > 10 * attempt + 1  # (the assignment deadline's)
        [*_, (_, fields)] = await redis.xrange(stream)
        assert fields[b"a"] == str(attempt + 1).encode()
    # Its lease lapses twice now (an executor SIGKILLed): both attempts are still there.
    assert (await claim(scripts, shard, req, attempt=4, now=100)).handed_back
    assert (await scripts.reap(shard, now=100 + LEASE)).retried == 1
    assert not (await claim(scripts, shard, req, attempt=5, now=2_000)).handed_back
    assert (await scripts.reap(shard, now=2_000 + LEASE)).failed == 1
    rec = (await records(redis, keys))[req.run_id]
    assert (rec["st"], rec["why"], rec["a"]) == ("F", "lease_expired", 5)
    run = RunRecord.decode(req.run_id, codec.pack(rec))
    assert run.hand_backs == 3
    assert await redis.hget(keys.shard(shard).slots_hash, req.group) is None
    # how each earlier attempt ended is kept, for `supersede run` (it showed the last only)
    assert [(e.attempt, e.executor, e.ended_ms, e.reason) for e in run.earlier] == [
        (1, "ex", 11, "handed_back"), (2, "ex", 21, "handed_back"), (3, "ex", 31, "handed_back"),
        (4, "ex", 100 + LEASE, "lease_expired"),
    ]  # fmt: skip
    assert all(e.claimed_ms is not None for e in run.earlier)


async def test_hand_backs_past_the_free_ones_use_attempts_and_one_attempt_is_never_handed_back(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The first 10 hand-backs of a run are free; past them each uses an attempt (a pool that
    keeps being stopped fails its runs rather than moving them about for ever). A workflow of
    one attempt is never run twice: its run is left to its lease. A CANCELLING run ends
    CANCELLED and frees its slot for the next one."""
    shard, req = make_request(keys, event="e", seq=7, max_attempts=2)
    await admit(scripts, (shard, req))
    for attempt in range(1, 12):  # 10 free, then the 11th uses the second attempt
        await claim(scripts, shard, req, attempt=attempt, now=attempt)
        r = await scripts.hand_back(shard, "ex", [(req.run_id, attempt)], now=attempt)
        assert (r.handed, r.failed) == (1, 0), attempt
    await claim(scripts, shard, req, attempt=12, now=20)
    r = await scripts.hand_back(shard, "ex", [(req.run_id, 12)], now=21)
    assert (r.handed, r.failed, r.failed_by) == (0, 1, (("wf", 1),))
    rec = (await records(redis, keys))[req.run_id]
    assert (rec["st"], rec["why"], rec["hb"]) == ("F", "handed_back", 12)
    # its attempt is the last one started (`supersede run` showed a 13th, never made: a probe)
    assert rec["a"] == 12
    earlier = RunRecord.decode(req.run_id, codec.pack(rec)).earlier
    assert [e.attempt for e in earlier] == [7, 8, 9, 10, 11]  # (the last 5: a record stays small)

    one = make_request(keys, event="once", seq=8, max_attempts=1, unlimited=True)
    await admit(scripts, one)
    await claim(scripts, one[0], one[1], now=30)
    r = await scripts.hand_back(one[0], "ex", [(one[1].run_id, 1)], now=31)
    assert (r.handed, r.stale) == (0, 1)
    rec = (await records(redis, keys))[one[1].run_id]
    assert (rec["st"], rec["a"]) == ("R", 1)

    old, new = (make_request(keys, event=f"k{i}", seq=20 + i, key="k") for i in (1, 2))
    await admit(scripts, old, now=40)
    await claim(scripts, old[0], old[1], now=41)
    await admit(scripts, new, now=42)  # CANCEL_IN_PROGRESS: the running one is CANCELLING
    assert states(await records(redis, keys), old, new) == ["X", "A"]
    r = await scripts.hand_back(old[0], "ex", [(old[1].run_id, 1)], now=43)
    assert (r.handed, r.cancelled) == (0, 1)
    assert states(await records(redis, keys), old, new) == ["C", "A"]


async def test_an_unclaimed_assignment_whose_entry_is_gone_is_reassigned(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A GROUP_ROUND_ROBIN group of one slot: its ASSIGNED run's entry is trimmed away, so no
    executor can ever claim it. Past the deadline the reaper writes a fresh entry (once, then
    with backoff); claiming it frees the group, which was frozen before."""
    first, second = (
        make_request(keys, event=f"e{i}", seq=i, strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in (1, 2)
    )
    shard = first[0]
    stream = keys.shard(shard).assignments_stream(first[1].workflow)
    await admit(scripts, first, second, now=1_000)
    assert states(await records(redis, keys), first, second) == ["A", "Q"]
    await redis.xtrim(stream, maxlen=0)
    deadline = 30_000
    r = await scripts.reap(shard, assign_deadline_ms=deadline, now=1_000 + deadline - 1)
    assert r.reassigned == 0 and await redis.xlen(stream) == 0
    r = await scripts.reap(shard, assign_deadline_ms=deadline, now=1_000 + deadline)
    assert r.reassigned == 1
    [(_, fields)] = await redis.xrange(stream)
    assert fields == {b"id": first[1].run_id.encode(), b"a": b"1", b"r": b"1"}
    r = await scripts.reap(shard, assign_deadline_ms=deadline, now=1_000 + 2 * deadline)
    assert r.reassigned == 0  # the next one waits twice as long
    [c] = await scripts.claim(
        shard, "ex", [(stream, "0-1", first[1].run_id, 1)], lease_ms=LEASE, now=40_000
    )
    assert c.claimed
    await finish(scripts, shard, first[1], Outcome.SUCCEEDED)
    assert states(await records(redis, keys), first, second) == ["S", "A"]


async def test_no_fresh_entry_is_added_while_the_last_one_waits_unread(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Runs of a workflow no executor has started for wait ASSIGNED with their entries unread:
    the reaper looks at them on its schedule but adds nothing, so the stream holds one entry
    per waiting run however long they wait. (Before, it added one per run after 1, 2 … 64
    deadlines and then every 64, for good.) Once a consumer was delivered the entries and
    holds them (a stuck executor), fresh ones are written again."""
    import time

    reqs = [make_request(keys, event=f"e{i}", seq=i + 1, unlimited=True) for i in range(5)]
    shard = reqs[0][0]
    await scripts.admit(shard, [(f"0-{i + 1}", r.pack()) for i, (_, r) in enumerate(reqs)])
    stream = keys.shard(shard).assignments_stream(reqs[0][1].workflow)
    assert await redis.xlen(stream) == 5
    deadline, start = 1_000, int(time.time() * 1000)
    for k in range(1, 200):  # 199 deadlines later: every backoff step and 2 at the cap
        r = await scripts.reap(shard, assign_deadline_ms=deadline, now=start + k * deadline)
        assert r.reassigned == 0
    assert await redis.xlen(stream) == 5
    assert states(await records(redis, keys), *reqs) == ["A"] * 5
    # The five were written in the same ms. A consumer delivered the first two (a backlog
    # being worked off): only those two may be lost; the other three still wait unread.
    # (Judged by the ms, all five counted as delivered and got fresh entries: a backlog of
    # 150,000 runs grew its streams to 269,601 entries as executors started on it.)
    await redis.xgroup_create(stream, "executors", id="0")
    await redis.xreadgroup("executors", "stuck", {stream: ">"}, count=2)
    r = await scripts.reap(shard, assign_deadline_ms=deadline, now=start + 400 * deadline)
    assert r.reassigned == 2 and await redis.xlen(stream) == 7
    ids = [codec.text(f[b"id"]) for _, f in await redis.xrange(stream)]
    assert ids[5:] == ids[:2]
    await redis.xreadgroup("executors", "stuck", {stream: ">"}, count=3)
    r = await scripts.reap(shard, assign_deadline_ms=deadline, now=start + 500 * deadline)
    assert r.reassigned == 3 and await redis.xlen(stream) == 10


async def test_a_run_waiting_unread_is_looked_at_less_often_the_longer_it_waits(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A run whose entry no executor read (its workflow unserved) was looked at every 1 to 4
    deadlines for as long as it waited: a million such runs kept a server 80% busy with no
    traffic (a probe). The reaper now looks again after about as long as it has waited, 1, 2,
    4 ... 64 deadlines, and still writes no fresh entry."""
    import time

    ((shard, req),) = [make_request(keys, event="e1", seq=1, unlimited=True)]
    await scripts.admit(shard, [("0-1", req.pack())])
    leases = keys.shard(shard).leases_zset
    deadline, start = 1_000, int(time.time() * 1000)
    looks = []
    for k in range(1, 1_000):  # every deadline for 1,000 deadlines
        before = await redis.zscore(leases, req.run_id)
        r = await scripts.reap(shard, assign_deadline_ms=deadline, now=start + k * deadline)
        assert r.reassigned == 0
        if await redis.zscore(leases, req.run_id) != before:
            looks.append(k)
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert gaps == sorted(gaps) and max(gaps) <= 65, gaps  # (growing, up to 64 deadlines)
    assert len(looks) <= 6 + 1_000 // 64 + 2, looks  # 999 deadlines: 1, 2, 4 ... 32, then 64s
    assert await redis.xlen(keys.shard(shard).assignments_stream(req.workflow)) == 1


async def test_the_reaper_first_looks_at_an_assignment_when_its_deadline_passes(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """An assigned run waits in the leases zset until its assignment deadline, so the reaper
    does not read the record of every run still waiting in a backlog after a second; a
    cancel (an operator's call, which does not know the deadline) makes it look after 1 s."""
    (shard, first), (_, second) = (
        make_request(keys, event=f"e{i}", seq=i, key="k", strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in (1, 2)
    )
    await scripts.admit(shard, [("0-1", first.pack())], now=1_000, assign_deadline_ms=30_000)
    leases = keys.shard(shard).leases_zset
    assert await redis.zscore(leases, first.run_id) == 31_000
    await scripts.admit(shard, [("0-2", second.pack())], now=1_000, assign_deadline_ms=30_000)
    await scripts.cancel(shard, [first.run_id], now=2_000)  # frees the slot: second starts
    assert await redis.zscore(leases, second.run_id) == 3_000
    r = await scripts.reap(shard, assign_deadline_ms=30_000, now=3_000)
    assert r.reassigned == 0 and await redis.zscore(leases, second.run_id) == 32_000


async def test_reap_deletes_ended_runs_after_retention(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    old, new = (make_request(keys, event=f"e{i}", seq=i) for i in (1, 2))
    await admit(scripts, old, new, now=100)
    assert (await scripts.reap(old[0], now=150, retention_ms=100)).expired == 0
    assert (await scripts.reap(old[0], now=200, retention_ms=100)).expired == 1
    assert set(await records(redis, keys)) == {new[1].run_id}


async def _ended_at(
    scripts: Scripts, workflow: str, key: str, ends: list[int]
) -> list[tuple[int, RunRequest]]:
    """Runs of one group of `workflow`, each cancelled while queued at its time in `ends`."""
    reqs = [
        make_request(scripts.keys, workflow=workflow, key=key, event=f"{workflow}{i}", seq=i,
                     strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=1)
        for i in range(len(ends) + 1)
    ]  # fmt: skip
    await admit(scripts, *reqs, now=1)  # the first holds the slot, the others queue
    for (shard, req), at in zip(reqs[1:], ends, strict=True):
        assert await scripts.cancel(shard, [req.run_id], now=at) == [True]
    return reqs[1:]


async def test_each_workflow_keeps_its_ended_runs_for_its_own_retention(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    short = await _ended_at(scripts, "short", "k", [100, 100])
    long = await _ended_at(scripts, "long", "k", [100])
    shards = {s for s, _ in short + long}
    # the ended stream's entry ids are the end times
    for s in shards:
        sk = keys.shard(s)
        for tag in await redis.hkeys(sk.ended_hash):
            ids = [e for e, _ in await redis.xrange(f"{sk.ended_hash}:{tag.decode()}")]
            assert ids and all(e.startswith(b"100-") for e in ids)

    async def reap(now: int) -> int:
        got = 0
        for s in shards:
            r = await scripts.reap(s, now=now, retention_ms=1_000, retentions={"short": 100})
            got += r.expired
        return got

    assert await reap(150) == 0
    assert await reap(201) == 2  # short's retention (100 ms) passed, not the default (1 s)
    left = await records(redis, keys)
    assert {r.run_id for _, r in long} <= set(left)
    assert not {r.run_id for _, r in short} & set(left)
    assert await reap(1_101) == 1
    for s in shards:  # emptied streams and their index entries are gone
        sk = keys.shard(s)
        assert [t for t in await redis.hvals(sk.ended_hash) if t in (b"short", b"long")] == []


async def test_a_workflow_keeps_at_most_max_ended_runs_per_shard_the_oldest_go_first(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    ended = await _ended_at(scripts, "capped", "k", [10, 20, 30, 40, 50])
    shard = ended[0][0]
    r = await scripts.reap(shard, now=60, retention_ms=86_400_000, max_ended=2)
    assert r.expired == 3
    left = set(await records(redis, keys))
    assert [req.run_id in left for _, req in ended] == [False, False, False, True, True]
    assert await redis.hget(keys.shard(shard).counts_hash, "capped|C") == b"2"
    assert (await scripts.reap(shard, now=70, retention_ms=86_400_000, max_ended=2)).expired == 0


async def test_no_run_is_expired_within_the_minimum_retention_whatever_the_retention_or_cap(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Records are the de-duplication memory: a request redelivered soon after its run ended
    (an ingress crash) must find the record, however short the retention or tight the cap."""
    ended = await _ended_at(scripts, "brief", "k", [100, 110])
    shard = ended[0][0]

    async def reap(now: int) -> int:
        r = await scripts.reap(shard, now=now, retention_ms=1, max_ended=1,
                               min_retention_ms=100, retentions={"brief": 1})  # fmt: skip
        return r.expired

    assert await reap(150) == 0
    # the redelivered request of an ended run changes nothing
    again = (await scripts.admit(shard, [("0-9", ended[0][1].pack())], now=160)).duplicates
    assert again == 1
    assert await reap(201) == 1 and await reap(211) == 1


async def test_the_cap_waits_until_the_terminal_zset_of_earlier_versions_is_drained(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Legacy records are counted too but expire by the default retention only; capping by
    the count meanwhile would expire the fresh runs in their place."""
    ended = await _ended_at(scripts, "wf", "k", [10, 20, 30])
    shard = ended[0][0]
    sk = keys.shard(shard)
    await redis.hset(sk.runs_hash, f"{shard}-legacy", codec.pack({"st": "S", "w": "wf", "c": 1}))
    await redis.hincrby(sk.counts_hash, "wf|S", 1)
    await redis.zadd(sk.legacy_terminal_zset, {f"{shard}-legacy": 5})
    r = await scripts.reap(shard, now=40, retention_ms=1_000, max_ended=1)
    assert r.expired == 0
    r = await scripts.reap(shard, now=1_006, retention_ms=1_000, max_ended=1)
    assert r.expired == 1  # the legacy one, by the retention
    r = await scripts.reap(shard, now=1_007, retention_ms=1_000, max_ended=1)
    assert r.expired == 2  # now the cap: the two oldest of the three


async def test_the_reaper_drains_the_terminal_zset_of_earlier_versions(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    sk = keys.shard(0)
    await redis.hset(sk.runs_hash, "0-legacy", codec.pack({"st": "S", "w": "wf"}))
    await redis.zadd(sk.legacy_terminal_zset, {"0-legacy": 100})
    assert (await scripts.reap(0, now=150, retention_ms=100)).expired == 0
    assert (await scripts.reap(0, now=201, retention_ms=100)).expired == 1
    assert await redis.exists(sk.runs_hash, sk.legacy_terminal_zset) == 0


async def test_manual_cancel(redis: Redis, keys: Keys, scripts: Scripts) -> None:
    reqs = [
        make_request(keys, event=f"e{i}", seq=i, strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in range(3)
    ]
    shard = reqs[0][0]
    await admit(scripts, *reqs)
    await claim(scripts, shard, reqs[0][1])
    flags = await scripts.cancel(shard, [reqs[0][1].run_id, reqs[2][1].run_id])
    assert flags == [True, True]
    # the running one is told to stop and its slot goes to the next queued run
    assert states(await records(redis, keys), *reqs) == ["X", "A", "C"]
    assert await scripts.cancel(shard, [reqs[2][1].run_id]) == [False]


# -- idempotency ------------------------------------------------------------------------------


async def test_a_request_delivered_twice_changes_nothing_the_second_time(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(redis, keys, ["wf"])
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=2) for i in range(3)]
    await admit(scripts, *reqs)
    before = await snapshot(redis, keys)
    await admit(scripts, *reqs, now=99)
    assert await snapshot(redis, keys) == before


async def test_a_result_delivered_twice_changes_nothing_the_second_time(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(redis, keys, ["wf"])
    reqs = [
        make_request(keys, event=f"e{i}", seq=i, strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in range(3)
    ]
    shard = reqs[0][0]
    await admit(scripts, *reqs)
    await claim(scripts, shard, reqs[0][1])
    await finish(scripts, shard, reqs[0][1], Outcome.SUCCEEDED)
    before = await snapshot(redis, keys)
    await finish(scripts, shard, reqs[0][1], Outcome.SUCCEEDED)
    await finish(scripts, shard, reqs[0][1], Outcome.FAILED)
    assert await snapshot(redis, keys) == before


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\xc1garbage", "payload"),
        (codec.pack([1, 2, 3]), "id"),
        (codec.pack({"g": "0" * 16}), "id"),
        ("drop:s", "s"),
        ("set:max=0", "max"),
        ("set:st=9", "st"),
        ("set:g=short", "g"),
    ],
)
async def test_a_malformed_request_is_refused_and_nothing_is_written(
    redis: Redis, keys: Keys, scripts: Scripts, payload: bytes | str, field: str
) -> None:
    shard, good = make_request(keys, event="good", seq=1)
    if isinstance(payload, str):
        body = codec.unpack(good.pack())
        op, _, arg = payload.partition(":")
        if op == "drop":
            del body[arg]
        else:
            name, _, value = arg.partition("=")
            body[name] = int(value) if value.isdigit() else value
        payload = codec.pack(body)
    before = await snapshot(redis, keys)
    with pytest.raises(MalformedItem) as info:
        await scripts.admit(shard, [("0-1", good.pack()), ("0-2", payload)])
    assert info.value.index == 1 and info.value.detail == field
    assert await snapshot(redis, keys) == before


async def test_a_request_for_another_shard_is_refused(keys: Keys, scripts: Scripts) -> None:
    shard, req = make_request(keys, event="e", seq=1)
    with pytest.raises(WrongShard):
        await scripts.admit((shard + 1) % keys.shards, [("0-1", req.pack())])


async def test_unknown_run_ids_are_refused_and_nothing_is_written(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    shard, req = make_request(keys, event="e", seq=1)
    await admit(scripts, (shard, req))
    before = await snapshot(redis, keys)
    with pytest.raises(UnknownRun) as info:
        await scripts.cancel(shard, [req.run_id, f"{shard}-nope"])
    assert info.value.index == 1
    with pytest.raises(UnknownRun):
        result = RunResult(f"{shard}-nope", 1, Outcome.SUCCEEDED).pack()
        await scripts.finish(shard, [("0-1", result)])
    with pytest.raises(MalformedItem):
        await scripts.finish(shard, [("0-1", codec.pack({"id": req.run_id, "a": 1, "o": "?"}))])
    with pytest.raises(BadArguments):
        await scripts.claim(shard, "ex", [("s", "0-1", req.run_id, "x")], lease_ms=LEASE)
    assert await snapshot(redis, keys) == before


# -- cluster readiness ------------------------------------------------------------------------


async def test_every_key_of_a_script_call_hashes_to_one_slot(
    redis: Redis, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, list[str]]] = []
    original = Scripts._call

    async def spy(
        self: Scripts, name: str, call_keys: list[str], args: list[object]
    ) -> list[object]:
        seen.append((name, list(call_keys)))
        return await original(self, name, call_keys, args)

    monkeypatch.setattr(Scripts, "_call", spy)
    for shard in range(keys.shards):
        await scripts.reap(shard)
        await scripts.heartbeat(shard, "ex", [], lease_ms=LEASE)
        await scripts.claim(shard, "ex", [], lease_ms=LEASE)
        await scripts.admit(shard, [])
        await scripts.finish(shard, [])
        await scripts.cancel(shard, [])
    assert {name for name, _ in seen} == {"admit", "claim", "heartbeat", "finish", "reap", "cancel"}
    slots_by_shard: dict[int, set[int]] = {}
    for _, call_keys in seen:
        slots = {key_slot(k.encode()) for k in call_keys}
        assert len(slots) == 1, call_keys
        shard = int(call_keys[0].split(":")[1].rstrip("}"))
        slots_by_shard.setdefault(shard, set()).update(slots)
    assert all(len(s) == 1 for s in slots_by_shard.values())
    # distinct shards are distinct slots, so a cluster can spread them over its nodes
    assert len({next(iter(s)) for s in slots_by_shard.values()}) == keys.shards


async def test_a_key_equal_to_the_event_id_is_stored_once_and_read_back(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A run's key is left out of its record when it is the event id (every run of a workflow
    without a limit: its key is its event id); the record, the claim and the CLI still give
    it. A record that keeps its key, even an empty one, reads as before."""
    from supersede.protocol import RunRecord

    same = make_request(keys, key="1-0", event="1-0", seq=1, unlimited=True)
    other = make_request(keys, key="", event="2-0", seq=2)
    await admit(scripts, same, other)
    recs = await records(redis, keys)
    assert "k" not in recs[same[1].run_id] and recs[other[1].run_id]["k"] == ""
    for shard, req in (same, other):
        raw = await redis.hget(keys.shard(shard).runs_hash, req.run_id)
        assert RunRecord.decode(req.run_id, raw).key == req.key
        assert (await claim(scripts, shard, req)).key == req.key


async def test_beyond_the_cap_the_oldest_explicit_ids_are_forgotten(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """Ten explicit event ids claimed on one shard: with a cap of three, the next claim
    forgets the oldest seven (but none claimed within the floor), so a shard holds about the
    cap however many ids producers send within the window (24 h by default). (Before, ids
    stayed for the whole window: 1,000 explicit ids/s held 86 million.)"""
    sk = keys.shard(0)
    for i in range(10):
        assert await scripts.claim_ids(
            0, [(f"d{i}", f"1-{i}")], window_ms=86_400_000, now=1_000 + i
        )
    cap = {"window_ms": 86_400_000, "max_ids": 3, "floor_ms": 100}
    assert await scripts.claim_ids(0, [("d10", "2-0")], now=1_050, **cap) == [True]
    assert await redis.zcard(sk.ids_at_zset) == 11  # every one claimed within the floor
    assert await scripts.claim_ids(0, [("d11", "3-0")], now=5_000, **cap) == [True]
    left = {d.decode() for d in await redis.hkeys(sk.ids_hash)}
    assert left == {"d8", "d9", "d10", "d11"}
    assert {d.decode() for d in await redis.zrange(sk.ids_at_zset, 0, -1)} == left
    # a remembered id is still a duplicate; a forgotten one is owned anew
    assert await scripts.claim_ids(0, [("d9", "9-9"), ("d0", "9-9")], now=5_001, **cap) == [
        False,
        True,
    ]


async def test_explicit_ids_claimed_in_full_batches_stay_within_the_window_and_the_cap(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """A claim forgot at most 1,000 old ids, however many it claimed: while ingress read full
    batches (a backlog; an event of several workflows claims one id for each), every call added
    more than it forgot, and a shard held 120 times its cap, every id past the window (a
    probe: 239,000 ids at a cap of 2,000). A call now forgets as many as it claims, and 1,000
    more."""
    sk = keys.shard(0)
    bounds = {"window_ms": 1_000, "max_ids": 1_500, "floor_ms": 100}
    now = 10_000
    for call in range(8):  # (each call 1.5 s after the last: every id before it is past the window)
        pairs = [(f"d{call}-{i}", f"{call}-{i}") for i in range(3_000)]
        assert all(await scripts.claim_ids(0, pairs, now=now, **bounds))
        now += 1_500
    held = await redis.zcard(sk.ids_at_zset)
    assert held == await redis.hlen(sk.ids_hash)
    assert held == 3_000  # (the last call's, within the window: the cap yields to the floor)
    # the trims' claims of none forget 1,000 a call, as before
    assert await scripts.claim_ids(0, [], now=now, **bounds) == []
    assert await redis.zcard(sk.ids_at_zset) == 2_000
    # a claim of 9,000 ids forgets the 10,000 before it at once (more than Lua unpacks in one
    # call: the script failed, a review)
    old = [(f"o{i}", "1-1") for i in range(10_000)]
    assert all(await scripts.claim_ids(0, old, now=now, **bounds))
    assert await redis.zcard(sk.ids_at_zset) == 10_000  # (the 2,000 before were forgotten)
    many = [(f"m{i}", "2-2") for i in range(9_000)]
    assert all(await scripts.claim_ids(0, many, now=now + 1_500, **bounds))
    assert await redis.zcard(sk.ids_at_zset) == await redis.hlen(sk.ids_hash) == 9_000


async def test_a_claim_whose_reply_was_lost_is_taken_back_by_its_executor(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The server carried out a claim call whose reply never came (it froze mid-call): its
    runs sat RUNNING under the executor, never started, for a lease, and then used an attempt
    (one of one attempt FAILED unrun: a probe saw 34 of 40 such runs). The executor takes back
    the runs claimed for it since the call was sent that it does not hold, renewed from now;
    not those it holds, nor earlier claims, nor another executor's, nor ended runs. An older
    attempt it holds (its result waiting while the reaper retried the run) hides no newer one
    (a re-probe: 12 runs claimed and never started)."""
    mine, held, early, theirs, ended = (
        make_request(keys, event=f"e{i}", seq=i + 1, unlimited=True) for i in range(5)
    )
    shard = mine[0]
    for req in (mine, held, early, theirs, ended):
        await scripts.admit(req[0], [(f"0-{req[1].seq[-1]}", req[1].pack())], now=1)
    await claim(scripts, early[0], early[1], now=50)  # (before the lost call was sent)
    for req in (mine, held, ended):
        await claim(scripts, req[0], req[1], now=120)
    stream = keys.shard(theirs[0]).assignments_stream(theirs[1].workflow)
    await scripts.claim(theirs[0], "other", [(stream, "0-9", theirs[1].run_id, 1)],
                        lease_ms=LEASE, now=120)  # fmt: skip
    await finish(scripts, ended[0], ended[1], Outcome.SUCCEEDED)
    got: dict[int, list[str]] = {}
    for s in sorted({r[0] for r in (mine, held, early, theirs, ended)}):
        claims = await scripts.reclaim(s, "ex", [(held[1].run_id, 1), (mine[1].run_id, 0)],
                                       since_ms=100, lease_ms=LEASE, now=500)  # fmt: skip
        got[s] = [c.run_id for c in claims]
        assert all(c.claimed and c.attempt == 1 and c.workflow == "wf" for c in claims)
    assert sorted(r for rs in got.values() for r in rs) == [mine[1].run_id]
    lease = await redis.zscore(keys.shard(shard).leases_zset, mine[1].run_id)
    assert lease == 500 + LEASE  # (renewed: it starts now)
    assert await scripts.reclaim(shard, "ex", [], since_ms=200, lease_ms=LEASE) == []
    # one cancelled since (CANCELLING) is taken back too, saying so: the executor starts and
    # stops it (left out, it sat CANCELLING for a lease, a strict key's next run waiting)
    await scripts.cancel(shard, [mine[1].run_id], now=600)
    [back] = await scripts.reclaim(shard, "ex", [(held[1].run_id, 1)], since_ms=100,
                                   lease_ms=LEASE, now=700)  # fmt: skip
    assert (back.run_id, back.state) == (mine[1].run_id, "X")
    # an attempt the executor started is never taken back, whichever other attempts of its
    # run it names (a run named twice, in two attempts, was held in the last one only)
    named = [(held[1].run_id, 1), (mine[1].run_id, 1), (mine[1].run_id, 0)]
    assert await scripts.reclaim(shard, "ex", named, since_ms=100, lease_ms=LEASE, now=800) == []


async def test_an_executor_starts_the_runs_of_a_take_whose_reply_was_lost(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """The executor's side: a take call that raised (here the server carried it out and its
    reply was dropped) leaves `lost_since`; the next fetch iteration's reclaim starts its runs
    once, and none it already runs."""
    import time

    from supersede.services.executor.cancel import Cancels
    from supersede.services.executor.claim import Claimer
    from supersede.services.executor.config import ExecutorConfig
    from supersede.services.executor.steps import Runner
    from supersede.workflow import Context, Workflow

    ran: list[str] = []
    wf = Workflow("wf", on_events=["e"])

    @wf.step()
    async def step(ctx: Context) -> None:
        ran.append(ctx.run_id)

    class _Outbox:
        def put(self, shard: int, result: Any) -> asyncio.Future[int]:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(0)
            return done

    await ensure_groups(redis, keys, ["wf"])
    body = pack_input({}, {}, "e", "1-0")
    reqs = [make_request(keys, event=f"e{i}", seq=i + 1, unlimited=True, payload=body)
            for i in range(3)]  # fmt: skip
    await admit(scripts, *reqs)
    config = ExecutorConfig(lease_ms=LEASE)
    runner = Runner([wf], config, _Outbox())
    cancels = Cancels(redis, keys, runner, config, cluster=False)
    claimer = Claimer(scripts, "ex", config, runner, cancels)
    streams = [(keys.shard(s).assignments_stream("wf"), s) for s in sorted({s for s, _ in reqs})]

    async def lost(*args: Any, **kwargs: Any) -> Any:
        await Scripts.take(scripts, *args, **kwargs)  # (carried out; the reply is dropped)
        raise TimeoutError("Timeout reading from socket")

    scripts.take = lost  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        await claimer.take(streams, 10)
    assert claimer.lost_since and not runner.active
    # an older attempt whose result waits here hides no newer one (a re-probe)
    from supersede.services.executor.steps import Reported

    shard0, older = reqs[0]
    stale = RunResult(older.run_id, 0, Outcome.SUCCEEDED)
    runner.awaiting[older.run_id] = Reported(older.run_id, shard0, 0, stale, time.monotonic())
    assert await claimer.reclaim() == 3
    deadline = time.monotonic() + 10
    while len(ran) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(ran) == sorted(r.run_id for _, r in reqs) and not claimer.lost_since
    await claimer.reclaim()  # (nothing more to take back: no run starts twice)
    claimer.lost_since = dict.fromkeys(range(keys.shards), time.time() - 60)
    await claimer.reclaim()
    await asyncio.sleep(0.05)
    assert len(ran) == 3
    runner.close()


async def test_scripts_lost_by_a_restart_are_loaded_on_one_connection(
    redis_url: str, keys: Keys
) -> None:
    """A server that restarted empty answers every call in flight NOSCRIPT: each loaded the
    script at once, on a connection of its own the pool then kept (18-32 a process after each
    restart, a probe). They are loaded one at a time now."""
    from supersede.config import connect
    from supersede.lane import lane_of

    client = connect(redis_url)
    lane = lane_of(client)
    assert lane is not None
    try:
        scripts = Scripts(client, keys, lane=lane)
        await scripts.load()
        await client.script_flush()
        await asyncio.gather(*(scripts.reap(s % keys.shards, now=1) for s in range(16)))
        pool = client.connection_pool
        opened = len(pool._available_connections) + len(pool._in_use_connections)
        assert opened <= 2, opened
    finally:
        await lane.aclose()
        await client.aclose()


async def test_a_start_loads_every_script_in_one_round_trip(redis: Redis, keys: Keys) -> None:
    """Every service loads the scripts as it starts: one SCRIPT LOAD after another took 15
    round trips (3.6 s of a start 0.24 s away from its server). One pipeline now; each script
    is on the server afterwards, under the digest its calls use."""
    from supersede.scripts import SCRIPT_NAMES
    from tests.support import RoundTrips

    await redis.script_flush()
    scripts = Scripts(redis, keys)
    await redis.ping()  # (the connection is open: what follows is the load's own)
    with RoundTrips() as trips:
        await scripts.load()
    assert trips.sent == 1
    shas = [scripts._scripts[name][0].sha for name in SCRIPT_NAMES]
    assert await redis.script_exists(*shas) == [True] * len(SCRIPT_NAMES)
    await scripts.reap(0, now=1)  # (a call by its digest: no NOSCRIPT)


async def test_a_start_creates_its_consumer_groups_in_one_round_trip(
    redis: Redis, keys: Keys
) -> None:
    """Each service creates the groups it reads as it starts: one XGROUP after another made
    an executor of 20 workflows wait 320 round trips at every start, 39 s from a server 100 ms
    away (a latency probe). One pipeline now, again at the next start (groups that exist are
    left as they are, their reads kept), and an error other than an existing group is raised."""
    from redis.exceptions import ResponseError

    from supersede.streams import all_groups, create_groups
    from tests.support import RoundTrips

    groups = all_groups(keys, [f"w{i}" for i in range(20)])
    await redis.ping()
    with RoundTrips() as trips:
        await create_groups(redis, groups)
    assert trips.sent == 1
    stream, group = groups[-1]
    await redis.xadd(stream, {"id": "r", "a": "1"})
    await redis.xreadgroup(group, "c", {stream: ">"})
    with RoundTrips() as trips:
        await create_groups(redis, groups)  # (a restart)
    assert trips.sent == 1
    for stream, group in groups:
        [info] = await redis.xinfo_groups(stream)
        assert info["name"].decode() == group
    assert (await redis.xinfo_groups(stream))[0]["pending"] == 1
    await redis.set(f"{keys.namespace}:not-a-stream", "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await create_groups(redis, [(f"{keys.namespace}:not-a-stream", "g"), *groups[:2]])


async def test_a_full_server_s_reaper_frees_the_old_records_whatever_leases_lapsed(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """At maxmemory (noeviction) the server refuses a script's first write that may grow
    memory, and lets the rest through once it wrote anything. The reaper retried the lapsed
    leases first, and a retry's first write is an assignment: with any lease lapsed, as they
    all do while renewals are refused, every call failed there and no old record was deleted;
    the server stayed full until an operator acted (a memory probe: 20,020 records past their
    retention, 2 minutes). The old records go first now, and the retries follow."""
    old = make_request(keys, event="e-old", key="k-old", seq=1)
    for i in range(200):  # (a run of the same shard, in a group of its own)
        lapsed = make_request(keys, event=f"e-{i}", key=f"k-{i}", seq=2 + i)
        if lapsed[0] == old[0]:
            break
    shard = old[0]
    await admit(scripts, old, lapsed)
    await claim(scripts, shard, old[1])
    await finish(scripts, shard, old[1], Outcome.SUCCEEDED)
    await claim(scripts, shard, lapsed[1])  # (its lease lapses at 2 + LEASE)
    await redis.config_set("maxmemory", 1)  # (noeviction: every first write is refused)
    try:
        r = await scripts.reap(shard, retention_ms=1_000, now=100_000)
    finally:
        await redis.config_set("maxmemory", 0)
    assert (r.expired, r.retried) == (1, 1), r
    recs = await records(redis, keys)
    assert old[1].run_id not in recs
    assert (recs[lapsed[1].run_id]["st"], recs[lapsed[1].run_id]["a"]) == ("A", 2)


async def test_a_lag_redis_reports_wrong_is_set_right_when_few_entries_are_unread(
    redis: Redis, scripts: Scripts
) -> None:
    """Redis before 7.2.4 can restore a group's entries-read wrong after a restart from its AOF
    (a soak probe: the inbox's lag 10,103 for good, every group read to the end), which is the
    state `XGROUP SETID ... ENTRIESREAD` makes here. heal_lag sets it right without moving the
    group, for a group read to the end and for one with a few entries unread (counted); a lag
    already right, more unread than it counts, and a missing stream are left."""
    for stream in ("s:read", "s:behind"):
        await redis.xgroup_create(stream, "g", id="$", mkstream=True)
        for i in range(20):
            await redis.xadd(stream, {"f": str(i)})
        await redis.xreadgroup("g", "c", {stream: ">"}, count=20 if stream == "s:read" else 19)
        [g] = await redis.xinfo_groups(stream)
        await redis.execute_command("XGROUP", "SETID", stream, "g", g["last-delivered-id"],
                                    "ENTRIESREAD", 3)  # fmt: skip
    [before] = await redis.xinfo_groups("s:read")
    assert before["lag"] == 17  # (the wrong figure: nothing is unread)
    assert await scripts.heal_lag("s:read", "g") == 17
    [after] = await redis.xinfo_groups("s:read")
    assert after["lag"] == 0 and after["last-delivered-id"] == before["last-delivered-id"]
    assert after["pending"] == before["pending"] == 20
    assert await scripts.heal_lag("s:read", "g") == 0  # (right already)
    [behind] = await redis.xinfo_groups("s:behind")
    assert behind["lag"] == 17  # (one entry is unread)
    assert await scripts.heal_lag("s:behind", "g", most=0) == 0  # (more than it counts)
    assert await scripts.heal_lag("s:behind", "g") == 17
    [after] = await redis.xinfo_groups("s:behind")
    assert after["lag"] == 1 and after["last-delivered-id"] == behind["last-delivered-id"]
    assert await scripts.heal_lag("s:behind", "g") == 0  # (right already)
    assert await scripts.heal_lag("s:none", "g") == 0
    # A producer's MAXLEN trimmed entries the group had not read: Redis 7.0 counted them as
    # unread for good (a producer probe: the inbox "unread" in `status`, ingress keeping up)
    await redis.xgroup_create("s:trimmed", "g", id="0", mkstream=True)
    for i in range(10):
        await redis.xadd("s:trimmed", {"f": str(i)})
    await redis.xreadgroup("g", "c", {"s:trimmed": ">"}, count=5)
    await redis.xadd("s:trimmed", {"f": "10"}, maxlen=3, approximate=False)
    await redis.xreadgroup("g", "c", {"s:trimmed": ">"}, count=1)  # (two left unread)
    await scripts.heal_lag("s:trimmed", "g")
    [trimmed] = await redis.xinfo_groups("s:trimmed")
    assert trimmed["lag"] == 2, trimmed
