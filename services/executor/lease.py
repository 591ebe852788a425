"""Lease renewal on a thread of its own, with its own connection, so it goes on while user code
blocks the event loop (a CPU-bound async step, a long sync call made on the loop): otherwise
every lease of this executor would lapse and its runs be retried elsewhere while they still run.
Not while a call into C holds the GIL for seconds (`sum(range(10**9))`, a C extension that does
not release it): that starves this thread too; such steps belong in `isolation="process"`.

Each sixth of a lease (BEATS_PER_LEASE), counted from the start of the previous beat (a slow
beat does not push the next one later; a failed one is tried again a quarter of that after it),
the thread renews
the leases of the runs `Runner.leased()` lists and hands the runs the heartbeat script names
back to the loop (`call_soon_threadsafe`), where they are let go or stopped. A sync step sees
its cancel flag set at once from this thread. Runs whose results this executor applied itself
are not asked about one by one: the turn key each finish call sets (see outbox.FinishHere)
confirms a whole turn with one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, cast

import redis as redis_sync
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede.config import connect_sync
from supersede.errors import describe
from supersede.keys import Keys
from supersede.logs import Sampled
from supersede.metrics import report
from supersede.scripts import HandBackResult, hand_back_call, load_source
from supersede.service import error_fields
from supersede.services.executor import metrics
from supersede.services.executor.config import ExecutorConfig
from supersede.services.executor.steps import Runner

log = logging.getLogger("supersede.executor")
# One heartbeat call: its keys, its arguments, and the runs (run id, attempt) it renews.
_Call = tuple[list[str], list[str | int], list[tuple[str, int]]]
_TURNS_NOT_READ = Sampled()
_PARTLY_RENEWED = Sampled()
_BEAT_FAILED = Sampled()  # "lease renewal failed" lines of a server that did not answer
_SLOTS_NOT_READ = Sampled()

CHUNK = 1000  # runs per script call (a call blocks the server meanwhile)
# Beats per lease. A stall (of the server, its cluster master, or this process) that begins
# just before a beat is bridged when a renewal is answered before the watch's deadline, 0.9 of
# a lease after the last renewal was sent: a stall of up to 0.9 - 1/BEATS_PER_LEASE of the
# lease, less the failed calls' retry, stops no run. At three beats a lease that was 0.57 of
# it (a probe: a server stalled 0.6 to 0.85 of a lease re-ran 44 of 195 runs; 11 at six).
# Each beat is one call per shard (one round trip), whatever its runs, so six cost little.
BEATS_PER_LEASE = 6
CALL_TIMEOUT_MIN = 0.5  # seconds: the least a call of the lease keeper waits for its answer
# A run this executor could not renew is stopped this share of a lease before its lease runs
# out by the executor's clock (from when the last call that renewed it, or claimed it, was sent,
# which is before the server stamped it), so it no longer runs when the reaper retries it.
LAPSE_MARGIN = 0.1
LAPSE_LOOK_EVERY = 0.1  # seconds between two looks for such runs
READY_PART = "executor"  # the part of the process /readyz reports (the service's name)


# errors of a call sent to a master's own connection that the cluster client handles (it
# follows the redirection, waits, or reads the cluster's slots again)
_REDIRECTED = (MovedError, AskError, TryAgainError)
# (a master that does not answer, or a cluster that says it is down: read the slots again)
_UNANSWERED = (ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError,
               ClusterDownError)  # fmt: skip
# A renewal that failed this way is one sampled line (a full server: a traceback each beat)
_SAID_IN_ONE_LINE = (*_UNANSWERED, OutOfMemoryError)


class _ByNode:
    """A cluster's calls of one beat: a pipeline per master, all at once on threads of their
    own, the beat waiting `wait` seconds at most for them. A master that does not answer holds
    only its own calls (one cluster pipeline waited for it, then tried each of its commands
    again on a new connection, a call deadline each: the first beats after a master froze took
    4-10 s in a probe, and the watch stopped healthy runs), and is not asked again while a call
    to it still waits. A master whose last call went unanswered is still asked, but not waited
    for: each beat would otherwise wait a call deadline for it twice (turn keys, renewals), too
    long at a short lease; its answer counts once it comes (`late`). An `optional` call (the
    turn keys' read) is not sent to a master in doubt, and never holds one: it held the
    master's one call for the next beat's renewal, refused then, so a master slow for a
    second, a third of a lease, had two beats renew nothing and the watch stop every run on it,
    run again elsewhere (a chaos run: 13 runs started twice)."""

    def __init__(self, client: redis_sync.RedisCluster, wait: float) -> None:
        self.client = client
        self.wait = wait
        # (two calls a master at most, one optional: 16 masters all silent leave room)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="lease-node")
        self.busy: dict[str, Future[list[Any]]] = {}  # master -> its last call
        self.reading: dict[str, Future[list[Any]]] = {}  # master -> its last optional call
        self.suspect: set[str] = set()  # masters whose last call went unanswered
        self._refresh: Future[None] | None = None

    def run(
        self,
        keys: list[str],
        send: Callable[[Any, int], object],
        *,
        late: Callable[[int, Any], None] | None = None,
        optional: bool = False,
    ) -> list[Any]:
        """For each i, the reply of what `send(pipe, i)` queues on the pipeline of the master
        of `keys[i]`, or the error its master's call raised (TimeoutError: no answer in time).
        A call not answered in time that answers later gives `late(i, reply)` each reply."""
        out: list[Any] = [None] * len(keys)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, key in enumerate(keys):
            try:
                node = cast(Any, self.client).get_node_from_key(key)
            except Exception as exc:  # (a slot with no master known)
                out[i] = exc
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        calls: dict[str, Future[list[Any]]] = {}
        for name, (node, part) in groups.items():
            call = self._submit(name, node, part, send, optional, out)
            if call is not None:
                calls[name] = call
        waited = [call for name, call in calls.items() if name not in self.suspect]
        futures_wait(waited, timeout=self.wait)
        for name, call in calls.items():
            part = groups[name][1]
            done = call.done()  # (once: a call answered between two looks went both ways)
            if not done and late is not None:
                call.add_done_callback(functools.partial(_answered_late, part, late))
            error = call.exception() if done else TimeoutError(f"{name} did not answer")
            replies = [error] * len(part) if error is not None else call.result()
            unanswered = isinstance(error, _UNANSWERED)
            (self.suspect.add if unanswered else self.suspect.discard)(name)
            for i, reply in zip(part, replies, strict=True):
                out[i] = reply
        if self.suspect or any(isinstance(r, _UNANSWERED) for r in out):
            self._read_slots(min(self.suspect, default=None))
        return out

    def _submit(
        self,
        name: str,
        node: Any,
        part: list[int],
        send: Callable[[Any, int], object],
        optional: bool,
        out: list[Any],
    ) -> Future[list[Any]] | None:
        """The call to master `name` of the indexes `part`; None when not sent (each index's
        reason in `out`): a call to it still waits, or (`optional`) its last one went
        unanswered. Only a call not optional holds the master until it is answered."""
        previous = self.busy.get(name)
        if previous is not None and not previous.done():
            for i in part:
                out[i] = TimeoutError(f"{name} has not answered an earlier call")
            return None
        read = self.reading.get(name)
        if optional and read is not None and not read.done():
            for i in part:
                out[i] = TimeoutError(f"{name} has not answered an earlier read")
            return None
        if previous is not None and not isinstance(previous.exception(), _UNANSWERED):
            self.suspect.discard(name)  # (its last call was answered, late or not)
        if optional and name in self.suspect:
            for i in part:
                out[i] = TimeoutError(f"{name} did not answer its last call: not asked")
            return None
        try:
            call = self.pool.submit(self._pipeline, node, part, send)
        except RuntimeError as exc:  # (closed: the keeper stopped)
            for i in part:
                out[i] = exc
            return None
        (self.reading if optional else self.busy)[name] = call
        return call

    def _read_slots(self, unanswered: str | None) -> None:
        """A master did not answer: read the cluster's slots again, asking the others first
        (off the beat, one read at a time). Calls on a master's own connection never make the
        cluster client do it, and after a failover the beats would go to the old master for
        good (a review)."""
        if self._refresh is not None and not self._refresh.done():
            return
        with contextlib.suppress(RuntimeError):  # (closed: the keeper stopped)
            self._refresh = self.pool.submit(
                self.client.nodes_manager.initialize, last_failed_node_name=unanswered
            )
            self._refresh.add_done_callback(_say_unread)

    def _pipeline(
        self, node: Any, part: list[int], send: Callable[[Any, int], object]
    ) -> list[Any]:
        with self.client.get_redis_connection(node).pipeline(transaction=False) as pipe:
            for i in part:
                send(pipe, i)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _answered_late(part: list[int], late: Callable[[int, Any], None], call: Future[Any]) -> None:
    """A call `_ByNode.run` did not wait for, answered: each reply to `late` (none for a call
    that failed: its runs are renewed by a later beat, or stopped by the watch)."""
    if call.cancelled() or call.exception() is not None:
        return
    for i, reply in zip(part, call.result(), strict=True):
        try:
            late(i, reply)
        except Exception:  # (on the pool's thread: said, never raised into nothing)
            log.exception("a renewal answered late was not applied")


def _say_unread(refresh: Future[None]) -> None:
    """A failed read of the cluster's slots, said (once per 5 s)."""
    error = None if refresh.cancelled() else refresh.exception()
    if error is not None and (repeats := _SLOTS_NOT_READ.due(type(error).__name__)) is not None:
        log.warning("the cluster's slots not read again; the next beat tries",
                    extra={"error": describe(error), "repeats": repeats})  # fmt: skip


class LeaseKeeper:
    def __init__(
        self,
        url: str,
        keys: Keys,
        consumer: str,
        config: ExecutorConfig,
        runner: Runner,
        on_stop: Callable[[str, int], None],
        silent: Callable[[], Collection[int]] = frozenset,
    ) -> None:
        self.url = url
        # the shards whose cluster master the service found silent (its ShardHealth): a beat
        # that renewed none of its runs, all on those, is not a failed beat
        self.silent = silent
        self.keys = keys
        self.consumer = consumer
        self.config = config
        self.runner = runner
        self.on_stop = on_stop
        runner.mark_renewed(time.monotonic())  # (see Runner.lease_left)
        self._halt = threading.Event()
        self._beating = threading.Lock()
        self._applying = threading.Lock()  # (a beat's replies, and late ones from a pool thread)
        # (set: beat now, a run started whose claim was sent long before; see Runner.start)
        self._soon = threading.Event()
        runner.renew_soon = self._soon.set
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Its own pool, used from this thread and a drain's. Each call fails after a sixth of a
        # lease without an answer (half a second at least), tried again by the next beat, not
        # by the client: a cluster master that froze (SIGSTOP, a silent network) held the beat
        # until it answered again, and no run of any node was renewed (a probe: 20 s, the
        # client's retries and backoff included, at a 3 s lease).
        timeout = max(CALL_TIMEOUT_MIN, config.lease_ms / 6000)
        self._client = connect_sync(url, timeout=timeout)
        self._nodes = (
            _ByNode(self._client, timeout * 1.5)
            if isinstance(self._client, redis_sync.RedisCluster)
            else None
        )
        self._script = self._client.register_script(load_source("heartbeat")[0])
        self._hand_back = self._client.register_script(load_source("hand_back")[0])

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()
        # (a thread of its own: a renewal hung on a silent server must not delay it)
        self._watcher = threading.Thread(target=self._watch, name="lease-watch", daemon=True)
        self._watcher.start()

    async def stop(self, also: Awaitable[None] | None = None) -> None:
        """Stop renewing (after a drain); waits for the thread, and for `also` meanwhile (the
        drain's last hand-backs, made on this client), without blocking the loop; then closes
        the client."""
        self._halt.set()
        self._soon.set()  # (wakes the beat loop, which sees the halt)
        waits: list[Awaitable[Any]] = [] if also is None else [also]
        if self._thread is not None:  # (a beat hung on a silent server: 2 s at most)
            waits.append(asyncio.to_thread(self._thread.join, 2))
        if self._watcher is not None:
            waits.append(asyncio.to_thread(self._watcher.join, 1))
        await asyncio.gather(*waits)
        if self._nodes is not None:
            self._nodes.close()
        self._client.close()

    def _run(self) -> None:
        # (connected before the first runs: a beat stamps its runs from when it sent its calls,
        # and a connection made in the first beat with runs took most of a lease over a slow
        # link, so the watch stopped them before the reply came)
        with contextlib.suppress(Exception):  # (the first beat tries again)
            self._client.ping()
        interval = self.config.lease_ms / 1000 / BEATS_PER_LEASE
        retry = max(0.05, interval / 4)
        last_ok = time.monotonic()
        failing = False
        # Beats start a sixth of a lease apart, counted from each one's start: counted from its
        # end, two slow beats under a loaded CPU (10 to 16 shard calls of 30-150 ms each) left
        # a run's renewals most of a lease apart, and the watch stopped healthy runs at a 3 s
        # lease (a probe). A beat comes sooner when a run started whose claim was sent long
        # before (`_soon`, see Runner.start), and never within a quarter of the interval after
        # the previous one ended, so a slow server is not kept busy by the renewals.
        due, earliest = last_ok + interval, last_ok
        while not self._halt.wait(max(0.0, earliest - time.monotonic())):
            self._soon.wait(max(0.0, due - time.monotonic()))
            if self._halt.is_set():
                break
            self._soon.clear()
            due = time.monotonic() + interval
            try:
                sent = self.beat()
                if not sent and failing:  # (no lease to renew says nothing of the server)
                    self._client.ping()
            except Exception as exc:  # the next beat tries again; a lease lasts six of them
                if isinstance(exc, _SAID_IN_ONE_LINE):  # (stalled, restarting, full)
                    repeats = _BEAT_FAILED.due(type(exc).__name__)
                    if repeats is not None:
                        log.warning("lease renewal failed; the next beat tries again",
                                    extra={**error_fields(exc), "repeats": repeats})  # fmt: skip
                else:
                    log.exception("lease renewal failed")
                if not failing:  # not ready: with every slot busy, no other call may notice
                    failing = True
                    report(READY_PART, "heartbeat", False)
                # Again a quarter interval after this one ended, not a whole interval after it
                # began: in an outage of half a lease two beats a whole interval apart could
                # both fail, and the third came as the leases ran out (a chaos run: a server
                # restart whose AOF took a second to load; the watch stopped 15 runs)
                due = time.monotonic() + retry
                continue
            finally:
                earliest = time.monotonic() + retry
            if failing:
                failing = False
                report(READY_PART, "heartbeat", True)
            now = time.monotonic()
            if sent and now - last_ok > self.config.lease_ms / 1000:  # (a beat with no lease
                # to renew is not late: it said so 2.8 s into a 5 s outage, a probe, once the
                # watch had stopped every run)
                # the process was starved (or the server unreachable) for longer than a lease:
                # the reaper may have retried this executor's runs elsewhere meanwhile
                metrics.HEARTBEATS_LATE.inc()
                late = {"late_s": round(now - last_ok, 3), "pid": os.getpid()}
                log.warning("heartbeat late: leases may have lapsed", extra=late)
            last_ok = now

    def _watch(self) -> None:
        """Stop the runs whose leases run out before a renewal went through (Runner.lapsing):
        the server refused the renewals (its maxmemory reached) or did not answer for about a
        lease. Marked here, so that neither a step that sees its flag nor the loop, however
        late it comes to them, takes it for the run's own cancel; their sync steps see
        `ctx.cancelled` at once, and the loop stops the rest (Runner.let_lapse)."""
        within = self.config.lease_ms / 1000 * (1 - LAPSE_MARGIN)
        while not self._halt.wait(LAPSE_LOOK_EVERY):
            runs = self.runner.lapsing(within)
            if not runs:
                continue
            for run in runs:
                run.lapsed = True  # (renewed no more)
                run.drained = True  # (not the run's own cancel: nothing is reported)
                run.ctx._flag.set()
            # (counted as marked: a run whose step returned before the loop came to stop it,
            # its time out during a freeze, was logged and not counted)
            metrics.LEASES_LAPSED.inc(len(runs))
            renewed = self.runner.renewed_at or 0.0
            log.warning(
                "leases not renewed in time: stopping runs before their leases lapse (they are "
                "retried elsewhere)",
                extra={
                    "runs": len(runs),
                    "renewed_s_ago": round(time.monotonic() - renewed, 3),
                    "pid": os.getpid(),
                    "run_ids": [r.run_id for r in runs][:20],
                },
            )
            if self._loop is not None and not self._halt.is_set():
                with contextlib.suppress(RuntimeError):  # (the loop closed: the process ends)
                    self._loop.call_soon_threadsafe(self.runner.let_lapse, runs)

    def hand_back(
        self, shard: int, runs: list[tuple[str, int]], assign_deadline_ms: int
    ) -> HandBackResult:
        """Hand back runs a drain stopped (lua/hand_back.lua), on this keeper's own client
        (blocking: the executor calls it from a daemon thread, which a silent server may hold
        past the drain without holding the process)."""
        keys, args = hand_back_call(self.keys, shard, self.consumer, runs,
                                    assign_deadline_ms=assign_deadline_ms)  # fmt: skip
        reply = self._hand_back(keys=keys, args=args)
        if not isinstance(reply, list) or int(reply[0]) != 0:
            raise RuntimeError(f"hand-back refused: {reply!r}"[:200])
        return HandBackResult.of(reply)

    def _snapshot(self) -> list[tuple[int, str, int, int]]:
        """The runs to renew, read from the loop's structures (retried if they changed under
        the read, which a loop that is not blocked can do)."""
        for _ in range(10):
            try:
                return self.runner.leased()
            except RuntimeError:  # dictionary changed size during iteration
                continue
        raise RuntimeError("the runs to renew changed under each of 10 reads")  # (no renewal)

    def beat(self) -> bool:
        """One heartbeat: renew, and hand back what the script names (blocking: call it from
        a thread, e.g. `asyncio.to_thread` while a drain waits for results to be applied).
        One at a time (the keeper's and a drain's). False when it had no lease to renew."""
        with self._beating:
            return self._beat()

    def _beat(self) -> bool:
        began = time.monotonic()
        snapshot = self._snapshot()
        confirmed = self._confirmed_turns(snapshot)
        by_shard: dict[int, dict[str, int]] = {}
        survived: list[tuple[str, int]] = []
        for shard, rid, attempt, turn in snapshot:
            first, last = confirmed.get(shard, (0, 0))
            if turn and first <= turn <= last:
                survived.append((rid, attempt))  # its finish call's writes are there
            else:
                by_shard.setdefault(shard, {})[rid] = attempt
        self._stop(survived)
        calls: list[_Call] = []
        for shard, sent in by_shard.items():
            sk = self.keys.shard(shard)
            items = list(sent.items())
            for i in range(0, len(items), CHUNK):
                args: list[str | int] = [0, self.consumer, self.config.lease_ms]
                for rid, attempt in items[i : i + CHUNK]:
                    args += (rid, attempt)
                calls.append(([sk.runs_hash, sk.leases_zset], args, items[i : i + CHUNK]))
        asked = time.monotonic()  # (before the server stamps the leases)
        failed: Exception | None = None
        unrenewed = 0  # runs of the calls that failed

        def late(i: int, reply: Any) -> None:  # (a master in doubt answered after the beat)
            if not isinstance(reply, Exception) and not self._halt.is_set():
                self._renewed(calls[i][2], reply, asked)

        for (_, _, runs), reply in zip(calls, self._renew(calls, late), strict=True):
            if isinstance(reply, Exception):  # (the other calls' runs are renewed still)
                failed = failed or reply
                unrenewed += len(runs)
                continue
            self._renewed(runs, reply, asked)
        if failed is not None:
            self._failed(failed, unrenewed, sum(len(runs) for _, _, runs in calls), set(by_shard))
        self.runner.mark_renewed(began)
        return bool(calls)

    def _renewed(self, runs: list[tuple[str, int]], reply: Any, asked: float) -> None:
        """Apply one heartbeat call's reply (sent at `asked`) to its runs: in the beat, or on
        a pool thread once a master in doubt answered (a lock: stamps only move forward)."""
        if not isinstance(reply, list) or int(reply[0]) != 0:
            log.error("lease renewal refused", extra={"reply": repr(reply)[:200]})
            return
        named = {raw.decode() if isinstance(raw, bytes) else str(raw) for raw in reply[1:]}
        with self._applying:
            # (a named run is to stop: a CANCELLING one's lease is renewed still, while its
            # handler winds down, but one held for its renewal must not start its handler;
            # its flag is raised first, so a step's still_current() never sees the stamp of
            # a run the heartbeat let go, retried elsewhere under the same fence)
            self._stop([(rid, a) for rid, a in runs if rid in named])
            self.runner.mark_leased(runs, asked, gone=named)

    def _failed(self, failed: Exception, unrenewed: int, runs: int, shards: set[int]) -> None:
        """A beat some of whose calls (`unrenewed` of its `runs`, on `shards`) failed: raise
        when it renewed none (the server, or every master, does not answer), unless each run is
        on shards the service found silent while others answer it (the runs of the other
        masters ended meanwhile: a probe saw an executor unready for that). Otherwise some
        masters did not answer (a cluster's: one down, or silent): their runs are stopped by
        the watch if that lasts, the others were renewed. Not a failed beat: the executor is
        ready, and serves the other masters' shards."""
        silent = set(self.silent())
        if unrenewed == runs and not (shards <= silent and len(silent) < self.keys.shards):
            raise failed
        repeats = _PARTLY_RENEWED.due(type(failed).__name__)
        if repeats is not None:
            log.warning("leases not renewed where the calls failed (a master that does not "
                        "answer, a server that refused them: see error); the others were",
                        extra={"runs": unrenewed, "error": describe(failed),
                               "repeats": repeats})  # fmt: skip

    def _renew(
        self, calls: list[_Call], late: Callable[[int, Any], None] | None = None
    ) -> list[Any]:
        """The replies of the heartbeat calls (a failed call's as its error), sent in one
        round trip (on a cluster, one per master, at once: see _ByNode). Made one after
        another, a beat over 16 shards took 0.4-2 s on a loaded host, and a run's renewals
        came most of a lease apart."""
        if not calls:
            return []
        sha = self._script.sha
        if self._nodes is not None:
            replies = self._nodes.run(
                [keys[0] for keys, _, _ in calls],
                lambda pipe, i: pipe.evalsha(sha, 2, *calls[i][0], *calls[i][1]),
                late=late,
            )
        else:
            with self._client.pipeline(transaction=False) as pipe:
                for keys, args, _ in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                replies = pipe.execute(raise_on_error=False)
        for i, (keys, args, _) in enumerate(calls):
            # (a restart or a failover lost the script; a slot moved: the cluster client
            # follows the redirection and reads the slots again)
            if isinstance(replies[i], (NoScriptError, *_REDIRECTED)):
                try:
                    replies[i] = self._script(keys=keys, args=args)  # (loads it)
                except Exception as exc:
                    replies[i] = exc
        return replies

    def _confirmed_turns(
        self, snapshot: list[tuple[int, str, int, int]]
    ) -> dict[int, tuple[int, int]]:
        """shard -> (first, last): this executor's turns in the shard whose writes are all
        there, from its turn key (lua/finish.lua), read after the snapshot, so every turn in it
        had returned. Absent (the key expired, a crash or a failover lost it, the read failed):
        the heartbeat asks about each run. A turn the server lost is never in a range: the
        next turn there finds the key behind its previous one and starts a new range."""
        shards = sorted({shard for shard, _, _, turn in snapshot if turn})
        if not shards:
            return {}
        keys = [self.keys.shard(shard).turn_string(self.consumer) for shard in shards]
        try:
            if self._nodes is not None:  # (a master that does not answer: its shards unread)
                values = self._nodes.run(keys, lambda pipe, i: pipe.get(keys[i]), optional=True)
                failed = next((v for v in values if isinstance(v, Exception)), None)
                values = [None if isinstance(v, Exception) else v for v in values]
                if failed is not None:
                    raise failed
            else:
                with self._client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.get(key)
                    values = pipe.execute()
        except Exception as exc:  # (the leases still get renewed, one run at a time)
            # A slot that moved, or a master that does not answer (its renewals say so), is
            # no news: a warning each slot move was noise in a reshard (a cluster probe).
            expected = isinstance(exc, (*_REDIRECTED, *_UNANSWERED))
            repeats = _TURNS_NOT_READ.due(type(exc).__name__)  # (each beat, in an outage)
            if repeats is not None:
                log.log(logging.DEBUG if expected else logging.WARNING, "turn keys not read",
                        extra={"error": describe(exc), "repeats": repeats})  # fmt: skip
            if self._nodes is None:
                return {}
        out: dict[int, tuple[int, int]] = {}
        for shard, value in zip(shards, values, strict=True):
            first, _, last = (value or b"").decode().partition("|")
            if first.isdigit() and last.isdigit():
                out[shard] = (int(first), int(last))
        return out

    def _stop(self, runs: list[tuple[str, int]]) -> None:
        """Hand the runs (run id, attempt) the script named, or whose turn is confirmed, back to
        the loop in one callback (thousands under load)."""
        if not runs:
            return
        for rid, attempt in runs:
            run = self.runner.active.get(rid)
            if run is not None and run.attempt == attempt and not run.reported:
                run.ctx._flag.set()  # a sync step polling ctx.cancelled sees it now
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_all, runs)

    def _stop_all(self, runs: list[tuple[str, int]]) -> None:
        for rid, attempt in runs:
            try:
                self.on_stop(rid, attempt)
            except Exception:  # (one run's failure must not keep the others running)
                log.exception("a run named by the heartbeat was not let go", extra={"run": rid})
