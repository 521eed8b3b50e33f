"""The named-queue commands as real ``asyncnode.py`` processes: ``worker --queues``, ``queues list|pause|resume``
(on both backends), ``check`` refusing a bad [queues]/[routes] config, and ``up --dry-run`` with instance queues."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import cleanup, run_cli, write_config


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    """The single ``asyncnode: ...`` line of a run that exited 2 having printed nothing else."""
    assert run.returncode == 2, run
    assert run.stdout == "", run.stdout
    assert run.stderr.startswith("asyncnode: ") and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr
    return run.stderr


def queue_table(out: str) -> dict[str, list[str]]:
    """``queues list``'s rows by queue name: [state, ready, running, retrying, workers, limits]."""
    lines = out.splitlines()
    assert lines[0].split() == ["queue", "state", "ready", "running", "retrying", "workers", "limits"], out
    assert re.fullmatch(r"(\d+|-) dead letter\(s\) in \S+", lines[-1]), out
    rows = [line.split(None, 6) for line in lines[1:-1]]
    return {row[0]: row[1:] for row in rows}


@pytest.fixture
async def mail_config(backend: str, tag: str, tmp_path: Path) -> AsyncIterator[Path]:
    """A config on ``backend`` declaring queue ``mail`` (limit 2) besides ``default``; cleaned up afterwards."""
    path = write_config(tmp_path / "config.toml", tag, backend=backend, queues={"mail": {"limit": 2}})
    yield path
    await cleanup(tag)


@pytest.fixture
def embedded_mail_config(tag: str, tmp_path: Path) -> Path:
    """An embedded config declaring ``mail`` (limit 2), for commands that stop before any backend is opened."""
    return write_config(tmp_path / "config.toml", tag, backend="embedded", queues={"mail": {"limit": 2}})


@pytest.mark.parametrize("queues", ["nosuch", "mail,nosuch"])
async def test_worker_with_an_unknown_queue_exits_2_naming_it_and_the_declared_ones(
    embedded_mail_config: Path, queues: str
) -> None:
    error = one_line_error(await run_cli("worker", "--config", str(embedded_mail_config), "--queues", queues))
    assert error == "asyncnode: --queues: unknown queue(s) 'nosuch' (declared: default, mail)\n"


@pytest.mark.parametrize("action", ["pause", "resume"])
async def test_queues_pause_or_resume_of_an_unknown_queue_exits_2(embedded_mail_config: Path, action: str) -> None:
    error = one_line_error(await run_cli("queues", action, "nosuch", "--config", str(embedded_mail_config)))
    assert error == f"asyncnode: queues {action}: unknown queue(s) 'nosuch' (declared: default, mail)\n"


async def test_pause_then_resume_shows_in_queues_list(mail_config: Path) -> None:
    config = ("--config", str(mail_config))
    listed = await run_cli("queues", "list", *config)
    assert listed.returncode == 0, listed
    assert {name: row[0] for name, row in queue_table(listed.stdout).items()} == {"default": "active", "mail": "active"}

    paused = await run_cli("queues", "pause", "mail", *config)
    assert (paused.returncode, paused.stdout) == (0, "queue mail paused\n"), paused
    listed = await run_cli("queues", "list", *config)
    assert listed.returncode == 0, listed
    assert {name: row[0] for name, row in queue_table(listed.stdout).items()} == {"default": "active", "mail": "paused"}

    resumed = await run_cli("queues", "resume", "mail", *config)
    assert (resumed.returncode, resumed.stdout) == (0, "queue mail resumed\n"), resumed
    listed = await run_cli("queues", "list", *config)
    assert listed.returncode == 0, listed
    assert {name: row[0] for name, row in queue_table(listed.stdout).items()} == {"default": "active", "mail": "active"}


async def test_pausing_or_resuming_twice_says_it_already_was(mail_config: Path) -> None:
    config = ("--config", str(mail_config))
    for args, expected in [
        (("resume", "mail"), "queue mail was already resumed\n"),  # never paused
        (("pause", "mail"), "queue mail paused\n"),
        (("pause", "mail"), "queue mail was already paused\n"),
        (("resume", "mail"), "queue mail resumed\n"),
        (("resume", "mail"), "queue mail was already resumed\n"),
    ]:
        run = await run_cli("queues", *args, *config)
        assert (run.returncode, run.stdout) == (0, expected), (args, run)


async def test_queues_list_shows_each_declared_queue_with_its_limits(mail_config: Path) -> None:
    listed = await run_cli("queues", "list", "--config", str(mail_config))
    assert listed.returncode == 0, listed
    table = queue_table(listed.stdout)
    assert list(table) == ["default", "mail"]
    assert table["default"][-1] == "-" and table["mail"][-1] == "limit 2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[queues.mail]\n[routes]\nemail = "heavy"\n',
            "[routes] email: routes to queue 'heavy', which is not declared (declared: default, mail;",
            id="route-to-undeclared-queue",
        ),
        pytest.param("[queues.dlq]\nlimit = 1\n", "[queues.dlq]: 'dlq' is reserved", id="reserved-name"),
        pytest.param(
            '[queues.mail]\nrate = "10/day"\n', '[queues.mail] rate: expected "N/s", "N/m" or "N/h"', id="bad-rate"
        ),
    ],
)
async def test_check_exits_2_with_one_line_on_a_queue_config_error(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    error = one_line_error(await run_cli("check", "--config", str(path), "--run-dir", str(tmp_path / "run")))
    assert error.startswith(f"asyncnode: {path}: {expected}"), error


async def test_up_dry_run_prints_the_queues_each_instance_serves(tag: str, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.toml",
        tag,
        backend="embedded",
        queues={"mail": {"limit": 2}},
        instances={
            "worker-mail": {"roles": ["worker"], "queues": ["mail"], "processes": 1},
            "local": {"roles": ["api", "worker"]},
        },
    )

    async def dry_run(instance: str) -> tuple[list[str], list[str]]:
        """``up --dry-run`` of ``instance``: its first line, and the worker programs' commands."""
        run_dir = tmp_path / "run" / instance
        run = await run_cli("up", "--config", str(path), "--instance", instance, "--dry-run", "--run-dir", str(run_dir))
        assert run.returncode == 0, run
        lines = run.stdout.splitlines()
        workers = [line for line in lines if line.startswith("command=") and " -m asyncnode worker " in line]
        return lines, workers

    lines, workers = await dry_run("worker-mail")
    assert lines[0] == "asyncnode: instance 'worker-mail' (host 'worker-mail'): 1 worker(s) serving mail"
    assert "[program:api]" not in lines
    assert len(workers) == 1 and workers[0].endswith(f"worker --config {path.resolve()} --queues mail"), workers

    lines, workers = await dry_run("local")
    described = re.fullmatch(
        r"asyncnode: instance 'local' \(host 'local'\): api on port \d+, (\d+) worker\(s\) serving default, mail",
        lines[0],
    )
    assert described, lines[0]
    count = int(described.group(1))
    assert count >= 1 and len(workers) == count, (count, workers)
    assert all(w.endswith(" --queues default,mail") for w in workers), workers
    assert "[program:api]" in lines
