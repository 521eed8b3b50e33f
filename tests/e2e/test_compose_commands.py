"""The commands compose.yml runs for the app services work, without Docker.

For ``api`` and ``worker``, take ``command`` and ``environment`` from compose.yml,
point the ``${VAR:-default}`` values at this test's isolated setup (the service
host names ``rabbitmq``/``redis`` only resolve inside compose), run the commands
as real processes from the repository root, push one task through them over
HTTP and stop both with SIGTERM: each must exit 0.  Also runs the Dockerfile's
HEALTHCHECK command against the live API.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml

import asyncnode
from tests.conftest import RABBIT_URL, REDIS_URL, ROOT, queue_counts, wait_for

APP_SERVICES = ("api", "worker")
#: The operator token the test gives compose's API (which listens on 0.0.0.0, so protected mode wants one).
TOKEN = "compose-test-token"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((ROOT / "compose.yml").read_text())["services"][name]
    return service


def interpolate(value: str, values: dict[str, str]) -> str:
    """Resolve ``${VAR:-default}`` as compose would, with ``values`` as the environment."""
    out = _VAR.sub(lambda m: values.get(m.group(1)) or m.group(2), value)
    assert "$" not in out, f"uninterpolated variable left in {value!r}"
    return out


class ServiceProc:
    """One compose app service's ``command`` run as a local process, stopped by pid."""

    def __init__(self, name: str, config: Path, port: int, log_path: Path, token: str = TOKEN) -> None:
        service = compose_service(name)
        command = list(service["command"])
        assert command[0] == "python", command
        # The test's services instead of the compose host names; anything else keeps its default.
        values = {"RABBIT_URL": RABBIT_URL, "REDIS_URL": REDIS_URL, "ASYNCNODE_TOKEN": token}
        self.environment = {k: interpolate(str(v), values) for k, v in service["environment"].items()}
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, *command[1:], "--config", str(config)],
            cwd=ROOT,
            env={**os.environ, **self.environment, "ASYNCNODE_API_PORT": str(port)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} pid {self.popen.pid} exited with {self.popen.returncode}:\n{self.log()}")

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM by pid; the exit status, or fail if it is still running after ``timeout`` s."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running {timeout:g} s after SIGTERM:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.popen.returncode

    def kill(self) -> None:
        """Last resort at teardown: make sure nothing outlives the test."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        self._log.close()


@pytest.fixture
def run_service(tmp_path: Path) -> Iterator[Callable[[str, Path, int], ServiceProc]]:
    started: list[ServiceProc] = []

    def start(name: str, config: Path, port: int) -> ServiceProc:
        p = ServiceProc(name, config, port, tmp_path / f"{name}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture
def backend(services: None) -> str:
    """compose.yml's app services take their RabbitMQ and Redis URLs from the environment: no embedded variant."""
    return "rabbitmq"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=headers) as s:
        yield s


async def start_app(
    run_service: Callable[[str, Path, int], ServiceProc],
    session: aiohttp.ClientSession,
    config_file: Path,
    cfg: asyncnode.Config,
) -> dict[str, ServiceProc]:
    """Start the api and worker services' commands; return once both are ready."""
    procs = {name: run_service(name, config_file, cfg.api.port) for name in APP_SERVICES}
    base = f"http://127.0.0.1:{cfg.api.port}"

    async def api_answers() -> bool:
        procs["api"].check_alive()
        try:
            async with session.get(base + "/api/task-types") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def worker_consumes() -> bool:
        procs["worker"].check_alive()
        try:
            return (await queue_counts(cfg))[1] == 1
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False

    await wait_for(api_answers, timeout=20, what="the api service to answer GET /api/task-types")
    await wait_for(worker_consumes, timeout=20, what="the worker service to consume the work queue")
    return procs


def test_compose_environment_is_the_one_the_app_reads() -> None:
    """The overrides compose sets are the ones Config applies (ASYNCNODE_INSTANCE aside)."""
    for name in APP_SERVICES:
        env = compose_service(name)["environment"]
        assert {"RABBIT_URL", "REDIS_URL"} <= set(env) & set(asyncnode.Config.ENV)


async def test_compose_commands_run_a_task(
    run_service: Callable[[str, Path, int], ServiceProc],
    session: aiohttp.ClientSession,
    config_file: Path,
    cfg: asyncnode.Config,
) -> None:
    procs = await start_app(run_service, session, config_file, cfg)
    assert procs["api"].environment["ASYNCNODE_INSTANCE"] == "api"
    assert procs["worker"].environment["ASYNCNODE_INSTANCE"] == "worker"
    base = f"http://127.0.0.1:{cfg.api.port}"

    async with session.post(base + "/api/tasks", json={"type": "reverse", "payload": {"text": "compose"}}) as r:
        body = await r.json()
        assert r.status == 202, body
        tid = body["id"]

    async def completed() -> dict[str, Any] | None:
        for p in procs.values():
            p.check_alive()
        async with session.get(f"{base}/api/tasks/{tid}") as r:
            assert r.status == 200, await r.text()
            rec: dict[str, Any] = await r.json()
        assert rec["status"] not in ("failed", "rejected"), rec
        return rec if rec["status"] == "completed" else None

    rec = await wait_for(completed, timeout=20, what=f"task {tid} to complete")
    assert rec["result"] == "esopmoc", json.dumps(rec)

    for name in ("worker", "api"):
        code = await procs[name].terminate()
        assert code == 0, f"{name} exited {code} on SIGTERM:\n{procs[name].log()}"


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD (exec form), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    [line] = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("HEALTHCHECK")]
    command: list[str] = json.loads(line.split(" CMD ", 1)[1])
    return command


async def run_healthcheck(env: dict[str, str], port: int) -> subprocess.CompletedProcess[str]:
    """Run the Dockerfile's HEALTHCHECK command with the container's ``env``, aimed at ``port``."""
    command = healthcheck_command()
    assert command[0] == "python", command
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, *command[1:]],
        env={**os.environ, **env, "ASYNCNODE_API_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=15,
    )


async def test_dockerfile_healthcheck_passes_against_the_api_and_fails_once_it_is_gone(
    run_service: Callable[[str, Path, int], ServiceProc],
    session: aiohttp.ClientSession,
    config_file: Path,
    cfg: asyncnode.Config,
) -> None:
    procs = await start_app(run_service, session, config_file, cfg)
    # The container's env reaches the probe; ASYNCNODE_API_PORT points it at this test's API.
    env = procs["api"].environment
    result = await run_healthcheck(env, cfg.api.port)
    assert result.returncode == 0, f"HEALTHCHECK failed ({result.returncode}):\n{result.stderr[-2000:]}"
    for name in ("worker", "api"):
        assert await procs[name].terminate() == 0, procs[name].log()

    # The API stopped: nothing listens on its port any more, and the probe must say so.
    result = await run_healthcheck(env, cfg.api.port)
    assert result.returncode != 0, f"HEALTHCHECK passed with the API stopped:\n{result.stdout}{result.stderr}"
    assert "Connection refused" in result.stderr, result.stderr[-2000:]


def test_compose_api_without_a_token_refuses_to_listen(config_file: Path, tmp_path: Path) -> None:
    """compose's API listens on 0.0.0.0: with no ASYNCNODE_TOKEN, protected mode stops it in one line."""
    p = ServiceProc("api", config_file, 0, tmp_path / "api.log", token="")
    try:
        assert p.popen.wait(30) == 2, p.log()
    finally:
        p.kill()
    [line] = p.log().splitlines()
    assert "[api] token" in line and "insecure = true" in line, line
