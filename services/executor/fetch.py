"""Fetching assignments: never more entries than free local slots, then the claim.

An executor reads only the assignment streams of its own workflows, one per workflow in each
shard, so a run is only ever delivered to an executor that has its workflow. How a read is made
depends on the free slots and the backend:
- the streams whose last read gave all it asked for ("hot": a backlog) are read first: on one
  server up to four of them, in rotation, one after the other in one take call, each asked for
  all still wanted (a backlog fills the call from as few shards as it can); on a cluster one
  XREADGROUP per batch of them, the entries still wanted shared out over its streams. At least
  every 50 ms a read covers every stream
  instead, so a backlog in one stream never starves the others;
- with a free slot per stream on one server, one XREADGROUP BLOCK over every stream both waits
  and reads (free // streams entries per stream at most), unless admit calls of this process
  hand runs over (`supersede serve`);
- otherwise the streams are read in batches of at most `free` streams, woken streams first,
  then in rotation (on one server one take script call does those reads and claims what they
  gave, so a scan is one round trip); when that finds nothing, or on one server when it left
  every stream empty, one XREAD BLOCK over every stream (from their last
  seen ids) waits for new entries without consuming them (on a cluster, a wake task per shard
  does, over that shard's streams), and while no entry comes it waits again with no scan
  (on one server). With bells (one server, Redis 7.0 or later): the scripts that write an
  assignment publish on the stream's name once a call (SPUBLISH), the executor subscribes to
  its streams' names, and its waits are for a bell and its scans read only the streams that
  rang, every stream only after a wait that timed out or a new subscription; without them the
  XREAD below. An entry read without the mark of a bell (its writer could not ring) puts the
  executor back on the XREAD for UNRUNG_HOLD seconds. The last seen ids are the streams'
  tails, read once, then moved on by the entries each read takes and each wake-up returns: a
  scan reads the tails again only after a wake-up that found nothing to take (other executors
  took it: the ids may lag behind what they took, and each wake-up moves them on by one entry
  only);
- after a failure, this consumer's own pending entries are read first (OwnPending);
- each second a task of its own looks for assignments a dead executor read but never claimed
  (one pipelined XPENDING over every stream, off the fetch loop: that check took the loop a
  millisecond and was the p99 of the wake-up); the loop takes those over (XAUTOCLAIM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ResponseError

from supersede.aio import wait_for
from supersede.errors import describe
from supersede.health import ShardSilent, raise_unless_silent
from supersede.keys import Keys
from supersede.lane import Lane, read
from supersede.logs import Sampled, kind_of
from supersede.protocol import (
    EXECUTOR_GROUP,
    Entry,
    StreamReply,
    assignment_rung,
    parse_assignment,
)
from supersede.scripts import Claim, Taken
from supersede.service import Service, Throttle, error_fields
from supersede.services.executor.claim import Claimer, Fetched
from supersede.services.executor.config import ExecutorConfig
from supersede.services.executor.isolation import SERVER_UNAVAILABLE
from supersede.services.executor.steps import Runner
from supersede.streams import OwnPending, failed_over, retry_pause, stale_streams, tail_ids

_STALE_FAILED = Sampled()  # (the look for a dead executor's assignments, in an outage)
_WAKE_FAILED = Sampled()  # (a wake read failing while a master is down or failing over)
log = logging.getLogger("supersede.executor")

FULL_READ_EVERY = 0.05  # seconds: the longest a backlog's streams are read alone
BELLS_PING_EVERY = 5.0  # seconds without a bell before the bells' connection is asked to answer
BELLS_RETRY_AFTER = 60.0  # seconds before bells refused (an ACL user's rights) are asked again
# seconds of blocking reads after an assignment no bell announced (a writer of a build before
# the bells in a rolling upgrade, or under a user without the channel right, still writes)
UNRUNG_HOLD = 60.0
DEEP_STREAMS = 4  # streams with a backlog one take call may read (one fills it, usually)


@dataclass
class Reading:
    """What a read gave: assignments to claim, and runs the read claimed itself (lua/take.lua,
    one server) with the number of entries it refused."""

    fetched: list[Fetched] = field(default_factory=list)
    taken: list[tuple[int, bytes, Claim]] = field(default_factory=list)
    refused: int = 0
    drained: bool = False  # every stream was read and gave less than asked: none has more

    def __len__(self) -> int:
        """Entries read (well-formed ones)."""
        return len(self.fetched) + len(self.taken) + self.refused

    @property
    def runs(self) -> int:
        """The runs it may start: not the refused entries, which take no slot (a take call
        reads past up to hundreds of them)."""
        return len(self.fetched) + len(self.taken)

    def add(self, other: Reading) -> None:
        self.fetched += other.fetched
        self.taken += other.taken
        self.refused += other.refused


class Fetcher:
    def __init__(
        self,
        service: Service,
        keys: Keys,
        config: ExecutorConfig,
        runner: Runner,
        claimer: Claimer,
        *,
        cluster: bool,
    ) -> None:
        self.service = service
        self.redis: Redis = service.redis
        self.health = service.health
        self.reads: Lane | None = None  # the blocking reads' own connection, from `loop`
        self.consumer = service.consumer
        self.keys = keys
        self.config = config
        self.runner = runner
        self.claimer = claimer
        self.cluster = cluster
        pairs = [
            (sk.shard, sk.assignments_stream(wf))
            for sk in keys.all_shards()
            for wf in runner.workflows
        ]
        self.streams = [stream for _, stream in pairs]
        self.shard_of_stream = {stream: shard for shard, stream in pairs}
        self.index_of_stream = {name: i for i, name in enumerate(self.streams)}
        self.own = OwnPending(self.streams)
        self._stale: list[str] = []  # streams with entries to take over, found by stale_loop
        self._rotation = 0
        self._hot_rotation = 0
        self._woken: list[int] = []
        self._hot: set[int] = set()  # streams whose last read returned all it asked for
        self._full_read_due = Throttle(FULL_READ_EVERY)
        self._wake = asyncio.Event()
        self._wake_ids: dict[str, str] = {}  # the ids the wait reads after (one server)
        self._tails_fresh = False  # False: read the tails before the next scan
        self._after_wake = False  # the next scan follows a wake-up
        self._malformed: list[tuple[str, bytes]] = []
        self._took_malformed: list[tuple[str, bytes]] = []  # acknowledged by a take call
        self.handed_over = False  # admit calls of this process claim runs for this executor
        # More assignment entries wait for this executor than it has free slots (its last read
        # took as many as it asked for): a hand-over takes no slot then, so runs that took the
        # streams (a slot was busy, a refill, a retry) are not starved by newer ones handed
        # over. (Fewer: the read in flight or the next one takes them at once.)
        self.backlog = False
        self._quiet = False  # the last scan found nothing, and the wait after it timed out
        # One server: the streams' bells (bell_loop) wake this executor and name the streams
        # to read, instead of a blocking read over every stream. Until they are subscribed
        # (and whenever the subscription is lost) the blocking reads do it.
        self.bells = False
        self._unrung_until = 0.0  # (monotonic) bells are not waited on before: see `_unrung`
        self._full_scan = True  # the next scan reads every stream (bells may have been missed)
        # ... and one scan in each --block-ms does, whatever the bells say: an entry whose
        # writer could not ring (a user without the channel right, a writer of an older
        # version) waits one --block-ms at most, even while other bells keep the waits short
        self._full_scan_due = Throttle(config.block_ms / 1000)

    async def loop(self, stop: asyncio.Event) -> None:
        """Until `stop`: wait for a free slot, read, take over, claim and start; or wait."""
        self.reads = self.service.lane()  # (None: redis-py's pool makes the reads)
        while not stop.is_set():
            reread = False
            try:
                free = await self._free_slots()
                if not free:
                    continue
                self.own.sweep_if_due()
                if self._quiet and not self.own.active and not self._stale and not self.bells:
                    # The last scan found nothing and the wait after it no new entry: no scan
                    # (and no slot held for one) until an entry comes.
                    self._quiet = not await self._wait_for_assignments()
                    continue
                if not self.own.active or self._stale:
                    # (a re-read of own pending entries, every 2 s, that finds none leaves a
                    # quiet loop quiet: no scan, and the tails its wait starts from stay put)
                    self._quiet = False
                with self.runner.reserve(free):  # nothing else starts a run in them meanwhile
                    if not self._quiet:
                        await self._refresh_tails(free)
                    reread = self.own.active
                    got = await self._read(free, reread)
                    if got.runs < free and self._stale:
                        got.fetched += await self._take_over(free - got.runs)
                    # (a read that took only malformed entries took something: the stream may
                    # hold valid ones behind them, older than the tails the wait starts from)
                    took = await self._ack_malformed() > 0 or bool(got)
                    self.service.healthy()
                    self.backlog = got.runs >= free  # (and likely more behind)
                    self._note_read(took, reread)
                    if got:
                        self._quiet = False  # a scan follows whatever was taken
                        await self._claim_and_start(got)
                if got and not got.drained:
                    await asyncio.sleep(0)  # let the new runs reach their first step
                elif not reread and (got.drained or not took) and not self._blocking(free):
                    # Only after a scan: entries older than the tails are the scan's to find,
                    # so a wait after a re-read of own entries could sleep past them. (After a
                    # scan that left every stream empty, a wait, not another scan: it returns
                    # at once for an entry that came meanwhile, and costs no script call.)
                    woken = await self._wait_for_assignments()
                    # (not on a cluster: a wake task that starts after the scan could miss an
                    # entry written between the two)
                    self._quiet = not woken and not self.cluster and not self.bells
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Assignments read but not claimed are pending for this consumer: read again
                # (and scan: a failed re-read lets one read of new entries go first). The tails
                # too: after a failover the new master may have lost the last entries.
                self._quiet = False
                self._tails_fresh = False
                self._full_scan = True
                await self.service.recover(self.own, exc, failed_reread=reread, what="fetch")

    async def _claim_and_start(self, got: Reading) -> None:
        """Start the runs the read claimed; claim the assignments it only read, and start
        those granted."""
        self.claimer.start_taken(got.taken, got.refused)
        if got.fetched:
            await self.claimer.claim_and_start(got.fetched)

    def _note_read(self, got: bool, reread: bool) -> None:
        """A scan after a wake-up that took nothing: others took what woke this executor, and
        its ids may lag behind more they took (each wake-up would move them on by one entry):
        the tails are read before the next scan."""
        if not reread:
            if self._after_wake and not got:
                self._tails_fresh = False
            self._after_wake = False

    async def _free_slots(self) -> int:
        """The free local slots; with none, wait until one frees up and return 0."""
        free = self.runner.free()
        if free > 0:
            return free
        self.runner.slot_freed.clear()
        await self.runner.slot_freed.wait()
        return 0

    def _blocking(self, free: int) -> bool:
        """One XREADGROUP BLOCK over every stream both waits and reads. Not while admit calls
        hand runs over to this executor (`supersede serve`): a read blocked for a second would
        hold every free slot, and no run could be handed over. (With fewer free slots than
        streams, the wait is on the bells, or an XREAD over every stream without them.)"""
        return free >= len(self.streams) and not self.cluster and not self.handed_over

    async def _refresh_tails(self, free: int) -> None:
        """Before a scan: the last id of every assignment stream, for the wait that may follow.

        Tails first, then the scan: an entry older than a tail is seen by the scan, a newer one
        wakes the XREAD that may follow, so none waits for a timeout. Any id a stream once had
        keeps that promise (entries come in id order); a fresh one only spares wake-ups for
        entries others took. So the ids are read again only after a wake-up that found nothing
        to take; otherwise the XREAD's own replies and the entries read move them on."""
        self._wake.clear()  # cluster mode, bells: a waker setting it from now on is not missed
        if self.cluster or self.bells:
            return  # (the wake tasks keep their own ids; bells need none)
        if not self._blocking(free) and not self._tails_fresh:
            self._wake_ids = await tail_ids(self.redis, self.streams)
            self._tails_fresh = True

    async def _read(self, free: int, reread: bool) -> Reading:
        """At most `free` assignments: own pending ones when `reread`, else new ones (from the
        streams that had more at the last read first: a backlog in a few of many streams is
        read in one round trip, see `_read_hot`). First, the runs of a claim call whose reply
        was lost (Claimer.reclaim), which take slots of `free`."""
        free -= await self.claimer.reclaim()
        if free <= 0:
            return Reading()
        blocking = self._blocking(free)
        if reread:
            return Reading(await self._read_own(free))
        # At least every FULL_READ_EVERY seconds a read covers every stream, in rotation: a
        # backlog in one stream never starves the others for longer (and scans of the streams
        # that have nothing cost round trips only that often).
        hot_only = bool(self._hot) and not self._full_read_due.due()
        got = await self._read_hot(free) if hot_only else Reading()
        if not got:
            if blocking and not self._hot:
                got = Reading(await self._read_blocking(free))
                # (it saw every stream: the bells rung meanwhile are stale, but the next scan
                # reads every stream, as the read may have left entries it did not ask for)
                self._woken = []
                self._full_scan = True
            else:
                # A backlog (streams whose last read left more): the take call reads every
                # stream and claims what it read in one round trip, where the blocking read
                # and the claim call after it cost two, each stream asked for free // streams
                # entries (a probe at a 40 ms round trip: two executors drained 391 runs/s of
                # 1,200 offered, 874-941 this way). The blocking read waits when none has more.
                self._full_scan = self._full_scan or blocking
                got = await self._read_scan(free)
        self.own.advance(None, reread=False)
        return got

    async def _read_hot(self, free: int) -> Reading:
        order = sorted(self._hot)
        cut = self._hot_rotation % len(order)  # rotate, so no hot stream always comes last
        self._hot_rotation += 1
        order = order[cut:] + order[:cut]
        if not self.cluster:
            # One stream after the other, each asked for all still wanted: a backlog fills
            # the call from one shard, where a few entries of each stream would touch every
            # shard, and the claim and the finish of the runs pay a fixed part per shard.
            return (await self._take(order[:DEEP_STREAMS], free, deep=True))[0]
        got = Reading()
        order = self._answering(order)
        while order and len(got) < free:
            want = free - len(got)
            batch = self._batch(order, want)
            del order[: len(batch)]
            got.add(await self._read_batch(batch, want // len(batch)))
        return got

    def _answering(self, order: list[int]) -> list[int]:
        """The streams of `order` whose shards are not silent (ShardHealth; a cluster)."""
        up = self.health.up
        return [i for i in order if up(self.shard_of_stream[self.streams[i]])]

    async def _read_each(self, reads: list[tuple[str, str, int]]) -> list[tuple[str, object]]:
        """XREADGROUP of each (stream, id, count) of `reads`, and each stream's reply: one
        pipeline on one server; on a cluster one per node, all at once, each bounded by
        ShardHealth: a silent shard's streams are left out, and a node that does not answer
        in time gives nothing (what it delivered meanwhile is pending for this consumer: a
        sweep of own pending entries reads it once it answers)."""
        if not self.cluster:
            return list(zip([s for s, _, _ in reads], await self._pipelined(reads), strict=True))
        of = {read[0]: read for read in reads}
        by_node = {
            node: [of[s] for s in part]
            for node, part in self._by_node([s for s, _, _ in reads]).items()
        }
        done = await self.health.each(
            {
                node: ({self.shard_of_stream[s] for s, _, _ in part}, self._pipelined(part))
                for node, part in by_node.items()
            }
        )
        raise_unless_silent(done.values())
        out: list[tuple[str, object]] = []
        for node, part in by_node.items():
            if not isinstance(replies := done[node], ShardSilent):
                out += zip([s for s, _, _ in part], replies, strict=True)
        return out

    async def _pipelined(self, reads: list[tuple[str, str, int]]) -> list[object]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, at, count in reads:
                pipe.xreadgroup(EXECUTOR_GROUP, self.consumer, {stream: at}, count=count)
            return cast(list[object], await pipe.execute())

    def _node_of(self, stream: str) -> str:
        """The name of the master serving `stream` (a cluster; its shard's name when the
        client knows no node of its slot)."""
        try:
            return str(cast(Any, self.redis).get_node_from_key(stream).name)
        except Exception:
            return f"shard {self.shard_of_stream[stream]}"

    async def _read_batch(self, batch: list[int], count: int) -> Reading:
        """One XREADGROUP over the streams `batch`, `count` entries each; a stream that gave
        all it was asked for stays hot (it likely has more), the others cool down. (A cluster's:
        on one server `_take` reads and claims in one call.)"""
        names = [self.streams[i] for i in batch]
        self._hot.difference_update(batch)
        try:
            reply = await self.health.call(
                [self.shard_of_stream[names[0]]],
                self.redis.xreadgroup(
                    EXECUTOR_GROUP, self.consumer, dict.fromkeys(names, ">"), count=count
                ),
            )
        except ShardSilent:  # (its master did not answer in time: the other shards go on)
            return Reading()
        return Reading(self._parse_reply(reply, count=count))

    async def _take(
        self, order: list[int], free: int, *, deep: bool = False
    ) -> tuple[Reading, int]:
        """One server: the streams `order` read in batches as `_read_batch` reads them (`deep`:
        one after the other, each asked for all still wanted), until `free` entries came, and
        what they gave claimed, all in one call (lua/take.lua); and how many of `order` the
        call reached."""
        taken: Taken = await self.claimer.take(
            [(self.streams[i], self.shard_of_stream[self.streams[i]]) for i in order],
            free,
            deep=deep,
        )
        self._hot.difference_update(order[: taken.reached])
        full: dict[str, bool] = {}  # (a stream's last read decides: the call reads one again
        for stream, n, last, asked in taken.reads:  # past entries of runs it cannot claim)
            full[stream] = n >= asked
            self._seen(stream, last)
        self._hot.update(self.index_of_stream[s] for s, more in full.items() if more)
        self._took_malformed += taken.malformed  # (acknowledged by the call: logged only)
        if taken.unrung:
            self._unrung()
        drained = taken.reached == len(order) == len(self.streams) and all(
            n < asked for _, n, _, asked in taken.reads
        )
        return Reading(taken=taken.claimed, refused=taken.refused, drained=drained), taken.reached

    async def _read_own(self, free: int) -> list[Fetched]:
        """This consumer's pending assignments, at most `free` of them, the first streams
        first: one XREADGROUP per stream, all in one round trip (one after the other, the
        streams of a deployment held the loop for milliseconds every sweep); the re-read moves
        past only what it takes."""
        ids = self.own.ids()
        got: list[Fetched] = []
        taken: StreamReply = []
        for stream, reply in await self._read_each([(s, ids[s], free) for s in self.streams]):
            for name, entries in cast(StreamReply, reply or []):
                entries = entries[: free - len(got)]
                if entries:
                    taken.append((name, entries))
                    got += self._parse(stream, entries)
        self.own.advance(taken, reread=True)
        return got

    async def _read_blocking(self, free: int) -> list[Fetched]:
        """One XREADGROUP BLOCK over every assignment stream, `free // streams` entries each."""
        count = free // len(self.streams)
        reply = await read(
            self.reads, self.redis, dict.fromkeys(self.streams, ">"),
            group=(EXECUTOR_GROUP, self.consumer), count=count, block=self.config.block_ms,
        )  # fmt: skip
        return self._parse_reply(reply, count=count)

    async def _read_scan(self, free: int) -> Reading:
        """XREADGROUP at most `free` entries in all: with at least one free slot per stream,
        from every stream in one pipeline; otherwise in batches of at most `free` streams (one
        XREADGROUP each, `free // batch` entries per stream), woken streams first."""
        got = Reading()
        n = len(self.streams)
        woken = list(dict.fromkeys(self._woken))
        self._woken = []
        if self.bells and not self._full_scan and not self._full_scan_due.due():
            # Only the streams whose bells rang, and those whose last read left more: an idle
            # stream costs nothing per entry. Those the call did not reach ring again, in
            # effect (they are read first next).
            order = list(dict.fromkeys([*woken, *sorted(self._hot)]))
            if not order:
                return Reading()
            got, _ = await self._take_woken(order, woken, free)
            return got
        self._full_scan = False
        if not self.cluster:  # (one call, in the batches below: all streams when free >= n)
            # Every stream in rotation from where the last full scan stopped, the woken ones
            # in their turn: woken first, a stream whose bell rings at every finish (a queue
            # worked off) took each free slot, and a stream no bell rang for (its writer could
            # not ring) was never reached (a probe: runs ASSIGNED for many minutes).
            order = [(self._rotation + i) % n for i in range(n)]
            got, reached = await self._take(order, free)
            self._rotation = (self._rotation + max(1, reached)) % n
            self._put_back(order[reached:], woken)
            if reached < n:  # (filled before it reached every stream: the next scan goes on)
                self._full_scan = True
            return got
        order = list(dict.fromkeys([*woken, *((self._rotation + i) % n for i in range(n))]))
        if free >= n:
            # Enough free slots to ask every stream for free // n entries in one round trip
            # (a scan of one round trip per stream takes milliseconds in redis-py).
            count = free // n
            for stream, reply in await self._read_each([(s, ">", count) for s in self.streams]):
                got.fetched += self._parse_reply(reply, stream, count=count)
            return got
        order = self._answering(order)
        while order and len(got) < free:
            want = free - len(got)
            batch = self._batch(order, want)
            del order[: len(batch)]
            got.add(await self._read_batch(batch, want // len(batch)))
        self._rotation = (self._rotation + 1) % n
        return got

    async def _take_woken(
        self, order: list[int], woken: list[int], free: int
    ) -> tuple[Reading, bool]:
        """`_take` of `order`; the woken and hot streams it did not reach go back to the front
        of the woken list (read first next). Whether it left any stream of `order` unread."""
        got, reached = await self._take(order, free)
        self._put_back(order[reached:], woken)
        return got, reached < len(order)

    def _put_back(self, unreached: list[int], woken: list[int]) -> None:
        """The streams a call did not reach that have entries waiting (their bells rang, or
        their last read left more) are read first by the next scan, before those it reached:
        a stream whose bell rings at each finish of its own runs (a queue being worked off)
        came first every time and took every free slot, and the other workflows' streams of
        the pool waited for its whole queue (a probe: 6 minutes and more)."""
        waiting = set(woken) | self._hot
        self._woken[:0] = [i for i in unreached if i in waiting]

    def _batch(self, order: list[int], size: int) -> list[int]:
        """The first `size` streams of `order`; on a cluster only as many of them as share the
        first one's shard (one command reaches one slot)."""
        if not self.cluster:
            return order[:size]
        shard = self.shard_of_stream[self.streams[order[0]]]
        batch = order[:1]
        for i in order[1:size]:
            if self.shard_of_stream[self.streams[i]] != shard:
                break
            batch.append(i)
        return batch

    def _parse_reply(
        self, reply: object, stream: str | None = None, *, count: int = 0
    ) -> list[Fetched]:
        got: list[Fetched] = []
        for name, entries in cast(StreamReply, reply or []):
            got += self._parse(stream or name.decode(), entries)
            if count and len(entries) >= count:
                self._hot.add(self.index_of_stream[stream or name.decode()])
            if entries:
                self._seen(stream or name.decode(), entries[-1][0])
        return got

    def _seen(self, stream: str, entry_id: bytes) -> None:
        """An entry of `stream` was read: the wait's id moves past it (never back: a read of
        new entries can return some older than a tail read before)."""
        known = self._wake_ids.get(stream)
        if known is not None and _id_key(entry_id.decode()) > _id_key(known):
            self._wake_ids[stream] = entry_id.decode()

    def _parse(self, stream: str, entries: Sequence[Entry]) -> list[Fetched]:
        """(shard, stream, entry id, run id, attempt); an entry that is not an assignment is
        noted for acknowledgement, so it cannot come back through XAUTOCLAIM forever."""
        shard = self.shard_of_stream[stream]
        out = []
        rung = True
        for entry_id, fields in entries:
            try:
                out.append((shard, stream, entry_id, *parse_assignment(fields)))
                rung = rung and assignment_rung(fields)
            except (KeyError, ValueError, TypeError, UnicodeDecodeError):
                self._malformed.append((stream, entry_id))
        if not rung and not self.cluster:
            self._unrung()
        return out

    def _unrung(self) -> None:
        """An assignment came that no bell announced: its writer could not ring (an admission
        of a build before the bells in a rolling upgrade, or under a user without the channel
        right). Waits for bells would find such entries only at the scan each --block-ms, so
        the blocking reads wake this executor until UNRUNG_HOLD seconds pass without one."""
        self._unrung_until = time.monotonic() + UNRUNG_HOLD
        if self.bells:
            log.warning(
                "assignments come without bells: blocking reads wake this executor until "
                "%.0f s pass without one", UNRUNG_HOLD,
            )  # fmt: skip
            self._bells_off()

    def _bells_off(self) -> None:
        """The waits go back to the blocking read, after a scan, from tails read again."""
        self.bells = False
        self._quiet = False
        self._tails_fresh = False

    async def _ack_malformed(self) -> int:
        """Acknowledge the malformed entries read (a take call already did); how many."""
        bad, self._malformed = self._malformed, []
        taken, self._took_malformed = self._took_malformed, []
        for stream, entry_id in [*bad, *taken]:
            log.error(
                "malformed assignment acknowledged",
                extra={"stream": stream, "entry": entry_id.decode()},
            )
        for stream, entry_id in bad:
            with contextlib.suppress(ShardSilent):  # (read again, and acknowledged, later)
                await self.health.call(
                    [self.shard_of_stream[stream]],
                    self.redis.xack(stream, EXECUTOR_GROUP, entry_id),
                )
        return len(bad) + len(taken)

    async def stale_loop(self, stop: asyncio.Event) -> None:
        """Each second: which streams hold assignments read by a consumer and idle past
        `claim_idle_ms` (a dead executor's, usually none). One pipelined XPENDING IDLE over
        every stream, so the check costs one round trip however many streams this executor
        reads, and none of the fetch loop's time."""
        while not stop.is_set():
            try:
                self._stale = await self._stale_streams()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, SERVER_UNAVAILABLE):
                    log.exception("looking for assignments to take over failed")
                elif (repeats := _STALE_FAILED.due(kind_of(exc))) is not None:  # (an outage:
                    # one line once in 5 s, not a traceback a second; an operator's probe)
                    log.warning("looking for assignments to take over failed",
                                extra={**error_fields(exc), "repeats": repeats})  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await wait_for(stop.wait(), 1.0)

    async def _stale_streams(self) -> list[str]:
        """stale_streams over every stream; on a cluster per node, each bounded (ShardHealth):
        a silent master's streams are left out."""
        idle = self.config.claim_idle_ms
        if not self.cluster:
            return await stale_streams(self.redis, self.streams, EXECUTOR_GROUP, idle)
        by_node = self._by_node(self.streams)
        done = await self.health.each(
            {
                node: (
                    {self.shard_of_stream[s] for s in part},
                    stale_streams(self.redis, part, EXECUTOR_GROUP, idle),
                )
                for node, part in by_node.items()
            }
        )
        raise_unless_silent(done.values())
        return [s for found in done.values() if isinstance(found, list) for s in found]

    def _by_node(self, streams: list[str]) -> dict[str, list[str]]:
        """The streams of shards not silent, by the name of their master."""
        by_node: dict[str, list[str]] = {}
        for stream in streams:
            if self.health.up(self.shard_of_stream[stream]):
                by_node.setdefault(self._node_of(stream), []).append(stream)
        return by_node

    async def _take_over(self, free: int) -> list[Fetched]:
        """XAUTOCLAIM, up to `free`, the assignments of the streams stale_loop found."""
        streams, self._stale = self._stale, []
        got: list[Fetched] = []
        for i, stream in enumerate(streams):
            if len(got) >= free:
                self._stale = streams[i:]  # the rest once slots free up
                break
            try:
                reply = await self.health.call(
                    [self.shard_of_stream[stream]],
                    self.redis.xautoclaim(
                        stream, EXECUTOR_GROUP, self.consumer, self.config.claim_idle_ms,
                        count=free - len(got),
                    ),
                )  # fmt: skip
            except ShardSilent:  # (stale_loop finds it again once its master answers)
                continue
            got += self._parse(stream, [e for e in reply[1] if e and e[1]])
        return got

    async def _wait_for_assignments(self) -> bool:
        """Wait for new assignments: for a bell (one server, bell_loop) or a wake task's signal
        (a cluster); without bells, an XREAD BLOCK over every assignment stream that wakes on
        any new entry and consumes nothing. Whether a new entry came (False: the wait timed
        out; with bells the next scan then reads every stream)."""
        if self.cluster or self.bells:
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await wait_for(self._wake.wait(), self.config.block_ms / 1000)
            if not self._wake.is_set() and not self.cluster:
                # A quiet wait: read every stream once (a bell missed by a writer without the
                # channel right costs at most this wait, never the run)
                self._full_scan = True
            return self._wake.is_set()
        if not self._tails_fresh:
            # (bells went off since the tails were read, or they were never read while bells
            # or the XREADGROUP BLOCK waited: a wait from those ids could name no stream at
            # all. Round again: the tails, a scan, then the wait.)
            return True
        reply = await read(
            self.reads, self.redis, self._wake_ids, count=1, block=self.config.block_ms
        )
        woken = False
        for stream, entries in reply:
            if entries:
                name = stream.decode()
                self._wake_ids[name] = entries[-1][0].decode()
                self._woken.append(self.index_of_stream[name])
                woken = True
        self._after_wake = woken
        return woken

    async def bell_loop(self, stop: asyncio.Event) -> None:
        """One server: subscribe to the bells of every stream this executor reads (SSUBSCRIBE
        to the streams' names: the scripts that write an assignment publish on its stream's
        name, once a call), and wake the fetch loop with the streams that rang. A bell costs
        the server one message per executor of the workflow; a blocking read over every
        stream cost it each stream at every entry, so many workflows or shards made every run
        dearer. Without bells (a server before Redis 7.0, a user without the channel right,
        the subscription lost) the blocking reads wake the loop; a new subscription reads
        every stream once, as bells may have rung meanwhile."""
        if self.cluster:
            return
        failures, refused = 0, False
        while not stop.is_set():
            pubsub = self.redis.pubsub()
            pause = 0.0
            try:
                await self._subscribe(pubsub)
                failures, refused = 0, False
                await self._listen(pubsub, stop)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:  # no SSUBSCRIBE, or no right to these channels
                if not refused:
                    log.warning(
                        "assignment bells not available: blocking reads wake this executor "
                        "(asked again each minute)", extra={"error": str(exc)},
                    )  # fmt: skip
                refused, pause = True, BELLS_RETRY_AFTER
            except Exception as exc:
                failures += 1
                lost = ("assignment bells lost: blocking reads wake this executor until they "
                        "are subscribed again")  # fmt: skip
                if failures == 1 and isinstance(exc, SERVER_UNAVAILABLE):  # (an outage's: one
                    log.warning(lost, extra=error_fields(exc))  # line, a traceback said no more)
                elif failures == 1:
                    log.warning(lost, exc_info=True)
                pause = min(0.1 * 2**failures, 2.0)
            finally:
                self._bells_off()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            with contextlib.suppress(TimeoutError):
                await wait_for(stop.wait(), pause)

    async def _listen(self, pubsub: PubSub, stop: asyncio.Event) -> None:
        """Ring for each bell until the connection fails, or `stop` (a cancel that lands in
        redis-py's get_message may be swallowed: one executor of fifteen never exited after
        its drain, its bells' connection pinging on). A connection that goes silent (a dead
        host, a cut network) is found by a PING after BELLS_PING_EVERY seconds without a
        message, unanswered for as long again: the reads have socket timeouts, this one waits
        for messages with none."""
        pinged = False
        while not stop.is_set():
            message = await pubsub.get_message(timeout=BELLS_PING_EVERY)
            if message is not None:
                pinged = False
                self._ring(message)
            elif pinged:
                raise ConnectionError("the bells' connection did not answer a PING")
            else:
                await pubsub.ping()
                pinged = True

    async def _subscribe(self, pubsub: PubSub) -> None:
        """SSUBSCRIBE to every stream's bell (an error reply such as NOPERM raises here). Bells
        go on at the first one heard once every channel is confirmed (see `_ring`): a writer
        that never rings (an admission of a build before the bells, or under a user without
        the channel right) leaves the executor on the blocking reads, not on a wait for bells
        that only a scan each --block-ms would end."""
        await pubsub.ssubscribe(*self.streams)
        confirmed = 0
        while confirmed < len(self.streams):
            message = await wait_for(pubsub.get_message(timeout=None), 10)
            if message is not None and message["type"] == "ssubscribe":
                confirmed += 1
        self._full_scan = True
        self._wake.set()

    def wake(self) -> None:
        """End a wait for bells or a wake task now (a stop)."""
        self._wake.set()

    def _ring(self, message: dict[str, Any] | None) -> None:
        """A bell: its stream is read first by the next scan, which the wait lets go."""
        if message is None:
            return
        if message["type"] == "ssubscribe":
            # redis-py connected again and subscribed anew: bells may have rung in between,
            # so the next scan reads every stream
            self._full_scan = True
            self._wake.set()
            return
        index = self.index_of_stream.get(_text(message["channel"]))
        if message["type"] != "smessage" or index is None:
            return
        if not self.bells and time.monotonic() >= self._unrung_until:
            # the first bell since the subscription (and no entry without one for a while):
            # the waits are for bells
            self.bells = True
            self._full_scan = True
        self._woken.append(index)
        if len(self._woken) > 2 * len(self.streams):
            self._woken = list(dict.fromkeys(self._woken))
        self._wake.set()

    async def wake_loop(self, stop: asyncio.Event, shard: int) -> None:
        """Cluster mode: one XREAD BLOCK per shard, over that shard's streams (one slot), sets
        the wake-up on new assignments."""
        streams = [s for s in self.streams if self.shard_of_stream[s] == shard]
        last = await tail_ids(self.redis, streams)
        while not stop.is_set():
            try:
                reply = await self.redis.xread(last, count=100, block=self.config.block_ms)  # type: ignore[arg-type]
                for name, entries in cast(StreamReply, reply or []):
                    if entries:
                        last[name.decode()] = entries[-1][0].decode()
                        self._woken.append(self.index_of_stream[name.decode()])
                        if len(self._woken) > 2 * len(self.streams):
                            self._woken = list(dict.fromkeys(self._woken))
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if failed_over(exc) or isinstance(exc, SERVER_UNAVAILABLE):  # (one line)
                    error = describe(exc)
                    if (repeats := _WAKE_FAILED.due(kind_of(exc))) is not None:  # (once in 5 s)
                        log.warning("wake read failed; reading again",
                                    extra={"error": error, "repeats": repeats})  # fmt: skip
                else:
                    log.exception("wake iteration failed")
                await asyncio.sleep(retry_pause(exc))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
