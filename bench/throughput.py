"""Throughput figures for the README: `make bench`.

Systems, each one trial at a time, alternated round after round (A B A B ...) so that
whatever else the machine is doing falls on every system alike:
  - asyncnode end to end, per backend: one API and 2 worker processes; 64 HTTP clients
    submit N `noop` tasks while one WebSocket client watches. Throughput is N over the time
    from the first submit to the last `completed` seen on the WebSocket; latency is from a
    submit's start to its `completed` on the WebSocket; API req/s is N over the submits.
  - asyncnode workers alone, per backend: N tasks submitted with no worker running, the API
    stopped, then 2 workers started and timed from the first task they started to the last
    they finished (the tasks' own `started_at` and `finished_at`).
Every trial starts its processes afresh on its own queue, key prefix or SQLite file, and
removes them afterwards. Prints the machine and a Markdown table (median, min-max).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncnode  # noqa: E402

#: The shared services the RabbitMQ backend runs against (never stopped here).
RABBIT_URL = os.environ.get("RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
#: Environment variables that would override what a trial's config says; children never see them.
OVERRIDES = (
    "RABBIT_URL",
    "REDIS_URL",
    "ASYNCNODE_API_PORT",
    "ASYNCNODE_TOKEN",
    "ASYNCNODE_CONFIG",
    "ASYNCNODE_INSTANCE",
    "ASYNCNODE_LOG_LEVEL",
)
#: Seconds a trial's processes get to come up, and to stop before they are killed.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
#: Units of /proc/<pid>/stat CPU times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: Seconds between polls of a backend's counters while workers drain a preloaded queue.
POLL_INTERVAL = 0.05

Metrics = dict[str, Any]


# ============================================================================
# Processes
# ============================================================================

#: Every process started and not yet reaped, so that an interrupted run can still stop them (by pid).
_LIVE: set[subprocess.Popen[bytes]] = set()


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OVERRIDES}


class Proc:
    """One ``asyncnode.py <role>`` subprocess logging to a file, stopped by pid."""

    def __init__(self, role: str, config: Path, log_path: Path) -> None:
        self.role = role
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(ROOT / "asyncnode.py"), role, "--config", str(config), "--log-level", "WARNING"],
                cwd=ROOT,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _LIVE.add(self.popen)

    def check(self) -> None:
        """Raise if the process has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.role} pid {self.popen.pid} exited with {self.popen.returncode}:\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """User and system CPU time it has used so far (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait, 5)
        _LIVE.discard(self.popen)


def _kill_leftovers() -> None:
    """Last resort after an interrupted cleanup: kill what is still running, by pid."""
    for popen in list(_LIVE):
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        _LIVE.discard(popen)
    if _DIRTY:
        asyncio.run(_cleanup_leftovers())


async def _cleanup_leftovers() -> None:
    for c in list(_DIRTY.values()):
        try:
            await c.backend.cleanup(c.cfg)
        except Exception as e:  # best effort: say what is left behind
            print(f"could not clean up {c.tag}: {e}", file=sys.stderr)
        _DIRTY.pop(c.tag, None)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a flat TOML file (JSON literals are valid TOML for strings, numbers, booleans and lists)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# ============================================================================
# Backends: how a trial configures asyncnode, watches its progress and cleans up
# ============================================================================


class Backend:
    """What differs between asyncnode's backends, for the harness."""

    name = ""

    def sections(self, tag: str) -> dict[str, dict[str, Any]]:
        """Config sections of a trial named ``tag`` (besides ``[api]``)."""
        raise NotImplementedError

    async def counts(self, cfg: asyncnode.Config) -> dict[str, int]:
        """How many tasks reached each status so far."""
        raise NotImplementedError

    async def span(self, cfg: asyncnode.Config, ids: list[str]) -> tuple[float, float]:
        """The earliest ``started_at`` and the latest ``finished_at`` of the tasks ``ids`` (epoch seconds)."""
        raise NotImplementedError

    async def cleanup(self, cfg: asyncnode.Config) -> None:
        """Remove what a trial left outside its temporary folder."""

    async def versions(self) -> dict[str, str]:
        """Versions of the services this backend uses."""
        return {}


class RabbitBackend(Backend):
    """RabbitMQ and Redis: a queue and a key prefix of its own per trial, deleted afterwards."""

    name = "rabbitmq"

    def sections(self, tag: str) -> dict[str, dict[str, Any]]:
        return {
            "broker": {"url": RABBIT_URL, "queue": tag},
            "redis": {"url": REDIS_URL, "channel": f"{tag}:updates", "key_prefix": f"{tag}:"},
        }

    async def counts(self, cfg: asyncnode.Config) -> dict[str, int]:
        client = aioredis.from_url(cfg.redis.url, decode_responses=True)
        try:
            raw = await client.hgetall(cfg.redis.key_prefix + asyncnode.STATS_SUFFIX)
        finally:
            await client.aclose()
        return {str(k): int(v) for k, v in raw.items()}

    async def span(self, cfg: asyncnode.Config, ids: list[str]) -> tuple[float, float]:
        client = aioredis.from_url(cfg.redis.url, decode_responses=True)
        try:
            async with client.pipeline(transaction=False) as pipe:
                for tid in ids:
                    pipe.hmget(cfg.redis.key_prefix + tid, "started_at", "finished_at")
                rows = await pipe.execute()
        finally:
            await client.aclose()
        return min(float(r[0]) for r in rows), max(float(r[1]) for r in rows)

    async def cleanup(self, cfg: asyncnode.Config) -> None:
        broker = cfg.broker
        queues = [broker.queue, broker.queue + asyncnode.DLQ_SUFFIX]
        queues += sorted({asyncnode.retry_queue_name(broker, d) for d in broker.retry_delays})
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel()
            for name in queues:
                await channel.queue_delete(name, if_unused=False, if_empty=False)
        client = aioredis.from_url(cfg.redis.url)
        try:
            keys = [k async for k in client.scan_iter(match=cfg.redis.key_prefix + "*", count=1000)]
            for i in range(0, len(keys), 1000):
                await client.delete(*keys[i : i + 1000])
        finally:
            await client.aclose()

    async def versions(self) -> dict[str, str]:
        connection = await aio_pika.connect(RABBIT_URL)
        async with connection:
            rabbit = asyncnode.broker_version(connection)
        client = aioredis.from_url(REDIS_URL, decode_responses=True)
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
        return {"RabbitMQ": rabbit, "Redis": str(info.get("redis_version", "?"))}


class EmbeddedBackend(Backend):
    """One SQLite file in the trial's temporary folder: nothing outside it to clean up."""

    name = "embedded"

    def sections(self, tag: str) -> dict[str, dict[str, Any]]:
        return {"embedded": {"path": f"{tag}.db"}}

    def _query(self, cfg: asyncnode.Config, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # Read-only, so that the harness never takes the write lock the processes under test contend for.
        uri = f"file:{cfg.database}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            return db.execute(sql, params).fetchall()

    async def counts(self, cfg: asyncnode.Config) -> dict[str, int]:
        rows = await asyncio.to_thread(self._query, cfg, "SELECT status, n FROM stats")
        return {str(status): int(count) for status, count in rows}

    async def span(self, cfg: asyncnode.Config, ids: list[str]) -> tuple[float, float]:
        query = (
            "SELECT min(json_extract(record, '$.started_at')), max(json_extract(record, '$.finished_at')) FROM tasks"
        )
        rows = await asyncio.to_thread(self._query, cfg, query)
        first, last = rows[0]
        return float(first), float(last)

    async def versions(self) -> dict[str, str]:
        return {"SQLite": sqlite3.sqlite_version}


BACKENDS: dict[str, Backend] = {b.name: b for b in (RabbitBackend(), EmbeddedBackend())}


def embedded_supported() -> bool:
    """Whether this asyncnode has the embedded backend."""
    return "embedded" in getattr(asyncnode.Config, "SECTIONS", {})


# ============================================================================
# A trial's cluster: the API and workers of one config, under a fresh name
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Params:
    """What every trial is run with."""

    tasks: int
    clients: int
    workers: int


#: Trials whose queues and keys are not removed yet, for a last sweep after an interruption.
_DIRTY: dict[str, Cluster] = {}


class Cluster:
    """API and worker processes on one fresh config, in a temporary folder of their own."""

    def __init__(self, backend: Backend, workdir: Path) -> None:
        self.backend = backend
        self.workdir = workdir
        self.tag = f"bench-{uuid.uuid4().hex[:10]}"
        port = free_port()
        sections = {**backend.sections(self.tag), "api": {"host": "127.0.0.1", "port": port}}
        self.config = write_toml(workdir / "config.toml", sections)
        self.cfg = asyncnode.Config.from_toml(self.config, env={})
        self.base = f"http://127.0.0.1:{port}"
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.procs: list[Proc] = []
        _DIRTY[self.tag] = self

    def _start(self, role: str) -> Proc:
        proc = Proc(role, self.config, self.workdir / f"{role}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        """Start the API process."""
        self.api = self._start("api")

    def start_workers(self, count: int) -> None:
        """Start ``count`` worker processes."""
        self.workers += [self._start("worker") for _ in range(count)]

    def check(self) -> None:
        """Raise if any process that should be running has exited."""
        for proc in [self.api, *self.workers]:
            if proc is not None:
                proc.check()

    async def wait_ready(self, session: aiohttp.ClientSession, workers: int) -> None:
        """Wait until /readyz answers 200 and ``workers`` workers show in /api/workers."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check()
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(f"{self.base}/readyz") as resp:
                    ready = resp.status == 200
                if ready:
                    async with session.get(f"{self.base}/api/workers") as resp:
                        if len((await resp.json())["items"]) >= workers:
                            return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready with {workers} workers after {START_TIMEOUT:g} s")
            await asyncio.sleep(0.1)

    async def stop_api(self) -> None:
        """Stop the API process."""
        if self.api is not None:
            await self.api.stop()
            self.api = None

    async def close(self) -> None:
        """Stop every process, then remove what the trial left outside its folder."""
        await asyncio.gather(*(proc.stop() for proc in self.procs))
        await self.backend.cleanup(self.cfg)
        _DIRTY.pop(self.tag, None)

    def workers_cpu(self) -> float:
        """CPU seconds the worker processes have used so far."""
        return sum(w.cpu_seconds() for w in self.workers)

    def logs(self) -> str:
        """The end of every process's log."""
        return "\n".join(f"--- {p.log_path.name}\n{p.tail()}" for p in self.procs)


@contextlib.asynccontextmanager
async def cluster(backend: Backend, scratch: Path) -> AsyncIterator[Cluster]:
    """A Cluster in a fresh folder under ``scratch``; its processes, queues, keys and files go afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="trial-", dir=scratch))
    c = Cluster(backend, workdir)
    try:
        yield c
    except Exception:
        print(c.logs(), file=sys.stderr)
        raise
    finally:
        try:
            await c.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def http_session(clients: int) -> aiohttp.ClientSession:
    """One session, at most ``clients`` connections."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=60))


async def noop_body(session: aiohttp.ClientSession, base: str) -> bytes:
    """The body of a `noop` submission, after checking in /api/task-types that it needs no payload field."""
    async with session.get(f"{base}/api/task-types") as resp:
        types = {t["name"]: t for t in (await resp.json())["items"]}
    if "noop" not in types:
        raise RuntimeError(f"the API has no noop task type (it has {', '.join(sorted(types))})")
    required = [f["name"] for f in types["noop"].get("fields", []) if f.get("required")]
    if required:
        raise RuntimeError(f"noop now requires payload fields {required}; update the harness")
    return json.dumps({"type": "noop", "payload": {}}).encode()


@dataclasses.dataclass
class Submitted:
    """What a burst of submissions got: accepted ids with when each submit started, and the rest."""

    started: dict[str, float] = dataclasses.field(default_factory=dict)
    first: float = math.inf
    last_answer: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)


async def submit(session: aiohttp.ClientSession, base: str, body: bytes, params: Params) -> Submitted:
    """POST ``params.tasks`` tasks from ``params.clients`` concurrent clients."""
    out = Submitted()
    todo = iter(range(params.tasks))
    url, headers = f"{base}/api/tasks", {"Content-Type": "application/json"}

    async def client() -> None:
        for _ in todo:  # shared by every client: each task is submitted once
            t0 = time.monotonic()
            out.first = min(out.first, t0)
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.json()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                out.errors.append(f"{type(e).__name__}: {e}")
                continue
            out.last_answer = time.monotonic()
            if status == 202:
                out.started[answer["id"]] = t0
            else:
                out.errors.append(f"{status} {answer}")

    await asyncio.gather(*(client() for _ in range(params.clients)))
    if not out.started:
        raise RuntimeError(f"no task accepted; e.g. {out.errors[:3]}")
    return out


class Watcher:
    """A WebSocket client noting when each task's `completed` (or failure) arrives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.completed: dict[str, float] = {}
        self.failed: dict[str, Any] = {}
        self.closed: str | None = None

    async def run(self) -> None:
        """Read frames until the socket closes."""
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            now = time.monotonic()
            text = msg.data
            # Most frames are pending/started updates or stats: skip parsing those.
            if "completed" not in text and "failed" not in text and "rejected" not in text:
                continue
            data = json.loads(text)
            for update in data if isinstance(data, list) else (data,):
                status = update.get("status")
                if status == "completed":
                    self.completed.setdefault(update["id"], now)
                elif status in ("failed", "rejected"):
                    self.failed[update["id"]] = update.get("error")
        self.closed = f"WebSocket closed ({self.ws.close_code})"


async def wait_until(done: Callable[[], Awaitable[bool]], c: Cluster, timeout: float, what: str) -> None:
    """Poll ``done`` until true, failing if a process of ``c`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not await done():
        c.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL)


def drain_timeout(tasks: int) -> float:
    """Generous bound on how long draining ``tasks`` may take (a hang fails, a slow run does not)."""
    return 60.0 + tasks / 20


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ============================================================================
# Systems: each runs one trial and returns its metrics
# ============================================================================


async def asyncnode_end_to_end(backend: Backend, params: Params, scratch: Path) -> Metrics:
    """Submit N noop tasks over HTTP to a running API and workers; watch them complete on the WebSocket."""
    async with cluster(backend, scratch) as c, http_session(params.clients) as session:
        c.start_api()
        c.start_workers(params.workers)
        await c.wait_ready(session, params.workers)
        body = await noop_body(session, c.base)
        assert c.api is not None
        api_cpu, workers_cpu = c.api.cpu_seconds(), c.workers_cpu()
        async with session.ws_connect(f"{c.base}/ws", max_msg_size=0) as ws:
            watcher = Watcher(ws)
            reader = asyncio.create_task(watcher.run())
            try:
                sub = await submit(session, c.base, body, params)

                async def all_seen() -> bool:
                    if watcher.closed:
                        raise RuntimeError(watcher.closed)
                    return len(watcher.completed) + len(watcher.failed) >= len(sub.started)

                await wait_until(all_seen, c, drain_timeout(params.tasks), f"{len(sub.started)} completions")
                api_cpu, workers_cpu = c.api.cpu_seconds() - api_cpu, c.workers_cpu() - workers_cpu
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    if watcher.failed:
        raise RuntimeError(f"{len(watcher.failed)} tasks failed, e.g. {next(iter(watcher.failed.values()))}")
    n = len(sub.started)
    latencies = [watcher.completed[tid] - t0 for tid, t0 in sub.started.items()]
    last_completed = max(watcher.completed[tid] for tid in sub.started)
    return {
        "tasks": n,
        "errors": len(sub.errors),
        "seconds": last_completed - sub.first,
        "tasks_per_s": n / (last_completed - sub.first),
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "api_req_per_s": n / (sub.last_answer - sub.first),
        "api_cpu_ms_per_task": api_cpu / n * 1000,
        "workers_cpu_ms_per_task": workers_cpu / n * 1000,
    }


async def asyncnode_workers_alone(backend: Backend, params: Params, scratch: Path) -> Metrics:
    """Preload N noop tasks through the API with no worker, stop the API, time the workers draining them."""
    async with cluster(backend, scratch) as c, http_session(params.clients) as session:
        c.start_api()
        await c.wait_ready(session, 0)
        body = await noop_body(session, c.base)
        assert c.api is not None
        api_cpu = c.api.cpu_seconds()
        sub = await submit(session, c.base, body, params)
        api_cpu = c.api.cpu_seconds() - api_cpu
        await c.stop_api()
        n = len(sub.started)
        spawned = time.time()
        c.start_workers(params.workers)
        # Workers' CPU from their first task on, not their start-up (imports, connections).
        workers_cpu: float | None = None

        async def drained() -> bool:
            nonlocal workers_cpu
            counts = await backend.counts(c.cfg)
            if counts.get("failed"):
                raise RuntimeError(f"{counts['failed']} tasks failed")
            if workers_cpu is None and counts.get("started"):
                workers_cpu = c.workers_cpu()
            return counts.get("completed", 0) >= n

        await wait_until(drained, c, drain_timeout(params.tasks), f"{n} tasks drained")
        workers_cpu = c.workers_cpu() - (workers_cpu or 0.0)
        first_started, last_finished = await backend.span(c.cfg, list(sub.started))
    return {
        "tasks": n,
        "errors": len(sub.errors),
        "seconds": last_finished - first_started,
        "tasks_per_s": n / (last_finished - first_started),
        "startup_s": first_started - spawned,
        "api_req_per_s": n / (sub.last_answer - sub.first),
        "api_cpu_ms_per_task": api_cpu / n * 1000,
        "workers_cpu_ms_per_task": workers_cpu / n * 1000,
    }


@dataclasses.dataclass(frozen=True)
class System:
    """One contender: a name and a coroutine running one trial of it."""

    name: str
    trial: Callable[[Params, Path], Awaitable[Metrics]]


def asyncnode_systems(backends: list[str]) -> list[System]:
    """asyncnode end to end and workers alone, on each backend."""
    systems = []
    for name in backends:
        backend = BACKENDS[name]
        systems.append(System(f"asyncnode end to end ({name})", _bind(asyncnode_end_to_end, backend)))
        systems.append(System(f"asyncnode workers alone ({name})", _bind(asyncnode_workers_alone, backend)))
    return systems


def _bind(
    trial: Callable[[Backend, Params, Path], Awaitable[Metrics]], backend: Backend
) -> Callable[[Params, Path], Awaitable[Metrics]]:
    async def run(params: Params, scratch: Path) -> Metrics:
        return await trial(backend, params, scratch)

    return run


# ============================================================================
# Machine, report, main
# ============================================================================


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


async def machine(backends: list[str]) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "os": platform.platform(terse=True),
        "Python": platform.python_version(),
        "asyncnode": asyncnode.__version__,
    }
    for name in backends:
        info |= await BACKENDS[name].versions()
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


#: Table columns: heading and metric.
COLUMNS = (
    ("tasks/s", "tasks_per_s"),
    ("submit→completed p50 (ms)", "latency_p50_ms"),
    ("p99 (ms)", "latency_p99_ms"),
    ("API submits/s", "api_req_per_s"),
    ("API CPU ms/task", "api_cpu_ms_per_task"),
    ("workers CPU ms/task", "workers_cpu_ms_per_task"),
)


def table(results: dict[str, list[Metrics]]) -> str:
    """Median and min-max of each metric per system, as Markdown."""
    lines = ["| system | runs | " + " | ".join(h for h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, trials in results.items():
        ok = [t for t in trials if "error" not in t]
        cells = []
        for _, key in COLUMNS:
            values = [t[key] for t in ok if key in t]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(_fmt(values[0]))
            else:
                cells.append(f"{_fmt(statistics.median(values))} ({_fmt(min(values))}\u2013{_fmt(max(values))})")
        lines.append(f"| {name} | {len(ok)}/{len(trials)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round runs every system once, in the same order."""
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background, where SIGINT is ignored
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)
    params = Params(tasks=args.tasks, clients=args.clients, workers=args.workers)
    systems = asyncnode_systems(args.backends)
    info = await machine(args.backends)
    results: dict[str, list[Metrics]] = {s.name: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="asyncnode-bench-") as scratch:
        for round_no in range(1, args.rounds + 1):
            for system in systems:
                t0 = time.monotonic()
                try:
                    metrics = await system.trial(params, Path(scratch))
                except Exception as e:  # one failed trial is reported; the others still run
                    traceback.print_exc()
                    metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                metrics["round"] = round_no
                results[system.name].append(metrics)
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
                print(f"round {round_no}/{args.rounds} {system.name} ({time.monotonic() - t0:.0f} s): {shown}")
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {"machine": info, "params": dataclasses.asdict(params) | {"rounds": args.rounds}, "results": results}


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters and the table, ready to paste into the README."""
    info, params = out["machine"], out["params"]
    broker = asyncnode.BrokerConfig()
    services = ", ".join(f"{k} {info[k]}" for k in ("RabbitMQ", "Redis", "SQLite") if k in info)
    return "\n".join(
        [
            f"- Machine: {info['cores']} cores, {info['cpu']}; {info['os']}; Python {info['Python']}; {services}",
            f"- Load average at start / end: {info['load average at start']} / {info['load average at end']}",
            f"- {params['tasks']} `noop` tasks per trial, {params['clients']} HTTP clients, {params['workers']} "
            f"worker processes, prefetch {broker.prefetch}, {broker.queue_type} queue (RabbitMQ backend); "
            f"{params['rounds']} rounds, systems alternated; median (min\u2013max)",
            "- End to end: tasks/s is N over first submit to last `completed` on the WebSocket; latency is from a "
            "submit's start to its `completed` on the WebSocket, under the whole burst (queueing included)",
            "- Workers alone: tasks/s is N over the first task's `started_at` to the last one's `finished_at`, "
            "draining a preloaded queue with the API stopped; the API columns are from the preload",
            "- CPU: user + system time of asyncnode's own processes per task (RabbitMQ, Redis and the load "
            "generator not counted)",
            "",
            table(out["results"]),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per trial (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every system once (default 3)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--backends",
        type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
        help="comma-separated: rabbitmq, embedded (default: every backend this asyncnode has)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 tasks, one round")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every trial's figures to PATH")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.rounds = min(args.tasks, 200), 1
    if args.backends is None:
        args.backends = ["rabbitmq", *(["embedded"] if embedded_supported() else [])]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        parser.error(f"unknown backend {unknown}; choose from {', '.join(BACKENDS)}")
    if args.tasks < 1 or args.rounds < 1 or args.clients < 1 or args.workers < 1:
        parser.error("--tasks, --rounds, --clients and --workers must be at least 1")
    try:
        out = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _kill_leftovers()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(report(out))
    failed = sum("error" in t for trials in out["results"].values() for t in trials)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
