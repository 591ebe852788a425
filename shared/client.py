"""Publishing events from Python (the same contract as a plain `XADD <ns>:events`), reading
the runs they made (`get_run`, `wait_for_run`), and cancelling them (`cancel`, `cancel_key`).

Fields: `name` (the event name), `data` (a JSON object as text), optional `id` (idempotency key;
default: the stream entry id) and optional `metadata` (a JSON object as text).
"""

from __future__ import annotations

import asyncio
import contextlib
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
import redis as redis_sync
from redis.asyncio import Redis, RedisCluster

from supersede import codec, tracing
from supersede.config import DEFAULT_NAMESPACE
from supersede.errors import SupersedeError
from supersede.keys import Keys, ShardKeys, inbox_stream
from supersede.lookups import SERVED_NOW_MS, served_ms_ago
from supersede.model import shard_of_run
from supersede.protocol import Dead, Inbox, RunRecord


def event_fields(
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[bytes, bytes]:
    """The inbox fields of one event, with the caller's `traceparent` when an OpenTelemetry
    span is current; raises TypeError/ValueError on a bad argument."""
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    if not isinstance(data, dict):
        raise TypeError("data must be a dict (a JSON object)")
    fields = {Inbox.NAME: name.encode(), Inbox.DATA: orjson.dumps(data)}
    if id is not None:
        fields[Inbox.ID] = str(id).encode()
        if not 1 <= len(fields[Inbox.ID]) <= Inbox.MAX_ID_BYTES:  # (ingress dead-letters it)
            raise ValueError(
                f"the event's id (`id`, the CLI's --id) must be 1..{Inbox.MAX_ID_BYTES} bytes "
                "of UTF-8"
            )
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict (a JSON object)")
        fields[Inbox.METADATA] = orjson.dumps(metadata)
    traceparent = tracing.current_traceparent()  # the caller's trace goes on into the run's
    if traceparent:
        fields[Inbox.TRACEPARENT] = traceparent.encode()
    return fields


def _check_client(redis: Any, *, text_ok: bool = False) -> None:
    """Refuse, in one line, a client these helpers cannot use: a blocking one (they are
    coroutines), or one made with decode_responses=True (they read bytes: a probe's got a
    UnicodeDecodeError of 34 lines from get_run)."""
    if isinstance(redis, redis_sync.Redis | redis_sync.RedisCluster):
        raise TypeError(
            "supersede.client's helpers take a redis.asyncio client (supersede.connect(url)); "
            "with a blocking one, use publish_sync"
        )
    encoder = getattr(redis, "get_encoder", None)
    if not text_ok and encoder is not None and getattr(encoder(), "decode_responses", False):
        raise ValueError(
            "supersede.client's helpers need a client made without decode_responses=True "
            "(they read bytes): supersede.connect(url), or Redis.from_url(url)"
        )


def _namespace(namespace: str | None) -> str:
    """The given namespace, else SUPERSEDE_NAMESPACE, else the default."""
    return namespace or os.environ.get("SUPERSEDE_NAMESPACE", DEFAULT_NAMESPACE)


def inbox(namespace: str | None = None) -> str:
    return inbox_stream(_namespace(namespace))


async def publish(
    redis: Redis,
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> str:
    """Append one event to the inbox; returns its stream entry id."""
    _check_client(redis, text_ok=True)
    fields = event_fields(name, data, id=id, metadata=metadata)
    entry = await redis.xadd(inbox(namespace), fields)  # type: ignore[arg-type]
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def publish_sync(
    redis: redis_sync.Redis,
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
    namespace: str | None = None,
) -> str:
    """`publish` for synchronous code."""
    if isinstance(redis, Redis | RedisCluster):  # (its xadd made a coroutine, never awaited:
        raise TypeError(  # the event was lost and a '<coroutine ...>' returned as its id)
            "publish_sync takes a blocking client (supersede.connect_sync(url)); with a "
            "redis.asyncio one, await supersede.publish(...)"
        )
    fields = event_fields(name, data, id=id, metadata=metadata)
    entry = redis.xadd(inbox(namespace), fields)  # type: ignore[arg-type]
    return entry.decode() if isinstance(entry, bytes) else str(entry)


@dataclass(frozen=True, slots=True)
class Run:
    """A run as an application sees it: `state` is the RunState name (QUEUED ... CANCELLED)."""

    id: str
    workflow: str
    key: str
    state: str
    attempt: int
    outputs: dict[str, Any]  # step name -> what the step returned (runs that ended S or F)
    error: str | None
    reason: str | None  # why it was cancelled or failed (superseded, manual, ...)
    cancelled_by: str | None  # the newer run that superseded it
    superseded_by: tuple[str, ...]  # cancelled_by, then the run that superseded that one, ...
    created_ms: int | None
    ended_ms: int | None
    entry: str | None = None  # the inbox entry of its event ('<ms>-<seq>')

    @property
    def ended(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


async def read_run(
    redis: Redis, namespace: str, run_id: str, *, follow: bool = False
) -> tuple[RunRecord, dict[str, Any]] | None:
    """A run's record and its step outputs (one round trip); None when there is no such run.
    `follow` (a person's lookup by id): a run id `publish` planned whose run went to another
    shard (a new version registered before ingress read the event: see lookups.moved_run)
    gives that run, its own id in its record."""
    found = await _read_run(redis, namespace, run_id)
    if found is None and follow:
        moved = await _moved(redis, namespace, run_id)
        return await _read_run(redis, namespace, moved.id) if moved is not None else None
    return found


async def _read_run(
    redis: Redis, namespace: str, run_id: str
) -> tuple[RunRecord, dict[str, Any]] | None:
    sk = ShardKeys(namespace, shard_of_run(run_id))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(sk.runs_hash, run_id)
        pipe.hget(sk.outputs_hash, run_id)
        raw, out = await pipe.execute()
    if raw is None:
        return None
    return RunRecord.decode(run_id, raw), codec.unpack(codec.blob(out)) if out else {}


async def _moved(
    redis: Redis, namespace: str, run_id: str, entry: str | None = None
) -> RunRecord | None:
    from supersede.lookups import moved_run

    keys = await _stored_keys(redis, namespace)
    return await moved_run(redis, keys, run_id, entry) if keys is not None else None


async def get_run(redis: Redis, run_id: str, *, namespace: str | None = None) -> Run | None:
    """One run by id (as `publish` results and `supersede runs` show them), with its step
    outputs and the chain of newer runs that superseded it; None when there is no such run
    (never created, or removed after its retention)."""
    _check_client(redis)
    ns = _namespace(namespace)
    found = await read_run(redis, ns, run_id)
    if found is None:
        return None
    rec, outputs = found
    chain: list[str] = []
    nxt = rec.cancelled_by
    while nxt and nxt not in chain and len(chain) < 100:
        chain.append(nxt)
        newer = await read_run(redis, ns, nxt)
        nxt = newer[0].cancelled_by if newer and newer[0].state.name == "CANCELLED" else None
    return Run(
        id=rec.id,
        workflow=rec.workflow,
        key=rec.key,
        state=rec.state.name,
        attempt=rec.attempt,
        outputs=outputs,
        error=rec.error,
        reason=rec.reason,
        cancelled_by=rec.cancelled_by,
        superseded_by=tuple(chain),
        created_ms=rec.created_ms,
        ended_ms=rec.ended_ms,
        entry=rec.entry,
    )


async def wait_for_run(
    redis: Redis,
    run_id: str,
    timeout: float = 30.0,
    *,
    namespace: str | None = None,
    poll: float = 0.05,
    entry: str | None = None,
    workflow: str | None = None,
) -> Run:
    """The run once it ended (SUCCEEDED, FAILED or CANCELLED); TimeoutError after `timeout`
    seconds. A run id from `publish_runs` may not exist yet for a few milliseconds: that is
    waited for too. `entry`: the inbox entry of the event (as `publish_runs` returns it); when
    an earlier entry owns its explicit id (a duplicate publish: ingress makes no new run), the
    run of that entry is waited for instead, and returned (its id differs when its key did);
    when ingress dead-lettered the event (or, given the run's `workflow`, refused it for that
    workflow), DeadLettered (a WaitTimeout) says why, at once. A server that does not answer
    ends the wait within a second of `timeout` all the same."""
    _check_client(redis)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if timeout < 0:
        raise ValueError(f"timeout must be 0 or more seconds, got {timeout}")
    seen: list[Run | None] = [None]
    try:
        async with asyncio.timeout(timeout + WAIT_SLACK):  # (the polls' own deadline first)
            return await _wait_for_run(
                redis, run_id, timeout, seen, namespace=namespace, poll=poll, entry=entry,
                workflow=workflow,
            )  # fmt: skip
    except WaitTimeout:
        raise
    except TimeoutError:  # (a call the server did not answer in time)
        raise await _not_ended(redis, run_id, timeout, seen[0], namespace) from None


async def _not_ended(
    redis: Redis, run_id: str, timeout: float, run: Run | None, namespace: str | None
) -> WaitTimeout:
    """The WaitTimeout of a run not ended within `timeout`; for one never seen, it names the
    namespace when nothing is in it (a wrong namespace= waited in silence)."""
    state = run.state if run else "not created yet"
    ns = _namespace(namespace)
    if run is None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                if await _stored_keys(redis, ns) is None:
                    state += f"; nothing is in namespace {ns!r}: is namespace= the deployment's?"
    elif run.state in ("QUEUED", "ASSIGNED"):  # (its pool scaled to zero, or never started)
        with contextlib.suppress(Exception):  # (briefly: the wait ends within WAIT_SLACK)
            async with asyncio.timeout(WAIT_SLACK / 4):
                last = await served_ms_ago(redis, Keys(ns, 1), run.workflow)
                if last is None or last >= SERVED_NOW_MS:
                    state += f"; no executor serves workflow {run.workflow} now"
    return WaitTimeout(run_id, f"run {run_id} has not ended after {timeout}s ({state})")


async def _wait_for_run(
    redis: Redis,
    run_id: str,
    timeout: float,
    seen: list[Run | None],
    *,
    namespace: str | None,
    poll: float,
    entry: str | None,
    workflow: str | None,
) -> Run:
    """`wait_for_run`'s polls; `seen[0]` the run as last read."""
    deadline = time.monotonic() + timeout
    next_dead_look = time.monotonic() + DEAD_LOOK_AFTER
    while True:
        run = seen[0] = await get_run(redis, run_id, namespace=namespace)
        if run is not None and run.ended:
            return run
        if run is None and entry is not None:
            first = await duplicate_of(redis, run_id, entry, namespace=namespace)
            if first is not None and first[1] is not None:
                run_id = first[1]
                continue
            now = time.monotonic()
            if now >= next_dead_look or now > deadline:
                next_dead_look = now + DEAD_LOOK_EVERY
                dead = await dead_letter_of(redis, entry, workflow, namespace=namespace)
                if dead is not None:
                    raise DeadLettered(run_id, *dead)
                # the event's run on another shard than planned (a new version registered
                # meanwhile: --wait said NOT_CREATED for a run that had succeeded, a probe)
                moved = await _moved(redis, _namespace(namespace), run_id, entry)
                if moved is not None:
                    run_id = moved.id
                    continue
        if time.monotonic() > deadline:
            raise await _not_ended(redis, run_id, timeout, run, namespace)
        await asyncio.sleep(poll)


DEAD_LOOK_AFTER = 0.5  # s: a run not created by then may be a dead-lettered event's
# s past a wait's timeout at which a call the server does not answer ends it (the polls stop
# at the timeout, after a last look: a bound at the timeout itself cut that look short)
WAIT_SLACK = 1.0
DEAD_LOOK_EVERY = 1.0  # s between two looks at the dead letters while waiting


async def dead_letter_of(
    redis: Redis,
    entry: str,
    workflow: str | None = None,
    *,
    namespace: str | None = None,
    count: int = 1000,
) -> tuple[str, str] | None:
    """(reason, detail) of a dead letter ingress wrote for inbox entry `entry` that means no
    run of `workflow` comes of it: one for the whole event (too large, bad JSON...), or one
    for that workflow (its key expression failed); None when there is none among the first
    `count` dead letters written since that entry. (With `workflow` None, only a whole
    event's counts. Admission's dead letters, of requests and results, name their stream.)"""
    _check_client(redis)
    keys = Keys(_namespace(namespace), 1)
    start = f"{entry.partition('-')[0]}-0"
    letters: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(
        keys.dead_stream, min=start, count=count
    )  # type: ignore[assignment]
    for _, fields in letters:
        if codec.text(fields.get(Dead.ENTRY.encode(), b"")) != entry:
            continue
        if Dead.STREAM.encode() in fields:  # (admission's: an id of another stream)
            continue
        of = fields.get(Dead.WORKFLOW.encode())
        if of is not None and codec.text(of) != workflow:  # another workflow's key failed
            continue
        reason = codec.text(fields.get(Dead.REASON.encode(), b""))
        return reason, codec.text(fields.get(Dead.DETAIL.encode(), b""))
    return None


class WaitTimeout(TimeoutError):
    """`wait_for_run` ran out of time; `run_id` is the run it was waiting for (the first
    event's run when it followed a duplicate publish)."""

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class DeadLettered(WaitTimeout):
    """The event `wait_for_run` waited for a run of was dead-lettered by ingress (`reason`,
    `detail`): that run will never exist."""

    def __init__(self, run_id: str, reason: str, detail: str) -> None:
        super().__init__(
            run_id, f"run {run_id} will not be created: the event was dead-lettered ({reason}: "
            f"{detail}); see `supersede dead`",
        )  # fmt: skip
        self.reason = reason
        self.detail = detail


async def _stored_keys(redis: Redis, ns: str) -> Keys | None:
    """The namespace's keys with the shard count stored in it; None before a service pinned
    one (nothing was routed there yet)."""
    shards = await redis.hget(Keys(ns, 1).config_hash, "shards")
    return Keys(ns, int(shards)) if shards else None


async def cancel(redis: Redis, run_id: str, *, namespace: str | None = None) -> bool:
    """Cancel one run, as `supersede cancel ID` does (reason `manual`; a running handler is
    stopped as a superseded one is): True when this call cancelled it, False when it had ended
    or was being cancelled already (CANCELLING: its handler stopping).
    LookupError when there is no such run; ValueError for what is no run id."""
    _check_client(redis)
    from supersede.lookups import cancel_runs, require_run
    from supersede.scripts import Scripts

    shard_of_run(run_id)  # (ValueError for what is no run id, before any lookup)
    keys = await _deployment(redis, namespace)
    await require_run(redis, keys, run_id)
    return (await cancel_runs(Scripts(redis, keys), [run_id]))[run_id]


async def cancel_key(
    redis: Redis, workflow: str, key: str, *, namespace: str | None = None
) -> list[str]:
    """Cancel every live run (queued, assigned, running, waiting out a debounce window) of one
    key of `workflow`, whatever its version, as `supersede cancel --workflow W --key K` does:
    the ids of the runs this call cancelled. LookupError for a workflow never registered."""
    _check_client(redis)
    for what, value in (("workflow", workflow), ("key", key)):
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    from supersede.lookups import cancel_key as cancel_of_key
    from supersede.lookups import require_workflow
    from supersede.scripts import Scripts

    keys = await _deployment(redis, namespace)
    await require_workflow(redis, keys, workflow)
    done = await cancel_of_key(redis, Scripts(redis, keys), workflow, key)
    return [rid for rid, cancelled in done.items() if cancelled]


async def _deployment(redis: Redis, namespace: str | None) -> Keys:
    """The namespace's keys; LookupError naming it before any service started there."""
    ns = _namespace(namespace)
    keys = await _stored_keys(redis, ns)
    if keys is None:
        raise LookupError(
            f"nothing in namespace {ns!r} yet (no service has started there): is namespace= "
            "(SUPERSEDE_NAMESPACE) the deployment's?"
        )
    return keys


async def duplicate_of(
    redis: Redis, run_id: str, entry: str, *, namespace: str | None = None
) -> tuple[str, str | None] | None:
    """For a run planned for an event published with an explicit id as inbox entry `entry`:
    when an earlier entry already owns that id (ingress then makes no run of it), that entry
    and its run of the same workflow (None while it is not created yet); None when the id is
    this entry's, or ingress has not claimed it yet."""
    from supersede.model import shard_of_digest

    keys = await _stored_keys(redis, _namespace(namespace))
    if keys is None:
        return None
    digest = run_id.partition("-")[2]
    owner = await redis.hget(keys.shard(shard_of_digest(digest, keys.shards)).ids_hash, digest)
    if owner is None or codec.text(owner) == entry:
        return None
    # (a run id is '<shard of its group>-<digest of (event id, workflow)>': the first event's
    # run has the same digest, on the shard of its own key)
    candidates = [(sk, f"{sk.shard}-{digest}") for sk in keys.all_shards()]
    async with redis.pipeline(transaction=False) as pipe:
        for sk, rid in candidates:
            pipe.hget(sk.runs_hash, rid)  # (HGET: the CLI's operator user may read, not HEXISTS)
        found = await pipe.execute()
    runs = [RunRecord.decode(rid, raw) for (_, rid), raw in zip(candidates, found, strict=True)
            if raw is not None]  # fmt: skip
    # (the newest: an id used again after the de-duplication window, with another key, left
    # an older run of the same digest on another shard)
    runs.sort(key=lambda r: r.created_ms or 0)
    return codec.text(owner), runs[-1].id if runs else None


@dataclass(frozen=True, slots=True)
class PlannedRun:
    """A run an event will make: its workflow, key value and run id (for `get_run`). For an
    explicit id published before, `duplicate_of` is the inbox entry that owns it: the event
    makes no run, and `run_id` and `key` are the first event's run's (the planned ones while
    that run is not found: not created yet, or past its retention)."""

    workflow: str
    key: str
    run_id: str
    duplicate_of: str | None = None


def plan_runs(
    defs: dict[str, Any], name: str, data: dict[str, Any], event_id: str, shards: int,
    metadata: dict[str, Any] | None = None, explicit: bool = False,
) -> list[PlannedRun]:  # fmt: skip
    """The runs ingress makes of one event under the registered definitions `defs` (id ->
    WorkflowDef): the same key, group, shard and run id. `event_id` is the explicit `id`
    (`explicit`) or the inbox entry id. A key expression, or a `max_runs` expression, that
    fails for this input makes no run (ingress dead-letters the event for that workflow: a
    failing `max_runs` was planned, and a wait for its run waited for a run never made)."""
    from supersede.errors import KeyExpressionError
    from supersede.keyexpr import compile_key, compile_limit
    from supersede.model import group_id, run_id, shard_of_group

    out = []
    for wf in sorted(defs.values(), key=lambda w: w.id):
        if name not in wf.events:
            continue
        if wf.concurrency is None:
            key = event_id
        else:
            limit = wf.concurrency.max_runs
            try:
                key = compile_key(wf.concurrency.expression)(data, metadata or {})
                if isinstance(limit, str):
                    compile_limit(limit)(data, metadata or {})
            except KeyExpressionError:
                continue
        scope = wf.concurrency.scope if wf.concurrency else None
        shard = shard_of_group(group_id(wf.id, wf.version, key, scope), shards)
        out.append(PlannedRun(wf.id, key, run_id(shard, event_id, wf.id, explicit=explicit)))
    return out


async def publish_runs(
    redis: Redis,
    name: str,
    data: dict[str, Any],
    *,
    id: str | None = None,
    metadata: dict[str, Any] | None = None,
    namespace: str | None = None,
    on_sending: Callable[[], None] | None = None,
) -> tuple[str, list[PlannedRun], list[str]]:
    """`publish`, then the runs the event will make under the workflows registered now:
    (entry id, planned runs, every event name some workflow listens to). No planned run means
    no workflow listens to `name`: the event is acknowledged without a run; or, when no
    workflow is registered at all (`known` is empty), ingress reads nothing yet: the event
    waits in the inbox, and what runs it makes is decided by the workflows registered when
    ingress reads it. With an explicit
    `id` that ingress has seen before, ingress makes no new run: the planned run is the first
    event's (its `duplicate_of` the first entry). An event ingress refuses makes none (a dead
    letter); `wait_for_run(..., entry=)` follows it, and a duplicate whose first entry ingress
    had not read yet when this returned. `on_sending` is called as the XADD is sent: a failure
    after it (no reply: a server that hung, a connection cut, a cancel) leaves the event
    published or not."""
    from supersede.registry import load_all

    _check_client(redis)  # (before publishing: what follows reads bytes)
    ns = _namespace(namespace)
    # The registry is read first: a user that may publish but not read (the producer role)
    # is refused before the event is in the inbox, not after (a retry published it twice).
    stored = await _stored_keys(redis, ns)
    keys = stored or Keys(ns, 1)
    _, defs, _ = await load_all(redis, keys)
    known = sorted({e for wf in defs.values() for e in wf.events})
    if on_sending is not None:
        on_sending()
    entry = await publish(redis, name, data, id=id, metadata=metadata, namespace=ns)
    if stored is None:
        return entry, [], known
    plan = plan_runs(defs, name, data, id or entry, keys.shards, metadata, id is not None)
    if id is not None:
        try:
            plan = [await _first_of_duplicate(redis, p, entry, ns) for p in plan]
        except (redis_sync.RedisError, redis_sync.RedisClusterException, OSError) as exc:
            raise PublishedError(entry, exc) from exc
    return entry, plan, known


class PublishedError(SupersedeError):
    """`publish_runs`: the event is in the inbox (`entry`), but what followed failed
    (`__cause__`): publishing it again would make its runs twice."""

    def __init__(self, entry: str, cause: BaseException) -> None:
        self.entry = entry
        super().__init__(
            f"the event was published (inbox entry {entry}), but looking up its runs failed "
            f"({type(cause).__name__}: {cause})"
        )


async def _first_of_duplicate(redis: Redis, planned: PlannedRun, entry: str, ns: str) -> PlannedRun:
    """`planned` as the first event's run when an earlier entry owns the explicit id."""
    first = await duplicate_of(redis, planned.run_id, entry, namespace=ns)
    if first is None:
        return planned
    owner, run_id = first
    earlier = await get_run(redis, run_id, namespace=ns) if run_id else None
    if earlier is None:  # (not created yet, or past its retention)
        return replace(planned, duplicate_of=owner)
    return replace(planned, key=earlier.key, run_id=earlier.id, duplicate_of=owner)
