"""The shipped monitoring: the Grafana dashboard and the Prometheus alert rules name only
metrics (and labels) this gateway exposes, read counters only through rate()/increase()
and gauges never through them; promtool accepts the rules and lints the exposition.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gatewayd import metrics

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "gatewayd-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gatewayd-dashboard.json"

# Series Prometheus itself adds for every target, and the labels of every target.
PROMETHEUS_SERIES = {"up": {"instance", "job"}}
TARGET_LABELS = {"instance", "job"}
COUNTER_FUNCTIONS = {"rate", "irate", "increase"}
GAUGE_FUNCTIONS = {"delta", "deriv", "idelta", "predict_linear"}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def exposed() -> tuple[dict[str, set[str]], dict[str, str]]:
    """Sample name -> its label names, and sample name -> family type, from the real
    registry with one transport declared (as a running gateway has)."""
    metrics.declare_transports(["web"])
    metrics.set_breaker("northbound", "closed")
    metrics.CREDENTIAL_DAYS_LEFT.labels(credentials="northbound")
    metrics.CREDENTIAL_NOT_AFTER.labels(credentials="northbound")
    labels: dict[str, set[str]] = {k: set(v) for k, v in PROMETHEUS_SERIES.items()}
    types: dict[str, str] = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            types[sample.name] = family.type
    return labels, types


def selectors(expr: str) -> list[tuple[str, set[str], str | None]]:
    """(metric name, label names in its selector, the function applied to it directly)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and format strings
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    found = []
    pattern = r"(?:(\w+)\s*\(\s*)?\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b\s*(\{[^}]*\})?(?!\s*\()"
    for match in re.finditer(pattern, expr):
        func, name, selector = match.groups()
        if name in KEYWORDS or name.startswith("__") or re.fullmatch(r"\d.*|e|Inf|NaN", name):
            continue
        label_names = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector or ""))
        found.append((name, label_names, func))
    return found


def check_expr(expr: str, labels: dict[str, set[str]], types: dict[str, str]) -> list[str]:
    problems = []
    names = selectors(expr)
    assert names, f"no metric found in {expr!r}"
    for name, used, func in names:
        if name not in labels:
            problems.append(f"{name} is not exposed ({expr})")
            continue
        unknown = used - labels[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{name} has no label {sorted(unknown)} ({expr})")
        kind = types.get(name)
        if func in COUNTER_FUNCTIONS and kind not in ("counter", "histogram"):
            problems.append(f"{func}() on {name}, a {kind} ({expr})")
        if func in GAUGE_FUNCTIONS and kind in ("counter", "histogram"):
            problems.append(f"{func}() on {name}, a {kind}: use rate()/increase() ({expr})")
    return problems


def alert_exprs() -> list[str]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in data["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


def test_checker_catches_what_it_is_for() -> None:
    labels, types = exposed()
    assert check_expr('increase(gatewayd_store_dead{queue="uplink"}[1h]) > 0', labels, types)
    assert check_expr("gatewayd_no_such_metric > 0", labels, types)
    assert check_expr('gatewayd_store_backlog{qeueu="uplink"} > 0', labels, types)
    assert check_expr("delta(gatewayd_messages_total[5m]) > 0", labels, types)
    assert not check_expr(
        'sum by (direction) (rate(gatewayd_messages_total{outcome="received"}[5m]))',
        labels,
        types,
    )


def test_alert_rules_name_only_exposed_metrics() -> None:
    labels, types = exposed()
    exprs = alert_exprs()
    assert len(exprs) >= 10
    problems = [p for expr in exprs for p in check_expr(expr, labels, types)]
    assert problems == []


def test_dashboard_names_only_exposed_metrics() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] == "gatewayd-overview"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"  # no site-specific UID
    labels, types = exposed()
    problems = [p for expr in dashboard_exprs() for p in check_expr(expr, labels, types)]
    assert problems == []


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian: apt install prometheus); the parse checks above ran",
)
def test_promtool_accepts_rules_and_exposition() -> None:
    rules = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    metrics.declare_transports(["web"])
    text = asyncio.run(metrics.render())
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    # One known finding: gatewayd_credential_days_left predates this lint and keeps its
    # name for the dashboards and alerts built on it (not_after_seconds is the SI twin).
    known = 'gatewayd_credential_days_left use base unit "seconds" instead of "days"'
    findings = [
        line
        for line in (lint.stdout + lint.stderr).decode().splitlines()
        if line.strip() and line.strip() != known
    ]
    assert findings == []
