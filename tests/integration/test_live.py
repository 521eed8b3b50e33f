"""What the dashboard relies on: subscriptions, the stats message, task timelines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import wait_for

Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
async def client(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(asyncnode.make_app(cfg))


async def frames(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[dict[str, Any]]:
    """Every item received within ``seconds``."""
    items: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(seconds):
            async for msg in ws:
                data = json.loads(msg.data)
                items.extend(data if isinstance(data, list) else [data])
    except TimeoutError:
        pass
    return items


async def submit(client: Client, body: dict[str, Any]) -> str:
    resp = await client.post("/api/tasks", json=body)
    assert resp.status == 202
    return str((await resp.json())["id"])


async def test_a_client_can_watch_only_its_own_task(client: Client) -> None:
    mine = await submit(client, {"type": "reverse", "payload": {"text": "mine"}})
    ws = await client.ws_connect("/ws")
    await ws.send_str(json.dumps({"subscribe": {"ids": [mine]}}))
    everything = await client.ws_connect("/ws")
    await everything.send_str(json.dumps({"subscribe": "*"}))
    by_type = await client.ws_connect("/ws")
    await by_type.send_str(json.dumps({"subscribe": {"types": ["noop"]}}))
    await frames(ws, 0.5)  # the catch-up snapshot
    await frames(by_type, 0.5)
    await frames(everything, 0.5)

    others = [await submit(client, {"type": "reverse", "payload": {"text": f"other {i}"}}) for i in range(5)]
    noop = await submit(client, {"type": "noop"})
    # Updates about the watched task reach it; the firehose goes to the others.
    state = client.app[asyncnode.STATE_KEY]
    await state.update(mine, "reverse", "started", {"worker": "test:1"}, public=("worker",), counter="attempts")

    got = [i for i in await frames(ws, 1.5) if "id" in i]
    assert [(u["id"], u["status"]) for u in got] == [(mine, "started")]
    typed = {u["id"] for u in await frames(by_type, 1.0) if "id" in u}
    assert typed == {noop}
    seen = {u["id"] for u in await frames(everything, 1.0) if "id" in u}
    assert {mine, noop, *others} <= seen


async def test_garbage_subscriptions_change_nothing(client: Client) -> None:
    ws = await client.ws_connect("/ws")
    for junk in ('{"subscribe": 3}', '{"subscribe": {"ids": "x"}}', '{"subscribe": {"colour": []}}', "[", "{}"):
        await ws.send_str(junk)
    tid = await submit(client, {"type": "noop"})
    assert tid in {u.get("id") for u in await frames(ws, 1.5)}


async def test_stats_every_second_with_rates_depths_and_workers(client: Client, cfg: asyncnode.Config) -> None:
    ws = await client.ws_connect("/ws")
    for _ in range(3):
        await submit(client, {"type": "noop"})
    stats = [i["stats"] for i in await frames(ws, 3.5) if "stats" in i]
    assert len(stats) >= 2
    last = stats[-1]
    assert last["totals"]["submitted"] == 3
    assert last["queue"] == {"ready": 3, "dlq": 0}
    for _ in range(2):
        await submit(client, {"type": "noop"})
    later = [i["stats"] for i in await frames(ws, 2.5) if "stats" in i]
    assert later[-1]["queue"]["ready"] == 5 and later[-1]["totals"]["submitted"] == 5  # fresh, not cached
    assert last["workers"] == []
    assert {"completed_per_s", "failed_per_s", "submitted_per_s", "ts"} <= set(last)
    assert any(s["submitted_per_s"] > 0 for s in stats) or stats[0]["totals"]["submitted"] == 3


async def test_task_timeline(client: Client) -> None:
    tid = await submit(client, {"type": "reverse", "payload": {"text": "abc"}})
    state = client.app[asyncnode.STATE_KEY]
    await state.update(tid, "reverse", "started", {"worker": "h:1"}, public=("worker",), counter="attempts")
    ctx = asyncnode.TaskContext(tid, "reverse", 1, client.app[asyncnode.CFG_KEY], state)
    ctx.progress(0.5, "half way")  # a progress report is not a change of status: not in the timeline
    await ctx.drain()
    await state.update(
        tid,
        "reverse",
        "retrying",
        {"error": "boom", "attempt": 1, "next_attempt_at": 9.0},
        public=("error", "attempt", "next_attempt_at"),
    )
    await state.update(tid, "reverse", "completed", {"result": "cba"}, public=("result",))
    task = await (await client.get(f"/api/tasks/{tid}")).json()
    timeline = [(h["status"], h.get("error")) for h in task["history"]]
    assert timeline == [("pending", None), ("started", None), ("retrying", "boom"), ("completed", None)]
    assert task["history"][1]["worker"] == "h:1"
    assert all(a["ts"] <= b["ts"] for a, b in zip(task["history"], task["history"][1:], strict=False))


async def test_updates_are_followed_while_a_client_is_connected_and_again_for_the_next(client: Client) -> None:
    """With nobody watching the API stops reading updates; the next client still misses none."""
    hub = client.app[asyncnode.HUB_KEY]
    assert not hub.live.is_set()  # no client yet: nothing read

    first = await client.ws_connect("/ws")
    await asyncio.wait_for(hub.live.wait(), 5)
    tid = await submit(client, {"type": "noop"})
    assert tid in {u.get("id") for u in await frames(first, 1.0)}
    await first.close()

    async def stopped_following() -> bool:
        await submit(client, {"type": "noop"})  # the first update nobody wants ends the following
        return not hub.live.is_set()

    await wait_for(stopped_following, 10, "the relay to stop following the store")

    second = await client.ws_connect("/ws")
    await asyncio.wait_for(hub.live.wait(), 5)
    tid = await submit(client, {"type": "reverse", "payload": {"text": "again"}})
    got = [u for u in await frames(second, 1.0) if u.get("id") == tid]
    assert [u["status"] for u in got] == ["pending"]
