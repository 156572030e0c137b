"""The Grafana dashboard (grafana/postback-relay.json) queries only what the relay exports.

A dashboard whose query names a metric the relay does not have draws an empty panel, with
no error anywhere: the kind of mistake found only on the night it was needed. So every
PromQL expression in the dashboard is read here, its metric names picked out, and each is
checked against the names `/metrics` produces (worker/metrics.py's families, built from
readings of a relay that has counted something).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from producer.queue import QueueDepth
from worker.metrics import LedgerReading, RedisReading, families

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "postback-relay.json"

_STRINGS = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w$.])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>[^,]+),)?\s*\w+\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every word but the functions (a word
    before `(`), the keywords, label names and values, ranges, numbers and Grafana's `$`
    variables."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {
        word.group()
        for word in _WORD.finditer(text)
        if word.group().lower() not in _KEYWORDS and not text[word.end() :].lstrip().startswith("(")
    }


def variable_metric_names(query: str) -> set[str]:
    """The metric names of a template variable's `label_values([METRIC,] LABEL)` query."""
    match = _LABEL_VALUES.match(query)
    assert match is not None, f"not a label_values query: {query!r}"
    return metric_names(match["metric"] or "")


def exported() -> set[str]:
    """Every sample name `/metrics` serves when both sources answer (an affiliate has
    failed, so the per-affiliate counter has a sample too)."""
    redis = RedisReading(counters={}, failures={"ann": 1.0}, queue=QueueDepth(0, 0))
    return {
        sample.name for family in families(redis, LedgerReading({})) for sample in family.samples
    }


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def queried(board: dict[str, Any]) -> set[str]:
    names = set().union(*map(metric_names, expressions(board)))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            names |= variable_metric_names(variable["query"]["query"])
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('max(postback_dead_letters{job="$job"})', {"postback_dead_letters"}),
        (
            "histogram_quantile(0.95, max by (le) "
            '(rate(postback_attempt_duration_seconds_bucket{job="$job"}[$__rate_interval])))',
            {"postback_attempt_duration_seconds_bucket"},
        ),
        (
            "max(rate(a_sum[5m])) / max(rate(a_count[5m])) > bool 1e3",
            {"a_sum", "a_count"},
        ),
        ("topk(10, sum without (instance) (x_total)) offset 1h", {"x_total"}),
        ('a and on (job) b{l="max(c)"} unless ignoring (x) d', {"a", "b", "d"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_metric_the_dashboard_queries_is_one_the_relay_exports() -> None:
    board = dashboard()
    names = queried(board)
    assert "postback_attempt_duration_seconds_bucket" in names  # the reading works
    unknown = names - exported()
    assert not unknown, f"the dashboard queries metrics /metrics does not serve: {unknown}"


def test_every_metric_the_relay_exports_is_on_the_dashboard() -> None:
    """A metric added to worker/metrics.py gets a panel (or a query in one)."""
    missing = exported() - queried(dashboard())
    assert not missing, f"add a panel to {DASHBOARD.name} for {sorted(missing)}"


def test_the_dashboard_has_the_panels_of_the_runbook() -> None:
    titles = {panel["title"] for panel in dashboard()["panels"]}
    assert {
        "Dead letters",
        "Queue depth",
        "Deliveries settled, by outcome",
        "Failed attempts, by affiliate (top 10)",
        "Attempt duration",
        "Circuits",
    } <= titles


def test_the_dashboard_is_one_grafana_can_import() -> None:
    """Ids Grafana keys panels and queries by are unique, and every query uses the data
    source chosen in the dashboard's `datasource` variable."""
    board = dashboard()
    assert board["uid"] == "postback-relay"
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels:
        assert panel["datasource"] == chosen, panel["title"]
        assert 0 <= panel["gridPos"]["x"] < panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        refs = [target["refId"] for target in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == chosen, panel["title"]
            for pair in ("()", "[]", "{}"):
                assert target["expr"].count(pair[0]) == target["expr"].count(pair[1])
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "$job" not in variables["job"]["query"]["query"]
