"""The checks of a chaos run, as pure functions over what it observed: the events published,
the run records at the end, the ledger the handlers wrote, the slot counts, the faults and the
terminal states a watcher saw during the run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from supersede.protocol import RunRecord, RunState, Strategy

# workflow -> (strategy, max_runs, strict); must match chaos/pool_a.py and chaos/pool_b.py
WORKFLOWS: dict[str, tuple[Strategy, int, bool]] = {
    "chaos-latest": (Strategy.CANCEL_IN_PROGRESS, 1, False),
    "chaos-latest3": (Strategy.CANCEL_IN_PROGRESS, 3, False),
    "chaos-strict": (Strategy.CANCEL_IN_PROGRESS, 1, True),
    "chaos-fifo": (Strategy.GROUP_ROUND_ROBIN, 2, False),
}
TRIGGERS = {"chat": ("chaos-latest", "chaos-latest3"), "doc": ("chaos-strict",),
            "job": ("chaos-fifo",)}  # fmt: skip


@dataclass
class Observed:
    published: dict[str, str]  # event id -> event name (unique ids)
    duplicates: int  # re-publications of an id already published
    records: list[RunRecord]
    ledger: list[dict[str, Any]]
    slots: dict[str, int]  # group id -> stored slot count (all shards)
    kills: dict[int, float]  # pid -> when it was SIGKILLed
    crashes: list[tuple[float, float]]  # server down (from, to)
    lease: float  # seconds: an outage shorter than half of it cannot make a lease lapse
    terminal_changes: int  # runs seen terminal, later seen in another state
    faults: dict[str, int] = field(default_factory=dict)
    # pid -> (from, to) spans an executor renewed no lease for longer than a lease (its
    # "heartbeat late" log lines: a starved process or an unreachable server)
    late: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    # pid -> run ids an executor left with results not yet applied when its SIGTERM drain
    # deadline passed ("drain deadline passed" log lines): diagnostics, not an explanation yet
    drain_left: dict[int, list[str]] = field(default_factory=dict)


def expected_runs(published: dict[str, str]) -> set[tuple[str, str]]:
    return {(ev, wf) for ev, name in published.items() for wf in TRIGGERS[name]}


def check(o: Observed) -> dict[str, Any]:
    want = expected_runs(o.published)
    have: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in o.records:
        have[(r.event_id, r.workflow)].append(r)
    missing = sorted(want - set(have))
    lost = len(missing)
    extra = sum(len(v) - 1 for v in have.values()) + len(set(have) - want)
    stuck = sum(1 for r in o.records if not r.state.terminal)
    failed = sum(1 for r in o.records if r.state is RunState.FAILED)
    starts = _starts(o)
    return {
        "events_published": len(o.published),
        "duplicates_published": o.duplicates,
        "runs_expected": len(want),
        "runs": len(o.records),
        "runs_lost": lost,
        "lost_examples": [f"{ev}:{wf}" for ev, wf in missing[:5]],
        "runs_extra": extra,
        "runs_not_terminal": stuck,
        "runs_failed": failed,
        "runs_terminal_twice": o.terminal_changes,
        "runs_succeeded_without_a_finished_handler": _unbacked_success(o),
        "handlers_started": sum(len(v) for v in starts.values()),
        **_started_twice(o, starts),
        "newest_not_succeeded": _newest_not_succeeded(o.records),
        "strict_max_executing": _most_executing(o, "chaos-strict"),
        "fifo_max_executing": _most_executing(o, "chaos-fifo"),
        "workflows_over_their_limit": _over_limit(o),
        "slot_drift_groups": _slot_drift(o),
        "faults": o.faults,
    }


def ok(verdict: dict[str, Any]) -> bool:
    zero = ("runs_lost", "runs_extra", "runs_not_terminal", "runs_failed", "runs_terminal_twice",
            "runs_succeeded_without_a_finished_handler", "started_twice_same_attempt",
            "started_twice_unexplained", "newest_not_succeeded", "slot_drift_groups",
            "workflows_over_their_limit")  # fmt: skip
    return all(verdict[k] == 0 for k in zero)


def _starts(o: Observed) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in o.ledger:
        if line["ev"] == "start":
            out[line["run"]].append(line)
    return out


def _ends(o: Observed) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(run, attempt, pid) -> its end line."""
    return {(x["run"], x["attempt"], x["pid"]): x for x in o.ledger if x["ev"] == "end"}


def _started_twice(o: Observed, starts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A handler started again for one run: never for the same attempt; for a later attempt
    only in the README's at-least-once cases: the earlier attempt's executor was SIGKILLed while
    it ran, or the server was down while it ran for long enough that its lease could lapse
    (renewals come every third of a lease, so an outage under half a lease cannot), or its
    executor logged that it renewed no lease for longer than a lease while it ran."""
    ends = _ends(o)
    same = killed = crashed = late = unexplained = 0
    examples: list[str] = []
    for lines in starts.values():
        attempts = [x["attempt"] for x in lines]
        if len(set(attempts)) != len(attempts):
            same += 1
            continue
        if len(lines) < 2:
            continue
        for earlier in sorted(lines, key=lambda x: x["t"])[:-1]:
            end = ends.get((earlier["run"], earlier["attempt"], earlier["pid"]))
            until = end["t"] if end else float("inf")
            kill = o.kills.get(earlier["pid"])
            if kill is not None and earlier["t"] <= kill <= until:
                killed += 1
            elif any(a <= until and b >= earlier["t"] and b - a >= o.lease / 2
                     for a, b in o.crashes):  # fmt: skip
                crashed += 1
            elif any(a <= until and b >= earlier["t"] for a, b in o.late.get(earlier["pid"], [])):
                late += 1
            else:
                unexplained += 1
                if len(examples) < 3:  # what to look for in the logs
                    left = earlier["run"] in o.drain_left.get(earlier["pid"], [])
                    examples.append(
                        f"{earlier['run']} attempt {earlier['attempt']} pid {earlier['pid']} "
                        f"t={earlier['t']:.3f}..{until:.3f}"
                        + (
                            " (its executor's drain deadline passed with it unapplied)"
                            if left
                            else ""
                        )
                    )
    return {
        "started_twice_same_attempt": same,
        "started_again_after_sigkill": killed,
        "started_again_after_server_crash": crashed,
        "started_again_after_late_heartbeat": late,
        "started_twice_unexplained": unexplained,
        "unexplained_examples": examples,
        "drain_deadlines_passed": sum(len(v) for v in o.drain_left.values()),
    }


def _unbacked_success(o: Observed) -> int:
    done = {(x["run"], x["attempt"]) for x in o.ledger if x["ev"] == "end" and x["out"] == "done"}
    return sum(
        1 for r in o.records if r.state is RunState.SUCCEEDED and (r.id, r.attempt) not in done
    )


def _newest_not_succeeded(records: Iterable[RunRecord]) -> int:
    """CANCEL_IN_PROGRESS: the newest max_runs runs of every group end SUCCEEDED."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        strategy, _, _ = WORKFLOWS[r.workflow]
        if strategy is Strategy.CANCEL_IN_PROGRESS:
            groups[r.group].append(r)
    bad = 0
    for runs in groups.values():
        runs.sort(key=lambda r: r.seq)
        mx = WORKFLOWS[runs[0].workflow][1]
        bad += sum(1 for r in runs[-mx:] if r.state is not RunState.SUCCEEDED)
    return bad


def _most_executing(o: Observed, workflow: str) -> int:
    """The most runs of one key of `workflow` with a handler executing at once (a SIGKILL
    ends a handler; two attempts of one run, an at-least-once case counted above, count once)."""
    ends = _ends(o)
    points: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for x in o.ledger:
        if x["ev"] != "start" or x["wf"] != workflow:
            continue
        end = ends.get((x["run"], x["attempt"], x["pid"]))
        stop = end["t"] if end else o.kills.get(x["pid"], float("inf"))
        points[x["key"]] += [(x["t"], 1, x["run"]), (stop, -1, x["run"])]
    most = 0
    for marks in points.values():
        live: dict[str, int] = defaultdict(int)
        for _, step, run in sorted(marks, key=lambda m: (m[0], m[1])):  # ends before starts
            live[run] += step
            if live[run] == 0:
                del live[run]
            most = max(most, len(live))
    return most


def _over_limit(o: Observed) -> int:
    """Workflows whose keys ever had more handlers executing than the limit promises: strict
    CANCEL_IN_PROGRESS (`max_runs`, held until the handler stopped) and GROUP_ROUND_ROBIN
    (never cancels, so never more than `max_runs` started)."""
    bad = 0
    for wf, (strategy, max_runs, strict) in WORKFLOWS.items():
        if strict or strategy is Strategy.GROUP_ROUND_ROBIN:
            bad += _most_executing(o, wf) > max_runs
    return bad


def _slot_drift(o: Observed) -> int:
    """Groups whose stored slot count is not the number of their runs holding a slot."""
    held: dict[str, int] = defaultdict(int)
    for r in o.records:
        if r.state in (RunState.ASSIGNED, RunState.RUNNING) or (
            r.state is RunState.CANCELLING and r.strict
        ):
            held[r.group] += 1
    groups = set(held) | {g for g, n in o.slots.items() if n}
    return sum(1 for g in groups if held.get(g, 0) != o.slots.get(g, 0))
