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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

import asyncnode
from tests.conftest import Proc, queue_counts, wait_for

Figures = dict[str, Any]


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
        state = asyncnode.RedisState(self.cfg.redis)
        try:
            found = {}
            for tid in ids:
                task = await state.get(tid)
                if task is not None:
                    found[tid] = task
            return found
        finally:
            await state.close()

    async def wait_all(self, ids: list[str], timeout: float, status: str = "completed") -> dict[str, dict[str, Any]]:
        pending = set(ids)
        done: dict[str, dict[str, Any]] = {}

        async def finished() -> bool:
            got = await self.tasks(sorted(pending))
            for tid, task in got.items():
                if task["status"] in asyncnode.TERMINAL:
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
                i = rng.randrange(len(c.workers))
                c.workers[i].signal(signal.SIGKILL)
                kills += 1
                await asyncio.to_thread(c.workers[i].popen.wait, 10)
                c.replace_worker(i)

        killing = asyncio.create_task(killer())
        bodies = [{"type": "sleep", "payload": {"seconds": rng.uniform(0.01, 0.05)}} for _ in range(tasks)]
        answers = await submit_many(c, bodies)
        ids = [tid for status, tid, _ in answers if status == 202]
        assert len(ids) == tasks, f"only {len(ids)} of {tasks} accepted: {[a for a in answers if a[0] != 202][:3]}"
        try:
            done = await c.wait_all(ids, timeout=60 + tasks * 0.2)
        finally:
            stop.set()
            await killing
        attempts = [t["attempts"] for t in done.values()]
        return {
            "tasks": tasks,
            "workers": workers,
            "kills": kills,
            "completed": len(done),
            "ran_more_than_once": sum(1 for a in attempts if a > 1),
            "max_attempts": max(attempts),
            "seconds": round(time.monotonic() - t0, 1),
        }


def figures_json(figures: Figures) -> str:
    """One line of JSON for logs and the README script."""
    return json.dumps(figures, sort_keys=True)
