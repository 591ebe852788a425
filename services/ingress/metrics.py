"""Metrics of the ingress service (labels bounded: workflow, reason, op)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from supersede.metrics import LATENCY_BUCKETS
from supersede.protocol import INBOX_REASONS

EVENTS = Counter("supersede_ingress_events_total", "Inbox events read.")
EVENTS_HELD = Counter(
    "supersede_ingress_events_held_total",
    "Inbox events left pending by a batch because a shard they route to did not answer (a "
    "silent cluster master, see supersede_shards_silent): read again, and counted again, until "
    "it answers.",
)
RUNS_REQUESTED = Counter(
    "supersede_ingress_runs_requested_total",
    "Run requests appended to shard streams, by workflow.",
    ["workflow"],
)
DEDUPLICATED = Counter(
    "supersede_ingress_deduplicated_total",
    "Run requests not appended because another inbox entry owns their explicit event id.",
)
DEAD_LETTERS = Counter(
    "supersede_ingress_dead_letters_total", "Events moved to the dead-letter stream.", ["reason"]
)
# Each reason exported at 0 from the start: a counter's first sample is what rate() and
# increase() count from, so a burst that made the series would otherwise count for nothing.
for _reason in INBOX_REASONS:
    DEAD_LETTERS.labels(_reason.value)
UNKNOWN_FIELDS = Counter(
    "supersede_ingress_unknown_fields_total",
    "Inbox events with a field the inbox contract does not define (ignored; a typo of "
    "`metadata` or `id` loses it): each said in a sampled warning naming the fields.",
)
UNROUTED = Counter(
    "supersede_ingress_unrouted_total", "Events that no registered workflow listens to."
)
RECLAIMED = Counter(
    "supersede_ingress_reclaimed_total",
    "Inbox entries taken over from an ingress process that stopped (XAUTOCLAIM).",
)
BATCH_SECONDS = Histogram(
    "supersede_ingress_batch_seconds",
    "Duration of handling one inbox batch.",
    buckets=LATENCY_BUCKETS,
)
TRIMMED = Counter(
    "supersede_ingress_trimmed_entries_total",
    "Inbox entries trimmed: acknowledged by the ingress group.",
)
FORGOTTEN_CONSUMERS = Counter(
    "supersede_ingress_forgotten_consumers_total",
    "Consumers deleted from the inbox's group: nothing pending and idle for "
    "--forget-consumers-after (left by ingress processes that are gone).",
)
INBOX_LAG = Gauge(
    "supersede_ingress_inbox_lag",
    "Inbox entries group ingress has not handled yet: unread, or read and not acknowledged.",
)
INBOX_ID_AHEAD = Gauge(
    "supersede_ingress_inbox_id_ahead_seconds",
    "How far the inbox's last entry id is ahead of the server's clock (0 when it is not): an "
    "XADD gave an explicit id in the future, and every later entry gets an id after it (or "
    "the server's clock stepped back).",
)
WORKFLOWS = Gauge("supersede_ingress_workflows", "Valid workflow definitions loaded.")
INVALID_WORKFLOWS = Gauge(
    "supersede_ingress_invalid_workflows",
    "Stored workflow definitions skipped because they fail validation (logged with the error).",
)
