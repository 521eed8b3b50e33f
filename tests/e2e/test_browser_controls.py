"""Cancelling tasks from the dashboard, in Chromium (Playwright) against a real API process and one worker, on
both backends.

A task submitted with a delay shows ``scheduled`` with a countdown that ticks down, and its row's Cancel button
cancels it; a running ``sleep`` task's Cancel button (in its details) stops it; a cancel the server refuses
(409: the task ended meanwhile) shows the server's error; the read-only token is offered no Cancel button.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_healthy, write_config
from tests.e2e.test_browser import row

TOKEN, READ = "operator-controls-s3cret", "reader-controls-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: What a scheduled row's countdown reads (tasks.js countdownText), e.g. " · in 29 s".
COUNTDOWN = re.compile(r"^ \u00b7 in (\d+) s$")

pytestmark = [pytest.mark.timeout(120)]


@dataclasses.dataclass
class Stack:
    """A real API (both tokens) and one worker."""

    base: str
    session: aiohttp.ClientSession  # holds the operator token


@pytest.fixture
async def api(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Stack]:
    """The running :class:`Stack`."""
    config = write_config(tmp_path / "config.toml", tag, backend=backend, api={"token": TOKEN, "read_token": READ})
    cfg = asyncnode.Config.from_toml(config, env={})
    started = [procs("api", config), procs("worker", config)]
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, started[0])
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Stack(base, session)
    for proc in started:  # before the cleanup, so that none declares its queues again after it
        proc.stop()
    await cleanup(tag)


async def submit(stack: Stack, body: dict[str, Any]) -> str:
    """POST a task over HTTP with the operator token; its id."""
    async with stack.session.post(f"{stack.base}/api/tasks", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["id"])


async def record(stack: Stack, tid: str) -> dict[str, Any]:
    """GET /api/tasks/<tid>."""
    async with stack.session.get(f"{stack.base}/api/tasks/{tid}") as resp:
        assert resp.status == 200, await resp.text()
        found: dict[str, Any] = await resp.json()
        return found


async def seconds_left(countdown: Any) -> int:
    """The seconds a scheduled row's countdown shows."""
    shown = COUNTDOWN.match(await countdown.text_content() or "")
    assert shown, await countdown.text_content()
    return int(shown[1])


async def timeline(page: Any) -> list[str]:
    """The statuses the open details' timeline shows, oldest first."""
    statuses: list[str] = await page.locator("#task-timeline li[data-status]").evaluate_all(
        "items => items.map(li => li.dataset.status)"
    )
    return statuses


def cancelled_by_this_page(task: dict[str, Any]) -> None:
    """Assert that ``task`` was cancelled through the API, from this machine, with the operator token."""
    assert task["status"] == "cancelled", task
    assert (task["cancelled_by"], task.get("cancelled_token"), task.get("cancelled_client")) == (
        "api",
        "operator",
        "127.0.0.1",
    ), task
    assert isinstance(task["cancelled_at"], float), task
    assert task["history"][-1]["status"] == "cancelled", task


async def test_a_delayed_task_counts_down_and_its_rows_cancel_button_cancels_it(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await sign_in(browser, api.base, TOKEN)
    await expect(page.locator("body")).to_have_attribute("data-access", "operator", timeout=10_000)
    tid = await submit(api, {"type": "noop", "delay": 30})
    task_row = row(page, tid)
    await expect(task_row).to_have_attribute("data-status", "scheduled", timeout=10_000)
    await expect(task_row.locator("td.status .badge")).to_have_text("scheduled")

    # The countdown to run_at ticks down, once a second.
    countdown = task_row.locator("td.status .countdown")
    await expect(countdown).to_have_text(COUNTDOWN, timeout=5_000)
    first_text = await countdown.text_content()
    first = await seconds_left(countdown)
    assert 25 <= first <= 30, first_text
    await expect(countdown).not_to_have_text(first_text or "", timeout=3_000)
    assert await seconds_left(countdown) < first
    # The Queues panel counts it among its queue's scheduled tasks.
    await expect(page.locator('#queue-rows tr[data-queue="default"] td.scheduled')).to_have_text("1", timeout=10_000)

    # Cancel from the row: it turns cancelled (the socket's update), the countdown and the button go.
    cancel = task_row.locator("button.cancel-task")
    await expect(cancel).to_be_visible()
    await cancel.click()
    await expect(task_row).to_have_attribute("data-status", "cancelled", timeout=10_000)
    await expect(task_row.locator("td.status .badge")).to_have_text("cancelled")
    await expect(countdown).to_have_count(0)
    await expect(cancel).to_be_hidden()
    await expect(page.locator('#queue-rows tr[data-queue="default"] td.scheduled')).to_have_text("0", timeout=10_000)
    await expect(task_row.locator("td.result")).to_have_text("cancelled by api")
    await expect(page.locator("#tasks-status")).to_have_text(f"Cancelled {tid[:8]}.")
    task = await record(api, tid)
    cancelled_by_this_page(task)
    assert task["attempts"] == 0, task

    # Its details say when, by whom and from where, and the timeline ends with the cancel.
    await task_row.locator("button.open-task").click()
    await expect(page.locator("#task-details")).to_be_visible()
    await expect(page.locator("#detail-cancelled-by")).to_have_text("api (from 127.0.0.1, operator token)")
    await expect(page.locator("#detail-cancelled-at")).to_be_visible()
    await expect(page.locator("#detail-run-at")).to_be_visible()
    await expect(page.locator("#detail-cancel")).to_be_hidden()
    await expect(page.locator("#task-timeline li[data-status=cancelled] .tl-meta")).to_contain_text("by api")
    assert await timeline(page) == [entry["status"] for entry in task["history"]]
    assert errors == []


async def test_a_running_sleep_task_is_cancelled_from_its_details(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await sign_in(browser, api.base, TOKEN)
    tid = await submit(api, {"type": "sleep", "payload": {"seconds": 60}})
    task_row = row(page, tid)
    await expect(task_row).to_have_attribute("data-status", "started", timeout=30_000)
    await expect(task_row.locator("button.cancel-task")).to_be_visible()

    await task_row.locator("button.open-task").click()
    details_cancel = page.locator("#detail-cancel")
    await expect(details_cancel).to_be_visible(timeout=5_000)
    await details_cancel.click()
    await expect(task_row).to_have_attribute("data-status", "cancelled", timeout=10_000)
    await expect(page.locator("#detail-status")).to_have_text("cancelled")
    await expect(details_cancel).to_be_hidden()
    await expect(page.locator("#detail-message")).to_have_text("Cancelled.")
    await expect(page.locator("#detail-cancelled-by")).to_have_text("api (from 127.0.0.1, operator token)")
    await expect(page.locator("#task-timeline li").last).to_have_attribute("data-status", "cancelled", timeout=5_000)
    await expect(task_row.locator("td.time")).to_have_text(re.compile(r"^ran "))

    # Stopped where it ran: the history and the timeline go pending, started, cancelled.
    task = await record(api, tid)
    cancelled_by_this_page(task)
    assert [entry["status"] for entry in task["history"]] == ["pending", "started", "cancelled"], task
    assert await timeline(page) == ["pending", "started", "cancelled"]
    assert errors == []


async def test_a_cancel_refused_with_409_shows_the_servers_error(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await sign_in(browser, api.base, TOKEN)
    tid = await submit(api, {"type": "noop", "delay": 60})
    task_row = row(page, tid)
    await expect(task_row).to_have_attribute("data-status", "scheduled", timeout=10_000)

    # Someone else cancels it just before the page's request reaches the server, which then answers 409.
    async def cancelled_first(route: Any) -> None:
        async with api.session.post(f"{api.base}/api/tasks/{tid}/cancel") as resp:
            assert resp.status == 200, await resp.text()
        await route.continue_()

    await page.route(f"**/api/tasks/{tid}/cancel", cancelled_first)
    await task_row.locator("button.cancel-task").click()
    await expect(page.locator("#tasks-status")).to_have_text(
        f"Cancel of {tid[:8]} failed: task {tid} is already cancelled", timeout=10_000
    )
    await expect(page.locator("#tasks-status")).to_have_attribute("data-state", "error")
    await expect(task_row.locator(".row-error")).to_have_text("Cancel failed: already cancelled")
    await expect(task_row).to_have_attribute("data-status", "cancelled", timeout=10_000)
    assert (await record(api, tid))["status"] == "cancelled"
    assert errors == []


async def test_the_read_token_is_offered_no_cancel(browser: Any, api: Stack) -> None:
    from playwright.async_api import expect

    page, errors = await sign_in(browser, api.base, READ)
    await expect(page.locator("body")).to_have_attribute("data-access", "read", timeout=10_000)
    tid = await submit(api, {"type": "noop", "delay": 30})
    task_row = row(page, tid)
    await expect(task_row).to_have_attribute("data-status", "scheduled", timeout=10_000)
    await expect(task_row.locator("td.status .countdown")).to_have_text(COUNTDOWN, timeout=5_000)
    await expect(task_row.locator("button.cancel-task")).to_have_count(1)
    await expect(task_row.locator("button.cancel-task")).to_be_hidden()
    await task_row.locator("button.open-task").click()
    await expect(page.locator("#detail-status")).to_have_text("scheduled", timeout=5_000)
    await expect(page.locator("#detail-run-at")).to_be_visible()
    await expect(page.locator("#detail-cancel")).to_be_hidden()
    assert errors == []
