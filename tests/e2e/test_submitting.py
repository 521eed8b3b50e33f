"""Submitting from code, with real API and worker processes on both backends: the Client over HTTP and straight
to the backend (submit, wait, cancel, get, typed errors), SyncClient from a plain thread, submit_many (500 tasks;
a bad item writes nothing), and the CLI (exit codes, field=value coercion, --wait locally and remotely, status,
watch, cancel --url)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import ROOT, Proc, cleanup, free_port, wait_healthy, write_config
from tests.e2e.test_queues import start_workers

TOKEN = "submitting-operator-token"
HANDLERS = {"modules": ["handlers", "tests.fault_handlers"]}
WAIT = 30.0


class Deployment:
    def __init__(self, path: Path, base: str) -> None:
        self.path, self.base = path, base

    def client(self, how: str) -> asyncnode.Client:
        """``how``: "http" (the API) or "direct" (the backend of config.toml)."""
        return asyncnode.Client(self.base, TOKEN) if how == "http" else asyncnode.Client.from_config(self.path)

    async def records(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(f"{self.base}/api/tasks?limit=1000", headers={"Authorization": f"Bearer {TOKEN}"}) as r,
        ):
            assert r.status == 200
            return list((await r.json())["items"])


@pytest.fixture
async def deployment(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Deployment]:
    path = write_config(tmp_path / "config.toml", tag, backend=backend, handlers=HANDLERS, api={"token": TOKEN})
    cfg = asyncnode.Config.from_toml(path, env={})
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, procs("api", path))
    await start_workers(procs, path, 1, ["--log-level", "INFO"])
    yield Deployment(path, base)
    await cleanup(tag)


@pytest.mark.parametrize("how", ["http", "direct"])
async def test_a_client_submits_waits_gets_and_cancels(deployment: Deployment, how: str) -> None:
    async with deployment.client(how) as client:
        task = await client.submit("reverse", {"text": "client"})
        assert task.status == "pending" and task.queue == "default"
        done = await client.wait(task.id, WAIT)
        assert (done.status, done.result) == ("completed", "tneilc")
        assert (await client.get(task.id)).record["history"][-1]["status"] == "completed"
        failed = await client.wait((await client.submit("fail", {"permanent": True})).id, WAIT)
        assert failed.status == "failed" and "never work" in str(failed.error)
        later = await client.submit("sleep", {"seconds": 1}, delay=600)
        assert later.status == "scheduled" and later.run_at is not None
        assert (await client.cancel(later.id)).status == "cancelled"
        assert (await client.wait(later.id, WAIT)).status == "cancelled"
        with pytest.raises(asyncnode.Conflict) as finished:
            await client.cancel(task.id)
        assert finished.value.status == "completed"


@pytest.mark.parametrize("how", ["http", "direct"])
async def test_a_clients_errors_are_typed(deployment: Deployment, how: str) -> None:
    async with deployment.client(how) as client:
        with pytest.raises(asyncnode.ValidationError) as bad:
            await client.submit("reverse", {"txt": "x"})
        assert bad.value.field == "txt"
        with pytest.raises(asyncnode.ValidationError) as unknown:
            await client.submit("no-such-type")
        assert unknown.value.field == "type"
        with pytest.raises(asyncnode.NotFound):
            await client.get("00000000-0000-4000-8000-000000000000")
        with pytest.raises(asyncnode.NotFound):
            await client.cancel("00000000-0000-4000-8000-000000000000")
        first = await client.submit("reverse", {"text": "once"}, idempotency_key=f"{how}-key")
        assert (await client.submit("reverse", {"text": "once"}, idempotency_key=f"{how}-key")).id == first.id
        with pytest.raises(asyncnode.Conflict):
            await client.submit("reverse", {"text": "another"}, idempotency_key=f"{how}-key")
    async with asyncnode.Client(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=5) as nowhere:
        with pytest.raises(asyncnode.Unavailable):
            await nowhere.submit("reverse", {"text": "x"})


@pytest.mark.parametrize("how", ["http", "direct"])
async def test_submit_many_makes_500_tasks_in_order_and_a_bad_item_none(deployment: Deployment, how: str) -> None:
    before = len(await deployment.records())
    async with deployment.client(how) as client:
        items: list[dict[str, Any]] = [{"type": "reverse", "payload": {"text": f"{i}"}} for i in range(10)]
        items[7] = {"type": "reverse", "payload": {"text": 7}}
        with pytest.raises(asyncnode.ValidationError) as bad:
            await client.submit_many(items)
        assert (bad.value.index, bad.value.field) == (7, "text")
        assert len(await deployment.records()) == before  # nothing written
        tasks = await client.submit_many({"type": "reverse", "payload": {"text": f"n{i}"}} for i in range(500))
        assert [t.status for t in tasks] == ["pending"] * 500 and len({t.id for t in tasks}) == 500
        done = [await client.wait(t.id, WAIT) for t in tasks]
        assert [t.result for t in done] == [f"n{i}"[::-1] for i in range(500)]


@pytest.mark.parametrize("how", ["http", "direct"])
async def test_each_bulk_item_may_carry_its_own_idempotency_key(deployment: Deployment, how: str) -> None:
    async with deployment.client(how) as client:
        items = [
            {"type": "reverse", "payload": {"text": f"k{i}"}, "idempotency_key": f"{how}-bulk-{i}"} for i in range(3)
        ]
        first = await client.submit_many(items)
        again = await client.submit_many([*items, {"type": "reverse", "payload": {"text": "plain"}}])
        assert [t.id for t in again[:3]] == [t.id for t in first] and again[3].id not in {t.id for t in first}
        clash = await client.submit_many([{**items[0], "payload": {"text": "another body"}}])
        assert clash[0].status == "conflict" and clash[0].id == ""
        assert len({r["id"] for r in await deployment.records()} & {t.id for t in [*first, *again]}) == 4


@pytest.mark.parametrize("how", ["http", "direct"])
async def test_a_sync_client_works_from_a_plain_thread(deployment: Deployment, how: str) -> None:
    out: dict[str, Any] = {}

    def work() -> None:
        made = (
            asyncnode.SyncClient(deployment.base, TOKEN)
            if how == "http"
            else asyncnode.SyncClient.from_config(deployment.path)
        )
        with made as client:
            task = client.submit("reverse", {"text": "thread"})
            out["done"] = client.wait(task.id, WAIT)
            out["many"] = client.submit_many([{"type": "noop"}, {"type": "noop"}])

    thread = threading.Thread(target=work)
    thread.start()
    await asyncio.to_thread(thread.join, WAIT * 2)
    assert not thread.is_alive()
    assert (out["done"].status, out["done"].result) == ("completed", "daerht")
    assert [t.status for t in out["many"]] == ["pending", "pending"]


async def cli(deployment: Deployment, *args: str, remote: bool = False) -> subprocess.CompletedProcess[str]:
    where = ["--url", deployment.base] if remote else []
    env = {**os.environ, "ASYNCNODE_TOKEN": TOKEN}
    argv = [sys.executable, str(ROOT / "asyncnode.py"), *args, "--config", str(deployment.path), *where]
    return await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
async def test_the_cli_submits_coerces_waits_and_exits_by_the_outcome(deployment: Deployment, remote: bool) -> None:
    ok = await cli(deployment, "submit", "sleep", "seconds=0.05", "--wait", remote=remote)
    assert ok.returncode == 0, ok.stderr
    task_id, result = ok.stdout.splitlines()
    assert json.loads(result)["slept"] >= 0.05
    failed = await cli(deployment, "submit", "fail", "permanent=true", "--wait", remote=remote)
    assert failed.returncode == 1 and json.loads(failed.stdout.splitlines()[1])["status"] == "failed"
    slow = await cli(deployment, "submit", "sleep", "seconds=5", "--wait", "--timeout", "0.5", remote=remote)
    assert slow.returncode == 3 and "not finished" in slow.stderr
    for bad in (["sleep", "seconds=soon"], ["fail", "permanent=maybe"], ["reverse", "--payload", "[1]"], ["nope"]):
        out = await cli(deployment, "submit", *bad, remote=remote)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and not out.stdout, out
    status = await cli(deployment, "status", task_id, "--json", remote=remote)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed"
    assert "status: completed" in (await cli(deployment, "status", task_id, remote=remote)).stdout
    missing = await cli(deployment, "status", "00000000-0000-4000-8000-000000000000", remote=remote)
    assert missing.returncode == 1
    later = (await cli(deployment, "submit", "sleep", "seconds=1", "--delay", "600", remote=remote)).stdout.strip()
    cancel = await cli(deployment, "cancel", later, task_id, remote=remote)
    assert cancel.returncode == 1 and cancel.stdout.splitlines() == [
        f"{later}: cancelled",
        f"{task_id}: already completed",
    ]


async def test_watch_prints_a_line_per_update_until_sigint(deployment: Deployment) -> None:
    argv = [sys.executable, str(ROOT / "asyncnode.py"), "watch", "--type", "reverse", "--url", deployment.base]
    env = {**os.environ, "ASYNCNODE_TOKEN": TOKEN}
    watcher = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        async with asyncnode.Client(deployment.base, TOKEN) as client:
            lines: list[str] = []
            reader = asyncio.get_running_loop().run_in_executor(
                None, lambda: [lines.append(watcher.stdout.readline()) for _ in range(3)]
            )  # type: ignore[union-attr]
            async with asyncio.timeout(60):  # each task it sees makes a line; the first ones may precede its follow
                while not reader.done():
                    await client.wait((await client.submit("reverse", {"text": "w"})).id, WAIT)
                    await asyncio.wait({reader}, timeout=0.5)
        assert all(" reverse " in line for line in lines), lines
        watcher.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(watcher.wait, 15) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
        for stream in (watcher.stdout, watcher.stderr):
            if stream is not None:
                stream.close()


def test_field_values_are_read_as_their_declared_types() -> None:
    fields = [{"name": "n", "type": "integer"}, {"name": "x", "type": "number"}, {"name": "b", "type": "boolean"}]
    got = asyncnode.coerce_fields(["n=3", "x=2.5", "b=yes", "s=text=more"], fields)
    assert got == {"n": 3, "x": 2.5, "b": True, "s": "text=more"}
    for bad, field in (("n=1.5", "n"), ("x=big", "x"), ("b=2", "b")):
        with pytest.raises(asyncnode.ValidationError) as e:
            asyncnode.coerce_fields([bad], fields)
        assert e.value.field == field
    with pytest.raises(asyncnode.ValidationError):
        asyncnode.coerce_fields(["novalue"], fields)
