"""A bulk submit against single POSTs, on both backends: ``python bench/bulk.py``.

One API process and no worker. The same N ``noop`` tasks are submitted, in alternated order round after round:
  - single: one ``POST /api/tasks`` each, from --clients concurrent connections;
  - bulk: arrays of --size submissions per POST (``POST /api/tasks`` with an array), from --bulk-clients
    connections;
  - direct: ``asyncnode.Client.from_config(...).submit_many`` of --size at a time in this process (no HTTP hop:
    validation, the store writes and the confirmed publishes as the API makes them), --bulk-clients at once.
Accepted tasks per second over the first request's start to the last answer, then one ``GET /metrics`` after the
run is timed (it reads the deployment's counters from the store). Each trial has its own queue and key prefix,
or SQLite file, removed afterwards. Prints the machine, a Markdown table (median, min-max) with each mode's ratio
to ``single`` (the ratio of the medians), and the medians as JSON (--json PATH: every trial too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput
from throughput import (
    BACKENDS,
    _csv,
    cancel_on_signals,
    embedded_supported,
    http_session,
    lanes,
    machine,
    run_and_report,
)

import asyncnode  # importable now: throughput put the project's folder on sys.path

MODES = ("single", "bulk", "direct")


async def trial(backend: Any, mode: str, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """One mode's submission of --tasks tasks to a fresh deployment."""
    n, size = args.tasks, args.size
    async with throughput.cluster(backend, scratch) as c, http_session(max(args.clients, args.bulk_clients)) as session:
        c.start_api()
        await c.wait_ready(session, 0)
        await throughput.check_noop(session, c.base)
        accepted = 0
        body = b'{"type": "noop", "payload": {}}'
        batch = b"[" + b",".join([body] * size) + b"]"
        headers = {"Content-Type": "application/json"}

        async def post(data: bytes) -> None:
            nonlocal accepted
            async with session.post(f"{c.base}/api/tasks", data=data, headers=headers) as r:
                answer = await r.json()
                if r.status != 202:
                    raise RuntimeError(f"{r.status}: {answer}")
                accepted += len(answer["items"]) if "items" in answer else 1

        await post(body)  # warm up the API's connections
        accepted, refused = 0, list[str]()
        start = time.monotonic()
        if mode == "single":
            await lanes(lambda _: post(body), range(n), args.clients)
        elif mode == "bulk":
            await lanes(lambda _: post(batch), range(n // size), args.bulk_clients)
        else:
            async with asyncnode.Client.from_config(c.config) as client:
                items = [{"type": "noop", "payload": {}}] * size

                async def many(_: int) -> None:
                    nonlocal accepted
                    made = await client.submit_many(items)
                    accepted += sum(t.status == "pending" for t in made)
                    refused.extend(t.error or str(t.status) for t in made if t.status != "pending")

                await lanes(many, range(n // size), args.bulk_clients)
        elapsed = time.monotonic() - start
        c.check()
        t0 = time.monotonic()
        async with session.get(f"{c.base}/metrics") as r:
            assert r.status == 200, await r.text()
            await r.read()
        scrape = time.monotonic() - t0
    expected = n if mode == "single" else n // size * size
    if accepted != expected:
        raise RuntimeError(f"{mode}: {accepted} of {expected} tasks accepted; e.g. {refused[:1]}")
    return {"items": accepted, "seconds": elapsed, "rate": accepted / elapsed, "scrape_ms": scrape * 1000}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cancel_on_signals()
    info = await machine(args.backends, peers=False)
    results: dict[str, list[dict[str, Any]]] = {}
    async with throughput.workdir(Path(args.scratch)) as scratch:
        for round_no in range(args.rounds):
            for backend_name in args.backends:
                order = MODES[round_no % 3 :] + MODES[: round_no % 3]  # each mode goes first in turn
                for mode in order:
                    key = f"{backend_name}/{mode}"
                    try:
                        result = await trial(BACKENDS[backend_name], mode, args, scratch)
                    except Exception as e:  # one failed trial is reported, the rest still run
                        result = {"error": f"{type(e).__name__}: {e}"}
                    results.setdefault(key, []).append(result)
                    print(f"round {round_no + 1} {key}: {result}", file=sys.stderr, flush=True)
    return {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }


def report(out: dict[str, Any]) -> str:
    lines = [f"{k}: {v}" for k, v in out["machine"].items()]
    lines += ["", "| backend | mode | tasks/s median (min-max) | ratio to single | GET /metrics ms |"]
    lines += ["|---|---|---|---|---|"]
    medians: dict[str, float] = {}
    for key, trials in out["results"].items():
        ok = [t for t in trials if "error" not in t]
        if ok:
            medians[key] = statistics.median(t["rate"] for t in ok)
    for key, trials in out["results"].items():
        ok = [t for t in trials if "error" not in t]
        backend_name, mode = key.split("/")
        if not ok:
            lines.append(f"| {backend_name} | {mode} | failed: {trials[0]['error'][:80]} | | |")
            continue
        rates = [t["rate"] for t in ok]
        base = medians.get(f"{backend_name}/single")
        ratio = f"{medians[key] / base:.2f}" if base else "-"
        scrape = statistics.median(t["scrape_ms"] for t in ok)
        spread = f"{medians[key]:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"
        lines.append(f"| {backend_name} | {mode} | {spread} | {ratio} | {scrape:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    default = "rabbitmq,embedded" if embedded_supported() else "rabbitmq"
    parser.add_argument("--backends", type=_csv, default=_csv(default), help=f"default {default}")
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per trial (default 5000)")
    parser.add_argument("--size", type=int, default=500, help="submissions per bulk request (default 500)")
    parser.add_argument("--clients", type=int, default=32, help="connections posting single tasks (default 32)")
    parser.add_argument("--bulk-clients", type=int, default=4, help="bulk requests in flight (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--scratch", default="/tmp", help="where the trials' folders go")
    parser.add_argument("--json", type=Path, help="write every trial here")
    args = parser.parse_args()
    return run_and_report(run(args), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
