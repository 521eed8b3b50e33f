"""The pure core: submission validation, envelopes, records and update messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import asyncnode

MAX_TEXT = 100


@pytest.fixture(autouse=True)
def _handlers() -> None:
    asyncnode.load_handlers(asyncnode.Config(path=asyncnode.Path("config.toml")))


CFG = asyncnode.Config(path=Path("test.toml"), api=asyncnode.ApiConfig(max_text=MAX_TEXT))


def check(body: Any, cfg: asyncnode.Config = CFG) -> tuple[str, dict[str, Any]]:
    sub = asyncnode.validate_submission(body, cfg)
    return sub.type.name, sub.payload


def test_builtin_task_types_are_registered() -> None:
    assert {"reverse", "sentiment", "email", "sleep", "noop"} <= set(asyncnode.REGISTRY)


def test_valid_submissions() -> None:
    assert check({"type": "reverse", "payload": {"text": "hello"}}) == ("reverse", {"text": "hello"})
    assert check({"type": "noop"}) == ("noop", {})
    assert check({"type": "sleep", "payload": {"seconds": 1}}) == ("sleep", {"seconds": 1})
    assert check({"type": "sleep", "payload": {"seconds": 0.5}}) == ("sleep", {"seconds": 0.5})


@pytest.mark.parametrize(
    ("body", "message", "field"),
    [
        ([1, 2], "body must be a JSON object", None),
        ("reverse", "body must be a JSON object", None),
        ({}, "'type' is required", "type"),
        ({"type": 3}, "'type' is required and must be a string", "type"),
        ({"type": "nope"}, "unknown task type 'nope' (known: ", "type"),
        ({"type": "reverse", "extra": 1}, "unknown key(s) in body: extra", None),
        ({"type": "noop", "timeout": 0}, "'timeout' must be a number of seconds above 0 and at most 1500", "timeout"),
        ({"type": "noop", "timeout": 1501}, "'timeout' must be", "timeout"),
        ({"type": "noop", "timeout": "5"}, "'timeout' must be", "timeout"),
        ({"type": "reverse", "payload": []}, "'payload' must be a JSON object", "payload"),
        ({"type": "reverse", "payload": {}}, "payload.text is required", "text"),
        ({"type": "reverse", "payload": {"text": 5}}, "payload.text must be a string", "text"),
        (
            {"type": "reverse", "payload": {"text": "x" * 101}},
            "payload.text is too long (101 characters; at most 100)",
            "text",
        ),
        ({"type": "reverse", "payload": {"text": "a", "other": 1}}, "payload: unknown field 'other'", "other"),
        ({"type": "sleep", "payload": {"seconds": "1"}}, "payload.seconds must be a number", "seconds"),
        ({"type": "sleep", "payload": {"seconds": True}}, "payload.seconds must be a number", "seconds"),
        ({"type": "sleep", "payload": {"seconds": 301}}, "payload.seconds must be at most 300", "seconds"),
        ({"type": "sleep", "payload": {"seconds": -1}}, "payload.seconds must be at least 0", "seconds"),
        ({"type": "email", "payload": {"to": "a@b.c, d@e.f", "subject": "s", "body": "b"}}, "one e-mail address", "to"),
        ({"type": "email", "payload": {"to": "nobody", "subject": "s", "body": "b"}}, "one e-mail address", "to"),
        ({"type": "email", "payload": {"to": "a@b.c\r\nBcc: x@y.z", "subject": "s", "body": "b"}}, "line breaks", "to"),
        (
            {"type": "email", "payload": {"to": "a@b.c", "subject": "hi\nBcc: x@y.z", "body": "b"}},
            "line breaks",
            "subject",
        ),
    ],
)
def test_invalid_submissions_name_the_problem(body: Any, message: str, field: str | None) -> None:
    with pytest.raises(asyncnode.ValidationError) as err:
        check(body)
    assert message in str(err.value)
    assert err.value.field == field


def test_unknown_type_lists_known_types() -> None:
    with pytest.raises(asyncnode.ValidationError, match="email, noop, reverse, sentiment, sleep"):
        check({"type": "x"})


def test_task_type_description_for_forms() -> None:
    described = asyncnode.REGISTRY["email"].describe(MAX_TEXT)
    assert described["description"]
    fields = {f["name"]: f for f in described["fields"]}
    assert set(fields) == {"to", "subject", "body"}
    assert fields["to"]["format"] == "email" and fields["to"]["required"] is True
    assert fields["body"]["max_length"] == MAX_TEXT and fields["body"]["multiline"] is True
    sleep = asyncnode.REGISTRY["sleep"].describe(MAX_TEXT)["fields"][0]
    assert (sleep["type"], sleep["min"], sleep["max"]) == ("number", 0, 300)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        asyncnode.task("reverse", description="again")(lambda payload, ctx: None)


def test_envelope_round_trip_and_errors() -> None:
    env = asyncnode.Envelope("id-1", "reverse", {"text": "é"})
    assert asyncnode.Envelope.decode(env.encode()) == env
    for bad in (b"not json", b"[]", b'{"id": 1, "type": "x"}', b'{"id": "a", "type": "x", "payload": 3}', b"\xff"):
        with pytest.raises(asyncnode.EnvelopeError):
            asyncnode.Envelope.decode(bad)


def test_record_fields_round_trip() -> None:
    flat = asyncnode.encode_fields(
        {
            "payload": {"text": "x"},
            "result": [1, "a"],
            "status": "completed",
            "attempts": 2,
            "progress": 0.5,
            "error": None,
        }
    )
    assert "error" not in flat
    raw = dict(zip(flat[::2], flat[1::2], strict=True))
    rec = asyncnode.decode_record("id-1", {**raw, "seq": "4", "created_at": "1.5"})
    assert rec["payload"] == {"text": "x"} and rec["result"] == [1, "a"]
    assert rec["attempts"] == 2 and rec["seq"] == 4 and rec["progress"] == 0.5 and rec["created_at"] == 1.5
    assert rec["error"] is None and rec["finished_at"] is None


def test_batch_frame() -> None:
    assert asyncnode.batch_frame(['{"a":1}']) == '{"a":1}'
    assert json.loads(asyncnode.batch_frame(['{"a":1}', '{"b":2}'])) == [{"a": 1}, {"b": 2}]


def test_quorum_queue_arguments_bound_redeliveries() -> None:
    args = asyncnode.queue_arguments(asyncnode.BrokerConfig(queue="jobs", delivery_limit=7))
    assert args["x-queue-type"] == "quorum"
    assert args["x-delivery-limit"] == 7
    assert args["x-dead-letter-routing-key"] == "jobs.dlq"
    assert args["x-dead-letter-strategy"] == "at-least-once" and args["x-overflow"] == "reject-publish"
    classic = asyncnode.queue_arguments(asyncnode.BrokerConfig(queue_type="classic"))
    assert "x-delivery-limit" not in classic and classic["x-dead-letter-routing-key"] == "tasks.dlq"


def test_a_worker_process_never_loads_the_api_libraries() -> None:
    """aiohttp and Jinja2 serve the API alone, sqlite3 the embedded backend: a worker on RabbitMQ that imported
    them would carry ~14 MiB for nothing."""
    code = (
        "import sys, asyncnode\n"
        "asyncnode.load_handlers(asyncnode.Config(path=asyncnode.Path('config.toml')))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'aiohttp_jinja2', 'jinja2', 'sqlite3'}))\n"
        "asyncnode.make_app(asyncnode.Config.from_toml(sys.argv[1]))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'aiohttp_jinja2', 'jinja2'}))\n"
    )
    root = Path(asyncnode.__file__).parent
    args = [sys.executable, "-c", code, str(root / "config.toml")]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "['aiohttp', 'aiohttp_jinja2', 'jinja2']"]
