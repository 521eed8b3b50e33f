"""How fast ``GET /api/tasks`` searches 100,000 retained tasks, on both backends: ``python bench/search.py``.

For each backend, --tasks (100,000) tasks are recorded through the store's own ``apply`` (as the API and the
workers record them: each a submission, then for a fifth a completion with a result and for a twentieth a
failure with an error), with payloads of a customer (one of 2,000), an order number and a few words of a
5,000-word vocabulary (a tenth of them among 20 common ones), under ``[tasks] max_recent`` = --tasks so that
every one is retained. Then an API in this process (aiohttp on a loopback port, through real HTTP) answers
each query --repeat (30) times, and the
table gives the median and the 95th percentile of the answer time, with the matches' total: the first page
of everything; a common word (in ~3% of payloads); two words; a rare customer; a task's short and whole id; a
status; a status, type and queue; a time window; the fifth page of a common word, by cursor.

What the index costs a write: the same records made with the words left out (Change.words empty: a status
change still moves the task between status sets) against with them, as tasks recorded per second over
--probe (5,000) tasks, alternated three times; and what it takes in Redis's memory (INFO used_memory before
and after) or the SQLite file, per task.

Each backend runs on its own ``[redis] key_prefix`` (``benchsearch-<hex>``) or SQLite file in a temporary
folder, all removed afterwards (also when interrupted). Prints the machine, Markdown tables and the figures
as JSON (--json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REDIS_URL, delete_keys, delete_queues, machine

import asyncnode

#: Words of the payloads (a tenth of a text's words are among the first HOT: each in ~3% of payloads),
#: customers, and how many words a payload's text has.
VOCABULARY = 5000
HOT = 20
CUSTOMERS = 2000
TEXT_WORDS = 6


def word(i: int) -> str:
    """The vocabulary's i-th word (letters only: ``ka``, ``kb``, ...)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        out = letters[i % 26] + out
        i //= 26
        if i == 0:
            return "k" + out


def write_config(folder: Path, backend: str, tag: str, tasks: int) -> Path:
    lines = [f"[tasks]\nmax_recent = {tasks}\nresult_ttl = 0\n", "[queues.default]\n[queues.mail]\n"]
    if backend == "embedded":
        lines.append(f'[embedded]\npath = "{folder / "asyncnode.db"}"\n')
    else:
        lines.append(f'[broker]\nurl = "amqp://guest:guest@127.0.0.1:5672/"\nqueue = "{tag}"\n')
        lines.append(f'[redis]\nurl = "{REDIS_URL}"\nkey_prefix = "{tag}:"\nchannel = "{tag}:updates"\n')
    path = folder / "config.toml"
    path.write_text("\n".join(lines))
    return path


def changes(n: int, rng: random.Random, cfg: asyncnode.Config, start: float) -> list[list[asyncnode.Change]]:
    """Per task, the changes that record it (submitted; a fifth completed, a twentieth failed)."""
    out = []
    for i in range(n):
        tid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        queue = "mail" if i % 10 == 0 else "default"
        ttype = "reverse" if i % 3 else "noop"
        text = " ".join(
            word(rng.randrange(HOT) if rng.random() < 0.1 else rng.randrange(VOCABULARY)) for _ in range(TEXT_WORDS)
        )
        payload = {"customer": f"cust{rng.randrange(CUSTOMERS)}", "order": rng.randrange(10**8), "text": text}
        at = start + i * 0.01
        fields = {"payload": payload, "queue": queue}
        steps = [asyncnode.plan_change("submitted", tid, ttype, fields, tasks=cfg.tasks, now=at)]
        if i % 5 == 0:
            result = {"reversed": text[::-1], "chars": len(text)}
            steps.append(asyncnode.plan_change("completed", tid, ttype, {"result": result}, tasks=cfg.tasks, now=at))
        elif i % 20 == 1:
            error = f"KeyError: 'field {i % 7}' missing in {word(i % 50)}"
            steps.append(asyncnode.plan_change("failed", tid, ttype, {"error": error}, tasks=cfg.tasks, now=at))
        out.append(steps)
    return out


async def record(store: asyncnode.TaskStore, tasks: list[list[asyncnode.Change]], words: bool = True) -> float:
    """Make every change, 500 tasks at a time; tasks recorded per second."""
    started = time.perf_counter()
    for i in range(0, len(tasks), 500):
        chunk = tasks[i : i + 500]
        for step in range(2):
            batch = [t[step] for t in chunk if len(t) > step]
            if not words:
                batch = [dataclasses.replace(c, words=(), reindex=False) for c in batch]
            await asyncio.gather(*(store.apply(c) for c in batch))
    return len(tasks) / (time.perf_counter() - started)


async def stored_bytes(backend: str, cfg: asyncnode.Config) -> int:
    """Redis's used memory, or the SQLite file's size with its WAL."""
    if backend == "embedded":
        path = Path(cfg.embedded.path)
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    client = aioredis.from_url(REDIS_URL)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def api(cfg: asyncnode.Config) -> AsyncIterator[str]:
    """The API in this process on a loopback port; its base URL."""
    runner = web.AppRunner(asyncnode.make_app(cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def time_query(session: aiohttp.ClientSession, base: str, params: dict[str, str], repeat: int) -> dict[str, Any]:
    """Median and p95 of ``GET /api/tasks?params`` (ms), and the total it answers."""
    times, total = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        async with session.get(base + "/api/tasks", params=params) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        times.append((time.perf_counter() - started) * 1000)
        total = body["total"]
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(len(times) * 0.95) - 1], "total": total}


async def fifth_page(session: aiohttp.ClientSession, base: str, params: dict[str, str]) -> dict[str, str]:
    """The query of the fifth page of ``params`` (its cursor)."""
    params = dict(params)
    for _ in range(4):
        async with session.get(base + "/api/tasks", params=params) as resp:
            nxt = (await resp.json())["next"]
        assert nxt, "fewer than five pages"
        params["cursor"] = nxt
    return params


async def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="benchsearch-"))
    tag = f"benchsearch-{uuid.uuid4().hex[:10]}"
    cfg = asyncnode.Config.from_toml(write_config(folder, backend, tag, args.tasks), env={})
    rng = random.Random(17)
    queue, store = asyncnode.open_backend(cfg, "api")
    figures: dict[str, Any] = {}
    try:
        await queue.connect()
        before = await stored_bytes(backend, cfg)
        tasks = changes(args.tasks, rng, cfg, time.time() - args.tasks * 0.01)
        figures["fill_per_s"] = await record(store, tasks)
        figures["bytes_per_task"] = (await stored_bytes(backend, cfg) - before) / args.tasks
        sample = tasks[len(tasks) // 2][0]
        customer = sample.fields["payload"]["customer"]  # type: ignore[index]
        common, span = word(0), args.tasks * 0.01
        queries = {
            "everything, first page": {},
            f"a common word (q={common})": {"q": common},
            "two words": {"q": f"{common} {word(11)}"},
            f"a customer (q={customer})": {"q": customer},
            "a short id": {"q": sample.tid[:8]},
            "a whole id": {"q": sample.tid},
            "status=failed": {"status": "failed"},
            "status + type + queue": {"status": "completed", "type": "reverse", "queue": "default"},
            "a time window (a tenth)": {"since": str(sample.at - span / 20), "until": str(sample.at + span / 20)},
        }
        timeout = aiohttp.ClientTimeout(total=60)
        async with api(cfg) as base, aiohttp.ClientSession(timeout=timeout) as session:
            queries["a common word, fifth page"] = await fifth_page(session, base, {"q": common})
            figures["queries"] = {}
            for name, params in queries.items():
                figures["queries"][name] = await time_query(session, base, {"limit": "50", **params}, args.repeat)
        cost: dict[str, list[float]] = {"with words": [], "without": []}
        for _ in range(3):
            for words in (True, False):
                probe = changes(args.probe, rng, cfg, time.time())
                cost["with words" if words else "without"].append(await record(store, probe, words))
        figures["write_per_s"] = {k: statistics.median(v) for k, v in cost.items()}
    finally:
        await queue.close()
        await store.close()
        shutil.rmtree(folder, ignore_errors=True)
        if backend != "embedded":
            await delete_keys(tag + ":")
            await delete_queues(asyncnode.broker_queues(cfg))
    return figures


def report(results: dict[str, dict[str, Any]], info: dict[str, Any], tasks: int) -> str:
    lines = [f"Machine: {', '.join(f'{k} {v}' for k, v in info.items())}", ""]
    names = list(next(iter(results.values()))["queries"])
    heads = " | ".join(f"{b} p50 / p95 (ms) | {b} total" for b in results)
    lines += [f"| query on {tasks:,} tasks | {heads} |", "|---|" + "---:|---:|" * len(results)]
    for name in names:
        cells = []
        for r in results.values():
            q = r["queries"][name]
            cells += [f"{q['p50_ms']:.1f} / {q['p95_ms']:.1f}", f"{q['total']:,}"]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| backend | recorded/s with words | without | ratio | bytes per task |", "|---|---:|---:|---:|---:|"]
    for backend, r in results.items():
        w = r["write_per_s"]
        ratio = w["with words"] / w["without"]
        lines.append(
            f"| {backend} | {w['with words']:.0f} | {w['without']:.0f} | {ratio:.2f} | {r['bytes_per_task']:.0f} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="rabbitmq,embedded")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--probe", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    backends = args.backends.split(",")
    info = await machine(backends, peers=False)
    results = {b: await run_backend(b, args) for b in backends}
    print(report(results, info, args.tasks))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
