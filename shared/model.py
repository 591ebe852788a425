"""The data model: concurrency specs, and the ids and sequences runs and groups are known by.

What crosses a stream (requests, results, states, codes) is in `supersede.protocol`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from supersede.protocol import Strategy
from supersede.protocol import decode_seq as decode_seq  # (encode_seq's inverse)

GROUP_ID_LEN = 16  # hex chars; fixed width so the Lua side can slice members without parsing


@dataclass(frozen=True, slots=True)
class ConcurrencySpec:
    """Limits of one workflow: at most `max_runs` active runs per key value. `max_runs` is an
    integer, or a CEL expression over `input` and `metadata` evaluated per event (1..10000; a
    group's limit is the one its newest arrival carries).

    `scope` names a group space shared by several workflows: runs of every workflow with the
    same scope and key value are one group and compete for its slots (the workflows must agree
    on the strategy, `max_runs` and `strict`); without it each workflow has its own groups.

    `strict` holds a cancelled run's slot until its executor confirms (or its lease expires),
    so at most `max_runs` handlers ever execute at once; the default frees it at cancel time.
    """

    expression: str
    max_runs: int | str = 1
    limit_strategy: Strategy = Strategy.CANCEL_IN_PROGRESS
    strict: bool = False
    scope: str | None = None
    debounce_ms: int = 0  # > 0: a run waits until its key had no newer event for this long
    max_wait_ms: int = 0  # > 0: but no longer than this after the window's first event

    def rules(self) -> tuple[Any, ...]:
        """What the workflows of one scope must agree on: max_runs, strategy, strict and
        the debounce window."""
        return (self.max_runs, Strategy(self.limit_strategy).value, self.strict,
                self.debounce_ms, self.max_wait_ms)  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.max_runs, str):
            if not self.max_runs.strip():
                raise ValueError("max_runs must be an integer or a CEL expression")
        elif not isinstance(self.max_runs, int) or isinstance(self.max_runs, bool):
            raise ValueError(f"max_runs must be an integer, got {self.max_runs!r}")
        elif not 1 <= self.max_runs <= 10_000:
            raise ValueError(f"max_runs must be between 1 and 10000, got {self.max_runs}")
        try:
            Strategy(self.limit_strategy)
        except ValueError:
            raise ValueError(
                f"limit_strategy must be one of {[s.value for s in Strategy]}, "
                f"got {self.limit_strategy!r}"
            ) from None


def encode_seq(entry_id: str | bytes) -> str:
    """Turn a stream id ``ms-seq`` into a fixed-width string whose byte order is its order.

    A double score cannot hold ``ms * 2**64 + seq`` exactly; a fixed-width hex string compared
    lexicographically can, so ties inside one millisecond never reorder.
    """
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return "%016x%016x" % (int(ms), int(seq or 0))  # noqa: UP031 - measurably faster here


def group_id(workflow_id: str, version: str, key: str, scope: str | None = None) -> str:
    """The id of a concurrency group: (workflow, version, key value) hashed to fixed width; with
    a `scope`, (scope, key value), the same for every workflow of the scope and every version."""
    if scope:
        raw = f"\1scope\0{scope}\0{key}".encode()  # (a workflow id never starts with \1)
    else:
        raw = f"{workflow_id}\0{version}\0{key}".encode()
    return hashlib.blake2b(raw, digest_size=GROUP_ID_LEN // 2).hexdigest()


def shard_of_group(gid: str, shards: int) -> int:
    return int(gid[:8], 16) % shards


ENTRY_ID_FORM = re.compile(r"[0-9]+-[0-9]+")  # what an inbox entry id looks like ('<ms>-<seq>')
EXPLICIT_DOMAIN = b"supersede.id"  # BLAKE2 personalisation of explicit ids of that form


def event_digest(event_id: str, workflow_id: str, explicit: bool = False) -> str:
    """The fixed-width hash of (event id, workflow): the tail of a run id, and the idempotency
    record of an explicit event id. An event without `id` is known by its inbox entry id; an
    explicit `id` written like one ('<ms>-<seq>') is hashed in a domain of its own, so no
    producer can name another event's runs (and keep them from being made) by giving its
    entry id, past or to come. Every other explicit id hashes as it always did."""
    person = EXPLICIT_DOMAIN if explicit and ENTRY_ID_FORM.fullmatch(event_id) else b""
    text = f"{event_id}\0{workflow_id}".encode()
    return hashlib.blake2b(text, digest_size=10, person=person).hexdigest()


def shard_of_digest(digest: str, shards: int) -> int:
    """Where the idempotency record of a digest lives (independent of the run's group)."""
    return int(digest[:8], 16) % shards


def run_id(
    shard: int, event_id: str, workflow_id: str, digest: str | None = None, explicit: bool = False
) -> str:
    """Deterministic, so a replayed event maps to the run it already created."""
    return f"{shard}-{digest or event_digest(event_id, workflow_id, explicit)}"


RUN_ID_FORM = re.compile(r"([0-9]+)-[0-9a-f]{20}")  # '<shard>-<event_digest>'


def shard_of_run(rid: str | bytes) -> int:
    """The shard of a run id; ValueError for what is not one (so `run 3-zz` is refused as no
    run id, not looked up as a run that might exist)."""
    text = rid.decode(errors="replace") if isinstance(rid, bytes) else rid
    form = RUN_ID_FORM.fullmatch(text)
    if form is None:
        raise ValueError(f"not a run id: {text!r}")
    return int(form.group(1))
