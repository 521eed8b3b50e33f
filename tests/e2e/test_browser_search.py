"""The dashboard's search, address and keys, in Chromium (Playwright) against a real API process, on both backends.

The search box finds a task among every task the server keeps, not only the newest the page holds; the filters
and the open task are in the page's address (#/tasks?q=...&status=..., #/tasks/<id>), so that a link or a reload
opens the same view; a search the server refuses shows its error; "/" focuses the search box, j and k move along
the rows. The bulk bar cancels the ticked rows, or every task the filters match on the server, after a question
that counts them, and deletes finished ones; the read-only token is offered none of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_healthy, write_config
from tests.e2e.test_browser import row

TOKEN, READ = "operator-search-s3cret", "reader-search-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Tasks submitted after the one looked for: far more than the page holds at start (the socket's snapshot of the
#: newest 200, and GET /api/tasks?limit=100).
LATER = 5000

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
async def stack(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[tuple[str, str]]:
    """A real API (no worker: tasks stay pending) holding a task whose payload says "needle" and LATER newer
    ones; the base URL and the needle's id."""
    config = write_config(tmp_path / "config.toml", tag, backend=backend, api={"token": TOKEN, "read_token": READ})
    cfg = asyncnode.Config.from_toml(config, env={})
    api = procs("api", config)
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, api)
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.post(f"{base}/api/tasks", json={"type": "reverse", "payload": {"text": "a needle"}}) as resp:
            assert resp.status == 202, await resp.text()
            needle = str((await resp.json())["id"])
        hay = [{"type": "reverse", "payload": {"text": f"hay {i}"}} for i in range(LATER)]
        for start in range(0, LATER, 500):
            async with session.post(f"{base}/api/tasks", json=hay[start : start + 500]) as resp:
                assert resp.status == 202, await resp.text()
    yield base, needle
    api.stop()
    await cleanup(tag)


async def test_the_search_box_finds_a_task_older_than_those_the_page_holds(
    browser: Any, stack: tuple[str, str]
) -> None:
    from playwright.async_api import expect

    base, needle = stack
    page, errors = await sign_in(browser, base, TOKEN)
    await expect(page.locator("#task-count")).to_have_text("200 tasks", timeout=10_000)
    await expect(row(page, needle)).to_have_count(0)  # the page holds the newest 200 only

    await page.fill("#task-search", "needle")
    await expect(row(page, needle)).to_be_visible(timeout=10_000)
    await expect(page.locator("#task-rows > tr")).to_have_count(1)
    await expect(page.locator("#task-count")).to_have_text("1 matching")
    assert await page.evaluate("location.hash") == "#/tasks?q=needle"

    await page.select_option("#filter-status", "completed")  # the server filters its matches too
    await expect(page.locator("#task-rows > tr")).to_have_count(0, timeout=10_000)
    assert await page.evaluate("location.hash") == "#/tasks?q=needle&status=completed"
    await page.select_option("#filter-status", "")
    await expect(row(page, needle)).to_be_visible(timeout=10_000)

    await page.fill("#task-search", "")
    await expect(page.locator("#task-count")).to_have_text("showing 200 of 201", timeout=10_000)  # it stays
    assert await page.evaluate("location.hash") == ""
    assert errors == []


async def test_the_address_holds_the_filters_and_the_open_task(browser: Any, stack: tuple[str, str]) -> None:
    from playwright.async_api import expect

    base, needle = stack
    page, errors = await sign_in(browser, base, TOKEN)
    await page.goto(f"{base}/#/tasks?q=needle&status=pending")  # the same document: a hashchange
    await page.reload()  # and a fresh load of that address
    await page.wait_for_selector("#conn[data-state=live]", timeout=10_000)
    await expect(page.locator("#task-search")).to_have_value("needle")
    await expect(page.locator("#filter-status")).to_have_value("pending")
    await expect(row(page, needle)).to_be_visible(timeout=10_000)
    await expect(page.locator("#task-rows > tr")).to_have_count(1)

    await page.goto(f"{base}/#/tasks/{needle}")
    await page.reload()  # a cold load of the deep link (the token is the tab's, in its session storage)
    await expect(page.locator("#task-details")).to_be_visible(timeout=10_000)
    await expect(page.locator("#detail-id")).to_have_text(needle)
    await expect(page.locator("#detail-payload")).to_contain_text("a needle")
    await page.keyboard.press("Escape")
    await expect(page.locator("#task-details")).to_be_hidden()
    assert await page.evaluate("location.hash") == ""

    await page.reload()
    await page.wait_for_selector("#conn[data-state=live]", timeout=10_000)
    await page.locator("#task-rows > tr").first.locator("button.open-task").click()
    await expect(page.locator("#task-details")).to_be_visible()
    opened = await page.locator("#detail-id").text_content()
    assert await page.evaluate("location.hash") == f"#/tasks/{opened}"
    assert errors == []


async def test_a_refused_search_shows_the_servers_error(browser: Any, stack: tuple[str, str]) -> None:
    from playwright.async_api import expect

    base, _ = stack
    page, errors = await sign_in(browser, base, TOKEN)
    await page.fill("#task-search", "- ! -")
    await expect(page.locator("#tasks-search-error")).to_have_text(
        "Search failed: 'q' has no word to look for (letters or digits)", timeout=10_000
    )
    await expect(page.locator("#task-rows > tr")).to_have_count(0)
    await page.fill("#task-search", "needle")
    await expect(page.locator("#tasks-search-error")).to_be_empty(timeout=10_000)
    assert errors == []


async def test_slash_focuses_the_search_box_and_j_and_k_move_along_the_rows(
    browser: Any, stack: tuple[str, str]
) -> None:
    from playwright.async_api import expect

    base, _ = stack
    page, errors = await sign_in(browser, base, TOKEN)
    await expect(page.locator("#task-rows > tr")).to_have_count(200, timeout=10_000)
    ids = await page.locator("#task-rows > tr").evaluate_all("rows => rows.slice(0, 3).map(r => r.dataset.id)")

    async def focused_row() -> str | None:
        found: str | None = await page.evaluate("document.activeElement.closest('tr')?.dataset.id ?? null")
        return found

    await page.evaluate("document.activeElement && document.activeElement.blur()")
    await page.keyboard.press("j")
    assert await focused_row() == ids[0]
    await page.keyboard.press("j")
    await page.keyboard.press("j")
    assert await focused_row() == ids[2]
    await page.keyboard.press("k")
    assert await focused_row() == ids[1]
    await page.keyboard.press("Enter")
    await expect(page.locator("#detail-id")).to_have_text(ids[1], timeout=10_000)
    await page.keyboard.press("Escape")
    await expect(page.locator("#task-details")).to_be_hidden()

    await page.keyboard.press("/")
    assert await page.evaluate("document.activeElement.id") == "task-search"
    await page.keyboard.type("needle")
    await expect(page.locator("#task-count")).to_have_text("1 matching", timeout=10_000)
    assert errors == []


async def statuses(base: str, ids: list[str]) -> dict[str, str | None]:
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=20)) as session:
        found = {}
        for tid in ids:
            async with session.get(f"{base}/api/tasks/{tid}") as resp:
                found[tid] = (await resp.json())["status"] if resp.status == 200 else None
        return found


async def matching(base: str, q: str) -> int:
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(f"{base}/api/tasks", params={"q": q, "limit": "1"}) as resp:
            return int((await resp.json())["total"])


async def test_the_bulk_bar_acts_on_ticked_rows_or_on_all_that_match_after_asking(
    browser: Any, stack: tuple[str, str]
) -> None:
    from playwright.async_api import expect

    base, needle = stack
    page, errors = await sign_in(browser, base, TOKEN)
    bar = page.locator("#bulk-bar")
    await expect(page.locator("#task-rows > tr")).to_have_count(200, timeout=10_000)
    await expect(bar).to_be_hidden()
    ticked = await page.locator("#task-rows > tr").evaluate_all("rows => rows.slice(0, 2).map(r => r.dataset.id)")
    for tid in ticked:
        await row(page, tid).locator("input.select-task").check()
    await expect(page.locator("#bulk-count")).to_have_text("2 selected")
    await page.click("#bulk-cancel")
    await expect(page.locator("#bulk-question")).to_have_text("Cancel 2 tasks?")
    await page.click("#bulk-keep")  # nothing happens
    await expect(page.locator("#bulk-ask")).to_be_hidden()
    assert await statuses(base, ticked) == dict.fromkeys(ticked, "pending")
    await page.click("#bulk-cancel")
    await page.click("#bulk-confirm")
    await expect(page.locator("#bulk-status")).to_have_text("Cancelled 2 tasks; skipped 0.", timeout=10_000)
    assert await statuses(base, ticked) == dict.fromkeys(ticked, "cancelled")
    for tid in ticked:
        await expect(row(page, tid)).to_have_attribute("data-status", "cancelled", timeout=10_000)
    await expect(bar).to_be_hidden()

    # Every task "hay" matches on the server (5,000), not only the 200 rows shown.
    await page.fill("#task-search", "hay")
    await expect(page.locator("#task-count")).to_have_text(f"showing 200 of {LATER:,} matching", timeout=10_000)
    await page.click("#bulk-all")
    await expect(page.locator("#bulk-count")).to_have_text(f"all {LATER:,} matching selected")
    await page.click("#bulk-cancel")
    await expect(page.locator("#bulk-question")).to_have_text(f"Cancel {LATER:,} tasks?")
    await page.click("#bulk-confirm")
    await expect(page.locator("#bulk-status")).to_have_text(f"Cancelled {LATER - 2} tasks; skipped 0.", timeout=20_000)
    assert await statuses(base, [needle]) == {needle: "pending"}  # it does not say "hay"

    await page.click("#bulk-all")
    await page.click("#bulk-delete")
    await expect(page.locator("#bulk-question")).to_have_text(f"Delete {LATER:,} tasks?")
    await page.click("#bulk-confirm")
    await expect(page.locator("#bulk-status")).to_have_text(
        f"Deleted {LATER} finished tasks; skipped 0.", timeout=20_000
    )
    assert await matching(base, "hay") == 0
    await expect(page.locator("#task-rows > tr")).to_have_count(0, timeout=10_000)
    assert errors == []


async def test_the_read_only_token_is_offered_no_bulk_action(browser: Any, stack: tuple[str, str]) -> None:
    from playwright.async_api import expect

    base, needle = stack
    page, errors = await sign_in(browser, base, READ)
    await expect(page.locator("body")).to_have_attribute("data-access", "read", timeout=10_000)
    await page.fill("#task-search", "needle")
    await expect(row(page, needle)).to_be_visible(timeout=10_000)
    await expect(page.locator("#bulk-bar")).to_be_hidden()
    await expect(row(page, needle).locator("input.select-task")).to_be_hidden()
    # A request forged from the page with the read-only token is refused, and changes nothing.
    forged = await page.evaluate(
        """async ([id, token]) => (await fetch('/api/tasks/cancel', {method: 'POST', body: JSON.stringify({ids: [id]}),
             headers: {'Authorization': `Bearer ${token}`, 'Content-Type': 'application/json'}})).status""",
        [needle, READ],
    )
    assert forged == 403
    assert await statuses(base, [needle]) == {needle: "pending"}
    assert errors == []


async def test_more_pages_join_the_table_and_the_time_filter_comes_from_the_address(
    browser: Any, stack: tuple[str, str]
) -> None:
    from playwright.async_api import expect

    base, needle = stack
    page, errors = await sign_in(browser, base, TOKEN)
    await page.fill("#task-search", "hay")
    await expect(page.locator("#task-count")).to_have_text(f"showing 200 of {LATER:,} matching", timeout=10_000)
    await page.click("#search-more")
    await expect(page.locator("#task-count")).to_have_text(f"showing 400 of {LATER:,} matching", timeout=10_000)
    await expect(page.locator("#task-rows > tr")).to_have_count(400)
    shown = await page.locator("#task-rows > tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert len(set(shown)) == 400 and needle not in shown

    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(f"{base}/api/tasks/{needle}") as resp:
            created = (await resp.json())["created_at"]
    await page.goto(f"{base}/#/tasks?until={created}")  # nothing created after the needle
    await expect(page.locator("#task-rows > tr")).to_have_count(1, timeout=10_000)
    await expect(row(page, needle)).to_be_visible()
    await expect(page.locator("#filter-until")).not_to_have_value("")
    await expect(page.locator("#task-search")).to_have_value("")
    assert errors == []
