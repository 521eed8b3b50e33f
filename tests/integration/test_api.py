"""The API on both backends: submission, reads, bad input, WebSocket relay."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import db_rows, is_embedded, rabbitmq_only, stored_keys, wait_for

Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(asyncnode.make_app(cfg))


async def ready_messages(cfg: asyncnode.Config) -> list[dict[str, Any]]:
    """Peek at every message in the work queue; [] when the queue does not exist yet.

    Messages are fetched without acknowledging them: closing the channel returns them.
    Embedded: the work queue's rows in the file (every row there is committed, so persistent).
    """
    if is_embedded(cfg):
        rows = await db_rows(cfg, "SELECT body FROM messages WHERE queue = ? ORDER BY id", cfg.broker.queue)
        return [{"body": json.loads(body), "persistent": True} for (body,) in rows]
    connection = await aio_pika.connect(cfg.broker.url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(cfg.broker.queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return []
        bodies = []
        while (message := await queue.get(fail=False, no_ack=False)) is not None:
            bodies.append({"body": json.loads(message.body), "persistent": message.delivery_mode == 2})
        return bodies


def post(client: Client, body: Any, **kwargs: Any) -> Any:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    if isinstance(data, bytes) and len(data) > 1024 * 1024:
        data = io.BytesIO(data)  # aiohttp warns about large raw bodies
    headers = kwargs.pop("headers", {"Content-Type": "application/json"})
    return client.post("/api/tasks", data=data, headers=headers, **kwargs)


@rabbitmq_only  # Redis pub/sub and a RabbitMQ peek; test_embedded.py reads the file instead
async def test_submit_records_publishes_and_queues_persistently(client: Client, cfg: asyncnode.Config) -> None:
    sub = aioredis.from_url(cfg.redis.url, decode_responses=True)
    pubsub = sub.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(cfg.redis.channel)
    try:
        resp = await post(client, {"type": "reverse", "payload": {"text": "hello"}})
        assert resp.status == 202
        body = await resp.json()
        assert body["status"] == "pending"
        tid = body["id"]
        assert resp.headers["Location"] == f"/api/tasks/{tid}"

        async with asyncio.timeout(5):
            while (update := await pubsub.get_message(timeout=1)) is None:
                pass  # the subscribe confirmation reads as None
        assert json.loads(update["data"]) | {"ts": 0} == {
            "id": tid,
            "type": "reverse",
            "status": "pending",
            "ts": 0,
            "attempts": 0,
            "seq": 1,
        }
        stored = await sub.hgetall(cfg.redis.key_prefix + tid)
        assert stored["status"] == "pending" and stored["type"] == "reverse"
        assert json.loads(stored["payload"]) == {"text": "hello"} and float(stored["created_at"]) > 0
    finally:
        await pubsub.aclose()
        await sub.aclose()

    queued = await ready_messages(cfg)
    assert queued == [{"body": {"id": tid, "type": "reverse", "payload": {"text": "hello"}}, "persistent": True}]

    resp = await client.get(f"/api/tasks/{tid}")
    assert resp.status == 200
    task = await resp.json()
    assert {k: task[k] for k in ("id", "type", "status", "payload", "attempts", "result", "error")} == {
        "id": tid,
        "type": "reverse",
        "status": "pending",
        "payload": {"text": "hello"},
        "attempts": 0,
        "result": None,
        "error": None,
    }
    assert set(task) >= {"created_at", "started_at", "finished_at", "worker", "progress"}


async def test_list_is_newest_first_and_limited(client: Client) -> None:
    ids = []
    for i in range(3):
        resp = await post(client, {"type": "reverse", "payload": {"text": str(i)}})
        ids.append((await resp.json())["id"])
    resp = await client.get("/api/tasks?limit=2")
    assert resp.status == 200
    assert [t["id"] for t in (await resp.json())["items"]] == ids[:0:-1]
    resp = await client.get("/api/tasks")
    assert [t["id"] for t in (await resp.json())["items"]] == ids[::-1]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "ten", ""])
async def test_list_rejects_bad_limit(client: Client, limit: str) -> None:
    resp = await client.get(f"/api/tasks?limit={limit}")
    assert resp.status == 400
    assert "limit" in (await resp.json())["error"]


async def test_unknown_task_is_404_json(client: Client) -> None:
    resp = await client.get("/api/tasks/00000000-0000-0000-0000-000000000000")
    assert resp.status == 404
    assert "no task" in (await resp.json())["error"]
    resp = await client.get("/api/nothing-here")
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_task_types_describe_forms(client: Client) -> None:
    resp = await client.get("/api/task-types")
    assert resp.status == 200
    items = {t["name"]: t for t in (await resp.json())["items"]}
    assert set(items) == {"email", "noop", "reverse", "sentiment", "sleep"}
    assert [f["name"] for f in items["email"]["fields"]] == ["to", "subject", "body"]
    assert items["noop"]["fields"] == []
    assert all(t["description"] for t in items.values())


BAD_INPUT = [
    pytest.param(b"{not json", "application/json", 400, "not valid JSON", id="not-json"),
    pytest.param(b"\xff\xfe", "application/json", 400, "not valid JSON", id="not-utf8"),
    pytest.param(b"[1, 2]", "application/json", 400, "must be a JSON object", id="array"),
    pytest.param(b'"reverse"', "application/json", 400, "must be a JSON object", id="string"),
    pytest.param(b"{}", "application/json", 400, "'type' is required", id="no-type"),
    pytest.param(b'{"type": 7}', "application/json", 400, "must be a string", id="type-not-string"),
    pytest.param(b'{"type": "nope"}', "application/json", 400, "known: email, noop, reverse", id="unknown-type"),
    pytest.param(
        b'{"type": "reverse", "payload": {}}', "application/json", 400, "payload.text is required", id="missing-field"
    ),
    pytest.param(
        b'{"type": "reverse", "payload": {"text": 1}}', "application/json", 400, "payload.text must be", id="wrong-type"
    ),
    pytest.param(
        json.dumps({"type": "reverse", "payload": {"text": "x" * 10001}}).encode(),
        "application/json",
        400,
        "payload.text is too long",
        id="text-too-long",
    ),
    pytest.param(
        b'{"type": "email", "payload": {"to": "a@b.c", "subject": "x\\r\\nBcc: e@f.g", "body": "b"}}',
        "application/json",
        400,
        "line breaks",
        id="header-injection",
    ),
    pytest.param(
        b'{"type": "reverse", "payload": {"text": "a"}}', "text/plain", 415, "application/json", id="wrong-content-type"
    ),
    pytest.param(b"x" * (1024 * 1024 + 1), "application/json", 413, "too large", id="too-large"),
]


@pytest.mark.parametrize(("data", "ctype", "status", "message"), BAD_INPUT)
async def test_bad_input_is_rejected_and_changes_nothing(
    client: Client, cfg: asyncnode.Config, data: bytes, ctype: str, status: int, message: str
) -> None:
    resp = await post(client, data, headers={"Content-Type": ctype})
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert message in (await resp.json())["error"]
    assert await stored_keys(cfg) == []
    assert await ready_messages(cfg) == []


async def test_field_errors_name_the_field(client: Client) -> None:
    resp = await post(client, {"type": "sleep", "payload": {"seconds": 1000}})
    assert resp.status == 400
    assert await resp.json() == {"error": "payload.seconds must be at most 300", "field": "seconds"}


async def test_page_renders_a_form_per_type_with_security_headers(client: Client) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    html = await resp.text()
    for name in ("email", "noop", "reverse", "sentiment", "sleep"):
        assert f'data-type="{name}"' in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    js = await client.get("/static/app.js")
    assert js.status == 200 and "WebSocket" in await js.text()


@rabbitmq_only  # an unreachable broker; the embedded file has no outage of its own
async def test_broker_down_answers_503_and_records_it(
    cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    from tests.conftest import free_port

    broker = asyncnode.BrokerConfig(
        url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        queue=cfg.broker.queue,
        connect_timeout=1.0,
        publish_timeout=2.0,
    )
    down = asyncnode.Config(path=cfg.path, broker=broker, redis=cfg.redis, api=cfg.api)
    client = await aiohttp_client(asyncnode.make_app(down))
    async with asyncio.timeout(5):
        resp = await post(client, {"type": "reverse", "payload": {"text": "a"}})
    assert resp.status == 503
    body = await resp.json()
    assert "RabbitMQ" in body["error"]
    task = await (await client.get(f"/api/tasks/{body['id']}")).json()
    assert task["status"] == "rejected" and "RabbitMQ" in task["error"]


async def recv_updates(ws: aiohttp.ClientWebSocketResponse, want: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Read frames (an object or an array of objects) until an update matches ``want``."""
    while True:
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        for update in data if isinstance(data, list) else [data]:
            if "id" in update and want(update):
                return update


async def test_websocket_relays_updates_and_survives_a_garbage_client(client: Client) -> None:
    good = await client.ws_connect("/ws")
    rude = await client.ws_connect("/ws")
    await rude.send_str("this is not json")
    await rude.send_bytes(b"\x00\x01")
    await rude.send_str(json.dumps({"subscribe": 42}))
    big = await client.ws_connect("/ws")
    await big.send_str("x" * (asyncnode.WS_MAX_MESSAGE + 1))
    closed = await big.receive(timeout=5)
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)

    async def relayed() -> bool:
        # The relay subscribes in the background; submit until the first update comes through.
        resp = await post(client, {"type": "reverse", "payload": {"text": "<script>alert('x')</script>"}})
        tid = (await resp.json())["id"]
        try:
            async with asyncio.timeout(0.5):
                update = await recv_updates(good, lambda u: u["id"] == tid)
        except TimeoutError:
            return False
        return update["status"] == "pending" and update["type"] == "reverse"

    assert await wait_for(relayed, timeout=10, what="an update relayed to the WebSocket")
    resp = await post(client, {"type": "noop"})
    tid = (await resp.json())["id"]
    async with asyncio.timeout(5):
        assert (await recv_updates(rude, lambda u: u["id"] == tid))["status"] == "pending"
    await good.close()
    await rude.close()
