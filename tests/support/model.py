"""A pure-Python reference model of the strategies, written from the rules in docs/design.md
("Strategies"): the reference of invariant 4.

It is deliberately declarative (recompute survivors from the whole group each time) rather than
a transcription of the Lua, so that a bug in one is unlikely to be repeated in the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supersede.protocol import Strategy

ACTIVE = ("A", "R")


@dataclass(slots=True)
class Limits:
    max_runs: int
    strategy: Strategy
    strict: bool
    debounce: int = 0  # ms; > 0: arrivals wait for the group's window
    max_wait: int = 0


@dataclass(slots=True)
class MRun:
    rid: str
    group: str
    seq: int
    max_attempts: int
    state: str = "Q"
    attempt: int = 1
    hold: bool = False
    executor: str | None = None
    lease: int | None = None
    waiting: bool = False  # QUEUED in its group's debounce window (in no queue yet)
    dropped: bool = False  # superseded inside a debounce window: never admitted to the group


@dataclass
class Model:
    lease_ms: int
    limits: dict[str, Limits] = field(default_factory=dict)
    runs: dict[str, MRun] = field(default_factory=dict)
    unlimited: set[str] = field(default_factory=set)  # groups of runs without a limit
    # group -> the newest sequence it ever admitted: its fence (ctx.still_current())
    fences: dict[str, int] = field(default_factory=dict)
    # debounced group -> [its waiting run, the window's first ms, when it is due]
    windows: dict[str, list[Any]] = field(default_factory=dict)
    # debounced group -> the run its last window let through (an older arrival ends at once)
    closed: dict[str, str] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------------
    def group_runs(self, group: str, *states: str) -> list[MRun]:
        return sorted(
            (
                r
                for r in self.runs.values()
                if r.group == group and r.state in states and not r.waiting
            ),
            key=lambda r: r.seq,
        )

    def slots(self, group: str) -> int:
        """Slots held: ASSIGNED + RUNNING, plus CANCELLING runs that still hold theirs."""
        return sum(
            1
            for r in self.runs.values()
            if r.group == group and (r.state in ACTIVE or (r.state == "X" and r.hold))
        )

    # -- helpers -------------------------------------------------------------------------------
    def _cancel(self, run: MRun) -> None:
        """Supersede or cancel one run that has not ended."""
        if run.state in ("Q", "A"):
            run.state = "C"
        elif run.state == "R":
            run.state = "X"
            run.hold = self.limits[run.group].strict

    def _end(self, run: MRun, state: str) -> None:
        run.state, run.hold, run.lease = state, False, None

    def _fill(self, group: str) -> None:
        free = self.limits[group].max_runs - self.slots(group)
        for run in self.group_runs(group, "Q")[: max(free, 0)]:
            run.state = "A"

    # -- operations ----------------------------------------------------------------------------
    def arrive(self, batch: list[tuple[str, str, int, int]], now: int = 0) -> None:
        """A batch of (run id, group, sequence, max attempts); the limits are already known."""
        touched: dict[str, list[MRun]] = {}
        for rid, group, seq, max_attempts in batch:
            if rid in self.runs:
                continue
            run = self.runs[rid] = MRun(rid, group, seq, max_attempts)
            touched.setdefault(group, []).append(run)
        for group, arrived in touched.items():
            if self.limits[group].debounce and group not in self.unlimited:
                self._debounce(group, sorted(arrived, key=lambda r: r.seq), now)
            else:
                self._apply(group)
            # the fence: the newest arrival the strategy did not end at once
            kept = [r.seq for r in arrived if r.state != "C"]
            if kept and group not in self.unlimited:
                self.fences[group] = max(max(kept), self.fences.get(group, 0))

    def _debounce(self, group: str, arrived: list[MRun], now: int) -> None:
        """Debounced arrivals (oldest first): the newest waits for the window to close; the
        run it replaces, or an arrival older than the waiting run, ends at once."""
        lim = self.limits[group]
        window = self.windows.get(group)
        waiting = self.runs[window[0]] if window else None
        if waiting is not None and not (waiting.state == "Q" and waiting.waiting):
            waiting, window = None, None  # cancelled by hand: a new window opens
        first = window[1] if window else now
        fired = self.runs[self.closed[group]] if group in self.closed else None
        moved = False
        for run in arrived:
            if waiting is not None and run.seq < waiting.seq:
                run.state, run.dropped = "C", True
                continue
            if fired is not None and run.seq < fired.seq:
                run.state, run.dropped = "C", True  # (after that window closed: it ends too)
                continue
            if waiting is not None:
                waiting.state, waiting.waiting, waiting.dropped = "C", False, True
            else:
                first = now
            run.waiting, waiting, moved = True, run, True
        if moved and waiting is not None:
            due = now + lim.debounce
            if lim.max_wait and first + lim.max_wait < due:
                due = first + lim.max_wait
            self.windows[group] = [waiting.rid, first, due]

    def fire(self, now: int) -> None:
        """The windows due by `now` close: each waiting run arrives at its group then."""
        for group, (rid, _, due) in list(self.windows.items()):
            if due > now:
                continue
            del self.windows[group]
            run = self.runs[rid]
            if run.state == "Q" and run.waiting:
                run.waiting = False
                self._apply(group)
                if run.state != "C":  # (one its strategy turned away at once is none)
                    self.closed[group] = rid

    def _apply(self, group: str) -> None:
        """The group's strategy, after arrivals."""
        lim = self.limits[group]
        if lim.strategy is Strategy.CANCEL_IN_PROGRESS:
            # The newest max_runs the group ever admitted survive, ended ones included:
            # a late, older arrival is cancelled even when the newer runs already ended.
            # (Runs superseded inside a debounce window were never admitted to the group, nor
            # is a run still waiting in one.)
            ever = sorted(
                (r for r in self.runs.values()
                 if r.group == group and not r.dropped and not r.waiting),
                key=lambda r: r.seq,
            )  # fmt: skip
            newest = {r.rid for r in ever[-lim.max_runs :]}
            for run in self.group_runs(group, "Q", "A", "R"):
                if run.rid not in newest:
                    self._cancel(run)
            self._fill(group)
        elif lim.strategy is Strategy.CANCEL_NEWEST:
            self._fill(group)
            for run in self.group_runs(group, "Q"):
                run.state = "C"
        elif lim.strategy in (
            Strategy.CANCEL_QUEUED_EXCEPT_NEWEST,
            Strategy.CANCEL_QUEUED_EXCEPT_OLDEST,
        ):
            # Runs start oldest first while slots are free; of those left waiting, only the
            # newest (resp. the oldest) stays queued. Running runs are never interrupted.
            self._fill(group)
            waiting = self.group_runs(group, "Q")
            keep_newest = lim.strategy is Strategy.CANCEL_QUEUED_EXCEPT_NEWEST
            for run in waiting[:-1] if keep_newest else waiting[1:]:
                run.state = "C"
        else:
            self._fill(group)

    def claim(self, rid: str, attempt: int, executor: str, now: int) -> bool:
        run = self.runs.get(rid)
        if run is None or run.state != "A" or run.attempt != attempt:
            return False
        run.state, run.executor, run.lease = "R", executor, now + self.lease_ms
        return True

    def heartbeat(self, executor: str, pairs: list[tuple[str, int]], now: int) -> list[str]:
        stop = []
        for rid, attempt in pairs:
            run = self.runs.get(rid)
            mine = run is not None and run.attempt == attempt and run.executor == executor
            if mine and run is not None and run.state in ("R", "X"):
                run.lease = now + self.lease_ms
            if not (mine and run is not None and run.state == "R"):
                stop.append(rid)
        return stop

    def finish(self, rid: str, attempt: int, outcome: str) -> None:
        run = self.runs[rid]
        if run.attempt != attempt:
            return
        if run.state == "R":
            self._end(run, outcome)
            self._fill(run.group)
        elif run.state == "X":
            held = run.hold
            self._end(run, "C")
            if held:
                self._fill(run.group)

    def reap(self, now: int) -> None:
        touched = set()
        for run in self.runs.values():
            if run.lease is None or run.lease > now:
                continue
            if run.state == "R" and run.attempt < run.max_attempts:
                run.attempt += 1
                run.state, run.lease, run.executor = "A", None, None
            elif run.state == "R":
                self._end(run, "F")
                touched.add(run.group)
            elif run.state == "X":
                self._end(run, "C")
                touched.add(run.group)
        for group in touched:
            self._fill(group)

    def cancel(self, rids: list[str]) -> list[bool]:
        out = []
        touched = []
        for rid in rids:
            run = self.runs[rid]
            live = run.state in ("Q", "A", "R")
            if live:
                self._cancel(run)
                touched.append(run.group)
            out.append(live)
        for group in touched:
            self._fill(group)
        return out
