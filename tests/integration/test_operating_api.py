"""The operator's API in process, on both backends: search over every retained task (words of the id, payload,
result and error; filters; pages; bad parameters), bulk actions by ids or filter (cancel, delete finished) with
their audit lines, dead letters grouped by fingerprint, a group requeued or discarded whole, and edit and
requeue with a payload validated as a submission."""

from __future__ import annotations

import json
import logging
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
from tests.conftest import cleanup, queue_counts, wait_for, write_config

Client: TypeAlias = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[tuple[Client, asyncnode.Config]]]

#: Every request of the test clients.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
#: Two queues, so that the queue filter has something to tell apart.
QUEUES = {"queues": {"default": {}, "mail": {}}}


@pytest.fixture
async def make_client(
    backend: str, tag: str, tmp_path: Path, aiohttp_client: Callable[..., Awaitable[Client]]
) -> AsyncIterator[MakeClient]:
    """``await make_client(**sections)``: an in-process API on ``backend`` (two queues) and its config."""

    async def make(**sections: Any) -> tuple[Client, asyncnode.Config]:
        path = write_config(tmp_path / "config.toml", tag, backend=backend, **{**QUEUES, **sections})
        cfg = asyncnode.Config.from_toml(path, env={})
        return await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT), cfg

    yield make
    await cleanup(tag)


async def submitted(client: Client, body: dict[str, Any]) -> str:
    """Submit through the API; the new task's id."""
    resp = await client.post("/api/tasks", json=body)
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["id"])


async def record(client: Client, event: str, tid: str, ttype: str, fields: dict[str, Any]) -> None:
    """Record a change of state of a task through the app's own store, as a worker (or the scheduler) would."""
    cfg, state = client.app[asyncnode.CFG_KEY], client.app[asyncnode.STATE_KEY]
    assert await state.apply(asyncnode.plan_change(event, tid, ttype, fields, tasks=cfg.tasks)) is not None


async def search(client: Client, **params: str) -> dict[str, Any]:
    """``GET /api/tasks`` with ``params``; its 200 answer."""
    resp = await client.get("/api/tasks", params=params)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def found(client: Client, **params: str) -> set[str]:
    """The ids of every task a search finds (its first page of 1,000)."""
    return {t["id"] for t in (await search(client, limit="1000", **params))["items"]}


async def statuses(client: Client, ids: list[str]) -> dict[str, str | None]:
    return await client.app[asyncnode.STATE_KEY].statuses(ids)


async def test_a_task_is_found_by_a_word_of_its_payload_result_or_error_and_by_its_short_or_whole_id(
    make_client: MakeClient,
) -> None:
    client, _ = await make_client()
    invoice = await submitted(client, {"type": "reverse", "payload": {"text": "Invoice for ACME Corp"}})
    other = await submitted(client, {"type": "reverse", "payload": {"text": "a letter to Zoë"}})
    await record(client, "completed", invoice, "reverse", {"result": "proc EMCA rof eciovni"})
    await record(client, "failed", other, "reverse", {"error": "ValueError: mailbox quarantined"})

    assert await found(client, q="acme") == {invoice}
    assert await found(client, q="ACME invoice") == {invoice}  # every word, in any order and case
    assert await found(client, q="acme zoë") == set()
    assert await found(client, q="Zoë") == {other}
    assert await found(client, q="EMCA") == {invoice}  # its result
    assert await found(client, q="quarantined") == {other}  # its error
    assert await found(client, q=invoice[:8]) == {invoice}  # the short id the dashboard shows
    assert await found(client, q=invoice) == {invoice}
    assert await found(client, q=invoice[:9] + other[9:]) == set()  # a whole id is matched whole
    answer = await search(client, q="acme")
    assert (answer["total"], answer["next"], answer["items"][0]["payload"]) == (
        1,
        None,
        {"text": "Invoice for ACME Corp"},
    )


async def test_filters_pick_by_status_type_queue_schedule_and_creation_time(make_client: MakeClient) -> None:
    client, _ = await make_client()
    plain = await submitted(client, {"type": "noop"})
    mail = await submitted(client, {"type": "reverse", "queue": "mail", "payload": {"text": "hello"}})
    nightly = str(uuid.uuid4())
    fields = {"payload": {}, "queue": "default", "schedule": "nightly"}
    await record(client, "submitted", nightly, "noop", fields)
    await record(client, "completed", plain, "noop", {"result": None})
    everything = {plain, mail, nightly}

    assert await found(client) == everything
    assert await found(client, status="completed") == {plain}
    assert await found(client, status="pending") == {mail, nightly}
    assert await found(client, type="reverse") == {mail}
    assert await found(client, queue="mail") == {mail}
    assert await found(client, queue="default") == {plain, nightly}
    assert await found(client, schedule="nightly") == {nightly}
    assert await found(client, type="noop", status="pending") == {nightly}
    assert await found(client, q="hello", queue="default") == set()
    state = client.app[asyncnode.STATE_KEY]
    created = {tid: (await state.get(tid))["created_at"] for tid in everything}
    middle = created[mail]
    assert await found(client, since=str(middle)) == {mail, nightly}
    assert await found(client, until=str(middle)) == {plain, mail}
    rfc3339 = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(middle + 3600))
    assert await found(client, since=rfc3339) == set()


async def test_pages_follow_the_cursor_through_every_match_once_newest_first(make_client: MakeClient) -> None:
    client, _ = await make_client()
    ids = [await submitted(client, {"type": "reverse", "payload": {"text": f"batch seven {i}"}}) for i in range(23)]
    await submitted(client, {"type": "reverse", "payload": {"text": "unrelated"}})
    pages: list[list[str]] = []
    params = {"q": "seven batch", "limit": "10"}
    while True:
        answer = await search(client, **params)
        assert answer["total"] == 23
        pages.append([t["id"] for t in answer["items"]])
        if answer["next"] is None:
            break
        params["cursor"] = answer["next"]
    assert [len(p) for p in pages] == [10, 10, 3]
    assert [tid for page in pages for tid in page] == ids[::-1]


BAD_SEARCHES = [
    pytest.param({"status": "finished"}, "status", id="unknown-status"),
    pytest.param({"queue": "nowhere"}, "queue", id="undeclared-queue"),
    pytest.param({"since": "yesterday"}, "since", id="since-not-a-time"),
    pytest.param({"since": "2026-01-02T00:00:00"}, "since", id="since-without-a-zone"),
    pytest.param({"since": "200", "until": "100"}, "until", id="until-before-since"),
    pytest.param({"cursor": "bm90IGEgY3Vyc29y"}, "cursor", id="cursor-not-ours"),
    pytest.param({"q": "- ! -"}, "q", id="q-without-a-word"),
    pytest.param({"q": "x" * 501}, "q", id="q-too-long"),
    pytest.param({"type": "t" * 201}, "type", id="type-too-long"),
    pytest.param({"colour": "red"}, "colour", id="unknown-parameter"),
]


@pytest.mark.parametrize(("params", "field"), BAD_SEARCHES)
async def test_a_bad_search_is_400_naming_the_parameter(
    make_client: MakeClient, params: dict[str, str], field: str
) -> None:
    client, _ = await make_client()
    resp = await client.get("/api/tasks", params=params)
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    assert answer["field"] == field and field in answer["error"], answer


async def test_a_bad_limit_is_400(make_client: MakeClient) -> None:
    client, _ = await make_client()
    for limit in ("0", "1001", "ten"):
        resp = await client.get("/api/tasks", params={"limit": limit})
        assert resp.status == 400 and "limit" in (await resp.json())["error"], limit


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The audit log's lines so far, parsed."""
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "asyncnode.audit"]


async def test_a_bulk_cancel_by_filter_cancels_every_match_and_writes_one_audit_line(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncnode.audit")
    client, _ = await make_client()
    urgent = [await submitted(client, {"type": "reverse", "payload": {"text": f"urgent {i}"}}) for i in range(3)]
    calm = await submitted(client, {"type": "reverse", "payload": {"text": "calm"}})
    done = await submitted(client, {"type": "reverse", "payload": {"text": "urgent but done"}})
    await record(client, "completed", done, "reverse", {"result": "x"})

    resp = await client.post("/api/tasks/cancel", json={"filter": {"q": "urgent"}})
    assert (resp.status, await resp.json()) == (200, {"cancelled": 3, "skipped": 0})  # done: not cancellable
    assert await statuses(client, [*urgent, calm, done]) == {
        **dict.fromkeys(urgent, "cancelled"),
        calm: "pending",
        done: "completed",
    }
    [line] = audit_lines(caplog)
    assert {k: line[k] for k in ("audit", "token", "client", "filter", "acted", "skipped")} == {
        "audit": "cancel",
        "token": "open",
        "client": "127.0.0.1",
        "filter": {"q": "urgent"},
        "acted": 3,
        "skipped": 0,
    }
    assert abs(time.time() - time.mktime(time.strptime(line["at"][:19], "%Y-%m-%dT%H:%M:%S")) + time.timezone) < 60


async def test_delete_takes_only_finished_tasks_which_search_then_no_longer_finds(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncnode.audit")
    client, _ = await make_client()
    old = [await submitted(client, {"type": "reverse", "payload": {"text": f"report {i}"}}) for i in range(3)]
    await record(client, "completed", old[0], "reverse", {"result": "a"})
    await record(client, "failed", old[1], "reverse", {"error": "boom"})
    resp = await client.post("/api/tasks/delete", json={"filter": {"q": "report"}})
    assert (resp.status, await resp.json()) == (200, {"deleted": 2, "skipped": 1})
    assert await statuses(client, old) == {old[0]: None, old[1]: None, old[2]: "pending"}
    assert await found(client, q="report") == {old[2]}
    assert (await client.get(f"/api/tasks/{old[0]}")).status == 404

    await record(client, "cancelled", old[2], "reverse", {})
    unknown = str(uuid.uuid4())
    resp = await client.post("/api/tasks/delete", json={"ids": [old[2], unknown, "not-an-id"]})
    assert (resp.status, await resp.json()) == (200, {"deleted": 1, "skipped": 2})
    assert await found(client, q="report") == set()
    assert [(a["audit"], a.get("filter"), a.get("ids"), a["acted"]) for a in audit_lines(caplog)] == [
        ("delete", {"q": "report"}, None, 2),
        ("delete", None, 3, 1),
    ]


BAD_BULK = [
    pytest.param("", id="empty-body"),
    pytest.param("{}", id="empty-object"),
    pytest.param('{"ids": []}', id="no-ids"),
    pytest.param('{"filter": {"status": "done"}}', id="unknown-status"),
    pytest.param('{"filter": {"colour": "red"}}', id="unknown-filter-key"),
    pytest.param('{"filter": "urgent"}', id="filter-not-an-object"),
    pytest.param('{"ids": ["x"], "filter": {}}', id="ids-and-a-filter"),
    pytest.param('{"fingerprint": "0123456789ab"}', id="fingerprint-is-for-dead-letters"),
]


@pytest.mark.parametrize("body", BAD_BULK)
async def test_a_bad_bulk_delete_is_400_and_deletes_nothing(make_client: MakeClient, body: str) -> None:
    client, _ = await make_client()
    tid = await submitted(client, {"type": "noop"})
    await record(client, "completed", tid, "noop", {"result": None})
    resp = await client.post("/api/tasks/delete", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]
    assert await statuses(client, [tid]) == {tid: "completed"}


async def test_bulk_actions_need_the_operator_token(make_client: MakeClient) -> None:
    client, _ = await make_client(api={"token": "operator-17", "read_token": "reader-17"})
    reader = {"Authorization": "Bearer reader-17"}
    resp = await client.post("/api/tasks", json={"type": "noop"}, headers={"Authorization": "Bearer operator-17"})
    tid = (await resp.json())["id"]
    for path in ("/api/tasks/cancel", "/api/tasks/delete", "/api/dlq/requeue", "/api/dlq/discard"):
        resp = await client.post(path, json={"ids": [tid]}, headers=reader)
        assert resp.status == 403, (path, await resp.text())
    resp = await client.get("/api/tasks", params={"q": tid[:8]}, headers=reader)
    assert resp.status == 200 and [t["id"] for t in (await resp.json())["items"]] == [tid]


async def dead_letter(client: Client, text: str, error: str, ttype: str = "reverse") -> str:
    """A task that failed for good: recorded ``failed`` and its message in the dead-letter queue, as a worker's
    give_up leaves them; its id."""
    broker = client.app[asyncnode.BROKER_KEY]
    tid = str(uuid.uuid4())
    payload = {"text": text} if ttype == "reverse" else {}
    await record(client, "submitted", tid, ttype, {"payload": payload, "queue": "default"})
    env = asyncnode.Envelope(tid, ttype, payload, created_at=time.time(), queue="default")
    now = asyncnode.header_time(time.time())
    headers = {"x-error": error, "x-attempts": 3, "x-first-failed-at": now, "x-last-failed-at": now}
    await broker.dead_letter(env, headers)
    await record(client, "failed", tid, ttype, {"error": error})
    return tid


async def letters(client: Client) -> set[str]:
    resp = await client.get("/api/dlq", params={"limit": "1000"})
    assert resp.status == 200, await resp.text()
    return {item["id"] for item in (await resp.json())["items"]}


async def groups(client: Client) -> list[dict[str, Any]]:
    resp = await client.get("/api/dlq/groups")
    assert resp.status == 200, await resp.text()
    return list((await resp.json())["groups"])


async def test_dead_letters_are_grouped_by_their_error_with_numbers_ids_and_quoted_values_masked(
    make_client: MakeClient,
) -> None:
    client, _ = await make_client()
    a = await dead_letter(client, "one", "KeyError: 'user 17' missing from batch 4411")
    b = await dead_letter(client, "two", "KeyError: 'user 99' missing from batch 12")
    c = await dead_letter(client, "", "TimeoutError: no answer after 30 s", ttype="noop")
    d = await dead_letter(client, "three", f"KeyError: 'user 5' missing from batch {uuid.uuid4()}")
    first, second, third = await groups(client)
    assert (first["count"], second["count"], third["count"]) == (2, 1, 1)
    assert first["example"]["id"] in {a, b} and first["types"] == ["reverse"]
    assert first["pattern"] == "KeyError: '…' missing from batch <n>"
    assert {second["example"]["id"], third["example"]["id"]} == {c, d}
    assert first["first_at"] <= first["last_at"] and isinstance(first["first_at"], float)
    assert len({g["fingerprint"] for g in (first, second, third)}) == 3
    resp = await client.get("/api/dlq/groups")
    assert {k: v for k, v in (await resp.json()).items() if k != "groups"} == {"read": 4, "total": 4}


async def test_a_group_is_requeued_whole_and_another_discarded_whole(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncnode.audit")
    client, cfg = await make_client()
    flaky = [await dead_letter(client, f"t{i}", f"ConnectionError: host 10.0.0.{i} refused") for i in range(3)]
    broken = [await dead_letter(client, f"b{i}", f"ValueError: bad row {i}") for i in range(2)]
    by_error = {g["pattern"]: g["fingerprint"] for g in await groups(client)}
    ready_before = (await queue_counts(cfg))[0]

    resp = await client.post("/api/dlq/requeue", json={"fingerprint": by_error["ConnectionError: host <n> refused"]})
    assert (resp.status, await resp.json()) == (200, {"requeued": 3, "skipped": 0})
    assert await statuses(client, flaky) == dict.fromkeys(flaky, "pending")
    assert (await queue_counts(cfg))[0] == ready_before + 3
    assert await letters(client) == set(broken)

    resp = await client.post("/api/dlq/discard", json={"fingerprint": by_error["ValueError: bad row <n>"]})
    assert (resp.status, await resp.json()) == (200, {"discarded": 2, "skipped": 0})
    assert await letters(client) == set()
    assert await statuses(client, broken) == dict.fromkeys(broken, "failed")  # discarded: the task stays failed
    assert [(a["audit"], a["acted"]) for a in audit_lines(caplog)] == [("requeue", 3), ("discard", 2)]


async def test_dead_letters_are_requeued_by_ids_or_by_a_search(make_client: MakeClient) -> None:
    client, _ = await make_client()
    a = await dead_letter(client, "alpha", "RuntimeError: disk full")
    b = await dead_letter(client, "beta", "RuntimeError: disk full")
    c = await dead_letter(client, "gamma", "RuntimeError: quota exceeded")
    resp = await client.post("/api/dlq/requeue", json={"ids": [a, str(uuid.uuid4())]})
    assert (resp.status, await resp.json()) == (200, {"requeued": 1, "skipped": 1})
    resp = await client.post("/api/dlq/discard", json={"filter": {"q": "quota"}})
    assert (resp.status, await resp.json()) == (200, {"discarded": 1, "skipped": 0})
    assert await letters(client) == {b}
    assert await statuses(client, [a, b, c]) == {a: "pending", b: "failed", c: "failed"}


async def test_edit_and_requeue_validates_the_payload_as_a_submission_and_keeps_the_letter_if_not(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncnode.audit")
    client, _ = await make_client()
    tid = await dead_letter(client, "bad input", "ValueError: cannot read it")
    for body, field in (({"payload": {"colour": "red"}}, "payload"), ({"payload": {"text": 7}}, "text")):
        resp = await client.post(f"/api/dlq/{tid}/requeue", json=body)
        assert resp.status == 400, await resp.text()
        answer = await resp.json()
        assert field in answer["error"], answer
    for raw in ('{"text": "x"}', "[1]", "{not json"):
        resp = await client.post(f"/api/dlq/{tid}/requeue", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400, raw
    assert await letters(client) == {tid}
    assert await statuses(client, [tid]) == {tid: "failed"}

    resp = await client.post(f"/api/dlq/{tid}/requeue", json={"payload": {"text": "good input"}})
    assert (resp.status, await resp.json()) == (200, {"requeued": 1, "skipped": 0})
    task = await (await client.get(f"/api/tasks/{tid}")).json()
    assert (task["status"], task["payload"]) == ("pending", {"text": "good input"})
    assert await found(client, q="good input") == {tid}
    assert await found(client, q="bad") == set()  # its words are those of its new payload
    assert await letters(client) == set()
    assert [a["audit"] for a in audit_lines(caplog)] == ["edit-and-requeue"]
    resp = await client.post(f"/api/dlq/{tid}/requeue", json={"payload": {"text": "again"}})
    assert resp.status == 404


async def test_an_expired_task_leaves_the_index(make_client: MakeClient) -> None:
    client, _ = await make_client(tasks={"result_ttl": 1})
    state = client.app[asyncnode.STATE_KEY]
    gone = await submitted(client, {"type": "reverse", "payload": {"text": "ephemeral"}})
    await record(client, "completed", gone, "reverse", {"result": "x"})

    async def expired() -> bool:
        return await state.get(gone) is None

    await wait_for(expired, 10, "the task's record to expire")
    assert await found(client, q="ephemeral") == set()
    await state.sweep_index()
    answer = await search(client, q="ephemeral")
    assert (answer["items"], answer["total"]) == ([], 0)


async def test_a_bulk_cancel_by_filter_reaches_every_match_past_the_first_page_of_a_thousand(
    make_client: MakeClient,
) -> None:
    client, _ = await make_client()
    for start in range(0, 1100, 500):
        batch = [{"type": "reverse", "payload": {"text": f"wave {i}"}} for i in range(start, min(start + 500, 1100))]
        resp = await client.post("/api/tasks", json=batch)
        assert resp.status == 202, await resp.text()
    other = await submitted(client, {"type": "reverse", "payload": {"text": "calm"}})
    resp = await client.post("/api/tasks/cancel", json={"filter": {"q": "wave"}})
    assert (resp.status, await resp.json()) == (200, {"cancelled": 1100, "skipped": 0})
    answer = await search(client, q="wave", status="cancelled", limit="1")
    assert answer["total"] == 1100
    assert await statuses(client, [other]) == {other: "pending"}


async def test_with_search_words_off_q_is_refused_and_the_other_filters_still_work(make_client: MakeClient) -> None:
    client, _ = await make_client(tasks={"search_words": False})
    mail = await submitted(client, {"type": "reverse", "queue": "mail", "payload": {"text": "hello"}})
    plain = await submitted(client, {"type": "noop"})
    await record(client, "completed", plain, "noop", {"result": None})
    resp = await client.get("/api/tasks", params={"q": "hello"})
    assert resp.status == 400 and (await resp.json())["field"] == "q"
    resp = await client.post("/api/tasks/cancel", json={"filter": {"q": "hello"}})
    assert resp.status == 400
    assert await found(client, queue="mail") == {mail}
    assert await found(client, type="noop", status="completed") == {plain}
    assert await found(client) == {mail, plain}
    resp = await client.post("/api/tasks/cancel", json={"filter": {"type": "reverse"}})
    assert (resp.status, await resp.json()) == (200, {"cancelled": 1, "skipped": 0})
