"""docs/grafana-dashboard.json: valid JSON whose queries name exactly the metrics /metrics exports."""

from __future__ import annotations

import json
import re

import asyncnode
from tests.conftest import ROOT

#: Every metric family metrics_text exports (a histogram's series end in _bucket, _sum and _count).
FAMILIES = {
    "asyncnode_tasks_total",
    "asyncnode_tasks_submitted_total",
    "asyncnode_task_duration_seconds",
    "asyncnode_task_wait_seconds",
    "asyncnode_queue_tasks",
    "asyncnode_queue_paused",
    "asyncnode_workers",
    "asyncnode_schedule_last_run_timestamp_seconds",
}


def test_the_exposition_has_exactly_the_families_the_dashboard_knows() -> None:
    text = asyncnode.metrics_text({}, [{"name": "default", "ready": 0, "paused": False}], ("t.dlq", 0), [], [])
    typed = set(re.findall(r"^# TYPE (\S+) (\S+)$", text.decode(), re.M))
    assert {name for name, _ in typed} == FAMILIES


def test_every_query_names_only_exported_metrics_and_uses_each() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"asyncnode_[a-z_]+", e)}
    assert used == FAMILIES
