"""Periodic schedules with real API and worker processes, on both backends: every second fired once with three
processes able to hold the scheduler lease; the holder SIGKILLed (the slots resume within the lease's TTL, the
missed ones per catch_up); pause and resume across a restart of every process; run-now and the fields of
``GET /api/schedules``. The slots fired are read from the task records (``schedule``, ``slot``)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, free_port, run_cli, wait_for, wait_healthy, write_config
from tests.e2e.test_queues import Api, start_workers

#: Every request to the API processes.
TIMEOUT = aiohttp.ClientTimeout(total=10)
#: What a process logs when it takes the scheduler lease (then it alone fires the schedules).
HOLDING = "holding the scheduler lease (fence"
#: The contract: a slot is missed once it is more than this many seconds old.
MISSED_AFTER = 2.0

BERLIN = ZoneInfo("Europe/Berlin")


class ScheduleApi(Api):
    """An API process, with the schedules."""

    async def schedules(self) -> dict[str, dict[str, Any]]:
        """``GET /api/schedules``: the items by name, in the order answered."""
        async with self.session.get(f"{self.base}/api/schedules") as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert set(body) == {"items"}, body
        return {item["name"]: item for item in body["items"]}

    async def fired(self, name: str) -> dict[float, list[dict[str, Any]]]:
        """The task records of schedule ``name``'s slots, by slot in order (a slot fired twice has two)."""
        async with self.session.get(f"{self.base}/api/tasks", params={"limit": "1000"}) as r:
            assert r.status == 200, await r.text()
            items = (await r.json())["items"]
        by_slot: dict[float, list[dict[str, Any]]] = {}
        for record in items:
            if record.get("schedule") == name and record.get("slot") is not None:
                by_slot.setdefault(float(record["slot"]), []).append(record)
        return dict(sorted(by_slot.items()))

    async def act(self, name: str, action: str) -> tuple[int, dict[str, Any], str | None]:
        """``POST /api/schedules/<name>/<action>``: status, JSON answer and Location header."""
        async with self.session.post(f"{self.base}/api/schedules/{name}/{action}") as r:
            return r.status, dict(await r.json()), r.headers.get("Location")


class Deployment:
    """One test's deployment: its config, and the API and worker processes it starts (stopped by pid)."""

    def __init__(self, config: Path, procs: Callable[..., Proc], session: aiohttp.ClientSession) -> None:
        self.config = config
        self.cfg = asyncnode.Config.from_toml(config, env={})
        self.procs = procs
        self.session = session
        self.started: list[Proc] = []

    async def start_api(self, port: int | None = None) -> ScheduleApi:
        """Start an API process (on ``port``, default the config's) and wait until it answers."""
        port = port or self.cfg.api.port
        proc = self.procs("api", self.config, env={"ASYNCNODE_API_PORT": str(port)})
        self.started.append(proc)
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, proc)
        return ScheduleApi(self.session, base, proc)

    async def start_worker(self) -> Proc:
        """Start one worker process and wait until it consumes."""
        [worker] = await start_workers(self.procs, self.config)
        self.started.append(worker)
        return worker

    def holders(self) -> list[Proc]:
        """The running processes that logged taking the scheduler lease."""
        return [p for p in self.started if p.popen.poll() is None and HOLDING in p.log()]

    async def holder(self, timeout: float = 10.0) -> Proc:
        """The one running process holding the scheduler lease, once one took it."""

        async def taken() -> list[Proc]:
            return self.holders()

        [holder] = await wait_for(taken, timeout, "a process to take the scheduler lease")
        return holder


@pytest.fixture
async def deploy(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> AsyncIterator[Callable[..., Awaitable[Deployment]]]:
    """``await deploy(payloads={name: payload}, **sections)``: a config on ``backend``; its processes are stopped,
    then its queues and keys deleted, at the end of the test."""
    deployments: list[Deployment] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def make(payloads: dict[str, dict[str, str]] | None = None, **sections: Any) -> Deployment:
            config = write_config(tmp_path / "config.toml", tag, backend=backend, **sections)
            for name, payload in (payloads or {}).items():  # write_config writes no inline tables
                lines = [f"[schedules.{name}.payload]", *(f'{k} = "{v}"' for k, v in payload.items())]
                config.write_text(config.read_text() + "\n".join(lines) + "\n")
            deployments.append(Deployment(config, procs, session))
            return deployments[-1]

        yield make
    for d in deployments:
        for proc in d.started:
            proc.stop()
    await cleanup(tag)


def at_clock(moment: float) -> Callable[[], Awaitable[bool]]:
    """A check for wait_for: the wall clock has reached ``moment``."""

    async def reached() -> bool:
        return time.time() >= moment

    return reached


def consecutive(slots: list[float], every: float = 1.0) -> bool:
    """Whether ``slots`` follow each other ``every`` seconds apart, none missing."""
    return slots == [slots[0] + i * every for i in range(len(slots))]


def once_each(fired: dict[float, list[dict[str, Any]]]) -> dict[float, dict[str, Any]]:
    """The one task of each slot (fails naming any slot with more)."""
    twice = {slot: [t["id"] for t in tasks] for slot, tasks in fired.items() if len(tasks) != 1}
    assert twice == {}, f"slots fired more than once: {twice}"
    return {slot: tasks[0] for slot, tasks in fired.items()}


# ---------------------------------------------------------------------------- every second, three holders


async def test_every_second_with_three_processes_able_to_hold_the_lease_fires_each_second_once_without_a_gap(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    d = await deploy(schedules={"tick": {"type": "noop", "every": 1}})
    api, *_ = await asyncio.gather(d.start_api(), d.start_worker(), d.start_worker())

    async def ten_seconds() -> dict[float, list[dict[str, Any]]] | None:
        fired = await api.fired("tick")
        return fired if fired and max(fired) - min(fired) >= 10 else None

    tasks = once_each(await wait_for(ten_seconds, 20, "ten seconds of slots fired"))
    slots = list(tasks)
    assert consecutive(slots), slots
    lags = {slot: round(task["created_at"] - slot, 3) for slot, task in tasks.items()}
    label = "rabbitmq" if d.cfg.broker.url else "embedded"
    print(f"\n[{label}] every = 1: {len(slots)} slots fired, each this late: {sorted(lags.values())}")
    assert all(0 <= lag < 1.0 for lag in lags.values()), lags  # each fired within a second of its time
    [holder] = d.holders()  # one process took the lease, and nobody took it from it
    assert holder.log().count(HOLDING) == 1, holder.log()
    assert all(HOLDING not in p.log() for p in d.started if p is not holder)


# ---------------------------------------------------------------------------- the holder killed

#: The lease's TTL and the period of the catch-up schedules: the holder is killed just before a slot S of theirs,
#: the lease runs out more than 2 s after S (S is missed when the next holder takes over) and before S + EVERY.
TTL = 3.0
EVERY = 4
#: Seconds before the slot S the holder is killed.
KILL_BEFORE = 0.15


async def test_a_killed_holder_is_replaced_within_the_ttl_and_missed_slots_are_fired_per_catch_up_never_twice(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    d = await deploy(
        scheduler={"lease_ttl": TTL},
        schedules={
            "tick": {"type": "noop", "every": 1},
            "one": {"type": "noop", "every": EVERY, "catch_up": "one"},
            "none": {"type": "noop", "every": EVERY, "catch_up": "none"},
        },
    )
    first_api, second_api, _ = await asyncio.gather(d.start_api(), d.start_api(free_port()), d.start_worker())
    holder = await d.holder()
    api = second_api if first_api.proc is holder else first_api  # one that stays

    async def both_fired() -> float | None:
        one, none = await api.fired("one"), await api.fired("none")
        return max(one) if one and none else None

    first = await wait_for(both_fired, EVERY + 5, "a slot of 'one' and of 'none' fired")
    assert list(await api.fired("one")) == list(await api.fired("none")) == [first]
    slot = first + EVERY  # S: the holder dies before it, and whoever holds the lease next finds it missed
    await wait_for(at_clock(slot - KILL_BEFORE), EVERY + 1, "the moment just before the next slot")
    holder.signal(signal.SIGKILL)
    killed = time.time()
    assert killed < slot - KILL_BEFORE / 2, (killed, slot)
    await holder.wait(5)

    async def taken_over() -> list[Proc]:
        return d.holders()

    [successor] = await wait_for(taken_over, TTL + 2, "another process to take the scheduler lease")
    took = time.time() - killed
    await wait_for(at_clock(slot + EVERY + 0.2), EVERY + TTL, "the slot after S to fall due")

    async def next_fired() -> bool:
        one, none = await api.fired("one"), await api.fired("none")
        return slot + EVERY in one and slot + EVERY in none

    await wait_for(next_fired, 5, "the slot after S to be fired")
    one, none, tick = [once_each(await api.fired(name)) for name in ("one", "none", "tick")]
    label = "rabbitmq" if d.cfg.broker.url else "embedded"
    print(
        f"\n[{label}] holder pid {holder.pid} killed {slot - killed:.3f} s before slot {slot:.0f}; pid "
        f"{successor.pid} took the lease {took:.3f} s later; 'one' fired S {one[slot]['created_at'] - slot:.3f} s late"
    )
    assert took <= TTL + 1, took

    # catch_up = "one": S, missed while nobody held the lease, is fired once, late, by the new holder.
    assert list(one) == [first, slot, slot + EVERY], list(one)
    late = one[slot]["created_at"]
    assert late - slot > MISSED_AFTER and late - killed <= TTL + 1, (late - slot, late - killed)
    # catch_up = "none": S has no task; the next slot fires as usual.
    assert list(none) == [first, slot + EVERY], list(none)
    assert 0 <= none[slot + EVERY]["created_at"] - (slot + EVERY) < 1.0

    # every = 1 (catch_up "one"): the killed holder fired up to the second before S; the new holder covers the
    # seconds missed until the takeover with one task, the latest missed second's, fired late; then the seconds
    # still on time (at most MISSED_AFTER old), each on its own, and every second after: no gap, none twice.
    before = [s for s, task in tick.items() if task["created_at"] < killed]
    after = [s for s in tick if s > max(before)]
    assert consecutive(before) and before[-1] == slot - 1, before
    cover = tick[after[0]]["created_at"]
    assert after[0] >= slot and cover - killed <= TTL + 1, (after[0] - slot, cover - killed)
    assert cover - after[0] > MISSED_AFTER, cover - after[0]  # a missed second's task, fired late
    assert consecutive(after) and len(after) >= 3, after
    assert all(0 <= tick[s]["created_at"] - s <= MISSED_AFTER + 1.0 for s in after[1:]), after
    assert holder.log().count(HOLDING) == 1 and successor.log().count(HOLDING) == 1


# ---------------------------------------------------------------------------- pause, resume, run now


async def test_a_pause_holds_a_schedule_across_a_restart_of_every_process_and_a_resume_fires_from_then_on(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    d = await deploy(schedules={"tick": {"type": "noop", "every": 1}})
    api, worker = await asyncio.gather(d.start_api(), d.start_worker())

    async def fired_once() -> dict[float, list[dict[str, Any]]]:
        return await api.fired("tick")

    await wait_for(fired_once, 10, "a slot fired")
    assert await api.act("tick", "pause") == (200, {"name": "tick", "paused": True}, None)
    paused_at = time.time()  # a tick already under way may still fire a slot up to now, none after

    worker.stop()
    api.proc.stop()
    api, worker = await asyncio.gather(d.start_api(), d.start_worker())
    item = (await api.schedules())["tick"]
    assert (item["paused"], item["next_run_at"]) == (True, None), item
    await d.holder()  # a process ticks: were the schedule not paused, it would fire
    # Nothing fires while paused; no event marks that nothing happened, so watch for 2 s (4 s since the pause).
    await asyncio.sleep(2)
    during = list(await api.fired("tick"))
    assert max(during) <= paused_at, (during, paused_at)

    resume_sent = time.time()
    assert await api.act("tick", "resume") == (200, {"name": "tick", "paused": False}, None)
    resumed_at = time.time()

    async def fired_again() -> dict[float, dict[str, Any]] | None:
        later = {s: t for s, t in once_each(await api.fired("tick")).items() if s > paused_at}
        return later if len(later) >= 2 else None

    later = await wait_for(fired_again, 10, "two slots fired after the resume")
    slots = list(later)
    # The slots of the pause are not caught up: the first fired is the first after the resume.
    assert resume_sent < slots[0] <= resumed_at + 1.0, (resume_sent, slots[0], resumed_at)
    assert consecutive(slots), slots
    assert all(0 <= t["created_at"] - s < 1.0 for s, t in later.items()), later
    item = (await api.schedules())["tick"]
    assert item["paused"] is False and item["next_run_at"] > slots[0], item


# Embedded only: what is tested is the core's handling of a resume, which both backends share.
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_resuming_a_schedule_that_is_not_paused_keeps_a_slot_missed_while_everything_was_down(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    d = await deploy(schedules={"four": {"type": "noop", "every": EVERY}})  # catch_up one
    api = await d.start_api()

    async def fired_once() -> dict[float, list[dict[str, Any]]]:
        return await api.fired("four")

    [first] = list(await wait_for(fired_once, EVERY + 5, "a slot fired"))
    api.proc.stop()  # nothing runs: the next slot S falls due with no holder
    slot = first + EVERY
    await wait_for(at_clock(slot + 0.2), EVERY + 1, "the next slot to fall due")
    run = await run_cli("schedules", "resume", "four", "--config", str(d.config))  # it was never paused
    assert (run.returncode, run.stdout) == (0, "four: resumed\n"), run
    api = await d.start_api()
    await d.holder()
    assert time.time() < slot + EVERY  # S is still the latest slot due: catch_up one fires it

    async def caught_up() -> dict[float, list[dict[str, Any]]] | None:
        fired = await api.fired("four")
        return fired if slot in fired else None

    assert list(once_each(await wait_for(caught_up, 3, "the missed slot S to be fired"))) == [first, slot]


# Embedded only: the tokens are checked by the API in front of either backend.
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_only_the_operator_token_pauses_resumes_or_runs_a_schedule(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    d = await deploy(
        api={"token": "operator-secret", "read_token": "read-secret"},
        schedules={"nightly": {"type": "noop", "cron": "0 3 * * *"}},
    )
    api = await d.start_api()
    read = {"Authorization": "Bearer read-secret"}
    operator = {"Authorization": "Bearer operator-secret"}

    async def post(action: str, headers: dict[str, str]) -> int:
        async with api.session.post(f"{api.base}/api/schedules/nightly/{action}", headers=headers) as r:
            return r.status

    async def listed(headers: dict[str, str]) -> tuple[int, Any]:
        async with api.session.get(f"{api.base}/api/schedules", headers=headers) as r:
            return r.status, await r.json()

    for action in ("pause", "resume", "run"):
        assert (await post(action, read), await post(action, {})) == (403, 401), action
    status, body = await listed(read)
    assert status == 200 and body["items"][0]["paused"] is False and body["items"][0]["last_task_id"] is None, body
    assert (await listed({}))[0] == 401

    assert [await post(action, operator) for action in ("pause", "resume", "run")] == [200, 200, 202]
    status, body = await listed(operator)
    assert status == 200 and body["items"][0]["paused"] is False and body["items"][0]["last_task_id"], body


def next_three_in_berlin(after: float) -> float:
    """The first 03:00 in Berlin after ``after``."""
    day = datetime.fromtimestamp(after, BERLIN).date()
    for offset in (0, 1):
        moment = datetime.combine(day + timedelta(days=offset), datetime.min.time(), BERLIN).replace(hour=3)
        if moment.timestamp() > after:
            return moment.timestamp()
    raise AssertionError("unreachable")


async def test_schedules_show_their_fields_and_last_task_and_run_now_fires_one_task_outside_the_slots(
    deploy: Callable[..., Awaitable[Deployment]],
) -> None:
    d = await deploy(
        queues={"mail": {}},
        schedules={
            "nightly": {"type": "reverse", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "queue": "mail"},
            "tick": {"type": "noop", "every": 1},
        },
        payloads={"nightly": {"text": "abc"}},
    )
    api, _ = await asyncio.gather(d.start_api(), d.start_worker())
    now = time.time()
    items = await api.schedules()
    assert list(items) == ["nightly", "tick"]  # config order
    assert items["nightly"] == {
        "name": "nightly",
        "type": "reverse",
        "cron": "0 3 * * *",
        "every": None,
        "timezone": "Europe/Berlin",
        "queue": "mail",
        "paused": False,
        "next_run_at": next_three_in_berlin(now),
        "last_run_at": None,
        "last_task_id": None,
        "last_status": None,
    }
    tick = items["tick"]
    assert {k: tick[k] for k in ("type", "cron", "every", "timezone", "queue", "paused")} == {
        "type": "noop",
        "cron": None,
        "every": 1,
        "timezone": "UTC",
        "queue": "default",  # the type's route
        "paused": False,
    }, tick

    # The last task of a slot: pause, so that it stays the last, and wait for its worker to complete it.

    async def some_slot() -> dict[float, list[dict[str, Any]]]:
        return await api.fired("tick")

    await wait_for(some_slot, 10, "a slot of 'tick' fired")
    assert (await api.act("tick", "pause"))[0] == 200

    async def last_completed() -> dict[str, Any] | None:
        item = (await api.schedules())["tick"]
        slot, task = list(once_each(await api.fired("tick")).items())[-1]
        latest = (
            (item["last_task_id"], item["last_status"]) == (task["id"], "completed") == (task["id"], task["status"])
        )
        return item | {"slot": slot} if latest else None

    tick = await wait_for(last_completed, 10, "'tick' to show its latest slot's task completed")
    assert tick["paused"] is True and tick["next_run_at"] is None, tick
    assert 0 <= tick["last_run_at"] - tick["slot"] < 1.0, tick  # the tick that fired it

    sent = time.time()
    status, body, location = await api.act("nightly", "run")
    answered = time.time()
    tid = body["id"]
    assert (status, body, location) == (202, {"id": tid, "status": "pending", "queue": "mail"}, f"/api/tasks/{tid}")
    await api.wait_status([tid], "completed", timeout=10)
    record = await api.task(tid)
    assert (record["schedule"], record["type"], record["queue"], record["result"]) == (
        "nightly",
        "reverse",
        "mail",
        "cba",
    ), record
    assert "slot" not in record, record  # outside the slots
    nightly = (await api.schedules())["nightly"]
    assert (nightly["last_task_id"], nightly["last_status"]) == (tid, "completed"), nightly
    assert sent <= nightly["last_run_at"] <= answered, (sent, nightly, answered)
    assert nightly["next_run_at"] == next_three_in_berlin(time.time()) and nightly["paused"] is False, nightly

    for action in ("pause", "resume", "run"):
        status, body, _ = await api.act("nosuch", action)
        assert status == 404 and set(body) == {"error"} and "nosuch" in body["error"], (action, status, body)
