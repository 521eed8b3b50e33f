"""Token, WebSocket origin check, catch-up snapshot and health endpoints, on both backends."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import free_port, rabbitmq_only, stored_keys

Client = TestClient  # type: ignore[type-arg]
TOKEN = "s3cret-token"
#: Every request of the test clients, WebSocket handshakes included.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
async def secured(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    api = dataclasses.replace(cfg.api, token=TOKEN)
    return await aiohttp_client(asyncnode.make_app(dataclasses.replace(cfg, api=api)), timeout=HTTP_TIMEOUT)


@pytest.fixture
async def client(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)


BODY = {"type": "reverse", "payload": {"text": "x"}}


async def test_token_guards_the_api_and_the_websocket(secured: Client, cfg: asyncnode.Config) -> None:
    for method, path in (
        ("GET", "/api/tasks"),
        ("POST", "/api/tasks"),
        ("GET", "/api/dlq"),
        ("GET", "/api/workers"),
        ("GET", "/api/task-types"),
        ("GET", "/api/tasks/abc"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            resp = await secured.request(method, path, json=BODY, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert "token" in (await resp.json())["error"]
    assert await stored_keys(cfg) == []  # nothing written by refused requests

    ok = await secured.post("/api/tasks", json=BODY, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 202
    for path in ("/", "/healthz", "/static/app.js"):
        assert (await secured.get(path)).status == 200

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await secured.ws_connect("/ws")
    assert refused.value.status == 401
    ws = await secured.ws_connect(f"/ws?token={TOKEN}")
    await ws.close()


async def test_websocket_origin_must_be_the_page_or_allowed(
    cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    api = dataclasses.replace(cfg.api, allowed_origins=("https://ops.example.com",))
    client = await aiohttp_client(asyncnode.make_app(dataclasses.replace(cfg, api=api)), timeout=HTTP_TIMEOUT)
    own = f"http://{client.host}:{client.port}"
    for origin in (own, "https://ops.example.com"):
        ws = await client.ws_connect("/ws", origin=origin)
        await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", origin="http://evil.example")
    assert refused.value.status == 403
    ws = await client.ws_connect("/ws")  # no Origin: not a browser, allowed
    await ws.close()


async def test_new_websocket_client_gets_the_current_state_first(client: Client) -> None:
    ids = []
    for text in ("one", "two"):
        resp = await client.post("/api/tasks", json={"type": "reverse", "payload": {"text": text}})
        ids.append((await resp.json())["id"])
    ws = await client.ws_connect("/ws")
    msg = await ws.receive(timeout=5)
    data = json.loads(msg.data)
    snapshot = [u for u in (data if isinstance(data, list) else [data]) if "id" in u]
    by_id: dict[str, Any] = {u["id"]: u for u in snapshot}
    assert set(ids) <= set(by_id)
    for tid in ids:
        assert by_id[tid]["status"] == "pending" and by_id[tid]["seq"] == 1 and by_id[tid]["ts"] > 0
    assert [u["id"] for u in snapshot if u["id"] in ids] == ids  # oldest first, like live updates
    await ws.close()


@rabbitmq_only  # unreachable RabbitMQ and Redis URLs
async def test_readyz_names_what_is_down(
    client: Client, cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["rabbitmq"] == "ok"
    broker = dataclasses.replace(cfg.broker, url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    redis = dataclasses.replace(cfg.redis, url=f"redis://127.0.0.1:{free_port()}/0")
    down = await aiohttp_client(
        asyncnode.make_app(dataclasses.replace(cfg, broker=broker, redis=redis)), timeout=HTTP_TIMEOUT
    )
    resp = await down.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["error"] == "redis and rabbitmq unavailable"
    assert body["redis"].startswith("unreachable") and "RabbitMQ" in body["rabbitmq"]
    assert (await down.get("/healthz")).status == 200
    resp = await down.post("/api/tasks", json=BODY)
    assert resp.status == 503 and "Redis" in (await resp.json())["error"]
