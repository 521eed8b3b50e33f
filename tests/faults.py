"""Fault-injection scenarios with real processes, shared by the test suite (small sizes) and
``bench/reliability.py`` (full sizes, figures for the README).

Each scenario starts what it needs, injects its fault, waits (bounded) until every task the API
accepted has ended, stops everything it started by pid, and returns its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

import asyncnode
from tests.conftest import Proc, queue_counts, task_records, wait_for

Figures = dict[str, Any]


#: The statuses a task ends in (what TRANSITIONS marks final: kept for result_ttl, nothing after).
FINAL = frozenset(t.status for t in asyncnode.TRANSITIONS.values() if t.final)


class Cluster:
    """An API process and worker processes on one config, restartable, stopped by pid."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.cfg = asyncnode.Config.from_toml(config, env={})
        self.workdir = workdir
        self.env = env or {}
        self.base = f"http://127.0.0.1:{self.cfg.api.port}"
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.all: list[Proc] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    def _start(self, role: str) -> Proc:
        proc = Proc(role, self.config, self.workdir / f"{role}-{len(self.all)}.log", self.env)
        self.all.append(proc)
        return proc

    async def start(self, workers: int) -> None:
        self.api = self._start("api")
        self.workers = [self._start("worker") for _ in range(workers)]

        async def ready() -> bool:
            try:
                async with self.session.get(f"{self.base}/healthz") as resp:
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            assert self.api is not None and self.api.popen.poll() is None, self.api.log() if self.api else ""
            if not ok:
                return False
            try:
                return (await queue_counts(self.cfg))[1] == workers
            except Exception:  # the work queue is declared by the first one up
                return False

        await wait_for(ready, 60, f"the API and {workers} consuming workers")

    def replace_worker(self, i: int) -> Proc:
        self.workers[i] = self._start("worker")
        return self.workers[i]

    async def submit(self, body: dict[str, Any]) -> tuple[int, str | None, float]:
        """POST a task; return (status, id or None, seconds it took)."""
        t0 = time.monotonic()
        try:
            async with self.session.post(f"{self.base}/api/tasks", json=body) as resp:
                data = await resp.json()
                return resp.status, data.get("id") if resp.status == 202 else None, time.monotonic() - t0
        except (aiohttp.ClientError, TimeoutError):
            return 0, None, time.monotonic() - t0

    async def tasks(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored tasks among ``ids``, read through the backend's own store (the API may be down)."""
        found, _ = await task_records(self.cfg, ids)
        return found

    async def wait_all(self, ids: list[str], timeout: float, status: str = "completed") -> dict[str, dict[str, Any]]:
        pending = set(ids)
        done: dict[str, dict[str, Any]] = {}

        async def finished() -> bool:
            got = await self.tasks(sorted(pending))
            for tid, task in got.items():
                if task["status"] in FINAL:
                    done[tid] = task
                    pending.discard(tid)
            return not pending

        try:
            await wait_for(finished, timeout, f"{len(ids)} tasks to end")
        except AssertionError as e:
            raise AssertionError(f"{e}: {len(pending)} still open, e.g. {sorted(pending)[:3]}") from None
        bad = {tid: t for tid, t in done.items() if t["status"] != status}
        assert not bad, f"{len(bad)} tasks ended otherwise, e.g. {next(iter(bad.values()))}"
        return done

    async def close(self) -> None:
        for proc in self.all:
            proc.stop()
        await self.session.close()


@contextlib.asynccontextmanager
async def cluster(
    config: Path, workdir: Path, workers: int, env: dict[str, str] | None = None
) -> AsyncIterator[Cluster]:
    c = Cluster(config, workdir, env)
    try:
        await c.start(workers)
        yield c
    finally:
        await c.close()


async def submit_many(
    c: Cluster, bodies: list[dict[str, Any]], concurrency: int = 32
) -> list[tuple[int, str | None, float]]:
    """Submit every body, ``concurrency`` at a time; return each answer in order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> tuple[int, str | None, float]:
        async with sem:
            return await c.submit(body)

    return await asyncio.gather(*(one(b) for b in bodies))


async def crash_soak(config: Path, workdir: Path, tasks: int, workers: int = 4, kill_every: float = 0.3) -> Figures:
    """Sleep tasks of 10-50 ms under ``workers`` workers, one SIGKILLed and restarted every ``kill_every`` s."""
    rng = random.Random(7)
    async with cluster(config, workdir, workers) as c:
        t0 = time.monotonic()
        kills = 0
        stop = asyncio.Event()

        async def killer() -> None:
            nonlocal kills
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), kill_every)
                if stop.is_set():
                    return
                # Kill one that is consuming: on a loaded machine a fresh worker can take longer
                # to start than the interval, and killing those would only test start-up.
                ready = [i for i, w in enumerate(c.workers) if "consuming" in w.log()]
                if not ready:
                    continue
                i = rng.choice(ready)
                c.workers[i].signal(signal.SIGKILL)
                kills += 1
                await asyncio.to_thread(c.workers[i].popen.wait, 10)
                c.replace_worker(i)

        killing = asyncio.create_task(killer())
        try:
            bodies = [{"type": "sleep", "payload": {"seconds": rng.uniform(0.01, 0.05)}} for _ in range(tasks)]
            answers = await submit_many(c, bodies)
            ids = [tid for status, tid, _ in answers if status == 202]
            assert len(ids) == tasks, f"only {len(ids)} of {tasks} accepted: {[a for a in answers if a[0] != 202][:3]}"
            done = await c.wait_all(ids, timeout=60 + tasks * 0.2)
        finally:
            stop.set()
            await asyncio.wait_for(killing, 30)  # it may be waiting (10 s at most) for a killed worker to exit
        attempts = [t["attempts"] for t in done.values()]
        return {
            "tasks": tasks,
            "workers": workers,
            "kills": kills,
            "completed": len(done),
            "ran_more_than_once": sum(1 for a in attempts if a > 1),
            "extra_runs": sum(a - 1 for a in attempts),  # runs beyond each task's first
            "max_attempts": max(attempts),
            "seconds": round(time.monotonic() - t0, 1),
        }


def figures_json(figures: Figures) -> str:
    """One line of JSON for logs and the README script."""
    return json.dumps(figures, sort_keys=True)


class Load:
    """Submits tasks continuously from a few concurrent clients, recording every answer and its latency."""

    def __init__(self, c: Cluster, body: dict[str, Any], clients: int = 4, pause: float = 0.02) -> None:
        self.c, self.body, self.clients, self.pause = c, body, clients, pause
        self.answers: list[tuple[float, int, str | None, float]] = []  # (sent at, status, id, seconds)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            status, tid, seconds = await self.c.submit(self.body)
            self.answers.append((sent, status, tid, seconds))
            await asyncio.sleep(self.pause)  # the load's pace, not a synchronisation

    async def stop(self) -> None:
        """Stop the clients; each ends after its request in hand (bounded by the session's timeout)."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 60)

    def accepted(self) -> list[str]:
        return [tid for _, status, tid, _ in self.answers if status == 202 and tid]

    async def wait_accepted_after(self, t: float, timeout: float) -> float:
        """Wait until a request sent after ``t`` is accepted; return when it was sent."""

        async def accepted() -> float | None:
            later = [sent for sent, status, _, _ in self.answers if status == 202 and sent >= t]
            return min(later) if later else None

        return float(await wait_for(accepted, timeout, "a task accepted again"))

    def figures(self) -> Figures:
        statuses = [status for _, status, _, _ in self.answers]
        return {
            "submitted": len(statuses),
            "accepted": statuses.count(202),
            "refused_503": statuses.count(503),
            "other_answers": len(statuses) - statuses.count(202) - statuses.count(503),
            "slowest_answer_s": round(max(seconds for *_, seconds in self.answers), 2),
        }


async def outage(
    c: Cluster, stop_service: Callable[[], Any], start_service: Callable[[], Any], seconds: float, body: dict[str, Any]
) -> tuple[Load, Figures]:
    """Submit continuously; take a service down for ``seconds``; bring it back; keep submitting until it recovers."""
    load = Load(c, body)
    load.start()
    try:
        await wait_for(lambda: asyncio.sleep(0, len(load.accepted()) >= 20), 30, "20 tasks accepted before the outage")
        down_at = time.monotonic()
        await stop_service()
        await asyncio.sleep(seconds)  # the length of the outage is the experiment
        await start_service()
        up_at = time.monotonic()
        recovered_at = await load.wait_accepted_after(up_at, 60)
        count = len(load.accepted())
        await wait_for(lambda: asyncio.sleep(0, len(load.accepted()) >= count + 20), 30, "20 more tasks after recovery")
    finally:
        await load.stop()
    figures = {
        **load.figures(),
        "outage_s": round(up_at - down_at, 1),
        "recovery_s": round(max(0.0, recovered_at - up_at), 2),
    }
    return load, figures


async def broker_outage(config: Path, workdir: Path, rabbit: Any, seconds: float = 3.0) -> Figures:
    """RabbitMQ stopped and started again while tasks stream in: every 202 must complete."""
    async with cluster(config, workdir, workers=2) as c:
        load, figures = await outage(
            c, rabbit.stop, rabbit.start, seconds, {"type": "sleep", "payload": {"seconds": 0.01}}
        )
        done = await c.wait_all(load.accepted(), timeout=120)
        figures["completed"] = len(done)
        figures["ran_more_than_once"] = sum(1 for t in done.values() if t["attempts"] > 1)
        figures["workers_alive"] = sum(1 for w in c.workers if w.popen.poll() is None)
        return figures


async def redis_outage(config: Path, workdir: Path, redis: Any, seconds: float = 3.0) -> Figures:
    """Redis stopped and started again while tasks stream in and a WebSocket client watches."""
    async with cluster(config, workdir, workers=2) as c:
        seen: dict[str, tuple[int, str]] = {}  # task id -> (seq, status) as the WebSocket client knows it
        frames_after: list[float] = []
        ws = await c.session.ws_connect(f"{c.base}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=10))

        async def watch() -> None:
            async for msg in ws:
                data = json.loads(msg.data)
                frames_after.append(time.monotonic())
                for u in data if isinstance(data, list) else [data]:
                    if "id" in u and u["seq"] > seen.get(u["id"], (0, ""))[0]:
                        seen[u["id"]] = (u["seq"], u["status"])

        watcher = asyncio.create_task(watch())
        try:
            load, figures = await outage(
                c, redis.stop, redis.start, seconds, {"type": "sleep", "payload": {"seconds": 0.05}}
            )
            up_at = time.monotonic() - figures["recovery_s"]
            accepted = load.accepted()
            done = await c.wait_all(accepted, timeout=120)

            async def browser_caught_up() -> bool:
                return all(seen.get(tid, (0, ""))[1] == "completed" for tid in accepted)

            await wait_for(browser_caught_up, 30, "the WebSocket client to see every task completed")
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await ws.close()
        figures["completed"] = len(done)
        figures["ws_frames_after_outage"] = sum(1 for t in frames_after if t > up_at)
        figures["ran_more_than_once"] = sum(1 for t in done.values() if t["attempts"] > 1)
        return figures
