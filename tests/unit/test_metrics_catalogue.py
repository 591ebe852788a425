"""docs/metrics.md lists exactly the metrics the three services expose."""

from __future__ import annotations

import re

from tests.support import REPO, exposed

CATALOGUE = REPO / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(supersede_[a-z_]+)` \| (counter|gauge|histogram) \|", re.MULTILINE)


def test_the_catalogue_matches_the_exposition() -> None:
    documented = dict(ROW.findall(CATALOGUE.read_text()))
    assert documented == exposed()


def test_metric_names_follow_the_conventions() -> None:
    for name, kind in exposed().items():
        assert name.startswith("supersede_")
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
