"""`up` under real supervisord, on both backends: process counts, two instances, queues per instance, crashes,
reload and shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
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


async def test_each_instance_runs_only_the_queues_it_serves(
    conf: Callable[..., Path], ups: Callable[..., Up], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Two `up`s on this machine as two hosts, on one config (embedded: one SQLite file beside it).
    path = conf(
        queues={"mail": {}},
        routes={"reverse": "mail"},
        instances={
            "local": {"roles": ["api", "worker"], "queues": ["default"], "processes": 1},
            "worker-mail": {"roles": ["worker"], "queues": ["mail"], "processes": 1},
        },
    )
    local = ups(path, tmp_path / "run-local", "local")
    mail = ups(path, tmp_path / "run-mail", "worker-mail")
    local_pid = (await local.wait_running({"api", "worker_00"}))["worker_00"]["pid"]
    mail_pid = (await mail.wait_running({"worker_00"}))["worker_00"]["pid"]
    assert local_pid and mail_pid and local_pid != mail_pid
    base = api_url(path)
    await wait_api(session, base)

    # Each queue both ways: by [routes] (reverse -> mail, sleep -> default) and by the body's "queue".
    bodies: list[tuple[str, dict[str, Any]]] = [
        *(("mail", {"type": "reverse", "payload": {"text": f"mail {i}"}}) for i in range(6)),
        *(("mail", {"type": "sleep", "payload": {"seconds": 0.01}, "queue": "mail"}) for _ in range(4)),
        *(("default", {"type": "sleep", "payload": {"seconds": 0.01}}) for _ in range(6)),
        *(("default", {"type": "reverse", "payload": {"text": f"default {i}"}, "queue": "default"}) for i in range(4)),
    ]
    expected = {await submit(session, base, body): queue for queue, body in bodies}
    tasks = await wait_done(session, base, list(expected))
    pid_of = {"mail": mail_pid, "default": local_pid}
    ran = {tid: (t["queue"], int(t["worker"].rsplit(":", 1)[1])) for tid, t in tasks.items()}
    assert ran == {tid: (queue, pid_of[queue]) for tid, queue in expected.items()}, (ran, pid_of)

    async def one_consumer_each() -> dict[str, int] | None:
        async with session.get(f"{base}/api/queues") as resp:
            assert resp.status == 200, await resp.text()
            consumers = {q["name"]: q["consumers"] for q in (await resp.json())["items"]}
        return consumers if consumers == {"default": 1, "mail": 1} else None

    try:
        await wait_for(one_consumer_each, 10, "GET /api/queues to count one consumer on each queue")
    except AssertionError as e:
        async with session.get(f"{base}/api/queues") as resp:
            raise AssertionError(f"{e}: {await resp.text()}") from None
    async with session.get(f"{base}/api/workers") as resp:
        workers = {w["pid"]: (w["instance"], w["queues"]) for w in (await resp.json())["items"]}
    assert workers == {local_pid: ("local", ["default"]), mail_pid: ("worker-mail", ["mail"])}, workers


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
            return bool((await resp.json())["status"] == "started")

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
            sys.executable,
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
    # `up` and `check` import the handler modules first and refuse one that cannot import, so this one
    # imports there and fails only in the roles they supervise (as a dependency missing from their
    # environment would): both roles exit 2 at start, every time.
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "crashing_handlers.py").write_text(
        "import sys\n\nif sys.argv[1:2] in (['api'], ['worker']):\n    import no_such_handlers_module\n"
    )
    path = conf(
        instances={"local": {"roles": ["api", "worker"], "processes": 1}},
        handlers={"modules": ["crashing_handlers"]},
    )
    env = {"PYTHONPATH": str(modules)}
    up = ups(path, tmp_path / "run", env=env)

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
            sys.executable,
            "asyncnode.py",
            *argv,
            "--config",
            str(path),
            "--run-dir",
            str(up.run_dir),
            cwd=root,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode != 0, out.decode()
        assert expected in out.decode(), out.decode()
    for name in ("api", "worker_00"):
        log = (up.run_dir / "logs" / f"{name}.log").read_text()
        assert "cannot import 'crashing_handlers': No module named 'no_such_handlers_module'" in log, log


async def test_up_refuses_a_handler_module_that_cannot_import(
    conf: Callable[..., Path], ups: Callable[..., Up], tmp_path: Path
) -> None:
    path = conf(
        instances={"local": {"roles": ["api", "worker"], "processes": 1}},
        handlers={"modules": ["no_such_handlers_module"]},
    )
    up = ups(path, tmp_path / "run")
    code = await asyncio.to_thread(up.popen.wait, 30)
    assert code == 2, up.log()
    assert "cannot import 'no_such_handlers_module'" in up.log(), up.log()
    assert not (up.run_dir / "supervisor.sock").exists()  # supervisord never started
