"""Periodic schedules across the death of the lease holder, on both backends: ``python bench/schedules.py``.

A soak, per backend (--backends rabbitmq,embedded; one after the other, or at once with --parallel): one API and
--workers (2) worker processes, each started as ``python asyncnode.py api|worker --config <its own config>`` from
the project's folder (as supervisord would), every one of them taking part in the scheduler lease
(``[scheduler] lease_ttl`` --lease, 10 s). The config declares one ``every = 1`` schedule (``catch_up``
--catch-up, "one") and, unless --no-cron, one ``cron = "* * * * *"``, both of the ``noop`` type. For --minutes
(10) it SIGKILLs the process holding the lease --kills (2) times, spread evenly over the run: the holder is the
process whose log last said "holding the scheduler lease" (and has not said it lost or gave it up since),
checked against the lease's owner in the store at the kill. A fresh process of the same role replaces the killed
one --restart-delay (1 s) later, as supervisord would (so does a process that exits by itself: a violation).

At the end it reads every task record of the schedules from the store (through asyncnode's own adapter) and
counts, per schedule, over the slots of the run (every slot from the first fire to two seconds before the end,
i.e. those that must have been handled by then):
  - fired on time: a task of that slot, submitted (``created_at``) at most 1 s after the slot;
  - fired late: a task of that slot, submitted later than that, and of those how many were not in a failover (in
    one, the takeover's catch-up task may be that slot's own: its slot is the latest due);
  - covered: no task of its own, but a later task of the schedule fired (catch_up "one" folds the missed slots
    into one task whose slot is the latest missed one), and of those how many were not in a failover (kill to next
    fire);
  - missed: neither fired nor covered (expected with catch_up "none" during each failover, never with "one");
  - duplicated: slots with more than one task (never: a slot's task id is made from its key);
  - the longest gap between two fires, each failover's takeover (from the SIGKILL to the next fire, and to the
    log line of the process that took the lease), and the tasks' statuses (all completed?).
Each backend runs on its own ``[broker] queue`` and ``[redis] key_prefix`` (``benchsch-<hex>``) or its own SQLite
file, all removed afterwards (also when interrupted). Prints the machine, a Markdown table and the figures as JSON
(--json PATH: also the lease events and the task list of every schedule). ``--minutes 1 --kills 1`` is a quick
check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, cast

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput
from throughput import (
    REDIS_URL,
    ROOT,
    Proc,
    delete_keys,
    delete_queues,
    embedded_supported,
    free_port,
    leaving_nothing,
    run_and_report,
    wait_for,
    workdir,
    write_toml,
)

import asyncnode  # importable now: throughput put the project's folder on sys.path

Metrics = dict[str, Any]

#: Prefix of every queue and key a run makes (its own, so that a leftover is easy to tell apart).
TAG_PREFIX = "benchsch-"
#: The schedules' names: the every-second one, and the every-minute cron one.
TICK, MINUTE = "tick", "minute"
#: Seconds after its time by which a slot must have fired while a holder is alive (the contract: within 1 s).
ON_TIME = 1.0
#: A due slot older than this is missed (the contract); so every slot up to this long before the end of the run
#: must have been handled by then.
MISSED_AFTER = 2.0
#: Seconds the processes get to come up (API ready, workers registered), and the first fire to happen.
START_TIMEOUT = 60.0
#: Seconds the tasks fired by the end get to finish before the records are read.
SETTLE_TIMEOUT = 30.0
#: Seconds a kill waits for a holder to show in the logs before it gives up on that kill.
HOLDER_TIMEOUT = 30.0
#: Seconds between two reads of the processes' logs.
LOG_POLL = 0.1
#: Statuses after which a task changes no more.
FINAL = ("completed", "failed", "cancelled")

#: The log lines of the lease: a process that took it, and one that lost or gave it up. What follows the
#: asctime of asyncnode's log format (``%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s``).
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+)\[(\d+)\] (.*)$")
TOOK_LEASE = re.compile(r"^holding the scheduler lease \(fence \d+\)")
LOST_LEASE = re.compile(r"^(lost the scheduler lease|the scheduler lease was taken over|gave up the scheduler lease)")
#: The pid in a lease owner's name (``<host>:<pid>:api:<hex>``, ``<host>:<pid>:worker:<hex>``).
OWNER_PID = re.compile(r":(\d+):(?:api|worker):[0-9a-f]+$")


def _tag() -> str:
    return f"{TAG_PREFIX}{uuid.uuid4().hex[:10]}"


# ============================================================================
# One deployment: the config, its processes, their logs
# ============================================================================


@dataclasses.dataclass(frozen=True)
class Params:
    """What a run is made with."""

    minutes: float
    kills: int
    lease: float
    catch_up: str
    cron: bool
    workers: int
    restart_delay: float

    @property
    def seconds(self) -> float:
        """The run's length."""
        return self.minutes * 60


@dataclasses.dataclass
class LeaseEvent:
    """A lease line of a process's log: ``took`` (True) or lost/gave up (False) at ``at`` (epoch seconds)."""

    at: float
    proc: str
    pid: int
    took: bool
    line: str


class Member:
    """One process of the deployment (a role's place, e.g. ``worker-2``): the Proc running now, and its log
    read so far."""

    def __init__(self, place: str, role: str) -> None:
        self.place = place
        self.role = role
        self.proc: Proc | None = None
        self.generation = 0
        self._offset = 0

    @property
    def name(self) -> str:
        """The place and which start of it this is: ``worker-2#1`` is its first."""
        return f"{self.place}#{self.generation}"


class Deployment:
    """An API and workers on one fresh config of a backend, in a folder of their own."""

    def __init__(self, backend: str, folder: Path, params: Params) -> None:
        self.backend = backend
        self.folder = folder
        self.params = params
        self.tag = _tag()
        port = free_port()
        sections: dict[str, dict[str, Any]] = {"api": {"host": "127.0.0.1", "port": port}}
        if backend == "rabbitmq":
            sections["broker"] = {"url": throughput.RABBIT_URL, "queue": self.tag}
            sections["redis"] = {"url": REDIS_URL, "channel": f"{self.tag}:updates", "key_prefix": f"{self.tag}:"}
        else:
            sections["embedded"] = {"path": f"{self.tag}.db"}
        sections["scheduler"] = {"lease_ttl": params.lease}
        sections[f"schedules.{TICK}"] = {"type": "noop", "every": 1, "catch_up": params.catch_up}
        if params.cron:
            sections[f"schedules.{MINUTE}"] = {"type": "noop", "cron": "* * * * *", "catch_up": params.catch_up}
        self.config = write_toml(folder / "config.toml", sections)
        self.cfg = asyncnode.Config.from_toml(self.config, env={})
        self.base = f"http://127.0.0.1:{port}"
        self.members = [Member("api", "api")] + [Member(f"worker-{i}", "worker") for i in range(1, params.workers + 1)]
        self.events: list[LeaseEvent] = []
        self.starts: list[dict[str, Any]] = []
        self.exits: list[str] = []  # processes that exited without being killed here
        self.killed: dict[str, float] = {}  # process -> when it was SIGKILLed

    def start(self, member: Member) -> None:
        """Start a fresh process in ``member``'s place."""
        member.generation += 1
        argv = [sys.executable, "asyncnode.py", member.role, "--config", str(self.config), "--log-level", "INFO"]
        log = self.folder / f"{member.place}-{member.generation}.log"
        member.proc = Proc(member.name, argv, log, env=throughput._child_env(), cwd=ROOT)
        member._offset = 0
        self.starts.append({"at": time.time(), "proc": member.name, "pid": member.proc.pid})

    def running(self) -> list[Proc]:
        """The processes running now."""
        return [m.proc for m in self.members if m.proc is not None]

    def read_logs(self) -> None:
        """Take the lease lines the processes logged since the last read."""
        for m in self.members:
            if m.proc is None:
                continue
            with contextlib.suppress(OSError), open(m.proc.log_path, "rb") as f:
                f.seek(m._offset)
                chunk = f.read()
                complete = chunk.rfind(b"\n") + 1  # a line still being written is read next time
                m._offset += complete
                for raw in chunk[:complete].decode(errors="replace").splitlines():
                    self._parse(m, raw)

    def _parse(self, m: Member, raw: str) -> None:
        match = LOG_LINE.match(raw)
        if not match:
            return
        took, lost = TOOK_LEASE.search(match[5]), LOST_LEASE.search(match[5])
        if not took and not lost:
            return
        at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
        self.events.append(LeaseEvent(at, m.name, int(match[4]), bool(took), match[5]))

    def holder(self) -> Member | None:
        """The member whose process last said it took the lease and has not said it lost it since."""
        latest: dict[str, LeaseEvent] = {}
        for event in self.events:
            latest[event.proc] = event
        holding = [e for e in latest.values() if e.took]
        if not holding:
            return None
        newest = max(holding, key=lambda e: e.at)
        for m in self.members:
            if m.name == newest.proc and m.proc is not None and m.proc.popen.poll() is None:
                return m
        return None

    async def watch_logs(self) -> None:
        """Read the logs every LOG_POLL seconds, until cancelled."""
        while True:
            self.read_logs()
            await asyncio.sleep(LOG_POLL)

    async def kill(self, member: Member) -> dict[str, Any]:
        """SIGKILL ``member``'s process, and start a fresh one in its place --restart-delay later."""
        proc = member.proc
        assert proc is not None
        owner = await self.lease_owner()
        os.kill(proc.pid, signal.SIGKILL)
        at = self.killed[member.name] = time.time()
        await asyncio.to_thread(proc.popen.wait, 10)
        self.read_logs()  # its last lines, before its place is taken
        await proc.stop()  # reaps it and whatever of its group is left
        killed = {"at": at, "proc": member.name, "pid": proc.pid, "role": member.role, "store_owner": owner}
        owner_pid = OWNER_PID.search(owner or "")
        if owner_pid is None or int(owner_pid[1]) != proc.pid:
            killed["mismatch"] = (
                f"killed pid {proc.pid}, the holder by its log, but the store said {owner!r} held the lease"
            )
        await asyncio.sleep(self.params.restart_delay)
        self.start(member)
        return killed

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        """Wait until /readyz answers 200 and every worker shows in /api/workers."""

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(f"{self.base}/readyz") as resp:
                    if resp.status != 200:
                        return False
                async with session.get(f"{self.base}/api/workers") as resp:
                    return len((await resp.json())["items"]) >= self.params.workers
            return False

        await wait_for(ready, self.running(), START_TIMEOUT, f"the API ready with {self.params.workers} workers")

    async def lease_owner(self) -> str | None:
        """Who holds the scheduler lease now, as the store says (read here, not through the adapter)."""
        if self.backend == "rabbitmq":
            client = aioredis.from_url(self.cfg.redis.url, decode_responses=True)
            try:
                key = self.cfg.redis.key_prefix + asyncnode.LEASE_SUFFIX + asyncnode.SCHEDULER_LEASE
                return cast(str | None, await client.hget(key, "owner"))
            finally:
                await client.aclose()
        query = "SELECT owner FROM leases WHERE name = ? AND expires_at > ?"
        rows = await asyncio.to_thread(self._query, query, (asyncnode.SCHEDULER_LEASE, time.time()))
        return str(rows[0][0]) if rows else None

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # Read-only, so that the harness never takes the write lock the processes under test contend for.
        uri = f"file:{self.cfg.database}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            return db.execute(sql, params).fetchall()

    async def schedules(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """``GET /api/schedules``."""
        async with session.get(f"{self.base}/api/schedules") as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET /api/schedules: {resp.status} {await resp.text()}")
            return list((await resp.json())["items"])

    async def tasks(self) -> list[dict[str, Any]]:
        """Every task of the schedules, from the store (asyncnode's own adapter), oldest slot first."""
        broker, store = asyncnode.open_backend(self.cfg, "api")
        try:
            records = await store.recent(self.cfg.tasks.max_recent)
        finally:
            await store.close()
            await broker.close()
        ours = [dict(r) for r in records if r.get("schedule") in (TICK, MINUTE)]
        return sorted(ours, key=lambda r: (float(r.get("slot") or 0), float(r.get("created_at") or 0)))

    async def close(self) -> None:
        """Stop every process."""
        await asyncio.gather(*(p.stop() for p in self.running()))

    async def cleanup(self) -> None:
        """Stop every process; delete the queues and keys of the config (the SQLite file goes with the folder)."""
        try:
            await self.close()
        finally:
            if self.backend == "rabbitmq":
                await delete_queues(asyncnode.broker_queues(self.cfg))
                await delete_keys(self.cfg.redis.key_prefix, self.cfg.redis.url)

    def logs(self) -> str:
        """The end of every log of the run."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.folder.glob("*.log"))
        )


# ============================================================================
# The soak
# ============================================================================


async def soak(backend: str, scratch: Path, params: Params) -> Metrics:
    """One backend's run: start, kill the holder --kills times, read the records, count."""
    async with workdir(scratch) as folder:
        d = Deployment(backend, folder, params)
        async with leaving_nothing(d.tag, d.cleanup), throughput.http_session(8) as session:
            try:
                return await _soak(d, session)
            except Exception:
                d.read_logs()
                print(f"--- {backend}: logs\n{d.logs()}", file=sys.stderr)
                raise


async def _soak(d: Deployment, session: aiohttp.ClientSession) -> Metrics:
    params = d.params
    for m in d.members:
        d.start(m)
    watcher = asyncio.create_task(d.watch_logs())
    try:
        await d.wait_ready(session)
        ready = time.time()
        print(f"{d.backend}: up; running {params.minutes:g} min with {params.kills} kill(s)", flush=True)
        end = ready + params.seconds
        kills: list[dict[str, Any]] = []
        for k in range(1, params.kills + 1):
            await _sleep_until(ready + k * params.seconds / (params.kills + 1), d)
            victim = await _holder(d)
            if victim is None:
                at, error = time.time(), f"no holder in the logs after {HOLDER_TIMEOUT:g} s"
                kills.append({"at": at, "at_s": round(at - ready, 1), "error": error})
                continue
            killed = await d.kill(victim)
            kills.append(killed)
            print(f"{d.backend}: killed the holder {killed['proc']} (pid {killed['pid']})", flush=True)
        await _sleep_until(end, d)
        await _settle(d, end)
        d.read_logs()
        schedules = await d.schedules(session)
        tasks = await d.tasks()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return analyse(d, ready, end, kills, tasks, schedules)


async def _sleep_until(when: float, d: Deployment) -> None:
    """Sleep until epoch ``when``; a process that exited by itself is noted and replaced, as supervisord would."""
    while (left := when - time.time()) > 0:
        for m in d.members:
            if m.proc is not None and (code := m.proc.popen.poll()) is not None:
                d.read_logs()
                d.exits.append(f"{m.name} (exit {code})")
                print(f"{d.backend}: {m.name} exited by itself ({code}):\n{m.proc.tail()}", file=sys.stderr)
                await m.proc.stop()
                await asyncio.sleep(d.params.restart_delay)
                d.start(m)
        await asyncio.sleep(min(left, 0.5))


async def _holder(d: Deployment) -> Member | None:
    """The lease holder now, waiting for one to show in the logs (after a takeover one may not yet have)."""
    deadline = time.monotonic() + HOLDER_TIMEOUT
    while time.monotonic() < deadline:
        d.read_logs()
        if (m := d.holder()) is not None:
            return m
        await asyncio.sleep(LOG_POLL)
    return None


async def _settle(d: Deployment, end: float) -> None:
    """Wait until every task fired by ``end`` has finished (bounded: one that never does is reported)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        tasks = await d.tasks()
        if all(t.get("status") in FINAL for t in tasks if (t.get("created_at") or 0) <= end):
            return
        await asyncio.sleep(0.5)


# ============================================================================
# Counting
# ============================================================================


def period_of(name: str) -> float:
    """The seconds between two slots of schedule ``name`` (``every = 1``; ``* * * * *`` in UTC: 60)."""
    return 1.0 if name == TICK else 60.0


def _slots(first: float, last: float, period: float) -> list[float]:
    """The multiples of ``period`` from ``first`` to ``last`` (both included)."""
    start = math.ceil(first / period - 1e-9)
    return [float(n * period) for n in range(start, math.floor(last / period + 1e-9) + 1)]


def count_schedule(
    name: str,
    tasks: list[dict[str, Any]],
    since: float,
    until: float,
    failovers: list[tuple[float, float]],
    catch_up: str,
) -> Metrics:
    """The slots of ``name`` from ``since`` to ``until`` and what happened to each; ``failovers``: (kill,
    next fire) windows."""
    period = period_of(name)
    fired = [t for t in tasks if t.get("schedule") == name and t.get("slot") is not None]
    by_slot: dict[float, list[dict[str, Any]]] = {}
    for t in fired:
        by_slot.setdefault(float(t["slot"]), []).append(t)
    expected = _slots(since, until, period)
    on_time = late = late_outside = covered = covered_outside = missed = duplicated = 0
    latest_late = 0.0
    fired_slots = sorted(by_slot)
    for slot in expected:
        in_failover = any(kill - period <= slot <= fire for kill, fire in failovers)
        own = by_slot.get(slot)
        if own:
            lateness = min(float(t["created_at"]) for t in own) - slot
            latest_late = max(latest_late, lateness)
            if lateness <= ON_TIME:
                on_time += 1
            else:
                late += 1
                late_outside += not in_failover  # in one, the takeover's catch-up task is this slot's
            duplicated += len(own) > 1
        elif catch_up == "one" and any(s > slot for s in fired_slots):
            covered += 1
            covered_outside += not in_failover
        else:
            missed += 1
    stray = [s for s in fired_slots if abs(s / period - round(s / period)) > 1e-6]
    fires = sorted(float(t["created_at"]) for t in fired)
    gaps = [(b - a, a) for a, b in itertools.pairwise(fires)]
    longest = max(gaps, default=(0.0, 0.0))
    statuses = Counter(str(t.get("status")) for t in fired)
    return {
        "period_s": period,
        "slots_expected": len(expected),
        "first_slot": expected[0] if expected else None,
        "last_slot": expected[-1] if expected else None,
        "fired_on_time": on_time,
        "fired_late": late,
        "fired_late_outside_failovers": late_outside,
        "latest_fire_s": round(latest_late, 3),
        "covered": covered,
        "covered_outside_failovers": covered_outside,
        "missed": missed,
        "duplicated": duplicated,
        "stray_slots": stray,
        "tasks": len(fired),
        "tasks_in_run": sum(1 for t in fired if float(t["slot"]) <= until),
        "run_now_tasks": sum(1 for t in tasks if t.get("schedule") == name and t.get("slot") is None),
        "longest_gap_s": round(longest[0], 3) if gaps else None,
        "longest_gap_at_s": round(longest[1] - since, 1) if gaps else None,
        "statuses": dict(sorted(statuses.items())),
        "all_completed": bool(fired) and set(statuses) == {"completed"},
    }


def analyse(
    d: Deployment,
    ready: float,
    end: float,
    kills: list[dict[str, Any]],
    tasks: list[dict[str, Any]],
    schedules: list[dict[str, Any]],
) -> Metrics:
    """The figures of a run, and what in them breaks the contract."""
    params = d.params
    ticks = sorted(
        (t for t in tasks if t.get("schedule") == TICK and t.get("slot") is not None), key=lambda t: t["created_at"]
    )
    if not ticks:
        raise RuntimeError(f"schedule {TICK!r} never fired")
    first_fire = float(ticks[0]["slot"])
    until = end - MISSED_AFTER  # every slot up to here must have been handled by the end
    failovers: list[Metrics] = []
    windows: list[tuple[float, float]] = []
    for kill in kills:
        if "error" in kill:
            failovers.append(kill)
            continue
        after = [t for t in ticks if float(t["created_at"]) > kill["at"]]
        before = [t for t in ticks if float(t["created_at"]) <= kill["at"]]
        took = [e for e in d.events if e.took and e.at > kill["at"] - 0.001]
        fo: Metrics = {
            "killed": kill["proc"],
            "role": kill["role"],
            "at_s": round(kill["at"] - ready, 1),
            "takeover_s": round(float(after[0]["created_at"]) - kill["at"], 2) if after else None,
            "lease_taken_s": round(took[0].at - kill["at"], 2) if took else None,
            "taken_by": took[0].proc if took else None,
            "store_owner": kill["store_owner"],
        }
        if "mismatch" in kill:
            fo["mismatch"] = kill["mismatch"]
        if after and before:
            last, nxt = float(before[-1]["slot"]), float(after[0]["slot"])
            fo["last_slot_before"], fo["first_slot_after"] = last, nxt
            fo["slots_without_own_task"] = max(0, round(nxt - last) - 1)
            windows.append((kill["at"], float(after[0]["created_at"])))
        failovers.append(fo)
    out: Metrics = {
        "backend": d.backend,
        "seconds": round(end - ready, 1),
        "first_fire_s": round(float(ticks[0]["created_at"]) - ready, 2),
        "schedules": {TICK: count_schedule(TICK, tasks, first_fire, until, windows, params.catch_up)},
        "failovers": failovers,
        "lease_takes": sum(1 for e in d.events if e.took),
        "overlapping_holders": _overlaps(d),
        "unexpected_exits": d.exits,
        "api_schedules": schedules,
        "lease_events": [dataclasses.asdict(e) for e in d.events],
        "process_starts": d.starts,
        "tasks": [{k: t.get(k) for k in ("id", "schedule", "slot", "created_at", "status")} for t in tasks],
    }
    if params.cron:
        # A new schedule starts from now: the every-minute one from about when the every-second one first fired.
        out["schedules"][MINUTE] = count_schedule(MINUTE, tasks, first_fire - 1, until, windows, params.catch_up)
    out["violations"] = violations(out, params)
    if out["violations"]:
        out["error"] = "; ".join(out["violations"])
    return out


def _overlaps(d: Deployment) -> list[str]:
    """Lease takes while another live process held it (by the logs): a holder that did not see it lost it."""
    held: dict[str, float] = {}  # process -> since
    out = []
    for e in sorted(d.events, key=lambda e: e.at):
        if e.took:
            others = [p for p in held if p != e.proc and d.killed.get(p, math.inf) > e.at]
            if others:
                out.append(f"{e.proc} took the lease at {e.at:.3f} while {', '.join(others)} held it")
            held[e.proc] = e.at
        else:
            held.pop(e.proc, None)
    return out


def violations(out: Metrics, params: Params) -> list[str]:
    """What in a run's figures the contract rules out."""
    found = []
    for name, s in out["schedules"].items():
        if s["duplicated"]:
            found.append(f"{name}: {s['duplicated']} slot(s) with two tasks")
        if s["missed"] and params.catch_up == "one":
            found.append(f"{name}: {s['missed']} slot(s) missed with catch_up one")
        if s["covered_outside_failovers"]:
            found.append(
                f"{name}: {s['covered_outside_failovers']} slot(s) without a task of their own outside a failover"
            )
        if s["fired_late_outside_failovers"]:
            n = s["fired_late_outside_failovers"]
            found.append(f"{name}: {n} slot(s) fired more than {ON_TIME:g} s late outside a failover")
        if s["stray_slots"]:
            found.append(f"{name}: tasks of slots that are not the schedule's: {s['stray_slots'][:3]}")
        if s["tasks"] and not s["all_completed"]:
            found.append(f"{name}: not all completed: {s['statuses']}")
    for fo in out["failovers"]:
        if "error" in fo:
            found.append(f"kill at {fo['at_s']:.0f} s: {fo['error']}")
            continue
        if "mismatch" in fo:
            found.append(fo["mismatch"])
        if fo["takeover_s"] is None:
            found.append(f"no fire after the kill of {fo['killed']}")
        elif fo["takeover_s"] > params.lease + ON_TIME:  # taken over within the TTL, then fired within 1 s
            found.append(f"takeover after killing {fo['killed']}: {fo['takeover_s']} s (lease_ttl {params.lease:g} s)")
    if out["overlapping_holders"]:
        found.append(f"{len(out['overlapping_holders'])} lease take(s) while another process held it")
    if out["unexpected_exits"]:
        found.append(f"process(es) exited by themselves: {', '.join(out['unexpected_exits'])}")
    return found


# ============================================================================
# Run, report
# ============================================================================


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each backend's soak, one after the other or (--parallel) at once."""
    throughput.cancel_on_signals()
    info = await throughput.machine(args.backends, peers=False)
    params = Params(args.minutes, args.kills, args.lease, args.catch_up, args.cron, args.workers, args.restart_delay)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncnode-schedules-") as scratch:

        async def one(backend: str) -> Metrics:
            t0 = time.monotonic()
            try:
                metrics = await soak(backend, Path(scratch), params)
            except Exception as e:  # one failed backend is reported; the other still runs
                traceback.print_exc()
                metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"{backend} ({time.monotonic() - t0:.0f} s): {_brief(metrics)}", flush=True)
            return metrics

        if args.parallel:
            figures = await asyncio.gather(*(one(b) for b in args.backends))
        else:
            figures = [await one(b) for b in args.backends]
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["wall time"] = f"{time.monotonic() - started:.0f} s"
    return {
        "machine": info,
        "params": dataclasses.asdict(params) | {"parallel": args.parallel, "backends": args.backends},
        "results": dict(zip(args.backends, figures, strict=True)),
    }


#: Figures too long for the printed report (--json has them).
LONG = ("api_schedules", "lease_events", "process_starts", "tasks")


def _brief(metrics: Metrics) -> str:
    """A run's figures on one line, without the long lists."""
    if "schedules" not in metrics:
        return json.dumps(metrics)
    shown = {k: v for k, v in metrics.items() if k not in LONG}
    return json.dumps(shown)


def _status_cell(s: Metrics) -> str:
    statuses = ", ".join(f"{n} {k}" for k, n in s["statuses"].items()) or "-"
    return f"{statuses} ({'all completed' if s['all_completed'] else 'NOT all completed'})"


def table(out: dict[str, Any]) -> str:
    """One Markdown row per backend and schedule."""
    head = [
        "backend",
        "schedule",
        "slots expected",
        "fired on time",
        "fired late",
        "covered by a catch-up task",
        "missed",
        "duplicated",
        "longest gap",
        "takeover after each kill (lease taken)",
        "tasks",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for backend, m in out["results"].items():
        if "schedules" not in m:
            lines.append(f"| {backend} | error: {m.get('error', '?')} |" + " |" * (len(head) - 2))
            continue
        takeovers = (
            ", ".join(
                f"{fo['takeover_s']} s ({fo['lease_taken_s']} s, {fo['role']} killed)"
                if "error" not in fo
                else fo["error"]
                for fo in m["failovers"]
            )
            or "-"
        )
        for name, s in m["schedules"].items():
            every = "every = 1" if name == TICK else '"* * * * *"'
            late = str(s["fired_late"])
            if s["fired_late"]:
                late += f" ({s['fired_late_outside_failovers']} outside failovers)"
            covered = str(s["covered"])
            if s["covered_outside_failovers"]:
                covered += f" ({s['covered_outside_failovers']} outside failovers)"
            cells = [
                backend,
                f"{name} ({every})",
                str(s["slots_expected"]),
                str(s["fired_on_time"]),
                late,
                covered,
                str(s["missed"]),
                str(s["duplicated"]),
                "-" if s["longest_gap_s"] is None else f"{s['longest_gap_s']} s",
                takeovers if name == TICK else "-",
                _status_cell(s),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters, the table, the violations and the figures as JSON."""
    info, p = out["machine"], out["params"]
    services = ", ".join(f"{k} {info[k]}" for k in ("RabbitMQ", "Redis", "SQLite") if k in info)
    cron = ' and `cron = "* * * * *"`' if p["cron"] else ""
    lines = [
        f"- Machine: {info['cores']} cores, {info['cpu']}; {info['os']}; Python {info['Python']}; {services}",
        f"- Load average at start / end: {info['load average at start']} / {info['load average at end']}; "
        f"wall time {info['wall time']}",
        f"- Per backend ({'at once' if p['parallel'] else 'one after the other'}): one API and {p['workers']} worker "
        f'processes, [scheduler] lease_ttl = {p["lease"]:g}, catch_up = "{p["catch_up"]}", schedules `every = 1`'
        f"{cron} (noop); {p['minutes']:g} min, the lease holder SIGKILLed {p['kills']} time(s) spread over the run "
        f"and replaced {p['restart_delay']:g} s later",
        f"- Slots: every slot from the first fire to {MISSED_AFTER:g} s before the end; on time: submitted at most "
        f"{ON_TIME:g} s after the slot; covered: no task of its own but folded into a later one (catch_up one); "
        "takeover: from the SIGKILL to the next fire (in brackets: to the new holder's log line)",
        "",
        table(out),
        "",
    ]
    for backend, m in out["results"].items():
        for v in m.get("violations", []):
            lines.append(f"- {backend}: {v}")
    compact = {b: {k: v for k, v in m.items() if k not in LONG} for b, m in out["results"].items()}
    lines += ["", "Figures (JSON, one backend a line):", ""]
    lines.append("{\n" + ",\n".join(f" {json.dumps(b)}: {json.dumps(m)}" for b, m in compact.items()) + "\n}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", "--backend", type=throughput._csv, help="rabbitmq, embedded (default: every one asyncnode has)"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each backend's run (default 10)")
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs of the lease holder per run (default 2)")
    parser.add_argument("--lease", type=float, default=10.0, help="[scheduler] lease_ttl, seconds (default 10)")
    parser.add_argument("--catch-up", choices=("one", "none"), default="one", help='catch_up (default "one")')
    parser.add_argument("--cron", action=argparse.BooleanOptionalAction, default=True,
                        help='also a `cron = "* * * * *"` schedule (default: yes)')  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--restart-delay", type=float, default=1.0, help="seconds before a killed process's "
                        "replacement starts (default 1)")  # fmt: skip
    parser.add_argument("--parallel", action="store_true", help="run the backends at once (the wall time of one)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every figure to PATH")
    args = parser.parse_args()
    if args.backends is None:
        args.backends = ["rabbitmq", *(["embedded"] if embedded_supported() else [])]
    unknown = [b for b in args.backends if b not in throughput.BACKENDS]
    if unknown or not args.backends or len(set(args.backends)) < len(args.backends):
        parser.error(f"--backends: choose from {', '.join(throughput.BACKENDS)}, each once")
    if args.minutes <= 0 or args.kills < 0 or args.lease < 1 or args.workers < 1 or args.restart_delay < 0:
        parser.error("--minutes must be > 0, --kills >= 0, --lease >= 1, --workers >= 1, --restart-delay >= 0")
    if args.kills and args.minutes * 60 / (args.kills + 1) < args.lease + 5:
        parser.error(f"{args.kills} kill(s) in {args.minutes:g} min leave less than lease_ttl + 5 s between them")
    return run_and_report(run(args), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
