"""GET /api/docs in Chromium: the page asks for the token, then lists every documented endpoint and task type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import asyncnode
from tests.conftest import Proc, cleanup, wait_healthy, write_config

TOKEN = "docs-operator-token"
#: The embedded backend is enough: the page reads a document that does not depend on the backend.
pytestmark = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


async def test_the_docs_page_asks_for_the_token_then_lists_every_endpoint(
    browser: Any, backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    path = write_config(tmp_path / "config.toml", tag, backend=backend, api={"token": TOKEN})
    cfg = asyncnode.Config.from_toml(path, env={})
    asyncnode.load_handlers(cfg)  # the types the API's document lists
    base = f"http://127.0.0.1:{cfg.api.port}"
    try:
        await wait_healthy(base, procs("api", path))
        page = await (await browser.new_context()).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(base + "/api/docs", timeout=15_000)
        await page.locator("#docs-token-input").wait_for(state="visible", timeout=10_000)
        await page.fill("#docs-token-input", TOKEN)
        await page.click("#docs-token button")
        await page.locator(".docs-op").first.wait_for(timeout=10_000)
        shown = await page.locator(".docs-op h3").all_inner_texts()
        doc = asyncnode.openapi_document(cfg)
        expected = {f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops}
        assert {" ".join(text.split()) for text in shown} == expected
        types = await page.locator(".docs-type h3").all_inner_texts()
        assert sorted(types) == sorted(asyncnode.REGISTRY)
        assert errors == []
    finally:
        await cleanup(tag)
