"""The producer side of a peer's end-to-end trial: N sends from T threads, timed one by one.

A peer module calls :func:`main` with a ``send`` function (queue one no-op task, return its id) and a
``warm`` context manager (open this thread's broker connection). Every thread warms up first, so
that no connection is opened inside the measured burst; then all start at once. The result is written
as JSON: each task's id with the wall-clock times its send started and returned, and the CPU time
the process spent sending.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Send = Callable[[], str]
Warm = Callable[[], contextlib.AbstractContextManager[Any]]


def produce(send: Send, warm: Warm, count: int, threads: int) -> dict[str, Any]:
    """Send ``count`` tasks from ``threads`` threads; return what :func:`main` writes."""
    threads = max(1, min(threads, count))
    todo = iter(range(count))
    lock = threading.Lock()
    warmed = threading.Barrier(threads + 1)
    go = threading.Event()
    sent: list[list[Any]] = []
    errors: list[str] = []

    def worker() -> None:
        try:
            with warm():
                warmed.wait()
        except threading.BrokenBarrierError:
            return
        except Exception as e:  # a thread that cannot connect stops the whole burst
            errors.append(f"warm-up: {type(e).__name__}: {e}")
            warmed.abort()
            return
        go.wait()
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            t0 = time.time()
            try:
                tid = send()
            except Exception as e:  # reported, not fatal: the harness counts what arrived
                errors.append(f"{type(e).__name__}: {e}")
                continue
            sent.append([tid, t0, time.time()])

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    try:
        warmed.wait()
    except threading.BrokenBarrierError:
        go.set()
        return {"sent": [], "errors": errors[:20], "error_count": len(errors), "cpu_s": 0.0}
    time.sleep(0.2)  # every thread has let go of what it held to warm up
    cpu0 = time.process_time()
    go.set()
    for thread in pool:
        thread.join()
    return {"sent": sent, "errors": errors[:20], "error_count": len(errors), "cpu_s": time.process_time() - cpu0}


def main(send: Send, warm: Warm, argv: list[str] | None = None) -> None:
    """``produce --count N --threads T --out PATH``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["produce"])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = produce(send, warm, args.count, args.threads)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(args.out)
