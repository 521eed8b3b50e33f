"""The dashboard's frame budget under load, in Chromium (Playwright) against a real API process and worker.

10,000 tasks are queued before the page opens; then a worker runs them at 300 starts per second (the queue's
rate), so that at least 500 updates a second (started, completed) reach the page over its WebSocket for the ten
seconds measured (the time the worker takes to run 3,000 more). Meanwhile the page must keep drawing: its
frames (requestAnimationFrame) come at least 15 times a second at the 95th percentile, and no task of its main
thread runs for more than 250 ms (the Long Tasks API). The figures are printed, whatever the outcome; the
bounds leave room for the API, the worker and Chromium sharing two cores.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_for, wait_healthy, write_config

TOKEN = "operator-load-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASKS = 10_000
RATE = 300  #: starts a second: two updates each (above 500 updates a second, whatever the admission costs)
SECONDS = 10.0
#: The budget: the 95th percentile of the gaps between frames, and the longest task of the main thread (ms).
FRAME_P95_MS = 67.0
LONGEST_TASK_MS = 250.0

pytestmark = [pytest.mark.timeout(180)]

#: Installed in the page: gaps between animation frames, and the durations of long tasks, until stopped.
MEASURE = """() => {
  window.__load = { gaps: [], long: [], stop: false };
  let last = performance.now();
  const frame = (now) => {
    window.__load.gaps.push(now - last);
    last = now;
    if (!window.__load.stop) requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.__load.long.push(e.duration);
  }).observe({ type: 'longtask', buffered: false });
}"""


@pytest.fixture
async def stack(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[Any]:
    """A real API with TASKS noop tasks queued, the queue's rate RATE/s, and (started later) a worker."""
    config = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        api={"token": TOKEN},
        queues={"default": {"rate": f"{RATE}/s"}},
        tasks={"max_recent": TASKS},
    )
    cfg = asyncnode.Config.from_toml(config, env={})
    api = procs("api", config)
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, api)
    async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(TASKS // 500):
            async with session.post(f"{base}/api/tasks", json=[{"type": "noop"}] * 500) as resp:
                assert resp.status == 202, await resp.text()
        yield base, session, lambda: procs("worker", config)
    api.stop()
    await cleanup(tag)


async def completed(session: aiohttp.ClientSession, base: str) -> int:
    async with session.get(f"{base}/api/tasks", params={"status": "completed", "limit": "1"}) as resp:
        return int((await resp.json())["total"])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def test_the_page_keeps_its_frame_budget_while_500_updates_a_second_arrive(browser: Any, stack: Any) -> None:
    from playwright.async_api import expect

    base, session, start_worker = stack
    page, errors = await sign_in(browser, base, TOKEN)
    await expect(page.locator("#task-rows > tr")).to_have_count(200, timeout=15_000)
    start_worker()

    async def flowing() -> bool:
        return await completed(session, base) >= RATE  # a second's worth: the worker runs at its rate

    await wait_for(flowing, 30, "the worker's first second of tasks")
    before, started = await completed(session, base), time.monotonic()
    await page.evaluate(MEASURE)

    async def measured() -> bool:  # the window: SECONDS of the worker's rate
        return await completed(session, base) >= before + RATE * SECONDS

    await wait_for(measured, SECONDS * 4, f"{RATE * SECONDS:.0f} more tasks completed")
    figures = await page.evaluate("() => { window.__load.stop = true; return window.__load; }")
    after, elapsed = await completed(session, base), time.monotonic() - started
    updates_per_s = 2 * (after - before) / elapsed
    gaps, longest = figures["gaps"][1:], max(figures["long"], default=0.0)
    p95 = percentile(gaps, 0.95)
    print(
        f"\n{updates_per_s:.0f} updates/s for {elapsed:.1f} s: {len(gaps)} frames, gap p50 "
        f"{percentile(gaps, 0.5):.1f} ms, p95 {p95:.1f} ms, max {max(gaps):.1f} ms; "
        f"{len(figures['long'])} long tasks, longest {longest:.0f} ms"
    )
    assert updates_per_s >= 500, f"the load did not happen: {updates_per_s:.0f} updates/s"
    assert p95 <= FRAME_P95_MS, f"frames p95 {p95:.1f} ms"
    assert longest <= LONGEST_TASK_MS, f"a task of {longest:.0f} ms"
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    assert errors == []
