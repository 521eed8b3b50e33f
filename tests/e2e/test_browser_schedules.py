"""The dashboard's Schedules panel in Chromium (Playwright) against a real API process and one worker, on both
backends.

Two schedules: "hourly" (``every = 3600``, so that it does not fire by itself during a test) and "often"
(``every = 2``). The panel lists both in config order with their next run, and "often"'s runs; Run now on
"hourly" makes a task that appears in the task table with the schedule's type and becomes the row's last task;
Pause shows "paused" instead of the next run, and Resume brings it back; the read-only token is offered no
button; a config without schedules shows neither the panel nor its nav link.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_for, wait_healthy, write_config
from tests.e2e.test_browser import row, wait_row

TOKEN, READ = "operator-schedules-s3cret", "reader-schedules-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOUR = 3600
#: The schedules of the stack, in config order. ``payload.text`` is a TOML dotted key: write_config writes
#: values as JSON, which an inline table is not.
SCHEDULES = {
    "hourly": {
        "type": "reverse",
        "payload.text": "hourly",
        "every": HOUR,
        "timezone": "Europe/Berlin",
        "queue": "mail",
    },
    "often": {"type": "noop", "every": 2},
}
#: A next run's countdown (tasks.js untilText): "in 4 s", "in 59 m 12 s", "in 1 h 0 m".
COUNTDOWN = re.compile(r"^in (?:(\d+) h (\d+) m|(\d+) m (\d+) s|(\d+) s)$")
NONE = "\u2014"  # what the panel shows for no last run or last task (schedules.js NONE)
#: Seconds the hourly slot must be away when a test starts, so that it cannot fire during the test.
CLEAR_OF_THE_HOUR = 60.0

pytestmark = [pytest.mark.timeout(150)]


@dataclasses.dataclass
class Stack:
    """A real API (both tokens) and one worker, with the given schedules."""

    base: str
    session: aiohttp.ClientSession  # holds the operator token


async def start_stack(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc], schedules: dict[str, Any]
) -> AsyncIterator[Stack]:
    """Run an API and a worker with ``schedules`` (none: no [schedules] table) until the test ends."""
    sections: dict[str, dict[str, Any]] = {"schedules": schedules} if schedules else {}
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        api={"token": TOKEN, "read_token": READ},
        queues={"default": {}, "mail": {}},
        **sections,
    )
    cfg = asyncnode.Config.from_toml(config, env={})
    # A new schedule starts from now: starting clear of the hour, the hourly one makes no task but Run now's.
    await wait_for(clear_of_the_hour, CLEAR_OF_THE_HOUR + 5, "the hourly slot to pass")
    started = [procs("api", config), procs("worker", config)]
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, started[0])
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Stack(base, session)
    for proc in started:  # before the cleanup, so that none declares its queues again after it
        proc.stop()
    await cleanup(tag)


async def clear_of_the_hour() -> bool:
    """Whether the next full hour is more than CLEAR_OF_THE_HOUR seconds away."""
    return -time.time() % HOUR > CLEAR_OF_THE_HOUR


@pytest.fixture
async def api(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Stack]:
    """The running :class:`Stack` with :data:`SCHEDULES`."""
    async for stack in start_stack(backend, tag, tmp_path, procs, SCHEDULES):
        yield stack


@pytest.fixture
async def bare(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Stack]:
    """The running :class:`Stack` without any schedule."""
    async for stack in start_stack(backend, tag, tmp_path, procs, {}):
        yield stack


async def open_with(browser: Any, base: str, token: str) -> tuple[Any, list[str]]:
    """A live page of the dashboard, given ``token`` in its token dialog, once both schedules are listed; and the
    errors its scripts raise."""
    page, errors = await sign_in(browser, base, token)
    for name in SCHEDULES:
        await schedule_row(page, name).wait_for(timeout=10_000)
    return page, errors


def schedule_row(page: Any, name: str) -> Any:
    return page.locator(f'#schedule-rows tr[data-schedule="{name}"]')


async def listed(stack: Stack) -> dict[str, dict[str, Any]]:
    """GET /api/schedules, by name."""
    async with stack.session.get(f"{stack.base}/api/schedules") as resp:
        assert resp.status == 200, await resp.text()
        return {item["name"]: item for item in (await resp.json())["items"]}


async def record(stack: Stack, tid: str) -> dict[str, Any]:
    """GET /api/tasks/<tid>."""
    async with stack.session.get(f"{stack.base}/api/tasks/{tid}") as resp:
        assert resp.status == 200, await resp.text()
        found: dict[str, Any] = await resp.json()
        return found


def seconds_shown(text: str) -> int:
    """The seconds a next run's countdown shows (to the minute beyond an hour)."""
    shown = COUNTDOWN.match(text)
    assert shown, text
    h, hm, m, s, only = (int(g) if g else 0 for g in shown.groups())
    return h * 3600 + hm * 60 + m * 60 + s + only


def is_schedule_list(response: Any) -> bool:
    """Whether ``response`` answers the page's GET /api/schedules (for page.expect_response)."""
    return bool(response.url.endswith("/api/schedules") and response.request.method == "GET")


async def test_the_panel_lists_both_schedules_with_their_next_runs(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await open_with(browser, api.base, TOKEN)
    await expect(page.locator("#schedules")).to_be_visible()
    await expect(page.locator("#nav-schedules")).to_be_visible()
    await expect(page.locator("#schedule-count")).to_have_text("2 schedules")
    hourly, often = schedule_row(page, "hourly"), schedule_row(page, "often")

    # In config order, each as configured; the queue is the one the list gives (the type's route for "often").
    assert await page.locator("#schedule-rows tr").evaluate_all("rows => rows.map(r => r.dataset.schedule)") == [
        "hourly",
        "often",
    ]
    items = await listed(api)
    assert [items[name]["every"] for name in SCHEDULES] == [HOUR, 2], items
    await expect(hourly.locator("td.type")).to_have_text("reverse")
    await expect(hourly.locator("td.when")).to_have_text("every 3600 s")
    await expect(hourly.locator("td.timezone")).to_have_text("Europe/Berlin")
    await expect(hourly.locator("td.queue")).to_have_text("mail")
    await expect(often.locator("td.type")).to_have_text("noop")
    await expect(often.locator("td.when")).to_have_text("every 2 s")
    await expect(often.locator("td.timezone")).to_have_text("UTC")
    await expect(often.locator("td.queue")).to_have_text(items["often"]["queue"] or NONE)

    # The next runs: the hourly one at the next hour (a slot is a multiple of `every` since the epoch), counting
    # down; the two-second one in a second or two. Neither is paused.
    next_hour = items["hourly"]["next_run_at"]
    assert next_hour is not None and next_hour % HOUR == 0 and 0 < next_hour - time.time() <= HOUR, items
    await expect(hourly.locator("td.next")).to_have_text(COUNTDOWN)
    left = seconds_shown(await hourly.locator("td.next").text_content() or "")
    assert abs(left - (next_hour - time.time())) <= 62, (left, next_hour)  # "X h Y m" shows whole minutes
    await expect(often.locator("td.next")).to_have_text(re.compile(r"^(in [12] s|due now)$"))
    for schedule in (hourly, often):
        await expect(schedule).to_have_attribute("data-paused", "false")
        await expect(schedule.locator("button.pause-schedule")).to_be_visible()
        await expect(schedule.locator("button.resume-schedule")).to_be_hidden()
        await expect(schedule.locator("button.run-schedule")).to_be_visible()

    # The hourly one has not run; the two-second one runs: its last run ages, its last task is one of its slots',
    # its badge that task's status (a later slot's task may have taken its place meanwhile).
    await expect(hourly.locator("td.last")).to_have_text(NONE)
    await expect(hourly.locator("td.task")).to_have_text(NONE)
    await expect(hourly.locator("td.status")).to_have_text("")
    await expect(often.locator("td.status .badge")).to_have_text("completed", timeout=15_000)
    await expect(often.locator("td.last")).to_have_text(re.compile(r"^(just now|\d+(\.\d)? s ago)$"))
    tid = await often.locator("td.task button.open-task").get_attribute("data-task-id")
    assert tid
    await wait_row(page, tid, "completed", 15)
    task = await record(api, tid)
    assert (task["type"], task["schedule"], task["status"]) == ("noop", "often", "completed"), task
    assert isinstance(task["slot"], float) and task["slot"] % 2 == 0, task
    await expect(row(page, tid).locator("td.type")).to_have_text("noop")
    assert errors == []


async def test_run_now_makes_a_task_that_becomes_the_rows_last_task(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await open_with(browser, api.base, TOKEN)
    await expect(page.locator("body")).to_have_attribute("data-access", "operator", timeout=10_000)
    hourly = schedule_row(page, "hourly")
    await expect(hourly.locator("td.task")).to_have_text(NONE)

    async with page.expect_response(lambda r: r.url.endswith("/api/schedules/hourly/run")) as answer:
        await hourly.locator("button.run-schedule").click()
    response = await answer.value
    assert response.status == 202, await response.text()
    tid = str((await response.json())["id"])
    await expect(page.locator("#schedules-status")).to_have_text(f"Ran schedule hourly now: task {tid[:8]}.")
    await expect(page.locator("#schedules-status")).to_have_attribute("data-state", "ok")

    # The row's last task is that one, and its badge follows the task to completed; it is the last run too.
    await expect(hourly.locator("td.task button.open-task")).to_have_attribute("data-task-id", tid)
    await expect(hourly.locator("td.last")).to_have_text(re.compile(r"^(just now|\d+(\.\d)? s ago)$"), timeout=10_000)
    await expect(hourly.locator("td.status .badge")).to_have_text("completed", timeout=30_000)
    # It is an ordinary task of the schedule's type, payload and queue, in the task table.
    await wait_row(page, tid, "completed", 30)
    await expect(row(page, tid).locator("td.type")).to_have_text("reverse")
    await expect(row(page, tid).locator("td.queue")).to_have_text("mail")
    await expect(row(page, tid).locator("td.result")).to_have_text("ylruoh")
    task = await record(api, tid)
    assert (task["type"], task["schedule"], task["queue"], task["status"]) == (
        "reverse",
        "hourly",
        "mail",
        "completed",
    ), task
    assert "slot" not in task or task["slot"] is None, task  # outside the slots
    item = (await listed(api))["hourly"]
    assert (item["last_task_id"], item["last_status"]) == (tid, "completed"), item
    assert isinstance(item["last_run_at"], float) and abs(item["last_run_at"] - task["created_at"]) < 5, item
    # A later list keeps it the last task (it is not only this page's guess).
    async with page.expect_response(is_schedule_list, timeout=10_000):
        pass
    await expect(hourly.locator("td.task button.open-task")).to_have_attribute("data-task-id", tid)

    # Its link opens its details.
    await hourly.locator("td.task button.open-task").click()
    await expect(page.locator("#task-details")).to_be_visible()
    await expect(page.locator("#detail-id")).to_have_text(tid)
    await expect(page.locator("#detail-type")).to_have_text("reverse")
    await expect(page.locator("#detail-schedule")).to_have_text("hourly")  # the schedule that fired it
    await page.keyboard.press("Escape")
    # The task table's schedule filter (suggesting the schedules' names) finds the tasks it fired.
    assert await page.locator("#schedule-names option").evaluate_all("o => o.map(x => x.value)") == ["hourly", "often"]
    await page.fill("#filter-schedule", "hourly")
    await expect(page.locator("#task-rows > tr")).to_have_count(1, timeout=10_000)
    await expect(page.locator(f'#task-rows tr[data-id="{tid}"]')).to_be_visible()
    assert errors == []


async def test_pause_shows_paused_and_resume_brings_the_next_run_back(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await open_with(browser, api.base, TOKEN)
    await expect(page.locator("body")).to_have_attribute("data-access", "operator", timeout=10_000)
    hourly = schedule_row(page, "hourly")
    await expect(hourly.locator("td.next")).to_have_text(COUNTDOWN)

    await hourly.locator("button.pause-schedule").click()
    await expect(hourly).to_have_attribute("data-paused", "true", timeout=10_000)
    await expect(hourly.locator("td.next")).to_have_text("paused")
    await expect(hourly.locator("button.resume-schedule")).to_be_visible()
    await expect(hourly.locator("button.pause-schedule")).to_be_hidden()
    await expect(hourly.locator("button.run-schedule")).to_be_visible()
    await expect(page.locator("#schedules-status")).to_have_text(
        "Paused schedule hourly: nothing of it runs until it is resumed."
    )
    await expect(page.locator("#schedule-count")).to_have_text("2 schedules, 1 paused")
    items = await listed(api)
    assert (items["hourly"]["paused"], items["hourly"]["next_run_at"]) == (True, None), items
    assert items["often"]["paused"] is False, items
    # The next list still says so.
    async with page.expect_response(is_schedule_list, timeout=10_000):
        pass
    await expect(hourly.locator("td.next")).to_have_text("paused")

    await hourly.locator("button.resume-schedule").click()
    await expect(hourly).to_have_attribute("data-paused", "false", timeout=10_000)
    await expect(hourly.locator("td.next")).to_have_text(COUNTDOWN, timeout=10_000)
    await expect(hourly.locator("button.pause-schedule")).to_be_visible()
    await expect(hourly.locator("button.resume-schedule")).to_be_hidden()
    await expect(page.locator("#schedules-status")).to_have_text("Resumed schedule hourly.")
    await expect(page.locator("#schedule-count")).to_have_text("2 schedules")
    item = (await listed(api))["hourly"]
    assert item["paused"] is False and item["next_run_at"] is not None and item["next_run_at"] % HOUR == 0, item
    assert errors == []


async def test_the_read_token_is_offered_no_schedule_action(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await open_with(browser, api.base, READ)
    await expect(page.locator("body")).to_have_attribute("data-access", "read", timeout=10_000)
    await expect(page.locator("#schedules")).to_be_visible()
    await expect(schedule_row(page, "hourly").locator("td.next")).to_have_text(COUNTDOWN)
    buttons = page.locator("#schedule-rows td.actions button")
    assert await buttons.count() == 6  # pause, resume and run now per schedule, all hidden
    for button in await buttons.all():
        assert not await button.is_visible()
    # The last task's link is no action: it still opens the task's details.
    link = schedule_row(page, "often").locator("td.task button.open-task")
    await link.click(timeout=15_000)
    await expect(page.locator("#task-details")).to_be_visible()
    await expect(page.locator("#detail-type")).to_have_text("noop")
    assert errors == []


async def test_without_schedules_neither_the_panel_nor_its_link_shows(browser: Any, bare: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await sign_in(browser, bare.base, TOKEN)
    async with page.expect_response(is_schedule_list, timeout=10_000) as answer:
        pass
    response = await answer.value
    assert response.status == 200, await response.text()
    assert (await response.json())["items"] == []
    await expect(page.locator("#schedules")).to_be_hidden()
    await expect(page.locator("#nav-schedules")).to_be_hidden()
    await expect(page.locator("#queues")).to_be_visible()
    assert errors == []
