"""The demo workflows `supersede dev` runs: a chat reply per user that only the newest message
of a user deserves (CANCEL_IN_PROGRESS, max_runs=1), a per-document re-index queue
(GROUP_ROUND_ROBIN, max_runs=2), and an autosave debounced while a document is being edited
(it runs once the edits paused for 300 ms)."""

from __future__ import annotations

import asyncio
import random

from supersede.workflow import Concurrency, Context, Strategy, Workflow

chat = Workflow(
    "demo-chat-reply",
    on_events=["chat.message"],
    concurrency=Concurrency(
        expression="input.userId", max_runs=1, limit_strategy=Strategy.CANCEL_IN_PROGRESS
    ),
)


@chat.step()
async def reply(ctx: Context) -> dict[str, str]:
    await asyncio.sleep(0.4 + random.random() * 0.4)  # "thinking"
    return {"reply": f"re: {ctx.input.get('text', '')}"}


reindex = Workflow(
    "demo-reindex",
    on_events=["doc.saved"],
    concurrency=Concurrency(
        expression="input.docId", max_runs=2, limit_strategy=Strategy.GROUP_ROUND_ROBIN
    ),
)


@reindex.step()
async def index(ctx: Context) -> None:
    await asyncio.sleep(0.2)


autosave = Workflow(
    "demo-autosave",
    on_events=["doc.edited"],
    concurrency=Concurrency(
        expression="input.docId", max_runs=1, debounce_ms=300, max_wait_ms=2000
    ),
)


@autosave.step()
async def save(ctx: Context) -> dict[str, str]:
    await asyncio.sleep(0.05)
    return {"saved": str(ctx.input.get("text", ""))}
