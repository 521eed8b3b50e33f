"""The dashboard with each kind of token, in Chromium (Playwright) against a real API process, on both backends.

The read-only token shows everything and offers no action; the operator token offers them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import asyncnode
from tests.conftest import Proc, cleanup, sign_in, wait_healthy, write_config

TOKEN, READ = "operator-browser-s3cret", "reader-browser-s3cret"
DEAD = asyncnode.Envelope("7c2d3e4f-1a2b-4c3d-8e9f-0a1b2c3d4e5f", "reverse", {"text": "dead"})

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
async def api(backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]) -> AsyncIterator[str]:
    """A real API with both tokens and one dead letter; its base URL."""
    config = write_config(tmp_path / "config.toml", tag, backend=backend, api={"token": TOKEN, "read_token": READ})
    cfg = asyncnode.Config.from_toml(config, env={})
    async with asyncnode.backend(cfg, "api") as (queue, _):
        await queue.dead_letter(DEAD, {"x-error": "boom", "x-attempts": 1})
    proc = procs("api", config)
    base = f"http://127.0.0.1:{cfg.api.port}"
    await wait_healthy(base, proc)
    yield base
    await cleanup(tag)


async def open_with(browser: Any, base: str, token: str) -> tuple[Any, list[str]]:
    """A page of the dashboard, given ``token`` in its token dialog, once the dead letter is listed; and the
    errors its scripts raise."""
    page, errors = await sign_in(browser, base, token)
    await page.locator(f'#dlq-rows tr[data-id="{DEAD.id}"]').wait_for(timeout=10_000)
    return page, errors


async def test_the_read_token_sees_everything_and_is_offered_no_action(browser: Any, api: str) -> None:
    page, errors = await open_with(browser, api, READ)
    await page.wait_for_selector('body[data-access="read"]', timeout=10_000)
    await page.locator("#readonly-note").wait_for(state="visible", timeout=5_000)
    dead = page.locator(f'#dlq-rows tr[data-id="{DEAD.id}"]')
    for hidden in (
        page.locator("#submit"),
        page.locator("#dlq-requeue-all"),
        dead.locator("button.requeue"),
        dead.locator("button.discard"),
    ):
        assert not await hidden.is_visible()
    assert await page.locator("#tasks").is_visible() and await page.locator("#dlq").is_visible()
    assert errors == []


async def test_the_operator_token_is_offered_every_action(browser: Any, api: str) -> None:
    page, errors = await open_with(browser, api, TOKEN)
    await page.wait_for_selector('body[data-access="operator"]', timeout=10_000)
    dead = page.locator(f'#dlq-rows tr[data-id="{DEAD.id}"]')
    for shown in (page.locator("#submit"), dead.locator("button.requeue"), dead.locator("button.discard")):
        assert await shown.is_visible()
    assert not await page.locator("#readonly-note").is_visible()
    assert errors == []
