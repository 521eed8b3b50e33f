"""End to end: real ``asyncnode.py`` processes on both backends.

HTTP submit → Redis + RabbitMQ (or the embedded file) → worker processes →
Redis pub/sub (or the file's updates) → WebSocket, plus the shutdown and crash
paths (SIGTERM mid-task, SIGTERM of the API, SIGKILL of a worker before it
acknowledged).  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

import asyncnode
from tests.conftest import Proc, cleanup, free_port, queue_counts, wait_for, write_config

SENDER = "noreply@asyncnode.test"

#: Every request of these tests (and a WebSocket's handshake) ends within this.
TIMEOUT = aiohttp.ClientTimeout(total=15)

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def base_url(cfg: asyncnode.Config) -> str:
    return f"http://127.0.0.1:{cfg.api.port}"


def check_alive(*procs: Proc) -> None:
    """Fail at once, with its log, if a process we wait on has died."""
    for p in procs:
        if p.popen.poll() is not None:
            raise AssertionError(f"{p.role} pid {p.pid} exited with {p.popen.returncode}:\n{p.log()}")


async def consumers(cfg: asyncnode.Config) -> int:
    """Consumers of the work queue, or -1 while it does not exist yet."""
    try:
        return (await queue_counts(cfg))[1]
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return -1


async def wait_api(session: aiohttp.ClientSession, cfg: asyncnode.Config, api: Proc) -> None:
    """Wait until the API answers."""

    async def answers() -> bool:
        check_alive(api)
        try:
            async with session.get(base_url(cfg) + "/api/task-types") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(answers, timeout=20, what="the API to answer GET /api/task-types")
    # Nothing more: a WebSocket client that connects is answered once the relay follows the updates.


async def wait_consumers(cfg: asyncnode.Config, n: int, *workers: Proc) -> None:
    async def ready() -> bool:
        check_alive(*workers)
        return await consumers(cfg) == n

    await wait_for(ready, timeout=20, what=f"{n} consumer(s) on the work queue")


async def get_task(session: aiohttp.ClientSession, cfg: asyncnode.Config, tid: str) -> dict[str, Any]:
    async with session.get(f"{base_url(cfg)}/api/tasks/{tid}") as r:
        assert r.status == 200, await r.text()
        rec: dict[str, Any] = await r.json()
        return rec


async def submit(session: aiohttp.ClientSession, cfg: asyncnode.Config, ttype: str, payload: dict[str, Any]) -> str:
    async with session.post(base_url(cfg) + "/api/tasks", json={"type": ttype, "payload": payload}) as r:
        body = await r.json()
        assert r.status == 202, body
        assert body["status"] == "pending"
        assert r.headers["Location"] == f"/api/tasks/{body['id']}"
        tid: str = body["id"]
        return tid


async def wait_status(
    session: aiohttp.ClientSession,
    cfg: asyncnode.Config,
    tid: str,
    status: str,
    *procs: Proc,
    timeout: float = 15,
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        check_alive(*procs)
        rec = await get_task(session, cfg, tid)
        return rec if rec["status"] == status else None

    rec: dict[str, Any] = await wait_for(check, timeout=timeout, what=f"task {tid} to be {status}")
    return rec


class WsCollector:
    """Reads every frame of a WebSocket in the background, grouping updates by task id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.updates: dict[str, list[dict[str, Any]]] = {}
        self.frames = 0
        self.closed: aiohttp.WSMessage | None = None
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            # A frame is one update or a JSON array of updates.
            items = data if isinstance(data, list) else [data]
            assert items, "empty batch frame"
            for item in items:
                assert isinstance(item, dict), item
                if "stats" in item:  # the dashboard's once-a-second figures, not a task update
                    continue
                self.updates.setdefault(item["id"], []).append(item)
            self.frames += 1

    def statuses(self, tid: str) -> list[str]:
        return [u["status"] for u in self.updates.get(tid, [])]

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        async def check() -> bool:
            if self._task.done():
                self._task.result()  # re-raise what stopped the reader
                raise AssertionError(f"WebSocket closed while waiting for {what}")
            return done()

        await wait_for(check, timeout=timeout, what=what)

    async def close(self) -> None:
        """Close the WebSocket and wait for the reader to end (cancelled if it overstays)."""
        try:
            await self.ws.close()
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# --------------------------------------------------------------------------
# SMTP server
# --------------------------------------------------------------------------


class RecordingHandler:
    """aiosmtpd handler keeping every envelope it is given."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Controller, RecordingHandler]]:
    handler = RecordingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, handler
    finally:
        controller.stop()


@pytest.fixture
async def smtp_config(
    backend: str, tag: str, tmp_path: Path, smtp_server: tuple[Controller, RecordingHandler]
) -> AsyncIterator[Path]:
    """Like ``config_file``, with ``[smtp]`` pointing at the test's SMTP server."""
    controller, _ = smtp_server
    path = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        smtp={"host": "127.0.0.1", "port": controller.port, "sender": SENDER, "timeout": 15.0},
    )
    yield path
    await cleanup(tag)


# --------------------------------------------------------------------------
# The tasks of the mixed run: (type, payload, check of the result)
# --------------------------------------------------------------------------

REVERSE_TEXTS = [
    "hello world",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🎉🚀 mix",
    "Ωmega ≠ alpha",
    "a\u0301bc combining",
    "Привет, мир",
    "مرحبا بالعالم",
    "tab\tand\nnewline",
    'quotes " and \\ backslash',
    "",
    "x" * 2000,
    "palindrome: racecar",
    "\U0001d518\U0001d52b\U0001d526 astral \U0001f600",  # outside the BMP
]
SENTIMENTS = [
    ("I love this, it is wonderful and amazing!", "positive"),
    ("What a fantastic, happy day :)", "positive"),
    ("Great work, thank you so much!", "positive"),
    ("Je suis très heureux, this is excellent 😊", "positive"),
    ("This is terrible, I hate it and it is awful.", "negative"),
    ("Horrible service, the worst experience ever.", "negative"),
    ("I am sad and angry about this failure.", "negative"),
    ("The table is made of wood.", "neutral"),
    ("The meeting is at 3 pm in room 12.", "neutral"),
    ("Der Zug fährt um 9 Uhr ab.", "neutral"),
    ("It is a chair.", "neutral"),
    ("Ürün kutusu mavi renkte.", "neutral"),
]
SLEEPS = [0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.05, 0.2, 0.11, 0.2, 0.07, 0.19]
NOOPS = 8
EMAILS = [
    ("alice@example.com", "Hello Alice", "Plain body."),
    ("bob.smith@example.org", "Grüße aus asyncnode 🎉", "Körper mit Ümlauten.\nZweite Zeile."),
    ("carol+tag@mail.example.net", "Report #3", "Line one\n.\nLine after a lone dot."),
    ("dave_99@sub.example.com", "Last one", "Bye."),
]


def mixed_tasks() -> list[tuple[str, dict[str, Any], Callable[[Any], None]]]:
    out: list[tuple[str, dict[str, Any], Callable[[Any], None]]] = []

    def reverse_check(text: str) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            assert result == text[::-1]

        return check

    def sentiment_check(label: str) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            assert result["label"] == label, result
            assert set(result) == {"label", "compound", "pos", "neu", "neg"}

        return check

    def sleep_check(seconds: float) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            assert result["slept"] >= seconds, (result, seconds)

        return check

    def noop_check(result: Any) -> None:
        assert result is None

    def email_check(to: str) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            assert result["to"] == to
            assert result["message_id"].startswith("<") and result["message_id"].endswith(">")

        return check

    out += [("reverse", {"text": t}, reverse_check(t)) for t in REVERSE_TEXTS]
    out += [("sentiment", {"text": t}, sentiment_check(label)) for t, label in SENTIMENTS]
    out += [("sleep", {"seconds": s}, sleep_check(s)) for s in SLEEPS]
    out += [("noop", {}, noop_check) for _ in range(NOOPS)]
    out += [("email", {"to": to, "subject": s, "body": b}, email_check(to)) for to, s, b in EMAILS]
    # Interleave the types so both workers see a mix.
    return out[::2] + out[1::2]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


async def test_fifty_mixed_tasks_end_to_end(
    smtp_config: Path,
    smtp_server: tuple[Controller, RecordingHandler],
    procs: Callable[..., Proc],
) -> None:
    cfg = asyncnode.Config.from_toml(smtp_config, env={})
    _, smtp = smtp_server
    tasks = mixed_tasks()
    assert len(tasks) == 50

    api = procs("api", smtp_config)
    workers = [procs("worker", smtp_config), procs("worker", smtp_config)]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_api(session, cfg, api)
        await wait_consumers(cfg, 2, *workers)

        ws = WsCollector(await session.ws_connect(base_url(cfg) + "/ws"))
        try:
            ids = await asyncio.gather(*(submit(session, cfg, t, p) for t, p, _ in tasks))
            assert len(set(ids)) == 50

            await ws.until(
                lambda: all("completed" in ws.statuses(tid) for tid in ids),
                timeout=60,
                what="every task to be completed on the WebSocket",
            )
            records = await asyncio.gather(*(get_task(session, cfg, tid) for tid in ids))
        finally:
            await ws.close()

    check_alive(api, *workers)
    worker_pids = {str(w.pid) for w in workers}
    seen_pids: set[str] = set()
    for tid, rec, (ttype, payload, check) in zip(ids, records, tasks, strict=True):
        where = f"task {tid} ({ttype} {payload!r})"
        # The stored record.
        assert rec["status"] == "completed", (where, rec)
        assert rec["type"] == ttype and rec["payload"] == payload, (where, rec)
        assert rec["attempts"] == 1, (where, rec)
        assert rec["error"] is None, (where, rec)
        check(rec["result"])
        assert rec["created_at"] <= rec["started_at"] <= rec["finished_at"], (where, rec)
        host, _, pid = rec["worker"].rpartition(":")
        assert host and pid in worker_pids, (where, rec["worker"], worker_pids)
        seen_pids.add(pid)

        # The updates on the WebSocket: pending → started (+ progress) → completed, nothing lost.
        updates = ws.updates[tid]
        statuses = [u["status"] for u in updates]
        assert statuses[0] == "pending" and statuses[-1] == "completed", (where, statuses)
        assert len(statuses) >= 3 and set(statuses[1:-1]) == {"started"}, (where, statuses)
        seqs = [u["seq"] for u in updates]
        assert seqs == list(range(1, len(seqs) + 1)), (where, seqs)
        assert seqs[-1] == rec["seq"], (where, seqs, rec["seq"])
        assert all(u["type"] == ttype for u in updates), (where, updates)
        assert updates[0]["attempts"] == 0 and updates[1]["attempts"] == 1, (where, updates[:2])
        assert updates[1]["worker"] == rec["worker"], (where, updates[1])
        for u in updates[2:-1]:
            assert ttype == "sleep" and 0 <= u["progress"] <= 1, (where, u)
        # A null result (noop) is left out of the update message.
        ws_result = updates[-1].get("result")
        check(ws_result)
        assert ws_result == rec["result"], (where, updates[-1])

    assert seen_pids == worker_pids, f"tasks ran only on {seen_pids}, workers are {worker_pids}"

    # Each e-mail reached the SMTP server with the headers the result names.
    by_to = {e.rcpt_tos[0]: e for e in smtp.envelopes}
    assert len(smtp.envelopes) == len(EMAILS) == len(by_to), [e.rcpt_tos for e in smtp.envelopes]
    for tid, rec, (ttype, payload, _) in zip(ids, records, tasks, strict=True):
        if ttype != "email":
            continue
        envelope = by_to[payload["to"]]
        assert envelope.mail_from == SENDER
        assert envelope.rcpt_tos == [payload["to"]]
        assert isinstance(envelope.original_content, bytes)
        msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        assert msg["To"] == payload["to"]
        assert msg["From"] == SENDER
        assert msg["Subject"] == payload["subject"]
        assert msg["Message-ID"] == rec["result"]["message_id"]
        assert msg["X-Asyncnode-Task"] == tid
        # On the wire lines end in CRLF; a lone "." line was dot-stuffed and unstuffed.
        assert msg.get_content().replace("\r\n", "\n").rstrip("\n") == payload["body"]


async def test_worker_sigterm_mid_task_finishes_and_acks(
    config_file: Path, cfg: asyncnode.Config, procs: Callable[..., Proc]
) -> None:
    api = procs("api", config_file)
    worker = procs("worker", config_file)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_api(session, cfg, api)
        await wait_consumers(cfg, 1, worker)

        tid = await submit(session, cfg, "sleep", {"seconds": 1.5})
        await wait_status(session, cfg, tid, "started", api, worker)
        sent_at = time.time()
        worker.signal(signal.SIGTERM)

        assert await worker.wait(timeout=15) == 0, worker.log()
        rec = await get_task(session, cfg, tid)

    # Finished after the signal, by this worker, once.
    assert rec["status"] == "completed", rec
    assert rec["attempts"] == 1, rec
    assert rec["result"]["slept"] >= 1.5, rec
    assert rec["finished_at"] >= sent_at, (rec, sent_at)
    assert rec["worker"].endswith(f":{worker.pid}"), rec
    # Acked, not handed back: nothing ready, nothing dead-lettered, nobody consuming.
    assert await queue_counts(cfg) == (0, 0)
    assert await queue_counts(cfg, cfg.broker.queue + asyncnode.DLQ_SUFFIX) == (0, 0)
    log = worker.log()
    assert "stopping: finishing 1 task(s) in hand" in log, log
    assert "stopped after 1 task(s)" in log, log


async def test_api_sigterm_closes_websockets(
    config_file: Path, cfg: asyncnode.Config, procs: Callable[..., Proc]
) -> None:
    api = procs("api", config_file)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_api(session, cfg, api)
        async with session.ws_connect(base_url(cfg) + "/ws") as ws:
            api.signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == 1001, msg
            assert msg.extra == "server shutdown", msg
            assert ws.close_code == 1001
    assert await api.wait(timeout=15) == 0, api.log()


async def test_redelivered_task_runs_after_worker_killed(
    config_file: Path, cfg: asyncnode.Config, procs: Callable[..., Proc]
) -> None:
    api = procs("api", config_file)
    first = procs("worker", config_file)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await wait_api(session, cfg, api)
        await wait_consumers(cfg, 1, first)

        tid = await submit(session, cfg, "sleep", {"seconds": 3})
        started = await wait_status(session, cfg, tid, "started", api, first)
        assert started["attempts"] == 1 and started["worker"].endswith(f":{first.pid}"), started
        first.signal(signal.SIGKILL)
        assert await first.wait(timeout=10) == -signal.SIGKILL

        second = procs("worker", config_file)
        rec = await wait_status(session, cfg, tid, "completed", api, second, timeout=25)

    assert rec["attempts"] == 2, rec
    assert rec["worker"].endswith(f":{second.pid}"), rec
    assert rec["result"]["slept"] >= 3, rec
    assert await queue_counts(cfg) == (0, 1)
    assert await queue_counts(cfg, cfg.broker.queue + asyncnode.DLQ_SUFFIX) == (0, 0)


async def test_concurrency_runs_async_tasks_side_by_side_and_no_more(
    backend: str, tag: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.toml", tag, backend=backend, worker={"concurrency": 3})
    cfg = asyncnode.Config.from_toml(config, env={})
    api = procs("api", config)
    worker = procs("worker", config)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await wait_api(session, cfg, api)
            await wait_consumers(cfg, 1, worker)
            ids = [await submit(session, cfg, "sleep", {"seconds": 1.0}) for _ in range(4)]
            recs = [await wait_status(session, cfg, tid, "completed", api, worker, timeout=20) for tid in ids]
    finally:
        await cleanup(tag)
    assert {r["worker"] for r in recs} == {f"{recs[0]['worker'].rpartition(':')[0]}:{worker.pid}"}, recs
    starts = sorted(r["started_at"] for r in recs)
    # Three ran side by side in the one process; the fourth, in hand meanwhile, only once one had finished.
    assert starts[2] - starts[0] < 0.8, starts
    assert starts[3] >= min(r["finished_at"] for r in recs) - 0.01, recs
