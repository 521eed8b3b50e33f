"""The dashboard in a real browser (Playwright driving Debian's Chromium) against real processes.

The screenshot test writes to its own temporary folder; ``make screenshot`` sets
``ASYNCNODE_SCREENSHOT=docs/dashboard.png`` to refresh the README's pictures instead (``dashboard.png``, and
``dashboard-search.png``, ``dashboard-dead-letters.png`` and ``dashboard-edit.png`` beside it).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    Inbox,
    Proc,
    cleanup,
    skip_or_fail,
    wait_for,
    write_config,
)
from tests.faults import Cluster

pytestmark = [pytest.mark.timeout(180)]

#: Where test_screenshot_with_every_state writes (relative to the repository), set by `make screenshot`;
#: unset, it writes to the test's temporary folder and leaves the work tree alone.
SCREENSHOT = os.environ.get("ASYNCNODE_SCREENSHOT", "")


def worker_gone_keep_ms() -> int:
    """Milliseconds the page keeps a worker gone from the list, greyed out, before dropping it (state.js)."""
    found = re.search(
        r"^export const WORKER_GONE_KEEP = (\d+);", (ROOT / "web" / "static" / "state.js").read_text(), re.M
    )
    assert found, "WORKER_GONE_KEEP not found in web/static/state.js"
    return int(found[1])


@pytest.fixture
async def stack(
    backend: str, tag: str, tmp_path: Path, inbox: Inbox, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    # The screenshot shows what a user has: the built-in task types only.
    builtin = request.node.get_closest_marker("builtin_only") is not None
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        broker={"retry_delays": [0.2], "max_retries": 0 if builtin else 1},
        handlers={"modules": ["handlers"] if builtin else ["handlers", "tests.fault_handlers"]},
        smtp={"host": "127.0.0.1", "port": inbox.port},
        worker={"heartbeat": 0.5},
    )
    cluster = Cluster(config, tmp_path)
    try:
        await cluster.start(workers=2)
        yield cluster
    finally:
        await cluster.close()
        await cleanup(tag)


@pytest.fixture
async def page(stack: Cluster) -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} not installed (apt-get install chromium)"
        if SCREENSHOT:  # `make screenshot` asked for a picture: not taking one is a failure
            pytest.fail(reason)
        skip_or_fail(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1000})
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(stack.base + "/", timeout=15_000)
            await page.wait_for_selector("#conn[data-state=live]", timeout=10_000)
            yield page
            assert not errors, errors
        finally:
            await browser.close()


def row(page: Any, tid: str) -> Any:
    return page.locator(f'tbody#task-rows tr[data-id="{tid}"]')


async def wait_row(page: Any, tid: str, status: str, timeout: float = 15) -> None:
    await page.locator(f'tbody#task-rows tr[data-id="{tid}"][data-status="{status}"]').wait_for(timeout=timeout * 1000)


async def submitted_id(page: Any, form: str) -> str:
    """Submit a form and return the id the page reports."""
    status = page.locator(f"#form-{form} .form-status")
    await page.click(f"#form-{form} button[type=submit]")
    await page.wait_for_function(
        "el => /queued [0-9a-f]{8}/.test(el.textContent)", arg=await status.element_handle(), timeout=10_000
    )
    short = re.search(r"queued ([0-9a-f]{8})", await status.text_content() or "")
    assert short
    locator = page.locator(f'tbody#task-rows tr[data-id^="{short.group(1)}"]')
    await locator.first.wait_for(timeout=10_000)
    return str(await locator.first.get_attribute("data-id"))


async def test_each_form_runs_its_task_live(page: Any, stack: Cluster, inbox: Inbox) -> None:
    await page.fill("#form-reverse [name=text]", "stressed")
    reverse = await submitted_id(page, "reverse")
    await page.fill("#form-sentiment [name=text]", "What a wonderful, happy day!")
    sentiment = await submitted_id(page, "sentiment")
    await page.fill("#form-email [name=to]", "ops@example.com")
    await page.fill("#form-email [name=subject]", "hello")
    await page.fill("#form-email [name=body]", "from the browser")
    mail = await submitted_id(page, "email")
    await page.fill("#form-sleep [name=seconds]", "0.3")
    sleep = await submitted_id(page, "sleep")
    noop = await submitted_id(page, "noop")
    for tid in (reverse, sentiment, mail, sleep, noop):
        await wait_row(page, tid, "completed", 15)
    assert await row(page, reverse).locator("td.result").text_content() == "desserts"
    assert "positive" in (await row(page, sentiment).locator("td.result").text_content() or "")
    assert "ops@example.com" in (await row(page, mail).locator("td.result").text_content() or "")
    # The e-mail reached the SMTP server (the worker records completed only after its 250) as typed in the form.
    [envelope] = inbox.envelopes
    assert envelope.rcpt_tos == ["ops@example.com"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert (message["To"], message["Subject"]) == ("ops@example.com", "hello")
    assert message.get_content().rstrip("\r\n") == "from the browser"
    assert message["X-Asyncnode-Task"] == mail
    # The statuses went through started: the page saw every step, without a reload.
    for tid in (reverse, sleep):
        task = (await stack.tasks([tid]))[tid]
        assert [h["status"] for h in task["history"]] == ["pending", "started", "completed"]


async def test_a_task_from_another_client_appears(page: Any, stack: Cluster) -> None:
    status, tid, _ = await stack.submit({"type": "reverse", "payload": {"text": "elsewhere"}})
    assert status == 202 and tid
    await wait_row(page, tid, "completed", 15)
    assert await row(page, tid).locator("td.result").text_content() == "erehwesle"


async def test_progress_bar_moves(page: Any, stack: Cluster) -> None:
    _, tid, _ = await stack.submit({"type": "sleep", "payload": {"seconds": 3}})
    bar = row(page, tid).locator("progress")
    await bar.wait_for(timeout=10_000)
    first = float(await bar.get_attribute("value") or 0)
    await page.wait_for_function(
        "([el, v]) => el && Number(el.value) > v", arg=[await bar.element_handle(), first], timeout=10_000
    )
    await wait_row(page, tid, "completed", 10)


async def test_hostile_text_is_shown_as_text(page: Any, stack: Cluster) -> None:
    text = """<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> "quotes" 'too'"""
    _, tid, _ = await stack.submit({"type": "reverse", "payload": {"text": text}})
    await wait_row(page, tid, "completed", 15)
    assert await row(page, tid).locator("td.result").text_content() == text[::-1]
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("tbody#task-rows script, tbody#task-rows img").count() == 0


async def test_failed_task_shows_its_error_and_requeue_from_the_page(page: Any, stack: Cluster, tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    _, tid, _ = await stack.submit({"type": "fail_until", "payload": {"flag": str(flag)}})
    await wait_row(page, tid, "failed", 15)
    assert "flag not set yet" in (await row(page, tid).locator(".error").text_content() or "")
    dead = page.locator(f'tbody#dlq-rows tr[data-id="{tid}"]')
    await dead.wait_for(timeout=15_000)
    flag.touch()
    await dead.locator("button.requeue").click()
    await wait_row(page, tid, "completed", 15)
    await dead.wait_for(state="detached", timeout=15_000)


async def test_api_restart_disconnects_reconnects_and_catches_up(page: Any, stack: Cluster) -> None:
    assert stack.api is not None
    _, tid, _ = await stack.submit({"type": "sleep", "payload": {"seconds": 2}})
    assert tid
    await wait_row(page, tid, "started")
    stack.api.signal(signal.SIGTERM)
    assert await stack.api.wait(20) == 0
    await page.wait_for_selector("#conn:not([data-state=live])", timeout=10_000)
    # While the API is away the worker finishes the task: nobody relays that update.
    await stack.wait_all([tid], timeout=30)
    assert await row(page, tid).get_attribute("data-status") == "started"
    stack.api = Proc("api", stack.config, stack.workdir / "api-again.log")
    stack.all.append(stack.api)
    await page.wait_for_selector("#conn[data-state=live]", timeout=30_000)
    await wait_row(page, tid, "completed")  # caught up after reconnecting


async def test_worker_greyed_out_then_dropped_after_its_heartbeats_stop(page: Any, stack: Cluster) -> None:
    async def listed() -> dict[int, dict[str, Any]]:
        async with stack.session.get(f"{stack.base}/api/workers") as resp:
            assert resp.status == 200, await resp.text()
            return {int(w["pid"]): w for w in (await resp.json())["items"]}

    victim, survivor = stack.workers
    both = await wait_for(
        lambda: _when(listed(), lambda ws: {victim.pid, survivor.pid} <= set(ws)), 10, "both workers listed"
    )
    gone_id, live_id = str(both[victim.pid]["id"]), str(both[survivor.pid]["id"])
    victim_row = page.locator(f'#worker-rows tr[data-worker="{gone_id}"]')
    survivor_row = page.locator(f'#worker-rows tr[data-worker="{live_id}"]')
    await victim_row.wait_for(timeout=10_000)
    await survivor_row.wait_for(timeout=10_000)
    assert "gone" not in (await victim_row.get_attribute("class") or "")

    victim.signal(signal.SIGKILL)
    assert await victim.wait(10) == -signal.SIGKILL
    # Its heartbeat lives three intervals (1.5 s): then GET /api/workers leaves it out.
    await wait_for(lambda: _when(listed(), lambda ws: victim.pid not in ws), 10, "the killed worker unlisted")

    # The page greys it out (class "gone", the "gone" label shown, its cells faded) and keeps the other.
    greyed = page.locator(f'#worker-rows tr.gone[data-worker="{gone_id}"]')
    await greyed.wait_for(timeout=10_000)
    greyed_at = time.monotonic()
    await greyed.locator(".gone-label").wait_for(state="visible", timeout=5_000)
    assert float(await greyed.locator("td.pid").evaluate("td => getComputedStyle(td).opacity")) < 1
    assert await greyed.locator("td.pid").text_content() == str(victim.pid)
    assert "gone" not in (await survivor_row.get_attribute("class") or "")
    assert "1 gone" in (await page.locator("#worker-count").text_content() or "")

    # WORKER_GONE_KEEP later it is dropped; the live worker stays.
    keep = worker_gone_keep_ms() / 1000
    await victim_row.wait_for(state="detached", timeout=(keep + 15) * 1000)
    kept = time.monotonic() - greyed_at
    assert kept >= keep - 1, f"dropped {kept:.1f} s after it was greyed out, expected {keep:g} s"
    assert "gone" not in (await survivor_row.get_attribute("class") or "")
    assert "gone" not in (await page.locator("#worker-count").text_content() or "")
    assert set(await listed()) == {survivor.pid}


async def _when(value: Any, test: Any) -> Any:
    """``await value`` if ``test`` holds for it, else None (for wait_for)."""
    got = await value
    return got if test(got) else None


@pytest.mark.builtin_only
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # what `make run` shows
async def test_screenshot_with_every_state(page: Any, stack: Cluster, tmp_path: Path) -> None:
    bodies = [
        {"type": "reverse", "payload": {"text": "Hello, asyncnode"}},
        {"type": "sentiment", "payload": {"text": "This dashboard is great!"}},
        {"type": "noop"},
        {"type": "email", "payload": {"to": "ops@example.com", "subject": "Report", "body": "All good."}},
        {"type": "sleep", "payload": {"seconds": 5}, "timeout": 0.2},  # over its time limit: fails
        {"type": "sentiment", "payload": {"text": "The queue was slow and I hated waiting."}},
        {"type": "sleep", "payload": {"seconds": 5}, "timeout": 0.2},
        {"type": "sleep", "payload": {"seconds": 8}},
        {"type": "sleep", "payload": {"seconds": 8}},
        {"type": "sleep", "payload": {"seconds": 8}},
        {"type": "noop", "delay": 3600},  # scheduled, counting down
    ]
    for body in bodies:
        assert (await stack.submit(body))[0] == 202
    await page.locator("tbody#dlq-rows tr[data-id]").nth(1).wait_for(timeout=20_000)
    await page.locator("tbody#task-rows tr[data-status=started] progress").first.wait_for(timeout=20_000)
    await page.locator("tbody#task-rows tr[data-status=pending]").first.wait_for(timeout=20_000)
    await page.locator("tbody#task-rows tr[data-status=scheduled]").first.wait_for(timeout=20_000)
    target = ROOT / SCREENSHOT if SCREENSHOT else tmp_path / "dashboard.png"
    written_after = time.time()
    await page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_mtime >= written_after - 1 and target.stat().st_size > 10_000

    # And a picture of each operator's view beside it: a search with the bulk bar, the dead letters grouped by
    # error, a dead letter's payload being edited.
    def beside(name: str) -> Path:
        return target.with_name(f"{target.stem}-{name}.png")

    await page.fill("#task-search", "seconds")  # the sleep tasks' payloads
    await page.locator("#task-count").filter(has_text="matching").wait_for(timeout=10_000)
    await page.locator("#task-rows input.select-task").first.check()
    await page.locator("#bulk-count").filter(has_text="1 selected").wait_for(timeout=5_000)
    await page.locator("#tasks").screenshot(path=str(beside("search")))
    await page.fill("#task-search", "")
    await page.click("#dlq-groups-box summary")
    await page.locator("#dlq-group-rows > tr").first.wait_for(timeout=10_000)
    await page.locator("#dlq").screenshot(path=str(beside("dead-letters")))
    await page.locator("#dlq-rows button.edit-requeue").first.click()
    await page.locator("#dlq-edit").wait_for(state="visible", timeout=5_000)
    await page.locator("#dlq-edit").screenshot(path=str(beside("edit")))
    await page.click("#dlq-edit-cancel")
    for name in ("search", "dead-letters", "edit"):
        assert beside(name).stat().st_mtime >= written_after - 1 and beside(name).stat().st_size > 5_000, name
