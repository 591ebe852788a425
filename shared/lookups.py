"""Runs found by id and by key through the indexes the scripts keep (a key's live runs from
its groups' members in the queue and active zsets, never a scan), and cancelled through the
cancel script: what the operator CLI, the dashboard and `supersede.client` share."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from supersede import codec
from supersede.keys import Keys
from supersede.model import group_id, run_id, shard_of_group, shard_of_run
from supersede.protocol import Reason, RunRecord, RunState
from supersede.registry import load_all
from supersede.scripts import Scripts

LIVE = {s.value for s in RunState if not s.terminal}


def rid_of_member(member: bytes | str) -> str:
    return codec.text(member).rsplit("|", 1)[1]


RECORDS_CHUNK = 10_000  # records per HMGET (one of 200,000 held the server 100 ms)


async def records_of(redis: Redis, keys: Keys, rids: list[str]) -> list[RunRecord]:
    """The records of `rids` (one HMGET per shard, RECORDS_CHUNK at most), in the order given;
    gone ones left out."""
    by_shard: dict[int, list[str]] = {}
    for rid in rids:
        by_shard.setdefault(shard_of_run(rid), []).append(rid)
    parts = [(shard, ids[i : i + RECORDS_CHUNK]) for shard, ids in by_shard.items()
             for i in range(0, len(ids), RECORDS_CHUNK)]  # fmt: skip
    async with redis.pipeline(transaction=False) as pipe:
        for shard, ids in parts:
            pipe.hmget(keys.shard(shard).runs_hash, ids)
        replies = await pipe.execute()
    found: dict[str, RunRecord] = {}
    for (_, ids), raws in zip(parts, replies, strict=True):
        for rid, raw in zip(ids, raws, strict=True):
            if raw is not None:
                found[rid] = RunRecord.decode(rid, raw)
    return [found[rid] for rid in rids if rid in found]


async def versions_of(
    redis: Redis, keys: Keys, workflows: list[str] | None
) -> dict[str, list[str]]:
    """workflow -> the versions the registry remembers (the current one last), for
    `workflows`, or for every registered workflow."""
    if workflows is None:
        names = await redis.hkeys(keys.workflows_hash)
        workflows = sorted(codec.text(n) for n in names)
    raws = await redis.hmget(keys.workflow_versions_hash, workflows) if workflows else []
    out = {
        w: [str(v) for v in orjson.loads(raw)] if raw else []
        for w, raw in zip(workflows, raws, strict=True)
    }
    if not all(out.values()):  # registered before the registry kept versions
        _, defs, _ = await load_all(redis, keys)
        for w, versions in out.items():
            if not versions and w in defs:
                versions.append(defs[w].version)
    return out


async def groups_of_key(
    redis: Redis, keys: Keys, workflow: str | None, key: str
) -> dict[str, list[str]]:
    """workflow -> the group ids of `key` under each version the registry remembers (of
    `workflow`, or of every registered workflow)."""
    versions = await versions_of(redis, keys, [workflow] if workflow else None)
    _, defs, _ = await load_all(redis, keys)
    out = {w: [group_id(w, v, key) for v in vs] for w, vs in versions.items()}
    for w, groups in out.items():  # a workflow of a scope: the scope's group (every version)
        conc = defs[w].concurrency if w in defs else None
        if conc is not None and conc.scope:
            groups.append(group_id(w, "", key, conc.scope))
    return out


async def live_of_key(
    redis: Redis, keys: Keys, groups: dict[str, list[str]], key: str, queued: int | None = None
) -> list[str]:
    """Run ids of the QUEUED, ASSIGNED and RUNNING runs of `groups` (of `key`): each group's
    members in the queue and active zsets; and a live run of a workflow without a limit,
    which is in neither: there the key is the event id, so its run id follows from it.
    `queued`: of each group's queue only the newest so many (the queue is unbounded: a page
    of a key with 200,000 queued read and loaded them all, 4 s; the active runs are at most
    max_runs a group)."""
    async with redis.pipeline(transaction=False) as pipe:
        for g in (g for gs in groups.values() for g in gs):
            sk = keys.shard(shard_of_group(g, keys.shards))
            lo, hi = f"[{g}|", f"({g}}}"  # members '<g>|...' ('}' > '|')
            if queued is None:
                pipe.zrangebylex(sk.queue_zset, lo, hi)
            else:
                pipe.zrevrangebylex(sk.queue_zset, hi, lo, start=0, num=queued)
            pipe.zrangebylex(sk.active_zset, lo, hi)
            pipe.hget(sk.debounce_hash, g)  # a run waiting in a debounce window
        replies = await pipe.execute()
    # Every group's queued runs first, its active ones last: `cancel_key` cancels in this
    # order, in parts, and an active run cancelled first freed a slot that started the head
    # of the queue, cancelled then as it ran.
    queues, actives, waiting = replies[0::3], replies[1::3], replies[2::3]
    found = [rid_of_member(m) for members in queues for m in members]
    found += [waiting_rid(raw) for raw in waiting if raw]
    found += [rid_of_member(m) for members in actives for m in members]
    # (the key is an inbox entry id, or an explicit id: hashed apart when it looks like one)
    candidates = {
        run_id(shard_of_group(g, keys.shards), key, w, explicit=explicit)
        for w, gs in groups.items()
        for g in gs
        for explicit in (False, True)
    }
    candidates -= set(found)
    unlimited = [
        r.id
        for r in await records_of(redis, keys, sorted(candidates))
        if r.max_runs == 0 and r.key == key and r.state.value in LIVE
    ]
    return found + unlimited


def waiting_rid(raw: Any) -> str:
    """The run id of a debounce hash value ('<window start ms>|<member>')."""
    return rid_of_member(codec.text(raw).split("|", 1)[1])


async def require_run(redis: Redis, keys: Keys, rid: str) -> None:
    """LookupError naming `rid` unless it is a run that exists now (an id of no shard of this
    namespace included: the cancel script would refuse it less clearly); ValueError for what is
    no run id at all (a bad argument, as `supersede run` says)."""
    shard = shard_of_run(rid)
    if not 0 <= shard < keys.shards or await redis.hget(keys.shard(shard).runs_hash, rid) is None:
        raise LookupError(f"no run {rid!r}")  # (HGET: the operator's rights have no HEXISTS)


MOVED_LOOK_S = 1.0  # seconds a look on the other shards may take (a master may not answer)


async def moved_run(
    redis: Redis, keys: Keys, rid: str, entry: str | None = None
) -> RunRecord | None:
    """The run `rid` names when it went to another shard: `publish` plans run ids from the
    registry when it writes the event, and a workflow's new version registered before
    ingress read it puts the run's group, so its shard, elsewhere (a rolling deploy: 10% of
    the ids a probe published named no run). The tail of an id, from the event and the
    workflow, stays; so it does for an explicit id published again once forgotten, whose
    earlier run may still be kept: given `entry`, the event's inbox entry, only its run is
    taken. None when no other shard holds it, or they did not answer within MOVED_LOOK_S."""
    shard, digest = shard_of_run(rid), rid.partition("-")[2]
    others = [s for s in range(keys.shards) if s != shard]
    if not others or shard >= keys.shards:  # (no id `publish` planned here: `run 99-<tail>`
        return None  # showed the run of shard 9 as if it were the one asked, a CLI probe)
    try:
        async with asyncio.timeout(MOVED_LOOK_S), redis.pipeline(transaction=False) as pipe:
            for s in others:
                pipe.hget(keys.shard(s).runs_hash, f"{s}-{digest}")
            replies = await pipe.execute()
    except (TimeoutError, RedisError):
        return None
    for s, raw in zip(others, replies, strict=True):
        if raw:
            rec = RunRecord.decode(f"{s}-{digest}", raw)
            if entry is None or rec.entry == entry:
                return rec
    return None


async def require_workflow(redis: Redis, keys: Keys, workflow: str) -> None:
    """LookupError naming `workflow` and the registered ones unless it is, or once was,
    registered (a misspelt name listed no runs and cancelled nothing, and said neither)."""
    names = sorted(codec.text(n) for n in await redis.hkeys(keys.workflows_hash))
    if workflow in names or await redis.hget(keys.workflow_versions_hash, workflow):
        return
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    raise LookupError(
        f"no workflow {workflow!r} is registered ("
        + (f"registered: {shown}" if names else "none is: no executor has started")
        + ")"
    )


CANCEL_CHUNK = 1_000  # runs per cancel call: one call of a key's 300,000 held the server 6.6 s


async def cancel_runs(
    scripts: Scripts, rids: list[str], reason: str = Reason.MANUAL
) -> dict[str, bool]:
    by_shard: dict[int, list[str]] = {}
    for rid in dict.fromkeys(rids):  # (a run given twice: its second flag, False, was kept)
        by_shard.setdefault(shard_of_run(rid), []).append(rid)
    out: dict[str, bool] = {}
    for shard, ids in by_shard.items():
        for i in range(0, len(ids), CANCEL_CHUNK):
            part = ids[i : i + CANCEL_CHUNK]
            flags = await scripts.cancel(shard, part, reason=reason)
            out.update(zip(part, flags, strict=True))
    return out


async def cancel_key(redis: Redis, scripts: Scripts, workflow: str, key: str) -> dict[str, bool]:
    """Cancel every live run of (workflow, key), whatever its version (from its groups'
    members in the queue and active zsets, not a scan), CANCEL_CHUNK runs a call (one call
    of a backlog of 300,000 held the server 6.6 s, and every service saw BUSY)."""
    groups = await groups_of_key(redis, scripts.keys, workflow, key)
    rids = await live_of_key(redis, scripts.keys, groups, key)
    if rids and workflow:  # a group of a scope holds the runs of its other workflows too
        rids = [r.id for r in await records_of(redis, scripts.keys, rids) if r.workflow == workflow]
    return await cancel_runs(scripts, rids) if rids else {}


SERVED_NOW_MS = 5000  # an executor says every second that it serves its workflows


async def served_ms_ago(redis: Redis, keys: Keys, workflow: str) -> int | None:
    """Milliseconds since an executor last said it serves `workflow` (by the server's clock),
    or None when none ever did (or not since the mark went with a `retire`)."""
    mark = await redis.hget(keys.workflows_served_hash, workflow)
    if mark is None:
        return None
    seconds, micros = await redis.time()
    return max(0, seconds * 1000 + micros // 1000 - int(mark))


def executor_said(raw: bytes | str) -> tuple[int, list[str]]:
    """A value of the executors hash (`Keys.executors_hash`): (when the executor last said it
    runs, ms by the server's clock; the workflow ids it serves). (0, []) for what is none."""
    try:
        said = orjson.loads(raw)
        ms, workflows = int(said["ms"]), [str(w) for w in said["workflows"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0, []
    return ms, workflows
