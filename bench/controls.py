"""What the task controls (cancel, Idempotency-Key, delay) cost, on both backends: ``python bench/controls.py``.

Unused, before and after: the same workloads run with the code of the release before the controls (--commit,
checked out with ``git worktree add`` into a temporary folder, removed afterwards; its processes run there,
with that folder first on their path and this .venv's python) and with this working tree:
  - drain: bench/throughput.py's "workers alone" (as bench/limits.py's "default" case): N `noop` tasks recorded
    and queued through the code's own adapters (confirmed) with no worker running, then --workers (2) fresh
    worker processes with ``[worker] concurrency`` of each --concurrency (1, 8) drain them, timed from the first
    task's ``started_at`` to the last one's ``finished_at``. What the workers do now for every task even when
    nothing is cancelled or delayed: each async handler in a task of its own, a read of the tasks in hand's
    statuses every 0.5 s, a look for due delayed tasks every 0.25 s.
  - http: one API process and no worker; --clients concurrent connections (an aiohttp client in this process)
    post N `noop` tasks: requests per second over the first request's start to the last answer. What the API
    does now for every submission: the body's delay and run_at checked, no key claimed.
Used, with the working tree only:
  - http + Idempotency-Key: the same submissions, each with a fresh key (claimed, then settled, in the store),
    compared with the same API without keys.
  - e2e + delay: the API and --workers workers (the highest --concurrency) running; --clients connections
    post N `noop` tasks, with ``"delay": --delay`` or without, timed from the first request's start to the last
    ``finished_at``; with a delay every task is held (Redis: a sorted set and a hash; embedded: a message row
    with a future ``ready_at``) and promoted by a worker when due. Then --paced-rate tasks/s for --seconds on
    the idle deployment, for the lag of a delayed task that waits for nothing else. From the records:
    started_at - run_at with a delay, started_at - created_at without (the wait to start).
Each row is compared with its base ("before" for "after", "after" for the used controls) by the ratio of the
medians and the median of the ratios within each round. Trials are alternated round after round (within a
workload the order turns each round); N is sized from the base's best rate so far, the same for every trial of a
workload in a round. Each trial runs on its own ``[broker] queue`` and ``[redis] key_prefix`` (``benchctl-<hex>``)
or its own SQLite file, all removed afterwards (also when interrupted). Prints the machine, Markdown tables
(median, min-max) and the medians as JSON (--json PATH: every trial too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput
from throughput import (
    BACKENDS,
    ROOT,
    Proc,
    delete_keys,
    delete_queues,
    drain_timeout,
    embedded_supported,
    http_session,
    lanes,
    percentile,
    run_and_report,
    services_cpu,
    wait_for,
)

import asyncnode  # importable now: throughput put the project's folder on sys.path

Metrics = dict[str, Any]

#: The release before the task controls.
BEFORE_COMMIT = "96a3611"
#: Prefix of every queue and key a trial makes (its own, so that a leftover is easy to tell apart).
TAG_PREFIX = "benchctl-"
#: Bounds of a trial's N (tasks or requests).
MIN_ITEMS, MAX_ITEMS = 200, 50_000
#: First guesses of the base rates on 2 busy cores (tasks/s or requests/s), before a trial has measured one.
HINTS = {"drain": 900.0, "drain-c8": 2000.0, "http": 900.0, "e2e": 600.0}
#: What a preloading child runs: the code under test is its cwd (first on sys.path), so asyncnode is that code's;
#: throughput, imported after it, reuses that module and preloads exactly as its "workers alone" does.
PRELOAD = """
import asyncio, sys
import asyncnode
sys.path.insert(0, sys.argv[4])
import throughput
cfg = asyncnode.Config.from_toml(sys.argv[1], env={})
ids = asyncio.run(throughput.preload_asyncnode(cfg, int(sys.argv[2])))
open(sys.argv[3], "w").write("\\n".join(ids))
"""


def _tag() -> str:
    return f"{TAG_PREFIX}{uuid.uuid4().hex[:10]}"


# bench/throughput.py's Cluster names its queue and key prefix with new_tag(): ours carry their own prefix.
throughput.new_tag = _tag


# ============================================================================
# The code under test: this working tree, or a worktree of the release before
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Code:
    """A checkout whose asyncnode.py and handlers/ the trial's processes run."""

    key: str  # "before" or "after"
    path: Path
    label: str

    def env(self) -> dict[str, str]:
        """The children's environment: this checkout first on their path (before the editable install's finder,
        which only answers for what the path does not have)."""
        return throughput._child_env({"PYTHONPATH": str(self.path)})


#: Worktrees made and not removed yet, so that an interrupted run still removes them.
_WORKTREES: list[Path] = []


def _git(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)


def remove_worktrees() -> None:
    """Remove every worktree this run made (``git worktree remove``, then its folder): idempotent."""
    while _WORKTREES:
        path = _WORKTREES.pop()
        _git("worktree", "remove", "--force", str(path / "tree"))
        shutil.rmtree(path, ignore_errors=True)
        _git("worktree", "prune")


@contextlib.contextmanager
def release_before(commit: str) -> Iterator[Code]:
    """A worktree of ``commit`` in a temporary folder, byte-compiled as ``make install`` does; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"asyncnode-{commit}-"))
    _WORKTREES.append(path)
    try:
        tree = path / "tree"
        done = _git("worktree", "add", "--detach", str(tree), commit)
        if done.returncode != 0:
            raise RuntimeError(f"git worktree add {commit}: {done.stderr.strip()}")
        subject = _git("log", "-1", "--format=%h %s", commit).stdout.strip()
        code = Code("before", tree, f"{subject}")
        py = [sys.executable, "-c", "import asyncnode, handlers; print(asyncnode.__file__, handlers.__file__)"]
        subprocess.run([sys.executable, "-m", "compileall", "-q", "asyncnode.py", "handlers"], cwd=tree, check=True)
        seen = subprocess.run(py, cwd=tree, env=code.env(), capture_output=True, text=True, check=True).stdout
        if any(not Path(p).resolve().is_relative_to(tree.resolve()) for p in seen.split()):
            raise RuntimeError(f"the worktree's processes would not run its own code: {seen.strip()}")
        yield code
    finally:
        remove_worktrees()


def tree_digest() -> str:
    """The first 12 hex digits of the SHA-256 of this tree's asyncnode.py (it may change while the run goes on)."""
    return hashlib.sha256((ROOT / "asyncnode.py").read_bytes()).hexdigest()[:12]


# ============================================================================
# Backends: cleanup of every queue and key, the tasks' records
# ============================================================================


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


#: The fields of a task's record the figures use.
RECORD_FIELDS = ("created_at", "run_at", "started_at", "finished_at")


class RabbitAll(throughput.RabbitBackend):
    """RabbitMQ and Redis, deleting every queue the config declares (work, retry, DLQ) and every key of the prefix
    (the held delayed tasks and the idempotency keys too)."""

    async def cleanup(self, cfg: asyncnode.Config) -> None:
        await delete_queues(asyncnode.broker_queues(cfg))
        await delete_keys(cfg.redis.key_prefix, cfg.redis.url)

    async def records(self, cfg: asyncnode.Config, ids: list[str]) -> list[dict[str, float | None]]:
        """The RECORD_FIELDS of tasks ``ids``."""
        client = aioredis.from_url(cfg.redis.url, decode_responses=True)
        try:
            rows: list[Any] = []
            for i in range(0, len(ids), 5000):
                async with client.pipeline(transaction=False) as pipe:
                    for tid in ids[i : i + 5000]:
                        pipe.hmget(cfg.redis.key_prefix + tid, *RECORD_FIELDS)
                    rows += await pipe.execute()
        finally:
            await client.aclose()
        return [dict(zip(RECORD_FIELDS, map(_number, row), strict=True)) for row in rows]


class EmbeddedAll(throughput.EmbeddedBackend):
    """The SQLite file (in the trial's folder, removed with it), with the tasks' records."""

    async def records(self, cfg: asyncnode.Config, ids: list[str]) -> list[dict[str, float | None]]:
        """The RECORD_FIELDS of tasks ``ids``."""
        columns = ", ".join(f"json_extract(record, '$.{f}')" for f in RECORD_FIELDS)
        rows = await asyncio.to_thread(self._query, cfg, f"SELECT id, {columns} FROM tasks")
        by_id = {row[0]: dict(zip(RECORD_FIELDS, map(_number, row[1:]), strict=True)) for row in rows}
        return [by_id.get(tid, dict.fromkeys(RECORD_FIELDS)) for tid in ids]


OUR_BACKENDS: dict[str, Any] = {"rabbitmq": RabbitAll(), "embedded": EmbeddedAll()}


class CodeCluster(throughput.Cluster):
    """bench/throughput.py's Cluster, its processes running ``code`` (cwd and first on their path)."""

    def __init__(
        self, backend: Any, path: Path, code: Code, overrides: dict[str, dict[str, Any]] | None = None
    ) -> None:
        super().__init__(backend, path, overrides)
        self.code = code

    def _start(self, role: str) -> Proc:
        argv = [sys.executable, "-m", "asyncnode", role, "--config", str(self.config), "--log-level", "WARNING"]
        proc = Proc(role, argv, self.workdir / f"{role}-{len(self.procs)}.log", env=self.code.env(), cwd=self.code.path)
        self.procs.append(proc)
        return proc

    async def preload(self, tasks: int) -> list[str]:
        """Record and queue ``tasks`` noop tasks with the code's own adapters, in a child process running it."""
        out = self.workdir / "ids.txt"
        argv = [sys.executable, "-c", PRELOAD, str(self.config), str(tasks), str(out), str(throughput.BENCH)]
        proc = Proc("preload", argv, self.workdir / "preload.log", env=self.code.env(), cwd=self.code.path)
        try:
            code = await proc.wait(drain_timeout(tasks))
        finally:
            await proc.stop()
        if code != 0:
            raise RuntimeError(f"preloading failed ({code}):\n{proc.tail()}")
        return out.read_text().split()


#: Config the working tree's trials run with besides the base's (--after-config section.key=value).
AFTER_CONFIG: dict[str, dict[str, Any]] = {}


@contextlib.asynccontextmanager
async def cluster(
    backend: Any, scratch: Path, code: Code, overrides: dict[str, dict[str, Any]] | None = None
) -> AsyncIterator[CodeCluster]:
    """bench/throughput.py's cluster(), its processes running ``code`` (the working tree's with --after-config)."""
    if code.key == "after":
        overrides = dict(overrides or {})
        for section, values in AFTER_CONFIG.items():
            overrides[section] = overrides.get(section, {}) | values
    async with throughput.cluster(backend, scratch, overrides, lambda b, path, o: CodeCluster(b, path, code, o)) as c:
        yield cast(CodeCluster, c)


# ============================================================================
# Workloads
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Trial:
    """What one trial is run with."""

    items: int  # N: tasks or requests
    seconds: float
    clients: int
    workers: int
    concurrency: int
    delay: float
    paced_rate: float
    scratch: Path


async def drain(backend: Any, code: Code, trial: Trial) -> Metrics:
    """Preload N tasks with no worker running, then time fresh workers draining them."""
    overrides = {"worker": {"concurrency": trial.concurrency}}
    async with cluster(backend, trial.scratch, code, overrides) as c:
        ids = await c.preload(trial.items)
        n = len(ids)
        rabbit = backend.name == "rabbitmq"
        served = await services_cpu() if rabbit else 0.0
        c.start_workers(trial.workers)
        workers_cpu: float | None = None  # from their first task on, not their start-up

        async def drained() -> bool:
            nonlocal workers_cpu
            counts = await backend.counts(c.cfg)
            if counts.get("failed"):
                raise RuntimeError(f"{counts['failed']} tasks failed")
            if workers_cpu is None and counts.get("started"):
                workers_cpu = c.workers_cpu()
            return bool(counts.get("completed", 0) >= n)

        await wait_for(drained, c.running(), drain_timeout(n), f"{n} tasks drained")
        workers_cpu = c.workers_cpu() - (workers_cpu or 0.0)
        served = await services_cpu() - served if rabbit else 0.0
        recs = await backend.records(c.cfg, ids)
    first = min(r["started_at"] for r in recs if r["started_at"] is not None)
    last = max(r["finished_at"] for r in recs if r["finished_at"] is not None)
    metrics: Metrics = {
        "items": n,
        "seconds": last - first,
        "rate": n / (last - first),
        "cpu_us": workers_cpu / n * 1e6,
    }
    if rabbit:
        metrics["services_cpu_us"] = served / n * 1e6
    return metrics


def _body(delay: float) -> bytes:
    body: dict[str, Any] = {"type": "noop", "payload": {}}
    if delay:
        body["delay"] = delay
    return json.dumps(body).encode()


@dataclasses.dataclass
class Posted:
    """What a burst of submissions got."""

    ids: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    first_epoch: float = 0.0  # time.time() as the first request started
    elapsed: float = 0.0  # first request's start to the last answer


async def post(
    session: aiohttp.ClientSession,
    base: str,
    n: int,
    clients: int,
    *,
    delay: float = 0.0,
    keyed: bool = False,
    rate: float = 0.0,
) -> Posted:
    """POST ``n`` noop tasks from ``clients`` concurrent connections, each with a fresh Idempotency-Key if ``keyed``
    and ``"delay"`` if ``delay``; or, with ``rate``, one every 1/rate s (an open-loop load)."""
    out = Posted()
    url, body = f"{base}/api/tasks", _body(delay)
    want = 202

    async def one(i: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))  # the schedule, not a wait on an event
        headers = {"Content-Type": "application/json"}
        if keyed:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        t0 = time.monotonic()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.json()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            out.errors.append(f"{type(e).__name__}: {e}")
            return
        if status == want:
            out.latencies.append(time.monotonic() - t0)
            out.ids.append(answer["id"])
        else:
            out.errors.append(f"{status} {answer}")

    out.first_epoch, start = time.time(), time.monotonic()
    if rate:
        await asyncio.gather(*(one(i) for i in range(n)))
    else:
        await lanes(one, range(n), clients)
    out.elapsed = time.monotonic() - start
    if not out.ids:
        raise RuntimeError(f"no task accepted; e.g. {out.errors[:3]}")
    return out


async def http(backend: Any, code: Code, trial: Trial, keyed: bool) -> Metrics:
    """One API process with no worker: N submissions from --clients connections."""
    async with cluster(backend, trial.scratch, code) as c, http_session(trial.clients) as session:
        c.start_api()
        await c.wait_ready(session, 0)
        await throughput.check_noop(session, c.base)
        # Warm up: open every client connection and the API's lazy ones.
        await post(session, c.base, trial.clients, trial.clients, keyed=keyed)
        assert c.api is not None
        rabbit = backend.name == "rabbitmq"
        api_cpu, served = c.api.cpu_seconds(), await services_cpu() if rabbit else 0.0
        sub = await post(session, c.base, trial.items, trial.clients, keyed=keyed)
        c.api.check()
        api_cpu = c.api.cpu_seconds() - api_cpu
        served = await services_cpu() - served if rabbit else 0.0
    if sub.errors:
        raise RuntimeError(f"{len(sub.errors)} of {trial.items} requests failed, e.g. {sub.errors[0]}")
    n = len(sub.ids)
    metrics: Metrics = {
        "items": n,
        "seconds": sub.elapsed,
        "rate": n / sub.elapsed,
        "p50_ms": percentile(sub.latencies, 50) * 1000,
        "p99_ms": percentile(sub.latencies, 99) * 1000,
        "cpu_us": api_cpu / n * 1e6,
    }
    if rabbit:
        metrics["services_cpu_us"] = served / n * 1e6
    return metrics


def _waits(recs: list[dict[str, float | None]], delayed: bool) -> list[float]:
    """Per task, seconds from when it could start (its run_at; else when it was recorded) to its start."""
    ready = "run_at" if delayed else "created_at"
    pairs = [(r["started_at"], r[ready]) for r in recs]
    return [start - at for start, at in pairs if start is not None and at is not None]


async def e2e(backend: Any, code: Code, trial: Trial, delay: float) -> Metrics:
    """The API and the workers: N submissions from --clients connections (with ``delay``, or none), timed to the
    last ``finished_at``; then a paced load on the idle deployment, for the wait of a task that waits for nothing
    else."""
    overrides = {"worker": {"concurrency": trial.concurrency}}
    async with cluster(backend, trial.scratch, code, overrides) as c, http_session(trial.clients) as session:
        c.start_api()
        c.start_workers(trial.workers)
        await c.wait_ready(session, trial.workers)
        await throughput.check_noop(session, c.base)
        warm = await post(session, c.base, trial.clients, trial.clients, delay=delay)
        done = len(warm.ids)
        rabbit = backend.name == "rabbitmq"

        async def completed(n: int) -> None:
            async def enough() -> bool:
                counts = await backend.counts(c.cfg)
                if counts.get("failed") or counts.get("rejected"):
                    raise RuntimeError(f"tasks failed or were rejected: {counts}")
                return bool(counts.get("completed", 0) >= n)

            await wait_for(enough, c.running(), drain_timeout(n), f"{n} tasks completed")

        await completed(done)
        assert c.api is not None
        api_cpu, workers_cpu = c.api.cpu_seconds(), c.workers_cpu()
        served = await services_cpu() if rabbit else 0.0
        burst = await post(session, c.base, trial.items, trial.clients, delay=delay)
        done += len(burst.ids)
        await completed(done)
        api_cpu, workers_cpu = c.api.cpu_seconds() - api_cpu, c.workers_cpu() - workers_cpu
        served = await services_cpu() - served if rabbit else 0.0
        paced_n = max(20, round(trial.paced_rate * trial.seconds))
        paced = await post(session, c.base, paced_n, trial.clients, delay=delay, rate=trial.paced_rate)
        done += len(paced.ids)
        await completed(done)
        burst_recs = await backend.records(c.cfg, burst.ids)
        paced_recs = await backend.records(c.cfg, paced.ids)
    if burst.errors or paced.errors:
        errors = burst.errors + paced.errors
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    n = len(burst.ids)
    last = max(r["finished_at"] for r in burst_recs if r["finished_at"] is not None)
    metrics: Metrics = {
        "items": n,
        "seconds": last - burst.first_epoch,
        "rate": n / (last - burst.first_epoch),
        "api_req_per_s": n / burst.elapsed,
        "api_cpu_us": api_cpu / n * 1e6,
        "workers_cpu_us": workers_cpu / n * 1e6,
        "cpu_us": (api_cpu + workers_cpu) / n * 1e6,
    }
    if rabbit:
        metrics["services_cpu_us"] = served / n * 1e6
    for name, recs in (("burst", burst_recs), ("paced", paced_recs)):
        waits = _waits(recs, bool(delay))
        if len(waits) != len(recs):
            raise RuntimeError(f"{len(recs) - len(waits)} {name} records lack started_at or run_at/created_at")
        metrics[f"{name}_wait_p50_ms"] = percentile(waits, 50) * 1000
        metrics[f"{name}_wait_p99_ms"] = percentile(waits, 99) * 1000
        metrics[f"{name}_wait_max_ms"] = max(waits) * 1000
        if delay:
            metrics[f"{name}_early"] = sum(1 for w in waits if w < 0)  # must be 0: none starts before its run_at
    metrics["paced_tasks"] = len(paced.ids)
    return metrics


# ============================================================================
# Rows, rounds, sizing
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Row:
    """A backend, a workload and a variant of it: one row of the table."""

    backend: str
    workload: str  # "drain-c<concurrency>", "http" or "e2e"
    variant: str  # "before", "after", "key", "plain", "delay"
    name: str
    base: str = ""  # the variant it is compared with
    concurrency: int = 1

    @property
    def key(self) -> str:
        return f"{self.backend}-{self.workload}-{self.variant}"

    @property
    def group(self) -> str:
        """The trials sized alike, and turned round by round."""
        return f"{self.backend}-{self.workload}"

    @property
    def base_key(self) -> str:
        return f"{self.group}-{self.base}" if self.base else ""

    @property
    def code(self) -> str:
        return "before" if self.variant == "before" else "after"


def rows_of(args: argparse.Namespace) -> list[Row]:
    """Every row this run measures, in table order."""
    out: list[Row] = []
    e2e_c = max(args.concurrency)
    for b in args.backends:
        if "drain" in args.parts:
            for conc in args.concurrency:
                w = f"drain-c{conc}"
                out += [
                    Row(b, w, "before", f"workers alone, concurrency {conc}: {args.commit}", concurrency=conc),
                    Row(b, w, "after", f"workers alone, concurrency {conc}: working tree", "before", conc),
                ]
        if "http" in args.parts:
            out += [
                Row(b, "http", "before", f"HTTP submissions: {args.commit}"),
                Row(b, "http", "after", "HTTP submissions: working tree", "before"),
                Row(b, "http", "key", "HTTP submissions, each with a fresh Idempotency-Key", "after"),
            ]
        if "e2e" in args.parts:
            out += [
                Row(b, "e2e", "plain", f"end to end, concurrency {e2e_c}: no delay", concurrency=e2e_c),
                Row(b, "e2e", "delay", f'end to end, concurrency {e2e_c}: "delay": {args.delay:g}', "plain", e2e_c),
            ]
    return out


class Sizer:
    """N per trial: the best rate of its workload's base variant measured before this round, times --seconds."""

    def __init__(self, fixed: int | None, seconds: float) -> None:
        self.fixed, self.seconds = fixed, seconds
        self.rates: dict[str, float] = {}  # measured so far
        self.known: dict[str, float] = {}  # as the round began

    def new_round(self) -> None:
        """Size this round's trials on what the rounds before it measured."""
        self.known = dict(self.rates)

    def items(self, row: Row) -> int:
        if self.fixed is not None:
            return self.fixed
        hint = HINTS["drain-c8" if row.workload.startswith("drain") and row.concurrency > 1 else row.workload[:5]]
        rate = self.known.get(row.group, hint)
        return max(MIN_ITEMS, min(MAX_ITEMS, round(rate * self.seconds)))

    def measured(self, row: Row, metrics: Metrics) -> None:
        if not row.base and metrics.get("rate"):
            self.rates[row.group] = max(float(metrics["rate"]), self.rates.get(row.group, 0.0))


def _this_round(rows: list[Row], round_no: int) -> list[Row]:
    """``rows`` with the variants of each workload turned by ``round_no - 1`` places, so that no variant always
    runs first (after another workload's trials) or last."""
    out: list[Row] = []
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    for group in groups.values():
        shift = (round_no - 1) % len(group)
        out += group[shift:] + group[:shift]
    return out


async def one_trial(row: Row, codes: dict[str, Code], trial: Trial) -> Metrics:
    """Run ``row``'s workload once."""
    backend, code = OUR_BACKENDS[row.backend], codes[row.code]
    if row.workload.startswith("drain"):
        return await drain(backend, code, trial)
    if row.workload == "http":
        return await http(backend, code, trial, keyed=row.variant == "key")
    return await e2e(backend, code, trial, trial.delay if row.variant == "delay" else 0.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round runs every row once; within a workload the variants' order turns each round."""
    throughput.cancel_on_signals()
    info = await throughput.machine(args.backends, peers=False)
    info["aiohttp"] = throughput._version("aiohttp")
    info["aio-pika"] = throughput._version("aio-pika")
    info["redis-py"] = throughput._version("redis")
    digest = tree_digest()
    rows = rows_of(args)
    results: dict[str, list[Metrics]] = {row.key: [] for row in rows}
    sizer = Sizer(args.items, args.seconds)
    started = time.monotonic()
    with release_before(args.commit) as before, tempfile.TemporaryDirectory(prefix="asyncnode-controls-") as scratch:
        codes = {"before": before, "after": Code("after", ROOT, "working tree")}
        info["before"] = before.label
        for round_no in range(1, args.rounds + 1):
            sizer.new_round()
            for row in _this_round(rows, round_no):
                trial = Trial(
                    sizer.items(row), args.seconds, args.clients, args.workers, row.concurrency, args.delay,
                    args.paced_rate, Path(scratch),
                )  # fmt: skip
                t0 = time.monotonic()
                try:
                    metrics = await one_trial(row, codes, trial)
                except Exception as e:  # one failed trial is reported; the others still run
                    traceback.print_exc()
                    metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                sizer.measured(row, metrics)
                metrics["round"] = round_no
                metrics["load"] = os.getloadavg()[0]
                results[row.key].append(metrics)
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
                print(f"round {round_no}/{args.rounds} {row.key} ({time.monotonic() - t0:.0f} s): {shown}", flush=True)
    end_digest = tree_digest()
    info["after"] = f"working tree, asyncnode.py sha256 {digest}" + (
        f" at start, {end_digest} at end (changed during the run)" if end_digest != digest else ""
    )
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time"] = f"{time.monotonic() - started:.0f} s"
    params = {
        "items": args.items or f"sized to ~{args.seconds:g} s",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "clients": args.clients,
        "delay": args.delay,
        "paced_rate": args.paced_rate,
        "commit": args.commit,
    }
    return {
        "machine": info,
        "params": params,
        "rows": {row.key: dataclasses.asdict(row) | {"base_key": row.base_key} for row in rows},
        "results": results,
        "summary": summary(rows, results),
    }


# ============================================================================
# Report
# ============================================================================


def _ok(trials: list[Metrics]) -> list[Metrics]:
    return [t for t in trials if "error" not in t]


#: The figures whose medians (and ranges) the summary keeps.
FIGURES = (
    "rate", "items", "cpu_us", "services_cpu_us", "p50_ms", "p99_ms", "api_req_per_s", "api_cpu_us",
    "workers_cpu_us", "burst_wait_p50_ms", "burst_wait_p99_ms", "burst_wait_max_ms", "paced_wait_p50_ms",
    "paced_wait_p99_ms", "paced_wait_max_ms", "burst_early", "paced_early",
)  # fmt: skip


def summary(rows: list[Row], results: dict[str, list[Metrics]]) -> dict[str, dict[str, Any]]:
    """Per row: the medians, the ratio of its median rate to its base's, the same ratio per round (the trials of
    one round ran a minute apart at most, under the same load), and the extra time and CPU per item."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        ok = _ok(results[row.key])
        med: dict[str, Any] = {"runs": f"{len(ok)}/{len(results[row.key])}"}
        if not ok:
            out[row.key] = med
            continue
        for metric in FIGURES:
            values = [t[metric] for t in ok if metric in t]
            if values:
                med[metric] = statistics.median(values)
                med[metric + "_range"] = [min(values), max(values)]
        for metric in ("burst_wait_max_ms", "paced_wait_max_ms", "burst_early", "paced_early"):
            if metric in med:
                med[metric] = med[metric + "_range"][1]  # the worst of every round, not a median
        base = _ok(results.get(row.base_key, []))
        if base:
            rate_a, rate_b = statistics.median(t["rate"] for t in base), med["rate"]
            med["ratio"] = rate_b / rate_a
            by_round = {t["round"]: t["rate"] for t in base}
            paired = [t["rate"] / by_round[t["round"]] for t in ok if t["round"] in by_round]
            if paired:
                med["ratio_by_round"] = statistics.median(paired)
                med["ratio_by_round_range"] = [min(paired), max(paired)]
            med["extra_us"] = (1 / rate_b - 1 / rate_a) * 1e6
            for metric in ("cpu_us", "services_cpu_us"):
                values = [t[metric] for t in base if metric in t]
                if metric in med and values:
                    med["extra_" + metric] = med[metric] - statistics.median(values)
        out[row.key] = med
    return out


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _cell(med: dict[str, Any], metric: str) -> str:
    if metric not in med:
        return "-"
    text = _fmt(med[metric])
    if metric + "_range" in med and med[metric + "_range"][0] != med[metric + "_range"][1]:
        lo, hi = med[metric + "_range"]
        text += f" ({_fmt(lo)}\u2013{_fmt(hi)})"
    return text


def _signed(med: dict[str, Any], metric: str) -> str:
    return f"{med[metric]:+.0f}" if metric in med else "-"


UNITS = {"drain": "tasks/s", "http": "requests/s", "e2e": "tasks/s"}


def table(out: dict[str, Any]) -> str:
    """One Markdown row per backend, workload and variant."""
    head = [
        "backend",
        "case",
        "runs",
        "N",
        "rate",
        "ratio to base",
        "ratio, round by round",
        "extra \u00b5s/item (wall)",
        "CPU \u00b5s/item",
        "extra CPU \u00b5s/item",
        "RabbitMQ + Redis CPU \u00b5s/item",
        "answer p50 / p99 ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, row in out["rows"].items():
        med = out["summary"][key]
        ratio = f"{med['ratio']:.3f} vs {row['base']}" if "ratio" in med else "(base)" if not row["base"] else "-"
        by_round = "-"
        if "ratio_by_round" in med:
            lo, hi = med["ratio_by_round_range"]
            by_round = f"{med['ratio_by_round']:.3f} ({lo:.2f}\u2013{hi:.2f})"
        answer = f"{_fmt(med['p50_ms'])} / {_fmt(med['p99_ms'])}" if "p50_ms" in med else "-"
        cells = [
            row["backend"],
            row["name"],
            med["runs"],
            f"{med['items']:.0f}" if "items" in med else "-",
            _cell(med, "rate") + f" {UNITS[row['workload'][:5].rstrip('-')]}",
            ratio,
            by_round,
            _signed(med, "extra_us"),
            _cell(med, "cpu_us"),
            _signed(med, "extra_cpu_us"),
            _cell(med, "services_cpu_us"),
            answer,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def waits_table(out: dict[str, Any]) -> str:
    """The end-to-end rows' waits to start, from the records."""
    head = [
        "backend",
        "case",
        "waited from",
        "burst: p50 / p99 / max ms",
        "paced: p50 / p99 / max ms",
        "API CPU \u00b5s/task",
        "workers CPU \u00b5s/task",
        "started before run_at",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, row in out["rows"].items():
        if row["workload"] != "e2e":
            continue
        med = out["summary"][key]
        if "rate" not in med:
            continue
        cells = [row["backend"], row["name"], "run_at" if row["variant"] == "delay" else "created_at"]
        for phase in ("burst", "paced"):
            cells.append(" / ".join(_fmt(med[f"{phase}_wait_{q}_ms"]) for q in ("p50", "p99", "max")))
        cells += [_cell(med, "api_cpu_us"), _cell(med, "workers_cpu_us")]
        early = [med.get(f"{phase}_early") for phase in ("burst", "paced")]
        cells.append("-" if early[0] is None else f"{sum(int(e or 0) for e in early)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters, the tables, and the medians as JSON."""
    info, params = out["machine"], out["params"]
    services = ", ".join(f"{k} {info[k]}" for k in ("RabbitMQ", "Redis", "SQLite") if k in info)
    libs = ", ".join(f"{k} {info[k]}" for k in ("aiohttp", "aio-pika", "redis-py") if info.get(k))
    items = (
        f"N = {params['items']}" if isinstance(params["items"], int) else f"N sized to last ~{params['seconds']:g} s"
    )
    compact = {
        key: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items() if not k.endswith("_range")}
        for key, med in out["summary"].items()
    }
    return "\n".join(
        [
            f"- Machine: {info['cores']} cores, {info['cpu']}; {info['os']}; Python {info['Python']}; {services}; "
            f"{libs}",
            f"- Before: {info['before']} (a git worktree). After: {info['after']}",
            f"- Load average at start / end: {info['load average at start']} / {info['load average at end']}; "
            f"wall time {info['wall time']}",
            f"- {items}; {params['rounds']} rounds, variants alternated; median (min\u2013max). Workers alone: `noop` "
            f"tasks preloaded (confirmed) by the code under test with no worker running, drained by "
            f"{params['workers']} fresh worker processes, N over the first `started_at` to the last `finished_at`. "
            f"HTTP: one API process, no worker, {params['clients']} connections from an aiohttp client in the "
            "harness, N over the first request's start to the last answer. End to end: the API and "
            f"{params['workers']} workers, {params['clients']} connections, N over the first request's start to "
            "the last `finished_at`",
            "- Ratio to base: the median rate over the base's (same backend and workload; 1.00 = costs nothing); "
            "round by round: the median of that ratio within each round. Extra \u00b5s/item: (1/rate \u2212 "
            "1/base rate) x 1e6. CPU: workers' (workers alone, from their first task on), the API's (HTTP), "
            "the API's + workers' (end to end); RabbitMQ + Redis: the shared node's and server's CPU over the "
            "measured part (other users of them count too). End to end with a delay, the rate also carries the last "
            "tasks' wait for their promotion (up to a promoter's interval): its CPU is the cost per task",
            "",
            table(out),
            "",
            f"Waits to start in the end-to-end trials, from the records: `started_at` \u2212 `run_at` with a delay, "
            f"`started_at` \u2212 `created_at` without; burst: the N tasks above; paced: "
            f"{params['paced_rate']:g} tasks/s for {params['seconds']:g} s on the idle deployment (max: the worst "
            "of every round).",
            "",
            waits_table(out),
            "",
            "Medians (JSON, one row a line):",
            "",
            "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(med)}" for key, med in compact.items()) + "\n}",
        ]
    )


def cleanup() -> None:
    """Whatever an interrupted run left: its processes (by pid), queues, keys, and the worktree."""
    try:
        throughput.kill_leftovers()
    finally:
        remove_worktrees()


PARTS = ("drain", "http", "e2e")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", "--backends", dest="backends", type=throughput._csv, help="rabbitmq, embedded (default: both)"
    )
    parser.add_argument("--parts", type=throughput._csv, default=list(PARTS), help="drain, http, e2e (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each running every case once (default 5)")
    parser.add_argument("--seconds", type=float, default=1.5, help="target length of a measurement (default 1.5)")
    parser.add_argument("--items", type=int, help="fixed N for every trial instead of sizing it by --seconds")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--concurrency",
        type=throughput._ints,
        default=[1, 8],
        help="[worker] concurrency values of the drains (1,8); end to end: the highest",
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP connections (default 64)")
    parser.add_argument("--delay", type=float, default=0.01, help='the "delay" of the delayed tasks (default 0.01)')
    parser.add_argument("--paced-rate", type=float, default=100.0, help="tasks/s of the paced load (default 100)")
    parser.add_argument("--commit", default=BEFORE_COMMIT, help=f"the release before (default {BEFORE_COMMIT})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 items, one round")
    parser.add_argument(
        "--after-config",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config for the working tree's trials only, e.g. tasks.search_words=false (a JSON value, else text)",
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every trial's figures to PATH")
    args = parser.parse_args()
    for setting in args.after_config:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        if not (section and key and value):
            parser.error(f"--after-config: {setting!r} is not section.key=value")
        AFTER_CONFIG.setdefault(section, {})[key] = json.loads(value) if value[:1] in '[{"tf0123456789-' else value
    if args.quick:
        args.items, args.rounds = min(args.items or 200, 200), 1
    if args.backends is None:
        args.backends = ["rabbitmq", *(["embedded"] if embedded_supported() else [])]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        parser.error(f"unknown backend {unknown}; choose from {', '.join(BACKENDS)}")
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    if (args.items is not None and args.items < 1) or min(args.rounds, args.workers, args.clients) < 1:
        parser.error("--items, --rounds, --workers and --clients must be at least 1")
    if not args.delay > 0 or not args.paced_rate > 0 or not args.seconds > 0:
        parser.error("--delay, --paced-rate and --seconds must be above 0")
    if _git("rev-parse", "--verify", "--quiet", f"{args.commit}^{{commit}}").returncode != 0:
        parser.error(f"--commit: no such commit {args.commit!r}")
    return run_and_report(run(args), report, args.json, cleanup)


if __name__ == "__main__":
    sys.exit(main())
