"""The queues' HTTP API in process, on both backends: a submission's queue, pause and resume, the list of
queues with their figures, and the task list filtered by queue; bad input changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import cleanup, write_config

Client = TestClient[Any, Any]
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
async def qcfg(backend: str, tag: str, tmp_path: Path) -> AsyncIterator[asyncnode.Config]:
    path = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        queues={"mail": {"limit": 2, "rate": "10/s"}, "heavy": {}},
        routes={"reverse": "mail"},
    )
    yield asyncnode.Config.from_toml(path, env={})
    await cleanup(tag)


@pytest.fixture
async def client(qcfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(asyncnode.make_app(qcfg), timeout=HTTP_TIMEOUT)


async def queues(client: Client) -> dict[str, dict[str, Any]]:
    resp = await client.get("/api/queues")
    assert resp.status == 200
    return {item["name"]: item for item in (await resp.json())["items"]}


async def test_tasks_are_routed_recorded_and_counted_in_their_queues(client: Client, qcfg: asyncnode.Config) -> None:
    ids = {}
    for name, body in {
        "routed": {"type": "reverse", "payload": {"text": "a"}},
        "named": {"type": "noop", "payload": {}, "queue": "heavy"},
        "default": {"type": "noop", "payload": {}},
    }.items():
        resp = await client.post("/api/tasks", json=body)
        assert resp.status == 202
        ids[name] = await resp.json()
    assert {k: v["queue"] for k, v in ids.items()} == {"routed": "mail", "named": "heavy", "default": "default"}
    for answer in ids.values():
        task = await (await client.get(f"/api/tasks/{answer['id']}")).json()
        assert task["queue"] == answer["queue"] and task["status"] == "pending"
    listed = await queues(client)
    assert [(q["name"], q["broker_name"]) for q in listed.values()] == [
        ("default", qcfg.broker.queue),
        ("mail", f"{qcfg.broker.queue}.mail"),
        ("heavy", f"{qcfg.broker.queue}.heavy"),
    ]
    assert [q["ready"] for q in listed.values()] == [1, 1, 1]  # no worker runs
    assert (listed["mail"]["limit"], listed["mail"]["rate"], listed["heavy"]["limit"]) == (2, "10/s", 0)
    assert all(q["consumers"] == 0 and q["paused"] is False for q in listed.values())
    resp = await client.get("/api/tasks", params={"queue": "mail"})
    assert [t["id"] for t in (await resp.json())["items"]] == [ids["routed"]["id"]]


async def test_pause_and_resume_are_kept_and_shown(client: Client) -> None:
    resp = await client.post("/api/queues/mail/pause")
    assert (resp.status, await resp.json()) == (200, {"name": "mail", "paused": True})
    again = await client.post("/api/queues/mail/pause")  # pausing twice changes nothing
    assert (again.status, await again.json()) == (200, {"name": "mail", "paused": True})
    assert {n: q["paused"] for n, q in (await queues(client)).items()} == {
        "default": False,
        "mail": True,
        "heavy": False,
    }
    submitted = await client.post("/api/tasks", json={"type": "reverse", "payload": {"text": "a"}})
    assert submitted.status == 202  # a paused queue still accepts tasks
    resp = await client.post("/api/queues/mail/resume")
    assert (resp.status, await resp.json()) == (200, {"name": "mail", "paused": False})
    assert not any(q["paused"] for q in (await queues(client)).values())


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/api/queues/nosuch/pause", None, 404, "no queue 'nosuch' (known: default, mail, heavy)"),
        ("POST", "/api/queues/dlq/resume", None, 404, "no queue 'dlq'"),
        ("GET", "/api/tasks?queue=nosuch", None, 400, "no queue 'nosuch'"),
        ("POST", "/api/tasks", {"type": "noop", "queue": "nosuch"}, 400, "known: default, mail, heavy"),
        ("POST", "/api/tasks", {"type": "noop", "queue": 7}, 400, "'queue'"),
    ],
)
async def test_a_queue_not_declared_is_refused_and_changes_nothing(
    client: Client, method: str, path: str, body: Any, status: int, says: str
) -> None:
    resp = await client.request(method, path, json=body)
    assert resp.status == status
    assert says in (await resp.json())["error"]
    listed = await queues(client)
    assert not any(q["paused"] for q in listed.values()) and [q["ready"] for q in listed.values()] == [0, 0, 0]
    assert (await (await client.get("/api/tasks")).json())["items"] == []
