"""Steps that raise what no step should (SystemExit, KeyboardInterrupt, GeneratorExit, a
BaseException subclass) or return what msgpack packs and Python cannot read back: each must
fail its run alone."""

from __future__ import annotations

import asyncio

from supersede.workflow import Context, Workflow


class NotAnException(BaseException):
    """A user's BaseException subclass (not an Exception)."""


_HOSTILE: dict[str, BaseException] = {
    "base": NotAnException("raised by the step"),
    "exit": SystemExit(3),
    "interrupt": KeyboardInterrupt(),
    "generator-exit": GeneratorExit(),
}

hostile = Workflow("hostile", on_events=["hostile.item"])


@hostile.step()
async def raises_what_it_is_told(ctx: Context) -> object:
    """Raises the BaseException `input.kind` names; `tuple-key` returns an output msgpack
    packs but Python cannot read back (a map with an array key); `fine` succeeds."""
    kind = ctx.input["kind"]
    if kind == "tuple-key":
        return {(1, 2): 3}
    if kind == "fine":
        return "fine"
    raise _HOSTILE[kind]


hostile_sync = Workflow("hostile-sync", on_events=["hostile-sync.item"])


@hostile_sync.step()
def raises_in_its_thread(ctx: Context) -> None:
    raise _HOSTILE[ctx.input["kind"]]


hostile_timed = Workflow("hostile-timed", on_events=["hostile-timed.item"])


@hostile_timed.step(timeout=5)
async def raises_under_a_timeout(ctx: Context) -> None:
    """The same, in a step with a timeout (which ran it as a task of its own on 3.11)."""
    raise _HOSTILE[ctx.input["kind"]]


hostile_hook = Workflow("hostile-hook", on_events=["hostile-hook.item"])


@hostile_hook.step()
async def waits_to_be_cancelled(ctx: Context) -> None:
    await asyncio.sleep(60)


@hostile_hook.on_cancel
async def hook_raises(ctx: Context) -> None:
    """Raises the BaseException `input.kind` names, in the async on_cancel hook."""
    raise _HOSTILE[ctx.input["kind"]]


hostile_sync_hook = Workflow("hostile-sync-hook", on_events=["hostile-sync-hook.item"])


@hostile_sync_hook.step()
async def waits_to_be_cancelled_too(ctx: Context) -> None:
    await asyncio.sleep(60)


@hostile_sync_hook.on_cancel
def sync_hook_raises(ctx: Context) -> None:
    raise _HOSTILE[ctx.input["kind"]]
