"""Debounce on a real server, with the scripts' clock given: a debounced group's newest arrival
waits until no newer event came for `debounce_ms` (at most `max_wait_ms` after the window's
first), newer events supersede the waiting run, and the timers live in the due zset."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.protocol import RunRequest, Strategy
from supersede.scripts import Scripts
from tests.support import make_request, records


def _req(keys: Keys, i: int, **kw: Any) -> tuple[int, RunRequest]:
    return make_request(keys, event=f"e{i}", seq=i, debounce_ms=500, **kw)


async def _admit(scripts: Scripts, now: int, *reqs: tuple[int, RunRequest]) -> int:
    r = await scripts.admit(reqs[0][0], [(f"0-{i}", q.pack()) for i, (_, q) in enumerate(reqs)],
                            now=now)  # fmt: skip
    return r.due


async def _states(redis: Redis, keys: Keys, *reqs: tuple[int, RunRequest]) -> list[Any]:
    recs = await records(redis, keys)
    return [recs[q.run_id]["st"] for _, q in reqs]


async def test_the_newest_event_of_a_quiet_window_runs_and_the_others_never_start(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    a, b, c = (_req(keys, i) for i in (1, 2, 3))
    shard, sk = a[0], keys.shard(a[0])
    assert await _admit(scripts, 1000, a) == 1500
    assert await _admit(scripts, 1100, b) == 1600
    assert await _states(redis, keys, a, b) == ["C", "Q"]
    recs = await records(redis, keys)
    assert recs[a[1].run_id]["why"] == "superseded" and recs[a[1].run_id]["by"] == b[1].run_id
    assert await _admit(scripts, 1200, c) == 1700
    assert await redis.zscore(sk.due_zset, a[1].group) == 1700
    assert (await scripts.fire_debounced(shard, now=1699)).fired == 0
    assert await _states(redis, keys, a, b, c) == ["C", "C", "Q"]
    fired = await scripts.fire_debounced(shard, now=1700)
    assert (fired.fired, fired.assigned, fired.next_due) == (1, 1, 0)
    assert await _states(redis, keys, a, b, c) == ["C", "C", "A"]
    assert await redis.hlen(sk.debounce_hash) == 0 and await redis.zcard(sk.due_zset) == 0
    # (the run the window let through is named: an older event later ends at once)
    named = await redis.hget(sk.fences_hash, f"{c[1].group}|last")
    assert f"{c[1].group}|{named.decode()}" == _member(keys, c)
    # after the window the next event opens a new one, and then arrives at its group's
    # strategy like any run: under CANCEL_IN_PROGRESS it supersedes the running one
    d = _req(keys, 4)
    assert await _admit(scripts, 2000, d) == 2500
    assert await _states(redis, keys, c, d) == ["A", "Q"]
    await scripts.fire_debounced(shard, now=2500)
    assert await _states(redis, keys, c, d) == ["C", "A"]


async def test_max_wait_caps_a_window_that_keeps_being_extended(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    reqs = [_req(keys, i, max_wait_ms=800) for i in range(1, 4)]
    assert await _admit(scripts, 10, reqs[0]) == 510
    assert await _admit(scripts, 410, reqs[1]) == 810  # min(410 + 500, 10 + 800)
    assert await _admit(scripts, 710, reqs[2]) == 810
    await scripts.fire_debounced(reqs[0][0], now=810)
    assert await _states(redis, keys, *reqs) == ["C", "C", "A"]


async def test_a_late_older_event_ends_at_once_and_leaves_the_timer(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    new, old = _req(keys, 9), _req(keys, 5)
    assert await _admit(scripts, 1000, new) == 1500
    assert await _admit(scripts, 1300, old) == 0  # no timer moved
    recs = await records(redis, keys)
    assert recs[old[1].run_id]["st"] == "C" and recs[old[1].run_id]["by"] == new[1].run_id
    assert await redis.zscore(keys.shard(new[0]).due_zset, new[1].group) == 1500


def _member(keys: Keys, req: tuple[int, RunRequest]) -> str:
    return f"{req[1].group}|{req[1].seq}|{req[1].run_id}"


async def test_an_older_event_that_arrives_after_the_window_closed_ends_at_once(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """An older event that arrived after its key's window had fired (a slow ingress, a
    redelivery) opened a window of its own and, under GROUP_ROUND_ROBIN, ran after the newer
    one (a strategies probe; the README says it ends at once). It ends at once, superseded by
    the run the window let through, even after a newer window was cancelled by hand; a newer
    one opens a window as before. The name of the run let through goes when reap forgets the
    group."""
    new = _req(keys, 9, strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=2)
    old = _req(keys, 5, strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=2)
    newer = _req(keys, 12, strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=2)
    shard, sk = new[0], keys.shard(new[0])
    assert await _admit(scripts, 1000, new) == 1500
    await scripts.fire_debounced(shard, now=1500)
    assert await _admit(scripts, 1600, old) == 0  # (no window opened)
    recs = await records(redis, keys)
    assert recs[old[1].run_id]["st"] == "C" and recs[old[1].run_id]["by"] == new[1].run_id
    assert await _states(redis, keys, new, old) == ["A", "C"]
    assert await _admit(scripts, 1700, newer) == 2200
    # the newer window cancelled by hand (a review: it took the name's place), then another
    # late, older one: it ends all the same
    assert await scripts.cancel(shard, [newer[1].run_id], now=1800) == [True]
    later = _req(keys, 7, strategy=Strategy.GROUP_ROUND_ROBIN, max_runs=2)
    assert await _admit(scripts, 1900, later) == 0
    await scripts.fire_debounced(shard, now=2200)
    assert await _states(redis, keys, new, old, newer, later) == ["A", "C", "C", "C"]
    # its runs ended, the group idle past the retention: forgotten, with the name
    assert await scripts.cancel(shard, [new[1].run_id], now=2300) == [True]
    assert await redis.hexists(sk.fences_hash, f"{new[1].group}|last")
    await scripts.reap(shard, now=10_000_000, retention_ms=1000)
    assert not await redis.hexists(sk.fences_hash, f"{new[1].group}|last")


async def test_a_waiting_run_cancelled_by_hand_is_skipped_and_a_new_window_opens(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    a, b = _req(keys, 1, strategy=Strategy.GROUP_ROUND_ROBIN), _req(keys, 2)
    shard = a[0]
    await _admit(scripts, 1000, a)
    assert await scripts.cancel(shard, [a[1].run_id], now=1100) == [True]
    assert (await scripts.fire_debounced(shard, now=1500)).fired == 0
    assert await _admit(scripts, 2000, b) == 2500  # a new window (a cancelled run never waits)
    await scripts.fire_debounced(shard, now=2500)
    assert await _states(redis, keys, a, b) == ["C", "A"]


async def test_one_batch_keeps_only_its_newest_arrival_waiting(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    reqs = [_req(keys, i) for i in (3, 1, 2)]  # arrival order is not sequence order
    assert await _admit(scripts, 1000, *reqs) == 1500
    assert await _states(redis, keys, *reqs) == ["Q", "C", "C"]


async def test_a_waiting_run_cancelled_by_hand_does_not_supersede_an_older_late_arrival(
    redis: Redis, keys: Keys, scripts: Scripts
) -> None:
    """CANCEL_IN_PROGRESS ranks the runs its group admitted. A run cancelled while it waited
    in its debounce window was never admitted, so a later event with an older sequence (a
    late delivery) opens a new window and runs. It used to be superseded by the cancelled run,
    which the cancel remembered as an admitted one (found by the property test)."""
    waiting, late = _req(keys, 20), _req(keys, 10)
    shard = waiting[0]
    await _admit(scripts, 1000, waiting)
    assert await scripts.cancel(shard, [waiting[1].run_id], now=1100) == [True]
    assert await _admit(scripts, 1200, late) == 1700
    fired = await scripts.fire_debounced(shard, now=1700)
    assert fired.fired == 1 and fired.assigned == 1 and fired.cancelled == 0
    assert await _states(redis, keys, waiting, late) == ["C", "A"]
