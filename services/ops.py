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

from supersede import codec
from supersede.keys import Keys
from supersede.model import RunState, shard_of_run
from supersede.scripts import Scripts
from supersede.streams import ADMISSION_GROUP, EXECUTOR_GROUP, INGRESS_GROUP

STATE_NAMES = {s.value: s.name for s in RunState}
LIVE_STATES = {"Q", "A", "R"}
DEAD_EXTRA_FIELDS = {b"reason", b"detail", b"entry", b"workflow"}


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def view(rid: str, rec: dict[str, Any]) -> dict[str, Any]:
    """A record as operators read it (full names, no internal codes)."""
    return {
        "id": rid,
        "workflow": rec.get("w"),
        "version": rec.get("v"),
        "key": rec.get("k"),
        "state": STATE_NAMES.get(str(rec.get("st")), rec.get("st")),
        "attempt": rec.get("a"),
        "event_id": rec.get("ev"),
        "executor": rec.get("e") or None,
        "cancelled_by": rec.get("by") or None,
        "reason": rec.get("why") or None,
        "error": rec.get("err") or None,
        "created_ms": rec.get("t0"),
        "assigned_ms": rec.get("t1"),
        "claimed_ms": rec.get("t2"),
        "cancel_decided_ms": rec.get("tc"),
        "ended_ms": rec.get("t3"),
    }


async def scan_runs(redis: Redis, keys: Keys) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for sk in keys.all_shards():
        async for rid, raw in redis.hscan_iter(sk.runs_hash, count=1000):
            out.append((_text(rid), codec.unpack(raw)))
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
    wanted_state = RunState[state.upper()].value if state else None
    rows = []
    for rid, rec in await scan_runs(redis, keys):
        if workflow and rec.get("w") != workflow:
            continue
        if key is not None and rec.get("k") != key:
            continue
        if wanted_state and rec.get("st") != wanted_state:
            continue
        rows.append(view(rid, rec))
    rows.sort(key=lambda r: r["created_ms"] or 0, reverse=True)
    return rows[:limit]


async def get_run(redis: Redis, keys: Keys, rid: str) -> dict[str, Any] | None:
    """One run with its timeline (created, assigned, claimed by, cancelled by, finished)."""
    raw = await redis.hget(keys.shard(shard_of_run(rid)).runs_hash, rid)
    if raw is None:
        return None
    rec = codec.unpack(codec.blob(raw))
    run = view(rid, rec)
    timeline = [{"at_ms": rec.get("t0"), "event": "created"}]
    if rec.get("t1"):
        timeline.append({"at_ms": rec["t1"], "event": f"assigned (attempt {rec.get('a')})"})
    if rec.get("t2"):
        timeline.append({"at_ms": rec["t2"], "event": f"claimed by {rec.get('e') or '?'}"})
    if rec.get("tc"):
        by = f" by {rec['by']}" if rec.get("by") else ""
        timeline.append({"at_ms": rec["tc"], "event": f"cancel decided ({rec.get('why')}){by}"})
    if rec.get("t3"):
        text = f"ended {run['state']}"
        if rec.get("by") and not rec.get("tc"):
            text += f" (superseded by {rec['by']})"
        elif rec.get("why") and not rec.get("tc"):
            text += f" ({rec['why']})"
        timeline.append({"at_ms": rec["t3"], "event": text})
    run["timeline"] = timeline
    return run


async def cancel_runs(scripts: Scripts, rids: list[str]) -> dict[str, bool]:
    by_shard: dict[int, list[str]] = {}
    for rid in rids:
        by_shard.setdefault(shard_of_run(rid), []).append(rid)
    out: dict[str, bool] = {}
    for shard, ids in by_shard.items():
        flags = await scripts.cancel(shard, ids, reason="manual")
        out.update(zip(ids, flags, strict=True))
    return out


async def cancel_key(redis: Redis, scripts: Scripts, workflow: str, key: str) -> dict[str, bool]:
    """Cancel every live run of (workflow, key), whatever its version."""
    rids = [
        rid
        for rid, rec in await scan_runs(redis, scripts.keys)
        if rec.get("w") == workflow and rec.get("k") == key and rec.get("st") in LIVE_STATES
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
    """Per workflow: runs by state; stream lags; live executors."""
    per_workflow: dict[str, Counter[str]] = {}
    for _, rec in await scan_runs(redis, keys):
        per_workflow.setdefault(str(rec.get("w")), Counter())[STATE_NAMES[str(rec["st"])]] += 1
    lags: dict[str, dict[str, int]] = {
        "inbox": await _group_lag(redis, keys.events_stream, INGRESS_GROUP)
    }
    totals: dict[str, Counter[str]] = {n: Counter() for n in ("requests", "results", "assignments")}
    executors: set[str] = set()
    for sk in keys.all_shards():
        for name, stream, group in (
            ("requests", sk.requests_stream, ADMISSION_GROUP),
            ("results", sk.results_stream, ADMISSION_GROUP),
            ("assignments", sk.assignments_stream, EXECUTOR_GROUP),
        ):
            totals[name].update(await _group_lag(redis, stream, group))
        if await redis.exists(sk.assignments_stream):
            for c in await redis.xinfo_consumers(sk.assignments_stream, EXECUTOR_GROUP):
                if int(c.get("idle", 1 << 62)) < live_idle_ms:
                    executors.add(_text(c["name"]))
    for name, counter in totals.items():
        lags[name] = {"pending": counter["pending"], "lag": counter["lag"]}
    return {
        "workflows": {w: dict(c) for w, c in sorted(per_workflow.items())},
        "streams": lags,
        "dead_letters": int(await redis.xlen(keys.dead_stream))
        if await redis.exists(keys.dead_stream)
        else 0,
        "executors": sorted(executors),
        "at_ms": int(time.time() * 1000),
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
    if b"stream" in fields:
        raise ValueError(f"{entry_id} is a refused run request or result, not an inbox event")
    original: dict[Any, Any] = {k: v for k, v in fields.items() if k not in DEAD_EXTRA_FIELDS}
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
