"""The OpenAPI document: valid 3.1, the same routes as the router, each task type's payload schema from its
fields, the people's page; and schemathesis generating requests from it against a live API on both backends."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

import asyncnode
from tests.conftest import Proc, cleanup, wait_healthy, write_config

Client: TypeAlias = TestClient[web.Request, web.Application]
TOKEN = "openapi-operator-token"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
#: schemathesis's run, bounded: it is killed after this long.
FUZZ_TIMEOUT = 240


@pytest.fixture
async def app_client(tag: str, tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]) -> Any:
    path = write_config(tmp_path / "config.toml", tag, backend="embedded", api={"token": TOKEN})
    cfg = asyncnode.Config.from_toml(path, env={})
    client = await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)
    yield client, cfg
    await cleanup(tag)


async def document(client: Client) -> dict[str, Any]:
    async with client.get("/api/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200
        return dict(await r.json())


async def test_the_document_is_valid_openapi_3_1(app_client: Any) -> None:
    doc = await document(app_client[0])
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any error


async def test_the_document_needs_the_token_and_the_page_does_not(app_client: Any) -> None:
    client = app_client[0]
    async with client.get("/api/openapi.json") as r:
        assert r.status == 401
    async with client.get("/api/docs") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert '<script type="module" src="/static/docs.js">' in await r.text()


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route but the static files; {action:a|b} expands to one path each."""
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter") or ""
        if "prefix" in info:  # the static files
            continue
        parts = [path]
        if "{action}" in path:  # the choices are in the route's regular expression
            choices = re.search(r"\(\?P<action>([^)]+)\)", info["pattern"].pattern)
            assert choices is not None, info
            parts = [path.replace("{action}", c) for c in choices.group(1).split("|")]
        found |= {(route.method.lower(), p) for p in parts}
    return found


async def test_every_route_is_documented_and_every_documented_route_exists(app_client: Any) -> None:
    client = app_client[0]
    doc = await document(client)
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes_of(client.server.app)


async def test_each_task_type_has_its_declared_fields_under_a_discriminator(app_client: Any) -> None:
    client, cfg = app_client
    doc = await document(client)
    schemas = doc["components"]["schemas"]
    submission = schemas["Submission"]
    assert submission["discriminator"]["propertyName"] == "type"
    refs = {ref["$ref"].rsplit("/", 1)[1] for ref in submission["oneOf"]}
    by_type = {schemas[name]["properties"]["type"]["const"]: schemas[name] for name in refs}
    assert set(by_type) == set(asyncnode.REGISTRY)
    assert set(submission["discriminator"]["mapping"]) == set(asyncnode.REGISTRY)
    for name, ttype in asyncnode.REGISTRY.items():
        payload = by_type[name]["properties"]["payload"]
        assert {f: s["type"] for f, s in payload["properties"].items()} == {f.name: f.type for f in ttype.fields}
        assert set(payload["required"]) == {f.name for f in ttype.fields if f.required}
        assert payload["additionalProperties"] is False
        for f in ttype.fields:
            if f.type == "string":
                longest = min(f.max_length or cfg.api.max_text, cfg.api.max_text)
                assert payload["properties"][f.name]["maxLength"] == longest
    bulk = doc["paths"]["/api/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
    assert bulk["type"] == "array" and bulk["maxItems"] == cfg.api.max_batch
    items = {r["$ref"].rsplit("/", 1)[1] for r in schemas[bulk["items"]["$ref"].rsplit("/", 1)[1]]["oneOf"]}
    assert all("idempotency_key" in schemas[n]["properties"] for n in items)  # a bulk item's own key
    assert not any("idempotency_key" in schemas[n]["properties"] for n in refs)  # a single one's is a header


async def test_schemathesis_finds_no_answer_that_breaks_the_document(backend: str, tag: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", tag, backend=backend, api={"token": TOKEN})
    cfg = asyncnode.Config.from_toml(path, env={})
    base = f"http://127.0.0.1:{cfg.api.port}"
    api = Proc("api", path, tmp_path / "api.log")
    try:
        await wait_healthy(base, api)
        checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
        checks += "response_headers_conformance"
        argv = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/api/openapi.json"]
        argv += ["-H", f"Authorization: Bearer {TOKEN}", "--checks", checks, "--exclude-path", "/ws"]
        argv += ["--max-examples", "25", "--seed", "1", "--no-color", "--request-timeout", "20"]
        run = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=FUZZ_TIMEOUT, cwd=tmp_path
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + api.log()[-3000:]
        assert "passed" in run.stdout and " failed" not in run.stdout.split("SUMMARY")[-1], run.stdout[-3000:]
    finally:
        api.stop()
        await cleanup(tag)
