"""`up` under real supervisord, on both backends: process counts, two instances, crashes, reload and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Up, cleanup, pid_alive, task_records, wait_for, write_config


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@pytest.fixture
async def conf(backend: str, tag: str, tmp_path: Path) -> AsyncIterator[Callable[..., Path]]:
    """Write this test's config (isolated by tag) on ``backend``; clean its queues and keys afterwards."""

    def make(**sections: Any) -> Path:
        sections.setdefault("worker", {}).setdefault("heartbeat", 0.5)
        sections["worker"].setdefault("stopwaitsecs", 30)
        return write_config(tmp_path / "config.toml", tag, backend=backend, **sections)

    yield make
    await cleanup(tag)


def api_url(path: Path) -> str:
    import asyncnode

    cfg = asyncnode.Config.from_toml(path, env={})
    return f"http://127.0.0.1:{cfg.api.port}"


async def submit(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> str:
    async with session.post(f"{base}/api/tasks", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["id"])


async def wait_api(session: aiohttp.ClientSession, base: str, timeout: float = 30) -> None:
    async def ready() -> bool:
        try:
            async with session.get(f"{base}/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout, f"{base}/readyz")


async def wait_done(
    session: aiohttp.ClientSession, base: str, ids: list[str], timeout: float = 60
) -> dict[str, dict[str, Any]]:
    """Poll until every task is completed; return them by id."""
    done: dict[str, dict[str, Any]] = {}

    async def all_done() -> bool:
        for tid in ids:
            if tid in done:
                continue
            async with session.get(f"{base}/api/tasks/{tid}") as resp:
                task = await resp.json()
            assert task["status"] not in ("failed", "rejected"), task
            if task["status"] == "completed":
                done[tid] = task
        return len(done) == len(ids)

    await wait_for(all_done, timeout, f"{len(ids)} tasks completed ({len(done)} so far)")
    return done


def worker_pids(procs: dict[str, dict[str, Any]]) -> set[int]:
    return {p["pid"] for name, p in procs.items() if name.startswith("worker_")}


async def test_up_runs_one_api_and_n_workers_and_spreads_tasks(
    conf: Callable[..., Path], ups: Callable[..., Up], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = conf(instances={"local": {"roles": ["api", "worker"], "processes": 3}})
    up = ups(path, tmp_path / "run")
    procs = await up.wait_running({"api", "worker_00", "worker_01", "worker_02"})
    base = api_url(path)
    await wait_api(session, base)

    ids = [await submit(session, base, {"type": "sleep", "payload": {"seconds": 0.05}}) for _ in range(30)]
    tasks = await wait_done(session, base, ids)
    assert set(tasks) == set(ids) and all(t["attempts"] == 1 for t in tasks.values()), tasks
    ran_on = Counter(int(t["worker"].rsplit(":", 1)[1]) for t in tasks.values())
    assert set(ran_on) <= worker_pids(procs), (ran_on, worker_pids(procs))
    assert len(ran_on) > 1, f"all 30 tasks ran on one worker: {ran_on}"

    # Each worker's heartbeat counts the tasks it acked; a beat may trail the last ack by one interval.
    async def every_task_counted() -> list[dict[str, Any]] | None:
        async with session.get(f"{base}/api/workers") as resp:
            items: list[dict[str, Any]] = (await resp.json())["items"]
        counted = sum(w["tasks_done"] for w in items)
        assert counted <= len(ids), f"the workers count {counted} tasks done, {len(ids)} were submitted: {items}"
        return items if counted == len(ids) else None

    workers = await wait_for(every_task_counted, 10, f"the heartbeats to count all {len(ids)} tasks")
    assert {w["pid"] for w in workers} == worker_pids(procs)
    assert {w["instance"] for w in workers} == {"local"}
    done_by = {w["pid"]: w["tasks_done"] for w in workers if w["tasks_done"]}
    assert done_by == dict(ran_on), f"workers' counts {done_by} != where the tasks ran {dict(ran_on)}"
    assert len(done_by) > 1, done_by


async def test_two_instances_as_two_hosts(
    conf: Callable[..., Path], ups: Callable[..., Up], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = conf(
        instances={"api-1": {"roles": ["api"]}, "worker-1": {"roles": ["worker"], "processes": 2}},
    )
    api = ups(path, tmp_path / "run-api", "api-1")
    workers = ups(path, tmp_path / "run-worker", "worker-1")
    await api.wait_running({"api"})
    procs = await workers.wait_running({"worker_00", "worker_01"})
    base = api_url(path)
    await wait_api(session, base)

    ids = [await submit(session, base, {"type": "reverse", "payload": {"text": f"task {i}"}}) for i in range(10)]
    tasks = await wait_done(session, base, ids)
    for i, tid in enumerate(ids):
        assert tasks[tid]["result"] == f"task {i}"[::-1]
        assert int(tasks[tid]["worker"].rsplit(":", 1)[1]) in worker_pids(procs)
    async with session.get(f"{base}/api/workers") as resp:
        assert {w["instance"] for w in (await resp.json())["items"]} == {"worker-1"}


async def test_killed_worker_is_restarted_and_its_task_redelivered(
    conf: Callable[..., Path], ups: Callable[..., Up], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = conf(instances={"local": {"roles": ["api", "worker"], "processes": 1}})
    up = ups(path, tmp_path / "run")
    procs = await up.wait_running({"api", "worker_00"})
    old_pid = procs["worker_00"]["pid"]
    base = api_url(path)
    await wait_api(session, base)

    tid = await submit(session, base, {"type": "sleep", "payload": {"seconds": 2}})

    async def started() -> bool:
        async with session.get(f"{base}/api/tasks/{tid}") as resp:
            return (await resp.json())["status"] == "started"

    await wait_for(started, 15, "the task to start")
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        procs = await up.processes()
        worker = procs.get("worker_00", {})
        return worker.get("statename") == "RUNNING" and worker.get("pid") != old_pid

    await wait_for(restarted, 30, "supervisord to restart the killed worker")
    task = (await wait_done(session, base, [tid], timeout=30))[tid]
    assert task["attempts"] == 2
    assert task["worker"] != f"{task['worker'].rsplit(':', 1)[0]}:{old_pid}"
    assert not pid_alive(old_pid)


async def test_reload_scales_workers_without_losing_tasks(
    conf: Callable[..., Path], ups: Callable[..., Up], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = conf(instances={"local": {"roles": ["api", "worker"], "processes": 2}})
    up = ups(path, tmp_path / "run")
    before = await up.wait_running({"api", "worker_00", "worker_01"})
    base = api_url(path)
    await wait_api(session, base)

    ids: list[str] = []
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            ids.append(await submit(session, base, {"type": "sleep", "payload": {"seconds": 0.1}}))
            await asyncio.sleep(0.02)  # pacing of the load generator, not synchronisation

    producer = asyncio.create_task(stream())
    try:
        await wait_for(lambda: asyncio.sleep(0, len(ids) >= 10), 15, "10 tasks submitted")
        path.write_text(path.read_text().replace("processes = 2", "processes = 4"))
        reload = await asyncio.create_subprocess_exec(
            os.sys.executable,
            "asyncnode.py",
            "ctl",
            "reload",
            "--config",
            str(path),
            "--run-dir",
            str(up.run_dir),
            cwd=Path(__file__).resolve().parents[2],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(reload.communicate(), 60)
        assert reload.returncode == 0, out.decode()
        after = await up.wait_running({"api", "worker_00", "worker_01", "worker_02", "worker_03"})
        count = len(ids)
        await wait_for(lambda: asyncio.sleep(0, len(ids) >= count + 10), 15, "10 more tasks after the reload")
    finally:
        stop.set()
        await asyncio.wait_for(producer, 15)  # its last request is bounded by the session's timeout

    await wait_done(session, base, ids, timeout=90)
    # The workers that were running kept running: only the difference was started.
    assert after["worker_00"]["pid"] == before["worker_00"]["pid"]
    assert after["worker_01"]["pid"] == before["worker_01"]["pid"]


async def test_sigterm_to_up_finishes_tasks_in_hand_and_leaves_no_process(
    conf: Callable[..., Path], ups: Callable[..., Up], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = conf(instances={"local": {"roles": ["api", "worker"], "processes": 2}})
    up = ups(path, tmp_path / "run")
    procs = await up.wait_running({"api", "worker_00", "worker_01"})
    base = api_url(path)
    await wait_api(session, base)

    ids = [await submit(session, base, {"type": "sleep", "payload": {"seconds": 1.5}}) for _ in range(2)]

    async def both_started() -> bool:
        statuses = []
        for tid in ids:
            async with session.get(f"{base}/api/tasks/{tid}") as resp:
                statuses.append((await resp.json())["status"])
        return statuses == ["started", "started"]

    await wait_for(both_started, 15, "both tasks started")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    code = await asyncio.to_thread(up.stop, 30)
    assert code == 0, up.log()
    assert loop.time() - t0 < 30
    for pid in (p["pid"] for p in procs.values()):
        assert not pid_alive(pid), f"pid {pid} outlived supervisord"

    import asyncnode

    # Nothing answers HTTP any more: read what the processes left in the task store.
    tasks, workers = await task_records(asyncnode.Config.from_toml(path, env={}), ids)
    for tid in ids:
        task = tasks.get(tid)
        assert task is not None and task["status"] == "completed" and task["attempts"] == 1, task
    assert workers == []  # clean exits remove their heartbeats


async def test_process_crashing_at_start_ends_fatal_and_check_says_so(
    conf: Callable[..., Path], ups: Callable[..., Up], tmp_path: Path
) -> None:
    # A handler module that does not exist makes both roles exit 2 at start, every time.
    path = conf(
        instances={"local": {"roles": ["api", "worker"], "processes": 1}},
        handlers={"modules": ["no_such_handlers_module"]},
    )
    up = ups(path, tmp_path / "run")

    async def fatal() -> bool:
        procs = await up.processes()
        return bool(procs) and all(p["statename"] == "FATAL" for p in procs.values())

    await wait_for(fatal, 60, "both programs FATAL after their start retries")
    root = Path(__file__).resolve().parents[2]
    for argv, expected in (
        (["check"], "processes not running: api, worker_00"),
        (["ctl", "status"], "FATAL"),
    ):
        proc = await asyncio.create_subprocess_exec(
            os.sys.executable,
            "asyncnode.py",
            *argv,
            "--config",
            str(path),
            "--run-dir",
            str(up.run_dir),
            cwd=root,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode != 0, out.decode()
        assert expected in out.decode(), out.decode()
    assert "cannot import 'no_such_handlers_module'" in (up.run_dir / "logs" / "worker_00.log").read_text()
