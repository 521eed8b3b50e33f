"""Throughput figures for the README, side by side with the peers and the limit: `make bench`.

Systems, each one trial at a time, alternated round after round (A B A B ...) so that whatever
else the machine is doing falls on every system alike; each with 2 worker processes, persistent
messages on durable queues and no-op tasks, N sized so that a trial lasts about --seconds:
  - asyncnode end to end, per backend: one API and 2 worker processes; 64 HTTP clients submit N
    `noop` tasks while one WebSocket client watches. Throughput is N over the time from the first
    submit to the last `completed` seen on the WebSocket; latency is from a submit's start to its
    `completed` on the WebSocket.
  - asyncnode workers alone: N task envelopes recorded and published straight to the queue
    (asyncnode's own adapters, confirmed) with no worker running, then 2 workers started and timed
    from the first task they started to the last they finished (the tasks' own `started_at` and
    `finished_at`). Per backend, and on RabbitMQ also with a classic queue at prefetch 1, at
    prefetch 50 and (when asyncnode has it) with `[worker] concurrency = 32`.
  - Celery 5 (RabbitMQ with publisher confirms, Redis results, prefork, 2 processes): "strict"
    (acks late, prefetch 1: asyncnode's delivery guarantee) and "default" (acks early, prefetch x4),
    and Dramatiq (RabbitMQ with confirms, Redis results, 2 processes x 1 thread): a producer process
    (bench/peers/) sends N tasks from --producer-threads threads; completions are seen on the result
    backend's pub/sub.
  - The limit: bench/raw_worker.py (aio-pika + redis.asyncio doing exactly asyncnode's per-task
    work and nothing else), 2 processes draining a preloaded queue: classic at prefetch 1 and 50,
    quorum at prefetch 1.
  - The API alone: `POST /api/tasks` at 64 concurrent connections for --seconds (wrk, else an
    aiohttp client) against asyncnode's API with no worker (per backend) and against
    bench/minimal_api.py (HSET + PUBLISH + confirmed publish per request, one process).
Every trial starts its processes afresh on its own queue, key prefix or SQLite file, and removes
them afterwards (also when interrupted). Prints the machine, a Markdown table (median, min-max)
and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
sys.path.insert(0, str(ROOT))

import asyncnode  # noqa: E402

#: The shared services the RabbitMQ backend and the peers run against (never stopped here).
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
#: Seconds between polls of a drain's progress (counters, queue depth).
POLL_INTERVAL = 0.05
#: Tasks recorded and published (each awaiting its own confirm) at once while preloading a queue: as many
#: as the HTTP clients of an end-to-end trial (more can exhaust redis-py's pool of 100 connections).
PRELOAD_WINDOW = 64
#: Bounds of a trial's N when it is sized from a rate.
MIN_TASKS, MAX_TASKS = 200, 100_000
#: The body every HTTP submission posts.
NOOP_BODY = json.dumps({"type": "noop", "payload": {}}).encode()

Metrics = dict[str, Any]


# ============================================================================
# Processes
# ============================================================================

#: Every process started and not yet reaped, so that an interrupted run can still stop them (by pid).
_LIVE: set[subprocess.Popen[bytes]] = set()


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    return env | (extra or {})


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cpu_of(fields: list[bytes]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used so far (Linux /proc; 0 elsewhere)."""
    fields = _stat(pid)
    return 0.0 if fields is None else _cpu_of(fields)


def tree_cpu(root: int) -> float:
    """User and system CPU seconds of ``root`` and all its descendants now alive (Linux /proc; 0 elsewhere)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields is not None:
                    parent[int(entry.name)], cpu[int(entry.name)] = int(fields[1]), _cpu_of(fields)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [child for child, ppid in parent.items() if ppid == pid]
    return total


class Proc:
    """One subprocess in a session of its own, logging to a file; stopped by pid (then its group)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        tree: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.tree = tree  # count the CPU of its children too (prefork pools, process-per-worker CLIs)
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env if env is not None else _child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the harness only, which stops everything in order
            )
        _LIVE.add(self.popen)

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.popen.pid

    def check(self) -> None:
        """Raise if the process has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} pid {self.popen.pid} exited with {self.popen.returncode}:\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """User and system CPU time it (and, with ``tree``, its children) has used so far."""
        return tree_cpu(self.popen.pid) if self.tree else cpu_seconds(self.popen.pid)

    def tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait(self, timeout: float) -> int:
        """Wait for it to exit by itself; raise if it has not after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} still running after {timeout:g} s:\n{self.tail()}")
            await asyncio.sleep(POLL_INTERVAL)
        return self.popen.returncode

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time; then whatever of its group is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait, 5)
        _kill_group(self.popen.pid)
        _LIVE.discard(self.popen)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group a Proc started (its pid is the group's id)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_RABBIT_PID: list[int] = []


async def services_cpu() -> float:
    """CPU seconds the shared RabbitMQ node and Redis have used so far (RabbitMQ's pid asked of rabbitmqctl once)."""
    if not _RABBIT_PID:
        out = await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "eval", "os:getpid()."], capture_output=True)
        _RABBIT_PID.append(int(out.stdout.decode().strip().strip('"') or 0) if out.returncode == 0 else 0)
    rabbit = cpu_seconds(_RABBIT_PID[0]) if _RABBIT_PID[0] else 0.0
    client = aioredis.from_url(REDIS_URL)
    try:
        info = await client.info("cpu")
    finally:
        await client.aclose()
    return rabbit + float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def asyncnode_proc(role: str, config: Path, log_path: Path) -> Proc:
    """``python -m asyncnode <role> --config <config>``, as ``up`` starts it (with cached bytecode)."""
    argv = [sys.executable, "-m", "asyncnode", role, "--config", str(config), "--log-level", "WARNING"]
    return Proc(role, argv, log_path)


#: Cleanups of what trials created outside their folders, not done yet: a last sweep after an interruption.
_DIRTY: dict[str, Callable[[], Awaitable[None]]] = {}


def kill_leftovers() -> None:
    """Last resort after an interrupted cleanup: kill what is still running, by pid, and sweep."""
    for popen in list(_LIVE):
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        _kill_group(popen.pid)
        _LIVE.discard(popen)
    if _DIRTY:
        asyncio.run(_cleanup_leftovers())


async def _cleanup_leftovers() -> None:
    for tag, cleanup in list(_DIRTY.items()):
        try:
            await cleanup()
        except Exception as e:  # best effort: say what is left behind
            print(f"could not clean up {tag}: {e}", file=sys.stderr)
        _DIRTY.pop(tag, None)


@contextlib.asynccontextmanager
async def leaving_nothing(tag: str, cleanup: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run ``cleanup`` afterwards, and also in the last sweep if it could not run."""
    _DIRTY[tag] = cleanup
    try:
        yield
    finally:
        await cleanup()
        _DIRTY.pop(tag, None)


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


def new_tag() -> str:
    """A fresh name for a trial's queues and key prefix."""
    return f"bench-{uuid.uuid4().hex[:10]}"


async def delete_queues(names: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete queues (quorum ones too: if_unused and if_empty off) and exchanges on the shared RabbitMQ."""
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in exchanges:
            await channel.exchange_delete(name)


async def delete_keys(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every Redis key starting with ``prefix``."""
    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()


async def wait_for(
    done: Callable[[], Awaitable[bool] | bool], procs: Iterable[Proc], timeout: float, what: str
) -> None:
    """Poll ``done`` until true, failing if one of ``procs`` exits or ``timeout`` passes."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        result = done()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        for proc in procs:
            proc.check()
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


async def lanes(work: Callable[[Any], Awaitable[None]], items: Iterable[Any], width: int) -> None:
    """Run ``work`` on every item, ``width`` at a time."""
    todo = iter(items)

    async def lane() -> None:
        for item in todo:  # shared by every lane: each item is taken once
            await work(item)

    await asyncio.gather(*(lane() for _ in range(width)))


# ============================================================================
# asyncnode's backends: how a trial configures asyncnode, watches its progress and cleans up
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
        return await redis_span(cfg.redis.url, cfg.redis.key_prefix, ids)

    async def cleanup(self, cfg: asyncnode.Config) -> None:
        broker = cfg.broker
        queues = [broker.queue, broker.queue + asyncnode.DLQ_SUFFIX]
        queues += sorted({asyncnode.retry_queue_name(broker, d) for d in broker.retry_delays})
        await delete_queues(queues)
        await delete_keys(cfg.redis.key_prefix, cfg.redis.url)

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


async def redis_span(url: str, prefix: str, ids: list[str]) -> tuple[float, float]:
    """The earliest ``started_at`` and the latest ``finished_at`` in the hashes ``<prefix><id>``."""
    client = aioredis.from_url(url, decode_responses=True)
    try:
        rows: list[Any] = []
        for i in range(0, len(ids), 5000):
            async with client.pipeline(transaction=False) as pipe:
                for tid in ids[i : i + 5000]:
                    pipe.hmget(prefix + tid, "started_at", "finished_at")
                rows += await pipe.execute()
    finally:
        await client.aclose()
    return min(float(r[0]) for r in rows), max(float(r[1]) for r in rows)


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


def worker_concurrency_supported() -> bool:
    """Whether this asyncnode has ``[worker] concurrency``."""
    return "concurrency" in {f.name for f in dataclasses.fields(asyncnode.WorkerConfig)}


# ============================================================================
# A trial's cluster: the API and workers of one config, under a fresh name
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Trial:
    """What one trial is run with."""

    tasks: int  # N, for the systems that run a fixed number of tasks
    seconds: float  # how long a load generator runs, for the API-alone systems
    clients: int
    workers: int
    scratch: Path
    producer_threads: int = 16  # the peers' producer process
    rate: float = 0.0  # submissions per second for a paced run (0: all at once, from ``clients`` clients)


class Cluster:
    """API and worker processes on one fresh config, in a temporary folder of their own."""

    def __init__(self, backend: Backend, workdir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.backend = backend
        self.workdir = workdir
        self.tag = new_tag()
        port = free_port()
        sections = {**backend.sections(self.tag), "api": {"host": "127.0.0.1", "port": port}}
        for name, values in (overrides or {}).items():
            sections[name] = sections.get(name, {}) | values
        self.config = write_toml(workdir / "config.toml", sections)
        self.cfg = asyncnode.Config.from_toml(self.config, env={})
        self.base = f"http://127.0.0.1:{port}"
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.procs: list[Proc] = []

    def _start(self, role: str) -> Proc:
        proc = asyncnode_proc(role, self.config, self.workdir / f"{role}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        """Start the API process."""
        self.api = self._start("api")

    def start_workers(self, count: int) -> None:
        """Start ``count`` worker processes."""
        self.workers += [self._start("worker") for _ in range(count)]

    def running(self) -> list[Proc]:
        """The processes that should be running."""
        return [p for p in [self.api, *self.workers] if p is not None]

    def check(self) -> None:
        """Raise if any of them has exited."""
        for proc in self.running():
            proc.check()

    async def wait_ready(self, session: aiohttp.ClientSession, workers: int) -> None:
        """Wait until /readyz answers 200 and ``workers`` workers show in /api/workers."""

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(f"{self.base}/readyz") as resp:
                    if resp.status != 200:
                        return False
                async with session.get(f"{self.base}/api/workers") as resp:
                    return len((await resp.json())["items"]) >= workers
            return False

        await wait_for(ready, self.running(), START_TIMEOUT, f"the API ready with {workers} workers")

    async def stop_api(self) -> None:
        """Stop the API process."""
        if self.api is not None:
            await self.api.stop()
            self.api = None

    async def close(self) -> None:
        """Stop every process."""
        await asyncio.gather(*(proc.stop() for proc in self.procs))

    def workers_cpu(self) -> float:
        """CPU seconds the worker processes have used so far."""
        return sum(w.cpu_seconds() for w in self.workers)

    def logs(self) -> str:
        """The end of every process's log."""
        return "\n".join(f"--- {p.log_path.name}\n{p.tail()}" for p in self.procs)


@contextlib.asynccontextmanager
async def workdir(scratch: Path) -> AsyncIterator[Path]:
    """A fresh folder under ``scratch``, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="trial-", dir=scratch))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def own_queue(scratch: Path) -> AsyncIterator[tuple[Path, str]]:
    """A fresh folder under ``scratch`` and a fresh tag; the queue named by the tag and its ``<tag>:`` keys
    are deleted afterwards."""
    tag = new_tag()

    async def cleanup() -> None:
        await delete_queues([tag])
        await delete_keys(f"{tag}:")

    async with workdir(scratch) as path, leaving_nothing(tag, cleanup):
        yield path, tag


@contextlib.asynccontextmanager
async def cluster(
    backend: Backend,
    scratch: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    make: Callable[[Backend, Path, dict[str, dict[str, Any]] | None], Cluster] | None = None,
) -> AsyncIterator[Cluster]:
    """A Cluster (or what ``make`` makes of the same arguments) in a fresh folder under ``scratch``; its processes,
    queues, keys and files go afterwards."""
    async with workdir(scratch) as path:
        c = (make or Cluster)(backend, path, overrides)

        async def cleanup() -> None:
            try:
                await c.close()
            finally:
                await backend.cleanup(c.cfg)

        async with leaving_nothing(c.tag, cleanup):
            try:
                yield c
            except Exception:
                print(c.logs(), file=sys.stderr)
                raise


# ============================================================================
# HTTP load: submissions by N, load for a duration (wrk or aiohttp), the WebSocket watcher
# ============================================================================


def http_session(clients: int) -> aiohttp.ClientSession:
    """One session, at most ``clients`` connections."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=60))


async def check_noop(session: aiohttp.ClientSession, base: str) -> None:
    """Check in /api/task-types that `noop` exists and needs no payload field."""
    async with session.get(f"{base}/api/task-types") as resp:
        types = {t["name"]: t for t in (await resp.json())["items"]}
    if "noop" not in types:
        raise RuntimeError(f"the API has no noop task type (it has {', '.join(sorted(types))})")
    required = [f["name"] for f in types["noop"].get("fields", []) if f.get("required")]
    if required:
        raise RuntimeError(f"noop now requires payload fields {required}; update the harness")


async def post_once(session: aiohttp.ClientSession, url: str) -> None:
    """One submission, which must be accepted (it also opens the API's lazy connections)."""
    async with session.post(url, data=NOOP_BODY, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 202:
            raise RuntimeError(f"POST {url}: {resp.status} {await resp.text()}")


@dataclasses.dataclass
class Submitted:
    """What a burst of submissions got: accepted ids with when each submit started, and the rest."""

    started: dict[str, float] = dataclasses.field(default_factory=dict)
    answer_ms: list[float] = dataclasses.field(default_factory=list)
    first: float = math.inf
    last_answer: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)


async def submit(session: aiohttp.ClientSession, base: str, tasks: int, clients: int, rate: float = 0.0) -> Submitted:
    """POST ``tasks`` tasks from ``clients`` concurrent clients; or, with ``rate``, one every 1/rate s
    (each on its own, whether or not the earlier ones were answered: an open-loop load)."""
    out = Submitted()
    url, headers = f"{base}/api/tasks", {"Content-Type": "application/json"}
    start = time.monotonic()

    async def client(i: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))  # the schedule, not a wait on an event
        t0 = time.monotonic()
        out.first = min(out.first, t0)
        try:
            async with session.post(url, data=NOOP_BODY, headers=headers) as resp:
                answer = await resp.json()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            out.errors.append(f"{type(e).__name__}: {e}")
            return
        out.last_answer = time.monotonic()
        if status == 202:
            out.started[answer["id"]] = t0
            out.answer_ms.append((out.last_answer - t0) * 1000)
        else:
            out.errors.append(f"{status} {answer}")

    if rate:
        await asyncio.gather(*(client(i) for i in range(tasks)))
    else:
        await lanes(client, range(tasks), clients)
    if not out.started:
        raise RuntimeError(f"no task accepted; e.g. {out.errors[:3]}")
    return out


#: The HTTP load generator: "wrk" (C, not the bottleneck) when installed, else "aiohttp"; set by main().
GENERATOR = "wrk"


async def http_load(url: str, clients: int, seconds: float, scratch: Path) -> Metrics:
    """POST `noop` tasks to ``url`` from ``clients`` connections for ``seconds``; req/s and latency."""
    if GENERATOR == "wrk":
        return await wrk_load(url, clients, seconds, scratch)
    return await aiohttp_load(url, clients, seconds)


async def wrk_load(url: str, clients: int, seconds: float, scratch: Path) -> Metrics:
    """wrk with bench/wrk_post.lua, one thread (a few % of a core at these rates)."""
    argv = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    proc = Proc("wrk", [*argv, "-s", str(BENCH / "wrk_post.lua"), url], scratch / f"wrk-{uuid.uuid4().hex[:6]}.log")
    try:
        code = await proc.wait(seconds + 30)
    finally:
        await proc.stop()
    lines = [line for line in proc.tail(20000).splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"wrk failed ({code}):\n{proc.tail()}")
    out = json.loads(lines[-1])
    proc.log_path.unlink(missing_ok=True)
    errors = sum(out[k] for k in ("connect", "read", "write", "status", "timeout"))
    ok = out["requests"] - out["status"]
    return {
        "requests": out["requests"],
        "errors": errors,
        "api_req_per_s": ok / (out["duration_us"] / 1e6),
        "api_p50_ms": out["p50_us"] / 1000,
        "api_p99_ms": out["p99_us"] / 1000,
    }


async def aiohttp_load(url: str, clients: int, seconds: float) -> Metrics:
    """The fallback generator: ``clients`` aiohttp coroutines in this process, each one request at a time."""
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    async with http_session(clients) as session:
        deadline = time.monotonic() + seconds

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    async with session.post(url, data=NOOP_BODY, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 202
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.monotonic() - t0)
                else:
                    errors += 1

        start = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.monotonic() - start
    if not latencies:
        raise RuntimeError(f"no request to {url} succeeded")
    return {
        "requests": len(latencies) + errors,
        "errors": errors,
        "api_req_per_s": len(latencies) / elapsed,
        "api_p50_ms": percentile(latencies, 50) * 1000,
        "api_p99_ms": percentile(latencies, 99) * 1000,
    }


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


# ============================================================================
# Systems: asyncnode
# ============================================================================


async def asyncnode_end_to_end(backend: Backend, overrides: dict[str, dict[str, Any]], trial: Trial) -> Metrics:
    """Submit N noop tasks over HTTP to a running API and workers; watch them complete on the WebSocket."""
    async with cluster(backend, trial.scratch, overrides) as c, http_session(trial.clients) as session:
        c.start_api()
        c.start_workers(trial.workers)
        await c.wait_ready(session, trial.workers)
        await check_noop(session, c.base)
        assert c.api is not None
        api_cpu, workers_cpu, served = c.api.cpu_seconds(), c.workers_cpu(), await services_cpu()
        async with session.ws_connect(f"{c.base}/ws", max_msg_size=0) as ws:
            watcher = Watcher(ws)
            reader = asyncio.create_task(watcher.run())
            try:
                sub = await submit(session, c.base, trial.tasks, trial.clients, trial.rate)

                def all_seen() -> bool:
                    if watcher.closed:
                        raise RuntimeError(watcher.closed)
                    return len(watcher.completed) + len(watcher.failed) >= len(sub.started)

                what = f"{len(sub.started)} completions"
                await wait_for(all_seen, c.running(), drain_timeout(trial.tasks), what)
                api_cpu, workers_cpu = c.api.cpu_seconds() - api_cpu, c.workers_cpu() - workers_cpu
                served = await services_cpu() - served
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
        "api_p50_ms": percentile(sub.answer_ms, 50),
        "api_p99_ms": percentile(sub.answer_ms, 99),
        "api_cpu_ms_per_task": api_cpu / n * 1000,
        "workers_cpu_ms_per_task": workers_cpu / n * 1000,
        **({"services_cpu_ms_per_task": served / n * 1000} if backend.name == "rabbitmq" else {}),
    }


async def preload_asyncnode(cfg: asyncnode.Config, tasks: int) -> list[str]:
    """Record and queue ``tasks`` noop tasks through asyncnode's own adapters, as its API would (confirmed)."""
    queue, store = asyncnode.open_backend(cfg, "api")
    ids = [asyncnode.new_task_id() for _ in range(tasks)]

    async def one(tid: str) -> None:
        change = asyncnode.plan_change("submitted", tid, "noop", {"payload": {}}, tasks=cfg.tasks)
        await store.apply(change)
        await queue.publish(asyncnode.Envelope(tid, "noop", {}, created_at=change.at))

    try:
        await lanes(one, ids, PRELOAD_WINDOW)
    finally:
        await queue.close()
        await store.close()
    return ids


async def asyncnode_workers_alone(backend: Backend, overrides: dict[str, dict[str, Any]], trial: Trial) -> Metrics:
    """Preload N noop tasks with no worker running, then time 2 fresh workers draining them."""
    async with cluster(backend, trial.scratch, overrides) as c:
        t0 = time.monotonic()
        ids = await preload_asyncnode(c.cfg, trial.tasks)
        preload_s = time.monotonic() - t0
        n = len(ids)
        spawned, served = time.time(), await services_cpu()
        c.start_workers(trial.workers)
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

        await wait_for(drained, c.running(), drain_timeout(n), f"{n} tasks drained")
        workers_cpu = c.workers_cpu() - (workers_cpu or 0.0)
        served = await services_cpu() - served
        first_started, last_finished = await backend.span(c.cfg, ids)
    metrics = drain_metrics(n, (spawned, first_started, last_finished), preload_s, workers_cpu)
    return metrics | ({"services_cpu_ms_per_task": served / n * 1000} if backend.name == "rabbitmq" else {})


def drain_metrics(n: int, times: tuple[float, float, float], preload_s: float, workers_cpu: float) -> Metrics:
    """A drain's figures, alike for asyncnode's workers and the raw script: ``times`` are when the workers
    were spawned, the first ``started_at`` and the last ``finished_at`` (epoch seconds)."""
    spawned, first_started, last_finished = times
    return {
        "tasks": n,
        "seconds": last_finished - first_started,
        "tasks_per_s": n / (last_finished - first_started),
        "startup_s": first_started - spawned,
        "preload_per_s": n / preload_s,
        "workers_cpu_ms_per_task": workers_cpu / n * 1000,
    }


async def asyncnode_api_alone(backend: Backend, trial: Trial) -> Metrics:
    """The API process with no worker: `POST /api/tasks` for ``trial.seconds`` at ``trial.clients`` connections."""
    async with cluster(backend, trial.scratch) as c:
        c.start_api()
        async with http_session(4) as session:
            await c.wait_ready(session, 0)
            await check_noop(session, c.base)
            await post_once(session, f"{c.base}/api/tasks")
        assert c.api is not None
        api_cpu = c.api.cpu_seconds()
        load = await http_load(f"{c.base}/api/tasks", trial.clients, trial.seconds, trial.scratch)
        c.api.check()
        api_cpu = c.api.cpu_seconds() - api_cpu
    return load | {"api_cpu_ms_per_task": api_cpu / load["requests"] * 1000}


# ============================================================================
# Systems: the limit (bench/raw_worker.py) and the minimal API (bench/minimal_api.py)
# ============================================================================


def envelope(tid: str) -> bytes:
    """A noop task's envelope, as asyncnode publishes it."""
    return asyncnode.Envelope(tid, "noop", {}).encode()


async def preload_raw(queue: str, queue_type: str, prefix: str, tasks: int) -> list[str]:
    """Declare ``queue`` and fill it with ``tasks`` persistent, confirmed envelopes, each with its pending hash."""
    ids = [asyncnode.new_task_id() for _ in range(tasks)]
    client = aioredis.from_url(REDIS_URL)
    try:
        for i in range(0, tasks, 2000):
            async with client.pipeline(transaction=False) as pipe:
                for tid in ids[i : i + 2000]:
                    fields = {
                        "id": tid,
                        "type": "noop",
                        "status": "pending",
                        "payload": "{}",
                        "created_at": time.time(),
                    }
                    pipe.hset(prefix + tid, mapping=fields)
                await pipe.execute()
    finally:
        await client.aclose()
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": queue_type})

        async def one(tid: str) -> None:
            message = aio_pika.Message(
                envelope(tid),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
                message_id=tid,
            )
            await channel.default_exchange.publish(message, queue, mandatory=True)

        await lanes(one, ids, PRELOAD_WINDOW)
    return ids


async def raw_drain(queue_type: str, prefetch: int, trial: Trial) -> Metrics:
    """2 raw workers draining a preloaded queue; timed from the first `started_at` to the last `finished_at`."""
    async with own_queue(trial.scratch) as (path, tag):
        prefix = f"{tag}:"
        t0 = time.monotonic()
        ids = await preload_raw(tag, queue_type, prefix, trial.tasks)
        preload_s = time.monotonic() - t0
        argv = [sys.executable, str(BENCH / "raw_worker.py"), "--queue", tag, "--key-prefix", prefix]
        argv += [
            "--channel",
            f"{tag}:updates",
            "--prefetch",
            str(prefetch),
            "--rabbit",
            RABBIT_URL,
            "--redis",
            REDIS_URL,
        ]
        spawned, served = time.time(), await services_cpu()
        workers = [Proc(f"raw worker {i}", argv, path / f"raw-{i}.log") for i in range(trial.workers)]
        try:
            workers_cpu = await _watch_drain(tag, prefix, ids, workers)
            served = await services_cpu() - served
        finally:
            await asyncio.gather(*(w.stop() for w in workers))
        first_started, last_finished = await redis_span(REDIS_URL, prefix, ids)
    n = len(ids)
    metrics = drain_metrics(n, (spawned, first_started, last_finished), preload_s, workers_cpu)
    return metrics | {"services_cpu_ms_per_task": served / n * 1000}


async def _watch_drain(queue: str, prefix: str, ids: list[str], workers: list[Proc]) -> float:
    """Wait until every task's hash says completed; return the workers' CPU seconds from their first delivery.

    Cheap on the machine under test: the queue's depth every POLL_INTERVAL; the hashes only once the
    queue is empty (then only those not yet completed).
    """
    connection = await aio_pika.connect(RABBIT_URL)
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    remaining = list(ids)
    cpu0: float | None = None
    try:
        channel = await connection.channel()

        async def drained() -> bool:
            nonlocal remaining, cpu0
            ready = (await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0
            if cpu0 is None and ready < len(ids):
                cpu0 = sum(w.cpu_seconds() for w in workers)
            if ready:
                return False
            async with client.pipeline(transaction=False) as pipe:
                for tid in remaining:
                    pipe.hget(prefix + tid, "status")
                statuses = await pipe.execute()
            remaining = [tid for tid, status in zip(remaining, statuses, strict=True) if status != "completed"]
            return not remaining

        await wait_for(drained, workers, drain_timeout(len(ids)), f"{len(ids)} tasks drained")
        return sum(w.cpu_seconds() for w in workers) - (cpu0 or 0.0)
    finally:
        await client.aclose()
        await connection.close()


async def minimal_api(trial: Trial) -> Metrics:
    """bench/minimal_api.py on the quorum queue asyncnode's API uses by default, under the same load."""
    async with own_queue(trial.scratch) as (path, tag):
        prefix = f"{tag}:"
        port = free_port()
        argv = [sys.executable, str(BENCH / "minimal_api.py"), "--port", str(port), "--queue", tag]
        argv += ["--queue-type", asyncnode.BrokerConfig().queue_type, "--key-prefix", prefix]
        argv += ["--channel", f"{tag}:updates", "--rabbit", RABBIT_URL, "--redis", REDIS_URL]
        api = Proc("minimal API", argv, path / "minimal-api.log")
        try:
            base = f"http://127.0.0.1:{port}"
            async with http_session(4) as session:

                async def up() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{base}/healthz") as resp:
                            return resp.status == 200
                    return False

                await wait_for(up, [api], START_TIMEOUT, "the minimal API")
                await post_once(session, f"{base}/api/tasks")
            cpu = api.cpu_seconds()
            load = await http_load(f"{base}/api/tasks", trial.clients, trial.seconds, trial.scratch)
            api.check()
            cpu = api.cpu_seconds() - cpu
        except Exception:
            print(api.tail(), file=sys.stderr)
            raise
        finally:
            await api.stop()
    return load | {"api_cpu_ms_per_task": cpu / load["requests"] * 1000}


# ============================================================================
# Systems: the peers (bench/peers/), each worker fleet fed by a producer process
# ============================================================================


class Completions:
    """One Redis subscription noting when each task's completion is published (no polling)."""

    def __init__(self, parse: Callable[[bytes, bytes], tuple[str, bool] | None]) -> None:
        self.parse = parse  # (channel, data) -> (task id, succeeded), or None to ignore
        self.done: dict[str, float] = {}
        self.failed: dict[str, bytes] = {}
        self.client = aioredis.from_url(REDIS_URL)
        self.pubsub = self.client.pubsub()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, *, channel: str = "", pattern: str = "") -> None:
        """Subscribe (before anything is sent) and start reading."""
        if pattern:
            await self.pubsub.psubscribe(pattern)
        else:
            await self.pubsub.subscribe(channel)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] not in ("message", "pmessage"):
                continue
            now = time.time()
            parsed = self.parse(msg["channel"], msg["data"])
            if parsed is not None:
                tid, ok = parsed
                if ok:
                    self.done.setdefault(tid, now)
                else:
                    self.failed[tid] = msg["data"]

    def check(self) -> None:
        """Raise if the reader has stopped."""
        if self._reader is not None and self._reader.done():
            raise RuntimeError(f"result subscription ended: {self._reader.exception()!r}")

    async def close(self) -> None:
        """Stop reading and close the connection."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self.pubsub.aclose()
        await self.client.aclose()


def peer_env(tag: str, prefix: str, ready: Path, threads: int, **extra: str) -> dict[str, str]:
    """The environment of a peer's worker and producer processes."""
    env = {
        "BENCH_RABBIT_URL": RABBIT_URL,
        "BENCH_REDIS_URL": REDIS_URL,
        "BENCH_QUEUE": tag,
        "BENCH_PREFIX": prefix,
        "BENCH_READY": str(ready),
        "BENCH_THREADS": str(threads),
        "PYTHONPATH": str(PEERS),
    }
    return _child_env(env | extra)


async def peer_end_to_end(
    worker_argv: list[str], module: str, ready_files: int, completions: Completions, env: dict[str, str], trial: Trial
) -> Metrics:
    """Start the peer's worker fleet, then a producer process sending N tasks; time them to their results."""
    ready = Path(env["BENCH_READY"])
    ready.mkdir()
    path = ready.parent
    fleet = Proc(module, worker_argv, path / "worker.log", env=env, cwd=PEERS, tree=True)
    producer: Proc | None = None
    try:
        await wait_for(lambda: len(list(ready.iterdir())) >= ready_files, [fleet], START_TIMEOUT, f"{module} ready")
        workers_cpu, served = fleet.cpu_seconds(), await services_cpu()
        out = path / "sent.json"
        argv = [sys.executable, f"{module}.py", "produce", "--count", str(trial.tasks)]
        argv += ["--threads", str(trial.producer_threads), "--out", str(out)]
        producer = Proc(f"{module} producer", argv, path / "producer.log", env=env, cwd=PEERS)
        await producer.wait(drain_timeout(trial.tasks))
        if not out.exists():
            raise RuntimeError(f"the producer wrote nothing:\n{producer.tail()}")
        sent = json.loads(out.read_text())
        if not sent["sent"]:
            raise RuntimeError(f"nothing sent, e.g. {sent['errors'][:3]}")

        def all_done() -> bool:
            completions.check()
            if completions.failed:
                raise RuntimeError(f"{len(completions.failed)} tasks failed")
            return len(completions.done) >= len(sent["sent"])

        await wait_for(all_done, [fleet], drain_timeout(trial.tasks), f"{len(sent['sent'])} results")
        workers_cpu, served = fleet.cpu_seconds() - workers_cpu, await services_cpu() - served
    except Exception:
        print(f"--- {module} worker\n{fleet.tail()}", file=sys.stderr)
        if producer is not None:
            print(f"--- {module} producer\n{producer.tail()}", file=sys.stderr)
        raise
    finally:
        if producer is not None:
            await producer.stop()
        await fleet.stop()
    rows = sent["sent"]
    n = len(rows)
    first = min(r[1] for r in rows)
    last_completed = max(completions.done[r[0]] for r in rows)
    return {
        "tasks": n,
        "errors": sent["error_count"],
        "seconds": last_completed - first,
        "tasks_per_s": n / (last_completed - first),
        "latency_p50_ms": percentile([completions.done[r[0]] - r[1] for r in rows], 50) * 1000,
        "latency_p99_ms": percentile([completions.done[r[0]] - r[1] for r in rows], 99) * 1000,
        "api_req_per_s": n / (max(r[2] for r in rows) - first),
        "api_p50_ms": percentile([(r[2] - r[1]) * 1000 for r in rows], 50),
        "api_p99_ms": percentile([(r[2] - r[1]) * 1000 for r in rows], 99),
        "api_cpu_ms_per_task": sent["cpu_s"] / n * 1000,
        "workers_cpu_ms_per_task": workers_cpu / n * 1000,
        "services_cpu_ms_per_task": served / n * 1000,
    }


async def celery_end_to_end(mode: str, trial: Trial) -> Metrics:
    """Celery 5: prefork, 2 processes; "strict" (acks late, prefetch 1) or "default" (acks early, prefetch x4)."""
    tag = new_tag()
    prefix = f"{tag}:"
    meta = f"{prefix}celery-task-meta-".encode()

    def parse(channel: bytes, data: bytes) -> tuple[str, bool] | None:
        if not channel.startswith(meta):
            return None
        return channel[len(meta) :].decode(), b'"SUCCESS"' in data

    async def cleanup() -> None:
        await delete_queues([tag], exchanges=[tag])
        await delete_keys(prefix)

    async with workdir(trial.scratch) as path, leaving_nothing(tag, cleanup):
        env = peer_env(tag, prefix, path / "ready", trial.producer_threads, BENCH_MODE=mode)
        argv = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork"]
        argv += ["--concurrency", str(trial.workers), "-Q", tag, "-n", f"{tag}@%h", "--loglevel", "WARNING"]
        # Cluster chatter between Celery workers; nothing to do with running tasks.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        completions = Completions(parse)
        try:
            await completions.start(pattern=f"{prefix}celery-task-meta-*")
            return await peer_end_to_end(argv, "celery_app", 1, completions, env, trial)
        finally:
            await completions.close()


async def dramatiq_end_to_end(trial: Trial) -> Metrics:
    """Dramatiq: 2 processes x 1 thread (its own prefetch: 2 per thread)."""
    tag = new_tag()
    prefix = f"{tag}:"

    def parse(channel: bytes, data: bytes) -> tuple[str, bool] | None:
        return data.decode(), True

    async def cleanup() -> None:
        await delete_queues([tag, f"{tag}.DQ", f"{tag}.XQ"])
        await delete_keys(prefix)

    async with workdir(trial.scratch) as path, leaving_nothing(tag, cleanup):
        env = peer_env(tag, prefix, path / "ready", trial.producer_threads)
        argv = [sys.executable, "-m", "dramatiq", "dramatiq_app", "--processes", str(trial.workers)]
        argv += ["--threads", "1", "--queues", tag]
        completions = Completions(parse)
        try:
            await completions.start(channel=f"{prefix}done")
            return await peer_end_to_end(argv, "dramatiq_app", trial.workers, completions, env, trial)
        finally:
            await completions.close()


# ============================================================================
# The systems, selection and sizing
# ============================================================================


@dataclasses.dataclass(frozen=True)
class System:
    """One contender: a key to select it by, a name for the table, a trial, and a first guess at its rate."""

    key: str
    name: str
    trial: Callable[[Trial], Awaitable[Metrics]]
    rate_hint: float  # tasks/s, to size N before a first trial has measured it; 0: runs for --seconds
    half_of: str = ""  # paced at half the median rate this run measured for that system (run after it)
    rate: float = 0.0  # paced at this many submissions per second


def _on(
    fn: Callable[..., Awaitable[Metrics]], *args: Any
) -> Callable[[Trial], Awaitable[Metrics]]:  # a trial with its leading arguments bound
    async def run(trial: Trial) -> Metrics:
        return await fn(*args, trial)

    return run


def all_systems(backends: list[str], rates: Iterable[float] = ()) -> list[System]:
    """Every system this asyncnode and this venv can run, in table order; rate hints from a run on 2 cores."""
    systems: list[System] = []
    classic = {"broker": {"queue_type": "classic"}}
    hints = {"rabbitmq": (600.0, 800.0), "embedded": (1100.0, 1400.0)}
    for name in backends:
        b = BACKENDS[name]
        e2e = _on(asyncnode_end_to_end, b, {})
        systems.append(System(f"e2e-{name}", f"asyncnode end to end ({name})", e2e, hints[name][0]))
        title = f"asyncnode end to end ({name}), at half the peak rate"
        systems.append(System(f"e2e-{name}-half", title, e2e, hints[name][0] / 2, half_of=f"e2e-{name}"))
        for rate in rates:
            title = f"asyncnode end to end ({name}), at {rate:g} tasks/s"
            systems.append(System(f"e2e-{name}-at-{rate:g}", title, e2e, rate, rate=rate))
    if "rabbitmq" in backends:
        # The peers' queues are classic (their default; Dramatiq has no other): the same for comparison.
        e2e = _on(asyncnode_end_to_end, BACKENDS["rabbitmq"], classic)
        systems.append(System("e2e-classic", "asyncnode end to end (rabbitmq, classic queue)", e2e, 800))
    for name in backends:
        b = BACKENDS[name]
        drain = _on(asyncnode_workers_alone, b, {})
        systems.append(System(f"workers-{name}", f"asyncnode workers alone ({name})", drain, hints[name][1]))
    if "rabbitmq" in backends:
        variants: list[tuple[str, str, dict[str, dict[str, Any]], float]] = [
            ("workers-classic-p1", "classic, prefetch 1", classic, 1400.0),
            ("workers-classic-p50", "classic, prefetch 50", {"broker": classic["broker"] | {"prefetch": 50}}, 4000.0),
        ]
        if worker_concurrency_supported():  # the prefetch follows: at least the concurrency
            variants.append(
                ("workers-classic-c32", "classic, concurrency 32", classic | {"worker": {"concurrency": 32}}, 3800.0)
            )
        for key, title, overrides, hint in variants:
            drain = _on(asyncnode_workers_alone, BACKENDS["rabbitmq"], overrides)
            systems.append(System(key, f"asyncnode workers alone ({title})", drain, hint))
    if importlib.util.find_spec("celery") is not None:
        strict, default = _on(celery_end_to_end, "strict"), _on(celery_end_to_end, "default")
        systems.append(System("celery-strict", "Celery strict (acks late, prefetch 1)", strict, 600))
        systems.append(System("celery-default", "Celery default (acks early, prefetch x4)", default, 700))
    if importlib.util.find_spec("dramatiq") is not None:
        systems.append(System("dramatiq", "Dramatiq (1 thread per process)", dramatiq_end_to_end, 1500))
    for key, title, queue_type, prefetch, hint in (
        ("raw-classic-p1", "classic, prefetch 1", "classic", 1, 1900.0),
        ("raw-classic-p50", "classic, prefetch 50", "classic", 50, 3700.0),
        ("raw-quorum-p1", "quorum, prefetch 1", "quorum", 1, 1000.0),
    ):
        systems.append(System(key, f"raw script ({title})", _on(raw_drain, queue_type, prefetch), hint))
    for name in backends:
        api = _on(asyncnode_api_alone, BACKENDS[name])
        systems.append(System(f"api-{name}", f"asyncnode API alone ({name})", api, 0))
    systems.append(System("api-minimal", "minimal aiohttp API", minimal_api, 0))
    return systems


def select(systems: list[System], wanted: list[str] | None) -> list[System]:
    """The systems named by key, or by the start of their key (``celery``: both Celery systems)."""
    if not wanted:
        return systems
    chosen = [s for s in systems if any(s.key == w or s.key.startswith(w + "-") for w in wanted)]
    unknown = [w for w in wanted if not any(s.key == w or s.key.startswith(w + "-") for s in systems)]
    if unknown:
        raise SystemExit(f"unknown system {', '.join(unknown)}; choose from: {', '.join(s.key for s in systems)}")
    return chosen


class Sizer:
    """N per trial: fixed when --tasks is given, else the system's best rate so far times --seconds.

    The best, not the latest: a trial slowed by something else on the machine must not make the next
    one short; a trial at the system's usual rate lasts about --seconds, a slowed one longer.
    """

    def __init__(self, fixed: int | None, seconds: float) -> None:
        self.fixed = fixed
        self.seconds = seconds
        self.rates: dict[str, float] = {}

    def tasks(self, system: System) -> int:
        """How many tasks the next trial of ``system`` runs."""
        if self.fixed is not None:
            return self.fixed
        rate = self.rates.get(system.key, system.rate_hint)
        return max(MIN_TASKS, min(MAX_TASKS, round(rate * self.seconds)))

    def measured(self, system: System, metrics: Metrics) -> None:
        """Size the next trial of ``system`` on what this one measured."""
        if metrics.get("tasks_per_s"):
            self.rates[system.key] = max(float(metrics["tasks_per_s"]), self.rates.get(system.key, 0.0))


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


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def machine(backends: list[str], peers: bool = True) -> dict[str, Any]:
    """What the figures were measured on (``peers``: also the peers' versions and the HTTP load generator)."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "os": platform.platform(terse=True),
        "Python": platform.python_version(),
        "asyncnode": asyncnode.__version__,
    }
    for name in sorted({*backends, "rabbitmq"} if peers else backends):  # the peers run on RabbitMQ
        info |= await BACKENDS[name].versions()
    if peers:
        for package in ("celery", "kombu", "dramatiq", "aio-pika", "redis", "aiohttp"):
            info[package] = _version(package)
        info["load generator"] = GENERATOR
    if peers and GENERATOR == "wrk":
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        info["load generator"] = (wrk.stdout or wrk.stderr).split(" Copyright")[0].strip() or "wrk"
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


#: Table columns: heading and metric.
COLUMNS = (
    ("tasks/s", "tasks_per_s"),
    ("submit→completed p50 (ms)", "latency_p50_ms"),
    ("p99 (ms)", "latency_p99_ms"),
    ("submits/s", "api_req_per_s"),
    ("submit p50 (ms)", "api_p50_ms"),
    ("submit p99 (ms)", "api_p99_ms"),
    ("API CPU ms/task", "api_cpu_ms_per_task"),
    ("workers CPU ms/task", "workers_cpu_ms_per_task"),
    ("RabbitMQ + Redis CPU ms/task", "services_cpu_ms_per_task"),
)


def medians(results: dict[str, list[Metrics]]) -> dict[str, dict[str, float]]:
    """The median of each metric per system, over its successful trials."""
    out: dict[str, dict[str, float]] = {}
    for key, trials in results.items():
        ok = [t for t in trials if "error" not in t]
        keys = {k for t in ok for k, v in t.items() if isinstance(v, int | float) and k != "round"}
        out[key] = {k: statistics.median(t[k] for t in ok if k in t) for k in keys}
    return out


def table(results: dict[str, list[Metrics]], names: dict[str, str]) -> str:
    """Median and min-max of each metric per system, as Markdown."""
    lines = ["| system | runs | " + " | ".join(h for h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for key, trials in results.items():
        ok = [t for t in trials if "error" not in t]
        cells = []
        for _, metric in COLUMNS:
            values = [t[metric] for t in ok if metric in t]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(_fmt(values[0]))
            else:
                cells.append(f"{_fmt(statistics.median(values))} ({_fmt(min(values))}\u2013{_fmt(max(values))})")
        lines.append(f"| {names.get(key, key)} | {len(ok)}/{len(trials)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """One figure the targets are stated in: a system's median over another's (the target, if any)."""

    label: str
    numerator: str
    denominator: str
    metric: str
    target: float | None = None
    lower_is_better: bool = False


#: The issue's targets, then figures that explain them.
RATIOS = (
    Ratio("workers alone, classic p1 / raw, classic p1", "workers-classic-p1", "raw-classic-p1", "tasks_per_s", 1.2),
    Ratio(
        "workers alone, classic, concurrency 32 / raw, classic p50",
        "workers-classic-c32",
        "raw-classic-p50",
        "tasks_per_s",
        1.1,
    ),
    Ratio("end to end (rabbitmq) / Celery strict", "e2e-rabbitmq", "celery-strict", "tasks_per_s", 2.0),
    Ratio("end to end (rabbitmq) / Dramatiq", "e2e-rabbitmq", "dramatiq", "tasks_per_s", 1.5),
    Ratio("API alone (rabbitmq) req/s / minimal aiohttp", "api-rabbitmq", "api-minimal", "api_req_per_s", 1.2),
    Ratio("API alone (rabbitmq) p99 / minimal aiohttp p99", "api-rabbitmq", "api-minimal", "api_p99_ms", 1.0, True),
    Ratio("workers alone, quorum p1 / raw script, quorum p1", "workers-rabbitmq", "raw-quorum-p1", "tasks_per_s"),
    Ratio("end to end (rabbitmq) / Celery default", "e2e-rabbitmq", "celery-default", "tasks_per_s"),
    Ratio("end to end (classic queue, as the peers) / Celery strict", "e2e-classic", "celery-strict", "tasks_per_s"),
    Ratio("end to end (classic queue, as the peers) / Dramatiq", "e2e-classic", "dramatiq", "tasks_per_s"),
    Ratio("raw script: quorum p1 / classic p1", "raw-quorum-p1", "raw-classic-p1", "tasks_per_s"),
    Ratio("workers CPU per task: workers alone classic p1 / raw", "workers-classic-p1", "raw-classic-p1",
          "workers_cpu_ms_per_task", lower_is_better=True),
)  # fmt: skip


def ratios(med: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Every ratio whose two systems ran, with whether its target is met."""
    out = []
    for r in RATIOS:
        a, b = med.get(r.numerator, {}).get(r.metric), med.get(r.denominator, {}).get(r.metric)
        row: dict[str, Any] = {"label": r.label, "metric": r.metric, "target": r.target, "value": None}
        if a is not None and b:
            row["value"] = a / b
            if r.target is not None:
                row["met"] = a / b <= r.target if r.lower_is_better else a / b >= r.target
        elif r.target is not None:
            missing = [k for k, v in ((r.numerator, a), (r.denominator, b)) if not v]
            row["missing"] = missing
        if r.target is not None or row["value"] is not None:
            out.append(row | {"lower_is_better": r.lower_is_better})
    return out


def ratios_block(rows: list[dict[str, Any]]) -> str:
    """The ratios as Markdown bullets: value, target, met or not."""
    lines = ["Ratios (medians of this run):", ""]
    for row in rows:
        if row["value"] is None:
            lines.append(f"- {row['label']}: n/a (not run: {', '.join(row['missing'])})")
            continue
        text = f"- {row['label']}: **{row['value']:.2f}**"
        if row["target"] is not None:
            sign = "\u2264" if row["lower_is_better"] else "\u2265"
            text += f" (target {sign} {row['target']:g}: {'met' if row['met'] else 'NOT met'})"
        lines.append(text)
    return "\n".join(lines)


def cancel_on_signals() -> None:
    """SIGINT and SIGTERM cancel the running task (also when started in the background, where SIGINT is ignored),
    so that its cleanup runs."""
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, main_task.cancel)


async def run(args: argparse.Namespace, systems: list[System]) -> dict[str, Any]:
    """Every round runs every system once, in the same order."""
    cancel_on_signals()
    info = await machine(args.backends)
    results: dict[str, list[Metrics]] = {s.key: [] for s in systems}
    sizer = Sizer(args.tasks, args.seconds)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncnode-bench-") as scratch:
        for round_no in range(1, args.rounds + 1):
            for system in systems:
                trial = Trial(
                    sizer.tasks(system), args.seconds, args.clients, args.workers, Path(scratch), args.producer_threads
                )
                t0 = time.monotonic()
                try:
                    if system.half_of:
                        peak = medians({system.half_of: results.get(system.half_of, [])}).get(system.half_of, {})
                        if not peak.get("tasks_per_s"):
                            raise RuntimeError(f"{system.half_of} measured no rate to take half of")
                        rate = peak["tasks_per_s"] / 2
                        tasks = args.tasks or max(MIN_TASKS, round(rate * args.seconds))
                        trial = dataclasses.replace(trial, rate=rate, tasks=tasks)
                    if system.rate:
                        tasks = args.tasks or max(MIN_TASKS, round(system.rate * args.seconds))
                        trial = dataclasses.replace(trial, rate=system.rate, tasks=tasks)
                    metrics = await system.trial(trial)
                except Exception as e:  # one failed trial is reported; the others still run
                    traceback.print_exc()
                    metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                sizer.measured(system, metrics)
                metrics["round"] = round_no
                results[system.key].append(metrics)
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
                print(
                    f"round {round_no}/{args.rounds} {system.key} ({time.monotonic() - t0:.0f} s): {shown}", flush=True
                )
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time"] = f"{time.monotonic() - started:.0f} s"
    params = {
        "tasks": args.tasks or f"sized to ~{args.seconds:g} s",
        "seconds": args.seconds,
        "clients": args.clients,
        "workers": args.workers,
        "producer_threads": args.producer_threads,
        "rounds": args.rounds,
    }
    med = medians(results)
    return {
        "machine": info,
        "params": params,
        "names": {s.key: s.name for s in systems},
        "results": results,
        "ratios": ratios(med),
    }


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters, the table and the ratios, ready to paste into the README."""
    info, params = out["machine"], out["params"]
    broker = asyncnode.BrokerConfig()
    services = ", ".join(f"{k} {info[k]}" for k in ("RabbitMQ", "Redis", "SQLite") if k in info)
    peers = ", ".join(f"{k} {info[k]}" for k in ("celery", "dramatiq", "aio-pika", "redis", "aiohttp") if info.get(k))
    tasks = params["tasks"] if isinstance(params["tasks"], int) else f"N sized to last ~{params['seconds']:g} s"
    return "\n".join(
        [
            f"- Machine: {info['cores']} cores, {info['cpu']}; {info['os']}; Python {info['Python']}; {services}; "
            f"{peers}",
            f"- Load average at start / end: {info['load average at start']} / {info['load average at end']}; "
            f"wall time {info['wall time']}",
            f"- `noop` tasks, {tasks} per trial, {params['clients']} concurrent clients, {params['workers']} worker "
            f"processes, persistent messages on durable queues, publisher confirms everywhere; asyncnode's defaults "
            f"unless the row says otherwise (prefetch {broker.prefetch}, {broker.queue_type} queue); "
            f"{params['rounds']} rounds, systems alternated; median (min\u2013max)",
            "- End to end (asyncnode, Celery, Dramatiq): tasks/s is N over first submit to last completion seen "
            "(asyncnode: on the WebSocket; the peers: on their Redis result backend's pub/sub); latency is from a "
            "submit's start to its completion seen, under the whole burst (queueing included). Submits: asyncnode's "
            f"HTTP POSTs from {params['clients']} clients; the peers' `.delay()`/`.send()` from a producer process "
            f'of {params["producer_threads"]} threads (its CPU in the API column). "At half the peak rate": one '
            "submit every 1/rate s, at half the median tasks/s of the burst rows above it, for the latency of a "
            "system that keeps up",
            "- Workers alone and raw script: a queue preloaded (confirmed) with no consumer, drained by 2 fresh "
            "processes; tasks/s is N over the first `started_at` to the last `finished_at`",
            f"- API alone: `POST /api/tasks` for {params['seconds']:g} s at {params['clients']} connections "
            f"({info['load generator']}), no worker running; the minimal API and asyncnode's API both on the "
            f"{broker.queue_type} queue",
            "- CPU: user + system time per task of the system's own processes, and of the RabbitMQ node and Redis "
            "it used (those over the drain or the burst, while nothing else used them; the load generator is not "
            "counted)",
            "",
            table(out["results"], out["names"]),
            "",
            ratios_block(out["ratios"]),
        ]
    )


def main() -> int:
    global GENERATOR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=_csv, help="comma-separated keys or key prefixes (default: all; --list)")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    parser.add_argument("--seconds", type=float, default=6.0, help="target length of a trial (default 6)")
    parser.add_argument("--tasks", type=int, help="fixed N for every trial instead of sizing it by --seconds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every system once (default 3)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients or producer threads (64)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--producer-threads",
        type=int,
        default=16,
        help="threads of the peers' producer process (default 16: Celery's fastest here; 64 contend for the GIL)",
    )
    parser.add_argument("--backends", type=_csv, help="asyncnode's: rabbitmq, embedded (default: every one it has)")
    parser.add_argument("--generator", choices=["auto", "wrk", "aiohttp"], default="auto", help="HTTP load generator")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 tasks, 2 s of load, one round")
    parser.add_argument(
        "--rates", type=_rates, default=[], help="also asyncnode end to end paced at these tasks/s (e.g. 200,600)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every trial's figures to PATH")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.rounds, args.seconds = min(args.tasks or 200, 200), 1, 2.0
    if args.backends is None:
        args.backends = ["rabbitmq", *(["embedded"] if embedded_supported() else [])]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        parser.error(f"unknown backend {unknown}; choose from {', '.join(BACKENDS)}")
    if (args.tasks is not None and args.tasks < 1) or args.rounds < 1 or args.clients < 1 or args.workers < 1:
        parser.error("--tasks, --rounds, --clients and --workers must be at least 1")
    GENERATOR = args.generator
    if GENERATOR == "auto":
        GENERATOR = "wrk" if shutil.which("wrk") else "aiohttp"
    elif GENERATOR == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    systems = all_systems(args.backends, args.rates)
    if args.list:
        for s in systems:
            print(f"{s.key:22} {s.name}")
        return 0
    systems = select(systems, args.systems)
    if GENERATOR != "wrk":
        print(
            "wrk not found: using the aiohttp load generator (apt-get install wrk for a lighter one)", file=sys.stderr
        )
    return run_and_report(run(args, systems), report, args.json)


def run_and_report(
    main: Coroutine[Any, Any, dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    json_path: Path | None,
    cleanup: Callable[[], None] = kill_leftovers,
) -> int:
    """A benchmark script's end: run ``main``, stop whatever it left running (also when interrupted: 130),
    write the figures to ``json_path`` if given and print the report; 1 if a trial failed."""
    try:
        out = asyncio.run(main)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
    if json_path:
        json_path.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(report(out))
    trials = [t for v in out["results"].values() for t in (v if isinstance(v, list) else [v])]
    return 1 if any("error" in t for t in trials) else 0


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if any(not 0 < r < 1e6 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive tasks/s: {text!r}")
    return rates


if __name__ == "__main__":
    sys.exit(main())
