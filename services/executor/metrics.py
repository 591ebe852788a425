"""Metrics of the executor service (labels bounded: workflow, outcome)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from supersede.metrics import LATENCY_BUCKETS, WAIT_BUCKETS, LoopCounter, LoopHistogram

# (Loop*: updated once or twice per run, from the event loop only; see supersede.metrics.)
RUNS_STARTED = LoopCounter(
    "supersede_executor_runs_started_total", "Runs claimed and started.", ["workflow"]
)
RUNS_FINISHED = LoopCounter(
    "supersede_executor_runs_finished_total",
    "Runs this executor reported, by outcome (succeeded, failed, cancelled).",
    ["workflow", "outcome"],
)
RESULTS = Counter(
    "supersede_executor_results_total",
    "Results reported, by the way they took: applied or stale (applied by this executor's "
    "finish call: stale is a no-op), stream (written to the results stream for admission).",
    ["way"],
)
ASSIGNED = Counter(
    "supersede_executor_assigned_total",
    "Queued runs its finish calls started in the slots its results freed.",
)
CLAIMS_REFUSED = Counter(
    "supersede_executor_claims_refused_total",
    "Assignments whose run was cancelled before its claim.",
)
STEP_SECONDS = LoopHistogram(
    "supersede_executor_step_seconds", "Duration of one step attempt.", ["workflow"],
    buckets=(*LATENCY_BUCKETS, 10, 30, 60, 300),
)  # fmt: skip
QUEUE_WAIT_SECONDS = LoopHistogram(
    "supersede_executor_queue_wait_seconds", "From assignment to claim.", buckets=WAIT_BUCKETS
)
CANCEL_LATENCY_SECONDS = Histogram(
    "supersede_executor_cancel_latency_seconds",
    "From the cancel decision (control entry time) to the local handler being cancelled.",
    buckets=LATENCY_BUCKETS,
)
BUSY_SLOTS = Gauge("supersede_executor_busy_slots", "Runs executing now.")
SLOTS = Gauge("supersede_executor_slots", "Slots of this executor.")
CONTROL_MESSAGES = Counter(
    "supersede_executor_control_messages_total",
    "Cancel messages read from the control streams (every executor reads every cancel).",
)
CANCELS_REPEATED = Counter(
    "supersede_executor_cancels_repeated_total",
    "Cancels of a run's task repeated because its async step went on after the last one (a "
    "library swallowed the CancelledError).",
)
HANDED_BACK = Counter(
    "supersede_executor_runs_handed_back_total",
    "Runs this executor started again after a draining executor stopped and handed them back "
    "(retried at once, no attempt used): counted at the new start, since the draining executor "
    "exits before a scrape could see its own count.",
)
RECLAIMED = Counter(
    "supersede_executor_runs_reclaimed_total",
    "Runs a claim call claimed for this executor whose reply never came (the server froze "
    "mid-call, a connection was cut), found and started by the next call (lua/reclaim.lua).",
)
STARTS_FORGOTTEN = Counter(
    "supersede_executor_starts_forgotten_total",
    "Attempts this executor started and forgot while a reclaim could still look back past them "
    "(more than 30,000 starts of one shard within about six seconds): after a lost claim call, "
    "a reclaim could start such an attempt here again.",
)
LEASES_LAPSED = Counter(
    "supersede_executor_leases_lapsed_total",
    "Runs this executor stopped, unreported, because it could not renew their leases in time "
    "(the server refused or did not answer): the reaper retries them elsewhere, and they must "
    "not still run here then.",
)
HEARTBEATS_LATE = Counter(
    "supersede_executor_heartbeats_late_total",
    "Lease renewals that came more than a lease after the last one that succeeded (a starved "
    "process or an unreachable server): this executor's runs may have been retried elsewhere.",
)
LOOP_LAG_SECONDS = Histogram(
    "supersede_executor_loop_lag_seconds",
    "How late the event loop runs a timer due every 0.1 s: user code or bookkeeping blocking it.",
    buckets=LATENCY_BUCKETS,
)
CANCEL_STAGE_SECONDS = Histogram(
    "supersede_executor_cancel_stage_seconds",
    "From the cancel decision to each stage of stopping the handler: flag (ctx.cancelled set, an "
    "async step cancelled), sigterm and sigkill (process isolation, after the grace period), "
    "stopped (the handler returned or its process is gone; for a sync step that ran past the "
    "grace, when its thread returned).",
    ["stage"],
    buckets=(*LATENCY_BUCKETS, 10, 30, 60),
)
STRAY_HANDLERS = Gauge(
    "supersede_executor_stray_handlers",
    "Sync steps (thread isolation) still running a grace period after their run was cancelled: "
    "a thread cannot be stopped. Without strict mode their runs were reported CANCELLED and "
    "their slots freed; in strict mode they hold their slots until they return. Also on_cancel "
    "hooks still running a grace period after they began (their runs were reported).",
)
DEFINITION_DIFFERS = Gauge(
    "supersede_executor_workflow_definition_differs",
    "1 while a workflow of this executor is registered in another version (its runs get that "
    "definition's key, limit and strategy, and run with this executor's steps): a rollout under "
    "way, or two pools registering one workflow id with different definitions.",
    ["workflow"],
)
