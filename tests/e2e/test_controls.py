"""Task controls with real API and worker processes, on both backends: cancel (a running task stopped within a
second, its worker free at once; a pending or delayed task that never runs, across a restart of every process
too; 409 and 404; a sync handler watching ``ctx.cancelled``; bulk by filter; the CLI) and delayed tasks (the
start measured against ``run_at``, 200 random delays, a restart of every process while they wait)."""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, queue_counts, run_cli, wait_for, wait_healthy, write_config
from tests.e2e.test_queues import Api, start_workers, wait_log

#: Every request to the API processes.
TIMEOUT = aiohttp.ClientTimeout(total=10)
#: The contract: a running task is stopped, a delayed one started, within this many seconds.
WITHIN = 1.0


class ControlApi(Api):
    """An API process, with the task controls."""

    async def submit_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """Submit ``body``; its 202 answer."""
        async with self.session.post(f"{self.base}/api/tasks", json=body) as r:
            assert r.status == 202, await r.text()
            return dict(await r.json())

    async def cancel(self, tid: str) -> tuple[int, dict[str, Any]]:
        """``POST /api/tasks/<id>/cancel``: status and JSON answer."""
        async with self.session.post(f"{self.base}/api/tasks/{tid}/cancel") as r:
            return r.status, dict(await r.json())

    async def cancel_many(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/tasks/cancel`` with ``body``; its 200 answer."""
        async with self.session.post(f"{self.base}/api/tasks/cancel", json=body) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def dead_letter_ids(self) -> list[str]:
        """The ids of every dead letter."""
        async with self.session.get(f"{self.base}/api/dlq") as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert body["total"] == len(body["items"]), body
        return [str(item["id"]) for item in body["items"]]


class Stack:
    """One test's deployment: its config, and the API and worker processes it starts (stopped by pid)."""

    def __init__(self, backend: str, config: Path, procs: Callable[..., Proc], session: aiohttp.ClientSession) -> None:
        self.backend = backend
        self.config = config
        self.cfg = asyncnode.Config.from_toml(config, env={})
        self.procs = procs
        self.session = session
        self.started: list[Proc] = []

    async def start_api(self) -> ControlApi:
        """Start an API process and wait until it answers."""
        proc = self.procs("api", self.config)
        self.started.append(proc)
        base = f"http://127.0.0.1:{self.cfg.api.port}"
        await wait_healthy(base, proc)
        return ControlApi(self.session, base, proc)

    async def start_worker(self) -> Proc:
        """Start one worker process (concurrency 1) and wait until it consumes."""
        [worker] = await start_workers(self.procs, self.config)
        self.started.append(worker)
        return worker

    async def start(self) -> tuple[ControlApi, Proc]:
        """Start an API and one worker side by side (each takes a second to import and connect); wait for both."""
        return await asyncio.gather(self.start_api(), self.start_worker())

    async def ready(self, queue: str = asyncnode.DEFAULT_QUEUE) -> int:
        """Messages ready in the work queue of ``queue``."""
        return (await queue_counts(self.cfg, self.cfg.broker_name(queue)))[0]

    async def drained(self, queue: str = asyncnode.DEFAULT_QUEUE) -> None:
        """Wait until the work queue of ``queue`` holds no message ready."""

        async def empty() -> bool:
            return await self.ready(queue) == 0

        await wait_for(empty, 10, f"the work queue of {queue!r} to drain")


@pytest.fixture
async def stack(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """``await stack(**sections)``: a config on ``backend`` with the fault handlers (``watch_cancel``) besides the
    built-in ones; its processes are stopped, then its queues and keys deleted, at the end of the test."""
    stacks: list[Stack] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def make(**sections: Any) -> Stack:
            sections = {"handlers": {"modules": ["handlers", "tests.fault_handlers"]}, **sections}
            config = write_config(tmp_path / "config.toml", tag, backend=backend, **sections)
            stacks.append(Stack(backend, config, procs, session))
            return stacks[-1]

        yield make
    for s in stacks:
        for proc in s.started:
            proc.stop()
    await cleanup(tag)


def history(record: dict[str, Any]) -> list[str]:
    """The statuses of a task's timeline, in order."""
    return [entry["status"] for entry in record["history"]]


def markers(marker: Path) -> tuple[Path, Path]:
    """The files a ``watch_cancel`` task writes: when it started, and when it saw its cancel."""
    return marker.with_name(marker.name + ".started"), marker


def watch(marker: Path, max_seconds: float = 20.0) -> dict[str, Any]:
    """The payload of a ``watch_cancel`` task writing ``marker``."""
    return {"marker": str(marker), "max_seconds": max_seconds}


def assert_never_ran(record: dict[str, Any], marker: Path | None = None) -> None:
    """A cancelled task that no worker started: no attempt, no start, and (for ``watch_cancel``) no file."""
    assert record["status"] == "cancelled", record
    assert record["attempts"] == 0 and record["started_at"] is None and record["worker"] is None, record
    assert "started" not in history(record), record
    if marker is not None:
        assert [p for p in markers(marker) if p.exists()] == []


# ---------------------------------------------------------------------------- cancel


async def test_a_running_task_cancelled_is_stopped_within_a_second_and_its_worker_takes_the_next_at_once(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    api, worker = await s.start()
    long = await api.submit("sleep", {"seconds": 60})
    await api.wait_status([long], "started")
    following = await api.submit("noop", {})
    assert (await api.task(following))["status"] == "pending"  # one worker, concurrency 1: it waits its turn

    sent = time.time()
    status, body = await api.cancel(long)
    answered = time.time()
    assert (status, body) == (200, {"id": long, "status": "cancelled"})
    await api.wait_status([long], "cancelled", timeout=5)
    seen = time.time() - answered
    await api.wait_status([following], "completed", timeout=5)
    nxt = await api.task(following)
    freed = nxt["started_at"] - answered  # the 60 s sleep was stopped: only then could the next one start
    print(
        f"\n[{s.backend}] cancel of a running sleep: cancelled {seen:.3f} s after the answer; "
        f"the next task started {freed:.3f} s after it (answer took {answered - sent:.3f} s)"
    )
    assert seen < WITHIN, seen
    assert 0 < freed < WITHIN, freed

    record = await api.task(long)
    assert record["status"] == "cancelled" and history(record) == ["pending", "started", "cancelled"], record
    assert record["history"][-1]["cancelled_by"] == "api"
    assert record["cancelled_by"] == "api" and record["cancelled_client"] == "127.0.0.1", record
    assert record["cancelled_token"] == "none", record  # no token is configured
    assert sent <= record["cancelled_at"] <= answered, (sent, record["cancelled_at"], answered)
    assert record["attempts"] == 1 and record["error"] is None and record["result"] is None, record
    assert record["worker"] == nxt["worker"] and nxt["worker"].endswith(f":{worker.pid}"), (record, nxt)
    assert long not in await api.dead_letter_ids()
    assert await s.ready() == 0  # not requeued either
    assert await api.statuses([long]) == {long: "cancelled"}


async def test_a_task_cancelled_while_its_worker_stops_is_stopped_within_a_second(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    api, worker = await s.start()
    long = await api.submit("sleep", {"seconds": 60})
    await api.wait_status([long], "started")
    worker.signal(signal.SIGTERM)  # it stops consuming and finishes the task in hand
    await wait_log(worker, "stopping: finishing 1 task(s) in hand")
    assert await api.cancel(long) == (200, {"id": long, "status": "cancelled"})
    answered = time.monotonic()
    assert await worker.wait(5) == 0  # a sleep left to run would keep it for a minute
    print(
        f"\n[{s.backend}] a worker stopping with a task cancelled in hand exited {time.monotonic() - answered:.3f} s "
        "after the cancel"
    )
    assert time.monotonic() - answered < WITHIN + 0.5  # stopped within the second, then the worker's own exit
    record = await api.task(long)
    assert record["status"] == "cancelled" and history(record) == ["pending", "started", "cancelled"], record
    assert await s.ready() == 0  # acknowledged: not handed back to run again


async def test_a_pending_task_cancelled_in_a_paused_queue_never_runs_once_the_queue_resumes(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack(queues={"mail": {}})
    api, worker = await s.start()
    await api.pause("mail")
    await wait_log(worker, "queue 'mail' paused")
    marker = tmp_path / "held"
    held = await api.submit("watch_cancel", watch(marker, 2.0), queue="mail")
    assert await s.ready("mail") == 1
    assert await api.cancel(held) == (200, {"id": held, "status": "cancelled"})

    await api.pause("mail", "resume")
    # Behind its message, if the cancel left that in the queue: once this one ran, that one was taken.
    after = await api.submit("noop", {}, queue="mail")
    await api.wait_status([after], "completed", timeout=10)
    await s.drained("mail")
    worker.stop()  # a message the worker still held unacknowledged would be ready again now
    assert await s.ready("mail") == 0
    record = await api.task(held)
    assert_never_ran(record, marker)
    assert history(record) == ["pending", "cancelled"], record


async def test_a_task_cancelled_while_it_waits_for_its_queues_limit_never_runs(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack(queues={"mail": {"limit": 1}}, worker={"concurrency": 2})
    api, worker = await s.start()
    holder = await api.submit("sleep", {"seconds": 60}, queue="mail")
    await api.wait_status([holder], "started")
    marker = tmp_path / "in-line"
    waiting = await api.submit("watch_cancel", watch(marker, 2.0), queue="mail")

    async def in_hand() -> bool:  # taken from the queue by the worker, which holds it until the slot is free
        return await s.ready("mail") == 0 and (await api.task(waiting))["status"] == "pending"

    await wait_for(in_hand, 10, "the worker to take the second task and hold it for its turn")
    assert await api.cancel(waiting) == (200, {"id": waiting, "status": "cancelled"})
    assert await api.cancel(holder) == (200, {"id": holder, "status": "cancelled"})  # the slot is free again
    after = await api.submit("noop", {}, queue="mail")
    await api.wait_status([after], "completed", timeout=10)
    worker.stop()
    assert await s.ready("mail") == 0
    record = await api.task(waiting)
    assert_never_ran(record, marker)
    assert history(record) == ["pending", "cancelled"], record


async def test_a_task_cancelled_while_it_waits_for_a_retry_never_runs_again(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack(broker={"retry_delays": [1.0]})
    api, worker = await s.start()
    marker = tmp_path / "second-attempt"
    tid = await api.submit("fail_first", {"marker": str(marker)})
    await api.wait_status([tid], "retrying")
    assert await api.cancel(tid) == (200, {"id": tid, "status": "cancelled"})
    due = (await api.task(tid))["next_attempt_at"]

    # The retry comes back to the work queue at its time (no event tells when): wait for the clock, then put a
    # task behind it; once that one ran, the retry was taken.
    async def retry_due() -> bool:
        return time.time() > due + 0.2

    await wait_for(retry_due, 10, "the retry to fall due")
    after = await api.submit("noop", {})
    await api.wait_status([after], "completed", timeout=10)
    worker.stop()
    assert await s.ready() == 0
    record = await api.task(tid)
    assert not marker.exists()  # a second attempt would have written it
    assert record["status"] == "cancelled" and record["attempts"] == 1, record
    assert history(record) == ["pending", "started", "retrying", "cancelled"], record
    assert tid not in await api.dead_letter_ids()


async def test_a_cancel_survives_a_restart_of_every_process_while_the_message_is_queued(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack()
    api = await s.start_api()  # no worker yet: the message stays queued
    marker = tmp_path / "queued"
    tid = await api.submit("watch_cancel", watch(marker, 2.0))
    assert await s.ready() == 1
    assert await api.cancel(tid) == (200, {"id": tid, "status": "cancelled"})
    before = await api.task(tid)
    api.proc.stop()

    api, worker = await s.start()
    after = await api.submit("noop", {})  # behind its message, if the cancel left that in the queue
    await api.wait_status([after], "completed", timeout=10)
    await s.drained()
    worker.stop()
    assert await s.ready() == 0
    record = await api.task(tid)
    assert_never_ran(record, marker)
    assert history(record) == ["pending", "cancelled"], record
    assert record == before  # the worker acknowledged it and wrote nothing


async def test_cancel_of_a_finished_task_is_409_and_of_an_unknown_id_404(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    api, _ = await s.start()
    done = await api.submit("noop", {})
    await api.wait_status([done], "completed")
    status, body = await api.cancel(done)
    assert (status, body) == (409, {"error": f"task {done} is already completed", "id": done, "status": "completed"})
    record = await api.task(done)
    assert record["status"] == "completed" and record.get("cancelled_at") is None, record

    later = (await api.submit_body({"type": "noop", "delay": 60}))["id"]
    assert await api.cancel(later) == (200, {"id": later, "status": "cancelled"})
    status, body = await api.cancel(later)
    assert (status, body) == (409, {"error": f"task {later} is already cancelled", "id": later, "status": "cancelled"})

    for unknown in (str(uuid.uuid4()), "not-a-task-id"):
        status, body = await api.cancel(unknown)
        assert status == 404 and set(body) == {"error"} and body["error"], body


async def test_a_sync_handler_watching_ctx_cancelled_sees_it_within_a_second(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack()
    api, _ = await s.start()
    marker = tmp_path / "seen"
    started, seen = markers(marker)
    tid = await api.submit("watch_cancel", watch(marker, 20.0))

    async def running() -> bool:
        return started.exists()

    await wait_for(running, 10, "the watch_cancel task to start")
    following = await api.submit("noop", {})
    sent = time.time()
    assert await api.cancel(tid) == (200, {"id": tid, "status": "cancelled"})

    async def seen_at() -> float | None:
        return float(seen.read_text()) if seen.exists() else None

    at = await wait_for(seen_at, 5, "the handler to see ctx.cancelled")
    print(f"\n[{s.backend}] cancel of a sync handler: ctx.cancelled seen {at - sent:.3f} s after the request")
    assert 0 < at - sent < WITHIN, at - sent
    await api.wait_status([following], "completed", timeout=5)
    assert (await api.task(following))["started_at"] - at < WITHIN  # the worker is free once the handler returned
    record = await api.task(tid)
    assert record["status"] == "cancelled" and history(record) == ["pending", "started", "cancelled"], record
    assert record["error"] is None and record["result"] is None, record
    assert tid not in await api.dead_letter_ids()


async def test_bulk_cancel_by_queue_or_type_cancels_only_the_matching_tasks(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack(queues={"mail": {}})
    api, worker = await s.start()
    for queue in ("mail", "default"):
        await api.pause(queue)
        await wait_log(worker, f"queue {queue!r} paused")
    in_mail = [await api.submit("reverse", {"text": f"mail {i}"}, queue="mail") for i in range(2)]
    watched = [tmp_path / f"watch-{i}" for i in range(2)]
    of_type = [await api.submit("watch_cancel", watch(marker, 2.0)) for marker in watched]
    untouched = await api.submit("reverse", {"text": "stays"})  # the type of the first, the queue of the second

    assert await api.cancel_many({"queue": "mail"}) == {"cancelled": 2, "skipped": 0}
    assert await api.statuses([*in_mail, *of_type, untouched]) == {
        **dict.fromkeys(in_mail, "cancelled"),
        **dict.fromkeys([*of_type, untouched], "pending"),
    }
    assert await api.cancel_many({"type": "watch_cancel"}) == {"cancelled": 2, "skipped": 0}
    assert await api.statuses([*of_type, untouched]) == {**dict.fromkeys(of_type, "cancelled"), untouched: "pending"}
    # Run again, the filter cancels nothing more (whether its finished matches count as skipped is left open).
    assert (await api.cancel_many({"queue": "mail"}))["cancelled"] == 0

    for queue in ("mail", "default"):
        await api.pause(queue, "resume")
    last = await api.submit("noop", {}, queue="mail")  # behind the cancelled ones of mail
    await api.wait_status([untouched, last], "completed", timeout=10)
    for queue in ("mail", "default"):
        await s.drained(queue)
    worker.stop()
    assert [await s.ready(queue) for queue in ("mail", "default")] == [0, 0]
    for tid, marker in [*((t, None) for t in in_mail), *zip(of_type, watched, strict=True)]:
        record = await api.task(tid)
        assert_never_ran(record, marker)
        assert history(record) == ["pending", "cancelled"] and record["cancelled_by"] == "api", record
    assert (await api.task(untouched))["result"] == "syats"


async def test_cli_cancel_prints_a_line_per_id_and_records_cli(stack: Callable[..., Awaitable[Stack]]) -> None:
    s = await stack()
    api = await s.start_api()  # no worker: the tasks stay pending
    first, second = [await api.submit("noop", {}) for _ in range(2)]
    config = str(s.config)

    run = await run_cli("cancel", first, second, "--config", config)
    assert (run.returncode, run.stdout) == (0, f"{first}: cancelled\n{second}: cancelled\n"), run
    for tid in (first, second):
        record = await api.task(tid)
        assert record["status"] == "cancelled" and record["cancelled_by"] == "cli", record
        assert history(record) == ["pending", "cancelled"] and record["history"][-1]["cancelled_by"] == "cli"

    unknown = str(uuid.uuid4())
    run = await run_cli("cancel", first, unknown, "--config", config)
    assert (run.returncode, run.stdout) == (1, f"{first}: already cancelled\n{unknown}: no such task\n"), run

    run = await run_cli("cancel", "not-a-task-id", "--config", config)
    assert (run.returncode, run.stdout) == (2, ""), run
    # One line in the house's format of a usage error (the contract's "asyncnode: error: ..." is argparse's).
    assert run.stderr.startswith("asyncnode: ") and run.stderr.count("\n") == 1, run.stderr
    assert "not a task id: 'not-a-task-id'" in run.stderr and "Traceback" not in run.stderr, run.stderr


# ---------------------------------------------------------------------------- delay


async def test_a_delayed_task_starts_no_earlier_than_its_run_at_and_within_a_second_after(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    api, _ = await s.start()
    sent = time.time()
    body = await api.submit_body({"type": "noop", "delay": 1.0})
    answered = time.time()
    tid, run_at = body["id"], body["run_at"]
    assert body == {"id": tid, "status": "scheduled", "queue": "default", "run_at": run_at}
    assert sent + 1.0 <= run_at <= answered + 1.0, (sent, run_at, answered)
    record = await api.task(tid)
    assert record["status"] == "scheduled" and record["run_at"] == run_at, record
    assert await s.ready() == 0  # held out of the work queue until its time

    await api.wait_status([tid], "completed", timeout=10)
    record = await api.task(tid)
    lag = record["started_at"] - run_at
    print(f"\n[{s.backend}] a task delayed 1 s started {lag:.3f} s after its run_at")
    assert 0 <= lag < WITHIN, lag
    assert history(record) == ["scheduled", "started", "completed"] and record["attempts"] == 1, record


async def test_200_delayed_tasks_each_start_within_a_second_after_their_run_at(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    api, _ = await s.start()
    rng = random.Random(14)
    gate = asyncio.Semaphore(20)

    async def submit(delay: float) -> dict[str, Any]:
        async with gate:
            return await api.submit_body({"type": "noop", "delay": delay})

    bodies = await asyncio.gather(*(submit(round(rng.uniform(0.05, 5.0), 3)) for _ in range(200)))
    run_at = {b["id"]: b["run_at"] for b in bodies}
    assert len(run_at) == 200 and {b["status"] for b in bodies} == {"scheduled"}
    await api.wait_status(list(run_at), "completed", timeout=20)
    lags = sorted([(await api.task(tid))["started_at"] - at for tid, at in run_at.items()])
    print(
        f"\n[{s.backend}] 200 delayed tasks: start after run_at min {lags[0]:.3f} s, "
        f"median {statistics.median(lags):.3f} s, max {lags[-1]:.3f} s"
    )
    assert lags[0] >= 0, lags[:5]
    assert lags[-1] < WITHIN, lags[-5:]


async def test_delayed_tasks_survive_a_restart_of_every_process_while_they_wait(
    stack: Callable[..., Awaitable[Stack]],
) -> None:
    s = await stack()
    api, worker = await s.start()
    bodies = [await api.submit_body({"type": "noop", "delay": 2.0 + i / 10}) for i in range(5)]
    run_at: dict[str, float] = {b["id"]: b["run_at"] for b in bodies}
    assert await s.ready() == 0
    worker.stop()  # a worker holding them in memory, or unacknowledged, loses or returns them now
    api.proc.stop()
    assert time.time() < min(run_at.values())  # still waiting as everything stopped
    assert await s.ready() == 0

    # No process runs to tell when the time came: the event is the clock passing the last run_at.
    async def all_due() -> bool:
        return time.time() > max(run_at.values()) + 0.5

    await wait_for(all_due, 10, "the delayed tasks' time to pass")
    api = await s.start_api()
    await s.start_worker()
    back = time.time()  # the worker is seen consuming (its log is polled: it may have started a task already)
    await api.wait_status(list(run_at), "completed", timeout=10)
    records = {tid: await api.task(tid) for tid in run_at}
    late = max(r["started_at"] for r in records.values()) - back
    print(
        f"\n[{s.backend}] delayed tasks due while everything was down: the last started {late:.3f} s "
        "after the worker was back"
    )
    assert late < WITHIN, late
    for tid, record in records.items():
        assert record["started_at"] >= run_at[tid], record
        assert history(record) == ["scheduled", "started", "completed"] and record["attempts"] == 1, record


async def test_a_delayed_task_cancelled_before_its_time_never_runs(
    stack: Callable[..., Awaitable[Stack]], tmp_path: Path
) -> None:
    s = await stack()
    api, worker = await s.start()
    marker = tmp_path / "delayed"
    body = await api.submit_body({"type": "watch_cancel", "payload": watch(marker, 2.0), "delay": 1.0})
    tid = body["id"]
    assert body["status"] == "scheduled"
    assert await api.cancel(tid) == (200, {"id": tid, "status": "cancelled"})
    assert time.time() < body["run_at"]  # cancelled before its time

    after = await api.submit_body({"type": "noop", "run_at": body["run_at"] + 0.3})  # due just after it
    await api.wait_status([after["id"]], "completed", timeout=10)
    await s.drained()
    worker.stop()
    assert await s.ready() == 0
    record = await api.task(tid)
    assert_never_ran(record, marker)
    assert history(record) == ["scheduled", "cancelled"] and record["run_at"] == body["run_at"], record
