"""The skeleton ingress, admission and the executor run on.

A service starts (pins the shard count, creates the consumer groups, loads the scripts, then its
own `prepare`), says it is ready, runs its periodic tasks beside its main loop until `stop` is
set, and stops them. It also gives the three steps every stream consumer here shares: take over
entries a dead consumer left pending (XAUTOCLAIM), recover after a failed batch (re-read own
pending entries, heal lost groups, pause), and mark itself healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import multiprocessing.util
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MaxClientsReachedError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede import __version__, aio, codec, metrics, tracing
from supersede.config import (
    DEFAULT_METRICS_HOST,
    UNVERIFIED_TLS,
    Settings,
    check_server,
    check_shard_count,
    connect,
    eviction_policy,
    memory_state,
    pin_shard_count,
    redact,
    refusal,
    server_time_read,
    unverified_tls,
)
from supersede.errors import ConfigError, describe
from supersede.health import SILENT_AFTER, ShardHealth
from supersede.lane import Lane, lane_of
from supersede.logs import Sampled, kind_of
from supersede.protocol import Entry
from supersede.scripts import Scripts
from supersede.streams import (
    OWN_LISTED,
    GroupSpec,
    OwnPending,
    after_failure,
    consumer_name,
    create_groups,
    failed_over,
    group_gone,
)

Periodic = tuple[float, Callable[[], Awaitable[None]]]
"""(interval in seconds, task): run every interval; one failed run is logged, never fatal."""
# A call the server did not answer (down, failing over, or this process was paused): logged
# in one line, as its traceback adds nothing.
UNANSWERED = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)
# A server that cannot take a service's start yet: full (maxmemory, maxclients), loading,
# failing over. The start is tried again, one line per REPEAT_EVERY (it exited 1 with a
# traceback: admission, which frees memory, could not come back to a full server; a probe).
NOT_YET = (*UNANSWERED, BusyLoadingError, TryAgainError, ClusterDownError, ReadOnlyError,
           OutOfMemoryError)  # fmt: skip
START_RETRY_MAX = 5.0  # seconds between two tries of a start, at most
_NOT_YET_HINTS = (
    (OutOfMemoryError, "Redis is at its maxmemory: free memory or raise maxmemory"),
    (MaxClientsReachedError, "Redis has maxclients connections: raise maxclients (README, "
                             '"Connections")'),
    (ReadOnlyError, "SUPERSEDE_REDIS_URL names a replica, or a failover is under way"),
    (AuthenticationError, "the server refused SUPERSEDE_REDIS_URL's user or password: changed "
                          "or deleted while this process ran; restore it, or restart with the "
                          'new one (README, "Least-privilege users")'),
)  # fmt: skip
# Failures a setting or the operator fixes, said in one line with the fix (a traceback added
# nothing: a probe's replica demoted under running services)
_SAID_WITH_HINT = tuple(cls for cls, _ in _NOT_YET_HINTS)
NOGROUP_HINT = (
    "a stream or its consumer group was deleted (FLUSHALL, a restart without persistence, a "
    "failover to a replica that had not received it, or evicted: maxmemory-policy must be "
    "noeviction): its readers create it again"
)


FAILED_OVER_HINT = "the master became a replica (a failover): read again from the new master"
MOVING_HINT = (
    "the cluster redirected the call too many times: a slot is migrating (TRYAGAIN) or the "
    "cluster's layout is changing; tried again"
)


def error_fields(exc: BaseException) -> dict[str, str]:
    """A log line's fields for a failure said in one line: the error, and the fix when one is
    known (a server at its maxmemory: the executor's lines carried the raw OOM text alone)."""
    fields = {"error": describe(exc)}
    if fix := _hint(exc):
        fields["hint"] = fix
    return fields


def _hint(exc: BaseException) -> str | None:
    """The fix to name beside a failure said in one line; None: log its traceback."""
    if isinstance(exc, _SAID_WITH_HINT):
        return next(h for cls, h in _NOT_YET_HINTS if isinstance(exc, cls))
    if group_gone(exc):  # (a pipeline's says
        # "Command # 1 (XREADGROUP ...) of pipeline caused error: NOGROUP ...")
        return NOGROUP_HINT  # (healed by after_failure; its traceback said no more, a probe)
    if isinstance(exc, ClusterError) and "TTL exhausted" in str(exc):
        return MOVING_HINT  # (redis-py's words name no cause; a cluster probe's reshard)
    if failed_over(exc):
        return FAILED_OVER_HINT
    return "" if isinstance(exc, UNANSWERED) else None


PIN_EVERY = 5.0  # seconds between two looks for the namespace's pinned facts (keep_pinned)
# Seconds before a periodic task that the server did not answer is tried again, at most: a
# service is not ready until each of its tasks went through once, and one tried at its own
# interval (5 s for the trims) kept it not ready for 3-6 s after a link healed (a probe).
FAILED_TASK_RETRY = 0.5  # (doubled at each failure after, up to the interval)


class Throttle:
    """`due()` is true at most once per `every` seconds (first call included)."""

    __slots__ = ("_last", "every")

    def __init__(self, every: float) -> None:
        self.every = every
        self._last = -every

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


async def when_possible(
    call: Callable[[], Awaitable[None]], stop: asyncio.Event, log: logging.Logger, name: str
) -> bool:
    """`call()`, made again while the server cannot take it yet (NOT_YET), a warning line each
    REPEAT_EVERY naming the fix; False when `stop` came first."""
    pause, said = 0.5, Sampled()
    while True:
        try:
            await call()
            return True
        except NOT_YET as exc:
            repeats = said.due(kind_of(exc))
            if repeats is not None:
                hint = next((h for cls, h in _NOT_YET_HINTS if isinstance(exc, cls)), "")
                line = f"{name} cannot start yet; trying again: {describe(exc)}"
                log.warning(line + (f" ({hint})" if hint else ""), extra={"repeats": repeats})
        with contextlib.suppress(TimeoutError):
            await aio.wait_for(stop.wait(), pause)
            return False
        pause = min(pause * 2, START_RETRY_MAX)


CLOCK_READ_EVERY = 60.0  # seconds between two reads of the server's clock
CLOCK_WARN_MS = 2_000  # a host clock this far off the server's is logged (every 10 min)
# An offset within a read's error (half its round trip) plus this is taken as none: hosts kept
# by NTP, or one host, stamp with their own clocks (a 0.3 ms error read under a busy loop put
# a run's "ingress read" before its inbox entry's ms).
CLOCK_NOISE_MS = 1.0
CLOCK_TRIES = 3  # reads of the server's clock, the one of the shortest round trip kept


def evicting(policy: str) -> str:
    """The line for a server whose maxmemory-policy evicts keys."""
    return (
        f"Redis evicts keys when its memory is full (maxmemory-policy {policy}): run records, "
        "groups and streams can vanish without a trace, and their events with them; set "
        'maxmemory-policy noeviction (README, "What Redis holds")'
    )


_offset_ms = 0.0  # the server's clock minus this host's, as a ServerClock of this process read it


def server_now() -> float:
    """The server's clock now, in seconds, as far as this process tells (the last offset a
    ServerClock of it read; this host's clock until then). The points of a run's path and
    the hops' metrics are stamped with it: they are set against stream ids, the server's ms,
    and an executor an hour ahead added an hour to every run's wait for an executor."""
    return time.time() + _offset_ms / 1000


class ServerClock:
    """The server's clock as this process tells it: this host's plus an offset read with TIME
    now and then. Debounce timers, stream ids and the marks of records are the server's time:
    a service that compared them with its own clock fired timers as late as its clock was
    behind, or in a tight loop when ahead, and trimmed the control streams by its own age (a
    clock probe: a debounced run started 61 s after its 500 ms window). The offset is the
    process's (`server_now`): its services all use one server."""

    def __init__(self, log: logging.Logger) -> None:
        self.offset_ms = 0.0  # the server's clock minus this host's
        self._log = log
        self._due = Throttle(CLOCK_READ_EVERY)
        self._said = Throttle(600.0)

    async def refresh(self, redis: Redis) -> None:
        """Read the server's clock when CLOCK_READ_EVERY has passed (at once the first time)."""
        if not self._due.due():
            return
        global _offset_ms
        rtt_ms, offset_ms = math.inf, 0.0
        for _ in range(CLOCK_TRIES):
            sent = time.time()
            told = await server_time_read(redis)
            back = time.time()
            if told is None:  # (refused or unanswered: not this host's clock, the offset 0)
                continue
            if (back - sent) * 1000 < rtt_ms:  # (the server's time, mid-way through the call)
                rtt_ms, offset_ms = (back - sent) * 1000, (told - (sent + back) / 2) * 1000
            if rtt_ms < CLOCK_NOISE_MS:
                break
        if rtt_ms == math.inf:
            return  # (no read went through: the offset kept)
        if abs(offset_ms) <= rtt_ms / 2 + CLOCK_NOISE_MS:
            offset_ms = 0.0
        self.offset_ms = _offset_ms = offset_ms
        if abs(self.offset_ms) > CLOCK_WARN_MS and self._said.due():
            self._log.warning(
                f"this host's clock is {self.offset_ms / 1000:+.1f} s off the Redis server's "
                "(server minus host): supersede keeps time by the server's, but the logs of this "
                "process are off by as much; run NTP on both",
                extra={"offset_s": round(self.offset_ms / 1000, 3)},
            )

    def now_ms(self) -> float:
        """The server's clock now, in ms, as far as this process tells."""
        return time.time() * 1000 + self.offset_ms


class Service:
    """Base of the three services; subclasses give `name`, `main` and, when they have some,
    `prepare` and `periodic`."""

    name = "service"

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = settings.keys
        self.consumer = consumer or consumer_name(self.name)
        # entries a take-over claimed -> when it was done with them (monotonic; inf while it
        # handles them): claimed, they are this consumer's own pending entries too, and a sweep
        # of those read and handled them a second time; one whose read was answered before the
        # take-over's acknowledgement, after it, too (a review): see `taken`
        self.taking: dict[bytes, float] = {}
        self._heal_due = Throttle(HEAL_LAGS_EVERY)
        self._lanes: list[Lane] = []  # made by `run` and its loops, closed when it returns
        self._failures = Sampled()  # (the one-line failures of log_failure)
        self.scripts = Scripts(redis, self.keys)
        self.log = logging.getLogger(f"supersede.{self.name}")
        self.clock = ServerClock(self.log)
        self._policy_due = Throttle(CLOCK_READ_EVERY)  # (the eviction policy's look)
        self._policy_said = Throttle(600.0)
        self.ready = False
        self.tracer = tracing.setup(self.name)  # None unless OTEL_* variables ask for traces
        self._forget_due: Throttle | None = None
        metrics.PENDING_DELETED.labels(self.name)  # (at 0 from the start: a first rise counts)
        # (a cluster's hot calls, per node or shard, bounded: a silent master holds only its own
        # shards' work; the subclass may shorten the deadline)
        self.health = ShardHealth(
            redis, lambda s: self.keys.shard(s).runs_hash, enabled=isinstance(redis, RedisCluster),
            deadline=SILENT_AFTER, service=self.name, shards=self.keys.shards,
        )  # fmt: skip

    async def forget_gone_consumers(
        self, groups: Sequence[GroupSpec], idle_ms: int, counter: Counter
    ) -> None:
        """From a trim: delete the consumers of `groups` with nothing pending that were idle
        for `idle_ms` (0: never), those of processes that are gone; at most once a minute (or
        every half of `idle_ms` when that is shorter). `counter`: the service's metric."""
        if not idle_ms:
            return
        if self._forget_due is None:
            self._forget_due = Throttle(min(60.0, idle_ms / 2000))
        if self._forget_due.due():
            gone = await self.scripts.forget_consumers(groups, idle_ms=idle_ms)
            if gone:
                counter.inc(gone)

    def lane(self) -> Lane | None:
        """A connection of its own for hot calls (the script calls; a blocking read), closed
        when the service stops; None where redis-py's client must make them (a cluster)."""
        lane = lane_of(self.redis)
        if lane is not None:
            self._lanes.append(lane)
        return lane

    # -- what a service gives ---------------------------------------------------------------------
    def groups(self) -> Sequence[GroupSpec]:
        """The consumer groups this service reads (created at start, recreated when lost);
        only these, so its ACL user needs no right on the streams of another role."""
        return ()

    async def prepare(self) -> None:
        """Service-specific start-up, after groups and scripts exist."""

    def periodic(self) -> Sequence[Periodic]:
        """Timer tasks run beside the main loop."""
        return ()

    async def keep_pinned(self) -> None:
        """Store the shard count again if the server lost it (restarted empty): the CLI reads
        the namespace with it, and found no run without it until a service restarted. Another
        count stored meanwhile (a process started with another SUPERSEDE_SHARDS won the race)
        is an error: not ready, logged, as at start."""
        stored = await self.redis.hget(self.keys.config_hash, "shards")
        if stored is None:
            await self.redis.hsetnx(self.keys.config_hash, "shards", str(self.keys.shards))
        await check_shard_count(self.redis, self.keys)
        await self.clock.refresh(self.redis)  # (read once a minute)
        if self._policy_due.due():  # (set at runtime, it was never said: a probe)
            policy, used = await memory_state(self.redis)
            metrics.REDIS_EVICTS.labels(self.name).set(1 if policy else 0)
            if used is not None:
                metrics.REDIS_MEMORY_USED.labels(self.name).set(used)
            if policy and self._policy_said.due():
                self.log.error(evicting(policy), extra={"redis": redact(self.settings.redis_url)})

    async def main(self, stop: asyncio.Event) -> None:
        """The main loop; returns once `stop` is set and its work in flight is done."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the deployment, create groups, load scripts, prepare; then ready."""
        await pin_shard_count(self.redis, self.keys)
        await self.clock.refresh(self.redis)  # (before the first stamps: see server_now)
        await create_groups(self.redis, self.groups())
        await self.scripts.load()
        if self.scripts.lane is not None:  # (connected now, not by the first hot call: a run's
            # lease counts from when its claim call was sent, a handshake included)
            with contextlib.suppress(RedisError):
                await self.scripts.lane.execute("PING")
        await self.prepare()
        self.ready = True
        metrics.stopping(self.name, False)
        metrics.set_ready(True, self.name)

    async def run(self, stop: asyncio.Event) -> None:
        self.scripts.lane = self.lane()
        try:
            await self._run(stop)
        finally:
            self.health.close()
            await asyncio.gather(*(lane.aclose() for lane in self._lanes))
            self._lanes.clear()
            self.scripts.lane = None

    async def _start_when_possible(self, stop: asyncio.Event) -> bool:
        """`start()`, tried again while the server cannot take it yet (NOT_YET); False when
        `stop` came first."""
        return await when_possible(self.start, stop, self.log, self.name)

    async def _run(self, stop: asyncio.Event) -> None:
        if not await self._start_when_possible(stop):
            return
        extra = {"consumer": self.consumer, "redis": redact(self.settings.redis_url),
                 "namespace": self.keys.namespace, "shards": self.keys.shards,
                 "version": __version__}  # fmt: skip
        self.log.info(f"{self.name} started", extra=extra)
        periodic = [*self.periodic(), (PIN_EVERY, self.keep_pinned)]
        for _, job in periodic:  # (at 0 from the start: increase() sees a first failure)
            metrics.TASK_FAILURES.labels(self.name, job.__name__)
        timers = [asyncio.create_task(self._every(stop, *p)) for p in periodic]
        timers.append(asyncio.create_task(self._not_ready_once(stop)))
        try:
            await self.main(stop)
        finally:
            metrics.stopping(self.name)
            for task in timers:
                task.cancel()
            await asyncio.gather(*timers, return_exceptions=True)
            tracing.flush()
            self.log.info(f"{self.name} stopped", extra={"consumer": self.consumer})

    async def _not_ready_once(self, stop: asyncio.Event) -> None:
        """Not ready from the moment the service is told to stop, while it drains."""
        await stop.wait()
        metrics.stopping(self.name)

    async def _every(
        self, stop: asyncio.Event, interval: float, task: Callable[[], Awaitable[None]]
    ) -> None:
        name = task.__name__
        soon = FAILED_TASK_RETRY  # (after a failure the server did not answer, doubled each time)
        while not stop.is_set():
            wait = interval
            try:
                await task()
                metrics.report(self.name, name, True)
                soon = FAILED_TASK_RETRY
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # (not ready until it goes through: a reaper failing is
                # an outage; not one that a silent master failed, which its shards' alert says:
                # a cluster's admission that admitted on the other shards read as down, a probe)
                metrics.TASK_FAILURES.labels(self.name, name).inc()
                lowered = not (self.health.silent and isinstance(exc, UNANSWERED))
                if lowered:
                    metrics.report(self.name, name, False)
                self.log_failure("periodic task failed", exc, task=name)
                # (sooner while it keeps the service not ready; not a refusal of the user, a
                # bug: at its interval, as every failure while a silent shard explains it)
                if (
                    lowered
                    and isinstance(exc, NOT_YET)
                    and not isinstance(exc, AuthenticationError)
                ):
                    wait, soon = min(interval, soon), min(interval, soon * 2)
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(stop.wait(), wait)

    # -- steps every stream consumer shares -------------------------------------------------------
    def healthy(self, reader: str = "read") -> None:
        """A batch of `reader` went through: ready again, unless another reader or a periodic
        task still fails."""
        metrics.report(self.name, reader, True)

    def log_failure(self, message: str, exc: BaseException | None, **extra: str) -> None:
        """Log a failed call: with its traceback, or, for a right the ACL user lacks (or a
        cluster node reached without the cluster scheme), the one line that names the fix.
        One line, repeated, is written once per REPEAT_EVERY with `repeats` (as the traceback
        lines are by the log filter: a 30 s outage wrote 650 lines, a probe)."""
        refused = exc and refusal(exc, self.settings.redis_url, (self.name,))
        hint = None if exc is None else _hint(exc)
        if exc is not None and (refused or hint is not None):  # (an outage, a failover, a
            # resume from SIGSTOP: the traceback says no more than its last line)
            hint = hint or ""
            line = f"{message}: {refused or describe(exc)}" + (f" ({hint})" if hint else "")
            kind = f"{message}: {refused or kind_of(exc)} {sorted(extra.items())}"
            repeats = self._failures.due(kind)
            if repeats is not None:
                self.log.error(line, extra={**extra, "repeats": repeats})
        else:
            self.log.error(message, exc_info=exc, extra=extra)

    async def recover(
        self,
        own: OwnPending,
        exc: BaseException,
        *,
        failed_reread: bool,
        what: str = "batch",
        reader: str = "read",
    ) -> None:
        """After a failed batch of `reader`: not ready, log, re-read own pending entries soon,
        heal lost groups, pause. `failed_reread`: the failed batch was itself a re-read."""
        metrics.report(self.name, reader, False)
        self.log_failure(f"{what} failed; retrying", exc)
        await after_failure(self.redis, self.groups(), own, exc, failed_reread=failed_reread)

    def pending_deleted(self, stream: str | bytes, group: str, ids: list[bytes]) -> None:
        """Entries a process read and never acknowledged, deleted before it (on a re-read of its
        own) or another (a take-over) handled them: only acknowledged ones are trimmed by
        supersede, so another client deleted them."""
        metrics.PENDING_DELETED.labels(self.name).inc(len(ids))
        self.log.error(
            "pending entries were deleted before they were handled, by something other than "
            "supersede (an XADD with MAXLEN or MINID, XTRIM or XDEL on the stream): they are "
            "lost; publish with XADD <stream> * and no trim option",
            extra={"stream": codec.text(stream), "group": group, "entries": len(ids),
                   "ids": [codec.text(i) for i in ids[:10]]},
        )  # fmt: skip

    async def take_over(
        self,
        stream: str | bytes,
        group: str,
        idle_ms: int,
        count: int,
        handle: Callable[[list[Entry]], Awaitable[None]],
        claim: Claimer | None = None,
    ) -> int:
        """XAUTOCLAIM every entry of `stream` idle for `idle_ms` in another consumer of `group`
        (a process that died mid-batch), page by page, and handle each page; returns how many.
        This process's own entries are left to it (XAUTOCLAIM takes them too: a read routed, or
        a batch applied, for longer than `idle_ms`, under load, was handled twice at once; one
        read ahead while a slow batch was applied, likewise): the same round trip lists them
        first, those idle for a little less too (its own pending entries are read again by
        OwnPending after a failure; a take-over is for the dead). `claim(start)`: a page another
        way, as (next start id, entries, ids of pending entries no longer in the stream)."""
        start: str | bytes = "0-0"
        taken = 0
        claim = claim or functools.partial(self._autoclaim, stream, group, idle_ms, count)
        while True:
            after, entries, deleted = await claim(start)
            if deleted:  # (Redis 7: pending entries no longer in the stream)
                self.pending_deleted(stream, group, deleted)
            if entries:
                taken += len(entries)
                self.taking.update((e[0], math.inf) for e in entries)
                try:
                    await handle(entries)
                finally:
                    now = time.monotonic()
                    self.taking.update((e[0], now) for e in entries)
                    for entry_id in [i for i, t in self.taking.items() if t < now - TAKEN_HOLD]:
                        del self.taking[entry_id]
            if after in (b"0-0", "0-0"):
                return taken
            start = after

    async def heal_lags(self, suspects: Sequence[tuple[str | bytes, str]]) -> None:
        """Set right, at most once per HEAL_LAGS_EVERY and HEAL_LAGS_MOST streams, the lag
        Redis reports for each (stream, group) of `suspects` (a lag it said was not 0) whose
        group has read its stream to the end (lua/heal_lag.lua). Refused (a role from before
        it, without xgroup|setid): said once in a while; the gauges stay capped by XLEN."""
        if not suspects or not self._heal_due.due():
            return
        healed: dict[str, int] = {}
        for stream, group in suspects[:HEAL_LAGS_MOST]:
            try:
                lag = await self.scripts.heal_lag(stream, group)
            except (NoPermissionError, ResponseError) as exc:  # (a refused command inside
                # the script is a ResponseError: "The user executing the script can't run...")
                if self._failures.due("heal_lag") is not None:
                    self.log.warning(
                        "the lags Redis reports are not checked (Redis before 7.2.4 may keep "
                        "them wrong after a restart from its AOF): the ACL user lacks "
                        "xinfo|stream, xgroup|setid or xrange; apply the roles again "
                        "(supersede acl --apply)",
                        extra={"stream": codec.text(stream), "error": describe(exc)},
                    )
                break
            if lag:
                healed[f"{codec.text(stream)} {group}"] = lag
        if healed:  # (one line for them all: a restart's wrong lags were a line per stream)
            self.log.warning(
                "consumer groups' lags were wrong (Redis before 7.2.4 after a restart from its "
                "AOF): set right",
                extra={"streams": len(healed), "said": dict(list(healed.items())[:10])},
            )

    def taken(self, entry_id: bytes) -> bool:
        """Whether a take-over of this process handles `entry_id`, or did within TAKEN_HOLD
        seconds: a sweep of its own pending entries leaves it (handled, it is acknowledged; a
        take-over that failed leaves it pending, for the sweeps after)."""
        return self.taking.get(entry_id, -math.inf) >= time.monotonic() - TAKEN_HOLD

    async def _autoclaim(
        self, stream: str | bytes, group: str, idle_ms: int, count: int, start: str | bytes
    ) -> tuple[bytes, list[Entry], list[bytes]]:
        """A page of `take_over`: its own entries listed and XAUTOCLAIM, in one round trip."""
        margin = min(1000, idle_ms // 2)  # (an entry of its own idle past `idle_ms` meanwhile)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xpending_range(stream, group, start, "+", count + OWN_LISTED,
                                consumername=self.consumer, idle=idle_ms - margin)  # fmt: skip
            pipe.xautoclaim(stream, group, self.consumer, idle_ms, start_id=start, count=count)
            listed, reply = await pipe.execute()
        mine = {p["message_id"] for p in listed}
        entries = [e for e in reply[1] if e and e[1] and e[0] not in mine]
        return reply[0], entries, (reply[2] if len(reply) > 2 else [])


TAKEN_HOLD = 10.0  # seconds a sweep leaves the entries a take-over handled (see Service.taken)
HEAL_LAGS_EVERY = 60.0  # seconds between two looks for wrong lags (Service.heal_lags)
HEAL_LAGS_MOST = 100  # streams looked at in one

Claimer = Callable[[str | bytes], Awaitable[tuple[bytes, list[Entry], list[bytes]]]]
"""A page of a take-over from a start id: (next start id, entries, ids no longer in the stream)."""


# The ACL role whose rights a service process needs, where it is not the service's name.
SERVICE_ROLES = {"all-in-one": ("serve",)}


def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[None]],
    metrics_port: int,
    metrics_host: str = DEFAULT_METRICS_HOST,
    *,
    service: str = "service",
) -> None:
    """A service process (placed by `place_process` before the command imported anything):
    set up tracing (a bad OTEL_* setting is refused before the metrics port or the server are
    touched), serve /metrics, /healthz and /readyz on `metrics_port` (0: none), run main(stop),
    and set `stop` on SIGTERM or SIGINT so the service drains and exits 0."""
    tracing.setup(service)
    metrics.serve(metrics_port, metrics_host)

    async def until_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await main(stop)
        except RedisError as exc:  # (at start-up: later ones are retried by the loops)
            roles = SERVICE_ROLES.get(service, (service,))
            refused = refusal(exc, Settings.from_env().redis_url, roles)
            if refused is None:
                raise
            raise refused from None
        await _end_leftover_tasks(service)

    tune_gc()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            runner.run(until_signal())
        except RuntimeError as exc:  # (a traceback of asyncio's frames said nothing of why)
            if "Event loop stopped before Future completed" not in str(exc):
                raise
            logging.getLogger(f"supersede.{service}").error(
                "the event loop was stopped under the service (an async step calling "
                "loop.stop()? give such code isolation='process'): exiting; its runs are "
                "retried once their leases lapse"
            )
            _exit_now(1)  # (not past the runner's close: it waits for every task, stuck too)
    exit_past_stuck_threads(service)


# The names of the threads the executor runs sync steps and hooks on (see below).
STEP_THREAD_PREFIX = "supersede-step"


def exit_past_stuck_threads(service: str) -> None:
    """The service stopped; a thread of the executor's step pool still running user code (a
    sync step that never returns, past the drain deadline), or any other thread Python joins
    at exit (one a step started and left running: a probe's executor never exited), would
    hold the process until it returned: the logs and spans are flushed, and the process ends
    now (exit 0, as a drained stop). A stuck step's run is another executor's once its lease
    lapses. Daemon threads, and the workers of a library's thread pool (which Python's exit
    tells to end before it joins them, its atexit hooks run), are left to Python's usual
    exit."""
    from concurrent.futures.thread import _worker as pool_worker

    main = threading.main_thread()
    stuck = [t for t in threading.enumerate() if t is not main and t.is_alive() and (
        t.name.startswith(STEP_THREAD_PREFIX)
        or (not t.daemon and getattr(t, "_target", None) is not pool_worker))]  # fmt: skip
    deadline = time.monotonic() + 1.0  # (idle pool threads are on their way out)
    for t in stuck:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in stuck if t.is_alive()]
    if not stuck:
        return
    logging.getLogger(f"supersede.{service}").warning(
        "exiting with threads still running (a sync step past the drain deadline, an "
        "on_cancel hook, or a thread a step started)",
        extra={"threads": len(stuck), "names": sorted(t.name for t in stuck)[:10]},
    )
    _exit_now()


LEFTOVER_TASKS_WITHIN = 2.0  # seconds the tasks left once a service stopped have to end


async def _end_leftover_tasks(service: str) -> None:
    """The service stopped: tasks it left running (a cancel a library swallowed, as
    redis-py's client may; an async step that swallows every one) are cancelled again every
    0.1 s for LEFTOVER_TASKS_WITHIN; those that still run end the process now (exit 0, as a
    drained stop), since asyncio's own cancel at exit, once each, would wait for them for
    good. A run such a task held is another executor's once its lease lapses."""
    me = asyncio.current_task()
    left = {t for t in asyncio.all_tasks() if t is not me}
    pending = await aio.cancel_until_done(left, LEFTOVER_TASKS_WITHIN)
    if pending:
        logging.getLogger(f"supersede.{service}").warning(
            "exiting with tasks that would not stop (a cancel swallowed)",
            extra={"tasks": len(pending), "names": sorted(t.get_name() for t in pending)[:10]},
        )
        _exit_now()


def _exit_now(code: int = 0) -> None:
    """Flush the logs and spans and end the process, exit `code` (see exit_past_stuck_threads)."""
    tracing.shutdown()
    logging.shutdown()
    with contextlib.suppress(Exception):
        # (os._exit skips the finalizers that unlink the worker processes' semaphores: the
        # resource tracker would find them and print a warning of its own into the logs)
        run_finalizers = getattr(multiprocessing.util, "_run_finalizers", None)
        if run_finalizers is not None:
            run_finalizers(0)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


MAX_CPU = 1 << 16  # (a range past it is a typo, and would be a set of that many numbers)


def place_process(*, apply: bool = True) -> None:
    """SUPERSEDE_NICE (the process's niceness, -20 to 19), SUPERSEDE_CPUS (the CPUs it may
    run on, as `0,2` or `0-3`) and SUPERSEDE_CPU_LATENCY_US (see `hold_cpu_latency`), when
    set: how an operator puts the services that carry the latency ahead of other work on a
    shared host, or keeps idle CPUs ready for the next event. Applied to the calling thread, so
    a service command calls it first, before any module it imports can start a thread (threads
    started later inherit the first two). A value that cannot be applied is refused with one
    line naming the setting; `apply=False` only checks (`supersede dev`, whose services apply
    them)."""
    latency = os.environ.get("SUPERSEDE_CPU_LATENCY_US", "").strip()
    if latency:
        hold_cpu_latency(latency, apply=apply)
    nice = os.environ.get("SUPERSEDE_NICE", "").strip()
    if nice:
        try:
            value = int(nice)
        except ValueError:
            raise ConfigError(f"SUPERSEDE_NICE must be an integer, not {nice!r}") from None
        if not -20 <= value <= 19:
            raise ConfigError(f"SUPERSEDE_NICE must be from -20 to 19, not {value}")
        if not hasattr(os, "setpriority"):
            raise ConfigError("SUPERSEDE_NICE is not supported on this platform")
        if apply:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, value)
            except PermissionError:
                current = os.getpriority(os.PRIO_PROCESS, 0)
                raise ConfigError(
                    f"SUPERSEDE_NICE={value}: a niceness below the current one ({current}) "
                    "needs CAP_SYS_NICE or a RLIMIT_NICE that allows it (ulimit -e)"
                ) from None
    cpus = os.environ.get("SUPERSEDE_CPUS", "").strip()
    if cpus:
        wanted = parse_cpus(cpus)
        if not hasattr(os, "sched_setaffinity"):
            raise ConfigError("SUPERSEDE_CPUS is not supported on this platform")
        allowed = os.sched_getaffinity(0)
        if not wanted <= allowed:
            raise ConfigError(
                f"SUPERSEDE_CPUS={cpus}: CPUs {cpu_list(wanted - allowed)} are not available "
                f"to this process (it may use {cpu_list(allowed)})"
            )
        if apply:
            os.sched_setaffinity(0, wanted)


CPU_LATENCY_DEVICE = "/dev/cpu_dma_latency"
MAX_CPU_LATENCY_US = 2_000_000_000  # (the device takes a signed 32-bit value)
_cpu_latency_requests: list[int] = []  # open PM QoS requests: each lasts while its fd is open


def hold_cpu_latency(text: str, *, apply: bool = True) -> None:
    """SUPERSEDE_CPU_LATENCY_US: while this process runs, no CPU of the host enters an idle
    state whose wake-up takes longer than this many µs (Linux PM QoS: the value written to
    /dev/cpu_dma_latency holds as long as the file stays open, and the process exit closes
    it). A deep idle state flushes the core's caches, and at a few hundred events a second a
    core sleeps between events: on the development machine an event's path through a service
    took 7 µs with the core awake and 70-120 µs after 5 ms of sleep, and 0 cut the start latency
    at low rates by up to half on the hours the CPUs slept deep (docs/benchmarks.md, "CPU idle
    states"). The cost: idle CPUs poll instead of sleeping (power, and a VM's host sees them
    busy). Needs write access to the device (root; in a container, a privileged one); a host
    profile such as tuned's `latency-performance` does the same for every process of the
    host."""
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(
            f"SUPERSEDE_CPU_LATENCY_US must be an integer number of µs, not {text!r}"
        ) from None
    if not 0 <= value <= MAX_CPU_LATENCY_US:
        raise ConfigError(
            f"SUPERSEDE_CPU_LATENCY_US must be from 0 to {MAX_CPU_LATENCY_US}, not {value}"
        )
    if not apply:  # (`dev`: its services hold it; refused now in one line if they could not)
        os.close(open_cpu_latency_device(value))
        return
    _cpu_latency_requests.append(request_cpu_latency(value))


def request_cpu_latency(value: int) -> int:
    """A PM QoS request for `value` µs: the device's fd, which holds it until closed."""
    fd = open_cpu_latency_device(value)
    try:
        os.write(fd, struct.pack("=i", value))
    except OSError as exc:
        os.close(fd)
        raise ConfigError(
            f"SUPERSEDE_CPU_LATENCY_US={value}: {CPU_LATENCY_DEVICE} refused it ({exc.strerror})"
        ) from None
    return fd


def open_cpu_latency_device(value: int) -> int:
    """The device opened for writing (opening alone asks nothing of the CPUs: a request holds
    the default until a value is written), or one line that says why it cannot be."""
    try:
        return os.open(CPU_LATENCY_DEVICE, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"SUPERSEDE_CPU_LATENCY_US={value}: there is no {CPU_LATENCY_DEVICE} here (Linux "
            "PM QoS; a container needs the device passed in); unset it"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"SUPERSEDE_CPU_LATENCY_US={value}: {CPU_LATENCY_DEVICE} is not writable by this "
            "process (it needs root, or a privileged container); unset it, or tune the host "
            "instead (e.g. tuned's latency-performance profile)"
        ) from None
    except OSError as exc:  # (a read-only mount, say)
        raise ConfigError(
            f"SUPERSEDE_CPU_LATENCY_US={value}: {CPU_LATENCY_DEVICE} cannot be opened for "
            f"writing ({exc.strerror}); unset it"
        ) from None


def parse_cpus(text: str) -> set[int]:
    """`0,2` or `0-3` or both (`0-1,4`): the set of CPU numbers; ConfigError otherwise."""
    out: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)  # ("0-": no range)
        except ValueError:
            raise ConfigError(
                f"SUPERSEDE_CPUS must list CPU numbers and ranges such as 0,2 or 0-3, not {text!r}"
            ) from None
        if hi < lo or hi >= MAX_CPU:
            raise ConfigError(f"SUPERSEDE_CPUS: {part.strip()!r} is not a range of CPU numbers")
        out.update(range(lo, hi + 1))
    return out


def cpu_list(cpus: set[int]) -> str:
    """`{0, 1, 2, 5}` as `0-2,5`."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


GC_THRESHOLD0 = 10_000  # allocations between two collections of the youngest generation


def tune_gc() -> None:
    """Fewer cyclic-GC passes for a service process: everything loaded so far (modules, the
    user's workflows) is frozen out of the collector's scans, and the youngest generation is
    collected every 10,000 net allocations instead of 700. Each run allocates a task, futures
    and dicts, so the default collected every few runs; GC callbacks timed 0.1 to 0.3 s of
    collections per process over 42,000 no-op runs before, 0.003 to 0.05 s after (bench.cpu_split;
    about 5% of each service's CPU). Garbage from start-up is collected first, so none of it is
    frozen for the life of the process."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, gen1, gen2)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (a dependency where it builds), unless
    SUPERSEDE_EVENT_LOOP=asyncio asks for the standard one; None: the standard one."""
    choice = os.environ.get("SUPERSEDE_EVENT_LOOP", "").strip().lower() or "uvloop"
    if choice not in ("uvloop", "asyncio"):
        raise ConfigError(f"SUPERSEDE_EVENT_LOOP must be uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


_EVICTION_SAID: list[str] = []  # the evicting policy a service of this process logged


async def serve(
    make: Callable[[Redis], Service],
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """Connect, run the service `make` builds until `stop` is set, close the connection."""
    redis = connect(settings.redis_url, wait=False)  # (its hot calls have deadlines)
    try:
        log = logging.getLogger("supersede")
        if not await when_possible(lambda: check_server(redis, settings.redis_url), stop, log,
                                   "this process"):  # fmt: skip
            return  # (a server loading its data, or at maxclients: not yet; stopped meanwhile)
        policy = await eviction_policy(redis)
        if policy is not None and not _EVICTION_SAID:  # (BullMQ's: managed servers use LRUs)
            _EVICTION_SAID.append(policy)  # (once a process: `serve`'s three parts)
            logging.getLogger("supersede").error(
                evicting(policy), extra={"redis": redact(settings.redis_url)}
            )
        if unverified_tls(settings.redis_url):
            logging.getLogger("supersede").warning(UNVERIFIED_TLS)
        await make(redis).run(stop)
    finally:
        await redis.aclose()
