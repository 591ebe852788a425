"""Chaos pool C: two workflows sharing one strict CANCEL_IN_PROGRESS group per key
(`scope="chaos-proc"`, max_runs 1) whose step runs in process isolation, some of them ignoring
the cancel flag (stopped by SIGTERM) or SIGTERM too (stopped by SIGKILL)."""

from __future__ import annotations

import os

from chaos.handlers import sleep_process
from supersede.workflow import Concurrency, Strategy, Workflow

# The ledger names the executor, not the step's worker process, so that a SIGKILL of the
# executor explains a second attempt (the forkserver and its workers inherit this).
os.environ.setdefault("CHAOS_EXECUTOR_PID", str(os.getpid()))


def _shared() -> Concurrency:
    return Concurrency("input.user", 1, Strategy.CANCEL_IN_PROGRESS, strict=True,
                       scope="chaos-proc")  # fmt: skip


proc_a = Workflow("chaos-proc-a", on_events=["pa"], max_attempts=50, concurrency=_shared(),
                  isolation="process")  # fmt: skip
proc_b = Workflow("chaos-proc-b", on_events=["pb"], max_attempts=50, concurrency=_shared(),
                  isolation="process")  # fmt: skip

proc_a.step()(sleep_process)
proc_b.step()(sleep_process)
