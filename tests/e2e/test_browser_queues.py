"""The dashboard's Queues panel in Chromium (Playwright) against a real API process and one worker, on both backends.

Pausing "mail" from the page holds its tasks pending while the default queue's run, and resuming it runs them;
the task table's queue filter shows one queue's rows; the read-only token is offered no pause or resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Inbox, Proc, cleanup, sign_in, wait_for, wait_healthy, write_config
from tests.e2e.test_browser import row, submitted_id, wait_row

TOKEN, READ = "operator-queues-s3cret", "reader-queues-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_LIMIT = "\u2014"  # what the panel shows for limit 0 and rate "" (queues.js NO_LIMIT)

pytestmark = [pytest.mark.timeout(120)]


@dataclasses.dataclass
class Stack:
    """A real API (both tokens) and one worker, "email" routed to queue "mail" (limit 1)."""

    base: str
    session: aiohttp.ClientSession  # holds the operator token
    worker: Proc


@pytest.fixture
async def api(backend: str, tag: str, tmp_path: Path, inbox: Inbox, procs: Callable[..., Proc]) -> AsyncIterator[Stack]:
    """The running :class:`Stack`."""
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        api={"token": TOKEN, "read_token": READ},
        queues={"default": {}, "mail": {"limit": 1}},
        routes={"email": "mail"},
        smtp={"host": "127.0.0.1", "port": inbox.port},
    )
    cfg = asyncnode.Config.from_toml(config, env={})
    started = [procs("api", config), procs("worker", config)]
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, started[0])
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Stack(base, session, started[1])
    for proc in started:  # before the cleanup, so that none declares its queues again after it
        proc.stop()
    await cleanup(tag)


async def open_with(browser: Any, base: str, token: str) -> tuple[Any, list[str]]:
    """A live page of the dashboard, given ``token`` in its token dialog, once both queues are listed; and the
    errors its scripts raise."""
    page, errors = await sign_in(browser, base, token)
    for name in ("default", "mail"):
        await queue_row(page, name).wait_for(timeout=10_000)
    return page, errors


def queue_row(page: Any, name: str) -> Any:
    return page.locator(f'#queue-rows tr[data-queue="{name}"]')


async def listed(session: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    """GET /api/queues, by name."""
    async with session.get(f"{base}/api/queues") as resp:
        assert resp.status == 200, await resp.text()
        return {item["name"]: item for item in (await resp.json())["items"]}


async def logged(proc: Proc, text: str) -> bool:
    """Whether ``proc`` has written ``text`` to its log (for wait_for)."""
    return text in proc.log()


async def task_status(session: aiohttp.ClientSession, base: str, tid: str) -> str:
    async with session.get(f"{base}/api/tasks/{tid}") as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["status"])


async def test_pausing_a_queue_holds_its_tasks_and_resuming_runs_them(browser: Any, api: Stack, inbox: Inbox) -> None:
    from playwright.async_api import expect

    base, session = api.base, api.session
    page, errors = await open_with(browser, base, TOKEN)
    await page.wait_for_selector('body[data-access="operator"]', timeout=10_000)
    mail, default = queue_row(page, "mail"), queue_row(page, "default")

    # Both declared queues, "default" first, each with its limit; neither paused.
    assert await page.locator("#queue-rows tr").evaluate_all("rows => rows.map(r => r.dataset.queue)") == [
        "default",
        "mail",
    ]
    await expect(mail.locator("td.limit")).to_have_text("1")
    await expect(default.locator("td.limit")).to_have_text(NO_LIMIT)
    await expect(mail.locator("td.rate")).to_have_text(NO_LIMIT)
    for queue in (mail, default):
        await expect(queue).to_have_attribute("data-paused", "false")
        await expect(queue.locator("td.state")).to_have_text("running")
        await expect(queue.locator("button.pause-queue")).to_be_visible()
        await expect(queue.locator("button.resume-queue")).to_be_hidden()

    # Pause "mail": the row says so, offers Resume instead, and the server agrees.
    await mail.locator("button.pause-queue").click()
    await expect(mail).to_have_attribute("data-paused", "true", timeout=10_000)
    await expect(mail.locator("td.state")).to_have_text("paused")
    await expect(mail.locator("button.resume-queue")).to_be_visible()
    await expect(mail.locator("button.pause-queue")).to_be_hidden()
    queues = await listed(session, base)
    assert (queues["mail"]["paused"], queues["default"]["paused"]) == (True, False), queues
    assert (queues["mail"]["limit"], queues["default"]["limit"]) == (1, 0), queues
    # A worker takes up a pause within its next read of them (CONTROL_INTERVAL): await it saying so.
    paused = "queue 'mail' paused: starting none of its tasks"
    await wait_for(lambda: logged(api.worker, paused), 10, "the worker to take up the pause")

    # An e-mail queued from the page waits in "mail" while a task of the default queue, queued after it, runs.
    await page.fill("#form-email [name=to]", "ops@example.com")
    await page.fill("#form-email [name=subject]", "held")
    await page.fill("#form-email [name=body]", "until mail is resumed")
    held = await submitted_id(page, "email")
    async with session.post(f"{base}/api/tasks", json={"type": "reverse", "payload": {"text": "abc"}}) as resp:
        assert resp.status == 202, await resp.text()
        other = str((await resp.json())["id"])
    await wait_row(page, other, "completed", 30)
    await expect(row(page, other).locator("td.queue")).to_have_text("default")
    await expect(row(page, held).locator("td.queue")).to_have_text("mail")
    await expect(row(page, held)).to_have_attribute("data-status", "pending")
    assert await task_status(session, base, held) == "pending"
    assert inbox.envelopes == []
    # The live figures that came meanwhile still show it paused.
    await expect(mail).to_have_attribute("data-paused", "true")

    # Resume: the row offers Pause again, and the e-mail goes out.
    await mail.locator("button.resume-queue").click()
    await expect(mail).to_have_attribute("data-paused", "false", timeout=10_000)
    await expect(mail.locator("td.state")).to_have_text("running")
    await expect(mail.locator("button.pause-queue")).to_be_visible()
    await wait_row(page, held, "completed", 30)
    assert [e.rcpt_tos for e in inbox.envelopes] == [["ops@example.com"]]
    assert (await listed(session, base))["mail"]["paused"] is False

    # The queue filter offers every queue; "mail" leaves only the e-mail's row, "All queues" brings both back.
    options = page.locator("#queue-filter option")
    await expect(options).to_have_text(["All queues", "default", "mail"])
    await page.select_option("#queue-filter", "mail")
    await expect(row(page, other)).to_have_count(0, timeout=5_000)
    await expect(row(page, held)).to_be_visible()
    await page.select_option("#queue-filter", "")
    await expect(row(page, other)).to_be_visible(timeout=5_000)
    await expect(row(page, held)).to_be_visible()
    assert errors == []


async def test_the_read_token_is_offered_no_pause_or_resume(browser: Any, api: Stack) -> None:
    page, errors = await open_with(browser, api.base, READ)
    await page.wait_for_selector('body[data-access="read"]', timeout=10_000)
    buttons = page.locator("#queue-rows button.pause-queue, #queue-rows button.resume-queue")
    assert await buttons.count() == 4  # one of each per queue, both hidden
    for button in await buttons.all():
        assert not await button.is_visible()
    assert await page.locator("#queues").is_visible()
    assert errors == []
