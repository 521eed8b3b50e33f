"""The built-in handlers, called directly (the email handler is tested against a real SMTP server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asyncnode
from handlers import noop, reverse, sentiment, sleep


class RecordingContext:
    """Just enough of TaskContext for handlers that only report progress."""

    def __init__(self) -> None:
        self.reports: list[float] = []
        self.id = "unit-test"

    def progress(self, fraction: float, note: str | None = None) -> None:
        self.reports.append(fraction)


async def test_reverse() -> None:
    assert await reverse.reverse({"text": "hello"}, RecordingContext()) == "olleh"  # type: ignore[arg-type]
    assert await reverse.reverse({"text": "añb😀"}, RecordingContext()) == "😀bña"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("I love this, it is wonderful and great!", "positive"),
        ("This is terrible, I hate it. Awful.", "negative"),
        ("The parcel is on the table.", "neutral"),
        ("It is not good", "negative"),
    ],
)
def test_sentiment_labels(text: str, label: str) -> None:
    result: dict[str, Any] = sentiment.sentiment({"text": text}, RecordingContext())  # type: ignore[arg-type]
    assert result["label"] == label
    assert set(result) == {"label", "compound", "pos", "neu", "neg"}
    assert -1.0 <= result["compound"] <= 1.0
    assert result["pos"] + result["neu"] + result["neg"] == pytest.approx(1.0, abs=0.01)


def test_sentiment_thresholds() -> None:
    assert sentiment.label_for(0.05) == "positive"
    assert sentiment.label_for(0.0499) == "neutral"
    assert sentiment.label_for(-0.05) == "negative"


async def test_sleep_reports_increasing_progress() -> None:
    ctx = RecordingContext()
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await sleep.sleep({"seconds": 0.3}, ctx)  # type: ignore[arg-type]
    assert loop.time() - start >= 0.29
    assert result["slept"] >= 0.29
    assert len(ctx.reports) >= 2
    assert ctx.reports == sorted(ctx.reports) and 0 < ctx.reports[0] and ctx.reports[-1] < 1


async def test_noop() -> None:
    assert await noop.noop({}, RecordingContext()) is None  # type: ignore[arg-type]


def test_sentiment_runs_in_a_thread_and_the_others_on_the_loop() -> None:
    asyncnode.load_handlers(asyncnode.Config(path=asyncnode.Path("config.toml")))
    assert not asyncnode.REGISTRY["sentiment"].is_async
    assert asyncnode.REGISTRY["reverse"].is_async and asyncnode.REGISTRY["email"].is_async
