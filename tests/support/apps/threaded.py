"""A workflow module that starts a thread when it is imported (as a client library's pool
might): a service's placement must reach that thread too."""

from __future__ import annotations

import threading

from supersede.workflow import Context, Workflow

_idle = threading.Event()
threading.Thread(target=_idle.wait, name="started-at-import", daemon=True).start()

placed = Workflow("placed", on_events=["placed.event"])


@placed.step()
async def nothing(ctx: Context) -> None:
    return None
