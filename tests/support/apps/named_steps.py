"""Steps defined apart from the workflow that registers them (tests/support/apps/isolated.py,
under other names): a worker process imports only this module."""

from __future__ import annotations

from supersede.workflow import Context


async def made(ctx: Context) -> dict[str, object]:
    """Registered under another name (`name=`); its children name it by this function."""
    return {"raw": b"\xff\xd8raw", "pair": (1, 2)}


def read_made(ctx: Context) -> list[str]:
    """What a child sees of its parent's output: in a thread, and in a worker process."""
    got = ctx.parent(made)
    return [type(got["raw"]).__name__, type(got["pair"]).__name__, bytes(got["raw"]).hex()]
