"""The habits CI enforces: lint runs before the tests and fails the run; pre-commit runs the
same tools as `make lint`."""

from __future__ import annotations

import yaml

from tests.support import REPO


def test_ci_lints_then_tests_and_stops_on_a_failure() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    lines = [line.strip() for line in script.splitlines()]
    assert lines.index("make lint") < lines.index("make test")


def test_pre_commit_runs_what_make_lint_runs() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    entries = [hook["entry"] for repo in config["repos"] for hook in repo["hooks"]]
    assert any("ruff format --check" in e for e in entries)
    assert any(e.endswith("ruff check") for e in entries)
    assert "make lint-types" in entries
    makefile = (REPO / "Makefile").read_text()
    assert "lint-types:" in makefile and "mypy" in makefile.split("lint-types:", 1)[1]
