"""deploy/: the Grafana dashboard charts the metrics the proxy really exports, and the Prometheus
example scrapes where the proxy serves them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from proxy.audit.writer import AuditWriter
from proxy.metrics import Metrics
from proxy.routes import build_routes
from proxy.settings import DEFAULTS, load_settings

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
_METRIC_RE = re.compile(r"\bllama_gate_[a-z_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _exported(tmp_path: Path) -> dict[str, str]:
    """Every sample name the proxy's registry exports (as Prometheus sees it), and its type."""
    routes = build_routes(load_settings(environ={}, home=Path("/nonexistent")))
    metrics = Metrics(route.path for route in routes)
    metrics.watch_audit(AuditWriter(lambda: None, tmp_path))  # type: ignore[arg-type,return-value]
    names = {}
    for family in metrics.registry.collect():
        names[family.name] = family.type
        if family.type == "counter":
            names[family.name + "_total"] = family.type
        if family.type == "histogram":
            names.update({family.name + s: family.type for s in _HISTOGRAM_SUFFIXES})
    return names


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]


def test_every_panel_queries_metrics_the_proxy_exports(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    charted = set()
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = _METRIC_RE.findall(target["expr"])
            assert names, target["expr"]
            for name in names:
                assert name in exported, f"{panel['title']}: {name} is not exported"
                if exported[name] == "histogram":
                    assert name.endswith("_bucket")
                    assert "histogram_quantile" in target["expr"]
                if exported[name] == "counter":
                    assert re.search(rf"(rate|increase)\({name}", target["expr"]), target["expr"]
            charted |= {name.removesuffix("_bucket").removesuffix("_total") for name in names}
    families = {n.removesuffix("_total") for n in exported if not n.endswith(_HISTOGRAM_SUFFIXES)}
    assert families - charted == set(), "metrics no panel shows"


def test_the_dashboard_is_importable() -> None:
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    assert DASHBOARD["uid"] == "llama-gate"
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "llama_gate_requests_in_flight" in variables["instance"]["definition"]
    for panel in _panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_the_scrape_example_targets_the_default_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = job["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{DEFAULTS['LLAMA_PROXY_METRICS_PORT']}"]
