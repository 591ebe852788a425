"""Claiming: the claim script over the assignments read (all shards in one round trip where
it can), or on one server the take script, which reads new assignments and claims them in one
call; then the start of every run granted. A refused claim (the run was cancelled or
re-assigned meanwhile) starts nothing."""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from supersede.health import ShardHealth, ShardSilent, first_error
from supersede.metrics import HOP_SECONDS
from supersede.scripts import Assigned, Claim, Scripts, Taken
from supersede.service import server_now
from supersede.services.executor import metrics
from supersede.services.executor.cancel import Cancels
from supersede.services.executor.config import ExecutorConfig
from supersede.services.executor.steps import Runner, Running
from supersede.streams import entry_ms

log = logging.getLogger("supersede.executor")

# seconds the executor's clock may be ahead of the server's: a reclaim looks at the claims made
# since a lost call was sent, by the server's clock
RECLAIM_SKEW = 5.0
# attempts started remembered per shard at most (`Claimer.started`): about RECLAIM_SKEW + 1 s of
# starts are kept, so this binds only past ~5,000 runs a second per shard and executor (each one
# dropped then: supersede_executor_starts_forgotten_total)
STARTED_MOST = 30_000

Fetched = tuple[int, str, bytes, str, int]
"""An assignment read: (shard, stream, entry id, run id, attempt)."""


class Claimer:
    def __init__(
        self,
        scripts: Scripts,
        consumer: str,
        config: ExecutorConfig,
        runner: Runner,
        cancels: Cancels,
        health: ShardHealth | None = None,
    ) -> None:
        self.scripts = scripts
        self.health = health or ShardHealth.off()
        self.consumer = consumer
        self.config = config
        self.runner = runner
        self.cancels = cancels
        # (monotonic) when the last `take` call was sent: the server stamps the leases of the
        # runs it claims after that, so their leases run from no earlier (Running.leased_at)
        self.asked = 0.0
        # shard -> (wall clock) the earliest claim call of the shard since its last reclaim
        # whose reply did not come (it raised): the server may have carried it out (see
        # `reclaim`)
        self.lost_since: dict[int, float] = {}
        # shard -> (run id, attempt) -> (wall clock) when this executor started it: the attempts
        # started since the earliest claim call a reclaim may take back runs of (see `reclaim`)
        self.started: dict[int, OrderedDict[tuple[str, int], float]] = {}
        self._calls: dict[int, float] = {}  # claim calls in flight: (wall clock) when sent
        self._call_ids = itertools.count()

    async def claim_and_start(self, items: list[Fetched]) -> None:
        asked = time.monotonic()
        sent = server_now()
        by_shard: dict[int, list[Assigned]] = {}
        for shard, stream, entry_id, rid, attempt in items:
            by_shard.setdefault(shard, []).append((stream, entry_id, rid, attempt))
        now = server_now()
        failed: BaseException | None = None
        try:
            with self._in_flight(sent):
                replies, failed = await self._claim(by_shard, int(now * 1e6))
        except BaseException:
            self._lost(by_shard, sent)
            raise
        self._lost([s for s in by_shard if s not in replies], sent)
        HOP_SECONDS.labels("claim").observe(max(0.0, server_now() - now))
        claimed: list[tuple[int, bytes | str, Claim]] = []
        for shard, claims in replies.items():
            for (_, entry, _, _), claim in zip(by_shard[shard], claims, strict=True):
                if claim.claimed:
                    claimed.append((shard, entry, claim))
        asked_for = sum(len(by_shard[s]) for s in replies)
        self.start_taken(claimed, asked_for - len(claimed), now, asked)
        if failed is not None:
            raise failed

    async def _claim(
        self, by_shard: dict[int, list[Assigned]], read_us: int
    ) -> tuple[dict[int, list[Claim]], BaseException | None]:
        """The claims of each shard's assignments, and an error of a shard that failed. On a
        cluster one call per shard, each bounded by ShardHealth: the shards that answered are
        claimed whatever the others do (a silent one's assignments stay pending for this
        consumer: a sweep of own pending entries reads them again once it answers)."""
        if not self.health.enabled:
            replies = await self.scripts.claim_shards(
                self.consumer, by_shard, lease_ms=self.config.lease_ms, read_us=read_us
            )
            return replies, None
        done = await self.health.each(
            {s: ([s], self._claim_call(s, part, read_us)) for s, part in by_shard.items()}
        )
        replies = {s: r for s, r in done.items() if not isinstance(r, BaseException)}
        return replies, first_error(done.values())

    def _claim_call(self, shard: int, part: list[Assigned], read_us: int) -> Awaitable[list[Claim]]:
        return self.scripts.claim(
            shard, self.consumer, part, lease_ms=self.config.lease_ms, read_us=read_us
        )

    def _lost(self, shards: Iterable[int], sent: float) -> None:
        """Claim calls of `shards` sent at `sent` (wall clock) whose replies did not come."""
        for shard in shards:
            self.lost_since[shard] = min(self.lost_since.get(shard, sent), sent)

    @contextmanager
    def _in_flight(self, sent: float) -> Iterator[None]:
        """A claim call sent at `sent` (wall clock), until its reply or its failure: the
        attempts started since it was sent, less the skew, are remembered meanwhile."""
        call = next(self._call_ids)
        self._calls[call] = sent
        try:
            yield
        finally:
            del self._calls[call]

    def _remember(self, shard: int, run: tuple[str, int], now: float) -> None:
        """Note an attempt started, and forget those no reclaim can take back: started before
        every claim call a reclaim of `shard` may look back from (a lost one, one in flight,
        one sent from now on) less RECLAIM_SKEW; STARTED_MOST at most."""
        started = self.started.setdefault(shard, OrderedDict())
        started[run] = now
        started.move_to_end(run)
        self._forget(shard, now)

    def _forget(self, shard: int, now: float) -> None:
        started = self.started.get(shard)
        if not started:
            return
        oldest = min(self.lost_since.get(shard, now), min(self._calls.values(), default=now))
        keep = min(now, oldest) - RECLAIM_SKEW - 1.0
        while started and (len(started) > STARTED_MOST or next(iter(started.values())) < keep):
            _, at = started.popitem(last=False)
            if at >= keep:  # (a reclaim may still look back past it: counted)
                metrics.STARTS_FORGOTTEN.inc()

    async def take(
        self, streams: Sequence[tuple[str, int]], want: int, *, deep: bool = False
    ) -> Taken:
        """Read at most `want` new assignments of `streams` ((stream, shard) pairs, in order;
        `deep`: each asked for all still wanted) and claim them, in one call (one server only);
        `start_taken` starts the runs."""
        started = server_now()
        self.asked = time.monotonic()
        try:
            with self._in_flight(started):
                taken = await self.scripts.take(
                    self.consumer, streams, want=want, lease_ms=self.config.lease_ms, deep=deep
                )
        except BaseException:
            self._lost({shard for _, shard in streams}, started)
            raise
        HOP_SECONDS.labels("claim").observe(max(0.0, server_now() - started))
        return taken

    def start_taken(
        self,
        items: Sequence[tuple[int, bytes | str, Claim]],
        refused: int,
        now: float = 0.0,
        asked: float = 0.0,
    ) -> None:
        """Start the runs a `take` or claim call claimed: (shard, assignment entry id, run);
        their queue wait runs to `now` (the read; default: this moment), their leases from
        `asked` (monotonic: when the call was sent; default: the last `take`'s)."""
        if refused:
            metrics.CLAIMS_REFUSED.inc(refused)
        now = now or server_now()
        asked = asked or self.asked
        for shard, entry, claim in items:
            waited = max(0.0, now * 1000 - entry_ms(entry)) / 1000
            metrics.QUEUE_WAIT_SECONDS.observe(waited)
            HOP_SECONDS.labels("assignments").observe(waited)
            self._start(shard, claim, now, asked)

    def start_handed(self, shard: int, claims: Sequence[Claim], asked: float = 0.0) -> None:
        """Start the runs an admit call claimed for this executor (`supersede serve`'s
        hand-over: no assignment entry, no claim call), their leases counted from `asked`
        (monotonic: when that call was sent; 0: now). A run that call also cancelled (state
        X) is started and stopped at once, so that its outcome is reported as any other's."""
        now = server_now()
        for claim in claims:
            metrics.QUEUE_WAIT_SECONDS.observe(0.0)
            run = self._start(shard, claim, now, asked)
            if run is not None and claim.state == "X":
                self.cancels.cancel_local(claim.run_id, claim.attempt, now * 1000)

    async def reclaim(self) -> int:
        """Start the runs that claim calls whose replies never came claimed for this executor
        (lua/reclaim.lua): the server may have carried such a call out (it froze mid-call, a
        connection was cut after the request), and its runs sat RUNNING, never started, for a
        lease, then used an attempt. Made before the next claim, per shard; a failure keeps it
        due (a silent shard's, until it answers). How many it started."""
        if not any(map(self.health.up, self.lost_since)):
            return 0
        asked, now = time.monotonic(), server_now()
        held = self._held()
        found = 0
        for shard, lost in sorted(self.lost_since.items()):
            if not self.health.up(shard):
                continue
            self._forget(shard, now)  # (a shard that started nothing since its last start)
            # (and every attempt started here since: one whose result could not be written,
            # given up after a lease, is held no more, and was started again, the same
            # attempt, by the reclaim of a call lost as the master froze: a cluster probe)
            mine = held | self.started.get(shard, {}).keys()
            call = self.scripts.reclaim(
                shard, self.consumer, list(mine), since_ms=int((lost - RECLAIM_SKEW) * 1000),
                lease_ms=self.config.lease_ms,
            )  # fmt: skip
            try:
                claims = await self.health.call([shard], call)
            except ShardSilent:
                continue
            del self.lost_since[shard]
            held = self._held()  # (a hand-over of `supersede serve` may have started one)
            skip = held | self.started.get(shard, {}).keys()
            for claim in claims:
                if (claim.run_id, claim.attempt) in skip:
                    continue
                found += 1
                run = self._start(shard, claim, now, asked)
                if run is not None and claim.state == "X":  # (cancelled since: stopped at
                    # once, its outcome reported, as a hand-over's)
                    self.cancels.cancel_local(claim.run_id, claim.attempt, now * 1000)
        if found:
            metrics.RECLAIMED.inc(found)
            log.warning("runs claimed by a call whose reply was lost are started now",
                        extra={"runs": found})  # fmt: skip
        return found

    def _held(self) -> set[tuple[str, int]]:
        """(run id, attempt) of the attempts this executor holds: running, or reported and not
        yet known to have survived (an older attempt hides no newer one)."""
        held = {(r.run_id, r.attempt) for r in self.runner.active.values()}
        held |= self.runner.let_go.keys()  # (stopped here on purpose: never started again)
        return held | {(r.run_id, r.attempt) for r in self.runner.awaiting.values()}

    def _start(self, shard: int, claim: Claim, now: float, asked: float = 0.0) -> Running | None:
        held = self.runner.active.get(claim.run_id)
        if held is not None and held.attempt == claim.attempt:
            return None  # (started already: never twice)
        if held is not None and held.attempt != claim.attempt:
            # The reaper retried a run still executing here (its lease lapsed): that attempt
            # is no longer this executor's to finish.
            self.cancels.cancel_local(claim.run_id, held.attempt, now * 1000)
        run = self.runner.start(shard, claim, leased_at=asked)
        if run is not None:
            self.cancels.apply_early(run)
            # (when it starts, not when its claim was read: a claim held up in a freeze is
            # remembered as long as a reclaim can reach it, a review)
            self._remember(shard, (claim.run_id, claim.attempt), server_now())
        return run
