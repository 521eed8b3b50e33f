"""Dead letters grouped by error, edit and requeue, and what a task's details tell an operator, in Chromium
(Playwright) against a real API process and one worker, on both backends.

Tasks that failed for good with one error are one group, requeued whole from the page; another group is
discarded whole after a confirmation; a dead letter's payload is edited in a dialog and requeued with it, after
the page refused what is not JSON and showed the server's refusal of a payload that is not valid. A failed
task's details (opened by its address) show its dead letter's traceback and its trace id; a started task whose
worker died says that its worker is gone.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_for, wait_healthy, write_config

TOKEN = "operator-dlq-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = [pytest.mark.timeout(120)]


class Stack:
    def __init__(self, base: str, session: aiohttp.ClientSession, folder: Path, worker: Proc) -> None:
        self.base, self.session, self.folder, self.worker = base, session, folder, worker

    async def submit(self, body: dict[str, Any], **headers: str) -> str:
        async with self.session.post(f"{self.base}/api/tasks", json=body, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
            return str((await resp.json())["id"])

    async def status(self, tid: str) -> str | None:
        async with self.session.get(f"{self.base}/api/tasks/{tid}") as resp:
            return str((await resp.json())["status"]) if resp.status == 200 else None

    async def letters(self) -> set[str]:
        async with self.session.get(f"{self.base}/api/dlq") as resp:
            return {item["id"] for item in (await resp.json())["items"]}

    async def wait_status(self, ids: list[str], status: str) -> None:
        async def reached() -> bool:
            return all([await self.status(tid) == status for tid in ids])

        await wait_for(reached, 30, f"{len(ids)} task(s) {status}")


@pytest.fixture
async def stack(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Stack]:
    """A real API and one worker with the test handlers; a task that fails goes to the DLQ at once."""
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        api={"token": TOKEN},
        broker={"retry_delays": [0.2], "max_retries": 0},
        handlers={"modules": ["handlers", "tests.fault_handlers"]},
        worker={"heartbeat": 0.5},  # a worker that dies is gone from the list in 1.5 s
    )
    cfg = asyncnode.Config.from_toml(config, env={})
    started = [procs("api", config), procs("worker", config)]
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, started[0])
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield Stack(base, session, tmp_path, started[1])
    for proc in started:
        proc.stop()
    await cleanup(tag)


async def test_a_group_of_dead_letters_is_requeued_whole_and_another_discarded_whole(
    browser: Any, stack: Stack
) -> None:
    from playwright.async_api import expect

    flags = [stack.folder / f"flag-{i}" for i in range(3)]
    waiting = [await stack.submit({"type": "fail_until", "payload": {"flag": str(f)}}) for f in flags]
    doomed = await stack.submit({"type": "fail", "payload": {"permanent": True}})
    await stack.wait_status([*waiting, doomed], "failed")

    page, errors = await sign_in(browser, stack.base, TOKEN)
    await page.click("#dlq-groups-box summary")
    rows = page.locator("#dlq-group-rows > tr")
    await expect(rows).to_have_count(2, timeout=10_000)
    flaky = page.locator('#dlq-group-rows > tr[data-count="3"]')
    await expect(flaky.locator("td.pattern")).to_have_text("RuntimeError: flag not set yet")
    await expect(flaky.locator("td.types")).to_have_text("fail_until")

    # A group opens onto its letters in the table above, and closes again.
    letters = page.locator("#dlq-rows > tr:visible")
    await expect(letters).to_have_count(4, timeout=10_000)
    await flaky.locator("button.show-group").click()
    await expect(letters).to_have_count(3)
    assert set(await letters.evaluate_all("rows => rows.map(r => r.dataset.id)")) == set(waiting)
    await flaky.locator("button.show-group").click()
    await expect(letters).to_have_count(4)

    for flag in flags:
        flag.touch()
    await flaky.locator("button.requeue-group").click()
    await expect(page.locator("#dlq-status")).to_have_text(
        "Requeued 3 dead letters of RuntimeError: flag not set yet.", timeout=10_000
    )
    await stack.wait_status(waiting, "completed")
    await expect(rows).to_have_count(1, timeout=10_000)

    other = rows.first
    discard = other.locator("button.discard-group")
    await discard.click()  # a first click only asks
    await expect(discard).to_have_text("Confirm discard of 1")
    assert await stack.letters() == {doomed}
    await discard.click()
    await expect(page.locator("#dlq-status")).to_have_text(re.compile(r"^Discarded 1 dead letter of "), timeout=10_000)
    await expect(page.locator("#dlq-groups-empty")).to_be_visible(timeout=10_000)
    assert await stack.letters() == set()
    assert await stack.status(doomed) == "failed"
    assert errors == []


async def test_a_dead_letters_payload_is_edited_and_requeued_once_the_server_takes_it(
    browser: Any, stack: Stack
) -> None:
    from playwright.async_api import expect

    missing = stack.folder / "never-made"
    tid = await stack.submit({"type": "fail_until", "payload": {"flag": str(missing)}})
    await stack.wait_status([tid], "failed")
    page, errors = await sign_in(browser, stack.base, TOKEN)
    letter = page.locator(f'#dlq-rows tr[data-id="{tid}"]')
    await letter.locator("button.edit-requeue").click()
    dialog = page.locator("#dlq-edit")
    await expect(dialog).to_be_visible()
    payload = page.locator("#dlq-edit-payload")
    assert json.loads(await payload.input_value()) == {"flag": str(missing)}

    await payload.fill("{not json")
    await page.click("#dlq-edit-submit")
    await expect(page.locator("#dlq-edit-error")).to_contain_text("Not valid JSON")
    await payload.fill('{"flag": 7}')
    await page.click("#dlq-edit-submit")
    await expect(page.locator("#dlq-edit-error")).to_contain_text("flag", timeout=10_000)
    await expect(dialog).to_be_visible()
    assert await stack.letters() == {tid}  # refused: the letter stays

    made = stack.folder / "made"
    made.touch()
    await payload.fill(json.dumps({"flag": str(made)}))
    await page.click("#dlq-edit-submit")
    await expect(dialog).to_be_hidden(timeout=10_000)
    await expect(page.locator("#dlq-status")).to_have_text(f"Requeued {tid[:8]} with the edited payload.")
    await stack.wait_status([tid], "completed")
    async with stack.session.get(f"{stack.base}/api/tasks/{tid}") as resp:
        assert (await resp.json())["payload"] == {"flag": str(made)}
    await expect(letter).to_have_count(0, timeout=10_000)
    assert errors == []


async def test_a_failed_tasks_details_show_its_traceback_and_trace_id(browser: Any, stack: Stack) -> None:
    from playwright.async_api import expect

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    tid = await stack.submit({"type": "fail", "payload": {}}, traceparent=f"00-{trace}-00f067aa0ba902b7-01")
    await stack.wait_status([tid], "failed")
    page, errors = await sign_in(browser, stack.base, TOKEN)
    await expect(page.locator(f'#dlq-rows tr[data-id="{tid}"]')).to_have_count(1, timeout=10_000)
    await page.goto(f"{stack.base}/#/tasks/{tid}")
    await expect(page.locator("#task-details")).to_be_visible(timeout=10_000)
    await expect(page.locator("#detail-traceback")).to_contain_text("Traceback (most recent call last)")
    await expect(page.locator("#detail-traceback")).to_contain_text("RuntimeError")
    await expect(page.locator("#detail-trace")).to_have_text(trace)
    await expect(page.locator("#detail-schedule")).to_be_hidden()  # no schedule fired it
    assert errors == []


async def test_a_started_tasks_details_say_when_its_worker_is_gone(browser: Any, stack: Stack) -> None:
    from playwright.async_api import expect

    tid = await stack.submit({"type": "sleep", "payload": {"seconds": 60}})
    await stack.wait_status([tid], "started")
    page, errors = await sign_in(browser, stack.base, TOKEN)
    await page.goto(f"{stack.base}/#/tasks/{tid}")
    worker = page.locator("#detail-worker")
    await expect(worker).to_have_text(re.compile(r"^[^ ]+:\d+$"), timeout=10_000)  # alive: just its name
    stack.worker.signal(signal.SIGKILL)
    await expect(worker).to_contain_text("(gone: no heartbeat since", timeout=15_000)
    assert await stack.status(tid) == "started"  # until its message is redelivered to a worker
    assert errors == []


async def test_the_bulk_bar_requeues_and_discards_the_dead_letters_of_ticked_rows(browser: Any, stack: Stack) -> None:
    from playwright.async_api import expect

    made = stack.folder / "made"
    ids = [await stack.submit({"type": "fail_until", "payload": {"flag": str(made)}}) for _ in range(3)]
    await stack.wait_status(ids, "failed")
    page, errors = await sign_in(browser, stack.base, TOKEN)
    await expect(page.locator("#dlq-rows > tr")).to_have_count(3, timeout=10_000)
    made.touch()
    for tid in ids[:2]:
        await page.locator(f'#task-rows tr[data-id="{tid}"] input.select-task').check()
    await page.click("#bulk-requeue")
    await expect(page.locator("#bulk-question")).to_have_text("Requeue 2 tasks (their dead letters)?")
    await page.click("#bulk-confirm")
    await expect(page.locator("#bulk-status")).to_have_text("Requeued 2 dead letters; skipped 0.", timeout=10_000)
    await stack.wait_status(ids[:2], "completed")
    await page.locator(f'#task-rows tr[data-id="{ids[2]}"] input.select-task').check()
    await page.click("#bulk-discard")
    await page.click("#bulk-confirm")
    await expect(page.locator("#bulk-status")).to_have_text("Discarded 1 dead letters; skipped 0.", timeout=10_000)
    assert await stack.letters() == set()
    assert await stack.status(ids[2]) == "failed"
    await expect(page.locator("#dlq-rows > tr")).to_have_count(0, timeout=10_000)
    assert errors == []
