"""``reverse``: the text, reversed."""

from __future__ import annotations

from typing import Any

from asyncnode import Field, TaskContext, task


@task("reverse", description="Reverse a text", fields=[Field("text", description="text to reverse", multiline=True)])
async def reverse(payload: dict[str, Any], ctx: TaskContext) -> str:
    """Return the text reversed, character by character."""
    text: str = payload["text"]
    return text[::-1]
