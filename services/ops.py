"""Operator commands: publish, runs, run, cancel, status, dead (each with --json).

They answer from the indexes the scripts keep, never from a scan of every record: live runs
from the queue and lease zsets (a key's from its groups' members), ended runs from each
workflow's ended streams (newest end first), counts from the counts hashes. They change state
only through the Lua scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from supersede import codec
from supersede.errors import ConfigError, DefinitionError, SupersedeError
from supersede.keys import Keys
from supersede.lookups import (
    LIVE,
    cancel_key,
    cancel_runs,
    executor_said,
    groups_of_key,
    live_of_key,
    records_of,
    require_run,
    require_workflow,
    rid_of_member,
    served_ms_ago,
    waiting_rid,
)
from supersede.model import RUN_ID_FORM, event_digest, shard_of_group
from supersede.protocol import (
    ADMISSION_GROUP,
    EXECUTOR_GROUP,
    INGRESS_GROUP,
    Dead,
    Inbox,
    Reason,
    RunRecord,
    RunState,
    original_fields,
)
from supersede.registry import WorkflowDef, load_all, parse
from supersede.scripts import Scripts
from supersede.streams import unread
from supersede.trim import consumed_below, stream_id


def _text(value: Any) -> Any:
    """Text for display: what is not UTF-8 (a field of a refused event) shows replacement
    characters instead of failing the command."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _lossless(value: bytes) -> str:
    """A field as text: UTF-8 as it is, other bytes (a msgpack event's data) as their repr,
    b'\\x93...', which keeps every byte (replacement characters kept none)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return repr(value)


def view(run: RunRecord) -> dict[str, Any]:
    """A record as operators read it (full names, no internal codes)."""
    return {
        "id": run.id,
        "workflow": run.workflow,
        "version": run.version,
        "key": run.key,
        "state": run.state.name,
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "hand_backs": run.hand_backs,
        "earlier_attempts": [dataclasses.asdict(e) for e in run.earlier],
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
    """Every retained record (HSCAN of every shard): for tests and benchmarks, never the CLI."""
    out = []
    for sk in keys.all_shards():
        async for rid, raw in redis.hscan_iter(sk.runs_hash, count=1000):
            out.append(RunRecord.decode(rid, raw))
    return out


PAGE = 200  # index entries read per shard and round trip
KEY_SCAN = 10_000  # ended runs per shard searched for the runs of one key


LIVE_SORTED = 10_000  # up to this many live runs are all read, so the newest come first


async def _waiting(redis: Redis, keys: Keys) -> list[RunRecord]:
    """The QUEUED runs waiting in a debounce window (in no queue zset): one per debounced group
    with a window open, from each shard's debounce hash."""
    async with redis.pipeline(transaction=False) as pipe:
        for sk in keys.all_shards():
            pipe.hvals(sk.debounce_hash)
        replies = await pipe.execute()
    rids = [waiting_rid(v) for values in replies for v in values]
    return [r for r in await records_of(redis, keys, rids) if r.state.value == "Q"] if rids else []


async def _live(
    redis: Redis,
    keys: Keys,
    keep: Callable[[RunRecord], bool],
    limit: int,
    workflow: str | None = None,
    states: Collection[str] = LIVE,
) -> list[RunRecord]:
    """Live runs in `states` (of `workflow`) that pass `keep`: QUEUED ones from the queue
    zsets, ASSIGNED, RUNNING and CANCELLING ones from the lease zsets (only the zsets that
    hold such states are read), PAGE per zset and round trip. With at most LIVE_SORTED live
    runs every one is read, so the newest created come first; with more, reading stops once
    `limit` passed (the first found in zset order, not the newest). Reading stops too once
    every such run the counts know of was found: a quiet workflow's list read every live run
    of a busy one (a probe: 11 s behind 150,000 queued)."""
    counts = await run_counts(redis, keys)
    total = sum(n for (_, state), n in counts.items() if state in LIVE)
    known = sum(n for (wf, state), n in counts.items()
                if state in states and (workflow is None or wf == workflow))  # fmt: skip
    found: dict[str, RunRecord] = {}  # (a run in two pages once: see _live_pages)
    async for page in _live_pages(redis, keys, keep, states):
        found.update((r.id, r) for r in page)
        if len(found) >= known or (total > LIVE_SORTED and len(found) >= limit):
            break
    return sorted(found.values(), key=lambda r: r.created_ms or 0, reverse=True)[:limit]


async def _live_pages(
    redis: Redis, keys: Keys, keep: Callable[[RunRecord], bool], states: Collection[str] = LIVE
) -> AsyncIterator[list[RunRecord]]:
    """The live runs that pass `keep`, a page (one round trip over every zset that holds runs
    in `states`) at a time, each run once within a page. Zsets change while they are read (the
    reaper rescores leases, a cancel removes members): a run may show in two pages, or in
    none (read again to be sure)."""
    queued = RunState.QUEUED.value in states
    leased = bool(set(states) - {RunState.QUEUED.value})
    zsets = [
        z
        for sk in keys.all_shards()
        for z, read in ((sk.queue_zset, queued), (sk.leases_zset, leased))
        if read
    ]
    yield [r for r in await _waiting(redis, keys) if keep(r)] if queued else []
    start = 0
    while zsets:
        async with redis.pipeline(transaction=False) as pipe:
            for zset in zsets:
                pipe.zrange(zset, start, start + PAGE - 1)
            replies = await pipe.execute()
        rids = dict.fromkeys(
            rid_of_member(m) if zset.endswith(":queue") else codec.text(m)
            for zset, members in zip(zsets, replies, strict=True)
            for m in members
        )
        yield [r for r in await records_of(redis, keys, list(rids)) if keep(r)]
        zsets = [z for z, members in zip(zsets, replies, strict=True) if len(members) == PAGE]
        start += PAGE


async def run_counts(redis: Redis, keys: Keys) -> Counter[tuple[str, str]]:
    """(workflow, state letter) -> runs, over every shard (the scripts keep the counts)."""
    async with redis.pipeline(transaction=False) as pipe:
        for sk in keys.all_shards():
            pipe.hgetall(sk.counts_hash)
        replies = await pipe.execute()
    out: Counter[tuple[str, str]] = Counter()
    for counts in replies:
        for name, n in counts.items():
            workflow, _, state = codec.text(name).rpartition("|")
            out[(workflow, state)] += int(n)
    return out


async def ended_streams(redis: Redis, keys: Keys, workflow: str | None) -> list[str]:
    """The ended streams of `workflow` in every shard, or of every workflow."""
    if workflow:
        return [sk.ended_stream(workflow) for sk in keys.all_shards()]
    async with redis.pipeline(transaction=False) as pipe:
        for sk in keys.all_shards():
            pipe.hkeys(sk.ended_hash)
        tags = await pipe.execute()
    return [
        f"{sk.ended_hash}:{codec.text(t)}"
        for sk, names in zip(keys.all_shards(), tags, strict=True)
        for t in names
    ]


async def _ended(
    redis: Redis,
    streams: list[str],
    states: set[str],
    want: int,
    scan: int,
    before: str = "+",
) -> tuple[list[tuple[str, str, str]], str | None]:
    """(order, entry id, run id) of ended runs in `states`, newest end first: up to `want` of
    them, reading at most `scan` runs per stream, PAGE entries per stream and round trip.
    `before` ("+": from the newest) is a cursor: "<entry id>" (runs of older entries) or
    "<entry id>/<n>" (the runs of that entry after its first n, then older entries).

    And the horizon: the entry id where a stream stopped at `scan` with more to read (None:
    none did). Nothing older than it is returned (that stream's older runs were not read), so
    a next page that starts there misses none."""
    found: list[tuple[str, str, str]] = []
    start, skip = "+", 0
    if before != "+":
        eid, _, n = before.partition("/")
        start, skip = "(" + eid, int(n or 0)
        if skip:
            found += (await _entry_runs(redis, streams, eid, states))[skip:]
    cursor = dict.fromkeys(streams, start)
    seen = dict.fromkeys(streams, 0)
    horizon: tuple[str, str] | None = None  # (order, entry id)
    # entries per stream in the first round trip, doubled up to PAGE: an entry can hold
    # hundreds of runs (one script call's), and a page wants a few dozen
    count = 2 if want <= 1000 else PAGE
    while cursor:
        names = list(cursor)
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xrevrange(name, cursor[name], "-", count=count)
            replies = await pipe.execute()
        for name, entries in zip(names, replies, strict=True):
            for _, fields in entries:
                seen[name] += sum(codec.text(ids).count(",") + 1 for ids in fields.values())
            found += _runs_in(entries, states)
            if len(entries) < count:
                del cursor[name]
            elif seen[name] >= scan:
                del cursor[name]
                last = codec.text(entries[-1][0])
                if horizon is None or _cursor_order(last) > horizon[0]:
                    horizon = (_cursor_order(last), last)
            else:
                cursor[name] = "(" + codec.text(entries[-1][0])
        count = min(count * 2, PAGE)
        # each stream is newest first, its unread entries older than its (exclusive) cursor:
        # once `want` runs are at least as new as every open cursor, none can add a newer one
        found.sort(reverse=True)
        if len(found) >= want and all(
            _cursor_order(cursor[n]) <= found[want - 1][0] for n in cursor
        ):
            break
    if horizon is not None:
        found = [f for f in found if f[0] >= horizon[0]]
    return found[:want], None if horizon is None else horizon[1]


async def _entry_runs(
    redis: Redis, streams: list[str], eid: str, states: set[str]
) -> list[tuple[str, str, str]]:
    """The runs in `states` of the entries `eid` of every stream (the entry a page stopped in),
    in page order."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in streams:
            pipe.xrange(name, eid, eid)
        replies = await pipe.execute()
    return sorted((item for entries in replies for item in _runs_in(entries, states)), reverse=True)


def _runs_in(entries: Any, states: set[str]) -> list[tuple[str, str, str]]:
    """(order, entry id, run id) of the runs in `states` of ended-stream entries."""
    out: list[tuple[str, str, str]] = []
    for entry_id, fields in entries:
        eid = codec.text(entry_id)
        order = _cursor_order(eid)
        for state, ids in fields.items():
            if codec.text(state) in states:
                out += [(order, eid, rid) for rid in codec.text(ids).split(",")]
    return out


def _next_cursor(found: list[tuple[str, str, str]], upto: int, before: str | None) -> str:
    """The cursor after found[upto]: its entry id and how many of that entry's runs (in this
    order, with those a `before` cursor in the same entry skipped) come before the next."""
    order, eid, _ = found[upto]
    taken = sum(1 for o, _, _ in found[: upto + 1] if o == order)
    if before and "/" in before and before.partition("/")[0] == eid:
        taken += int(before.partition("/")[2])
    return f"{eid}/{taken}"


def _cursor_order(cursor: str) -> str:
    ms, _, sq = cursor.lstrip("(").partition("-")
    return f"{int(ms):015d}-{int(sq or 0):015d}"


ENDED = {s.value for s in RunState if s.terminal}


async def list_runs(
    redis: Redis,
    keys: Keys,
    *,
    workflow: str | None = None,
    key: str | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Live runs first (newest created first), then ended runs (newest end first), from the
    indexes. The ended runs of a key are looked for among the last KEY_SCAN ended runs of
    its workflow in the shard of its group."""
    rows, _ = await runs_page(redis, keys, workflow=workflow, key=key, state=state, limit=limit)
    return rows


async def runs_page(
    redis: Redis,
    keys: Keys,
    *,
    workflow: str | None = None,
    key: str | None = None,
    state: str | None = None,
    limit: int = 100,
    before: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of `list_runs`, and the cursor of the next one (None: no more). With `before`
    (a cursor, or "<ms>-0" for a time: runs that ended before it), only ended runs, from
    there; a cursor may point inside an end entry ("<entry id>/<runs of it shown>")."""
    wanted = {RunState[state.upper()].value} if state else LIVE | ENDED
    workflow = workflow or None  # ("": every workflow, as no filter)

    def keep(run: RunRecord) -> bool:
        return (
            run.state.value in wanted
            and (not workflow or run.workflow == workflow)
            and (key is None or run.key == key)
        )

    groups = await groups_of_key(redis, keys, workflow, key) if key is not None else {}
    live: list[RunRecord] = []
    if wanted & LIVE and before is None:
        if key is not None:
            # (of each queue, the newest `limit` only: a page of a key with 200,000 queued
            # loaded them all, 4 s; the active zset holds max_runs at most)
            queued = limit if RunState.QUEUED.value in wanted else 0
            rids = await live_of_key(redis, keys, groups, key, queued)
            loaded = await records_of(redis, keys, rids)
            live = [r for r in loaded if keep(r)]
            if (
                queued
                and len(live) < limit
                and workflow
                and any(r.workflow != workflow for r in loaded)
            ):
                # (a scope's queue holds its other workflows' runs: the newest may all be
                # theirs, and ours behind them)
                rids = await live_of_key(redis, keys, groups, key)
                live = [r for r in await records_of(redis, keys, rids) if keep(r)]
            live.sort(key=lambda r: (r.created_ms or 0, r.seq), reverse=True)
            live = live[:limit]
        else:
            live = await _live(redis, keys, keep, limit, workflow, wanted & LIVE)
    ended: list[RunRecord] = []
    nxt: str | None = None
    if wanted & ENDED and len(live) >= limit:  # the ended runs start on the next page
        sec, usec = await redis.time()  # (stream ids are the server's clock)
        nxt = f"{int(sec) * 1000 + int(usec) // 1000 + 1}-0"
    elif wanted & ENDED:
        want = limit - len(live)
        start = "+" if before is None else before
        if key is None:
            streams = await ended_streams(redis, keys, workflow)
            found, _ = await _ended(redis, streams, wanted & ENDED, want, 1 << 62, start)
            ended = [r for _, r in await _runs_of(redis, keys, found, keep)]
            if len(found) >= want:
                nxt = _next_cursor(found, len(found) - 1, before)
        else:
            ended, nxt = await _ended_of_key(
                redis, keys, groups, wanted & ENDED, want, keep, before
            )
    listed = {run.id for run in live}  # a run that ended between the two reads: once
    rows = [view(run) for run in live + [r for r in ended if r.id not in listed]]
    return rows, nxt


async def _ended_of_key(
    redis: Redis,
    keys: Keys,
    groups: dict[str, list[str]],
    states: set[str],
    want: int,
    keep: Any,
    before: str | None,
) -> tuple[list[RunRecord], str | None]:
    """A page of a key's ended runs, and the next cursor: a group lives in one shard, so only
    its shard's streams are searched, KEY_SCAN runs per stream and page."""
    streams = sorted(
        {keys.shard(shard_of_group(g, keys.shards)).ended_stream(w)
         for w, gs in groups.items() for g in gs}
    )  # fmt: skip
    start = "+" if before is None else before
    found, horizon = await _ended(redis, streams, states, KEY_SCAN, KEY_SCAN, start)
    kept: list[tuple[int, RunRecord]] = []
    for i in range(0, len(found), 1000):
        chunk = await _runs_of(redis, keys, found[i : i + 1000], keep)
        kept += [(i + j, r) for j, r in chunk]
        if len(kept) >= want:
            break
    kept = kept[:want]
    if len(kept) == want:
        return [r for _, r in kept], _next_cursor(found, kept[-1][0], before)
    if found and (len(found) == KEY_SCAN or horizon is not None):  # the search stopped there
        return [r for _, r in kept], _next_cursor(found, len(found) - 1, before)
    return [r for _, r in kept], None if horizon is None else f"{horizon}/0"


async def _runs_of(
    redis: Redis, keys: Keys, found: list[tuple[str, str, str]], keep: Any
) -> list[tuple[int, RunRecord]]:
    """(index in found, record) of the found runs that still exist and are kept, in order."""
    index = {rid: i for i, (_, _, rid) in enumerate(found)}
    records = await records_of(redis, keys, [rid for _, _, rid in found])
    return [(index[r.id], r) for r in records if keep(r)]


EARLIER_ENDS: dict[str, str] = {
    Reason.LEASE_EXPIRED: "ended: its lease lapsed (its executor died, hung or lost Redis)",
    Reason.HANDED_BACK: "handed back by its draining executor",
}


def timeline(run: RunRecord) -> list[dict[str, Any]]:
    """Created, assigned, claimed by, cancel decided (and by whom), ended."""
    out: list[dict[str, Any]] = [{"at_ms": run.created_ms, "event": "created"}]
    for e in run.earlier:  # (the last ones: a run keeps 5)
        if e.claimed_ms:
            claimed = f"attempt {e.attempt} claimed by {e.executor or '?'}"
            out.append({"at_ms": e.claimed_ms, "event": claimed})
        ended = EARLIER_ENDS.get(e.reason, f"ended ({e.reason})")
        out.append({"at_ms": e.ended_ms, "event": f"attempt {e.attempt} {ended}"})
    if run.assigned_ms:
        attempt = f"attempt {run.attempt}"
        if run.hand_backs:  # (those starts used none of max_attempts)
            attempt += f"; {run.hand_backs} handed back by draining executors"
        out.append({"at_ms": run.assigned_ms, "event": f"assigned ({attempt})"})
    # (a retried run not claimed again keeps the earlier attempt's claim: shown above)
    if run.claimed_ms and run.claimed_ms >= (run.assigned_ms or 0):
        out.append({"at_ms": run.claimed_ms, "event": f"claimed by {run.executor or '?'}"})
    if run.cancel_decided_ms:
        by = f" by {run.cancelled_by}" if run.cancelled_by else ""
        decided = int(run.cancel_decided_ms)  # (the timeline is in whole ms, as tc was)
        out.append({"at_ms": decided, "event": f"cancel decided ({run.reason}){by}"})
    if run.ended_ms:
        text = f"ended {run.state.name}"
        if run.cancelled_by and not run.cancel_decided_ms:
            text += f" (superseded by {run.cancelled_by})"
        elif run.reason and not run.cancel_decided_ms:
            text += f" ({run.reason})"
        out.append({"at_ms": run.ended_ms, "event": text})
    return out


async def get_run(redis: Redis, keys: Keys, rid: str) -> dict[str, Any] | None:
    """One run with its step outputs and its timeline."""
    from supersede.client import read_run

    found = await read_run(redis, keys.namespace, rid, follow=True)
    if found is None:
        return None
    run, outputs = found
    path = [{"point": name, "at_ms": round(ms, 3)} for name, ms in run.path()]
    outputs = codec.jsonable(outputs)  # whatever msgpack-able values the steps returned
    out = {**view(run), "outputs": outputs, "timeline": timeline(run), "path": path}
    if run.state in (RunState.QUEUED, RunState.ASSIGNED):  # (does an executor serve it?)
        out["workflow_served_ms_ago"] = await served_ms_ago(redis, keys, run.workflow)
    return out


async def ended_runs(redis: Redis, keys: Keys) -> int:
    """Ended runs retained now, over every workflow (from the counts hashes)."""
    return sum(n for (_, state), n in (await run_counts(redis, keys)).items() if state in ENDED)


async def _streams_read(
    redis: Redis, streams: list[tuple[str, str, bool]]
) -> list[tuple[dict[str, int], list[dict[Any, Any]]]]:
    """For each (stream, group, consumers too): the group's pending and lag, and its consumers
    when asked (none when the stream or the group is missing), in one pipeline: one call after
    another took `status` 269 round trips with 16 shards and three workflows, 28 s from a
    server 100 ms away, and the dashboard's overview gave up at 20 ms (a latency probe)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream, group, consumers in streams:
            pipe.xinfo_groups(stream)
            pipe.xlen(stream)
            if consumers:
                pipe.xinfo_consumers(stream, group)
        replies = iter(await pipe.execute(raise_on_error=False))
    out = []
    for _, group, consumers in streams:
        groups, length = next(replies), next(replies)
        found = next(replies) if consumers else []
        if isinstance(length, BaseException):
            raise length
        lag = {"pending": 0, "lag": 0}
        if isinstance(groups, BaseException):
            if not _missing(groups):  # (a stream nothing wrote yet)
                raise groups
        else:
            lag["lag"] = int(length)  # (no such group yet: every entry waits for one)
            for g in groups:
                if _text(g["name"]) == group:
                    lag = {"pending": int(g["pending"]), "lag": unread(g, int(length))}
        if isinstance(found, BaseException):
            if not _missing(found):
                raise found
            found = []
        out.append((lag, cast(list[dict[Any, Any]], found)))
    return out


def _missing(exc: BaseException) -> bool:
    """An XINFO error of a stream or group that does not exist yet."""
    said = str(exc)
    return "NOGROUP" in said or "no such key" in said.lower()


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
    registered = sorted({*defs, *invalid})  # their streams and executors count too
    streams: list[tuple[str, str, str, str | None]] = [  # (name, stream, group, its workflow)
        ("inbox", keys.events_stream, INGRESS_GROUP, None)
    ]
    for sk in keys.all_shards():
        streams += [("requests", sk.requests_stream, ADMISSION_GROUP, None),
                    ("results", sk.results_stream, ADMISSION_GROUP, None)]  # fmt: skip
        streams += [("assignments", sk.assignments_stream(wf), EXECUTOR_GROUP, wf)
                    for wf in registered]  # fmt: skip
    read = await _streams_read(redis, [(stream, group, wf is not None)
                                       for _, stream, group, wf in streams])  # fmt: skip
    totals: dict[str, Counter[str]] = {n: Counter() for n in ("inbox", "requests", "results",
                                                              "assignments")}  # fmt: skip
    executors: dict[str, set[str]] = {}
    idle: dict[str, int] = {}  # consumer -> its smallest idle time over the streams
    for (name, _, _, wf), (lag, consumers) in zip(streams, read, strict=True):
        totals[name].update(lag)
        for c in consumers:
            who = _text(c["name"])
            executors.setdefault(who, set()).add(cast(str, wf))
            idle[who] = min(idle.get(who, 1 << 62), int(c.get("idle", 1 << 62)))
    lags = {name: {"pending": n["pending"], "lag": n["lag"]} for name, n in totals.items()}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.workflows_served_hash)
        pipe.hgetall(keys.executors_hash)
        pipe.xlen(keys.dead_stream)
        served, said, dead = await pipe.execute()
    seconds, micros = await redis.time()  # (the marks are the server's time)
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    served_ago = {_text(w): max(0, now_ms - int(ms)) for w, ms in served.items()}
    live = {  # (those that read a stream lately: an executor of a build before this hash)
        name: sorted(wfs) for name, wfs in sorted(executors.items()) if idle[name] < live_idle_ms
    }
    for who, raw in said.items():
        said_ms, workflows = executor_said(raw)  # (each says so every second while it serves:
        if now_ms - said_ms < live_idle_ms:  # one whose slots are all busy reads no stream)
            live[_text(who)] = sorted(workflows)
    return {
        "workflows": {
            w: {
                "runs": dict(per_workflow[w]),
                **_definition_summary(defs.get(w)),
                # ms since an executor serving it said so (each second), None: none ever did
                "served_ms_ago": served_ago.get(w),
            }
            for w in sorted(per_workflow)
        },
        "invalid_workflows": invalid,
        "refused_workflows": _refused_now(defs),
        "streams": lags,
        "dead_letters": int(dead),
        # live: said so within live_idle_ms, or read one of its streams then (a consumer's
        # idle time only restarts on the streams that gave it entries, on some server versions)
        "executors": dict(sorted(live.items())),
        "at_ms": int(time.time() * 1000),
    }


def _refused_now(defs: dict[str, WorkflowDef]) -> dict[str, str]:
    """The stored definitions ingress serves but an executor of this build would refuse to
    register (a rule added since they were stored): id -> why. No executor of this build can
    serve them until they change."""
    refused = {}
    for wid, wf in sorted(defs.items()):
        try:
            parse(wf.to_dict())
        except DefinitionError as exc:
            refused[wid] = str(exc)
    return refused


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
        "scope": None if conc is None else conc.scope,
        "debounce_ms": 0 if conc is None else conc.debounce_ms,
        "max_wait_ms": 0 if conc is None else conc.max_wait_ms,
    }


async def dead_letters(redis: Redis, keys: Keys, limit: int = 100) -> list[dict[str, Any]]:
    rows = []
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrevrange(keys.dead_stream, count=limit)
    )
    for entry_id, fields in entries:
        row = {_text(k): _lossless(v) for k, v in fields.items()}
        # `id` is the dead letter's own entry id (what --replay takes); an event's own `id`
        # field (its idempotency key) is shown as `event_id_field`
        if "id" in row:
            row["event_id_field"] = row.pop("id")
        rows.append({"id": _text(entry_id), **row})
    return rows


_ONE_WORKFLOWS_REASONS = frozenset(
    {Reason.KEY_ERROR, Reason.KEY_TOO_LARGE, Reason.MAX_RUNS_ERROR, Reason.INTERNAL}
)


async def _check_listens(
    redis: Redis, keys: Keys, entry_id: str, workflow: str, original: dict[Any, Any]
) -> None:
    """Refuse, keeping the letter, a replay for a workflow that would not take the event (it
    would be acknowledged as unrouted, and the letter gone), or that has no room for the
    field naming the workflow."""
    name = original.get(Inbox.NAME, b"").decode("utf-8", "replace")
    _, defs, _ = await load_all(redis, keys)
    wf = defs.get(workflow)
    if wf is None or name not in wf.events:
        raise ValueError(
            f"{entry_id} is {workflow!r}'s, which "
            + ("is not registered" if wf is None else f"no longer listens to {name!r}")
            + ": register it again (with the event) before replaying, or publish the event again"
        )
    if len(original) >= Inbox.MAX_FIELDS:
        raise ValueError(
            f"{entry_id}'s event has {len(original)} fields, and one more naming {workflow!r} "
            f"would be over the {Inbox.MAX_FIELDS} an event may have: publish it again instead"
        )


async def _check_routed(redis: Redis, keys: Keys, entry_id: str, original: dict[Any, Any]) -> None:
    """Refuse, keeping the letter, a replay of a whole event no registered workflow listens to
    (its `name` a second time, say: the letter keeps the last): it would be acknowledged
    without a run and its only copy gone (an API-user probe). An event without a name is
    dead-lettered again; with no workflow registered at all, ingress reads nothing yet."""
    name = original.get(Inbox.NAME)
    if not name:
        return
    _, defs, _ = await load_all(redis, keys)
    text = name.decode("utf-8", "replace")
    if defs and not any(text in wf.events for wf in defs.values()):
        raise ValueError(
            f"{entry_id}'s event is named {text!r}, which no registered workflow listens to: "
            "replayed, it would make no run and the letter would be gone; register a workflow "
            "that listens to it before replaying, or publish the event again under its name"
        )


async def replay_dead(redis: Redis, keys: Keys, entry_id: str) -> str:
    """Publish a dead letter's original fields to the inbox again, then delete it."""
    ms, _, seq = entry_id.partition("-")
    if not re.fullmatch(r"\d+-\d+", entry_id) or max(int(ms), int(seq)) >= 2**64:
        raise ValueError(f"{entry_id!r} is not a dead letter id (`supersede dead` lists them)")
    entries = await redis.xrange(keys.dead_stream, min=entry_id, max=entry_id)
    if not entries:
        raise LookupError(f"no dead letter {entry_id!r}")
    fields = cast(dict[bytes, bytes], entries[0][1])
    if Dead.STREAM.encode() in fields:
        raise ValueError(f"{entry_id} is a refused run request or result, not an inbox event")
    if Dead.TRUNCATED.encode() in fields:
        raise ValueError(
            f"{entry_id} holds the event cut (fields over {Dead.FIELD_MAX:,} bytes cut, past "
            f"{Dead.FIELDS_MAX} fields or {Dead.TOTAL_MAX:,} bytes in all left out: "
            f"{fields[Dead.TRUNCATED.encode()].decode() or 'names too long to list'}): publish "
            "the event again instead"
        )
    original: dict[Any, Any] = original_fields(fields)
    # The event again, as the same event: without an `id` of its own, its first entry's id is
    # its id (a second replay within the de-duplication window makes no second run; an `id`
    # shaped like an entry id is hashed apart from entry ids, so its runs' ids are not the
    # first entry's). A letter naming a workflow (of its key, or `internal` to it) replays the
    # event for that workflow only: the others made their runs or have letters of their own.
    # A letter of the whole event names none: the event made no run. (Only those reasons: a
    # letter of a build before names were escaped may hold a producer's own `workflow` field.)
    workflow = fields.get(Dead.WORKFLOW.encode())
    if workflow and fields.get(Dead.REASON.encode(), b"").decode() in _ONE_WORKFLOWS_REASONS:
        await _check_listens(redis, keys, entry_id, workflow.decode(), original)
        original[Inbox.ONLY_WORKFLOW] = workflow
    else:
        await _check_routed(redis, keys, entry_id, original)
    entry = fields.get(Dead.ENTRY.encode())
    if Inbox.ID not in original and entry and len(original) < Inbox.MAX_FIELDS:
        original[Inbox.ID] = entry  # (an entry of 64 fields already is replayed without it)
    if isinstance(redis, RedisCluster):  # (the inbox and the dead letters are in two slots:
        new_id = await redis.xadd(keys.events_stream, original)  # no transaction; a crash
        await redis.xdel(keys.dead_stream, entry_id)  # between the two leaves it to replay again)
        return str(_text(new_id))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.events_stream, original)
        pipe.xdel(keys.dead_stream, entry_id)
        new_id, _ = await pipe.execute()
    return str(_text(new_id))


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


# -- the CLI's commands: (redis, keys, parsed args) -> a JSON-able result -----------------------


EARLIER = "an earlier entry"  # `duplicate_of` when the wait found the duplicate itself


def warn(text: str) -> None:
    """A line on stderr, its control characters escaped (it may quote published data)."""
    from supersede.services.render import printable

    print(printable(text), file=sys.stderr)


DEAD_LETTERED = "DEAD_LETTERED"  # `publish --wait`'s state for an event ingress refused


async def _say_duplicates(
    redis: Redis, keys: Keys, event_id: str, runs: list[dict[str, Any]]
) -> None:
    """stderr says which rows are a duplicate's: an --id published before makes no new run,
    and the row shows the first event's run (as `publish_runs` found it)."""
    from supersede.client import get_run

    for row in runs:
        if not row["duplicate_of"]:
            continue
        found = await get_run(redis, row["run"], namespace=keys.namespace) is not None
        print(
            f"supersede: event id {event_id!r} was published before (inbox entry "
            f"{row['duplicate_of']}): no new run of {row['workflow']!r}; "
            + (f"its run is {row['run']}" if found else "its run is not found (not created "
               "yet, or past its retention)"),
            file=sys.stderr,
        )  # fmt: skip


PUBLISH_WAIT_S = 60.0  # `publish --wait`'s --timeout unless given
INGRESS_MAX_PAYLOAD = Inbox.MAX_BYTES  # ingress's --max-payload unless set (warned past it)
# The fields of a `publish --wait` row besides workflow, key, run and duplicate_of, with the
# value of a row whose end did not give one (a dead letter has no outputs, say).
WAITED_ROW = {"state": None, "error": "", "outputs": None, "cancelled_by": None, "reason": None,
              "timed_out": False}  # fmt: skip


async def _publish(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    """Publish; list the runs the event will make; with --wait, their outcomes once ended.
    Whatever fails once the event is published (Redis, Ctrl-C) says it was, with its ids."""
    from supersede.client import PublishedError, event_fields, publish_runs

    data, metadata = _checked_publish(args)
    sending: list[bool] = []
    try:
        entry, planned, known = await publish_runs(
            redis, args.name, data, id=args.id, metadata=metadata, namespace=keys.namespace,
            on_sending=lambda: sending.append(True),
        )  # fmt: skip
    except PublishedError as exc:  # (published: said so, with its entry)
        raise NotFollowed(exc.entry, [], exc.__cause__ or exc) from None
    except (RedisError, RedisClusterException, OSError, asyncio.CancelledError) as exc:
        if not sending or isinstance(exc, ResponseError):  # (a reply: not published)
            raise
        # (its XADD was sent, no reply came: a server that hung past the socket timeout
        # applied it once it went on; "try again" published it twice: a CLI probe)
        raise MaybePublished(args.id, exc) from None
    if not planned:
        _warn_no_run(args.name, known)
    elif args.name in known and not args.wait:  # (--wait's rows say each dead letter)
        await _warn_refused(redis, keys, args.name, {p.workflow for p in planned})
    fields = event_fields(args.name, data, id=args.id, metadata=metadata)
    size = sum(len(k) + len(v) for k, v in fields.items())  # (what ingress measures)
    if size > INGRESS_MAX_PAYLOAD and not args.wait:  # (--wait says the dead letter)
        warn(f"supersede: warning: the event is {size:,} bytes, over ingress's default "
             f"--max-payload ({INGRESS_MAX_PAYLOAD:,}): it is dead-lettered (too_large) unless "
             "ingress runs with a larger one")  # fmt: skip
    runs: list[dict[str, Any]] = [
        {"workflow": p.workflow, "key": p.key, "run": p.run_id, "duplicate_of": p.duplicate_of}
        for p in planned
    ]
    if args.wait and planned and sys.stderr.isatty():  # (a person: the ids now, not at the end)
        ids = ", ".join(p.run_id for p in planned)
        warn(f"published inbox entry {entry}; waiting up to {args.timeout:g} s for its run(s) to "
             f"end: {ids} (Ctrl-C stops the wait, not the runs)")  # fmt: skip
    try:
        await _follow_published(redis, keys, args, entry, runs, args.name in known)
    except (RedisError, OSError, SupersedeError, asyncio.CancelledError) as exc:  # (Ctrl-C)
        raise NotFollowed(entry, [row["run"] for row in runs if row["run"]], exc) from None
    return {"entry": entry, "runs": runs}


async def _follow_published(
    redis: Redis,
    keys: Keys,
    args: argparse.Namespace,
    entry: str,
    runs: list[dict[str, Any]],
    listened: bool,
) -> None:
    """`publish` once the event is in the inbox: with --wait, each row gets its run's outcome
    (or the dead letter; an --id whose first entry ingress had not read yet when the event was
    published leads to that entry's run)."""
    from supersede.client import DeadLettered, WaitTimeout, get_run, wait_for_run

    if args.id:
        await _say_duplicates(redis, keys, args.id, runs)

    async def wait(row: dict[str, Any]) -> None:
        try:
            run = await wait_for_run(redis, row["run"], args.timeout, namespace=keys.namespace,
                                     entry=entry, workflow=row["workflow"])  # fmt: skip
        except DeadLettered as exc:  # ingress refused the event: no run will be
            warn(f"supersede: {exc}")
            row["state"], row["error"] = DEAD_LETTERED, f"{exc.reason}: {exc.detail}"
            row["cancelled_by"], row["reason"] = None, exc.reason
            return
        except WaitTimeout as exc:  # the others are still shown
            warn(f"supersede: {exc}")
            now = await get_run(redis, exc.run_id, namespace=keys.namespace)
            if exc.run_id != row["run"]:  # (it followed a duplicate to the first event's run,
                # or the event's own run to the shard a new version put it on)
                if now is None or now.entry != entry:
                    row["duplicate_of"] = row.get("duplicate_of") or EARLIER
                row["run"] = exc.run_id
            row["state"], row["error"] = now.state if now else "NOT_CREATED", str(exc)
            row["key"] = now.key if now else row["key"]
            row["timed_out"], row["cancelled_by"], row["reason"] = True, None, None
            return
        if run.id != row["run"] and run.entry != entry:  # (the same entry: the event's own
            # run, on the shard a new version put it on; a duplicate's is another entry's)
            row["duplicate_of"] = row.get("duplicate_of") or EARLIER
        row["run"], row["key"], row["state"], row["error"] = run.id, run.key, run.state, run.error
        row["outputs"] = codec.jsonable(run.outputs)
        row["cancelled_by"], row["reason"] = run.cancelled_by, run.reason

    if not (args.wait and listened):  # (before ingress started too: it may start meanwhile)
        return
    # A workflow that listens but whose key fails for this data makes no run: its row waits
    # for the dead letter ingress writes for it.
    _, defs, _ = await load_all(redis, keys)
    refused = [
        {"workflow": wid, "key": None, "run": None, "duplicate_of": None}
        for wid in _unplanned(defs, args.name, {row["workflow"] for row in runs})
    ]
    runs.extend(refused)
    await asyncio.gather(
        *(wait(row) for row in runs if row["run"]),
        *(_wait_dead_letter(redis, keys, entry, row, args.timeout) for row in refused),
    )
    for row in runs:  # (every row has every field, whatever its end: --json is for scripts)
        for name, default in WAITED_ROW.items():
            row.setdefault(name, default)


def _checked_publish(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`publish`'s arguments checked (--timeout only with --wait, set to its default there);
    the event's data and metadata."""
    if args.timeout is not None and not args.wait:
        raise ValueError("--timeout is how long --wait waits: give --wait too")
    args.timeout = PUBLISH_WAIT_S if args.timeout is None else args.timeout
    data = _json_object(_read_data(args.data), "the event's data", '{"userId": "u1"}')
    metadata = getattr(args, "metadata", None)
    if metadata is None:
        return data, None
    return data, _json_object(metadata, "--metadata", '{"tenant": "acme"}')


def _read_data(text: str) -> str | bytes:
    """`publish`'s data argument: the JSON itself, `-` for stdin, `@PATH` for a file (an
    argument is limited to ~128 KiB by the OS, the inbox takes 1 MiB: "Argument list too
    long", a new-user probe). Neither form is JSON, so none is taken for the other."""
    if text == "-":
        return sys.stdin.buffer.read()
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise ValueError(f"the event's data file {text[1:]!r}: {exc.strerror}") from None
    return text


def _json_object(text: str | bytes, what: str, example: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, e.g. '{example}'")
    if _LONG_NUMBER.search(text if isinstance(text, bytes) else text.encode()):
        # (nested past the stdlib's depth: orjson read it, 254 deep; not looked at closer)
        with contextlib.suppress(RecursionError):
            json.loads(text, parse_int=functools.partial(_int64, what))
    return value


_LONG_NUMBER = re.compile(rb"\d{19}")  # (what may be an integer past 64 bits: looked at closer)


def _int64(what: str, digits: str) -> int:
    """An integer of the JSON, refused past 64 bits: orjson, as ingress reads events, makes
    it a float (123456789012345678901234567890 was published as 1.2345678901234568e+29, its
    digits lost: a CLI probe)."""
    n = int(digits)
    if not -(1 << 63) <= n < 1 << 64:
        raise ValueError(f"{what} holds an integer past 64 bits ({digits[:40]}): JSON readers "
                         "such as ingress's make it a float and lose its digits; send it as a "
                         "string")  # fmt: skip
    return n


def _warn_no_run(name: str, known: list[str]) -> None:
    """`publish` of an event that makes no run: why, on stderr."""
    if name in known:
        warn(
            f"supersede: warning: a workflow listens to {name!r} but no run could be "
            "planned: its key or max_runs expression fails for this data (ingress "
            "dead-letters the event for it: see `supersede dead`), or no service has started "
            "in this namespace yet"
        )
    elif known:
        warn(
            f"supersede: warning: no workflow listens to {name!r}, so this event makes no "
            f"run (known events: {', '.join(known)})"
        )
    else:  # (ingress reads nothing while none is registered: the event is not lost)
        warn(
            "supersede: warning: no workflow is registered in this namespace yet, so ingress "
            "reads nothing: the event waits in the inbox, and makes the runs of the workflows "
            "registered when it is read (start their executors, or `supersede register "
            "MODULE`); publishing it again would make them twice"
        )


def _unplanned(defs: dict[str, WorkflowDef], name: str, planned: set[str]) -> list[str]:
    """The ids of the workflows listening to `name` that `planned` has no run of (their key or
    max_runs expression fails for the event), sorted."""
    return sorted(w.id for w in defs.values() if name in w.events and w.id not in planned)


async def _warn_refused(redis: Redis, keys: Keys, name: str, planned: set[str]) -> None:
    """`publish` of an event some workflows listening to it make no run of: which, on stderr
    (the event's other runs were listed, and these said nothing: an API-user probe)."""
    _, defs, _ = await load_all(redis, keys)
    refused = _unplanned(defs, name, planned)
    if refused:
        warn(
            f"supersede: warning: no run of {', '.join(map(repr, refused))}: its key or "
            "max_runs expression fails for this data (ingress dead-letters the event for it: "
            "see `supersede dead`)"
        )


class NotFollowed(Exception):
    """`publish --wait`: the event is published, but waiting for its runs failed (Redis, or
    Ctrl-C). The message says so, with the entry and run ids: publishing it again would make
    its runs twice (a "try again" did)."""

    def __init__(self, entry: str, runs: list[str], cause: BaseException) -> None:
        self.interrupted = isinstance(cause, asyncio.CancelledError)
        why = "interrupted" if self.interrupted else f"{type(cause).__name__}: {cause}"
        made = f"; its runs: {', '.join(runs)}" if runs else ""
        follow = (
            "`supersede run ID`" if runs else "`supersede runs` (event id: the entry's, or --id)"
        )
        super().__init__(
            f"the event was published (inbox entry {entry}{made}), but following its runs "
            f"stopped ({why}): do not publish it again; follow them with {follow}"
        )


class MaybePublished(NotFollowed):
    """`publish`: the event's XADD was sent and its reply never came (a server that hung, a
    connection cut, Ctrl-C): it may be in the inbox. Said so, not "try again"."""

    def __init__(self, event_id: str | None, cause: BaseException) -> None:
        self.interrupted = isinstance(cause, asyncio.CancelledError)
        why = "interrupted" if self.interrupted else f"{type(cause).__name__}: {cause}"
        again = (
            f"publishing it again with --id {event_id} makes no second run"
            if event_id
            else "publishing it again makes its runs twice if it was (give events an --id)"
        )
        Exception.__init__(
            self,
            f"the event may have been published: its XADD failed with no reply ({why}); "
            f"look for its runs with `supersede runs` before publishing it again: {again}",
        )


async def _wait_dead_letter(
    redis: Redis, keys: Keys, entry: str, row: dict[str, Any], timeout: float
) -> None:
    """The row of a workflow that makes no run of inbox entry `entry` (its key expression fails
    for the data), once ingress dead-lettered the entry for it: DEAD_LETTERED with the reason;
    timed out after `timeout` seconds."""
    from supersede.client import DEAD_LOOK_AFTER, DEAD_LOOK_EVERY, dead_letter_of

    deadline = time.monotonic() + timeout
    row["cancelled_by"] = row["reason"] = None
    await asyncio.sleep(min(DEAD_LOOK_AFTER, timeout))  # (ingress writes it within ms)
    while True:
        dead = await dead_letter_of(redis, entry, row["workflow"], namespace=keys.namespace)
        if dead is not None:
            row["state"], row["error"] = DEAD_LETTERED, f"{dead[0]}: {dead[1]}"
            row["reason"] = dead[0]
            warn(
                f"supersede: no run of {row['workflow']!r}: the event was dead-lettered for it "
                f"({dead[0]}: {dead[1]}); see `supersede dead`"
            )
            return
        if time.monotonic() >= deadline:
            row["state"], row["timed_out"] = "NOT_CREATED", True
            row["error"] = f"no run and no dead letter of the event within {timeout:g} s"
            warn(f"supersede: {row['workflow']!r}: {row['error']}")
            return
        await asyncio.sleep(min(DEAD_LOOK_EVERY, max(0.0, deadline - time.monotonic())))


async def _runs(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    if args.workflow:
        await require_workflow(redis, keys, args.workflow)
    if args.event is not None:
        runs = await runs_of_event(redis, keys, args.event, args.workflow)
        wanted = RunState[args.state.upper()] if args.state else None
        return [view(r) for r in runs if (wanted is None or r.state is wanted)
                and (args.key is None or r.key == args.key)][: args.limit]  # fmt: skip
    return await list_runs(
        redis, keys, workflow=args.workflow, key=args.key, state=args.state, limit=args.limit
    )


async def runs_of_event(
    redis: Redis, keys: Keys, event_id: str, workflow: str | None = None
) -> list[RunRecord]:
    """The runs an event made, by its id (its `id` field, else its inbox entry id), one per
    registered workflow at most: a run id is the event's hash with the workflow's, in the
    shard of its group, which its key decides; every shard is looked in, so a producer that
    knows only the id it sent (any Redis client) finds them. Newest created first."""
    workflows = [workflow] if workflow else sorted(
        codec.text(w) for w in await redis.hkeys(keys.workflows_hash)
    )  # fmt: skip
    digests = {event_digest(event_id, w, explicit) for w in workflows for explicit in (False, True)}
    rids = [f"{shard}-{d}" for d in sorted(digests) for shard in range(keys.shards)]
    runs = await records_of(redis, keys, rids)
    return sorted(runs, key=lambda r: (r.created_ms or 0, r.seq), reverse=True)


async def _run(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    if not RUN_ID_FORM.fullmatch(args.id):
        raise ValueError(
            f"not a run id: {args.id!r} (a run id is <shard>-<20 hex digits>, as `runs` and "
            f"`publish` show it; the runs of an event: supersede runs --event {args.id})"
        )
    run = await get_run(redis, keys, args.id)
    if run is None:
        raise LookupError(f"no run {args.id!r} (never created, or past its retention: --retention)")
    return run


async def _cancel(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    if args.id and (args.workflow or args.key is not None):
        raise ValueError("cancel takes ID, or --workflow and --key, not both")
    scripts = Scripts(redis, keys)
    if args.id:
        await require_run(redis, keys, args.id)
        return await cancel_runs(scripts, [args.id])
    if args.workflow and args.key is not None:
        await require_workflow(redis, keys, args.workflow)
        return await cancel_key(redis, scripts, args.workflow, args.key)
    raise ValueError("cancel needs ID, or --workflow and --key")


RETIRE_SETTLE_S = 3.0  # ingress reloads its routes within --refresh-interval (0.25 s) of a change
RETIRE_CATCH_UP_S = 30.0  # for admission to admit the requests written before the retire
SERVED_WINDOW_MS = 15_000  # an executor says it serves its workflows every second


async def retire(redis: Redis, keys: Keys, workflow: str, *, force: bool = False) -> dict[str, Any]:
    """Retire `workflow`: remove it from the registry (ingress then routes its events
    nowhere), cancel its live runs (those of the requests written meanwhile too, once admission
    admitted them), and delete its assignment streams, which nothing trims once it is not
    registered. Refused while an executor serves it (said so within SERVED_WINDOW_MS; `force`
    overrides): it would register it again within a second. Run again, it finishes a retire
    that was interrupted (the workflow is gone from the registry, not from its versions)."""
    scripts = Scripts(redis, keys)
    if not force:  # (an executor from before 2026-12-05 marks nothing served, but reads)
        read = await _streams_read(redis, [(sk.assignments_stream(workflow), EXECUTOR_GROUP, True)
                                           for sk in keys.all_shards()])  # fmt: skip
        readers = sorted({
            _text(c["name"])
            for _, consumers in read
            for c in consumers
            if int(c.get("idle", 1 << 62)) < SERVED_WINDOW_MS
        })  # fmt: skip
        if readers:
            raise ValueError(
                f"workflow {workflow!r} is served by live executors ({', '.join(readers)} read "
                "its assignments lately): remove it from the executors' module and restart "
                f"them first, then retire it {SERVED_WINDOW_MS // 1000} s later; or pass --force"
            )
    before = False
    try:
        ago = await scripts.retire_workflow(workflow, 0 if force else SERVED_WINDOW_MS)
    except LookupError:
        if not await redis.hget(keys.workflow_versions_hash, workflow):
            raise
        ago, before = None, True  # (retired before: its runs and streams are seen to again)
    if ago is not None:
        raise ValueError(
            f"workflow {workflow!r} is served by a live executor (one said so {ago / 1000:.1f} s "
            "ago): remove it from the executors' module and restart them first (an executor "
            f"registers its workflows again within a second), then retire it "
            f"{SERVED_WINDOW_MS // 1000} s later; or pass --force"
        )
    out_at = time.monotonic()  # (out of the registry: its events make no run until it is back)
    await asyncio.sleep(RETIRE_SETTLE_S)  # (then ingress appends no more of its requests)
    if not await _admitted_so_far(redis, keys, RETIRE_CATCH_UP_S):
        raise TimeoutError(
            f"workflow {workflow!r} is out of the registry, but admission has not admitted the "
            f"run requests written before (within {RETIRE_CATCH_UP_S:g} s: is it running?); "
            f"run `supersede retire {workflow}` again once it has, to cancel its runs"
        )

    def live(run: RunRecord) -> bool:  # (a CANCELLING run waits for its executor)
        return run.workflow == workflow and run.state.value in LIVE - {RunState.CANCELLING.value}

    async def still_retired() -> None:  # (an executor that started meanwhile registers it)
        if await redis.hget(keys.workflows_hash, workflow):
            raise ValueError(
                f"workflow {workflow!r} was registered again meanwhile (an executor serving it "
                "started, one that --force passed over registered it, or one from before "
                "2026-12-05, which marks nothing served): it was out of the registry for up to "
                f"{time.monotonic() - out_at:.0f} s, and its events published then made no run "
                "of it (ingress counts them in supersede_ingress_unrouted_total); its runs and "
                "streams are left as they are"
            )

    await still_retired()
    cancelled = await _cancel_live(redis, keys, scripts, live, Reason.RETIRED)
    await still_retired()
    # one command (on a cluster, redis-py sends one per slot; a cluster pipeline's unlink is a
    # coroutine, which queued nothing)
    await redis.unlink(*(sk.assignments_stream(workflow) for sk in keys.all_shards()))
    return {"retired": workflow, "cancelled": cancelled, "before": before}


async def _cancel_live(
    redis: Redis, keys: Keys, scripts: Scripts, keep: Callable[[RunRecord], bool], reason: str
) -> int:
    """Cancel the live runs that pass `keep`, read first (their ids only: the records of a
    backlog of 1,000,000 runs held 1.5 GB in the process, a probe; cancelled as read, the
    zsets read by offset shrank under the reads, and each pass missed half), then again until
    a pass finds none (a cancel may start a group's next queued run); how many. A run read
    twice is cancelled once ("679164 live runs cancelled" of 1,000,000)."""
    cancelled = 0
    while True:
        ids: dict[str, None] = {}
        async for page in _live_pages(redis, keys, keep):
            ids.update(dict.fromkeys(r.id for r in page))
        if not ids:
            return cancelled
        listed = list(ids)
        for i in range(0, len(listed), 1000):
            flags = await cancel_runs(scripts, listed[i : i + 1000], reason)
            cancelled += sum(flags.values())


async def _admitted_so_far(redis: Redis, keys: Keys, timeout: float) -> bool:
    """True once admission has read and acknowledged every run request written until now
    (each requests stream consumed past its tail of now, as `trim` computes it); False after
    `timeout` seconds."""
    streams = [sk.requests_stream for sk in keys.all_shards()]
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        tails = await pipe.execute()
    last = {s: stream_id(t[0][0]) for s, t in zip(streams, tails, strict=True) if t}
    deadline = time.monotonic() + timeout
    while last:
        for stream, tail in list(last.items()):
            try:
                groups = await redis.xinfo_groups(stream)
                summary = await redis.xpending(stream, ADMISSION_GROUP)
            except ResponseError:  # (the stream or its group is gone: nothing left to admit)
                del last[stream]
                continue
            ours = [g for g in groups if codec.text(g["name"]) == ADMISSION_GROUP]
            oldest = {ADMISSION_GROUP: summary["min"]} if summary.get("min") else {}
            cut = consumed_below(ours, oldest) if ours else None
            if cut is not None and stream_id(cut) > tail:
                del last[stream]
        if not last:
            break
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _retire(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    return await retire(redis, keys, args.workflow, force=args.force)


async def _register(redis: Redis, keys: Keys, args: argparse.Namespace) -> Any:
    """Register the workflows of MODULEs without running them (an executor does it as it
    starts): a deploy that adds a pool registers its workflows before their events are
    published, since ingress acknowledges an event no registered workflow listens to."""
    from supersede.errors import WorkflowRejected
    from supersede.registry import register_all
    from supersede.services.modules import load_modules

    defs = [wf.definition() for wf in load_modules(args.module)]
    try:
        stored = await register_all(redis, keys, defs)
    except WorkflowRejected as exc:
        which = f"workflow {exc.workflow!r}" if exc.workflow else "a workflow"
        raise ConfigError(f"{which} cannot be registered: {exc}") from None
    return [{"workflow": wf.id, "version": wf.version, "events": list(wf.events)} for wf in stored]


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
    "retire": _retire,
    "register": _register,
}
