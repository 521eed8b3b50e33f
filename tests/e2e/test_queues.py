"""Named queues with real API and worker processes, on both backends: routing, pause and resume across a
restart of every process, a deployment-wide limit and rate, a limit slot given back by a killed worker, and
fairness under a flood."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

import asyncnode
from tests.conftest import Proc, wait_for, wait_healthy, write_config

TIMEOUT = aiohttp.ClientTimeout(total=10)


class Api:
    """An API process and a session talking to it."""

    def __init__(self, session: aiohttp.ClientSession, base: str, proc: Proc) -> None:
        self.session = session
        self.base = base
        self.proc = proc

    async def submit(self, ttype: str, payload: dict[str, Any], queue: str | None = None) -> str:
        body: dict[str, Any] = {"type": ttype, "payload": payload}
        if queue is not None:
            body["queue"] = queue
        async with self.session.post(f"{self.base}/api/tasks", json=body) as r:
            assert r.status == 202, await r.text()
            return str((await r.json())["id"])

    async def task(self, tid: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/api/tasks/{tid}") as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def statuses(self, ids: list[str]) -> dict[str, str]:
        return {tid: (await self.task(tid))["status"] for tid in ids}

    async def wait_status(self, ids: list[str], status: str, timeout: float = 30.0) -> None:
        async def reached() -> bool:
            return all(s == status for s in (await self.statuses(ids)).values())

        await wait_for(reached, timeout, f"{len(ids)} task(s) {status}")

    async def queues(self) -> dict[str, dict[str, Any]]:
        async with self.session.get(f"{self.base}/api/queues") as r:
            assert r.status == 200, await r.text()
            return {item["name"]: item for item in (await r.json())["items"]}

    async def pause(self, name: str, action: str = "pause") -> None:
        async with self.session.post(f"{self.base}/api/queues/{name}/{action}") as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"name": name, "paused": action == "pause"}


async def start_api(procs: Callable[..., Proc], config: Path, session: aiohttp.ClientSession) -> Api:
    cfg = asyncnode.Config.from_toml(config, env={})
    api = procs("api", config)
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, api)
    return Api(session, base, api)


async def wait_log(proc: Proc, text: str, timeout: float = 20.0) -> None:
    """Wait until ``proc`` has logged ``text`` (a worker says when it takes up a pause)."""

    async def logged() -> bool:
        assert proc.popen.poll() is None, proc.log()
        return text in proc.log()

    await wait_for(logged, timeout, f"{proc.role} pid {proc.pid} to log {text!r}")


async def start_workers(
    procs: Callable[..., Proc], config: Path, count: int = 1, args: list[str] | None = None
) -> list[Proc]:
    """Start ``count`` worker processes and wait until each consumes."""
    workers = [procs("worker", config, args=args) for _ in range(count)]
    for w in workers:
        await wait_log(w, "consuming")
    return workers


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at any moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


async def test_types_go_to_their_queues_and_a_worker_runs_only_the_queues_it_serves(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(
        tmp_path / "config.toml", tag, backend=backend, queues={"mail": {}, "heavy": {}}, routes={"reverse": "mail"}
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = await start_api(procs, config, session)
        mail_worker = procs("worker", config, args=["--queues", "mail"])
        routed = await api.submit("reverse", {"text": "abc"})  # [routes]: to mail
        heavy = await api.submit("sleep", {"seconds": 0}, queue="heavy")  # named by the submission
        default = await api.submit("noop", {})  # neither: default
        await api.wait_status([routed], "completed")
        assert await api.statuses([heavy, default]) == {heavy: "pending", default: "pending"}
        records = {tid: await api.task(tid) for tid in (routed, heavy, default)}
        assert {tid: r["queue"] for tid, r in records.items()} == {routed: "mail", heavy: "heavy", default: "default"}
        assert records[routed]["worker"].endswith(f":{mail_worker.pid}")

        other = procs("worker", config, args=["--queues", "heavy,default"])
        await api.wait_status([heavy, default], "completed")
        assert {(await api.task(t))["worker"].rsplit(":", 1)[1] for t in (heavy, default)} == {str(other.pid)}

        async with session.get(f"{api.base}/api/tasks", params={"queue": "mail"}) as r:
            assert [t["id"] for t in (await r.json())["items"]] == [routed]
        async with session.get(f"{api.base}/api/tasks", params={"queue": "nosuch"}) as r:
            assert r.status == 400 and "known: default, mail, heavy" in (await r.json())["error"]

        async def both_serving() -> dict[str, dict[str, Any]] | None:
            queues = await api.queues()
            return queues if [q["consumers"] for q in queues.values()] == [1, 1, 1] else None

        queues = await wait_for(both_serving, 20, "a consumer on each queue")  # heartbeats name the queues
        assert list(queues) == ["default", "mail", "heavy"]
        assert queues["mail"]["broker_name"] == f"{tag}.mail" and queues["default"]["broker_name"] == tag
        assert [q["ready"] for q in queues.values()] == [0, 0, 0]


async def test_a_pause_holds_a_queue_across_a_restart_of_every_process_and_a_resume_releases_it(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.toml", tag, backend=backend, queues={"mail": {}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = await start_api(procs, config, session)
        worker = procs("worker", config)
        running = await api.submit("sleep", {"seconds": 1.5}, queue="mail")
        await api.wait_status([running], "started")
        await api.pause("mail")
        await wait_log(worker, "queue 'mail' paused")
        held = await api.submit("reverse", {"text": "held"}, queue="mail")
        other = await api.submit("noop", {})
        await api.wait_status([running, other], "completed")  # the running task finishes; other queues go on
        assert (await api.task(held))["status"] == "pending"
        assert (await api.queues())["mail"]["paused"] is True

        # Stop every process; the pause is kept in the store, and the new processes honour it.
        worker.stop()
        api.proc.stop()
        api = await start_api(procs, config, session)
        worker = procs("worker", config)
        await wait_log(worker, "paused: mail")
        assert (await api.queues())["mail"]["paused"] is True
        after = await api.submit("noop", {})
        await api.wait_status([after], "completed")
        assert (await api.task(held))["status"] == "pending"

        await api.pause("mail", "resume")
        await api.wait_status([held], "completed")
        assert (await api.queues())["mail"]["paused"] is False


async def test_limit_keeps_at_most_that_many_running_over_every_worker(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.toml", tag, backend=backend, queues={"mail": {"limit": 2}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = await start_api(procs, config, session)
        await start_workers(procs, config, 4)
        ids = [await api.submit("sleep", {"seconds": 1.0}, queue="mail") for _ in range(12)]
        await api.wait_status(ids, "completed", timeout=60)
        records = [await api.task(tid) for tid in ids]
    intervals = [(r["started_at"], r["finished_at"]) for r in records]
    assert most_at_once(intervals) == 2
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    # 12 one-second tasks two at a time take 6 s at least; one at a time would take 12.
    assert 6.0 <= span < 9.0, span
    assert all(r["attempts"] == 1 for r in records)  # waiting its turn is no failed attempt
    assert len({r["worker"] for r in records}) >= 3  # the limit is the deployment's, not each worker's


async def test_rate_allows_no_more_starts_in_any_window_than_it_says(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.toml", tag, backend=backend, queues={"mail": {"rate": "5/s"}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = await start_api(procs, config, session)
        await start_workers(procs, config, 2, args=["--queues", "mail"])
        ids = [await api.submit("noop", {}, queue="mail") for _ in range(20)]
        await api.wait_status(ids, "completed", timeout=30)
        starts = sorted([(await api.task(tid))["started_at"] for tid in ids])
    most = max(sum(1 for t in starts if s <= t <= s + 1.0) for s in starts)
    assert most == 5, starts  # as many as the rate allows, never more, in any one-second window
    assert starts[-1] - starts[0] >= 3.0  # 20 starts at 5 per second: 4 windows at the least


async def test_a_worker_killed_holding_a_limit_slot_gives_it_back(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    heartbeat = 0.5
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        queues={"mail": {"limit": 1}},
        worker={"heartbeat": heartbeat},
        embedded={"lease_timeout": 30.0},
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = await start_api(procs, config, session)
        [doomed] = await start_workers(procs, config)
        holder = await api.submit("sleep", {"seconds": 60}, queue="mail")
        await api.wait_status([holder], "started")
        await start_workers(procs, config, args=["--queues", "mail"])
        waiting = await api.submit("reverse", {"text": "next"}, queue="mail")
        doomed.signal(signal.SIGKILL)
        killed_at = time.time()
        await doomed.wait(10)
        await api.wait_status([waiting], "completed", timeout=20)
        started = (await api.task(waiting))["started_at"]
    # The slot's lease is three heartbeats; the killed worker's task, redelivered, waits behind it.
    assert killed_at < started <= killed_at + 3 * heartbeat + 2.0, started - killed_at


async def test_a_flood_in_one_queue_does_not_hold_up_a_task_of_another(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.toml", tag, backend=backend, queues={"bulk": {}})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        api = await start_api(procs, config, session)
        await start_workers(procs, config)
        flood = [await api.submit("sleep", {"seconds": 0.05}, queue="bulk") for _ in range(150)]
        await api.wait_status(flood[:1], "completed")
        urgent = await api.submit("noop", {})
        submitted_at = (await api.task(urgent))["created_at"]
        await api.wait_status([urgent], "completed", timeout=10)
        started = (await api.task(urgent))["started_at"]
        left = [s for s in (await api.statuses(flood)).values() if s != "completed"]
    assert started - submitted_at < 1.0, started - submitted_at
    assert len(left) > 50  # the flood was still there when it started, and it went ahead of it
