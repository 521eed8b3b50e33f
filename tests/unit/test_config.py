"""Config loading, environment overrides and config errors (no services needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import asyncnode

ROOT = Path(asyncnode.__file__).resolve().parent


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> asyncnode.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return asyncnode.Config.from_toml(path, env=env or {})


def test_shipped_config_loads_with_the_documented_keys() -> None:
    cfg = asyncnode.Config.from_toml(ROOT / "config.toml", env={})
    assert (cfg.broker.url, cfg.redis.url) == ("", "")  # embedded, until both URLs are set
    assert cfg.embedded == asyncnode.EmbeddedConfig(path="asyncnode.db", lease_timeout=30.0, synchronous="full")
    assert cfg.broker.queue == "tasks"
    assert cfg.broker.prefetch == 1
    assert cfg.broker.max_retries == 3
    assert cfg.redis.channel == "task_updates"
    assert cfg.redis.key_prefix == "task:"
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 5000)
    assert (cfg.api.token, cfg.api.read_token, cfg.api.insecure) == ("", "", False)
    assert (cfg.tasks.result_ttl, cfg.tasks.max_recent, cfg.tasks.search_words) == (86400, 10000, True)
    assert (cfg.smtp.host, cfg.smtp.port, cfg.smtp.sender) == ("127.0.0.1", 1025, "asyncnode@localhost")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.broker == asyncnode.BrokerConfig()
    assert cfg.api.client_max_size == 1024 * 1024


def test_environment_overrides_urls_and_port(tmp_path: Path) -> None:
    env = {"RABBIT_URL": "amqp://u:p@rabbit:5672/", "REDIS_URL": "redis://redis:6379/1", "ASYNCNODE_API_PORT": "8080"}
    cfg = load(tmp_path, "[api]\nport = 5000\n", env)
    assert cfg.broker.url == "amqp://u:p@rabbit:5672/"
    assert cfg.redis.url == "redis://redis:6379/1"
    assert cfg.api.port == 8080


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("[broker]\nprefettch = 2\n", {}, "[broker] prefettch: unknown key"),
        ("[brokr]\n", {}, "[brokr]: unknown section"),
        ('[broker]\nprefetch = "2"\n', {}, "[broker] prefetch: expected an integer"),
        ("[broker]\nprefetch = 0\n", {}, "[broker] prefetch: expected a value between 1 and 65535"),
        ("[broker]\nprefetch = true\n", {}, "[broker] prefetch: expected an integer"),
        ("[api]\nport = 70000\n", {}, "[api] port: expected a value between 0 and 65535"),
        ('[redis]\nkey_prefix = ""\n', {}, "[redis] key_prefix: expected a non-empty string"),
        ('[broker]\nqueue_type = "stream"\n', {}, "[broker] queue_type: expected one of 'quorum', 'classic'"),
        ("[smtp]\nstarttls = 1\n", {}, "[smtp] starttls: expected true or false"),
        ('[handlers]\nmodules = "handlers"\n', {}, "[handlers] modules: expected a list of non-empty strings"),
        ("broker = 1\n", {}, "broker: expected a table [broker]"),
        ("[broker\nurl = 1\n", {}, "not valid TOML"),
        ("", {"ASYNCNODE_API_PORT": "http"}, "$ASYNCNODE_API_PORT: expected an integer"),
        ('[embedded]\nsynchronous = "off"\n', {}, "[embedded] synchronous: expected one of 'full', 'normal'"),
        ('[embedded]\nlease_timeout = "30"\n', {}, "[embedded] lease_timeout: expected a number"),
        ("[embedded]\npath = 1\n", {}, "[embedded] path: expected a string"),
        ("[embedded]\nurl = 'x'\n", {}, "[embedded] url: unknown key"),
    ],
)
def test_config_errors_name_file_key_and_expectation(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(asyncnode.ConfigError) as err:
        load(tmp_path, text, env)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "config.toml"))
    assert expected in message
    assert "\n" not in message


RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"

#: Configs that name one of the two servers without the other: (file text, environment).
HALF_CONFIGURED = [
    pytest.param(f'[broker]\nurl = "{RABBIT}"\n', {}, id="broker-url-only"),
    pytest.param(f'[redis]\nurl = "{REDIS}"\n', {}, id="redis-url-only"),
    pytest.param("", {"RABBIT_URL": RABBIT}, id="RABBIT_URL-only"),
    pytest.param("", {"REDIS_URL": REDIS}, id="REDIS_URL-only"),
    pytest.param(f'[embedded]\npath = "x.db"\n[broker]\nurl = "{RABBIT}"\n', {}, id="embedded-and-broker-url"),
]


@pytest.mark.parametrize(("text", "env"), HALF_CONFIGURED)
def test_one_server_url_without_the_other_is_a_config_error(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    with pytest.raises(asyncnode.ConfigError) as err:
        load(tmp_path, text, env)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "config.toml")) and "\n" not in message
    assert "[broker] url" in message and "[redis] url" in message, message


#: Another pair of servers, to tell an environment override from the file's value.
RABBIT_ENV = "amqp://u:p@rabbit.example:5672/"
REDIS_ENV = "redis://redis.example:6379/2"


@pytest.mark.parametrize(
    ("text", "env", "embedded", "urls"),
    [
        pytest.param("", {}, True, ("", ""), id="neither"),
        pytest.param(
            f'[broker]\nurl = "{RABBIT}"\n[redis]\nurl = "{REDIS}"\n', {}, False, (RABBIT, REDIS), id="both-in-file"
        ),
        pytest.param(
            "", {"RABBIT_URL": RABBIT_ENV, "REDIS_URL": REDIS_ENV}, False, (RABBIT_ENV, REDIS_ENV), id="both-from-env"
        ),
        pytest.param(
            f'[broker]\nurl = "{RABBIT}"\n', {"REDIS_URL": REDIS_ENV}, False, (RABBIT, REDIS_ENV), id="file-and-env"
        ),
        pytest.param(
            f'[broker]\nurl = "{RABBIT}"\n[redis]\nurl = "{REDIS}"\n',
            {"RABBIT_URL": RABBIT_ENV, "REDIS_URL": REDIS_ENV},
            False,
            (RABBIT_ENV, REDIS_ENV),
            id="env-over-file",
        ),
    ],
)
def test_both_server_urls_or_neither_load(
    tmp_path: Path, text: str, env: dict[str, str], embedded: bool, urls: tuple[str, str]
) -> None:
    cfg = load(tmp_path, text, env)
    assert cfg.embedded_mode is embedded
    assert (cfg.broker.url, cfg.redis.url) == urls


@pytest.mark.parametrize("command", [["check"], ["api"], ["worker"], ["dlq", "list"]])
def test_cli_with_one_server_url_exits_2_with_one_line(tmp_path: Path, command: list[str]) -> None:
    half = tmp_path / "half.toml"
    half.write_text(f'[broker]\nurl = "{RABBIT}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("RABBIT_URL", "REDIS_URL")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "asyncnode.py"), *command, "--config", str(half)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert run.returncode == 2, run
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert str(half) in run.stderr and "[redis] url" in run.stderr, run.stderr
    assert run.stdout == "", run.stdout


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(asyncnode.ConfigError, match=r"line 3"):
        load(tmp_path, "[broker]\nqueue = 'a'\nprefetch = = 2\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(asyncnode.ConfigError, match="no such file"):
        asyncnode.Config.from_toml(tmp_path / "absent.toml", env={})


def test_config_path_precedence() -> None:
    assert asyncnode.config_path("a.toml", {"ASYNCNODE_CONFIG": "b.toml"}) == Path("a.toml")
    assert asyncnode.config_path(None, {"ASYNCNODE_CONFIG": "b.toml"}) == Path("b.toml")
    assert asyncnode.config_path(None, {}) == Path("config.toml")


@pytest.mark.parametrize("role", ["api", "worker"])
def test_cli_config_error_is_one_line_and_exit_2(tmp_path: Path, role: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nprefetch = 'lots'\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "asyncnode.py"), role, "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert str(bad) in run.stderr and "[broker] prefetch: expected an integer" in run.stderr


def test_cli_usage_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        asyncnode.main(["fly"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err


def test_redact_url_hides_passwords() -> None:
    assert asyncnode.redact_url("amqp://guest:secret@host:5672/") == "amqp://guest:***@host:5672/"
    assert asyncnode.redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert asyncnode.redact_url("redis://host:6379/0") == "redis://host:6379/0"
