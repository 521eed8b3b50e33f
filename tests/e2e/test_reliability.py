"""Retries, backoff, dead letters, time limits and poison messages with real processes, on both backends."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiosmtpd.controller import Controller

import asyncnode
from tests.conftest import ROOT, Proc, cleanup, free_port, queue_counts, wait_for, write_config

DELAYS = [0.4, 0.8]


class Stack:
    """An API process and worker processes on one isolated config, with an HTTP session and a WebSocket log."""

    def __init__(self, config: Path, procs: Callable[..., Proc]) -> None:
        self.config = config
        self.cfg = asyncnode.Config.from_toml(config, env={})
        self.base = f"http://127.0.0.1:{self.cfg.api.port}"
        self.procs = procs
        self.workers: list[Proc] = []
        self.updates: dict[str, list[dict[str, Any]]] = {}
        self.session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def start(self, workers: int) -> None:
        self.api = self.procs("api", self.config)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

        async def api_ready() -> bool:
            try:
                async with self.http.get(f"{self.base}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                assert self.api.popen.poll() is None, self.api.log()
                return False

        await wait_for(api_ready, 30, "the API")
        self._ws = await self.http.ws_connect(f"{self.base}/ws")
        self._reader = asyncio.create_task(self._read(self._ws))
        for _ in range(workers):
            self.start_worker()
        await self.wait_consumers(workers)

    def start_worker(self) -> Proc:
        worker = self.procs("worker", self.config)
        self.workers.append(worker)
        return worker

    async def wait_consumers(self, n: int) -> None:
        async def consuming() -> bool:
            try:
                return (await queue_counts(self.cfg))[1] == n
            except Exception:  # the queue is declared by the first worker
                return False

        await wait_for(consuming, 30, f"{n} consumers")

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            data = json.loads(msg.data)
            for update in data if isinstance(data, list) else [data]:
                if "id" not in update:  # a stats message
                    continue
                self.updates.setdefault(update["id"], []).append({**update, "seen": time.monotonic()})

    async def submit(self, body: dict[str, Any]) -> str:
        async with self.http.post(f"{self.base}/api/tasks", json=body) as resp:
            assert resp.status == 202, await resp.text()
            return str((await resp.json())["id"])

    async def task(self, tid: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/api/tasks/{tid}") as resp:
            return dict(await resp.json())

    async def wait_status(self, tid: str, status: str, timeout: float = 30) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            task = await self.task(tid)
            return task if task["status"] == status else None

        return dict(await wait_for(reached, timeout, f"task {tid} {status}"))

    async def wait_update(self, tid: str, status: str, timeout: float = 5) -> None:
        """Wait until the WebSocket relayed ``status`` of ``tid`` (it may trail what GET already shows)."""

        async def relayed() -> bool:
            assert self._reader is not None and not self._reader.done(), "the WebSocket reader stopped"
            return any(u["status"] == status for u in self.updates.get(tid, []))

        await wait_for(relayed, timeout, f"the {status} update of {tid} on the WebSocket")

    async def dlq(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/api/dlq") as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()  # releases its connection; the reader then ends
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.session:
            await self.session.close()


@pytest.fixture
async def stack(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> AsyncIterator[Callable[..., Any]]:
    stacks: list[Stack] = []

    async def make(workers: int = 1, **sections: Any) -> Stack:
        broker = {"retry_delays": DELAYS, "max_retries": 2, "delivery_limit": 3, **sections.pop("broker", {})}
        path = write_config(
            tmp_path / "config.toml",
            tag,
            backend=backend,
            broker=broker,
            handlers={"modules": ["handlers", "tests.fault_handlers"]},
            worker={"heartbeat": 0.5},
            **sections,
        )
        s = Stack(path, procs)
        stacks.append(s)
        await s.start(workers)
        return s

    try:
        yield make
    finally:
        try:
            for s in stacks:
                await s.close()  # its WebSocket reader and HTTP session
        finally:
            await cleanup(tag)


def statuses(updates: list[dict[str, Any]]) -> list[str]:
    return [u["status"] for u in sorted(updates, key=lambda u: u["seq"]) if not u.get("progress")]


async def test_failing_task_is_retried_with_backoff_then_dead_lettered(stack: Callable[..., Any]) -> None:
    s: Stack = await stack()
    tid = await s.submit({"type": "fail"})
    task = await s.wait_status(tid, "failed")
    assert task["attempts"] == 3  # max_retries = 2: three runs started
    assert "attempt 3 failed on purpose" in task["error"]
    await s.wait_update(tid, "failed")
    updates = sorted(s.updates[tid], key=lambda u: u["seq"])
    assert statuses(updates) == ["pending", "started", "retrying", "started", "retrying", "started", "failed"]
    retrying = [u for u in updates if u["status"] == "retrying"]
    assert [u["attempt"] for u in retrying] == [1, 2]
    assert all("failed on purpose" in u["error"] for u in retrying)
    # Each retry waited its delay (the n-th, from the moment it was scheduled), and not much longer.
    starts = [u["ts"] for u in updates if u["status"] == "started"]
    for (scheduled, started), delay in zip(
        zip([u["ts"] for u in retrying], starts[1:], strict=True), DELAYS, strict=True
    ):
        assert delay - 0.05 <= started - scheduled < delay + 1.5, (started - scheduled, delay)
    for u, delay in zip(retrying, DELAYS, strict=True):
        assert u["next_attempt_at"] == pytest.approx(u["ts"] + delay, abs=0.05)

    dlq = await s.dlq()
    assert dlq["total"] == 1
    [item] = dlq["items"]
    assert (item["id"], item["type"], item["attempts"]) == (tid, "fail", 3)
    assert "attempt 3 failed on purpose" in item["error"] and "RuntimeError" in item["traceback"]
    assert item["failed_at"] >= item["first_failed_at"]
    assert abs(item["failed_at"] - task["finished_at"]) < 1.0  # to the millisecond, not in 2-minute steps


async def test_requeue_from_the_dlq_runs_the_task_again(stack: Callable[..., Any], tmp_path: Path) -> None:
    s: Stack = await stack()
    flag = tmp_path / "flag"
    tid = await s.submit({"type": "fail_until", "payload": {"flag": str(flag)}})
    await s.wait_status(tid, "failed")
    assert (await s.dlq())["total"] == 1

    flag.touch()  # whatever made it fail is fixed; now requeue it
    async with s.http.post(f"{s.base}/api/dlq/{tid}/requeue") as resp:
        assert resp.status == 200 and (await resp.json()) == {"requeued": 1, "skipped": 0}
    task = await s.wait_status(tid, "completed")
    assert task["result"] == "ok" and task["attempts"] == 1 and task["error"] is None
    assert (await s.dlq())["total"] == 0
    async with s.http.post(f"{s.base}/api/dlq/{tid}/requeue") as resp:
        assert resp.status == 404


async def test_permanent_error_and_time_limit(stack: Callable[..., Any]) -> None:
    s: Stack = await stack()
    permanent = await s.submit({"type": "fail", "payload": {"permanent": True}})
    slow = await s.submit({"type": "sleep", "payload": {"seconds": 30}, "timeout": 0.3})
    task = await s.wait_status(permanent, "failed")
    assert task["attempts"] == 1 and task["error"] == "this can never work"
    task = await s.wait_status(slow, "failed")
    assert task["attempts"] == 3 and task["error"] == "timed out after 0.3 s"
    assert {i["id"] for i in (await s.dlq())["items"]} == {permanent, slow}


async def test_dlq_discard_requeue_all_and_cli(stack: Callable[..., Any]) -> None:
    s: Stack = await stack()
    ids = [await s.submit({"type": "fail", "payload": {"permanent": True}}) for _ in range(3)]
    for tid in ids:
        await s.wait_status(tid, "failed")
    async with s.http.delete(f"{s.base}/api/dlq/{ids[0]}") as resp:
        assert resp.status == 200 and (await resp.json()) == {"discarded": 1, "skipped": 0}
    async with s.http.delete(f"{s.base}/api/dlq/{ids[0]}") as resp:
        assert resp.status == 404 and "no dead letter" in (await resp.json())["error"]
    assert {i["id"] for i in (await s.dlq())["items"]} == set(ids[1:])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "asyncnode.py", "dlq", *args, "--config", str(s.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )

    listed = cli("list")
    assert listed.returncode == 0 and ids[1] in listed.stdout and "2 dead letter(s)" in listed.stdout
    requeued = cli("requeue", ids[1])
    assert requeued.returncode == 0 and "requeued 1 task(s)" in requeued.stdout
    await s.wait_status(ids[1], "failed")  # it runs again, and fails again
    async with s.http.post(f"{s.base}/api/dlq/requeue") as resp:
        assert (await resp.json()) == {"requeued": 2, "skipped": 0}
    for tid in ids[1:]:
        await s.wait_status(tid, "failed")
    purged = cli("purge")
    assert purged.returncode == 0 and "purged 2 dead letter(s)" in purged.stdout
    assert (await s.dlq())["total"] == 0


async def test_poison_message_is_dead_lettered_while_others_complete(stack: Callable[..., Any]) -> None:
    s: Stack = await stack(workers=2)
    poison = await s.submit({"type": "crash"})
    good = [await s.submit({"type": "reverse", "payload": {"text": f"t{i}"}}) for i in range(20)]
    crashes = 0

    async def settled() -> bool:
        nonlocal crashes
        # Stand in for supervisord: restart each worker the poison task kills.
        for i, worker in enumerate(s.workers):
            if worker.popen.poll() is not None:
                assert worker.popen.returncode == -signal.SIGKILL, worker.log()
                crashes += 1
                s.workers[i] = s.procs("worker", s.config)
        return (await s.task(poison))["status"] == "failed"

    await wait_for(settled, 60, "the poison task to be dead-lettered")
    task = await s.task(poison)
    assert "worker died" in task["error"] and "delivery limit" in task["error"]
    assert crashes == task["attempts"] == 2  # delivery_limit = 3: the third delivery is not run
    for i, tid in enumerate(good):
        assert (await s.wait_status(tid, "completed"))["result"] == f"t{i}"[::-1]
    [item] = (await s.dlq())["items"]
    assert item["id"] == poison and "worker died" in item["error"]


class Rejecting:
    """An SMTP server that refuses every recipient permanently."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        return "550 5.1.1 no such user"


async def test_email_permanent_rejection_is_not_retried_and_unreachable_is(stack: Callable[..., Any]) -> None:
    controller = Controller(Rejecting(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        s: Stack = await stack(smtp={"host": "127.0.0.1", "port": controller.port})
        tid = await s.submit({"type": "email", "payload": {"to": "nobody@example.com", "subject": "s", "body": "b"}})
        task = await s.wait_status(tid, "failed")
        assert task["attempts"] == 1 and "refused the recipient" in task["error"]
    finally:
        controller.stop()
    tid = await s.submit({"type": "email", "payload": {"to": "a@example.com", "subject": "s", "body": "b"}})
    task = await s.wait_status(tid, "failed")  # nothing listens any more: retried, then given up
    assert task["attempts"] == 3 and "SMTPConnect" in task["error"]
