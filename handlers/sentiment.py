"""``sentiment``: VADER sentiment analysis of a text."""

from __future__ import annotations

import functools
from typing import Any

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from asyncnode import Field, TaskContext, task

#: VADER's conventional thresholds on the compound score.
POSITIVE_AT = 0.05
NEGATIVE_AT = -0.05


@functools.cache
def _analyzer() -> SentimentIntensityAnalyzer:
    # Loading the lexicon takes a few milliseconds; do it once per process.
    return SentimentIntensityAnalyzer()


def label_for(compound: float) -> str:
    """The label VADER's authors recommend for a compound score."""
    if compound >= POSITIVE_AT:
        return "positive"
    if compound <= NEGATIVE_AT:
        return "negative"
    return "neutral"


@task(
    "sentiment",
    description="Sentiment of a text (VADER): positive, negative or neutral",
    fields=[Field("text", description="text to analyse", multiline=True)],
)
def sentiment(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    """Score the text; a plain function, so the worker runs it in a thread."""
    scores = _analyzer().polarity_scores(payload["text"])
    return {
        "label": label_for(scores["compound"]),
        "compound": scores["compound"],
        "pos": scores["pos"],
        "neu": scores["neu"],
        "neg": scores["neg"],
    }
