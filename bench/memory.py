"""Memory figures for the README: ``python bench/memory.py``.

One API and ``--workers`` worker processes (2) run ``--tasks`` `noop` tasks (100,000),
submitted over HTTP by ``--clients`` concurrent clients (64), paced so that no more than
``--window`` tasks are ever submitted and not yet completed: what is measured is the
processes' own memory, not a queue backlog. One WebSocket client stays connected (as a
dashboard would), so the API relays every update too. The resident set size (VmRSS in
/proc/<pid>/status) of the API and of each worker is taken once they are up, after the
warm-up (5,000 tasks completed), at 25/50/75/100% of the tasks, and once more after a few
idle seconds. Targets (issue 7): worker RSS at most 40 MiB, API RSS at most 60 MiB, both
flat from the warm-up to the end. Each trial starts afresh on its own queue and key prefix
or its own file and removes them afterwards; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The harness (asyncnode processes on a fresh config, per backend, cleaned up afterwards) is bench/fanout.py's.
from fanout import add_backend_option, check_interrupted, describe_machine, finish, machine, on_signals_cancel_main
from throughput import BACKENDS, Backend, Cluster, cluster, http_session, run_and_report

Metrics = dict[str, Any]

#: The issue's targets, in MiB.
TARGET_API_MIB = 60.0
TARGET_WORKER_MIB = 40.0
#: Growth from the warm-up to the end, in MiB, still called flat.
FLAT_MIB = 3.0
#: The body of every submission.
NOOP_BODY = json.dumps({"type": "noop", "payload": {}}).encode()
#: Tasks completed before the first measurement that counts (capped at 5% of a smaller run).
WARM_UP = 5000
#: Seconds between polls of the completed count, and between samples of the time series.
POLL_INTERVAL = 0.1
SERIES_INTERVAL = 1.0
#: Seconds of idleness before the last sample.
IDLE_AFTER = 3.0


# ============================================================================
# Resident memory
# ============================================================================


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of process ``pid`` from /proc/<pid>/status, in MiB (nan if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def sample(c: Cluster) -> dict[str, float]:
    """VmRSS of the API and of each worker, in MiB, by process name."""
    assert c.api is not None
    out = {"API": rss_mib(c.api.pid)}
    for i, w in enumerate(c.workers, 1):
        out[f"worker {i}"] = rss_mib(w.pid)
    return out


# ============================================================================
# A trial
# ============================================================================


@dataclasses.dataclass
class Progress:
    """What the backend says has happened so far, and what the submitters have done."""

    issued: int = 0
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


async def submit_paced(
    session: aiohttp.ClientSession, base: str, body: bytes, args: argparse.Namespace, progress: Progress
) -> None:
    """POST ``args.tasks`` tasks from ``args.clients`` clients, never more than ``args.window`` ahead of completions."""
    todo = iter(range(args.tasks))
    url, headers = f"{base}/api/tasks", {"Content-Type": "application/json"}

    async def client() -> None:
        for _ in todo:  # shared by every client: each task is submitted once
            while progress.issued - progress.completed - progress.failed >= args.window:
                await asyncio.sleep(0.005)
            progress.issued += 1
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.json()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                progress.errors.append(f"{type(e).__name__}: {e}")
                progress.issued -= 1
                continue
            if status == 202:
                progress.accepted += 1
            else:
                progress.errors.append(f"{status} {answer}")
                progress.issued -= 1

    await asyncio.gather(*(client() for _ in range(args.clients)))


async def drain_websocket(ws: aiohttp.ClientWebSocketResponse, frames: list[int]) -> None:
    """Read and count frames, as a dashboard would, until the socket closes."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        frames[0] += 1


def checkpoints(tasks: int) -> list[tuple[str, int]]:
    """(label, completed tasks) at which RSS is taken: the warm-up, then every quarter."""
    warm = WARM_UP if tasks >= 20 * WARM_UP else max(1, tasks // 20)
    return [("warm-up", warm)] + [(f"{q}%", tasks * q // 100) for q in (25, 50, 75, 100)]


async def memory_trial(backend: Backend, args: argparse.Namespace, scratch: Path) -> Metrics:
    """Run ``args.tasks`` noop tasks through an API and workers, sampling their RSS along the way."""
    points = checkpoints(args.tasks)
    samples: dict[str, dict[str, float]] = {}
    series: list[dict[str, Any]] = []
    progress = Progress()
    async with cluster(backend, scratch) as c, http_session(args.clients) as session:
        c.start_api()
        c.start_workers(args.workers)
        await c.wait_ready(session, args.workers)
        samples["start"] = sample(c)
        t0 = time.monotonic()

        async def watch() -> None:
            """Follow the completed count; take RSS at each checkpoint, and every second for the series."""
            todo = list(points)
            next_series = 0.0
            while True:
                counts = await backend.counts(c.cfg)
                progress.completed, progress.failed = counts.get("completed", 0), counts.get("failed", 0)
                while todo and progress.completed >= todo[0][1]:
                    samples[todo.pop(0)[0]] = sample(c)
                now = time.monotonic()
                if now >= next_series:
                    series.append({"t": round(now - t0, 2), "completed": progress.completed, **sample(c)})
                    next_series = now + SERIES_INTERVAL
                c.check()
                await asyncio.sleep(POLL_INTERVAL)

        frames = [0]
        async with session.ws_connect(f"{c.base}/ws", max_msg_size=0) as ws:
            reader = asyncio.create_task(drain_websocket(ws, frames))
            watcher = asyncio.create_task(watch())
            try:
                await submit_paced(session, c.base, NOOP_BODY, args, progress)
                check_interrupted()
                submitted = time.monotonic()
                if progress.failed:
                    raise RuntimeError(f"{progress.failed} tasks failed")

                async def all_done() -> bool:
                    if watcher.done():
                        watcher.result()  # raises what stopped it
                    return progress.completed + progress.failed >= progress.accepted

                deadline = time.monotonic() + 60 + args.tasks / 20  # a hang fails; a slow run does not
                while not await all_done():
                    c.check()
                    check_interrupted()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"timed out waiting for {progress.accepted} tasks to complete")
                    await asyncio.sleep(POLL_INTERVAL)
                seconds = time.monotonic() - t0
                # The last checkpoint is the accepted count when some submissions were refused.
                for label, _ in points:
                    samples.setdefault(label, sample(c))
                await asyncio.sleep(IDLE_AFTER)
                samples["idle"] = sample(c)
                peak = {"API": rss_mib(c.api.pid, "VmHWM") if c.api else float("nan")}
                for i, w in enumerate(c.workers, 1):
                    peak[f"worker {i}"] = rss_mib(w.pid, "VmHWM")
            finally:
                await finish(watcher)
                await finish(reader)
    if progress.failed:
        raise RuntimeError(f"{progress.failed} tasks failed")
    warm, end = points[0][0], points[-1][0]
    return {
        "tasks": progress.accepted,
        "errors": len(progress.errors),
        "error_examples": progress.errors[:3],
        "tasks_per_s": progress.accepted / seconds,
        "submit_seconds": submitted - t0,
        "websocket_frames": frames[0],
        "rss_mib": samples,
        "peak_mib": peak,
        "growth_mib": {name: samples[end][name] - samples[warm][name] for name in samples[end]},
        "series": series,
    }


# ============================================================================
# Report, main
# ============================================================================


def target_for(name: str) -> float:
    """The RSS target of process ``name``, in MiB."""
    return TARGET_API_MIB if name == "API" else TARGET_WORKER_MIB


def table(name: str, trial: Metrics, points: list[tuple[str, int]]) -> str:
    """One trial's RSS per process and checkpoint, as Markdown."""
    labels = ["start", *(label for label, _ in points), "idle"]
    counts = {label: f"{label} ({n:,})" for label, n in points}
    heading = ["process", *(counts.get(label, label) for label in labels), "growth", "peak", "target"]
    lines = [f"**{name}**", "", "| " + " | ".join(heading) + " |", "|---" * len(heading) + "|"]
    for proc, growth in trial["growth_mib"].items():
        cells = [f"{trial['rss_mib'][label][proc]:.1f}" for label in labels]
        cells += [f"{growth:+.1f}", f"{trial['peak_mib'][proc]:.1f}", f"\u2264 {target_for(proc):.0f}"]
        lines.append(f"| {proc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(trial: Metrics) -> list[str]:
    """Per process: within its target and flat, or by how much not."""
    out = []
    end = list(trial["rss_mib"])[-2]  # the last checkpoint, before the idle sample
    for proc, growth in trial["growth_mib"].items():
        rss, target = trial["rss_mib"][end][proc], target_for(proc)
        over = f"{rss - target:+.1f} MiB over" if rss > target else "within"
        flat = "flat" if abs(growth) <= FLAT_MIB else "NOT flat"
        out.append(f"  - {proc}: {rss:.1f} MiB, {over} the {target:.0f} MiB target; {growth:+.1f} MiB: {flat}")
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One trial per backend."""
    on_signals_cancel_main()
    info = await machine(args.backends)
    results: dict[str, Metrics] = {}
    with tempfile.TemporaryDirectory(prefix="asyncnode-memory-") as scratch:
        for name in args.backends:
            t0 = time.monotonic()
            check_interrupted()
            try:
                results[name] = await memory_trial(BACKENDS[name], args, Path(scratch))
            except Exception as e:  # one failed trial is reported; the others still run
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            check_interrupted()
            shown = {k: v for k, v in results[name].items() if k != "series"}
            print(f"{name} ({time.monotonic() - t0:.0f} s): {json.dumps(shown, default=str)}", flush=True)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    params = {k: getattr(args, k) for k in ("tasks", "clients", "workers", "window")}
    return {"machine": info, "params": params, "results": results}


def report(out: dict[str, Any]) -> str:
    """The machine, the parameters, a table per backend and the verdicts."""
    params = out["params"]
    points = checkpoints(params["tasks"])
    lines = [
        *describe_machine(out["machine"]),
        f"- {params['tasks']:,} `noop` tasks, {params['clients']} HTTP clients, at most {params['window']:,} "
        f"submitted and not completed; {params['workers']} worker processes; one WebSocket client connected",
        "- VmRSS in MiB: once up, at each count of completed tasks, and after "
        f"{IDLE_AFTER:g} s idle; growth from the warm-up to the end; peak is VmHWM",
    ]
    for name, trial in out["results"].items():
        lines.append("")
        if "error" in trial:
            lines.append(f"**{name}**: failed: {trial['error']}")
            continue
        lines.append(table(name, trial, points))
        lines.append("")
        lines.append(f"- {name}: {trial['tasks']:,} tasks at {trial['tasks_per_s']:.0f}/s, {trial['errors']} refused")
        lines += verdict(trial)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks per trial (default 100000)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--window", type=int, default=1000, help="most tasks submitted and not yet completed (default 1000)"
    )
    add_backend_option(parser)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2000 tasks")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures and RSS series to PATH")
    args = parser.parse_args()
    if args.quick:
        args.tasks = min(args.tasks, 2000)
    if min(args.tasks, args.clients, args.workers, args.window) < 1:
        parser.error("--tasks, --clients, --workers and --window must be at least 1")
    return run_and_report(run(args), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
