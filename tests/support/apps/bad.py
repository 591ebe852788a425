"""A module whose workflow is invalid in the way SUPERSEDE_TEST_BAD says."""

from __future__ import annotations

import os

from supersede.workflow import Concurrency, Context, Workflow

kind = os.environ.get("SUPERSEDE_TEST_BAD", "max_runs")
concurrency = {
    "max_runs": Concurrency(expression="input.userId", max_runs=0),
    "strategy": Concurrency(expression="input.userId", limit_strategy="LATEST_WINS"),
    "cel": Concurrency(expression="input.userId +"),
}.get(kind)
# "version": valid, but its version is stored with other content by the test beforehand
version = "v1" if kind == "version" else ""
bad = Workflow("bad", on_events=["x"], concurrency=concurrency, version=version)


@bad.step(parents=["second"] if kind == "cycle" else [])
def first(ctx: Context) -> None:
    pass


@bad.step(parents=[first])
def second(ctx: Context) -> None:
    pass
