"""Two workflows that share one concurrency scope: a user's text and voice replies compete for
the same slot (tests/e2e/test_fencing.py)."""

from __future__ import annotations

import asyncio
import os

from supersede.config import DEFAULT_URL, connect_sync
from supersede.workflow import Concurrency, Context, Workflow

_redis = connect_sync(os.environ.get("SUPERSEDE_REDIS_URL", DEFAULT_URL))
LOG = f"{os.environ.get('SUPERSEDE_NAMESPACE', 'supersede')}:test:log"
SHARED = Concurrency("input.user", max_runs=1, scope="chat-user")

text = Workflow("reply-text", on_events=["chat.text"], concurrency=SHARED)
voice = Workflow("reply-voice", on_events=["chat.voice"], concurrency=SHARED)


async def reply(ctx: Context) -> None:
    _redis.rpush(LOG, f"started:{ctx.run_id}:{int(await ctx.still_current())}")
    await asyncio.sleep(float(ctx.input.get("sleep", 0)))


text.step(name="reply")(reply)
voice.step(name="reply")(reply)
