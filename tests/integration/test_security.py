"""Safe by default: protected mode, the two kinds of token, and cross-site requests refused, on both backends.

Every state-changing route is tried with what must be refused, and then checked to have changed nothing:
no task recorded, the dead letter still there.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

import asyncnode
from tests.conftest import ROOT, Proc, wait_healthy, write_config

Client = TestClient  # type: ignore[type-arg]
TOKEN = "operator-s3cret"
READ = "read-only-s3cret"
#: Every request of the test clients.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
BODY = {"type": "reverse", "payload": {"text": "x"}}
#: The one dead letter each test seeds, so that a requeue or a discard would show.
DEAD = asyncnode.Envelope("3f1b3c1e-2b8a-4f43-9d53-0c1f3a0f7a11", "reverse", {"text": "dead"})
#: Every route that changes state, with the body it takes (None: none).
MUTATING = [
    ("POST", "/api/tasks", BODY),
    ("POST", "/api/dlq/requeue", None),
    ("POST", f"/api/dlq/{DEAD.id}/requeue", None),
    ("DELETE", f"/api/dlq/{DEAD.id}", None),
]
READING = ["/api/tasks", "/api/dlq", "/api/workers", "/api/task-types", "/api/access", f"/api/tasks/{DEAD.id}"]


def secured(cfg: asyncnode.Config, **api: object) -> asyncnode.Config:
    return dataclasses.replace(cfg, api=dataclasses.replace(cfg.api, token=TOKEN, read_token=READ, **api))


@pytest.fixture
async def seeded(cfg: asyncnode.Config) -> AsyncIterator[asyncnode.Config]:
    """The test's config, with one dead letter in its DLQ."""
    async with asyncnode.backend(cfg, "api") as (queue, _):
        await queue.dead_letter(DEAD, {"x-error": "boom", "x-attempts": 1})
    yield cfg


async def dead_letters(client: Client) -> list[str]:
    resp = await client.get("/api/dlq", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    return [item["id"] for item in (await resp.json())["items"]]


async def tasks(client: Client) -> list[str]:
    resp = await client.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    return [item["id"] for item in (await resp.json())["items"]]


async def test_the_read_token_reads_everything_and_changes_nothing(
    seeded: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await aiohttp_client(asyncnode.make_app(secured(seeded)), timeout=HTTP_TIMEOUT)
    reader = {"Authorization": f"Bearer {READ}"}
    for path in READING:
        resp = await client.get(path, headers=reader)
        assert resp.status in (200, 404), (path, resp.status)  # 404: the dead task has no record
        assert resp.status == 200 or path == f"/api/tasks/{DEAD.id}"
    assert (await (await client.get("/api/access", headers=reader)).json()) == {"access": "read"}
    operator = {"Authorization": f"Bearer {TOKEN}"}
    assert (await (await client.get("/api/access", headers=operator)).json()) == {"access": "operator"}
    ws = await client.ws_connect(f"/ws?token={READ}")
    await ws.close()
    for method, path, body in MUTATING:
        resp = await client.request(method, path, json=body, headers=reader)
        assert resp.status == 403, (method, path)
        assert "read-only" in (await resp.json())["error"]
    assert await dead_letters(client) == [DEAD.id]
    assert await tasks(client) == []


async def test_a_wrong_or_missing_token_is_refused_on_every_route(
    seeded: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await aiohttp_client(asyncnode.make_app(secured(seeded)), timeout=HTTP_TIMEOUT)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):  # the last: no "Bearer"
        for method, path, body in MUTATING:
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        for path in READING:
            assert (await client.get(path, headers=headers)).status == 401, (path, headers)
    for query in ("", "?token=wrong", f"?token={TOKEN}x"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(f"/ws{query}")
        assert refused.value.status == 401
    assert await dead_letters(client) == [DEAD.id]
    assert await tasks(client) == []


async def test_the_operator_token_acts_on_every_route(
    seeded: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await aiohttp_client(asyncnode.make_app(secured(seeded)), timeout=HTTP_TIMEOUT)
    operator = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post(f"/api/dlq/{DEAD.id}/requeue", headers=operator)
    assert resp.status == 200 and (await resp.json()) == {"requeued": 1, "skipped": 0}
    assert (await client.post("/api/tasks", json=BODY, headers=operator)).status == 202
    assert DEAD.id in await tasks(client)  # requeued: a fresh task again


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Origin": "https://evil.example"}, id="foreign-origin"),
        pytest.param({"Origin": "null"}, id="opaque-origin"),
        pytest.param({"Sec-Fetch-Site": "cross-site"}, id="sec-fetch-site"),
        pytest.param({"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, id="both"),
    ],
)
async def test_a_cross_site_request_is_refused_even_with_the_operator_token(
    headers: dict[str, str], seeded: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    client = await aiohttp_client(asyncnode.make_app(secured(seeded)), timeout=HTTP_TIMEOUT)
    for method, path, body in MUTATING:
        resp = await client.request(method, path, json=body, headers={**headers, "Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 403, (method, path)
        assert "cross-site" in (await resp.json())["error"]
    assert await dead_letters(client) == [DEAD.id]
    assert await tasks(client) == []


async def test_a_body_less_cross_site_post_without_any_token_is_refused(
    seeded: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    """What a form on any web page could send to an API on the operator's own machine (no token set there)."""
    client = await aiohttp_client(asyncnode.make_app(seeded), timeout=HTTP_TIMEOUT)
    for method, path, _ in MUTATING:
        resp = await client.request(
            method,
            path,
            data=b"",
            headers={"Origin": "https://evil.example", "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert resp.status == 403, (method, path)
    assert await dead_letters(client) == [DEAD.id]
    assert await tasks(client) == []


async def test_same_origin_allowed_origins_and_scripts_may_act(
    seeded: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    cfg = dataclasses.replace(seeded, api=dataclasses.replace(seeded.api, allowed_origins=("https://ops.example",)))
    client = await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)
    own = f"http://{client.server.host}:{client.server.port}"
    for headers in (
        {"Origin": own, "Sec-Fetch-Site": "same-origin"},
        {"Origin": "https://ops.example"},
        {},  # curl, scripts and the CLI send no Origin
    ):
        assert (await client.post("/api/tasks", json=BODY, headers=headers)).status == 202, headers
    assert len(await tasks(client)) == 3


async def test_the_tokens_come_from_the_environment(config_file: Path) -> None:
    cfg = asyncnode.Config.from_toml(config_file, env={"ASYNCNODE_TOKEN": TOKEN, "ASYNCNODE_READ_TOKEN": READ})
    assert (cfg.api.token, cfg.api.read_token) == (TOKEN, READ)


@pytest.mark.parametrize(
    ("api", "error"),
    [
        ({"read_token": READ}, "set [api] token too"),
        ({"token": TOKEN, "read_token": TOKEN}, "must differ"),
    ],
)
def test_read_token_rules(api: dict[str, str], error: str, tmp_path: Path) -> None:
    with pytest.raises(asyncnode.ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        write_config(tmp_path / "config.toml", "t", backend="embedded", api={"host": "127.0.0.1", **api})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_protected_mode_refuses_a_non_loopback_bind_without_a_token(host: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", "t", backend="embedded", api={"host": host})
    for command in (["api"], ["up", "--dry-run", "--run-dir", str(tmp_path / "run")]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "asyncnode.py"), *command, "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("asyncnode: ") and "[api] token" in line and "insecure = true" in line, line
    assert not (tmp_path / "asyncnode.db").exists()  # refused before opening anything
    check = subprocess.run(
        [
            sys.executable,
            str(ROOT / "asyncnode.py"),
            "check",
            "--config",
            str(config),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 1 and "problem" in check.stdout and "[api] token" in check.stdout, check.stdout


@pytest.mark.parametrize(
    "api",
    [
        pytest.param({"host": "0.0.0.0", "token": TOKEN}, id="token"),
        pytest.param({"host": "0.0.0.0", "insecure": True}, id="insecure"),
        pytest.param({"host": "127.0.0.1"}, id="loopback"),
        pytest.param({"host": "localhost"}, id="localhost"),
    ],
)
def test_protected_mode_lets_a_token_insecure_or_loopback_through(api: dict[str, object], tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", "t", backend="embedded", api=api)
    assert asyncnode.exposure_error(asyncnode.Config.from_toml(config, env={})) is None
    result = subprocess.run(
        [sys.executable, str(ROOT / "asyncnode.py"), "up", "--dry-run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "ASYNCNODE_RUN_DIR": str(tmp_path / "run")},
    )
    assert result.returncode == 0, result.stderr


def test_protected_mode_counts_the_token_from_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", "t", backend="embedded", api={"host": "0.0.0.0"})
    assert asyncnode.exposure_error(asyncnode.Config.from_toml(config, env={})) is not None
    assert asyncnode.exposure_error(asyncnode.Config.from_toml(config, env={"ASYNCNODE_TOKEN": TOKEN})) is None


async def test_a_real_api_on_all_interfaces_takes_its_token_from_the_environment(
    tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    config = write_config(tmp_path / "config.toml", "t", backend="embedded", api={"host": "0.0.0.0"})
    port = asyncnode.Config.from_toml(config, env={}).api.port
    api = procs("api", config, {"ASYNCNODE_TOKEN": TOKEN, "ASYNCNODE_READ_TOKEN": READ})
    base = f"http://127.0.0.1:{port}"
    await wait_healthy(base, api)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{base}/api/tasks") as r:
            assert r.status == 401
        async with session.get(f"{base}/api/tasks", headers={"Authorization": f"Bearer {READ}"}) as r:
            assert r.status == 200
        async with session.post(f"{base}/api/tasks", json=BODY, headers={"Authorization": f"Bearer {READ}"}) as r:
            assert r.status == 403
        operator = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(
            f"{base}/api/tasks", json=BODY, headers={**operator, "Origin": "https://evil.example"}
        ) as r:
            assert r.status == 403
        async with session.post(f"{base}/api/tasks", json=BODY, headers=operator) as r:
            assert r.status == 202
    assert TOKEN not in api.log() and READ not in api.log()  # secrets never reach the log
