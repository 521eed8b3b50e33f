"""WebSocket fan-out figures for the README: ``python bench/fanout.py``.

One API process (no worker), ``--clients`` WebSocket clients on ``/ws`` spread over
``--procs`` client processes, and updates produced at ``--rate`` per second for
``--seconds`` straight into the backend's update path, the way workers produce them:
  - RabbitMQ + Redis: ``PUBLISH`` on the deployment's ``[redis] channel`` of messages shaped
    like asyncnode's own (``{"id","type","status","ts","seq"}``, ``ts`` taken at publish);
  - embedded: ``TaskStore.update`` on the SQLite file, from a store opened as a worker's.
Every client must receive every update: lost is expected minus received, per client and
in total; lag is the time a client received an update minus its ``ts``, over every update
of every client. ``{"stats": ...}`` messages are ignored. Each trial starts its API afresh
on its own channel and key prefix or its own file and removes them afterwards; prints a
Markdown table (target: zero lost, p99 lag at most 100 ms).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncnode  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import throughput  # noqa: E402
from throughput import (  # noqa: E402
    BACKENDS,
    START_TIMEOUT,
    Backend,
    cluster,
    cpu_seconds,
    http_session,
    kill_leftovers,
    run_and_report,
)

Metrics = dict[str, Any]

#: The issue's target: every update reaches every client, and the p99 lag stays within this.
TARGET_P99_MS = 100.0
#: Connections each client process opens at once (the API listens with a backlog of 128).
CONNECT_CONCURRENCY = 25
#: Seconds a trial waits after the last update for every client to have it before counting losses.
DRAIN_TIMEOUT = 10.0
#: Seconds between the last client connecting and the first update (the API settles its new clients).
SETTLE = 1.0
#: Seconds of publishing over which the lag is also summed up, to show when it was high.
SLICE = 0.5
#: The status and type every produced update carries.
UPDATE_STATUS, UPDATE_TYPE = "started", "noop"


# ============================================================================
# Harness: the run's machine, options and signals (bench/memory.py uses them too)
# ============================================================================

# Processes, backends and the cluster of a trial are bench/throughput.py's.


async def machine(backends: list[str]) -> dict[str, Any]:
    """What the figures were measured on."""
    return await throughput.machine(backends, peers=False)


def describe_machine(info: dict[str, Any]) -> list[str]:
    """Report lines on the machine and its load."""
    services = ", ".join(f"{k} {info[k]}" for k in ("RabbitMQ", "Redis", "SQLite") if k in info)
    return [
        f"- Machine: {info['cores']} cores, {info['cpu']}; {info['os']}; Python {info['Python']}; {services}",
        f"- Load average at start / end: {info['load average at start']} / {info['load average at end']}",
    ]


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    """``--backend rabbitmq,embedded`` (default rabbitmq)."""
    parser.add_argument(
        "--backend",
        dest="backends",
        default=["rabbitmq"],
        type=parse_backends,
        help="comma-separated: rabbitmq, embedded (default rabbitmq)",
    )


def parse_backends(text: str) -> list[str]:
    """``--backend rabbitmq,embedded``."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown}; choose from {', '.join(BACKENDS)}")
    return names


#: Set by SIGINT or SIGTERM: a cancellation can be swallowed (redis-py, while it connects), this cannot.
_INTERRUPTED: list[bool] = []


def on_signals_cancel_main() -> None:
    """SIGINT and SIGTERM cancel the running main task (also in the background, where SIGINT is ignored)."""
    main_task = asyncio.current_task()
    assert main_task is not None

    def interrupt() -> None:
        _INTERRUPTED.append(True)
        main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, interrupt)


def check_interrupted() -> None:
    """Raise CancelledError if the run was interrupted, even though a cancellation was swallowed on the way."""
    if _INTERRUPTED:
        raise asyncio.CancelledError


async def finish(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended (cancelling again: redis-py can swallow one while connecting)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()  # retrieved: what ended it is reported elsewhere, if at all


# ============================================================================
# Client processes: many WebSocket clients each, counting updates and lags
# ============================================================================


class Frame:
    """One frame's updates, parsed once for every client of the process that receives the same text."""

    __slots__ = ("indexes", "others", "stamps")

    def __init__(self, text: str, slot: dict[str, int], expected: int) -> None:
        width = len(slot)
        self.indexes: list[int] = []  # which update (0..expected-1) each one is
        self.stamps: list[float] = []  # its ts
        self.others = 0  # updates that are none of ours (a snapshot of something else)
        data = json.loads(text)
        for update in data if isinstance(data, list) else (data,):
            k = slot.get(update.get("id"))
            if k is None:
                self.others += "stats" not in update
                continue
            # Update n went to id n % width with seq n // width + 1 (see the producers).
            n = (update["seq"] - 1) * width + k
            if 0 <= n < expected:
                self.indexes.append(n)
                self.stamps.append(update["ts"])
            else:
                self.others += 1


class FrameCache:
    """Parsed frames by their text: the clients of one process mostly receive the very same frames."""

    def __init__(self, slot: dict[str, int], expected: int, size: int = 1024) -> None:
        self.slot, self.expected, self.size = slot, expected, size
        self.frames: dict[str, Frame] = {}
        self.parsed = 0

    def get(self, text: str) -> Frame:
        """The parsed frame ``text``."""
        frame = self.frames.get(text)
        if frame is None:
            self.parsed += 1
            frame = self.frames[text] = Frame(text, self.slot, self.expected)
            if len(self.frames) > self.size:
                del self.frames[next(iter(self.frames))]
        return frame


class Receiver:
    """One WebSocket client: when it received which frame; tallied once the run is over."""

    __slots__ = ("arrivals", "closed", "count")

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, Frame]] = []
        self.count = 0  # updates received so far, duplicates included (checked afterwards)
        self.closed: str | None = None

    def tally(self, expected: int, lags: array.array[float], slices: dict[int, list[float]]) -> dict[str, Any]:
        """Received, duplicate and unexpected updates; each received update's lag goes to ``lags``, and into
        ``slices`` by when it was published: [updates, over the target, worst lag] per SLICE seconds."""
        got = bytearray(expected)
        received = duplicates = others = 0
        target = TARGET_P99_MS / 1000
        for t, frame in self.arrivals:
            others += frame.others
            for n, ts in zip(frame.indexes, frame.stamps, strict=True):
                if got[n]:
                    duplicates += 1
                    continue
                got[n] = 1
                received += 1
                lag = t - ts
                lags.append(lag)
                bucket = slices.get(int(ts / SLICE))
                if bucket is None:
                    bucket = slices[int(ts / SLICE)] = [0, 0, 0.0]
                bucket[0] += 1
                bucket[1] += lag > target
                bucket[2] = max(bucket[2], lag)
        return {
            "received": received,
            "frames": len(self.arrivals),
            "duplicates": duplicates,
            "unexpected": others,
            "closed": self.closed,
        }


async def _read(
    ws: aiohttp.ClientWebSocketResponse, rec: Receiver, cache: FrameCache, complete: Callable[[], None]
) -> None:
    """Note every update frame and when it came, until the socket closes; call ``complete`` once it has them all."""
    # The least work per frame, so that 250,000 updates a second do not make the load generator the bottleneck:
    # a frame's text is parsed once per process, and the tally waits for the end of the run.
    expected, now, text_type = cache.expected, time.time, aiohttp.WSMsgType.TEXT
    arrivals = rec.arrivals
    async for msg in ws:
        if msg.type != text_type:
            break
        t = now()
        text = msg.data
        if text.startswith('{"stats"'):
            continue
        frame = cache.get(text)
        arrivals.append((t, frame))
        if rec.count < expected:
            rec.count += len(frame.indexes)
            if rec.count >= expected:
                complete()
    rec.closed = f"closed by the API ({ws.close_code})"


async def _client_main(
    base: str, clients: int, ids: list[str], expected: int, conn: multiprocessing.connection.Connection
) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def on_command() -> None:
        try:
            commands.put_nowait(conn.recv())
        except (EOFError, OSError):  # the parent is gone: stop
            loop.remove_reader(conn.fileno())
            commands.put_nowait("stop")

    loop.add_reader(conn.fileno(), on_command)
    cache = FrameCache({tid: k for k, tid in enumerate(ids)}, expected)
    everything = asyncio.Event()
    incomplete = [0]

    def complete() -> None:
        incomplete[0] -= 1
        if incomplete[0] == 0:
            everything.set()

    receivers = [Receiver() for _ in range(clients)]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        errors: list[str] = []

        async def connect() -> aiohttp.ClientWebSocketResponse | None:
            async with gate:
                for attempt in range(5):
                    try:
                        return await session.ws_connect(f"{base}/ws", max_msg_size=0, autoping=True)
                    except (aiohttp.ClientError, OSError) as e:
                        if attempt == 4:
                            errors.append(f"{type(e).__name__}: {e}")
                        await asyncio.sleep(0.2 * (attempt + 1))
            return None

        opened = await asyncio.gather(*(connect() for _ in range(clients)))
        sockets = [ws for ws in opened if ws is not None]
        incomplete[0] = len(sockets)
        readers = [
            asyncio.create_task(_read(ws, rec, cache, complete)) for ws, rec in zip(sockets, receivers, strict=False)
        ]
        conn.send(("connected", len(sockets), errors[:3]))
        waiting_all = asyncio.create_task(everything.wait())
        while True:
            command = asyncio.create_task(commands.get())
            done, _ = await asyncio.wait({command, waiting_all}, return_when=asyncio.FIRST_COMPLETED)
            if waiting_all in done:
                conn.send(("complete", time.time()))
                waiting_all = asyncio.create_task(asyncio.Event().wait())  # report it once
            if command in done:
                if command.result() == "stop":
                    break
            else:
                command.cancel()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        waiting_all.cancel()
        lags: array.array[float] = array.array("d")
        slices: dict[int, list[float]] = {}
        per_client = [r.tally(expected, lags, slices) for r in receivers[: len(sockets)]]
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    loop.remove_reader(conn.fileno())
    os.set_blocking(conn.fileno(), True)  # uvloop's add_reader made it non-blocking: the results are megabytes
    conn.send(("results", per_client, lags.tobytes(), slices, cache.parsed))


def client_process(
    base: str, clients: int, ids: list[str], expected: int, conn: multiprocessing.connection.Connection
) -> None:
    """Entry point of one client process: ``clients`` WebSocket clients until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    # Each client keeps every frame it receives until the tally: with the cyclic collector on, its full passes
    # over hundreds of thousands of them would stall every client of the process, and show as lag.
    gc.disable()
    run: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):  # uvloop where installed: fewer cycles per frame, so the clients keep up
        import uvloop

        run = uvloop.run
    try:
        run(_client_main(base, clients, ids, expected, conn))
    except Exception as e:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class ClientProcess:
    """A client process and the parent's end of its pipe, read from the event loop."""

    def __init__(self, base: str, clients: int, ids: list[str], expected: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=client_process, args=(base, clients, ids, expected, child), daemon=True)
        self.process.start()
        child.close()
        _CLIENTS.add(self)
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._on_message)
        os.set_blocking(self.conn.fileno(), True)  # a message is read whole once it begins to arrive

    def _on_message(self) -> None:
        try:
            message = self.conn.recv()
        except BlockingIOError:  # woken for nothing
            return
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            message = ("error", f"client process {self.process.pid} exited with {self.process.exitcode}")
        self.messages.put_nowait(message)

    async def expect(self, kind: str, timeout: float, skip: tuple[str, ...] = ()) -> tuple[Any, ...]:
        """The next message not of a kind in ``skip``, which must be of ``kind``."""
        message = await asyncio.wait_for(self.messages.get(), timeout)
        while message[0] in skip:
            message = await asyncio.wait_for(self.messages.get(), timeout)
        if message[0] == "error":
            raise RuntimeError(f"client process {self.process.pid}: {message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"client process {self.process.pid}: expected {kind}, got {message[0]}")
        return tuple(message[1:])

    def cpu_seconds(self) -> float:
        """CPU time it has used so far."""
        return cpu_seconds(self.process.pid or 0)

    def stop(self) -> None:
        """Ask it to report and finish."""
        with contextlib.suppress(OSError):
            self.conn.send("stop")

    def unwatch(self) -> None:
        """Stop reading its pipe (from the event loop's thread)."""
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())

    def close(self) -> None:
        """Wait for it briefly, then kill it (by pid); close the pipe. Call ``unwatch`` first."""
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()
        _CLIENTS.discard(self)


#: Client processes started and not yet reaped, so that an interrupted run can still stop them.
_CLIENTS: set[ClientProcess] = set()


def _kill_clients() -> None:
    for c in list(_CLIENTS):
        if c.process.is_alive():
            c.process.kill()
        c.process.join(5)
        _CLIENTS.discard(c)


# ============================================================================
# Producers: updates into the backend's update path at a steady rate
# ============================================================================


async def _paced(total: int, rate: float, emit: Any) -> tuple[float, float]:
    """Call ``emit(first, last)`` for the updates due so far, every millisecond or so, until ``total`` are out."""
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            await emit(sent, due)
            sent = due
        await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    return start, time.monotonic()


def bare_update(tid: str) -> asyncnode.Change:
    """An update of task ``tid`` and nothing else: no history, no counter, no guard (the fan-out's load)."""
    now = time.time()
    head = asyncnode.dumps({"id": tid, "type": UPDATE_TYPE, "status": UPDATE_STATUS, "ts": now})[:-1]
    return asyncnode.Change(tid=tid, status=UPDATE_STATUS, at=now, head=head, fields={"status": UPDATE_STATUS})


async def produce_redis(cfg: asyncnode.Config, ids: list[str], total: int, rate: float) -> Metrics:
    """PUBLISH update messages on the deployment's channel; n goes to id n % len(ids) with seq n // len(ids) + 1."""
    client = aioredis.from_url(cfg.redis.url)
    width, channel = len(ids), cfg.redis.channel
    unheard = 0

    async def emit(first: int, last: int) -> None:
        nonlocal unheard
        async with client.pipeline(transaction=False) as pipe:
            for n in range(first, last):
                pipe.publish(channel, bare_update(ids[n % width]).message(n // width + 1, 0))
            listeners = await pipe.execute()
        unheard += sum(1 for x in listeners if x < 1)

    try:
        start, end = await _paced(total, rate, emit)
    finally:
        await client.aclose()
    if unheard:
        raise RuntimeError(f"{unheard} updates published with no subscriber on {channel}: the API was not listening")
    return {"produced_per_s": total / (end - start), "produce_seconds": end - start}


async def produce_embedded(cfg: asyncnode.Config, ids: list[str], total: int, rate: float) -> Metrics:
    """Write updates with the TaskStore, as a worker does; seq per id counts up from 1 on fresh ids."""
    # A worker's store: updates come from workers, whose commits skip the fsync.
    _, store = asyncnode.open_backend(cfg, "worker")
    width = len(ids)
    writes: list[asyncio.Future[Any]] = []

    async def emit(first: int, last: int) -> None:
        # Queued in order without waiting: one id's updates commit in order, so its seq counts up.
        for n in range(first, last):
            writes.append(asyncio.ensure_future(store.apply(bare_update(ids[n % width]))))

    try:
        start, end = await _paced(total, rate, emit)
        results = await asyncio.gather(*writes)
    finally:
        await store.close()
    wrong = [r for n, r in enumerate(results) if r is None or r[0] != n // width + 1]
    if wrong:
        raise RuntimeError(f"{len(wrong)} updates got an unexpected seq (was the file fresh?)")
    return {"produced_per_s": total / (end - start), "produce_seconds": end - start}


PRODUCERS = {"rabbitmq": produce_redis, "embedded": produce_embedded}


# ============================================================================
# A trial
# ============================================================================


def percentiles(values: array.array[float], qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank percentiles of ``values`` (0..100 each)."""
    ordered = sorted(values)
    return [ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in qs]


async def fanout_trial(backend: Backend, args: argparse.Namespace, scratch: Path) -> Metrics:
    """One API, ``args.clients`` WebSocket clients, ``args.rate`` updates/s for ``args.seconds``."""
    total = round(args.rate * args.seconds)
    # As many ids as updates per second: each id gets one update a second, like a busy task.
    ids = [str(uuid.uuid4()) for _ in range(max(1, min(total, round(args.rate))))]
    spread = [args.clients // args.procs + (i < args.clients % args.procs) for i in range(args.procs)]
    async with cluster(backend, scratch) as c, http_session(4) as session:
        c.start_api()
        await c.wait_ready(session, 0)
        assert c.api is not None
        procs = [ClientProcess(c.base, n, ids, total) for n in spread if n]
        try:
            connected, errors = 0, []
            for p in procs:
                n, errs = await p.expect("connected", START_TIMEOUT)
                connected += n
                errors += errs
            if connected < args.clients:
                raise RuntimeError(f"only {connected} of {args.clients} clients connected, e.g. {errors}")
            await asyncio.sleep(SETTLE)
            c.check()
            cpu = (c.api.cpu_seconds(), sum(p.cpu_seconds() for p in procs))
            wall = time.monotonic()
            produced = await PRODUCERS[backend.name](c.cfg, ids, total, args.rate)
            check_interrupted()
            last_sent = time.time()
            # Every client process reports once all its clients hold every update; or the drain times out.
            finished: list[float] = []
            deadline = time.monotonic() + DRAIN_TIMEOUT
            for p in procs:
                with contextlib.suppress(TimeoutError):
                    (t,) = await p.expect("complete", max(0.01, deadline - time.monotonic()))
                    finished.append(t)
            wall = time.monotonic() - wall
            cpu = (c.api.cpu_seconds() - cpu[0], sum(p.cpu_seconds() for p in procs) - cpu[1])
            c.check()
            for p in procs:
                p.stop()
            per_client: list[dict[str, Any]] = []
            lags: array.array[float] = array.array("d")
            slices: dict[int, list[float]] = {}
            parsed = 0
            for p in procs:
                clients, raw, their_slices, their_parsed = await p.expect("results", 60, skip=("complete",))
                per_client += clients
                lags.frombytes(raw)
                parsed += their_parsed
                for key, (n, over, worst) in their_slices.items():
                    mine = slices.setdefault(key, [0, 0, 0.0])
                    mine[0], mine[1], mine[2] = mine[0] + n, mine[1] + over, max(mine[2], worst)
        finally:
            for p in procs:
                p.stop()
                p.unwatch()
            await asyncio.gather(*(asyncio.to_thread(p.close) for p in procs))
    lost = [total - x["received"] for x in per_client]
    first_slice = min(slices, default=0) * SLICE
    p50, p99 = percentiles(lags, (50, 99)) if lags else (float("nan"), float("nan"))
    return {
        "clients": len(per_client),
        "client_procs": len(procs),
        "updates": total,
        **produced,
        "lost": sum(lost),
        "clients_with_loss": sum(1 for x in lost if x),
        "most_lost_by_a_client": max(lost, default=0),
        "updates_per_frame": sum(x["received"] for x in per_client) / max(1, sum(x["frames"] for x in per_client)),
        "duplicates": sum(x["duplicates"] for x in per_client),
        "unexpected": sum(x["unexpected"] for x in per_client),
        "dropped_by_api": sum(1 for x in per_client if x["closed"]),
        "drain_s": max(0.0, max(finished) - last_sent) if len(finished) == len(procs) else None,
        "lag_p50_ms": p50 * 1000,
        "lag_p99_ms": p99 * 1000,
        "lag_max_ms": max(lags, default=float("nan")) * 1000,
        "api_cpu_pct": cpu[0] / wall * 100,
        "loadgen_cpu_pct": cpu[1] / wall * 100,
        "frames_parsed_per_received": parsed / max(1, sum(x["frames"] for x in per_client)),
        # Per SLICE seconds of publishing: when it was, updates delivered, how many later than the target, worst lag.
        "lag_by_slice": [
            {
                "t": round(key * SLICE - first_slice, 2),
                "updates": n,
                "over_target": over,
                "max_ms": round(worst * 1000, 1),
            }
            for key, (n, over, worst) in sorted(slices.items())
        ],
    }


# ============================================================================
# Report, main
# ============================================================================

#: Table columns: heading and metric.
COLUMNS = (
    ("clients (procs)", None),
    ("updates/s", "produced_per_s"),
    ("updates", "updates"),
    ("lost", "lost"),
    ("clients with loss", "clients_with_loss"),
    ("lag p50 (ms)", "lag_p50_ms"),
    ("p99 (ms)", "lag_p99_ms"),
    ("max (ms)", "lag_max_ms"),
    ("updates/frame", "updates_per_frame"),
    ("API CPU %", "api_cpu_pct"),
    ("load generator CPU %", "loadgen_cpu_pct"),
)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _cell(values: list[Any]) -> str:
    if not values:
        return "-"
    if len(set(values)) == 1:
        return _fmt(values[0])
    middle = statistics.median_low(values) if all(isinstance(v, int) for v in values) else statistics.median(values)
    return f"{_fmt(middle)} ({_fmt(min(values))}\u2013{_fmt(max(values))})"


def table(results: dict[str, list[Metrics]]) -> str:
    """Median and min-max of each metric per backend, as Markdown."""
    lines = ["| backend | runs | " + " | ".join(h for h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, trials in results.items():
        ok = [t for t in trials if "error" not in t]
        cells = []
        for _, key in COLUMNS:
            if key is None:
                cells.append(f"{ok[0]['clients']} ({ok[0]['client_procs']})" if ok else "-")
            else:
                cells.append(_cell([t[key] for t in ok if t.get(key) is not None]))
        lines.append(f"| {name} | {len(ok)}/{len(trials)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict[str, list[Metrics]]) -> list[str]:
    """Whether each backend met the issue's target in every run."""
    out = []
    for name, trials in results.items():
        ok = [t for t in trials if "error" not in t]
        if not ok:
            out.append(f"- {name}: no successful run")
            continue
        lost = max(t["lost"] for t in ok)
        p99 = max(t["lag_p99_ms"] for t in ok)
        met = lost == 0 and p99 <= TARGET_P99_MS and len(ok) == len(trials)
        out.append(
            f"- {name}: {'target met' if met else 'target NOT met'} "
            f"(worst run: {lost} lost, p99 {p99:.0f} ms; target 0 lost, p99 \u2264 {TARGET_P99_MS:.0f} ms)"
        )
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round runs every backend once, in the same order."""
    on_signals_cancel_main()
    info = await machine(args.backends)
    results: dict[str, list[Metrics]] = {name: [] for name in args.backends}
    with tempfile.TemporaryDirectory(prefix="asyncnode-fanout-") as scratch:
        for round_no in range(1, args.rounds + 1):
            for name in args.backends:
                t0 = time.monotonic()
                check_interrupted()
                try:
                    metrics = await fanout_trial(BACKENDS[name], args, Path(scratch))
                except Exception as e:  # one failed trial is reported; the others still run
                    traceback.print_exc()
                    metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                check_interrupted()
                metrics["round"] = round_no
                results[name].append(metrics)
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}
                print(f"round {round_no}/{args.rounds} {name} ({time.monotonic() - t0:.0f} s): {shown}", flush=True)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    params = {k: getattr(args, k) for k in ("clients", "procs", "rate", "seconds", "rounds")}
    return {"machine": info, "params": params, "results": results}


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters, the table and the verdict."""
    params = out["params"]
    return "\n".join(
        [
            *describe_machine(out["machine"]),
            f"- {params['clients']} WebSocket clients over {params['procs']} client processes, one API process; "
            f"{params['rate']} updates/s for {params['seconds']} s into the backend's update path; "
            f"{params['rounds']} round(s); median (min\u2013max)",
            "- Lost: updates a client never received (sum over clients); lag: receive time minus the update's "
            "`ts` (taken at publish), over every update of every client",
            "- CPU: % of one core over production and drain; the load generator is the client processes",
            "",
            table(out["results"]),
            "",
            *verdict(out["results"]),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500, help="WebSocket clients (default 500)")
    parser.add_argument("--procs", type=int, default=2, help="client processes they are spread over (default 2)")
    parser.add_argument("--rate", type=float, default=500.0, help="updates per second (default 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of updates (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each running every backend once (default 1)")
    add_backend_option(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 50 clients, 2 s")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write every trial's figures to PATH")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.rounds = min(args.clients, 50), min(args.seconds, 2.0), 1
    if args.clients < 1 or args.procs < 1 or args.rate <= 0 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--clients, --procs, --rate, --seconds and --rounds must be positive")
    args.procs = min(args.procs, args.clients)

    def cleanup() -> None:
        _kill_clients()
        kill_leftovers()

    return run_and_report(run(args), report, args.json, cleanup)


if __name__ == "__main__":
    sys.exit(main())
