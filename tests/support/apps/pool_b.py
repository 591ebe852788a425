"""A second executor pool's module: one workflow the demo test app does not have. Its step logs
`ran:<workflow>:<run id>:<pid>` to the same list as the demo app, so a test sees which process
ran each run."""

from __future__ import annotations

import os

from supersede.workflow import Context, Workflow
from tests.support.apps.demo import note

resize = Workflow("resize", on_events=["image.uploaded"])


@resize.step()
async def do_resize(ctx: Context) -> None:
    note("ran", "resize", ctx.run_id, os.getpid())
