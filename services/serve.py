"""`supersede serve`: ingress, admission and an executor as tasks of one process.

The three parts are the services themselves, with one difference: a run request does not cross
the process through Redis streams when it need not. Ingress hands each shard's requests to the
admission of the process, which admits them in one `admit` call with no requests-stream entry,
and that call claims the runs it assigns for the executor of the process while it has free
slots, with no assignment entry and no claim call (`HandOff`). That removes two blocking-read
wake-ups and two script calls from every run's start. What the executor cannot take (no free
slot, a workflow it does not serve) is written to the assignment streams as usual, and runs
that later calls assign (a slot freed, the reaper) go through the streams too. The way back is
every executor's: it applies each turn's results with its own `finish` call, with no
results-stream entry (see the executor's outbox).

Failure stays that of the separate services: a crash before the admit call leaves the inbox
entries pending, and their redelivery makes the same run ids (admission recognises them); a
crash after it leaves RUNNING runs under this executor's lease, which lapses and the reaper
retries them, as for a run claimed from a stream. A result applied in the process is as final
as one applied from a stream; one lost with the process is the at-least-once case of an
executor that dies before its result is written: the lease lapses and the run is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio import Redis

from supersede.config import Settings
from supersede.errors import MalformedItem, WrongShard
from supersede.scripts import HandOver
from supersede.service import serve as serve_service
from supersede.services.admission.service import Admission, AdmissionConfig
from supersede.services.executor.service import Executor, ExecutorConfig
from supersede.services.ingress.service import Ingress, IngressConfig
from supersede.workflow import Workflow


class HandOff:
    """Ingress's sink in `supersede serve`: admits a shard's requests at once, and starts on the
    executor the runs that call claimed for it. `closed`: set once the executor has stopped."""

    def __init__(
        self,
        admission: Admission,
        executor: Executor,
        stop: asyncio.Event,
        closed: asyncio.Event | None = None,
    ) -> None:
        self.admission = admission
        self.executor = executor
        self.stop = stop
        self.closed = closed or asyncio.Event()
        executor.fetcher.handed_over = True  # (all_in_one sets it before the executor starts)

    def _slots(self, requests: int) -> int:
        """The slots this call may fill: at most one per request (the batch's other shards are
        handed over at the same time); none once the process is stopping (the executor drains
        and takes no new run), nor while more assignment entries wait for the executor than it
        has free slots (they go first: newer runs handed over must not starve them)."""
        ex = self.executor
        if self.stop.is_set() or self.closed.is_set() or ex.fetcher.backlog:
            return 0
        return max(0, min(ex.runner.free(), requests))

    async def __call__(self, shard: int, payloads: list[bytes]) -> None:
        ex = self.executor
        free = self._slots(len(payloads))
        ex.runner.handing += 1 if free else 0  # (the drain waits only for runs to start)
        try:
            with ex.runner.reserve(free):
                hand_over = None
                if free:
                    hand_over = HandOver(ex.consumer, ex.config.lease_ms, free, ex.workflows)
                asked = time.monotonic()  # (the leases of the runs it hands over run from then)
                try:
                    r = await self.admission.admit_handed(shard, payloads, hand_over)
                except (MalformedItem, WrongShard):
                    # A request the script refuses: through the stream, where admission's read
                    # dead-letters it with its reason and admits the others.
                    await self.admission.scripts.append_requests(shard, payloads)
                    return
                if not self.closed.is_set():  # (else left to their leases, retried)
                    ex.claimer.start_handed(shard, r.handed, asked)
        finally:
            ex.runner.handing -= 1 if free else 0
        if r.handed:
            await asyncio.sleep(0)  # the new runs reach their first step before ingress goes on


async def all_in_one(
    settings: Settings,
    workflows: Sequence[Workflow],
    config: ExecutorConfig,
    stop: asyncio.Event,
    *,
    ingress: Callable[[asyncio.Event], Awaitable[None]] | None = None,
    hand_off: bool = True,
    admission_config: AdmissionConfig | None = None,
    ingress_config: IngressConfig | None = None,
) -> None:
    """`supersede serve` until `stop`. Ingress starts once the executor registered its
    workflows (an event no workflow listens to yet would be acknowledged, not run) and
    admission is up. On `stop` ingress and the executor stop first (the executor drains as it
    does alone), and admission last, once the executor's results are applied. A part that fails
    sets `stop`, so the others stop the same way, and its error is raised once they have.
    `ingress` stands in for the ingress service (tests); `hand_off` False: every request and
    assignment crosses its stream, as between separate services. `admission_config` and
    `ingress_config`: the parts' settings (their retention and caps), their defaults if None."""
    await _AllInOne(
        settings, workflows, config, stop, ingress, hand_off,
        admission_config or AdmissionConfig(), ingress_config or IngressConfig(),
    ).run()  # fmt: skip


class _AllInOne:
    def __init__(
        self,
        settings: Settings,
        workflows: Sequence[Workflow],
        config: ExecutorConfig,
        stop: asyncio.Event,
        ingress: Callable[[asyncio.Event], Awaitable[None]] | None,
        hand_off: bool,
        admission_config: AdmissionConfig,
        ingress_config: IngressConfig,
    ) -> None:
        self.settings = settings
        self.workflows = workflows
        self.config = config
        self.stop = stop
        self.ingress = ingress
        self.hand_off = hand_off
        self.drained = asyncio.Event()  # the executor stopped
        self.ingress_done = asyncio.Event()  # ingress stopped (or never started)
        self.last = asyncio.Event()  # both did: admission may stop
        self.executor: Executor | None = None
        self.admission: Admission | None = None
        self.failures: list[Exception] = []  # in the order they happened
        self.admission_config = admission_config
        self.ingress_config = ingress_config

    async def run(self) -> None:
        await asyncio.gather(
            self._stopping_all_on_failure(self._executor()),
            self._stopping_all_on_failure(self._admission()),
            self._stopping_all_on_failure(self._ingress_once_ready()),
            self._admission_last(),
        )
        if self.failures:
            raise self.failures[0]

    async def _admission_last(self) -> None:
        """Admission stops once the executor drained (its results applied) and ingress wrote
        its last batch (whose requests it may still be handing over)."""
        await self.drained.wait()
        await self.ingress_done.wait()
        self.last.set()

    async def _stopping_all_on_failure(self, part: Awaitable[None]) -> None:
        try:
            await part
        except Exception as exc:
            self.failures.append(exc)
            self.stop.set()  # the others stop as on SIGTERM: the executor drains, admission last

    def _make_executor(self, redis: Redis) -> Executor:
        self.executor = Executor(redis, self.settings, self.workflows, self.config)
        # from its first read on: a read that held the free slots would leave none to hand over
        self.executor.fetcher.handed_over = self.hand_off
        return self.executor

    def _make_admission(self, redis: Redis) -> Admission:
        self.admission = Admission(redis, self.settings, self.admission_config)
        return self.admission

    def _make_ingress(self, redis: Redis) -> Ingress:
        part = Ingress(redis, self.settings, self.ingress_config)
        if self.hand_off and self.admission is not None and self.executor is not None:
            part.sink = HandOff(self.admission, self.executor, self.stop, self.drained)
        return part

    async def _admission(self) -> None:
        await serve_service(self._make_admission, self.settings, self.last)

    async def _executor(self) -> None:
        try:
            await serve_service(self._make_executor, self.settings, self.stop)
        finally:
            self.drained.set()

    async def _ingress_once_ready(self) -> None:
        try:
            while not self.drained.is_set() and not all(
                part is not None and part.ready for part in (self.executor, self.admission)
            ):
                await asyncio.sleep(0.01)
            if self.drained.is_set():
                return
            if self.ingress is not None:
                await self.ingress(self.stop)
            else:
                await serve_service(self._make_ingress, self.settings, self.stop)
        finally:
            self.ingress_done.set()
