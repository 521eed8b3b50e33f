"""The embedded backend with real processes: one SQLite file shared by an API and workers.

What only the embedded backend has to prove, beyond the behavioural tests every
backend runs (tests parametrized by ``backend``): four workers hammering one file,
an API and a worker SIGKILLed mid-stream, a dead worker's lease taken over by its
pid, a retry that waits in the file without holding a worker, updates relayed in
tens of milliseconds, finished tasks pruned, and the file sound afterwards.

No RabbitMQ or Redis is needed.  The file is read directly only for what the HTTP
API does not show (rows, leases, integrity), read-only.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import DATABASE, Proc, database_path, db_rows, wait_for, write_config

#: Concurrent HTTP clients submitting tasks.
CLIENTS = 48


class Host:
    """One embedded deployment: its config, API and worker processes, and an HTTP session to the API."""

    def __init__(self, config: Path, procs: Callable[..., Proc]) -> None:
        self.config = config
        self.cfg = asyncnode.Config.from_toml(config, env={})
        self.base = f"http://127.0.0.1:{self.cfg.api.port}"
        self._procs = procs
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.every: list[Proc] = []
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=CLIENTS + 8)
        )

    def start_api(self) -> Proc:
        self.api = self._procs("api", self.config)
        self.every.append(self.api)
        return self.api

    def start_worker(self) -> Proc:
        worker = self._procs("worker", self.config)
        self.workers.append(worker)
        self.every.append(worker)
        return worker

    def check_alive(self) -> None:
        """Fail at once, with its log, if the API or a worker we count on has died."""
        for p in [self.api, *self.workers]:
            if p is not None and p.popen.poll() is not None:
                raise AssertionError(f"{p.role} pid {p.pid} exited with {p.popen.returncode}:\n{p.log()}")

    async def ready(self) -> None:
        """Wait until the API is ready and lists every running worker of ours."""

        async def answers() -> bool:
            self.check_alive()
            try:
                async with self.session.get(f"{self.base}/readyz") as resp:
                    if resp.status != 200:
                        return False
                async with self.session.get(f"{self.base}/api/workers") as resp:
                    listed = {int(w["pid"]) for w in (await resp.json())["items"]}
            except aiohttp.ClientError:
                return False
            return {w.pid for w in self.workers} <= listed

        await wait_for(answers, 30, f"the API and {len(self.workers)} worker(s) to be ready")

    async def submit(self, body: dict[str, Any]) -> str:
        async with self.session.post(f"{self.base}/api/tasks", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 202, answer
            return str(answer["id"])

    async def task(self, tid: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/api/tasks/{tid}") as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    async def wait_status(self, tid: str, status: str, timeout: float = 30, attempts: int = 0) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            self.check_alive()
            task = await self.task(tid)
            return task if task["status"] == status and task["attempts"] >= attempts else None

        return dict(await wait_for(reached, timeout, f"task {tid} {status}"))

    async def wait_completed(self, ids: list[str], timeout: float) -> None:
        """Poll the API until every task of ``ids`` is completed (none may fail)."""
        pending = set(ids)

        async def check(tid: str) -> None:
            task = await self.task(tid)
            assert task["status"] not in ("failed", "rejected"), task
            if task["status"] == "completed":
                pending.discard(tid)

        async def all_done() -> bool:
            self.check_alive()
            todo = sorted(pending)
            for i in range(0, len(todo), CLIENTS):
                await asyncio.gather(*(check(tid) for tid in todo[i : i + CLIENTS]))
            return not pending

        try:
            await wait_for(all_done, timeout, f"{len(ids)} tasks completed")
        except AssertionError as e:
            raise AssertionError(f"{e}: {len(pending)} still open, e.g. {sorted(pending)[:3]}") from None

    async def counters(self) -> dict[str, int]:
        """How many tasks ever reached each status, from the file's stats."""
        return {status: int(n) for status, n in await db_rows(self.cfg, "SELECT status, n FROM stats")}

    async def stored(self) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Every task in the file: its record and its history."""
        rows = await db_rows(self.cfg, "SELECT id, record, history FROM tasks")
        return {tid: (json.loads(record), json.loads(history or "[]")) for tid, record, history in rows}

    def assert_clean_logs(self) -> None:
        """No process of this host met a locked file or raised unhandled."""
        for p in self.every:
            log = p.log()
            for bad in ("database is locked", "Traceback"):
                assert bad not in log, f"{p.role} pid {p.pid} logged {bad!r}:\n{log[-6000:]}"

    async def stop_all(self) -> None:
        """SIGTERM every running process; each must exit 0."""
        running = [p for p in [self.api, *self.workers] if p is not None and p.popen.poll() is None]
        for p in running:
            p.signal(signal.SIGTERM)
        for p in running:
            assert await p.wait(timeout=20) == 0, p.log()[-6000:]

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def host(tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Callable[..., Awaitable[Host]]]:
    """Start an embedded deployment: ``await host(workers=N, **sections)``."""
    hosts: list[Host] = []

    async def make(workers: int = 1, **sections: Any) -> Host:
        sections = {
            "handlers": {"modules": ["handlers", "tests.fault_handlers"]},
            "worker": {"heartbeat": 0.5},
            **sections,
        }
        path = write_config(tmp_path / "config.toml", tag, backend="embedded", **sections)
        h = Host(path, procs)
        hosts.append(h)
        h.start_api()
        for _ in range(workers):
            h.start_worker()
        await h.ready()
        return h

    yield make
    for h in hosts:
        await h.close()


async def submit_noops(h: Host, n: int) -> list[str]:
    """Submit ``n`` noop tasks from CLIENTS concurrent clients; every one must be accepted."""
    ids: list[str] = []
    numbers = iter(range(n))

    async def client() -> None:
        for _ in numbers:  # one shared iterator: the clients take turns
            ids.append(await h.submit({"type": "noop"}))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return ids


# --------------------------------------------------------------------------
# Throughput and crashes
# --------------------------------------------------------------------------


async def test_four_workers_run_5000_tasks_each_exactly_once(host: Callable[..., Awaitable[Host]]) -> None:
    h = await host(workers=4)
    ids = await submit_noops(h, 5000)
    assert len(set(ids)) == 5000

    async def all_completed() -> bool:
        h.check_alive()
        return (await h.counters()).get("completed", 0) >= 5000

    await wait_for(all_completed, 90, "5000 tasks completed")
    counters = await h.counters()
    assert counters["completed"] == counters["started"] == counters["pending"] == 5000, counters
    assert counters.get("failed", 0) == counters.get("retrying", 0) == 0, counters

    stored = await h.stored()
    assert set(stored) == set(ids)
    worker_pids = {str(w.pid) for w in h.workers}
    used: Counter[str] = Counter()
    for tid, (record, history) in stored.items():
        assert record["status"] == "completed" and int(record["attempts"]) == 1, (tid, record)
        assert [entry["status"] for entry in history] == ["pending", "started", "completed"], (tid, history)
        used[record["worker"].rpartition(":")[2]] += 1
    assert set(used) == worker_pids, f"tasks per worker pid: {dict(used)}, workers: {worker_pids}"
    for tid in ids[::250]:  # what the API shows agrees with the file
        task = await h.task(tid)
        assert (task["status"], task["attempts"], task["result"]) == ("completed", 1, None), task
    assert await db_rows(h.cfg, "SELECT queue, COUNT(*) FROM messages GROUP BY queue") == []

    await h.stop_all()
    h.assert_clean_logs()


async def test_api_and_worker_killed_mid_stream_lose_nothing_accepted(
    host: Callable[..., Awaitable[Host]],
) -> None:
    h = await host(workers=2)
    accepted: list[str] = []
    refused: Counter[int] = Counter()  # answers other than 202, by status
    connection_errors = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal connection_errors
        # The cap keeps every task within [tasks] max_recent, so none is pruned before it is checked.
        while not stop.is_set() and len(accepted) < 5000:
            try:
                async with h.session.post(f"{h.base}/api/tasks", json={"type": "noop"}) as resp:
                    answer = await resp.json()
                    if resp.status == 202:
                        accepted.append(answer["id"])
                    else:
                        refused[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                connection_errors += 1  # not accepted: the task may or may not exist, nobody was promised it
            await asyncio.sleep(0.02)  # pacing of the load generator, not synchronisation

    # A task surely in hand at the kill: its worker dies with it, and its lease must be taken over.
    held = await h.submit({"type": "sleep", "payload": {"seconds": 3}})
    accepted.append(held)
    producers = [asyncio.create_task(client()) for _ in range(8)]
    try:

        async def flowing() -> bool:
            h.check_alive()
            if (await h.task(held))["status"] != "started":
                return False
            return len(accepted) >= 200 and (await h.counters()).get("completed", 0) >= 50

        await wait_for(flowing, 30, "the long task started, 200 tasks accepted and 50 completed")
        started = await h.task(held)
        victim = next(w for w in h.workers if started["worker"].endswith(f":{w.pid}"))
        assert h.api is not None
        old_api = h.api
        victim.signal(signal.SIGKILL)
        old_api.signal(signal.SIGKILL)
        assert await victim.wait(10) == -signal.SIGKILL and await old_api.wait(10) == -signal.SIGKILL
        h.workers.remove(victim)
        at_kill = len(accepted)

        await wait_for(lambda: asyncio.sleep(0, connection_errors > 0), 10, "a refused connection")
        h.start_api()
        h.start_worker()
        await h.ready()

        async def flowing_again() -> bool:
            h.check_alive()
            return len(accepted) >= at_kill + 200

        await wait_for(flowing_again, 30, "200 more tasks accepted after the restart")
    finally:
        stop.set()
        await asyncio.gather(*producers)

    assert len(set(accepted)) == len(accepted) < 5000
    assert set(refused) <= {503}, refused  # never a 500 on the way down or up
    await h.wait_completed(accepted, timeout=60)
    redelivered = await h.task(held)
    assert redelivered["attempts"] == 2 and not redelivered["worker"].endswith(f":{victim.pid}"), redelivered

    await h.stop_all()
    h.assert_clean_logs()
    # Nothing left behind, and the file is sound after two processes died holding it open.
    assert await db_rows(h.cfg, "SELECT queue, COUNT(*) FROM messages GROUP BY queue") == []
    assert await db_rows(h.cfg, "PRAGMA integrity_check") == [("ok",)]


async def test_killed_workers_lease_is_taken_over_by_its_pid_within_seconds(
    host: Callable[..., Awaitable[Host]],
) -> None:
    h = await host(workers=2, embedded={"lease_timeout": 60.0})
    tid = await h.submit({"type": "sleep", "payload": {"seconds": 3}})
    started = await h.wait_status(tid, "started")
    holder = next(w for w in h.workers if started["worker"].endswith(f":{w.pid}"))
    [(holder_pid, lease_until)] = await db_rows(
        h.cfg, "SELECT holder_pid, lease_until FROM messages WHERE task_id = ? AND holder IS NOT NULL", tid
    )
    assert holder_pid == holder.pid and lease_until > time.time()

    holder.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert await holder.wait(10) == -signal.SIGKILL
    h.workers.remove(holder)
    again = await h.wait_status(tid, "started", timeout=15, attempts=2)
    # The lease has 60 s to run: only the dead holder's pid can have freed it this soon.
    assert time.monotonic() - killed_at < 5, time.monotonic() - killed_at
    [survivor] = h.workers
    assert again["worker"].endswith(f":{survivor.pid}"), again
    done = await h.wait_status(tid, "completed", timeout=15)
    assert done["attempts"] == 2 and done["result"]["slept"] >= 3, done
    await h.stop_all()
    h.assert_clean_logs()


async def test_a_retry_waits_in_the_file_without_holding_the_worker(host: Callable[..., Awaitable[Host]]) -> None:
    h = await host(workers=1, broker={"retry_delays": [2.0], "max_retries": 1})
    queue, dlq = h.cfg.broker.queue, h.cfg.broker.queue + asyncnode.DLQ_SUFFIX
    failing = await h.submit({"type": "fail"})
    retrying = await h.wait_status(failing, "retrying")
    [(holder, ready_at)] = await db_rows(
        h.cfg, "SELECT holder, ready_at FROM messages WHERE queue = ? AND task_id = ?", queue, failing
    )
    assert holder is None and ready_at == pytest.approx(retrying["next_attempt_at"], abs=0.05)
    assert ready_at > time.time() + 1

    # The only worker is free meanwhile: a task submitted now runs before the retry is due.
    quick = await h.submit({"type": "reverse", "payload": {"text": "abc"}})
    done = await h.wait_status(quick, "completed", timeout=5)
    assert done["result"] == "cba" and done["finished_at"] < retrying["next_attempt_at"], (done, retrying)

    failed = await h.wait_status(failing, "failed", timeout=15)
    assert failed["attempts"] == 2
    second_start = [e["ts"] for e in failed["history"] if e["status"] == "started"][1]
    assert second_start >= retrying["next_attempt_at"] - 0.05
    rows = await db_rows(h.cfg, "SELECT queue, task_id, holder FROM messages")
    assert rows == [(dlq, failing, None)], rows
    await h.stop_all()


# --------------------------------------------------------------------------
# The file itself: commits, updates, pruning
# --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["relative", "absolute"])
async def test_a_202_is_a_committed_row_in_the_configured_file(
    where: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    expected = conf_dir / DATABASE if where == "relative" else tmp_path / "elsewhere.db"
    path = DATABASE if where == "relative" else str(expected)
    config = write_config(conf_dir / "config.toml", tag, backend="embedded", embedded={"path": path})
    h = Host(config, procs)
    try:
        assert database_path(h.cfg) == expected
        h.start_api()  # no worker: the task stays where the API put it
        await h.ready()
        tid = await h.submit({"type": "reverse", "payload": {"text": "hello"}})
        # Read right after the 202, from another connection: the rows are there, committed.
        [(queue, task_id, body, deliveries, holder)] = await db_rows(
            h.cfg, "SELECT queue, task_id, body, deliveries, holder FROM messages"
        )
        assert (queue, task_id, deliveries, holder) == (h.cfg.broker.queue, tid, 0, None)
        [(record,)] = await db_rows(h.cfg, "SELECT record FROM tasks WHERE id = ?", tid)
        assert json.loads(record)["status"] == "pending"
        created = json.loads(record)["created_at"]  # the envelope carries it, so a lost record can be restored
        assert json.loads(body) == {"id": tid, "type": "reverse", "payload": {"text": "hello"}, "created_at": created}
        assert expected.exists()
        await h.stop_all()
    finally:
        await h.close()


async def test_updates_reach_the_websocket_within_tens_of_milliseconds(
    host: Callable[..., Awaitable[Host]],
) -> None:
    h = await host(workers=1)
    arrivals: list[tuple[dict[str, Any], float]] = []
    ws = await h.session.ws_connect(f"{h.base}/ws")

    async def read() -> None:
        async for msg in ws:
            received = time.time()
            data = json.loads(msg.data)
            arrivals.extend((u, received) for u in (data if isinstance(data, list) else [data]) if "id" in u)

    reader = asyncio.create_task(read())
    try:
        ids = [await h.submit({"type": "noop"}) for _ in range(40)]
        wanted = set(ids)

        async def all_seen() -> bool:
            assert not reader.done(), "the WebSocket closed"
            return {u["id"] for u, _ in arrivals if u["status"] == "completed"} >= wanted

        await wait_for(all_seen, 20, "40 completed updates on the WebSocket")
    finally:
        await ws.close()
        await asyncio.wait_for(reader, 10)
    # From the worker's write (its ts) to this client: the same clock, one host.
    lags = [received - u["ts"] for u, received in arrivals if u["id"] in wanted and u["status"] != "pending"]
    assert len(lags) >= 80
    assert statistics.median(lags) < 0.05 and max(lags) < 0.5, sorted(lags)[-5:]


@pytest.mark.parametrize(
    "tasks",
    [
        pytest.param({"result_ttl": 1}, id="result_ttl"),
        pytest.param({"result_ttl": 3600, "max_recent": 5}, id="max_recent"),
    ],
)
async def test_finished_tasks_are_pruned_from_the_file(
    tasks: dict[str, Any], host: Callable[..., Awaitable[Host]]
) -> None:
    h = await host(
        workers=1,
        tasks=tasks,
        broker={"retry_delays": [120.0], "max_retries": 1},
        worker={"heartbeat": 0.2},
    )
    # The oldest task, and unfinished: it waits for a retry far away and must outlive every prune.
    waiting = await h.submit({"type": "fail"})
    await h.wait_status(waiting, "retrying")
    ids = [await h.submit({"type": "noop"}) for _ in range(20)]  # one by one: their order is their age
    await h.wait_completed(ids, timeout=30)

    kept = tasks.get("max_recent", 0)

    left = set(ids)

    async def pruned() -> bool:
        h.check_alive()
        left.intersection_update(await h.stored())
        return len(left) <= kept

    try:
        await wait_for(pruned, 30, f"finished tasks pruned to {kept}")
    except AssertionError as e:
        newest = [i for i, tid in enumerate(ids) if tid in left]
        raise AssertionError(f"{e}: {len(left)} of the 20 left, by age (0 = oldest): {newest}") from None
    stored = await h.stored()
    assert waiting in stored and (await h.task(waiting))["status"] == "retrying"
    if kept:
        assert set(ids[-kept:]) <= set(stored)  # the newest stay
        assert (await h.task(ids[-1]))["status"] == "completed"
    async with h.session.get(f"{h.base}/api/tasks/{ids[0]}") as resp:
        assert resp.status == 404
    await h.stop_all()
    h.assert_clean_logs()
