"""Task types for fault-injection and cancel tests: registered only when a test's config lists this module."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from asyncnode import Field, PermanentError, TaskContext, task


@task("crash", description="Kill the worker process running it (a poison message)")
async def crash(payload: dict[str, Any], ctx: TaskContext) -> None:
    """SIGKILL our own process: nothing after this line runs, nothing is acked."""
    os.kill(os.getpid(), signal.SIGKILL)


@task(
    "fail",
    description="Always fail",
    fields=[Field("permanent", type="boolean", required=False, description="raise PermanentError")],
)
async def fail(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Raise on every attempt; a PermanentError when asked, so that it is not retried."""
    if payload.get("permanent"):
        raise PermanentError("this can never work")
    raise RuntimeError(f"attempt {ctx.attempt} failed on purpose")


@task(
    "fail_until",
    description="Fail until a file exists",
    fields=[Field("flag", description="path of the file that makes it succeed")],
)
async def fail_until(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Fail while the flag file is missing; succeed once it exists."""
    if not Path(payload["flag"]).exists():
        raise RuntimeError("flag not set yet")
    return "ok"


@task(
    "watch_cancel",
    description="A plain (sync) function that polls ctx.cancelled and writes when it sees it",
    fields=[
        Field("marker", description="path of the file written (with the time) once the cancel is seen"),
        Field("max_seconds", type="number", min=0, max=60, description="give up watching after this long"),
    ],
)
def watch_cancel(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Write ``<marker>.started`` at once; then poll ``ctx.cancelled`` until it is set (write ``marker`` with the
    time it was seen, and return) or ``max_seconds`` pass (return without writing it)."""
    marker = Path(payload["marker"])
    _write_time(marker.with_name(marker.name + ".started"))
    deadline = time.monotonic() + float(payload["max_seconds"])
    while not ctx.cancelled:
        if time.monotonic() > deadline:
            return "not cancelled"
        time.sleep(0.01)
    _write_time(marker)
    return "saw the cancel"


def _write_time(path: Path) -> None:
    """Write the time now to ``path`` atomically (a reader never sees the file half-written)."""
    part = path.with_name(path.name + ".part")
    part.write_text(repr(time.time()))
    os.replace(part, path)


@task(
    "fail_first",
    description="Fail the first attempt; a later one writes a file",
    fields=[Field("marker", description="path of the file a second attempt writes (with the time)")],
)
async def fail_first(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Raise on attempt 1 (so the task is retried); on any later attempt, write ``marker`` and succeed."""
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails on purpose")
    _write_time(Path(payload["marker"]))
    return "ran again"


@task("has_module", description="Whether a module is imported in the worker", fields=[Field("name")])
async def has_module(payload: dict[str, Any], ctx: TaskContext) -> bool:
    """``payload["name"] in sys.modules``, in the worker process that runs it."""
    return payload["name"] in sys.modules
