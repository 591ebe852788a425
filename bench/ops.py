"""Operator commands at a million retained runs: `runs --limit 20` (unfiltered, by workflow,
by a rare state, by key) and `status` answer from the indexes, whatever the number of records;
so do the web UI's pages, and an open overview's live updates cost the server little.

The million runs are written straight into the keys the scripts keep (records, ended streams,
counts, a queue of live runs), in the layout the scripts write, since making them through the
whole system would take minutes. Reference: one PING round trip, in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from bench.common import log, no_arguments, report
from supersede import codec
from supersede.keys import Keys, workflow_tag
from supersede.model import group_id, run_id, shard_of_group
from supersede.registry import register
from supersede.server import EmbeddedServer
from supersede.services.ops import list_runs, status

RUNS = 1_000_000
WORKFLOWS = ("chat-reply", "audit")
PER_ENTRY = 500  # ended runs per ended-stream entry (one script call's worth)


async def _fill(redis: Redis, keys: Keys, n: int) -> None:
    """n ended runs (1% CANCELLED, the rest SUCCEEDED) of two workflows over 1,000 keys, plus
    1,000 queued runs of `chat-reply`."""
    t0 = 1_700_000_000_000
    per_shard: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for i in range(n + 1_000):
        wf = WORKFLOWS[i % 2]
        key = f"user{i % 1000}"
        gid = group_id(wf, "v1", key)
        shard = shard_of_group(gid, keys.shards)
        live = i >= n
        rec = {"st": "Q" if live else ("C" if i % 100 == 0 else "S"), "g": gid,
               "s": f"{i:032x}", "w": wf, "v": "v1", "k": key, "ev": f"{t0 + i}-0",
               "mx": 1, "sg": 1, "sx": 0, "a": 1, "m": 3, "t0": t0 + i, "c": 1}  # fmt: skip
        if not live:
            rec |= {"t1": t0 + i, "t2": t0 + i, "t3": t0 + i, "e": "executor-bench-1"}
        per_shard.setdefault(shard, []).append((run_id(shard, f"{t0 + i}-0", wf), rec))
    for shard, runs in per_shard.items():
        sk = keys.shard(shard)
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(runs), 5_000):
                chunk = runs[i : i + 5_000]
                pipe.hset(sk.runs_hash, mapping={rid: codec.pack(rec) for rid, rec in chunk})
            counts: dict[str, int] = {}
            for rid, rec in runs:
                field = f"{rec['w']}|{rec['st']}"
                counts[field] = counts.get(field, 0) + 1
                if rec["st"] == "Q":
                    pipe.zadd(sk.queue_zset, {f"{rec['g']}|{rec['s']}|{rid}": 0})
            pipe.hset(sk.counts_hash, mapping=counts)
            for wf in WORKFLOWS:
                ended = [(rid, r) for rid, r in runs if r["w"] == wf and r["st"] in "SC"]
                pipe.hset(sk.ended_hash, workflow_tag(wf), wf)
                for i in range(0, len(ended), PER_ENTRY):
                    part = ended[i : i + PER_ENTRY]
                    fields = {st: ",".join(rid for rid, r in part if r["st"] == st)
                              for st in "SC"}  # fmt: skip
                    fields = {k: v for k, v in fields.items() if v}
                    pipe.xadd(sk.ended_stream(wf), fields, id=f"{part[-1][1]['t3']}-*")
            await pipe.execute()


async def _median_ms(fn: Callable[[], Awaitable[Any]], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def _ui(redis: Redis, keys: Keys, n: int, ping: float, rid: str) -> None:
    """The web UI's pages (`supersede ui`, served in this process): the time of each request
    (server work and rendering; the target is 100 ms), and the Redis CPU an open overview's live
    updates cost at idle (one refresh every 2 s, as its script does), in % of one core."""
    from aiohttp.test_utils import TestClient, TestServer

    from supersede.services.ui import make_app

    async with TestClient(TestServer(make_app(redis, keys))) as client:
        pages = {
            "overview": "/",
            "runs": "/runs?limit=50",
            "runs_workflow": "/runs?workflow=audit&limit=50",
            "runs_cancelled": "/runs?state=cancelled&limit=50",
            "runs_older_page": "/runs?limit=50&before=1700000500000-0",
            "key": "/key?workflow=chat-reply&key=user8",
            "run": f"/runs/{rid}",
        }
        for name, path in pages.items():

            async def fetch(path: str = path) -> None:
                resp = await client.get(path)
                assert resp.status == 200, (path, resp.status)
                await resp.read()

            report(f"ui_{name}_page_ms", await _median_ms(fetch), "ms", ping, retained_runs=n,
                   target=100, reference_name="ping_round_trip_ms")  # fmt: skip

        async def cpu() -> float:
            info = await redis.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

        window = 20.0
        before, started = await cpu(), time.monotonic()
        await asyncio.sleep(window)
        idle = (await cpu() - before) / window
        before, started = await cpu(), time.monotonic()
        while time.monotonic() - started < window:
            await (await client.get("/?fragment=1")).read()
            await asyncio.sleep(2.0)
        polled = (await cpu() - before) / (time.monotonic() - started)
        report("ui_overview_live_cpu_pct", max(0.0, polled - idle) * 100, "%", idle * 100,
               target=1.0, reference_name="server_idle_cpu_pct", retained_runs=n,
               what="Redis CPU of one open overview refreshing every 2 s, at idle")  # fmt: skip


async def main(n: int = RUNS) -> None:
    server = EmbeddedServer().start()
    keys = Keys("ops", 16)
    redis = Redis.from_url(server.url)
    try:
        for wf in WORKFLOWS:
            await register(redis, keys, {"id": wf, "events": [wf], "version": "v1",
                                         "concurrency": {"expression": "input.user"}})  # fmt: skip
        log(f"ops: writing {n:,} retained runs")
        await _fill(redis, keys, n)
        ping = await _median_ms(redis.ping, rounds=50)
        cases: dict[str, Callable[[], Awaitable[Any]]] = {
            "runs_limit_20": lambda: list_runs(redis, keys, limit=20),
            "runs_workflow_limit_20": lambda: list_runs(redis, keys, workflow="audit", limit=20),
            "runs_cancelled_limit_20": lambda: list_runs(redis, keys, state="cancelled", limit=20),
            "runs_key_limit_20": lambda: list_runs(
                redis, keys, workflow="chat-reply", key="user8", limit=20
            ),
            "status": lambda: status(redis, keys),
        }
        for name, fn in cases.items():
            report(f"ops_{name}_ms", await _median_ms(fn), "ms", ping, retained_runs=n,
                   target=100, reference_name="ping_round_trip_ms")  # fmt: skip
        got = await list_runs(redis, keys, workflow="chat-reply", key="user8", limit=20)
        assert len(got) == 20 and all(r["key"] == "user8" for r in got), got[:2]
        await _ui(redis, keys, n, ping, got[0]["id"])
    finally:
        await redis.aclose()
        server.stop()


if __name__ == "__main__":
    no_arguments(__doc__)
    asyncio.run(main())
