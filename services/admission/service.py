"""The admission service: turns run requests and executor results into atomic script calls.

Loop: one XREADGROUP BLOCK over the requests and results streams of every shard, then one
script call per shard and kind (admit, finish) for the whole batch, all shards concurrently.
A timer runs the reaper and takes over entries that a dead admission process left pending.
Scripts acknowledge their own batch, so a crash at any point leaves each entry either fully
applied and acknowledged, or pending and applied later (applying twice changes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from supersede import aio
from supersede import metrics as shared_metrics
from supersede.config import Settings, connect, pin_shard_count
from supersede.errors import ScriptError
from supersede.protocol import ADMISSION_GROUP, EXECUTOR_GROUP, PAYLOAD, Entry, dead_letter
from supersede.scripts import Scripts
from supersede.services.admission import metrics
from supersede.streams import OwnPending, after_failure, consumer_name, ensure_groups, split_deleted

log = logging.getLogger("supersede.admission")


@dataclass(slots=True)
class AdmissionConfig:
    batch: int = 1000
    block_ms: int = 1000
    reap_interval: float = 0.5
    claim_idle_ms: int = 30_000
    retention_ms: int = 86_400_000
    stream_maxlen: int = 1_000_000


class Admission:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        config: AdmissionConfig | None = None,
        *,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = settings.keys
        self.config = config or AdmissionConfig()
        self.consumer = consumer or consumer_name("admission")
        self.scripts = Scripts(redis, self.keys, stream_maxlen=self.config.stream_maxlen)
        self.ready = False
        self._gauged_workflows: set[str] = set()
        # stream name -> (shard, kind) for every stream this service reads
        self._streams: dict[bytes, tuple[int, str]] = {}
        for sk in self.keys.all_shards():
            self._streams[sk.requests_stream.encode()] = (sk.shard, "admit")
            self._streams[sk.results_stream.encode()] = (sk.shard, "finish")

    async def start(self) -> None:
        """Check the deployment, create groups, load scripts."""
        await pin_shard_count(self.redis, self.keys)
        await ensure_groups(self.redis, self.keys)
        await self.scripts.load()
        self.ready = True
        shared_metrics.set_ready(True)

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        log.info("admission started", extra={"consumer": self.consumer})
        timer = asyncio.create_task(self._timer_loop(stop))
        try:
            if isinstance(self.redis, RedisCluster):
                # A cluster refuses one read over the streams of many slots: one reader per
                # shard, over the shard's requests and results streams (one hash tag).
                await asyncio.gather(
                    *(
                        self._read_loop(
                            stop, [sk.requests_stream.encode(), sk.results_stream.encode()]
                        )
                        for sk in self.keys.all_shards()
                    )
                )
            else:
                await self._read_loop(stop, list(self._streams))
        finally:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
            log.info("admission stopped", extra={"consumer": self.consumer})

    async def _read_loop(self, stop: asyncio.Event, names: list[bytes]) -> None:
        """XREADGROUP BLOCK over `names`, then one script call per (shard, kind).

        Behind a backlog, the next batch is read while one is applied, so the server does not
        sit idle while this process parses replies. Batches are still applied one after another,
        in stream order. On stop, a read in flight is awaited and its batch applied before
        returning. After a failure the process re-reads its own pending entries (OwnPending).
        """
        own = OwnPending(names)

        def read() -> tuple[bool, asyncio.Future[Any]]:
            """(whether it re-reads own pending entries, the read in flight)."""
            call = self.redis.xreadgroup(
                ADMISSION_GROUP,
                self.consumer,
                own.ids(),  # type: ignore[arg-type]
                count=self.config.batch,
                block=self.config.block_ms,
            )
            return own.active, asyncio.ensure_future(call)

        ahead: tuple[bool, asyncio.Future[Any]] | None = None
        try:
            while ahead is not None or not stop.is_set():
                if ahead is None:
                    own.sweep_if_due()
                reread = own.active if ahead is None else ahead[0]
                try:
                    (reread, read_now), ahead = ahead or read(), None
                    reply = await read_now
                    own.advance(reply, reread)
                    if reply:
                        # Read ahead only behind a backlog (a stream gave a full batch): when
                        # little arrives, the extra read would go out before the script call.
                        full = any(len(e) >= self.config.batch for _, e in reply)
                        if full and not own.active and not stop.is_set():
                            ahead = read()
                        await self.handle(cast(list[tuple[bytes, list[Entry]]], reply))
                    shared_metrics.set_ready(True)
                except Exception as exc:  # redis-py can raise others mid-failover
                    shared_metrics.set_ready(False)
                    log.exception("batch failed; retrying")
                    # The failed batch is pending for this consumer: read it again soon.
                    await after_failure(self.redis, self.keys, own, exc, failed_reread=reread)
        finally:
            if ahead is not None:
                ahead[1].cancel()

    async def handle(self, reply: Sequence[tuple[bytes, list[Entry]]]) -> None:
        """Apply one XREADGROUP reply: one script call per (shard, kind), concurrently."""
        calls = []
        for stream, entries in reply:
            live, gone = split_deleted(entries)
            if gone:
                log.error("entries trimmed before admission applied them",
                          extra={"stream": stream.decode(), "entries": len(gone)})  # fmt: skip
                await self.redis.xack(stream, ADMISSION_GROUP, *gone)
            if live:
                shard, kind = self._streams[stream]
                calls.append(self._apply(stream, shard, kind, live))
        await aio.gather(*calls)

    async def _apply(self, stream: bytes, shard: int, kind: str, entries: list[Entry]) -> None:
        """Run the script over the batch; a refused item is dead-lettered and the rest retried."""
        pending: list[tuple[bytes, bytes]] = []
        for entry_id, fields in entries:
            payload = fields.get(PAYLOAD)
            if payload is None:
                await self._reject(stream, kind, entry_id, fields, "malformed", "no payload field")
            else:
                pending.append((entry_id, payload))
        while pending:
            started = time.perf_counter()
            try:
                if kind == "admit":
                    await self._admit(shard, pending)
                else:
                    await self._finish(shard, pending)
            except ScriptError as exc:
                if not 0 <= exc.index < len(pending):
                    raise  # not about one entry: leave the batch pending, it is retried
                bad_id, bad_payload = pending.pop(exc.index)
                fields = {PAYLOAD: bad_payload}
                await self._reject(stream, kind, bad_id, fields, exc.reason, exc.detail)
                continue
            finally:
                metrics.BATCH_SECONDS.labels(kind).observe(time.perf_counter() - started)
            return

    async def _admit(self, shard: int, entries: list[tuple[bytes, bytes]]) -> None:
        r = await self.scripts.admit(shard, entries)
        metrics.REQUESTS.labels("created").inc(r.created)
        metrics.REQUESTS.labels("duplicate").inc(r.duplicates)
        metrics.ASSIGNED.inc(r.assigned)
        metrics.CANCELLED.inc(r.cancelled)

    async def _finish(self, shard: int, entries: list[tuple[bytes, bytes]]) -> None:
        r = await self.scripts.finish(shard, entries)
        metrics.RESULTS.labels("applied").inc(r.applied)
        metrics.RESULTS.labels("stale").inc(r.stale)
        metrics.ASSIGNED.inc(r.assigned)

    async def _reject(
        self,
        stream: bytes,
        kind: str,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        reason: str,
        detail: str,
    ) -> None:
        """Move one entry the scripts refused to the dead-letter stream, then acknowledge it."""
        dead = dead_letter(fields, entry_id, reason, detail, stream=stream)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(
                self.keys.dead_stream, dead, maxlen=self.config.stream_maxlen, approximate=True
            )
            pipe.xack(stream, ADMISSION_GROUP, entry_id)
            await pipe.execute()
        counter = metrics.REQUESTS if kind == "admit" else metrics.RESULTS
        counter.labels("rejected").inc()
        log.warning(
            "entry dead-lettered",
            extra={"stream": stream.decode(), "entry": entry_id.decode(), "reason": reason},
        )

    async def _timer_loop(self, stop: asyncio.Event) -> None:
        """Reap expired leases and take over stale pending entries; one failure never stops it."""
        last_gauges = 0.0
        while not stop.is_set():
            try:
                await self.reap_all()
                await self.reclaim_all()
                if time.monotonic() - last_gauges > 1.0:
                    last_gauges = time.monotonic()
                    await self.update_gauges()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("timer iteration failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.reap_interval)

    async def update_gauges(self) -> None:
        """Queued runs per workflow, active runs, and the backlog of each stream kind."""
        kinds = (
            ("requests", ADMISSION_GROUP),
            ("results", ADMISSION_GROUP),
            ("assignments", EXECUTOR_GROUP),
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for sk in self.keys.all_shards():
                pipe.hgetall(sk.queued_hash)
                pipe.zcard(sk.active_zset)
                for kind, _ in kinds:
                    pipe.xinfo_groups(getattr(sk, f"{kind}_stream"))
            replies = await pipe.execute(raise_on_error=False)
        queued: dict[str, int] = {}
        active = 0
        lag = dict.fromkeys((k for k, _ in kinds), 0)
        per_shard = 2 + len(kinds)
        for i in range(0, len(replies), per_shard):
            depth = replies[i] if isinstance(replies[i], dict) else {}
            for workflow, n in depth.items():
                queued[workflow.decode()] = queued.get(workflow.decode(), 0) + int(n)
            active += int(replies[i + 1]) if isinstance(replies[i + 1], int) else 0
            for (kind, group), groups in zip(kinds, replies[i + 2 : i + per_shard], strict=True):
                for g in groups if isinstance(groups, list) else []:
                    if g["name"] == group.encode():
                        lag[kind] += int(g["pending"]) + int(g.get("lag") or 0)
        for workflow in self._gauged_workflows - set(queued):
            metrics.QUEUED.labels(workflow).set(0)
        for workflow, n in queued.items():
            metrics.QUEUED.labels(workflow).set(n)
        self._gauged_workflows |= set(queued)
        metrics.ACTIVE.set(active)
        for kind, value in lag.items():
            metrics.STREAM_LAG.labels(kind).set(value)

    async def reap_all(self) -> None:
        async def one(shard: int) -> None:
            started = time.perf_counter()
            r = await self.scripts.reap(shard, retention_ms=self.config.retention_ms)
            metrics.BATCH_SECONDS.labels("reap").observe(time.perf_counter() - started)
            metrics.REAPED.labels("retried").inc(r.retried)
            metrics.REAPED.labels("failed").inc(r.failed)
            metrics.REAPED.labels("cancelled").inc(r.cancelled)
            metrics.EXPIRED.inc(r.expired)
            metrics.ASSIGNED.inc(r.assigned)

        await asyncio.gather(*(one(s) for s in range(self.keys.shards)))

    async def reclaim_all(self) -> None:
        """XAUTOCLAIM entries another admission process read and never acknowledged."""

        async def one(stream: bytes) -> None:
            shard, kind = self._streams[stream]
            start = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    stream,
                    ADMISSION_GROUP,
                    self.consumer,
                    self.config.claim_idle_ms,
                    start_id=start,
                    count=self.config.batch,
                )
                next_id, entries = reply[0], [e for e in reply[1] if e and e[1]]
                if entries:
                    metrics.RECLAIMED.inc(len(entries))
                    await self._apply(stream, shard, kind, entries)
                if next_id in (b"0-0", "0-0"):
                    return
                start = next_id

        await asyncio.gather(*(one(s) for s in self._streams))


async def serve(
    settings: Settings,
    config: AdmissionConfig,
    stop: asyncio.Event,
    on_ready: Callable[[Admission], Awaitable[None]] | None = None,
) -> None:
    """Run one admission process until `stop` is set."""
    redis = connect(settings.redis_url)
    try:
        service = Admission(redis, settings, config)
        if on_ready:
            await on_ready(service)
        await service.run(stop)
    finally:
        await redis.aclose()
