"""What the dashboard relies on: subscriptions, the stats message, task timelines, slow clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import Proc, wait_for

Client = TestClient  # type: ignore[type-arg]
Item = dict[str, Any]

#: Every request of the test client, WebSocket handshakes included.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
#: A WebSocket client's reads (stats arrive every second, so 30 s of silence is a failure) and its close.
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=30, ws_close=5)


@pytest.fixture
async def client(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)


class Feed:
    """What one WebSocket client receives, item by item, in order (a frame holds one item or an array)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._items: deque[Item] = deque()
        self.skipped: list[Item] = []  # what the last next_matching passed over

    async def _read(self) -> None:
        """Read one frame into the buffer (answering pings: the connection does not autoping)."""
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.PING:
            await self.ws.pong(msg.data)
        elif msg.type is aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            self._items.extend(data if isinstance(data, list) else [data])
        elif msg.type is not aiohttp.WSMsgType.PONG:
            raise AssertionError(f"the WebSocket ended: {msg}")

    async def next_matching(self, predicate: Callable[[Item], bool], timeout: float = 5.0, what: str = "") -> Item:
        """The first item from here on that satisfies ``predicate``; those before it go to ``skipped``."""
        self.skipped = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while self._items:
                        item = self._items.popleft()
                        if predicate(item):
                            return item
                        self.skipped.append(item)
                    await self._read()
        except TimeoutError:
            raise AssertionError(
                f"no {what or 'matching item'} within {timeout:g} s; got {len(self.skipped)} others, "
                f"the last ones: {self.skipped[-3:]}"
            ) from None

    async def quiet(self, seconds: float) -> list[Item]:
        """Every item that arrives within ``seconds``: a fixed window, only to assert that nothing else arrives."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    await self._read()
        items, self._items = list(self._items), deque()
        return items

    async def barrier(self, timeout: float = 5.0) -> None:
        """Return once the server has handled everything this client sent before: it answers a ping only
        when its reading loop gets to it. Items arriving meanwhile stay buffered."""
        token = uuid.uuid4().bytes
        await self.ws.ping(token)
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type is aiohttp.WSMsgType.PONG and msg.data == token:
                    return
                if msg.type is aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    self._items.extend(data if isinstance(data, list) else [data])
                elif msg.type is aiohttp.WSMsgType.PING:
                    await self.ws.pong(msg.data)
                elif msg.type is not aiohttp.WSMsgType.PONG:
                    raise AssertionError(f"the WebSocket ended: {msg}")


async def connect(client: Client, subscribe: Any = None, *sent: str) -> Feed:
    """A WebSocket client; once this returns, the server has its ``subscribe`` request (and ``sent``)."""
    feed = Feed(await client.ws_connect("/ws", autoping=False, timeout=WS_TIMEOUT))
    if subscribe is not None:
        await feed.ws.send_str(json.dumps({"subscribe": subscribe}))
    for text in sent:
        await feed.ws.send_str(text)
    await feed.barrier()
    return feed


def update_of(tid: str, status: str | None = None) -> Callable[[Item], bool]:
    """Matches an update of task ``tid`` (to ``status``, if given)."""
    return lambda u: u.get("id") == tid and (status is None or u.get("status") == status)


def progress_note(tid: str, note: str) -> Callable[[Item], bool]:
    """Matches the progress update of task ``tid`` with ``note``."""
    return lambda u: u.get("id") == tid and u.get("note") == note


def stats_where(check: Callable[[dict[str, Any]], bool]) -> Callable[[Item], bool]:
    """Matches a stats message whose content satisfies ``check``."""
    return lambda item: "stats" in item and check(item["stats"])


async def submit(client: Client, body: dict[str, Any]) -> str:
    resp = await client.post("/api/tasks", json=body)
    assert resp.status == 202
    return str((await resp.json())["id"])


async def record(client: Client, event: str, tid: str, ttype: str, fields: dict[str, Any]) -> Any:
    """Record a change of state of a task through the app's own store, as a worker would."""
    cfg, state = client.app[asyncnode.CFG_KEY], client.app[asyncnode.STATE_KEY]
    return await state.apply(asyncnode.plan_change(event, tid, ttype, fields, tasks=cfg.tasks))


async def test_a_client_can_watch_only_its_own_task(client: Client) -> None:
    mine = await submit(client, {"type": "reverse", "payload": {"text": "mine"}})
    ws = await connect(client, {"ids": [mine]})
    everything = await connect(client, "*")
    by_type = await connect(client, {"types": ["noop"]})
    for feed in (ws, everything, by_type):  # the catch-up snapshot: the one task there is yet
        await feed.next_matching(update_of(mine, "pending"), what="the snapshot")

    others = [await submit(client, {"type": "reverse", "payload": {"text": f"other {i}"}}) for i in range(5)]
    noop = await submit(client, {"type": "noop"})
    await record(client, "started", mine, "reverse", {"worker": "test:1"})

    # Updates about the watched task reach it; the firehose goes to the others.
    started = await ws.next_matching(update_of(mine), what="the watched task's update")
    assert started["status"] == "started" and started["worker"] == "test:1"
    assert {u["id"] for u in ws.skipped + await ws.quiet(0.5) if "id" in u} <= {mine}

    typed = await by_type.next_matching(update_of(noop), what="the noop task's update")
    assert typed["status"] == "pending"
    assert {u["id"] for u in by_type.skipped + await by_type.quiet(0.5) if "id" in u} <= {noop}

    wanted = {(mine, "started"), (noop, "pending"), *((tid, "pending") for tid in others)}
    seen: set[tuple[str, str]] = set()
    async with asyncio.timeout(5):
        while wanted - seen:
            update = await everything.next_matching(lambda u: "id" in u, what="an update")
            seen.add((update["id"], update["status"]))


async def test_garbage_subscriptions_change_nothing(client: Client) -> None:
    junk = ('{"subscribe": 3}', '{"subscribe": {"ids": "x"}}', '{"subscribe": {"colour": []}}', "[", "{}")
    feed = await connect(client, None, *junk)  # all handled by the server when this returns
    tid = await submit(client, {"type": "noop"})
    assert (await feed.next_matching(update_of(tid), what="the update"))["status"] == "pending"


async def test_stats_every_second_with_rates_depths_and_workers(
    client: Client, config_file: Path, procs: Callable[..., Proc]
) -> None:
    feed = await connect(client)
    first = (await feed.next_matching(stats_where(lambda s: True), what="a stats message"))["stats"]
    second = (await feed.next_matching(stats_where(lambda s: True), what="the next stats message"))["stats"]
    assert 0.9 <= second["ts"] - first["ts"] < 3.0
    assert {"completed_per_s", "failed_per_s", "submitted_per_s", "ts", "queue", "totals", "workers"} <= set(second)
    assert second["totals"] == {"completed": 0, "failed": 0, "submitted": 0, "retrying": 0}
    assert second["queue"] == {"ready": 0, "dlq": 0} and second["workers"] == []

    for _ in range(3):
        await submit(client, {"type": "noop"})
    # The first sample to count all three follows one that counted fewer: its rate cannot be zero.
    submitted = (await feed.next_matching(stats_where(lambda s: s["totals"]["submitted"] == 3)))["stats"]
    assert submitted["submitted_per_s"] > 0
    queued = await feed.next_matching(stats_where(lambda s: s["queue"] == {"ready": 3, "dlq": 0}), what="3 queued")
    assert queued["stats"]["workers"] == [] and queued["stats"]["totals"]["completed"] == 0

    worker = procs("worker", config_file)
    done = await feed.next_matching(stats_where(lambda s: s["totals"]["completed"] == 3), 30, "3 completed")
    assert done["stats"]["completed_per_s"] > 0, done
    assert done["stats"]["failed_per_s"] == 0

    def drained_by_our_worker(s: dict[str, Any]) -> bool:
        return s["queue"] == {"ready": 0, "dlq": 0} and [w["pid"] for w in s["workers"]] == [worker.pid]

    after = await feed.next_matching(stats_where(drained_by_our_worker), 10, "an empty queue and the worker")
    assert after["stats"]["totals"] == {"completed": 3, "failed": 0, "submitted": 3, "retrying": 0}


async def test_task_timeline(client: Client) -> None:
    tid = await submit(client, {"type": "reverse", "payload": {"text": "abc"}})
    cfg = client.app[asyncnode.CFG_KEY]
    await record(client, "started", tid, "reverse", {"worker": "h:1"})

    def report(fraction: float, note: str | None) -> Awaitable[Any]:
        return record(client, "progress", tid, "reverse", {"progress": fraction, "note": note})

    ctx = asyncnode.TaskContext(tid, "reverse", 1, cfg, report)
    ctx.progress(0.5, "half way")  # a progress report is not a change of status: not in the timeline
    await ctx.drain()
    await record(client, "retrying", tid, "reverse", {"error": "boom", "attempt": 1, "next_attempt_at": 9.0})
    await record(client, "completed", tid, "reverse", {"result": "cba"})
    task = await (await client.get(f"/api/tasks/{tid}")).json()
    timeline = [(h["status"], h.get("error")) for h in task["history"]]
    assert timeline == [("pending", None), ("started", None), ("retrying", "boom"), ("completed", None)]
    assert task["history"][1]["worker"] == "h:1"
    assert task["progress"] == 0.5
    assert all(a["ts"] <= b["ts"] for a, b in zip(task["history"], task["history"][1:], strict=False))


async def test_updates_are_followed_while_a_client_is_connected_and_again_for_the_next(client: Client) -> None:
    """With nobody watching the API stops reading updates; the next client still misses none."""
    hub = client.app[asyncnode.HUB_KEY]
    assert not hub.live.is_set()  # no client yet: nothing read

    first = await connect(client)
    await asyncio.wait_for(hub.live.wait(), 5)
    tid = await submit(client, {"type": "noop"})
    await first.next_matching(update_of(tid, "pending"), what="the first client's update")
    await first.ws.close()

    async def stopped_following() -> bool:
        await submit(client, {"type": "noop"})  # the first update nobody wants ends the following
        return not hub.live.is_set()

    await wait_for(stopped_following, 10, "the relay to stop following the store")

    second = await connect(client)
    await asyncio.wait_for(hub.live.wait(), 5)
    tid = await submit(client, {"type": "reverse", "payload": {"text": "again"}})
    await second.next_matching(update_of(tid, "pending"), what="the second client's update")


# -- a client too slow to keep up -----------------------------------------------------------------------------------

#: The slow client's receive buffer: small, so the server's writes to it back up soon.
STALLED_RCVBUF = 4096
#: Progress updates written per round of the flood, and the most rounds before the slow client must be gone.
ROUND, MAX_ROUNDS = 1000, 100
#: How late the client that reads may get the last update of a round.
PROMPT = 1.0


def stalled_websocket(host: str, port: int) -> socket.socket:
    """A WebSocket client that completes the handshake, reading its answer and not one byte more, then never
    reads again (blocking: run it in a thread, the server shares this loop)."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)  # before connect: sets the window
        sock.settimeout(10)
        sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            assert byte, f"the server closed the connection during the handshake: {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 101 "), head
        return sock
    except BaseException:
        sock.close()
        raise


def close_code(sock: socket.socket, timeout: float) -> int | None:
    """Read the server's frames until its close frame; its status code (None at EOF without one)."""
    deadline = time.monotonic() + timeout
    buf = b""

    def need(n: int) -> bool:
        nonlocal buf
        while len(buf) < n:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(1 << 20)
            if not chunk:
                return False
            buf += chunk
        return True

    while need(2):
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(length, 0)
        if not need(start):
            return None
        if length == 126:
            length = struct.unpack(">H", buf[2:4])[0]
        elif length == 127:
            length = struct.unpack(">Q", buf[2:10])[0]
        if not need(start + length):
            return None
        payload, buf = buf[start : start + length], buf[start + length :]
        if opcode == 0x8:
            return int(struct.unpack(">H", payload[:2])[0])
    return None


async def test_a_client_that_stops_reading_is_dropped_without_slowing_the_others(client: Client) -> None:
    hub = client.app[asyncnode.HUB_KEY]
    tid = await submit(client, {"type": "reverse", "payload": {"text": "busy"}})
    await record(client, "started", tid, "reverse", {"worker": "test:1"})
    sock = await asyncio.to_thread(stalled_websocket, str(client.host), int(client.port))
    try:
        [slow] = hub.clients
        fast = await connect(client)
        assert len(hub.clients) == 2

        written, backlogs, lags = 0, [], []
        for _ in range(MAX_ROUNDS):
            if slow not in hub.clients:
                break
            fields = [{"progress": 0.5, "note": str(written + i)} for i in range(ROUND)]
            await asyncio.gather(*(record(client, "progress", tid, "reverse", f) for f in fields))
            written += ROUND
            last, sent_at = str(written - 1), time.monotonic()
            await fast.next_matching(progress_note(tid, last), 5, f"update {last}")
            lags.append(time.monotonic() - sent_at)
            backlogs.append(slow.backlog)
        assert slow not in hub.clients, f"still connected after {written} updates, {slow.backlog} behind"
        assert max(backlogs) >= asyncnode.WS_CLIENT_BUFFER - ROUND  # it was that far behind, still served
        stalled = [lag for lag, behind in zip(lags, backlogs, strict=True) if behind > 0]
        assert len(stalled) >= 3 and max(stalled) < PROMPT, (stalled, backlogs)

        # The other client is still served, promptly.
        await record(client, "progress", tid, "reverse", {"progress": 0.9, "note": "after the drop"})
        sent_at = time.monotonic()
        await fast.next_matching(progress_note(tid, "after the drop"), 5, "the update after the drop")
        assert time.monotonic() - sent_at < PROMPT
        assert len(hub.clients) == 1 and slow not in hub.clients

        # The slow one, reading at last, finds what was sent before, then the close: 1013 "try again later".
        assert await asyncio.to_thread(close_code, sock, 30) == 1013
    finally:
        sock.close()
