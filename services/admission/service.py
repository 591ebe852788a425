"""The admission service: turns run requests and executor results into atomic script calls.

Loop: one XREADGROUP BLOCK over the requests and results streams of every shard, then one
admit call per shard and one finish call for the results of every shard (per shard on a
cluster), concurrently.
Timers run the reaper, take over entries that a dead admission process left pending, and
update the gauges. Scripts acknowledge their own batch, so a crash at any point leaves each
entry either fully applied and acknowledged, or pending and applied later (applying twice
changes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede import aio, codec, tracing
from supersede import metrics as metrics_base
from supersede.config import Settings, server_time
from supersede.errors import ScriptError, describe
from supersede.health import ShardSilent, raise_unless_silent, shard_failure
from supersede.keys import ShardKeys
from supersede.lane import Lane, read
from supersede.logs import Sampled, kind_of
from supersede.metrics import HOP_SECONDS
from supersede.protocol import (
    ADMISSION_GROUP,
    ASSIGN_DEADLINE_FIELD,
    EXECUTOR_GROUP,
    PAYLOAD,
    PAYLOADS,
    WRITTEN,
    Entry,
    Reason,
    StreamReply,
    dead_letter,
    request_payloads,
)
from supersede.registry import load_all
from supersede.scripts import AdmitResult, HandOver, ReapResult
from supersede.service import Periodic, Service, Throttle, server_now
from supersede.service import serve as serve_service
from supersede.services.admission import metrics
from supersede.streams import (
    GroupSpec,
    OwnPending,
    entry_ms,
    group_backlog,
    reported_lag,
    split_deleted,
    stale_streams,
)
from supersede.trim import trim_consumed, trim_older_than, trim_to_length

REAP_LIMIT = 1000  # leases and old records one reap call handles (it blocks the server)
REAP_ROUNDS = 20  # reap calls per shard and tick at most, while old records remain
GAUGES_EVERY = 1.0  # seconds between two reads of the gauges, at least
GAUGED_STREAMS_PER_S = 2_000  # streams the gauges read a second at most (then less often)
DEBOUNCE_POLL = 1.0  # seconds between looks for debounce timers another process set
_NOT_LOOKED = Sampled()  # (a line per 5 s while a master is silent)
_REAPED_NOT_READ = Sampled()  # (a line per 5 s while the server is down)
LAG_STREAMS = ("requests", "results", "assignments")  # the kinds of streams the lag gauge sums


Part = tuple[bytes, int, list[Entry]]
"""Entries read from one stream: (stream, shard, entries)."""


Items = list[tuple[bytes, bytes]]
"""(entry id, payload) pairs of one stream, as a script call takes them."""


@dataclass(slots=True)
class AdmissionConfig:
    batch: int = 1000
    block_ms: int = 1000
    reap_interval: float = 0.5
    claim_idle_ms: int = 5_000  # take over another admission's pending entries (see the CLI)
    retention_ms: int = 86_400_000
    max_ended_runs: int = 1_000_000  # per workflow (spread over the shards); 0: no cap
    # no record is deleted sooner after its run ended, whatever the retention or the cap:
    # records are the de-duplication memory of redelivered inbox entries
    min_retention_ms: int = 300_000
    # groups remembered (their newest runs and fence, about 400 bytes each) in the deployment,
    # spread over the shards: beyond it the least recently admitting idle ones are forgotten
    max_groups: int = 1_000_000
    assign_deadline_ms: int = 30_000  # an unclaimed assignment gets a fresh entry after this
    trim_interval: float = 5.0  # seconds between two trims of the streams
    control_keep_ms: int = 600_000  # cancel messages kept this long (the heartbeat backs them up)
    dead_retention_ms: int = 7 * 86_400_000  # dead letters kept this long
    max_dead_letters: int = 100_000  # and at most this many, the newest (0: no cap)
    # a consumer of a stream admission trims, idle this long with nothing pending, is deleted
    # (one is left by every process that ever read: restarts, rolling deploys); 0: never
    forget_consumers_ms: int = 3_600_000


@dataclass(slots=True)
class Read:
    """One XREADGROUP in flight; `reread`: of own pending entries (after a failure)."""

    reread: bool
    reply: asyncio.Future[Any]


class BatchReader:
    """XREADGROUP BLOCK over some streams for one consumer.

    After a failure it re-reads the consumer's own pending entries first (OwnPending). Behind a
    backlog (a stream gave a full batch) the next read is sent while the current batch is
    applied, so the server does not sit idle while this process parses replies; batches are
    still applied one after another, in stream order.
    """

    def __init__(
        self,
        redis: Redis,
        consumer: str,
        names: list[bytes],
        count: int,
        block_ms: int,
        lane: Lane | None = None,
    ):
        self.redis = redis
        self.lane = lane  # the reads' own connection (None: redis-py's pool)
        self.consumer = consumer
        self.own = OwnPending(names)
        self.count = count
        self.block_ms = block_ms
        self.ahead: Read | None = None

    def _send(self) -> Read:
        call = read(
            self.lane, self.redis, self.own.ids(), group=(ADMISSION_GROUP, self.consumer),
            count=self.count, block=self.block_ms,
        )  # fmt: skip
        return Read(self.own.active, asyncio.ensure_future(call))  # kept in the Read

    def upcoming_reread(self) -> bool:
        """Whether the next read re-reads own pending entries (a periodic sweep may make it
        one); known before it is sent, so a failure to send is attributed right."""
        if self.ahead is not None:
            return self.ahead.reread
        self.own.sweep_if_due()
        return self.own.active

    def next(self) -> Read:
        """The read sent ahead, else a new one."""
        if self.ahead is not None:
            read, self.ahead = self.ahead, None
            return read
        return self._send()

    async def receive(self, read: Read) -> StreamReply:
        """Await a read and move the re-read position past what it returned."""
        reply = cast(StreamReply, await read.reply or [])
        self.own.advance(reply, read.reread)
        return reply

    def read_ahead_if_backlog(self, reply: StreamReply, stop: asyncio.Event) -> None:
        """Send the next read now when a stream gave a full batch (at low load the extra read
        would go out before the script call and delay it)."""
        full = any(len(entries) >= self.count for _, entries in reply)
        if full and not self.own.active and not stop.is_set():
            self.ahead = self._send()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.reply.cancel()
            self.ahead = None


def _lag_suspects(
    shards: Sequence[ShardKeys], replies: list[Any], workflows: list[str], per_shard: int
) -> list[tuple[str | bytes, str]]:
    """The streams whose group's lag Redis said was not 0, from `update_gauges`' replies (see
    Service.heal_lags)."""
    out: list[tuple[str | bytes, str]] = []
    for sk, i in zip(shards, range(0, len(replies), per_shard), strict=False):
        for offset, stream in ((1, sk.requests_stream), (3, sk.results_stream)):
            if reported_lag(replies[i + offset], ADMISSION_GROUP):
                out.append((stream, ADMISSION_GROUP))
        for j, workflow in enumerate(workflows):
            if reported_lag(replies[i + 5 + 2 * j], EXECUTOR_GROUP):
                out.append((sk.assignments_stream(workflow), EXECUTOR_GROUP))
    return out


SHARD_WAIT = 0.1  # seconds between two looks whether a failing shard's reader may read again
KEEP_REFUSED_FOR = 600.0  # seconds without keeping reap outcomes after the ACL refused it
LAPSED_SAID_EVERY = 10.0  # seconds: the reaper's line for lapsed leases, at most this often


class Admission(Service):
    name = "admission"

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        config: AdmissionConfig | None = None,
        *,
        consumer: str | None = None,
    ) -> None:
        self.config = config or AdmissionConfig()
        super().__init__(redis, settings, consumer=consumer)
        self._gauged_workflows: set[str] = set()
        self._backlog_workflows: set[str] = set()  # (the workflows the backlog gauge shows)
        self._workflows: list[str] = []  # registered, refreshed by each trim
        self._retentions: dict[str, int] = {}  # workflow -> its own retention (ms)
        self._gauges_due = Throttle(GAUGES_EVERY)
        self._gone_said = Sampled()  # (runs whose records were gone, by shard)
        self.dead_lines = Sampled()  # (one line per kind of dead letter in 5 s)
        self._next_due = 0.0  # the earliest debounce timer this process set (server ms), 0: none
        self._due_set = asyncio.Event()
        self._debounce_failure_log = Throttle(10.0)  # (a failing shard logs once in 10 s)
        # runs whose leases lapsed, retried and failed since the last line that said so (a
        # SIGKILLed executor's 95 runs were retried without a word, only a metric: a probe)
        self._lapsed = [0, 0]
        self._lapsed_said = Throttle(LAPSED_SAID_EVERY)
        self._reap_calls = 0  # (each call's token for its kept outcome)
        self._reap_unsure: dict[int, str] = {}  # shard -> token of a call whose reply was lost
        self._keep_refused_until = 0.0  # (monotonic) reaped without keeping outcomes until then
        metrics_base.TASK_FAILURES.labels(self.name, "debounce")  # (exported at 0)
        # stream name -> (shard, kind) for every stream this service reads
        self._streams: dict[bytes, tuple[int, str]] = {}
        for sk in self.keys.all_shards():
            self._streams[sk.requests_stream.encode()] = (sk.shard, "admit")
            self._streams[sk.results_stream.encode()] = (sk.shard, "finish")

    def periodic(self) -> Sequence[Periodic]:
        return [(self.config.reap_interval, self.tick), (self.config.trim_interval, self.trim)]

    def groups(self) -> list[GroupSpec]:
        """The admission group of each shard's requests and results streams."""
        return [
            (stream, ADMISSION_GROUP)
            for sk in self.keys.all_shards()
            for stream in (sk.requests_stream, sk.results_stream)
        ]

    async def keep_pinned(self) -> None:
        """The shard count, and the assignment deadline executors' finish calls read, again if
        the server lost them: written only then (at maxmemory the server refuses any write,
        one that changes nothing too, and a failed look makes admission not ready)."""
        await super().keep_pinned()
        if await self.redis.hget(self.keys.config_hash, ASSIGN_DEADLINE_FIELD) is None:
            await self.redis.hsetnx(
                self.keys.config_hash, ASSIGN_DEADLINE_FIELD, str(self.config.assign_deadline_ms)
            )

    async def prepare(self) -> None:
        await self.load_workflows()
        if self.config.retention_ms < self.config.min_retention_ms:  # (accepted silently: a probe)
            self.log.warning(
                "--retention is below --min-retention: ended runs are kept for --min-retention "
                "(lower it too to keep them less; the records are the de-duplication memory of "
                "redelivered inbox entries)",
                extra={"retention_s": self.config.retention_ms / 1000,
                       "min_retention_s": self.config.min_retention_ms / 1000},
            )  # fmt: skip
        # for the finish calls of executors, which start runs in the slots they free
        # (written when it changed: at its maxmemory the server refuses a write, a probe)
        deadline = str(self.config.assign_deadline_ms)
        stored = await self.redis.hget(self.keys.config_hash, ASSIGN_DEADLINE_FIELD)
        if stored is None or codec.text(stored) != deadline:
            await self.redis.hset(self.keys.config_hash, ASSIGN_DEADLINE_FIELD, deadline)
        # the de-duplication set of earlier versions: nothing reads it any more (one call: a
        # call each took a connection each, 18 at the start of an idle admission, a probe; a
        # cluster client splits it by slot, where its pipeline's UNLINK is a coroutine and
        # deleted nothing, a cluster probe)
        await self.redis.unlink(*(sk.legacy_seen_zset for sk in self.keys.all_shards()))

    async def load_workflows(self) -> None:
        """The registered workflows (a definition that fails to parse still has its
        assignment streams trimmed) and the retentions of those that set their own."""
        _, defs, errors = await load_all(self.redis, self.keys)
        self._workflows = sorted({*defs, *errors})
        raw = await self.redis.hgetall(self.keys.retentions_hash)
        self._retentions = {codec.text(w): int(float(ms)) * 1000 for w, ms in raw.items()}

    async def trim(self) -> None:
        """Trim every stream by consumption (see supersede.trim): each shard's requests and
        results, each registered workflow's assignment streams; the control streams and the
        dead letters by age. (Ingress trims the inbox.) Now and then, also forget the consumers
        of gone processes in the groups of the streams it trims."""
        await self.load_workflows()
        groups: list[GroupSpec] = []
        for sk in self.keys.all_shards():
            groups += [(sk.requests_stream, ADMISSION_GROUP), (sk.results_stream, ADMISSION_GROUP)]
            groups += [(sk.assignments_stream(wf), EXECUTOR_GROUP) for wf in self._workflows]
        removed = await trim_consumed(self.redis, [stream for stream, _ in groups])
        controls = [sk.control_stream for sk in self.keys.all_shards()]
        await self.clock.refresh(self.redis)  # (entry ids are the server's ms)
        now_ms = self.clock.now_ms()
        removed |= await trim_older_than(self.redis, controls, self.config.control_keep_ms, now_ms)
        removed |= await trim_older_than(
            self.redis, [self.keys.dead_stream], self.config.dead_retention_ms, now_ms
        )
        if self.config.max_dead_letters:
            removed |= await trim_to_length(
                self.redis, self.keys.dead_stream, self.config.max_dead_letters
            )
        if removed:
            metrics.TRIMMED.inc(sum(removed.values()))
        await self.forget_gone_consumers(
            groups, self.config.forget_consumers_ms, metrics.FORGOTTEN_CONSUMERS
        )

    async def tick(self) -> None:
        """Reap expired leases, take over stale pending entries, and (each second) the gauges.
        A tick that fails (Redis down) makes the gauges of what Redis holds unknown (NaN):
        they showed the last values read, a lag of 0 through an outage."""
        try:
            await self.reap_all()
        except BaseException:
            self._gauges_unknown()
            raise
        try:  # (on a cluster each bounded: a master that went silent since the reaps)
            await self.reclaim_all()
            if self._gauges_due.due():
                await self.update_gauges()
        except (TimeoutError, RedisTimeoutError):  # (skipped this round; its shards are found
            # silent by the reaps)
            if (repeats := _NOT_LOOKED.due("tick")) is not None:
                self.log.warning("take-overs or gauges skipped: a master did not answer in time",
                                 extra={"repeats": repeats})  # fmt: skip

    async def main(self, stop: asyncio.Event) -> None:
        timers = asyncio.create_task(self._debounce_loop(stop))
        try:
            if isinstance(self.redis, RedisCluster):
                # A cluster refuses one read over the streams of many slots: one reader per
                # shard, over the shard's requests and results streams (one hash tag).
                await asyncio.gather(
                    *(
                        self._read_loop(
                            stop,
                            [sk.requests_stream.encode(), sk.results_stream.encode()],
                            shard=sk.shard,
                        )
                        for sk in self.keys.all_shards()
                    )
                )
            else:
                await self._read_loop(stop, list(self._streams))
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers

    async def _debounce_loop(self, stop: asyncio.Event) -> None:
        """Fire debounce timers when they are due: at the earliest one this process set (each
        admit call says), and every second for those other processes set or a restart left
        (they live in each shard's due zset, on the server's clock)."""
        while not stop.is_set():
            now = self.clock.now_ms()  # (the timers are the server's time)
            wait = DEBOUNCE_POLL if not self._next_due else (self._next_due - now) / 1000
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._due_set.wait(), min(DEBOUNCE_POLL, max(0.0, wait)))
            self._due_set.clear()
            if self._next_due and self.clock.now_ms() < self._next_due:
                continue  # an earlier timer was set: wait for it
            try:
                await self.clock.refresh(self.redis)
                self._next_due = await self.fire_due()
                metrics_base.report(self.name, "debounce", True)
            except Exception as exc:  # the next poll tries again; not ready meanwhile
                self._next_due = 0.0  # (a due time past would retry at once, in a tight loop)
                metrics_base.TASK_FAILURES.labels(self.name, "debounce").inc()
                metrics_base.report(self.name, "debounce", False)
                if self._debounce_failure_log.due():
                    self.log_failure("debounce timers not fired", exc)

    async def fire_due(self) -> float:
        """Fire every shard's due debounce timers; the earliest still set (server ms), 0: none."""

        async def one(shard: int) -> int:
            started = time.perf_counter()
            try:
                r = await self.health.call(
                    [shard],
                    self.scripts.fire_debounced(
                        shard, assign_deadline_ms=self.config.assign_deadline_ms
                    ),
                )
            except ShardSilent:  # (its timers fire once it answers; the others' now)
                return 0
            if r.records_gone:
                self._records_gone(shard, r.records_gone)
            if r.fired:
                metrics.BATCH_SECONDS.labels("debounce").observe(time.perf_counter() - started)
                metrics.DEBOUNCE_FIRED.inc(r.fired)
                metrics.ASSIGNED.inc(r.assigned)
                metrics.CANCELLED.inc(r.cancelled)
            return r.next_due

        dues = [d for d in await aio.gather(*(one(s) for s in range(self.keys.shards))) if d]
        return float(min(dues)) if dues else 0.0

    async def _read_loop(
        self, stop: asyncio.Event, names: list[bytes], shard: int | None = None
    ) -> None:
        """Read a batch, apply it; on stop, a read already sent is applied before returning.
        `shard`: the one shard of the streams (a cluster), whose calls may fail on their own."""
        reader = BatchReader(
            self.redis, self.consumer, names, self.config.batch, self.config.block_ms, self.lane()
        )
        part = f"read {names[0].decode()}"  # (on a cluster, one reader per shard)
        try:
            while reader.ahead is not None or not stop.is_set():
                reread = reader.upcoming_reread()
                try:
                    reply = await reader.receive(reader.next())
                    if reply:
                        reader.read_ahead_if_backlog(reply, stop)
                        await self.handle(reply)
                    self.healthy(part)
                    if shard is not None and shard in self.health.failing:
                        self.health.went_through([shard])
                except Exception as exc:  # redis-py can raise others mid-failover
                    if shard is not None and shard_failure(exc):
                        # (a slot left half moved: this shard's, not the service's; admission
                        # said it was not ready and admitted nothing, its other readers on,
                        # an ERROR line every batch: a cluster probe)
                        self.health.went_failing([shard], exc)
                        reader.own.restart(failed_reread=reread)
                        while not self.health.up(shard) and not stop.is_set():
                            await asyncio.sleep(SHARD_WAIT)
                        continue
                    await self.recover(reader.own, exc, failed_reread=reread, reader=part)
        finally:
            reader.close()

    async def handle(self, reply: Sequence[tuple[bytes, list[Entry]]]) -> None:
        """Apply one XREADGROUP reply: one admit call per shard, and the results of every
        shard in one finish call (on a cluster, where shards live in different slots, one
        call per shard); the calls run concurrently."""
        read_us = int(server_now() * 1e6)  # (a point of each run's path: admission read it)
        calls = []
        results: list[Part] = []
        for stream, entries in reply:
            live, gone = split_deleted(entries)
            if gone:
                self.pending_deleted(stream, ADMISSION_GROUP, gone)
                await self.redis.xack(stream, ADMISSION_GROUP, *gone)
            if live:
                shard, kind = self._streams[stream]
                if kind == "admit":
                    calls.append(self._apply(kind, [(stream, shard, live)], read_us))
                else:
                    results.append((stream, shard, live))
        if isinstance(self.redis, RedisCluster):
            calls += [self._apply("finish", [part]) for part in results]
        else:
            calls += [self._apply("finish", parts) for parts in _chunks(results, self.config.batch)]
        await aio.gather(*calls)

    async def _apply(self, kind: str, parts: list[Part], read_us: int = 0) -> None:
        """Run the script over the batch (one shard's requests, or results of one or more
        shards); a refused item is dead-lettered and the rest retried."""
        pending: list[tuple[bytes, int, Items]] = []
        for stream, shard, entries in parts:
            if items := await self._items(kind, stream, entries):
                pending.append((stream, shard, items))
        while pending:
            started = time.perf_counter()
            try:
                if kind == "admit":
                    (_, shard, items), *_ = pending
                    written = _written(parts)
                    while items:  # (a refused one's index is of the call's first item on)
                        take = _whole_entries(items, self.config.batch)
                        began = time.perf_counter()
                        await self._admit(shard, items[:take], read_us, written)
                        metrics.BATCH_SECONDS.labels(kind).observe(time.perf_counter() - began)
                        del items[:take]
                else:
                    await self._finish({shard: items for _, shard, items in pending})
            except ScriptError as exc:
                place = _locate(pending, exc.index)
                if place is None:
                    raise  # not about one entry: leave the batch pending, it is retried
                stream, items, at = place
                bad_id, bad_payload = items.pop(at)
                fields = {PAYLOAD: bad_payload}
                # (the entry's other requests, if any, are acknowledged by the call that
                # admits them: acknowledged now, they would be lost to a crash before it)
                last = all(entry_id != bad_id for entry_id, _ in items)
                detail = _detail(kind, exc, bad_payload)
                await self._reject(stream, kind, bad_id, fields, exc.reason, detail, ack=last)
                pending = [part for part in pending if part[2]]
                continue
            except Exception as exc:
                if len(pending) < 2:
                    raise
                # Not about one entry, and the call served several streams: each on its own,
                # so the streams that do apply are not held back by the one that does not.
                self.log.warning("a script call over several streams failed; applying them "
                                 "one by one", extra={"error": describe(exc)})  # fmt: skip
                alone = [[(s, shard, [(e, {PAYLOAD: p}) for e, p in items])]
                         for s, shard, items in pending]  # fmt: skip
                outcomes = await asyncio.gather(
                    *(self._apply(kind, part) for part in alone), return_exceptions=True
                )
                failed = [x for x in outcomes if isinstance(x, BaseException)]
                if failed:
                    raise failed[0] from exc
            finally:
                if kind != "admit":  # (each admit call is timed on its own, above)
                    metrics.BATCH_SECONDS.labels(kind).observe(time.perf_counter() - started)
            return

    async def _items(self, kind: str, stream: bytes, entries: Sequence[Entry]) -> Items:
        """(entry id, packed item) of each item of the entries, in order: a requests entry
        holds the requests of one ingress call (see protocol.PAYLOADS), a results entry one
        result. An entry with none is dead-lettered."""
        items: Items = []
        for entry_id, fields in entries:
            if kind == "admit":
                payloads = request_payloads(fields)
            else:
                payload = fields.get(PAYLOAD)
                payloads = None if payload is None else [payload]
            if payloads:
                items += [(entry_id, payload) for payload in payloads]
            else:
                if kind != "admit":
                    what = "no `r` field (one packed result)"
                elif PAYLOADS in fields:
                    what = "`rs` is no msgpack array of packed requests (byte strings)"
                else:
                    what = "no `rs` (an array of packed requests) or `r` (one packed request) field"
                await self._reject(stream, kind, entry_id, fields, Reason.MALFORMED, what)
        return items

    async def admit_handed(
        self, shard: int, payloads: Sequence[bytes], hand_over: HandOver | None
    ) -> AdmitResult:
        """Admit requests that ingress handed over in this process (`supersede serve`): never
        written to the requests stream, so there is nothing to acknowledge; a crash before the
        call leaves their inbox entries pending, and their redelivery makes the same run ids.
        `hand_over`: claim runs for the executor of this process in the same call. A refused
        request raises ScriptError (the caller appends the batch instead, and the read from
        the stream dead-letters it as any other)."""
        now_us = int(server_now() * 1e6)  # read and written at once: both points of the path
        entries: Items = [(b"", p) for p in payloads]
        started = time.perf_counter()
        try:
            return await self._admit(shard, entries, now_us, {b"": now_us}, hand_over)
        finally:
            metrics.BATCH_SECONDS.labels("admit").observe(time.perf_counter() - started)

    async def _admit(
        self,
        shard: int,
        entries: Items,
        read_us: int,
        written: dict[bytes, int],
        hand_over: HandOver | None = None,
    ) -> AdmitResult:
        r = await self.scripts.admit(
            shard,
            entries,
            read_us=read_us,
            written_us=[written.get(entry_id, 0) for entry_id, _ in entries],
            assign_deadline_ms=self.config.assign_deadline_ms,
            hand_over=hand_over,
        )
        if r.due and (not self._next_due or r.due < self._next_due):
            self._next_due = float(r.due)
            self._due_set.set()
        done = server_now() * 1000
        read_ms = read_us / 1000
        if self.tracer:
            self._trace_admit(entries, read_ms, done, r.traced)
        # request written -> read by admission, for the batch's oldest request
        first = written.get(entries[0][0], 0) / 1000 or entry_ms(entries[0][0])
        HOP_SECONDS.labels("requests").observe(max(0, read_ms - first) / 1000)
        HOP_SECONDS.labels("admission").observe(max(0.0, done - read_ms) / 1000)
        metrics.REQUESTS.labels("created").inc(r.created)
        metrics.REQUESTS.labels("duplicate").inc(r.duplicates)
        metrics.ASSIGNED.inc(r.assigned)
        metrics.CANCELLED.inc(r.cancelled)
        if r.records_gone:
            self._records_gone(shard, r.records_gone)
        return r

    def _records_gone(self, shard: int, runs: int) -> None:
        """Count (and say, once per REPEAT_EVERY and shard) the runs a call found gone."""
        metrics.REAPED.labels("record_gone").inc(runs)  # (0: the series exists from the start)
        if runs and (repeats := self._gone_said.due(shard)) is not None:
            self.log.error(
                "runs whose records or indexes are gone left their slots (a strict run "
                "that was cancelling keeps its slot): the server lost keys "
                "(maxmemory-policy evicts, or a hand deleted them); such runs cannot be "
                "told or end (set maxmemory-policy noeviction)",
                extra={"shard": shard, "runs": runs, "repeats": repeats},
            )

    def _trace_admit(
        self,
        entries: Items,
        read_ms: float,
        done_ms: float,
        traced: tuple[tuple[str, str, str, str, str], ...],
    ) -> None:
        """An admission span in the trace of each traced run of the batch, from the read to the
        script's answer; and, for each traced run it cancelled, a cancel span that links to the
        span of the run that superseded it."""
        for _, payload in entries:
            req = codec.unpack(payload)
            if not isinstance(req, dict) or not req.get("tp"):
                continue
            span = self.tracer.start_span(
                "supersede.admission",
                context=tracing.context_of(req["tp"]),
                kind=tracing.kind("CONSUMER"),
                start_time=tracing.ns(read_ms),
                attributes={"supersede.run_id": str(req.get("id", "")),
                            "supersede.workflow": str(req.get("w", ""))},
            )  # fmt: skip
            span.end(end_time=tracing.ns(done_ms))
        for rid, tp, by, by_tp, why in traced:
            link = tracing.link_to(by_tp)
            attributes = {"supersede.run_id": rid, "supersede.reason": why,
                          "supersede.cancelled_by": by}  # fmt: skip
            span = self.tracer.start_span(
                "supersede.cancel",
                context=tracing.context_of(tp),
                links=[link] if link else None,
                start_time=tracing.ns(done_ms),
                attributes=attributes,
            )
            span.end(end_time=tracing.ns(done_ms))

    async def _finish(self, batches: dict[int, Items]) -> None:
        r = await self.scripts.finish_shards(
            batches, assign_deadline_ms=self.config.assign_deadline_ms
        )
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
        *,
        ack: bool = True,
    ) -> None:
        """Move one entry the scripts refused (or one request of it) to the dead-letter stream,
        then acknowledge the entry (unless `ack` is False: other requests of it are still to be
        admitted)."""
        dead = dead_letter(fields, entry_id, reason, detail, stream=stream)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.keys.dead_stream, dead)
            if ack:
                pipe.xack(stream, ADMISSION_GROUP, entry_id)
            await pipe.execute()
        counter = metrics.REQUESTS if kind == "admit" else metrics.RESULTS
        counter.labels("rejected").inc()
        repeats = self.dead_lines.due((kind, reason))
        if repeats is not None:
            extra = {"stream": stream.decode(), "entry": entry_id.decode(), "reason": reason}
            self.log.warning("entry dead-lettered", extra={**extra, "repeats": repeats})

    def _gauges_unknown(self) -> None:
        unknown = math.nan
        metrics.ACTIVE.set(unknown)
        for kind in LAG_STREAMS:
            metrics.STREAM_LAG.labels(kind).set(unknown)
        for workflow in self._gauged_workflows:
            metrics.QUEUED.labels(workflow).set(unknown)
        for workflow in self._backlog_workflows:
            metrics.ASSIGNMENT_BACKLOG.labels(workflow).set(unknown)

    def _forget_retired(self, registered: set[str], queued: set[str]) -> None:
        """The per-workflow series of workflows no longer registered (retired) go, as they
        did: kept at their last values, a retired workflow's backlog fired
        SupersedeWorkflowUnserved for runs the retire had cancelled, until admission restarted
        (a churn probe)."""
        gone = [(metrics.QUEUED, self._gauged_workflows - queued)]  # (a retired one's
        # queued runs, if any, are still counted)
        for gauge in (metrics.ASSIGNMENT_BACKLOG, metrics.WORKFLOW_UNSERVED):
            gone.append((gauge, (self._gauged_workflows | self._backlog_workflows) - registered))
        for gauge, workflows in gone:
            for workflow in workflows:
                with contextlib.suppress(KeyError):
                    gauge.remove(workflow)

    async def update_gauges(self) -> None:
        """Queued runs per workflow, active runs, the backlog of each stream kind, and the
        unclaimed assignments of each registered workflow (what a pool scales on)."""
        names = await self.health.bounded(self.redis.hkeys(self.keys.workflows_hash))
        workflows = sorted(w.decode() if isinstance(w, bytes) else w for w in names)
        # (a silent master's shards left out: the gauges sum the others meanwhile)
        up = [sk for sk in self.keys.all_shards() if self.health.up(sk.shard)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for sk in up:
                pipe.hgetall(sk.counts_hash)
                pipe.xinfo_groups(sk.requests_stream)
                pipe.xlen(sk.requests_stream)
                pipe.xinfo_groups(sk.results_stream)
                pipe.xlen(sk.results_stream)
                for wf in workflows:
                    pipe.xinfo_groups(sk.assignments_stream(wf))
                    pipe.xlen(sk.assignments_stream(wf))
            replies = await self.health.bounded(pipe.execute(raise_on_error=False))
        queued = dict.fromkeys(workflows, 0)  # (every registered one: 0, not no series)
        active = 0
        lag = dict.fromkeys(LAG_STREAMS, 0)
        # (the runs assigned and not claimed, from the counts: the streams also hold the
        # entries of runs cancelled since, which a pool need not scale for: a key's superseded
        # assignments read as 2,000 waiting runs for one)
        backlog = dict.fromkeys(workflows, 0)
        per_shard = 5 + 2 * len(workflows)
        # (each stream read once a second at most GAUGED_STREAMS_PER_S: with 1,000 workflows
        # on 16 shards the gauges took half of admission's CPU while idle, a scale probe)
        self._gauges_due.every = max(GAUGES_EVERY, len(replies) / 2 / GAUGED_STREAMS_PER_S)
        for i in range(0, len(replies), per_shard):
            active += _tally(replies[i] if isinstance(replies[i], dict) else {}, queued, backlog)
            lag["requests"] += group_backlog(replies[i + 1], ADMISSION_GROUP, replies[i + 2]) or 0
            lag["results"] += group_backlog(replies[i + 3], ADMISSION_GROUP, replies[i + 4]) or 0
            for j in range(len(workflows)):
                groups, length = replies[i + 5 + 2 * j], replies[i + 6 + 2 * j]
                # No group yet (no executor of it ever started): every entry waits.
                found = group_backlog(groups, EXECUTOR_GROUP, length)
                unread = length if found is None and isinstance(length, int) else found or 0
                lag["assignments"] += unread
        self._forget_retired(set(workflows), set(queued))
        await self.heal_lags(_lag_suspects(up, replies, workflows, per_shard))
        for workflow, n in queued.items():
            metrics.QUEUED.labels(workflow).set(n)
            metrics.LEASE_FAILURES.labels(workflow)  # (at 0: increase() sees the first)
        self._gauged_workflows = set(queued)
        metrics.ACTIVE.set(active)
        for kind, value in lag.items():
            metrics.STREAM_LAG.labels(kind).set(value)
        for workflow, n in backlog.items():
            metrics.ASSIGNMENT_BACKLOG.labels(workflow).set(n)
        self._backlog_workflows = set(backlog)
        served = await self.health.bounded(self.redis.hgetall(self.keys.workflows_served_hash))
        now_ms = await server_time(self.redis) * 1000  # (the executors' marks are its time)
        for name, at in served.items():
            wid = codec.text(name)
            if wid in backlog:  # (registered: a retired one's series were removed above)
                metrics.WORKFLOW_UNSERVED.labels(wid).set(max(0.0, (now_ms - int(at)) / 1000))

    async def _count_lost_reap(self, shard: int, key: str, token: str) -> None:
        """Count what the reap call of `token`, whose reply was lost, did (it kept its outcome
        at `key`); never holds up the reaps: on a failure that count is lost."""
        try:
            lost = await self.health.call([shard], self.scripts.reaped(key, token))
        except Exception as exc:  # (one line per 5 s: a line per shard and tick was 32 a
            # second while the server was down, an operator's probe)
            error = describe(exc)
            if (repeats := _REAPED_NOT_READ.due(kind_of(exc))) is not None:
                extra = {"error": error, "repeats": repeats}  # (of any shard)
                self.log.info("a lost reap reply's outcome is not read", extra=extra)
            return
        if lost:
            self._count_reaped(shard, lost)

    async def reap_all(self) -> None:
        """One reap per shard, repeated (up to REAP_ROUNDS calls of REAP_LIMIT records) while
        a call found a full batch of old records: the retention keeps up at any end rate the
        system reaches (one call per tick used to cap it near 2,000 runs/s per shard)."""

        async def one(shard: int) -> None:
            key = self.keys.shard(shard).reaped_string(self.consumer)
            token = self._reap_unsure.pop(shard, None)
            if token is not None:  # (a call whose reply was lost: did it reap?)
                await self._count_lost_reap(shard, key, token)
            for _ in range(REAP_ROUNDS):
                started = time.perf_counter()
                self._reap_calls += 1
                token = str(self._reap_calls)
                keep = (key, token) if time.monotonic() >= self._keep_refused_until else None
                try:
                    r = await self.health.call(
                        [shard],
                        self.scripts.reap(
                            shard,
                            limit=REAP_LIMIT,
                            retention_ms=self.config.retention_ms,
                            assign_deadline_ms=self.config.assign_deadline_ms,
                            retentions=self._retentions,
                            max_ended=self.keys.share(self.config.max_ended_runs),
                            min_retention_ms=self.config.min_retention_ms,
                            max_groups=self.keys.share(self.config.max_groups),
                            keep=keep,
                        ),
                    )
                except NoPermissionError as exc:
                    if keep is None:
                        raise
                    # (a role from before 0.3.19: reaped without its outcome kept, for now;
                    # said once, though every shard's call was refused at once)
                    said = time.monotonic() < self._keep_refused_until
                    self._keep_refused_until = time.monotonic() + KEEP_REFUSED_FOR
                    if not said:
                        self.log.warning(
                            "the reaper keeps no outcome of its calls, so one whose reply is "
                            "lost goes uncounted: the ACL user lacks the key pattern "
                            f"{{{self.keys.namespace}:*}}:reaped:* or the command set; apply "
                            "the roles again (supersede acl --apply) and restart admission, or "
                            "it tries again in 10 minutes",
                            extra={"error": describe(exc)},
                        )
                    continue
                except Exception:
                    # (it may have run without its reply reaching us: a link that stalled past
                    # the client's timeout delivers it once it heals; what it retried and
                    # failed went uncounted, the "leases lapsed" line and alerts blind to it)
                    if keep is not None:
                        self._reap_unsure[shard] = token
                    raise
                metrics.BATCH_SECONDS.labels("reap").observe(time.perf_counter() - started)
                self._count_reaped(shard, r)
                if r.expired < REAP_LIMIT and r.leases < REAP_LIMIT and r.forgotten < REAP_LIMIT:
                    return

        # (on a cluster a silent master's shards are left out: the others are reaped, the
        # tick is not held for it)
        up = [s for s in range(self.keys.shards) if self.health.up(s)]
        try:
            raise_unless_silent(await asyncio.gather(*(one(s) for s in up), return_exceptions=True))
        finally:
            self._say_lapsed()

    def _count_reaped(self, shard: int, r: ReapResult) -> None:
        """A reap call's outcome in the metrics (and the "leases lapsed" line's counts)."""
        metrics.REAPED.labels("retried").inc(r.retried)
        metrics.REAPED.labels("failed").inc(r.failed)
        self._lapsed[0] += r.retried
        self._lapsed[1] += r.failed
        for workflow, n in r.failed_by:
            metrics.LEASE_FAILURES.labels(workflow).inc(n)
        metrics.REAPED.labels("cancelled").inc(r.cancelled)
        metrics.REAPED.labels("reassigned").inc(r.reassigned)
        self._records_gone(shard, r.records_gone)
        metrics.EXPIRED.inc(r.expired)
        metrics.FORGOTTEN_GROUPS.inc(r.forgotten)
        metrics.ASSIGNED.inc(r.assigned)

    def _say_lapsed(self) -> None:
        """One line, at most every LAPSED_SAID_EVERY seconds, for the runs whose leases lapsed
        since the last: retried elsewhere, or failed on their last attempt."""
        retried, failed = self._lapsed
        if (retried or failed) and self._lapsed_said.due():
            self._lapsed = [0, 0]
            self.log.warning(
                "leases lapsed: runs retried, or failed on their last attempt (their executor "
                "was killed, froze or lost Redis for a lease: --lease)",
                extra={"retried": retried, "failed": failed},
            )

    async def reclaim_all(self) -> None:
        """XAUTOCLAIM entries another admission process read and never acknowledged, from the
        streams that have some (one pipelined look over every stream first: a take-over per
        stream every tick cost the read loop its p99)."""

        async def one(stream: bytes) -> None:
            shard, kind = self._streams[stream]

            async def apply(entries: list[Entry]) -> None:
                metrics.RECLAIMED.inc(len(entries))
                await self._apply(kind, [(stream, shard, entries)])

            await self.take_over(
                stream, ADMISSION_GROUP, self.config.claim_idle_ms, self.config.batch, apply
            )

        streams = [s for s in self._streams if self.health.up(self._streams[s][0])]
        look = stale_streams(self.redis, streams, ADMISSION_GROUP, self.config.claim_idle_ms)
        stale = await self.health.bounded(look)
        # (not bounded: a take-over of a backlog takes its time; a master that froze since the
        # look holds it, rarely: take-overs follow the death of an admission process)
        await asyncio.gather(*(one(s) for s in stale))


def _tally(counts: dict[bytes, Any], queued: dict[str, int], assigned: dict[str, int]) -> int:
    """Add a shard's counts (`workflow|state` -> runs) to the queued runs of each workflow and
    the assigned ones of each in `assigned`; the shard's active runs (runs without a limit are
    in no active zset)."""
    active = 0
    for field, n in counts.items():
        workflow, _, state = field.decode().rpartition("|")
        if state == "Q":
            queued[workflow] = queued.get(workflow, 0) + int(n)
        elif state in ("A", "R"):
            active += int(n)
            if state == "A" and workflow in assigned:
                assigned[workflow] += int(n)
    return active


def _detail(kind: str, exc: ScriptError, payload: bytes) -> str:
    """A refused item's dead-letter detail, in words: the script says only a field's name, or
    nothing (an unknown run)."""
    noun = "request" if kind == "admit" else "result"
    if exc.reason == Reason.MALFORMED and exc.detail.isidentifier():  # (a field's name)
        return f"the packed {noun}'s field {exc.detail!r} is missing or invalid"
    if exc.reason == Reason.UNKNOWN_RUN and not exc.detail:
        try:
            body = codec.unpack(payload)
            which = f"run {body['id']!r}, attempt {body['a']}"
        except Exception:
            which = "its run"
        return (
            f"a {noun} of {which}, whose record is gone (deleted after its retention, or lost "
            "with the server's data)"
        )
    return exc.detail


def _chunks(parts: list[Part], size: int) -> list[list[Part]]:
    """Whole parts grouped so each group holds about `size` entries at most (a part larger
    than that alone): one script call never blocks the server for a whole backlog of every
    shard at once, and one stream's entries are never split between calls."""
    out: list[list[Part]] = []
    held = size
    for part in parts:
        if held + len(part[2]) > size:
            out.append([])
            held = 0
        out[-1].append(part)
        held += len(part[2])
    return out


def _whole_entries(items: Items, size: int) -> int:
    """How many of the first items one admit call takes: whole entries, `size` requests at
    most (one entry larger than that alone). An entry holds an ingress call's requests of one
    shard, and a read of `--batch` such entries after an outage held up to `--batch` times
    1,000 requests: one call of 100,000 of one hot key blocked the server 3.1 s."""
    if len(items) <= size:
        return len(items)
    last = items[size][0]  # (the entry the first item past `size` belongs to is left whole)
    take = size
    while take > 0 and items[take - 1][0] == last:
        take -= 1
    if take == 0:  # (the first entry alone is larger: taken whole)
        while take < len(items) and items[take][0] == last:
            take += 1
    return take


def _written(parts: list[Part]) -> dict[bytes, int]:
    """Requests entry id -> when it was written (µs, its `t` field), for those that have it."""
    return {
        entry_id: int(t)
        for _, _, entries in parts
        for entry_id, fields in entries
        if (t := fields.get(WRITTEN)) and t.isdigit()
    }


def _locate(pending: list[tuple[bytes, int, Items]], index: int) -> tuple[bytes, Items, int] | None:
    """(stream, items, position in items) of item `index` of a call over `pending`, counted
    over every part in order; None when the index names no item."""
    if index < 0:
        return None
    for stream, _, items in pending:
        if index < len(items):
            return stream, items, index
        index -= len(items)
    return None


async def serve(
    settings: Settings,
    config: AdmissionConfig,
    stop: asyncio.Event,
) -> None:
    """Run one admission process until `stop` is set."""
    await serve_service(lambda redis: Admission(redis, settings, config), settings, stop)
