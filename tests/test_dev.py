"""`supersede dev`: the one-command demo on an embedded server, ending cleanly."""

from __future__ import annotations

import os
import subprocess
import sys


def _children_alive() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "services.cli --log-level WARNING"], capture_output=True)
    return [line for line in out.stdout.decode().splitlines() if "pgrep" not in line]


def test_dev_runs_the_demo_on_an_embedded_server_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "dev", "--duration", "5"],
        env=env, capture_output=True, timeout=90,
    )  # fmt: skip
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "supersede dev: Redis at redis://127.0.0.1:" in out
    assert "succeeded" in out and "superseded by" in out  # CANCEL_IN_PROGRESS at work
    assert "summary (runs by workflow and final state):" in out
    assert _children_alive() == []
