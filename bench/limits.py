"""What a queue's `limit` and `rate` cost per task, on both backends: ``python bench/limits.py``.

The same workload as bench/throughput.py's "workers alone": N `noop` tasks recorded and queued through
asyncnode's own adapters (confirmed) with no worker running, then --workers fresh worker processes with
``[worker] concurrency`` --concurrency drain them, timed from the first task's ``started_at`` to the last
one's ``finished_at``. Cases, per backend and per concurrency, alternated round after round:
  - default: no ``[queues.*]``; the tasks go to the default queue (the release before named queues did this)
  - named: ``[queues.lim]`` without limit or rate, the tasks on it (the workers consume both queues): what a
    named queue costs when its limits are not used (nothing, the README says: no store call before a start)
  - named-only: the same, the workers started with ``--queues lim``: without the second queue they consume,
    what is left is the per-queue counter a deployment of several queues keeps
  - limit: ``[queues.lim] limit`` --limit (1000: never reached, the cost of the admission alone: one
    store call before each start, one to give the slot back)
  - rate: ``[queues.lim] rate`` --rate ("100000/s": never reached; one store call before each start)
  - bound: ``limit = 2`` with more slots than that (workers x concurrency > 2): the limit holds. Its figure
    is the limit's throughput, not a cost.
Every case reports the most tasks running at once, from the records (``started_at`` is when the queue
admitted the task; a task holds its slot until its outcome is recorded): in "bound" it must not exceed 2.
N is sized so that a drain lasts about --seconds: the same N for every unbound case of a backend and
concurrency (sized on "default"), its own for "bound". Each trial runs on its own ``[broker] queue`` and
``[redis] key_prefix`` (``benchlim-<hex>``) or its own SQLite file, all removed afterwards (also when
interrupted). Prints the machine, a Markdown table (median, min-max) with each case's ratio to "default"
and its extra cost in microseconds per task, then the medians as JSON (--json PATH: every trial too).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput
from throughput import (
    BACKENDS,
    RabbitBackend,
    cluster,
    delete_keys,
    delete_queues,
    drain_timeout,
    embedded_supported,
    run_and_report,
    services_cpu,
    wait_for,
)

import asyncnode  # importable now: throughput put the project's folder on sys.path

Metrics = dict[str, Any]

#: The named queue every case but "default" puts its tasks on.
QUEUE = "lim"
#: The limit of the "bound" case.
BOUND_LIMIT = 2
#: Bounds of a trial's N.
MIN_TASKS, MAX_TASKS = 100, 50_000
#: Tasks recorded and queued at once while preloading (as bench/throughput.py).
PRELOAD_WINDOW = throughput.PRELOAD_WINDOW
#: Prefix of every queue and key a trial makes (its own, so that a leftover is easy to tell apart).
TAG_PREFIX = "benchlim-"


def _tag() -> str:
    return f"{TAG_PREFIX}{uuid.uuid4().hex[:10]}"


# bench/throughput.py's Cluster names its queue and key prefix with new_tag(): ours carry their own prefix.
throughput.new_tag = _tag


class RabbitNamedQueues(RabbitBackend):
    """RabbitMQ and Redis, cleaning up every queue the config declares (each work queue with its retry
    queues, the DLQ), not just the default queue's as bench/throughput.py's RabbitBackend does."""

    async def cleanup(self, cfg: asyncnode.Config) -> None:
        await delete_queues(asyncnode.broker_queues(cfg))
        await delete_keys(cfg.redis.key_prefix, cfg.redis.url)

    async def intervals(self, cfg: asyncnode.Config, ids: list[str]) -> list[tuple[float, float]]:
        """Every task's (``started_at``, ``finished_at``)."""
        client = aioredis.from_url(cfg.redis.url, decode_responses=True)
        try:
            rows: list[Any] = []
            for i in range(0, len(ids), 5000):
                async with client.pipeline(transaction=False) as pipe:
                    for tid in ids[i : i + 5000]:
                        pipe.hmget(cfg.redis.key_prefix + tid, "started_at", "finished_at")
                    rows += await pipe.execute()
        finally:
            await client.aclose()
        return [(float(a), float(b)) for a, b in rows]


class EmbeddedIntervals(throughput.EmbeddedBackend):
    """The SQLite file, with every task's (``started_at``, ``finished_at``)."""

    async def intervals(self, cfg: asyncnode.Config, ids: list[str]) -> list[tuple[float, float]]:
        query = "SELECT json_extract(record, '$.started_at'), json_extract(record, '$.finished_at') FROM tasks"
        rows = await asyncio.to_thread(self._query, cfg, query)
        return [(float(a), float(b)) for a, b in rows]


OUR_BACKENDS: dict[str, Any] = {"rabbitmq": RabbitNamedQueues(), "embedded": EmbeddedIntervals()}


def most_at_once(intervals: list[tuple[float, float]], tolerance: float = 0.001) -> int:
    """The most intervals open at once; a start within ``tolerance`` of an end is taken as after it (Redis's
    clock, which stamps an admitted task's ``started_at``, counts whole milliseconds)."""
    events = sorted([(a + tolerance, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = now = 0
    for _, step in events:  # at equal times the end (-1) sorts first
        now += step
        best = max(best, now)
    return best


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the queue the tasks go to."""

    key: str
    name: str
    queues: dict[str, dict[str, Any]]  # [queues.*] tables
    queue: str  # the queue the tasks are put on
    bound: int = 0  # the limit that must hold (0: none that binds)
    serve: tuple[str, ...] = ()  # the workers' --queues (empty: every declared queue)


def cases(limit: int, rate: str) -> list[Case]:
    """The cases, in table order."""
    return [
        Case("default", "default queue, no [queues.*]", {}, asyncnode.DEFAULT_QUEUE),
        Case("named", f"[queues.{QUEUE}], no limit or rate", {QUEUE: {}}, QUEUE),
        Case("named-only", f"[queues.{QUEUE}], no limit or rate, workers --queues {QUEUE}", {QUEUE: {}}, QUEUE,
             serve=(QUEUE,)),
        Case("limit", f"[queues.{QUEUE}] limit = {limit}", {QUEUE: {"limit": limit}}, QUEUE),
        Case("rate", f'[queues.{QUEUE}] rate = "{rate}"', {QUEUE: {"rate": rate}}, QUEUE),
        Case("bound", f"[queues.{QUEUE}] limit = {BOUND_LIMIT} (binds)", {QUEUE: {"limit": BOUND_LIMIT}}, QUEUE,
             bound=BOUND_LIMIT),
    ]  # fmt: skip


def start_workers(c: throughput.Cluster, count: int, serve: tuple[str, ...]) -> None:
    """Start ``count`` worker processes as bench/throughput.py's Cluster does, with ``--queues`` if ``serve``."""
    if not serve:
        c.start_workers(count)
        return
    for _ in range(count):
        argv = [sys.executable, "-m", "asyncnode", "worker", "--config", str(c.config), "--log-level", "WARNING"]
        proc = throughput.Proc("worker", [*argv, "--queues", ",".join(serve)], c.workdir / f"worker-{len(c.procs)}.log")
        c.procs.append(proc)
        c.workers.append(proc)


@dataclasses.dataclass(frozen=True)
class Trial:
    """What one trial is run with."""

    tasks: int
    workers: int
    concurrency: int
    scratch: Path


async def preload(cfg: asyncnode.Config, tasks: int, queue: str) -> list[str]:
    """Record and queue ``tasks`` noop tasks on ``queue`` through asyncnode's own adapters, as its API would."""
    broker, store = asyncnode.open_backend(cfg, "api")
    ids = [asyncnode.new_task_id() for _ in range(tasks)]

    async def one(tid: str) -> None:
        change = asyncnode.plan_change("submitted", tid, "noop", {"payload": {}, "queue": queue}, tasks=cfg.tasks)
        await store.apply(change)
        await broker.publish(asyncnode.Envelope(tid, "noop", {}, created_at=change.at, queue=queue))

    try:
        await throughput.lanes(one, ids, PRELOAD_WINDOW)
    finally:
        await broker.close()
        await store.close()
    return ids


async def drain(backend: Any, case: Case, trial: Trial) -> Metrics:
    """Preload N tasks on the case's queue, then time fresh workers draining them."""
    overrides: dict[str, dict[str, Any]] = {"worker": {"concurrency": trial.concurrency}}
    overrides |= {f"queues.{name}": table for name, table in case.queues.items()}
    async with cluster(backend, trial.scratch, overrides) as c:
        ids = await preload(c.cfg, trial.tasks, case.queue)
        n = len(ids)
        rabbit = backend.name == "rabbitmq"
        served = await services_cpu() if rabbit else 0.0
        start_workers(c, trial.workers, case.serve)
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
        counts = await backend.counts(c.cfg)
        if case.queue != asyncnode.DEFAULT_QUEUE and counts.get(f"completed@{case.queue}") != n:
            raise RuntimeError(f"expected {n} completions on queue {case.queue!r}, the counters say {counts}")
        spans = await backend.intervals(c.cfg, ids)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    metrics: Metrics = {
        "tasks": n,
        "seconds": last - first,
        "tasks_per_s": n / (last - first),
        "max_running": most_at_once(spans),
        "workers_cpu_us_per_task": workers_cpu / n * 1e6,
    }
    if rabbit:
        metrics["services_cpu_us_per_task"] = served / n * 1e6
    if case.bound and metrics["max_running"] > case.bound:
        metrics["error"] = f"limit {case.bound} broken: {metrics['max_running']} running at once"
    return metrics


# ============================================================================
# Rounds, sizing, report
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Row:
    """A backend, a concurrency and a case: one row of the table."""

    backend: str
    concurrency: int
    case: Case

    @property
    def key(self) -> str:
        return f"{self.backend}-c{self.concurrency}-{self.case.key}"

    @property
    def base(self) -> str:
        """The key of the row it is compared with."""
        return f"{self.backend}-c{self.concurrency}-default"


#: First guesses of tasks/s (2 worker processes on 2 busy cores), by backend and whether concurrency is 1,
#: before a trial has measured one.
HINTS = {("rabbitmq", True): 700.0, ("rabbitmq", False): 2000.0, ("embedded", True): 900.0,
         ("embedded", False): 2500.0}  # fmt: skip
BOUND_HINT = 60.0


class Sizer:
    """N per trial: the best rate of "default" measured before this round times --seconds, the same for every
    unbound case of a backend and concurrency in a round; "bound" on its own rate."""

    def __init__(self, fixed: int | None, seconds: float) -> None:
        self.fixed, self.seconds = fixed, seconds
        self.rates: dict[str, float] = {}  # measured so far
        self.known: dict[str, float] = {}  # as the round began

    def new_round(self) -> None:
        """Size this round's trials on what the rounds before it measured."""
        self.known = dict(self.rates)

    def _group(self, row: Row) -> str:
        return row.key if row.case.bound else row.base

    def tasks(self, row: Row) -> int:
        if self.fixed is not None:
            return self.fixed
        hint = BOUND_HINT if row.case.bound else HINTS[row.backend, row.concurrency == 1]
        rate = self.known.get(self._group(row), hint)
        return max(MIN_TASKS, min(MAX_TASKS, round(rate * self.seconds)))

    def measured(self, row: Row, metrics: Metrics) -> None:
        if (row.case.bound or row.case.key == "default") and metrics.get("tasks_per_s"):
            group = self._group(row)
            self.rates[group] = max(float(metrics["tasks_per_s"]), self.rates.get(group, 0.0))


def rows_of(args: argparse.Namespace) -> list[Row]:
    """Every row this run measures ("bound" only where there are more slots than its limit)."""
    out = []
    for backend in args.backends:
        for concurrency in args.concurrency:
            for case in cases(args.limit, args.rate):
                if case.key not in args.cases:
                    continue
                if case.bound and args.workers * concurrency <= case.bound:
                    continue
                out.append(Row(backend, concurrency, case))
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round runs every row once; within a backend and concurrency the cases' order turns each round."""
    throughput.cancel_on_signals()
    info = await throughput.machine(args.backends, peers=False)
    rows = rows_of(args)
    results: dict[str, list[Metrics]] = {row.key: [] for row in rows}
    sizer = Sizer(args.tasks, args.seconds)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncnode-limits-") as scratch:
        for round_no in range(1, args.rounds + 1):
            sizer.new_round()
            for row in _this_round(rows, round_no):
                trial = Trial(sizer.tasks(row), args.workers, row.concurrency, Path(scratch))
                t0 = time.monotonic()
                try:
                    metrics = await drain(OUR_BACKENDS[row.backend], row.case, trial)
                except Exception as e:  # one failed trial is reported; the others still run
                    traceback.print_exc()
                    metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                sizer.measured(row, metrics)
                metrics["round"] = round_no
                metrics["load"] = os.getloadavg()[0]
                results[row.key].append(metrics)
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
                print(f"round {round_no}/{args.rounds} {row.key} ({time.monotonic() - t0:.0f} s): {shown}", flush=True)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time"] = f"{time.monotonic() - started:.0f} s"
    params = {
        "tasks": args.tasks or f"sized to ~{args.seconds:g} s",
        "seconds": args.seconds,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "limit": args.limit,
        "rate": args.rate,
        "rounds": args.rounds,
        "queue_type": asyncnode.BrokerConfig().queue_type,
        "prefetch": asyncnode.BrokerConfig().prefetch,
        "bound_cases": [c.key for c in cases(args.limit, args.rate) if c.bound],
    }
    return {
        "machine": info,
        "params": params,
        "rows": {row.key: {"backend": row.backend, "concurrency": row.concurrency, "case": row.case.key,
                           "name": row.case.name, "base": row.base} for row in rows},
        "results": results,
        "summary": summary(rows, results, args.workers),
    }  # fmt: skip


def _this_round(rows: list[Row], round_no: int) -> list[Row]:
    """``rows`` with the cases of each backend and concurrency turned by ``round_no - 1`` places, so that no
    case always runs first (after another backend's trials) or last."""
    out: list[Row] = []
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.base, []).append(row)
    for group in groups.values():
        shift = (round_no - 1) % len(group)
        out += group[shift:] + group[:shift]
    return out


def _ok(trials: list[Metrics]) -> list[Metrics]:
    return [t for t in trials if "error" not in t]


def summary(rows: list[Row], results: dict[str, list[Metrics]], workers: int) -> dict[str, dict[str, Any]]:
    """Per row: the medians, the ratio of its median tasks/s to its base's, the same ratio per round (the
    trials of one round ran minutes apart at most, under the same load), and the extra cost per task."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        ok = _ok(results[row.key])
        if not ok:
            out[row.key] = {"runs": f"0/{len(results[row.key])}"}
            continue
        med: dict[str, Any] = {"runs": f"{len(ok)}/{len(results[row.key])}"}
        for metric in ("tasks_per_s", "workers_cpu_us_per_task", "services_cpu_us_per_task", "tasks"):
            values = [t[metric] for t in ok if metric in t]
            if values:
                med[metric] = statistics.median(values)
                med[metric + "_range"] = [min(values), max(values)]
        med["max_running"] = max(t["max_running"] for t in ok)
        base = _ok(results.get(row.base, []))
        if base and row.key != row.base:
            rate_a, rate_b = statistics.median(t["tasks_per_s"] for t in base), med["tasks_per_s"]
            med["ratio"] = rate_b / rate_a
            by_round = {t["round"]: t["tasks_per_s"] for t in base}
            paired = [t["tasks_per_s"] / by_round[t["round"]] for t in ok if t["round"] in by_round]
            if paired:
                med["ratio_by_round"] = statistics.median(paired)
                med["ratio_by_round_range"] = [min(paired), max(paired)]
            # The fleet's extra wall time per task, and each worker process's (it runs 1/workers of them).
            med["extra_us_per_task"] = (1 / rate_b - 1 / rate_a) * 1e6
            med["extra_us_per_task_per_process"] = med["extra_us_per_task"] * workers
            for metric in ("workers_cpu_us_per_task", "services_cpu_us_per_task"):
                values = [t[metric] for t in base if metric in t]
                if metric in med and values:
                    med["extra_" + metric] = med[metric] - statistics.median(values)
        out[row.key] = med
    return out


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _cell(med: dict[str, Any], metric: str, signed: bool = False) -> str:
    if metric not in med:
        return "-"
    text = f"{med[metric]:+.0f}" if signed else _fmt(med[metric])
    if metric + "_range" in med and med[metric + "_range"][0] != med[metric + "_range"][1]:
        lo, hi = med[metric + "_range"]
        text += f" ({lo:.2f}\u2013{hi:.2f})" if metric.startswith("ratio") else f" ({_fmt(lo)}\u2013{_fmt(hi)})"
    return text


def _extra(med: dict[str, Any], metric: str, bound: bool) -> str:
    if bound:
        return "(binds)"  # its tasks wait their turn: not a cost of the check
    return f"{med[metric]:+.0f}" if metric in med else "-"


def table(out: dict[str, Any]) -> str:
    """One Markdown row per backend, concurrency and case."""
    head = [
        "backend",
        "concurrency",
        "case",
        "runs",
        "N",
        "tasks/s",
        "ratio to default",
        "ratio, round by round",
        "extra \u00b5s/task (fleet)",
        "extra \u00b5s/task per process",
        "workers CPU \u00b5s/task",
        "extra workers CPU \u00b5s/task",
        "RabbitMQ + Redis CPU \u00b5s/task",
        "most running at once",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, row in out["rows"].items():
        med = out["summary"][key]
        bound = row["case"] in out["params"]["bound_cases"]
        ratio = f"{med['ratio']:.3f}" if "ratio" in med else "-"
        by_round = "-"
        if "ratio_by_round" in med:
            lo, hi = med["ratio_by_round_range"]
            by_round = f"{med['ratio_by_round']:.3f} ({lo:.2f}\u2013{hi:.2f})"
        cells = [
            row["backend"],
            str(row["concurrency"]),
            row["name"],
            med["runs"],
            f"{med['tasks']:.0f}" if "tasks" in med else "-",
            _cell(med, "tasks_per_s"),
            ratio,
            by_round,
            _extra(med, "extra_us_per_task", bound),
            _extra(med, "extra_us_per_task_per_process", bound),
            _cell(med, "workers_cpu_us_per_task"),
            _extra(med, "extra_workers_cpu_us_per_task", bound),
            _cell(med, "services_cpu_us_per_task"),
            str(med.get("max_running", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters, the table, and the medians as JSON."""
    info, params = out["machine"], out["params"]
    services = ", ".join(f"{k} {info[k]}" for k in ("RabbitMQ", "Redis", "SQLite") if k in info)
    tasks = params["tasks"] if isinstance(params["tasks"], int) else f"N sized to drain in ~{params['seconds']:g} s"
    concurrency = ", ".join(map(str, params["concurrency"]))
    compact = {
        key: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items() if not k.endswith("_range")}
        for key, med in out["summary"].items()
    }
    return "\n".join(
        [
            f"- Machine: {info['cores']} cores, {info['cpu']}; {info['os']}; Python {info['Python']}; {services}",
            f"- Load average at start / end: {info['load average at start']} / {info['load average at end']}; "
            f"wall time {info['wall time']}",
            f"- `noop` tasks preloaded (confirmed) with no worker running, {tasks}, drained by {params['workers']} "
            f"fresh worker processes with [worker] concurrency {concurrency}; tasks/s is N over the first "
            f"`started_at` to the last `finished_at`; {params['queue_type']} queues, prefetch "
            f"max({params['prefetch']}, 2 x concurrency); {params['rounds']} rounds, cases alternated; median "
            "(min\u2013max)",
            "- Ratio to default: the case's median tasks/s over the default queue's (same backend and concurrency); "
            "round by round: the median of that ratio taken within each round",
            f"- Extra \u00b5s/task: (1/tasks/s \u2212 1/tasks/s of default) x 1e6, the fleet's wall time per task; "
            f"per process: times {params['workers']} (each process runs 1/{params['workers']} of the tasks). "
            "Extra CPU: the workers' CPU time per task (user + system, from their first task on) over default's; "
            "RabbitMQ + Redis: the shared node's and server's CPU over the drain (other users of them count too)",
            "- Most running at once: the most tasks whose [started_at, finished_at] overlap, from the records "
            f"(bound: must not exceed {BOUND_LIMIT})",
            "",
            table(out),
            "",
            "Medians (JSON, one row a line):",
            "",
            "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(med)}" for key, med in compact.items()) + "\n}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", type=throughput._csv, help="rabbitmq, embedded (default: every one asyncnode has)"
    )
    parser.add_argument(
        "--concurrency", type=throughput._ints, default=[1, 8], help="[worker] concurrency values (1,8)"
    )
    parser.add_argument("--cases", type=throughput._csv, default=[c.key for c in cases(1, "1/s")], help="default: all")
    parser.add_argument("--seconds", type=float, default=1.5, help="target length of a drain (default 1.5)")
    parser.add_argument("--tasks", type=int, help="fixed N for every trial instead of sizing it by --seconds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every case once (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--limit", type=int, default=1000, help='the "limit" case\'s limit (default 1000)')
    parser.add_argument("--rate", default="100000/s", help='the "rate" case\'s rate (default "100000/s")')
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 tasks, one round, concurrency 8")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every trial's figures to PATH")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.rounds, args.concurrency = min(args.tasks or 200, 200), 1, [8]
    if args.backends is None:
        args.backends = ["rabbitmq", *(["embedded"] if embedded_supported() else [])]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        parser.error(f"unknown backend {unknown}; choose from {', '.join(BACKENDS)}")
    known = [c.key for c in cases(1, "1/s")]
    if not args.cases or any(c not in known for c in args.cases):
        parser.error(f"--cases: choose from {', '.join(known)}")
    if "default" not in args.cases:
        parser.error('--cases must include "default": every ratio is to it')
    if (args.tasks is not None and args.tasks < 1) or args.rounds < 1 or args.workers < 1 or args.limit < 1:
        parser.error("--tasks, --rounds, --workers and --limit must be at least 1")
    try:
        asyncnode.parse_rate(args.rate)
    except ValueError as e:
        parser.error(f"--rate: {e}")
    return run_and_report(run(args), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
