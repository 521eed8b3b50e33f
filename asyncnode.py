"""asyncnode: background task processing across hosts, on asyncio.

A client submits a task to the aiohttp API; the API records it in Redis and
hands it to RabbitMQ with a publisher confirm; worker processes run it and
report every change of state through Redis; the API relays each change to
browsers over a WebSocket.  With no RabbitMQ and Redis configured, the same
program runs embedded: one SQLite file shared by the processes of one host.

Sections, in dependency order (each uses only those above it; banners mark them):

    Constants            what several sections share (a constant serving one lives in it)
    Errors               the exception tree, and what each backend raises when away
    Config               the frozen dataclass tree from config.toml (queues, routes, schedules, instances);
                         protected mode's rule
    Handler API          Field, TaskType, task(), load_handlers, TaskContext, run_handler:
                         everything a handler author needs
    Pure core            validation (with a delay or run_at), envelopes, the status machine and plan_change() (the
                         one home of what a change of state does, its metrics included), queue arguments, retry
                         schedule, a schedule's slots, access and cross-site rules, supervisord rendering
    Search (pure)        TaskFilter and task_filter (a search's or a bulk action's filter), page cursors, and
                         the fingerprint grouping dead letters
    Backend interface    TaskQueue and TaskStore, which the roles talk to
    Adapter: RabbitMQ    RabbitQueue
    Adapter: Redis       RedisStore: makes a planned Change in one Lua call, its search index with it; holds
                         delayed tasks and idempotency keys
    Adapter: SQLite      SqliteQueue and SqliteStore on one file; open_backend()
    Services             backend(), stop_event(); logs (text or JSON, with the task in hand) and traces
                         (OpenTelemetry, only when configured); retrying() (the one backoff policy),
                         dead-letter requeue (with a corrected payload), discard and groups; submit_task and
                         submit_once (an Idempotency-Key), a bulk submit, cancel_task; the scheduler (lease, fire_due)
    API surface          metrics_text (Prometheus, from the store's figures), openapi_document
    Role: api            the aiohttp application (search, bulk actions and their audit log), the WebSocket
                         hub, run_api()
    Role: worker         Worker (pauses, cancels, admission under a queue's limit and rate, promotion
                         of delayed tasks as they fall due), run_worker()
    Role: up             supervisord for one host, and ctl
    Client               Client (over HTTP, or straight to the backend: from_config), SyncClient, Task
    Commands             check, dlq, queues, schedules; submit, status, watch, cancel (through a Client)
    Command line         main()
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import errno
import functools
import hashlib
import hmac
import importlib
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import queue as jobqueue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import traceback
import uuid
import zoneinfo
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq.abc
import redis.asyncio as aioredis
import tenacity
from redis.exceptions import NoScriptError, RedisError, ResponseError

# Fast paths where installed (both are dependencies; the standard library and redis-py stand in without them).
try:
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover
    _pack_command = None  # type: ignore[assignment]

__version__ = "0.1.0"

# When run as ``python asyncnode.py``, register this module under its own name
# so that ``handlers/`` (which imports ``asyncnode`` to register) fills the
# registry of the running module, not of a second, empty copy.
sys.modules.setdefault("asyncnode", sys.modules[__name__])

log = logging.getLogger("asyncnode")


class _LazyModule:
    """A module imported on first use. aiohttp and Jinja2 serve the API alone: a worker never loads them
    (about 12 MiB less per worker process); sqlite3 (1.6 MiB) serves the embedded backend alone. The first
    use puts the module itself in this one's globals."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        globals()[self._name.rpartition(".")[2]] = module
        return getattr(module, attr)


if TYPE_CHECKING:
    import sqlite3

    import aiohttp_jinja2
    import croniter
    import jinja2
    from aiohttp import web
else:  # sqlite3 serves the embedded backend alone; croniter (with dateutil) the cron schedules alone
    aiohttp_jinja2, jinja2, web, sqlite3, croniter = map(
        _LazyModule, ("aiohttp_jinja2", "jinja2", "aiohttp.web", "sqlite3", "croniter")
    )

# ============================================================================
# Constants
# ============================================================================

#: Directory holding this file; ``web/`` and the default config live beside it.
HERE: Final = Path(__file__).resolve().parent
#: Seconds any one step of shutting down may take before it is given up.
SHUTDOWN_STEP_TIMEOUT: Final = 5.0
#: Seconds ``/readyz`` gives each service to answer.
READY_TIMEOUT: Final = 2.0
#: Seconds a task held back by its queue's limit waits before asking for a slot again.
LIMIT_POLL: Final = 0.05
#: Longest pause between two asks of a task waiting its turn to start (held back by its queue's rate).
ASK_INTERVAL: Final = 1.0
#: Seconds a task waiting its turn keeps its place in line without asking again (3 asks missed: it is gone).
LINE_PATIENCE: Final = 3 * ASK_INTERVAL
#: The name of the lease whose holder fires the schedules (one process of the deployment at a time).
SCHEDULER_LEASE: Final = "scheduler"
JSON: TypeAlias = Any


# ============================================================================
# Errors
# ============================================================================

#: What aio-pika raises when RabbitMQ is unreachable, goes away or refuses (a TimeoutError is an OSError).
AMQP_ERRORS: Final = (aio_pika.exceptions.AMQPError, OSError, RuntimeError)


class AsyncnodeError(Exception):
    """Base class of every error asyncnode raises on purpose."""


class ConfigError(AsyncnodeError):
    """The configuration is unreadable or invalid; the message names file, key and expectation."""


class ValidationError(AsyncnodeError):
    """A task submission is invalid (answered 400); ``field`` names the field at fault, if any, and ``index``
    the item of a bulk submission."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


class Unavailable(AsyncnodeError):
    """The queue or the task store could not be reached: nothing was done (answered 503); retry later."""


class NotFound(AsyncnodeError):
    """No such task, queue or schedule (answered 404)."""


class Conflict(AsyncnodeError):
    """The request clashes with the state it meets: a task already finished (``status``: its status), an
    Idempotency-Key in use (answered 409 or 422)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class PermanentError(AsyncnodeError):
    """Raised by a handler for a failure that retrying cannot fix (bad input, a 5xx rejection)."""


class EnvelopeError(AsyncnodeError):
    """A message on the queue is not a task envelope this program can read."""


class Refused(Unavailable):
    """A submission that was not queued (answered 503): why, and the id of the task recorded ``rejected``
    (None: nothing was recorded)."""

    def __init__(self, message: str, tid: str | None = None) -> None:
        super().__init__(message)
        self.tid = tid


class LeaseLost(AsyncnodeError):
    """The scheduler lease passed to another process: this one fires nothing more."""


class KeyConflict(Conflict):
    """An Idempotency-Key already used with another request body (answered 422)."""


class KeyBusy(Conflict):
    """An Idempotency-Key whose first request is still being made after the wait (answered 409)."""


class BrokerUnavailable(AsyncnodeError):
    """RabbitMQ could not be reached or did not confirm a publish in time."""


class StoreUnavailable(AsyncnodeError):
    """The SQLite file cannot be used right now (locked past its busy timeout, unreadable, disk full)."""


#: What the task store raises while it is unavailable (Redis away; the SQLite file locked past its busy timeout).
STORE_ERRORS: Final = (RedisError, OSError, StoreUnavailable)


# ============================================================================
# Config
# ============================================================================

#: Config file used when neither ``--config`` nor ``$ASYNCNODE_CONFIG`` is given.
DEFAULT_CONFIG: Final = "config.toml"
#: Roles an instance can run.
INSTANCE_ROLES: Final = ("api", "worker")
#: The instance a config without ``[instances]`` defines.
DEFAULT_INSTANCE: Final = "local"
#: What an instance name may look like (it names directories and supervisord programs).
INSTANCE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The queue every task goes to unless a route, its handler or its submission names another.
DEFAULT_QUEUE: Final = "default"
#: What a queue name may look like (it ends RabbitMQ names and Redis keys).
QUEUE_NAME: Final = re.compile(r"[a-z0-9_-]{1,40}")
#: Names the implementation uses itself (``<queue>.dlq``, ``<queue>.retry.<ms>ms``) or may use.
RESERVED_QUEUES: Final = frozenset({"dlq", "retry", "delayed", "scheduled", "all", "control"})
#: ``[queues.*] rate``: "N/s", "N/m" or "N/h".
RATE: Final = re.compile(r"([0-9]+) */ *([smh])")
RATE_WINDOWS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}
#: Log levels a process may be told to log at (``--log-level``, ``[logging] level``).
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def _opt(default: Any, doc: str, **rules: Any) -> Any:
    """A config field with its default, a one-line meaning and validation rules."""
    return dataclasses.field(default=default, metadata={"doc": doc, **rules})


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    """``[broker]``: the RabbitMQ connection and the work queue (its queue keys apply to both backends)."""

    url: str = _opt("", "AMQP URL ($RABBIT_URL); with [redis] url set too: use RabbitMQ and Redis")
    queue: str = _opt("tasks", "work queue; dead letters go to <queue>.dlq", nonempty=True)
    queue_type: str = _opt("quorum", "RabbitMQ queue type", choices=("quorum", "classic"))
    prefetch: int = _opt(1, "unacknowledged deliveries per worker process", min=1, max=65535)
    max_retries: int = _opt(3, "retries after the first attempt", min=0, max=1000)
    retry_delays: tuple[float, ...] = _opt((1.0, 5.0, 30.0), "seconds before retry n (the last repeats)", min=0.0)
    delivery_limit: int = _opt(10, "deliveries before a message that keeps killing workers is dead-lettered", min=1)
    task_timeout: float = _opt(1500.0, "hard time limit of any task, below RabbitMQ's consumer_timeout", min=0.1)
    no_consumer_exit: float = _opt(60.0, "a worker without a working consumer this long exits non-zero", min=1.0)
    publish_timeout: float = _opt(5.0, "seconds to wait for a publisher confirm", min=0.1)
    connect_timeout: float = _opt(5.0, "seconds to wait for a connection", min=0.1)
    max_delay: float = _opt(30 * 86400.0, "longest delay (or run_at ahead) a submission may ask for, seconds", min=1.0)


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """``[redis]``: where the RabbitMQ backend keeps task state and publishes updates."""

    url: str = _opt("", "Redis URL ($REDIS_URL); with [broker] url set too: use RabbitMQ and Redis")
    channel: str = _opt("task_updates", "pub/sub channel carrying task updates", nonempty=True)
    key_prefix: str = _opt("task:", "a task's hash is <key_prefix><id>", nonempty=True)


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """``[tasks]``: how long tasks are kept, on either backend."""

    result_ttl: int = _opt(86400, "seconds a finished task is kept (0 = for ever)", min=0)
    max_recent: int = _opt(10000, "tasks kept in the recent-tasks index (GET /api/tasks lists no more)", min=1)
    search_words: bool = _opt(
        True, "index the words of each task for GET /api/tasks?q= (false: q is refused; the other filters work)"
    )


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig:
    """``[embedded]``: the SQLite file used when neither [broker] url nor [redis] url is set."""

    path: str = _opt("asyncnode.db", "SQLite file shared by this host's processes (relative to config.toml)")
    lease_timeout: float = _opt(30.0, "seconds before a task whose worker stopped renewing it is redelivered", min=1.0)
    synchronous: str = _opt(
        "full",
        "the API's commits; full: a 202 survives power loss; normal: survives crashes",
        choices=("full", "normal"),
    )


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the HTTP and WebSocket server."""

    host: str = _opt("127.0.0.1", "address to listen on (another than loopback needs token, or insecure = true)")
    port: int = _opt(5000, "port to listen on ($ASYNCNODE_API_PORT)", min=0, max=65535)
    client_max_size: int = _opt(1024 * 1024, "largest request body in bytes (413 above)", min=1024)
    max_text: int = _opt(10000, "longest text accepted in a payload field", min=1)
    token: str = _opt("", "operator token: with it, /api/*, /ws and every action ($ASYNCNODE_TOKEN)")
    read_token: str = _opt("", "read-only token: the GETs, /ws and the page without actions ($ASYNCNODE_READ_TOKEN)")
    insecure: bool = _opt(False, "serve a non-loopback address with no token (anyone who reaches it may act)")
    allowed_origins: tuple[str, ...] = _opt((), "origins besides the page's own that may open /ws and act")
    idempotency_ttl: int = _opt(86400, "seconds an Idempotency-Key keeps answering with the task it made", min=1)
    metrics_token: str = _opt("", "token that may read /metrics only ($ASYNCNODE_METRICS_TOKEN)")
    max_batch: int = _opt(500, "most submissions in one POST /api/tasks array", min=1, max=10000)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: how every process writes its log (to stderr)."""

    format: str = _opt("text", "text, or json: one JSON object per line (--log-format)", choices=("text", "json"))
    level: str = _opt(
        "", "DEBUG, INFO, WARNING or ERROR ('' = INFO for api and worker, else WARNING)", choices=(*LOG_LEVELS, "")
    )


@dataclasses.dataclass(frozen=True)
class SmtpConfig:
    """``[smtp]``: where the ``email`` handler sends mail."""

    host: str = _opt("127.0.0.1", "SMTP server")
    port: int = _opt(1025, "SMTP port", min=1, max=65535)
    sender: str = _opt("asyncnode@localhost", "From address", nonempty=True)
    username: str = _opt("", "login user (empty = no login)")
    password: str = _opt("", "login password")
    starttls: bool = _opt(False, "upgrade the connection with STARTTLS")
    timeout: float = _opt(10.0, "seconds for the whole SMTP exchange", min=0.1)
    allow: tuple[str, ...] = _opt((), "recipients allowed: addresses or *@domain (empty: any)")


@dataclasses.dataclass(frozen=True)
class HandlersConfig:
    """``[handlers]``: which modules register task types."""

    modules: tuple[str, ...] = _opt(("handlers",), "modules imported to register task types")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """``[worker]``: worker processes, for every worker instance unless it overrides them."""

    processes_per_core: float = _opt(1.0, "worker processes per CPU core", min=0.0)
    stopwaitsecs: int = _opt(330, "seconds a stopping worker may take to finish its task in hand", min=1)
    heartbeat: float = _opt(5.0, "seconds between worker heartbeats (a worker is gone after 3 missed)", min=0.1)
    concurrency: int = _opt(1, "tasks one process runs at once (async handlers; plain functions: one)", min=1, max=1000)


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    """``[queues.<name>]``: one named queue's limits, across the whole deployment."""

    limit: int = _opt(0, "tasks of this queue running at once, over every worker on every host (0 = no limit)", min=0)
    rate: str = _opt("", 'starts per window over the deployment: "N/s", "N/m" or "N/h" (empty = no limit)')

    @property
    def rate_limit(self) -> tuple[int, float] | None:
        """``rate`` as (starts, window in seconds), or None."""
        return parse_rate(self.rate) if self.rate else None

    @property
    def gated(self) -> bool:
        """Whether a start from this queue must be admitted by the store (a limit or a rate is set)."""
        return bool(self.limit or self.rate)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """``[scheduler]``: the lease that lets one process at a time fire the schedules."""

    lease_ttl: float = _opt(
        10.0, "seconds the scheduler lease lasts unless renewed (a dead holder's is taken over)", min=1.0
    )


#: ``[schedules.*] catch_up``: after slots were missed, fire one task for them, or none.
CATCH_UP: Final = ("one", "none")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """``[schedules.<name>]``: a task fired at each slot of a cron expression or a period, once per deployment."""

    type: str = _opt("", "task type fired", nonempty=True)
    payload: dict[str, Any] | None = _opt(None, "its payload, checked like a submission's")  # noqa: RUF009 (None)
    cron: str = _opt("", "five-field cron expression (or every)")
    every: float | None = _opt(None, "seconds between slots, from the Unix epoch (or cron)", min=0.001)
    timezone: str = _opt("UTC", "the zone the cron expression is read in", nonempty=True)
    queue: str = _opt("", "queue of its tasks (default: the type's route)")
    catch_up: str = _opt("one", "after missed slots: one task for them, or none", choices=CATCH_UP)
    name: str = ""  #: the table's name (not a key)

    @functools.cached_property
    def zone(self) -> zoneinfo.ZoneInfo:
        """The schedule's time zone."""
        return zoneinfo.ZoneInfo(self.timezone)


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    """``[instances.<name>]``: what one host (or one ``up`` on a host) runs."""

    roles: tuple[str, ...] = _opt(("api", "worker"), "roles: api, worker")
    queues: tuple[str, ...] = _opt((), "queues this instance's workers consume (default: every declared queue)")
    processes_per_core: float | None = _opt(None, "overrides [worker] processes_per_core", min=0.0)
    processes: int | None = _opt(None, "absolute number of worker processes", min=0)
    host: str = _opt("", "machine this instance runs on (default: its own name)")
    api_port: int | None = _opt(None, "overrides [api] port for this instance", min=0, max=65535)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration, one frozen tree built by :meth:`from_toml`."""

    path: Path
    broker: BrokerConfig = BrokerConfig()
    redis: RedisConfig = RedisConfig()
    tasks: TasksConfig = TasksConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    api: ApiConfig = ApiConfig()
    smtp: SmtpConfig = SmtpConfig()
    handlers: HandlersConfig = HandlersConfig()
    worker: WorkerConfig = WorkerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    logging: LoggingConfig = LoggingConfig()
    instances: Mapping[str, InstanceConfig] = dataclasses.field(
        default_factory=lambda: {DEFAULT_INSTANCE: InstanceConfig(host=DEFAULT_INSTANCE)}
    )
    #: Every declared queue by name ("default" always among them), in the order declared.
    queues: Mapping[str, QueueConfig] = dataclasses.field(default_factory=lambda: {DEFAULT_QUEUE: QueueConfig()})
    #: Task type -> queue (``[routes]``); a type not listed goes to its handler's queue, else "default".
    routes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Periodic tasks by name, in the order declared (``[schedules.*]``).
    schedules: Mapping[str, ScheduleConfig] = dataclasses.field(default_factory=dict)

    SECTIONS: ClassVar[dict[str, type]] = {
        "broker": BrokerConfig,
        "redis": RedisConfig,
        "tasks": TasksConfig,
        "embedded": EmbeddedConfig,
        "api": ApiConfig,
        "smtp": SmtpConfig,
        "handlers": HandlersConfig,
        "worker": WorkerConfig,
        "scheduler": SchedulerConfig,
        "logging": LoggingConfig,
    }
    #: Environment variables that override a key: deployments change these per host.
    ENV: ClassVar[dict[str, tuple[str, str]]] = {
        "RABBIT_URL": ("broker", "url"),
        "REDIS_URL": ("redis", "url"),
        "ASYNCNODE_API_HOST": ("api", "host"),
        "ASYNCNODE_API_PORT": ("api", "port"),
        "ASYNCNODE_TOKEN": ("api", "token"),
        "ASYNCNODE_READ_TOKEN": ("api", "read_token"),
        "ASYNCNODE_METRICS_TOKEN": ("api", "metrics_token"),
    }
    #: Keys that moved, and where to (a config written for an earlier release gets a clear error).
    MOVED: ClassVar[dict[tuple[str, str], str]] = {
        ("redis", "result_ttl"): "[tasks] result_ttl",
        ("redis", "max_recent"): "[tasks] max_recent",
    }

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
        """Read and validate ``path``, then apply the environment overrides."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such file (pass --config PATH or set $ASYNCNODE_CONFIG)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        return cls.from_mapping(raw, p, os.environ if env is None else env)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], path: Path, env: Mapping[str, str]) -> Config:
        """Validate an already-parsed TOML document (see :meth:`from_toml`)."""
        for name in raw:
            if name not in cls.SECTIONS and name not in ("instances", "queues", "routes", "schedules"):
                known = ", ".join([*cls.SECTIONS, "instances", "queues", "routes", "schedules"])
                raise ConfigError(f"{path}: [{name}]: unknown section (known: {known})")
        sections: dict[str, dict[str, Any]] = {}
        for name in cls.SECTIONS:
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {name}: expected a table [{name}]")
            sections[name] = dict(table)
            for key in table:
                if (name, key) in cls.MOVED:
                    raise ConfigError(
                        f"{path}: [{name}] {key}: moved to {cls.MOVED[name, key]} (it serves both backends)"
                    )
        for var, (section, key) in cls.ENV.items():
            value = env.get(var)
            if value:
                sections[section][key] = _from_env(var, value, cls.SECTIONS[section], key, path)
        built = {name: _build_section(path, name, cls.SECTIONS[name], sections[name]) for name in cls.SECTIONS}
        if bool(built["broker"].url) != bool(built["redis"].url):
            given, missing = ("broker", "redis") if built["broker"].url else ("redis", "broker")
            raise ConfigError(
                f"{path}: [{given}] url is set but [{missing}] url is not: set both to use RabbitMQ and Redis, "
                "or neither to run embedded on one SQLite file"
            )
        api = built["api"]
        if api.read_token and not api.token:
            raise ConfigError(f"{path}: [api] read_token: set [api] token too (else nobody could act)")
        if api.read_token and hmac.compare_digest(api.token, api.read_token):
            raise ConfigError(f"{path}: [api] read_token: must differ from [api] token")
        queues = _build_queues(path, raw.get("queues"))
        routes = _build_routes(path, raw.get("routes"), queues)
        instances = _build_instances(path, raw.get("instances"), api, queues)
        schedules = _build_schedules(path, raw.get("schedules"), queues)
        return cls(path=path, instances=instances, queues=queues, routes=routes, schedules=schedules, **built)

    def broker_name(self, queue: str) -> str:
        """The RabbitMQ (and SQLite) name of declared queue ``queue``: ``<[broker] queue>[.<name>]``."""
        return self.broker.queue if queue == DEFAULT_QUEUE else f"{self.broker.queue}.{queue}"

    def check_queues(self, names: Iterable[str], where: str) -> tuple[str, ...]:
        """``names`` as declared queues, in order and once each; ConfigError naming the unknown ones."""
        chosen = tuple(dict.fromkeys(names))
        unknown = [n for n in chosen if n not in self.queues]
        if unknown:
            raise ConfigError(
                f"{where}: unknown queue(s) {', '.join(map(repr, unknown))} (declared: {', '.join(self.queues)})"
            )
        return chosen

    @property
    def embedded_mode(self) -> bool:
        """Whether this deployment runs embedded (no RabbitMQ and Redis URLs)."""
        return not self.broker.url

    @property
    def database(self) -> Path:
        """The embedded SQLite file (``[embedded] path`` is relative to config.toml's folder)."""
        return (self.path.resolve().parent / self.embedded.path).resolve()


def _from_env(var: str, value: str, section: type, key: str, path: Path) -> Any:
    """Convert an environment override to the type of the key it replaces."""
    ftype = {f.name: f.type for f in dataclasses.fields(section)}[key]
    if ftype == "int":
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: ${var}: expected an integer, got {value!r}") from None
    return value


def parse_rate(text: str) -> tuple[int, float]:
    """``"N/s"``, ``"N/m"`` or ``"N/h"`` as (N, window seconds); ValueError saying what is expected."""
    match = RATE.fullmatch(text.strip())
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f'expected "N/s", "N/m" or "N/h" with N a whole number of at least 1, got {text!r}')
    return int(match.group(1)), RATE_WINDOWS[match.group(2)]


def _build_queues(path: Path, raw: Any) -> dict[str, QueueConfig]:
    """Check ``[queues.*]``: names, reserved names, limits and rates; "default" is always declared."""
    if raw is None:
        return {DEFAULT_QUEUE: QueueConfig()}
    if not isinstance(raw, dict) or not all(isinstance(t, dict) for t in raw.values()):
        raise ConfigError(f"{path}: queues: expected tables [queues.<name>]")
    queues = {DEFAULT_QUEUE: QueueConfig()}
    for name, table in raw.items():
        where = f"{path}: [queues.{name}]"
        if not QUEUE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: queue names use a-z, 0-9, '_' and '-' only, 1 to 40 of them")
        if name in RESERVED_QUEUES:
            raise ConfigError(f"{where}: {name!r} is reserved (reserved: {', '.join(sorted(RESERVED_QUEUES))})")
        queue = _build_section(path, f"queues.{name}", QueueConfig, table)
        if queue.rate:
            try:
                parse_rate(queue.rate)
            except ValueError as e:
                raise ConfigError(f"{where} rate: {e}") from None
        queues[name] = queue
    return queues


def _build_routes(path: Path, raw: Any, queues: Mapping[str, QueueConfig]) -> dict[str, str]:
    """Check ``[routes]``: task type -> a declared queue."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: routes: expected a table [routes] of task type = queue")
    for ttype, queue in raw.items():
        if not isinstance(queue, str):
            raise ConfigError(f"{path}: [routes] {ttype}: expected a queue name, got {queue!r}")
        if queue not in queues:
            raise ConfigError(
                f"{path}: [routes] {ttype}: routes to queue {queue!r}, which is not declared "
                f"(declared: {', '.join(queues)}; add [queues.{queue}])"
            )
    return dict(raw)


def _build_schedules(path: Path, raw: Any, queues: Mapping[str, QueueConfig]) -> dict[str, ScheduleConfig]:
    """Check ``[schedules.*]``: names, exactly one of cron and every, the cron expression, the zone, the queue
    (the type and the payload once the handlers are loaded: see validate_schedules)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(t, dict) for t in raw.values()):
        raise ConfigError(f"{path}: schedules: expected tables [schedules.<name>]")
    schedules = {}
    for name, table in raw.items():
        where = f"{path}: [schedules.{name}]"
        if not QUEUE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: schedule names use a-z, 0-9, '_' and '-' only, 1 to 40 of them")
        sch = dataclasses.replace(_build_section(path, f"schedules.{name}", ScheduleConfig, table), name=name)
        if bool(sch.cron) == (sch.every is not None):
            raise ConfigError(f"{where}: set either cron or every (seconds), not both and not neither")
        if sch.cron and (len(sch.cron.split()) != 5 or not croniter.croniter.is_valid(sch.cron)):
            raise ConfigError(f"{where} cron: {sch.cron!r} is not a five-field cron expression")
        try:
            sch.zone  # noqa: B018 (the check is that it can be made)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{where} timezone: unknown time zone {sch.timezone!r} (e.g. UTC, Europe/Berlin)"
            ) from None
        if sch.queue and sch.queue not in queues:
            raise ConfigError(f"{where} queue: {sch.queue!r} is not declared (declared: {', '.join(queues)})")
        schedules[name] = sch
    return schedules


def _build_instances(
    path: Path, raw: Any, api: ApiConfig, queues: Mapping[str, QueueConfig]
) -> dict[str, InstanceConfig]:
    """Check ``[instances.*]``: names, roles, worker counts, and no API port claimed twice on a host."""
    if raw is None:
        return {DEFAULT_INSTANCE: InstanceConfig(host=DEFAULT_INSTANCE)}
    if not isinstance(raw, dict) or not raw or not all(isinstance(t, dict) for t in raw.values()):
        raise ConfigError(f"{path}: instances: expected one or more tables [instances.<name>]")
    instances: dict[str, InstanceConfig] = {}
    ports: dict[tuple[str, int], str] = {}
    for name, table in raw.items():
        where = f"{path}: [instances.{name}]"
        if not INSTANCE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: instance names use letters, digits, '.', '_' and '-' only")
        inst = _build_section(path, f"instances.{name}", InstanceConfig, table)
        if not inst.roles:
            raise ConfigError(f"{where} roles: expected at least one of {', '.join(INSTANCE_ROLES)}")
        for role in inst.roles:
            if role not in INSTANCE_ROLES:
                raise ConfigError(f"{where} roles: unknown role {role!r} (expected {', '.join(INSTANCE_ROLES)})")
        if inst.processes is not None and inst.processes_per_core is not None:
            raise ConfigError(f"{where}: set processes or processes_per_core, not both")
        if inst.queues and "worker" not in inst.roles:
            raise ConfigError(f"{where} queues: only an instance with the worker role consumes queues")
        unknown = [q for q in inst.queues if q not in queues]
        if unknown:
            raise ConfigError(
                f"{where} queues: {', '.join(map(repr, unknown))} not declared (declared: {', '.join(queues)})"
            )
        inst = dataclasses.replace(inst, host=inst.host or name, queues=tuple(dict.fromkeys(inst.queues)))
        if "api" in inst.roles:
            port = api.port if inst.api_port is None else inst.api_port
            other = ports.setdefault((inst.host, port), name)
            if other != name:
                raise ConfigError(
                    f"{where}: API port {port} on host {inst.host!r} is already claimed by [instances.{other}]"
                    " (set api_port or host)"
                )
        instances[name] = inst
    return instances


def _build_section(path: Path, name: str, cls: type, table: dict[str, Any]) -> Any:
    """Check a section's keys and value types against its dataclass and build it."""
    fields = {f.name: f for f in dataclasses.fields(cls) if "doc" in f.metadata}  # not those set otherwise
    for key in table:
        if key not in fields:
            raise ConfigError(f"{path}: [{name}] {key}: unknown key (known: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for key, value in table.items():
        values[key] = _check_value(f"{path}: [{name}] {key}", str(fields[key].type), value, fields[key].metadata)
    return cls(**values)


def _check_value(where: str, ftype: str, value: Any, rules: Mapping[str, Any]) -> Any:
    """Return ``value`` converted to ``ftype`` or raise ConfigError saying what was expected."""
    ftype = ftype.removesuffix(" | None")  # TOML has no null: an optional key is just absent
    if ftype == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if rules.get("nonempty") and not value:
            raise ConfigError(f"{where}: expected a non-empty string")
        if "choices" in rules and value not in rules["choices"]:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, rules['choices']))}, got {value!r}")
        return value
    if ftype == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if ftype in ("int", "float"):
        ok = isinstance(value, int) if ftype == "int" else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            kind = "an integer" if ftype == "int" else "a number"
            raise ConfigError(f"{where}: expected {kind}, got {value!r}")
        lo, hi = rules.get("min"), rules.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"≥ {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(f"{where}: expected a value {bounds}, got {value!r}")
        return float(value) if ftype == "float" else value
    if ftype == "dict[str, Any]":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table (e.g. {{ key = value }}), got {value!r}")
        return value
    if ftype == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: expected a list of non-empty strings, got {value!r}")
        return tuple(value)
    if ftype == "tuple[float, ...]":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: expected a non-empty list of numbers, got {value!r}")
        return tuple(_check_value(where, "float", v, rules) for v in value)
    raise AssertionError(f"unhandled config type {ftype}")  # a programming error, not a user's


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or name (what only this machine can reach)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_error(cfg: Config) -> str | None:
    """Protected mode: why an API must not serve as configured (anyone who reaches a non-loopback address with
    no token could submit tasks, send mail and act on dead letters), or None."""
    api = cfg.api
    if api.token or api.insecure or is_loopback(api.host):
        return None
    return (
        f"{cfg.path}: [api] host = {api.host!r} serves other machines but [api] token is not set: set token "
        "(or $ASYNCNODE_TOKEN), or set [api] insecure = true to serve it open deliberately"
    )


def config_path(arg: str | None, env: Mapping[str, str] | None = None) -> Path:
    """The config file to read: ``--config``, else ``$ASYNCNODE_CONFIG``, else ``./config.toml``."""
    env = os.environ if env is None else env
    return Path(arg or env.get("ASYNCNODE_CONFIG") or DEFAULT_CONFIG)


def redact_url(url: str) -> str:
    """``url`` with its password replaced, for logs and messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparsable url>"


# ============================================================================
# Handler API: everything a handler author needs, and nothing else
# ============================================================================

FIELD_TYPES: Final = ("string", "integer", "number", "boolean")


@dataclasses.dataclass(frozen=True)
class Field:
    """One payload field a task type expects, as shown by ``/api/task-types``."""

    name: str
    type: str = "string"
    required: bool = True
    description: str = ""
    max_length: int | None = None
    min: float | None = None
    max: float | None = None
    format: str | None = None
    multiline: bool = False
    default: JSON = None

    def describe(self, max_text: int) -> dict[str, JSON]:
        """The field as JSON for clients; strings are capped by ``[api] max_text``."""
        d: dict[str, JSON] = {"name": self.name, "type": self.type, "required": self.required}
        d["description"] = self.description
        if self.type == "string":
            d["max_length"] = min(self.max_length or max_text, max_text)
        for key in ("min", "max", "format", "default"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.multiline:
            d["multiline"] = True
        return d


Handler: TypeAlias = Callable[[dict[str, Any], "TaskContext"], Any]
Validator: TypeAlias = Callable[[dict[str, Any], "Config"], None]


@dataclasses.dataclass(frozen=True)
class TaskType:
    """A registered task type: its stable name, handler and payload schema."""

    name: str
    handler: Handler
    description: str
    fields: tuple[Field, ...] = ()
    validate: Validator | None = None
    timeout: float | None = None
    queue: str | None = None  #: the queue its tasks go to unless [routes] says otherwise

    @property
    def is_async(self) -> bool:
        """True when the handler is a coroutine function (run on the loop, not in a thread)."""
        return inspect.iscoroutinefunction(self.handler)

    def describe(self, max_text: int) -> dict[str, JSON]:
        """The type as JSON for ``/api/task-types`` and the page's forms."""
        fields = [f.describe(max_text) for f in self.fields]
        return {"name": self.name, "description": self.description, "fields": fields}


#: Every registered task type by name.
REGISTRY: dict[str, TaskType] = {}


def task(
    name: str,
    *,
    description: str,
    fields: Iterable[Field] = (),
    validate: Validator | None = None,
    timeout: float | None = None,
    queue: str | None = None,
) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of task type ``name`` (stable: it travels on the queue);
    ``queue``: the queue its tasks go to by default (config.toml must declare it; [routes] overrides it)."""

    def register(func: Handler) -> Handler:
        if name in REGISTRY:
            raise ValueError(f"task type {name!r} is already registered by {REGISTRY[name].handler!r}")
        fs = tuple(fields)
        for f in fs:
            if f.type not in FIELD_TYPES:
                raise ValueError(f"task type {name!r}: field {f.name!r} has unknown type {f.type!r}")
        REGISTRY[name] = TaskType(name, func, description, fs, validate, timeout, queue)
        return func

    return register


def load_handlers(cfg: Config) -> None:
    """Import the modules that register task types (each once), then check the queues they and [routes] name."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for mod in cfg.handlers.modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"[handlers] modules: cannot import {mod!r}: {e}") from None
    for ttype in REGISTRY.values():
        if ttype.queue is not None and ttype.queue not in cfg.queues:
            raise ConfigError(
                f"{cfg.path}: task type {ttype.name!r} ({ttype.handler.__module__}.{ttype.handler.__qualname__}) "
                f"declares queue {ttype.queue!r}, which config.toml does not declare (add [queues.{ttype.queue}])"
            )
    unknown = sorted(set(cfg.routes) - set(REGISTRY))
    if unknown:
        raise ConfigError(
            f"{cfg.path}: [routes] {unknown[0]}: no handler registers task type {unknown[0]!r} "
            f"(known: {', '.join(sorted(REGISTRY))})"
        )


def queue_of(cfg: Config, ttype: TaskType) -> str:
    """The queue a task of ``ttype`` goes to when its submission names none: [routes], its handler's, or default."""
    return cfg.routes.get(ttype.name) or ttype.queue or DEFAULT_QUEUE


#: Records one progress report of a task: (fraction, note) -> awaitable (the worker writes it to the store).
ProgressReport: TypeAlias = Callable[[float, "str | None"], Awaitable[Any]]


class TaskContext:
    """What a handler gets besides its payload: the task's identity, config and progress reporting.

    The worker gives it ``report``, which records a progress report; a handler only calls :meth:`progress`.
    """

    def __init__(self, tid: str, ttype: str, attempt: int, cfg: Config, report: ProgressReport) -> None:
        self.id = tid
        self.type = ttype
        self.attempt = attempt
        self.config = cfg
        #: True once the task is cancelled: a sync handler should return soon (it cannot be stopped by force);
        #: an async one is cancelled at its current await.
        self.cancelled = False
        self._report = report
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._latest: tuple[float, str | None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    @functools.cached_property
    def log(self) -> logging.Logger:
        """The logger ``asyncnode.task.<type>`` (made on first use: few handlers log)."""
        return log.getChild("task").getChild(self.type)

    def progress(self, fraction: float, note: str | None = None) -> None:
        """Report progress (0..1) and a note, from async or sync handlers (writes coalesce: the newest wins)."""
        value = (min(max(float(fraction), 0.0), 1.0), note)
        if threading.get_ident() == self._loop_thread:
            self._set_progress(value)
        else:
            self._loop.call_soon_threadsafe(self._set_progress, value)

    def _set_progress(self, value: tuple[float, str | None]) -> None:
        self._latest = value
        if self._flusher is None or self._flusher.done():
            self._flusher = self._loop.create_task(self._flush_progress())

    async def _flush_progress(self) -> None:
        while self._latest is not None:
            (fraction, note), self._latest = self._latest, None
            try:
                await self._report(fraction, note)
            except STORE_ERRORS as e:
                self.log.warning("progress of %s not recorded: %s", self.id, e)

    async def drain(self) -> None:
        """Wait until every progress write has been made."""
        while self._flusher is not None and not self._flusher.done():
            await self._flusher


async def run_handler(ttype: TaskType, payload: dict[str, Any], ctx: TaskContext, limit: float) -> JSON:
    """Run a handler under its time limit: coroutines on the loop, plain functions in a thread.

    Past the limit a coroutine is cancelled; a thread cannot be, so it runs on unobserved (the attempt failed).
    """
    async with asyncio.timeout(limit):
        if ttype.is_async:
            return await ttype.handler(payload, ctx)
        return await asyncio.to_thread(ttype.handler, payload, ctx)


# ============================================================================
# Pure core: validation, envelopes, the status machine, queue arguments, access rules
# ============================================================================

#: Suffix of the dead-letter queue's name (``<queue>.dlq``).
DLQ_SUFFIX: Final = ".dlq"
#: What a task id looks like (a UUID); anything else is not a task, whatever Redis holds under it.
TASK_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: A W3C ``traceparent`` of version 00: version, trace id, parent span id, flags (neither id all zeros).
TRACEPARENT: Final = re.compile(r"00-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
#: Most ids or types one WebSocket client may subscribe to.
MAX_SUBSCRIBED: Final = 1000
#: Fields of a task sent to a WebSocket client that (re)connects, so it can catch up.
SNAPSHOT_FIELDS: Final = (
    "id",
    "type",
    "queue",
    "status",
    "seq",
    "result",
    "error",
    "progress",
    "attempts",
    "worker",
    "next_attempt_at",
    "run_at",
    "cancelled_by",
)


def dumps(obj: JSON) -> str:
    """Compact JSON text: orjson's where it can; else (integers past 64 bits, lone surrogates) the json
    module's, escaped to ASCII so that it always encodes."""
    if orjson is not None:
        try:
            return orjson.dumps(obj).decode()
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """Parse JSON text (orjson's where it can, else the json module's, which also takes NaN and huge integers)."""
    if orjson is not None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


@dataclasses.dataclass(frozen=True)
class Submission:
    """A valid ``POST /api/tasks`` body."""

    type: TaskType
    payload: dict[str, Any]
    timeout: float | None = None
    queue: str = DEFAULT_QUEUE
    run_at: float | None = None  #: when it may start (epoch seconds); None: at once


#: Keys a ``POST /api/tasks`` body may have.
SUBMISSION_KEYS: Final = ("type", "payload", "timeout", "queue", "delay", "run_at")
#: Seconds a ``run_at`` may lie in the past (a clock a little behind, a retried request): it runs at once.
RUN_AT_SLACK: Final = 60.0


def run_at_of(body: Mapping[str, JSON], max_delay: float, now: float) -> float | None:
    """When a submission asks to start: ``delay`` seconds from ``now``, or ``run_at`` (RFC 3339 with a zone, or
    epoch seconds); None for at once. Raise ValidationError for both, a bad value, or a time beyond ``max_delay``
    ahead or more than RUN_AT_SLACK behind."""
    delay, run_at = body.get("delay"), body.get("run_at")
    if delay is not None and run_at is not None:
        raise ValidationError("give either 'delay' or 'run_at', not both", "delay")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 < delay <= max_delay:
            raise ValidationError(f"'delay' must be a number of seconds above 0 and at most {max_delay:g}", "delay")
        return now + float(delay)
    if run_at is None:
        return None
    when: float | None = None
    if isinstance(run_at, int | float) and not isinstance(run_at, bool) and math.isfinite(run_at):
        when = float(run_at)
    elif isinstance(run_at, str) and len(run_at) <= 64:
        with contextlib.suppress(ValueError):
            parsed = datetime.datetime.fromisoformat(run_at)
            if parsed.tzinfo is None:
                raise ValidationError("'run_at' needs a time zone (e.g. 2026-01-31T09:00:00Z or +01:00)", "run_at")
            when = parsed.timestamp()
    if when is None:
        raise ValidationError("'run_at' must be an RFC 3339 time with a zone, or epoch seconds", "run_at")
    if when < now - RUN_AT_SLACK:
        raise ValidationError(f"'run_at' is more than {RUN_AT_SLACK:g} s in the past", "run_at")
    if when > now + max_delay:
        raise ValidationError(f"'run_at' is more than {max_delay:g} s ahead ([broker] max_delay)", "run_at")
    return when


def validate_submission(body: JSON, cfg: Config, now: float | None = None) -> Submission:
    """Check a ``POST /api/tasks`` body; return its task type, normalised payload, time limit, queue and start."""
    if not isinstance(body, dict):
        raise ValidationError("body must be a JSON object")
    unknown = set(body) - set(SUBMISSION_KEYS)
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))[:200]
        raise ValidationError(f"unknown key(s) in body: {names} (expected {', '.join(SUBMISSION_KEYS)})")
    queue = body.get("queue")
    if queue is not None and (not isinstance(queue, str) or queue not in cfg.queues):
        shown = repr(queue[:50]) if isinstance(queue, str) else "not a string"
        raise ValidationError(f"'queue': no queue {shown} (known: {', '.join(cfg.queues)})", "queue")
    timeout = body.get("timeout")
    limit = cfg.broker.task_timeout
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= limit
    ):
        raise ValidationError(f"'timeout' must be a number of seconds above 0 and at most {limit:g}", "timeout")
    ttype_name = body.get("type")
    if not isinstance(ttype_name, str) or not ttype_name:
        raise ValidationError("'type' is required and must be a string", "type")
    ttype = REGISTRY.get(ttype_name)
    if ttype is None:
        known = ", ".join(sorted(REGISTRY))
        raise ValidationError(f"unknown task type {ttype_name[:100]!r} (known: {known})", "type")
    payload = validate_payload(ttype, body.get("payload", {}), cfg)
    run_at = None
    if "delay" in body or "run_at" in body:
        run_at = run_at_of(body, cfg.broker.max_delay, time.time() if now is None else now)
    limit_s = None if timeout is None else float(timeout)
    return Submission(ttype, payload, limit_s, queue or queue_of(cfg, ttype), run_at)


def validate_payload(ttype: TaskType, payload: JSON, cfg: Config) -> dict[str, Any]:
    """Check ``payload`` against the fields of ``ttype``; return it with defaults filled in."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ValidationError("'payload' must be a JSON object", "payload")
    known = {f.name: f for f in ttype.fields}
    for key in payload:
        if key not in known:
            expected = ", ".join(known) or "no fields"
            raise ValidationError(f"payload: unknown field {str(key)[:100]!r} ({ttype.name} takes {expected})", key)
    out: dict[str, Any] = {}
    for f in ttype.fields:
        if f.name not in payload or payload[f.name] is None:
            if f.required:
                raise ValidationError(f"payload.{f.name} is required", f.name)
            if f.default is not None:
                out[f.name] = f.default
            continue
        out[f.name] = _check_field(f, payload[f.name], cfg.api.max_text)
    if ttype.validate is not None:
        ttype.validate(out, cfg)
    return out


def _check_field(f: Field, value: JSON, max_text: int) -> JSON:
    """One field's value, checked against its declared type and limits."""
    where = f"payload.{f.name}"
    if f.type == "string":
        if not isinstance(value, str):
            raise ValidationError(f"{where} must be a string", f.name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{where} is not valid Unicode text (lone surrogate)", f.name) from None
        limit = min(f.max_length or max_text, max_text)
        if len(value) > limit:
            raise ValidationError(f"{where} is too long ({len(value)} characters; at most {limit})", f.name)
        return value
    if f.type == "boolean":
        if not isinstance(value, bool):
            raise ValidationError(f"{where} must be true or false", f.name)
        return value
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if f.type == "integer" and not is_int:
        raise ValidationError(f"{where} must be an integer", f.name)
    if f.type == "number" and not (is_int or (isinstance(value, float) and math.isfinite(value))):
        raise ValidationError(f"{where} must be a number", f.name)
    if f.min is not None and value < f.min:
        raise ValidationError(f"{where} must be at least {f.min:g}", f.name)
    if f.max is not None and value > f.max:
        raise ValidationError(f"{where} must be at most {f.max:g}", f.name)
    return value


def validate_schedules(cfg: Config) -> None:
    """Check each schedule's type and payload against the loaded handlers (ConfigError in one line)."""
    for name, sch in cfg.schedules.items():
        where = f"{cfg.path}: [schedules.{name}]"
        ttype = REGISTRY.get(sch.type)
        if ttype is None:
            raise ConfigError(f"{where} type: unknown task type {sch.type!r} (known: {', '.join(sorted(REGISTRY))})")
        try:
            validate_payload(ttype, sch.payload or {}, cfg)
        except ValidationError as e:
            raise ConfigError(f"{where} payload: {e}") from None


#: Seconds past which a due slot counts as missed (its holder died, or nothing ran): catch_up decides for it.
MISSED_AFTER: Final = 2.0


def next_slot(sch: ScheduleConfig, after: float) -> float:
    """The first slot of ``sch`` strictly after ``after`` (epoch seconds); a cron expression is read in the
    schedule's zone, by croniter, which decides the days the clocks change."""
    if sch.every is not None:
        return (math.floor(after / sch.every) + 1) * sch.every
    start = datetime.datetime.fromtimestamp(after, sch.zone)
    return float(croniter.croniter(sch.cron, start).get_next(float))


def latest_slot(sch: ScheduleConfig, at: float) -> float | None:
    """The last slot of ``sch`` at or before ``at`` (None: there is none)."""
    if sch.every is not None:
        return math.floor(at / sch.every) * sch.every
    start = datetime.datetime.fromtimestamp(at + 0.001, sch.zone)  # a slot exactly at ``at`` counts
    with contextlib.suppress(croniter.CroniterBadDateError):
        return float(croniter.croniter(sch.cron, start).get_prev(float))
    return None


def slots_to_fire(sch: ScheduleConfig, last: float, now: float) -> tuple[list[float], float]:
    """What the scheduler does at ``now`` for ``sch``, whose slots up to ``last`` are handled: the slots to fire,
    oldest first, and the new ``last``. Of the slots due since ``last``, each on time (at most MISSED_AFTER
    old) is fired; the missed ones before them are covered by one task (``catch_up = "one"``: the latest
    missed slot's) or by none."""
    first = next_slot(sch, last)
    if first > now:
        return [], last
    on_time: list[float] = []
    slot = next_slot(sch, max(last, now - MISSED_AFTER - 1e-6))
    while slot <= now and len(on_time) < 1000:  # a tiny period: at most so many a tick
        on_time.append(slot)
        slot = next_slot(sch, slot)
    if on_time and on_time[0] == first:
        return on_time, on_time[-1]
    half = sch.every / 2 if sch.every is not None else 1.0  # between two slots (a cron's are a minute apart)
    missed = latest_slot(sch, on_time[0] - half) if on_time else latest_slot(sch, now)
    cover = [max(missed or first, first)]
    return (cover if sch.catch_up == "one" else []) + on_time, on_time[-1] if on_time else cover[0]


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The message a worker receives: which task to run, with what."""

    id: str
    type: str
    payload: dict[str, Any]
    timeout: float | None = None
    created_at: float | None = None  #: when the task was submitted (None: unknown, queued by an earlier release)
    queue: str = DEFAULT_QUEUE  #: the queue it belongs to: retries go back to it, a requeued dead letter too
    run_at: float | None = None  #: when it was to start, if submitted with a delay (its wait is counted from then)
    traceparent: str | None = None  #: the W3C trace context it was submitted in, if any

    def encode(self) -> bytes:
        """The message body as published to the work queue."""
        body: dict[str, JSON] = {"id": self.id, "type": self.type, "payload": self.payload}
        if self.timeout is not None:
            body["timeout"] = self.timeout
        if self.created_at is not None:
            body["created_at"] = self.created_at
        if self.queue != DEFAULT_QUEUE:
            body["queue"] = self.queue
        if self.run_at is not None:
            body["run_at"] = self.run_at
        if self.traceparent is not None:
            body["traceparent"] = self.traceparent
        return dumps(body).encode()

    @classmethod
    def decode(cls, body: bytes) -> Envelope:
        """Parse a message body; raise EnvelopeError if it is not an envelope."""
        try:
            data = loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise EnvelopeError(f"message body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise EnvelopeError("message body is not a JSON object")
        tid, ttype, payload = data.get("id"), data.get("type"), data.get("payload", {})
        if not isinstance(tid, str) or not tid or not isinstance(ttype, str) or not isinstance(payload, dict):
            raise EnvelopeError("message body lacks a string id, a string type or an object payload")
        timeout, created = data.get("timeout"), data.get("created_at")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
            raise EnvelopeError("message body has a timeout that is not a positive number")
        created, run_at = _time_or_none(created), _time_or_none(data.get("run_at"))  # never refused for these
        queue = data.get("queue", DEFAULT_QUEUE)
        if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
            raise EnvelopeError("message body has a queue that is not a queue name")
        trace = data.get("traceparent")
        return cls(
            tid,
            ttype,
            payload,
            None if timeout is None else float(timeout),
            created,
            queue,
            run_at,
            trace if isinstance(trace, str) and TRACEPARENT.fullmatch(trace) else None,
        )


def _time_or_none(value: Any) -> float | None:
    """A time read from an envelope, or None when absent or not a time (unknown: queued by an earlier release)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return float(value)


def new_task_id() -> str:
    """A fresh task id (a random UUID)."""
    return str(uuid.uuid4())


def blank_record(tid: str) -> dict[str, JSON]:
    """Every field a task shows, with the value it has before anything set it."""
    rec: dict[str, JSON] = {"id": tid, "type": None, "queue": DEFAULT_QUEUE, "status": None, "payload": None}
    rec |= {"result": None, "error": None}
    rec |= {"attempts": 0, "created_at": None, "started_at": None, "finished_at": None, "worker": None}
    return rec | {"progress": None, "seq": 0}


#: Statuses a task may be started from ("": no record, e.g. expired or lost with Redis); a task in any other
#: (completed, failed, cancelled) is finished, and a delivery of it is acknowledged without running it.
#: "rejected": the API answered 503, yet RabbitMQ may hold the message after all (a confirm lost in time), and
#: then it runs.
RUNNABLE: Final = ("", "pending", "scheduled", "retrying", "started", "rejected")
#: A guard that lets a change through only where the task has no record yet. ("" twice: a guard is sent to the
#: update script comma-joined, and one "" alone would read as no guard at all.)
NO_RECORD: Final = ("", "")
#: Statuses a task can be cancelled in: it has not finished (a running one is stopped where it runs).
CANCELLABLE: Final = ("pending", "scheduled", "retrying", "started")
#: Fields of an update kept in a task's timeline.
HISTORY_FIELDS: Final = frozenset({"attempt", "attempts", "error", "worker", "next_attempt_at", "cancelled_by"})
#: Fields cleared when a dead letter is requeued as a fresh task.
RESET_FIELDS: Final = (
    "result",
    "error",
    "started_at",
    "finished_at",
    "worker",
    "progress",
    "note",
    "next_attempt_at",
    "retries",
)


@dataclasses.dataclass(frozen=True)
class Transition:
    """What one kind of change does to a task's record (the rules plan_change applies)."""

    status: str
    after: tuple[str, ...] = ()  #: statuses the task must be in ("" = no record); () = any
    public: tuple[str, ...] = ()  #: fields published with the update (those in HISTORY_FIELDS also kept in history)
    stamp: str = ""  #: field set to the time of the change
    counter: str = ""  #: field incremented by the change, and published
    timeline: bool = True  #: a change of status: kept in history and counted (False: a progress report)
    final: bool = False  #: nothing more happens: the record is kept for [tasks] result_ttl
    new: bool = False  #: the task's first record: id, type, no attempts; indexed among the recent tasks
    reset: bool = False  #: a requeue: as new, RESET_FIELDS cleared and any expiry dropped


#: Every kind of change of a task's state, by name.
TRANSITIONS: Final[Mapping[str, Transition]] = {
    "submitted": Transition("pending", public=("queue", "attempts"), stamp="created_at", new=True),
    # Submitted with a delay: held (not queued) until its run_at.
    "scheduled": Transition("scheduled", public=("queue", "attempts", "run_at"), stamp="created_at", new=True),
    "requeued": Transition("pending", public=("queue", "attempts"), reset=True),
    "started": Transition("started", after=RUNNABLE, public=("worker",), stamp="started_at", counter="attempts"),
    # Guarded on "started": a late progress write never overwrites a final state.
    "progress": Transition("started", after=("started",), public=("progress", "note"), timeline=False),
    # The outcomes of a run are guarded on RUNNABLE: one that ends after a cancel never overwrites it.
    "retrying": Transition("retrying", after=RUNNABLE, public=("error", "next_attempt_at", "attempt")),
    "completed": Transition("completed", after=RUNNABLE, public=("result",), stamp="finished_at", final=True),
    "failed": Transition("failed", after=RUNNABLE, public=("error",), stamp="finished_at", final=True),
    "rejected": Transition("rejected", public=("error",), stamp="finished_at", final=True),
    "cancelled": Transition("cancelled", after=CANCELLABLE, public=("cancelled_by",), stamp="cancelled_at", final=True),
}


#: A word a task is found by (``GET /api/tasks?q=``): a run of letters and digits, lower-cased. Both stores index
#: the words of a task's id and payload from its submission, and of its result or error once it ends. A UUID
#: (a task's id, or one in a payload) is one word: its first eight digits, the short id the dashboard shows (a
#: search for a whole UUID also checks the rest: TaskFilter.needles).
SEARCH_WORD: Final = re.compile(r"[^\W_]+")
ANY_UUID: Final = re.compile(r"\b({}}})-{}\b".format(*TASK_ID.pattern.split("}-", 1)))  # its first part, caught
#: Words indexed per task at most (a large payload is found by its first ones), and the longest word indexed.
MAX_SEARCH_WORDS: Final = 100
MAX_WORD: Final = 64


def search_words(*texts: JSON) -> tuple[str, ...]:
    """The distinct words of ``texts`` (strings as they are, other JSON as its text; None skipped), lower-cased, in
    the order first seen, at most MAX_SEARCH_WORDS, each at most MAX_WORD characters; a UUID is its first part."""
    seen: dict[str, None] = {}
    for text in texts:
        if text is None:
            continue
        lowered = (text if isinstance(text, str) else dumps(text)).lower()
        for word in SEARCH_WORD.findall(ANY_UUID.sub(r"\1", lowered) if "-" in lowered else lowered):
            seen[word[:MAX_WORD]] = None
            if len(seen) >= MAX_SEARCH_WORDS:
                return tuple(seen)
    return tuple(seen)


@dataclasses.dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a worker ~1 µs per change
class Change:
    """One change of a task's state as plan_change decided it; a store only makes it, atomically:
    check ``guard``, drop ``clear``, on a record without status write ``restore`` and index it at
    ``index_at``, bump ``counter`` and ``seq``, write ``fields``, append ``entry`` to the history and count
    ``status``, drop (``persist``) or set (``expire``) the expiry, then publish :meth:`message`."""

    tid: str
    status: str
    at: float  #: when the change was planned (its update's ``ts``)
    head: str  #: the update message without its counter, sequence number and closing brace
    fields: Mapping[str, JSON]  #: fields written (none is None)
    restore: Mapping[str, JSON] = dataclasses.field(default_factory=dict)
    clear: tuple[str, ...] = ()
    guard: tuple[str, ...] = ()  #: statuses the record must be in ("" = none); () = any
    counter: str = ""
    entry: str | None = None  #: history entry (JSON); None: not a change of status
    expire: int = 0  #: seconds the record is kept from now on (0 = no change)
    persist: bool = False
    index_at: float | None = None
    index_keep: int = 0  #: the size the recent-tasks index is trimmed to
    tally: str = ""  #: the per-queue counter of a final ``status`` (``<status>@<queue>``) bumped with it ('' = none)
    metrics: tuple[str, ...] = ()  #: the deployment's metrics it adds to: name, amount, name, amount... (metric_ops)
    metrics_first: bool = False  #: add them only if ``counter`` is now 1 (a first start: its wait is counted once)
    words: tuple[str, ...] = ()  #: words the task is now found by too (search_words)
    reindex: bool = False  #: ``words`` replace those it was found by (a new task, or a requeue with its payload)

    def message(self, seq: int, count: int) -> str:
        """The update as published, with the new value of ``counter`` and the sequence number (Redis's
        update script splices them into ``head`` the same way, atomically with the write)."""
        extra = f',"{self.counter}":{count}' if self.counter else ""
        return f'{self.head}{extra},"seq":{seq}}}'


def plan_change(
    event: str,
    tid: str,
    ttype: str,
    fields: Mapping[str, JSON],
    *,
    tasks: TasksConfig,
    now: float | None = None,
    restore: Mapping[str, JSON] | None = None,
    queue: str = "",
    tally: bool = False,
    waited: float | None = None,
    ran: float | None = None,
) -> Change:
    """The change ``event`` (a key of TRANSITIONS) makes to task ``tid``, given the fields it reports.

    ``queue``: the task's queue, labelling what the change adds to the metrics (metric_ops; '' = nothing);
    ``tally``: bump its count of tasks finishing with the new status too (a deployment with one queue counts only
    the totals). ``waited``: of a start, the seconds since the task was due; ``ran``: of a completion, its run time.

    ``restore``: fields written only if the record has no status, i.e. was lost (a Redis restart
    without persistence, an eviction, a flush) while its message waited: the worker knows them from
    the envelope; the task is then indexed again at its ``created_at``, or at ``now`` when that is unknown.
    """
    t = TRANSITIONS[event]
    now = time.time() if now is None else now
    values: dict[str, JSON] = {"id": tid, "type": ttype, "attempts": 0} if t.new or t.reset else {}
    values.update(fields)
    if t.stamp:
        values[t.stamp] = now
    values["status"] = t.status
    public = {k: values.get(k) for k in t.public}
    entry = None
    if t.timeline:
        entry = dumps({"status": t.status, "ts": now, **{k: v for k, v in public.items() if k in HISTORY_FIELDS}})
    restored = {k: v for k, v in (restore or {}).items() if v is not None}
    words: tuple[str, ...] = ()
    if tasks.search_words and (t.new or t.reset):
        words = search_words(tid, values.get("payload"))
    elif tasks.search_words and t.final:
        words = search_words(values.get("result"), values.get("error"))
    # A requeued task whose record expired meanwhile is indexed again, as a lost one is.
    index_at: float | None = now if t.new or t.reset else None
    if restored:
        created = restored.get("created_at")
        index_at = float(created) if isinstance(created, int | float) else now
    return Change(
        tid=tid,
        status=t.status,
        at=now,
        head=dumps({"id": tid, "type": ttype, "status": t.status, "ts": now, **public})[:-1],
        fields={k: v for k, v in values.items() if v is not None},
        restore=restored,
        clear=RESET_FIELDS if t.reset else (),
        guard=t.after,
        counter=t.counter,
        entry=entry,
        expire=tasks.result_ttl if t.final else 0,
        persist=t.reset,
        index_at=index_at,
        index_keep=tasks.max_recent,
        tally=f"{t.status}@{queue}" if tally and t.final else "",
        metrics=metric_ops(event, ttype, queue, waited=waited, ran=ran) if queue else (),
        metrics_first=event == "started",
        words=words,
        reindex=t.new or t.reset,
    )


#: Upper bounds, in seconds, of the buckets of the run and wait time histograms (then +Inf).
METRIC_BUCKETS: Final = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
)
#: What joins a metric's kind and its label values in the store (a character no type or queue name holds).
METRIC_SEP: Final = "\x1f"
#: Statuses counted in ``asyncnode_tasks_total``.
COUNTED: Final = frozenset({"completed", "failed", "cancelled", "retrying"})


def metric_ops(
    event: str, ttype: str, queue: str, *, waited: float | None = None, ran: float | None = None
) -> tuple[str, ...]:
    """What a change adds to the deployment's metrics, as (name, amount) pairs flattened: ``S`` submitted,
    ``T`` reached a COUNTED status, ``D``/``Ds`` a run time's bucket and sum, ``W``/``Ws`` a wait's; each
    name followed by its labels (type, queue, status or bucket index), joined by METRIC_SEP. Counts are whole
    numbers, sums fixed-point text: the stores add the first as integers and the second as floats."""
    t, sep = TRANSITIONS[event], METRIC_SEP
    ops: list[str] = []
    if t.new or t.reset:
        ops += [f"S{sep}{ttype}{sep}{queue}", "1"]
    if t.status in COUNTED:
        ops += [f"T{sep}{ttype}{sep}{queue}{sep}{t.status}", "1"]
    if ran is not None:
        ran = max(ran, 0.0)
        ops += [f"D{sep}{ttype}{sep}{queue}{sep}{bisect.bisect_left(METRIC_BUCKETS, ran)}", "1"]
        ops += [f"Ds{sep}{ttype}{sep}{queue}", f"{ran:.6f}"]
    if waited is not None:
        waited = max(waited, 0.0)
        ops += [
            f"W{sep}{queue}{sep}{bisect.bisect_left(METRIC_BUCKETS, waited)}",
            "1",
            f"Ws{sep}{queue}",
            f"{waited:.6f}",
        ]
    return tuple(ops)


def origin_allowed(origin: str, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a browser page from ``origin`` may open the WebSocket or act: the page's own origin, or a listed one."""
    if origin in allowed:
        return True
    try:
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:
        return False


#: Methods that change state: refused from cross-site pages and to the read-only token.
MUTATING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def access_of(api: ApiConfig, authorization: str | None, query_token: str | None) -> str | None:
    """What a request may do: ``operator`` (everything), ``read`` (GETs and the stream), ``open`` (no token is
    set: everything), or None (a token is set and the request has neither). Both tokens are always compared, in
    constant time."""
    if not api.token:
        return "open"
    operator = token_matches(api.token, authorization, query_token)
    reader = bool(api.read_token) & token_matches(api.read_token or "\0", authorization, query_token)
    return "operator" if operator else "read" if reader else None


def cross_site(origin: str | None, fetch_site: str | None, host: str | None, allowed: Iterable[str]) -> str | None:
    """Why a state-changing request comes from another site's page (refused), or None: its ``Origin`` is
    present and neither the page's own nor allowed, or ``Sec-Fetch-Site`` says ``cross-site``. A request with
    neither header (curl, scripts, the CLI) is not a browser's and passes."""
    if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
        return "Sec-Fetch-Site: cross-site"
    if origin is not None and not origin_allowed(origin, host, allowed):
        return f"Origin {origin[:100]!r}"
    return None


def token_matches(expected: str, authorization: str | None, query_token: str | None) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>`` (or a ``token`` query parameter)."""
    given = query_token or ""
    if authorization and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    # Header bytes that are not UTF-8 arrive as lone surrogates: compare them as bytes too.
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


@dataclasses.dataclass(frozen=True)
class Subscription:
    """Which updates a WebSocket client wants: everything, or tasks by id or by type."""

    ids: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    everything: bool = True

    def wants(self, update: Mapping[str, Any]) -> bool:
        """Whether ``update`` goes to this client (stats always do)."""
        return self.everything or "id" not in update or update["id"] in self.ids or update.get("type") in self.types

    @classmethod
    def parse(cls, text: str) -> Subscription | None:
        """``{"subscribe": "*"}``, ``{"subscribe": {"ids": [...], "types": [...]}}``; None if not one of those."""
        try:
            request = loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(request, dict) or "subscribe" not in request:
            return None
        wanted = request["subscribe"]
        if wanted == "*":
            return cls()
        if not isinstance(wanted, dict) or not set(wanted) <= {"ids", "types"}:
            return None
        lists = [wanted.get("ids", []), wanted.get("types", [])]
        if not all(
            isinstance(v, list) and len(v) <= MAX_SUBSCRIBED and all(isinstance(x, str) for x in v) for v in lists
        ):
            return None
        return cls(frozenset(lists[0]), frozenset(lists[1]), everything=False)


def snapshot_update(task: Mapping[str, JSON]) -> str:
    """A task's current state as an update message, for a client catching up."""
    update = {k: task.get(k) for k in SNAPSHOT_FIELDS}
    update["ts"] = task.get("finished_at") or task.get("started_at") or task.get("created_at")
    return dumps(update)


def batch_frame(messages: list[str]) -> str:
    """One WebSocket text frame for queued updates: the update, or a JSON array of them."""
    return messages[0] if len(messages) == 1 else "[" + ",".join(messages) + "]"


def _dead_lettering(cfg: BrokerConfig, target: str) -> dict[str, Any]:
    """Arguments of a queue of ``cfg.queue_type`` that dead-letters into queue ``target``."""
    args: dict[str, Any] = {"x-queue-type": cfg.queue_type, "x-dead-letter-exchange": ""}
    args["x-dead-letter-routing-key"] = target
    if cfg.queue_type == "quorum":
        # At-least-once dead-lettering needs reject-publish overflow.
        args |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return args


def queue_arguments(cfg: BrokerConfig) -> dict[str, Any]:
    """The arguments the work queue is declared with."""
    args = _dead_lettering(cfg, cfg.queue + DLQ_SUFFIX)
    if cfg.queue_type == "quorum":
        # Quorum queues before RabbitMQ 4.0 have no default delivery limit; set one
        # so a message that kills every worker ends in the DLQ instead of looping.
        args["x-delivery-limit"] = cfg.delivery_limit
    return args


def retry_delay_for(failures: int, delays: tuple[float, ...]) -> float:
    """Seconds to wait after failure number ``failures`` (1-based): the n-th delay, the last repeating."""
    return delays[min(failures, len(delays)) - 1]


def retry_queue_name(cfg: BrokerConfig, delay: float, work: str | None = None) -> str:
    """The queue where a retry waits ``delay`` seconds before going back to work queue ``work`` (its RabbitMQ
    name; default: the default queue's)."""
    return f"{work or cfg.queue}.retry.{round(delay * 1000)}ms"


def retry_queue_arguments(cfg: BrokerConfig, delay: float, work: str | None = None) -> dict[str, Any]:
    """A retry queue: every message expires after ``delay`` and is dead-lettered back to its work queue.

    One queue per work queue and delay, because a queue only expires messages at its head.
    """
    return {"x-message-ttl": round(delay * 1000), **_dead_lettering(cfg, work or cfg.queue)}


def broker_queues(cfg: Config) -> list[str]:
    """Every RabbitMQ queue a deployment declares: each work queue, its retry queues, and the one DLQ."""
    names = []
    for queue in cfg.queues:
        work = cfg.broker_name(queue)
        names += [work, *(retry_queue_name(cfg.broker, d, work) for d in sorted(set(cfg.broker.retry_delays)))]
    return [*names, cfg.broker.queue + DLQ_SUFFIX]


def task_time_limit(cfg: BrokerConfig, task_timeout: float | None, type_timeout: float | None) -> float:
    """The time limit of one run: the task's own, else its type's, never above ``[broker] task_timeout``."""
    chosen = task_timeout or type_timeout or cfg.task_timeout
    return min(chosen, cfg.task_timeout)


def header_time(t: float) -> str:
    """A time for a message header: AMQP tables would carry a float as 32 bits (2-minute steps)."""
    return f"{t:.3f}"


def _header_time(value: Any) -> float | None:
    try:
        return float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError):
        return None


def dead_letter_info(message_id: str | None, body: bytes, headers: Mapping[str, Any]) -> dict[str, JSON]:
    """What ``GET /api/dlq`` shows of a dead-lettered message (ours, or one the broker dead-lettered)."""
    env: Envelope | None = None
    with contextlib.suppress(EnvelopeError):
        env = Envelope.decode(body)
    item: dict[str, JSON] = {
        "id": env.id if env else message_id,
        "type": env.type if env else None,
        "queue": env.queue if env else None,
        "error": headers.get("x-error"),
        "attempts": headers.get("x-attempts"),
        "failed_at": _header_time(headers.get("x-last-failed-at")),
        "first_failed_at": _header_time(headers.get("x-first-failed-at")),
        "traceback": headers.get("x-traceback"),
        "payload": env.payload if env else None,  # what an edit and requeue starts from
    }
    deaths = headers.get("x-death") or []
    if item["error"] is None and deaths:
        # Dead-lettered by RabbitMQ itself: a delivery limit, a rejection, an expiry.
        death = deaths[0]
        reason = death.get("reason", b"")
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        item["error"] = {
            "delivery_limit": "dead-lettered by RabbitMQ: delivery limit reached (the task kept killing its worker)",
            "rejected": "dead-lettered: rejected as unreadable",
        }.get(reason, f"dead-lettered by RabbitMQ ({reason})")
        when = death.get("time")
        item["failed_at"] = when.timestamp() if isinstance(when, datetime.datetime) else None
    if env is None:
        item["error"] = f"{item['error'] or 'dead-lettered'}; body is not a task envelope"
    return item


def select_instance(cfg: Config, name: str | None, env: Mapping[str, str], hostname: str) -> tuple[str, InstanceConfig]:
    """This host's instance: ``--instance``, ``$ASYNCNODE_INSTANCE``, the one named like the host, or the only one."""
    chosen = name or env.get("ASYNCNODE_INSTANCE")
    known = ", ".join(cfg.instances)
    if chosen:
        if chosen not in cfg.instances:
            raise ConfigError(f"{cfg.path}: no instance {chosen!r} (known: {known})")
        return chosen, cfg.instances[chosen]
    for candidate in (hostname, hostname.split(".")[0]):
        if candidate in cfg.instances:
            return candidate, cfg.instances[candidate]
    if len(cfg.instances) == 1:
        return next(iter(cfg.instances.items()))
    raise ConfigError(
        f"{cfg.path}: several instances ({known}) and none named after this host {hostname!r};"
        " pass --instance NAME or set $ASYNCNODE_INSTANCE"
    )


def worker_count(cfg: Config, inst: InstanceConfig, cpus: int) -> int:
    """Worker processes of an instance: ``processes``, else ``processes_per_core`` times the cores (at least 1)."""
    if "worker" not in inst.roles:
        return 0
    if inst.processes is not None:
        return inst.processes
    per_core = cfg.worker.processes_per_core if inst.processes_per_core is None else inst.processes_per_core
    return max(1, math.ceil(per_core * cpus))


def supervisor_values(cfg: Config, name: str, inst: InstanceConfig, run_dir: Path, cpus: int) -> dict[str, str]:
    """The ``%(ENV_ASYNCNODE_*)s`` values of supervisord.conf for one instance."""
    return {
        "HOME": str(HERE),
        "PYTHON": sys.executable,
        "CONFIG": str(cfg.path.resolve()),
        "RUN_DIR": str(run_dir),
        "INSTANCE": name,
        "API_PORT": str(cfg.api.port if inst.api_port is None else inst.api_port),
        "API_PROCS": "1" if "api" in inst.roles else "0",
        "WORKERS": str(worker_count(cfg, inst, cpus)),
        "QUEUES": ",".join(inst.queues or cfg.queues),
        "STOPWAITSECS": str(cfg.worker.stopwaitsecs),
    }


_ENV_TOKEN: Final = re.compile(r"%\(ENV_ASYNCNODE_([A-Z_]+)\)s")
_SECTION: Final = re.compile(r"^\[([^\]]+)\][ \t]*$", re.MULTILINE)


def render_supervisord(template: str, values: Mapping[str, str]) -> str:
    """supervisord.conf with every ``%(ENV_ASYNCNODE_X)s`` replaced by ``values[X]``.

    ``[program:api]`` is dropped when ``API_PROCS`` is 0; ``[program:worker]`` becomes one program per
    worker (``worker_00``, …) so that a reload changing the count starts or stops only the difference.
    """
    text = _ENV_TOKEN.sub(lambda m: values[m.group(1)], template)
    starts = [m.start() for m in _SECTION.finditer(text)]
    out = [text[: starts[0]] if starts else text]
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        block = text[begin:end]
        header = _SECTION.match(block)
        section = header.group(1) if header else ""
        if section == "program:api" and values["API_PROCS"] == "0":
            continue
        if section == "program:worker":
            body = block[header.end() if header else 0 :]
            body = re.sub(r"^numprocs=.*$", "numprocs=1", body, flags=re.MULTILINE)
            body = re.sub(r"^process_name=.*$", "process_name=%(program_name)s", body, flags=re.MULTILINE)
            out.extend(f"[program:worker_{i:02d}]{body}" for i in range(int(values["WORKERS"])))
            continue
        out.append(block)
    return "".join(out)


# ============================================================================
# Search (pure): task filters, their pages' cursors, dead-letter fingerprints
# ============================================================================

#: Every status a task can be in.
STATUSES: Final = tuple(dict.fromkeys(t.status for t in TRANSITIONS.values()))
#: Statuses of a finished task: only these may be deleted.
FINISHED: Final = tuple(t.status for t in TRANSITIONS.values() if t.final)
#: Keys of a task filter (``GET /api/tasks``'s query, a bulk action's ``filter``).
FILTER_KEYS: Final = ("q", "status", "type", "queue", "schedule", "since", "until")
#: Longest ``q``, and longest type or schedule name, a filter takes.
MAX_QUERY: Final = 500
MAX_NAME: Final = 200


@dataclasses.dataclass(frozen=True)
class TaskFilter:
    """Which tasks a search or a bulk action means: each part given must hold (a task has every word of ``q``)."""

    words: tuple[str, ...] = ()
    needles: tuple[str, ...] = ()  #: whole UUIDs of ``q``: each is in the task's id, payload, result or error
    status: str | None = None
    type: str | None = None
    queue: str | None = None
    schedule: str | None = None
    since: float | None = None  #: created at or after
    until: float | None = None  #: created at or before
    given: Mapping[str, JSON] = dataclasses.field(default_factory=dict, compare=False)  #: as given (for the log)


def filter_matches(flt: TaskFilter, rec: Mapping[str, JSON]) -> bool:
    """Whether a task a store's index found for ``flt`` has the whole UUIDs of its ``q`` too (the index holds
    only their first parts)."""
    if not flt.needles:
        return True
    text = " ".join(
        str(rec.get("id")) if k == "id" else dumps(rec.get(k)) for k in ("id", "payload", "result", "error")
    )
    return all(needle in text.lower() for needle in flt.needles)


def _filter_time(value: JSON, key: str) -> float:
    """A filter's ``since`` or ``until``: RFC 3339 with a zone, or epoch seconds (a number, or its text)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):
            number = float(value)
            if math.isfinite(number):
                return number
        with contextlib.suppress(ValueError):
            parsed = datetime.datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                return parsed.timestamp()
    raise ValidationError(f"{key!r} must be an RFC 3339 time with a zone, or epoch seconds", key)


def task_filter(given: Mapping[str, JSON], queues: Iterable[str], words_indexed: bool = True) -> TaskFilter:
    """The filter ``given`` means (query parameters, or a bulk action's ``filter`` object: strings, the times
    numbers too); raise ValidationError naming the part that is not right. Empty parts are left out.
    ``words_indexed``: ``[tasks] search_words`` (without, a ``q`` is refused)."""
    given = {k: v for k, v in given.items() if v not in ("", None)}
    if unknown := sorted(set(given) - set(FILTER_KEYS)):
        raise ValidationError(f"unknown filter {unknown[0][:50]!r} (known: {', '.join(FILTER_KEYS)})", unknown[0])
    for key in ("q", "status", "type", "queue", "schedule"):
        if key in given and not isinstance(given[key], str):
            raise ValidationError(f"{key!r} must be a string", key)
    q = cast(str, given.get("q", ""))
    if q and not words_indexed:
        raise ValidationError("'q' is off: [tasks] search_words = false (the other filters work)", "q")
    if len(q) > MAX_QUERY:
        raise ValidationError(f"'q' is longer than {MAX_QUERY} characters", "q")
    words = search_words(q) if q else ()
    if q and not words:
        raise ValidationError("'q' has no word to look for (letters or digits)", "q")
    status = cast(str | None, given.get("status"))
    if status is not None and status not in STATUSES:
        raise ValidationError(f"'status' must be one of {', '.join(STATUSES)}", "status")
    queue = cast(str | None, given.get("queue"))
    if queue is not None and queue not in (known := list(queues)):
        raise ValidationError(f"no queue {queue[:50]!r} (known: {', '.join(known)})", "queue")
    for key in ("type", "schedule"):
        if len(cast(str, given.get(key, ""))) > MAX_NAME:
            raise ValidationError(f"{key!r} is longer than {MAX_NAME} characters", key)
    since = _filter_time(given["since"], "since") if "since" in given else None
    until = _filter_time(given["until"], "until") if "until" in given else None
    if since is not None and until is not None and until < since:
        raise ValidationError("'until' is before 'since'", "until")
    return TaskFilter(
        words,
        tuple(m.group() for m in ANY_UUID.finditer(q.lower())),
        status,
        cast(str | None, given.get("type")),
        queue,
        cast(str | None, given.get("schedule")),
        since,
        until,
        given,
    )


#: Where a page of search results continues: after the task created at this time, with this id (newest first).
Cursor: TypeAlias = tuple[float, str]


def result_page(found: list[dict[str, JSON]], limit: int) -> tuple[list[dict[str, JSON]], Cursor | None]:
    """A page of the first ``limit`` of ``found`` (read one further, to know), and its next page's cursor: after
    its last task (None: ``found`` held no more)."""
    if len(found) <= limit:
        return found, None
    return found[:limit], (cast(float, found[limit - 1]["created_at"]), str(found[limit - 1]["id"]))


def encode_cursor(cursor: Cursor) -> str:
    """The opaque ``cursor`` a page of results gives for the next."""
    return base64.urlsafe_b64encode(f"{cursor[0]!r} {cursor[1]}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """The position an ``encode_cursor`` text holds; raise ValidationError for any other."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        at, _, tid = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().partition(" ")
        if TASK_ID.fullmatch(tid) and math.isfinite(when := float(at)):
            return when, tid
    raise ValidationError("'cursor' is not one this API gave (use the 'next' of a page)", "cursor")


#: What a dead letter's fingerprint masks in its error: quoted values, UUIDs and hex ids, then numbers.
_MASKS: Final = (
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"),
    (re.compile(ANY_UUID.pattern, re.I), "<id>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{6,}\b", re.I), "<id>"),
    (re.compile(r"[-+]?\d+(?:[.,:]\d+)*"), "<n>"),
)


def error_pattern(error: str | None) -> str:
    """A dead letter's error with what varies between letters of one cause masked: its exception type stays,
    and its message's quoted values become ``'…'``, its ids ``<id>`` and its numbers ``<n>``."""
    text = (error or "").strip().splitlines()[0][:500] if (error or "").strip() else "(no error)"
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text


#: Hex digits of a fingerprint.
FINGERPRINT_DIGITS: Final = 12


def fingerprint(error: str | None) -> str:
    """Which group a dead letter falls in: a short hash of its error_pattern."""
    return hashlib.sha256(error_pattern(error).encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_DIGITS]


# ============================================================================
# Backend interface
# ============================================================================
# The roles talk to two objects: a TaskQueue (RabbitMQ, or the embedded file's
# messages) and a TaskStore (Redis, or the embedded file's tasks and updates).
# open_backend() at the end of the adapters picks the pair the config names.


class Delivery(Protocol):
    """One delivery of a task to a worker; settled exactly once by ack, nack or reject."""

    body: bytes
    headers: Mapping[str, Any]

    async def ack(self) -> None:
        """Done with: remove it from the queue."""

    async def nack(self, requeue: bool = True) -> None:
        """Hand it back to the queue, as delivered once more."""

    async def reject(self, requeue: bool = False) -> None:
        """Refuse it: it goes to the dead-letter queue."""


class TaskQueue(Protocol):
    """Where tasks wait: publish, consume with ack/nack, retry later, dead-letter, and inspect."""

    name: str  # what /readyz calls it

    async def connect(self) -> Any:
        """Open the connection (raise BrokerUnavailable if it cannot be reached)."""

    async def publish(
        self, envelope: Envelope, routing_key: str | None = None, headers: Mapping[str, Any] | None = None
    ) -> None:
        """Queue a task durably, on its own queue by default; return only once it is safe (raise
        BrokerUnavailable otherwise)."""

    async def publish_later(self, envelope: Envelope, delay: float, headers: Mapping[str, Any]) -> None:
        """Queue a task to be delivered from its queue after ``delay`` seconds, without holding a worker meanwhile."""

    async def dead_letter(self, envelope: Envelope, headers: Mapping[str, Any]) -> None:
        """Put a task in the dead-letter queue, with why in its headers (its envelope names its queue)."""

    async def start_consuming(
        self, callback: Callable[[Delivery], Awaitable[None]], prefetch: int, queues: Iterable[str]
    ) -> None:
        """Deliver tasks of the declared ``queues`` to ``callback``, up to ``prefetch`` unsettled at once from each
        (raise BrokerUnavailable if not yet)."""

    async def set_consumed(self, queues: Iterable[str]) -> None:
        """From now on consume only ``queues`` (a pause stops a queue's consumer, a resume starts it again)."""

    async def put_back(self, delivery: Delivery, envelope: Envelope) -> None:
        """Hand back a delivery that was not started (its queue is paused, or over its limit or rate), so that it
        is delivered again without counting as a delivery (no step toward the delivery limit)."""

    async def wait_consuming(self, stop: asyncio.Event) -> bool:
        """Wait for ``stop``; return True early if consuming has been impossible for ``no_consumer_exit`` seconds."""

    async def stop_consuming(self) -> None:
        """Take no more deliveries (those in hand may still be settled)."""

    async def check(self, timeout: float) -> None:
        """Raise BrokerUnavailable unless the queue answers within ``timeout`` seconds."""

    async def dead_letters(self, limit: int) -> tuple[list[dict[str, JSON]], int]:
        """Up to ``limit`` dead letters, oldest first, and how many there are."""

    async def take_dead_letters(
        self,
        wanted: Callable[[dict[str, JSON]], bool],
        take: Callable[[Envelope | None, dict[str, JSON]], Awaitable[None]],
    ) -> int:
        """Run ``take`` on each dead letter ``wanted`` selects, then remove it; return how many."""

    async def purge_dead_letters(self) -> int:
        """Drop every dead letter; return how many there were."""

    async def queue_figures(self) -> tuple[dict[str, dict[str, int | None]], int]:
        """Per declared queue its ``ready``, ``running`` and ``retrying`` tasks (None: not known here), and how
        many dead letters there are."""

    async def report(self) -> str:
        """Lines for ``check``: what the queue is, and each queue's depth and consumers (raise BrokerUnavailable
        if unreachable)."""

    def describe(self) -> str:
        """What the queue is, for the log."""

    async def close(self) -> None:
        """Close, bounded in time."""


class TaskStore(Protocol):
    """Task state, updates and heartbeats: every change of state is one atomic write that also publishes it."""

    name: str  # what /readyz calls it
    label: str  # what an error message calls it

    def apply(self, change: Change) -> Awaitable[tuple[int, int] | None]:
        """Make a change planned by plan_change, atomically, and publish it; awaited, it gives (seq, new value
        of its counter), or None if its guard kept it out. Changes made in one turn of the event loop may
        share one round trip (a pipeline, a transaction)."""

    async def get(self, tid: str) -> dict[str, JSON] | None:
        """One task with its history, or None."""

    async def recent(self, limit: int, queue: str | None = None) -> list[dict[str, JSON]]:
        """The most recent tasks (of ``queue`` only, if given), newest first."""

    async def search(
        self, flt: TaskFilter, limit: int, after: Cursor | None = None
    ) -> tuple[list[dict[str, JSON]], Cursor | None, int]:
        """Up to ``limit`` retained tasks ``flt`` matches, newest first (by created_at, then id), after the task
        at ``after``; the cursor of the next page (None: no more); and how many match in all."""

    async def delete_finished(self, ids: Iterable[str]) -> int:
        """Delete those of the tasks ``ids`` that are finished, and their timelines; return how many."""

    async def sweep_index(self) -> int:
        """Drop from the search index some tasks whose record has expired; return how many."""

    async def paused_queues(self) -> set[str]:
        """The queues paused now (durably: until resumed, whatever restarts)."""

    async def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause or resume ``queue`` for every worker on every host; return whether that changed anything."""

    async def admit(
        self, queue: str, token: str, limit: int, rate: tuple[int, float] | None, lease: float
    ) -> tuple[float, float]:
        """Admit one start from ``queue`` under its deployment-wide ``limit`` (tasks running at once, 0 = none)
        and ``rate`` (starts per window), atomically: (0, when) if admitted, holding a slot named ``token`` for
        ``lease`` seconds (renew it, release it); else (seconds to wait before asking again, now)."""

    async def release_slot(self, queue: str, token: str) -> None:
        """Give back the limit slot ``token`` of ``queue``."""

    async def leave_line(self, queue: str, token: str) -> None:
        """Give up the place ``token`` holds in the line of ``queue`` (it was not admitted)."""

    async def renew_slots(self, slots: Mapping[str, str], lease: float) -> None:
        """Extend the leases of the slots held (token -> queue) by ``lease`` seconds from now."""

    async def status_of(self, tid: str) -> str | None:
        """Just the status of a task."""

    async def statuses(self, ids: Iterable[str]) -> dict[str, str | None]:
        """The status of each task of ``ids`` (None: no record), in one round trip."""

    async def hold(self, envelope: Envelope, run_at: float) -> None:
        """Keep a task durably, out of every queue, until ``run_at`` (then it is queued: see take_due)."""

    async def take_due(self, limit: int, lease: float) -> tuple[list[tuple[str, bytes]], float] | None:
        """Up to ``limit`` held tasks now due, as (id, envelope), each kept from other takers for ``lease``
        seconds (publish them, then call promoted); and the seconds until the next is due. None: this store
        queues held tasks itself when due, and no one needs to promote them."""

    async def promoted(self, ids: Iterable[str]) -> None:
        """Forget held tasks that are now queued (or cancelled)."""

    async def held_counts(self) -> dict[str, int]:
        """How many tasks each queue holds until their run_at."""

    async def claim_key(self, key: str, fingerprint: str, hold: float) -> dict[str, JSON] | None:
        """Claim an idempotency key for a submission whose body has ``fingerprint``, for ``hold`` seconds while it
        is made: None if claimed; else what the key holds, ``{"fp": ..., "response": ...}`` (no response: the
        claim of another request still in flight)."""

    async def settle_key(self, key: str, fingerprint: str, response: Mapping[str, JSON], ttl: float) -> None:
        """Keep the answer to a key's submission for ``ttl`` seconds (replayed to later requests with it)."""

    async def release_key(self, key: str) -> None:
        """Drop a claimed key whose submission was refused (its request may be retried)."""

    async def lease(self, name: str, owner: str, ttl: float) -> int | None:
        """Take or renew the lease ``name`` for ``owner`` for ``ttl`` seconds: its fencing value (a new, higher
        one each time it changes hands or lapsed), or None while another holds it."""

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease ``name`` up, if ``owner`` holds it (another process may take it at once)."""

    async def schedule_states(self, names: Iterable[str]) -> dict[str, dict[str, JSON]]:
        """The durable state of each schedule named: ``last_slot``, ``last_run_at``, ``last_task_id``,
        ``paused`` (absent: never set)."""

    async def save_schedule(self, name: str, fields: Mapping[str, JSON], fence: int | None) -> bool:
        """Write fields of a schedule's state; with ``fence``, only while the scheduler lease still has that
        fencing value (False: it has not, nothing was written)."""

    async def forget_schedules(self, keep: Iterable[str]) -> list[str]:
        """Drop the state of every schedule but those kept; return the names dropped."""

    async def attempts_of(self, tid: str) -> int:
        """How many runs of a task have started."""

    async def counters(self) -> dict[str, int]:
        """How many tasks ever reached each status."""

    async def metric_values(self) -> dict[str, float]:
        """The deployment's metrics (counts and sums) by the names metric_ops gives them; they only grow."""

    def follow(self) -> AsyncGenerator[str | None, None]:
        """Every update from now on, as published; None first and after each resubscription (a gap is possible)."""

    async def beat(self, worker_id: str, info: Mapping[str, JSON], ttl: float) -> None:
        """Record a worker's heartbeat, alive for ``ttl`` seconds."""

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a worker's heartbeat (it stopped cleanly)."""

    async def workers(self) -> list[dict[str, JSON]]:
        """The live workers."""

    async def ping(self) -> None:
        """Raise one of STORE_ERRORS unless the store answers."""

    async def report(self) -> str:
        """One line for ``check`` (raise one of STORE_ERRORS if unreachable)."""

    def describe(self) -> str:
        """What the store is, for the log."""

    async def close(self) -> None:
        """Close."""


# ============================================================================
# Adapter: RabbitMQ
# ============================================================================

#: Seconds between reconnection attempts of a robust RabbitMQ connection.
RECONNECT_INTERVAL: Final = 1.0
#: Seconds a take of dead letters that found none waits before looking again (see take_dead_letters).
DLQ_SETTLE: Final = 0.1


async def declare_queues(
    channel: aio_pika.abc.AbstractChannel, cfg: BrokerConfig, works: Iterable[str] = ()
) -> aio_pika.abc.AbstractQueue:
    """Declare the dead-letter queue, then each work queue (RabbitMQ names; default: the default queue's) with
    its retry queues; return the first work queue."""
    declared = []
    try:
        await channel.declare_queue(cfg.queue + DLQ_SUFFIX, durable=True, arguments={"x-queue-type": cfg.queue_type})
        for work in list(works) or [cfg.queue]:
            for delay in sorted(set(cfg.retry_delays)):
                name = retry_queue_name(cfg, delay, work)
                await channel.declare_queue(name, durable=True, arguments=retry_queue_arguments(cfg, delay, work))
            declared.append(await channel.declare_queue(work, durable=True, arguments=queue_arguments(cfg)))
        return declared[0]
    except aio_pika.exceptions.ChannelPreconditionFailed as e:
        raise ConfigError(
            f"RabbitMQ refused to declare the queues of {cfg.queue!r}: one exists with other arguments ({e}). "
            "A classic queue cannot become a quorum queue in place: drain it, delete it "
            "(rabbitmqctl delete_queue NAME) and start again, or set [broker] queue to a new name"
        ) from None


def broker_version(connection: aio_pika.abc.AbstractConnection) -> str:
    """The RabbitMQ server version string of an open connection."""
    props = connection.transport.connection.server_properties if connection.transport else {}
    version = props.get("version", "?")
    return version.decode() if isinstance(version, bytes) else str(version)


@contextlib.contextmanager
def _broker_errors(what: str = "RabbitMQ unreachable") -> Iterator[None]:
    """Turn any of AMQP_ERRORS raised inside into BrokerUnavailable("<what>: <error>")."""
    try:
        yield
    except AMQP_ERRORS as e:
        raise BrokerUnavailable(f"{what}: {e or type(e).__name__}") from None


class RabbitDelivery:
    """A delivery as aiormq hands it over, settled on the channel it came on (stale after a reconnect: the
    settle fails, and RabbitMQ redelivers it)."""

    __slots__ = ("_channel", "_tag", "body", "headers")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        self.body = message.body
        self.headers: Mapping[str, Any] = message.header.properties.headers or {}
        self._channel = message.channel
        self._tag = cast(int, getattr(message.delivery, "delivery_tag", None))

    async def ack(self) -> None:
        await self._channel.basic_ack(self._tag)

    async def nack(self, requeue: bool = True) -> None:
        await self._channel.basic_nack(self._tag, requeue=requeue)

    async def reject(self, requeue: bool = False) -> None:
        await self._channel.basic_reject(self._tag, requeue=requeue)


class RabbitQueue:
    """The TaskQueue on RabbitMQ; it connects lazily, so the API starts (and answers 503) while RabbitMQ is down."""

    name = "rabbitmq"

    def __init__(self, config: Config, role: str = "api") -> None:
        self.config = config
        self.cfg = config.broker
        self._consumer: tuple[aio_pika.abc.AbstractRobustChannel, Callable[..., Awaitable[None]]] | None = None
        self._consumer_tag = f"asyncnode-{socket.gethostname()}-{os.getpid()}"
        self._consuming: dict[str, str] = {}  # RabbitMQ queue -> its consumer's tag, for the queues consumed now
        self._wanted: list[str] = []  # the RabbitMQ queues to consume
        self._deliver: Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]] | None = None
        self._works = [config.broker_name(q) for q in config.queues]
        self._cancelled = False
        self._reconsuming: asyncio.Task[None] | None = None
        self.log = log.getChild(role)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._stats_channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self.version: str | None = None

    async def connect(self) -> aio_pika.abc.AbstractRobustConnection:
        """The robust connection, opened on first use; raise BrokerUnavailable if RabbitMQ cannot be reached."""
        if self._connection is None:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.cfg.url, timeout=self.cfg.connect_timeout, reconnect_interval=RECONNECT_INTERVAL
                )
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as e:
                raise BrokerUnavailable(f"RabbitMQ unreachable: {e or type(e).__name__}") from None
            self.version = broker_version(self._connection)
            self.log.info("connected to RabbitMQ %s at %s", self.version, redact_url(self.cfg.url))
        return self._connection

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (False while a robust connection reconnects)."""
        return self._connection is not None and self._connection.connected.is_set()

    async def _ensure_channel(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            connection = await self.connect()
            try:
                with _broker_errors():
                    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    await declare_queues(channel, self.cfg, self._works)
            except ConfigError as e:
                self.log.error("%s", e)
                raise BrokerUnavailable(str(e)) from None
            self._channel = channel
            return channel

    async def publish(
        self, envelope: Envelope, routing_key: str | None = None, headers: Mapping[str, Any] | None = None
    ) -> None:
        """Publish a task persistently (to its queue by default) and wait for the confirm.

        Raise BrokerUnavailable when RabbitMQ is unreachable, refuses (a full queue nacks, an unroutable
        message is returned) or does not confirm in time (a memory or disk alarm blocks publishers silently).
        """
        if self._connection is not None and not self.connected:
            # Reconnecting: answer now rather than make the client wait out the timeout.
            raise BrokerUnavailable("RabbitMQ connection lost; reconnecting")
        message = aio_pika.Message(
            envelope.encode(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=envelope.id,
            type=envelope.type,
            headers=dict(headers or {}),
        )
        with _broker_errors("RabbitMQ refused the task"):
            try:
                async with asyncio.timeout(self.cfg.publish_timeout):
                    channel = await self._ensure_channel()
                    routing_key = routing_key or self.config.broker_name(envelope.queue)
                    await channel.default_exchange.publish(message, routing_key, mandatory=True)
            except TimeoutError:
                raise BrokerUnavailable(f"RabbitMQ did not confirm within {self.cfg.publish_timeout:g} s") from None

    async def publish_later(self, envelope: Envelope, delay: float, headers: Mapping[str, Any]) -> None:
        """Park a task in its queue's retry queue of ``delay``: its TTL dead-letters it back to its queue."""
        work = self.config.broker_name(envelope.queue)
        await self.publish(envelope, retry_queue_name(self.cfg, delay, work), headers)

    async def dead_letter(self, envelope: Envelope, headers: Mapping[str, Any]) -> None:
        """Publish a task to the DLQ (confirmed)."""
        await self.publish(envelope, self.cfg.queue + DLQ_SUFFIX, headers)

    async def start_consuming(
        self, callback: Callable[[Delivery], Awaitable[None]], prefetch: int, queues: Iterable[str]
    ) -> None:
        """Open the consuming channel, declare the queues and consume ``queues`` (one consumer each, ``prefetch``
        unacknowledged per consumer); raise BrokerUnavailable if RabbitMQ is not ready (the worker retries).
        Workers starting together race to declare a new quorum queue, and RabbitMQ 3.10 can answer a consume
        on it with INTERNAL_ERROR until its leader is elected."""
        connection = await self.connect()
        self._wanted = [self.config.broker_name(q) for q in queues]

        async def deliver(message: aiormq.abc.DeliveredMessage) -> None:
            await callback(RabbitDelivery(message))

        self._deliver = deliver

        async def consume(channel: aio_pika.abc.AbstractRobustChannel | None) -> None:
            # On aiormq's channel under the robust one: no message object of aio-pika's per delivery.
            # The robust channel does not know these consumers, so every reopen (after a reconnect)
            # consumes again, under the same tags.
            assert channel is not None
            amqp = await channel.get_underlay_channel()
            amqp.on_consumer_cancel_callbacks.add(self._on_cancel)
            self._consuming = {}
            for work in self._wanted:
                await self._consume_one(amqp, work)

        with contextlib.suppress(TimeoutError):  # reconnecting after a failed attempt
            await asyncio.wait_for(connection.connected.wait(), self.cfg.connect_timeout)
        channel: aio_pika.abc.AbstractRobustChannel | None = None
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            await declare_queues(channel, self.cfg, self._works)
            await consume(channel)
        except AMQP_ERRORS as e:
            if channel is not None:  # a robust channel left open would be restored, consumerless, for ever
                with contextlib.suppress(*AMQP_ERRORS, TimeoutError):
                    await asyncio.wait_for(channel.close(), SHUTDOWN_STEP_TIMEOUT)
            raise BrokerUnavailable(f"cannot consume yet: {e or type(e).__name__}") from None
        channel.reopen_callbacks.add(consume)
        self._consumer = channel, consume

    async def _consume_one(self, amqp: aiormq.abc.AbstractChannel, work: str) -> None:
        assert self._deliver is not None
        tag = f"{self._consumer_tag}-{work}"
        await amqp.basic_consume(work, self._deliver, consumer_tag=tag)
        self._consuming[work] = tag

    async def set_consumed(self, queues: Iterable[str]) -> None:
        """Consume ``queues`` from now on: cancel the consumers of the others, start those missing (raise
        BrokerUnavailable if RabbitMQ is away: the caller tries again, and a reconnect consumes the new set)."""
        self._wanted = [self.config.broker_name(q) for q in queues]
        if self._consumer is None:
            return
        with _broker_errors():
            amqp = await asyncio.wait_for(self._consumer[0].get_underlay_channel(), SHUTDOWN_STEP_TIMEOUT)
            for work, tag in list(self._consuming.items()):
                if work not in self._wanted:
                    del self._consuming[work]
                    await amqp.basic_cancel(tag)
            for work in self._wanted:
                if work not in self._consuming:
                    await self._consume_one(amqp, work)

    async def put_back(self, delivery: Delivery, envelope: Envelope) -> None:
        """Publish a copy at the tail of the task's queue (confirmed), then acknowledge the delivery: a
        requeue (nack) would count toward the quorum queue's delivery limit."""
        skip = ("x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason")
        headers = {k: v for k, v in delivery.headers.items() if k not in skip}
        await self.publish(envelope, headers=headers)
        await delivery.ack()

    async def wait_consuming(self, stop: asyncio.Event) -> bool:
        """Wait for ``stop``; return True if the consumer (connection or channel) is down too long.

        Robust reconnection has had bugs that silently lost consumers; a fresh process beats idling half-alive.
        """
        assert self._consumer is not None, "start_consuming first"
        channel, limit = self._consumer[0], self.cfg.no_consumer_exit
        down_since: float | None = None
        while not stop.is_set():
            if self._cancelled:
                return True
            if self.connected and not channel.is_closed:
                down_since = None
            else:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > limit:
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, limit / 4))
        return False

    async def stop_consuming(self) -> None:
        """Cancel the consumer (bounded: a robust channel would wait for a broker that may never come back)."""
        if self._consumer is not None:
            channel, consume = self._consumer
            channel.reopen_callbacks.discard(consume)

            async def cancel() -> None:
                amqp = await channel.get_underlay_channel()  # waits while reconnecting
                for tag in list(self._consuming.values()):
                    await amqp.basic_cancel(tag)
                self._consuming = {}

            with contextlib.suppress(*AMQP_ERRORS, TimeoutError):
                await asyncio.wait_for(cancel(), SHUTDOWN_STEP_TIMEOUT)

    def _on_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        """RabbitMQ cancelled our consumer (its queue was deleted): declare the queues and consume again."""
        if frame.consumer_tag in self._consuming.values() and self._reconsuming is None:
            self._reconsuming = asyncio.get_running_loop().create_task(self._reconsume())

    async def _reconsume(self) -> None:
        assert self._consumer is not None
        channel, consume = self._consumer
        self.log.warning("RabbitMQ cancelled a consumer of %s (queue deleted?); consuming again", self._wanted)
        try:
            await declare_queues(channel, self.cfg, self._works)
            await consume(channel)
        except AMQP_ERRORS as e:  # wait_consuming gives up, and a fresh process takes over
            self.log.error("cannot consume again: %s", e or type(e).__name__)
            self._cancelled = True
        finally:
            self._reconsuming = None

    async def report(self) -> str:
        """RabbitMQ's version and the depth and consumers of the work queue and the DLQ."""
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                connection = await aio_pika.connect(self.cfg.url)
            async with connection:
                channel = await connection.channel()
                depth = []
                named = [(q, self.config.broker_name(q)) for q in self.config.queues]
                for queue, name in [*named, ("dead letters", self.cfg.queue + DLQ_SUFFIX)]:
                    try:
                        result = (await channel.declare_queue(name, passive=True)).declaration_result
                        depth.append(
                            f"\n  {queue} ({name}): {result.message_count} ready, {result.consumer_count} consumer(s)"
                        )
                    except aio_pika.exceptions.ChannelNotFoundEntity:
                        channel = await connection.channel()
                        depth.append(f"\n  {queue} ({name}): not declared yet")
                return f"RabbitMQ {broker_version(connection)}{''.join(depth)}"
        except (aio_pika.exceptions.AMQPError, OSError, TimeoutError) as e:
            raise BrokerUnavailable(
                f"RabbitMQ at {redact_url(self.cfg.url)} unreachable: {e or type(e).__name__}"
            ) from None

    def describe(self) -> str:
        """``RabbitMQ <url without password>``."""
        return f"RabbitMQ {redact_url(self.cfg.url)}"

    async def check(self, timeout: float) -> None:
        """Raise BrokerUnavailable unless a channel to RabbitMQ is open (connecting if needed)."""
        try:
            async with asyncio.timeout(timeout):
                await self._ensure_channel()
        except TimeoutError:
            raise BrokerUnavailable(f"RabbitMQ did not answer within {timeout:g} s") from None

    @contextlib.asynccontextmanager
    async def _dlq(self) -> AsyncIterator[tuple[aio_pika.abc.AbstractQueue, int]]:
        """The DLQ on a channel of its own, and its depth (fetched messages not acknowledged go back on close)."""
        await self._ensure_channel()  # declares the queues
        connection = await self.connect()
        with _broker_errors():
            channel = await connection.channel()
        try:
            queue = await channel.declare_queue(self.cfg.queue + DLQ_SUFFIX, passive=True)
            yield queue, queue.declaration_result.message_count or 0
        finally:
            with contextlib.suppress(*AMQP_ERRORS):
                await channel.close()

    async def dead_letters(self, limit: int) -> tuple[list[dict[str, JSON]], int]:
        """Up to ``limit`` dead letters, oldest first, and how many there are (the queue is left as it was)."""
        items = []
        async with self._dlq() as (queue, total):
            for _ in range(min(limit, total)):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                items.append(dead_letter_info(message.message_id, message.body, message.headers))
        return items, total

    async def take_dead_letters(
        self,
        wanted: Callable[[dict[str, JSON]], bool],
        take: Callable[[Envelope | None, dict[str, JSON]], Awaitable[None]],
    ) -> int:
        """Run ``take`` on every dead letter ``wanted`` selects, then remove it from the DLQ; return how many.

        It is acknowledged only after ``take`` returned, so a failure (RabbitMQ or Redis gone) leaves it there.
        A letter another channel holds (a listing, reading the DLQ a moment ago) is back only once RabbitMQ has
        requeued it after that channel closed: a pass that takes nothing looks again, DLQ_SETTLE apart, twice.
        """
        taken = 0
        for attempt in range(3):
            if attempt:
                await asyncio.sleep(DLQ_SETTLE)
            async with self._dlq() as (queue, total):
                for _ in range(total):  # not past them: a letter requeued may fail again meanwhile, and return
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    item = dead_letter_info(message.message_id, message.body, message.headers)
                    if not wanted(item):
                        continue  # held by this channel until it closes: the next get gives the next letter
                    env: Envelope | None = None
                    with contextlib.suppress(EnvelopeError):
                        env = Envelope.decode(message.body)
                    await take(env, item)
                    await message.ack()
                    taken += 1
            if taken:
                break
        return taken

    async def purge_dead_letters(self) -> int:
        """Drop every dead letter; return how many there were."""
        async with self._dlq() as (queue, _):
            result = await queue.purge()
        return int(result.message_count or 0) if result else 0

    async def queue_figures(self) -> tuple[dict[str, dict[str, int | None]], int]:
        """Per declared queue: messages ready and waiting in its retry queues (running: not known to RabbitMQ
        over AMQP); and the DLQ's depth."""
        await self._ensure_channel()  # declares the queues
        connection = await self.connect()
        figures: dict[str, dict[str, int | None]] = {}
        delays = sorted(set(self.cfg.retry_delays))
        with _broker_errors():
            if self._stats_channel is None or self._stats_channel.is_closed:
                self._stats_channel = await connection.channel()
            # On the underlying channel: a robust channel answers a repeated passive
            # declare from its cache, with the depth it had the first time.
            channel = await self._stats_channel.get_underlay_channel()

            async def depth(name: str) -> int:
                return (await channel.queue_declare(name, passive=True)).message_count or 0

            for queue in self.config.queues:
                work = self.config.broker_name(queue)
                retrying = [await depth(retry_queue_name(self.cfg, d, work)) for d in delays]
                figures[queue] = {"ready": await depth(work), "running": None, "retrying": sum(retrying)}
            dlq = await depth(self.cfg.queue + DLQ_SUFFIX)
        return figures, dlq

    async def close(self) -> None:
        """Close the connection, if any (bounded: the broker may be gone)."""
        if self._connection is not None:
            with contextlib.suppress(*AMQP_ERRORS):
                await asyncio.wait_for(self._connection.close(), SHUTDOWN_STEP_TIMEOUT)
            self._connection = None
            self._channel = None


# ============================================================================
# Adapter: Redis
# ============================================================================
# Past 800 lines for a reason: each of the store's primitives is a Lua script (a change of state with its
# search index, a search, admission, held tasks, leases, schedules), each beside the Python that calls it.

#: Suffix, after ``[redis] key_prefix``, of the hash counting how many tasks reached each status.
STATS_SUFFIX: Final = "~stats"
#: Suffix, after ``[redis] key_prefix``, of the hash of the deployment's metrics (metric_ops).
METRICS_SUFFIX: Final = "~metrics"
#: Suffix, after a task's key, of the list of its changes of status (its timeline).
HISTORY_SUFFIX: Final = "~history"
#: Suffix, after ``[redis] key_prefix``, of the sorted set of live workers and of each worker's heartbeat key.
WORKERS_SUFFIX: Final = "~workers"
#: Suffix, after ``[redis] key_prefix``, of the sorted set indexing recent tasks.
#: Task ids are UUIDs, so ``~`` can never collide with a task's own key.
RECENT_SUFFIX: Final = "~recent"
#: Suffix, after ``[redis] key_prefix``, of the set of paused queues.
PAUSED_SUFFIX: Final = "~paused"
#: The search index: after ``[redis] key_prefix``, the prefix of its sorted sets (task id -> created_at), one per
#: term: ``~ix:w:<word>`` (search_words), ``~ix:t:<type>``, ``~ix:q:<queue>``, ``~ix:c:<schedule>`` and
#: ``~ix:s:<status>``; and the hash of each task's terms but its status (id -> terms, one per line), by which it
#: is unindexed once its record has gone (sweep_index) or is deleted. A search intersects the sets of its terms.
INDEX_SUFFIX: Final = "~ix:"
TERMS_SUFFIX: Final = "~terms"
#: Suffix, after ``[redis] key_prefix``, of a search's scratch set (deleted within its script).
SCRATCH_SUFFIX: Final = "~search:"
#: Task ids a sweep of the index looks at per call (the API sweeps every SWEEP_INTERVAL seconds).
SWEEP_BATCH: Final = 2000
#: Suffix, after ``[redis] key_prefix``, of a queue's limit slots, recent starts, waiting line and the line's
#: latest asks (sorted sets: ``<prefix>~slots:<queue>``, ...).
SLOTS_SUFFIX: Final = "~slots:"
STARTS_SUFFIX: Final = "~starts:"
LINE_SUFFIX: Final = "~line:"
SEEN_SUFFIX: Final = "~seen:"
#: Suffixes, after ``[redis] key_prefix``, of a queue's sorted set of tasks held until their run_at (id -> run_at,
#: ``<prefix>~scheduled:<queue>``) and of the hash of their envelopes (id -> envelope), and of an idempotency
#: key's entry (``<prefix>~idem:<key>``).
SCHEDULED_SUFFIX: Final = "~scheduled:"
SCHEDULED_ENV_SUFFIX: Final = "~scheduled-env"
IDEMPOTENCY_SUFFIX: Final = "~idem:"
#: Suffixes, after ``[redis] key_prefix``, of a lease (``<prefix>~lease:<name>``, a hash of owner and fence) and
#: its fencing counter (``...:fence``, never expiring), of a schedule's state hash (``<prefix>~schedule:<name>``),
#: and of the set of the schedules with a state.
LEASE_SUFFIX: Final = "~lease:"
SCHEDULE_SUFFIX: Final = "~schedule:"
SCHEDULES_SUFFIX: Final = "~schedules"
#: Pipelines of state writes one process has in flight at once (the rest wait and go out together).
REDIS_PIPELINES: Final = 8
#: Fields of a task that hold JSON rather than text in its Redis hash.
JSON_FIELDS: Final = frozenset({"payload", "result"})
#: Fields of a task that hold numbers in its Redis hash.
FLOAT_FIELDS: Final = frozenset(
    {"created_at", "started_at", "finished_at", "progress", "ts", "next_attempt_at", "run_at", "cancelled_at", "slot"}
)
INT_FIELDS: Final = frozenset({"attempts", "seq", "attempt", "retries"})

# The one script behind every change of a task's state: it makes a Change (see plan_change) atomically
# and publishes it, in one round trip.
#   KEYS[1] the task's hash, KEYS[2] its history list, KEYS[3] the stats hash, KEYS[4] the recent-tasks index,
#   KEYS[5] the metrics hash, KEYS[6] the search index's terms hash
#   ARGV[1] channel; ARGV[2] Change.head; ARGV[3] guard, comma separated ('' = any; an empty item = no
#   status yet); ARGV[4] expire seconds (0 = no change); ARGV[5] counter field ('' = none); ARGV[6] status;
#   ARGV[7] history entry ('' = none); ARGV[8] score in the index ('' = none); ARGV[9] the size the index is
#   trimmed to; ARGV[10] the task's id; ARGV[11] '1' to drop any expiry; ARGV[12] the per-queue tally field
#   of the stats hash ('' = none); ARGV[13] n, how many fields to clear; ARGV[14] m, how many strings of
#   restore pairs; ARGV[15] k, how many strings of metric pairs; ARGV[16] '1' to add those only if the counter
#   is now 1; ARGV[17] the search index's prefix; ARGV[18] w, how many words; ARGV[19] '1' if they replace the
#   task's terms (its type, queue and schedule are indexed again with them, also with no word: [tasks]
#   search_words = false); then the n fields, the m strings, the
#   k strings (a name, then an amount: a whole number, or one with a point, added as a float), the w words, and
#   the field, value pairs. A change of status moves the task between the index's status sets.
# The published message is Change.message(seq, count), spliced here exactly as there.
_UPDATE_LUA: Final = """
local cur = redis.call('HGET', KEYS[1], 'status') or ''
if ARGV[3] ~= '' and not string.find(',' .. ARGV[3] .. ',', ',' .. cur .. ',', 1, true) then
  return false
end
local n, m, k, w = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[18])
local b = 20
if n > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, b, b + n - 1)) end
if cur == '' then
  if m > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, b + n, b + n + m - 1)) end
  if ARGV[8] ~= '' then
    redis.call('ZADD', KEYS[4], ARGV[8], ARGV[10])
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[9]) - 1)
  end
end
local count = 0
local extra = ''
if ARGV[5] ~= '' then
  count = redis.call('HINCRBY', KEYS[1], ARGV[5], 1)
  extra = ',"' .. ARGV[5] .. '":' .. count
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if k > 0 and (ARGV[16] == '' or count == 1) then
  for i = b + n + m, b + n + m + k - 1, 2 do
    if string.find(ARGV[i + 1], '.', 1, true) then redis.call('HINCRBYFLOAT', KEYS[5], ARGV[i], ARGV[i + 1])
    else redis.call('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1]) end
  end
end
local f = b + n + m + k + w
if #ARGV >= f then redis.call('HSET', KEYS[1], unpack(ARGV, f)) end
local ix, id, terms = ARGV[17], ARGV[10], w > 0 or ARGV[19] == '1'
if ARGV[6] ~= cur or terms then
  local at = redis.call('HGET', KEYS[1], 'created_at') or '0'
  if ARGV[6] ~= cur then
    if cur ~= '' then redis.call('ZREM', ix .. 's:' .. cur, id) end
    redis.call('ZADD', ix .. 's:' .. ARGV[6], at, id)
    if not terms then redis.call('HSETNX', KEYS[6], id, '') end
  end
  if terms then
    local old, added = redis.call('HGET', KEYS[6], id), {}
    if ARGV[19] == '1' then
      if old then
        for term in string.gmatch(old, '[^\\n]+') do redis.call('ZREM', ix .. term, id) end
        old = false
      end
      local meta = redis.call('HMGET', KEYS[1], 'type', 'queue', 'schedule')
      if meta[1] then added[#added + 1] = 't:' .. meta[1] end
      added[#added + 1] = 'q:' .. (meta[2] or '@DEFAULT_QUEUE@')
      if meta[3] then added[#added + 1] = 'c:' .. meta[3] end
    end
    for i = f - w, f - 1 do added[#added + 1] = 'w:' .. ARGV[i] end
    for _, term in ipairs(added) do redis.call('ZADD', ix .. term, at, id) end
    local text = table.concat(added, '\\n')
    if old and old ~= '' then text = old .. '\\n' .. text end
    redis.call('HSET', KEYS[6], id, text)
  end
end
if ARGV[7] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[7])
  redis.call('HINCRBY', KEYS[3], ARGV[6], 1)
  if ARGV[12] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[12], 1) end
end
if ARGV[11] == '1' then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. extra .. ',"seq":' .. seq .. '}')
return {seq, count}
""".replace("@DEFAULT_QUEUE@", DEFAULT_QUEUE)

# A page of a search: the tasks in all the index's sets given, newest first.
#   KEYS[1] a scratch set (deleted before the end), KEYS[2..] the sets;
#   ARGV[1], ARGV[2] the lowest and highest created_at ('-inf', '+inf': none); ARGV[3] the cursor's created_at
#   ('' = the first page), ARGV[4] its id; ARGV[5] how many to return.
#   Returns {how many the sets share between the times, id, created_at, id, created_at, ...}. Of tasks created at
#   one time, the greater id comes first (as ZREVRANGEBYSCORE orders them); a cursor's page starts after its task.
_SEARCH_LUA: Final = """
local src = KEYS[2]
if #KEYS > 2 then
  local inter = {'ZINTERSTORE', KEYS[1], #KEYS - 1}
  for i = 2, #KEYS do inter[#inter + 1] = KEYS[i] end
  inter[#inter + 1], inter[#inter + 2] = 'AGGREGATE', 'MAX'
  redis.call(unpack(inter))
  src = KEYS[1]
end
local total = redis.call('ZCOUNT', src, ARGV[1], ARGV[2])
local hi, at, after, want = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if ARGV[3] ~= '' then hi = ARGV[3] end
local out, offset, got = {total}, 0, 0
while got < want do
  local page = redis.call('ZREVRANGEBYSCORE', src, hi, ARGV[1], 'WITHSCORES', 'LIMIT', offset, want + 1)
  for i = 1, #page, 2 do
    if got < want and not (at and tonumber(page[i + 1]) == at and page[i] >= after) then
      out[#out + 1], out[#out + 2], got = page[i], page[i + 1], got + 1
    end
  end
  if #page < 2 * (want + 1) then break end
  offset = offset + want + 1
end
redis.call('DEL', KEYS[1])
return out
"""

# Unindexing: each task of ARGV[6..] that has gone (ARGV[4] 'gone': its record expired) or is finished
# (ARGV[4] 'finished': then its record and timeline are deleted too) leaves the index's sets and the recent
# tasks. KEYS[1] the terms hash, KEYS[2] the recent-tasks index; ARGV[1] the index's prefix, ARGV[2] the key
# prefix of tasks, ARGV[3] their timelines' suffix, ARGV[5] the statuses (comma separated): the sets a gone task
# may be in, or those a deleted one must be in. Returns how many left.
_UNINDEX_LUA: Final = """
local ix, gone, count = ARGV[1], ARGV[4] == 'gone', 0
for i = 6, #ARGV do
  local id = ARGV[i]
  local status = redis.call('HGET', ARGV[2] .. id, 'status')
  local go = false
  if gone then go = not status
  elseif status then go = string.find(',' .. ARGV[5] .. ',', ',' .. status .. ',', 1, true) ~= nil end
  if go then
    if status then redis.call('DEL', ARGV[2] .. id, ARGV[2] .. id .. ARGV[3]) end
    local terms = redis.call('HGET', KEYS[1], id) or ''
    for term in string.gmatch(terms, '[^\\n]+') do redis.call('ZREM', ix .. term, id) end
    if status then redis.call('ZREM', ix .. 's:' .. status, id)
    else for s in string.gmatch(ARGV[5], '[^,]+') do redis.call('ZREM', ix .. 's:' .. s, id) end end
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[1], id)
    count = count + 1
  end
end
return count
"""


# Admission of one start from a queue under its limit and rate, on Redis's clock (one clock for every host),
# in turn: the askers wait in a line by their first ask, and one is admitted only while the free places
# (under the limit, and under the rate) reach its place in the line. An asker that stops asking for
# ARGV[6] ms (its worker died, or put its task back) leaves the line.
#   KEYS[1] the queue's slots (token -> lease end, ms), KEYS[2] its recent starts (token -> when, ms),
#   KEYS[3] its line (token -> first ask, ms), KEYS[4] the line's latest asks (token -> when, ms)
#   ARGV[1] token; ARGV[2] limit (0 = none); ARGV[3] starts per window (0 = none); ARGV[4] window, ms;
#   ARGV[5] lease, ms; ARGV[6] how long an asker stays in line without asking, ms.
#   Returns {wait ms (0 = admitted; -1 = ask again soon), now ms}.
_ADMIT_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, limit, n, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local stale = tonumber(ARGV[6])
redis.call('ZADD', KEYS[3], 'NX', now, token)
redis.call('ZADD', KEYS[4], now, token)
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - stale)
if #gone > 0 then
  redis.call('ZREM', KEYS[3], unpack(gone))
  redis.call('ZREM', KEYS[4], unpack(gone))
end
redis.call('PEXPIRE', KEYS[3], stale)
redis.call('PEXPIRE', KEYS[4], stale)
local free, wait = math.huge, -1
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  free = limit - redis.call('ZCARD', KEYS[1])
end
if n > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - window))
  local left = n - redis.call('ZCARD', KEYS[2])
  if left <= 0 then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = tonumber(oldest[2]) + window - now + 1
  end
  if left < free then free = left end
end
if redis.call('ZRANK', KEYS[3], token) >= free then return {wait, now} end
redis.call('ZREM', KEYS[3], token)
redis.call('ZREM', KEYS[4], token)
if n > 0 then
  redis.call('ZADD', KEYS[2], now, token)
  redis.call('PEXPIRE', KEYS[2], window + 1000)
end
if limit > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), token)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
end
return {0, now}
"""

# Renewal of limit slots: KEYS[i] the queue of token ARGV[i + 1]; ARGV[1] the lease, ms (a slot already
# taken back, by an admission after it expired, is not revived: XX).
_RENEW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return 0
"""


# Taking the held tasks now due, on Redis's clock: each is pushed a lease ahead in its set, so that no other
# promoter takes it while this one publishes it (then promoted() drops it; should this one die first, the next
# takes it once the lease is over: a task is queued at least once).
#   KEYS[1] the envelopes of held tasks, KEYS[2..] each queue's set of held tasks (id -> run_at);
#   ARGV[1] most to take; ARGV[2] lease, s.
#   Returns {now, the next run_at in the sets ('' = none), id, envelope, id, envelope, ...} (times as text).
_TAKE_DUE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local left, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {string.format('%.6f', now), ''}
local nearest = nil
for k = 2, #KEYS do
  if left > 0 then
    local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, left)
    for _, id in ipairs(due) do
      redis.call('ZADD', KEYS[k], now + lease, id)
      out[#out + 1] = id
      out[#out + 1] = redis.call('HGET', KEYS[1], id) or ''
    end
    left = left - #due
  end
  local nxt = redis.call('ZRANGE', KEYS[k], 0, 0, 'WITHSCORES')
  if nxt[2] and (nearest == nil or tonumber(nxt[2]) < nearest) then
    nearest = tonumber(nxt[2])
    out[2] = nxt[2]
  end
end
return out
"""


# A lease: renewed by its owner; else taken if free, with the next fencing value.
#   KEYS[1] the lease, KEYS[2] its fencing counter; ARGV[1] owner, ARGV[2] ttl, ms. Returns the fence, or false.
_LEASE_LUA: Final = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'fence'))
end
if owner then return false end
local fence = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'fence', fence)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return fence
"""

# A lease given up by its owner: KEYS[1] the lease; ARGV[1] owner.
_RELEASE_LUA: Final = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# A schedule's state written, fenced: KEYS[1] the scheduler lease, KEYS[2] the state hash, KEYS[3] the set of
# schedules; ARGV[1] the fence ('' = unfenced), ARGV[2] the schedule's name, then field, value pairs.
_SAVE_SCHEDULE_LUA: Final = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""


def encode_fields(fields: Mapping[str, JSON]) -> list[str]:
    """Flatten a task's fields to the strings stored in its Redis hash (None is skipped)."""
    flat: list[str] = []
    for key, value in fields.items():
        if value is not None:
            flat += [key, dumps(value) if key in JSON_FIELDS else str(value)]
    return flat


def decode_record(tid: str, raw: Mapping[str, str]) -> dict[str, JSON]:
    """A task as the API shows it, from the strings of its Redis hash."""
    rec = blank_record(tid)
    for key, value in raw.items():
        if key in JSON_FIELDS:
            try:
                rec[key] = loads(value)
            except ValueError:
                rec[key] = value
        elif key in FLOAT_FIELDS:
            rec[key] = float(value)
        elif key in INT_FIELDS:
            rec[key] = int(value)
        else:
            rec[key] = value
    return rec


class RedisStore:
    """The TaskStore on Redis: task records, the recent-tasks index and the update channel."""

    name = "redis"
    label = "task store (Redis)"

    def __init__(self, cfg: RedisConfig, queues: Iterable[str] = (DEFAULT_QUEUE,)) -> None:
        self.cfg = cfg
        self.client: aioredis.Redis = aioredis.from_url(
            cfg.url, decode_responses=True, socket_connect_timeout=5, health_check_interval=15
        )
        self._update = self.client.register_script(_UPDATE_LUA)
        self._admit = self.client.register_script(_ADMIT_LUA)
        self._renew = self.client.register_script(_RENEW_LUA)
        self._take_due = self.client.register_script(_TAKE_DUE_LUA)
        self._lease = self.client.register_script(_LEASE_LUA)
        self._save_schedule = self.client.register_script(_SAVE_SCHEDULE_LUA)
        self._release = self.client.register_script(_RELEASE_LUA)
        self._search = self.client.register_script(_SEARCH_LUA)
        self._unindex = self.client.register_script(_UNINDEX_LUA)
        self.index_prefix = cfg.key_prefix + INDEX_SUFFIX
        self.terms_key = cfg.key_prefix + TERMS_SUFFIX
        self._sweep_at = 0  # where the next sweep of the index goes on (an HSCAN cursor)
        self.paused_key = cfg.key_prefix + PAUSED_SUFFIX
        self.held_env_key = cfg.key_prefix + SCHEDULED_ENV_SUFFIX
        self.held_keys = {q: cfg.key_prefix + SCHEDULED_SUFFIX + q for q in queues}  # queue -> its held tasks
        self._queued: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._idle: list[aioredis.Connection] = []  # the pipelines' connections between two of them
        self.recent_key = cfg.key_prefix + RECENT_SUFFIX
        self.stats_key = cfg.key_prefix + STATS_SUFFIX
        self.metrics_key = cfg.key_prefix + METRICS_SUFFIX
        self.workers_key = cfg.key_prefix + WORKERS_SUFFIX

    def key(self, tid: str) -> str:
        """The hash holding task ``tid``."""
        return self.cfg.key_prefix + tid

    def apply(self, change: Change) -> Awaitable[tuple[int, int] | None]:
        """Make ``change`` and publish it in one script call, in a pipeline shared with the changes queued in
        the same turn of the loop; awaited, it gives (seq, counter), or None if its guard kept it out."""
        key = self.cfg.key_prefix + change.tid
        keys = [key, key + HISTORY_SUFFIX, self.stats_key, self.recent_key, self.metrics_key, self.terms_key]
        args: list[str | int | float] = [
            self.cfg.channel,
            change.head,
            ",".join(change.guard),
            change.expire,
            change.counter,
            change.status,
            change.entry or "",
            "" if change.index_at is None else change.index_at,
            change.index_keep,
            change.tid,
            "1" if change.persist else "",
            change.tally,
        ]
        restore, metrics = encode_fields(change.restore), change.metrics
        args += [len(change.clear), len(restore), len(metrics), "1" if change.metrics_first else ""]
        args += [self.index_prefix, len(change.words), "1" if change.reindex else ""]
        args += [*change.clear, *restore, *metrics, *change.words, *encode_fields(change.fields)]
        return self._enqueue(keys, args)

    def _enqueue(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one script call: the calls queued in one turn of the event loop go out as one pipeline
        (one write and one read for all the requests or tasks in hand, instead of one each)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queued.append((keys, args, done))
        if len(self._queued) == 1:
            self._flush_queued()
        return done

    def _flush_queued(self) -> None:
        """Start a pipeline for the writes queued: it takes them when it first runs, after this turn."""
        if not self._queued or len(self._flushes) >= REDIS_PIPELINES:
            return  # the next pipeline to finish sends what waits, all together
        task = asyncio.get_running_loop().create_task(self._run_batch())
        self._flushes.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._flush_queued()

    async def _run_batch(self) -> None:
        batch, self._queued = self._queued, []
        if not batch:
            return
        try:
            results = await self._evalsha_all([(keys, args) for keys, args, _ in batch])
        except BaseException as e:  # the connection failed: every caller gets the error
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(e if isinstance(e, Exception) else RedisError(f"cancelled: {e!r}"))
            if not isinstance(e, Exception):
                raise
            return
        for (_, _, done), result in zip(batch, results, strict=True):
            if not done.done():
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def _evalsha_all(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run the update script once per call in one pipeline; load it first if Redis does not have it."""
        results: list[Any] = [NoScriptError("not run")] * len(calls)
        for _ in range(2):
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if not missing:
                break
            commands = [("EVALSHA", self._update.sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in missing]
            for i, result in zip(missing, await self._pipeline(commands), strict=True):
                results[i] = result
            if any(isinstance(results[i], NoScriptError) for i in missing):
                await self.client.script_load(_UPDATE_LUA)  # a restarted or flushed Redis forgot it
        return results

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write on a pooled connection and read their replies (an error reply is
        returned in its place). redis-py's Pipeline would do the same at several times the CPU, and would
        resend every command after a connection error, running a script twice if Redis had run it."""
        pool = self.client.connection_pool
        # Kept between pipelines rather than taken from the pool and given back each time (a tenth of a
        # worker's CPU); there are never more than REDIS_PIPELINES of them.
        conn = self._idle.pop() if self._idle else await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed = conn.pack_commands(commands) if _pack_command is None else b"".join(map(_pack_command, commands))
            await conn.send_packed_command(packed)  # a PING first if idle for long
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except ResponseError as e:
                    results.append(e)
        except BaseException:
            # What is left unread on it is unknown; and if Redis went away, the others are dead too:
            # they all connect afresh on their next use.
            for c in (conn, *self._idle):
                await c.disconnect()
            await pool.release(conn)
            raise
        self._idle.append(conn)
        return results

    async def get(self, tid: str) -> dict[str, JSON] | None:
        """The task ``tid`` as the API shows it, or None."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key(tid))
            pipe.lrange(self.key(tid) + HISTORY_SUFFIX, 0, -1)
            raw, history = await pipe.execute()
        if not raw:
            return None
        rec = decode_record(tid, raw)
        rec["history"] = [loads(entry) for entry in history]
        return rec

    async def counters(self) -> dict[str, int]:
        """How many tasks ever reached each status (for the dashboard's throughput)."""
        raw = cast(dict[str, str], await self.client.hgetall(self.stats_key))
        return {k: int(v) for k, v in raw.items()}

    async def metric_values(self) -> dict[str, float]:
        """The deployment's metrics as metric_ops names them."""
        raw = cast(dict[str, str], await self.client.hgetall(self.metrics_key))
        return {k: float(v) for k, v in raw.items()}

    async def attempts_of(self, tid: str) -> int:
        """How many runs of task ``tid`` have started."""
        return int(cast(str | None, await self.client.hget(self.key(tid), "attempts")) or 0)

    async def status_of(self, tid: str) -> str | None:
        """Just the status of task ``tid``."""
        return cast(str | None, await self.client.hget(self.key(tid), "status"))

    async def recent(self, limit: int, queue: str | None = None) -> list[dict[str, JSON]]:
        """The most recent tasks (of ``queue`` only, if given), newest first (those already expired are skipped).

        Filtered by queue, the index is read a page at a time until ``limit`` are found or it ends."""
        found: list[dict[str, JSON]] = []
        page = limit if queue is None else max(limit, 200)
        start = 0
        while len(found) < limit:
            ids = cast(list[str], await self.client.zrevrange(self.recent_key, start, start + page - 1))
            if not ids:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for tid in ids:
                    pipe.hgetall(self.key(tid))
                raws = await pipe.execute()
            for tid, raw in zip(ids, raws, strict=True):
                if raw and (queue is None or raw.get("queue", DEFAULT_QUEUE) == queue):
                    found.append(decode_record(tid, raw))
            if queue is None or len(ids) < page:
                break
            start += page
        return found[:limit]

    async def search(
        self, flt: TaskFilter, limit: int, after: Cursor | None = None
    ) -> tuple[list[dict[str, JSON]], Cursor | None, int]:
        """A page of the tasks ``flt`` matches, newest first: the intersection of its terms' sets (with none, the
        recent-tasks index: the last ``max_recent``), read after ``after``; where the next page starts (None: this
        is the last); and about how many match (those whose record expired since the last sweep_index count)."""
        terms = [f"w:{word}" for word in flt.words]
        terms += [f"{kind}:{value}" for kind, value in (("s", flt.status), ("t", flt.type), ("q", flt.queue)) if value]
        terms += [f"c:{flt.schedule}"] if flt.schedule else []
        sets = [self.index_prefix + term for term in terms] or [self.recent_key]  # no filter: the recent tasks
        keys = [self.cfg.key_prefix + SCRATCH_SUFFIX + uuid.uuid4().hex, *sets]
        low = "-inf" if flt.since is None else repr(flt.since)
        high = "+inf" if flt.until is None else repr(flt.until)
        found: list[dict[str, JSON]] = []
        total = 0
        while True:
            want = limit + 1 - len(found)
            position = ("", "") if after is None else (repr(after[0]), after[1])
            reply = await self._search(keys=keys, args=[low, high, *position, want])
            total = total or int(reply[0])
            ids = reply[1::2]
            async with self.client.pipeline(transaction=False) as pipe:
                for tid in ids:
                    pipe.hgetall(self.key(tid))
                raws = await pipe.execute()
            for tid, raw in zip(ids, raws, strict=True):
                if raw and filter_matches(flt, rec := decode_record(tid, raw)):
                    found.append(rec)
            if len(ids) < want or len(found) > limit:
                break
            after = (float(reply[-1]), reply[-2])  # some had gone: read on past them
        return (*result_page(found, limit), total)

    def _unindex_args(self, mode: str, statuses: Iterable[str], ids: Iterable[str]) -> list[str]:
        return [self.index_prefix, self.cfg.key_prefix, HISTORY_SUFFIX, mode, ",".join(statuses), *ids]

    async def delete_finished(self, ids: Iterable[str]) -> int:
        """Delete the tasks of ``ids`` that are finished, with their timelines and index entries; how many."""
        ids = list(ids)
        if not ids:
            return 0
        args = self._unindex_args("finished", FINISHED, ids)
        return int(await self._unindex(keys=[self.terms_key, self.recent_key], args=args))

    async def sweep_index(self) -> int:
        """Unindex the tasks, of the next SWEEP_BATCH of the index, whose record has expired; how many."""
        cursor, terms = await self.client.hscan(self.terms_key, self._sweep_at, count=SWEEP_BATCH)
        self._sweep_at = cursor
        ids = [str(tid) for tid in terms]
        if not ids:
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            for tid in ids:
                pipe.exists(self.key(tid))
            gone = [tid for tid, alive in zip(ids, await pipe.execute(), strict=True) if not alive]
        if not gone:
            return 0
        args = self._unindex_args("gone", STATUSES, gone)
        return int(await self._unindex(keys=[self.terms_key, self.recent_key], args=args))

    async def paused_queues(self) -> set[str]:
        """The queues paused now."""
        return set(cast(set[str], await self.client.smembers(self.paused_key)))

    async def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause (add to the set) or resume (remove) ``queue``; whether it changed."""
        if paused:
            return bool(await self.client.sadd(self.paused_key, queue))
        return bool(await self.client.srem(self.paused_key, queue))

    async def admit(
        self, queue: str, token: str, limit: int, rate: tuple[int, float] | None, lease: float
    ) -> tuple[float, float]:
        """One start from ``queue`` under its limit and rate, in turn, atomically on Redis's clock (_ADMIT_LUA)."""
        keys = [
            self.cfg.key_prefix + suffix + queue for suffix in (SLOTS_SUFFIX, STARTS_SUFFIX, LINE_SUFFIX, SEEN_SUFFIX)
        ]
        n, window = rate or (0, 0.0)
        args: list[str | int] = [
            token,
            limit,
            n,
            round(window * 1000),
            round(lease * 1000),
            round(LINE_PATIENCE * 1000),
        ]
        wait, now = cast(list[int], await self._admit(keys=keys, args=args))
        return (LIMIT_POLL if wait < 0 else wait / 1000), now / 1000

    async def release_slot(self, queue: str, token: str) -> None:
        """Give back the slot ``token`` of ``queue``."""
        await self.client.zrem(self.cfg.key_prefix + SLOTS_SUFFIX + queue, token)

    async def leave_line(self, queue: str, token: str) -> None:
        """Leave the line of ``queue`` (and its latest asks)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for suffix in (LINE_SUFFIX, SEEN_SUFFIX):
                pipe.zrem(self.cfg.key_prefix + suffix + queue, token)
            await pipe.execute()

    async def statuses(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Each task's status, in one pipeline."""
        ids = list(ids)
        async with self.client.pipeline(transaction=False) as pipe:
            for tid in ids:
                pipe.hget(self.key(tid), "status")
            return dict(zip(ids, await pipe.execute(), strict=True))

    async def hold(self, envelope: Envelope, run_at: float) -> None:
        """Add the task to the held set at ``run_at``, and its envelope beside it, atomically (MULTI)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.held_env_key, envelope.id, envelope.encode().decode())
            pipe.zadd(self.cfg.key_prefix + SCHEDULED_SUFFIX + envelope.queue, {envelope.id: run_at})
            await pipe.execute()

    async def take_due(self, limit: int, lease: float) -> tuple[list[tuple[str, bytes]], float] | None:
        """The held tasks due on Redis's clock, each leased for ``lease`` seconds (_TAKE_DUE_LUA)."""
        keys = [self.held_env_key, *self.held_keys.values()]
        reply = cast(list[str], await self._take_due(keys=keys, args=[limit, lease]))
        now, following = float(reply[0]), reply[1]
        items = [(reply[i], reply[i + 1].encode()) for i in range(2, len(reply), 2)]
        return items, (max(float(following) - now, 0.0) if following else math.inf)

    async def held_counts(self) -> dict[str, int]:
        """The size of each queue's held set."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key in self.held_keys.values():
                pipe.zcard(key)
            return dict(zip(self.held_keys, map(int, await pipe.execute()), strict=True))

    async def promoted(self, ids: Iterable[str]) -> None:
        """Drop the held tasks ``ids`` and their envelopes."""
        ids = list(ids)
        if ids:
            async with self.client.pipeline(transaction=True) as pipe:
                for key in self.held_keys.values():
                    pipe.zrem(key, *ids)
                pipe.hdel(self.held_env_key, *ids)
                await pipe.execute()

    def _key_entry(self, key: str) -> str:
        return self.cfg.key_prefix + IDEMPOTENCY_SUFFIX + key

    async def claim_key(self, key: str, fingerprint: str, hold: float) -> dict[str, JSON] | None:
        """SET NX the key's entry, in flight for ``hold`` seconds, and GET it, in one round trip: None if set;
        else what it holds. (On the pipelines' own connections: redis-py's command layer would cost more than
        the round trip.)"""
        entry, ms = self._key_entry(key), str(max(round(hold * 1000), 1))
        for _ in range(3):  # the entry may expire between the SET and the GET
            claimed, raw = await self._pipeline(
                [("SET", entry, dumps({"fp": fingerprint}), "NX", "PX", ms), ("GET", entry)]
            )
            if isinstance(claimed, Exception) or isinstance(raw, Exception):
                raise claimed if isinstance(claimed, Exception) else cast(Exception, raw)
            if claimed is not None:
                return None
            if raw is not None:
                return cast(dict[str, JSON], loads(raw))
        return {"fp": fingerprint}  # taken and dropped over and over: another request is at it

    async def settle_key(self, key: str, fingerprint: str, response: Mapping[str, JSON], ttl: float) -> None:
        """Keep the key's answer for ``ttl`` seconds."""
        value = dumps({"fp": fingerprint, "response": dict(response)})
        [done] = await self._pipeline([("SET", self._key_entry(key), value, "PX", str(max(round(ttl * 1000), 1)))])
        if isinstance(done, Exception):
            raise done

    async def release_key(self, key: str) -> None:
        """Drop the key's entry."""
        await self.client.delete(self._key_entry(key))

    async def lease(self, name: str, owner: str, ttl: float) -> int | None:
        """Renew or take the lease, atomically (_LEASE_LUA)."""
        key = self.cfg.key_prefix + LEASE_SUFFIX + name
        fence = await self._lease(keys=[key, key + ":fence"], args=[owner, max(round(ttl * 1000), 1)])
        return None if fence is None else int(fence)

    async def release_lease(self, name: str, owner: str) -> None:
        """Delete the lease if ``owner`` holds it (_RELEASE_LUA)."""
        await self._release(keys=[self.cfg.key_prefix + LEASE_SUFFIX + name], args=[owner])

    async def schedule_states(self, names: Iterable[str]) -> dict[str, dict[str, JSON]]:
        """Each schedule's state hash, in one pipeline."""
        names = list(names)
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.cfg.key_prefix + SCHEDULE_SUFFIX + name)
            raws = await pipe.execute()
        return {name: {k: loads(v) for k, v in raw.items()} for name, raw in zip(names, raws, strict=True)}

    async def save_schedule(self, name: str, fields: Mapping[str, JSON], fence: int | None) -> bool:
        """Write the fields (as JSON), fenced by the scheduler lease (_SAVE_SCHEDULE_LUA)."""
        keys = [
            self.cfg.key_prefix + LEASE_SUFFIX + SCHEDULER_LEASE,
            self.cfg.key_prefix + SCHEDULE_SUFFIX + name,
            self.cfg.key_prefix + SCHEDULES_SUFFIX,
        ]
        flat = [x for k, v in fields.items() for x in (k, dumps(v))]
        return bool(await self._save_schedule(keys=keys, args=["" if fence is None else fence, name, *flat]))

    async def forget_schedules(self, keep: Iterable[str]) -> list[str]:
        """Delete the state hashes of the schedules not kept."""
        names_key = self.cfg.key_prefix + SCHEDULES_SUFFIX
        gone = sorted(set(cast(set[str], await self.client.smembers(names_key))) - set(keep))
        if gone:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(*(self.cfg.key_prefix + SCHEDULE_SUFFIX + name for name in gone))
                pipe.srem(names_key, *gone)
                await pipe.execute()
        return gone

    async def renew_slots(self, slots: Mapping[str, str], lease: float) -> None:
        """Extend the slots held (token -> queue) to ``lease`` seconds from now, on Redis's clock."""
        if slots:
            keys = [self.cfg.key_prefix + SLOTS_SUFFIX + queue for queue in slots.values()]
            await self._renew(keys=keys, args=[round(lease * 1000), *slots])

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.workers_key}:{worker_id}"

    async def beat(self, worker_id: str, info: Mapping[str, JSON], ttl: float) -> None:
        """Record a worker's heartbeat; it counts as gone ``ttl`` seconds after the last one."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self._worker_key(worker_id), dumps(info), px=int(ttl * 1000))
            pipe.zadd(self.workers_key, {worker_id: time.time()})
            # The index outlives its last worker by one TTL, no more.
            pipe.pexpire(self.workers_key, int(ttl * 1000))
            await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a worker's heartbeat at once (it stopped cleanly)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.delete(self._worker_key(worker_id))
            pipe.zrem(self.workers_key, worker_id)
            await pipe.execute()

    async def workers(self) -> list[dict[str, JSON]]:
        """The live workers: those whose heartbeat key has not expired."""
        ids = cast(list[str], await self.client.zrange(self.workers_key, 0, -1))
        if not ids:
            return []
        raws = cast(list[str | None], await self.client.mget([self._worker_key(w) for w in ids]))
        gone = [w for w, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await self.client.zrem(self.workers_key, *gone)
        return [loads(raw) for raw in raws if raw is not None]

    async def follow(self) -> AsyncGenerator[str | None, None]:
        """Every update published on the channel from now on; None once subscribed."""
        async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.cfg.channel)
            yield None
            async for msg in pubsub.listen():
                if msg["type"] == "message":
                    yield msg["data"]

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.client.ping()

    async def report(self) -> str:
        """Redis's version and how many workers are alive."""
        async with asyncio.timeout(READY_TIMEOUT * 2):
            info = await self.client.info("server")
            workers = await self.workers()
        return f"Redis {info.get('redis_version')}; {len(workers)} live worker(s)"

    def describe(self) -> str:
        """``Redis <url without password>``."""
        return f"Redis {redact_url(self.cfg.url)}"

    async def close(self) -> None:
        """Finish the writes queued, then close the connection pool."""
        if self._flushes:
            await asyncio.wait(self._flushes, timeout=SHUTDOWN_STEP_TIMEOUT)
        while self._idle:
            await self.client.connection_pool.release(self._idle.pop())
        await self.client.aclose()


# ============================================================================
# Adapter: SQLite (the embedded backend)
# ============================================================================
# Longer than the others (about 1,000 lines) for a reason: it implements a queue (leases, redelivery,
# retries, delays, dead letters, per-queue claims) as well as a store (with pauses, limit slots, rate
# windows, idempotency keys, the scheduler's lease and schedules), where the RabbitMQ adapter leaves the
# queue to RabbitMQ.
# One file shared by the processes of one host, in WAL mode: readers never wait
# for the writer, and a SIGKILL at any moment leaves every committed write and
# no half-written one.  Each process has one connection, served by a thread of
# its own so that waiting for the write lock never blocks the event loop; the
# writes queued meanwhile commit together (one fsync for many API requests).

#: Seconds an embedded process waits for the SQLite write lock before the operation fails.
SQLITE_BUSY_TIMEOUT: Final = 10.0
#: Shortest and longest pause between polls of the SQLite file for work or updates (idle backs off to the longest).
SQLITE_POLL: Final = (0.002, 0.025)
#: Seconds between an embedded worker's checks for tasks held by processes that died.
LEASE_CHECK_INTERVAL: Final = 0.5
#: Updates the SQLite file keeps for the API to tail (older ones are pruned).
UPDATES_KEPT: Final = 20_000
#: Seconds between prunes of expired and surplus finished tasks from the SQLite file.
PRUNE_INTERVAL: Final = 5.0

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY, queue TEXT NOT NULL, task_id TEXT, body BLOB NOT NULL, headers TEXT NOT NULL,
        ready_at REAL NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0,
        holder TEXT, holder_pid INTEGER, lease_until REAL)""",
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, ready_at) WHERE holder IS NULL",
    "CREATE INDEX IF NOT EXISTS messages_held ON messages (holder) WHERE holder IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS tasks (
        id TEXT PRIMARY KEY, record TEXT NOT NULL, history TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL)""",
    # (A search's pages are ordered by created_at, then id: ties are rare, and sorted apart. An index on both, as
    # one commit had, costs every write more than it saves: dropped.)
    "CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at)",
    "DROP INDEX IF EXISTS tasks_created_id",
    # The search index: the words a task is found by (search_words; TaskFilter), by its row's rowid.
    "CREATE VIRTUAL TABLE IF NOT EXISTS task_words USING fts5 (words, tokenize = 'unicode61 remove_diacritics 0', "
    "detail = none, columnsize = 0)",
    "CREATE TRIGGER IF NOT EXISTS tasks_unindex AFTER DELETE ON tasks BEGIN "
    "DELETE FROM task_words WHERE rowid = old.rowid; END",
    "CREATE INDEX IF NOT EXISTS tasks_expires ON tasks (expires_at) WHERE expires_at IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, message TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stats (status TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS metrics (name TEXT PRIMARY KEY, value REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info TEXT NOT NULL, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS paused (queue TEXT PRIMARY KEY, since REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS slots (token TEXT PRIMARY KEY, queue TEXT NOT NULL, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS starts (token TEXT PRIMARY KEY, queue TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS starts_at ON starts (queue, at)",
    "CREATE TABLE IF NOT EXISTS line (token TEXT PRIMARY KEY, queue TEXT NOT NULL, first REAL NOT NULL, "
    "seen REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, entry TEXT NOT NULL, expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, fence INTEGER NOT NULL, "
    "expires_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, state TEXT NOT NULL)",
)

_Job: TypeAlias = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], bool]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _rows(conn: sqlite3.Connection, sql: str, *params: Any) -> list[Any]:
    """Every row ``sql`` selects."""
    return conn.execute(sql, params).fetchall()


def _changed(conn: sqlite3.Connection, sql: str, *params: Any) -> int:
    """How many rows ``sql`` changed."""
    return conn.execute(sql, params).rowcount


def _insert_message(
    conn: sqlite3.Connection, queue: str, envelope: Envelope, headers: Mapping[str, Any] | None, ready_at: float
) -> None:
    """Queue ``envelope`` on ``queue`` (its name in the file), claimable from ``ready_at`` on."""
    conn.execute(
        "INSERT INTO messages (queue, task_id, body, headers, ready_at) VALUES (?, ?, ?, ?, ?)",
        (queue, envelope.id, envelope.encode(), dumps(dict(headers or {})), ready_at),
    )


def _settle_soon(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """From the database thread: resolve ``future`` in its event loop (a locked or unusable file: StoreUnavailable)."""
    if isinstance(error, sqlite3.OperationalError):
        error = StoreUnavailable(str(error))
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        future.get_loop().call_soon_threadsafe(_resolve, future, result, error)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except FileNotFoundError:
        return not Path("/proc/self").exists() and _signal_zero(pid)
    except OSError:
        return _signal_zero(pid)


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Database:
    """This process's connection to the embedded SQLite file, and the thread that uses it."""

    def __init__(self, cfg: Config, synchronous: str) -> None:
        self.path = cfg.database
        self.synchronous = synchronous
        self._jobs: jobqueue.SimpleQueue[_Job | None] = jobqueue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def read(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(connection, *args)`` in the database thread, outside any transaction."""
        return self._submit(fn, args, False)

    def write(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(connection, *args)`` inside a write transaction, shared with the other writes queued; done once
        committed."""
        return self._submit(fn, args, True)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], write: bool) -> asyncio.Future[Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()
        future = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, args, future, write))
        return future

    def _open(self) -> sqlite3.Connection:
        """Connect, in WAL mode, with the tables made. Switching a new file to WAL does not wait for a lock
        another process's first connection holds (SQLite answers "locked" at once): it is tried again, for
        as long as any lock is waited for."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
        while True:
            conn = sqlite3.connect(
                self.path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
                return conn
            except sqlite3.OperationalError as e:
                conn.close()
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(SQLITE_POLL[0])  # in the database thread, not the event loop

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        while (job := self._jobs.get()) is not None:
            batch = [job]
            with contextlib.suppress(jobqueue.Empty):
                while len(batch) < 500 and (job := self._jobs.get_nowait()) is not None:
                    batch.append(job)
            try:
                conn = conn or self._open()
            except sqlite3.Error as e:
                for _, _, future, _ in batch:
                    _settle_soon(future, None, sqlite3.OperationalError(f"{self.path}: {e}"))
                continue
            for fn, args, future, _ in (j for j in batch if not j[3]):
                try:
                    _settle_soon(future, fn(conn, *args), None)
                except Exception as e:
                    _settle_soon(future, None, e)
            writes = [j for j in batch if j[3]]
            if writes:
                for future, result, error in self._commit(conn, writes):
                    _settle_soon(future, result, error)
            if job is None:
                break
        if conn is not None:
            conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, writes: list[_Job]) -> list[tuple[asyncio.Future[Any], Any, Any]]:
        """Run the writes in one transaction, each in a savepoint (one failing leaves the others)."""
        done: list[tuple[asyncio.Future[Any], Any, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, future, _ in writes:
                conn.execute("SAVEPOINT job")
                try:
                    done.append((future, fn(conn, *args), None))
                except Exception as e:
                    conn.execute("ROLLBACK TO job")
                    done.append((future, None, e))
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.rollback()
            return [(future, None, e) for _, _, future, _ in writes]
        return done

    async def close(self) -> None:
        """Let the queued jobs finish, then close the connection."""
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, SHUTDOWN_STEP_TIMEOUT)
            self._thread = None


class SqliteDelivery:
    """A task claimed from the SQLite file by this process; settling it ends the lease."""

    def __init__(self, owner: SqliteQueue, mid: int, body: bytes, headers: dict[str, Any]) -> None:
        self.owner = owner
        self.id = mid
        self.body = body
        self.headers: Mapping[str, Any] = headers

    async def ack(self) -> None:
        """Delete it: done with."""
        await self.owner.settle(self.id, "DELETE FROM messages WHERE id = ? AND holder = ?")

    async def nack(self, requeue: bool = True) -> None:
        """Release it to be delivered again (or dead-letter it)."""
        if requeue:
            await self.owner.settle(
                self.id, "UPDATE messages SET holder = NULL, holder_pid = NULL WHERE id = ? AND holder = ?"
            )
        else:
            await self.reject()

    async def reject(self, requeue: bool = False) -> None:
        """Move it to the dead-letter queue (or release it)."""
        if requeue:
            await self.nack()
            return
        headers = dumps(
            {**self.headers, "x-error": "not a task envelope", "x-last-failed-at": header_time(time.time())}
        )
        await self.owner.settle(
            self.id,
            "UPDATE messages SET queue = ?, headers = ?, holder = NULL, holder_pid = NULL WHERE id = ? AND holder = ?",
            self.owner.dlq,
            headers,
        )


class SqliteQueue:
    """The TaskQueue on the SQLite file: rows of ``messages``, each claimed under a lease by one worker."""

    name = "sqlite"

    def __init__(self, db: Database, cfg: Config, role: str = "api") -> None:
        self.db = db
        self.config = cfg
        self.cfg = cfg.broker
        self.lease = cfg.embedded.lease_timeout
        self.dlq = cfg.broker.queue + DLQ_SUFFIX
        self.log = log.getChild(role)
        self.host = socket.gethostname()
        self.holder = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: dict[int, str] = {}  # delivery -> its queue's name in the file
        self.consumed: list[str] = []  # the queues claimed from, by their names in the file
        self._turn = 0  # which consumed queue the next claim looks at first
        self._wake = asyncio.Event()
        self._stopping = False
        self._consumer: asyncio.Task[None] | None = None

    async def _guarded(self, run: Awaitable[Any], what: str = "task queue unavailable") -> Any:
        try:
            return await run
        except (sqlite3.Error, StoreUnavailable) as e:
            raise BrokerUnavailable(f"{what} ({self.db.path}): {e}") from None

    async def connect(self) -> Database:
        """Open the file (creating it and its tables if needed)."""
        await self._guarded(self.db.read(_rows, "SELECT 1"))
        return self.db

    async def publish(
        self, envelope: Envelope, routing_key: str | None = None, headers: Mapping[str, Any] | None = None
    ) -> None:
        """Queue a task (on its own queue by default); it is committed to the file when this returns."""
        queue = routing_key or self.config.broker_name(envelope.queue)
        write = self.db.write(_insert_message, queue, envelope, headers, 0.0)
        await self._guarded(write, "task queue refused the task")
        self._wake.set()

    async def publish_later(self, envelope: Envelope, delay: float, headers: Mapping[str, Any]) -> None:
        """Queue a task that no worker may claim for ``delay`` seconds."""
        when = time.time() + delay
        queue = self.config.broker_name(envelope.queue)
        write = self.db.write(_insert_message, queue, envelope, headers, when)
        await self._guarded(write, "task queue refused the retry")

    async def dead_letter(self, envelope: Envelope, headers: Mapping[str, Any]) -> None:
        """Put a task in the dead-letter queue."""
        await self._guarded(
            self.db.write(_insert_message, self.dlq, envelope, headers, 0.0), "task queue refused the dead letter"
        )

    def _claim(
        self, conn: sqlite3.Connection, free: Mapping[str, int], now: float
    ) -> list[tuple[int, str, bytes, dict[str, Any]]]:
        """Lease to this process up to ``free[queue]`` ready tasks of each queue, oldest first (inside the write
        transaction). The queues take turns at the front of the batch, so that one flooded queue cannot keep
        another's tasks waiting behind it."""
        claimed = []
        for queue, limit in free.items():
            rows = conn.execute(
                "SELECT id, body, headers, deliveries FROM messages WHERE queue = ? AND holder IS NULL "
                "AND ready_at <= ? ORDER BY ready_at, id LIMIT ?",
                (queue, now, limit),
            ).fetchall()
            for mid, body, raw, deliveries in rows:
                headers = loads(raw)
                if deliveries > self.cfg.delivery_limit:  # RabbitMQ's quorum delivery limit, as a backstop
                    headers["x-error"] = f"delivered {deliveries} times without being settled (delivery limit)"
                    update = "UPDATE messages SET queue = ?, headers = ? WHERE id = ?"
                    conn.execute(update, (self.dlq, dumps(headers), mid))
                    continue
                conn.execute(
                    "UPDATE messages SET holder = ?, holder_pid = ?, lease_until = ?, deliveries = deliveries + 1 "
                    "WHERE id = ?",
                    (self.holder, os.getpid(), now + self.lease, mid),
                )
                if deliveries:
                    headers["x-delivery-count"] = deliveries
                claimed.append((mid, queue, bytes(body), headers))
        return claimed

    def _free(self, prefetch: int) -> dict[str, int]:
        """How many more tasks of each consumed queue this process may hold, the queue whose turn it is first."""
        held: dict[str, int] = {}
        for queue in self.held.values():
            held[queue] = held.get(queue, 0) + 1
        n = len(self.consumed)
        order = [self.consumed[(self._turn + i) % n] for i in range(n)]
        self._turn += 1
        return {q: prefetch - held.get(q, 0) for q in order if held.get(q, 0) < prefetch}

    def _ready(self, conn: sqlite3.Connection, queues: list[str], now: float) -> bool:
        marks = ",".join("?" * len(queues))
        query = f"SELECT 1 FROM messages WHERE queue IN ({marks}) AND holder IS NULL AND ready_at <= ? LIMIT 1"
        return conn.execute(query, (*queues, now)).fetchone() is not None

    @staticmethod
    def _holders(conn: sqlite3.Connection) -> list[tuple[str, int, float]]:
        return conn.execute(
            "SELECT DISTINCT holder, holder_pid, lease_until FROM messages WHERE holder IS NOT NULL"
        ).fetchall()

    def _release(self, conn: sqlite3.Connection, holders: list[str], now: float) -> int:
        """Hand back the tasks of holders that died, and any lease not renewed in time."""
        released = 0
        for holder in holders:
            released += conn.execute(
                "UPDATE messages SET holder = NULL, holder_pid = NULL WHERE holder = ?", (holder,)
            ).rowcount
        released += conn.execute(
            "UPDATE messages SET holder = NULL, holder_pid = NULL WHERE holder IS NOT NULL AND lease_until < ?", (now,)
        ).rowcount
        return released

    async def _reap(self) -> None:
        """Redeliver the tasks of workers of this host that died (their pid is gone) or whose lease ran out."""
        now = time.time()
        holders = await self.db.read(self._holders)
        dead = [h for h, pid, _ in holders if h.startswith(self.host + ":") and h != self.holder and not pid_alive(pid)]
        if dead or any(until < now for _, _, until in holders):
            released = await self.db.write(self._release, dead, now)
            if released:
                self.log.warning("redelivering %d task(s) whose worker died or stopped renewing its lease", released)
                self._wake.set()

    def _renew(self, conn: sqlite3.Connection, ids: list[int], until: float) -> None:
        conn.executemany(
            "UPDATE messages SET lease_until = ? WHERE id = ? AND holder = ?",
            [(until, mid, self.holder) for mid in ids],
        )

    async def settle(self, mid: int, statement: str, *params: Any) -> None:
        """End this process's lease on delivery ``mid`` with ``statement`` (ack, release or dead-letter).

        Like an AMQP ack it is not waited for: it commits with the next claim. Lost, it means a
        redelivery, which finds the task's outcome recorded (the caller recorded it first).
        """
        self.held.pop(mid, None)  # not renewed from now on, even if this write fails: the lease runs out
        self._wake.set()
        self.db.write(_changed, statement, *params, mid, self.holder).add_done_callback(self._settled)

    def _settled(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is not None:
            self.log.warning("could not settle a delivery (%s); it will be redelivered", done.exception())

    async def _consume(self, callback: Callable[[Delivery], Awaitable[None]], prefetch: int) -> None:
        pause, busy = SQLITE_POLL[0], False
        next_reap = next_renew = 0.0
        while not self._stopping:
            try:
                now = time.time()
                if now >= next_reap:
                    await self._reap()
                    next_reap = now + LEASE_CHECK_INTERVAL
                if self.held and now >= next_renew:
                    await self.db.write(self._renew, list(self.held), now + self.lease)
                    next_renew = now + self.lease / 3
                free = self._free(prefetch) if self.consumed else {}
                batch = []
                # While tasks keep coming, claim straight away; once idle, look before taking the write lock.
                if free and not self._stopping and (busy or await self.db.read(self._ready, list(free), now)):
                    batch = await self.db.write(self._claim, free, now)
                    busy = bool(batch)
            except STORE_ERRORS as e:
                self.log.warning("cannot claim tasks from %s: %s", self.db.path, e)
                batch, busy = [], False
            for mid, queue, body, headers in batch:
                self.held[mid] = queue
                await callback(SqliteDelivery(self, mid, body, headers))
            if batch:
                pause = SQLITE_POLL[0]
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
            pause = min(pause * 2, SQLITE_POLL[1])

    async def start_consuming(
        self, callback: Callable[[Delivery], Awaitable[None]], prefetch: int, queues: Iterable[str]
    ) -> None:
        """Claim tasks of ``queues`` in the background, up to ``prefetch`` of each in hand."""
        await self.connect()
        self.consumed = [self.config.broker_name(q) for q in queues]
        self._consumer = asyncio.create_task(self._consume(callback, prefetch))

    async def set_consumed(self, queues: Iterable[str]) -> None:
        """Claim from ``queues`` only, from the next claim on."""
        self.consumed = [self.config.broker_name(q) for q in queues]
        self._wake.set()

    async def put_back(self, delivery: Delivery, envelope: Envelope) -> None:
        """Release the lease without counting the delivery: the task keeps its place in its queue."""
        assert isinstance(delivery, SqliteDelivery)
        await self.settle(
            delivery.id,
            "UPDATE messages SET holder = NULL, holder_pid = NULL, deliveries = MAX(deliveries - 1, 0) "
            "WHERE id = ? AND holder = ?",
        )

    async def wait_consuming(self, stop: asyncio.Event) -> bool:
        """Wait for ``stop``; True if the claiming loop ended by itself (it should not)."""
        assert self._consumer is not None, "start_consuming first"
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, self._consumer}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        return not stop.is_set()

    async def stop_consuming(self) -> None:
        """Claim nothing more; a claim in progress is finished and its tasks delivered."""
        self._stopping = True
        self._wake.set()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer, SHUTDOWN_STEP_TIMEOUT)

    async def check(self, timeout: float) -> None:
        """Raise BrokerUnavailable unless the file answers within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self.connect()
        except TimeoutError:
            raise BrokerUnavailable(f"{self.db.path} did not answer within {timeout:g} s") from None

    def _dead(self, conn: sqlite3.Connection, limit: int) -> tuple[list[tuple[int, str, bytes, str]], int]:
        rows = conn.execute(
            "SELECT id, task_id, body, headers FROM messages WHERE queue = ? ORDER BY id LIMIT ?", (self.dlq, limit)
        ).fetchall()
        return rows, conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (self.dlq,)).fetchone()[0]

    async def dead_letters(self, limit: int) -> tuple[list[dict[str, JSON]], int]:
        """Up to ``limit`` dead letters, oldest first, and how many there are."""
        rows, total = await self._guarded(self.db.read(self._dead, limit))
        return [dead_letter_info(tid, bytes(body), loads(headers)) for _, tid, body, headers in rows], total

    async def take_dead_letters(
        self,
        wanted: Callable[[dict[str, JSON]], bool],
        take: Callable[[Envelope | None, dict[str, JSON]], Awaitable[None]],
    ) -> int:
        """Run ``take`` on every dead letter ``wanted`` selects, then delete it; return how many."""
        rows, _ = await self._guarded(self.db.read(self._dead, -1))
        taken = 0
        for mid, tid, body, headers in rows:
            item = dead_letter_info(tid, bytes(body), loads(headers))
            if not wanted(item):
                continue
            env: Envelope | None = None
            with contextlib.suppress(EnvelopeError):
                env = Envelope.decode(bytes(body))
            await take(env, item)
            delete = "DELETE FROM messages WHERE id = ? AND queue = ?"
            taken += await self._guarded(self.db.write(_changed, delete, mid, self.dlq))
        return taken

    async def purge_dead_letters(self) -> int:
        """Drop every dead letter; return how many there were."""
        purge = "DELETE FROM messages WHERE queue = ?"
        return int(await self._guarded(self.db.write(_changed, purge, self.dlq)))

    @staticmethod
    def _depths(conn: sqlite3.Connection, now: float) -> dict[str, tuple[int, int, int]]:
        """Per queue (by its name in the file): tasks ready, held by a worker, and waiting to retry."""
        rows = conn.execute(
            "SELECT queue, COALESCE(SUM(holder IS NULL AND ready_at <= ?1), 0), COALESCE(SUM(holder IS NOT NULL), 0), "
            "COALESCE(SUM(holder IS NULL AND ready_at > ?1 AND json_extract(headers, '$.\"x-retries\"') IS NOT NULL), "
            "0) FROM messages GROUP BY queue",
            (now,),
        ).fetchall()
        return {queue: (ready, held, waiting) for queue, ready, held, waiting in rows}

    async def queue_figures(self) -> tuple[dict[str, dict[str, int | None]], int]:
        """Per declared queue its ready, running (held by a worker) and retrying tasks; and the dead letters."""
        depths = await self._guarded(self.db.read(self._depths, time.time()))
        figures: dict[str, dict[str, int | None]] = {}
        for queue in self.config.queues:
            ready, held, waiting = depths.get(self.config.broker_name(queue), (0, 0, 0))
            figures[queue] = {"ready": ready, "running": held, "retrying": waiting}
        return figures, depths.get(self.dlq, (0, 0, 0))[0]

    async def report(self) -> str:
        """What the file holds, queue by queue."""
        figures, dlq = await self.queue_figures()
        lines = [
            f"\n  {q} ({self.config.broker_name(q)}): {f['ready']} ready, {f['running']} running, "
            f"{f['retrying']} waiting to retry"
            for q, f in figures.items()
        ]
        return f"SQLite {sqlite3.sqlite_version}{''.join(lines)}\n  dead letters ({self.dlq}): {dlq}"

    def describe(self) -> str:
        """``SQLite <file>``."""
        return f"SQLite {self.db.path}"

    async def close(self) -> None:
        """Close the file (the store shares it; closing twice is harmless)."""
        await self.db.close()


class SqliteStore:
    """The TaskStore on the SQLite file: ``tasks`` rows, the ``updates`` log the API tails, heartbeats."""

    name = "sqlite"
    label = "task store (SQLite)"

    def __init__(self, db: Database, cfg: Config) -> None:
        self.db = db
        self.config = cfg
        self.tasks = cfg.tasks
        self._next_prune = 0.0

    @staticmethod
    def _apply(conn: sqlite3.Connection, change: Change) -> tuple[int, int] | None:
        """Make ``change`` inside the write transaction (as _UPDATE_LUA makes it in Redis)."""
        row = conn.execute(
            "SELECT record, history, created_at, expires_at, rowid FROM tasks WHERE id = ?", (change.tid,)
        ).fetchone()
        rec, history = (loads(row[0]), loads(row[1])) if row else ({}, [])
        created, expires = (row[2], row[3]) if row else (change.at, None)
        current = rec.get("status") or ""
        if change.guard and current not in change.guard:
            return None
        for name in change.clear:
            rec.pop(name, None)
        if not current:
            rec.update(change.restore)
            if change.index_at is not None:
                created = change.index_at
        count = 0
        if change.counter:
            count = rec[change.counter] = int(rec.get(change.counter) or 0) + 1
        seq = rec["seq"] = int(rec.get("seq") or 0) + 1
        rec.update(change.fields)
        if change.entry is not None:
            history.append(loads(change.entry))
            for counted in (change.status, change.tally) if change.tally else (change.status,):
                conn.execute("INSERT INTO stats VALUES (?, 1) ON CONFLICT (status) DO UPDATE SET n = n + 1", (counted,))
        if change.metrics and (not change.metrics_first or count == 1):
            ops = change.metrics
            conn.executemany(
                "INSERT INTO metrics VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                [(ops[i], float(ops[i + 1])) for i in range(0, len(ops), 2)],
            )
        if change.persist:
            expires = None
        if change.expire > 0:
            expires = change.at + change.expire
        written = conn.execute(
            "INSERT INTO tasks (id, record, history, created_at, expires_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET record = excluded.record, history = excluded.history, "
            "created_at = excluded.created_at, expires_at = excluded.expires_at",
            (change.tid, dumps(rec), dumps(history), created, expires),
        )
        if change.words:  # the row keeps its rowid, by which task_words finds it
            rowid, words = row[4] if row else written.lastrowid, " ".join(change.words)
            if change.reindex or not row:
                conn.execute("INSERT OR REPLACE INTO task_words (rowid, words) VALUES (?, ?)", (rowid, words))
            else:
                conn.execute("UPDATE task_words SET words = words || ' ' || ? WHERE rowid = ?", (words, rowid))
        conn.execute("INSERT INTO updates (message) VALUES (?)", (change.message(seq, count),))
        return seq, count

    def apply(self, change: Change) -> Awaitable[tuple[int, int] | None]:
        """Make ``change`` and log its update in one transaction (see TaskStore.apply)."""
        return self.db.write(self._apply, change)

    @staticmethod
    def _record(tid: str, raw: str) -> dict[str, JSON]:
        return blank_record(tid) | cast(dict[str, JSON], loads(raw))

    async def get(self, tid: str) -> dict[str, JSON] | None:
        """The task ``tid`` with its history, or None (also once expired)."""
        query = "SELECT record, history FROM tasks WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)"
        rows = await self.db.read(_rows, query, tid, time.time())
        return self._record(tid, rows[0][0]) | {"history": loads(rows[0][1])} if rows else None

    async def recent(self, limit: int, queue: str | None = None) -> list[dict[str, JSON]]:
        """The most recent tasks (of ``queue`` only, if given), newest first."""
        alive = "(expires_at IS NULL OR expires_at > ?)"
        limit = min(limit, self.tasks.max_recent)
        if queue is None:
            query = f"SELECT id, record FROM tasks WHERE {alive} ORDER BY created_at DESC LIMIT ?"
            rows = await self.db.read(_rows, query, time.time(), limit)
        else:
            of_queue = f"COALESCE(json_extract(record, '$.queue'), '{DEFAULT_QUEUE}') = ?"
            query = f"SELECT id, record FROM tasks WHERE {alive} AND {of_queue} ORDER BY created_at DESC LIMIT ?"
            rows = await self.db.read(_rows, query, time.time(), queue, limit)
        return [self._record(tid, raw) for tid, raw in rows]

    @staticmethod
    def _search(
        conn: sqlite3.Connection, flt: TaskFilter, limit: int, after: Cursor | None, now: float
    ) -> tuple[list[dict[str, JSON]], Cursor | None, int]:
        where, params = ["(expires_at IS NULL OR expires_at > ?)"], list[str | float]([now])
        if flt.words:
            where.append("rowid IN (SELECT rowid FROM task_words WHERE task_words MATCH ?)")
            params.append(" ".join(f'"{word}"' for word in flt.words))
        for field, name in (("status", flt.status), ("type", flt.type), ("schedule", flt.schedule)):
            if name is not None:
                where.append(f"json_extract(record, '$.{field}') = ?")
                params.append(name)
        if flt.queue is not None:
            where.append(f"COALESCE(json_extract(record, '$.queue'), '{DEFAULT_QUEUE}') = ?")
            params.append(flt.queue)
        for bound, value in (("created_at >= ?", flt.since), ("created_at <= ?", flt.until)):
            if value is not None:
                where.append(bound)
                params.append(value)
        matching = " AND ".join(where)
        [(total,)] = conn.execute(f"SELECT COUNT(*) FROM tasks WHERE {matching}", params).fetchall()
        found: list[dict[str, JSON]] = []
        while True:
            want = limit + 1 - len(found)
            page, page_params = matching, [*params]
            if after is not None:
                page += " AND created_at <= ? AND (created_at < ? OR id < ?)"  # a range of tasks_created
                page_params += [after[0], after[0], after[1]]
            rows = conn.execute(
                f"SELECT id, record, created_at FROM tasks WHERE {page} ORDER BY created_at DESC, id DESC LIMIT ?",
                [*page_params, want],
            ).fetchall()
            found += [rec for tid, raw, _ in rows if filter_matches(flt, rec := SqliteStore._record(tid, raw))]
            if len(rows) < want or len(found) > limit:
                break
            after = (rows[-1][2], rows[-1][0])
        return (*result_page(found, limit), total)

    async def search(
        self, flt: TaskFilter, limit: int, after: Cursor | None = None
    ) -> tuple[list[dict[str, JSON]], Cursor | None, int]:
        """A page of the tasks ``flt`` matches, newest first (its words through task_words, the full-text
        index), read after ``after``; where the next page starts (None: the last); and how many match."""
        found: tuple[list[dict[str, JSON]], Cursor | None, int] = await self.db.read(
            self._search, flt, limit, after, time.time()
        )
        return found

    async def delete_finished(self, ids: Iterable[str]) -> int:
        """Delete the tasks of ``ids`` that are finished (their words go with them: tasks_unindex); how many."""
        ids = list(ids)
        if not ids:
            return 0
        marks, finished = ",".join("?" * len(ids)), ",".join("?" * len(FINISHED))
        delete = f"DELETE FROM tasks WHERE id IN ({marks}) AND json_extract(record, '$.status') IN ({finished})"
        return int(await self.db.write(_changed, delete, *ids, *FINISHED))

    async def sweep_index(self) -> int:
        """Nothing to sweep: a task's words are deleted with its row."""
        return 0

    async def paused_queues(self) -> set[str]:
        """The queues paused now."""
        return {queue for (queue,) in await self.db.read(_rows, "SELECT queue FROM paused")}

    async def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause (a row in ``paused``) or resume (no row) ``queue``; whether it changed."""
        if paused:
            insert = "INSERT OR IGNORE INTO paused (queue, since) VALUES (?, ?)"
            return bool(await self.db.write(_changed, insert, queue, time.time()))
        return bool(await self.db.write(_changed, "DELETE FROM paused WHERE queue = ?", queue))

    @staticmethod
    def _admit(
        conn: sqlite3.Connection, queue: str, token: str, limit: int, rate: tuple[int, float] | None, lease: float
    ) -> tuple[float, float]:
        """One start from ``queue`` under its limit and rate, in turn, inside the write transaction (as
        _ADMIT_LUA, whose comment says how the line works)."""
        now = time.time()
        conn.execute(
            "INSERT INTO line (token, queue, first, seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (token) DO UPDATE SET seen = excluded.seen",
            (token, queue, now, now),
        )
        conn.execute("DELETE FROM line WHERE queue = ? AND seen < ?", (queue, now - LINE_PATIENCE))
        free, wait = math.inf, LIMIT_POLL
        if limit:
            conn.execute("DELETE FROM slots WHERE queue = ? AND expires_at < ?", (queue, now))
            [(held,)] = conn.execute("SELECT COUNT(*) FROM slots WHERE queue = ?", (queue,)).fetchall()
            free = limit - held
        if rate:
            n, window = rate
            conn.execute("DELETE FROM starts WHERE queue = ? AND at < ?", (queue, now - window))
            [(started, oldest)] = conn.execute(
                "SELECT COUNT(*), MIN(at) FROM starts WHERE queue = ?", (queue,)
            ).fetchall()
            if started >= n:
                wait = oldest + window - now + 0.001
            free = min(free, n - started)
        [(ahead,)] = conn.execute(
            "SELECT COUNT(*) FROM line WHERE queue = ? AND (first, token) < (SELECT first, token FROM line "
            "WHERE token = ?)",
            (queue, token),
        ).fetchall()
        if ahead >= free:
            return wait, now
        conn.execute("DELETE FROM line WHERE token = ?", (token,))
        if rate:
            conn.execute("INSERT INTO starts (token, queue, at) VALUES (?, ?, ?)", (token, queue, now))
        if limit:
            conn.execute("INSERT INTO slots (token, queue, expires_at) VALUES (?, ?, ?)", (token, queue, now + lease))
        return 0.0, now

    async def admit(
        self, queue: str, token: str, limit: int, rate: tuple[int, float] | None, lease: float
    ) -> tuple[float, float]:
        """One start from ``queue`` under its limit and rate (see TaskStore.admit), in one transaction."""
        return cast(tuple[float, float], await self.db.write(self._admit, queue, token, limit, rate, lease))

    async def release_slot(self, queue: str, token: str) -> None:
        """Give back the slot ``token``."""
        await self.db.write(_changed, "DELETE FROM slots WHERE token = ?", token)

    async def renew_slots(self, slots: Mapping[str, str], lease: float) -> None:
        """Extend the slots held to ``lease`` seconds from now."""
        if slots:
            until = time.time() + lease
            renew = "UPDATE slots SET expires_at = ? WHERE token = ?"
            await self.db.write(lambda conn: conn.executemany(renew, [(until, token) for token in slots]))

    async def leave_line(self, queue: str, token: str) -> None:
        """Leave the line of ``queue``."""
        await self.db.write(_changed, "DELETE FROM line WHERE token = ?", token)

    async def statuses(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Each task's status, in one query."""
        found = dict.fromkeys(ids)
        if found:
            marks = ",".join("?" * len(found))
            query = f"SELECT id, json_extract(record, '$.status') FROM tasks WHERE id IN ({marks})"
            found.update(await self.db.read(_rows, query, *found))
        return found

    async def hold(self, envelope: Envelope, run_at: float) -> None:
        """Queue the task's message claimable from ``run_at`` on: the file holds it, and no one promotes it."""
        queue = self.config.broker_name(envelope.queue)
        await self.db.write(_insert_message, queue, envelope, {}, run_at)

    async def take_due(self, limit: int, lease: float) -> tuple[list[tuple[str, bytes]], float] | None:
        """None: held tasks are messages that become claimable on time by themselves."""
        return None

    async def held_counts(self) -> dict[str, int]:
        """The messages of each queue not claimable before their run_at (those waiting to retry aside)."""
        query = (
            "SELECT queue, COUNT(*) FROM messages WHERE holder IS NULL AND ready_at > ? "
            "AND json_extract(headers, '$.\"x-retries\"') IS NULL GROUP BY queue"
        )
        counts = dict(await self.db.read(_rows, query, time.time()))
        return {q: counts.get(self.config.broker_name(q), 0) for q in self.config.queues}

    async def promoted(self, ids: Iterable[str]) -> None:
        """Drop the messages of ``ids`` that wait unclaimed in a work queue (cancelled: no one needs them)."""
        ids = list(ids)
        if ids:
            marks = ",".join("?" * len(ids))
            drop = f"DELETE FROM messages WHERE task_id IN ({marks}) AND holder IS NULL AND queue != ?"
            await self.db.write(_changed, drop, *ids, self.config.broker.queue + DLQ_SUFFIX)

    @staticmethod
    def _claim_key(conn: sqlite3.Connection, key: str, fingerprint: str, until: float, now: float) -> str | None:
        conn.execute("DELETE FROM idempotency WHERE key = ? AND expires_at <= ?", (key, now))
        insert = "INSERT OR IGNORE INTO idempotency (key, entry, expires_at) VALUES (?, ?, ?)"
        if conn.execute(insert, (key, dumps({"fp": fingerprint}), until)).rowcount:
            return None
        return cast(str, conn.execute("SELECT entry FROM idempotency WHERE key = ?", (key,)).fetchone()[0])

    async def claim_key(self, key: str, fingerprint: str, hold: float) -> dict[str, JSON] | None:
        """Insert the key's row, in flight for ``hold`` seconds, unless a live one is there: then what it holds."""
        now = time.time()
        raw = await self.db.write(self._claim_key, key, fingerprint, now + hold, now)
        return None if raw is None else cast(dict[str, JSON], loads(raw))

    async def settle_key(self, key: str, fingerprint: str, response: Mapping[str, JSON], ttl: float) -> None:
        """Keep the key's answer for ``ttl`` seconds."""
        value = dumps({"fp": fingerprint, "response": dict(response)})
        upsert = "INSERT OR REPLACE INTO idempotency (key, entry, expires_at) VALUES (?, ?, ?)"
        await self.db.write(_changed, upsert, key, value, time.time() + ttl)

    async def release_key(self, key: str) -> None:
        """Drop the key's row."""
        await self.db.write(_changed, "DELETE FROM idempotency WHERE key = ?", key)

    @staticmethod
    def _lease(conn: sqlite3.Connection, name: str, owner: str, ttl: float) -> int | None:
        now = time.time()
        row = conn.execute("SELECT owner, fence, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
        if row is not None and row[2] > now and row[0] != owner:
            return None
        fence = int(row[1]) if row is not None and row[2] > now else (int(row[1]) + 1 if row else 1)
        upsert = "INSERT OR REPLACE INTO leases (name, owner, fence, expires_at) VALUES (?, ?, ?, ?)"
        conn.execute(upsert, (name, owner, fence, now + ttl))
        return fence

    async def lease(self, name: str, owner: str, ttl: float) -> int | None:
        """Renew or take the lease in one transaction (a lapsed one is taken with the next fencing value)."""
        return cast(int | None, await self.db.write(self._lease, name, owner, ttl))

    async def release_lease(self, name: str, owner: str) -> None:
        """Let the lease lapse now if ``owner`` holds it (its fencing value is kept, for the next holder's)."""
        give_up = "UPDATE leases SET expires_at = 0 WHERE name = ? AND owner = ?"
        await self.db.write(_changed, give_up, name, owner)

    async def schedule_states(self, names: Iterable[str]) -> dict[str, dict[str, JSON]]:
        """Each schedule's state row."""
        rows = dict(await self.db.read(_rows, "SELECT name, state FROM schedules"))
        return {name: loads(rows[name]) if name in rows else {} for name in names}

    @staticmethod
    def _save_schedule(conn: sqlite3.Connection, name: str, fields: Mapping[str, JSON], fence: int | None) -> bool:
        if fence is not None:
            row = conn.execute("SELECT fence, expires_at FROM leases WHERE name = ?", (SCHEDULER_LEASE,)).fetchone()
            if row is None or row[0] != fence or row[1] <= time.time():
                return False
        row = conn.execute("SELECT state FROM schedules WHERE name = ?", (name,)).fetchone()
        state = loads(row[0]) if row else {}
        conn.execute(
            "INSERT OR REPLACE INTO schedules (name, state) VALUES (?, ?)", (name, dumps(state | dict(fields)))
        )
        return True

    async def save_schedule(self, name: str, fields: Mapping[str, JSON], fence: int | None) -> bool:
        """Merge the fields into the schedule's state, fenced by the scheduler lease, in one transaction."""
        return bool(await self.db.write(self._save_schedule, name, fields, fence))

    async def forget_schedules(self, keep: Iterable[str]) -> list[str]:
        """Delete the state rows of the schedules not kept."""
        gone = sorted({name for (name,) in await self.db.read(_rows, "SELECT name FROM schedules")} - set(keep))
        if gone:
            drop = f"DELETE FROM schedules WHERE name IN ({','.join('?' * len(gone))})"
            await self.db.write(_changed, drop, *gone)
        return gone

    async def _field(self, tid: str, name: str) -> Any:
        rows = await self.db.read(_rows, "SELECT record FROM tasks WHERE id = ?", tid)
        return loads(rows[0][0]).get(name) if rows else None

    async def status_of(self, tid: str) -> str | None:
        """Just the status of task ``tid``."""
        return cast(str | None, await self._field(tid, "status"))

    async def attempts_of(self, tid: str) -> int:
        """How many runs of task ``tid`` have started."""
        return int(await self._field(tid, "attempts") or 0)

    async def counters(self) -> dict[str, int]:
        """How many tasks ever reached each status."""
        return dict(await self.db.read(_rows, "SELECT status, n FROM stats"))

    async def metric_values(self) -> dict[str, float]:
        """The deployment's metrics as metric_ops names them."""
        return dict(await self.db.read(_rows, "SELECT name, value FROM metrics"))

    async def follow(self) -> AsyncGenerator[str | None, None]:
        """Tail the ``updates`` log from its end; None first, and again if the log was pruned past us."""
        [(last,)] = await self.db.read(_rows, "SELECT COALESCE(MAX(seq), 0) FROM updates")
        yield None
        query = "SELECT seq, message FROM updates WHERE seq > ? ORDER BY seq LIMIT 1000"
        pause = SQLITE_POLL[0]
        while True:
            rows = await self.db.read(_rows, query, last)
            if not rows:
                await asyncio.sleep(pause)
                pause = min(pause * 2, SQLITE_POLL[1])
                continue
            if rows[0][0] != last + 1:
                yield None  # pruned before we read them: the relay resends a snapshot
            last, pause = rows[-1][0], SQLITE_POLL[0]
            for _, message in rows:
                yield message

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Drop expired tasks, finished ones beyond ``max_recent``, old updates and stale heartbeats."""
        conn.execute("DELETE FROM tasks WHERE expires_at < ?", (now,))
        conn.execute(
            "DELETE FROM tasks WHERE expires_at IS NOT NULL AND created_at < "
            "(SELECT created_at FROM tasks ORDER BY created_at DESC LIMIT 1 OFFSET ?)",
            (self.tasks.max_recent - 1,),
        )
        conn.execute("DELETE FROM updates WHERE seq <= (SELECT MAX(seq) FROM updates) - ?", (UPDATES_KEPT,))
        conn.execute("DELETE FROM workers WHERE expires_at < ?", (now,))
        conn.execute("DELETE FROM slots WHERE expires_at < ?", (now,))
        conn.execute("DELETE FROM line WHERE seen < ?", (now - LINE_PATIENCE,))
        conn.execute("DELETE FROM idempotency WHERE expires_at < ?", (now,))
        conn.execute("DELETE FROM starts WHERE at < ?", (now - max(RATE_WINDOWS.values()),))

    async def beat(self, worker_id: str, info: Mapping[str, JSON], ttl: float) -> None:
        """Record a worker's heartbeat; every PRUNE_INTERVAL seconds, also prune the file."""
        now = time.time()
        upsert = "INSERT OR REPLACE INTO workers (id, info, expires_at) VALUES (?, ?, ?)"
        await self.db.write(_changed, upsert, worker_id, dumps(dict(info)), now + ttl)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            await self.db.write(self._prune, now)

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a worker's heartbeat at once."""
        await self.db.write(_changed, "DELETE FROM workers WHERE id = ?", worker_id)

    async def workers(self) -> list[dict[str, JSON]]:
        """The live workers: those whose heartbeat has not expired."""
        query = "SELECT info FROM workers WHERE expires_at > ?"
        return [loads(info) for (info,) in await self.db.read(_rows, query, time.time())]

    async def ping(self) -> None:
        """Raise unless the file answers."""
        await self.db.read(_rows, "SELECT 1")

    async def report(self) -> str:
        """How many tasks the file keeps and how many workers are alive."""
        [(kept,)] = await self.db.read(_rows, "SELECT COUNT(*) FROM tasks")
        return f"{kept} task(s) kept; {len(await self.workers())} live worker(s)"

    def describe(self) -> str:
        """``SQLite <file>``."""
        return f"SQLite {self.db.path}"

    async def close(self) -> None:
        """Close the file (shared with the queue; closing twice is harmless)."""
        await self.db.close()


def open_backend(cfg: Config, role: str) -> tuple[TaskQueue, TaskStore]:
    """The queue and the store the config names: RabbitMQ and Redis with their URLs, else the SQLite file."""
    if cfg.embedded_mode:
        # What makes a task durable is the API's commit. A worker's writes can skip the fsync: WAL
        # commits are ordered, so a power loss can only take back its latest steps, and a task whose
        # completion or ack is taken back is run again (at least once, as with RabbitMQ).
        db = Database(cfg, "normal" if role == "worker" else cfg.embedded.synchronous)
        return SqliteQueue(db, cfg, role), SqliteStore(db, cfg)
    return RabbitQueue(cfg, role), RedisStore(cfg.redis, cfg.queues)


# ============================================================================
# Services: what the roles and commands share
# ============================================================================
# Each role and command opens its backend here, stops on the event made here, retries under the one
# policy here, and acts on dead letters through the functions here; none calls into another's section.

#: Largest ``limit`` accepted by ``GET /api/tasks``.
MAX_LIST_LIMIT: Final = 1000
#: Most dead letters GET /api/dlq/groups reads and groups.
MAX_GROUPED: Final = 10_000
#: Seconds between two sweeps of the search index by the API (RedisStore.sweep_index).
SWEEP_INTERVAL: Final = 10.0

#: Attempts a worker makes to start consuming before it gives up (and supervisord restarts it).
START_ATTEMPTS: Final = 8
#: Seconds a worker keeps retrying a store write before it hands the task back to the queue.
STORE_PATIENCE: Final = 300.0
#: The one backoff policy of every retry and reconnect: exponential from 0.1 s up to 5 s, with full
#: jitter, so that many processes retrying at once spread out.
BACKOFF: Final = tenacity.wait_random_exponential(multiplier=0.1, max=5.0)


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the handlers only set it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@contextlib.asynccontextmanager
async def backend(cfg: Config, role: str) -> AsyncIterator[tuple[TaskQueue, TaskStore]]:
    """The task queue and the task store the config names (see open_backend), closed on the way out."""
    queue, store = open_backend(cfg, role)
    try:
        yield queue, store
    finally:
        await queue.close()
        await store.close()


# --- Logs and traces ---

#: The task the lines being logged concern, while a worker handles it: task_id, type, queue, attempt, trace_id.
TASK_LOG: Final[contextvars.ContextVar[Mapping[str, JSON] | None]] = contextvars.ContextVar("task_log", default=None)
#: The keys of a line in the JSON format, renamed from the LogRecord's attributes (then ts, and a task's fields).
JSON_LOG_KEYS: Final = {"levelname": "level", "name": "logger", "process": "pid", "message": "msg"}


class _TaskFields(logging.Filter):
    """Gives each line the fields of the task in hand (TASK_LOG), which the JSON format writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = TASK_LOG.get()
        if fields:
            for key, value in fields.items():
                if key not in record.__dict__:
                    setattr(record, key, value)
        return True


def configure_logging(fmt: str, level: str) -> None:
    """Log to stderr at ``level``, as text or as one JSON object per line (python-json-logger)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        names = " ".join(f"%({k})s" for k in JSON_LOG_KEYS)
        handler.setFormatter(JsonFormatter(names, rename_fields=dict(JSON_LOG_KEYS), timestamp="ts"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
    handler.addFilter(_TaskFields())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent``, or None."""
    found = TRACEPARENT.fullmatch(traceparent) if traceparent else None
    return found.group(1) if found else None


#: Variables of which one, set, turns OpenTelemetry's traces on (with the package installed: the ``otel`` extra).
OTEL_VARS: Final = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class Tracer:
    """OpenTelemetry as asyncnode uses it: spans whose context travels as a ``traceparent`` string (in the task's
    record and message). Made by setup_tracing only when traces are on; else nothing of OpenTelemetry is imported."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()
        self.tracer = trace.get_tracer("asyncnode", __version__)
        self.kinds = {"producer": trace.SpanKind.PRODUCER, "consumer": trace.SpanKind.CONSUMER}

    def start(self, name: str, parent: str | None, kind: str, **attributes: Any) -> tuple[Any, str | None]:
        """Start span ``name``, a child of the span ``parent`` names (a ``traceparent``; None: a new trace);
        return it with its own ``traceparent``."""
        context = self.propagator.extract({"traceparent": parent}) if parent else None
        span = self.tracer.start_span(name, context=context, kind=self.kinds[kind], attributes=attributes)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self.trace.set_span_in_context(span))
        return span, carrier.get("traceparent")

    def current(self, span: Any) -> contextlib.AbstractContextManager[Any]:
        """Make ``span`` the current one (a handler's own spans are its children), not ending it."""
        return cast(contextlib.AbstractContextManager[Any], self.trace.use_span(span, end_on_exit=False))

    def end(self, span: Any, error: str | None = None, **attributes: Any) -> None:
        """End ``span`` with more attributes, failed if ``error``."""
        span.set_attributes(attributes)
        if error is not None:
            span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, error))
        span.end()


#: The tracer, while traces are on in this process (setup_tracing).
TRACER: Tracer | None = None


def setup_tracing(role: str, env: Mapping[str, str] | None = None) -> None:
    """Turn traces on if OpenTelemetry is installed and one of OTEL_VARS is set (OTEL_SDK_DISABLED not true): with
    an SDK provider exporting as OTEL_TRACES_EXPORTER says (otlp, the default, console or none), unless one was set
    already (by a handler module, loaded before this), which is then kept."""
    global TRACER
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or not any(env.get(v) for v in OTEL_VARS):
        return
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning(
            "%s is set, but OpenTelemetry is not installed (pip install 'asyncnode[otel]'): no traces", OTEL_VARS[0]
        )
        return
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": f"asyncnode-{role}"}))
        for name in (n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
            exporter: SpanExporter
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
            elif name == "console":
                exporter = ConsoleSpanExporter()
            elif name == "none":
                continue
            else:
                raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    TRACER = Tracer()


class _StopWhenSet(tenacity.stop.stop_base):
    """Stop retrying once an asyncio event is set."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.event.is_set()


def retrying(
    errors: type[BaseException] | tuple[type[BaseException], ...],
    *,
    what: str,
    logger: logging.Logger,
    patience: float | None = None,
    attempts: int | None = None,
    stop: asyncio.Event | None = None,
) -> tenacity.AsyncRetrying:
    """Retry what raises ``errors`` under BACKOFF, logging each retry; the last error is raised after
    ``patience`` seconds, ``attempts`` tries, or once ``stop`` is set (which also cuts a pause short).

    Use: ``async for attempt in retrying(...): with attempt: await operation()``.
    """
    limits: list[tenacity.stop.stop_base] = []
    if patience is not None:
        limits.append(tenacity.stop_after_delay(patience))
    if attempts is not None:
        limits.append(tenacity.stop_after_attempt(attempts))
    if stop is not None:
        limits.append(_StopWhenSet(stop))

    async def pause(seconds: float) -> None:
        if stop is None:
            await asyncio.sleep(seconds)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

    def report(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s (%s); retrying in %.1f s", what, error or type(error).__name__, wait)

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(errors),
        wait=BACKOFF,
        stop=tenacity.stop_any(*limits) if limits else tenacity.stop_never,
        sleep=pause,
        before_sleep=report,
        reraise=True,
    )


#: Which dead letters an action takes: one by id, those of some ids, a fingerprint's group, or (None) all.
LetterChoice: TypeAlias = "str | frozenset[str] | Callable[[dict[str, JSON]], bool] | None"


def letters_wanted(choice: LetterChoice) -> Callable[[dict[str, JSON]], bool]:
    """The predicate a LetterChoice means, on a dead letter as dead_letter_info shows it."""
    if choice is None:
        return lambda item: True
    if isinstance(choice, str):
        return lambda item: item["id"] == choice
    if isinstance(choice, frozenset):
        return lambda item: item["id"] in choice
    return choice


async def requeue_dead_letters(
    queue: TaskQueue, store: TaskStore, cfg: Config, choice: LetterChoice, payload: JSON = None
) -> int:
    """Put the dead letters ``choice`` picks back on the queue each came from, as fresh tasks (on the default
    queue if config.toml no longer declares it); return how many. ``payload``: a corrected payload for them,
    validated as a submission of the letter's type (raise ValidationError, taking nothing: the letter stays)."""

    async def take(env: Envelope | None, item: dict[str, JSON]) -> None:
        if env is None:
            raise BrokerUnavailable(f"dead letter {item['id']!r} is not a task envelope; discard it instead")
        home = env.queue if env.queue in cfg.queues else DEFAULT_QUEUE
        if payload is not None:
            sub = validate_submission({"type": env.type, "payload": payload, "queue": home}, cfg)
            env = dataclasses.replace(env, payload=sub.payload)
        restore = {"created_at": env.created_at}  # should its record have expired meanwhile
        fields = {"payload": env.payload, "queue": home}
        change = plan_change("requeued", env.id, env.type, fields, tasks=cfg.tasks, restore=restore, queue=env.queue)
        await store.apply(change)
        await queue.publish(dataclasses.replace(env, created_at=env.created_at or change.at, queue=home))

    return await queue.take_dead_letters(letters_wanted(choice), take)


async def dead_letter_groups(queue: TaskQueue, limit: int) -> tuple[list[dict[str, JSON]], int, int]:
    """The first ``limit`` dead letters grouped by fingerprint, the largest group first: each with its
    ``fingerprint``, ``count``, ``pattern`` (error_pattern), an ``example`` letter, ``first_at`` and ``last_at``
    (when its letters first and last failed) and ``types``; with how many letters were read, and are in all."""
    items, total = await queue.dead_letters(limit)
    groups: dict[str, dict[str, Any]] = {}
    for item in items:
        error = cast(str | None, item.get("error"))
        group = groups.setdefault(
            fingerprint(error),
            {"fingerprint": fingerprint(error), "count": 0, "pattern": error_pattern(error), "example": item},
        )
        group["count"] += 1
        group.setdefault("types", set()).add(item.get("type") or "")
        times = [t for t in (item.get("first_failed_at"), item.get("failed_at")) if isinstance(t, int | float)]
        if times:
            group["first_at"] = min(group.get("first_at", math.inf), *times)
            group["last_at"] = max(group.get("last_at", -math.inf), *times)
    ordered = sorted(groups.values(), key=lambda g: (-g["count"], g["fingerprint"]))
    for group in ordered:
        group["types"] = sorted(group["types"])
        group.setdefault("first_at", None)
        group.setdefault("last_at", None)
    return ordered, len(items), total


#: What an ``Idempotency-Key`` may be: 1 to 200 printable ASCII characters.
IDEMPOTENCY_KEY: Final = re.compile(r"[\x20-\x7e]{1,200}")
#: Seconds between two looks at a key whose first request is still in flight.
KEY_POLL: Final = 0.02


def body_fingerprint(body: JSON) -> str:
    """What identifies a request body for its Idempotency-Key: the SHA-256 of its JSON with sorted keys."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


async def submit_task(
    broker: TaskQueue,
    store: TaskStore,
    cfg: Config,
    sub: Submission,
    fields: Mapping[str, JSON] | None = None,
    tid: str | None = None,
    traceparent: str | None = None,
) -> dict[str, JSON]:
    """Record a valid submission, then queue it durably (a confirmed publish), or hold it until its ``run_at``;
    return the 202's body. Raise Refused if it could not be (a task recorded first is then recorded rejected).
    ``fields``: more of the record (a schedule's name and slot). ``tid``: the task's id, made from what
    identifies it (a schedule's slot): the record is made only if there is none, atomically, so one id makes
    one task however often it is submitted; a task found still ``pending`` is published again (a submitter
    may have died between its record and its publish; a second copy of a task run is acknowledged unrun).
    ``traceparent``: the W3C trace context it is submitted in, kept in its record and message (with traces on,
    that of a ``submit`` span, its child)."""
    if TRACER is None:
        return await _submit_task(broker, store, cfg, sub, fields, tid, traceparent)
    span, traceparent = TRACER.start("submit", traceparent, "producer", **{"asyncnode.task.type": sub.type.name})
    try:
        body = await _submit_task(broker, store, cfg, sub, fields, tid, traceparent)
    except AsyncnodeError as e:
        TRACER.end(span, str(e))
        raise
    TRACER.end(span, **{"asyncnode.task.id": body["id"], "asyncnode.queue": sub.queue})
    return body


async def _submit_task(
    broker: TaskQueue,
    store: TaskStore,
    cfg: Config,
    sub: Submission,
    fields: Mapping[str, JSON] | None,
    tid: str | None,
    traceparent: str | None,
) -> dict[str, JSON]:
    ttype = sub.type.name
    record: dict[str, JSON] = {"payload": sub.payload, "queue": sub.queue, **(fields or {})}
    if sub.run_at is not None:
        record["run_at"] = sub.run_at
    if traceparent is not None:
        record["traceparent"] = traceparent
    event = "submitted" if sub.run_at is None else "scheduled"
    change = plan_change(event, tid or new_task_id(), ttype, record, tasks=cfg.tasks, queue=sub.queue)
    status = change.status
    if tid is not None:
        change.guard = NO_RECORD
    try:
        if await store.apply(change) is None:
            status = await store.status_of(change.tid) or status
            if status != "pending":
                return {"id": change.tid, "status": status, "queue": sub.queue}
    except STORE_ERRORS as e:
        raise Refused(f"{store.label} unavailable; nothing was queued, retry later") from e
    tid = change.tid
    env = Envelope(tid, ttype, sub.payload, sub.timeout, change.at, sub.queue, sub.run_at, traceparent)
    try:
        if sub.run_at is None:
            await broker.publish(env)
        else:
            await store.hold(env, sub.run_at)
    except (BrokerUnavailable, *STORE_ERRORS) as e:
        with contextlib.suppress(*STORE_ERRORS):
            await store.apply(plan_change("rejected", tid, ttype, {"error": str(e)}, tasks=cfg.tasks))
        raise Refused(f"task not queued: {e}; retry later", tid) from e
    body: dict[str, JSON] = {"id": tid, "status": status, "queue": sub.queue}
    if sub.run_at is not None:
        body["run_at"] = sub.run_at
    return body


async def submit_once(
    broker: TaskQueue,
    store: TaskStore,
    cfg: Config,
    sub: Submission,
    key: str,
    fingerprint: str,
    fields: Mapping[str, JSON] | None = None,
    traceparent: str | None = None,
) -> tuple[bool, dict[str, JSON]]:
    """Submit under an idempotency key: (True, the 202's body) for its first request, (False, that same body)
    for each later one within ``[api] idempotency_ttl``; KeyConflict for another body, KeyBusy if the first is
    still being made after the longest it can take, Refused (the key is then free again) if it was not queued.

    The key is claimed in the store before anything is made, so requests racing each other, on any API
    process, make one task: the others wait for the first one's answer (polled: no event spans processes)."""
    # Longest the first request can take: a store write that waits out the file's lock, then a publish.
    hold = SQLITE_BUSY_TIMEOUT + cfg.broker.connect_timeout + cfg.broker.publish_timeout + 5.0
    deadline = time.monotonic() + hold
    while True:
        try:
            entry = await store.claim_key(key, fingerprint, hold)
        except STORE_ERRORS as e:
            raise Refused(f"{store.label} unavailable; nothing was queued, retry later") from e
        if entry is None:
            break
        if entry.get("fp") != fingerprint:
            raise KeyConflict(f"Idempotency-Key {key!r} was already used with a different request body")
        if isinstance(response := entry.get("response"), dict):
            return False, response
        if time.monotonic() >= deadline:
            raise KeyBusy(f"the first request with Idempotency-Key {key!r} is still being made; retry later")
        await asyncio.sleep(KEY_POLL)
    try:
        body = await submit_task(broker, store, cfg, sub, fields, traceparent=traceparent)
    except BaseException:
        with contextlib.suppress(*STORE_ERRORS):
            await store.release_key(key)
        raise
    try:
        await store.settle_key(key, fingerprint, body, cfg.api.idempotency_ttl)
    except STORE_ERRORS as e:  # the claim still answers "in flight" until it expires; then the key is free
        log.warning("Idempotency-Key %r of task %s not kept: %s", key, body["id"], e)
    return True, body


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One valid submission of a bulk submit, with its Idempotency-Key (if any) and what identifies its body."""

    sub: Submission
    key: str | None = None
    fingerprint: str = ""


def validate_batch(items: JSON, cfg: Config, now: float | None = None) -> list[BatchItem]:
    """Check every submission of a bulk submit (a ``POST /api/tasks`` array) before any is made: ValidationError
    naming the ``index`` (and the field) of the first invalid one."""
    if not isinstance(items, list) or not items:
        raise ValidationError("a bulk submit is a non-empty JSON array of submissions")
    if len(items) > cfg.api.max_batch:
        raise ValidationError(f"at most {cfg.api.max_batch} submissions in one request ([api] max_batch)")
    now = time.time() if now is None else now
    valid = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise ValidationError("each submission must be a JSON object")
            body = {k: v for k, v in item.items() if k != "idempotency_key"}
            key = item.get("idempotency_key")
            if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key)):
                raise ValidationError(
                    "'idempotency_key' must be 1 to 200 printable ASCII characters", "idempotency_key"
                )
            sub = validate_submission(body, cfg, now)
        except ValidationError as e:
            raise ValidationError(f"submission {i}: {e}", e.field, i) from None
        valid.append(BatchItem(sub, key, body_fingerprint(body) if key is not None else ""))
    return valid


async def submit_batch(
    broker: TaskQueue, store: TaskStore, cfg: Config, items: Iterable[BatchItem], traceparent: str | None = None
) -> list[dict[str, JSON]]:
    """Submit valid submissions together (their store writes pipelined, their publishes confirmed together); return
    each one's answer in order: as submit_task's or submit_once's, or ``{"status": "rejected", "error"}`` (and its
    ``id``, if it was recorded) for one not queued, or ``{"status": "conflict", "error", "key"}`` for a key already
    used with another body or still being used. Never raises for one item: the others are made regardless."""

    async def one(item: BatchItem) -> dict[str, JSON]:
        try:
            if item.key is None:
                return await submit_task(broker, store, cfg, item.sub, traceparent=traceparent)
            _, body = await submit_once(
                broker, store, cfg, item.sub, item.key, item.fingerprint, traceparent=traceparent
            )
            return body
        except Refused as e:
            return {"status": "rejected", "error": str(e), **({"id": e.tid} if e.tid else {})}
        except Conflict as e:
            return {"status": "conflict", "error": str(e), "key": item.key}

    return list(await asyncio.gather(*map(one, items)))


async def cancel_task(
    store: TaskStore, cfg: Config, tid: str, by: Mapping[str, JSON], rec: Mapping[str, JSON] | None = None
) -> tuple[bool, str | None]:
    """Cancel task ``tid`` wherever it is: (True, "cancelled") if this call did; else (False, its status), or
    (False, None) for no such task. ``by``: who (``cancelled_by`` and the client's details), kept in its record;
    ``rec``: its record, if just read (it is read again only should it have changed meanwhile).

    The record says ``cancelled`` at once, durably: no worker starts it from then on (a delivery of it is
    acknowledged unrun), and the worker running it, on any host, stops it within a second (Worker.watch)."""
    for _ in range(3):  # it may change between the read and the guarded write (started, finished)
        rec = rec or await store.get(tid)
        status = rec.get("status") if rec is not None else None
        if rec is None or not status:
            return False, None
        if status not in CANCELLABLE:
            return False, str(status)
        queue, tally = str(rec.get("queue") or DEFAULT_QUEUE), len(cfg.queues) > 1
        change = plan_change("cancelled", tid, str(rec.get("type")), by, tasks=cfg.tasks, queue=queue, tally=tally)
        if await store.apply(change) is not None:
            await store.promoted([tid])  # a held (delayed) task is dropped; the file drops a waiting message too
            return True, "cancelled"
        rec = None
    return False, await store.status_of(tid)


#: Longest pause between two ticks of a process that holds the scheduler lease or tries to take it.
SCHEDULER_TICK: Final = 0.5
#: Seconds between a holder's sweeps for the state of schedules no longer in its config.toml.
SCHEDULE_SWEEP: Final = 30.0


#: The namespace of the task ids made from a schedule's slot (UUID version 5).
SLOT_IDS: Final = uuid.UUID("4d3b2a10-7c1e-5f6a-9b8c-0d1e2f3a4b5c")


def schedule_submission(cfg: Config, sch: ScheduleConfig) -> Submission:
    """What a schedule submits."""
    ttype = REGISTRY[sch.type]
    payload = validate_payload(ttype, sch.payload or {}, cfg)
    return Submission(ttype, payload, None, sch.queue or queue_of(cfg, ttype))


def slot_task_id(cfg: Config, name: str, slot: float) -> str:
    """The id of the task of a schedule's slot: its idempotency key, ``schedule:<name>:<slot>`` of this
    deployment, as a UUID (version 5), so that every holder that fires the slot names the same task."""
    return str(uuid.uuid5(SLOT_IDS, f"{cfg.redis.key_prefix}|{cfg.database}|schedule:{name}:{slot!r}"))


async def fire_due(broker: TaskQueue, store: TaskStore, cfg: Config, fence: int, now: float) -> int:
    """As the holder of the scheduler lease (its fencing value ``fence``), fire each schedule's slots due at
    ``now`` (see slots_to_fire); return how many tasks were submitted. A slot's task has the id its key
    ``schedule:<name>:<slot>`` makes (slot_task_id), recorded only if absent, so a slot makes one task whichever
    holder fires it and however often; the progress is written fenced, so a holder that lost its lease writes
    nothing. Raise LeaseLost then."""
    states = await store.schedule_states(cfg.schedules)
    fired = 0
    for name, sch in cfg.schedules.items():
        state = states.get(name, {})
        if state.get("paused"):
            continue
        last = state.get("last_slot")
        if not isinstance(last, int | float):  # new: it starts from now
            if not await store.save_schedule(name, {"last_slot": now}, fence):
                raise LeaseLost("the scheduler lease was taken over")
            continue
        slots, handled = slots_to_fire(sch, float(last), now)
        if handled == last:
            continue
        fields: dict[str, JSON] = {"last_slot": handled}
        for slot in slots:
            sub, tid = schedule_submission(cfg, sch), slot_task_id(cfg, name, slot)
            body = await submit_task(broker, store, cfg, sub, {"schedule": name, "slot": slot}, tid=tid)
            fields |= {"last_task_id": body["id"], "last_run_at": now}
            fired += 1
        if not await store.save_schedule(name, fields, fence):
            raise LeaseLost("the scheduler lease was taken over")
    return fired


async def run_scheduler(broker: TaskQueue, store: TaskStore, cfg: Config, owner: str, stop: asyncio.Event) -> None:
    """Compete for the scheduler lease until ``stop``; while holding it, fire the schedules' slots as they fall
    due (within SCHEDULER_TICK), and drop the state of schedules no longer in config.toml. Every API and worker
    process runs this when config.toml has schedules: whichever dies, another takes over within the lease's TTL."""
    slog = log.getChild("scheduler")
    fence: int | None = None
    ttl = cfg.scheduler.lease_ttl
    next_sweep = 0.0
    while not stop.is_set():
        wait = min(SCHEDULER_TICK, ttl / 4)
        try:
            held = await store.lease(SCHEDULER_LEASE, owner, ttl)
            if held != fence:
                if held is not None:
                    slog.info("holding the scheduler lease (fence %d): firing %d schedule(s)", held, len(cfg.schedules))
                    next_sweep = 0.0
                elif fence is not None:
                    slog.warning("lost the scheduler lease (fence %d)", fence)
                fence = held
            if fence is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SCHEDULE_SWEEP
                dropped = await store.forget_schedules(cfg.schedules)
                if dropped:
                    slog.info("dropped the state of schedule(s) no longer in config.toml: %s", ", ".join(dropped))
            if fence is not None:
                await fire_due(broker, store, cfg, fence, time.time())
                now = time.time()
                upcoming = [next_slot(sch, now) for sch in cfg.schedules.values()]
                wait = min(wait, max(min(upcoming) - now, 0.0) + 0.002)  # timers may wake a little early
        except LeaseLost as e:
            slog.warning("%s (fence %s)", e, fence)
            fence = None
        except (*STORE_ERRORS, BrokerUnavailable, Refused) as e:
            slog.warning("schedules not fired now: %s", e)
        except Exception:  # a bug must not end this process's part in the lease silently
            slog.exception("the scheduler failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
    if fence is not None:  # stopping cleanly: another process takes over at its next tick, not after the TTL
        with contextlib.suppress(*STORE_ERRORS):
            await store.release_lease(SCHEDULER_LEASE, owner)
            slog.info("gave up the scheduler lease")


async def schedule_items(store: TaskStore, cfg: Config, now: float | None = None) -> list[dict[str, JSON]]:
    """Each schedule as ``GET /api/schedules`` and ``schedules list`` show it."""
    now = time.time() if now is None else now
    states = await store.schedule_states(cfg.schedules)
    last_ids = [str(st["last_task_id"]) for st in states.values() if st.get("last_task_id")]
    statuses = await store.statuses(last_ids) if last_ids else {}
    items = []
    for name, sch in cfg.schedules.items():
        state = states.get(name, {})
        paused = bool(state.get("paused"))
        last = state.get("last_slot")
        start = float(last) if isinstance(last, int | float) else now
        last_id = state.get("last_task_id")
        items.append(
            {
                "name": name,
                "type": sch.type,
                "cron": sch.cron or None,
                "every": sch.every,
                "timezone": sch.timezone,
                "queue": sch.queue or queue_of(cfg, REGISTRY[sch.type]) if sch.type in REGISTRY else sch.queue,
                "paused": paused,
                "next_run_at": None if paused else next_slot(sch, start),
                "last_run_at": state.get("last_run_at"),
                "last_task_id": last_id,
                "last_status": statuses.get(str(last_id)) if last_id else None,
            }
        )
    return items


async def set_schedule_paused(store: TaskStore, name: str, paused: bool) -> None:
    """Pause a schedule (nothing fires from the holder's next tick on), or resume a paused one from now on (the
    slots of the pause are not caught up; resuming one not paused changes nothing)."""
    if paused:
        await store.save_schedule(name, {"paused": True}, None)
    elif (await store.schedule_states([name])).get(name, {}).get("paused"):
        await store.save_schedule(name, {"paused": False, "last_slot": time.time()}, None)


async def run_schedule_now(broker: TaskQueue, store: TaskStore, cfg: Config, name: str) -> dict[str, JSON]:
    """Fire one task of schedule ``name`` now, outside its slots; it becomes the schedule's last task."""
    body = await submit_task(broker, store, cfg, schedule_submission(cfg, cfg.schedules[name]), {"schedule": name})
    await store.save_schedule(name, {"last_task_id": body["id"], "last_run_at": time.time()}, None)
    return body


async def discard_dead_letters(queue: TaskQueue, choice: LetterChoice) -> int:
    """Drop the dead letters ``choice`` picks (their tasks stay ``failed``); return how many were dropped."""

    async def take(env: Envelope | None, item: dict[str, JSON]) -> None:
        return None

    return await queue.take_dead_letters(letters_wanted(choice), take)


# ============================================================================
# API surface: the metrics exposition and the OpenAPI document (pure: what the API answers them with)
# ============================================================================


#: The API's document for people: a page without data (it reads the document with the token it is given).
DOCS_PAGE: Final = "/api/docs"


def metrics_text(
    values: Mapping[str, float],
    queues: Iterable[Mapping[str, JSON]],
    dead: tuple[str, int] | None,
    workers: Iterable[Mapping[str, JSON]],
    schedules: Iterable[Mapping[str, JSON]],
) -> bytes:
    """The Prometheus exposition of the deployment's metrics (the store's, as metric_ops names them), its queues
    (queue_items), its dead letters (the dead-letter queue's name and depth), live workers and schedules."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

    tasks = CounterMetricFamily(
        "asyncnode_tasks", "Tasks that reached each final status, and retries", labels=("type", "queue", "status")
    )
    submitted = CounterMetricFamily("asyncnode_tasks_submitted", "Tasks submitted", labels=("type", "queue"))
    runs: dict[tuple[str, ...], list[float]] = {}  # (type, queue) -> counts by bucket, then the sum
    waits: dict[tuple[str, ...], list[float]] = {}  # (queue,) -> the same
    for name, value in sorted(values.items()):
        kind, *labels = name.split(METRIC_SEP)
        if kind == "S":
            submitted.add_metric(labels, value)
        elif kind == "T":
            tasks.add_metric(labels, value)
        elif kind in ("D", "W") and labels[-1].isdigit() and int(labels[-1]) <= len(METRIC_BUCKETS):
            table = runs if kind == "D" else waits
            table.setdefault(tuple(labels[:-1]), [0.0] * (len(METRIC_BUCKETS) + 2))[int(labels[-1])] += value
        elif kind in ("Ds", "Ws"):
            (runs if kind == "Ds" else waits).setdefault(tuple(labels), [0.0] * (len(METRIC_BUCKETS) + 2))[-1] = value
    duration = HistogramMetricFamily(
        "asyncnode_task_duration_seconds", "Run time of completed tasks", labels=("type", "queue")
    )
    wait = HistogramMetricFamily("asyncnode_task_wait_seconds", "Time from due to first start", labels=("queue",))
    for family, table in ((duration, runs), (wait, waits)):
        for key, counts in table.items():
            bounds = [*(f"{b:g}" for b in METRIC_BUCKETS), "+Inf"]
            cumulative = list(itertools.accumulate(counts[:-1]))
            family.add_metric(list(key), list(zip(bounds, cumulative, strict=True)), counts[-1])
    depth = GaugeMetricFamily("asyncnode_queue_tasks", "Tasks in each queue by state", labels=("queue", "state"))
    paused = GaugeMetricFamily("asyncnode_queue_paused", "1 while a queue is paused", labels=("queue",))
    for q in queues:
        for state in ("ready", "running", "scheduled"):
            if isinstance(n := q.get(state), int):
                depth.add_metric([str(q["name"]), state], n)
        paused.add_metric([str(q["name"])], 1 if q.get("paused") else 0)
    if dead is not None:
        depth.add_metric([dead[0], "dead"], dead[1])
    live = GaugeMetricFamily("asyncnode_workers", "Live worker processes", labels=("host", "instance"))
    for (host, instance), n in collections.Counter(
        (str(w.get("host")), str(w.get("instance"))) for w in workers
    ).items():
        live.add_metric([host, instance], n)
    last = GaugeMetricFamily(
        "asyncnode_schedule_last_run_timestamp_seconds", "When each schedule last fired", labels=("schedule",)
    )
    for sch in schedules:
        if isinstance(at := sch.get("last_run_at"), int | float):
            last.add_metric([str(sch["name"])], at)
    families: list[Metric] = [tasks, submitted, duration, wait, depth, paused, live, last]

    class Snapshot:
        def collect(self) -> list[Metric]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


def _field_schema(f: Field, max_text: int) -> dict[str, JSON]:
    """A payload field's JSON Schema, as validate_payload checks it."""
    schema: dict[str, JSON] = {"type": f.type, "description": f.description}
    if f.type == "string":
        schema["maxLength"] = min(f.max_length or max_text, max_text)
        if f.format:
            schema["format"] = f.format
    if f.min is not None:
        schema["minimum"] = f.min
    if f.max is not None:
        schema["maximum"] = f.max
    if f.default is not None:
        schema["default"] = f.default
    return schema


def _obj(required: Iterable[str] = (), **properties: JSON) -> dict[str, JSON]:
    """An object schema (more properties allowed: answers grow)."""
    return {"type": "object", "required": list(required), "properties": properties}


def _ref(name: str) -> dict[str, JSON]:
    return {"$ref": f"#/components/schemas/{name}"}


#: Answers every /api route may give: a wrong or missing token, a cross-site or read-token change, the store away.
_API_ERRORS: Final = {
    "401": "missing or wrong token (with [api] token set)",
    "403": "a change from another site's page, or by the read-only token",
}


def openapi_document(cfg: Config) -> dict[str, JSON]:
    """The OpenAPI 3.1 document of every route, each task type's payload schema generated from its fields."""
    types = sorted(REGISTRY.values(), key=lambda t: t.name)
    schemas: dict[str, JSON] = {
        "Error": _obj(
            ["error"],
            error={"type": "string"},
            field={"type": "string"},
            index={"type": "integer"},
            id={"type": ["string", "null"]},
            status={"type": ["string", "null"]},
            key={"type": "string"},
        ),
        "Accepted": _obj(
            ["id", "status", "queue"],
            id={"type": "string"},
            status={"type": "string"},
            queue={"type": "string"},
            run_at={"type": "number"},
        ),
        "Task": _obj(
            ["id", "status"],
            id={"type": "string"},
            type={"type": ["string", "null"]},
            queue={"type": ["string", "null"]},
            status={"type": ["string", "null"]},
            payload={},
            result={},
            error={"type": ["string", "null"]},
            attempts={"type": "integer"},
            created_at={"type": ["number", "null"]},
            started_at={"type": ["number", "null"]},
            finished_at={"type": ["number", "null"]},
            run_at={"type": ["number", "null"]},
            traceparent={"type": "string"},
            history={"type": "array", "items": {"type": "object"}},
        ),
        "Items": _obj(["items"], items={"type": "array", "items": {"type": "object"}}),
        "Page": _obj(
            ["items", "next", "total"],
            items={"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
            next={"type": ["string", "null"], "description": "the cursor of the next page (null: this is the last)"},
            total={"type": "integer", "description": "how many tasks match"},
        ),
        "Filter": {
            "type": "object",
            "additionalProperties": False,
            "description": "which tasks: each part given must hold (as GET /api/tasks takes them)",
            "properties": {
                "q": {"type": "string", "maxLength": MAX_QUERY},
                "status": {"type": "string", "enum": list(STATUSES)},
                "type": {"type": "string", "maxLength": MAX_NAME},
                "queue": {"type": "string", "enum": list(cfg.queues)},
                "schedule": {"type": "string", "maxLength": MAX_NAME},
                "since": {"type": ["string", "number"]},
                "until": {"type": ["string", "number"]},
            },
        },
        "DeadLetterGroup": _obj(
            ["fingerprint", "count", "pattern", "example", "first_at", "last_at", "types"],
            fingerprint={"type": "string"},
            count={"type": "integer"},
            pattern={"type": "string"},
            example={"type": "object"},
            first_at={"type": ["number", "null"]},
            last_at={"type": ["number", "null"]},
            types={"type": "array", "items": {"type": "string"}},
        ),
    }
    variants = []
    for t in types:
        fields = {f.name: _field_schema(f, cfg.api.max_text) for f in t.fields}
        required = [f.name for f in t.fields if f.required]
        payload = {"type": "object", "properties": fields, "required": required, "additionalProperties": False}
        name = "Submission_" + re.sub(r"[^A-Za-z0-9_.-]", "_", t.name)
        schemas[name] = {
            "type": "object",
            "description": t.description,
            "required": ["type"],
            "additionalProperties": False,
            "properties": {
                "type": {"const": t.name},
                "payload": payload,
                "queue": {"type": "string", "enum": list(cfg.queues)},
                "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": cfg.broker.task_timeout},
                "delay": {"type": "number", "minimum": 0, "maximum": cfg.broker.max_delay},
                "run_at": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]},
            },
        }
        # A bulk submit's item: the same, with its own Idempotency-Key (which a single submission takes as a header).
        item = copy.deepcopy(schemas[name])
        item["properties"]["idempotency_key"] = {"type": "string", "minLength": 1, "maxLength": 200}
        schemas["BulkItem_" + name.removeprefix("Submission_")] = item
        variants.append(name)
    for kind, prefix in (("Submission", "Submission_"), ("BulkItem", "BulkItem_")):
        names = [prefix + v.removeprefix("Submission_") for v in variants]
        schemas[kind] = {
            "oneOf": [_ref(n) for n in names],
            "discriminator": {
                "propertyName": "type",
                "mapping": {t.name: f"#/components/schemas/{n}" for t, n in zip(types, names, strict=True)},
            },
        }

    def op(
        summary: str,
        answers: Mapping[str, Any],
        *,
        body: JSON = None,
        params: Iterable[JSON] = (),
        secure: bool = True,
        kind: str = "application/json",
        optional: bool = False,
    ) -> dict[str, JSON]:
        responses: dict[str, JSON] = {}
        for code, answer in {**answers, **(_API_ERRORS if secure else {})}.items():
            text, schema = (answer, _ref("Error")) if isinstance(answer, str) else answer
            media = kind if code.startswith("2") else "application/json"
            responses[code] = {"description": text, "content": {media: {"schema": schema}}}
        operation: dict[str, JSON] = {"summary": summary, "responses": responses}
        if params:
            operation["parameters"] = list(params)
        if body is not None:
            operation["requestBody"] = {"required": not optional, "content": {"application/json": {"schema": body}}}
        if not secure:
            operation["security"] = []
        return operation

    def path_param(name: str, known: Iterable[str] = ()) -> JSON:
        schema: dict[str, JSON] = {"type": "string"}
        if known := list(known):
            schema["examples"] = known  # the declared names: the fuzzer reaches them
        return {"name": name, "in": "path", "required": True, "schema": schema}

    def query(name: str, schema: JSON, text: str) -> JSON:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}

    limit = query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}, "most items to list")
    queue_q = query("queue", {"type": "string", "enum": list(cfg.queues)}, "one declared queue only (else 400)")
    tid = path_param("id")
    items = ("a list", _ref("Items"))
    away = {"503": "the store or the queue is unavailable: nothing was done"}
    html = ("an HTML page", {"type": "string"})
    bulk = {"type": "array", "minItems": 1, "maxItems": cfg.api.max_batch, "items": _ref("BulkItem")}
    submit_headers = [
        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 200}},
        {"name": "traceparent", "in": "header", "required": False, "schema": {"type": "string"}},
    ]
    named = {"name": {"type": "string"}, "paused": {"type": "boolean"}}
    text = {"type": "string"}
    search = [
        query("q", {"type": "string", "maxLength": MAX_QUERY}, "words of the id, payload, result or error (all)"),
        query("status", {"type": "string", "enum": list(STATUSES)}, "in this status"),
        query("type", {"type": "string", "maxLength": MAX_NAME}, "of this task type"),
        queue_q,
        query("schedule", {"type": "string", "maxLength": MAX_NAME}, "fired by this schedule"),
        query("since", text, "created at or after (RFC 3339 with a zone, or epoch seconds)"),
        query("until", text, "created at or before (RFC 3339 with a zone, or epoch seconds)"),
        limit,
        query("cursor", text, "the 'next' of the page before"),
    ]
    ids = {"type": "array", "minItems": 1, "maxItems": MAX_LIST_LIMIT, "items": {"type": "string"}}
    by_ids, by_filter = _obj(["ids"], ids=ids), _obj(["filter"], filter=_ref("Filter"))
    by_fingerprint = _obj(["fingerprint"], fingerprint={"type": "string", "pattern": "^[0-9a-f]{12}$"})
    for shape in (by_ids, by_filter, by_fingerprint):
        shape["additionalProperties"] = False
    letters = {"oneOf": [by_ids, by_filter, by_fingerprint]}

    def counts(acted: str) -> tuple[str, JSON]:
        return "how many were acted on and skipped", _obj(
            [acted, "skipped"], **{acted: {"type": "integer"}, "skipped": {"type": "integer"}}
        )

    bulk_errors = {"400": "invalid: nothing was done", "413": "body too large", "415": "not application/json"}
    paths: dict[str, JSON] = {
        "/": {"get": op("the dashboard", {"200": html}, secure=False, kind="text/html")},
        DOCS_PAGE: {"get": op("this document for people", {"200": html}, secure=False, kind="text/html")},
        "/api/openapi.json": {"get": op("this document", {"200": ("the OpenAPI document", {"type": "object"})})},
        "/api/access": {
            "get": op(
                "what the token may do",
                {"200": ("its access", _obj(["access"], access={"enum": ["operator", "read", "open"]}))},
            )
        },
        "/api/task-types": {"get": op("the task types and their fields", {"200": items})},
        "/api/tasks": {
            "post": op(
                "submit a task, or an array of them (a bulk submit, all validated first)",
                {
                    "202": ("accepted", {"oneOf": [_ref("Accepted"), _ref("Items")]}),
                    "200": ("an Idempotency-Key's earlier answer", _ref("Accepted")),
                    "400": "invalid: the field (and, in a bulk submit, the index) at fault; nothing was made",
                    "409": "the first request with this Idempotency-Key is still being made",
                    "413": "body too large",
                    "415": "not application/json",
                    "422": "this Idempotency-Key was used with another body",
                    **away,
                },
                body={"oneOf": [_ref("Submission"), bulk]},
                params=submit_headers,
            ),
            "get": op(
                "search the retained tasks, newest first, a page at a time",
                {"200": ("a page", _ref("Page")), "400": "a bad parameter (named in 'field')", **away},
                params=search,
            ),
        },
        "/api/tasks/{id}": {
            "get": op(
                "one task, with its history",
                {"200": ("the task", _ref("Task")), "404": "no such task", **away},
                params=[tid],
            )
        },
        "/api/tasks/cancel": {
            "post": op(
                "cancel tasks by id, or every one a filter matches (the old form: status, type, queue at the top)",
                {"200": counts("cancelled"), **bulk_errors, **away},
                body={"oneOf": [by_ids, by_filter, _ref("Filter")]},
            )
        },
        "/api/tasks/delete": {
            "post": op(
                "delete finished tasks by id, or every finished one a filter matches",
                {"200": counts("deleted"), **bulk_errors, **away},
                body={"oneOf": [by_ids, by_filter]},
            )
        },
        "/api/tasks/{id}/cancel": {
            "post": op(
                "cancel one task",
                {
                    "200": ("cancelled", _obj(["id", "status"])),
                    "404": "no such task",
                    "409": "already finished",
                    **away,
                },
                params=[tid],
            )
        },
        "/api/workers": {"get": op("the live workers", {"200": items, **away})},
        "/api/queues": {"get": op("every declared queue and its figures", {"200": items, **away})},
        "/api/dlq": {
            "get": op(
                "the dead letters",
                {
                    "200": (
                        "dead letters",
                        _obj(["items", "total"], items={"type": "array"}, total={"type": "integer"}),
                    ),
                    "400": "a bad limit",
                    **away,
                },
                params=[limit],
            )
        },
        "/api/dlq/groups": {
            "get": op(
                "the dead letters grouped by fingerprint, the largest group first",
                {
                    "200": (
                        "groups",
                        _obj(
                            ["groups", "read", "total"],
                            groups={"type": "array", "items": _ref("DeadLetterGroup")},
                            read={"type": "integer"},
                            total={"type": "integer"},
                        ),
                    ),
                    "400": "a bad limit",
                    **away,
                },
                params=[query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_GROUPED}, "most to read")],
            )
        },
        "/api/dlq/requeue": {
            "post": op(
                "requeue dead letters: by id, a fingerprint's group, the tasks a filter matches; no body: all",
                {"200": counts("requeued"), **bulk_errors, **away},
                body=letters,
                optional=True,
            )
        },
        "/api/dlq/discard": {
            "post": op(
                "discard dead letters (their tasks stay failed): as requeue picks them; no body: all",
                {"200": counts("discarded"), **bulk_errors, **away},
                body=letters,
                optional=True,
            )
        },
        "/api/dlq/{id}/requeue": {
            "post": op(
                "requeue one dead letter, with a corrected payload if given (validated as a submission)",
                {
                    "200": counts("requeued"),
                    "400": "the corrected payload is invalid (the letter stays)",
                    "404": "no such dead letter",
                    **away,
                },
                params=[tid],
                body=_obj(["payload"], payload={"type": "object"}) | {"additionalProperties": False},
                optional=True,
            )
        },
        "/api/dlq/{id}": {
            "delete": op(
                "discard one dead letter",
                {"200": ("how many", _obj(["discarded"])), "404": "no such dead letter", **away},
                params=[tid],
            )
        },
        "/api/schedules": {"get": op("the schedules", {"200": items, **away})},
        "/metrics": {
            "get": op(
                "Prometheus metrics of the whole deployment (the operator, read or metrics token)",
                {"200": ("Prometheus text", {"type": "string"}), **away},
                kind="text/plain; version=0.0.4; charset=utf-8",
            )
        },
        "/healthz": {"get": op("200 while the process runs", {"200": ("ok", {"type": "object"})}, secure=False)},
        "/readyz": {
            "get": op(
                "200 when the queue and the store answer",
                {"200": ("ready", {"type": "object"}), "503": "not ready"},
                secure=False,
            )
        },
        "/ws": {
            "get": op(
                "the WebSocket of updates (a GET with Upgrade: websocket)",
                {"101": ("switching protocols", {"type": "string"}), "400": "not a WebSocket request"},
            )
        },
    }
    for action in ("pause", "resume"):
        paths[f"/api/queues/{{name}}/{action}"] = {
            "post": op(
                f"{action} a queue on every host",
                {"200": ("its state", _obj(["name", "paused"], **named)), "404": "no such queue", **away},
                params=[path_param("name", cfg.queues)],
            )
        }
    for action in ("pause", "resume", "run"):
        answer = (
            ("the task made", _ref("Accepted")) if action == "run" else ("its state", _obj(["name", "paused"], **named))
        )
        paths[f"/api/schedules/{{name}}/{action}"] = {
            "post": op(
                f"{action} a schedule" + (" now" if action == "run" else ""),
                {"202" if action == "run" else "200": answer, "404": "no such schedule", **away},
                params=[path_param("name", cfg.schedules)],
            )
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "asyncnode",
            "version": __version__,
            "description": "Background task processing across hosts.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "[api] token (everything), read_token (the GETs), metrics_token (/metrics)",
                }
            },
        },
    }


# ============================================================================
# Role: api
# ============================================================================
# Past 800 lines for a reason: every route's handler, the middlewares that guard them, and the WebSocket hub
# with its relay are one surface, each rule of which (a token, an origin, a 4xx) has its home here.

#: Seconds between the ``stats`` messages the API sends its WebSocket clients.
STATS_INTERVAL: Final = 1.0
#: Seconds the API gathers updates before sending them, one frame per client (fewer, larger frames).
WS_FLUSH_INTERVAL: Final = 0.02
#: Updates a WebSocket client may have queued before it counts as too slow and is dropped.
WS_CLIENT_BUFFER: Final = 10_000
#: Largest message a WebSocket client may send (it only ever sends small control messages).
WS_MAX_MESSAGE: Final = 64 * 1024
#: Seconds between WebSocket pings; a client that misses a pong is dropped.
WS_HEARTBEAT: Final = 30.0
#: Seconds a new WebSocket client waits for the relay to follow the store before taking its snapshot anyway.
RELAY_START_TIMEOUT: Final = 5.0
#: How many recent tasks a (re)connecting WebSocket client is sent.
SNAPSHOT_SIZE: Final = 200

# The application's keys, made with aiohttp by the first make_app (see _LazyModule).
CFG_KEY: web.AppKey[Config]
STATE_KEY: web.AppKey[TaskStore]
BROKER_KEY: web.AppKey[TaskQueue]
HUB_KEY: web.AppKey[UpdateHub]
RATES_KEY: web.AppKey[QueueRates]


def _make_app_keys() -> None:
    global CFG_KEY, STATE_KEY, BROKER_KEY, HUB_KEY, RATES_KEY
    if "CFG_KEY" not in globals():
        CFG_KEY, STATE_KEY = web.AppKey("cfg", Config), web.AppKey("state", TaskStore)
        BROKER_KEY, HUB_KEY = web.AppKey("broker", TaskQueue), web.AppKey("hub", UpdateHub)
        RATES_KEY = web.AppKey("rates", QueueRates)


class WsClient:
    """One connected WebSocket client: its subscription, and the frames queued for it (bounded)."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.pending: list[str] = []  # updates for a filtered subscription, framed at the next flush
        self.frames: list[tuple[bytes, int]] = []  # a frame, and how many updates it carries
        self.backlog = 0  # updates queued in frames not sent yet
        self.wake = asyncio.Event()
        self.subscription: Subscription = Subscription()

    def queue(self, frame: bytes, updates: int) -> None:
        """Queue a frame carrying ``updates`` updates for the send loop."""
        self.frames.append((frame, updates))
        self.backlog += updates
        self.wake.set()

    async def send_loop(self) -> None:
        """Send the queued frames, until the socket closes."""
        while not self.ws.closed:
            await self.wake.wait()
            self.wake.clear()
            frames, self.frames = self.frames, []
            for frame, updates in frames:
                await self.ws.send_frame(frame, web.WSMsgType.TEXT)
                self.backlog -= updates


class UpdateHub:
    """Fans updates out to every WebSocket client, every WS_FLUSH_INTERVAL, as one frame of all of them.

    The frame for the clients that want everything is built and encoded once and shared; a client too
    slow to keep up is dropped. Nothing here ever awaits a client.
    """

    def __init__(self) -> None:
        self.clients: set[WsClient] = set()
        self.wanted = asyncio.Event()  # a client joined: the relay follows the store until none is left
        self.live = asyncio.Event()  # the relay follows the store
        self._shared: list[str] = []
        self._flush: asyncio.TimerHandle | None = None

    def join(self, client: WsClient) -> None:
        """Add a client; the relay starts following the store if it was not."""
        self.clients.add(client)
        self.wanted.set()

    def broadcast(self, message: str) -> None:
        """Queue ``message`` for every client that wants it."""
        if not self.clients:
            return
        update: dict[str, Any] | None = None
        for client in self.clients:
            if not client.subscription.everything:
                # Only clients watching some tasks pay for reading the update.
                update = update if update is not None else loads(message)
                if client.subscription.wants(update):
                    client.pending.append(message)
        self._shared.append(message)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(WS_FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Send what was queued since the last flush: one frame per client."""
        self._flush = None
        shared, self._shared = self._shared, []
        frame = batch_frame(shared).encode()
        for client in list(self.clients):
            if client.backlog >= WS_CLIENT_BUFFER and client.ws.prepared:  # not yet: still joining
                log.getChild("api").warning("dropping a WebSocket client that is %d updates behind", client.backlog)
                self.clients.discard(client)
                asyncio.get_running_loop().create_task(client.ws.close(code=1013, message=b"too slow"))
            elif client.subscription.everything:
                client.queue(frame, len(shared))
            elif client.pending:
                mine, client.pending = client.pending, []
                client.queue(batch_frame(mine).encode(), len(mine))


def _json_response(data: JSON, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer, compact (as every other JSON text asyncnode writes)."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def _json_error(code: int, message: str, **extra: JSON) -> web.Response:
    return _json_response({"error": message, **extra}, status=code)


_Handler: TypeAlias = "Callable[[web.Request], Awaitable[web.StreamResponse]]"


async def _error_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """API errors as JSON ``{"error": ...}``; unexpected exceptions logged and answered 500."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or not request.path.startswith("/api/"):
            raise
        if e.status == 413:
            size = request.app[CFG_KEY].api.client_max_size
            return _json_error(413, f"request body too large (at most {size} bytes)")
        return _json_error(e.status, e.reason)
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # a static file name too long for the file system
            return _json_error(404, "not found")
        log.getChild("api").exception("unhandled error on %s %s", request.method, request.path)
        return _json_error(500, "internal error")


async def _guard_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Refuse a state-changing request from another site's page (403, whatever its token), then, with
    ``[api] token`` set, require a token on /api/* and /ws (a Bearer header, or ?token= for the WebSocket):
    the operator's for everything, the read token's for all but state-changing requests (403)."""
    api = request.app[CFG_KEY].api
    mutating = request.method in MUTATING
    if mutating:
        why = cross_site(
            request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"), request.host, api.allowed_origins
        )
        if why is not None:
            return _json_error(403, f"cross-site request refused ({why}); nothing was changed")
    if api.token and ((request.path.startswith("/api/") and request.path != DOCS_PAGE) or request.path == "/ws"):
        query_token = request.query.get("token") if request.path == "/ws" else None
        found = access_of(api, request.headers.get("Authorization"), query_token)
        if found is None:
            response = _json_error(401, "missing or wrong token (Authorization: Bearer <token>)")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if mutating and found == "read":
            return _json_error(403, "the read-only token cannot change anything; use the operator token")
    return await handler(request)


_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")


async def page_index(request: web.Request) -> web.Response:
    """The browser page: a form per task type and the live task list."""
    types = [t.describe(request.app[CFG_KEY].api.max_text) for t in sorted(REGISTRY.values(), key=lambda t: t.name)]
    context = {"title": "asyncnode", "version": __version__, "task_types": types}
    return aiohttp_jinja2.render_template("index.html", request, context)


async def api_openapi(request: web.Request) -> web.Response:
    """``GET /api/openapi.json``: the OpenAPI 3.1 document of every endpoint, the task types' payloads included."""
    return _json_response(openapi_document(request.app[CFG_KEY]))


async def page_docs(request: web.Request) -> web.Response:
    """``GET /api/docs``: the API's document for people (the page asks for a token to read it, as the dashboard)."""
    context = {"title": "asyncnode API", "version": __version__}
    return aiohttp_jinja2.render_template("docs.html", request, context)


async def api_access(request: web.Request) -> web.Response:
    """``GET /api/access``: what this request's token may do (``operator``, ``read``, or ``open``: no token set),
    so the page shows its actions only to those who may use them."""
    access = access_of(request.app[CFG_KEY].api, request.headers.get("Authorization"), None)
    return _json_response({"access": access})  # a token set and none given never gets here: 401


async def api_task_types(request: web.Request) -> web.Response:
    """``GET /api/task-types``: the registered types and the payload fields each expects."""
    max_text = request.app[CFG_KEY].api.max_text
    return _json_response({"items": [t.describe(max_text) for t in sorted(REGISTRY.values(), key=lambda t: t.name)]})


def _traceparent(request: web.Request) -> str | None:
    """The request's W3C ``traceparent``; one that is not valid is ignored (the trace context spec: a new trace)."""
    value = request.headers.get("traceparent", "").strip().lower()
    return value if TRACEPARENT.fullmatch(value) else None


async def _submit_many(request: web.Request, body: list[JSON]) -> web.Response:
    """``POST /api/tasks`` with an array: all validated first (400 naming the index: nothing made), then made
    together; 202 with each one's answer in order, or 503 if any was not queued (its item says ``rejected``)."""
    cfg, app = request.app[CFG_KEY], request.app
    if "Idempotency-Key" in request.headers:
        return _json_error(400, "a bulk submit takes an idempotency_key per submission, not the Idempotency-Key header")
    try:
        items = validate_batch(body, cfg)
    except ValidationError as e:
        extra: dict[str, JSON] = {"field": e.field} if e.field else {}
        return _json_error(400, str(e), **extra, **({"index": e.index} if e.index is not None else {}))
    answers = await submit_batch(app[BROKER_KEY], app[STATE_KEY], cfg, items, _traceparent(request))
    refused = sum(1 for a in answers if a.get("status") == "rejected")
    if refused:
        log.getChild("api").warning("refusing %d of %d submissions: %s", refused, len(answers), answers[0].get("error"))
        return _json_error(503, f"{refused} of {len(answers)} submissions not queued; retry them later", items=answers)
    return _json_response({"items": answers}, status=202)


async def api_submit(request: web.Request) -> web.Response:
    """``POST /api/tasks``: validate, record the task, queue it durably (a confirmed publish), answer 202; an array
    of submissions is a bulk submit (_submit_many)."""
    cfg = request.app[CFG_KEY]
    if request.content_type != "application/json":
        return _json_error(415, "Content-Type must be application/json")
    raw = await request.read()
    try:
        body = loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _json_error(400, "body is not valid JSON")
    except RecursionError:
        return _json_error(400, "body is nested too deeply")
    if isinstance(body, list):
        return await _submit_many(request, body)
    try:
        sub = validate_submission(body, cfg)
    except ValidationError as e:
        extra = {"field": e.field} if e.field else {}
        return _json_error(400, str(e), **extra)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        return _json_error(400, "Idempotency-Key must be 1 to 200 printable ASCII characters")
    app, trace = request.app, _traceparent(request)
    try:
        if key is None:
            created, answer = True, await submit_task(app[BROKER_KEY], app[STATE_KEY], cfg, sub, traceparent=trace)
        else:
            fingerprint = body_fingerprint(body)
            created, answer = await submit_once(
                app[BROKER_KEY], app[STATE_KEY], cfg, sub, key, fingerprint, traceparent=trace
            )
    except Refused as e:
        log.getChild("api").warning("refusing a task: %s", e)
        return _json_error(503, str(e), **({"id": e.tid} if e.tid else {}))
    except KeyConflict as e:
        return _json_error(422, str(e), key=key)
    except KeyBusy as e:
        return _json_error(409, str(e), key=key)
    return _json_response(answer, status=202 if created else 200, headers={"Location": f"/api/tasks/{answer['id']}"})


def _cancelled_by(request: web.Request) -> dict[str, JSON]:
    """Who cancels, as the task's record keeps it: the API, the client's address, the kind of token."""
    access = access_of(request.app[CFG_KEY].api, request.headers.get("Authorization"), None)
    token = "operator" if access == "operator" else "none"
    return {"cancelled_by": "api", "cancelled_client": request.remote, "cancelled_token": token}


async def api_cancel(request: web.Request) -> web.Response:
    """``POST /api/tasks/<id>/cancel``: cancel a task that has not finished, wherever it waits or runs."""
    tid = request.match_info["id"]
    if not TASK_ID.fullmatch(tid):
        return _json_error(404, f"no task with id {tid[:64]!r}")
    state = request.app[STATE_KEY]
    try:
        done, status = await cancel_task(state, request.app[CFG_KEY], tid, _cancelled_by(request))
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable; nothing was cancelled")
    if status is None:
        return _json_error(404, f"no task with id {tid!r}")
    if not done:
        return _json_error(409, f"task {tid} is already {status}", id=tid, status=status)
    log.getChild("api").info("task %s cancelled by %s", tid, request.remote)
    return _json_response({"id": tid, "status": status})


#: Keys of the old form of a ``POST /api/tasks/cancel`` body: a filter of these at its top level.
CANCEL_FILTERS: Final = ("status", "type", "queue")
#: The audit log: one JSON line per bulk action (who, what, which tasks, the counts, when).
audit_log: Final = log.getChild("audit")


@dataclasses.dataclass(frozen=True)
class BulkTarget:
    """What a bulk action acts on: the tasks of ``ids``, those ``filter`` matches, or the dead letters of a
    ``fingerprint`` (one of the three; none: every dead letter)."""

    ids: tuple[str, ...] | None = None  #: well-formed task ids (``malformed`` more were given: skipped)
    filter: TaskFilter | None = None
    fingerprint: str | None = None
    malformed: int = 0

    def described(self) -> dict[str, JSON]:
        """Which tasks, for the audit log."""
        if self.ids is not None:
            return {"ids": len(self.ids) + self.malformed}
        if self.filter is not None:
            return {"filter": dict(self.filter.given)}
        return {"fingerprint": self.fingerprint} if self.fingerprint else {"all": True}


#: What a fingerprint looks like (fingerprint()).
FINGERPRINT: Final = re.compile(rf"[0-9a-f]{{{FINGERPRINT_DIGITS}}}")


async def _bulk_target(request: web.Request, *, letters: bool = False, legacy: bool = False) -> BulkTarget:
    """The target a bulk action's body names: ``{"ids": [...]}`` or ``{"filter": {...}}`` (``{}``: all), for
    dead letters (``letters``) also ``{"fingerprint": "..."}`` or no body (all); ``legacy``: the filter may be
    the body itself (status, type, queue). A 400 (web.HTTPBadRequest) for any other."""
    raw = await request.read()
    if letters and not raw.strip():
        return BulkTarget()
    try:
        body = loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise web.HTTPBadRequest(reason="body is not valid JSON") from None
    keys = ("ids", "filter", "fingerprint") if letters else ("ids", "filter")
    shape = f"body must be one of {', '.join(f'{{{k!r}: ...}}' for k in keys)}".replace("'", '"')
    if not isinstance(body, dict) or (letters and body == {}):
        if letters and body == {}:
            return BulkTarget()
        raise web.HTTPBadRequest(reason=shape)
    if legacy and body and set(body) <= set(CANCEL_FILTERS):
        body = {"filter": body}
    if len(body) != 1 or next(iter(body)) not in keys:
        raise web.HTTPBadRequest(reason=shape)
    cfg = request.app[CFG_KEY]
    if "ids" in body:
        ids = body["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise web.HTTPBadRequest(reason="'ids' must be a list of task ids")
        if not ids or len(ids) > MAX_LIST_LIMIT:
            raise web.HTTPBadRequest(reason=f"'ids' must list 1 to {MAX_LIST_LIMIT} task ids (or use a filter)")
        valid = tuple(dict.fromkeys(i for i in ids if TASK_ID.fullmatch(i)))
        return BulkTarget(ids=valid, malformed=len(ids) - len(valid))
    if "fingerprint" in body:
        if not isinstance(body["fingerprint"], str) or not FINGERPRINT.fullmatch(body["fingerprint"]):
            raise web.HTTPBadRequest(reason="'fingerprint' must be one GET /api/dlq/groups gave")
        return BulkTarget(fingerprint=body["fingerprint"])
    if not isinstance(body["filter"], dict):
        raise web.HTTPBadRequest(reason="'filter' must be an object of " + ", ".join(FILTER_KEYS))
    try:
        return BulkTarget(filter=task_filter(body["filter"], cfg.queues, cfg.tasks.search_words))
    except ValidationError as e:
        raise web.HTTPBadRequest(reason=f"filter: {e}") from None


async def matching_tasks(store: TaskStore, flt: TaskFilter) -> list[dict[str, JSON]]:
    """Every retained task ``flt`` matches, newest first, read a page of MAX_LIST_LIMIT at a time."""
    found: list[dict[str, JSON]] = []
    after: Cursor | None = None
    while True:
        items, after, _ = await store.search(flt, MAX_LIST_LIMIT, after)
        found += items
        if after is None:
            return found


def _audit(request: web.Request, action: str, target: BulkTarget, acted: int, skipped: int) -> None:
    """The audit log's line for a bulk action: who (the kind of token, the client's address), what, on which
    tasks, the counts, and when."""
    access = access_of(request.app[CFG_KEY].api, request.headers.get("Authorization"), request.query.get("token"))
    entry = {
        "audit": action,
        "token": access or "none",
        "client": request.remote,
        **target.described(),
        "acted": acted,
        "skipped": skipped,
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
    }
    audit_log.info("%s", dumps(entry), extra={"audit": entry})


#: Calls a bulk action has in flight at once (each holds a connection of the store's pool: redis-py's has 100).
BULK_CONCURRENCY: Final = 32


async def _in_chunks(calls: Iterable[Awaitable[Any]], size: int = BULK_CONCURRENCY) -> list[Any]:
    """The results of ``calls``, awaited ``size`` at a time."""
    results: list[Any] = []
    batch: list[Awaitable[Any]] = []
    for call in calls:
        batch.append(call)
        if len(batch) >= size:
            results += await asyncio.gather(*batch)
            batch = []
    return results + list(await asyncio.gather(*batch))


async def api_cancel_many(request: web.Request) -> web.Response:
    """``POST /api/tasks/cancel``: cancel the tasks ``{"ids": [...]}`` lists, or all that ``{"filter": {...}}``
    matches (as ``GET /api/tasks`` takes it; the old form puts status, type and queue at the top); answer how
    many were cancelled and how many skipped (finished, gone)."""
    cfg, state = request.app[CFG_KEY], request.app[STATE_KEY]
    target = await _bulk_target(request, legacy=True)
    if target.filter is not None and target.filter.status not in (None, *CANCELLABLE):
        return _json_error(400, f"filter: 'status' must be one of {', '.join(CANCELLABLE)} (the others are finished)")
    by = _cancelled_by(request)
    try:
        if target.filter is not None:
            matching: dict[str, dict[str, JSON] | None] = {
                str(t["id"]): t for t in await matching_tasks(state, target.filter) if t.get("status") in CANCELLABLE
            }
            skipped = 0
        else:
            matching, skipped = dict.fromkeys(target.ids or ()), target.malformed  # read one by one
        outcomes = await _in_chunks(cancel_task(state, cfg, tid, by, rec) for tid, rec in matching.items())
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable; some tasks may not have been cancelled")
    cancelled = sum(1 for done, _ in outcomes if done)
    skipped += len(outcomes) - cancelled
    _audit(request, "cancel", target, cancelled, skipped)
    return _json_response({"cancelled": cancelled, "skipped": skipped})


async def api_delete_many(request: web.Request) -> web.Response:
    """``POST /api/tasks/delete``: delete the finished tasks of ``{"ids": [...]}`` or ``{"filter": {...}}``
    (records and timelines); answer how many were deleted and skipped (not finished, gone)."""
    state = request.app[STATE_KEY]
    target = await _bulk_target(request)
    try:
        if target.filter is not None:
            found = await matching_tasks(state, target.filter)
            ids = [str(t["id"]) for t in found if t.get("status") in FINISHED]
            considered = len(found)
        else:
            ids = list(target.ids or ())
            considered = len(ids) + target.malformed
        deleted = 0
        for start in range(0, len(ids), MAX_LIST_LIMIT):
            deleted += await state.delete_finished(ids[start : start + MAX_LIST_LIMIT])
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable; some tasks may not have been deleted")
    _audit(request, "delete", target, deleted, considered - deleted)
    return _json_response({"deleted": deleted, "skipped": considered - deleted})


async def api_get_task(request: web.Request) -> web.Response:
    """``GET /api/tasks/<id>``: one task, or 404."""
    tid = request.match_info["id"]
    rec = await request.app[STATE_KEY].get(tid) if TASK_ID.fullmatch(tid) else None
    if rec is None:
        return _json_error(404, f"no task with id {tid[:64]!r}")
    return _json_response(rec)


def _query_limit(request: web.Request, default: int) -> int:
    """The ``limit`` query parameter; a 400 unless it is an integer from 1 to MAX_LIST_LIMIT."""
    with contextlib.suppress(ValueError):
        if 1 <= (limit := int(request.query.get("limit", default))) <= MAX_LIST_LIMIT:
            return limit
    raise web.HTTPBadRequest(reason=f"limit must be an integer between 1 and {MAX_LIST_LIMIT}")


def _queue_named(request: web.Request, name: str | None) -> str:
    """A declared queue's name from the request; a 404 (in the path) or 400 (in the query) naming the known ones."""
    queues = request.app[CFG_KEY].queues
    if name is None or name not in queues:
        error = web.HTTPNotFound if "name" in request.match_info else web.HTTPBadRequest
        raise error(reason=f"no queue {str(name)[:50]!r} (known: {', '.join(queues)})")
    return name


#: Query parameters of ``GET /api/tasks`` besides the filter's.
LIST_PARAMETERS: Final = ("limit", "cursor", "token")


async def api_list_tasks(request: web.Request) -> web.Response:
    """``GET /api/tasks?q=&status=&type=&queue=&schedule=&since=&until=&limit=&cursor=``: a page of the retained
    tasks the filter matches (every one without), newest first; ``next``, the cursor of the next page (null:
    none), and ``total``, how many match."""
    limit = _query_limit(request, 50)
    if unknown := sorted(set(request.query) - {*FILTER_KEYS, *LIST_PARAMETERS}):
        known = ", ".join((*FILTER_KEYS, *LIST_PARAMETERS[:2]))
        return _json_error(400, f"unknown parameter {unknown[0][:50]!r} (known: {known})", field=unknown[0][:50])
    try:
        cfg = request.app[CFG_KEY]
        flt = task_filter(
            {k: v for k, v in request.query.items() if k in FILTER_KEYS}, cfg.queues, cfg.tasks.search_words
        )
        after = decode_cursor(request.query["cursor"]) if "cursor" in request.query else None
    except ValidationError as e:
        return _json_error(400, str(e), **({"field": e.field} if e.field else {}))
    items, following, total = await request.app[STATE_KEY].search(flt, limit, after)
    return _json_response({"items": items, "next": encode_cursor(following) if following else None, "total": total})


class QueueRates:
    """Tasks completed per second in each queue: the differences of its ``completed@<queue>`` counter between
    two samples (the stats loop samples every second; a GET between two reads the latest)."""

    def __init__(self) -> None:
        self.previous: tuple[float, dict[str, int]] | None = None
        self.rates: dict[str, float] = {}

    def sample(self, counters: Mapping[str, int], queues: Iterable[str]) -> dict[str, float]:
        """Take a sample now; return the rates since the previous one (if it is at least half a second old)."""
        now = time.monotonic()
        queues = list(queues)  # one queue: its figure is the total (see plan_change)
        totals = {q: counters.get(f"completed@{q}" if len(queues) > 1 else "completed", 0) for q in queues}
        if self.previous is None or now - self.previous[0] >= STATS_INTERVAL / 2:
            if self.previous is not None:
                elapsed = now - self.previous[0]
                self.rates = {q: round(max(n - self.previous[1].get(q, n), 0) / elapsed, 2) for q, n in totals.items()}
            self.previous = (now, totals)
        return self.rates


async def queue_items(app: web.Application, workers: list[dict[str, JSON]]) -> tuple[list[dict[str, JSON]], int | None]:
    """One item per declared queue, as ``GET /api/queues`` shows it, and the dead letters (None: the queue is
    away). Running tasks come from the backend where it knows them (SQLite), else from the workers' heartbeats."""
    cfg, state, broker = app[CFG_KEY], app[STATE_KEY], app[BROKER_KEY]
    paused, counters, held = await state.paused_queues(), await state.counters(), await state.held_counts()
    try:
        figures, dlq = await broker.queue_figures()
    except BrokerUnavailable:
        figures, dlq = {}, None
    rates = app[RATES_KEY].sample(counters, cfg.queues)
    items = []
    for name, q in cfg.queues.items():
        serving = [w for w in workers if name in cast(list[str], w.get("queues") or ())]
        found = figures.get(name, {})
        running = found.get("running")
        if running is None and found:
            running = sum(int(cast(dict[str, int], w.get("running") or {}).get(name, 0)) for w in serving)
        items.append(
            {
                "name": name,
                "broker_name": cfg.broker_name(name),
                "ready": found.get("ready"),
                "running": running,
                "retrying": found.get("retrying"),
                "scheduled": held.get(name, 0),
                "consumers": len(serving),
                "paused": name in paused,
                "limit": q.limit,
                "rate": q.rate,
                "completed_per_s": rates.get(name, 0.0),
            }
        )
    return items, dlq


async def api_queues(request: web.Request) -> web.Response:
    """``GET /api/queues``: every declared queue with its depths, consumers, limits and whether it is paused."""
    try:
        items, _ = await queue_items(request.app, await request.app[STATE_KEY].workers())
    except STORE_ERRORS:
        return _json_error(503, f"{request.app[STATE_KEY].label} unavailable")
    return _json_response({"items": items})


async def api_queue_pause(request: web.Request) -> web.Response:
    """``POST /api/queues/<name>/pause`` or ``/resume``: no worker on any host starts a task of it (or again does),
    within a second, durably; tasks running finish, and submissions are still accepted."""
    name = _queue_named(request, request.match_info["name"])
    paused = request.match_info["action"] == "pause"
    state = request.app[STATE_KEY]
    try:
        changed = await state.set_paused(name, paused)
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable; nothing was changed")
    if changed:
        log.getChild("api").info("queue %r %s", name, "paused" if paused else "resumed")
    return _json_response({"name": name, "paused": paused})


async def api_dlq_list(request: web.Request) -> web.Response:
    """``GET /api/dlq?limit=N``: dead letters, oldest first (each with its group's ``fingerprint``), with the
    total."""
    limit = _query_limit(request, 100)
    try:
        items, total = await request.app[BROKER_KEY].dead_letters(limit)
    except BrokerUnavailable as e:
        return _json_error(503, str(e))
    for item in items:  # the group of GET /api/dlq/groups it is in
        item["fingerprint"] = fingerprint(cast(str | None, item.get("error")))
    return _json_response({"items": items, "total": total})


async def api_dlq_groups(request: web.Request) -> web.Response:
    """``GET /api/dlq/groups?limit=N``: the first N dead letters (10,000 by default) grouped by fingerprint (the
    exception with its message's numbers, ids and quoted values masked), the largest group first."""
    limit = MAX_GROUPED
    with contextlib.suppress(ValueError):
        limit = int(request.query.get("limit", MAX_GROUPED))
    if not 1 <= limit <= MAX_GROUPED:
        return _json_error(400, f"limit must be an integer between 1 and {MAX_GROUPED}", field="limit")
    try:
        groups, read, total = await dead_letter_groups(request.app[BROKER_KEY], limit)
    except BrokerUnavailable as e:
        return _json_error(503, str(e))
    return _json_response({"groups": groups, "read": read, "total": total})


async def _letter_choice(request: web.Request, target: BulkTarget) -> LetterChoice:
    """The dead letters a bulk target means: by id, by fingerprint, those of the tasks a filter matches (every
    one for an empty filter), or all."""
    if target.ids is not None:
        return frozenset(target.ids)
    if target.fingerprint is not None:
        wanted = target.fingerprint
        return lambda item: fingerprint(cast(str | None, item.get("error"))) == wanted
    if target.filter is not None and target.filter != TaskFilter():
        return frozenset(str(t["id"]) for t in await matching_tasks(request.app[STATE_KEY], target.filter))
    return None


async def api_dlq_requeue(request: web.Request) -> web.Response:
    """``POST /api/dlq/<id>/requeue`` (one; its body may carry ``{"payload": ...}``, a corrected payload
    validated as a submission) or ``POST /api/dlq/requeue`` (a bulk target: ids, a fingerprint, a filter; no
    body: all): back to the queue as fresh tasks."""
    app, task_id = request.app, request.match_info.get("id")
    payload: JSON = None
    if task_id is not None:
        target = BulkTarget(ids=(task_id,))
        raw = await request.read()
        if raw.strip():
            try:
                body = loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                return _json_error(400, "body is not valid JSON")
            if not isinstance(body, dict) or set(body) != {"payload"}:
                return _json_error(400, 'body must be {"payload": {...}} (a corrected payload), or empty')
            payload = body["payload"]
            if not isinstance(payload, dict):
                return _json_error(400, "'payload' must be a JSON object", field="payload")
    else:
        target = await _bulk_target(request, letters=True)
    try:
        choice: LetterChoice = task_id if task_id is not None else await _letter_choice(request, target)
        count = await requeue_dead_letters(app[BROKER_KEY], app[STATE_KEY], app[CFG_KEY], choice, payload)
    except ValidationError as e:
        return _json_error(400, f"the corrected payload: {e}", **({"field": e.field} if e.field else {}))
    except BrokerUnavailable as e:
        return _json_error(503, str(e))
    except STORE_ERRORS:
        return _json_error(503, f"{app[STATE_KEY].label} unavailable; nothing was requeued")
    if task_id is not None and count == 0:
        return _json_error(404, f"no dead letter with id {task_id[:64]!r}")
    skipped = len(choice) - count if isinstance(choice, frozenset) else 0
    _audit(request, "requeue" if payload is None else "edit-and-requeue", target, count, skipped)
    return _json_response({"requeued": count, "skipped": skipped})


async def api_dlq_discard(request: web.Request) -> web.Response:
    """``DELETE /api/dlq/<id>`` (one) or ``POST /api/dlq/discard`` (a bulk target, as requeue takes): drop dead
    letters (their tasks stay ``failed``)."""
    task_id = request.match_info.get("id")
    target = BulkTarget(ids=(task_id,)) if task_id is not None else await _bulk_target(request, letters=True)
    try:
        choice: LetterChoice = task_id if task_id is not None else await _letter_choice(request, target)
        count = await discard_dead_letters(request.app[BROKER_KEY], choice)
    except BrokerUnavailable as e:
        return _json_error(503, str(e))
    except STORE_ERRORS:
        return _json_error(503, f"{request.app[STATE_KEY].label} unavailable; nothing was discarded")
    if task_id is not None and count == 0:
        return _json_error(404, f"no dead letter with id {task_id[:64]!r}")
    skipped = len(choice) - count if isinstance(choice, frozenset) else 0
    _audit(request, "discard", target, count, skipped)
    return _json_response({"discarded": count, "skipped": skipped})


async def api_schedules(request: web.Request) -> web.Response:
    """``GET /api/schedules``: each schedule with its next and last run and its last task's status."""
    state = request.app[STATE_KEY]
    try:
        return _json_response({"items": await schedule_items(state, request.app[CFG_KEY])})
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable")


async def api_schedule_action(request: web.Request) -> web.Response:
    """``POST /api/schedules/<name>/pause|resume`` (durable, on every host) or ``/run`` (one task now)."""
    cfg, state, name = request.app[CFG_KEY], request.app[STATE_KEY], request.match_info["name"]
    if name not in cfg.schedules:
        return _json_error(404, f"no schedule {name[:50]!r} (known: {', '.join(cfg.schedules) or 'none'})")
    action = request.match_info["action"]
    try:
        if action == "run":
            body = await run_schedule_now(request.app[BROKER_KEY], state, cfg, name)
            log.getChild("api").info("schedule %r run now by %s: task %s", name, request.remote, body["id"])
            return _json_response(body, status=202, headers={"Location": f"/api/tasks/{body['id']}"})
        await set_schedule_paused(state, name, action == "pause")
    except Refused as e:
        return _json_error(503, str(e), **({"id": e.tid} if e.tid else {}))
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable; nothing was changed")
    log.getChild("api").info("schedule %r %s by %s", name, "paused" if action == "pause" else "resumed", request.remote)
    return _json_response({"name": name, "paused": action == "pause"})


async def api_workers(request: web.Request) -> web.Response:
    """``GET /api/workers``: the workers whose heartbeat is alive."""
    items = await request.app[STATE_KEY].workers()
    items.sort(key=lambda w: (str(w.get("host")), int(w.get("pid") or 0)))
    return _json_response({"items": items})


async def metrics_page(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus's text format, deployment-wide whichever API process answers. With a token set,
    the operator's, the read token or ``[api] metrics_token`` (a Bearer header)."""
    cfg, state = request.app[CFG_KEY], request.app[STATE_KEY]
    accepted = [t for t in (cfg.api.token, cfg.api.read_token, cfg.api.metrics_token) if t]
    authorization = request.headers.get("Authorization")
    if accepted and not any([token_matches(t, authorization, None) for t in accepted]):  # a list: each compared
        response = _json_error(401, "missing or wrong token (Authorization: Bearer <token>)")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    try:
        values, workers = await state.metric_values(), await state.workers()
        queues, dlq = await queue_items(request.app, workers)
        schedules = await schedule_items(state, cfg) if cfg.schedules else []
    except STORE_ERRORS:
        return _json_error(503, f"{state.label} unavailable")
    dead = None if dlq is None else (cfg.broker.queue + DLQ_SUFFIX, dlq)  # one for every queue
    text = metrics_text(values, queues, dead, workers, schedules)
    return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 while this process runs."""
    return _json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when the queue and the store (RabbitMQ and Redis, or the SQLite file) answer, else 503."""
    state, broker = request.app[STATE_KEY], request.app[BROKER_KEY]
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await state.ping()
        checks[state.name] = "ok"
    except (*STORE_ERRORS, TimeoutError) as e:
        checks[state.name] = f"unreachable: {e or type(e).__name__}"
    try:
        await broker.check(READY_TIMEOUT)
        checks.setdefault(broker.name, "ok")
    except BrokerUnavailable as e:
        checks[broker.name] = str(e)
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        return _json_response({"error": f"{' and '.join(failed)} unavailable", **checks}, status=503)
    return _json_response({"status": "ready", **checks})


async def ws_updates(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws``: every task update, as JSON text frames (an object or an array of objects)."""
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, request.host, request.app[CFG_KEY].api.allowed_origins):
        return _json_error(403, f"WebSocket origin {origin[:100]!r} not allowed")  # type: ignore[return-value]
    ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT, max_msg_size=WS_MAX_MESSAGE)
    hub = request.app[HUB_KEY]
    client = WsClient(ws)
    # Join, and complete the handshake only once the relay follows the store: every update published
    # after the client is connected reaches it. Then send the current state: updates racing the
    # snapshot carry higher sequence numbers, and clients keep the highest, so nothing is lost.
    hub.join(client)
    try:
        with contextlib.suppress(TimeoutError):  # the store is away: connect anyway, the relay catches up
            await asyncio.wait_for(hub.live.wait(), RELAY_START_TIMEOUT)
        await ws.prepare(request)
    except BaseException:
        hub.clients.discard(client)
        raise
    sender = asyncio.create_task(client.send_loop())
    with contextlib.suppress(*STORE_ERRORS):
        snapshot = [snapshot_update(t) for t in reversed(await request.app[STATE_KEY].recent(SNAPSHOT_SIZE))]
        if snapshot:
            client.frames.insert(0, (batch_frame(snapshot).encode(), 0))
            client.wake.set()
    try:
        async for msg in ws:
            # A client may say which updates it wants; anything else it sends is ignored,
            # and an oversized or broken frame closes only this connection.
            if msg.type == web.WSMsgType.TEXT:
                subscription = Subscription.parse(msg.data)
                if subscription is not None:
                    client.subscription = subscription
            elif msg.type == web.WSMsgType.ERROR:
                break
    finally:
        hub.clients.discard(client)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
    return ws


async def _relay_updates(app: web.Application) -> None:
    """Follow the store's updates while any WebSocket client is connected, and hand every one to the hub.

    With no client left it stops following at the next update (no parsing of updates nobody reads) and
    starts again with the next client, which waits for it before taking its snapshot. A subscription
    lost is taken up again under the one backoff policy, and then every client is sent the truth.
    """
    hub, alog = app[HUB_KEY], log.getChild("api")
    first, lost = True, False
    while True:
        await hub.wanted.wait()
        # retrying() has no limit here: it returns once a follow ends without an error.
        async for attempt in retrying(STORE_ERRORS, what="cannot follow the updates", logger=alog):
            with attempt:
                resync, lost = lost, True  # until a follow returns, updates may be missed
                lost = await _follow_updates(app, announce=first or resync, resync=resync)
                first = False
        hub.live.clear()
        if not hub.clients:
            hub.wanted.clear()


async def _follow_updates(app: web.Application, *, announce: bool, resync: bool) -> bool:
    """Relay updates until no client is left (False), or until the subscription, once live, is lost (True:
    the caller follows again at once, then resyncs). Raise one of STORE_ERRORS if it cannot subscribe."""
    state, hub = app[STATE_KEY], app[HUB_KEY]
    live = False
    try:
        async with contextlib.aclosing(state.follow()) as updates:
            async for message in updates:
                if message is not None:
                    if not hub.clients:
                        hub.live.clear()  # at once: a client joining now waits for the next follow
                        return False
                    hub.broadcast(message)
                    continue
                level = logging.INFO if announce or resync else logging.DEBUG
                log.getChild("api").log(level, "relaying updates from %s", state.describe())
                if resync:
                    # Updates published while we were away are gone: resend the current
                    # state of recent tasks so every client ends on the truth.
                    for task in reversed(await state.recent(SNAPSHOT_SIZE)):
                        hub.broadcast(snapshot_update(task))
                hub.live.set()
                live, announce, resync = True, False, False
    except STORE_ERRORS as e:
        hub.live.clear()
        if not live:
            raise
        log.getChild("api").warning("update subscription lost (%s); following again", e)
        return True
    return False


async def _stats_loop(app: web.Application) -> None:
    """Every second while clients are connected, send them ``stats``: rates, queue depths, each queue (as
    ``GET /api/queues``) and live workers."""
    state, hub = app[STATE_KEY], app[HUB_KEY]
    previous: tuple[float, dict[str, int]] | None = None
    while True:
        await asyncio.sleep(STATS_INTERVAL)
        if not hub.clients:
            previous = None
            continue
        try:
            counters, workers = await state.counters(), await state.workers()
            queues, dlq = await queue_items(app, workers)
        except STORE_ERRORS:
            continue
        ready = [q["ready"] for q in queues]
        total = sum(cast(list[int], ready)) if dlq is not None and None not in ready else None
        depths: dict[str, int | None] = {"ready": total, "dlq": dlq}
        now = time.monotonic()
        names = {"completed": "completed", "failed": "failed", "submitted": "pending", "retrying": "retrying"}
        totals = {name: counters.get(status, 0) for name, status in names.items()}
        # Rates are the differences of the per-status counters between two samples.
        elapsed = now - previous[0] if previous else 0.0
        rates = {
            f"{name}_per_s": round((totals[name] - previous[1][name]) / elapsed, 2) if previous and elapsed > 0 else 0.0
            for name in ("completed", "failed", "submitted")
        }
        previous = (now, totals)
        hub.broadcast(
            dumps(
                {
                    "stats": {
                        "ts": time.time(),
                        **rates,
                        "queue": depths,
                        "totals": totals,
                        "workers": workers,
                        "queues": queues,
                    }
                }
            )
        )


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    async with backend(app[CFG_KEY], "api") as (app[BROKER_KEY], app[STATE_KEY]):
        yield


async def _sweep_loop(app: web.Application) -> None:
    """Every SWEEP_INTERVAL seconds, unindex some tasks whose record has expired (Redis: sweep_index; it reads on
    at once while a sweep finds many)."""
    state = app[STATE_KEY]
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        with contextlib.suppress(*STORE_ERRORS):
            while await state.sweep_index() >= SWEEP_BATCH // 2:
                pass


async def _relay_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = asyncio.create_task(_relay_updates(app))
    stats = asyncio.create_task(_stats_loop(app))
    sweep = asyncio.create_task(_sweep_loop(app))
    yield
    # redis-py can swallow a cancellation that lands while it is connecting;
    # cancel again until the relay has really stopped.
    for task in (relay, stats, sweep):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)


async def _scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    """With schedules in config.toml, this API process competes for the scheduler lease (see run_scheduler);
    without, it drops the state of schedules taken out of it (no process runs a scheduler then)."""
    cfg, stop = app[CFG_KEY], asyncio.Event()
    if not cfg.schedules:  # in the background: the store may be away, and the API serves meanwhile
        sweep = asyncio.create_task(app[STATE_KEY].forget_schedules(()))
        sweep.add_done_callback(lambda t: t.cancelled() or t.exception())
        yield
        sweep.cancel()
        return
    owner = f"{socket.gethostname()}:{os.getpid()}:api:{uuid.uuid4().hex[:6]}"
    task = asyncio.create_task(run_scheduler(app[BROKER_KEY], app[STATE_KEY], cfg, owner, stop))
    yield
    stop.set()
    await asyncio.wait({task}, timeout=SHUTDOWN_STEP_TIMEOUT)


async def _close_websockets(app: web.Application) -> None:
    for client in list(app[HUB_KEY].clients):
        await client.ws.close(code=1001, message=b"server shutdown")


def make_app(cfg: Config) -> web.Application:
    """The API application: routes, templates, the update relay and the task queue (and the scheduler)."""
    load_handlers(cfg)
    validate_schedules(cfg)
    _make_app_keys()
    middlewares = [web.middleware(_error_middleware), web.middleware(_guard_middleware)]
    app = web.Application(middlewares=middlewares, client_max_size=cfg.api.client_max_size)
    app[CFG_KEY] = cfg
    app[HUB_KEY] = UpdateHub()
    app[RATES_KEY] = QueueRates()
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "web" / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
    )
    app.router.add_get("/", page_index)
    app.router.add_static("/static/", HERE / "web" / "static")
    app.router.add_get("/api/access", api_access)
    app.router.add_get("/api/task-types", api_task_types)
    app.router.add_post("/api/tasks", api_submit)
    app.router.add_get("/api/tasks", api_list_tasks)
    app.router.add_get("/api/tasks/{id}", api_get_task)
    app.router.add_post("/api/tasks/cancel", api_cancel_many)
    app.router.add_post("/api/tasks/delete", api_delete_many)
    app.router.add_post("/api/tasks/{id}/cancel", api_cancel)
    app.router.add_get("/api/workers", api_workers)
    app.router.add_get("/api/queues", api_queues)
    app.router.add_post("/api/queues/{name}/{action:pause|resume}", api_queue_pause)
    app.router.add_get("/api/dlq", api_dlq_list)
    app.router.add_get("/api/dlq/groups", api_dlq_groups)
    app.router.add_post("/api/dlq/requeue", api_dlq_requeue)
    app.router.add_post("/api/dlq/discard", api_dlq_discard)
    app.router.add_post("/api/dlq/{id}/requeue", api_dlq_requeue)
    app.router.add_delete("/api/dlq/{id}", api_dlq_discard)
    app.router.add_get("/api/schedules", api_schedules)
    app.router.add_post("/api/schedules/{name}/{action:pause|resume|run}", api_schedule_action)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/api/openapi.json", api_openapi)
    app.router.add_get(DOCS_PAGE, page_docs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/ws", ws_updates)
    app.cleanup_ctx.append(_state_ctx)
    app.cleanup_ctx.append(_relay_ctx)
    app.cleanup_ctx.append(_scheduler_ctx)
    app.on_shutdown.append(_close_websockets)
    app.on_response_prepare.append(_security_headers)
    return app


async def run_api(cfg: Config) -> int:
    """Serve the API until SIGTERM/SIGINT, then close WebSockets and connections."""
    alog = log.getChild("api")
    problem = exposure_error(cfg)
    if problem is not None:
        raise ConfigError(problem)
    stop = stop_event()
    runner = web.AppRunner(make_app(cfg), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.api.host, cfg.api.port).start()
    except OSError as e:
        await runner.cleanup()
        alog.error("cannot listen on %s:%d: %s", cfg.api.host, cfg.api.port, e.strerror or e)
        return 1
    if not cfg.smtp.allow and not is_loopback(cfg.api.host):
        alog.warning(
            "[smtp] allow is empty and the API listens on %s: anyone who can reach it may send e-mail to any "
            "address through %s:%d; set [smtp] allow (addresses or *@domain)",
            cfg.api.host,
            cfg.smtp.host,
            cfg.smtp.port,
        )
    backend = (
        "SQLite " + str(cfg.database)
        if cfg.embedded_mode
        else f"RabbitMQ {redact_url(cfg.broker.url)}, Redis {redact_url(cfg.redis.url)}"
    )
    alog.info("listening on http://%s:%d (%s)", cfg.api.host, cfg.api.port, backend)
    await stop.wait()
    alog.info("shutting down")
    await runner.cleanup()
    return 0


# ============================================================================
# Role: worker
# ============================================================================

#: Frames and characters of a traceback kept with a dead letter.
TRACEBACK_FRAMES: Final = 8
TRACEBACK_CHARS: Final = 4000
#: Longest error message kept with a task.
ERROR_CHARS: Final = 2000
#: Seconds between a worker's reads of which queues are paused (a pause takes effect within this and a start).
CONTROL_INTERVAL: Final = 0.5
#: Seconds a worker holds a delivery it may not start yet (over its queue's limit or rate) before it puts it back
#: on its queue and takes the next: far below RabbitMQ's consumer_timeout, which closes a channel holding one long.
HOLD_LIMIT: Final = 20.0
#: What became of a delivery: run (or found finished: acknowledge it), handed back (the worker is stopping), or
#: put back without counting a delivery (its queue is paused, or it waited its turn too long).
ACK, RETURN, PUT_BACK = "ack", "return", "put back"
#: Most held (delayed) tasks one promotion queues at once, and seconds between a worker's looks for due ones.
PROMOTE_BATCH: Final = 500
PROMOTE_INTERVAL: Final = 0.25
#: Seconds a promoter keeps the held tasks it took from the others while it queues them (all at once, each
#: confirmed within [broker] publish_timeout).
PROMOTE_LEASE: Final = 20.0


class Cancelled:
    """What run() returns for a task cancelled while it ran: nothing more is recorded (the cancel was)."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a run failed, and whether retrying could help."""

    error: str
    traceback: str
    permanent: bool


def describe_failure(e: BaseException, limit: float) -> Failure:
    """A handler's exception as a Failure: its message, the end of its traceback, whether permanent."""
    if isinstance(e, TimeoutError):
        return Failure(f"timed out after {limit:g} s", "", False)
    permanent = isinstance(e, ValidationError | PermanentError)
    error = str(e) if permanent else (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    tb = "".join(traceback.format_exception(e, limit=-TRACEBACK_FRAMES))[-TRACEBACK_CHARS:]
    return Failure(error[:ERROR_CHARS], tb, permanent)


class Worker:
    """Consumes the work queue: runs each task, reports every change of state, retries, dead-letters.

    No task can be lost: a delivery is acknowledged only once its next home (a retry, the DLQ) is safely
    queued and its state written, so a crash leaves it on its queue or moved on.
    """

    def __init__(
        self, cfg: Config, state: TaskStore, broker: TaskQueue, instance: str = "", queues: Iterable[str] = ()
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.broker = broker
        self.serve = tuple(queues) or tuple(cfg.queues)  # the queues this process consumes
        self.paused: set[str] = set()  # the queues paused, as last read from the store
        self.consumed: tuple[str, ...] = ()  # the queues the task queue consumes now: serve minus paused
        self.wake = asyncio.Event()  # set (and replaced) when the pauses change or the worker stops
        self.lease = 3 * cfg.worker.heartbeat  # a limit slot of a worker gone comes back after this
        self.slots_held: dict[str, str] = {}  # limit slot token -> its queue
        self.running_by_queue: dict[str, int] = {}
        self.host = socket.gethostname()
        self.name = f"{self.host}:{os.getpid()}"
        self.instance = instance
        self.started_at = time.time()
        self.stopping = False
        self.inflight: set[asyncio.Task[None]] = set()
        self.in_hand: dict[str, float] = {}  # task id -> when it started, oldest first
        self.running: dict[str, asyncio.Event] = {}  # task id -> set when its outcome is recorded
        self.cancelled: set[str] = set()  # tasks in hand found cancelled
        # Tasks whose handler runs now: (the asyncio task awaiting an async one, else None; its context).
        self.handlers: dict[str, tuple[asyncio.Task[Any] | None, TaskContext]] = {}
        self.tasks_done = 0
        self.slots = asyncio.Semaphore(cfg.worker.concurrency)
        self.one_thread = asyncio.Semaphore(1)
        self.log = log.getChild("worker")

    def heartbeat_info(self) -> dict[str, JSON]:
        """What ``GET /api/workers`` shows of this worker."""
        return {
            "id": self.name,
            "host": self.host,
            "instance": self.instance,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "tasks_done": self.tasks_done,
            "current": next(iter(self.in_hand), None),
            "in_hand": len(self.in_hand),
            "queues": list(self.serve),
            "running": dict(self.running_by_queue),
            "ts": time.time(),
        }

    async def heartbeat_loop(self) -> None:
        """Beat every ``[worker] heartbeat`` seconds, and renew the limit slots held; both live three intervals."""
        interval = self.cfg.worker.heartbeat
        while True:
            try:
                await self.state.beat(self.name, self.heartbeat_info(), ttl=self.lease)
                await self.state.renew_slots(dict(self.slots_held), self.lease)
            except STORE_ERRORS as e:
                self.log.warning("heartbeat not recorded: %s", e)
            await asyncio.sleep(interval)

    def wake_waiting(self) -> None:
        """Wake every delivery waiting for its turn: the pauses changed, or the worker stops."""
        self.wake.set()
        self.wake = asyncio.Event()

    async def read_pauses(self) -> None:
        """Read which queues are paused; consume only the others (a consumer stopped, or started again)."""
        paused = await self.state.paused_queues()
        if paused != self.paused:
            for queue in self.serve:
                if (queue in paused) != (queue in self.paused):
                    verb = "paused: starting none of its tasks" if queue in paused else "resumed"
                    self.log.info("queue %r %s", queue, verb)
            self.paused = paused
            self.wake_waiting()
        wanted = tuple(q for q in self.serve if q not in paused)
        if wanted != self.consumed:
            await self.broker.set_consumed(wanted)
            self.consumed = wanted

    async def watch_cancels(self) -> None:
        """Find which tasks in hand were cancelled: stop those running (an async handler is cancelled at its
        await, a sync one sees ``ctx.cancelled``), and let those waiting for their turn go, unrun."""
        found = await self.state.statuses(list(self.running))
        for tid, status in found.items():
            if status == "cancelled" and tid not in self.cancelled:
                self.cancelled.add(tid)
                runner, ctx = self.handlers.get(tid, (None, None))
                if ctx is not None:
                    self.log.info("task %s cancelled: stopping it", tid)
                    ctx.cancelled = True
                if runner is not None:
                    runner.cancel()
                self.wake_waiting()

    async def control_loop(self) -> None:
        """Every CONTROL_INTERVAL, take up the pauses and the cancels of the tasks in hand (while the store or
        queue is away, nothing changes). Stopping, it watches the cancels alone, until the tasks in hand end."""
        while True:
            await asyncio.sleep(CONTROL_INTERVAL)
            try:
                if not self.stopping:
                    await self.read_pauses()
                if self.running:
                    await self.watch_cancels()
            except (*STORE_ERRORS, BrokerUnavailable) as e:
                self.log.warning("cannot read the paused queues or the cancels: %s", e)

    async def promote_loop(self) -> None:
        """Queue the held (delayed) tasks as they fall due, on a store that holds them apart (Redis); on the
        embedded file they are messages already, and this returns at once. The publishes are confirmed; one
        refused leaves its task held, taken again once its lease is over."""
        while True:
            wait = PROMOTE_INTERVAL
            try:
                taken = await self.state.take_due(PROMOTE_BATCH, PROMOTE_LEASE)
                if taken is None:
                    return
                items, wait = taken
                if items:
                    outcomes = await asyncio.gather(*(self._promote(body) for _, body in items), return_exceptions=True)
                    await self.state.promoted(tid for (tid, _), e in zip(items, outcomes, strict=True) if e is None)
                    refused = [e for e in outcomes if e is not None]
                    if refused:
                        self.log.warning("%d delayed task(s) not queued yet: %s", len(refused), refused[0])
                    elif len(items) == PROMOTE_BATCH:
                        wait = 0.0
            except (*STORE_ERRORS, BrokerUnavailable) as e:
                self.log.warning("cannot queue the delayed tasks due: %s", e)
            await asyncio.sleep(min(wait, PROMOTE_INTERVAL))

    async def _promote(self, body: bytes) -> None:
        try:
            envelope = Envelope.decode(body)
        except EnvelopeError:  # its envelope is lost or unreadable: nothing to queue
            return
        await self.broker.publish(envelope)

    async def on_message(self, message: Delivery) -> None:
        """Consumer callback: start running the delivery (or hand it back when shutting down).

        The run gets a task of its own: the library cancels its per-delivery tasks when the channel closes
        (a broker restart, a consumer_timeout), and a handler must not be cut off half-way for that.
        """
        if self.stopping:
            await self._settle(message.nack(requeue=True), "return")
            return
        task = asyncio.get_running_loop().create_task(self.handle(message))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _settle(self, settle: Awaitable[Any], what: str) -> None:
        """Ack, nack or reject; after a reconnect (or a lost lease) the delivery is stale and will be redelivered."""
        try:
            await settle
        except (*AMQP_ERRORS, *STORE_ERRORS) as e:
            self.log.warning("could not %s a delivery (%s); it will be redelivered", what, e or type(e).__name__)

    async def _durably(self, write: Callable[[], Awaitable[Any]]) -> Any:
        """Run a store write, retrying under BACKOFF while the store is away (up to STORE_PATIENCE seconds)."""
        try:
            return await write()  # the common case, with no retry machinery
        except STORE_ERRORS as e:
            self.log.warning("%s unavailable (%s); retrying the write", self.state.label, e)
        what = f"{self.state.label} unavailable"
        async for attempt in retrying(STORE_ERRORS, what=what, logger=self.log, patience=STORE_PATIENCE):
            with attempt:
                return await write()
        raise AssertionError("unreachable: retrying raises its last error")

    async def _record(
        self,
        env: Envelope,
        event: str,
        fields: Mapping[str, JSON],
        restore: Mapping[str, JSON] | None = None,
        now: float | None = None,
        **timing: float | None,
    ) -> Any:
        """Record a change of state of ``env``'s task (an event of TRANSITIONS), durably; ``now``: when it
        happened (the time its queue admitted it to start), if not now; ``timing``: its ``waited`` or ``ran``
        (see plan_change)."""
        tasks, tally = self.cfg.tasks, len(self.cfg.queues) > 1
        change = plan_change(
            event,
            env.id,
            env.type,
            fields,
            tasks=tasks,
            restore=restore,
            now=now,
            queue=env.queue,
            tally=tally,
            **timing,
        )
        return await self._durably(lambda: self.state.apply(change))

    async def handle(self, message: Delivery) -> None:
        """Run one delivery to its end: completed, retried later, or dead-lettered; then acknowledge it."""
        try:
            env = Envelope.decode(message.body)
        except EnvelopeError as e:
            self.log.error("dead-lettering an unreadable message: %s", e)
            await self._settle(message.reject(requeue=False), "reject")
            return
        try:
            outcome = await self.execute(env, message.headers or {})
        except Exception as e:
            # The outcome could not be recorded or moved on: hand the task back rather than lose it.
            if isinstance(e, (*STORE_ERRORS, BrokerUnavailable)):
                self.log.error("task %s: %s; returning it to the queue", env.id, e)
            else:
                self.log.exception("task %s: unexpected error; returning it to the queue", env.id)
            outcome = RETURN
        if outcome == PUT_BACK:
            try:
                await self.broker.put_back(message, env)
                return
            except (BrokerUnavailable, *AMQP_ERRORS, *STORE_ERRORS) as e:
                self.log.warning("could not put task %s back (%s); returning it", env.id, e or type(e).__name__)
                outcome = RETURN
        if outcome == RETURN:
            await self._settle(message.nack(requeue=True), "return")
            return
        await self._settle(message.ack(), "ack")
        self.tasks_done += 1

    async def execute(self, env: Envelope, headers: Mapping[str, Any]) -> str:
        """Once its queue lets it start, record started, run the handler, then record and route the outcome;
        return ACK (the caller acks), RETURN (not run: the worker is stopping) or PUT_BACK (not run: its queue
        is paused, or it waited HOLD_LIMIT for its turn)."""
        if env.id in self.running:
            # Redelivered while this process still runs it (RabbitMQ closed the channel on
            # consumer_timeout and requeued it): do not run it twice; settle this copy
            # once the run in hand has recorded its outcome.
            self.log.warning("task %s redelivered while running here; waiting for the run in hand", env.id)
            await self.running[env.id].wait()
            return ACK
        done = self.running[env.id] = asyncio.Event()
        try:
            return await self._when_admitted(env, headers)
        finally:
            del self.running[env.id]
            self.cancelled.discard(env.id)
            done.set()

    async def _when_admitted(self, env: Envelope, headers: Mapping[str, Any]) -> str:
        """Run the task once a slot of this process is free and its queue admits it (not paused; its turn, under
        its limit and rate across the deployment). While it may not start it holds neither: other queues' tasks
        go ahead, and it asks again after the wait the store names (at most ASK_INTERVAL, so it keeps its
        place in line)."""
        queue = self.cfg.queues.get(env.queue)
        limit, rate = (queue.limit, queue.rate_limit) if queue is not None and queue.gated else (0, None)
        token = uuid.uuid4().hex if limit or rate else ""  # its place in line, then its slot
        waited_since = time.monotonic()
        outcome = ""
        try:
            while not outcome:
                wait = 0.0
                async with self.slots:  # [worker] concurrency; the other deliveries in hand wait their turn
                    if env.id in self.cancelled:
                        self.log.info("task %s was cancelled; acknowledging it without running it", env.id)
                        return ACK
                    if self.stopping:
                        outcome = RETURN
                    elif env.queue in self.paused:
                        outcome = PUT_BACK
                    else:
                        admitted_at = None
                        if token:
                            admit = functools.partial(self.state.admit, env.queue, token, limit, rate, self.lease)
                            wait, admitted_at = await self._durably(admit)
                        if not wait:
                            slot, token = (token if limit else ""), ""  # the slot is released after the run
                            await self._run_admitted(env, headers, slot, admitted_at)
                            return ACK
                left = HOLD_LIMIT - (time.monotonic() - waited_since)
                if not outcome and left <= 0:
                    outcome = PUT_BACK
                if not outcome:
                    wake = self.wake
                    with contextlib.suppress(TimeoutError):  # spread the waiting workers' next asks
                        pause = min(wait * (0.5 + random.random()), ASK_INTERVAL, left)
                        await asyncio.wait_for(wake.wait(), pause)
            return outcome
        finally:
            if token:  # leave the line at once rather than after LINE_PATIENCE
                with contextlib.suppress(*STORE_ERRORS):
                    await self.state.leave_line(env.queue, token)

    async def _run_admitted(self, env: Envelope, headers: Mapping[str, Any], slot: str, at: float | None) -> None:
        """Run an admitted task, holding its limit slot (if any) until its outcome is recorded."""
        if slot:
            self.slots_held[slot] = env.queue
        self.running_by_queue[env.queue] = self.running_by_queue.get(env.queue, 0) + 1
        try:
            await self._execute(env, headers, at)
        finally:
            self.running_by_queue[env.queue] -= 1
            if slot:
                del self.slots_held[slot]
                try:
                    await self.state.release_slot(env.queue, slot)
                except STORE_ERRORS as e:  # its lease runs out instead
                    self.log.warning("could not give back a slot of queue %r: %s", env.queue, e)
                self.wake_waiting()  # this process's tasks waiting their turn ask at once, not at their next poll

    async def _execute(self, env: Envelope, headers: Mapping[str, Any], admitted_at: float | None = None) -> None:
        deliveries = _int_header(headers, "x-delivery-count")
        retries = _int_header(headers, "x-retries")
        if deliveries:  # a redelivery: finished by a worker that died before its ack, or a poison message?
            status = await self._durably(lambda: self.state.status_of(env.id))
            if status is not None and status not in RUNNABLE:
                self.log.info("task %s is already %s; acknowledging the redelivery without running it", env.id, status)
                return
            if deliveries >= self.cfg.broker.delivery_limit - 1:
                # It was delivered this often without being settled: it keeps killing its worker.
                failure = Failure(f"worker died {deliveries} times running this task (delivery limit)", "", True)
                await self.give_up(env, failure, retries, headers)
                return
        about: dict[str, JSON] = {"task_id": env.id, "type": env.type, "queue": env.queue}
        if env.traceparent is not None:
            about["trace_id"] = trace_id_of(env.traceparent)
        TASK_LOG.set(about)  # this task's own context: each delivery is handled in a task of its own
        # Should the record be gone (a Redis restart without persistence, an eviction), the envelope restores it.
        restore: dict[str, JSON] = {"id": env.id, "type": env.type, "queue": env.queue, "payload": env.payload}
        restore["created_at"] = env.created_at
        started = admitted_at or time.time()
        due = env.run_at or env.created_at
        waited = None if due is None else started - due
        recorded = await self._record(
            env, "started", {"worker": self.name}, restore=restore, now=started, waited=waited
        )
        if recorded is None:
            self.log.info("task %s is already finished or cancelled; acknowledging it without running it", env.id)
            return
        attempt = int(recorded[1])
        TASK_LOG.set(about | {"attempt": attempt})
        span = None
        if TRACER is not None:
            attributes = {"asyncnode.task.id": env.id, "asyncnode.task.type": env.type, "asyncnode.queue": env.queue}
            span, _ = TRACER.start(f"run {env.type}", env.traceparent, "consumer", **attributes)
        self.in_hand[env.id] = time.time()
        status, outcome = "returned", None  # returned to the queue, should recording the outcome fail
        try:
            if span is None:
                outcome = await self.run(env, attempt)
            else:
                with cast(Tracer, TRACER).current(span):
                    outcome = await self.run(env, attempt)
            self.in_hand.pop(env.id, None)  # a cancel coming now finds it no longer running
            status = await self._conclude(env, outcome, retries, headers, attempt, started)
        finally:
            self.in_hand.pop(env.id, None)
            self.log.debug("task %s %s (attempt %d, %.3f s)", env.id, status, attempt, time.time() - started)
            if span is not None:
                error = outcome.error if status != "completed" and isinstance(outcome, Failure) else None
                cast(Tracer, TRACER).end(
                    span, error, **{"asyncnode.task.attempt": attempt, "asyncnode.task.status": status}
                )

    async def _conclude(
        self,
        env: Envelope,
        outcome: JSON | Failure | Cancelled,
        retries: int,
        headers: Mapping[str, Any],
        attempt: int,
        started: float,
    ) -> str:
        """Record and route a run's outcome; return the status it leaves the task in."""
        if isinstance(outcome, Cancelled):
            return "cancelled"  # recorded by the cancel itself: not retried, not dead-lettered
        if isinstance(outcome, Failure):
            if outcome.permanent or retries >= self.cfg.broker.max_retries:
                await self.give_up(env, outcome, retries, headers)
                return "failed"
            await self.retry_later(env, outcome, retries, headers, attempt)
            return "retrying"
        finished = time.time()
        await self._record(env, "completed", {"result": outcome}, now=finished, ran=finished - started)
        return "completed"

    async def run(self, env: Envelope, attempt: int) -> JSON | Failure | Cancelled:
        """Run the handler; return its result, a Failure, or Cancelled (it was cancelled meanwhile)."""

        def report(fraction: float, note: str | None) -> Awaitable[Any]:
            change = plan_change("progress", env.id, env.type, {"progress": fraction, "note": note}, tasks=tasks)
            return self.state.apply(change)

        tasks = self.cfg.tasks
        ctx = TaskContext(env.id, env.type, attempt, self.cfg, report)
        ttype = REGISTRY.get(env.type)
        limit = task_time_limit(self.cfg.broker, env.timeout, ttype.timeout if ttype else None)
        try:
            if ttype is None:
                raise PermanentError(f"unknown task type {env.type!r} (this worker has {', '.join(sorted(REGISTRY))})")
            payload = validate_payload(ttype, env.payload, self.cfg)
            result = None
            if ttype.is_async:
                ctx.cancelled = env.id in self.cancelled  # found cancelled since its start was recorded: not run
                if not ctx.cancelled:
                    # A cancel (watch_cancels) cancels this very task, at the handler's await; the CancelledError
                    # is taken back below, and the bookkeeping after the handler goes on as usual.
                    self.handlers[env.id] = (asyncio.current_task(), ctx)
                    result = await run_handler(ttype, payload, ctx, limit)
                    if ctx.cancelled:  # it caught the CancelledError and returned: take the cancel back
                        cast(asyncio.Task[Any], asyncio.current_task()).uncancel()
            else:
                async with self.one_thread:  # plain functions are taken for CPU-bound: one at a time per process
                    self.handlers[env.id] = (None, ctx)
                    ctx.cancelled = env.id in self.cancelled  # found cancelled while it waited for the thread
                    if not ctx.cancelled:
                        result = await run_handler(ttype, payload, ctx, limit)
            dumps(result)  # a result that cannot be stored is a failure of the task, not of the worker
        except asyncio.CancelledError:
            if not ctx.cancelled or cast(asyncio.Task[Any], asyncio.current_task()).uncancel():
                raise  # this worker itself is being cancelled
            result = Cancelled()
        except Exception as e:
            result = describe_failure(e, limit)
            self.log.warning("task %s (%s) attempt %d failed: %s", env.id, env.type, attempt, result.error)
        finally:
            self.handlers.pop(env.id, None)
        if ctx.cancelled:  # a sync handler that saw the cancel returned, or one that ended as it came
            self.log.info("task %s stopped: it was cancelled", env.id)
            result = Cancelled()
        await ctx.drain()
        return result

    async def retry_later(
        self, env: Envelope, failure: Failure, retries: int, headers: Mapping[str, Any], attempt: int
    ) -> None:
        """Record ``retrying``, then park the task in the retry queue of its delay (confirmed)."""
        delay = retry_delay_for(retries + 1, self.cfg.broker.retry_delays)
        now = time.time()
        fields = {"error": failure.error, "next_attempt_at": now + delay, "attempt": attempt, "retries": retries + 1}
        if await self._record(env, "retrying", fields) is None:
            return  # cancelled meanwhile: nothing to retry
        retry_headers = {
            "x-retries": retries + 1,
            "x-first-failed-at": headers.get("x-first-failed-at") or header_time(now),
            "x-last-error": failure.error,
        }
        await self.broker.publish_later(env, delay, retry_headers)

    async def give_up(self, env: Envelope, failure: Failure, retries: int, headers: Mapping[str, Any]) -> None:
        """Send the task to the DLQ with why (confirmed), then record ``failed``."""
        now = time.time()
        if await self._durably(lambda: self.state.status_of(env.id)) == "cancelled":
            return  # cancelled meanwhile: nothing to dead-letter
        attempts = await self._durably(lambda: self.state.attempts_of(env.id))
        dlq_headers = {
            "x-error": failure.error,
            "x-traceback": failure.traceback,
            "x-attempts": attempts or retries + 1,
            "x-first-failed-at": headers.get("x-first-failed-at") or header_time(now),
            "x-last-failed-at": header_time(now),
        }
        await self.broker.dead_letter(env, dlq_headers)
        await self._record(env, "failed", {"error": failure.error})

    async def drain(self) -> None:
        """Wait for every task in hand to finish and be acknowledged."""
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)


def _int_header(headers: Mapping[str, Any], name: str) -> int:
    try:
        return int(headers.get(name) or 0)
    except (TypeError, ValueError):
        return 0


def served_queues(cfg: Config, queues: Iterable[str], instance: str | None) -> tuple[str, ...]:
    """The queues a worker consumes: those given (``--queues``), else its instance's, else every declared one."""
    chosen = tuple(queues)
    if not chosen and instance and instance in cfg.instances:
        chosen = cfg.instances[instance].queues
    return cfg.check_queues(chosen, "--queues") if chosen else tuple(cfg.queues)


async def run_worker(cfg: Config, queues: Iterable[str] = ()) -> int:
    """Consume tasks of ``queues`` (see served_queues) until SIGTERM/SIGINT; then stop consuming, finish the tasks
    in hand and exit 0."""
    wlog = log.getChild("worker")
    load_handlers(cfg)
    instance = os.environ.get("ASYNCNODE_INSTANCE", "")
    serve = served_queues(cfg, queues, instance)
    stop = stop_event()
    code = 0
    async with backend(cfg, "worker") as (broker, state):
        try:
            # Until connected, however long RabbitMQ is away (supervisord would only restart us).
            async for attempt in retrying(BrokerUnavailable, what="task queue unreachable", logger=wlog, stop=stop):
                with attempt:
                    await broker.connect()
        except BrokerUnavailable:
            return 0  # asked to stop before RabbitMQ came
        worker = Worker(cfg, state, broker, instance, serve)
        # Up to [worker] concurrency tasks run at once; with as many again in hand, the next one is
        # there the moment one finishes.
        concurrency = cfg.worker.concurrency
        prefetch = max(cfg.broker.prefetch, 2 * concurrency if concurrency > 1 else 1)
        try:
            errors = (BrokerUnavailable, *STORE_ERRORS)
            async for attempt in retrying(
                errors, what="cannot consume", logger=wlog, attempts=START_ATTEMPTS, stop=stop
            ):
                with attempt:
                    # A pause made before this worker started holds for it too.
                    worker.paused = await worker.state.paused_queues()
                    worker.consumed = tuple(q for q in serve if q not in worker.paused)
                    await broker.start_consuming(worker.on_message, prefetch, worker.consumed)
        except (BrokerUnavailable, *STORE_ERRORS) as e:
            if stop.is_set():
                return 0
            wlog.error("giving up after %d attempts: %s", START_ATTEMPTS, e)
            return 1
        heartbeat = asyncio.create_task(worker.heartbeat_loop())
        control = asyncio.create_task(worker.control_loop())
        promoter = asyncio.create_task(worker.promote_loop())
        scheduling = asyncio.Event()  # set: stop competing for the scheduler lease
        owner = f"{worker.name}:worker:{uuid.uuid4().hex[:6]}"
        scheduler = asyncio.create_task(run_scheduler(broker, state, cfg, owner, scheduling)) if cfg.schedules else None
        paused = [q for q in serve if q in worker.paused]
        wlog.info(
            "worker %s consuming %s from %s (prefetch %d each; types: %s)%s",
            worker.name,
            ", ".join(f"{q} ({cfg.broker_name(q)})" for q in serve),
            broker.describe(),
            prefetch,
            ", ".join(sorted(REGISTRY)),
            f"; paused: {', '.join(paused)}" if paused else "",
        )
        if await broker.wait_consuming(stop):
            wlog.error(
                "no working consumer for %g s; exiting so that a fresh process takes over", cfg.broker.no_consumer_exit
            )
            code = 1
        wlog.info("stopping: finishing %d task(s) in hand", len(worker.inflight))
        worker.stopping = True
        worker.wake_waiting()
        promoter.cancel()
        scheduling.set()
        if scheduler is not None:
            await asyncio.wait({scheduler}, timeout=SHUTDOWN_STEP_TIMEOUT)
        await broker.stop_consuming()
        await worker.drain()  # a cancel still stops a task in hand meanwhile
        control.cancel()
        heartbeat.cancel()
        await asyncio.wait({heartbeat, control, promoter})
        with contextlib.suppress(*STORE_ERRORS):
            await state.forget_worker(worker.name)
    wlog.info("stopped after %d task(s)", worker.tasks_done)
    return code


# ============================================================================
# Role: up (supervise one host's processes), and ctl
# ============================================================================


def run_dir_for(cfg: Config, name: str, arg: str | None) -> Path:
    """Where ``up`` keeps an instance's rendered config, socket and logs."""
    chosen = arg or os.environ.get("ASYNCNODE_RUN_DIR")
    return Path(chosen).resolve() if chosen else cfg.path.resolve().parent / "run" / name


def write_supervisord_conf(cfg: Config, name: str, inst: InstanceConfig, run_dir: Path) -> Path:
    """Render the top-level supervisord.conf for this instance into its run directory."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    values = supervisor_values(cfg, name, inst, run_dir, os.cpu_count() or 1)
    rendered = render_supervisord((HERE / "supervisord.conf").read_text(encoding="utf-8"), values)
    target = run_dir / "supervisord.conf"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(rendered, encoding="utf-8")
    tmp.replace(target)  # atomically, so a concurrent reread never sees half a file
    return target


def supervisor_processes(run_dir: Path) -> list[dict[str, Any]]:
    """``getAllProcessInfo()`` of the supervisord of ``run_dir`` (blocking; raises OSError if it is not there)."""
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, serverurl=f"unix://{run_dir / 'supervisor.sock'}")
    try:
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return cast(list[dict[str, Any]], proxy.supervisor.getAllProcessInfo())
    finally:
        transport.close()


def _describe_instance(cfg: Config, name: str, inst: InstanceConfig) -> str:
    parts = []
    if "api" in inst.roles:
        parts.append(f"api on port {cfg.api.port if inst.api_port is None else inst.api_port}")
    if "worker" in inst.roles:
        serving = ", ".join(inst.queues or cfg.queues)
        parts.append(f"{worker_count(cfg, inst, os.cpu_count() or 1)} worker(s) serving {serving}")
    return f"instance {name!r} (host {inst.host!r}): {', '.join(parts)}"


def run_up(cfg: Config, args: argparse.Namespace) -> int:
    """Run supervisord in the foreground with this host's processes (replaces this process)."""
    name, inst = select_instance(cfg, args.instance, os.environ, socket.gethostname())
    if "api" in inst.roles and (problem := exposure_error(cfg)) is not None:
        raise ConfigError(problem)  # before supervisord, which would restart a refusing API for ever
    run_dir = run_dir_for(cfg, name, args.run_dir)
    conf = write_supervisord_conf(cfg, name, inst, run_dir)
    print(f"asyncnode: {_describe_instance(cfg, name, inst)}", flush=True)
    print(f"asyncnode: run directory {run_dir} (logs in {run_dir / 'logs'})", flush=True)
    if args.dry_run:
        print(conf.read_text(encoding="utf-8"), end="")
        return 0
    # exec, so that SIGTERM to `up` reaches supervisord itself and stops everything in order.
    os.execv(sys.executable, [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)])


def run_ctl(cfg: Config, args: argparse.Namespace) -> int:
    """``status``, ``restart`` or ``reload`` (re-read config.toml, apply the difference) the supervised processes."""
    name, inst = select_instance(cfg, args.instance, os.environ, socket.gethostname())
    run_dir = run_dir_for(cfg, name, args.run_dir)
    conf, sock = run_dir / "supervisord.conf", run_dir / "supervisor.sock"
    if not sock.exists():
        print(f"asyncnode: instance {name!r} is not running (no {sock}); start it with up", file=sys.stderr)
        return 1
    command = {"status": ["status"], "restart": ["restart", "all"], "reload": ["update"]}[args.action]
    if args.action == "reload":
        write_supervisord_conf(cfg, name, inst, run_dir)
        print(f"asyncnode: reloading {_describe_instance(cfg, name, inst)}", flush=True)
    return subprocess.call([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *command])


# ============================================================================
# Client
# ============================================================================

#: Statuses after which nothing more happens to a task.
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled", "rejected"})


@dataclasses.dataclass(frozen=True)
class Task:
    """A task as the clients give it: the answer to its submission, or its whole record (``record``)."""

    id: str
    status: str | None
    queue: str | None = None
    type: str | None = None
    result: JSON = None
    error: str | None = None
    run_at: float | None = None
    record: Mapping[str, JSON] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, JSON]) -> Task:
        """A task from an answer or a record (a bulk submit's rejected item may have no id: "")."""
        error, run_at = data.get("error"), data.get("run_at")
        return cls(
            str(data.get("id") or ""),
            cast(str | None, data.get("status")),
            cast(str | None, data.get("queue")),
            cast(str | None, data.get("type")),
            data.get("result"),
            None if error is None else str(error),
            float(run_at) if isinstance(run_at, int | float) else None,
            dict(data),
        )

    @property
    def finished(self) -> bool:
        """Whether nothing more happens to it (completed, failed, cancelled or rejected)."""
        return self.status in FINAL_STATUSES


class _Transport(Protocol):
    """How a Client reaches the deployment: over HTTP, or straight to the backend. Each raises asyncnode's errors."""

    async def submit(self, body: dict[str, JSON], key: str | None, traceparent: str | None) -> dict[str, JSON]: ...
    async def submit_many(self, items: list[dict[str, JSON]], traceparent: str | None) -> list[dict[str, JSON]]: ...
    async def get(self, tid: str) -> dict[str, JSON]: ...
    async def cancel(self, tid: str) -> dict[str, JSON]: ...
    async def task_types(self) -> list[dict[str, JSON]]: ...
    def updates(self, subscription: JSON) -> AsyncGenerator[dict[str, JSON] | None, None]: ...
    async def close(self) -> None: ...


class _HttpTransport:
    """The API over HTTP (aiohttp), the token as a Bearer header; the WebSocket for updates."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: Any = None

    def session(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def request(
        self, method: str, path: str, body: JSON = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """Send one request; return (status, JSON body) for a 2xx or a 503 with items, else raise its error."""
        import aiohttp

        try:
            async with self.session().request(
                method, self.url + path, json=body, headers={**self.headers, **(headers or {})}
            ) as response:
                status = response.status
                data = await response.json(content_type=None) if response.content_length != 0 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise Unavailable(f"{self.url}: {e or type(e).__name__}") from e
        if status < 400 or (status == 503 and isinstance(data, dict) and "items" in data):
            return status, data
        raise _http_error(status, data if isinstance(data, dict) else {})

    async def submit(self, body: dict[str, JSON], key: str | None, traceparent: str | None) -> dict[str, JSON]:
        headers = {**({"Idempotency-Key": key} if key else {}), **({"traceparent": traceparent} if traceparent else {})}
        return cast(dict[str, JSON], (await self.request("POST", "/api/tasks", body, headers))[1])

    async def submit_many(self, items: list[dict[str, JSON]], traceparent: str | None) -> list[dict[str, JSON]]:
        headers = {"traceparent": traceparent} if traceparent else {}
        return cast(list[dict[str, JSON]], (await self.request("POST", "/api/tasks", items, headers))[1]["items"])

    async def get(self, tid: str) -> dict[str, JSON]:
        return cast(dict[str, JSON], (await self.request("GET", f"/api/tasks/{tid}"))[1])

    async def cancel(self, tid: str) -> dict[str, JSON]:
        return cast(dict[str, JSON], (await self.request("POST", f"/api/tasks/{tid}/cancel"))[1])

    async def task_types(self) -> list[dict[str, JSON]]:
        return cast(list[dict[str, JSON]], (await self.request("GET", "/api/task-types"))[1]["items"])

    async def updates(self, subscription: JSON) -> AsyncGenerator[dict[str, JSON] | None, None]:
        import aiohttp

        ws_url = "ws" + self.url.removeprefix("http") + "/ws"
        try:
            ws = await self.session().ws_connect(ws_url, headers=self.headers, heartbeat=WS_HEARTBEAT)
        except aiohttp.WSServerHandshakeError as e:
            raise _http_error(e.status, {"error": f"WebSocket refused: {e.message}"}) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise Unavailable(f"{ws_url}: {e or type(e).__name__}") from e
        async with ws:  # subscribed once connected: the API joins it to its updates before the handshake ends
            await ws.send_str(dumps({"subscribe": subscription}))
            yield None
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = loads(msg.data)
                for update in frame if isinstance(frame, list) else [frame]:
                    yield update
        raise Unavailable(f"{ws_url}: the WebSocket closed")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _http_error(status: int, data: Mapping[str, JSON]) -> AsyncnodeError:
    """The error an API answer stands for."""
    message = str(data.get("error") or f"HTTP {status}")
    if status == 400:
        field, index = data.get("field"), data.get("index")
        return ValidationError(message, str(field) if field else None, index if isinstance(index, int) else None)
    if status == 404:
        return NotFound(message)
    if status in (409, 422):
        found = data.get("status")
        return Conflict(message, str(found) if found else None)
    if status == 503:
        return Unavailable(message)
    return AsyncnodeError(message)


class _DirectTransport:
    """The backend itself, with the API's semantics: validation, the store write, the confirmed publish."""

    def __init__(self, cfg: Config, by: str) -> None:
        self.cfg, self.by = cfg, by
        self._backend: tuple[TaskQueue, TaskStore] | None = None

    def backend(self) -> tuple[TaskQueue, TaskStore]:
        if self._backend is None:
            self._backend = open_backend(self.cfg, "client")
        return self._backend

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Store and broker errors as Unavailable (the services raise Refused, an Unavailable, for the rest)."""
        try:
            yield
        except (*STORE_ERRORS, BrokerUnavailable) as e:
            raise Unavailable(f"{self.backend()[1].label} unavailable: {e}") from e

    async def submit(self, body: dict[str, JSON], key: str | None, traceparent: str | None) -> dict[str, JSON]:
        sub = validate_submission(body, self.cfg)
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            raise ValidationError("Idempotency-Key must be 1 to 200 printable ASCII characters")
        broker, store = self.backend()
        with self._reaching():
            if key is None:
                return await submit_task(broker, store, self.cfg, sub, traceparent=traceparent)
            fingerprint = body_fingerprint(body)
            return (await submit_once(broker, store, self.cfg, sub, key, fingerprint, traceparent=traceparent))[1]

    async def submit_many(self, items: list[dict[str, JSON]], traceparent: str | None) -> list[dict[str, JSON]]:
        batch = validate_batch(cast(JSON, items), self.cfg)
        broker, store = self.backend()
        with self._reaching():
            return await submit_batch(broker, store, self.cfg, batch, traceparent)

    async def get(self, tid: str) -> dict[str, JSON]:
        with self._reaching():
            rec = await self.backend()[1].get(tid) if TASK_ID.fullmatch(tid) else None
        if rec is None:
            raise NotFound(f"no task {tid[:64]!r}")
        return rec

    async def cancel(self, tid: str) -> dict[str, JSON]:
        with self._reaching():
            done, status = await cancel_task(self.backend()[1], self.cfg, tid, {"cancelled_by": self.by})
        if status is None:
            raise NotFound(f"no task {tid[:64]!r}")
        if not done:
            raise Conflict(f"task {tid} is already {status}", status)
        return {"id": tid, "status": "cancelled"}

    async def task_types(self) -> list[dict[str, JSON]]:
        return [t.describe(self.cfg.api.max_text) for t in sorted(REGISTRY.values(), key=lambda t: t.name)]

    async def updates(self, subscription: JSON) -> AsyncGenerator[dict[str, JSON] | None, None]:
        with self._reaching():
            async with contextlib.aclosing(self.backend()[1].follow()) as updates:
                async for message in updates:
                    yield None if message is None else loads(message)

    async def close(self) -> None:
        if self._backend is not None:
            broker, store = self._backend
            self._backend = None
            await broker.close()
            await store.close()


class Client:
    """Submit, follow and cancel tasks from Python, with asyncio: over HTTP (``Client(url, token=...)``), or straight
    to the configured backend (``Client.from_config(path)``: no HTTP hop, the API's exact semantics). Errors are
    ValidationError, NotFound, Conflict and Unavailable (and AsyncnodeError for a refused token)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0) -> None:
        self._transport: _Transport = _HttpTransport(url, token, timeout)

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str] | Config | None = None, *, cancelled_by: str = "client"
    ) -> Client:
        """A client on the backend ``path`` (default: $ASYNCNODE_CONFIG, else ./config.toml) names; its task types
        loaded, and traces on as in the API when OpenTelemetry is configured. ``cancelled_by``: what its cancels
        record."""
        cfg = path if isinstance(path, Config) else Config.from_toml(config_path(None if path is None else str(path)))
        load_handlers(cfg)
        setup_tracing("client")
        client = cls.__new__(cls)
        client._transport = _DirectTransport(cfg, cancelled_by)
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close its connections."""
        await self._transport.close()

    async def submit(
        self,
        type: str,
        payload: Mapping[str, JSON] | None = None,
        *,
        queue: str | None = None,
        delay: float | None = None,
        run_at: float | str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> Task:
        """Submit one task; its ``id``, ``status`` (``pending``, or ``scheduled`` with a delay) and ``queue``."""
        body = _submission(type, payload, queue=queue, delay=delay, run_at=run_at, timeout=timeout)
        return Task.from_json(await self._transport.submit(body, idempotency_key, traceparent))

    async def submit_many(self, items: Iterable[Mapping[str, JSON]], *, traceparent: str | None = None) -> list[Task]:
        """Submit several tasks at once (dicts as a submission's body, each with an optional ``idempotency_key``),
        all validated first; a Task each, in order: one not queued says ``rejected`` (with its ``error``), one whose
        key was used with another body ``conflict``."""
        answers = await self._transport.submit_many([dict(item) for item in items], traceparent)
        return [Task.from_json(answer) for answer in answers]

    async def get(self, id: str) -> Task:
        """The task's whole record (``record``: its history too); NotFound if there is none."""
        return Task.from_json(await self._transport.get(id))

    async def cancel(self, id: str) -> Task:
        """Cancel it wherever it waits or runs; NotFound, or Conflict (with its ``status``) if already finished."""
        return Task.from_json(await self._transport.cancel(id))

    async def task_types(self) -> list[dict[str, JSON]]:
        """The task types and their payload fields, as ``GET /api/task-types`` gives them."""
        return await self._transport.task_types()

    async def wait(self, id: str, timeout: float | None = None) -> Task:
        """The task once finished (TimeoutError after ``timeout`` seconds): told by the updates, not polled."""
        async with asyncio.timeout(timeout), contextlib.aclosing(self._transport.updates({"ids": [id]})) as updates:
            async for update in updates:
                # Subscribed (or subscribed again after a gap): its record now, then its updates.
                if update is None or (update.get("id") == id and update.get("status") in FINAL_STATUSES):
                    task = await self.get(id)
                    if task.finished:
                        return task
        raise Unavailable("the updates ended")  # pragma: no cover - updates end only by raising

    async def stream(
        self, *, types: Iterable[str] = (), ids: Iterable[str] = (), queue: str | None = None
    ) -> AsyncIterator[dict[str, JSON]]:
        """Every update from now on (of these types, ids and queue only, if given), as the WebSocket sends them."""
        types, ids = frozenset(types), frozenset(ids)
        subscription: JSON = {"ids": sorted(ids), "types": sorted(types)} if types or ids else "*"
        queues: dict[str, str | None] = {}  # id -> queue: most updates do not name it
        async with contextlib.aclosing(self._transport.updates(subscription)) as updates:
            async for update in updates:
                if update is None or "id" not in update:
                    continue
                tid = str(update["id"])
                if (types and update.get("type") not in types and tid not in ids) or (
                    ids and not types and tid not in ids
                ):
                    continue
                if queue is not None:
                    if tid not in queues:
                        if len(queues) > MAX_SUBSCRIBED * 10:
                            queues.clear()
                        if "queue" in update:
                            queues[tid] = cast(str, update["queue"])
                        else:
                            with contextlib.suppress(NotFound):
                                queues[tid] = (await self.get(tid)).queue
                    if queues.get(tid) != queue:
                        continue
                yield update


def _submission(
    type: str,
    payload: Mapping[str, JSON] | None,
    *,
    queue: str | None,
    delay: float | None,
    run_at: float | str | None,
    timeout: float | None,
) -> dict[str, JSON]:
    """A submission's body from a client's arguments."""
    body: dict[str, JSON] = {"type": type, "payload": dict(payload or {})}
    for key, value in (("queue", queue), ("delay", delay), ("run_at", run_at), ("timeout", timeout)):
        if value is not None:
            body[key] = value
    return body


class SyncClient:
    """Client's methods, blocking, for WSGI apps, scripts and threads: the client runs on an event loop of its own,
    in a daemon thread, and any thread may call it."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0) -> None:
        self._start(lambda: Client(url, token, timeout=timeout))

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | Config | None = None) -> SyncClient:
        """See Client.from_config."""
        client = cls.__new__(cls)
        client._start(lambda: Client.from_config(path))
        return client

    def _start(self, make: Callable[[], Client]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asyncnode-client", daemon=True)
        self._thread.start()
        self._client = make()

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, type: str, payload: Mapping[str, JSON] | None = None, **options: Any) -> Task:
        """See Client.submit."""
        return cast(Task, self._run(self._client.submit(type, payload, **options)))

    def submit_many(self, items: Iterable[Mapping[str, JSON]], **options: Any) -> list[Task]:
        """See Client.submit_many."""
        return cast(list[Task], self._run(self._client.submit_many(list(items), **options)))

    def get(self, id: str) -> Task:
        """See Client.get."""
        return cast(Task, self._run(self._client.get(id)))

    def cancel(self, id: str) -> Task:
        """See Client.cancel."""
        return cast(Task, self._run(self._client.cancel(id)))

    def wait(self, id: str, timeout: float | None = None) -> Task:
        """See Client.wait."""
        return cast(Task, self._run(self._client.wait(id, timeout)))

    def task_types(self) -> list[dict[str, JSON]]:
        """See Client.task_types."""
        return cast(list[dict[str, JSON]], self._run(self._client.task_types()))

    def stream(self, **filters: Any) -> Iterator[dict[str, JSON]]:
        """See Client.stream: a plain iterator (close it, or leave the loop, to stop following)."""
        updates = cast(AsyncGenerator[dict[str, JSON], None], self._client.stream(**filters))

        async def step() -> dict[str, JSON] | None:
            return await anext(updates, None)

        try:
            while (update := self._run(step())) is not None:
                yield cast(dict[str, JSON], update)
        finally:
            self._run(updates.aclose())

    def close(self) -> None:
        """Close its connections and stop its thread."""
        if self._thread.is_alive():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(SHUTDOWN_STEP_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ============================================================================
# Commands: check, dlq, queues, schedules; submit, status, watch, cancel (through a Client)
# ============================================================================


async def run_check(cfg: Config, args: argparse.Namespace) -> int:
    """Validate the config, reach the queue and the store (RabbitMQ and Redis, or the SQLite file) and supervisord."""
    name, inst = select_instance(cfg, args.instance, os.environ, socket.gethostname())
    problems: list[str] = []
    print(f"config     {cfg.path}: ok; {_describe_instance(cfg, name, inst)}")
    if "api" in inst.roles and (problem := exposure_error(cfg)) is not None:
        problems.append(problem)
    async with backend(cfg, "check") as (broker, state):
        # Embedded, the queue and the store are one file: name it once.
        shared = broker.describe() == state.describe()
        for label, part, what in (("queue", broker, broker.describe()), ("store", state, state.describe())):
            try:
                print(f"{label:<10} {'the same file' if shared and part is state else what}: {await part.report()}")
            except (BrokerUnavailable, *STORE_ERRORS, TimeoutError) as e:
                problems.append(
                    str(e) if isinstance(e, BrokerUnavailable) else f"{what} unreachable: {e or type(e).__name__}"
                )
        with contextlib.suppress(*STORE_ERRORS, TimeoutError):  # unreachable: reported above
            async with asyncio.timeout(READY_TIMEOUT * 2):
                workers, paused = await state.workers(), await state.paused_queues()
            serving = {q: sum(q in cast(list[str], w.get("queues") or ()) for w in workers) for q in cfg.queues}
            shown = [f"{q}: {n}{' (paused)' if q in paused else ''}" for q, n in serving.items()]
            print(f"{'consumers':<10} live workers serving each queue: {', '.join(shown)}")
    run_dir = run_dir_for(cfg, name, args.run_dir)
    if (run_dir / "supervisor.sock").exists():
        try:
            infos = await asyncio.to_thread(supervisor_processes, run_dir)
            states = ", ".join(f"{p['name']} {p['statename']}" for p in infos)
            print(f"supervisor {run_dir}: {states or 'no processes'}")
            bad = [p["name"] for p in infos if p["statename"] in ("FATAL", "BACKOFF", "EXITED", "UNKNOWN")]
            if bad:
                problems.append(f"processes not running: {', '.join(bad)} (see {run_dir / 'logs'})")
        except OSError as e:
            problems.append(f"supervisord of {run_dir} not answering: {e}")
    else:
        print(f"supervisor {run_dir}: not running")
    for problem in problems:
        print(f"problem    {problem}")
    return 1 if problems else 0


def _failed(state: TaskStore, e: BaseException) -> int:
    """A command's one-line report of the queue or store it could not use; its exit status (1)."""
    away = isinstance(e, STORE_ERRORS)
    print(f"asyncnode: {state.describe()} unavailable: {e}" if away else f"asyncnode: {e}", file=sys.stderr)
    return 1


async def run_dlq(cfg: Config, args: argparse.Namespace) -> int:
    """``dlq list``, ``dlq requeue [ID ...]`` (all when no id) or ``dlq purge``."""
    async with backend(cfg, "dlq") as (broker, state):
        try:
            if args.action == "list":
                items, total = await broker.dead_letters(MAX_LIST_LIMIT)
                for item in items:
                    when = item["failed_at"]
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, float) else "?"
                    print(
                        f"{item['id']}  {item['type'] or '?':<10}  {stamp}  attempts={item['attempts'] or '?'}  "
                        f"{item['error']}"
                    )
                print(f"{total} dead letter(s) in {cfg.broker.queue + DLQ_SUFFIX}")
            elif args.action == "requeue":
                count = 0
                for task_id in args.ids or [None]:
                    n = await requeue_dead_letters(broker, state, cfg, task_id)
                    if task_id is not None and n == 0:
                        print(f"asyncnode: no dead letter with id {task_id}", file=sys.stderr)
                    count += n
                print(f"requeued {count} task(s)")
            else:
                print(f"purged {await broker.purge_dead_letters()} dead letter(s)")
        except (BrokerUnavailable, *STORE_ERRORS) as e:
            return _failed(state, e)
    return 0


def _when(t: JSON) -> str:
    """An epoch time as local ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "-"


def _client(cfg: Config, args: argparse.Namespace) -> Client:
    """The client a command uses: the remote API of ``--url`` (its token from $ASYNCNODE_TOKEN), else the backend."""
    if args.url:
        return Client(args.url, os.environ.get("ASYNCNODE_TOKEN") or None)
    return Client.from_config(cfg, cancelled_by="cli")


def coerce_fields(pairs: Iterable[str], fields: Iterable[Mapping[str, JSON]]) -> dict[str, JSON]:
    """``FIELD=VALUE`` arguments as payload values of the fields' declared types (task_types' ``fields``); a field
    not declared stays text (the submission's validation names it). ValidationError naming the field at fault."""
    types = {str(f["name"]): str(f.get("type")) for f in fields}
    payload: dict[str, JSON] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ValidationError(f"{pair[:64]!r}: expected FIELD=VALUE")
        kind = types.get(name, "string")
        try:
            if kind == "integer":
                payload[name] = int(text)
            elif kind == "number":
                payload[name] = float(text)
            elif kind == "boolean":
                payload[name] = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[
                    text.strip().lower()
                ]
            else:
                payload[name] = text
        except (ValueError, KeyError):
            raise ValidationError(
                f"{name}: {text[:64]!r} is not a{'n' if kind == 'integer' else ''} {kind}", name
            ) from None
    return payload


async def run_submit(cfg: Config, args: argparse.Namespace) -> int:
    """``submit TYPE [FIELD=VALUE ...]``: print the new task's id; with ``--wait`` its result as JSON (exit 0), or
    its record if it failed or was cancelled (1), or 3 on timeout; 2 for bad input, nothing submitted."""
    async with _client(cfg, args) as client:
        try:
            payload: JSON = {} if args.payload is None else loads(args.payload)
            if not isinstance(payload, dict):
                raise ValidationError("--payload must be a JSON object")
            types = {str(t["name"]): t for t in await client.task_types()}
            fields = cast(list[Mapping[str, JSON]], types.get(args.type, {}).get("fields") or [])
            payload |= coerce_fields(args.fields, fields)
            options = {"queue": args.queue, "delay": args.delay, "run_at": args.run_at, "idempotency_key": args.key}
            task = await client.submit(args.type, payload, **options)
        except (ValueError, ValidationError) as e:
            print(f"asyncnode: {'--payload is not JSON' if not isinstance(e, ValidationError) else e}", file=sys.stderr)
            return 2
        except AsyncnodeError as e:
            print(f"asyncnode: {e}", file=sys.stderr)
            return 1
        print(task.id, flush=True)
        if not args.wait:
            return 0
        try:
            task = await client.wait(task.id, args.timeout)
        except TimeoutError:
            print(f"asyncnode: task {task.id} not finished after {args.timeout:g} s", file=sys.stderr)
            return 3
        except AsyncnodeError as e:
            print(f"asyncnode: {e}", file=sys.stderr)
            return 1
    print(dumps(task.result if task.status == "completed" else dict(task.record)))
    return 0 if task.status == "completed" else 1


async def run_status(cfg: Config, args: argparse.Namespace) -> int:
    """``status ID``: the task's record, a line per field (``--json``: as JSON); 1 if there is no such task."""
    async with _client(cfg, args) as client:
        try:
            task = await client.get(args.id)
        except AsyncnodeError as e:
            print(f"asyncnode: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(dumps(dict(task.record)))
        return 0
    for key, value in task.record.items():
        if key != "history" and value is not None:
            print(
                f"{key}: {_when(value) if key.endswith('_at') else value if isinstance(value, str) else dumps(value)}"
            )
    for entry in cast(list[dict[str, JSON]], task.record.get("history") or []):
        print(f"  {_when(entry.get('ts'))} {entry.get('status')}")
    return 0


async def run_watch(cfg: Config, args: argparse.Namespace) -> int:
    """``watch``: a line per update (of ``--type`` and ``--queue`` only, if given) until SIGINT or SIGTERM (exit 0)."""
    stop = stop_event()
    async with _client(cfg, args) as client:

        async def follow() -> None:
            async for u in client.stream(types=[args.type] if args.type else (), queue=args.queue):
                extra = " ".join(f"{k}={dumps(u[k])}" for k in ("result", "error", "progress") if u.get(k) is not None)
                print(
                    f"{_when(u.get('ts'))} {u.get('id')} {u.get('type')} {u.get('status')} {extra}".rstrip(), flush=True
                )

        watching = asyncio.ensure_future(follow())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (watching, stopping):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        if watching.done() and not watching.cancelled() and (e := watching.exception()) is not None:
            print(f"asyncnode: {e}", file=sys.stderr)
            return 1
    return 0


async def run_cancel(cfg: Config, args: argparse.Namespace) -> int:
    """``cancel ID...``: cancel each task (see cancel_task); 0 if every one is cancelled by this, 1 if not."""
    code = 0
    async with _client(cfg, args) as client:
        for tid in args.ids:
            try:
                await client.cancel(tid)
                line = "cancelled"
            except NotFound:
                line = "no such task"
            except Conflict as e:
                line = f"already {e.status}"
            except AsyncnodeError as e:
                print(f"asyncnode: {e}", file=sys.stderr)
                return 1
            print(f"{tid}: {line}")
            code = code if line == "cancelled" else 1
    return code


async def run_schedules(cfg: Config, args: argparse.Namespace) -> int:
    """``schedules list``, or ``schedules pause|resume|run NAME``."""
    if args.name is not None and args.name not in cfg.schedules:
        raise ConfigError(f"no schedule {args.name!r} in {cfg.path} (known: {', '.join(cfg.schedules) or 'none'})")
    async with backend(cfg, "schedules") as (broker, state):
        try:
            if args.action == "list":
                for item in await schedule_items(state, cfg):
                    when = f"cron {item['cron']!r}" if item["cron"] else f"every {item['every']:g} s"
                    nxt = "paused" if item["paused"] else f"next {_when(item['next_run_at'])}"
                    last = f"last {_when(item['last_run_at'])} {item['last_task_id'] or ''} {item['last_status'] or ''}"
                    print(f"{item['name']}  {item['type']}  {when} {item['timezone']}  {nxt}  {last.rstrip()}")
                if not cfg.schedules:
                    print(f"no schedules in {cfg.path}")
            elif args.action == "run":
                print(f"{args.name}: {(await run_schedule_now(broker, state, cfg, args.name))['id']}")
            else:
                await set_schedule_paused(state, args.name, args.action == "pause")
                print(f"{args.name}: {'paused' if args.action == 'pause' else 'resumed'}")
        except (BrokerUnavailable, Refused, *STORE_ERRORS) as e:
            return _failed(state, e)
    return 0


async def run_queues(cfg: Config, args: argparse.Namespace) -> int:
    """``queues list`` (each queue's figures), ``queues pause NAME`` or ``queues resume NAME``."""
    if args.action != "list":
        cfg.check_queues([args.name], f"queues {args.action}")  # one line, exit 2
    async with backend(cfg, "queues") as (broker, state):
        try:
            if args.action != "list":
                changed = await state.set_paused(args.name, args.action == "pause")
                done = "paused" if args.action == "pause" else "resumed"
                print(f"queue {args.name} {done}" if changed else f"queue {args.name} was already {done}")
                return 0
            paused = await state.paused_queues()
            try:
                figures, dlq = await broker.queue_figures()
            except BrokerUnavailable as e:
                print(f"asyncnode: {e}", file=sys.stderr)
                figures, dlq = {}, None
            consumers: dict[str, int] = {}
            for w in await state.workers():
                for served in cast(list[str], w.get("queues") or ()):
                    consumers[served] = consumers.get(served, 0) + 1
            print(f"{'queue':<16} {'state':<7} {'ready':>6} {'running':>7} {'retrying':>8} {'workers':>7}  limits")
            for name, q in cfg.queues.items():
                f = figures.get(name, {})
                shown = ["-" if f.get(k) is None else str(f[k]) for k in ("ready", "running", "retrying")]
                limits = ", ".join(
                    [*([f"limit {q.limit}"] if q.limit else []), *([f"rate {q.rate}"] if q.rate else [])]
                )
                state_ = "paused" if name in paused else "active"
                print(
                    f"{name:<16} {state_:<7} {shown[0]:>6} {shown[1]:>7} {shown[2]:>8} {consumers.get(name, 0):>7}  "
                    f"{limits or '-'}"
                )
            print(f"{'-' if dlq is None else dlq} dead letter(s) in {cfg.broker.queue + DLQ_SUFFIX}")
        except STORE_ERRORS as e:
            print(f"asyncnode: {state.describe()} unavailable: {e}", file=sys.stderr)
            return 1
    return 0


# ============================================================================
# Command line
# ============================================================================

#: The long-running roles, each one process.
ROLES: Final[dict[str, Callable[[Config, argparse.Namespace], Coroutine[Any, Any, int]]]] = {
    "api": lambda cfg, args: run_api(cfg),
    "worker": lambda cfg, args: run_worker(cfg, args.queues),
}
#: Commands that manage a host rather than serve.
COMMANDS: Final[dict[str, Callable[[Config, argparse.Namespace], Any]]] = {
    "up": run_up,
    "ctl": run_ctl,
    "check": run_check,
    "dlq": run_dlq,
    "queues": run_queues,
    "cancel": run_cancel,
    "schedules": run_schedules,
    "submit": run_submit,
    "status": run_status,
    "watch": run_watch,
}


def _queue_list(text: str) -> tuple[str, ...]:
    """``--queues mail,heavy`` as a tuple of names (checked against config.toml once it is read)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected one or more queue names, separated by commas")
    return names


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"asyncnode: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="asyncnode", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"asyncnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    commands = {
        "api": "run one API process",
        "worker": "run one worker process",
        "up": "run this host's instance under supervisord, in the foreground",
        "ctl": "status, restart or reload the processes started by up",
        "check": "validate config.toml and reach RabbitMQ, Redis and supervisord",
        "dlq": "list, requeue or purge dead letters",
        "queues": "list the queues, or pause or resume one on every host",
        "cancel": "cancel tasks, wherever they wait or run",
        "schedules": "list the schedules, or pause, resume or run one now",
        "submit": "submit a task (and with --wait, wait for its result)",
        "status": "show a task's record",
        "watch": "print every update as it happens, until Ctrl-C",
    }
    for command, helptext in commands.items():
        p = sub.add_parser(command, help=helptext, description=helptext)
        if command == "ctl":
            p.add_argument("action", choices=("status", "restart", "reload"))
        if command == "dlq":
            p.add_argument("action", choices=("list", "requeue", "purge"))
            p.add_argument("ids", nargs="*", metavar="ID", help="task ids to requeue (default: all)")
        if command == "queues":
            p.add_argument("action", choices=("list", "pause", "resume"))
            p.add_argument("name", nargs="?", metavar="NAME", help="the queue to pause or resume")
        if command == "schedules":
            p.add_argument("action", choices=("list", "pause", "resume", "run"))
            p.add_argument("name", nargs="?", metavar="NAME", help="the schedule to pause, resume or run")
        if command == "cancel":
            p.add_argument("ids", nargs="+", metavar="ID", help="ids of the tasks to cancel")
        if command == "submit":
            p.add_argument("type", metavar="TYPE", help="the task type")
            p.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="payload fields, read as their types")
            p.add_argument("--payload", metavar="JSON", help="the payload as a JSON object (FIELD=VALUE wins)")
            p.add_argument("--queue", metavar="NAME", help="the queue (default: the type's route)")
            when = p.add_mutually_exclusive_group()
            when.add_argument("--delay", type=float, metavar="S", help="start it this many seconds from now")
            when.add_argument("--run-at", metavar="WHEN", help="start it then (RFC 3339 with a zone, or epoch s)")
            p.add_argument("--key", metavar="KEY", help="Idempotency-Key: the same key and body make one task")
            p.add_argument(
                "--wait", action="store_true", help="wait for the result: exit 0 completed, 1 not, 3 timeout"
            )
            p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="longest --wait (default 60)")
        if command == "status":
            p.add_argument("id", metavar="ID", help="the task's id")
            p.add_argument("--json", action="store_true", help="the record as JSON")
        if command == "watch":
            p.add_argument("--type", metavar="TYPE", help="only tasks of this type")
            p.add_argument("--queue", metavar="NAME", help="only tasks of this queue")
        if command in ("submit", "status", "watch", "cancel"):
            p.add_argument(
                "--url", metavar="URL", help="a remote API (its token from $ASYNCNODE_TOKEN); default: the backend"
            )
        p.add_argument("--config", metavar="PATH", help="config file (default: $ASYNCNODE_CONFIG or ./config.toml)")
        p.add_argument(
            "--log-level",
            default=os.environ.get("ASYNCNODE_LOG_LEVEL"),
            choices=LOG_LEVELS,
            help="log level ($ASYNCNODE_LOG_LEVEL, else [logging] level; else INFO for api and worker, WARNING)",
        )
        p.add_argument(
            "--log-format",
            choices=("text", "json"),
            help="text, or one JSON object per line (default: [logging] format)",
        )
        if command in ("up", "ctl", "check"):
            p.add_argument("--instance", metavar="NAME", help="instance in config.toml (default: see README)")
            p.add_argument("--run-dir", metavar="DIR", help="run directory (default: ./run/<instance>)")
        if command == "up":
            p.add_argument("--dry-run", action="store_true", help="print the rendered supervisord.conf and exit")
        if command == "worker":
            p.add_argument(
                "--queues",
                type=_queue_list,
                default=(),
                metavar="NAME[,NAME...]",
                help="queues to consume (default: the instance's [instances.*] queues, else every declared queue)",
            )
    return parser


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a role to its end on uvloop where installed (fewer cycles per socket operation), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen role; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "dlq" and args.ids and args.action != "requeue":
        parser.error(f"dlq {args.action} takes no task ids")
    if args.command == "cancel" and (bad := next((i for i in args.ids if not TASK_ID.fullmatch(i)), None)):
        parser.error(f"not a task id: {bad[:64]!r}")
    if args.command == "schedules" and (args.name is None) != (args.action == "list"):
        parser.error("schedules list takes no name" if args.action == "list" else f"schedules {args.action} NAME")
    if args.command == "queues" and (args.name is None) != (args.action == "list"):
        parser.error("queues list takes no name" if args.action == "list" else f"queues {args.action} NAME")
    try:
        cfg = Config.from_toml(config_path(args.config))
        if args.command in (*ROLES, "check", "up", "schedules"):  # up and check refuse what the roles would refuse
            load_handlers(cfg)
            validate_schedules(cfg)
        if args.command == "worker" and args.queues:
            cfg.check_queues(args.queues, "--queues")
    except ConfigError as e:
        print(f"asyncnode: {e}", file=sys.stderr)
        return 2
    level = args.log_level or cfg.logging.level or ("INFO" if args.command in ROLES else "WARNING")
    configure_logging(args.log_format or cfg.logging.format, level)
    try:
        if args.command in ROLES:
            setup_tracing(args.command)
            return run_loop(ROLES[args.command](cfg, args))
        result = COMMANDS[args.command](cfg, args)
        return int(asyncio.run(result) if inspect.iscoroutine(result) else result)
    except ConfigError as e:
        print(f"asyncnode: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
