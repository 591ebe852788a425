"""The chaos run (`make chaos`, chaos/): its checks catch what they claim to, and a 60-second
run on one server passes them all."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import orjson
import pytest

from chaos.verdict import Observed, check, ok
from supersede.protocol import RunRecord
from supersede.server import die_with_parent
from tests.support import REPO


def _record(rid: str, wf: str, state: str, *, group: str = "g", seq: int = 1, attempt: int = 1,
            ev: str = "e1", mx: int = 1, t0: int = 0, **more: Any) -> RunRecord:  # fmt: skip
    rec = {"st": state, "w": wf, "k": "u", "g": group, "s": f"{seq:032x}", "ev": ev, "a": attempt,
           "sx": 1 if wf == "chaos-strict" else 0, "mx": mx, "t0": t0, **more}  # fmt: skip
    return RunRecord.from_map(rid, rec)


def _line(ev: str, rid: str, t: float, *, pid: int = 1, attempt: int = 1,
          wf: str = "chaos-strict", out: str = "done") -> dict[str, Any]:  # fmt: skip
    return {"ev": ev, "run": rid, "attempt": attempt, "pid": pid, "t": t, "wf": wf, "key": "u",
            "out": out}  # fmt: skip


def _observed(records: list[RunRecord], ledger: list[dict[str, Any]], **kw: Any) -> Observed:
    base: dict[str, Any] = {"published": {"e1": "doc", "e2": "doc"}, "duplicates": 0,
                            "records": records, "ledger": ledger, "slots": {}, "kills": {},
                            "crashes": [], "terminal_changes": 0, "lease": 2.0}  # fmt: skip
    return Observed(**(base | kw))


def test_the_checks_pass_a_clean_history_and_catch_each_violation() -> None:
    recs = [_record("r1", "chaos-strict", "C", ev="e1", seq=1),
            _record("r2", "chaos-strict", "S", ev="e2", seq=2)]  # fmt: skip
    clean = [_line("start", "r1", 1.0), _line("end", "r1", 2.0, out="cancelled"),
             _line("start", "r2", 2.5), _line("end", "r2", 3.0)]  # fmt: skip
    verdict = check(_observed(recs, clean))
    assert ok(verdict) and verdict["strict_max_executing"] == 1
    # two strict handlers of one key at once
    overlap = [clean[0], _line("start", "r2", 1.5), clean[1], clean[3]]
    assert check(_observed(recs, overlap))["strict_max_executing"] == 2
    assert not ok(check(_observed(recs, overlap)))
    # a second attempt while the first still ran, with no kill or crash to explain it
    again = [*clean, _line("start", "r2", 2.7, attempt=2, pid=2)]
    assert check(_observed(recs, again))["started_twice_unexplained"] == 1
    # ... explained by a SIGKILL of the first attempt's process
    explained = check(_observed(recs, again, kills={1: 2.6}))
    # ... but not by one after the second attempt had started, nor by one more than a lease
    # after the first returned (its result was applied by then)
    assert check(_observed(recs, again, kills={1: 2.8}))["started_twice_unexplained"] == 1
    returned = [
        _line("start", "r2", 2.5),
        _line("end", "r2", 2.6),
        _line("start", "r2", 9.0, attempt=2, pid=2),
    ]
    assert (
        check(_observed(recs, [*clean[:2], *returned], kills={1: 8.0}))["started_twice_unexplained"]
        == 1
    )
    assert (
        check(_observed(recs, [*clean[:2], *returned], kills={1: 4.0}))["started_twice_unexplained"]
        == 0
    )
    assert explained["started_twice_unexplained"] == 0
    assert explained["started_again_after_sigkill"] == 1
    # ... but not by a server outage too short for a lease to lapse
    short = check(_observed(recs, again, crashes=[(2.6, 2.65)]))
    assert short["started_twice_unexplained"] == 1
    long_ = check(_observed(recs, again, crashes=[(2.6, 4.0)]))
    assert long_["started_again_after_server_crash"] == 1
    # ... nor by an outage that ended before the first attempt's start line, unless the attempt
    # was claimed before it (a process-isolated step may start seconds after its claim; the
    # lease runs from the claim)
    slow = [*clean[:2], {**_line("start", "r2", 5.0), "claimed": 2.4},
            _line("start", "r2", 5.05, attempt=2, pid=2)]  # fmt: skip
    claimed = check(_observed(recs, slow, crashes=[(2.5, 4.0)]))
    assert claimed["started_again_after_server_crash"] == 1
    assert claimed["started_twice_unexplained"] == 0
    unclaimed = [*slow[:2], {**slow[2], "claimed": 4.5}, slow[3]]
    assert check(_observed(recs, unclaimed, crashes=[(2.5, 4.0)]))["started_twice_unexplained"] == 1
    # ... or by the first attempt's executor logging it renewed no lease for too long while
    # it ran (a starved process), but not by another executor's late heartbeat
    starved = check(_observed(recs, again, late={1: [(2.55, 2.75)]}))
    assert starved["started_again_after_late_heartbeat"] == 1
    assert starved["started_twice_unexplained"] == 0
    other = check(_observed(recs, again, late={3: [(2.55, 2.75)]}))
    assert other["started_twice_unexplained"] == 1
    # three GROUP_ROUND_ROBIN handlers of one key (max_runs 2) at once
    fifo = [_line("start", f"f{i}", 1.0 + i / 10, wf="chaos-fifo") for i in range(3)]
    assert check(_observed(recs, clean + fifo))["groups_over_their_limit"] == 1
    # the newest run of a CANCEL_IN_PROGRESS key not SUCCEEDED; a lost run; a drifted slot
    wrong = [_record("r1", "chaos-strict", "S", seq=1), _record("r2", "chaos-strict", "C",
                                                                  ev="e2", seq=2)]  # fmt: skip
    assert check(_observed(wrong, clean))["newest_not_succeeded"] == 1
    assert check(_observed(recs[:1], clean))["runs_lost"] == 1
    assert check(_observed(recs, clean, slots={"g": 1}))["slot_drift_groups"] == 1
    assert not ok(check(_observed(recs, clean, terminal_changes=1)))


def test_the_checks_of_the_newer_features_catch_each_violation() -> None:
    """Scopes, dynamic limits, the CANCEL_QUEUED_* strategies and debounce."""
    # two workflows of one scope (process isolation, its steps lock their key): a step of one
    # finding the lock held by a run of the other is two handlers of the group at once
    recs = [_record("p1", "chaos-proc-a", "C", seq=1), _record("p2", "chaos-proc-b", "S", seq=2,
                                                                 ev="e2")]  # fmt: skip
    pub = {"published": {"e1": "pa", "e2": "pb"}}
    a = _line("start", "p1", 1.0, wf="chaos-proc-a")
    b = _line("start", "p2", 1.5, wf="chaos-proc-b")
    overlap = {**_line("overlap", "p2", 1.5, wf="chaos-proc-b"), "holder": "p1"}
    ends = [_line("end", "p1", 2.0, wf="chaos-proc-a"), _line("end", "p2", 3.0, wf="chaos-proc-b")]
    verdict = check(_observed(recs, [a, b, overlap, *ends], **pub))
    assert verdict["proc_overlaps"] == 1 and not ok(verdict)
    # ... held by an earlier attempt of the same run (an at-least-once retry): not this check's
    again = {**_line("overlap", "p2", 1.5, wf="chaos-proc-b"), "holder": "p2"}
    assert check(_observed(recs, [a, b, again, *ends], **pub))["proc_overlaps"] == 0
    # ... nor where the holder's lease may have lapsed: its executor logged a late heartbeat
    lapsed = check(_observed(recs, [a, b, overlap, *ends], late={1: [(1.2, 1.4)]}, **pub))
    assert lapsed["proc_overlaps"] == 0 and lapsed["proc_overlaps_after_a_lease_lapse"] == 1
    # ... nor where the holder is an earlier attempt still running after its lease lapsed (a
    # server outage) and the run was retried: judged by that attempt, not the retry's start
    retried = [_line("start", "p1", 1.0, wf="chaos-proc-a"),
               _line("start", "p1", 2.3, pid=2, attempt=2, wf="chaos-proc-a"), b,
               {**_line("overlap", "p2", 2.5, wf="chaos-proc-b"), "holder": "p1 1"},
               _line("end", "p1", 2.6, wf="chaos-proc-a"),
               _line("end", "p1", 2.7, pid=2, attempt=2, wf="chaos-proc-a"), ends[1]]  # fmt: skip
    held = check(_observed(recs, retried, crashes=[(0.85, 2.25)], **pub))
    assert held["proc_overlaps"] == 0 and held["proc_overlaps_after_a_lease_lapse"] == 1
    # (the same history with the retry as the holder has nothing to explain it)
    retried[3] = {**retried[3], "holder": "p1 2"}
    assert check(_observed(recs, retried, crashes=[(0.85, 2.25)], **pub))["proc_overlaps"] == 1
    # ... and a step killed mid-way (no end line) is not judged by the ledger's times
    assert ok(check(_observed(recs, [a, b, ends[1]], **pub)))
    # a dynamic limit: the newest max_runs (the record's, 2) of a CANCEL_IN_PROGRESS group
    dyn = [_record(f"d{i}", "chaos-latest3", st, seq=i, ev=f"e{i}", mx=2)
           for i, st in enumerate(["C", "C", "S"])]  # fmt: skip
    assert check(_observed(dyn, []))["newest_not_succeeded"] == 1
    dyn[1] = _record("d1", "chaos-latest3", "S", seq=1, ev="e1", mx=2)
    assert check(_observed(dyn, []))["newest_not_succeeded"] == 0
    # CANCEL_QUEUED_EXCEPT_OLDEST: its first run cancelled; EXCEPT_NEWEST: its newest one
    old = [_record("o1", "chaos-oldest", "C", seq=1), _record("o2", "chaos-oldest", "S", seq=2)]
    assert check(_observed(old, []))["oldest_not_succeeded"] == 1
    new = [_record("n1", "chaos-newest", "S", seq=1), _record("n2", "chaos-newest", "C", seq=2)]
    assert check(_observed(new, []))["newest_not_succeeded"] == 1
    # ... a running run of theirs cancelled, unless a SIGKILL of its executor explains it
    run = [_record("q1", "chaos-newest", "C", seq=1), _record("q2", "chaos-newest", "S", seq=2)]
    started = [_line("start", "q1", 1.0, wf="chaos-newest")]
    assert check(_observed(run, started))["running_runs_cancelled"] == 1
    assert check(_observed(run, started, kills={1: 1.2}))["running_runs_cancelled"] == 0
    # ... a newer arrival cancelled where EXCEPT_OLDEST keeps the older one waiting: fine; the
    # older one cancelled as NEWEST would (no older run left to start after it): wrong
    oldest = [
        _record("x1", "chaos-oldest", "S", seq=1, t1=1_000),
        _record("x2", "chaos-oldest", "S", seq=2, t1=3_000),
        _record("x3", "chaos-oldest", "C", seq=3, why="no_slot", t3=2_000),
    ]
    assert check(_observed(oldest, []))["wrong_run_kept_waiting"] == 0
    oldest[1] = _record("x2", "chaos-oldest", "C", seq=2, why="no_slot", t3=2_000)
    oldest[2] = _record("x3", "chaos-oldest", "S", seq=3, t1=3_000)
    assert check(_observed(oldest, []))["wrong_run_kept_waiting"] == 1
    # EXCEPT_NEWEST: a queued run must be superseded by a newer one, never an older one
    newer = [
        _record("y1", "chaos-newest", "C", seq=1, by="y2"),
        _record("y2", "chaos-newest", "S", seq=2),
    ]
    assert check(_observed(newer, []))["wrong_run_kept_waiting"] == 0
    older = [
        _record("y1", "chaos-newest", "S", seq=1),
        _record("y2", "chaos-newest", "C", seq=2, by="y1"),
    ]
    assert check(_observed(older, []))["wrong_run_kept_waiting"] == 1
    # the dynamic limit: what ingress computed for the key (hot keys 3, others 2)
    assert (
        check(_observed([_record("z1", "chaos-latest3", "S", mx=2)], []))["dynamic_limit_wrong"]
        == 0
    )
    assert (
        check(_observed([_record("z1", "chaos-latest3", "S", mx=3)], []))["dynamic_limit_wrong"]
        == 1
    )
    # the CANCEL_QUEUED_* strategies never run two handlers of a key at once
    two = [
        _line("start", "q1", 1.0, wf="chaos-oldest"),
        _line("start", "q2", 1.5, wf="chaos-oldest"),
    ]
    assert check(_observed([], two))["groups_over_their_limit"] == 1
    # debounce: a handler started before debounce_ms (300) after its run was created
    deb = [_record("w1", "chaos-debounce", "S", seq=1, t0=10_000)]
    early = [_line("start", "w1", 10.2, wf="chaos-debounce")]
    assert check(_observed(deb, early))["debounced_started_early"] == 1
    late = [_line("start", "w1", 10.31, wf="chaos-debounce")]
    assert check(_observed(deb, late))["debounced_started_early"] == 0


@pytest.mark.timeout(900)  # a minute of faults, then the settling (the default is 120 s)
def test_a_minute_of_chaos_on_one_server_keeps_every_promise() -> None:
    cmd = [sys.executable, "-m", "chaos", "--duration", "60", "--seed", "20261130",
           "--lease", "3", "--long", "7", "--fault-every", "1", "--settle", "400"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600,
                         preexec_fn=die_with_parent)  # fmt: skip
    lines = [x for x in out.stdout.decode().splitlines() if x.startswith("CHAOS ")]
    assert lines, out.stderr.decode()[-3000:]
    verdict = orjson.loads(lines[-1][len("CHAOS ") :])
    print(lines[-1])
    assert verdict["events_published"] > 1000
    assert verdict["runs"] == verdict["runs_expected"]
    kinds = ("ingress", "admission", "executor")
    made = {*verdict["faults"]}
    assert {f"sigkill_{k}" for k in kinds} | {f"sigterm_{k}" for k in kinds} <= made
    assert {"sigstop_admission", "server_crash"} <= made
    assert verdict["ok"], verdict
    assert out.returncode == 0
