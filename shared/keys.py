"""Every Redis key of supersede, built in one place.

All keys of one shard share the hash tag ``{<ns>:<shard>}``, so every script call touches one
cluster slot. User strings never appear in key names: groups and runs are hashed ids stored as
members and fields, never as key names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

WORKFLOW_TAG_LEN = 12  # hex chars of sha1(workflow id); the Lua side computes the same


def workflow_tag(workflow: str) -> str:
    """The fixed-width, key-safe stand-in for a workflow id in key names (the Lua scripts
    compute it with ``redis.sha1hex``)."""
    digest = hashlib.sha1(workflow.encode(), usedforsecurity=False).hexdigest()
    return digest[:WORKFLOW_TAG_LEN]


def inbox_stream(namespace: str) -> str:
    """The public inbox of a namespace (needs no shard count: publishers do not know it)."""
    return f"{namespace}:events"


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """Keys of one shard; the Redis type is the suffix of each attribute name."""

    namespace: str
    shard: int

    @property
    def tag(self) -> str:
        return f"{{{self.namespace}:{self.shard}}}"

    @property
    def requests_stream(self) -> str:
        """Run requests from ingress; consumer group ``admission``."""
        return f"{self.tag}:requests"

    @property
    def results_stream(self) -> str:
        """Outcomes reported by executors; consumer group ``admission``."""
        return f"{self.tag}:results"

    @property
    def assignments_prefix(self) -> str:
        """Prefix of this shard's assignment streams, one per workflow (the scripts add
        ``:<workflow tag>``): only executors that have a workflow read its runs."""
        return f"{self.tag}:assignments"

    def assignments_stream(self, workflow: str) -> str:
        """Runs of `workflow` granted a slot; consumer group ``executors``."""
        return f"{self.tag}:assignments:{workflow_tag(workflow)}"

    @property
    def control_stream(self) -> str:
        """Cancel messages; every executor XREADs it (no group)."""
        return f"{self.tag}:control"

    @property
    def runs_hash(self) -> str:
        """run id -> msgpack run record (state, group, sequence, attempt, timeline)."""
        return f"{self.tag}:runs"

    @property
    def inputs_hash(self) -> str:
        """run id -> opaque msgpack input; deleted when the run ends."""
        return f"{self.tag}:inputs"

    @property
    def outputs_hash(self) -> str:
        """run id -> msgpack map of step name -> output, for runs that ended SUCCEEDED or
        FAILED with outputs; deleted with the record."""
        return f"{self.tag}:outputs"

    @property
    def queue_zset(self) -> str:
        """QUEUED runs, score 0, member ``<group>|<sequence>|<run id>`` (lexicographic order)."""
        return f"{self.tag}:queue"

    @property
    def active_zset(self) -> str:
        """ASSIGNED and RUNNING runs, same member layout as the queue."""
        return f"{self.tag}:active"

    @property
    def slots_hash(self) -> str:
        """group id -> number of slots held (the stored active count)."""
        return f"{self.tag}:slots"

    def reaped_string(self, consumer: str) -> str:
        """The outcome of `consumer`'s last reap call in this shard that retried, failed or
        cancelled runs (see lua/reap.lua); expires after 10 minutes: one per live admission
        process."""
        return f"{self.tag}:reaped:{consumer}"

    def turn_string(self, executor: str) -> str:
        """The number of the last finish call (turn) of `executor` that applied results in
        this shard, as `first|last` (see lua/finish.lua); expires after 10 leases
        (FinishHere.turn_ttl_ms): one per live executor."""
        return f"{self.tag}:turn:{executor}"

    @property
    def leases_zset(self) -> str:
        """run id scored by lease expiry (ms) for RUNNING and CANCELLING runs; by the time of
        the next look (the assignment deadline) for ASSIGNED ones."""
        return f"{self.tag}:leases"

    @property
    def ended_hash(self) -> str:
        """Index of the ended-runs streams: workflow tag -> workflow id. The stream of a
        workflow is ``<this key>:<workflow tag>``; the reaper walks every stream listed here."""
        return f"{self.tag}:ended"

    def ended_stream(self, workflow: str) -> str:
        """Runs of `workflow` that ended, in end order: one entry per script call and end
        state, id = the end time (ms), field = state letter, value = comma-separated run ids.
        The reaper removes entries older than the workflow's retention with their records;
        ``runs`` lists ended runs from here, newest first."""
        return f"{self.ended_hash}:{workflow_tag(workflow)}"

    @property
    def legacy_terminal_zset(self) -> str:
        """Before the ended streams: run id scored by end time. Only drained by the reaper."""
        return f"{self.tag}:terminal"

    @property
    def counts_hash(self) -> str:
        """``<workflow>|<state letter>`` -> runs of that workflow in that state in this shard,
        kept by the scripts (status and the queue gauge read it instead of every record)."""
        return f"{self.tag}:counts"

    @property
    def newest_hash(self) -> str:
        """group id -> the newest max_runs members (``<group>|<sequence>|<run id>``, comma
        separated) a CANCEL_IN_PROGRESS group ever admitted; a late, older arrival loses to them.
        Deleted by the reaper once the group admitted nothing for the retention."""
        return f"{self.tag}:newest"

    @property
    def newest_at_zset(self) -> str:
        """group id scored by its last admission (ms): the expiry index of ``newest`` and
        ``fences``."""
        return f"{self.tag}:newest-at"

    @property
    def fences_hash(self) -> str:
        """group id -> the sequence of the newest run the group ever admitted (a group with a
        concurrency limit): ``ctx.still_current()`` compares its run's sequence with it; and
        '<group id>|last' -> ``<seq>|<run id>`` of the run a debounced group's last window let
        through (fired, and not turned away at once by its strategy): an older event that
        arrives later ends at once (a field of this hash, which admission may write under its
        ACL role and older builds read by exact field only).
        Deleted by the reaper with ``newest`` once the group admitted nothing for the retention."""
        return f"{self.tag}:fences"

    @property
    def debounce_hash(self) -> str:
        """group id -> ``<window start ms>|<member>``: the run of a debounced group waiting for
        its window to close (``<group>|<sequence>|<run id>``, as in the queue zset)."""
        return f"{self.tag}:debounce"

    @property
    def due_zset(self) -> str:
        """Debounced group ids scored by when their waiting run is due (ms); admission fires
        them (fire_debounced.lua), so a restart loses no timer."""
        return f"{self.tag}:due"

    @property
    def legacy_seen_zset(self) -> str:
        """Before records became the de-duplication memory: run ids by request time. Deleted
        by admission at start."""
        return f"{self.tag}:seen"

    @property
    def ids_hash(self) -> str:
        """Idempotency: digest of (workflow, explicit event id) -> the inbox entry id that owns
        it; routed by the digest, so one id of a workflow is owned once whatever its key."""
        return f"{self.tag}:ids"

    @property
    def ids_at_zset(self) -> str:
        """The digests of ``ids`` scored by when they were claimed (ms): expiry by the window."""
        return f"{self.tag}:ids-at"

    def state_keys(self) -> list[str]:
        """The KEYS prefix shared by every script that changes run states (order matters)."""
        return [
            self.runs_hash,
            self.queue_zset,
            self.active_zset,
            self.slots_hash,
            self.leases_zset,
            self.ended_hash,
            self.assignments_prefix,
            self.control_stream,
            self.inputs_hash,
            self.counts_hash,
        ]


@dataclass(frozen=True)
class Keys:
    """Keys of one deployment (namespace + shard count)."""

    namespace: str
    shards: int

    @property
    def events_stream(self) -> str:
        """The public inbox any Redis client may XADD to."""
        return inbox_stream(self.namespace)

    @property
    def dead_stream(self) -> str:
        """Dead letters: the original fields plus ``reason`` and ``detail``."""
        return f"{self.namespace}:dead"

    @property
    def workflows_hash(self) -> str:
        """workflow id -> JSON definition (the registry). Tagged with the epoch key, so a
        registration is one transaction on a cluster too."""
        return f"{{{self.namespace}}}:workflows"

    @property
    def workflow_versions_hash(self) -> str:
        """workflow id -> JSON array of the versions registered, newest last (the newest
        ``scripts.MAX_VERSIONS``): ``cancel --key`` finds the live runs of every version."""
        return f"{{{self.namespace}}}:workflows:versions"

    @property
    def retentions_hash(self) -> str:
        """workflow id -> seconds its ended runs are kept, for workflows that set their own
        (a storage setting beside the definition: it changes neither version nor groups)."""
        return f"{{{self.namespace}}}:workflows:retention"

    @property
    def workflows_served_hash(self) -> str:
        """workflow id -> when (ms, the server's clock) an executor serving it last said so:
        every second, while it runs. ``retire`` refuses a workflow served recently."""
        return f"{{{self.namespace}}}:workflows:served"

    @property
    def served_versions_hash(self) -> str:
        r"""'<workflow id>\n<version>' -> when (ms, the server's clock) an executor serving that
        version last said so (every second; a registration deletes the mark: not served since).
        Executors delete marks an hour old: bounded by the workflows, and their versions served
        in the last hour. Only such fields: 0.3.15 and older executors read every value as a
        number, and the '<workflow id>' -> version fields 0.3.16 wrote here made each of them
        fail its registry task and turn not ready (an upgrade probe); executors delete them."""
        return f"{{{self.namespace}}}:workflows:served-versions"

    @property
    def registered_versions_hash(self) -> str:
        """workflow id -> the version registered last, by a build that names it (0.3.17 on). An
        executor whose workflow is registered, so named, in a version served since and not for
        a minute registers its own (see Keys.served_versions_hash); one registered by an
        earlier build is left as it is. Bounded by the workflows ever registered."""
        return f"{{{self.namespace}}}:workflows:registered"

    @property
    def executors_hash(self) -> str:
        """executor (its consumer name) -> JSON {"ms": when (the server's clock) it last said
        it runs, every second while it serves, "workflows": the ids it serves}: the live
        executors `status` lists (one whose slots are all busy reads no stream, so its consumers
        looked idle: "live executors: 0" while it ran 20 runs). An executor deletes its own as
        it exits, and those an hour old: bounded by the executors of the last hour."""
        return f"{{{self.namespace}}}:workflows:executors"

    @property
    def registry_epoch(self) -> str:
        """Counter (string) bumped by every registration that changed a definition."""
        return f"{{{self.namespace}}}:workflows:epoch"

    @property
    def config_hash(self) -> str:
        """Deployment facts pinned on first use (the shard count)."""
        return f"{self.namespace}:config"

    @cached_property
    def _shards(self) -> tuple[ShardKeys, ...]:
        return tuple(ShardKeys(self.namespace, s) for s in range(self.shards))

    def shard(self, shard: int) -> ShardKeys:
        return self._shards[shard]

    def all_shards(self) -> tuple[ShardKeys, ...]:
        return self._shards

    def share(self, total: int) -> int:
        """One shard's share of a deployment-wide cap, rounded up (0 stays 0: no cap)."""
        return -(-total // self.shards)
