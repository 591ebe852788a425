"""Metrics of the admission service (labels are bounded: outcome, op, stream kind, and the
registered workflows)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from supersede.metrics import LATENCY_BUCKETS

REQUESTS = Counter(
    "supersede_admission_requests_total",
    "Run requests handled, by outcome (created, duplicate, rejected).",
    ["outcome"],
)
RESULTS = Counter(
    "supersede_admission_results_total",
    "Executor results handled, by outcome (applied, stale, rejected).",
    ["outcome"],
)
# Every outcome exported from the start, at 0: a counter whose series first appears at 1
# hides that first increase from increase() (the dead-letter alert reads "rejected").
for _outcome in ("created", "duplicate", "rejected"):
    REQUESTS.labels(_outcome)
for _outcome in ("applied", "stale", "rejected"):
    RESULTS.labels(_outcome)
ASSIGNED = Counter("supersede_admission_assigned_total", "Runs granted a slot and assigned.")
CANCELLED = Counter("supersede_admission_cancelled_total", "Runs cancelled by a strategy decision.")
LEASE_FAILURES = Counter(
    "supersede_admission_runs_failed_total",
    "Runs the reaper FAILED, by workflow: their lease lapsed with no attempt left (an executor "
    "killed, stalled or cut off on their last attempt). Executors count the failures they "
    "report in supersede_executor_runs_finished_total.",
    ["workflow"],
)
REAPED = Counter(
    "supersede_admission_reaped_total",
    "Expired leases and unclaimed assignments handled by the reaper, by outcome "
    "(retried, failed, cancelled, reassigned; record_gone: a run whose record was gone, "
    "evicted or deleted by hand, left its slot).",
    ["outcome"],
)
EXPIRED = Counter(
    "supersede_admission_expired_records_total", "Ended run records deleted after retention."
)
FORGOTTEN_GROUPS = Counter(
    "supersede_admission_forgotten_groups_total",
    "Groups whose memory (newest runs, fence) the reaper forgot: idle for --retention, or the "
    "least recently admitting beyond --max-groups.",
)
RECLAIMED = Counter(
    "supersede_admission_reclaimed_total",
    "Stream entries taken over from a consumer that stopped (XAUTOCLAIM).",
)
BATCH_SECONDS = Histogram(
    "supersede_admission_batch_seconds",
    "Duration of one script call, by op (admit, finish, reap, debounce).",
    ["op"],
    buckets=LATENCY_BUCKETS,
)
QUEUED = Gauge(
    "supersede_admission_queued_runs", "Runs waiting for a slot, by workflow.", ["workflow"]
)
ACTIVE = Gauge("supersede_admission_active_runs", "Runs ASSIGNED or RUNNING (all shards).")
STREAM_LAG = Gauge(
    "supersede_admission_stream_lag",
    "Entries unread or unacknowledged, by stream (requests, results, assignments).",
    ["stream"],
)
TRIMMED = Counter(
    "supersede_admission_trimmed_entries_total",
    "Stream entries trimmed: acknowledged by every group (or, for the control streams and the "
    "dead letters, older than their retention).",
)
FORGOTTEN_CONSUMERS = Counter(
    "supersede_admission_forgotten_consumers_total",
    "Consumers deleted from the groups of the streams admission trims: nothing pending and idle "
    "for --forget-consumers-after (left by processes that are gone).",
)
ASSIGNMENT_BACKLOG = Gauge(
    "supersede_admission_assignment_backlog",
    "Assignments no executor has claimed yet (unread or unacknowledged), by workflow: what the "
    "executor pool that serves a workflow scales on.",
    ["workflow"],
)
WORKFLOW_UNSERVED = Gauge(
    "supersede_admission_workflow_unserved_seconds",
    "Seconds since an executor serving the workflow last said so (each does every second while "
    "it runs, not while it drains), by workflow; none for a workflow no executor ever served.",
    ["workflow"],
)
DEBOUNCE_FIRED = Counter(
    "supersede_admission_debounce_fired_total",
    "Debounced runs whose window closed: they arrived at their group then (started, queued or "
    "cancelled by its strategy).",
)
