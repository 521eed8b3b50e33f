"""Pure pieces of retries, dead letters, time limits and access control."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

import asyncnode
from handlers.mail import recipient_allowed

BROKER = asyncnode.BrokerConfig(queue="jobs", retry_delays=(1.0, 5.0, 30.0), task_timeout=100.0)


def test_retry_delay_is_the_nth_and_the_last_repeats() -> None:
    assert [asyncnode.retry_delay_for(n, BROKER.retry_delays) for n in (1, 2, 3, 4, 9)] == [1, 5, 30, 30, 30]
    assert asyncnode.retry_delay_for(1, (0.25,)) == 0.25


def test_retry_queues_expire_back_into_the_work_queue() -> None:
    assert asyncnode.retry_queue_name(BROKER, 0.25) == "jobs.retry.250ms"
    args = asyncnode.retry_queue_arguments(BROKER, 5.0)
    assert args["x-message-ttl"] == 5000
    assert (args["x-dead-letter-exchange"], args["x-dead-letter-routing-key"]) == ("", "jobs")
    assert args["x-dead-letter-strategy"] == "at-least-once" and args["x-overflow"] == "reject-publish"


def test_task_time_limit_never_exceeds_the_hard_cap() -> None:
    assert asyncnode.task_time_limit(BROKER, None, None) == 100
    assert asyncnode.task_time_limit(BROKER, None, 30) == 30
    assert asyncnode.task_time_limit(BROKER, 5, 30) == 5
    assert asyncnode.task_time_limit(BROKER, None, 1000) == 100


def test_envelope_carries_its_time_limit() -> None:
    env = asyncnode.Envelope("i", "noop", {}, 2.5)
    assert asyncnode.Envelope.decode(env.encode()) == env
    with pytest.raises(asyncnode.EnvelopeError):
        asyncnode.Envelope.decode(b'{"id": "i", "type": "noop", "timeout": -1}')


def test_dead_letter_info_from_our_headers_and_from_the_broker() -> None:
    body = asyncnode.Envelope("t1", "reverse", {"text": "x"}).encode()
    ours = asyncnode.dead_letter_info("t1", body, {"x-error": "boom", "x-attempts": 4, "x-last-failed-at": 12.0})
    assert (ours["id"], ours["type"], ours["error"], ours["attempts"], ours["failed_at"]) == (
        "t1",
        "reverse",
        "boom",
        4,
        12.0,
    )
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    theirs = asyncnode.dead_letter_info("t1", body, {"x-death": [{"reason": b"delivery_limit", "time": when}]})
    assert "delivery limit" in str(theirs["error"]) and theirs["failed_at"] == when.timestamp()
    garbage = asyncnode.dead_letter_info("m9", b"\x00junk", {"x-death": [{"reason": "rejected"}]})
    assert garbage["id"] == "m9" and "not a task envelope" in str(garbage["error"])


def test_failures_keep_the_message_and_a_short_traceback() -> None:
    try:
        raise ValueError("bad value")
    except ValueError as e:
        failure = asyncnode.describe_failure(e, 10)
    assert failure.error == "ValueError: bad value" and not failure.permanent
    assert "raise ValueError" in failure.traceback
    assert asyncnode.describe_failure(asyncnode.PermanentError("no such user"), 10).permanent
    assert asyncnode.describe_failure(TimeoutError(), 2.5).error == "timed out after 2.5 s"


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        ("http://127.0.0.1:5000", "127.0.0.1:5000", (), True),
        ("http://evil.example", "127.0.0.1:5000", (), False),
        ("https://ops.example.com", "10.0.0.5:5000", ("https://ops.example.com",), True),
        ("http://127.0.0.1:5001", "127.0.0.1:5000", (), False),
        ("null", "127.0.0.1:5000", (), False),
    ],
)
def test_websocket_origin(origin: str, host: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert asyncnode.origin_allowed(origin, host, allowed) is ok


def test_token_check() -> None:
    assert asyncnode.token_matches("s3cret", "Bearer s3cret", None)
    assert asyncnode.token_matches("s3cret", "bearer  s3cret ", None)
    assert asyncnode.token_matches("s3cret", None, "s3cret")
    assert not asyncnode.token_matches("s3cret", "Bearer s3cre", None)
    assert not asyncnode.token_matches("s3cret", None, None)
    assert not asyncnode.token_matches("s3cret", "Basic s3cret", None)


def test_email_recipient_allow_list() -> None:
    assert recipient_allowed("anyone@anywhere.org", ())
    allow = ("ops@example.com", "*@corp.example")
    assert recipient_allowed("OPS@example.com", allow)
    assert recipient_allowed("a.b@corp.example", allow)
    assert not recipient_allowed("x@example.com", allow)
    assert not recipient_allowed("a@corp.example.evil.org", allow)
    cfg = asyncnode.Config(path=Path("t.toml"), smtp=asyncnode.SmtpConfig(allow=allow))
    asyncnode.load_handlers(asyncnode.Config(path=asyncnode.Path("config.toml")))
    with pytest.raises(asyncnode.ValidationError, match="not an allowed recipient"):
        asyncnode.validate_submission({"type": "email", "payload": {"to": "x@y.z", "subject": "s", "body": "b"}}, cfg)
