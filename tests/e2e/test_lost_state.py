"""A task whose record the store lost while its message waited is restored from the envelope, on both backends.

This is what a Redis restart without persistence, an eviction or a manual flush leaves: the message is
still queued, its record is gone. The worker runs it and writes the record again from the envelope's
type, payload and submission time, and the task is listed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

import asyncnode
from tests.conftest import Proc, database_path, db_rows, is_embedded, redis_client, wait_for
from tests.e2e.test_pipeline import base_url, check_alive, get_task, submit, wait_api

TIMEOUT = aiohttp.ClientTimeout(total=30)


async def forget_record(cfg: asyncnode.Config, tid: str) -> None:
    """Lose task ``tid``'s record as a Redis restart without persistence would (the message stays queued)."""
    if is_embedded(cfg):

        def delete() -> None:
            with contextlib.closing(sqlite3.connect(database_path(cfg), timeout=10)) as db, db:
                db.execute("DELETE FROM tasks WHERE id = ?", (tid,))

        await asyncio.to_thread(delete)
        assert await db_rows(cfg, "SELECT id FROM tasks WHERE id = ?", tid) == []
        return
    client = redis_client(cfg.redis.url)
    try:
        key = cfg.redis.key_prefix + tid
        await client.delete(key, key + "~history")
        await client.zrem(cfg.redis.key_prefix + "~recent", tid)
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


async def test_a_lost_record_is_restored_from_the_envelope(
    config_file: Path, cfg: asyncnode.Config, procs: Callable[..., Proc]
) -> None:
    api = procs("api", config_file)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_api(session, cfg, api)
        tid = await submit(session, cfg, "reverse", {"text": "restored"})
        created = (await get_task(session, cfg, tid))["created_at"]
        await forget_record(cfg, tid)
        async with session.get(f"{base_url(cfg)}/api/tasks/{tid}") as r:
            assert r.status == 404  # gone, while its message waits for a worker

        worker = procs("worker", config_file)

        async def completed() -> dict[str, Any] | None:
            check_alive(api, worker)
            async with session.get(f"{base_url(cfg)}/api/tasks/{tid}") as r:
                rec: dict[str, Any] = await r.json()
                return rec if r.status == 200 and rec["status"] == "completed" else None

        rec = await wait_for(completed, timeout=30, what=f"task {tid} to be completed")
        assert (rec["type"], rec["payload"], rec["result"]) == ("reverse", {"text": "restored"}, "derotser")
        assert rec["created_at"] == created  # the envelope carried it
        assert rec["attempts"] == 1
        assert [h["status"] for h in rec["history"]] == ["started", "completed"]  # the lost part stays lost
        async with session.get(f"{base_url(cfg)}/api/tasks?limit=10") as r:
            listed = [t["id"] for t in (await r.json())["items"]]
        assert tid in listed  # indexed again, at its submission time
