"""Which shards' masters answer, on a cluster.

A master that goes silent without closing its connections (a frozen VM, a link that drops
packets) holds every call sent to it until it answers again, and redis-py's cluster client
tries a timed-out call again (ten times by default). A call that combines shards (a read over
every assignment stream, a turn's results, an inbox batch's appends) then held every shard's
work for the whole silence. So the hot calls of a cluster go through `ShardHealth.call`, per
node or per shard, each bounded by a deadline. A call past it marks its shards *silent*: the
calls that follow leave them out (a call to a silent shard fails at once, with `ShardSilent`)
until a probe of the shard, made every PROBE_EVERY seconds off the hot path, is answered.
What a silent shard's calls would have done waits in Redis (entries pending, results queued)
and is done once it answers.

A shard whose master answers but whose calls fail (a slot left half moved: a multi-key call
gets TRYAGAIN, which the client retries until "TTL exhausted"; a slot no master serves) is
left out the same way, for a while (FAILING_FIRST seconds, doubling to FAILING_MOST while its
calls go on failing), then tried again: a probe of one key answers at once there, and its
calls' failures, raised to the loop that made them, held every other shard's work with it
(a cluster probe: every executor started no run of any shard while one slot stayed half moved).

On one server the deadline is not applied and no shard is ever silent: every shard shares the
server, so leaving some out would help none, and a slow server's calls are only slow.
"""

from __future__ import annotations

import asyncio
import logging
import math
import warnings
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable, Mapping
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from supersede.aio import wait_for
from supersede.errors import describe, refused_every_try
from supersede.logs import Sampled
from supersede.metrics import SHARDS_SILENT, report

log = logging.getLogger("supersede")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
PROBE_EVERY = 0.5  # seconds between two probes of the silent shards
PROBE_WAIT = 30.0  # seconds a probe waits for its answer
# seconds a hot call of a cluster may wait for an answer before its shards are silent (a call
# of a healthy master takes milliseconds; one past this only delays what it would have done)
SILENT_AFTER = 2.0
# seconds a call's deadline timer may run late (the loop held) before its timeout is this
# process's, not the master's silence (and half the deadline at least)
STALLED = 0.1
# seconds a master may take to answer the probe made when a call passed its deadline, for the
# call's shards alone to be left out, not the master's others
ANSWER_WITHIN = 0.25
_STALLS = Sampled(60.0)
# A shard whose calls fail while its master answers (see `shard_failure`) is left out for
# FAILING_FIRST seconds, doubling to FAILING_MOST while its calls go on failing (until one
# goes through).
FAILING_FIRST = 0.5
FAILING_MOST = 5.0
FAILING_FORGET = 60.0  # seconds after a hold without a call of its shard: failing no more
# A failing shard's call that goes through ends its failing only FAILING_QUIET seconds past its
# hold (a slot partly served, single-key calls going through, its multi-key calls failing
# again at once, ended it each time: the hold never grew, and a line a second said so, a
# cluster probe; with a second, ingress, whose failing call is its trim's each 5 s, said so
# each time, a re-probe); its calls meanwhile wait FAILING_DEADLINE seconds at most (a failing
# one took a second, 16 redirections at a distance, and held the calls of other shards waited
# with it: their run starts fell by 40 %)
FAILING_QUIET = 10.0
FAILING_DEADLINE = 0.3


def shard_failure(exc: BaseException) -> bool:
    """Whether `exc` says a shard's slot cannot be served now, its master answering: TRYAGAIN
    retried until redis-py's "TTL exhausted" (a slot left half moved; ASK and MOVED back and
    forth), a slot no master serves ("CLUSTERDOWN Hash slot not served"). Not a cluster down
    as a whole (CLUSTERDOWN of a cluster that lost a master, MASTERDOWN): every shard's calls
    fail then, and the loop that made the call retries and says so."""
    if isinstance(exc, ClusterDownError):
        return "not served" in str(exc)
    return isinstance(exc, TryAgainError | SlotNotCoveredError) or refused_every_try(exc)


class ShardSilent(RedisTimeoutError):
    """A call to a shard whose master did not answer within the deadline, and has not answered
    a probe since: failed at once."""

    def __init__(self, shards: Collection[int]) -> None:
        super().__init__(
            f"shard(s) {sorted(shards)} left out (no answer in time, or their calls fail); "
            "tried again later"
        )
        self.shards = frozenset(shards)


class ShardHealth:
    """`call` bounds a cluster call of some shards by `deadline`; `up` says whether a shard's
    calls are made at all. `probe_key(shard)` names a key of the shard (its master answers a
    probe of it). `service` labels the metric."""

    def __init__(
        self,
        redis: Redis | None,
        probe_key: Callable[[int], str],
        *,
        enabled: bool,
        deadline: float,
        service: str,
        shards: int = 0,
    ) -> None:
        self.redis = redis
        self.shards = shards
        self.probe_key = probe_key
        self.enabled = enabled
        self.deadline = deadline
        self.service = service
        self.silent: set[int] = set()
        self.refused: set[int] = set()  # silent shards whose master refuses the user
        self._probes: dict[int, asyncio.Task[None]] = {}  # silent shard -> its probe
        self._back: list[int] = []  # shards that answered, not said yet
        # failing shard -> its last hold (seconds), until one of its calls goes through
        self.failing: dict[int, float] = {}
        self._failed_at: dict[int, float] = {}  # failing shard -> (loop time) its last failure
        self._holding: set[asyncio.Task[None]] = set()
        if service:
            SHARDS_SILENT.labels(service).set(0)

    @classmethod
    def off(cls) -> ShardHealth:
        """One that bounds nothing and leaves no shard out (one server; tests of the parts)."""
        return cls(None, str, enabled=False, deadline=SILENT_AFTER, service="")

    def up(self, shard: int) -> bool:
        return shard not in self.silent

    async def call(self, shards: Collection[int], call: Awaitable[T]) -> T:
        """`call`'s result; ShardSilent at once when one of `shards` is silent (`call` is
        closed unawaited), or after `deadline` seconds without an answer (the shards become
        silent). Any other error is the call's own."""
        if not self.enabled:
            return await call
        down = self.silent.intersection(shards)
        if down:
            _close(call)
            raise ShardSilent(down)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = self.deadline
        if self.failing and not self.failing.keys().isdisjoint(shards):
            deadline = min(deadline, FAILING_DEADLINE)
        try:
            result = await wait_for(call, deadline)
        except ShardSilent:
            raise  # (a call of other shards inside it: those are marked already)
        except (TimeoutError, RedisTimeoutError) as exc:
            late = loop.time() - started - deadline
            if not isinstance(exc, RedisTimeoutError) and late > max(STALLED, deadline / 2):
                self._stalled(late)  # (this process's loop was held: not the master's silence)
                raise ShardSilent(shards) from exc
            # A master that answers a probe at once is not silent: the call itself did not end
            # (a slot left half moved, whose TRYAGAIN the client retries past the deadline; a
            # slow call): only its shards are left out, not the master's others (a cluster
            # probe: one stuck slot held five shards, flapping, for ten minutes). A failing
            # shard's call bounded by FAILING_DEADLINE fails as failing, without a probe.
            if not isinstance(exc, RedisTimeoutError) and (
                deadline < self.deadline or await self._answers(shards)
            ):
                self.went_failing(shards, exc)  # (a probe of one key answers at once there)
            else:
                self.went_silent(shards, exc)
            raise ShardSilent(shards) from exc
        except Exception as exc:
            if shard_failure(exc):
                self.went_failing(shards, exc)
                raise ShardSilent(shards) from exc
            raise
        if self.failing:  # (a failing shard's call went through: its slot was fixed)
            self.went_through(shards)
        return result

    async def _answers(self, shards: Collection[int]) -> bool:
        """Whether the master of `shards` answers a probe within ANSWER_WITHIN (a quarter of
        the deadline at most)."""
        assert self.redis is not None  # (enabled)
        try:
            within = min(ANSWER_WITHIN, self.deadline / 4)  # (a silent master's calls wait it)
            await wait_for(self.redis.exists(self.probe_key(min(shards))), within)
        except NoPermissionError:  # (an answer all the same)
            return True
        except Exception:
            return False
        return True

    def _stalled(self, late: float) -> None:
        """A call's deadline passed while this process's event loop was held (its timer ran
        `late` seconds late: a host whose CPU is taken, a call into C that holds the GIL):
        its answer may have been waiting unread. The call fails, its shards not marked silent
        (on a loaded host an executor marked every master silent in one millisecond, with no
        fault: a cluster probe); said once a minute."""
        repeats = _STALLS.due("stalled")
        if repeats is not None:
            log.warning(
                "this process's event loop was held past a call's deadline (CPU starved, or a "
                "blocking call on the loop): the call failed, its masters were not marked silent",
                extra={"late_s": round(late, 3), "deadline_s": self.deadline,
                       "repeats": repeats},
            )  # fmt: skip

    async def each(self, calls: Mapping[K, tuple[Collection[int], Awaitable[Any]]]) -> dict[K, Any]:
        """`call` for each of `calls` (key -> (shards, call)), at once; key -> its result or
        the exception it raised."""
        keys = list(calls)
        results = await asyncio.gather(
            *(self.call(*calls[k]) for k in keys), return_exceptions=True
        )
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
        return dict(zip(keys, results, strict=True))

    async def bounded(self, call: Awaitable[T]) -> T:
        """`call`, failing with TimeoutError after the deadline on a cluster, without marking a
        shard silent (a call over several shards, of a periodic task: its next run tries again,
        leaving out the shards found silent meanwhile)."""
        if not self.enabled:
            return await call
        return await wait_for(call, self.deadline)

    def went_silent(self, shards: Collection[int], exc: BaseException) -> None:
        """`shards` did not answer in time: they, and every shard their masters serve, are
        left out until a probe is answered."""
        new = sorted(self._siblings(shards) - self.silent)
        if not new:
            return
        self.silent.update(new)
        SHARDS_SILENT.labels(self.service).set(len(self.held))
        log.warning("shards' master did not answer in time; their calls are left out until it "
                    "answers a probe (the other shards go on)",
                    extra={"shards": new, "deadline_s": self.deadline,
                           "error": describe(exc) or type(exc).__name__})  # fmt: skip
        for shard in new:
            self._probes[shard] = asyncio.create_task(self._probe(shard))

    def went_failing(self, shards: Collection[int], exc: BaseException) -> None:
        """`shards`' calls failed, or did not end in time, though their master answers (a slot
        left half moved, a slot no master serves: `shard_failure`): they alone are left out
        for a while, then tried again; said once per shard until one of its calls goes
        through (they count as left out meanwhile, held or not: `held`)."""
        new = sorted(set(shards) - self.silent)
        if not new:
            return
        self.silent.update(new)
        first = []
        now = asyncio.get_running_loop().time()
        for shard in new:
            self._failed_at[shard] = now
            last = self.failing.get(shard)
            hold = FAILING_FIRST if last is None else min(FAILING_MOST, 2 * last)
            self.failing[shard] = hold
            if last is None:
                first.append(shard)
            task = self._probes[shard] = asyncio.create_task(self._hold(shard, hold))
            self._holding.add(task)  # (one outlives its place in _probes: close stops it)
            task.add_done_callback(self._holding.discard)
        SHARDS_SILENT.labels(self.service).set(len(self.held))
        if first:
            log.warning("shards' calls fail though their master answers (a slot left half "
                        "moved: finish the move, or CLUSTER SETSLOT <slot> STABLE; a slot no "
                        "master serves); left out for a while, then tried again, less often "
                        "while they fail (the other shards go on)",
                        extra={"shards": first,
                               "error": describe(exc) or type(exc).__name__})  # fmt: skip

    async def _hold(self, shard: int, hold: float) -> None:
        """A failing shard's calls are made again after `hold` seconds; it is failing no more
        once FAILING_FORGET seconds pass without a call of it (none went through, none failed:
        the gauge, and the alert on it, would say so for good)."""
        me = asyncio.current_task()
        try:
            await asyncio.sleep(hold)
            self.silent.discard(shard)
            await asyncio.sleep(FAILING_FORGET)
            if self._probes.get(shard) is me and self.failing.pop(shard, None) is not None:
                SHARDS_SILENT.labels(self.service).set(len(self.held))
        finally:
            if self._probes.get(shard) is me:
                del self._probes[shard]

    def went_through(self, shards: Collection[int]) -> None:
        """A call of `shards` went through: those that were failing are no more, once
        FAILING_QUIET seconds passed since their hold ended without another failure."""
        now = asyncio.get_running_loop().time()
        back = sorted(
            s for s in shards
            if s in self.failing
            and now - self._failed_at.get(s, -math.inf) > self.failing[s] + FAILING_QUIET
        )  # fmt: skip
        for shard in back:
            del self.failing[shard]
        if back:
            SHARDS_SILENT.labels(self.service).set(len(self.held))
            log.warning("shards' calls go through again", extra={"shards": back})

    @property
    def held(self) -> set[int]:
        """The shards left out now, or whose last call failed (silent, or failing)."""
        return self.silent | self.failing.keys() if self.failing else self.silent

    def _siblings(self, shards: Collection[int]) -> set[int]:
        """`shards` and the other shards of their masters (a silent master's shards are found
        at once, not one call's deadline after another)."""
        try:
            nodes = {self._node_of(s) for s in shards}
            return set(shards) | {s for s in range(self.shards) if self._node_of(s) in nodes}
        except Exception:  # (a slot with no node known: those named)
            return set(shards)

    def _node_of(self, shard: int) -> str:
        return str(cast(Any, self.redis).get_node_from_key(self.probe_key(shard)).name)

    async def _probe(self, shard: int) -> None:
        """Until `shard` answers: one EXISTS of its key every PROBE_EVERY seconds, each allowed
        PROBE_WAIT seconds (longer than a socket timeout, so that the client sees the node time
        out and reads the cluster's slots again: after a failover the probe reaches the new
        master). An answer ends its silence."""
        assert self.redis is not None  # (enabled)
        try:
            while True:
                await asyncio.sleep(PROBE_EVERY)
                try:
                    await wait_for(self.redis.exists(self.probe_key(shard)), PROBE_WAIT)
                    break
                except NoPermissionError:  # (an answer all the same: a user without EXISTS)
                    break
                except AuthenticationError as exc:  # (an answer: a refusal, not a silence)
                    self._refused(shard, exc)
                    continue
                except Exception:  # (no answer yet, or none to be had: again)
                    continue
            self.silent.discard(shard)
            if shard in self.refused:
                self.refused.discard(shard)
                if not self.refused:
                    report(self.service, "shards", True)
            SHARDS_SILENT.labels(self.service).set(len(self.held))
            self._back.append(shard)
            if len(self._back) == 1:  # (one line for the shards that answer together)
                asyncio.get_running_loop().call_later(PROBE_EVERY, self._say_back)
        finally:
            self._probes.pop(shard, None)

    def _refused(self, shard: int, exc: AuthenticationError) -> None:
        """A silent shard's master refuses this process's user (a password changed on one
        node, a node whose ACL users are missing): not ready until it takes it (a probe: an
        executor stayed ready, its refusals read as a silence), said once per outage."""
        if shard in self.refused:
            return
        if not self.refused:
            report(self.service, "shards", False)
            log.error("a master refuses this process's user: its shards' calls are left out, "
                      "and the process is not ready, until it takes it (check the user and "
                      "password of SUPERSEDE_REDIS_URL on every node)",
                      extra={"shards": sorted(self._siblings([shard])),
                             "error": describe(exc)})  # fmt: skip
        self.refused.add(shard)

    def _say_back(self) -> None:
        back, self._back = sorted(self._back), []
        log.warning("shards' master answers again; their calls are made again",
                    extra={"shards": back})  # fmt: skip

    def close(self) -> None:
        """Stop the probes (the service stops)."""
        for task in {*self._probes.values(), *self._holding}:
            task.cancel()


def first_error(outcomes: Iterable[Any]) -> BaseException | None:
    """The first error of `outcomes` (calls' results, or the exceptions they raised) other
    than a silent shard's."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, ShardSilent):
            return outcome
    return None


def raise_unless_silent(outcomes: Iterable[Any]) -> None:
    """Raise `first_error(outcomes)`, if any."""
    error = first_error(outcomes)
    if error is not None:
        raise error


def _close(call: Awaitable[Any]) -> None:
    """A coroutine never awaited, closed (no 'never awaited' warning)."""
    close = getattr(call, "close", None)
    if close is not None:
        with warnings.catch_warnings():  # (Python 3.11 warns of a coroutine closed unstarted)
            warnings.simplefilter("ignore", RuntimeWarning)
            close()
