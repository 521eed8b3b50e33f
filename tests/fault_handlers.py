"""Task types for fault-injection tests: registered only when a test's config lists this module."""

from __future__ import annotations

import os
import signal
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
