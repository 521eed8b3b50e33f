"""Instances in config.toml, instance selection, worker counts and the rendered supervisord.conf."""

from __future__ import annotations

from pathlib import Path

import pytest
from supervisor.options import ServerOptions

import asyncnode

ROOT = Path(asyncnode.__file__).resolve().parent


def load(tmp_path: Path, text: str) -> asyncnode.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return asyncnode.Config.from_toml(path, env={})


MULTI = """
[worker]
processes_per_core = 2
[instances.api-1]
roles = ["api"]
[instances.worker-1]
roles = ["worker"]
processes_per_core = 0.5
[instances.worker-2]
roles = ["worker"]
processes = 3
"""


def test_default_is_one_local_instance_with_both_roles(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert list(cfg.instances) == ["local"]
    assert cfg.instances["local"].roles == ("api", "worker")
    shipped = asyncnode.Config.from_toml(ROOT / "config.toml", env={})
    assert shipped.instances["local"].roles == ("api", "worker")


def test_worker_counts(tmp_path: Path) -> None:
    cfg = load(tmp_path, MULTI)
    assert asyncnode.worker_count(cfg, cfg.instances["api-1"], cpus=4) == 0
    assert asyncnode.worker_count(cfg, cfg.instances["worker-1"], cpus=4) == 2
    assert asyncnode.worker_count(cfg, cfg.instances["worker-1"], cpus=1) == 1  # at least one
    assert asyncnode.worker_count(cfg, cfg.instances["worker-2"], cpus=64) == 3
    both = load(tmp_path, "[worker]\nprocesses_per_core = 1.5\n")
    assert asyncnode.worker_count(both, both.instances["local"], cpus=2) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[instances.a]\nroles = ["api", "cook"]\n', "[instances.a] roles: unknown role 'cook' (expected api, worker)"),
        ("[instances.a]\nroles = []\n", "[instances.a] roles: expected at least one of api, worker"),
        ('[instances.a]\nroles = ["worker"]\nprocesses = 2\nprocesses_per_core = 1\n', "not both"),
        ('[instances.a]\nroles = ["worker"]\nprocesses = -1\n', "[instances.a] processes: expected a value"),
        ('[instances.a]\nroles = ["worker"]\nthreads = 4\n', "[instances.a] threads: unknown key"),
        ('[instances."a b"]\nroles = ["api"]\n', "instance names use letters"),
        ("instances = 3\n", "instances: expected one or more tables"),
        (
            '[instances.a]\nroles = ["api"]\nhost = "h1"\n[instances.b]\nroles = ["api"]\nhost = "h1"\n',
            "[instances.b]: API port 5000 on host 'h1' is already claimed by [instances.a]",
        ),
    ],
)
def test_instance_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(asyncnode.ConfigError) as err:
        load(tmp_path, text)
    assert expected in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "config.toml"))


def api_addresses(cfg: asyncnode.Config) -> dict[str, tuple[str, int]]:
    """Each instance's (host, API port), as its `up` would listen."""
    return {
        name: (inst.host, cfg.api.port if inst.api_port is None else inst.api_port)
        for name, inst in cfg.instances.items()
    }


def test_same_port_on_different_hosts_or_other_ports_is_fine(tmp_path: Path) -> None:
    # Two instances without a host are two hosts, named after the instances, on the same port.
    two_hosts = load(tmp_path, '[instances.a]\nroles = ["api"]\n[instances.b]\nroles = ["api"]\n')
    assert api_addresses(two_hosts) == {"a": ("a", 5000), "b": ("b", 5000)}
    assert [inst.roles for inst in two_hosts.instances.values()] == [("api",), ("api",)]
    # One host, two ports.
    one_host = load(
        tmp_path,
        '[instances.a]\nroles = ["api"]\nhost = "h"\n[instances.b]\nroles = ["api"]\nhost = "h"\napi_port = 5001\n',
    )
    assert api_addresses(one_host) == {"a": ("h", 5000), "b": ("h", 5001)}
    assert (one_host.instances["a"].api_port, one_host.instances["b"].api_port) == (None, 5001)


def test_instance_selection_order(tmp_path: Path) -> None:
    cfg = load(tmp_path, MULTI)
    pick = asyncnode.select_instance
    assert pick(cfg, "worker-2", {"ASYNCNODE_INSTANCE": "api-1"}, "worker-1")[0] == "worker-2"
    assert pick(cfg, None, {"ASYNCNODE_INSTANCE": "api-1"}, "worker-1")[0] == "api-1"
    assert pick(cfg, None, {}, "worker-1")[0] == "worker-1"
    assert pick(cfg, None, {}, "worker-1.example.com")[0] == "worker-1"
    with pytest.raises(asyncnode.ConfigError, match="none named after this host 'db-9'; pass --instance"):
        pick(cfg, None, {}, "db-9")
    with pytest.raises(asyncnode.ConfigError, match=r"no instance 'nope' \(known: api-1, worker-1, worker-2\)"):
        pick(cfg, "nope", {}, "worker-1")
    single = load(tmp_path, '[instances.only]\nroles = ["worker"]\n')
    assert pick(single, None, {}, "anything")[0] == "only"


def render(tmp_path: Path, cfg: asyncnode.Config, name: str) -> Path:
    (tmp_path / "run" / "logs").mkdir(parents=True, exist_ok=True)
    values = asyncnode.supervisor_values(cfg, name, cfg.instances[name], tmp_path / "run", cpus=2)
    text = asyncnode.render_supervisord((ROOT / "supervisord.conf").read_text(), values)
    assert "%(ENV_ASYNCNODE_" not in text.replace("%(ENV_ASYNCNODE_...)s", "")  # all filled in
    path = tmp_path / f"{name}.conf"
    path.write_text(text)
    return path


def parse(path: Path) -> dict[str, list[object]]:
    """Let supervisor itself read the file: program name -> its process configs."""
    options = ServerOptions()
    options.configfile = str(path)
    options.process_config(do_usage=False)
    return {g.name: g.process_configs for g in options.process_group_configs}


def test_rendered_config_is_what_supervisor_reads(tmp_path: Path) -> None:
    cfg = load(tmp_path, MULTI)
    programs = parse(render(tmp_path, cfg, "worker-2"))
    assert sorted(programs) == ["worker_00", "worker_01", "worker_02"]  # no api on a worker host
    proc = programs["worker_01"][0]
    assert proc.name == "worker_01"  # type: ignore[attr-defined]
    assert proc.stopwaitsecs == cfg.worker.stopwaitsecs  # type: ignore[attr-defined]
    assert proc.stopasgroup and proc.killasgroup and proc.autorestart  # type: ignore[attr-defined]
    command = f"-m asyncnode worker --config {cfg.path.resolve()} --queues default"
    assert proc.command.endswith(command)  # type: ignore[attr-defined]
    assert proc.environment == {"ASYNCNODE_INSTANCE": "worker-2"}  # type: ignore[attr-defined]

    programs = parse(render(tmp_path, cfg, "api-1"))
    assert list(programs) == ["api"]
    assert programs["api"][0].environment == {  # type: ignore[attr-defined]
        "ASYNCNODE_INSTANCE": "api-1",
        "ASYNCNODE_API_PORT": "5000",
    }


def test_up_dry_run_prints_the_instance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(MULTI)
    assert (
        asyncnode.main(
            ["up", "--config", str(path), "--instance", "worker-2", "--dry-run", "--run-dir", str(tmp_path / "run")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "instance 'worker-2' (host 'worker-2'): 3 worker(s)" in out
    assert f"run directory {tmp_path / 'run'}" in out
    assert "\n[program:worker_02]" in out and "\n[program:api]" not in out


def test_unknown_instance_on_the_command_line_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(MULTI)
    assert asyncnode.main(["up", "--config", str(path), "--instance", "db-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no instance 'db-1'" in err


def test_ctl_without_a_running_instance_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text("")
    assert asyncnode.main(["ctl", "status", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 1
    assert "instance 'local' is not running" in capsys.readouterr().err
