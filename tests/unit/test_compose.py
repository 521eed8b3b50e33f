"""The container deployment: compose.yml services and profiles, and the Dockerfile.

Static checks only (no Docker engine needed): that compose.yml describes the
deployment's five services, one profile each, with the environment the app
reads, and that the Dockerfile copies files that exist and runs as a non-root user.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

import asyncnode

ROOT = Path(asyncnode.__file__).resolve().parent
SERVICES = {"api", "worker", "rabbitmq", "redis", "redisui"}
APP_SERVICES = ("api", "worker")
IMAGES = {
    "rabbitmq": "rabbitmq:3-management",
    "redis": "redis:7",
    "redisui": "rediscommander/redis-commander",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration(text: str) -> float:
    """Seconds of a compose duration such as ``330s``, ``5m30s`` or ``1h``."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(n) * _UNIT[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svc: dict[str, dict[str, Any]] = compose["services"]
    return svc


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources() -> list[str]:
    """Every source path named by a COPY instruction (flags and destination dropped)."""
    sources = []
    for word, rest in dockerfile():
        if word == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            sources.extend(args[:-1])
    return sources


# --------------------------------------------------------------------------
# compose.yml
# --------------------------------------------------------------------------


def test_duration_parser() -> None:
    assert duration("330s") == 330
    assert duration("5m30s") == 330
    assert duration("1h") == 3600
    with pytest.raises(ValueError):
        duration("330")


def test_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_services_are_exactly_the_deployment(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_has_its_own_profile_only(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name]["profiles"] == [name]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_get_their_environment(services: dict[str, dict[str, Any]], name: str) -> None:
    env = services[name]["environment"]
    assert isinstance(env, dict)
    assert {"RABBIT_URL", "REDIS_URL", "ASYNCNODE_INSTANCE"} <= set(env)
    assert services[name]["build"] == "."


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_command_is_a_cli_role(services: dict[str, dict[str, Any]], name: str) -> None:
    command = services[name]["command"]
    assert isinstance(command, list)
    assert command[0] == "python"
    assert command[1:] == ["-m", "asyncnode", name]
    assert command[3] in asyncnode.ROLES


def test_variables_are_interpolated_with_defaults_only() -> None:
    """``docker compose config`` must work without a .env: only ${VAR:-default} forms."""
    text = (ROOT / "compose.yml").read_text()
    refs = re.findall(r"\$\{[^}]*\}|\$[A-Za-z_]", text)
    assert refs
    for ref in refs:
        assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*:-[^}]*\}", ref), ref


def test_api_publishes_5000(services: dict[str, dict[str, Any]]) -> None:
    assert "5000:5000" in [str(p) for p in services["api"]["ports"]]


def test_worker_outlives_the_longest_task_on_sigterm(services: dict[str, dict[str, Any]]) -> None:
    assert duration(services["worker"]["stop_grace_period"]) >= 300


def test_worker_has_no_http_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    """The image's HEALTHCHECK probes the API port; a worker would be 'unhealthy' for ever."""
    assert services["worker"]["healthcheck"] == {"disable": True}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_service_images(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name]["image"] == IMAGES[name]


def test_state_lives_in_named_volumes(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    volumes = set(compose["volumes"])
    for name, target in (("rabbitmq", "/var/lib/rabbitmq"), ("redis", "/data")):
        mounts = [v.split(":") for v in services[name]["volumes"]]
        assert [src for src, dst in mounts if dst == target and src in volumes], name
    assert "--appendonly" in services["redis"]["command"]


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root() -> None:
    users = [rest.split(":")[0] for word, rest in dockerfile() if word == "USER"]
    assert users, "no USER instruction"
    assert users[-1] not in ("root", "0")


def test_dockerfile_installs_the_project_with_pip() -> None:
    runs = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    assert re.search(r"\bpip install\b[^&;]*\s\.(\s|$)", runs), runs


def test_dockerfile_default_command_is_the_api() -> None:
    cmds = [rest for word, rest in dockerfile() if word == "CMD"]
    assert cmds and yaml.safe_load(cmds[-1]) == ["python", "-m", "asyncnode", "api"]


def test_dockerfile_copies_something() -> None:
    assert {"asyncnode.py", "pyproject.toml"} <= {s.rstrip("/") for s in copy_sources()}


@pytest.mark.parametrize("source", copy_sources())
def test_dockerfile_copies_files_that_exist(source: str) -> None:
    assert (ROOT / source).exists(), f"Dockerfile COPYs {source}, which is not in the repository"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    for source in copy_sources():
        hits = [p for p in patterns if fnmatch.fnmatch(source.rstrip("/"), p)]
        assert not hits, f"{source} is COPYed but .dockerignore excludes it ({hits})"
