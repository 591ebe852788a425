"""The README's metrics catalogue lists exactly what the three services expose."""

from __future__ import annotations

import re

from tests.support import REPO, exposed

README = REPO / "README.md"
ROW = re.compile(r"^\| `(supersede_[a-z_]+)` \| (counter|gauge|histogram) \|", re.MULTILINE)


def test_the_catalogue_matches_the_exposition() -> None:
    documented = dict(ROW.findall(README.read_text()))
    assert documented == exposed()


def test_metric_names_follow_the_conventions() -> None:
    for name, kind in exposed().items():
        assert name.startswith("supersede_")
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
