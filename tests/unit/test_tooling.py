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


def test_measured_figures_appear_only_in_the_dated_benchmark_table() -> None:
    """Issue 15: the README once gave the cancel p99 as '5-8 ms' in one place and 1.6-1.7 ms in
    its table. Measurements (rates, CPU, memory sizes, percentiles) live only in the table
    under "Benchmarks", which says when they were taken; the prose points at its rows. Sizing
    examples (an assumed rate and what it implies) are allowed by name."""
    import re

    text = (REPO / "README.md").read_text()
    body, table = text.split("\n## Benchmarks\n")
    assert re.search(r"\| value \(\d{4}-\d\d-\d\d\)", table)
    allowed = ("1,000 runs/s of one", "under 400 MB")
    figure = r"\b\d[\d.,\u2013]*\s?(µs|runs/s|requests/s|events/s|cancels/s|MB|GB)\b|p99 \d"
    found = [
        line
        for line in body.splitlines()
        if re.search(figure, line) and not any(a in line for a in allowed)
    ]
    assert found == []


def test_every_benchmark_module_answers_help_without_running() -> None:
    """`python -m bench.executor --help` started the benchmark (minutes of CPU, a newcomer
    probe): each module prints what it measures and exits."""
    import subprocess
    import sys

    from tests.support import REPO

    libraries = {"__init__", "apps", "common", "isolated_apps", "saq_app"}  # (no entry point)
    names = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem not in libraries)
    modules = ["bench" if name == "__main__" else f"bench.{name}" for name in names]
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for m in modules}  # fmt: skip
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith(b"usage:"), (module, out, err)
