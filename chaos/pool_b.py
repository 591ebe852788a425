"""Chaos pool B (pool A lacks its workflows): GROUP_ROUND_ROBIN with max_runs 2 and a sync
handler; CANCEL_QUEUED_EXCEPT_NEWEST and _OLDEST on one event (`queue`); and a debounced
CANCEL_IN_PROGRESS (`edit`, 300 ms, no max wait)."""

from __future__ import annotations

from chaos.handlers import sleep_async, sleep_sync
from supersede.workflow import Concurrency, Strategy, Workflow

fifo = Workflow("chaos-fifo", on_events=["job"], max_attempts=50,
                concurrency=Concurrency("input.user", max_runs=2,
                                        limit_strategy=Strategy.GROUP_ROUND_ROBIN))  # fmt: skip
newest = Workflow("chaos-newest", on_events=["queue"], max_attempts=50,
                  concurrency=Concurrency("input.user", 1,
                                          Strategy.CANCEL_QUEUED_EXCEPT_NEWEST))  # fmt: skip
oldest = Workflow("chaos-oldest", on_events=["queue"], max_attempts=50,
                  concurrency=Concurrency("input.user", 1,
                                          Strategy.CANCEL_QUEUED_EXCEPT_OLDEST))  # fmt: skip
debounced = Workflow("chaos-debounce", on_events=["edit"], max_attempts=50,
                     concurrency=Concurrency("input.user", 1, Strategy.CANCEL_IN_PROGRESS,
                                             debounce_ms=300))  # fmt: skip

fifo.step()(sleep_sync)
newest.step()(sleep_async)
oldest.step()(sleep_sync)
debounced.step()(sleep_async)
