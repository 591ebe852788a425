"""A debounced workflow (tests/e2e/test_debounce.py): a user's run starts once no newer event
of the user came for 300 ms."""

from __future__ import annotations

import os
import time

from supersede.config import DEFAULT_URL, connect_sync
from supersede.workflow import Concurrency, Context, Workflow

_redis = connect_sync(os.environ.get("SUPERSEDE_REDIS_URL", DEFAULT_URL))
LOG = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:test:log"

typing = Workflow(
    "typing", on_events=["user.typed"],
    concurrency=Concurrency("input.user", max_runs=1, debounce_ms=300, max_wait_ms=5000),
)  # fmt: skip


slow = Workflow(
    "paused", on_events=["user.paused"],
    concurrency=Concurrency("input.user", max_runs=1, debounce_ms=2000),
)  # fmt: skip


def save(ctx: Context) -> None:
    _redis.rpush(LOG, f"ran:{ctx.input['text']}:{int(time.time() * 1000)}")


typing.step()(save)
slow.step()(save)
