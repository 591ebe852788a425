"""The dev console's ordering of what happened to runs, from their records' timestamps."""

from __future__ import annotations

from supersede.protocol import RunRecord, RunState
from supersede.services.dev import transitions

SEQ = f"{1_700_000_000_000:016x}0000000000000001"  # published at this epoch ms


def _record(rid: str, **rec: object) -> RunRecord:
    return RunRecord.from_map(
        rid, {"w": "chat", "k": "ada", "s": SEQ, "t0": 1_700_000_000_000, **rec}
    )


def test_a_cancel_decided_in_the_ms_its_successor_started_is_printed_first() -> None:
    # the decision is timed in µs (920.6 ms after publish), the successor's claim in whole ms
    # (920): the cancel made room for the start, so it comes first in the console
    old = _record("1-old", st=RunState.CANCELLED.value, t2=1_700_000_000_100, px=920_600,
                  t3=1_700_000_000_921, by="1-new")  # fmt: skip
    new = _record("1-new", st=RunState.RUNNING.value, t2=1_700_000_000_920)
    lines = sorted(transitions(new, RunState.ASSIGNED) + transitions(old, RunState.RUNNING))
    texts = [t.text.split(None, 3)[3] for t in lines]
    cancel = "cancelled while running: superseded by 1-new (its handler stopped 0 ms later)"
    assert texts == [cancel, "started"]


def test_a_handler_ended_within_the_ms_of_its_cancel_never_shows_a_negative_delay() -> None:
    # ended at 920 ms (whole), decided at 920.6 ms: rounding alone would say -1 ms
    run = _record("1-a", st=RunState.CANCELLED.value, t2=1_700_000_000_100, px=920_600,
                  t3=1_700_000_000_920, by="1-b")  # fmt: skip
    (line,) = transitions(run, RunState.CANCELLING)
    assert line.text.endswith("its handler stopped, 0 ms after the cancel")
