"""The admission service: in-process behaviour, and real processes killed with SIGKILL
(invariant 3 of docs/design.md: every run reaches exactly one terminal state)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis

from supersede.config import Settings
from supersede.keys import Keys
from supersede.protocol import (
    ADMISSION_GROUP,
    EXECUTOR_GROUP,
    PAYLOAD,
    Outcome,
    RunRecord,
    RunRequest,
    RunResult,
    Strategy,
)
from supersede.registry import register
from supersede.scripts import Scripts
from supersede.server import free_port
from supersede.services.admission.service import Admission, AdmissionConfig, _chunks
from supersede.streams import ensure_groups
from tests.support import (
    eventually,
    make_request,
    pending_count,
    records,
    run_count,
    scrape,
    scrape_when,
)


async def backlog(redis: Redis, keys: Keys) -> int:
    total = 0
    for sk in keys.all_shards():
        for stream in (sk.requests_stream, sk.results_stream):
            for g in await redis.xinfo_groups(stream):
                if g["name"] == ADMISSION_GROUP.encode():
                    total += int(g["pending"]) + int(g.get("lag") or 0)
    return total


def env_for(url: str, keys: Keys) -> dict[str, str]:
    return {
        **os.environ,
        "SUPERSEDE_REDIS_URL": url,
        "SUPERSEDE_NAMESPACE": keys.namespace,
        "SUPERSEDE_SHARDS": str(keys.shards),
    }


def start_admission(
    url: str, keys: Keys, *extra: str, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "supersede", "admission", "--block-ms", "100", *extra]
    return subprocess.Popen(cmd, env=env_for(url, keys), stderr=stderr)


@pytest.fixture
async def service(redis: Redis, redis_url: str, keys: Keys):  # type: ignore[no-untyped-def]
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig(block_ms=50, reap_interval=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(admission.run(stop))
    await eventually(lambda: asyncio.sleep(0, admission.ready))
    yield admission
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_requests_and_results_flow_through_the_service(
    redis: Redis, keys: Keys, service: Admission
) -> None:
    reqs = [make_request(keys, event=f"e{i}", seq=i, max_runs=1) for i in range(3)]
    for shard, req in reqs:
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
    await eventually(lambda: _states_are(redis, keys, ["C", "C", "A"], reqs))
    shard, last = reqs[-1]
    await service.scripts.claim(shard, "ex", [("s", "0-1", last.run_id, 1)], lease_ms=60_000)
    result = RunResult(last.run_id, 1, Outcome.SUCCEEDED).pack()
    await redis.xadd(keys.shard(shard).results_stream, {"r": result})
    await eventually(lambda: _states_are(redis, keys, ["C", "C", "S"], reqs))
    assert await backlog(redis, keys) == 0


async def test_a_batch_slower_than_the_takeover_delay_is_not_taken_over_by_its_own_process(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XAUTOCLAIM takes this consumer's idle entries too: a batch whose call took longer than
    --claim-idle-ms (a slow server) was taken over by its own process, and applied again
    while the first call ran; so were the entries read ahead meanwhile (a backlog: the next
    read is sent before a batch is applied). Each request is admitted once."""
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    config = AdmissionConfig(block_ms=50, reap_interval=0.05, batch=2, claim_idle_ms=100)
    service = Admission(redis, settings, config)
    calls: list[bytes] = []
    admit = service._admit

    async def slow(shard: int, items: Any, *args: Any) -> Any:
        first = not calls
        calls.extend(entry for entry, _ in items)
        if first:
            await asyncio.sleep(1.5)  # (15 take-over delays, 30 ticks)
        return await admit(shard, items, *args)

    monkeypatch.setattr(service, "_admit", slow)
    reqs = [make_request(keys, event=f"slow{i}", seq=i, key="k", max_runs=1) for i in range(6)]
    [shard] = {shard for shard, _ in reqs}  # (one key: one shard, one stream, a backlog)
    for _, req in reqs:
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await eventually(lambda: asyncio.sleep(0, service.ready))
        await eventually(lambda: _is_zero(backlog(redis, keys)), timeout=20)
        assert len(calls) == len(set(calls)) == len(reqs), calls
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_failed_batch_is_read_again_at_once_not_after_the_takeover_delay(
    redis: Redis, keys: Keys, service: Admission
) -> None:
    """Script calls fail (a key of the wrong type stands in for a failover): the batch stays
    pending for this consumer, which reads it again from '0' after each failure, so it lands
    as soon as the cause is gone, not after the XAUTOCLAIM idle time (a minute here)."""
    service.config.claim_idle_ms = 60_000  # (so only the re-read can land it in time)
    for sk in keys.all_shards():
        await redis.set(sk.runs_hash, "not a hash")  # every admit call now fails
    reqs = [make_request(keys, event=f"e{i}", seq=i, key=f"k{i}") for i in range(6)]
    for shard, req in reqs:
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})

    async def all_pending() -> bool:
        streams = [sk.requests_stream for sk in keys.all_shards()]
        return await pending_count(redis, streams, ADMISSION_GROUP) == len(reqs)

    await eventually(all_pending)
    await asyncio.sleep(1.0)  # a few failed attempts
    for sk in keys.all_shards():
        await redis.delete(sk.runs_hash)
    await eventually(lambda: _states_are(redis, keys, ["A"] * len(reqs), reqs), timeout=15)
    assert await backlog(redis, keys) == 0


async def test_a_deleted_stream_and_its_group_are_recreated_and_work_goes_on(
    redis: Redis, keys: Keys, service: Admission, caplog: pytest.LogCaptureFixture
) -> None:
    """NOGROUP (a stream deleted, or a failover to a replica without the group): the groups
    are created again from the first entry and requests written since are admitted. It is
    said in one line that names what happened (a traceback ending in "NOGROUP No such key",
    after a FLUSHALL in a Redis-operator probe). A blocking read ended by the deletion
    ("UNBLOCKED the stream key no longer exists") is the same, not a failover as was said."""
    shard, req = make_request(keys, event="e1", seq=1)
    stream = keys.shard(shard).requests_stream
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await redis.delete(stream)  # (under a blocking XREADGROUP: UNBLOCKED, then NOGROUP)
        await redis.xadd(stream, {"r": req.pack()})  # a new stream, without the admission group
        await eventually(lambda: _states_are(redis, keys, ["A"], [(shard, req)]), timeout=10)
    assert [g["name"] for g in await redis.xinfo_groups(stream)] == [ADMISSION_GROUP.encode()]
    said = [(r.getMessage(), r.exc_info) for r in caplog.records if r.levelno >= logging.ERROR]
    assert said and all(exc_info is None for _, exc_info in said), said
    assert all("consumer group was deleted" in line for line, _ in said), said


async def _states_are(redis: Redis, keys: Keys, expected: list[str], reqs) -> bool:  # type: ignore[no-untyped-def]
    recs = await records(redis, keys)
    return [recs.get(r.run_id, {}).get("st") for _, r in reqs] == expected


async def test_a_bad_entry_is_dead_lettered_and_the_batch_still_lands(
    redis: Redis, keys: Keys, service: Admission
) -> None:
    shard, good = make_request(keys, event="good", seq=2)
    other_shard, other = make_request(keys, event="other", seq=3, key="other-key")
    stream = keys.shard(shard).requests_stream
    await redis.xadd(stream, {"r": b"\xc1not msgpack"})
    await redis.xadd(stream, {"nothing": b"here"})
    await redis.xadd(stream, {"rs": b"garbage"})
    no_group = msgpack.unpackb(good.pack())
    del no_group["g"]
    await redis.xadd(stream, {"r": msgpack.packb(no_group)})
    await redis.xadd(stream, {"r": good.pack()})
    await redis.xadd(
        keys.shard(shard).results_stream,
        {"r": RunResult(f"{shard}-nope", 1, Outcome.SUCCEEDED).pack()},
    )

    async def dead_letters() -> bool:
        return await redis.xlen(keys.dead_stream) == 5

    await eventually(dead_letters)
    letters = await redis.xrange(keys.dead_stream)
    reasons = sorted(f[b"reason"] for _, f in letters)
    assert reasons == [b"malformed", b"malformed", b"malformed", b"malformed", b"unknown_run"]
    details = {f[b"detail"].decode() for _, f in letters}  # (they said "no payload", "g", "")
    assert f"a result of run '{shard}-nope', attempt 1, whose record is gone" in " ".join(details)
    assert "no `rs` (an array of packed requests) or `r` (one packed request) field" in details
    assert "`rs` is no msgpack array of packed requests (byte strings)" in details  # (was "no")
    assert "the packed request's field 'g' is missing or invalid" in details, details
    # (the bad entries are dead-lettered before the good one is admitted again on its own)
    await eventually(lambda: _states_are(redis, keys, ["A"], [(shard, good)]))
    await redis.xadd(keys.shard(other_shard).requests_stream, {"r": other.pack()})
    await eventually(lambda: _states_are(redis, keys, ["A"], [(other_shard, other)]))
    assert await backlog(redis, keys) == 0


async def test_one_entry_holds_an_ingress_calls_requests_and_a_bad_one_among_them_is_dead_lettered(
    redis: Redis, keys: Keys, scripts: Scripts, service: Admission
) -> None:
    """Ingress appends a call's requests as one entry: admission admits them all, and one it
    refuses is dead-lettered alone while the others are admitted; the entry is acknowledged
    once they are, and an entry that is no array of requests is dead-lettered whole."""
    reqs = [make_request(keys, event=f"e{i}", seq=i + 1, key="k") for i in range(3)]
    shard = reqs[0][0]
    stream = keys.shard(shard).requests_stream
    payloads = [reqs[0][1].pack(), b"\xc1not msgpack", reqs[1][1].pack(), reqs[2][1].pack()]
    assert await scripts.append_requests(shard, payloads) == 4
    assert await redis.xlen(stream) == 1
    await redis.xadd(stream, {"rs": b"\x93not an array of requests"})

    async def settled() -> bool:
        return await redis.xlen(keys.dead_stream) == 2 and await backlog(redis, keys) == 0

    await eventually(settled)
    assert sorted(f[b"reason"] for _, f in await redis.xrange(keys.dead_stream)) == [
        b"malformed",
        b"malformed",
    ]
    assert len(await records(redis, keys)) == 3


async def test_the_entry_of_a_refused_request_stays_pending_until_its_others_are_admitted(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused request of a three-request entry is dead-lettered; the call that would admit
    the other two fails (a failover, say): the entry must still be pending, so the re-read
    admits them. (Acknowledged with the refused one, they would be lost.)"""
    scripts = Scripts(redis, keys)
    reqs = [make_request(keys, event=f"e{i}", seq=i + 1, key="k") for i in range(2)]
    shard = reqs[0][0]
    await scripts.append_requests(shard, [reqs[0][1].pack(), b"\xc1", reqs[1][1].pack()])
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig(block_ms=50))
    await admission.start()
    calls = []
    real = admission.scripts.admit

    async def failing_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:
            raise ConnectionError("the server went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(admission.scripts, "admit", failing_second)
    stream = keys.shard(shard).requests_stream
    [(_, entries)] = await redis.xreadgroup(ADMISSION_GROUP, "c", {stream: ">"})
    with pytest.raises(ConnectionError):
        await admission._apply("admit", [(stream.encode(), shard, entries)])
    assert (await redis.xpending(stream, ADMISSION_GROUP))["pending"] == 1
    await admission._apply("admit", [(stream.encode(), shard, entries)])  # the re-read
    assert len(await records(redis, keys)) == 2
    assert (await redis.xpending(stream, ADMISSION_GROUP))["pending"] == 0


async def test_a_backlog_of_full_entries_is_admitted_in_calls_of_about_batch_requests(
    redis: Redis, redis_url: str, keys: Keys, scripts: Scripts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry holds an ingress call's requests of a shard (up to 1,000): a read of `--batch`
    entries after an outage went to one admit call, whatever it held (100,000 requests of one
    hot key blocked the server 3.1 s in one call). Calls now take whole entries, `batch`
    requests at most (one larger entry alone), one after the other; a refused request in a
    later call is dead-lettered alone."""
    sizes = [4, 4, 3, 25, 2, 9]
    shard = make_request(keys, event="x", seq=0, key="hot")[0]
    stream = keys.shard(shard).requests_stream
    seq = 0
    for size in sizes:
        payloads = []
        for _ in range(size):
            seq += 1
            payloads.append(make_request(keys, event=f"e{seq}", seq=seq, key="hot")[1].pack())
        if size == 25:  # (a refused one in a later call: its index is of that call's items)
            payloads.insert(7, b"\xc1")
        await scripts.append_requests(shard, payloads)
    calls: list[list[bytes]] = []
    original = Scripts.admit

    async def spy(self: Scripts, shard: int, entries: Any, **kw: Any) -> Any:
        calls.append([entry_id for entry_id, _ in entries])
        return await original(self, shard, entries, **kw)

    monkeypatch.setattr(Scripts, "admit", spy)
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig(batch=10))
    await admission.start()
    [(_, entries)] = await redis.xreadgroup(ADMISSION_GROUP, "c", {stream: ">"})
    await admission.handle([(stream.encode(), entries)])
    # whole entries, in order; the refused one's entry again without it
    assert [len(c) for c in calls] == [8, 3, 26, 25, 2, 9], calls
    assert len({e for c in calls for e in c}) == len(sizes)
    assert len(await records(redis, keys)) == sum(sizes)
    [(_, dead)] = await redis.xrange(keys.dead_stream)
    assert dead[b"reason"] == b"malformed"
    assert (await redis.xpending(stream, ADMISSION_GROUP))["pending"] == 0


async def test_the_reaper_runs_on_a_timer(redis: Redis, keys: Keys, service: Admission) -> None:
    shard, req = make_request(keys, event="e", seq=1, max_attempts=1)
    await service.scripts.admit(shard, [("0-1", req.pack())])
    await service.scripts.claim(shard, "ex", [("s", "0-1", req.run_id, 1)], lease_ms=1)
    await eventually(lambda: _states_are(redis, keys, ["F"], [(shard, req)]))


async def test_sigkill_mid_stream_then_restart_gives_exactly_one_run_per_request(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    await ensure_groups(redis, keys)
    n, groups = 12_000, 300
    wanted: dict[str, str] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            strategy = Strategy.GROUP_ROUND_ROBIN if i % 3 else Strategy.CANCEL_IN_PROGRESS
            event = f"e{i % (n - 500)}"  # the last 500 events are delivered twice
            shard, req = make_request(
                keys, event=event, seq=i % (n - 500), key=f"k{i % groups}-{strategy.value}",
                max_runs=2, strategy=strategy,
            )  # fmt: skip
            wanted[req.run_id] = req.group
            pipe.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
        await pipe.execute()

    async def count_runs() -> int:
        return await run_count(redis, keys)

    proc = start_admission(redis_url, keys, "--batch", "20", "--metrics-port", "0")
    kills = 0
    try:
        for threshold in (1, n // 4):
            await eventually(lambda t=threshold: _at_least(count_runs, t), timeout=30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            kills += 1
            assert await count_runs() < len(wanted), "the kill came too late to prove anything"
            proc = start_admission(
                redis_url, keys, "--batch", "20", "--claim-idle-ms", "200", "--metrics-port", "0"
            )
        await eventually(lambda: _is_zero(backlog(redis, keys)), timeout=60)
    finally:
        proc.kill()
        proc.wait(5)
    assert kills == 2
    recs = await records(redis, keys)
    assert set(recs) == set(wanted)
    # No run was assigned twice for one attempt, and slot counts are exact.
    assigned: Counter[tuple[bytes, bytes]] = Counter()
    held: Counter[str] = Counter()
    for sk in keys.all_shards():
        for _, f in await redis.xrange(sk.assignments_stream("wf")):
            assigned[(f[b"id"], f[b"a"])] += 1
        stored = {g.decode(): int(v) for g, v in (await redis.hgetall(sk.slots_hash)).items()}
        mine = {r["g"] for r in recs.values() if shard_of(r) == sk.shard}
        for gid in mine:
            held[gid] = stored.get(gid, 0)
    assert max(assigned.values()) == 1
    active: Counter[str] = Counter(r["g"] for r in recs.values() if r["st"] in ("A", "R"))
    assert dict(+held) == dict(active)
    assert max(active.values()) <= 2


def shard_of(rec: dict[str, object]) -> int:
    from supersede.model import shard_of_group

    return shard_of_group(str(rec["g"]), 4)


async def _at_least(count: Callable[[], Awaitable[int]], threshold: int) -> bool:
    return await count() >= threshold


async def _is_zero(value: Awaitable[int]) -> bool:
    return await value == 0


async def test_sigterm_stops_cleanly_and_metrics_are_served(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    port = free_port()
    proc = start_admission(redis_url, keys, "--metrics-port", str(port))
    try:
        shard, req = make_request(keys, event="e", seq=1)
        await eventually(lambda: _has_groups(redis, keys))
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
        await eventually(lambda: _states_are(redis, keys, ["A"], [(shard, req)]))
        created = 'supersede_admission_requests_total{outcome="created"} 1.0'
        await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda body: created in body)
        assert await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/healthz") == "ok\n"
        assert await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/readyz") == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait(5)


async def test_sigterm_under_load_leaves_nothing_read_and_unapplied(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """Behind a backlog the next batch is read ahead; on SIGTERM that read is applied too."""
    await ensure_groups(redis, keys)
    written = 20_000
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(written):
            shard, req = make_request(keys, event=f"e{i}", seq=i, key=f"k{i % 40}")
            pipe.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
        await pipe.execute()
    proc = start_admission(redis_url, keys, "--batch", "20", "--metrics-port", "0")
    try:
        await eventually(lambda: _some_runs(redis, keys, 2000), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        proc.kill()
        proc.wait(5)
    streams = [sk.requests_stream for sk in keys.all_shards()]
    assert await pending_count(redis, streams, ADMISSION_GROUP) == 0
    recs = await records(redis, keys)
    assert 2000 <= len(recs) < written  # stopped mid-stream; what it read, it applied


async def _some_runs(redis: Redis, keys: Keys, n: int) -> bool:
    return await run_count(redis, keys) >= n


async def _has_groups(redis: Redis, keys: Keys) -> bool:
    stream = keys.shard(keys.shards - 1).requests_stream
    return bool(await redis.exists(stream)) and bool(await redis.xinfo_groups(stream))


async def test_a_process_with_another_shard_count_refuses_to_start(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    await redis.hset(keys.config_hash, "shards", keys.shards + 1)
    proc = start_admission(redis_url, keys, "--metrics-port", "0", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert b"SUPERSEDE_SHARDS" in err and b"refusing to start" in err


async def test_two_admission_processes_share_the_shards_without_double_work(
    backend: tuple[Any, str], keys: Keys
) -> None:
    redis, redis_url = backend
    await ensure_groups(redis, keys)
    procs = [
        start_admission(redis_url, keys, "--batch", "50", "--metrics-port", "0") for _ in range(2)
    ]
    try:

        async def both_reading() -> bool:  # so both share the backlog and both heed SIGTERM
            stream = keys.shard(0).requests_stream
            return len(await redis.xinfo_consumers(stream, ADMISSION_GROUP)) == 2

        await eventually(both_reading, timeout=30)
        wanted = set()
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(4_000):
                shard, req = make_request(keys, event=f"e{i}", seq=i, key=f"k{i % 50}", max_runs=3)
                wanted.add(req.run_id)
                pipe.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
            await pipe.execute()
        await eventually(lambda: _is_zero(backlog(redis, keys)), timeout=60)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(10) for proc in procs] == [0, 0]
    recs = await records(redis, keys)
    assert set(recs) == wanted
    consumers = set()
    for sk in keys.all_shards():
        for c in await redis.xinfo_consumers(sk.requests_stream, ADMISSION_GROUP):
            consumers.add(c["name"])
    assert len(consumers) == 2  # both took part
    active: Counter[str] = Counter(r["g"] for r in recs.values() if r["st"] == "A")
    assert len(active) == 50 and set(active.values()) == {3}


async def test_the_service_survives_a_server_restart(keys: Keys) -> None:
    from supersede.server import EmbeddedServer

    server = EmbeddedServer().start()
    redis = Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, namespace=keys.namespace, shards=keys.shards)
    service = Admission(redis, settings, AdmissionConfig(block_ms=50, reap_interval=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await eventually(lambda: asyncio.sleep(0, service.ready))
        server.proc.terminate()
        server.proc.wait(5)
        await asyncio.sleep(0.3)  # let the service hit the outage (it must not crash)
        assert not task.done()
        server.start()  # same port, empty data: groups are gone too
        from supersede.streams import ensure_groups

        # The test's own reads go through a new client: the shared pool's connections died
        # with the old server, and the service is the one that must cope with them.
        probe = Redis.from_url(server.url)
        await ensure_groups(probe, keys)
        shard, req = make_request(keys, event="after", seq=1)
        await probe.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
        await eventually(lambda: _states_are(probe, keys, ["A"], [(shard, req)]), timeout=20)
        await probe.aclose()
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 10)
        finally:  # (a service that did not stop must not leak the server and its sockets too)
            await redis.aclose()
            server.stop()


async def _ended_runs_of_new_keys(
    redis: Redis, keys: Keys, n: int, *, now: int
) -> dict[int, list[RunRequest]]:
    """n runs of workflow `wf`, a key each, admitted, claimed and SUCCEEDED at `now` (0: the
    server's clock), by shard."""
    scripts = Scripts(redis, keys)
    reqs = [make_request(keys, event=f"e{i}", seq=i + 1, key=f"k{i}") for i in range(n)]
    by_shard: dict[int, list[RunRequest]] = {}
    for shard, req in reqs:
        by_shard.setdefault(shard, []).append(req)
    for shard, batch in by_shard.items():
        await scripts.admit(shard, [("0-1", r.pack()) for r in batch], now=now)
        stream = keys.shard(shard).assignments_stream("wf")
        await scripts.claim(shard, "ex", [(stream, "0-1", r.run_id, 1) for r in batch],
                            lease_ms=60_000, now=now)  # fmt: skip
        results = [("0-1", RunResult(r.run_id, 1, Outcome.SUCCEEDED).pack()) for r in batch]
        await scripts.finish(shard, results, now=now and now + 1_000)
    return by_shard


async def test_one_reaper_tick_expires_every_old_record_not_only_a_thousand(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """6,000 runs ended long ago (about 1,500 per shard): one tick deletes them all, so the
    retention keeps up above 2,000 ended runs/s per shard (one call per tick did not)."""
    by_shard = await _ended_runs_of_new_keys(redis, keys, 6_000, now=1_000)
    assert max(len(b) for b in by_shard.values()) > 1_000
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig(retention_ms=1_000))
    succeeded = sum(
        [int(await redis.hget(sk.counts_hash, "wf|S") or 0) for sk in keys.all_shards()]
    )
    assert succeeded == 6_000
    await admission.reap_all()
    assert await records(redis, keys) == {}
    assert [await redis.hlen(sk.counts_hash) for sk in keys.all_shards()] == [0] * keys.shards


@pytest.mark.parametrize("retention_s", [60, 300])
async def test_a_retention_below_the_minimum_is_said_at_start(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture, retention_s: int
) -> None:
    """`--retention 60` with the default `--min-retention 300` keeps ended runs 300 s: it was
    accepted silently (a probe). Admission says so as it starts; not when it holds."""
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    config = AdmissionConfig(retention_ms=retention_s * 1000, min_retention_ms=300_000)
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await Admission(redis, settings, config).prepare()
    said = [r for r in caplog.records if "--retention is below --min-retention" in r.getMessage()]
    assert len(said) == (1 if retention_s < 300 else 0)
    if said:
        assert (said[0].retention_s, said[0].min_retention_s) == (60, 300)  # type: ignore[attr-defined]


async def test_one_reaper_tick_reaches_an_expired_lease_behind_thousands_of_waiting_runs(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """3,000 runs of one shard wait ASSIGNED with their entries unread (no executor yet), due
    for a look before a RUNNING run whose lease expired: one tick looks at them all (no fresh
    entries: they still wait unread) and still retries the expired run. (Had the tick stopped
    after a call without a retry or a fresh entry, the retry would wait for later ticks.)"""
    scripts = Scripts(redis, keys)
    past = int((await redis.time())[0]) * 1000 - 60_000
    waiting = [make_request(keys, event=f"e{i}", seq=i + 1, unlimited=True) for i in range(3_000)]
    shard = waiting[0][0]
    await scripts.admit(shard, [("0-1", r.pack()) for _, r in waiting], now=past,
                        assign_deadline_ms=1_000)  # fmt: skip
    _, running = make_request(keys, event="running", seq=5_000, unlimited=True)
    await scripts.admit(shard, [("0-2", running.pack())], now=past)
    stream = keys.shard(shard).assignments_stream("wf")
    [c] = await scripts.claim(shard, "ex", [(stream, "0-2", running.run_id, 1)], lease_ms=1_000,
                              now=past + 5_000)  # fmt: skip
    assert c.claimed
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await Admission(redis, settings, AdmissionConfig(assign_deadline_ms=1_000)).reap_all()
    rec = (await records(redis, keys))[running.run_id]
    assert (rec["st"], rec["a"]) == ("A", 2)
    assert await redis.xlen(stream) == 3_002  # the retry's entry; none for the waiting runs
    # said in a line (a SIGKILLed executor's runs were retried with only a metric: a probe)
    [said] = [r for r in caplog.records if r.getMessage().startswith("leases lapsed")]
    assert (said.retried, said.failed) == (1, 0)  # type: ignore[attr-defined]


async def _lapsed(scripts: Scripts, keys: Keys, req: RunRequest, entry: str) -> None:
    """Admit `req` a minute ago and claim it under a 1 s lease: its lease has lapsed."""
    past = int((await scripts.redis.time())[0]) * 1000 - 60_000
    shard = int(req.run_id.split("-", 1)[0])
    await scripts.admit(shard, [(entry, req.pack())], now=past)
    stream = keys.shard(shard).assignments_stream(req.workflow)
    [c] = await scripts.claim(shard, "ex", [(stream, entry, req.run_id, 1)], lease_ms=1_000,
                              now=past + 5_000)  # fmt: skip
    assert c.claimed


@contextlib.asynccontextmanager
async def _admission_as(
    redis: Redis, redis_url: str, keys: Keys, acl_rules: list[str]
) -> AsyncIterator[Admission]:
    """An Admission signed in as a user of `acl_rules` (deleted after)."""
    user = f"adm-{uuid.uuid4().hex[:6]}"
    await redis.execute_command("ACL", "SETUSER", user, *acl_rules, ">pw")
    url = redis_url.replace("redis://", f"redis://{user}:pw@")
    client = Redis.from_url(url)
    try:
        settings = Settings(redis_url=url, namespace=keys.namespace, shards=keys.shards)
        yield Admission(client, settings, AdmissionConfig())
    finally:
        await client.aclose()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_a_reap_whose_reply_was_lost_is_counted_at_the_next_tick(
    redis: Redis,
    redis_url: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A link that stalled past the client's timeout delivered the reap call once it healed:
    the server retried and failed runs, and admission, its reply lost, counted none (a probe:
    74 runs run again, reaped_total +0, no "leases lapsed" line; 20 runs FAILED, 1 counted).
    The call keeps its outcome; the next tick reads it and counts it, once."""
    from supersede.services.admission import metrics

    scripts = Scripts(redis, keys)
    reqs = [make_request(keys, event=f"e{i}", seq=i + 1, key=f"k{i}", max_attempts=a)
            for i, a in enumerate((2, 1))]  # fmt: skip
    for i, (_, req) in enumerate(reqs):
        await _lapsed(scripts, keys, req, f"0-{i + 1}")
    real = Scripts.reap
    lost: list[int] = []

    async def reply_lost(self: Scripts, shard: int, **kw: Any) -> Any:
        r = await real(self, shard, **kw)
        if r.retried or r.failed:
            lost.append(shard)
            raise TimeoutError("Timeout reading from 127.0.0.1")
        return r

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig(assign_deadline_ms=60_000))
    retried = metrics.REAPED.labels("retried")._value.get()
    failed = metrics.REAPED.labels("failed")._value.get()
    monkeypatch.setattr(Scripts, "reap", reply_lost)
    with pytest.raises(TimeoutError):
        await admission.reap_all()
    assert sorted(lost) == sorted({s for s, _ in reqs})
    monkeypatch.setattr(Scripts, "reap", real)
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await admission.reap_all()
        await admission.reap_all()  # (counted once)
    states = sorted((rec["st"], rec["a"]) for rec in (await records(redis, keys)).values())
    want_retried = sum(1 for _, r in reqs if r.max_attempts == 2)
    want_failed = len(reqs) - want_retried
    assert states == sorted([("A", 2)] * want_retried + [("F", 1)] * want_failed)
    assert metrics.REAPED.labels("retried")._value.get() - retried == want_retried
    assert metrics.REAPED.labels("failed")._value.get() - failed == want_failed
    [said] = [r for r in caplog.records if r.getMessage().startswith("leases lapsed")]
    assert (said.retried, said.failed) == (want_retried, want_failed)  # type: ignore[attr-defined]


async def test_lost_reap_replies_not_read_while_the_server_is_down_are_said_once_in_5_s(
    redis: Redis,
    redis_url: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the server was down every shard's reap reply went unread at every tick, and each
    said so in a line of its own: 1,280 lines in a 40 s outage (an operator's probe). One line
    per 5 s now, with `repeats`."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def down(self: Scripts, key: str, token: str) -> Any:
        raise RedisConnectionError("Connection closed by server.")

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig())
    from supersede.logs import Sampled
    from supersede.services.admission import service

    monkeypatch.setattr(Scripts, "reaped", down)
    monkeypatch.setattr(service, "_REAPED_NOT_READ", Sampled())  # (none said yet)
    with caplog.at_level(logging.INFO, logger="supersede"):
        for tick in range(3):
            admission._reap_unsure = {s: f"t{tick}" for s in range(keys.shards)}
            await admission.reap_all()
    said = [r for r in caplog.records if "lost reap reply" in r.getMessage()]
    assert len(said) == 1, len(said)  # (old: a line per shard and tick)


async def test_under_a_role_without_the_reaped_keys_the_reaper_reaps_and_says_so_once(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A 0.3.19 admission under the admission role of 0.3.18 (no `{<ns>:*}:reaped:*`): its reap
    calls that keep their outcome are refused; it reaps without, and says once how to fix it
    (refused, the reaper failed every tick and admission was not ready)."""
    from supersede.acl import rules
    from supersede.services.admission import metrics

    scripts = Scripts(redis, keys)
    shard, req = make_request(keys, event="e", seq=1)
    await _lapsed(scripts, keys, req, "0-1")
    old = [r for r in rules(keys.namespace, "admission") if not r.endswith(":reaped:*")]
    async with _admission_as(redis, redis_url, keys, old) as admission:
        with caplog.at_level(logging.WARNING, logger="supersede"):
            await admission.reap_all()
            await admission.reap_all()
        rec = (await records(redis, keys))[req.run_id]
        assert (rec["st"], rec["a"]) == ("A", 2)
        said = [r for r in caplog.records if "keeps no outcome" in r.getMessage()]
        assert len(said) == 1 and "supersede acl --apply" in said[0].getMessage()
    # under the role of this build, the outcome is kept (its SET was refused inside the script,
    # after the retry, which then went uncounted: a review)
    _, again = make_request(keys, event="again", seq=2)
    await _lapsed(scripts, keys, again, "0-2")
    async with _admission_as(
        redis, redis_url, keys, rules(keys.namespace, "admission")
    ) as admission:
        retried = metrics.REAPED.labels("retried")._value.get()
        await admission.reap_all()
        assert metrics.REAPED.labels("retried")._value.get() - retried == 1
        assert await redis.exists(keys.shard(shard).reaped_string(admission.consumer))


async def test_the_reaper_keeps_the_groups_of_a_shard_within_the_cap(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """3,000 groups each ran one run, a new key per event: with --max-groups 32 (2 a shard)
    one reaper tick forgets all but the two most recent groups of each shard, their newest
    runs and fences with them. (Before, every group stayed for the retention, 24 h.)"""
    await _ended_runs_of_new_keys(redis, keys, 3_000, now=0)
    sizes = [await redis.zcard(sk.newest_at_zset) for sk in keys.all_shards()]
    assert sum(sizes) == 3_000
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    config = AdmissionConfig(max_groups=2 * keys.shards, min_retention_ms=0)
    await Admission(redis, settings, config).reap_all()
    for sk in keys.all_shards():
        assert await redis.zcard(sk.newest_at_zset) == 2
        assert await redis.hlen(sk.fences_hash) == 2 and await redis.hlen(sk.newest_hash) == 2


async def test_a_stream_lag_redis_restored_wrong_is_set_right_by_the_gauges(
    redis: Redis, keys: Keys, service: Admission, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis before 7.2.4 can restore a group's entries-read wrong after an AOF restart (a soak
    probe: each requests stream's lag about 400, the assignment streams' 250-400, for good,
    every group read to the end). The gauges' look sets the ones it reads right: here a
    requests stream (admission's group) and an assignment stream (the executors'), said in
    one line (a line per stream was 48 lines at once for an upgrade probe)."""
    await register(redis, keys, {"id": "healed", "events": ["e"]})
    sk = keys.shard(0)
    streams = [
        (sk.requests_stream, ADMISSION_GROUP),
        (sk.assignments_stream("healed"), EXECUTOR_GROUP),
    ]
    await ensure_groups(redis, keys, ["healed"])
    for stream, group in streams:
        for i in range(10):
            await redis.xadd(stream, {"x": str(i)})
        # (read to the end, as the group had: its last-delivered-id the stream's last id)
        await redis.execute_command("XGROUP", "SETID", stream, group, "$", "ENTRIESREAD", 1)
        [g] = [g for g in await redis.xinfo_groups(stream) if g["name"] == group.encode()]
        assert g["lag"], g
    with caplog.at_level(logging.WARNING, logger="supersede"):
        await service.update_gauges()
    for stream, group in streams:
        [g] = [g for g in await redis.xinfo_groups(stream) if g["name"] == group.encode()]
        assert g["lag"] == 0, (stream, g)
    [line] = [r for r in caplog.records if "lags were wrong" in r.getMessage()]
    assert line.streams == 2, vars(line)  # type: ignore[attr-defined]


async def test_gauges_report_queue_depth_per_workflow_active_runs_and_lag(
    redis: Redis, keys: Keys, service: Admission
) -> None:
    from supersede.services.admission import metrics

    await register(redis, keys, {"id": "gauged", "events": ["gauged.event"]})
    reqs = [
        make_request(keys, workflow="gauged", event=f"e{i}", seq=i,
                     strategy=Strategy.GROUP_ROUND_ROBIN)
        for i in range(3)
    ]  # fmt: skip
    for shard, req in reqs:
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
    await eventually(lambda: _states_are(redis, keys, ["A", "Q", "Q"], reqs))
    await service.update_gauges()
    assert metrics.QUEUED.labels("gauged")._value.get() == 2
    assert metrics.ACTIVE._value.get() == 1
    assert metrics.STREAM_LAG.labels("assignments")._value.get() == 1  # nobody read it yet
    assert metrics.ASSIGNMENT_BACKLOG.labels("gauged")._value.get() == 1  # (nor has a group)
    # A key whose assigned run is superseded again and again: the stream holds every
    # assignment, the backlog the one run that waits (it was the stream's: 5)
    await register(redis, keys, {"id": "latest", "events": ["latest.event"]})
    for i in range(5):
        shard, req = make_request(keys, workflow="latest", event=f"l{i}", seq=10 + i, key="k")
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
        await eventually(
            lambda req=req, shard=shard: _states_are(redis, keys, ["A"], [(shard, req)])
        )
    await service.update_gauges()
    assert metrics.STREAM_LAG.labels("assignments")._value.get() == 1 + 5
    assert metrics.ASSIGNMENT_BACKLOG.labels("latest")._value.get() == 1


async def test_the_series_of_a_retired_workflow_go_with_it(
    redis: Redis, keys: Keys, service: Admission
) -> None:
    """A retired workflow's queued runs, backlog and unserved seconds stayed exported at their
    last values until admission restarted, and SupersedeWorkflowUnserved fired for runs the
    retire had cancelled (a churn probe)."""
    import uuid

    from prometheus_client import REGISTRY

    wid = f"retired-{uuid.uuid4().hex[:8]}"
    await register(redis, keys, {"id": wid, "events": ["r.event"]})
    [seconds, _] = await redis.time()
    await redis.hset(keys.workflows_served_hash, wid, str((seconds - 100) * 1000))
    reqs = [make_request(keys, workflow=wid, event=f"r{i}", seq=i, key="k",
                         strategy=Strategy.GROUP_ROUND_ROBIN) for i in range(2)]  # fmt: skip
    for shard, req in reqs:
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
    await eventually(lambda: _states_are(redis, keys, ["A", "Q"], reqs))
    names = ("supersede_admission_queued_runs", "supersede_admission_assignment_backlog",
             "supersede_admission_workflow_unserved_seconds")  # fmt: skip

    def exported() -> list[float | None]:
        return [REGISTRY.get_sample_value(name, {"workflow": wid}) for name in names]

    await service.update_gauges()
    queued, backlog, unserved = exported()
    assert queued == 1 and backlog == 1 and unserved is not None and unserved >= 99
    # (what retire does to the registry; its queued run is left here, still counted: a review
    # found a retired workflow with queued runs kept all three series)
    await redis.hdel(keys.workflows_hash, wid)
    await service.update_gauges()
    assert exported() == [1, None, None]


async def test_the_gauges_of_many_workflows_are_read_less_often(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """The gauges read two commands of every stream of every workflow on every shard each
    second: with 1,000 workflows on 16 shards, half of admission's CPU while idle (a scale
    probe). Past GAUGED_STREAMS_PER_S streams they are read less often."""
    from supersede.registry import register_all
    from supersede.services.admission import service as admission

    keys = Keys(namespace, 16)
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    gauges = Admission(redis, settings, AdmissionConfig())
    await register(redis, keys, {"id": "one", "events": ["e"]})
    await gauges.update_gauges()
    assert gauges._gauges_due.every == admission.GAUGES_EVERY
    await register_all(redis, keys, [{"id": f"w{i}", "events": ["e"]} for i in range(300)])
    await gauges.update_gauges()
    streams = 16 * (2 + 301)
    assert gauges._gauges_due.every == pytest.approx(streams / admission.GAUGED_STREAMS_PER_S, 0.01)


async def _running_with_results(redis: Redis, keys: Keys, n: int) -> list[tuple[int, RunRequest]]:
    """n runs of n keys, RUNNING, each with its SUCCEEDED result in its shard's results
    stream, unread."""
    await ensure_groups(redis, keys)
    scripts = Scripts(redis, keys)
    reqs = [make_request(keys, event=f"e{i}", seq=i, key=f"k{i}") for i in range(n)]
    for shard, req in reqs:
        sk = keys.shard(shard)
        await scripts.admit(shard, [("0-1", req.pack())])
        stream = sk.assignments_stream("wf")
        await scripts.claim(shard, "ex", [(stream, "0-1", req.run_id, 1)], lease_ms=60_000)
        fields = {PAYLOAD: RunResult(req.run_id, 1, Outcome.SUCCEEDED).pack()}
        await redis.xadd(sk.results_stream, fields)
    return reqs


async def test_results_of_every_shard_go_in_few_finish_calls_and_a_bad_one_is_dead_lettered(
    redis: Redis, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read with results of every shard: on a single server they are recorded in one
    finish call per about `batch` results (never splitting a stream's entries), and a
    malformed result in the middle is dead-lettered while the others, on every shard, apply."""
    reqs = await _running_with_results(redis, keys, 40)
    reply: dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]] = {}
    bad_shard = reqs[len(reqs) // 2][0]
    await redis.xadd(keys.shard(bad_shard).results_stream, {PAYLOAD: b"\xc1 not msgpack"})
    for sk in keys.all_shards():
        read = await redis.xreadgroup(ADMISSION_GROUP, "a", {sk.results_stream: ">"})
        reply.update((name, got) for name, got in read)
    assert len(reply) == keys.shards  # every shard has results
    calls: list[int] = []
    original = Scripts.finish_shards

    async def spy(self: Scripts, batches: Any, **kw: Any) -> Any:
        calls.append(sum(len(v) for v in batches.values()))
        return await original(self, batches, **kw)

    monkeypatch.setattr(Scripts, "finish_shards", spy)
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    size = 25
    admission = Admission(redis, settings, AdmissionConfig(batch=size))
    await admission.handle(list(reply.items()))
    recs = await records(redis, keys)
    assert all(recs[req.run_id]["st"] == "S" for _, req in reqs)
    [(_, dead)] = await redis.xrange(keys.dead_stream)
    assert dead[b"reason"] == b"malformed"
    for sk in keys.all_shards():
        assert await pending_count(redis, [sk.results_stream], ADMISSION_GROUP) == 0
    parts = [(stream, int(stream.split(b":")[1].rstrip(b"}")), e) for stream, e in reply.items()]
    chunks = [sum(len(p[2]) for p in c) for c in _chunks(parts, size)]
    assert 1 < len(chunks) < keys.shards and max(chunks) <= size  # shards share calls
    with_bad = next(
        sum(len(p[2]) for p in c) for c in _chunks(parts, size) if any(p[1] == bad_shard for p in c)
    )
    assert sorted(calls) == sorted([*chunks, with_bad - 1])  # (then the rest is retried)


async def test_a_shard_whose_results_break_the_script_does_not_hold_back_the_others(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """A result the finish script fails on for a reason that names no entry (here a run record
    that is not msgpack) fails the call over every shard; the streams are then applied one by
    one, so only that shard's results stay pending, for the re-read."""
    reqs = await _running_with_results(redis, keys, 24)
    broken_shard, broken = reqs[0]
    await redis.hset(keys.shard(broken_shard).runs_hash, broken.run_id, b"\xc1 not msgpack")
    reply: dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]] = {}
    for sk in keys.all_shards():
        read = await redis.xreadgroup(ADMISSION_GROUP, "a", {sk.results_stream: ">"})
        reply.update((name, got) for name, got in read)
    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig())
    with pytest.raises(Exception, match=r"msgpack|script"):
        await admission.handle(list(reply.items()))
    for shard, req in reqs:
        if shard != broken_shard:
            raw = await redis.hget(keys.shard(shard).runs_hash, req.run_id)
            assert RunRecord.decode(req.run_id, raw).state.name == "SUCCEEDED"
    for sk in keys.all_shards():
        left = await pending_count(redis, [sk.results_stream], ADMISSION_GROUP)
        expected = sum(1 for s, _ in reqs if s == sk.shard) if sk.shard == broken_shard else 0
        assert left == expected


def _ready_status(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # (not listening yet)
        return 0


async def test_admission_stays_ready_at_maxmemory_when_nothing_pinned_was_lost(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """At maxmemory the server refuses every write command, even one that would change
    nothing: the look for the pinned facts wrote the assignment deadline (HSETNX) every 5 s,
    failed, and admission was not ready for as long as memory stayed full (a probe: 2 min of
    503 and the critical SupersedeAdmissionDown, "process gone or Redis unreachable", while
    it reaped and trimmed). It writes only what is missing now."""
    from supersede.service import PIN_EVERY

    port = free_port()
    proc = start_admission(redis_url, keys, "--metrics-port", str(port), "--reap-interval", "0.1")
    try:
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
        await redis.config_set("maxmemory", 1)  # (noeviction: every write is refused)
        try:
            until = time.monotonic() + PIN_EVERY * 1.5  # (a look for the pinned facts at least)
            while time.monotonic() < until:
                assert await asyncio.to_thread(_ready_status, port) == 200
                await asyncio.sleep(0.2)
        finally:
            await redis.config_set("maxmemory", 0)
    finally:
        proc.kill()
        proc.wait(10)


async def test_services_start_at_maxmemory_or_wait_for_it_in_one_line_a_try(
    redis: Redis, redis_url: str, keys: Keys, tmp_path: Any
) -> None:
    """At maxmemory (noeviction) the server refuses every write command, even one that would
    change nothing. A service's start wrote the shard count (HSETNX) and created its groups,
    so none could start: exit 1 with a traceback, and admission, which frees memory, could
    not come back (a probe). Admission restarts there now (it writes only what is missing);
    an executor whose workflow is new waits, a line each 5 s naming maxmemory, and starts
    once memory is freed."""
    port = free_port()
    proc = start_admission(redis_url, keys, "--metrics-port", str(port))
    try:
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
    finally:
        proc.terminate()
        proc.wait(10)
    log = tmp_path / "stderr.log"
    await redis.config_set("maxmemory", 1)
    procs = []
    try:
        with open(log, "ab") as err:
            procs.append(start_admission(redis_url, keys, "--metrics-port", str(port), stderr=err))
            executor_port = free_port()
            cmd = [sys.executable, "-m", "supersede", "executor", "tests.support.apps.demo",
                   "--metrics-port", str(executor_port)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env_for(redis_url, keys), stderr=err))
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))

        def waits() -> bool:
            return "executor cannot start yet" in log.read_text()

        await eventually(lambda: asyncio.to_thread(waits))
        assert procs[1].poll() is None and _ready_status(executor_port) == 503
    finally:
        await redis.config_set("maxmemory", 0)
    try:
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(executor_port) == 200))
        lines = [x for x in log.read_text().splitlines() if "cannot start yet" in x]
        assert lines and all("maxmemory" in x for x in lines), lines
        assert "Traceback" not in log.read_text()
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


async def test_a_service_waits_for_a_server_at_maxclients_and_starts_once_one_is_free(
    redis: Redis, redis_url: str, keys: Keys, tmp_path: Any
) -> None:
    """A server at its maxclients answers a new connection with an error: the start's first
    PING made it a ConfigError, exit 2, pointing at the URL (a review). It waits now, a line
    each 5 s naming maxclients, and starts once a connection is free."""
    port = free_port()
    log = tmp_path / "stderr.log"
    before = (await redis.config_get("maxclients"))["maxclients"]
    connected = int((await redis.info("clients"))["connected_clients"])
    await redis.config_set("maxclients", connected)
    try:
        with open(log, "ab") as err:
            proc = start_admission(redis_url, keys, "--metrics-port", str(port), stderr=err)

        def waits() -> bool:
            return "cannot start yet" in log.read_text()

        await eventually(lambda: asyncio.to_thread(waits))
        assert proc.poll() is None and "maxclients" in log.read_text()
    finally:
        await redis.config_set("maxclients", before)
    try:
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
        assert "Traceback" not in log.read_text()
    finally:
        proc.kill()
        proc.wait(10)


async def test_an_evicting_policy_set_while_a_service_runs_is_seen_to(
    redis: Redis, service: Admission, caplog: pytest.LogCaptureFixture
) -> None:
    """The policy was read at start only: one set later (a managed server's default restored,
    a hand's CONFIG SET) evicted records with no line, metric or alert (a probe). Each
    service looks every minute (here at once)."""
    from supersede.metrics import REDIS_EVICTS
    from supersede.service import Throttle

    before = (await redis.config_get("maxmemory-policy"))["maxmemory-policy"]
    service._policy_due = Throttle(0.0)
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.ERROR, logger="supersede"):
            await service.keep_pinned()
        assert REDIS_EVICTS.labels("admission")._value.get() == 1
        assert any("maxmemory-policy allkeys-lru" in r.getMessage() for r in caplog.records)
    finally:
        await redis.config_set("maxmemory-policy", before)
    await service.keep_pinned()
    assert REDIS_EVICTS.labels("admission")._value.get() == 0


async def test_each_service_says_how_full_the_server_is_against_its_maxmemory(
    redis: Redis, service: Admission
) -> None:
    """Nothing said a server was filling up before it refused writes at its maxmemory (a
    memory probe: no metric of used or maximum memory, no early alert). Each service reads
    used_memory over maxmemory with the eviction policy, every minute (here at once)."""
    from supersede.metrics import REDIS_MEMORY_USED
    from supersede.service import Throttle

    service._policy_due = Throttle(0.0)
    await service.keep_pinned()
    assert REDIS_MEMORY_USED.labels("admission")._value.get() == 0  # (no maxmemory set)
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used * 2)
    try:
        await service.keep_pinned()
        assert 0.3 < REDIS_MEMORY_USED.labels("admission")._value.get() < 0.8
    finally:
        await redis.config_set("maxmemory", 0)


async def test_a_failure_of_one_line_repeated_is_written_once_per_five_seconds(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """The loops' retries while a server is down: the README promises one line per 5 s with
    `repeats`. Lines of one line (no traceback) were written each time: 650 lines in a 30 s
    outage (a probe), a timestamp in the error making each another; and a lost connection is
    one error whatever the client says of it (under `CLIENT KILL`, "Connection closed." and
    "Connection lost" were a line each every 5 s: an operator's probe)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig())
    said = ("Error 111 connecting at {}", "Connection closed by server. {}",
            "Connection lost: [Errno 104] Connection reset by peer {}")  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="supersede"):
        for i in range(21):
            exc = RedisConnectionError(said[i % 3].format(time.time() + i))
            admission.log_failure("batch failed; retrying", exc)
        admission.log_failure("batch failed; retrying", TimeoutError("Timeout reading"))
        admission.log_failure("batch failed; retrying", ReadOnlyError("another"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "another" in lines[1], lines


async def test_refused_credentials_and_a_read_only_server_are_said_in_one_line_with_the_fix(
    redis: Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A password rotated under running services, or a master demoted to a replica: the
    lines said "AuthenticationError: invalid username-password pair or user is disabled." (a
    read-only server's with a traceback), naming no setting, though a start names
    SUPERSEDE_REDIS_URL (a Redis-operator probe)."""
    from redis.exceptions import AuthenticationError, ClusterError, ReadOnlyError, ResponseError

    settings = Settings(redis_url=redis_url, namespace=keys.namespace, shards=keys.shards)
    admission = Admission(redis, settings, AdmissionConfig())
    with caplog.at_level(logging.ERROR, logger="supersede"):
        admission.log_failure("batch failed; retrying", AuthenticationError("invalid pair"))
        admission.log_failure("batch failed; retrying", ReadOnlyError("read only replica"))
        # (redis-py's words for a slot half-moved under a reshard, in every service's log with
        # a traceback: a cluster probe)
        admission.log_failure("batch failed; retrying", ClusterError("TTL exhausted."))
        # (a pipeline's error names its command first: a review)
        admission.log_failure(
            "batch failed; retrying",
            ResponseError(
                "Command # 1 (XREADGROUP GROUP g c STREAMS s 0) of pipeline caused error: NOGROUP"
            ),
        )
        # (Redis's words to a blocking XREADGROUP whose stream was deleted, or evicted: not a
        # failover, which is what the line said)
        admission.log_failure(
            "batch failed; retrying", ResponseError("UNBLOCKED the stream key no longer exists")
        )
    said = [(r.getMessage(), r.exc_info) for r in caplog.records]
    assert [exc_info for _, exc_info in said] == [None] * 5, said
    assert "readers create it again" in said[3][0], said
    assert "readers create it again" in said[4][0] and "evicted" in said[4][0], said
    assert "refused SUPERSEDE_REDIS_URL's user or password" in said[0][0], said
    assert "SUPERSEDE_REDIS_URL names a replica" in said[1][0], said
    assert "a slot is migrating" in said[2][0], said


async def test_the_gauges_of_what_redis_holds_are_unknown_while_it_is_down(keys: Keys) -> None:
    """With Redis down, admission's and ingress's /metrics showed the last lags they read (0,
    say) for the whole outage: dashboards read "no backlog". They read NaN until a read
    succeeds again."""
    from supersede.server import EmbeddedServer

    server = EmbeddedServer().start()
    ports = {"admission": free_port(), "ingress": free_port()}
    procs = [subprocess.Popen([sys.executable, "-m", "supersede", name, "--block-ms", "100",
                               "--metrics-port", str(port)],
                              env=env_for(server.url, keys), stderr=subprocess.DEVNULL)
             for name, port in ports.items()]  # fmt: skip
    lag = {
        "admission": 'supersede_admission_stream_lag{stream="requests"}',
        "ingress": "supersede_ingress_inbox_lag",
    }

    def reads(name: str, value: str) -> Callable[[str], bool]:
        return lambda body: f"{lag[name]} {value}" in body

    try:
        for name, port in ports.items():
            await scrape_when(f"http://127.0.0.1:{port}/metrics", reads(name, "0.0"), timeout=30)
        # a registered workflow's queued gauge and failures counter read 0 from the start (no
        # series until a run queued or failed: increase() missed the first failures)
        client = Redis.from_url(server.url)
        try:
            await register(client, keys, {"id": "quiet", "events": ["q"]})
        finally:
            await client.aclose()
        await scrape_when(
            f"http://127.0.0.1:{ports['admission']}/metrics",
            lambda body: (
                'supersede_admission_queued_runs{workflow="quiet"} 0.0' in body
                and 'supersede_admission_runs_failed_total{workflow="quiet"} 0.0' in body
            ),
            timeout=30,
        )
        server.stop()
        for name, port in ports.items():
            await scrape_when(f"http://127.0.0.1:{port}/metrics", reads(name, "NaN"), timeout=30)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        server.stop()


async def test_a_failing_reaper_makes_admission_not_ready_and_is_counted(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """The reaper's tick fails every time (a key of the wrong type stands in for an ACL user
    without a key pattern): runs past their lease stay stuck, so admission is not ready and the
    failures are counted, while its reads go through; ready again once the tick does. (It
    stayed ready, the failure only logged.)"""
    port = free_port()
    proc = start_admission(redis_url, keys, "--metrics-port", str(port), "--reap-interval", "0.1")
    try:
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
        for sk in keys.all_shards():
            await redis.set(sk.legacy_terminal_zset, "not a zset")  # every reap call fails
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 503))
        failed = 'supersede_task_failures_total{service="admission",task="tick"}'
        await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda body: failed in body)
        # its reads still go through (and do not make it ready while the tick fails)
        shard, req = make_request(keys, event="e", seq=1)
        await redis.xadd(keys.shard(shard).requests_stream, {"r": req.pack()})
        await eventually(lambda: _states_are(redis, keys, ["A"], [(shard, req)]))
        assert await asyncio.to_thread(_ready_status, port) == 503
        for sk in keys.all_shards():
            await redis.delete(sk.legacy_terminal_zset)
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
    finally:
        proc.kill()
        proc.wait(5)


async def test_failing_debounce_timers_and_a_lost_config_are_seen_to(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """One shard's debounce timers fail to fire (a key of the wrong type): admission is not
    ready and counts it (it only logged a warning, ready, while that shard's debounced runs
    never started). And the namespace's config, lost (a server restarted empty), is written
    again: the CLI reads the shard count there (every run looked missing until a restart)."""
    port = free_port()
    proc = start_admission(redis_url, keys, "--metrics-port", str(port))
    try:
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
        due = keys.shard(keys.shards - 1).due_zset
        await redis.set(due, "not a zset")
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 503))
        failed = 'supersede_task_failures_total{service="admission",task="debounce"}'
        await scrape_when(f"http://127.0.0.1:{port}/metrics", lambda body: failed in body)
        await redis.delete(due)
        await eventually(lambda: asyncio.to_thread(lambda: _ready_status(port) == 200))
        await redis.delete(keys.config_hash)

        async def pinned_again() -> bool:
            config = await redis.hgetall(keys.config_hash)
            return config.get(b"shards") == str(keys.shards).encode() and len(config) == 2

        await eventually(pinned_again, timeout=15)
    finally:
        proc.kill()
        proc.wait(5)


async def test_a_service_on_a_server_that_evicts_keys_says_so(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    """A server whose maxmemory-policy evicts keys (managed servers often default to an LRU)
    lost a shard's run records under memory pressure, and their events with them, without a
    line anywhere. A service says so as it starts, naming the policy to set."""
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    proc = start_admission(redis_url, keys, "--metrics-port", "0", stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(
            asyncio.to_thread(lambda: next(ln for ln in proc.stderr if b"maxmemory" in ln)), 30
        )
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")
        proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    text = line.decode()
    assert "maxmemory-policy allkeys-lru" in text and "set maxmemory-policy noeviction" in text
    assert '"level":"error"' in text
