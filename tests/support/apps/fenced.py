"""A workflow whose handler ignores cancellation and writes late, guarded by its fence: the
fencing test runs it in a real executor. Notes go to the list `<ns>:test:log` (as demo.py's)."""

from __future__ import annotations

import os
import time

from supersede.config import DEFAULT_URL, connect_sync
from supersede.fencing import set_if_newer
from supersede.workflow import Concurrency, Context, Workflow

_redis = connect_sync(os.environ.get("SUPERSEDE_REDIS_URL", DEFAULT_URL))
NS = os.environ.get("SUPERSEDE_NAMESPACE", "supersede")
LOG = f"{NS}:test:log"


def note(*parts: object) -> None:
    _redis.rpush(LOG, ":".join(str(p) for p in parts))


def doc_key(doc: str) -> str:
    return f"{NS}:test:doc:{doc}"


fenced = Workflow(
    "fenced-doc", on_events=["doc.write"], concurrency=Concurrency("input.doc", max_runs=1)
)


@fenced.step()
def write(ctx: Context) -> None:
    note("started", ctx.run_id, ctx.fence, int(ctx.still_current_blocking()))
    deadline = time.monotonic() + 30
    while ctx.input.get("wait") and not _redis.exists(f"{NS}:test:go"):  # ignores ctx.cancelled
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    current = ctx.still_current_blocking()
    written = set_if_newer(_redis, doc_key(ctx.input["doc"]), ctx.input["text"], ctx.fence)
    note("wrote", ctx.run_id, int(current), int(written))
