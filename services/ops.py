"""Operator commands: publish, runs, run, cancel, status, dead (each with --json).

They read run records with HSCAN over the shards (the cost grows with the retained runs; fine
for an operator, not for a hot path) and change state only through the Lua scripts.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.model import shard_of_run
from supersede.protocol import (
    ADMISSION_GROUP,
    EXECUTOR_GROUP,
    INGRESS_GROUP,
    Dead,
    Reason,
    RunRecord,
    RunState,
    original_fields,
)
from supersede.registry import WorkflowDef, load_all
from supersede.scripts import Scripts


def _text(value: Any) -> Any:
    """Text for display: what is not UTF-8 (a field of a refused event) shows replacement
    characters instead of failing the command."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def view(run: RunRecord) -> dict[str, Any]:
    """A record as operators read it (full names, no internal codes)."""
    return {
        "id": run.id,
        "workflow": run.workflow,
        "version": run.version,
        "key": run.key,
        "state": run.state.name,
        "attempt": run.attempt,
        "event_id": run.event_id,
        "executor": run.executor,
        "cancelled_by": run.cancelled_by,
        "reason": run.reason,
        "error": run.error,
        "created_ms": run.created_ms,
        "assigned_ms": run.assigned_ms,
        "claimed_ms": run.claimed_ms,
        "cancel_decided_ms": run.cancel_decided_ms,
        "ended_ms": run.ended_ms,
    }


async def scan_runs(redis: Redis, keys: Keys) -> list[RunRecord]:
    out = []
    for sk in keys.all_shards():
        async for rid, raw in redis.hscan_iter(sk.runs_hash, count=1000):
            out.append(RunRecord.decode(rid, raw))
    return out


async def list_runs(
    redis: Redis,
    keys: Keys,
    *,
    workflow: str | None = None,
    key: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    wanted = RunState[state.upper()] if state else None
    runs = [
        run
        for run in await scan_runs(redis, keys)
        if (not workflow or run.workflow == workflow)
        and (key is None or run.key == key)
        and (wanted is None or run.state is wanted)
    ]
    runs.sort(key=lambda r: r.created_ms or 0, reverse=True)
    return [view(run) for run in runs[:limit]]


def timeline(run: RunRecord) -> list[dict[str, Any]]:
    """Created, assigned, claimed by, cancel decided (and by whom), ended."""
    out: list[dict[str, Any]] = [{"at_ms": run.created_ms, "event": "created"}]
    if run.assigned_ms:
        out.append({"at_ms": run.assigned_ms, "event": f"assigned (attempt {run.attempt})"})
    if run.claimed_ms:
        out.append({"at_ms": run.claimed_ms, "event": f"claimed by {run.executor or '?'}"})
    if run.cancel_decided_ms:
        by = f" by {run.cancelled_by}" if run.cancelled_by else ""
        out.append({"at_ms": run.cancel_decided_ms, "event": f"cancel decided ({run.reason}){by}"})
    if run.ended_ms:
        text = f"ended {run.state.name}"
        if run.cancelled_by and not run.cancel_decided_ms:
            text += f" (superseded by {run.cancelled_by})"
        elif run.reason and not run.cancel_decided_ms:
            text += f" ({run.reason})"
        out.append({"at_ms": run.ended_ms, "event": text})
    return out


async def get_run(redis: Redis, keys: Keys, rid: str) -> dict[str, Any] | None:
    """One run with its timeline."""
    raw = await redis.hget(keys.shard(shard_of_run(rid)).runs_hash, rid)
    if raw is None:
        return None
    run = RunRecord.decode(rid, raw)
    return {**view(run), "timeline": timeline(run)}


async def cancel_runs(scripts: Scripts, rids: list[str]) -> dict[str, bool]:
    by_shard: dict[int, list[str]] = {}
    for rid in rids:
        by_shard.setdefault(shard_of_run(rid), []).append(rid)
    out: dict[str, bool] = {}
    for shard, ids in by_shard.items():
        flags = await scripts.cancel(shard, ids, reason=Reason.MANUAL)
        out.update(zip(ids, flags, strict=True))
    return out


async def cancel_key(redis: Redis, scripts: Scripts, workflow: str, key: str) -> dict[str, bool]:
    """Cancel every live run of (workflow, key), whatever its version."""
    rids = [
        run.id
        for run in await scan_runs(redis, scripts.keys)
        if run.workflow == workflow and run.key == key and run.state.live
    ]
    return await cancel_runs(scripts, rids) if rids else {}


async def _group_lag(redis: Redis, stream: str, group: str) -> dict[str, int]:
    if not await redis.exists(stream):
        return {"pending": 0, "lag": 0}
    for g in await redis.xinfo_groups(stream):
        if _text(g["name"]) == group:
            return {"pending": int(g["pending"]), "lag": int(g.get("lag") or 0)}
    return {"pending": 0, "lag": 0}


async def status(redis: Redis, keys: Keys, live_idle_ms: int = 5000) -> dict[str, Any]:
    """The registered workflows (trigger events, limits) with their runs by state; stream
    lags; the live executors and the workflows each serves."""
    _, defs, invalid = await load_all(redis, keys)
    per_workflow: dict[str, Counter[str]] = {w: Counter() for w in defs}
    async with redis.pipeline(transaction=False) as pipe:
        for sk in keys.all_shards():
            pipe.hgetall(sk.counts_hash)  # kept by the scripts: no scan of the records
        shard_counts = await pipe.execute()
    for counts in shard_counts:
        for field, n in counts.items():
            workflow, _, state = _text(field).rpartition("|")
            if int(n) > 0:
                per_workflow.setdefault(workflow, Counter())[RunState(state).name] += int(n)
    lags: dict[str, dict[str, int]] = {
        "inbox": await _group_lag(redis, keys.events_stream, INGRESS_GROUP)
    }
    totals: dict[str, Counter[str]] = {n: Counter() for n in ("requests", "results", "assignments")}
    executors: dict[str, set[str]] = {}
    idle: dict[str, int] = {}  # consumer -> its smallest idle time over the streams
    registered = sorted({*defs, *invalid})  # their streams and executors count too
    for sk in keys.all_shards():
        streams = [
            ("requests", sk.requests_stream, ADMISSION_GROUP),
            ("results", sk.results_stream, ADMISSION_GROUP),
        ] + [("assignments", sk.assignments_stream(wf), EXECUTOR_GROUP) for wf in registered]
        for name, stream, group in streams:
            totals[name].update(await _group_lag(redis, stream, group))
        for wf in registered:
            stream = sk.assignments_stream(wf)
            if not await redis.exists(stream):
                continue
            for c in await redis.xinfo_consumers(stream, EXECUTOR_GROUP):
                name = _text(c["name"])
                executors.setdefault(name, set()).add(wf)
                idle[name] = min(idle.get(name, 1 << 62), int(c.get("idle", 1 << 62)))
    for name, counter in totals.items():
        lags[name] = {"pending": counter["pending"], "lag": counter["lag"]}
    return {
        "workflows": {
            w: {"runs": dict(per_workflow[w]), **_definition_summary(defs.get(w))}
            for w in sorted(per_workflow)
        },
        "invalid_workflows": invalid,
        "streams": lags,
        "dead_letters": int(await redis.xlen(keys.dead_stream))
        if await redis.exists(keys.dead_stream)
        else 0,
        # live: read one of its streams within live_idle_ms (a consumer's idle time only
        # restarts on the streams that gave it entries, on some server versions)
        "executors": {
            name: sorted(wfs)
            for name, wfs in sorted(executors.items())
            if idle[name] < live_idle_ms
        },
        "at_ms": int(time.time() * 1000),
    }


def _definition_summary(wf: WorkflowDef | None) -> dict[str, Any]:
    if wf is None:
        return {"registered": False}
    conc = wf.concurrency
    return {
        "registered": True,
        "version": wf.version,
        "events": list(wf.events),
        "strategy": None if conc is None else str(conc.limit_strategy),
        "key": None if conc is None else conc.expression,
        "max_runs": None if conc is None else conc.max_runs,
        "strict": None if conc is None else conc.strict,
    }


async def dead_letters(redis: Redis, keys: Keys, limit: int = 100) -> list[dict[str, Any]]:
    rows = []
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(keys.dead_stream, count=limit)
    )
    for entry_id, fields in entries:
        rows.append({"id": _text(entry_id), **{_text(k): _text(v) for k, v in fields.items()}})
    return rows


async def replay_dead(redis: Redis, keys: Keys, entry_id: str) -> str:
    """Publish a dead letter's original fields to the inbox again, then delete it."""
    entries = await redis.xrange(keys.dead_stream, min=entry_id, max=entry_id)
    if not entries:
        raise LookupError(f"no dead letter {entry_id!r}")
    fields = cast(dict[bytes, bytes], entries[0][1])
    if Dead.STREAM.encode() in fields:
        raise ValueError(f"{entry_id} is a refused run request or result, not an inbox event")
    if Dead.TRUNCATED.encode() in fields:
        raise ValueError(
            f"{entry_id} kept only the first {Dead.FIELD_MAX} bytes of "
            f"{fields[Dead.TRUNCATED.encode()].decode()}: publish the event again instead"
        )
    original: dict[Any, Any] = original_fields(fields)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.events_stream, original)
        pipe.xdel(keys.dead_stream, entry_id)
        new_id, _ = await pipe.execute()
    return str(_text(new_id))


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


# -- the CLI's commands: (redis, keys, parsed args) -> a JSON-able result -----------------------


async def _publish(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    from supersede.client import publish

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"JSON is not valid: {exc}") from None
    return {"entry": await publish(redis, args.name, data, id=args.id, namespace=keys.namespace)}


async def _runs(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    return await list_runs(
        redis, keys, workflow=args.workflow, key=args.key, state=args.state, limit=args.limit
    )


async def _run(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    run = await get_run(redis, keys, args.id)
    if run is None:
        raise LookupError(f"no run {args.id!r}")
    return run


async def _cancel(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    scripts = Scripts(redis, keys)
    if args.id:
        return await cancel_runs(scripts, [args.id])
    if args.workflow and args.key is not None:
        return await cancel_key(redis, scripts, args.workflow, args.key)
    raise ValueError("cancel needs ID, or --workflow and --key")


async def _status(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    return await status(redis, keys)


async def _dead(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    if args.replay:
        return {"replayed": args.replay, "entry": await replay_dead(redis, keys, args.replay)}
    return await dead_letters(redis, keys, limit=args.limit)


COMMANDS: dict[str, Callable[[Redis, Keys, argparse.Namespace], Awaitable[Any]]] = {
    "publish": _publish,
    "runs": _runs,
    "run": _run,
    "cancel": _cancel,
    "status": _status,
    "dead": _dead,
}
