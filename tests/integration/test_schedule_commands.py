"""The schedule commands as real ``asyncnode.py`` processes: ``schedules list|pause|resume|run`` on both backends
(no API or worker running: they act on the store and the queue themselves), an unknown name, and every config
error of a schedule refused in one line with exit 2 by ``check`` and at the start of a role."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import asyncnode
from tests.conftest import cleanup, run_cli, task_records, write_config
from tests.integration.test_queue_commands import one_line_error

#: A declared queue for the schedules that name one.
MAIL = "[queues.mail]\n"


def with_payload(path: Path, name: str, payload: dict[str, str]) -> Path:
    """Add ``[schedules.<name>.payload]`` to a config write_config wrote (it writes no inline tables)."""
    lines = [f"[schedules.{name}.payload]", *(f'{k} = "{v}"' for k, v in payload.items())]
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


@pytest.fixture
async def nightly_config(backend: str, tag: str, tmp_path: Path) -> AsyncIterator[Path]:
    """A config on ``backend`` with schedule ``nightly`` (reverse, 03:00 in Berlin, queue mail) and ``ping``
    (noop every day); cleaned up afterwards."""
    path = write_config(
        tmp_path / "config.toml",
        tag,
        backend=backend,
        queues={"mail": {}},
        schedules={
            "nightly": {"type": "reverse", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "queue": "mail"},
            "ping": {"type": "noop", "every": 86400},
        },
    )
    yield with_payload(path, "nightly", {"text": "abc"})
    await cleanup(tag)


def listed(out: str) -> dict[str, str]:
    """``schedules list``'s lines by schedule name."""
    lines = out.splitlines()
    return {line.split()[0]: line for line in lines}


def local_time(text: str) -> float:
    """A ``YYYY-MM-DD HH:MM:SS`` local time as ``schedules list`` prints it, in epoch seconds."""
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def next_run(line: str) -> float:
    """The next run a ``schedules list`` line shows."""
    found = re.search(r"  next (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  ", line)
    assert found, line
    return local_time(found.group(1))


async def test_schedules_list_pause_resume_and_run_act_on_the_store_without_any_process(nightly_config: Path) -> None:
    config = ("--config", str(nightly_config))
    cfg = asyncnode.Config.from_toml(nightly_config, env={})
    nightly, ping = cfg.schedules["nightly"], cfg.schedules["ping"]

    before = time.time()
    run = await run_cli("schedules", "list", *config)
    after = time.time()
    assert run.returncode == 0, run
    lines = listed(run.stdout)
    assert list(lines) == ["nightly", "ping"], run.stdout
    assert lines["nightly"].startswith("nightly  reverse  cron '0 3 * * *' Europe/Berlin  next "), lines
    assert lines["nightly"].endswith("  last -"), lines  # never fired
    assert lines["ping"].startswith("ping  noop  every 86400 s UTC  next ") and lines["ping"].endswith("  last -")
    # Never ticked: the next run after the moment the command ran.
    for line, sch in ((lines["nightly"], nightly), (lines["ping"], ping)):
        assert asyncnode.next_slot(sch, before) <= next_run(line) <= asyncnode.next_slot(sch, after), line

    run = await run_cli("schedules", "pause", "nightly", *config)
    assert (run.returncode, run.stdout) == (0, "nightly: paused\n"), run
    run = await run_cli("schedules", "list", *config)
    assert run.returncode == 0, run
    lines = listed(run.stdout)
    assert lines["nightly"] == "nightly  reverse  cron '0 3 * * *' Europe/Berlin  paused  last -", lines
    assert "  next " in lines["ping"], lines  # the other one is not paused

    resumed_from = time.time()
    run = await run_cli("schedules", "resume", "nightly", *config)
    assert (run.returncode, run.stdout) == (0, "nightly: resumed\n"), run
    sent = time.time()
    run = await run_cli("schedules", "run", "nightly", *config)
    answered = time.time()
    assert run.returncode == 0, run
    found = re.fullmatch(r"nightly: (\S+)\n", run.stdout)
    assert found, run.stdout
    tid = found.group(1)
    assert str(uuid.UUID(tid)) == tid

    run = await run_cli("schedules", "list", *config)
    assert run.returncode == 0, run
    line = listed(run.stdout)["nightly"]
    last = re.search(r"  last (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (\S+) (\S+)$", line)
    assert last, line
    assert int(sent) <= local_time(last.group(1)) <= answered, (sent, line, answered)  # printed to the second
    assert last.group(2, 3) == (tid, "pending"), line  # no worker runs it
    # Resumed: its next run is the first 03:00 after the resume.
    assert next_run(line) == asyncnode.next_slot(nightly, resumed_from), line

    tasks, _ = await task_records(cfg, [tid])
    record = tasks[tid]
    assert (record["schedule"], record["type"], record["queue"], record["status"]) == (
        "nightly",
        "reverse",
        "mail",
        "pending",
    ), record
    assert record["payload"] == {"text": "abc"} and "slot" not in record, record


@pytest.mark.parametrize("action", ["pause", "resume", "run"])
async def test_schedules_pause_resume_or_run_of_an_unknown_name_exits_2(tag: str, tmp_path: Path, action: str) -> None:
    path = write_config(
        tmp_path / "config.toml", tag, backend="embedded", schedules={"ping": {"type": "noop", "every": 60}}
    )
    error = one_line_error(await run_cli("schedules", action, "nosuch", "--config", str(path)))
    assert error == f"asyncnode: no schedule 'nosuch' in {path} (known: ping)\n"


#: Every config error of a schedule: (its keys, the message after the file's name).
CONFIG_ERRORS = [
    pytest.param(
        'type = "nosuch"\nevery = 60\n',
        "[schedules.nightly] type: unknown task type 'nosuch' (known: email, noop, reverse, sentiment, sleep)",
        id="unknown-type",
    ),
    pytest.param(
        'type = "email"\nevery = 60\npayload = { to = "not an address", subject = "s", body = "b" }\n',
        "[schedules.nightly] payload: payload.to must be one e-mail address, like name@example.com",
        id="payload-refused-by-its-type",
    ),
    pytest.param(
        'type = "email"\nevery = 60\n', "[schedules.nightly] payload: payload.to is required", id="payload-missing"
    ),
    pytest.param(
        'type = "noop"\ncron = "0 3 * * *"\nevery = 60\n',
        "[schedules.nightly]: set either cron or every (seconds), not both and not neither",
        id="both-cron-and-every",
    ),
    pytest.param(
        'type = "noop"\n',
        "[schedules.nightly]: set either cron or every (seconds), not both and not neither",
        id="neither-cron-nor-every",
    ),
    pytest.param(
        'type = "noop"\ncron = "0 25 * * *"\n',
        "[schedules.nightly] cron: '0 25 * * *' is not a five-field cron expression",
        id="bad-cron",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\ntimezone = "Europe/Atlantis"\n',
        "[schedules.nightly] timezone: unknown time zone 'Europe/Atlantis' (e.g. UTC, Europe/Berlin)",
        id="unknown-timezone",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\ncatch_up = "every"\n',
        "[schedules.nightly] catch_up: expected one of 'one', 'none', got 'every'",
        id="bad-catch-up",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\nqueue = "heavy"\n',
        "[schedules.nightly] queue: 'heavy' is not declared (declared: default, mail)",
        id="undeclared-queue",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\nat = "03:00"\n',
        "[schedules.nightly] at: unknown key (known: type, payload, cron, every, timezone, queue, catch_up)",
        id="unknown-key",
    ),
    pytest.param(
        'type = "noop"\nevery = 0\n', "[schedules.nightly] every: expected a value ≥ 0.001, got 0", id="every-0"
    ),
]


@pytest.mark.parametrize(("keys", "expected"), CONFIG_ERRORS)
async def test_check_refuses_each_schedule_config_error_in_one_line_with_exit_2(
    tmp_path: Path, keys: str, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(MAIL + "[schedules.nightly]\n" + keys)
    run = await run_cli("check", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert one_line_error(run) == f"asyncnode: {path}: {expected}\n"
    assert not (tmp_path / "asyncnode.db").exists()  # refused before opening anything


@pytest.mark.parametrize("role", ["api", "worker"])
async def test_a_role_refuses_a_schedule_of_an_unknown_type_at_start(tmp_path: Path, role: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[schedules.nightly]\ntype = "nosuch"\nevery = 60\n')
    error = one_line_error(await run_cli(role, "--config", str(path)))
    assert error.startswith(f"asyncnode: {path}: [schedules.nightly] type: unknown task type 'nosuch'"), error


async def test_a_slot_submitted_twice_makes_one_task_and_queues_it_again_while_pending(
    nightly_config: Path,
) -> None:
    """A holder that died between a slot's record and its publish, or after: the next one submits the same slot
    again under the same id; the store keeps one task, and queues it again only while it is still pending."""
    cfg = asyncnode.Config.from_toml(nightly_config, env={})
    asyncnode.load_handlers(cfg)
    queue, store = asyncnode.open_backend(cfg, "api")
    try:
        sub = asyncnode.schedule_submission(cfg, cfg.schedules["ping"])
        tid = asyncnode.slot_task_id(cfg, "ping", 86400.0)
        assert asyncnode.slot_task_id(cfg, "ping", 86400.0) == tid != asyncnode.slot_task_id(cfg, "ping", 172800.0)
        fields = {"schedule": "ping", "slot": 86400.0}
        first = await asyncnode.submit_task(queue, store, cfg, sub, fields, tid=tid)
        again = await asyncnode.submit_task(queue, store, cfg, sub, fields, tid=tid)
        assert first == again == {"id": tid, "status": "pending", "queue": "default"}
        record = await store.get(tid)
        assert record is not None and [h["status"] for h in record["history"]] == ["pending"], record
        assert (await queue.queue_figures())[0]["default"]["ready"] == 2  # queued again: it might not have been
        finished = asyncnode.plan_change("completed", tid, "noop", {"result": None}, tasks=cfg.tasks)
        assert await store.apply(finished) is not None
        assert await asyncnode.submit_task(queue, store, cfg, sub, fields, tid=tid) == {
            "id": tid,
            "status": "completed",
            "queue": "default",
        }
        assert (await queue.queue_figures())[0]["default"]["ready"] == 2  # a finished slot is not queued again
    finally:
        await queue.close()
        await store.close()
