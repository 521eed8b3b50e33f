"""The dashboard against axe-core (tests/vendor/axe.min.js, run in the page by Playwright): no WCAG 2.1 A or AA
violation in any of its views, in Chromium against a real API process and one worker.

The views: the page with tasks in several states and a dead letter; a search with the bulk bar and its question;
a task's details; the dead letters grouped by error; the edit-and-requeue dialog; the read-only token's page.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_for, wait_healthy, write_config

TOKEN, READ = "operator-a11y-s3cret", "reader-a11y-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AXE = Path(__file__).resolve().parents[1] / "vendor" / "axe.min.js"
#: The rules run: WCAG 2.0 and 2.1, levels A and AA.
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
async def stack(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[str]:
    """A real API and worker holding a completed, a failed (dead-lettered) and a scheduled task; the base URL."""
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        api={"token": TOKEN, "read_token": READ},
        broker={"retry_delays": [0.2], "max_retries": 0},
        handlers={"modules": ["handlers", "tests.fault_handlers"]},
    )
    cfg = asyncnode.Config.from_toml(config, env={})
    started = [procs("api", config), procs("worker", config)]
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, started[0])
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=20)) as session:
        bodies = [
            {"type": "reverse", "payload": {"text": "done"}},
            {"type": "fail", "payload": {"permanent": True}},
            {"type": "noop", "delay": 600},
        ]
        ids = []
        for body in bodies:
            async with session.post(f"{base}/api/tasks", json=body) as resp:
                assert resp.status == 202, await resp.text()
                ids.append((await resp.json())["id"])

        async def settled() -> bool:
            async with session.get(f"{base}/api/dlq") as resp:
                return bool((await resp.json())["total"])

        await wait_for(settled, 30, "the failed task's dead letter")
        yield base
    for proc in started:
        proc.stop()
    await cleanup(tag)


async def violations(page: Any) -> list[str]:
    """What axe-core finds against TAGS in the page as it is now: rule, impact and the elements, one line each."""
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.evaluate(
            AXE.read_text() + "\n;true"
        )  # through the DevTools protocol: the page's CSP allows no inline script
    found = await page.evaluate(
        "async (tags) => (await axe.run(document, {runOnly: {type: 'tag', values: tags}})).violations.map("
        "v => `${v.id} (${v.impact}): ${v.nodes.map(n => `${n.target.join(' ')} ${n.failureSummary}`).join('; ')}`)",
        TAGS,
    )
    return list(found)


async def test_every_view_of_the_dashboard_passes_axe(browser: Any, stack: str) -> None:
    from playwright.async_api import expect

    page, errors = await sign_in(browser, stack, TOKEN)
    await expect(page.locator("#dlq-rows > tr")).to_have_count(1, timeout=15_000)
    await expect(page.locator("#task-rows > tr")).to_have_count(3, timeout=15_000)
    assert await violations(page) == [], "the page"

    await page.fill("#task-search", "done")
    await expect(page.locator("#task-count")).to_have_text("1 matching", timeout=10_000)
    await page.locator("#task-rows input.select-task").first.check()
    await page.click("#bulk-cancel")
    await expect(page.locator("#bulk-question")).to_be_visible()
    assert await violations(page) == [], "a search, the bulk bar and its question"
    await page.click("#bulk-keep")

    await page.locator("#task-rows button.open-task").first.click()
    await expect(page.locator("#task-timeline li")).not_to_have_count(0, timeout=10_000)
    assert await violations(page) == [], "a task's details"
    await page.keyboard.press("Escape")

    await page.click("#dlq-groups-box summary")
    await expect(page.locator("#dlq-group-rows > tr")).to_have_count(1, timeout=10_000)
    assert await violations(page) == [], "the dead letters grouped"

    await page.locator("#dlq-rows button.edit-requeue").click()
    await expect(page.locator("#dlq-edit")).to_be_visible()
    assert json.loads(await page.locator("#dlq-edit-payload").input_value()) == {"permanent": True}
    assert await violations(page) == [], "the edit-and-requeue dialog"
    await page.click("#dlq-edit-cancel")

    reader, reader_errors = await sign_in(browser, stack, READ)
    await expect(reader.locator("body")).to_have_attribute("data-access", "read", timeout=10_000)
    assert await violations(reader) == [], "the read-only token's page"
    assert errors == [] and reader_errors == []
