"""``sleep``: waits, reporting progress in small steps; for demos and crash tests."""

from __future__ import annotations

import asyncio
from typing import Any

from asyncnode import Field, TaskContext, task

#: Most progress reports a single sleep makes.
MAX_STEPS = 100
#: Shortest step between two progress reports, in seconds.
MIN_STEP = 0.1


@task(
    "sleep",
    description="Sleep for a while, reporting progress",
    fields=[Field("seconds", type="number", min=0, max=300, description="how long to sleep")],
)
async def sleep(payload: dict[str, Any], ctx: TaskContext) -> dict[str, float]:
    """Sleep ``seconds`` in steps, reporting the fraction done after each."""
    seconds = float(payload["seconds"])
    steps = max(1, min(MAX_STEPS, round(seconds / MIN_STEP)))
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(1, steps + 1):
        # Sleep until the step's deadline rather than a fixed step, so drift does not add up.
        await asyncio.sleep(max(0.0, start + seconds * i / steps - loop.time()))
        if i < steps:
            ctx.progress(i / steps)
    return {"slept": round(loop.time() - start, 3)}
