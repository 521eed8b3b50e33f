"""The task controls through the API in process, on both backends: Idempotency-Key (concurrent requests, another
body, the TTL, a 503 that leaves the key free, invalid keys), delayed submissions (their answer, every bad
input), the cancel endpoints (tokens, bulk by ids or status, bad bodies) and their WebSocket updates."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import cleanup, database_path, db_rows, free_port, queue_counts, stored_keys, wait_for, write_config

Client: TypeAlias = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[tuple[Client, asyncnode.Config]]]

#: Every request of the test clients.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
#: The embedded variant only.
embedded_only = pytest.mark.parametrize("backend", ["embedded"], indirect=True)
#: The RabbitMQ variant only.
rabbitmq_only = pytest.mark.parametrize("backend", ["rabbitmq"], indirect=True)
#: A body every idempotency test submits.
BODY: dict[str, Any] = {"type": "reverse", "payload": {"text": "exactly once"}}


@pytest.fixture
async def make_client(
    backend: str, tag: str, tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[MakeClient]:
    """``await make_client(**sections)``: an in-process API on ``backend`` and its config; cleaned up afterwards."""

    async def make(**sections: Any) -> tuple[Client, asyncnode.Config]:
        path = write_config(tmp_path / "config.toml", tag, backend=backend, **sections)
        cfg = asyncnode.Config.from_toml(path, env={})
        return await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT), cfg

    yield make
    await cleanup(tag)


def submit(client: Client, body: Any, key: str | None = None, **headers: str) -> Any:
    """``POST /api/tasks`` with ``body`` (JSON, or raw text) and, given ``key``, an Idempotency-Key."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    all_headers = {"Content-Type": "application/json", **headers}
    if key is not None:
        all_headers["Idempotency-Key"] = key
    return client.post("/api/tasks", data=data, headers=all_headers)


async def raw_submit(client: Client, body: dict[str, Any], key: str) -> tuple[int, str]:
    """``POST /api/tasks`` written byte by byte, with an Idempotency-Key aiohttp's client would refuse to send
    (a control character); the status and body of the answer."""
    data = json.dumps(body).encode()
    head = (
        f"POST /api/tasks HTTP/1.1\r\nHost: {client.host}:{client.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\nIdempotency-Key: {key}\r\n\r\n"
    )
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            writer.write(head.encode("utf-8") + data)
            await writer.drain()
            answer = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


async def submitted(client: Client, body: Any, **headers: str) -> dict[str, Any]:
    """Submit ``body``; its 202 answer."""
    resp = await submit(client, body, **headers)
    assert resp.status == 202, await resp.text()
    return dict(await resp.json())


async def listed(client: Client, **headers: str) -> list[str]:
    """The ids ``GET /api/tasks`` lists, newest first."""
    resp = await client.get("/api/tasks", headers=headers)
    assert resp.status == 200, await resp.text()
    return [t["id"] for t in (await resp.json())["items"]]


async def record(client: Client, tid: str, **headers: str) -> dict[str, Any]:
    """``GET /api/tasks/<id>``."""
    resp = await client.get(f"/api/tasks/{tid}", headers=headers)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def statuses(client: Client, ids: list[str]) -> dict[str, str]:
    """The status of each task."""
    return {tid: (await record(client, tid))["status"] for tid in ids}


async def ready(cfg: asyncnode.Config) -> int:
    """Messages ready in the work queue."""
    return (await queue_counts(cfg))[0]


# ---------------------------------------------------------------------------- Idempotency-Key


async def test_twenty_concurrent_posts_with_one_key_make_one_task_one_202_and_nineteen_200(
    make_client: MakeClient,
) -> None:
    client, cfg = await make_client()
    responses = await asyncio.gather(*(submit(client, BODY, "twenty-at-once") for _ in range(20)))
    answers = [(r.status, await r.json(), r.headers["Location"]) for r in responses]
    assert sorted(status for status, _, _ in answers) == [200] * 19 + [202]
    [first] = [body for status, body, _ in answers if status == 202]
    tid = first["id"]
    assert first == {"id": tid, "status": "pending", "queue": "default"}
    assert all(body == first for _, body, _ in answers), answers
    assert {location for _, _, location in answers} == {f"/api/tasks/{tid}"}
    assert await listed(client) == [tid]  # one task recorded
    assert await ready(cfg) == 1  # and queued once


async def test_the_same_key_with_another_body_is_422_naming_the_key(make_client: MakeClient) -> None:
    client, cfg = await make_client()
    first = await submitted(client, BODY, key="same-key")
    # The same body with its keys in another order is the same request.
    reordered = '{"payload": {"text": "exactly once"}, "type": "reverse"}'
    resp = await submit(client, reordered, "same-key")
    assert (resp.status, await resp.json()) == (200, first)
    error = {"error": "Idempotency-Key 'same-key' was already used with a different request body", "key": "same-key"}
    for other in ({"type": "reverse", "payload": {"text": "another"}}, {"type": "noop"}):
        resp = await submit(client, other, "same-key")
        assert (resp.status, await resp.json()) == (422, error)
    assert await listed(client) == [first["id"]]
    assert await ready(cfg) == 1


async def test_a_key_past_its_ttl_makes_a_new_task(make_client: MakeClient) -> None:
    client, cfg = await make_client(api={"idempotency_ttl": 1})
    since = time.monotonic()
    first = await submitted(client, BODY, key="short-lived")
    resp = await submit(client, BODY, "short-lived")
    assert (resp.status, await resp.json()) == (200, first)  # within its TTL

    async def made_anew() -> dict[str, Any] | None:
        resp = await submit(client, BODY, "short-lived")
        assert resp.status in (200, 202), await resp.text()
        return dict(await resp.json()) if resp.status == 202 else None

    second = await wait_for(made_anew, 5, "the key to expire and a request with it to make a new task")
    waited = time.monotonic() - since
    assert waited >= 1.0, waited  # not before its TTL
    assert second["id"] != first["id"] and second["status"] == "pending", second
    assert await listed(client) == [second["id"], first["id"]]
    assert await ready(cfg) == 2


async def test_two_api_processes_racing_with_one_key_make_one_task(
    make_client: MakeClient, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client, cfg = await make_client()
    other = await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)  # its own connections, same store
    responses = await asyncio.gather(*(submit(c, BODY, "deployment-wide") for _ in range(10) for c in (client, other)))
    answers = [(r.status, await r.json(), r.headers["Location"]) for r in responses]
    assert sorted(status for status, _, _ in answers) == [200] * 19 + [202]
    [first] = [body for status, body, _ in answers if status == 202]
    assert all((body, location) == (first, f"/api/tasks/{first['id']}") for _, body, location in answers), answers
    assert await listed(other) == [first["id"]]
    assert await ready(cfg) == 1


async def test_a_delayed_submission_replayed_by_its_key_answers_the_same_run_at(make_client: MakeClient) -> None:
    client, _ = await make_client()
    body = {"type": "noop", "delay": 30}
    first = await submitted(client, body, key="later-once")
    assert first["status"] == "scheduled" and isinstance(first["run_at"], float), first
    resp = await submit(client, body, "later-once")  # the same delay again still means the first run_at
    assert (resp.status, await resp.json()) == (200, first)
    assert await listed(client) == [first["id"]]


@rabbitmq_only  # RabbitMQ unreachable: the API records the task rejected and answers 503
async def test_a_503_from_an_unreachable_broker_does_not_consume_the_key(
    make_client: MakeClient, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client, cfg = await make_client()
    broker = asyncnode.BrokerConfig(
        url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        queue=cfg.broker.queue,
        connect_timeout=1.0,
        publish_timeout=2.0,
    )
    down = asyncnode.Config(path=cfg.path, broker=broker, redis=cfg.redis, api=cfg.api)  # the same Redis
    down_client = await aiohttp_client(asyncnode.make_app(down), timeout=HTTP_TIMEOUT)
    async with asyncio.timeout(10):
        resp = await submit(down_client, BODY, "retry-me")
    assert resp.status == 503, await resp.text()
    refused = (await resp.json())["id"]

    first = await submitted(client, BODY, key="retry-me")  # the same key, once RabbitMQ is there
    assert first["id"] != refused
    resp = await submit(client, BODY, "retry-me")
    assert (resp.status, await resp.json()) == (200, first)
    assert (await record(client, refused))["status"] == "rejected"
    assert await ready(cfg) == 1


@embedded_only  # the SQLite file locked by another connection past the busy timeout
async def test_a_503_from_a_locked_database_does_not_consume_the_key(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shorter busy timeout for this test's app only (its connection is opened with it): the 503 comes
    # after 1 s rather than 10, the same way.
    monkeypatch.setattr(asyncnode, "SQLITE_BUSY_TIMEOUT", 1.0)
    client, cfg = await make_client()
    before = await submitted(client, {"type": "noop"})  # the file and its tables exist, the connection is open
    locker = sqlite3.connect(database_path(cfg), timeout=5, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(locker.execute, "BEGIN EXCLUSIVE")
        async with asyncio.timeout(20):
            resp = await submit(client, BODY, "retry-me")
        assert resp.status == 503, await resp.text()
        assert await resp.json() == {"error": "task store (SQLite) unavailable; nothing was queued, retry later"}
    finally:
        with contextlib.suppress(sqlite3.Error):
            locker.execute("ROLLBACK")
        locker.close()
    first = await submitted(client, BODY, key="retry-me")  # the lock gone: the same key makes the task
    resp = await submit(client, BODY, "retry-me")
    assert (resp.status, await resp.json()) == (200, first)
    assert await listed(client) == [first["id"], before["id"]]
    assert await ready(cfg) == 2


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("k" * 201, id="201-characters"),
        pytest.param("tab\there", id="tab"),
        pytest.param("clé", id="not-ascii"),
    ],
)
async def test_an_invalid_key_is_400_naming_the_header_and_creates_nothing(make_client: MakeClient, key: str) -> None:
    client, cfg = await make_client()
    status, answer = await raw_submit(client, BODY, key)
    assert status == 400, answer
    assert json.loads(answer) == {"error": "Idempotency-Key must be 1 to 200 printable ASCII characters"}
    assert await listed(client) == []
    assert await stored_keys(cfg) == []


@pytest.mark.parametrize("key", [pytest.param("control\x01char", id="x01"), pytest.param("del\x7fchar", id="x7f")])
async def test_a_key_with_a_control_character_is_400_from_the_http_parser_and_creates_nothing(
    make_client: MakeClient, key: str
) -> None:
    client, cfg = await make_client()
    status, answer = await raw_submit(client, BODY, key)
    assert status == 400, answer
    assert answer.startswith("Invalid header value char"), answer  # aiohttp refuses the request before the app
    assert await listed(client) == []
    assert await stored_keys(cfg) == []


async def test_a_key_of_200_printable_characters_is_taken(make_client: MakeClient) -> None:
    client, _ = await make_client()
    printable = "".join(map(chr, range(0x20, 0x7F)))  # space to tilde
    key = ("k" + printable + "k").ljust(200, "x")
    assert len(key) == 200
    first = await submitted(client, BODY, key=key)
    resp = await submit(client, BODY, key)
    assert (resp.status, await resp.json()) == (200, first)


# ---------------------------------------------------------------------------- delay and run_at


def rfc3339(t: float, offset_hours: int = 0) -> str:
    """``t`` as an RFC 3339 time in the zone ``offset_hours`` east of UTC (``Z`` for UTC)."""
    zone = datetime.timezone(datetime.timedelta(hours=offset_hours))
    text = datetime.datetime.fromtimestamp(t, zone).isoformat()
    return text.replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("when", "ahead"),
    [
        pytest.param(lambda now: {"delay": 30}, 30.0, id="delay"),
        pytest.param(lambda now: {"delay": 0.25}, 0.25, id="delay-fraction"),
        pytest.param(lambda now: {"run_at": now + 30}, None, id="run_at-epoch"),
        pytest.param(lambda now: {"run_at": rfc3339(now + 30)}, None, id="run_at-utc"),
        pytest.param(lambda now: {"run_at": rfc3339(now + 30, 1)}, None, id="run_at-plus-one-hour"),
        pytest.param(lambda now: {"run_at": rfc3339(now - 30, -5)}, None, id="run_at-30s-ago-runs-now"),
    ],
)
async def test_a_delayed_submission_is_scheduled_with_its_run_at(
    make_client: MakeClient, when: Callable[[float], dict[str, Any]], ahead: float | None
) -> None:
    client, _ = await make_client()
    sent = time.time()
    extra = when(sent)
    resp = await submit(client, {"type": "noop", **extra})
    answered = time.time()
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    tid, run_at = body["id"], body["run_at"]
    assert body == {"id": tid, "status": "scheduled", "queue": "default", "run_at": run_at}
    assert resp.headers["Location"] == f"/api/tasks/{tid}"
    if ahead is not None:
        assert sent + ahead <= run_at <= answered + ahead, (sent, run_at, answered)
    else:
        given = extra["run_at"]
        expected = given if isinstance(given, float) else datetime.datetime.fromisoformat(given).timestamp()
        assert run_at == pytest.approx(expected, abs=1e-6), (run_at, given)
    task = await record(client, tid)
    assert task["status"] == "scheduled" and task["run_at"] == run_at, task
    assert [h["status"] for h in task["history"]] == ["scheduled"]
    assert task["attempts"] == 0 and task["started_at"] is None, task


@embedded_only  # the contract says where the file keeps it
async def test_a_delayed_task_waits_in_the_file_as_a_message_ready_at_its_run_at(make_client: MakeClient) -> None:
    client, cfg = await make_client()
    body = await submitted(client, {"type": "noop", "delay": 30})
    rows = await db_rows(cfg, "SELECT queue, task_id, ready_at, holder FROM messages")
    assert rows == [(cfg.broker.queue, body["id"], body["run_at"], None)]
    assert await ready(cfg) == 0  # not claimable before its time


#: ``[broker] max_delay`` of the bad-input test.
MAX_DELAY = 3600.0

BAD_WHEN = [
    pytest.param(lambda now: '{"delay": 0}', "delay", id="delay-zero"),
    pytest.param(lambda now: '{"delay": -5}', "delay", id="delay-negative"),
    pytest.param(lambda now: '{"delay": true}', "delay", id="delay-bool"),
    pytest.param(lambda now: '{"delay": "10"}', "delay", id="delay-string"),
    pytest.param(lambda now: '{"delay": NaN}', "delay", id="delay-nan"),
    pytest.param(lambda now: f'{{"delay": {MAX_DELAY + 1}}}', "delay", id="delay-past-max_delay"),
    pytest.param(lambda now: f'{{"delay": 10, "run_at": {now + 10}}}', "delay", id="delay-and-run_at"),
    pytest.param(lambda now: json.dumps({"run_at": rfc3339(now + 60)[:-1]}), "run_at", id="run_at-naive"),
    pytest.param(lambda now: '{"run_at": "tomorrow at noon"}', "run_at", id="run_at-unparsable"),
    pytest.param(lambda now: '{"run_at": true}', "run_at", id="run_at-bool"),
    pytest.param(lambda now: '{"run_at": Infinity}', "run_at", id="run_at-infinite"),
    pytest.param(lambda now: f'{{"run_at": {now - 90}}}', "run_at", id="run_at-90s-ago"),
    pytest.param(lambda now: json.dumps({"run_at": rfc3339(now - 3600, 2)}), "run_at", id="run_at-an-hour-ago"),
    pytest.param(lambda now: json.dumps({"run_at": rfc3339(now + MAX_DELAY + 60)}), "run_at", id="run_at-past-max"),
    pytest.param(lambda now: f'{{"run_at": {now + MAX_DELAY + 60}}}', "run_at", id="run_at-epoch-past-max"),
]


@pytest.mark.parametrize(("when", "field"), BAD_WHEN)
async def test_a_bad_delay_or_run_at_is_400_naming_the_field_and_creates_nothing(
    make_client: MakeClient, when: Callable[[float], str], field: str
) -> None:
    client, cfg = await make_client(broker={"max_delay": MAX_DELAY})
    extra = when(time.time())
    body = '{"type": "noop", ' + extra[1:]
    resp = await submit(client, body)
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    assert set(answer) == {"error", "field"} and answer["field"] == field and answer["error"], answer
    assert await listed(client) == []
    assert await stored_keys(cfg) == []


# ---------------------------------------------------------------------------- cancel endpoints

#: Tokens of the token test.
OPERATOR, READER = "operator-token-14", "read-token-14"


async def test_cancel_needs_the_operator_token_and_records_its_kind(make_client: MakeClient) -> None:
    client, _ = await make_client(api={"token": OPERATOR, "read_token": READER})
    operator = {"Authorization": f"Bearer {OPERATOR}"}
    reader = {"Authorization": f"Bearer {READER}"}
    tid = (await submitted(client, {"type": "noop"}, **operator))["id"]
    resp = await client.post(f"/api/tasks/{tid}/cancel", headers=reader)
    assert resp.status == 403, await resp.text()
    resp = await client.post("/api/tasks/cancel", json={"ids": [tid]}, headers=reader)
    assert resp.status == 403, await resp.text()
    resp = await client.post(f"/api/tasks/{tid}/cancel")
    assert resp.status == 401, await resp.text()
    assert (await record(client, tid, **operator))["status"] == "pending"

    sent = time.time()
    resp = await client.post(f"/api/tasks/{tid}/cancel", headers=operator)
    assert (resp.status, await resp.json()) == (200, {"id": tid, "status": "cancelled"})
    task = await record(client, tid, **reader)
    assert task["status"] == "cancelled" and sent <= task["cancelled_at"] <= time.time(), task
    assert (task["cancelled_by"], task["cancelled_token"], task["cancelled_client"]) == ("api", "operator", "127.0.0.1")
    assert task["history"][-1] | {"ts": 0} == {"status": "cancelled", "ts": 0, "cancelled_by": "api"}


async def test_bulk_cancel_by_ids_counts_the_cancelled_and_the_skipped(make_client: MakeClient) -> None:
    client, _ = await make_client()
    first, second = [(await submitted(client, {"type": "noop"}))["id"] for _ in range(2)]
    later = (await submitted(client, {"type": "noop", "delay": 60}))["id"]
    unknown = str(uuid.uuid4())
    resp = await client.post("/api/tasks/cancel", json={"ids": [first, later, unknown]})
    assert (resp.status, await resp.json()) == (200, {"cancelled": 2, "skipped": 1})
    assert await statuses(client, [first, second, later]) == {first: "cancelled", second: "pending", later: "cancelled"}
    resp = await client.post("/api/tasks/cancel", json={"ids": [first, second]})
    assert (resp.status, await resp.json()) == (200, {"cancelled": 1, "skipped": 1})  # first: already cancelled
    assert await statuses(client, [second]) == {second: "cancelled"}


async def test_bulk_cancel_by_status_cancels_only_the_tasks_in_it(make_client: MakeClient) -> None:
    client, cfg = await make_client()
    pending = [(await submitted(client, {"type": "noop"}))["id"] for _ in range(2)]
    scheduled = [(await submitted(client, {"type": "noop", "delay": 60}))["id"] for _ in range(3)]
    resp = await client.post("/api/tasks/cancel", json={"status": "scheduled"})
    assert (resp.status, await resp.json()) == (200, {"cancelled": 3, "skipped": 0})
    assert await statuses(client, pending + scheduled) == {
        **dict.fromkeys(pending, "pending"),
        **dict.fromkeys(scheduled, "cancelled"),
    }
    assert await ready(cfg) == 2  # the pending ones still queued


BAD_BULK = [
    pytest.param(lambda tid: json.dumps({"ids": [tid], "type": "noop"}), id="ids-and-a-filter"),
    pytest.param(lambda tid: "{}", id="empty-object"),
    pytest.param(lambda tid: "", id="empty-body"),
    pytest.param(lambda tid: "{not json", id="not-json"),
    pytest.param(lambda tid: json.dumps([tid]), id="array"),
    pytest.param(lambda tid: json.dumps({"ids": [tid], "colour": "red"}), id="unknown-key"),
    pytest.param(lambda tid: json.dumps({"queue": "default", "colour": "red"}), id="unknown-key-in-filter"),
    pytest.param(lambda tid: json.dumps({"ids": tid}), id="ids-not-a-list"),
    pytest.param(lambda tid: json.dumps({"ids": [7]}), id="id-not-a-string"),
    pytest.param(lambda tid: json.dumps({"type": 7}), id="type-not-a-string"),
    pytest.param(lambda tid: json.dumps({"queue": ["default"]}), id="queue-not-a-string"),
    pytest.param(lambda tid: json.dumps({"status": "completed"}), id="status-finished"),
    pytest.param(lambda tid: json.dumps({"status": "cancelled"}), id="status-cancelled"),
]


@pytest.mark.parametrize("make_body", BAD_BULK)
async def test_bulk_cancel_refuses_a_bad_body_and_cancels_nothing(
    make_client: MakeClient, make_body: Callable[[str], str]
) -> None:
    client, _ = await make_client()
    tid = (await submitted(client, {"type": "noop"}))["id"]
    data = make_body(tid)
    resp = await client.post("/api/tasks/cancel", data=data, headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]
    assert await statuses(client, [tid]) == {tid: "pending"}


# ---------------------------------------------------------------------------- WebSocket


async def recv_update(ws: aiohttp.ClientWebSocketResponse, tid: str, status: str) -> dict[str, Any]:
    """Read frames (an object or an array of objects) until the update of ``tid`` to ``status``."""
    while True:
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        for update in data if isinstance(data, list) else [data]:
            if update.get("id") == tid and update.get("status") == status:
                return dict(update)


async def test_the_websocket_shows_a_delayed_submission_scheduled_and_its_cancel(make_client: MakeClient) -> None:
    client, _ = await make_client()
    ws = await client.ws_connect("/ws")
    try:

        async def relayed() -> bool:
            # The relay subscribes in the background: submit until an update comes through.
            tid = (await submitted(client, {"type": "noop"}))["id"]
            try:
                async with asyncio.timeout(0.5):
                    await recv_update(ws, tid, "pending")
            except TimeoutError:
                return False
            return True

        await wait_for(relayed, 10, "an update relayed to the WebSocket")
        body = await submitted(client, {"type": "noop", "delay": 60})
        tid = body["id"]
        async with asyncio.timeout(5):
            update = await recv_update(ws, tid, "scheduled")
        assert set(update) == {"id", "type", "status", "ts", "queue", "attempts", "run_at", "seq"}, update
        assert (update["type"], update["queue"], update["attempts"], update["run_at"]) == (
            "noop",
            "default",
            0,
            body["run_at"],
        )
        resp = await client.post(f"/api/tasks/{tid}/cancel")
        assert resp.status == 200, await resp.text()
        async with asyncio.timeout(5):
            update = await recv_update(ws, tid, "cancelled")
        assert set(update) == {"id", "type", "status", "ts", "cancelled_by", "seq"}, update
        assert (update["type"], update["cancelled_by"]) == ("noop", "api")
    finally:
        await ws.close()
