"""A worker's state writes outlast Redis going away: a private Redis is stopped under a running task.

The shared Redis is never touched: the test's config points at a Redis of its own (tests/privsvc.py), with
the append-only file on, as a deployment that must not lose task state runs it. RabbitMQ is the shared one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import Proc, cleanup, in_ci, queue_counts, rabbitmq_only, wait_for, write_config
from tests.privsvc import PrivateRedis, redis_available

Client = TestClient  # type: ignore[type-arg]

#: Every request of the test client.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
#: How long the task sleeps, and how long Redis stays away: past the end of the task (so its completion is
#: written while Redis is gone) and longer than a publish or a single retry of the write takes.
TASK_SECONDS, OUTAGE = 1.0, 5.0


@pytest.fixture
async def durable_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A started private Redis that persists (append-only file): the task's record survives its restart."""
    reason = redis_available()
    if reason:
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    redis = PrivateRedis(tmp_path / "redis", persistent=True)
    await redis.start()
    try:
        yield redis
    finally:
        await redis.stop()


@rabbitmq_only  # Redis stopped and started again under a worker
@pytest.mark.timeout(120)
async def test_a_task_completed_while_redis_is_away_is_recorded_once_it_is_back(
    backend: str,
    tag: str,
    tmp_path: Path,
    durable_redis: PrivateRedis,
    procs: Callable[..., Proc],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    config = write_config(tmp_path / "config.toml", tag, redis={"url": durable_redis.url})
    cfg = asyncnode.Config.from_toml(config, env={})
    try:
        client = await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)
        worker = procs("worker", config)

        async def consuming() -> bool:
            assert worker.popen.poll() is None, worker.log()
            try:
                return (await queue_counts(cfg))[1] == 1
            except aio_pika.exceptions.AMQPError:  # not declared yet
                return False

        await wait_for(consuming, 30, "the worker to consume")
        resp = await client.post("/api/tasks", json={"type": "sleep", "payload": {"seconds": TASK_SECONDS}})
        assert resp.status == 202
        tid = (await resp.json())["id"]

        async def task_in(status: str) -> dict[str, Any] | None:
            resp = await client.get(f"/api/tasks/{tid}")  # a 500 while the API reconnects to Redis: not yet
            task = await resp.json() if resp.status == 200 else None
            return task if task is not None and task["status"] == status else None

        await wait_for(lambda: task_in("started"), 10, "the worker to start the task")
        down_at = time.time()
        await durable_redis.stop()
        await asyncio.sleep(OUTAGE)  # the length of the outage is the experiment; the task ends within it
        await durable_redis.start()
        up_at = time.time()

        final = await wait_for(lambda: task_in("completed"), 30, "the task recorded completed")
        # Its completion was planned while Redis was away and written after: the worker held on to it.
        assert down_at < final["finished_at"] < up_at, (down_at, final["finished_at"], up_at)
        assert final["result"]["slept"] >= TASK_SECONDS
        # It ran once: one attempt, started once, and its delivery settled rather than handed back.
        assert final["attempts"] == 1
        assert [h["status"] for h in final["history"]] == ["pending", "started", "completed"]

        async def settled() -> bool:
            return await queue_counts(cfg) == (0, 1)

        await wait_for(settled, 10, "the work queue empty, the worker still consuming")
        assert worker.popen.poll() is None, worker.log()
    finally:
        await cleanup(tag)
