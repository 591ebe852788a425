"""The checks of a chaos run, as pure functions over what it observed: the events published,
the run records at the end, the ledger the handlers wrote, the slot counts, the faults and the
terminal states a watcher saw during the run."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from supersede.protocol import RunRecord, RunState, Strategy


@dataclass(frozen=True)
class Spec:
    """A chaos workflow's limit; must match chaos/pool_*.py. A dynamic `max_runs` is read from
    each run's record (this is its largest value)."""

    strategy: Strategy
    max_runs: int
    strict: bool = False
    scope: str = ""  # workflows of one scope share a group per key
    debounce_ms: int = 0
    # its steps hold a lock of their key while their process lives (chaos/handlers.py); their
    # limit is checked by the lock, not by the ledger's times (a killed step writes no end)
    locked: bool = False


CIP, GRR = Strategy.CANCEL_IN_PROGRESS, Strategy.GROUP_ROUND_ROBIN
NEWEST, OLDEST = Strategy.CANCEL_QUEUED_EXCEPT_NEWEST, Strategy.CANCEL_QUEUED_EXCEPT_OLDEST
WORKFLOWS: dict[str, Spec] = {
    "chaos-latest": Spec(CIP, 1),
    "chaos-latest3": Spec(CIP, 3),  # dynamic: 3 for hot keys, 2 for the others
    "chaos-strict": Spec(CIP, 1, strict=True),
    "chaos-fifo": Spec(GRR, 2),
    "chaos-newest": Spec(NEWEST, 1),
    "chaos-oldest": Spec(OLDEST, 1),
    "chaos-debounce": Spec(CIP, 1, debounce_ms=300),
    "chaos-proc-a": Spec(CIP, 1, strict=True, scope="chaos-proc", locked=True),
    "chaos-proc-b": Spec(CIP, 1, strict=True, scope="chaos-proc", locked=True),
}
TRIGGERS = {"chat": ("chaos-latest", "chaos-latest3"), "doc": ("chaos-strict",),
            "job": ("chaos-fifo",), "queue": ("chaos-newest", "chaos-oldest"),
            "edit": ("chaos-debounce",), "pa": ("chaos-proc-a",),
            "pb": ("chaos-proc-b",)}  # fmt: skip
# A server outage this share of a lease or longer may lapse leases (see _started_twice): the
# watch stops a run 0.9 of a lease after its last renewal was sent, a beat comes a sixth of a
# lease after the one before, and a failed one is tried again a 24th of a lease later.
OUTAGE_LAPSES = 0.9 - 1 / 6 - 1 / 24 - 0.03  # (the failed calls' time: connections refused)


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
        "oldest_not_succeeded": _oldest_not_succeeded(o.records),
        "wrong_run_kept_waiting": _wrong_run_kept(o.records),
        "dynamic_limit_wrong": _dynamic_limit_wrong(o.records),
        "running_runs_cancelled": _running_cancelled(o, starts),
        "debounced_started_early": _debounced_early(o, starts),
        "strict_max_executing": _most_executing(o, "chaos-strict"),
        **_overlaps(o),
        "fifo_max_executing": _most_executing(o, "chaos-fifo"),
        "groups_over_their_limit": _over_limit(o),
        "slot_drift_groups": _slot_drift(o),
        "faults": o.faults,
    }


def ok(verdict: dict[str, Any]) -> bool:
    zero = ("runs_lost", "runs_extra", "runs_not_terminal", "runs_failed", "runs_terminal_twice",
            "runs_succeeded_without_a_finished_handler", "started_twice_same_attempt",
            "started_twice_unexplained", "newest_not_succeeded", "oldest_not_succeeded",
            "wrong_run_kept_waiting", "dynamic_limit_wrong",
            "running_runs_cancelled", "debounced_started_early", "proc_overlaps",
            "slot_drift_groups",
            "groups_over_their_limit")  # fmt: skip
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
    only in the README's at-least-once cases, between the earlier attempt's start and the
    next's, or a lease after the earlier one returned if sooner (its result may not have been
    applied yet): its executor was SIGKILLed, or the server was down for long enough that its
    lease could lapse (renewals come every sixth of a lease, and a failed one is tried again a
    24th of a lease later: an outage that begins just before a beat must end within 0.9 -
    1/6 - 1/24, about 0.69, of a lease, less the time its failed calls took, for the watch not
    to stop the runs; when failed ones waited a whole interval, one of 1.3 s at a 3 s lease
    failed two beats and leases lapsed), or its executor logged that it renewed no lease for
    longer than a lease."""
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
        ordered = sorted(lines, key=lambda x: x["t"])
        for earlier, later in itertools.pairwise(ordered):
            # until the next attempt started, but no later than a lease after the handler
            # returned: a SIGKILL after it returned, before its result was applied (which takes
            # up to a lease of retries in an outage), makes a retry too
            end = ends.get((earlier["run"], earlier["attempt"], earlier["pid"]))
            until = later["t"] if end is None else min(later["t"], end["t"] + o.lease)
            why = _explain(o, earlier, until)
            if why == "sigkill":
                killed += 1
            elif why == "server_crash":
                crashed += 1
            elif why == "late_heartbeat":
                late += 1
            else:
                unexplained += 1
                if len(examples) < 3:  # what to look for in the logs
                    left = earlier["run"] in o.drain_left.get(earlier["pid"], [])
                    examples.append(
                        f"{earlier['run']} attempt {earlier['attempt']} pid {earlier['pid']} "
                        f"claimed={earlier.get('claimed') or 0:.3f} "
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


def _explain(o: Observed, start: dict[str, Any], until: float) -> str | None:
    """What may have made a handler's attempt (its start line, ended at `until`) lose its run:
    a SIGKILL of its executor while it held the attempt, a server outage then long enough for
    its lease to lapse, or its executor logging a late heartbeat then; None: nothing. The
    attempt is held from its claim (the start line's `claimed`; ledgers written before it have
    only the start): a step in a worker process may start seconds after the claim, and the
    lease may lapse in an outage that ended before the start line."""
    since = min(start["t"], start.get("claimed") or start["t"])
    kill = o.kills.get(start["pid"])
    if kill is not None and since <= kill <= until:
        return "sigkill"
    if any(a <= until and b >= since and b - a >= o.lease * OUTAGE_LAPSES for a, b in o.crashes):
        return "server_crash"
    if any(a <= until and b >= since for a, b in o.late.get(start["pid"], [])):
        return "late_heartbeat"
    return None


def _unbacked_success(o: Observed) -> int:
    done = {(x["run"], x["attempt"]) for x in o.ledger if x["ev"] == "end" and x["out"] == "done"}
    return sum(
        1 for r in o.records if r.state is RunState.SUCCEEDED and (r.id, r.attempt) not in done
    )


def _groups(records: Iterable[RunRecord], *strategies: Strategy) -> list[list[RunRecord]]:
    """The runs of each group of the given strategies, in sequence order."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if WORKFLOWS[r.workflow].strategy in strategies:
            groups[r.group].append(r)
    return [sorted(runs, key=lambda r: r.seq) for runs in groups.values()]


def _newest_not_succeeded(records: Iterable[RunRecord]) -> int:
    """CANCEL_IN_PROGRESS: the newest max_runs runs of every group end SUCCEEDED (a dynamic
    limit: the newest run's); CANCEL_QUEUED_EXCEPT_NEWEST: the newest run does."""
    bad = 0
    for runs in _groups(records, CIP):
        mx = runs[-1].max_runs or WORKFLOWS[runs[-1].workflow].max_runs
        bad += sum(1 for r in runs[-mx:] if r.state is not RunState.SUCCEEDED)
    for runs in _groups(records, NEWEST):
        bad += runs[-1].state is not RunState.SUCCEEDED
    return bad


def _oldest_not_succeeded(records: Iterable[RunRecord]) -> int:
    """CANCEL_QUEUED_EXCEPT_OLDEST: the first run of every group ends SUCCEEDED (it is never
    queued behind a running one, and a retried one is the oldest queued)."""
    return sum(runs[0].state is not RunState.SUCCEEDED for runs in _groups(records, OLDEST))


def _wrong_run_kept(records: Iterable[RunRecord]) -> int:
    """The run each CANCEL_QUEUED_* group kept waiting. EXCEPT_NEWEST: a queued run cancelled
    was superseded by a newer one (its `cancelled_by`). EXCEPT_OLDEST: a newer run cancelled
    for want of a slot (`no_slot`) found an older one of its group waiting, which started
    after that and succeeded (its assignment is no earlier than the cancel)."""
    bad = 0
    for runs in _groups(records, NEWEST):
        seq = {r.id: r.seq for r in runs}
        bad += sum(1 for r in runs if r.state is RunState.CANCELLED and r.cancelled_by
                   and seq.get(r.cancelled_by, "") <= r.seq)  # fmt: skip
    for runs in _groups(records, OLDEST):
        for r in runs:
            if r.state is not RunState.CANCELLED or r.reason != "no_slot":
                continue
            bad += not any(k.seq < r.seq and k.state is RunState.SUCCEEDED
                           and (k.assigned_ms or 0) >= (r.ended_ms or 0) for k in runs)  # fmt: skip
    return bad


def _dynamic_limit_wrong(records: Iterable[RunRecord]) -> int:
    """chaos-latest3's max_runs is `input.user.startsWith('hot') ? 3 : 2`: each run's record
    holds what ingress computed for its key."""
    return sum(1 for r in records if r.workflow == "chaos-latest3"
               and r.max_runs != (3 if r.key.startswith("hot") else 2))  # fmt: skip


def _running_cancelled(o: Observed, starts: dict[str, list[dict[str, Any]]]) -> int:
    """CANCEL_QUEUED_EXCEPT_*: never interrupt a running run. A CANCELLED run of theirs whose
    handler started counts, unless a fault explains each start (a run whose executor was
    killed, or whose lease lapsed, ends by the fault's path, which this check does not judge)."""
    bad = 0
    for r in o.records:
        if r.state is not RunState.CANCELLED or WORKFLOWS[r.workflow].strategy not in (
            NEWEST,
            OLDEST,
        ):
            continue
        until = r.ended_ms / 1000 if r.ended_ms else float("inf")  # (see _started_twice)
        for x in starts.get(r.id, []):
            if _explain(o, x, until) is None:
                bad += 1
                break
    return bad


def _debounced_early(o: Observed, starts: dict[str, list[dict[str, Any]]]) -> int:
    """Debounced runs whose handler started before `debounce_ms` after the run was created."""
    bad = 0
    for r in o.records:
        wait = WORKFLOWS[r.workflow].debounce_ms
        if wait and r.created_ms is not None:
            first = min((x["t"] for x in starts.get(r.id, [])), default=None)
            bad += first is not None and first * 1000 < r.created_ms + wait - 1
    return bad


def _overlaps(o: Observed) -> dict[str, int]:
    """Steps of a locked group (a strict scope in process isolation) that found their key's
    lock held by another run: two handlers of the group executing at once. Allowed only where
    the README says strict mode ends: the holder's lease may have lapsed (its executor
    SIGKILLed, the server down long enough, or its executor's heartbeat late). (Held by an
    earlier attempt of the same run: an at-least-once retry, judged by `_started_twice`.)"""
    starts = _starts(o)
    explained = unexplained = 0
    for x in o.ledger:
        # (the holder: `<run id> <attempt>`; the run id alone in ledgers written before)
        holder, _, attempt = str(x.get("holder", "")).partition(" ")
        if x["ev"] != "overlap" or holder == x["run"]:
            continue
        # the attempt that holds the lock: an earlier one may still run after its lease lapsed
        # and the run was retried, so the latest start is not necessarily the holder
        before = [s for s in starts.get(holder, []) if s["t"] <= x["t"]
                  and (not attempt or str(s["attempt"]) == attempt)]  # fmt: skip
        if before and _explain(o, max(before, key=lambda s: s["t"]), x["t"]) is not None:
            explained += 1
        else:
            unexplained += 1
    return {"proc_overlaps": unexplained, "proc_overlaps_after_a_lease_lapse": explained}


def _group_name(workflow: str) -> str:
    return WORKFLOWS[workflow].scope or workflow


def _executing(o: Observed, group: str) -> dict[str, int]:
    """Key -> the most runs of that key of `group` (a workflow, or a scope) with a handler
    executing at once (a SIGKILL ends a handler; two attempts of one run, an at-least-once case
    counted above, count once)."""
    ends = _ends(o)
    points: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for x in o.ledger:
        if x["ev"] != "start" or _group_name(x["wf"]) != group:
            continue
        end = ends.get((x["run"], x["attempt"], x["pid"]))
        stop = end["t"] if end else o.kills.get(x["pid"], float("inf"))
        points[x["key"]] += [(x["t"], 1, x["run"]), (stop, -1, x["run"])]
    out: dict[str, int] = {}
    for key, marks in points.items():
        live: dict[str, int] = defaultdict(int)
        most = 0
        for _, step, run in sorted(marks, key=lambda m: (m[0], m[1])):  # ends before starts
            live[run] += step
            if live[run] == 0:
                del live[run]
            most = max(most, len(live))
        out[key] = most
    return out


def _most_executing(o: Observed, group: str) -> int:
    return max(_executing(o, group).values(), default=0)


def _over_limit(o: Observed) -> int:
    """Groups (a workflow, or a scope) whose keys ever had more handlers executing than the
    limit promises: strict CANCEL_IN_PROGRESS (`max_runs`, held until the handler stopped),
    GROUP_ROUND_ROBIN and the CANCEL_QUEUED_* strategies (they never cancel a running run, so
    never more than `max_runs` started). Groups whose steps lock their key are left to
    `_overlaps`."""
    limits: dict[tuple[str, str], int] = {}
    for r in o.records:
        at = (_group_name(r.workflow), r.key)
        limits[at] = max(limits.get(at, 0), r.max_runs or WORKFLOWS[r.workflow].max_runs)
    bad = 0
    never_over = (GRR, NEWEST, OLDEST)  # (they never cancel a running run)
    judged = {  # (a locked group is judged by its lock: `_overlaps`)
        _group_name(w)
        for w, s in WORKFLOWS.items()
        if (s.strict or s.strategy in never_over) and not s.locked
    }
    for group in judged:
        most = _executing(o, group)
        spec = next(s for w, s in WORKFLOWS.items() if _group_name(w) == group)
        bad += any(n > limits.get((group, key), spec.max_runs) for key, n in most.items())
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
