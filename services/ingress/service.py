"""The ingress service: the public inbox to sharded run requests.

Per batch: one XREADGROUP BLOCK on the inbox, then for each event and each workflow it
triggers, a key from the workflow's compiled expression and a run request routed to the shard of
its group; explicit event ids claimed first (`claim_ids`: a republished id appends nothing
within the window); one `append_requests` script call per shard, then one transaction that
writes the dead letters and acknowledges the whole batch. A crash between the two leaves the
entries pending; their redelivery appends the requests again, which admission recognises by
their run records (duplicates change nothing), and dead-letters them exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from supersede import aio, codec, tracing
from supersede.config import Settings, redact, server_time
from supersede.errors import KeyExpressionError, describe
from supersede.health import ShardSilent, raise_unless_silent
from supersede.keyexpr import KeyFn, LimitFn, compile_key, compile_limit
from supersede.lane import Lane, read_then
from supersede.logs import Sampled
from supersede.metrics import HOP_SECONDS
from supersede.model import (
    encode_seq,
    event_digest,
    group_id,
    run_id,
    shard_of_digest,
    shard_of_group,
)
from supersede.protocol import (
    INGRESS_GROUP,
    CutFields,
    Dead,
    Entry,
    Inbox,
    Reason,
    RequestPacker,
    Strategy,
    dead_letter,
    pack_input,
)
from supersede.registry import WorkflowDef, load_all
from supersede.service import Periodic, Service, Throttle, server_now
from supersede.service import serve as serve_service
from supersede.services.ingress import metrics
from supersede.streams import (
    GroupSpec,
    OwnPending,
    RepeatedFields,
    entry_ms,
    group_backlog,
    reported_lag,
    split_deleted,
)
from supersede.trim import trim_consumed

# Key values whose group ingress remembers, shared by the workflows with a limit (each keeps
# its share, at least GROUP_MEMO_LEAST): 100,000 per workflow grew ingress by about 21 MB per
# workflow under many keys, never given back (a churn probe)
GROUP_MEMO = 100_000
GROUP_MEMO_LEAST = 100
READ_BYTES = 64 << 20  # about the most one read of the inbox holds, once entries are large
FIRST_READ = 16  # entries the first read asks for; each read after may ask twice as many
# Routing time after which the part of a read routed so far is written (the rest routed while
# it is): a read of costly events (key expressions over long lists, ~14 ms each) held the
# events routed before them until the whole read was routed, a second and more.
ROUTE_SLICE_S = 0.05


ID_AHEAD_WARN = 60.0  # seconds the inbox's last id may be ahead of the clock unremarked
ID_AHEAD_LOG_EVERY = 300.0  # seconds between two lines that say so (the gauge: each check)
HELD_SWEEP = 30.0  # seconds between re-reads of entries held for shards still silent
UNCHECKED_RETRY = 60.0  # seconds before the check is tried again after the ACL user lacked it
# Seconds with no workflow registered before a warning, then between two: an ingress pointed at
# another namespace or server than the executors' reads nothing and no other alarm rings (its
# own inbox is empty and ready; the deployment's inbox waits unread: a probe).
NO_WORKFLOWS_WARN_EVERY = 60.0


@dataclass(slots=True)
class IngressConfig:
    batch: int = 1000
    block_ms: int = 1000
    refresh_interval: float = 0.25
    trim_interval: float = 5.0  # seconds between two trims of the inbox
    # a consumer of the inbox's group idle this long with nothing pending is deleted (one is
    # left by every ingress process that ever read: restarts, rolling deploys); 0: never
    forget_consumers_ms: int = 3_600_000
    claim_idle_ms: int = 30_000
    inbox_check_interval: float = 10.0  # seconds between two looks at what producers did to it
    dedup_window_ms: int = 86_400_000
    # explicit event ids remembered at most (spread over the shards), the oldest forgotten
    # first, none claimed within dedup_floor_ms (a redelivery comes sooner); 0: no cap
    max_dedup_ids: int = 1_000_000
    dedup_floor_ms: int = 300_000
    max_payload: int = Inbox.MAX_BYTES
    # the dead letters' stream is capped at about this many on each write (0: no cap), so a
    # flood of bad input stays bounded while admission, which trims it too, is down
    max_dead_letters: int = 100_000


class BadEvent(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    id: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    explicit_id: bool = False  # the producer gave `id`: de-duplicated per workflow, any key
    only: str | None = None  # `only_workflow`: the one workflow of the name's to route it to


@dataclass(frozen=True, slots=True)
class Route:
    """One workflow an event name triggers, with its key function compiled for this version."""

    workflow: WorkflowDef
    key: KeyFn | None
    max_runs: int
    strategy: Strategy
    strict: bool
    packer: RequestPacker
    limit: LimitFn | None = None  # a dynamic max_runs, evaluated per event
    groups: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (group, shard)
    memo: int = GROUP_MEMO  # at most this many entries in `groups` (see build_routes); 0: none

    def group_of(self, key: str, shards: int) -> tuple[str, int]:
        """The group id and shard of a key value, memoised (hashing costs more than routing)."""
        hit = self.groups.get(key)
        if hit is None:
            conc = self.workflow.concurrency
            gid = group_id(
                self.workflow.id, self.workflow.version, key, conc.scope if conc else None
            )
            hit = (gid, shard_of_group(gid, shards))
            if self.memo:
                if len(self.groups) >= self.memo:
                    self.groups.clear()
                self.groups[key] = hit
        return hit


def _load_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEvent(Reason.BAD_ENCODING, f"{what} is not valid UTF-8") from None
        raise BadEvent(Reason.BAD_JSON, f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadEvent(Reason.BAD_JSON, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _check_id(event_id: str, raw_id: bytes | None) -> None:
    """Refuse an empty or over-long `id`."""
    if not event_id or len(raw_id or b"") > Inbox.MAX_ID_BYTES:
        raise BadEvent(Reason.BAD_ID, f"`id` must be 1..{Inbox.MAX_ID_BYTES} bytes")


def entry_size(fields: dict[bytes, bytes]) -> int:
    """An inbox entry's bytes: its fields' names and values (repeated ones too; a cut one's
    whole size)."""
    if isinstance(fields, RepeatedFields | CutFields):
        return fields.size
    return sum(len(name) + len(value) for name, value in fields.items())


def _not_msgpack(exc: Exception) -> str:
    """Why `data` is no msgpack map, in the contract's words (msgpack's own name its
    arguments: `unpack(b) received extra data`, `when strict_map_key=True`)."""
    if isinstance(exc, msgpack.ExtraData):  # (what the first value is says the likely slip:
        # JSON text sent as msgpack reads as a small integer, `{` 123; msgpackr's records
        # extension as extension type 114; a producer probe)
        first = exc.unpacked
        if isinstance(first, msgpack.ExtType):
            what = f"an extension type {first.code}"
            if first.code == 114:
                what += " (msgpackr's records: pack with useRecords: false)"
        elif isinstance(first, int) and first in (ord("{"), ord("[")):
            what = f"the integer {first}: JSON text, its encoding is json"
        else:
            kind = type(first).__name__
            what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        return f"is not one msgpack map: its first value is {what}, and bytes follow it"
    if isinstance(exc, ValueError) and "map key" in str(exc):
        return "has a map key that is not a string (keys are strings, as in JSON)"
    if isinstance(exc, msgpack.StackError):
        return "is nested too deep"
    # (FormatError has no message: the class says it)
    return f"is not msgpack: {describe(exc)}"


def parse_event(entry_id: bytes, fields: dict[bytes, bytes], max_payload: int, size: int) -> Event:
    """Validate one inbox entry (of `size` bytes, see entry_size) against the contract (see
    README); raises BadEvent."""
    if size > max_payload:
        raise BadEvent(
            Reason.TOO_LARGE, f"entry of {size} bytes is over the {max_payload} byte limit"
        )
    count = fields.count if isinstance(fields, RepeatedFields) else len(fields)
    if count > Inbox.MAX_FIELDS:
        raise BadEvent(
            Reason.TOO_LARGE, f"entry of {count} fields is over the {Inbox.MAX_FIELDS} limit"
        )
    if isinstance(fields, RepeatedFields):
        names = ", ".join(repr(n.decode("utf-8", "backslashreplace")) for n in fields.repeated[:5])
        raise BadEvent(
            Reason.REPEATED_FIELD,
            f"the entry gives the field {names} more than once (give each once; this letter "
            "keeps the last value of each)",
        )
    raw_name = fields.get(Inbox.NAME)
    if not raw_name:
        said = "no `name` field" if raw_name is None else "an empty `name`"
        raise BadEvent(Reason.MISSING_NAME, f"the entry has {said}")
    try:
        name = raw_name.decode("utf-8")
        raw_id = fields.get(Inbox.ID)
        event_id = raw_id.decode("utf-8") if raw_id is not None else entry_id.decode()
        raw_only = fields.get(Inbox.ONLY_WORKFLOW)
        only = raw_only.decode("utf-8") if raw_only is not None else None
    except UnicodeDecodeError:
        raise BadEvent(
            Reason.BAD_ENCODING, "`name`, `id` or `only_workflow` is not valid UTF-8"
        ) from None
    _check_id(event_id, raw_id)
    encoding = fields.get(Inbox.ENCODING, Inbox.JSON).lower()  # (`JSON` is json)
    if encoding not in (Inbox.JSON, Inbox.MSGPACK):  # (with `data` or without)
        said = encoding.decode("utf-8", "backslashreplace")
        raise BadEvent(Reason.BAD_ENCODING, f"unknown `encoding` {said!r}; use json or msgpack")
    raw_data = fields.get(Inbox.DATA)
    if raw_data is None:
        data: dict[str, Any] = {}
    elif encoding == Inbox.MSGPACK:
        try:
            decoded = msgpack.unpackb(raw_data, raw=False)
        except Exception as exc:
            raise BadEvent(Reason.BAD_MSGPACK, f"`data` {_not_msgpack(exc)}") from None
        if not isinstance(decoded, dict):
            raise BadEvent(
                Reason.BAD_MSGPACK, f"`data` must be a map, got {type(decoded).__name__}"
            )
        data = decoded
    else:
        data = _load_object(raw_data, "`data`")
    raw_meta = fields.get(Inbox.METADATA)
    metadata = _load_object(raw_meta, "`metadata`") if raw_meta is not None else {}
    return Event(name, event_id, data, metadata, raw_id is not None, only)


def build_routes(defs: dict[str, WorkflowDef]) -> dict[str, list[Route]]:
    """Event name -> routes; workflows with the same expression share one compiled function,
    so an event evaluates each distinct expression once."""
    routes: dict[str, list[Route]] = {}
    compiled: dict[str, KeyFn] = {}
    limited = sum(1 for wf in defs.values() if wf.concurrency is not None)
    memo = max(GROUP_MEMO_LEAST, GROUP_MEMO // max(1, limited))
    for wf in sorted(defs.values(), key=lambda w: w.id):
        conc = wf.concurrency
        if conc is None:
            # No limit: the run is assigned at once, outside any group's books (`u`).
            packer = RequestPacker(wf.id, wf.version, 1, Strategy.GROUP_ROUND_ROBIN, False,
                                   wf.max_attempts, unlimited=True)  # fmt: skip
            # (its key is the event's id, never seen again: nothing memoised; it kept 100,000
            # ids, 22 MB, per such workflow, a soak probe)
            route = Route(wf, None, 1, Strategy.GROUP_ROUND_ROBIN, False, packer, memo=0)
        else:
            if conc.expression not in compiled:
                compiled[conc.expression] = compile_key(conc.expression)
            key_fn = compiled[conc.expression]
            strategy = Strategy(conc.limit_strategy)
            fixed = None if isinstance(conc.max_runs, str) else conc.max_runs  # str: per event
            packer = RequestPacker(wf.id, wf.version, fixed, strategy, conc.strict,
                                   wf.max_attempts, debounce_ms=conc.debounce_ms,
                                   max_wait_ms=conc.max_wait_ms,
                                   scoped=bool(conc.scope))  # fmt: skip
            limit = compile_limit(conc.max_runs) if isinstance(conc.max_runs, str) else None
            route = Route(wf, key_fn, fixed or 0, strategy, conc.strict, packer, limit=limit,
                          memo=memo)  # fmt: skip
        for name in wf.events:
            routes.setdefault(name, []).append(route)
    return routes


Sink = Callable[[int, list[bytes]], Awaitable[object]]
"""Takes one shard's packed run requests; done once they are durable (appended or admitted)."""


@dataclass(slots=True)
class Batch:
    """One routed inbox batch, ready to be written."""

    entries: Sequence[Entry]
    started: float
    read_us: int = 0  # wall clock, µs: a point of the path of every run of the batch
    requests: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    workflows: dict[int, list[str]] = field(default_factory=dict)  # parallel to requests
    # (a cluster's, parallel to requests) the inbox entry of each request
    sources: dict[int, list[bytes]] | None = None
    held: set[bytes] = field(default_factory=set)  # entries left pending (a silent shard's)
    held_for: set[int] = field(default_factory=set)  # the silent shards they wait for
    # explicit ids: digest shard -> (digest, inbox entry id, request shard, index in requests)
    ids: dict[int, list[tuple[str, bytes, int, int]]] = field(default_factory=dict)
    dead: list[dict[Any, Any]] = field(default_factory=list)
    unrouted: int = 0
    spans: list[Any] = field(default_factory=list)  # one per run requested (tracing on)
    largest: int = 0  # bytes of its largest entry (see entry_size)


class WriteFailed(Exception):
    """The writes of the batch in flight failed; `reread`: that batch was a re-read."""

    def __init__(self, reread: bool) -> None:
        super().__init__("writes of the batch in flight failed")
        self.reread = reread


class WriteStage:
    """At most one batch's writes in flight while the next batch is read and routed, so neither
    this process nor the server waits on the other. The batch's inbox entries stay pending
    until its own writes are done."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.reread = False

    def start(self, writes: Coroutine[Any, Any, None], reread: bool) -> None:
        self.task = asyncio.create_task(writes)
        self.reread = reread

    def must_finish(self, rereading: bool) -> bool:
        """The batch in flight ends now: it is done (a failure must raise even when no batch
        follows), or the next read re-reads own pending entries, which include its own."""
        return self.task is not None and (self.task.done() or rereading)

    async def finish(self) -> None:
        """Wait for the batch in flight; its failure raises here as WriteFailed."""
        task, self.task = self.task, None
        if task is None:
            return
        try:
            await task
        except Exception as exc:
            raise WriteFailed(self.reread) from exc

    async def settle(self) -> None:
        """Let the batch in flight end, whatever its outcome (after a failure, before a
        re-read, so that no entry is handled twice at once)."""
        with contextlib.suppress(Exception):
            await self.finish()


class Ingress(Service):
    name = "ingress"

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        config: IngressConfig | None = None,
        *,
        consumer: str | None = None,
    ) -> None:
        self.config = config or IngressConfig()
        self.count = min(FIRST_READ, self.config.batch)  # a read asks for (see _fit_reads)
        super().__init__(redis, settings, consumer=consumer)
        self.routes: dict[str, list[Route]] = {}
        self.epoch = -1
        self._housekeeping_due = Throttle(1.0)
        self.dead_lines = Sampled()  # (one line per kind of dead letter in 5 s)
        self._inbox_check_due = Throttle(self.config.inbox_check_interval)
        self._ahead_said: bool | None = None  # what the last check found: stopped, or not
        self._inbox_unchecked_until = 0.0  # monotonic: the ACL user may not check it before
        self._ahead_line_at = -math.inf  # monotonic time of the last line that said so
        self._unrouted_since: float | None = None  # monotonic: since no workflow is registered
        self._unrouted_said = -math.inf  # monotonic time of the last warning that said so
        self._invalid = 0  # stored workflows the last load could not use
        # Where a shard's requests go: the `append_requests` script, unless `supersede serve`
        # hands them to the admission of its own process (services/serve.py).
        self.sink: Sink = self.scripts.append_requests
        self.reads: Lane | None = None  # the inbox reads' own connection, from `main`
        # entries were held for these silent shards (a cluster's): read them again when one
        # of them answers (those still held for another are held again)
        self._held_for: set[int] = set()
        self._held_sweep = Throttle(HELD_SWEEP)

    def groups(self) -> list[GroupSpec]:
        return [(self.keys.events_stream, INGRESS_GROUP)]

    async def prepare(self) -> None:
        await self.refresh()

    def periodic(self) -> Sequence[Periodic]:
        return [(self.config.refresh_interval, self.tick), (self.config.trim_interval, self.trim)]

    async def trim(self) -> None:
        """Trim the inbox below what the ingress group acknowledged (see supersede.trim): the
        inbox's own consumers trim it, so no other role needs a right on it. Every ingress
        process does; the cut is the same whoever computes it. Also forget explicit event ids
        past their window, and now and then the consumers of gone ingress processes in the
        inbox's group."""
        removed = await trim_consumed(self.redis, [self.keys.events_stream])
        if removed:
            metrics.TRIMMED.inc(sum(removed.values()))
        # Explicit event ids past the window are forgotten by the next claim on their shard:
        # with no event carrying an id any more, by this one (a claim of none), 1,000 a shard.
        # (a cluster's silent shards are left out, and each call is bounded: the trim goes on)
        calls = {s: ([s], self._claim_ids(s, [])) for s in range(self.keys.shards)}
        raise_unless_silent((await self.health.each(calls)).values())
        await self.forget_gone_consumers(
            self.groups(), self.config.forget_consumers_ms, metrics.FORGOTTEN_CONSUMERS
        )

    async def tick(self) -> None:
        """Registry refresh; each second, take-over of stale pending entries and inbox lag. A
        refresh that fails (Redis down) makes the lag unknown (NaN: it showed the last value
        read through an outage)."""
        try:
            await self.refresh()
        except BaseException:
            metrics.INBOX_LAG.set(math.nan)
            raise
        if self._housekeeping_due.due():
            if self.routes:  # (no workflow: the inbox waits, another consumer's pending too)
                await self.reclaim()
            await self._measure_lag()
        if self._inbox_check_due.due():
            await self.check_inbox()

    async def refresh(self, read: int | None = None) -> None:
        """Reload the registry when its epoch moved (a cheap GET otherwise; none when the
        epoch was `read` already)."""
        epoch = int(await self.redis.get(self.keys.registry_epoch) or 0) if read is None else read
        if epoch == self.epoch:
            return
        epoch, defs, errors = await load_all(self.redis, self.keys)
        for wid, error in errors.items():
            extra = {"workflow": wid, "error": error}
            self.log.error("invalid stored workflow skipped", extra=extra)
        if self.routes and not defs:
            self.log.warning(
                "no valid workflow is registered (did the server lose its data?): the inbox "
                "waits until one is (executors register theirs again within a second)"
            )
        elif self.epoch == -1 and not defs:
            self.log.info("no valid workflow is registered yet: the inbox waits until one is")
        self.routes = build_routes(defs)  # (empty exactly when no valid workflow is: every
        # workflow listens to an event)
        if self.routes:
            self._unrouted_since = None
        self.epoch = epoch
        metrics.WORKFLOWS.set(len(defs))
        metrics.INVALID_WORKFLOWS.set(len(errors))
        self._invalid = len(errors)
        self.log.info("workflows loaded", extra={"epoch": epoch, "workflows": sorted(defs)})

    def _warn_unrouted(self) -> None:
        """Once no workflow was registered for NO_WORKFLOWS_WARN_EVERY, say so that often,
        naming the namespace and server (the setting to check)."""
        now = time.monotonic()
        since = self._unrouted_since = self._unrouted_since or now
        if (
            now - since < NO_WORKFLOWS_WARN_EVERY
            or now - self._unrouted_said < NO_WORKFLOWS_WARN_EVERY
        ):
            return
        self._unrouted_said = now
        self.log.warning(
            "no valid workflow is registered in this namespace on this server: the inbox is "
            "not read; check SUPERSEDE_NAMESPACE and SUPERSEDE_REDIS_URL against the "
            "executors', or register the workflows (`supersede register MODULE`); `invalid` "
            "counts stored ones this build cannot use (their errors were logged)",
            extra={"namespace": self.keys.namespace, "redis": redact(self.settings.redis_url),
                   "for_s": round(now - since), "invalid": self._invalid},
        )  # fmt: skip

    async def main(self, stop: asyncio.Event) -> None:
        """Read a batch, route it, start its writes; the next read overlaps those writes."""
        stage = WriteStage()
        own = OwnPending([self.keys.events_stream])
        self.reads = self.lane()  # (None: redis-py's pool makes the reads)
        try:
            while not stop.is_set():
                if not self.routes:
                    # No workflow registered at all (a new namespace before its executors
                    # start, or a server that lost its data): read nothing, so no event is
                    # acknowledged with no workflow to run it.
                    self._warn_unrouted()
                    await stage.settle()
                    with contextlib.suppress(TimeoutError):
                        await aio.wait_for(stop.wait(), self.config.refresh_interval)
                    continue
                if self._held_for - self.health.held or (self._held_for and self._held_sweep.due()):
                    # (entries held for silent shards, one of which answers again: read them
                    # again now, and each HELD_SWEEP seconds whatever; while a shard is silent
                    # no sweep re-reads them only to hold them. A failing shard's, once one of
                    # its calls went through: not at each end of its hold, a review)
                    self._held_for = set()
                    own.restart()
                elif not self.health.held:
                    own.sweep_if_due()
                reread = False
                try:
                    if stage.must_finish(own.active):
                        await stage.finish()
                    reread = own.active
                    batches = await self._read(own)
                    if not batches and not reread:  # (a quiet inbox, not an own-pending
                        # sweep, which finds nothing mid-backlog: the next burst may be large)
                        self.count = min(self.count, FIRST_READ, self.config.batch)
                    for entries in batches:
                        largest = 0
                        for batch in self.routed(entries):
                            largest = max(largest, batch.largest)
                            await stage.finish()
                            stage.start(self.write(batch), reread)
                            await asyncio.sleep(0)  # let the writes go out before routing on
                        self._fit_reads(len(entries), largest)
                    self.healthy()
                except Exception as exc:  # redis-py can raise others mid-failover
                    failed_reread = exc.reread if isinstance(exc, WriteFailed) else reread
                    await stage.settle()
                    cause = exc.__cause__ if isinstance(exc, WriteFailed) else exc
                    await self.recover(own, cause or exc, failed_reread=failed_reread)
        finally:
            await stage.settle()

    async def _read(self, own: OwnPending) -> list[list[Entry]]:
        """XREADGROUP BLOCK on the inbox (own pending entries first after a failure); entries
        trimmed away since they were delivered are acknowledged and logged. The registry's
        epoch is read after it, in the same write on a lane (no round trip more), and the
        routes reloaded when it moved: a workflow registered between two refreshes (every
        0.25 s) was in the registry when its first events were published (`publish_runs`
        planned their runs from it), yet ingress routed them by its old routes: acknowledged
        as unrouted, or without the new workflow's runs (an API-user probe lost 3 of 20)."""
        reread = own.active
        reply, epoch = await read_then(
            self.reads, self.redis, own.ids(), ("GET", self.keys.registry_epoch),
            group=(INGRESS_GROUP, self.consumer), count=self.count, block=self.config.block_ms,
        )  # fmt: skip
        own.advance(reply, reread)
        if reply:
            await self.refresh(int(epoch or 0))
            if not self.routes:  # (the registry emptied: none is acknowledged with no workflow
                own.restart()  # to run it; read again, from this process's pending entries)
                return []
        batches = []
        for _, entries in reply or []:
            live, gone = split_deleted(entries)
            if reread and self.taking:  # (a take-over of this process handles them, or did:
                # a sweep that read them too dead-lettered them twice, a security probe)
                live = [e for e in live if not self.taken(e[0])]
            if gone:
                self.pending_deleted(self.keys.events_stream, INGRESS_GROUP, gone)
                await self.redis.xack(self.keys.events_stream, INGRESS_GROUP, *gone)
            if live:
                batches.append(live)
        return batches

    def _fit_reads(self, read: int, largest: int) -> None:
        """Ask the next read (and take-over) for as many entries as READ_BYTES holds of this
        batch's largest, at most twice as many as this one read and --batch: reads are bounded
        by count, and a backlog of large entries (anyone may XADD them; those over
        --max-payload are dead-lettered, but read first) took a gigabyte of memory a read. The
        first read, and the first after a quiet inbox (a read that found nothing), asks for
        FIRST_READ; back to --batch within a few reads of a backlog of small entries."""
        fits = READ_BYTES // max(1, largest)
        grow = 2 * max(read, FIRST_READ // 2)
        self.count = max(1, min(self.config.batch, grow, fits))

    async def handle(self, entries: Sequence[Entry]) -> None:
        """Route and write one batch of inbox entries (taken over: the registry is looked at
        first, as `_read` does)."""
        await self.refresh()
        if not self.routes:  # (left pending: read again once a workflow is registered)
            return
        for batch in self.routed(entries):
            await self.write(batch)

    def routed(self, entries: Sequence[Entry]) -> Iterator[Batch]:
        """The entries of one read as batches to write, in order: one, unless routing them takes
        over ROUTE_SLICE_S; then each part routed in that time is a batch of its own, so what
        was routed is written while the rest is routed."""
        start, read_us = 0, int(server_now() * 1e6)
        while start < len(entries):
            batch = self.route(entries, start, time.perf_counter() + ROUTE_SLICE_S, read_us)
            start += len(batch.entries)
            yield batch

    def route(
        self,
        entries: Sequence[Entry],
        start: int = 0,
        deadline: float = math.inf,
        read_us: int | None = None,
    ) -> Batch:
        """Parse, validate and route `entries` from `start` (no I/O), until `deadline`
        (perf_counter) passes: the batch of those routed, at least one. A bad event becomes a
        dead letter with its reason, and so does one whose handling raised anything at all
        (`internal`, naming the exception): one entry never fails its batch. `read_us`: when
        the entries were read (wall clock, µs; now by default)."""
        batch = Batch(entries, time.perf_counter(), read_us or int(server_now() * 1e6))
        if self.health.enabled:
            batch.sources = {}
        if entries and not start:  # published -> read by ingress, for the read's oldest entry
            HOP_SECONDS.labels("inbox").observe(
                max(0, batch.read_us / 1000 - entry_ms(entries[0][0])) / 1000
            )
        end = start
        for entry_id, fields in itertools.islice(entries, start, None):
            end += 1
            try:
                self._route_entry(batch, entry_id, fields)
            except BadEvent as exc:
                batch.dead.append(self._dead(entry_id, fields, exc.reason, exc.detail))
            except Exception as exc:
                batch.dead.append(self._dead(entry_id, fields, Reason.INTERNAL, describe(exc)))
            if time.perf_counter() > deadline:
                break
        if start or end < len(entries):
            batch.entries = entries[start:end]
        return batch

    def _route_entry(self, batch: Batch, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        size = entry_size(fields)
        if size > batch.largest:
            batch.largest = size
        event = parse_event(entry_id, fields, self.config.max_payload, size)
        if not fields.keys() <= Inbox.FIELDS:
            self._unknown_fields(entry_id, fields)
        routes = self.routes.get(event.name)
        if routes and event.only is not None:
            routes = [route for route in routes if route.workflow.id == event.only]
        if not routes:
            batch.unrouted += 1
            return
        try:
            payload = pack_input(event.data, event.metadata, event.name, event.id)
        except Exception as exc:  # e.g. nesting deeper than msgpack encodes
            raise BadEvent(Reason.BAD_JSON, f"`data` cannot be stored: {describe(exc)}") from None
        seq = encode_seq(entry_id)
        keys_seen: dict[KeyFn, str] = {}
        for route in routes:
            wf = route.workflow
            try:
                key = self._key(route, event, keys_seen)
                gid, shard = route.group_of(key, self.keys.shards)
                digest = event_digest(event.id, wf.id, event.explicit_id)
                rid = run_id(shard, event.id, wf.id, digest)
                limit = route.limit(event.data, event.metadata) if route.limit else None
                tp = self._trace(batch, fields, rid, wf.id, event, key) if self.tracer else ""
                request = route.packer.pack(
                    rid, gid, seq, key, event.id, payload, batch.read_us, tp, limit
                )
            except KeyExpressionError as exc:
                batch.dead.append(self._dead(entry_id, fields, exc.reason, exc.detail, wf.id))
                continue
            except Exception as exc:
                batch.dead.append(
                    self._dead(entry_id, fields, Reason.INTERNAL, describe(exc), wf.id)
                )
                continue
            requests = batch.requests.setdefault(shard, [])
            if event.explicit_id:
                batch.ids.setdefault(shard_of_digest(digest, self.keys.shards), []).append(
                    (digest, entry_id, shard, len(requests))
                )
            requests.append((rid, request))
            batch.workflows.setdefault(shard, []).append(wf.id)
            if batch.sources is not None:
                batch.sources.setdefault(shard, []).append(entry_id)

    async def drop_duplicate_ids(self, batch: Batch) -> int:
        """Claim each explicit (workflow, id) on the shard its digest routes to, and drop the
        requests of ids another inbox entry owns (the same id with another key, hence another
        group and shard, would otherwise make a second run). Returns how many were dropped."""
        id_shards = list(batch.ids)
        calls = {s: ([s], self._claim_ids(s, batch.ids[s])) for s in id_shards}
        if self.health.enabled:  # (a silent shard's ids: their entries wait, appending nothing)
            owned = list((await self.health.each(calls)).values())
            raise_unless_silent(owned)
        else:
            owned = await aio.gather(*(call for _, call in calls.values()))
        drop: dict[int, set[int]] = {}
        dropped = 0
        for s, flags in zip(id_shards, owned, strict=True):
            silent = isinstance(flags, ShardSilent)
            for (_, entry_id, shard, index), mine in zip(
                batch.ids[s], [False] * len(batch.ids[s]) if silent else flags, strict=True
            ):
                if not mine:
                    drop.setdefault(shard, set()).add(index)
                    if silent:
                        batch.held.add(entry_id)
                        batch.held_for.add(s)
                    else:
                        dropped += 1
        for shard, gone in drop.items():
            keep = [i for i in range(len(batch.requests[shard])) if i not in gone]
            batch.requests[shard] = [batch.requests[shard][i] for i in keep]
            batch.workflows[shard] = [batch.workflows[shard][i] for i in keep]
            if batch.sources is not None:
                batch.sources[shard] = [batch.sources[shard][i] for i in keep]
            if not keep:
                del batch.requests[shard], batch.workflows[shard]
        batch.ids = {}
        return dropped

    def _claim_ids(
        self, shard: int, ids: list[tuple[str, bytes, int, int]]
    ) -> Awaitable[list[bool]]:
        return self.scripts.claim_ids(
            shard,
            [(d, e) for d, e, _, _ in ids],
            window_ms=self.config.dedup_window_ms,
            max_ids=self.keys.share(self.config.max_dedup_ids),
            floor_ms=self.config.dedup_floor_ms,
        )

    def _trace(
        self,
        batch: Batch,
        fields: dict[bytes, bytes],
        rid: str,
        workflow: str,
        event: Event,
        key: str,
    ) -> str:
        """Start the run's ingress span (it continues the entry's `traceparent`, if any) and
        return its context, which travels with the run; it ends when the request is written."""
        span = self.tracer.start_span(
            "supersede.ingress",
            context=tracing.context_of(fields.get(Inbox.TRACEPARENT)),
            kind=tracing.kind("PRODUCER"),
            start_time=tracing.ns(batch.read_us / 1000),
            attributes={"supersede.run_id": rid, "supersede.workflow": workflow,
                        "supersede.event": event.name, "supersede.key": key},
        )  # fmt: skip
        batch.spans.append(span)
        return tracing.traceparent_of(span)

    async def write(self, batch: Batch) -> None:
        """Claim explicit ids, append the requests (one script call per shard), then dead
        letters + XACK at once."""
        try:
            await self._write(batch)
        except BaseException as exc:
            for span in batch.spans:
                span.record_exception(exc)
                span.end()
            raise
        for span in batch.spans:
            span.end()

    async def _write(self, batch: Batch) -> None:
        if batch.sources is not None and self.health.silent:
            _hold_silent(batch, self.health.silent)
        dropped = await self.drop_duplicate_ids(batch) if batch.ids else 0
        shard_ids = list(batch.requests)
        if batch.sources is None or self.sink != self.scripts.append_requests:
            # (`supersede serve`'s hand-over is not bounded: cancelled, the runs it claimed
            # would wait for a lease, never started)
            await aio.gather(*(self.sink(s, [p for _, p in batch.requests[s]]) for s in shard_ids))
        else:
            shard_ids = await self._append_answering(batch, shard_ids)
        # One transaction on a single server: a crash cannot duplicate a dead letter. A cluster
        # refuses a transaction over two slots, so there the dead letters are written first and
        # the acknowledgement after: at least once, never lost.
        # Without dead letters the acknowledgement alone needs no transaction.
        done = self._note_held(batch) if batch.held else [e for e, _ in batch.entries]
        lane = self.scripts.lane
        if not done and not batch.dead:
            pass  # (every entry held)
        elif lane is not None and not batch.dead:
            await lane.execute("XACK", self.keys.events_stream, INGRESS_GROUP, *done)
        else:
            atomic = bool(batch.dead) and not isinstance(self.redis, RedisCluster)
            async with self.redis.pipeline(transaction=atomic) as pipe:
                cap = self.config.max_dead_letters or None
                for body in batch.dead:
                    pipe.xadd(self.keys.dead_stream, body, maxlen=cap, approximate=True)
                if done:
                    pipe.xack(self.keys.events_stream, INGRESS_GROUP, *done)
                await pipe.execute()
        metrics.EVENTS.inc(len(done))
        metrics.UNROUTED.inc(batch.unrouted)
        metrics.DEDUPLICATED.inc(dropped)
        appended: dict[str, int] = {}
        for shard in shard_ids:
            for wid in batch.workflows[shard]:
                appended[wid] = appended.get(wid, 0) + 1
        for wid, n in appended.items():
            metrics.RUNS_REQUESTED.labels(wid).inc(n)
        for body in batch.dead:  # (said once written: a server at its maxmemory refused the
            # letters, and each retry of the batch said they were written)
            reason, workflow = str(body[Dead.REASON]), body.get(Dead.WORKFLOW)
            metrics.DEAD_LETTERS.labels(reason).inc()
            repeats = self.dead_lines.due((reason, workflow))
            if repeats is not None:
                entry = body[Dead.ENTRY]
                extra = {"entry": entry.decode() if isinstance(entry, bytes) else entry,
                         "reason": reason, "workflow": workflow, "repeats": repeats}  # fmt: skip
                self.log.warning("event dead-lettered", extra=extra)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - batch.started)
        HOP_SECONDS.labels("ingress").observe(max(0.0, server_now() - batch.read_us / 1e6))

    def _note_held(self, batch: Batch) -> list[bytes]:
        """The entries of a batch that held some (a cluster's silent shards) to acknowledge;
        the held ones are read again when one of their shards answers, or HELD_SWEEP later."""
        metrics.EVENTS_HELD.inc(len(batch.held))
        if not self._held_for:  # (the first hold: its backstop re-read is HELD_SWEEP away)
            self._held_sweep.due()
        self._held_for |= batch.held_for
        # (its dead letters too: written when the entry is handled whole, once)
        batch.dead = [d for d in batch.dead if d[Dead.ENTRY] not in batch.held]
        return [e for e, _ in batch.entries if e not in batch.held]

    async def _append_answering(self, batch: Batch, shard_ids: list[int]) -> list[int]:
        """A cluster's appends, one call per shard, each bounded (ShardHealth): the entries
        with a request for a shard whose master is silent are held (left pending, read again
        by the sweep of own pending entries once it answers; the requests they had appended
        elsewhere are appended again then, which admission recognises). The shards appended."""
        done = await self.health.each(
            {s: ([s], self.sink(s, [p for _, p in batch.requests[s]])) for s in shard_ids}
        )
        raise_unless_silent(list(done.values()))
        sources = batch.sources or {}
        for s, outcome in done.items():
            if isinstance(outcome, ShardSilent):
                batch.held.update(sources[s])
                batch.held_for.add(s)
        return [s for s, outcome in done.items() if not isinstance(outcome, ShardSilent)]

    def _unknown_fields(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """An event with fields the contract does not define: ignored (a producer may add its
        own), but counted and said, sampled: a typo of `metadata` or `id` (`metdata`) dropped
        them without a word (an API-user probe)."""
        metrics.UNKNOWN_FIELDS.inc()
        repeats = self.dead_lines.due("unknown_fields")
        if repeats is None:
            return
        unknown = sorted(k for k in fields if k not in Inbox.FIELDS)
        said = [k[:64].decode("utf-8", "backslashreplace") for k in unknown[:5]]
        known = ", ".join(sorted(k.decode() for k in Inbox.FIELDS))
        self.log.warning(
            "inbox event has fields the inbox contract does not define: ignored (a misspelt "
            f"field is lost; the contract's: {known})",
            extra={"entry": entry_id.decode(), "fields": said, "repeats": repeats},
        )

    @staticmethod
    def _key(route: Route, event: Event, seen: dict[KeyFn, str]) -> str:
        if route.key is None:
            return event.id
        key = seen.get(route.key)
        if key is None:
            key = seen[route.key] = route.key(event.data, event.metadata)
        return key

    def _dead(
        self,
        entry_id: bytes,
        fields: dict[bytes, bytes],
        reason: str,
        detail: str,
        workflow: str | None = None,
    ) -> dict[Any, Any]:
        return dead_letter(fields, entry_id, reason, detail, workflow=workflow)

    async def reclaim(self) -> None:
        """XAUTOCLAIM inbox entries another ingress process read and never acknowledged. Not
        while a shard is silent: this process's own entries held for it would be taken over
        (idle, pending), handled and held again every --claim-idle-ms."""
        if self.health.held:
            return

        async def handle(entries: list[Entry]) -> None:
            metrics.RECLAIMED.inc(len(entries))
            await self.handle(entries)

        async def claim(start: str | bytes) -> tuple[bytes, list[Entry], list[bytes]]:
            # (an entry over --max-payload comes back cut: one of 250 MB killed each process
            # that took it over, past its memory limit, for good; a security probe)
            return await self.scripts.take_inbox(
                INGRESS_GROUP, self.consumer, self.config.claim_idle_ms, start,
                self.count, self.config.max_payload,
            )  # fmt: skip

        await self.take_over(
            self.keys.events_stream,
            INGRESS_GROUP,
            self.config.claim_idle_ms,
            self.count,  # (what the reads ask for: the entries another ingress died on, maybe)
            handle,
            claim,
        )

    async def _measure_lag(self) -> None:
        """The inbox entries ingress has not handled: unread, or read and not acknowledged (an
        ingress that reads but cannot write keeps reading: its entries pile up pending)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(self.keys.events_stream)
            pipe.xlen(self.keys.events_stream)
            # (an XLEN refused, by a user from before ingress had the right, leaves no cap)
            groups, length = await pipe.execute(raise_on_error=False)
        metrics.INBOX_LAG.set(group_backlog(groups, INGRESS_GROUP, length) or 0)
        if reported_lag(groups, INGRESS_GROUP):
            await self.heal_lags([(self.keys.events_stream, INGRESS_GROUP)])

    async def check_inbox(self) -> None:
        """Say what producers did to the inbox that ingress cannot undo: a last id ahead of the
        clock (every `inbox_check_interval`, 10 s: XINFO STREAM returns the first and last
        entries whole)."""
        if time.monotonic() < self._inbox_unchecked_until:
            return
        try:
            stream = await self.redis.xinfo_stream(self.keys.events_stream)
        except NoPermissionError:  # (a user from before ingress had the right: said once, and
            # tried again each minute, so the roles applied again need no restart)
            if self._inbox_unchecked_until == 0:
                self.log.warning(
                    "the inbox's last id is not checked: ingress's ACL user lacks XINFO STREAM; "
                    "apply the roles again (supersede acl --apply --role ingress)"
                )
            self._inbox_unchecked_until = time.monotonic() + UNCHECKED_RETRY
            return
        except ResponseError:  # (no inbox yet)
            return
        self._check_last_id(stream.get("last-generated-id"), await server_time(self.redis))

    def _check_last_id(self, last: Any, now: float) -> None:
        """Say so when the inbox's last id is ahead of the server's clock: a producer's XADD
        with an explicit id moved every later event's id (the largest possible id stops every
        XADD). The gauge each check, a line at most every ID_AHEAD_LOG_EVERY."""
        if not last:
            return
        ms, _, seq = codec.text(last).partition("-")
        ahead = max(0.0, int(ms) / 1000 - now)
        metrics.INBOX_ID_AHEAD.set(ahead)
        stopped = int(ms) == int(seq or 0) == 2**64 - 1
        said, self._ahead_said = self._ahead_said, (None if ahead < ID_AHEAD_WARN else stopped)
        if self._ahead_said is None:
            return
        if said == stopped and time.monotonic() - self._ahead_line_at < ID_AHEAD_LOG_EVERY:
            return
        self._ahead_line_at = time.monotonic()
        self.log.error(
            "the inbox's last entry id is ahead of the clock: an XADD gave an explicit id, "
            + ("the largest there is, so every XADD to the inbox fails; "
               if stopped else "and every later entry gets an id after it; ")
            + "repair it as README's \"Publishing events\" says (XDEL, XSETID, XGROUP SETID)",
            extra={"stream": self.keys.events_stream, "last_id": codec.text(last),
                   "ahead_seconds": round(ahead)},
        )  # fmt: skip


def _hold_silent(batch: Batch, silent: set[int]) -> None:
    """Hold whole, before any call, the entries with a request or an explicit id on a `silent`
    shard: none of their requests is appended (appended to the other shards now, they would be
    appended again when the entries are read again)."""
    sources = batch.sources or {}
    held = {e for s in silent for e in sources.get(s, ())}
    held.update(e for s in silent for _, e, _, _ in batch.ids.get(s, ()))
    if not held:
        return
    batch.held |= held
    batch.held_for |= {s for s in silent if s in sources or s in batch.ids}
    remap: dict[int, dict[int, int]] = {}  # shard -> old index -> new (of its requests)
    for shard in list(batch.requests):
        keep = [i for i, e in enumerate(sources[shard]) if e not in held]
        remap[shard] = {old: new for new, old in enumerate(keep)}
        batch.requests[shard] = [batch.requests[shard][i] for i in keep]
        batch.workflows[shard] = [batch.workflows[shard][i] for i in keep]
        sources[shard] = [sources[shard][i] for i in keep]
        if not keep:
            del batch.requests[shard], batch.workflows[shard], sources[shard]
    for s in list(batch.ids):
        ids = [(d, e, sh, remap[sh][i]) for d, e, sh, i in batch.ids[s] if e not in held]
        if ids:
            batch.ids[s] = ids
        else:
            del batch.ids[s]


async def serve(settings: Settings, config: IngressConfig, stop: asyncio.Event) -> None:
    """Run one ingress process until `stop` is set."""
    await serve_service(lambda redis: Ingress(redis, settings, config), settings, stop)
