"""The API on both backends: submission, reads, bad input, WebSocket relay."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import (
    database_path,
    db_rows,
    free_port,
    in_ci,
    is_embedded,
    rabbitmq_only,
    stored_keys,
    wait_for,
)

Client = TestClient  # type: ignore[type-arg]

#: Every request of the test clients (a submission waits out the SQLite busy timeout in one test).
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
#: Connecting to, and each answer of, the shared RabbitMQ and Redis.
SERVICE_TIMEOUT = 10.0
#: The embedded variant only.
embedded_only = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


@pytest.fixture
async def client(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)


async def ready_messages(cfg: asyncnode.Config) -> list[dict[str, Any]]:
    """Peek at every message in the work queue; [] when the queue does not exist yet.

    Messages are fetched without acknowledging them: closing the channel returns them.
    Embedded: the work queue's rows in the file (every row there is committed, so persistent).
    """
    if is_embedded(cfg):
        rows = await db_rows(cfg, "SELECT body FROM messages WHERE queue = ? ORDER BY id", cfg.broker.queue)
        return [{"body": json.loads(body), "persistent": True} for (body,) in rows]
    connection = await aio_pika.connect(cfg.broker.url, timeout=SERVICE_TIMEOUT)
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
    sub = aioredis.from_url(
        cfg.redis.url, decode_responses=True, socket_connect_timeout=SERVICE_TIMEOUT, socket_timeout=SERVICE_TIMEOUT
    )
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
            "queue": "default",
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
    created = float(stored["created_at"])  # the envelope carries it, so a lost record can be restored
    body = {"id": tid, "type": "reverse", "payload": {"text": "hello"}, "created_at": created}
    assert queued == [{"body": body, "persistent": True}]

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
    broker = asyncnode.BrokerConfig(
        url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        queue=cfg.broker.queue,
        connect_timeout=1.0,
        publish_timeout=2.0,
    )
    down = asyncnode.Config(path=cfg.path, broker=broker, redis=cfg.redis, api=cfg.api)
    client = await aiohttp_client(asyncnode.make_app(down), timeout=HTTP_TIMEOUT)
    async with asyncio.timeout(5):
        resp = await post(client, {"type": "reverse", "payload": {"text": "a"}})
    assert resp.status == 503
    body = await resp.json()
    assert "RabbitMQ" in body["error"]
    task = await (await client.get(f"/api/tasks/{body['id']}")).json()
    assert task["status"] == "rejected" and "RabbitMQ" in task["error"]


def assert_refused(resp_status: int, body: dict[str, Any], why: str) -> str:
    """A 503 whose JSON error says RabbitMQ refused the task and why; the id of the task it recorded."""
    assert resp_status == 503, body
    assert body["error"].startswith("task not queued: RabbitMQ refused the task") and why in body["error"], body
    assert asyncnode.TASK_ID.fullmatch(body["id"]), body
    return str(body["id"])


async def assert_recorded_rejected(client: Client, tid: str, why: str) -> None:
    """The task's record says rejected, and why, in its status, error and timeline."""
    resp = await client.get(f"/api/tasks/{tid}")
    assert resp.status == 200
    task = await resp.json()
    assert task["status"] == "rejected" and why in task["error"], task
    assert [h["status"] for h in task["history"]] == ["pending", "rejected"]


@rabbitmq_only  # a mandatory publish returned unroutable
async def test_unroutable_task_answers_503_and_records_it_rejected(client: Client, cfg: asyncnode.Config) -> None:
    resp = await post(client, {"type": "noop"})
    assert resp.status == 202  # the API has declared the queues on its publishing channel
    connection = await aio_pika.connect(cfg.broker.url, timeout=SERVICE_TIMEOUT)
    async with connection:
        await (await connection.channel()).queue_delete(cfg.broker.queue)

    resp = await post(client, {"type": "reverse", "payload": {"text": "nowhere"}})
    assert resp.content_type == "application/json"
    tid = assert_refused(resp.status, await resp.json(), "NO_ROUTE")
    await assert_recorded_rejected(client, tid, "NO_ROUTE")


async def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl args...`` on the shared broker (bounded); its output, or a failure."""
    ctl = shutil.which("rabbitmqctl", path=f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin")
    if ctl is None:
        reason = "rabbitmqctl is not installed (needed to set a policy on the test's queue)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    proc = await asyncio.create_subprocess_exec(
        ctl, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"rabbitmqctl {' '.join(args)} did not finish within 60 s") from None
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)} exited with {proc.returncode}: {out.decode()}"
    return out.decode()


#: How many tasks the work queue may hold under the test's max-length policy.
MAX_LENGTH = 2


@pytest.fixture
async def bounded_queue(cfg: asyncnode.Config) -> AsyncIterator[str]:
    """A max-length policy on the shared broker matching exactly this test's work queue, set before the queue
    is declared (the queue itself is declared with reject-publish overflow); cleared afterwards."""
    name = f"{cfg.broker.queue}-max-length"
    pattern = f"^{re.escape(cfg.broker.queue)}$"
    definition = json.dumps({"max-length": MAX_LENGTH})
    await rabbitmqctl("set_policy", "--apply-to", "queues", "--priority", "100", name, pattern, definition)
    try:
        yield name
    finally:
        await rabbitmqctl("clear_policy", name)


@rabbitmq_only  # a publish nacked by a full queue (reject-publish)
async def test_full_queue_answers_503_and_records_it_rejected(
    bounded_queue: str, client: Client, cfg: asyncnode.Config
) -> None:
    accepted: list[str] = []
    for _ in range(MAX_LENGTH + 2):  # fill it: submit until RabbitMQ refuses
        resp = await post(client, {"type": "reverse", "payload": {"text": f"task {len(accepted)}"}})
        if resp.status != 202:
            break
        accepted.append((await resp.json())["id"])
    # A quorum queue turns to rejecting once a publish has taken it past its limit (RabbitMQ 3.10: the
    # third of two); a classic queue at the limit.
    assert MAX_LENGTH <= len(accepted) <= MAX_LENGTH + 1, accepted
    assert resp.content_type == "application/json"
    body = await resp.json()
    tid = assert_refused(resp.status, body, "RabbitMQ refused the task")
    assert "NO_ROUTE" not in body["error"]  # nacked, not returned
    await assert_recorded_rejected(client, tid, "RabbitMQ refused the task")
    assert [m["body"]["id"] for m in await ready_messages(cfg)] == accepted


@embedded_only  # the SQLite file locked by another connection past the busy timeout
@pytest.mark.timeout(60)
async def test_locked_database_answers_503_and_queues_nothing(client: Client, cfg: asyncnode.Config) -> None:
    resp = await post(client, {"type": "noop"})
    assert resp.status == 202  # the file and its tables exist, the API's connection is open
    first = (await resp.json())["id"]

    locker = sqlite3.connect(database_path(cfg), timeout=5, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(locker.execute, "BEGIN EXCLUSIVE")
        async with asyncio.timeout(asyncnode.SQLITE_BUSY_TIMEOUT + 15):
            resp = await post(client, {"type": "reverse", "payload": {"text": "locked out"}})
        assert resp.status == 503
        assert resp.content_type == "application/json"
        body = await resp.json()
    finally:
        with contextlib.suppress(sqlite3.Error):
            locker.execute("ROLLBACK")
        locker.close()
    assert set(body) == {"error"}, body  # no id: nothing was recorded
    assert body["error"] == "task store (SQLite) unavailable; nothing was queued, retry later"
    assert await db_rows(cfg, "SELECT id FROM tasks") == [(first,)]
    assert [m["body"]["id"] for m in await ready_messages(cfg)] == [first]
    resp = await post(client, {"type": "noop"})  # the lock gone, the API takes tasks again
    assert resp.status == 202


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
