"""Shared fixtures: both backends, isolated per test by queue name and key prefix (or file).

A test that takes ``backend`` (directly or through ``config_file``/``cfg``) runs
twice: against the shared RabbitMQ and Redis, and embedded on a SQLite file in the
test's own folder.  The RabbitMQ variants skip with a one-line reason when the
services are absent, except in CI (``CI`` set to 1, true or yes: see :func:`in_ci`), where
their absence is a failure; the embedded variants need no service at all.

At the end of the session, after a last sweep, nothing of this session's may be left on the
shared RabbitMQ and Redis: see :func:`_nothing_left_on_the_shared_services`.

The browser tests share :func:`browser` (Debian's Chromium under Playwright), :func:`sign_in` (a page
given a token in its token dialog) and :func:`inbox` (an SMTP server for the e-mail tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from aiosmtpd.controller import Controller

import asyncnode

ROOT = Path(asyncnode.__file__).resolve().parent

#: Seconds one command may take, a connection to RabbitMQ and Redis included.
COMMAND_TIMEOUT = 30.0

#: Variables that would make a command read another config, instance or server than the test's.
_FOREIGN = (*asyncnode.Config.ENV, "ASYNCNODE_CONFIG", "ASYNCNODE_INSTANCE", "ASYNCNODE_RUN_DIR", "ASYNCNODE_LOG_LEVEL")


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python asyncnode.py ARGS`` to its end (killed after COMMAND_TIMEOUT), with its output."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "asyncnode.py"), *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in _FOREIGN},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )


RABBIT_URL = os.environ.get("RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

#: Seconds a test's own connection to RabbitMQ or Redis may take to open, and each Redis command.
SERVICE_TIMEOUT = 10.0


def in_ci() -> bool:
    """Whether this runs in CI (``CI`` is 1, true or yes, in any case), where a test that cannot
    run (a service, a tool or a privilege missing) fails instead of skipping; ``CI=false``,
    ``CI=0`` or an empty ``CI`` is not CI."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``, or fail it in CI."""
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


async def rabbit_connect(url: str = RABBIT_URL) -> aio_pika.abc.AbstractConnection:
    """A test's own AMQP connection, opened under SERVICE_TIMEOUT."""
    return await aio_pika.connect(url, timeout=SERVICE_TIMEOUT)


def redis_client(url: str = REDIS_URL, **kwargs: Any) -> aioredis.Redis:
    """A test's own Redis client: connecting and every command bounded by SERVICE_TIMEOUT."""
    return aioredis.from_url(url, socket_timeout=SERVICE_TIMEOUT, socket_connect_timeout=SERVICE_TIMEOUT, **kwargs)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


@pytest.fixture(scope="session")
def services() -> None:
    """Require the shared RabbitMQ and Redis: skip without them, or fail in CI."""
    missing = [name for name, port in (("RabbitMQ", 5672), ("Redis", 6379)) if not _reachable("127.0.0.1", port)]
    if missing:
        skip_or_fail(f"{' and '.join(missing)} not running on 127.0.0.1 (start them, see README)")


#: The backends every behavioural test runs against (the ids of the ``backend`` fixture).
BACKENDS = ("rabbitmq", "embedded")

#: The embedded SQLite file write_config names, beside the config file.
DATABASE = "asyncnode.db"

#: Environment variables that would turn an embedded config into a RabbitMQ one (or an error).
_URL_VARIABLES = ("RABBIT_URL", "REDIS_URL")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: RabbitMQ and Redis (which then must be running), or embedded."""
    if request.param == "rabbitmq":
        request.getfixturevalue("services")
    return str(request.param)


#: Mark a test about RabbitMQ or Redis internals: it runs in its rabbitmq variant only.
rabbitmq_only = pytest.mark.parametrize("backend", ["rabbitmq"], indirect=True)


def is_embedded(cfg: asyncnode.Config) -> bool:
    """Whether ``cfg`` runs embedded: neither [broker] url nor [redis] url is set."""
    return not cfg.broker.url and not cfg.redis.url


def database_path(cfg: asyncnode.Config) -> Path:
    """The embedded SQLite file: ``[embedded] path``, relative to the config file's folder."""
    return cfg.path.resolve().parent / cfg.embedded.path


def write_config(path: Path, tag: str, *, backend: str = "rabbitmq", **sections: dict[str, Any]) -> Path:
    """Write a config.toml isolated by ``tag`` (queue, key prefix, channel), with overrides.

    ``backend="embedded"`` leaves both URLs out and puts the SQLite file beside the config.
    """
    assert backend in BACKENDS, backend
    embedded = backend == "embedded"
    base: dict[str, dict[str, Any]] = {
        "broker": {"queue": f"{tag}", "publish_timeout": 5.0},
        "redis": {"channel": f"{tag}:updates", "key_prefix": f"{tag}:"},
        "api": {"host": "127.0.0.1", "port": free_port()},
    }
    if embedded:
        base["embedded"] = {"path": DATABASE}
        _EMBEDDED.add(tag)
    else:
        _SHARED.add(tag)
        base["broker"] = {"url": RABBIT_URL, **base["broker"]}
        base["redis"] = {"url": REDIS_URL, **base["redis"]}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        tables = {key: value for key, value in values.items() if isinstance(value, dict)}
        if len(tables) < len(values):
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items() if key not in tables)
        for key, table in tables.items():  # e.g. instances={"local": {...}} -> [instances.local]
            lines.append(f"[{name}.{key}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
        lines.append("")
    path.write_text("\n".join(lines))
    cfg = asyncnode.Config.from_toml(path, env={})
    assert is_embedded(cfg) == embedded, f"{path}: expected a {backend} config"
    if not embedded:
        _QUEUES.setdefault(tag, set()).update(asyncnode.broker_queues(cfg))
    return path


#: RabbitMQ queues each test's configs declare (named queues, retry queues), so that cleanup() deletes them too.
_QUEUES: dict[str, set[str]] = {}

#: Tags whose configs ran embedded: their state lives in the test's folder, nothing to delete.
_EMBEDDED: set[str] = set()

#: Tags with a config naming RabbitMQ and Redis (shared or private): cleanup() deletes theirs
#: even when the same test also wrote an embedded config under that tag.
_SHARED: set[str] = set()


def _known_queues(tag: str) -> list[str]:
    """The queues a test's configs under ``tag`` declare: work queue, dead letters, retry queues."""
    return [tag, tag + asyncnode.DLQ_SUFFIX, *sorted(_QUEUES.get(tag, ()))]


async def cleanup(tag: str, *, queues: bool = True) -> None:
    """Delete the queues (unless they lived on a private broker) and keys a test made under ``tag``."""
    if tag in _EMBEDDED and tag not in _SHARED:
        return
    if queues:
        connection = await rabbit_connect()
        async with connection:
            channel = await connection.channel()
            for name in _known_queues(tag):
                await channel.queue_delete(name, if_unused=False, if_empty=False)
    client = redis_client()
    try:
        keys = [k async for k in client.scan_iter(match=f"{tag}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


#: Every tag handed out in this session, swept once more at its end.
_TAGS: set[str] = set()


@pytest.fixture
def tag() -> str:
    """A name unique to this test: its queue, key prefix and channel derive from it."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    _TAGS.add(name)
    return name


async def repair_dead_letter_supervisor(evaluate: Callable[[str], Awaitable[str]] | None = None) -> bool:
    """Restart a RabbitMQ node's supervisor of at-least-once dead-letter workers if it gave up; whether it
    had. ``evaluate`` runs an Erlang expression on the node (default: ``rabbitmqctl eval`` on the shared
    one, if it is on this machine).

    RabbitMQ 3.10 restarts a dead-letter worker whose quorum queue was deleted while the worker talked
    to it; the restarted worker finds no queue and dies again, and the supervisor gives up for good:
    from then on every new quorum queue with at-least-once dead-lettering crashes at once (a queue the
    suite deletes while a stopping process declares it can start this). A repair only: the node and its
    queues stay as they are (never kill the supervisor to try it: that takes the whole node down).
    """
    if evaluate is None:
        from tests import privsvc

        ctl = privsvc._which("rabbitmqctl")
        if ctl is None or urlsplit(RABBIT_URL).hostname not in ("127.0.0.1", "localhost", "::1"):
            return False

        async def evaluate(expression: str) -> str:
            rc, out = await asyncio.to_thread(privsvc._run, [ctl, "-q", "eval", expression], dict(os.environ), 60)
            return out if rc == 0 else ""

    if (await evaluate("whereis(rabbit_fifo_dlx_sup).")).strip() != "undefined":
        return False
    await evaluate("supervisor:restart_child(rabbit_sup, rabbit_fifo_dlx_sup).")
    return True


@pytest.fixture(scope="session", autouse=True)
def _dead_letter_supervisor_alive() -> Iterator[None]:
    """Start on a sound shared RabbitMQ, and leave it sound (see repair_dead_letter_supervisor)."""
    if asyncio.run(repair_dead_letter_supervisor()):
        print("\nconftest: the shared RabbitMQ's dead-letter supervisor was dead (RabbitMQ 3.10 bug); restarted it")
    yield
    if asyncio.run(repair_dead_letter_supervisor()):
        print("\nconftest: the shared RabbitMQ's dead-letter supervisor died during the run; restarted it")


@pytest.fixture(autouse=True)
def _task_types_restored() -> Iterator[None]:
    """The tests' own task types (tests/*_handlers.py) that a test registers in this process (a direct Client
    loads its config's handler modules) are gone after it, and so are their modules (a later load imports them
    again): other tests see the built-in types only, as a process would with the shipped config."""
    before = set(asyncnode.REGISTRY)
    yield
    ours = {
        t for t in set(asyncnode.REGISTRY) - before if asyncnode.REGISTRY[t].handler.__module__.startswith("tests.")
    }
    for name in {asyncnode.REGISTRY[t].handler.__module__ for t in ours}:
        sys.modules.pop(name, None)
    for t in ours:
        del asyncnode.REGISTRY[t]


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_on_the_shared_services() -> Iterator[None]:
    """Fail the run if, after the final sweep (torn down before this), anything of this session's
    is left on the shared RabbitMQ or Redis: a queue or an exchange whose name starts with one of
    the session's tags, or a Redis key under one. Only this session's tags: another run of the
    suite may be using the same services at the same time. What is found is deleted, then reported."""
    yield
    tags = sorted(_TAGS)
    if not tags or not (_reachable("127.0.0.1", 5672) and _reachable("127.0.0.1", 6379)):
        return  # nothing of ours can be there: no test of this session reached them
    left = asyncio.run(_leftovers(tags, delete=True))
    if left:
        shown = "\n  ".join(left[:50]) + (f"\n  ... and {len(left) - 50} more" if len(left) > 50 else "")
        pytest.fail(f"{len(left)} thing(s) of this session left on the shared services (now deleted):\n  {shown}")


@pytest.fixture(scope="session", autouse=True)
def _sweep(_nothing_left_on_the_shared_services: None) -> Iterator[None]:
    """A process a test stopped late may have declared its queues again after the test's
    own cleanup: delete every tag's queues and keys once more when the session ends."""
    yield
    tags = sorted(_TAGS - (_EMBEDDED - _SHARED))
    if tags and _reachable("127.0.0.1", 5672) and _reachable("127.0.0.1", 6379):
        asyncio.run(_sweep_all(tags))


async def _sweep_all(tags: list[str]) -> None:
    for name in tags:
        with contextlib.suppress(Exception):
            await cleanup(name)


def _rabbitmqctl_names(kind: str) -> list[str] | None:
    """``rabbitmqctl list_<kind> name`` on the shared node's vhost, or None where rabbitmqctl cannot
    tell (not installed, RABBIT_URL not on this machine, not allowed to reach the node)."""
    from tests import privsvc

    ctl = privsvc._which("rabbitmqctl")
    url = urlsplit(RABBIT_URL)
    if ctl is None or url.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    vhost = unquote(url.path[1:]) or "/"
    rc, out = privsvc._run([ctl, "-s", "-p", vhost, f"list_{kind}", "name"], dict(os.environ), 60)
    return out.splitlines() if rc == 0 else None


async def _leftovers(tags: list[str], *, delete: bool = False) -> list[str]:
    """What is left under ``tags`` on the shared services ("queue X", "exchange X", "redis key X");
    with ``delete``, delete it too."""
    prefixes = tuple(tags)
    queues = await asyncio.to_thread(_rabbitmqctl_names, "queues")
    exchanges = await asyncio.to_thread(_rabbitmqctl_names, "exchanges")
    connection = await rabbit_connect()
    async with connection:
        if queues is None:  # no listing: try the names this session's configs declare, one by one
            queues = []
            channel = await connection.channel()
            for name in (name for tag in tags for name in _known_queues(tag)):
                try:
                    await channel.declare_queue(name, passive=True)
                    queues.append(name)
                except aio_pika.exceptions.ChannelNotFoundEntity:  # no such queue; the broker closed the channel
                    channel = await connection.channel()
        queues = sorted(n for n in queues if n.startswith(prefixes))
        exchanges = sorted(n for n in exchanges or [] if n.startswith(prefixes))
        if delete and (queues or exchanges):
            channel = await connection.channel()
            for name in queues:
                await channel.queue_delete(name)
            for name in exchanges:
                await channel.exchange_delete(name)
    client = redis_client(decode_responses=True)
    try:
        # One SCAN for every tag (each SCAN walks the whole keyspace), on their common prefix, glob-escaped.
        first, last = min(tags), max(tags)
        common = first[: next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))]
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", common) + "*"
        keys = sorted([k async for k in client.scan_iter(match=pattern, count=1000) if k.startswith(prefixes)])
        if delete and keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    return [*(f"queue {n}" for n in queues), *(f"exchange {n}" for n in exchanges), *(f"redis key {k}" for k in keys)]


@pytest.fixture
async def config_file(backend: str, tag: str, tmp_path: Path) -> AsyncIterator[Path]:
    """A config file for this test on ``backend``; cleaned up afterwards."""
    path = write_config(tmp_path / "config.toml", tag, backend=backend)
    yield path
    await cleanup(tag)


@pytest.fixture
def cfg(config_file: Path) -> asyncnode.Config:
    """The loaded configuration of :func:`config_file`."""
    return asyncnode.Config.from_toml(config_file, env={})


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def db_rows(cfg: asyncnode.Config, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the embedded file; [] while the file or its tables do not exist yet."""

    def query() -> list[tuple[Any, ...]]:
        path = database_path(cfg)
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)) as db:
            try:
                return db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return []
                raise

    return await asyncio.to_thread(query)


async def live_workers(cfg: asyncnode.Config) -> list[dict[str, Any]]:
    """Embedded: the heartbeats in the file that have not expired, of processes that still run."""
    rows = await db_rows(cfg, "SELECT info FROM workers WHERE expires_at > ?", time.time())
    infos = [json.loads(info) for (info,) in rows]
    return [info for info in infos if pid_alive(int(info["pid"]))]


async def queue_counts(cfg: asyncnode.Config, name: str | None = None) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, by passive declare.

    Embedded: the file's unheld messages of that queue due now, and for the work queue the live
    workers (a SIGKILLed worker stops counting at once, as its AMQP connection would).
    """
    if is_embedded(cfg):
        name = name or cfg.broker.queue
        [(ready,)] = await db_rows(
            cfg,
            "SELECT COUNT(*) FROM messages WHERE queue = ? AND holder IS NULL AND ready_at <= ?",
            name,
            time.time(),
        ) or [(0,)]
        return int(ready), len(await live_workers(cfg)) if name == cfg.broker.queue else 0
    connection = await rabbit_connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name or cfg.broker.queue, passive=True)
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0


async def stored_keys(cfg: asyncnode.Config) -> list[str]:
    """Everything the deployment stored: every Redis key under the test's prefix, or the file's rows.

    Embedded rows are named like keys: ``tasks:<id>``, ``messages:<id>``, ``updates:<seq>``,
    ``stats:<status>`` (only non-zero counts) and ``workers:<id>``.
    """
    if is_embedded(cfg):
        keys = []
        for table, column in (("tasks", "id"), ("messages", "id"), ("updates", "seq"), ("workers", "id")):
            keys += [f"{table}:{key}" for (key,) in await db_rows(cfg, f"SELECT {column} FROM {table}")]
        keys += [f"stats:{status}" for (status,) in await db_rows(cfg, "SELECT status FROM stats WHERE n != 0")]
        return keys
    client = redis_client(cfg.redis.url, decode_responses=True)
    try:
        return [k async for k in client.scan_iter(match=cfg.redis.key_prefix + "*", count=1000)]
    finally:
        await client.aclose()


def _inherited_env() -> dict[str, str]:
    """This process's environment without the service URLs: the config file alone says which backend
    a child uses (an inherited $RABBIT_URL would override an embedded or private-broker config)."""
    return {k: v for k, v in os.environ.items() if k not in _URL_VARIABLES}


async def task_records(cfg: asyncnode.Config, ids: list[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The stored tasks among ``ids`` and the live workers, read through the backend's own store
    (for when no API process is left to ask)."""
    queue, store = asyncnode.open_backend(cfg, "api")
    try:
        tasks = {}
        for tid in ids:
            task = await store.get(tid)
            if task is not None:
                tasks[tid] = dict(task)
        return tasks, [dict(w) for w in await store.workers()]
    finally:
        await store.close()
        await queue.close()


class Proc:
    """A real ``asyncnode.py`` subprocess, stopped by pid."""

    def __init__(
        self,
        role: str,
        config: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.role = role
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "asyncnode.py"), role, "--config", str(config), *(args or [])],
            cwd=ROOT,
            env={**_inherited_env(), "ASYNCNODE_LOG_LEVEL": "DEBUG", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def log(self) -> str:
        """What the process has written so far."""
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float) -> int:
        """Wait for the process to exit; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role} pid {self.pid} still running after {timeout:g} s")
            await asyncio.sleep(0.02)
        return self.popen.returncode

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process if it still runs."""
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        self._log.close()


async def wait_healthy(base: str, proc: Proc, timeout: float = 20) -> None:
    """Wait until the API process ``proc`` answers ``GET <base>/healthz``; fail at once if it exits."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def up() -> bool:
            assert proc.popen.poll() is None, proc.log()
            try:
                async with session.get(f"{base}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up, timeout=timeout, what=f"the API at {base} to answer")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``asyncnode.py`` subprocesses; every one is stopped at the end of the test."""
    started: list[Proc] = []

    def start(role: str, config: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> Proc:
        p = Proc(role, config, tmp_path / f"{role}-{len(started)}.log", env, args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


class Up:
    """A real ``asyncnode.py up`` (supervisord in the foreground), stopped by pid."""

    def __init__(
        self,
        config: Path,
        run_dir: Path,
        instance: str | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "up.out"
        self._log = open(self.log_path, "ab")  # closed in stop()
        argv = [sys.executable, str(ROOT / "asyncnode.py"), "up", "--config", str(config), "--run-dir", str(run_dir)]
        if instance:
            argv += ["--instance", instance]
        self.popen = subprocess.Popen(
            [*(prefix or []), *argv],
            cwd=ROOT,
            env={**_inherited_env(), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.children: set[int] = set()

    @property
    def pid(self) -> int:
        """The pid of ``up``, which became supervisord."""
        return self.popen.pid

    def log(self) -> str:
        """supervisord's output, then every child's log."""
        parts = [self.log_path.read_text(errors="replace")]
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    async def processes(self) -> dict[str, dict[str, Any]]:
        """supervisord's view of its processes by name ({} while it is not answering yet)."""
        try:
            infos = await asyncio.to_thread(asyncnode.supervisor_processes, self.run_dir)
        except (OSError, Exception):  # not listening yet: socket missing or refusing
            if self.popen.poll() is not None:
                raise AssertionError(f"up exited with {self.popen.returncode}:\n{self.log()}") from None
            return {}
        for info in infos:
            if info["pid"]:
                self.children.add(info["pid"])
        return {info["name"]: info for info in infos}

    async def wait_running(self, names: set[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Wait until exactly ``names`` are RUNNING; return their infos."""

        async def check() -> dict[str, dict[str, Any]] | None:
            procs = await self.processes()
            if set(procs) == names and all(p["statename"] == "RUNNING" for p in procs.values()):
                return procs
            return None

        try:
            return await wait_for(check, timeout, f"processes {sorted(names)} RUNNING")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log()}") from None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM ``up`` and wait; SIGKILL it and its children if it overstays."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in [self.pid, *self.children]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def ups() -> Iterator[Callable[..., Up]]:
    """Start ``asyncnode.py up`` processes; each is stopped at the end of the test."""
    started: list[Up] = []

    def start(config: Path, run_dir: Path, instance: str | None = None, **kwargs: Any) -> Up:
        up = Up(config, run_dir, instance, **kwargs)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


class Inbox:
    """An SMTP server's handler (aiosmtpd) keeping the envelopes it receives."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    """A running SMTP server on a free port, for a stack's [smtp] host and port; stopped after the test."""
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    handler.port = controller.port
    try:
        yield handler
    finally:
        controller.stop()


#: The browser the browser tests drive: Debian's Chromium (Playwright's own download cannot work offline).
CHROMIUM = "/usr/bin/chromium"
#: Its flags: headless in a container (no sandbox, no GPU), and nothing fetched from outside.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Chromium under Playwright, closed after the test; without it the test skips (fails in CI)."""
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def sign_in(browser: Any, base: str, token: str) -> tuple[Any, list[str]]:
    """A new page of the dashboard at ``base``, given ``token`` in the token dialog it opens, once its
    socket is live; and the list of the errors its scripts raise (filled as they come)."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(base + "/", timeout=15_000)
    await page.locator("#token-input").wait_for(state="visible", timeout=10_000)
    await page.fill("#token-input", token)
    await page.click("#token-submit")
    await page.wait_for_selector("#conn[data-state=live]", timeout=10_000)
    return page, errors


# Private RabbitMQ/Redis instances for tests that stop or restart a service.
from tests.privsvc import private_rabbit, private_redis  # noqa: E402, F401
