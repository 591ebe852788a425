"""The dev console's ordering of what happened to runs, from their records' timestamps."""

from __future__ import annotations

from pathlib import Path

import pytest

from supersede.protocol import RunRecord, RunState
from supersede.services.dev import Transition, transitions

PUBLISHED = 1_700_000_000_000
SEQ = f"{PUBLISHED:016x}0000000000000001"  # published at this epoch ms


def _record(rid: str, **rec: object) -> RunRecord:
    return RunRecord.from_map(rid, {"w": "chat", "k": "ada", "s": SEQ, "t0": PUBLISHED, **rec})


def _texts(lines: list[Transition]) -> list[str]:
    return [t.text.split(None, 3)[3] for t in sorted(lines)]


def test_a_cancel_decided_in_the_ms_its_successor_started_is_printed_first() -> None:
    # both server µs after the publish: decided at 920.6 ms, the successor claimed at 920.9
    old = _record("1-old", st=RunState.CANCELLED.value, pc=100_000, px=920_600,
                  t3=PUBLISHED + 921, by="1-new")  # fmt: skip
    new = _record("1-new", st=RunState.RUNNING.value, pc=920_900)
    lines = transitions(new, RunState.ASSIGNED) + transitions(old, RunState.RUNNING)
    cancel = "cancelled while running: superseded by 1-new (its run ended 0 ms later)"
    assert _texts(lines) == [cancel, "started"]


def test_a_run_claimed_and_ended_within_one_ms_prints_its_start_first() -> None:
    cancelled = _record("1-a", st=RunState.CANCELLED.value, pc=920_300, px=920_600,
                        t3=PUBLISHED + 920, by="1-b")  # fmt: skip
    assert _texts(transitions(cancelled, RunState.ASSIGNED)) == [
        "started", "cancelled while running: superseded by 1-b (its run ended 0 ms later)"
    ]  # fmt: skip
    # (the end is whole ms, 920, before the claim's 920.3)
    done = _record("1-c", st=RunState.SUCCEEDED.value, pc=920_300, t3=PUBLISHED + 920)
    assert _texts(transitions(done, RunState.ASSIGNED)) == ["started", "succeeded"]


def test_a_handler_ended_within_the_ms_of_its_cancel_never_shows_a_negative_delay() -> None:
    # ended at 920 ms (whole), decided at 920.6 ms: rounding alone would say -1 ms
    run = _record("1-a", st=RunState.CANCELLED.value, pc=100_000, px=920_600,
                  t3=PUBLISHED + 920, by="1-b")  # fmt: skip
    (line,) = transitions(run, RunState.CANCELLING)
    assert line.text.endswith("its run ended, 0 ms after the cancel")


def test_a_new_run_of_a_debounced_workflow_is_said_to_wait_out_its_window() -> None:
    waiting = _record("1-d", st=RunState.QUEUED.value)
    assert _texts(transitions(waiting, None, debounced=True)) == [
        "queued: waiting out its debounce window"
    ]
    assert _texts(transitions(waiting, None)) == ["queued: its key is full"]
    # first seen already cancelled, never started: its queued line comes first (a probe saw
    # 261 of 351 autosave runs "cancelled while queued" with no line before)
    gone = _record("1-e", st=RunState.CANCELLED.value, t3=PUBLISHED + 300, by="1-f")
    assert _texts(transitions(gone, None, debounced=True)) == [
        "queued: waiting out its debounce window", "cancelled while queued: superseded by 1-f"
    ]  # fmt: skip


def test_the_redis_cli_line_reaches_any_server_url(tmp_path: Path) -> None:
    """The publishing line `dev` prints, run by a shell: redis-cli reads no URL query and no
    cluster scheme, so the shell cuts them from SUPERSEDE_REDIS_URL and they become flags (a
    db in the query too: the event went to db 0), nor an empty user name as redis-py does."""
    import subprocess

    from supersede.services.dev import redis_cli

    fake = tmp_path / "redis-cli"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    cases = {
        "redis://:pw@h:5/0": ["-u", "redis://default:pw@h:5/0"],  # (redis-cli: user "")
        "redis://u:pw@h:5/0": ["-u", "redis://u:pw@h:5/0"],
        "rediss://:pw@h:5/0?db=3": ["-u", "rediss://default:pw@h:5/0", "-n", "3"],
        "redis://h:5/0?db=2": ["-u", "redis://h:5/0", "-n", "2"],
        "rediss://u:p@h:6/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none": [
            "-u", "rediss://u:p@h:6/0", "--cacert", "/ca.pem", "--insecure"
        ],
        "redis+cluster://u:p@h:7000": ["-u", "redis://u:p@h:7000", "-c"],
        "rediss+cluster://h:7000?ssl_certfile=/c.pem": [
            "-u", "rediss://h:7000", "-c", "--cert", "/c.pem"
        ],
    }  # fmt: skip
    for url, args in cases.items():
        line = redis_cli(str(fake), url)
        assert "pw" not in line and "u:p" not in line  # (the password stays in the variable)
        env = {"SUPERSEDE_REDIS_URL": url, "PATH": "/usr/bin:/bin"}
        for shell in ("bash", "sh"):
            done = subprocess.run([shell, "-c", line], env=env, capture_output=True, text=True,
                                  check=True)  # fmt: skip
            assert done.stdout.splitlines() == args, (url, shell, done.stdout)


def test_a_signal_that_comes_while_a_finalizer_runs_is_raised_again_after_it() -> None:
    """An exception raised inside a `__del__` is printed and dropped: a Ctrl-C that came while
    the garbage collector closed a connection pool (dev importing a slow module, under load)
    was lost, and dev went on importing for a minute. Raised again once the finalizer
    returned, as the signal it was."""
    import signal
    import sys
    import time

    from supersede.services import dev

    class Dropped:
        def __del__(self) -> None:
            dev._interrupt(signal.SIGINT, sys._getframe())

    try:
        with pytest.raises(dev.Interrupted) as caught:
            Dropped()  # (deleted at once: its finalizer runs the handler)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                time.sleep(0.01)
        assert caught.value.signum == signal.SIGINT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_a_stop_that_says_why_it_waits_to_a_reader_gone_still_stops_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`supersede dev 2>&1 | head -4`: the stop's "waits for" line met a closed pipe, and its
    BrokenPipeError skipped the other services' waits and the logs' removal (a newcomer probe:
    /tmp/supersede-dev-* left behind)."""
    import os
    import subprocess
    import sys

    from supersede.config import Settings
    from supersede.services import dev

    class Gone:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    children = dev.Children(Settings(redis_url="redis://127.0.0.1:1", namespace="t", shards=1))
    slow = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(1.5)")  # fmt: skip
    children.procs = [subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE)
                      for _ in range(2)]  # fmt: skip
    for proc in children.procs:  # (SIGTERM ignored from here)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    monkeypatch.setattr(dev, "SAY_STOPPING_AFTER", 0.1)
    monkeypatch.setattr(sys, "stderr", Gone())
    children.stop(keep_logs=False)
    for proc in children.procs:
        assert proc.poll() is not None and proc.stdout is not None
        proc.stdout.close()
    assert not os.path.exists(children.logs)
