"""plan_change: the one home of the rules of a change of state (no services needed)."""

from __future__ import annotations

import json

import pytest

import asyncnode

TASKS = asyncnode.TasksConfig(result_ttl=600, max_recent=50)
TID = "0b7d5b0e-8a4c-4d43-9a53-0c1f3a0f7a11"


def plan(event: str, fields: dict[str, object] | None = None, **options: object) -> asyncnode.Change:
    return asyncnode.plan_change(event, TID, "reverse", fields or {}, tasks=TASKS, now=100.0, **options)  # type: ignore[arg-type]


def test_every_status_a_change_can_set_is_reached_by_one_event_table() -> None:
    statuses = {t.status for t in asyncnode.TRANSITIONS.values()}
    assert statuses == {"pending", "scheduled", "started", "retrying", "completed", "failed", "rejected", "cancelled"}


def test_a_submission_is_new_pending_indexed_and_stamped() -> None:
    change = plan("submitted", {"payload": {"text": "abc"}})
    assert change.status == "pending"
    assert change.fields == {
        "id": TID,
        "type": "reverse",
        "attempts": 0,
        "payload": {"text": "abc"},
        "created_at": 100.0,
        "status": "pending",
    }
    assert (change.index_at, change.index_keep) == (100.0, 50)
    assert (change.guard, change.counter, change.expire, change.persist, change.clear) == ((), "", 0, False, ())
    assert json.loads(change.entry or "") == {"status": "pending", "ts": 100.0, "attempts": 0}


def test_a_start_is_guarded_counts_an_attempt_and_stamps_started_at() -> None:
    change = plan("started", {"worker": "h:1"})
    assert change.guard == asyncnode.RUNNABLE
    assert "" in change.guard and "completed" not in change.guard and "failed" not in change.guard
    assert change.counter == "attempts"
    assert change.fields == {"worker": "h:1", "started_at": 100.0, "status": "started"}
    assert change.index_at is None  # only a record that was lost is indexed again
    assert json.loads(change.entry or "") == {"status": "started", "ts": 100.0, "worker": "h:1"}


def test_the_update_message_carries_public_fields_then_the_counter_then_seq() -> None:
    change = plan("started", {"worker": "h:1"})
    assert json.loads(change.message(seq=7, count=2)) == {
        "id": TID,
        "type": "reverse",
        "status": "started",
        "ts": 100.0,
        "worker": "h:1",
        "attempts": 2,
        "seq": 7,
    }
    done = plan("completed", {"result": "cba"})
    assert json.loads(done.message(seq=9, count=0)) == {
        "id": TID,
        "type": "reverse",
        "status": "completed",
        "ts": 100.0,
        "result": "cba",
        "seq": 9,
    }


@pytest.mark.parametrize("event", ["completed", "failed", "rejected"])
def test_a_final_change_expires_after_result_ttl_and_stamps_finished_at(event: str) -> None:
    change = plan(event, {"result": 1} if event == "completed" else {"error": "boom"})
    assert change.expire == 600
    assert change.fields["finished_at"] == 100.0
    # The outcome of a run never overwrites a cancel (or another outcome); a rejection is the API's own.
    assert change.guard == (() if event == "rejected" else asyncnode.RUNNABLE)
    assert "cancelled" not in change.guard


def test_result_ttl_zero_keeps_finished_tasks() -> None:
    change = asyncnode.plan_change(
        "completed", TID, "reverse", {"result": 1}, tasks=asyncnode.TasksConfig(result_ttl=0)
    )
    assert change.expire == 0


def test_a_retry_keeps_its_error_and_next_attempt_in_the_history() -> None:
    change = plan("retrying", {"error": "E", "next_attempt_at": 105.0, "attempt": 1, "retries": 1})
    assert json.loads(change.entry or "") == {
        "status": "retrying",
        "ts": 100.0,
        "error": "E",
        "next_attempt_at": 105.0,
        "attempt": 1,
    }
    assert change.fields["retries"] == 1 and change.expire == 0


def test_a_progress_report_is_guarded_on_started_and_is_no_change_of_status() -> None:
    change = plan("progress", {"progress": 0.5, "note": None})
    assert change.guard == ("started",)
    assert change.entry is None  # neither history nor a status to count
    assert "note" not in change.fields  # a missing note does not erase the last one
    assert json.loads(change.message(3, 0))["note"] is None


def test_a_requeue_clears_the_last_run_and_drops_the_expiry() -> None:
    change = plan("requeued", {"payload": {"text": "x"}})
    assert change.status == "pending"
    assert change.clear == asyncnode.RESET_FIELDS
    assert change.persist is True and change.expire == 0
    assert change.fields["attempts"] == 0 and "created_at" not in change.fields
    assert change.index_at == 100.0  # applied only if its record expired meanwhile


def test_a_lost_record_is_restored_from_the_envelope_at_its_creation_time() -> None:
    restore = {"id": TID, "type": "reverse", "payload": {"text": "abc"}, "created_at": 42.0}
    change = plan("started", {"worker": "h:1"}, restore=restore)
    assert change.restore == restore
    assert change.index_at == 42.0


def test_a_lost_record_without_creation_time_is_indexed_at_now() -> None:
    restore = {"id": TID, "type": "reverse", "payload": {}, "created_at": None}
    change = plan("started", {"worker": "h:1"}, restore=restore)
    assert "created_at" not in change.restore
    assert change.index_at == 100.0


def test_the_envelope_carries_its_creation_time_and_tolerates_its_absence() -> None:
    env = asyncnode.Envelope(TID, "reverse", {"text": "a"}, None, 12.5)
    assert asyncnode.Envelope.decode(env.encode()).created_at == 12.5
    older = asyncnode.Envelope.decode(b'{"id": "x", "type": "reverse", "payload": {}}')
    assert older.created_at is None
    odd = asyncnode.Envelope.decode(b'{"id": "x", "type": "reverse", "payload": {}, "created_at": "soon"}')
    assert odd.created_at is None


def test_a_submission_publishes_its_queue() -> None:
    change = plan("submitted", {"payload": {}, "queue": "mail"})
    assert json.loads(change.message(1, 0))["queue"] == "mail"
    assert change.fields["queue"] == "mail"


def test_only_a_final_change_bumps_its_queues_count_and_only_when_tallied() -> None:
    assert plan("completed", {"result": 1}, queue="mail", tally=True).tally == "completed@mail"
    assert plan("failed", {"error": "x"}, queue="mail", tally=True).tally == "failed@mail"
    assert plan("started", {"worker": "h:1"}, queue="mail", tally=True).tally == ""
    assert plan("completed", {"result": 1}, queue="mail").tally == ""  # one queue: the totals are its figures


def metrics(change: asyncnode.Change) -> dict[str, str]:
    ops = change.metrics
    return {ops[i].replace(asyncnode.METRIC_SEP, "|"): ops[i + 1] for i in range(0, len(ops), 2)}


def test_a_submission_counts_as_submitted_by_type_and_queue() -> None:
    assert metrics(plan("submitted", {"payload": {}}, queue="mail")) == {"S|reverse|mail": "1"}
    assert metrics(plan("scheduled", {"payload": {}, "run_at": 5.0}, queue="mail")) == {"S|reverse|mail": "1"}
    assert metrics(plan("requeued", {}, queue="mail")) == {"S|reverse|mail": "1"}


def test_each_counted_status_counts_once_and_a_progress_report_counts_nothing() -> None:
    for event in ("completed", "failed", "cancelled", "retrying"):
        assert metrics(plan(event, {}, queue="q")) == {f"T|reverse|q|{event}": "1"}
    assert metrics(plan("progress", {"progress": 0.5}, queue="q")) == {}
    assert metrics(plan("rejected", {"error": "x"}, queue="q")) == {}
    assert plan("completed", {}).metrics == ()  # no queue: nothing counted


def test_a_run_time_and_a_wait_go_to_the_bucket_at_or_above_them() -> None:
    done = metrics(plan("completed", {}, queue="q", ran=0.3))
    assert done == {"T|reverse|q|completed": "1", "D|reverse|q|6": "1", "Ds|reverse|q": "0.300000"}  # le 0.5
    assert asyncnode.METRIC_BUCKETS[6] == 0.5
    assert metrics(plan("completed", {}, queue="q", ran=0.5))["D|reverse|q|6"] == "1"  # le is inclusive
    assert "D|reverse|q|16" in metrics(plan("completed", {}, queue="q", ran=7200.0))  # +Inf
    started = plan("started", {"worker": "h:1"}, queue="q", waited=-0.01)  # clocks apart: never negative
    assert metrics(started) == {"W|q|0": "1", "Ws|q": "0.000000"}
    assert started.metrics_first  # a retry's or redelivery's start is not counted again
