"""Chaos pool B: GROUP_ROUND_ROBIN with max_runs 2 and a sync handler (pool A lacks it)."""

from __future__ import annotations

from chaos.handlers import sleep_sync
from supersede.workflow import Concurrency, Strategy, Workflow

fifo = Workflow("chaos-fifo", on_events=["job"], max_attempts=50,
                concurrency=Concurrency("input.user", max_runs=2,
                                        limit_strategy=Strategy.GROUP_ROUND_ROBIN))  # fmt: skip

fifo.step()(sleep_sync)
