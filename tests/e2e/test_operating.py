"""Operating a deployment, with real API and worker processes on both backends: /metrics after known work
(values, access, a restart of the API), JSON logs (every line, the task's fields, no secrets, nothing per task at
INFO), and trace context (the traceparent kept and carried; the submit and run spans in the in-memory exporter)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import asyncnode
from tests.conftest import ROOT, Proc, cleanup, wait_for, wait_healthy, write_config
from tests.e2e.test_queues import Api, start_workers, wait_log

TOKEN, READ, SCRAPE = "operator-secret-token", "read-secret-token", "scrape-secret-token"
HANDLERS = {"modules": ["handlers", "tests.fault_handlers"]}
#: A W3C traceparent the tests submit with: its trace id and the caller's span id.
TRACE, CALLER = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{CALLER}-01"


class Stack:
    """An API and a worker on one config, and a session with the operator token."""

    def __init__(self, procs: Callable[..., Proc], path: Path, session: aiohttp.ClientSession) -> None:
        self.procs, self.path, self.session = procs, path, session
        self.cfg = asyncnode.Config.from_toml(path, env={})
        self.base = f"http://127.0.0.1:{self.cfg.api.port}"
        self.api: Proc | None = None
        self.worker: Proc | None = None

    async def start_api(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> Api:
        self.api = self.procs("api", self.path, env=env, args=args)
        await wait_healthy(self.base, self.api)
        return Api(self.session, self.base, self.api)

    async def start_worker(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> Proc:
        self.worker = (
            await start_workers(self.procs, self.path, 1, args) if env is None else [self._worker(env, args)]
        )[0]
        return self.worker

    def _worker(self, env: dict[str, str], args: list[str] | None) -> Proc:
        return self.procs("worker", self.path, env=env, args=args)

    async def submit(self, body: dict[str, Any], **headers: str) -> str:
        async with self.session.post(f"{self.base}/api/tasks", json=body, headers=headers) as r:
            assert r.status == 202, await r.text()
            return str((await r.json())["id"])

    async def scrape(self, token: str | None = SCRAPE) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as bare,  # not the operator's headers
            bare.get(f"{self.base}/metrics", headers=headers) as r,
        ):
            return r.status, await r.text()


@pytest.fixture
async def stack(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> AsyncIterator[Callable[..., Stack]]:
    session = aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=30)
    )

    def make(**sections: Any) -> Stack:
        sections = {
            "handlers": HANDLERS,
            "api": {"token": TOKEN, "read_token": READ, "metrics_token": SCRAPE},
        } | sections
        return Stack(procs, write_config(tmp_path / "config.toml", tag, backend=backend, **sections), session)

    yield make
    await session.close()
    await cleanup(tag)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed by prometheus_client: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def test_metrics_count_known_work_and_survive_an_api_restart(stack: Callable[..., Stack], tmp_path: Path) -> None:
    s = stack(broker={"max_retries": 1, "retry_delays": [0.2]})
    api = await s.start_api()
    await s.start_worker()
    done = [await s.submit({"type": "reverse", "payload": {"text": f"t{i}"}}) for i in range(3)]
    failed = await s.submit({"type": "fail", "payload": {"permanent": True}})
    retried = await s.submit({"type": "fail_first", "payload": {"marker": str(tmp_path / "again")}})
    held = await s.submit({"type": "sleep", "payload": {"seconds": 1}, "delay": 600})
    async with s.session.post(f"{s.base}/api/tasks/{held}/cancel") as r:
        assert r.status == 200, await r.text()
    await api.wait_status([*done, retried], "completed")
    await api.wait_status([failed], "failed")

    status, text = await s.scrape()
    assert status == 200
    found = samples(text)
    q = {"queue": "default"}
    assert value(found, "asyncnode_tasks_total", type="reverse", status="completed", **q) == 3
    assert value(found, "asyncnode_tasks_total", type="fail", status="failed", **q) == 1
    assert value(found, "asyncnode_tasks_total", type="fail_first", status="retrying", **q) == 1
    assert value(found, "asyncnode_tasks_total", type="fail_first", status="completed", **q) == 1
    assert value(found, "asyncnode_tasks_total", type="sleep", status="cancelled", **q) == 1
    for ttype, n in (("reverse", 3), ("fail", 1), ("fail_first", 1), ("sleep", 1)):
        assert value(found, "asyncnode_tasks_submitted_total", type=ttype, **q) == n
    assert value(found, "asyncnode_task_duration_seconds_count", type="reverse", **q) == 3
    assert value(found, "asyncnode_task_duration_seconds_count", type="fail_first", **q) == 1
    bounds = [*(f"{b:g}" for b in asyncnode.METRIC_BUCKETS), "+Inf"]
    buckets = [value(found, "asyncnode_task_duration_seconds_bucket", type="reverse", le=le, **q) for le in bounds]
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative, all three at or under +Inf
    assert buckets[bounds.index("1")] == 3  # a reverse takes far under a second
    assert 0 <= (value(found, "asyncnode_task_duration_seconds_sum", type="reverse", **q) or -1) < 3
    # Each task that started counts its wait once: the retry's second start does not, the cancelled one never ran.
    assert value(found, "asyncnode_task_wait_seconds_count", **q) == 5
    assert value(found, "asyncnode_queue_tasks", state="scheduled", **q) == 0
    assert value(found, "asyncnode_queue_tasks", queue=f"{s.cfg.broker.queue}.dlq", state="dead") == 1
    assert value(found, "asyncnode_queue_paused", **q) == 0
    workers = {k: v for k, v in found.items() if k[0] == "asyncnode_workers"}
    assert sum(workers.values()) == 1, workers
    await api.pause("default")
    assert value(samples((await s.scrape())[1]), "asyncnode_queue_paused", **q) == 1

    counters = {k: v for k, v in found.items() if k[0].endswith(("_total", "_count", "_bucket", "_sum"))}
    assert s.api is not None
    s.api.stop()
    await s.start_api()
    again = samples((await s.scrape(READ))[1])
    assert {k: again.get(k) for k in counters} == counters


async def test_metrics_need_a_token_and_take_the_operator_read_or_metrics_token(stack: Callable[..., Stack]) -> None:
    s = stack()
    await s.start_api()
    assert (await s.scrape(None))[0] == 401
    assert (await s.scrape("wrong"))[0] == 401
    for token in (TOKEN, READ, SCRAPE):
        status, text = await s.scrape(token)
        assert status == 200 and "asyncnode_queue_paused" in text
    async with s.session.get(f"{s.base}/api/queues", headers={"Authorization": f"Bearer {SCRAPE}"}) as r:
        assert r.status == 401  # the metrics token reads /metrics only


async def test_a_schedules_last_run_is_exported(stack: Callable[..., Stack]) -> None:
    s = stack(schedules={"tick": {"type": "noop", "every": 1}})
    await s.start_api()
    start = time.time()

    async def ran() -> float | None:
        return value(samples((await s.scrape())[1]), "asyncnode_schedule_last_run_timestamp_seconds", schedule="tick")

    at = await wait_for(ran, 15, "the schedule's last run in /metrics")
    assert start - 1 <= at <= time.time()


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed as JSON (a line that is not fails the test)."""
    lines = [line for line in proc.log().splitlines() if line.strip()]
    assert lines, f"{proc.role} wrote nothing"
    parsed = []
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "pid", "msg"} <= set(entry), line
        assert datetime.fromisoformat(entry["ts"]).tzinfo is not None, line
        assert entry["pid"] == proc.pid, line
        parsed.append(entry)
    return parsed


async def test_json_logs_carry_the_task_and_no_secret(stack: Callable[..., Stack]) -> None:
    s = stack(logging={"format": "json"})  # the worker from config.toml, the API from --log-format
    api = await s.start_api(args=["--log-format", "json"])
    worker = await s.start_worker()
    ok = await s.submit({"type": "reverse", "payload": {"text": "json"}}, traceparent=TRACEPARENT)
    bad = await s.submit({"type": "fail", "payload": {"permanent": True}})
    await api.wait_status([ok], "completed")
    await api.wait_status([bad], "failed")
    assert s.api is not None
    s.api.stop()
    worker.stop()
    every = json_lines(s.api) + json_lines(worker)
    text = s.api.log() + worker.log()
    for secret in (TOKEN, READ, SCRAPE, ":guest@"):
        assert secret not in text
    mine = [e for e in json_lines(worker) if e.get("task_id") == ok]
    assert mine and all(e["type"] == "reverse" and e["queue"] == "default" and e["trace_id"] == TRACE for e in mine), (
        mine
    )
    assert [e["level"] for e in mine if "completed" in e["msg"]] == ["DEBUG"]
    assert all(e.get("attempt") == 1 for e in mine if "completed" in e["msg"])
    failures = [e for e in json_lines(worker) if e.get("task_id") == bad and e["level"] == "WARNING"]
    assert len(failures) == 1 and bad in failures[0]["msg"] and failures[0]["attempt"] == 1
    assert {e["level"] for e in every} <= {"DEBUG", "INFO", "WARNING", "ERROR"}


async def test_at_info_a_worker_writes_no_line_per_task_and_text_is_the_default(stack: Callable[..., Stack]) -> None:
    s = stack()
    api = await s.start_api()
    worker = await s.start_worker(args=["--log-level", "INFO"])
    ids = [await s.submit({"type": "reverse", "payload": {"text": f"{i}"}}) for i in range(20)]
    await api.wait_status(ids, "completed")
    worker.stop()
    lines = worker.log().splitlines()
    assert not [line for line in lines if any(tid in line for tid in ids)]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


async def spans(folder: Path, *names: str) -> list[dict[str, Any]]:
    """The spans the processes wrote to ``folder``, once every one of ``names`` is there."""

    async def written() -> list[dict[str, Any]] | None:
        found = [json.loads(line) for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()]
        return found if all(any(s["name"] == n for s in found) for n in names) else None

    return list(await wait_for(written, 15, f"spans {names}"))


async def test_a_traceparent_is_kept_and_the_run_span_is_a_child_of_the_submit_span(
    stack: Callable[..., Stack], tmp_path: Path
) -> None:
    folder = tmp_path / "spans"
    folder.mkdir()
    env = {"ASYNCNODE_TEST_SPANS": str(folder), "OTEL_TRACES_EXPORTER": "none"}
    s = stack(handlers={"modules": ["handlers", "tests.otel_handlers"]})
    api = await s.start_api(env=env)
    await s.start_worker(env=env)
    tid = await s.submit({"type": "traced", "payload": {}}, traceparent=TRACEPARENT)
    await api.wait_status([tid], "completed")
    record = await api.task(tid)
    assert record["traceparent"].startswith(f"00-{TRACE}-") and record["traceparent"] != TRACEPARENT
    found = await spans(folder, "submit", "run traced", "inside")
    by_name = {sp["name"]: sp for sp in found}
    submit, run, inside = by_name["submit"], by_name["run traced"], by_name["inside"]
    assert {sp["trace_id"] for sp in (submit, run, inside)} == {TRACE}
    assert submit["parent"] == CALLER and submit["kind"] == "PRODUCER"
    assert record["traceparent"].split("-")[2] == submit["span_id"]
    assert run["parent"] == submit["span_id"] and run["kind"] == "CONSUMER"
    assert run["attributes"]["asyncnode.task.id"] == tid
    assert run["attributes"]["asyncnode.task.attempt"] == 1
    assert run["attributes"]["asyncnode.task.status"] == "completed"
    assert inside["parent"] == run["span_id"]


async def test_an_invalid_traceparent_is_ignored_and_starts_no_trace(stack: Callable[..., Stack]) -> None:
    s = stack()
    api = await s.start_api()
    tid = await s.submit(
        {"type": "reverse", "payload": {"text": "x"}}, traceparent="00-" + "0" * 32 + "-" + "1" * 16 + "-01"
    )
    assert "traceparent" not in await api.task(tid)


#: A sitecustomize that makes OpenTelemetry not installed, in the processes given its folder on PYTHONPATH.
NOT_INSTALLED = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


async def test_without_opentelemetry_installed_tasks_run_and_nothing_of_it_loads(
    stack: Callable[..., Stack], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOT_INSTALLED)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OTEL_TRACES_EXPORTER": "otlp"}  # asked for, yet not there
    s = stack()
    api = await s.start_api(env=env)
    worker = await s.start_worker(env=env)
    await wait_log(worker, "consuming")
    tid = await s.submit({"type": "has_module", "payload": {"name": "opentelemetry"}}, traceparent=TRACEPARENT)
    await api.wait_status([tid], "completed")
    record = await api.task(tid)
    assert record["result"] is False and record["traceparent"] == TRACEPARENT  # the context is still carried
    assert "OpenTelemetry is not installed" in worker.log()
