"""The Lua loader and the typed async functions that are the only way to run a script.

Scripts live in ``lua/``; a line ``-- @include name`` is replaced by ``lua/includes/name.lua``.
The number of KEYS of each script is read from its header block and checked on every call.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from supersede import aio, codec
from supersede.errors import BadArguments, WorkflowRejected, raise_for_status
from supersede.keys import Keys
from supersede.lane import Lane
from supersede.protocol import ADMISSION_GROUP, EXECUTOR_GROUP, CutFields, Dead, Entry, Reason
from supersede.streams import OWN_LISTED, entry_fields

LUA_DIR = files("supersede.lua")
_INCLUDE = re.compile(r"^-- @include (\w+)\s*$", re.MULTILINE)
_KEY_DECL = re.compile(r"^\s*KEYS\[(\d+)(?:\.\.(\d*)|(\?))?\]", re.MULTILINE)
RECLAIM_CAP = 100_000  # leases a reclaim call looks at in a shard (a call blocks the server)
HEAL_UNREAD_MOST = 1000  # unread entries heal_lag counts (a call reads them: bounded)
MAX_VERSIONS = 50  # versions of a workflow the registry remembers (cancel --key looks at each)

SCRIPT_NAMES = (
    "admit",
    "claim",
    "take",
    "heartbeat",
    "finish",
    "reap",
    "cancel",
    "append_requests",
    "register_workflow",
    "retire_workflow",
    "claim_ids",
    "fire_debounced",
    "forget_consumers",
    "take_inbox",
    "heal_lag",
    "hand_back",
    "reclaim",
)


def _include(match: re.Match[str], seen: frozenset[str]) -> str:
    name = match.group(1)
    if name in seen:
        raise ValueError(f"Lua include cycle through {name!r}")
    body = (LUA_DIR / "includes" / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: _include(m, seen | {name}), body)


@cache
def load_source(name: str) -> tuple[str, int]:
    """The script with its includes inlined, and the number of KEYS its header declares; a
    negative number -n when the last declaration is open-ended (``KEYS[n..]``: n or more) or
    optional (``KEYS[n?]``: n - 1 or more)."""
    text = (LUA_DIR / f"{name}.lua").read_text()
    header = text.split("]]", 1)[0]
    decls = list(_KEY_DECL.finditer(header))
    last = max(decls, key=lambda m: int(m.group(1)))
    if last.group(2) == "":
        nkeys = -int(last.group(1))
    elif last.group(3):
        nkeys = 1 - int(last.group(1))
    else:
        nkeys = max(int(m.group(2) or m.group(1)) for m in decls)
    return _INCLUDE.sub(lambda m: _include(m, frozenset()), text), nkeys


Assigned = tuple[str, str | bytes, str, int]
"""An assignment to claim: (assignment stream, entry id, run id, attempt)."""


@dataclass(frozen=True, slots=True)
class AdmitResult:
    created: int
    duplicates: int
    assigned: int
    cancelled: int
    # cancelled runs that carry a trace context: (run id, its traceparent, superseding run
    # id or '', that run's traceparent or '', reason)
    traced: tuple[tuple[str, str, str, str, str], ...] = ()
    due: int = 0  # the earliest debounce timer the call set (ms), 0: none
    # runs claimed for the executor of a hand-over (see `HandOver`), state 'R' or 'X'
    handed: tuple[Claim, ...] = ()
    # runs whose records (or active members) were gone, their slots freed (see ReapResult)
    records_gone: int = 0


@dataclass(frozen=True, slots=True)
class HandOver:
    """An executor of the caller's process (`supersede serve`) that takes runs straight from an
    admit call: up to `free` runs of `workflows` are claimed for it in that call, under a lease
    of `lease_ms`, instead of being written to their assignment streams."""

    executor: str
    lease_ms: int
    free: int
    workflows: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FireResult:
    fired: int
    next_due: int  # the shard's earliest timer still set (ms), 0: none
    assigned: int
    cancelled: int
    records_gone: int = 0  # runs whose records or active members were gone (see AdmitResult)


@dataclass(frozen=True, slots=True)
class Claim:
    """One claimed run; `claimed` is False when the run must not start."""

    run_id: str
    claimed: bool
    attempt: int = 0
    workflow: str = ""
    version: str = ""
    input: bytes = b""
    key: str = ""
    seq: str = ""
    state: str = ""
    traceparent: str = ""  # the run's trace context ('' when it is not traced)
    handed_back: bool = False  # its first start since a draining executor handed it back


@dataclass(frozen=True, slots=True)
class Taken:
    """What one `take` call read and claimed."""

    claimed: list[tuple[int, bytes, Claim]]
    """(shard, entry id, run) of each run claimed, in the order read."""
    refused: int
    """Entries whose run must not start (cancelled, re-assigned or gone): acknowledged."""
    reads: list[tuple[str, int, bytes, int]]
    """(stream, entries read, last entry id, entries asked) of each read that gave entries: a
    stream once per round (entries of runs it cannot claim take no slot: lua/take.lua)."""
    malformed: list[tuple[str, bytes]]
    """(stream, entry id) of each entry that was not an assignment: acknowledged."""
    reached: int
    """How many streams, the first ones given, were read (the others were not needed)."""
    unrung: int = 0
    """Assignments read whose writer rang no bell (lua/includes/transitions.lua)."""

    def __len__(self) -> int:
        return sum(n for _, n, _, _ in self.reads)


@dataclass(frozen=True, slots=True)
class Turn:
    """One finish call of an executor applying its own results (see lua/finish.lua)."""

    executor: str
    number: int
    ttl_ms: int
    previous: Mapping[int, int]  # shard -> the executor's last turn there (0: none known)


@dataclass(frozen=True, slots=True)
class FinishResult:
    applied: int
    stale: int
    assigned: int


@dataclass(frozen=True, slots=True)
class ReapResult:
    retried: int
    failed: int
    cancelled: int
    expired: int
    assigned: int
    reassigned: int = 0
    forgotten: int = 0  # groups whose memory (newest runs, fence) was forgotten
    leases: int = 0  # leases looked at (the call's limit: more may be due)
    failed_by: tuple[tuple[str, int], ...] = ()  # (workflow, runs failed) of `failed`
    # members of runs whose records are gone (evicted, deleted by hand), dropped with their
    # slots
    records_gone: int = 0


def _reap_result(r: Sequence[Any]) -> ReapResult:
    failed_by = _pairs(r[10:])
    retried, failed, cancelled, expired, assigned, reassigned, forgotten, leases, gone = (
        int(x) for x in r[1:10]
    )
    return ReapResult(retried, failed, cancelled, expired, assigned, reassigned, forgotten,
                      leases, failed_by, gone)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HandBackResult:
    handed: int  # retried at once, no attempt used
    cancelled: int  # CANCELLING runs ended CANCELLED
    failed: int  # past the free hand-backs, no attempt left
    stale: int  # not this executor's attempt any more, or of one attempt: left to the lease
    failed_by: tuple[tuple[str, int], ...] = ()  # (workflow, runs failed) of `failed`

    @classmethod
    def of(cls, reply: Sequence[Any]) -> HandBackResult:
        handed, cancelled, failed, stale = (int(x) for x in reply[1:5])
        return cls(handed, cancelled, failed, stale, _pairs(reply[5:]))


def hand_back_call(
    keys: Keys,
    shard: int,
    executor: str,
    runs: Sequence[tuple[str, int]],
    *,
    assign_deadline_ms: int = 0,
    now: int = 0,
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of lua/hand_back.lua for (run id, attempt) pairs of one shard (also
    called by the executor's lease keeper, on its own sync client)."""
    sk = keys.shard(shard)
    args: list[Any] = [now, assign_deadline_ms, executor]
    for rid, attempt in runs:
        args += (rid, attempt)
    return [*sk.state_keys(), sk.newest_hash, sk.newest_at_zset], args


def _pairs(flat: Sequence[Any]) -> tuple[tuple[str, int], ...]:
    """(name, count) pairs from a script's flat reply."""
    return tuple((_s(flat[i]), int(flat[i + 1])) for i in range(0, len(flat) - 1, 2))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _claimed(item: Sequence[Any], state: str = "R") -> Claim:
    """A claimed run from {run id, attempt, workflow, version, input, key, sequence, tp[, hq]}."""
    rid, attempt, workflow, version, body, key, seq, tp, *more = item
    return Claim(run_id=_s(rid), claimed=True, attempt=int(attempt), workflow=_s(workflow),
                 version=_s(version), input=body, key=_s(key), seq=_s(seq), state=state,
                 traceparent=_s(tp), handed_back=bool(more and int(more[0])))  # fmt: skip


def _parse_claims(reply: list[Any]) -> list[Claim]:
    out = []
    for item in reply[1:]:
        if int(item[0]) == 1:
            out.append(_claimed(item[1:10]))
        else:
            out.append(Claim(run_id=_s(item[1]), claimed=False, state=_s(item[2])))
    return out


class Scripts:
    """Typed wrappers over the Lua scripts of one deployment.

    `now` parameters exist for tests that drive the clock; services leave them None and the
    scripts use the server's clock, so every process agrees on time. With a `lane` (the
    services, on one server) the calls go through it instead of redis-py's pool.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        admission_group: str = ADMISSION_GROUP,
        executor_group: str = EXECUTOR_GROUP,
        lane: Lane | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lane = lane
        self.admission_group = admission_group
        self.executor_group = executor_group
        self._scripts: dict[str, tuple[AsyncScript, int]] = {}
        # (a server that restarted empty answers every call in flight NOSCRIPT: one load at a
        # time, on one connection; at once, each took a connection the pool kept, 18-32 a
        # process after each restart, a probe)
        self._loading = asyncio.Lock()
        for name in SCRIPT_NAMES:
            source, nkeys = load_source(name)
            self._scripts[name] = (redis.register_script(source), nkeys)

    async def load(self) -> None:
        """Load every script now, so the first real call does not pay for it (readiness): in
        one round trip on one server (one each took 15 round trips of every start, 3.6 s of a
        start 0.24 s away); a cluster's client sends each to every master in turn."""
        scripts = [script for script, _ in self._scripts.values()]
        if isinstance(self.redis, RedisCluster):
            for script in scripts:
                script.sha = await self.redis.script_load(script.script)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for script in scripts:
                pipe.script_load(script.script)
            shas = await pipe.execute()
        for script, sha in zip(scripts, shas, strict=True):
            script.sha = codec.text(sha)

    def _checked(self, name: str, keys: Sequence[str]) -> AsyncScript:
        """The script, once the number of keys matches its header."""
        script, nkeys = self._scripts[name]
        if len(keys) != nkeys and not (nkeys < 0 and len(keys) >= -nkeys):
            wanted = f"at least {-nkeys}" if nkeys < 0 else str(nkeys)
            raise BadArguments(-1, f"{name} takes {wanted} keys, got {len(keys)}")
        return script

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        script = self._checked(name, keys)
        reply: list[Any]
        if self.lane is None:
            reply = await script(keys=list(keys), args=list(args))
        else:
            try:
                reply = await self.lane.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:  # (a server that restarted empty: load it, once)
                async with self._loading:
                    script.sha = await self.redis.script_load(script.script)
                reply = await self.lane.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        raise_for_status(reply)
        return reply

    async def admit(
        self,
        shard: int,
        entries: Sequence[tuple[str | bytes, bytes]],
        *,
        now: int = 0,
        read_us: int = 0,
        written_us: Sequence[int] = (),
        assign_deadline_ms: int = 0,
        hand_over: HandOver | None = None,
    ) -> AdmitResult:
        """Admit (requests-stream entry id, packed RunRequest) pairs of one shard; `read_us`:
        when admission read them (a point of each run's path, µs; 0: unknown); `written_us`:
        each entry's `t` field (when it was written; 0 or missing: the entry id's ms);
        `assign_deadline_ms`: when the reaper first looks at a run assigned here but not
        claimed (0: after 1 s). An entry id '' is a request handed over in this process, never
        written to the stream. `hand_over`: claim runs for that executor in the same call."""
        spec = b""
        if hand_over is not None:
            spec = codec.pack({"e": hand_over.executor, "l": hand_over.lease_ms,
                               "n": hand_over.free, "w": list(hand_over.workflows)})  # fmt: skip
        args: list[Any] = [now, self.admission_group, shard, read_us, assign_deadline_ms, spec]
        for i, (entry_id, payload) in enumerate(entries):
            args += (entry_id, payload, written_us[i] if i < len(written_us) else 0)
        sk = self.keys.shard(shard)
        keys = [*sk.state_keys(), sk.requests_stream, sk.newest_hash, sk.newest_at_zset,
                sk.fences_hash, sk.debounce_hash, sk.due_zset]  # fmt: skip
        r = await self._call("admit", keys, args)
        cancels = r[5] if len(r) > 5 else []  # (the script adds them only when some are traced)
        traced = tuple((_s(a), _s(b), _s(c), _s(d), _s(e)) for a, b, c, d, e in cancels)
        due = int(r[6]) if len(r) > 6 else 0
        handed = tuple(_claimed(item[:8], _s(item[8])) for item in r[7]) if len(r) > 7 else ()
        gone = int(r[8]) if len(r) > 8 else 0
        return AdmitResult(int(r[1]), int(r[2]), int(r[3]), int(r[4]), traced, due, handed, gone)

    async def fire_debounced(
        self, shard: int, *, now: int = 0, limit: int = 1000, assign_deadline_ms: int = 0
    ) -> FireResult:
        """Apply the due debounce timers of one shard (at most `limit` groups)."""
        sk = self.keys.shard(shard)
        keys = [*sk.state_keys(), sk.newest_hash, sk.newest_at_zset, sk.debounce_hash,
                sk.due_zset, sk.fences_hash]  # fmt: skip
        r = await self._call("fire_debounced", keys, [now, limit, assign_deadline_ms])
        return FireResult(
            int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]) if len(r) > 5 else 0
        )

    async def claim(
        self,
        shard: int,
        executor: str,
        items: Sequence[Assigned],
        *,
        lease_ms: int,
        now: int = 0,
        read_us: int = 0,
    ) -> list[Claim]:
        """Claim assignments of one shard, each (stream, entry id, run id, attempt); `read_us`:
        when the executor read them (a point of each run's path, µs; 0: unknown)."""
        keys, args = self._claim_call(executor, {shard: items}, lease_ms, now, read_us)
        return _parse_claims(await self._call("claim", keys, args))

    async def claim_shards(
        self,
        executor: str,
        batches: Mapping[int, Sequence[Assigned]],
        *,
        lease_ms: int,
        now: int = 0,
        read_us: int = 0,
    ) -> dict[int, list[Claim]]:
        """`claim` for several shards at once: one script call on a single server (its fixed
        cost is paid once for every shard read together); concurrent calls on a cluster,
        where the shards live in different slots."""
        shards = list(batches)
        if isinstance(self.redis, RedisCluster):
            replies = await aio.gather(
                *(
                    self.claim(s, executor, batches[s], lease_ms=lease_ms, now=now, read_us=read_us)
                    for s in shards
                )
            )
            return dict(zip(shards, replies, strict=True))
        keys, args = self._claim_call(executor, batches, lease_ms, now, read_us)
        claims = iter(_parse_claims(await self._call("claim", keys, args)))
        return {s: [next(claims) for _ in batches[s]] for s in shards}

    async def take(
        self,
        executor: str,
        streams: Sequence[tuple[str, int]],
        *,
        want: int,
        lease_ms: int,
        deep: bool = False,
        now: int = 0,
    ) -> Taken:
        """Read at most `want` new entries of the assignment `streams` ((stream, shard) pairs,
        in the order to read them) and claim them, in one call (one server only: see
        lua/take.lua). `deep`: each stream in turn is asked for all still wanted (streams with
        a backlog); otherwise they are read wide, a few entries from each."""
        shards: dict[int, int] = {}
        for _, shard in streams:
            shards.setdefault(shard, len(shards) + 1)
        keys = [key for shard in shards for key in self._claim_keys(shard)]
        keys += [stream for stream, _ in streams]
        args: list[Any] = [now, self.executor_group, executor, lease_ms, len(shards), want]
        args.append(1 if deep else 0)
        args += [shards[shard] for _, shard in streams]
        _, claims, reads, malformed, reached, unrung = await self._call("take", keys, args)
        shard_of = list(shards)
        claimed: list[tuple[int, bytes, Claim]] = []
        refused = 0
        for item in claims:
            if int(item[0]) == 1:
                claimed.append((shard_of[int(item[10]) - 1], item[11], _claimed(item[1:10])))
            else:
                refused += 1
        return Taken(
            claimed,
            refused,
            [(streams[int(n) - 1][0], int(k), last, int(asked)) for n, k, last, asked in reads],
            [(streams[int(n) - 1][0], entry) for n, entry in malformed],
            int(reached),
            int(unrung),
        )

    def _claim_keys(self, shard: int) -> tuple[str, str, str, str]:
        """A shard's keys in a claim or take call (lua/includes/claim.lua)."""
        sk = self.keys.shard(shard)
        return sk.runs_hash, sk.inputs_hash, sk.leases_zset, sk.counts_hash

    def _claim_call(
        self,
        executor: str,
        batches: Mapping[int, Sequence[Assigned]],
        lease_ms: int,
        now: int,
        read_us: int = 0,
    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [now, self.executor_group, executor, lease_ms, read_us, len(batches)]
        streams: dict[str, int] = {}
        for b, (shard, items) in enumerate(batches.items(), 1):
            sk = self.keys.shard(shard)
            keys += self._claim_keys(shard)
            for stream, entry_id, rid, attempt in items:
                n = streams.setdefault(stream, len(streams) + 1)
                args += (entry_id, rid, attempt, n, b)
            if not streams:  # an empty batch still names one stream (the script needs one)
                streams[sk.assignments_prefix] = 1
        return [*keys, *streams], args

    async def heartbeat(
        self,
        shard: int,
        executor: str,
        runs: Sequence[tuple[str, int]],
        *,
        lease_ms: int,
        now: int = 0,
    ) -> list[str]:
        """Renew leases of (run id, attempt) pairs; returns the run ids to stop."""
        sk = self.keys.shard(shard)
        args: list[Any] = [now, executor, lease_ms]
        for rid, attempt in runs:
            args += (rid, attempt)
        reply = await self._call("heartbeat", [sk.runs_hash, sk.leases_zset], args)
        return [_s(x) for x in reply[1:]]

    async def reclaim(
        self,
        shard: int,
        executor: str,
        held: Sequence[tuple[str, int]],
        *,
        since_ms: int,
        lease_ms: int,
        cap: int = RECLAIM_CAP,
        now: int = 0,
    ) -> list[Claim]:
        """The runs a claim call sent at or after `since_ms` (the server's clock) claimed for
        `executor` in `shard` in attempts it does not hold (`held`: (run id, attempt)): its
        reply never came (see lua/reclaim.lua). Their leases are renewed."""
        sk = self.keys.shard(shard)
        args: list[Any] = [now, executor, lease_ms, since_ms, cap]
        for rid, attempt in held:
            args += (rid, attempt)
        reply = await self._call("reclaim", [sk.runs_hash, sk.inputs_hash, sk.leases_zset], args)
        return [_claimed(item[1:10], state=_s(item[10])) for item in reply[1:]]

    async def hand_back(
        self,
        shard: int,
        executor: str,
        runs: Sequence[tuple[str, int]],
        *,
        assign_deadline_ms: int = 0,
        now: int = 0,
    ) -> HandBackResult:
        """Hand back (run id, attempt) pairs a draining executor stopped: retried at once,
        without using an attempt (lua/hand_back.lua)."""
        keys, args = hand_back_call(self.keys, shard, executor, runs,
                                    assign_deadline_ms=assign_deadline_ms, now=now)  # fmt: skip
        return HandBackResult.of(await self._call("hand_back", keys, args))

    async def finish(
        self,
        shard: int,
        entries: Sequence[tuple[str | bytes, bytes]],
        *,
        now: int = 0,
        assign_deadline_ms: int = 0,
        turn: Turn | None = None,
    ) -> FinishResult:
        """Record (results-stream entry id, packed RunResult) pairs of one shard."""
        return await self.finish_shards(
            {shard: entries}, now=now, assign_deadline_ms=assign_deadline_ms, turn=turn
        )

    async def finish_shards(
        self,
        batches: Mapping[int, Sequence[tuple[str | bytes, bytes]]],
        *,
        now: int = 0,
        assign_deadline_ms: int = 0,
        turn: Turn | None = None,
    ) -> FinishResult:
        """`finish` for the results of several shards in one script call: the shards must live
        on one server (on a cluster, call it per shard). A refused result's
        `ScriptError.index` counts over every shard's entries, in the order given. `turn`: an
        executor applying its own results sets its turn key in each shard (lua/finish.lua)."""
        shards = list(batches)
        if not shards:
            return FinishResult(0, 0, 0)
        mark = ""
        if turn:
            previous = ",".join(str(turn.previous.get(s, 0)) for s in shards)
            mark = f"{turn.number}|{turn.ttl_ms}|{previous}"
        args: list[Any] = [now, self.admission_group, assign_deadline_ms,
                           ",".join(str(len(batches[s])) for s in shards), mark]  # fmt: skip
        keys: list[str] = []
        for shard in shards:
            for entry_id, payload in batches[shard]:
                args += (entry_id, payload)
            sk = self.keys.shard(shard)
            keys += [*sk.state_keys(), sk.results_stream, sk.newest_hash, sk.newest_at_zset,
                     sk.outputs_hash]  # fmt: skip
        if turn:
            keys += [self.keys.shard(shard).turn_string(turn.executor) for shard in shards]
        r = await self._call("finish", keys, args)
        return FinishResult(int(r[1]), int(r[2]), int(r[3]))

    async def reap(
        self,
        shard: int,
        *,
        limit: int = 1000,
        retention_ms: int = 86_400_000,
        assign_deadline_ms: int = 30_000,
        retentions: Mapping[str, int] | None = None,
        max_ended: int = 0,
        min_retention_ms: int = 0,
        max_groups: int = 0,
        now: int = 0,
        keep: tuple[str, str] | None = None,
    ) -> ReapResult:
        """Expired leases (retry, fail, end a cancel), unclaimed assignments (a fresh entry),
        and records past their retention: `retentions` (workflow -> ms) where a workflow has
        its own, else `retention_ms`; and the oldest ended runs of a workflow beyond
        `max_ended` in this shard (0: no cap); none sooner than `min_retention_ms` after its
        run ended. Groups idle for `retention_ms` are forgotten, and beyond `max_groups` in
        this shard (0: no cap) the least recently admitting ones, none within
        `min_retention_ms` of its last admission, and never a live one. `keep`: (key, token):
        a call that retries, fails or cancels runs keeps its outcome there (`reaped`)."""
        args: list[Any] = [
            now,
            limit,
            retention_ms,
            assign_deadline_ms,
            max_ended,
            min_retention_ms,
            max_groups,
            keep[1] if keep else "",
        ]
        for workflow, ms in (retentions or {}).items():
            args += (workflow, ms)
        sk = self.keys.shard(shard)
        keys = [*sk.state_keys(), sk.newest_hash, sk.newest_at_zset, sk.legacy_terminal_zset,
                sk.outputs_hash, sk.fences_hash, sk.debounce_hash]  # fmt: skip
        if keep:
            keys.append(keep[0])
        return _reap_result(await self._call("reap", keys, args))

    async def reaped(self, key: str, token: str) -> ReapResult | None:
        """The outcome a reap call with `keep=(key, token)` kept: None when it kept none (it
        never ran, or retried, failed and cancelled nothing)."""
        raw = await self.redis.get(key)
        head, _, body = (raw if isinstance(raw, bytes) else b"").partition(b"|")
        if head != token.encode() or not body:
            return None
        return _reap_result(codec.unpack(body))

    async def cancel(
        self, shard: int, run_ids: Sequence[str], *, reason: str = Reason.MANUAL, now: int = 0
    ) -> list[bool]:
        """Cancel runs of one shard; True for each run this call cancelled."""
        args: list[Any] = [now, reason, *run_ids]
        sk = self.keys.shard(shard)
        keys = [*sk.state_keys(), sk.newest_hash, sk.newest_at_zset, sk.debounce_hash]
        r = await self._call("cancel", keys, args)
        return [int(x) == 1 for x in r[1:]]

    async def forget_consumers(
        self, groups: Sequence[tuple[str, str]], *, idle_ms: int, most: int = 100
    ) -> int:
        """Delete the consumers of each (stream, group) that hold nothing pending and have
        been idle for `idle_ms` (those of processes that are gone), at most `most` per group;
        a missing stream or group counts as none. One call per group, one after the other (on a
        cluster the streams live on different nodes). Returns how many were deleted."""
        deleted = 0
        for stream, group in groups:
            r = await self._call("forget_consumers", [stream], [group, idle_ms, most])
            deleted += int(r[1])
        return deleted

    async def take_inbox(
        self, group: str, consumer: str, idle_ms: int, start: str | bytes, count: int, largest: int
    ) -> tuple[bytes, list[Entry], list[bytes]]:
        """XAUTOCLAIM inbox entries idle for `idle_ms` from `start`, at most `count`, for
        `consumer`, leaving out its own (see lua/take_inbox.lua): (the next start id, the
        entries, the ids of pending entries no longer in the stream). An entry of over
        `largest` bytes comes back cut, as CutFields with its true size, never whole."""
        keep = (Dead.FIELD_MAX + 1, Dead.FIELDS_MAX + 1)  # (past them: the letter says cut)
        args = [group, consumer, idle_ms, start, count, largest, *keep, OWN_LISTED]
        reply = await self._call("take_inbox", [self.keys.events_stream], args)
        sizes = {item[0]: (int(item[1]), int(item[2])) for item in reply[4]}
        entries: list[Entry] = []
        for entry_id, flat in reply[2]:
            cut = sizes.get(entry_id)
            fields = entry_fields(flat) if cut is None else CutFields(flat, *cut)
            entries.append((entry_id, fields))
        return reply[1], entries, list(reply[3])

    async def heal_lag(self, stream: str | bytes, group: str, most: int = HEAL_UNREAD_MOST) -> int:
        """Set right the lag Redis reports for `group` when at most `most` entries of
        `stream` are unread (see lua/heal_lag.lua); the lag it said before (-1: it could not
        tell), 0 when there was nothing to set."""
        r = await self._call("heal_lag", [codec.text(stream)], [group, most])
        return int(r[2]) if int(r[1]) else 0

    async def append_requests(self, shard: int, payloads: Sequence[bytes]) -> int:
        """Append packed RunRequests to a shard's requests stream; returns how many."""
        sk = self.keys.shard(shard)
        items = list(payloads)
        r = await self._call(
            "append_requests", [sk.requests_stream], [codec.pack(items), len(items)]
        )
        return int(r[1])

    async def claim_ids(
        self,
        shard: int,
        pairs: Sequence[tuple[str, str | bytes]],
        *,
        window_ms: int,
        max_ids: int = 0,
        floor_ms: int = 0,
        now: int = 0,
    ) -> list[bool]:
        """Claim (digest, inbox entry id) pairs of one shard; True where the entry owns the
        digest (claimed now, or by the same entry before), False for a duplicate. Digests
        older than `window_ms` are forgotten, and beyond `max_ids` in this shard (0: no cap)
        the oldest, none claimed within `floor_ms`."""
        sk = self.keys.shard(shard)
        args: list[Any] = [now, window_ms, max_ids, floor_ms]
        for digest, entry_id in pairs:
            args += (digest, entry_id)
        r = await self._call("claim_ids", [sk.ids_hash, sk.ids_at_zset], args)
        return [int(x) == 1 for x in r[1:]]

    async def retire_workflow(self, workflow: str, served_window_ms: int) -> int | None:
        """Remove `workflow`'s definition from the registry (bumping the epoch), unless an
        executor said it serves it within `served_window_ms` (0: remove anyway): None when
        removed, else how long ago it was served (ms). LookupError when it is not
        registered."""
        keys = [self.keys.workflows_hash, self.keys.registry_epoch, self.keys.workflows_served_hash]
        r = await self._call("retire_workflow", keys, [workflow, served_window_ms])
        if int(r[1]) == 0:
            raise LookupError(f"no workflow {workflow!r} is registered")
        return int(r[2]) if int(r[1]) == -1 else None

    async def register_workflows(
        self, definitions: Sequence[tuple[str, str, bytes, int | None]], *, serving: bool = False
    ) -> int:
        """Store definitions, all or none: (workflow id, version, JSON body, retention in
        seconds or None for admission's default) each. Returns how many changed. A version
        already stored with other content raises WorkflowRejected naming the workflow and
        `version`, and nothing is written. Names each version as registered last, and marks it
        served now (`serving`: an executor as it starts) or not served since."""
        keys = [
            self.keys.workflows_hash,
            self.keys.registry_epoch,
            self.keys.workflow_versions_hash,
            self.keys.retentions_hash,
            self.keys.served_versions_hash,
            self.keys.registered_versions_hash,
        ]
        args: list[Any] = [MAX_VERSIONS, "1" if serving else ""]
        for wid, version, body, retention in definitions:
            args += [wid, version, body, retention or ""]
        r = await self._call("register_workflow", keys, args)
        if int(r[1]) == -1:
            wid, version = r[2].decode(), r[3].decode()
            raise WorkflowRejected(
                wid,
                "version",
                f"{version!r} of workflow {wid!r} is already registered with another "
                "definition; give the changed definition a new version (or omit `version` to "
                "derive it from the content)",
            )
        return int(r[1])
