"""Chaos pool A: CANCEL_IN_PROGRESS with max_runs 1 and a dynamic max_runs (3 for hot keys, 2
for the others) on one event (`chat`), and a strict one on `doc` with a sync handler."""

from __future__ import annotations

from chaos.handlers import sleep_async, sleep_sync
from supersede.workflow import Concurrency, Strategy, Workflow


def _limit(max_runs: int | str, strict: bool = False) -> Concurrency:
    return Concurrency("input.user", max_runs, Strategy.CANCEL_IN_PROGRESS, strict)


latest = Workflow("chaos-latest", on_events=["chat"], max_attempts=50, concurrency=_limit(1))
latest3 = Workflow("chaos-latest3", on_events=["chat"], max_attempts=50,
                   concurrency=_limit("input.user.startsWith('hot') ? 3 : 2"))  # fmt: skip
strict = Workflow("chaos-strict", on_events=["doc"], max_attempts=50, concurrency=_limit(1, True))

latest.step()(sleep_async)
latest3.step()(sleep_async)
strict.step()(sleep_sync)
