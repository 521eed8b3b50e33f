"""``noop``: returns at once; for benchmarks."""

from __future__ import annotations

from typing import Any

from asyncnode import TaskContext, task


@task("noop", description="Do nothing (for benchmarks)")
async def noop(payload: dict[str, Any], ctx: TaskContext) -> None:
    """Return None at once."""
    return None
