"""The pure rules of the task controls (no services needed): when a submission may start (``delay``, ``run_at``,
``[broker] max_delay``), what an Idempotency-Key may be and which bodies are the same request, and the
``cancelled`` change of state."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pytest

import asyncnode

#: The time "now" of every check (2026-12-03T10:00:00Z).
NOW = datetime.datetime(2026, 12, 3, 10, 0, tzinfo=datetime.UTC).timestamp()
MAX_DELAY = 3600.0
CFG = asyncnode.Config(path=Path("test.toml"), broker=asyncnode.BrokerConfig(max_delay=MAX_DELAY))
TID = "0b7d5b0e-8a4c-4d43-9a53-0c1f3a0f7a11"


@pytest.fixture(autouse=True)
def _handlers() -> None:
    asyncnode.load_handlers(asyncnode.Config(path=Path("config.toml")))


def start_of(extra: dict[str, Any]) -> float | None:
    """The ``run_at`` validate_submission gives a noop submitted with ``extra`` at NOW."""
    return asyncnode.validate_submission({"type": "noop", **extra}, CFG, now=NOW).run_at


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({}, None, id="at-once"),
        pytest.param({"delay": 5}, NOW + 5, id="delay-int"),
        pytest.param({"delay": 0.001}, NOW + 0.001, id="delay-tiny"),
        pytest.param({"delay": MAX_DELAY}, NOW + MAX_DELAY, id="delay-max"),
        pytest.param({"run_at": NOW + 90}, NOW + 90, id="epoch"),
        pytest.param({"run_at": int(NOW) + 90}, NOW + 90, id="epoch-int"),
        pytest.param({"run_at": "2026-12-03T10:01:30Z"}, NOW + 90, id="rfc3339-z"),
        pytest.param({"run_at": "2026-12-03T11:01:30+01:00"}, NOW + 90, id="rfc3339-plus-one"),
        pytest.param({"run_at": "2026-12-03T05:01:30.5-05:00"}, NOW + 90.5, id="rfc3339-minus-five-fraction"),
        pytest.param({"run_at": "2026-12-03T09:59:01Z"}, NOW - 59, id="59s-ago-runs-now"),
        pytest.param({"run_at": NOW - 60}, NOW - 60, id="60s-ago-runs-now"),
        pytest.param({"run_at": NOW + MAX_DELAY}, NOW + MAX_DELAY, id="run_at-max"),
    ],
)
def test_a_valid_delay_or_run_at_gives_the_start(extra: dict[str, Any], expected: float | None) -> None:
    assert start_of(extra) == expected


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        pytest.param({"delay": 0}, "delay", id="delay-zero"),
        pytest.param({"delay": -1}, "delay", id="delay-negative"),
        pytest.param({"delay": True}, "delay", id="delay-true"),
        pytest.param({"delay": False}, "delay", id="delay-false"),
        pytest.param({"delay": "5"}, "delay", id="delay-string"),
        pytest.param({"delay": [5]}, "delay", id="delay-list"),
        pytest.param({"delay": math.nan}, "delay", id="delay-nan"),
        pytest.param({"delay": math.inf}, "delay", id="delay-infinite"),
        pytest.param({"delay": MAX_DELAY + 0.001}, "delay", id="delay-past-max"),
        pytest.param({"delay": 5, "run_at": NOW + 5}, "delay", id="both"),
        pytest.param({"run_at": "2026-12-03T10:01:30"}, "run_at", id="naive"),
        pytest.param({"run_at": "2026-12-03"}, "run_at", id="date-only-naive"),
        pytest.param({"run_at": "in five minutes"}, "run_at", id="unparsable"),
        pytest.param({"run_at": ""}, "run_at", id="empty-string"),
        pytest.param({"run_at": "2026-12-03T10:01:30Z" + " " * 100}, "run_at", id="too-long"),
        pytest.param({"run_at": True}, "run_at", id="run_at-true"),
        pytest.param({"run_at": {"at": NOW}}, "run_at", id="run_at-object"),
        pytest.param({"run_at": math.inf}, "run_at", id="run_at-infinite"),
        pytest.param({"run_at": math.nan}, "run_at", id="run_at-nan"),
        pytest.param({"run_at": NOW - 60.001}, "run_at", id="just-over-60s-ago"),
        pytest.param({"run_at": "2026-12-03T09:00:00Z"}, "run_at", id="an-hour-ago"),
        pytest.param({"run_at": NOW + MAX_DELAY + 0.001}, "run_at", id="run_at-past-max"),
        pytest.param({"run_at": "2026-12-04T10:00:00+00:00"}, "run_at", id="rfc3339-past-max"),
    ],
)
def test_a_bad_delay_or_run_at_is_a_validation_error_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(asyncnode.ValidationError) as err:
        start_of(extra)
    assert err.value.field == field
    assert str(err.value)


def test_a_null_delay_or_run_at_means_at_once() -> None:
    assert start_of({"delay": None}) is None
    assert start_of({"run_at": None}) is None


def test_max_delay_follows_the_config() -> None:
    wide = asyncnode.Config(path=Path("test.toml"), broker=asyncnode.BrokerConfig(max_delay=2 * MAX_DELAY))
    body = {"type": "noop", "delay": MAX_DELAY + 1}
    assert asyncnode.validate_submission(body, wide, now=NOW).run_at == NOW + MAX_DELAY + 1
    assert asyncnode.BrokerConfig().max_delay == 30 * 86400  # the default: 30 days
    assert asyncnode.ApiConfig().idempotency_ttl == 86400


@pytest.mark.parametrize(
    ("section", "key"), [("api", "idempotency_ttl"), ("broker", "max_delay")], ids=["idempotency_ttl", "max_delay"]
)
def test_a_ttl_or_max_delay_below_one_second_is_a_config_error(tmp_path: Path, section: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[{section}]\n{key} = 0\n")
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.Config.from_toml(path, env={})
    assert key in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("a", id="one-character"),
        pytest.param("k" * 200, id="200-characters"),
        pytest.param("".join(map(chr, range(0x20, 0x7F))), id="every-printable"),
        pytest.param("order-2026-12-03/42", id="typical"),
    ],
)
def test_a_key_of_1_to_200_printable_ascii_characters_is_valid(key: str) -> None:
    assert asyncnode.IDEMPOTENCY_KEY.fullmatch(key)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("k" * 201, id="201-characters"),
        pytest.param("tab\there", id="tab"),
        pytest.param("new\nline", id="newline"),
        pytest.param("nul\x00", id="nul"),
        pytest.param("del\x7f", id="del"),
        pytest.param("clé", id="not-ascii"),
        pytest.param("trailing\n", id="trailing-newline"),
    ],
)
def test_a_key_outside_those_rules_is_invalid(key: str) -> None:
    assert asyncnode.IDEMPOTENCY_KEY.fullmatch(key) is None


def test_the_same_body_in_another_key_order_is_the_same_request() -> None:
    one = json.loads('{"type": "reverse", "payload": {"text": "a", "x": 1}}')
    two = json.loads('{"payload": {"x": 1, "text": "a"}, "type": "reverse"}')
    assert asyncnode.body_fingerprint(one) == asyncnode.body_fingerprint(two)
    for other in (
        {"type": "reverse", "payload": {"text": "b", "x": 1}},
        {"type": "reverse", "payload": {"text": "a", "x": 1.5}},
        {"type": "reverse", "payload": {"text": "a", "x": 1}, "delay": 5},
        {"type": "noop"},
    ):
        assert asyncnode.body_fingerprint(other) != asyncnode.body_fingerprint(one), other


def test_a_cancel_is_final_allowed_only_before_a_task_finishes_and_kept_in_its_timeline() -> None:
    assert asyncnode.CANCELLABLE == ("pending", "scheduled", "retrying", "started")
    by = {"cancelled_by": "api", "cancelled_client": "127.0.0.1", "cancelled_token": "operator"}
    change = asyncnode.plan_change("cancelled", TID, "sleep", by, tasks=asyncnode.TasksConfig(result_ttl=600), now=5.0)
    assert change.status == "cancelled" and change.guard == asyncnode.CANCELLABLE
    assert change.fields == {**by, "cancelled_at": 5.0, "status": "cancelled"}
    assert change.expire == 600  # final: kept for [tasks] result_ttl like a completed task
    assert json.loads(change.entry or "") == {"status": "cancelled", "ts": 5.0, "cancelled_by": "api"}
    message = json.loads(change.message(seq=7, count=0))
    assert message == {"id": TID, "type": "sleep", "status": "cancelled", "ts": 5.0, "cancelled_by": "api", "seq": 7}


@pytest.mark.parametrize("event", ["started", "progress", "retrying", "completed", "failed"])
def test_nothing_a_run_reports_overwrites_a_cancel(event: str) -> None:
    assert "cancelled" not in asyncnode.TRANSITIONS[event].after
    assert asyncnode.TRANSITIONS[event].after  # guarded at all: () would mean any status


def test_a_delayed_submission_is_recorded_scheduled_with_its_run_at() -> None:
    fields = {"payload": {}, "queue": "default", "run_at": 42.0}
    change = asyncnode.plan_change("scheduled", TID, "noop", fields, tasks=asyncnode.TasksConfig(), now=5.0)
    assert change.status == "scheduled" and change.fields["run_at"] == 42.0
    message = json.loads(change.message(seq=1, count=0))
    assert message == {
        "id": TID,
        "type": "noop",
        "status": "scheduled",
        "ts": 5.0,
        "queue": "default",
        "attempts": 0,
        "run_at": 42.0,
        "seq": 1,
    }
    assert "scheduled" in asyncnode.RUNNABLE  # a worker may start it once it is due
