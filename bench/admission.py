"""Admission throughput: 200k pre-filled CANCEL_IN_PROGRESS requests over 10k groups, one
process, against the raw pipelined XADD rate of the same client in the same run; then the same
for the queue-trimming strategies (CANCEL_QUEUED_EXCEPT_NEWEST/OLDEST), each also as a ratio to
CANCEL_IN_PROGRESS's rate of this run.

These write one request per requests-stream entry (the form before the afternoon of
2026-12-04, which admission still reads), so their ratios compare with every earlier figure.
`admission_throughput_batched` writes the requests as ingress does now: one entry per shard for
each 1,000 requests (ingress's default batch), holding that shard's share; its reference is the
per-request run's."""

from __future__ import annotations

import argparse
import asyncio
import time

from redis.asyncio import Redis

from bench.common import log, pipelined_xadd, report
from supersede import codec
from supersede.config import Settings
from supersede.keys import Keys
from supersede.model import encode_seq, group_id, run_id, shard_of_group
from supersede.protocol import ADMISSION_GROUP, PAYLOAD, PAYLOADS, RunRequest, Strategy
from supersede.server import EmbeddedServer
from supersede.services.admission.service import Admission, AdmissionConfig
from supersede.streams import ensure_groups


def build_requests(
    keys: Keys, n: int, groups: int, strategy: Strategy = Strategy.CANCEL_IN_PROGRESS
) -> list[tuple[str, dict[bytes, bytes]]]:
    items = []
    for i in range(n):
        key = f"user{i % groups}"
        gid = group_id("bench", "1", key)
        shard = shard_of_group(gid, keys.shards)
        req = RunRequest(
            run_id=run_id(shard, f"ev{i}", "bench"),
            group=gid,
            seq=encode_seq(f"{1_700_000_000_000 + i // 10}-{i % 10}"),
            workflow="bench",
            version="1",
            key=key,
            event_id=f"ev{i}",
            max_runs=1,
            strategy=strategy,
            input=b'{"text":"hello"}',
        )
        items.append((keys.shard(shard).requests_stream, {PAYLOAD: req.pack()}))
    return items


def batched(
    items: list[tuple[str, dict[bytes, bytes]]], batch: int = 1000
) -> list[tuple[str, dict[bytes, bytes]]]:
    """The same requests as ingress appends them: per `batch` of them, one entry per stream."""
    out = []
    for start in range(0, len(items), batch):
        by_stream: dict[str, list[bytes]] = {}
        for stream, fields in items[start : start + batch]:
            by_stream.setdefault(stream, []).append(fields[PAYLOAD])
        out += [(stream, {PAYLOADS: codec.pack(p)}) for stream, p in by_stream.items()]
    return out


async def backlog(redis: Redis, keys: Keys) -> int:
    """Entries not yet acknowledged by admission (lag + pending) over all shards."""
    async with redis.pipeline(transaction=False) as pipe:
        for sk in keys.all_shards():
            pipe.xinfo_groups(sk.requests_stream)
        replies = await pipe.execute()
    total = 0
    for groups in replies:
        for g in groups:
            if g["name"] == ADMISSION_GROUP.encode():
                total += int(g["pending"]) + int(g.get("lag") or 0)
    return total


async def run_one(
    n: int, groups: int, strategy: Strategy, *, batch: bool = False
) -> tuple[float, float]:
    """(requests/s admitted, pipelined XADD rate) for n requests of one strategy; `batch`: in
    entries of many requests, as ingress writes them."""
    server = EmbeddedServer().start()
    try:
        settings = Settings(redis_url=server.url, namespace="bench", shards=16)
        redis = Redis.from_url(server.url)
        keys = settings.keys
        await ensure_groups(redis, keys)
        items = build_requests(keys, n, groups, strategy)
        if batch:
            items = batched(items)
        log(f"admission bench: {n} {strategy.value} requests over {groups} groups"
            + (f", {len(items)} entries" if batch else ""))  # fmt: skip
        xadd_rate = await pipelined_xadd(redis, items)
        service = Admission(redis, settings, AdmissionConfig(block_ms=50, reap_interval=3600))
        await service.start()
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(service.run(stop))
        watcher = Redis.from_url(server.url)
        while await backlog(watcher, keys) > 0:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        runs = sum([await redis.hlen(sk.runs_hash) for sk in keys.all_shards()])
        assert runs == n, f"expected {n} runs, found {runs}"
        await watcher.aclose()
        await redis.aclose()
        return n / elapsed, xadd_rate
    finally:
        server.stop()


async def main(n: int, groups: int) -> None:
    rate, xadd_rate = await run_one(n, groups, Strategy.CANCEL_IN_PROGRESS)
    report("admission_throughput", rate, "requests/s", xadd_rate, requests=n,
           groups=groups, strategy="CANCEL_IN_PROGRESS", target=30_000)  # fmt: skip
    for strategy in (Strategy.CANCEL_QUEUED_EXCEPT_NEWEST, Strategy.CANCEL_QUEUED_EXCEPT_OLDEST):
        other, other_xadd = await run_one(n, groups, strategy)
        report(f"admission_throughput_{strategy.value.lower()}", other, "requests/s", other_xadd,
               requests=n, groups=groups, strategy=strategy.value,
               vs_cancel_in_progress=round(other / rate, 3))  # fmt: skip
    many, _ = await run_one(n, groups, Strategy.CANCEL_IN_PROGRESS, batch=True)
    report("admission_throughput_batched", many, "requests/s", xadd_rate, requests=n,
           groups=groups, strategy="CANCEL_IN_PROGRESS", vs_one_per_entry=round(many / rate, 3),
           reference_name="pipelined_xadd_of_one_request_per_entry")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--groups", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.groups))
