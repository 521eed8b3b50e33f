"""Named queues, without services: [queues.*], [routes] and instance queues in config.toml, rates, routing,
handler queues, submissions and envelopes naming a queue, RabbitMQ names and the rendered supervisord.conf."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from supervisor.options import ServerOptions

import asyncnode

ROOT = Path(asyncnode.__file__).resolve().parent


def build(tmp_path: Path, raw: dict[str, Any]) -> asyncnode.Config:
    """``raw`` as if read from ``tmp_path/config.toml``."""
    return asyncnode.Config.from_mapping(raw, tmp_path / "config.toml", {})


def config_error(tmp_path: Path, raw: dict[str, Any]) -> str:
    """The one-line message of the ConfigError ``raw`` raises; it names the file first."""
    with pytest.raises(asyncnode.ConfigError) as err:
        build(tmp_path, raw)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'config.toml'}: "), message
    assert "\n" not in message, message
    return message


# --- [queues.*] ---------------------------------------------------------------


def test_default_is_always_declared_and_first(tmp_path: Path) -> None:
    assert list(build(tmp_path, {}).queues) == ["default"]
    cfg = build(tmp_path, {"queues": {"mail": {"limit": 2, "rate": "10/s"}, "heavy": {}}})
    assert list(cfg.queues) == ["default", "mail", "heavy"]
    assert cfg.queues["mail"] == asyncnode.QueueConfig(limit=2, rate="10/s")
    assert cfg.queues["heavy"] == asyncnode.QueueConfig()
    assert cfg.queues["default"] == asyncnode.QueueConfig()


def test_declaring_default_keeps_its_limits(tmp_path: Path) -> None:
    cfg = build(tmp_path, {"queues": {"mail": {}, "default": {"limit": 3, "rate": "5/m"}}})
    assert list(cfg.queues) == ["default", "mail"]
    assert cfg.queues["default"] == asyncnode.QueueConfig(limit=3, rate="5/m")


def test_the_shipped_config_declares_only_default() -> None:
    cfg = asyncnode.Config.from_toml(ROOT / "config.toml", env={})
    assert list(cfg.queues) == ["default"]
    assert cfg.routes == {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("Mail", id="uppercase"),
        pytest.param("a.b", id="dot"),
        pytest.param("a b", id="space"),
        pytest.param("", id="empty"),
        pytest.param("x" * 41, id="41-characters"),
        pytest.param("caf\u00e9", id="non-ascii"),
    ],
)
def test_a_bad_queue_name_is_an_error_naming_the_queue(tmp_path: Path, name: str) -> None:
    message = config_error(tmp_path, {"queues": {name: {}}})
    assert f"[queues.{name}]: queue names use a-z, 0-9, '_' and '-' only, 1 to 40 of them" in message


def test_a_40_character_queue_name_is_fine(tmp_path: Path) -> None:
    assert "q" * 40 in build(tmp_path, {"queues": {"q" * 40: {}}}).queues


def test_the_names_of_dead_letter_and_retry_queues_are_reserved() -> None:
    assert {"dlq", "retry"} <= asyncnode.RESERVED_QUEUES


@pytest.mark.parametrize("name", sorted(asyncnode.RESERVED_QUEUES))
def test_a_reserved_queue_name_is_an_error_naming_it(tmp_path: Path, name: str) -> None:
    message = config_error(tmp_path, {"queues": {name: {}}})
    assert f"[queues.{name}]: {name!r} is reserved" in message
    assert f"(reserved: {', '.join(sorted(asyncnode.RESERVED_QUEUES))})" in message


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param({"limit": -1}, "[queues.mail] limit: expected a value ≥ 0, got -1", id="negative-limit"),
        pytest.param({"limit": "2"}, "[queues.mail] limit: expected an integer, got '2'", id="string-limit"),
        pytest.param({"limit": 1.5}, "[queues.mail] limit: expected an integer, got 1.5", id="float-limit"),
        pytest.param({"limit": True}, "[queues.mail] limit: expected an integer, got True", id="bool-limit"),
        pytest.param({"rate": 10}, "[queues.mail] rate: expected a string, got 10", id="number-rate"),
        pytest.param({"rate": "fast"}, '[queues.mail] rate: expected "N/s", "N/m" or "N/h"', id="word-rate"),
        pytest.param({"rate": "0/s"}, '[queues.mail] rate: expected "N/s"', id="zero-rate"),
        pytest.param({"rate": "10/d"}, '[queues.mail] rate: expected "N/s"', id="unknown-window"),
        pytest.param({"burst": 5}, "[queues.mail] burst: unknown key (known: limit, rate)", id="unknown-key"),
    ],
)
def test_a_bad_queue_setting_is_an_error_naming_queue_and_key(
    tmp_path: Path, table: dict[str, Any], expected: str
) -> None:
    assert expected in config_error(tmp_path, {"queues": {"mail": table}})


def test_a_bad_rate_error_quotes_the_rate(tmp_path: Path) -> None:
    assert "got '10/d'" in config_error(tmp_path, {"queues": {"mail": {"rate": "10/d"}}})


@pytest.mark.parametrize("raw", [1, "mail", {"mail": 1}, {"mail": {}, "heavy": "x"}])
def test_queues_that_are_not_tables_are_an_error(tmp_path: Path, raw: Any) -> None:
    assert "queues: expected tables [queues.<name>]" in config_error(tmp_path, {"queues": raw})


def test_a_queue_config_file_error_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[queues.mail]\nlimit = 2\nrate = "2/fortnight"\n')
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.Config.from_toml(path, env={})
    assert str(err.value).startswith(f"{path}: [queues.mail] rate: expected")
    assert "'2/fortnight'" in str(err.value)


# --- parse_rate and QueueConfig ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/s", (10, 1.0)),
        ("3/m", (3, 60.0)),
        ("1/h", (1, 3600.0)),
        (" 5 / s ", (5, 1.0)),
        ("1000000/h", (1000000, 3600.0)),
    ],
)
def test_parse_rate_reads_starts_and_window(text: str, expected: tuple[int, float]) -> None:
    assert asyncnode.parse_rate(text) == expected


@pytest.mark.parametrize(
    "text", ["", "10", "/s", "0/s", "00/m", "-1/s", "1.5/s", "10/S", "10/d", "10/sec", "s/10", "10/s/s", "ten/s"]
)
def test_parse_rate_refuses_anything_else_saying_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError) as err:
        asyncnode.parse_rate(text)
    assert 'expected "N/s", "N/m" or "N/h" with N a whole number of at least 1' in str(err.value)
    assert f"got {text!r}" in str(err.value)


def test_queue_config_rate_limit_and_gated() -> None:
    assert asyncnode.QueueConfig().rate_limit is None
    assert not asyncnode.QueueConfig().gated
    assert asyncnode.QueueConfig(rate="2/m").rate_limit == (2, 60.0)
    assert asyncnode.QueueConfig(rate="2/m").gated
    assert asyncnode.QueueConfig(limit=1).gated and asyncnode.QueueConfig(limit=1).rate_limit is None


# --- [routes] ---------------------------------------------------------------


def test_routes_to_declared_queues_load(tmp_path: Path) -> None:
    cfg = build(tmp_path, {"queues": {"mail": {}}, "routes": {"email": "mail", "noop": "default"}})
    assert cfg.routes == {"email": "mail", "noop": "default"}


def test_a_route_to_an_undeclared_queue_is_an_error_naming_type_and_queue(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"queues": {"mail": {}}, "routes": {"email": "heavy"}})
    assert "[routes] email: routes to queue 'heavy', which is not declared" in message
    assert "(declared: default, mail; add [queues.heavy])" in message


def test_a_route_that_is_not_a_queue_name_is_an_error(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"routes": {"email": 3}})
    assert "[routes] email: expected a queue name, got 3" in message


def test_routes_that_are_not_a_table_are_an_error(tmp_path: Path) -> None:
    assert "routes: expected a table [routes] of task type = queue" in config_error(tmp_path, {"routes": "mail"})


# --- [instances.*] queues ---------------------------------------------------------------


def test_instance_queues_load(tmp_path: Path) -> None:
    cfg = build(
        tmp_path,
        {
            "queues": {"mail": {}, "heavy": {}},
            "instances": {"worker-mail": {"roles": ["worker"], "queues": ["mail", "heavy"]}, "local": {}},
        },
    )
    assert cfg.instances["worker-mail"].queues == ("mail", "heavy")
    assert cfg.instances["local"].queues == ()  # every declared queue


def test_instance_queues_without_the_worker_role_are_an_error(tmp_path: Path) -> None:
    raw = {"queues": {"mail": {}}, "instances": {"front": {"roles": ["api"], "queues": ["mail"]}}}
    message = config_error(tmp_path, raw)
    assert "[instances.front] queues: only an instance with the worker role consumes queues" in message


def test_an_undeclared_instance_queue_is_an_error_naming_it(tmp_path: Path) -> None:
    raw = {"queues": {"mail": {}}, "instances": {"w": {"roles": ["worker"], "queues": ["mail", "heavy", "x"]}}}
    message = config_error(tmp_path, raw)
    assert "[instances.w] queues: 'heavy', 'x' not declared (declared: default, mail)" in message


def test_instance_queues_that_are_not_a_list_of_names_are_an_error(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"instances": {"w": {"roles": ["worker"], "queues": "default"}}})
    assert "[instances.w] queues: expected a list of non-empty strings, got 'default'" in message


def test_check_queues_names_the_unknown_and_the_declared(tmp_path: Path) -> None:
    cfg = build(tmp_path, {"queues": {"mail": {}, "heavy": {}}})
    assert cfg.check_queues(["mail", "default", "mail"], "--queues") == ("mail", "default")
    with pytest.raises(asyncnode.ConfigError) as err:
        cfg.check_queues(["mail", "nosuch"], "--queues")
    assert str(err.value) == "--queues: unknown queue(s) 'nosuch' (declared: default, mail, heavy)"


# --- handler queues and routing ---------------------------------------------------------------


async def _nothing(payload: dict[str, Any], ctx: asyncnode.TaskContext) -> None:
    """A handler that does nothing (its tasks are never run here)."""


@pytest.fixture
def throwaway() -> Iterator[Callable[..., asyncnode.TaskType]]:
    """Register task types under names unique to this test; they leave the registry afterwards."""
    names: list[str] = []

    def register(queue: str | None = None) -> asyncnode.TaskType:
        name = f"test-queue-{uuid.uuid4().hex[:12]}"
        names.append(name)
        asyncnode.task(name, description="a type for queue tests", queue=queue)(_nothing)
        return asyncnode.REGISTRY[name]

    yield register
    for name in names:
        asyncnode.REGISTRY.pop(name, None)


def test_queue_of_prefers_routes_then_the_handler_then_default(
    tmp_path: Path, throwaway: Callable[..., asyncnode.TaskType]
) -> None:
    plain, queued, routed = throwaway(), throwaway(queue="heavy"), throwaway(queue="heavy")
    cfg = build(tmp_path, {"queues": {"mail": {}, "heavy": {}}, "routes": {routed.name: "mail"}})
    assert asyncnode.queue_of(cfg, plain) == "default"
    assert asyncnode.queue_of(cfg, queued) == "heavy"
    assert asyncnode.queue_of(cfg, routed) == "mail"  # [routes] over the handler's own


def test_a_route_can_send_a_handler_queue_back_to_default(
    tmp_path: Path, throwaway: Callable[..., asyncnode.TaskType]
) -> None:
    routed = throwaway(queue="heavy")
    cfg = build(tmp_path, {"queues": {"heavy": {}}, "routes": {routed.name: "default"}})
    assert asyncnode.queue_of(cfg, routed) == "default"


def test_load_handlers_refuses_a_handler_queue_config_does_not_declare(
    tmp_path: Path, throwaway: Callable[..., asyncnode.TaskType]
) -> None:
    ttype = throwaway(queue="media")
    cfg = build(tmp_path, {"queues": {"mail": {}}})
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.load_handlers(cfg)
    message = str(err.value)
    assert message.startswith(f"{cfg.path}: task type {ttype.name!r} ({__name__}._nothing)")
    assert "declares queue 'media', which config.toml does not declare (add [queues.media])" in message
    asyncnode.load_handlers(build(tmp_path, {"queues": {"media": {}}}))  # declared: fine


def test_load_handlers_refuses_an_undeclared_queue_of_an_imported_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, ttype = f"queue_handlers_{uuid.uuid4().hex[:12]}", f"test-video-{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text(
        "import asyncnode\n\n\n"
        f"@asyncnode.task({ttype!r}, description='transcode', queue='media')\n"
        "async def transcode(payload, ctx):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(asyncnode.ConfigError) as err:
            asyncnode.load_handlers(build(tmp_path, {"handlers": {"modules": [module]}}))
        assert f"task type {ttype!r} ({module}.transcode) declares queue 'media'" in str(err.value)
        cfg = build(tmp_path, {"handlers": {"modules": [module]}, "queues": {"media": {}}})
        asyncnode.load_handlers(cfg)
        assert asyncnode.queue_of(cfg, asyncnode.REGISTRY[ttype]) == "media"
    finally:
        asyncnode.REGISTRY.pop(ttype, None)
        sys.modules.pop(module, None)


def test_load_handlers_refuses_a_route_for_an_unregistered_type(tmp_path: Path) -> None:
    ghost = f"test-ghost-{uuid.uuid4().hex[:12]}"
    cfg = build(tmp_path, {"routes": {ghost: "default"}})
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.load_handlers(cfg)
    message = str(err.value)
    assert message.startswith(f"{cfg.path}: [routes] {ghost}: no handler registers task type {ghost!r} (known: ")
    assert "reverse" in message  # the known types are listed


# --- submissions and envelopes ---------------------------------------------------------------


def test_a_submission_may_name_a_declared_queue(tmp_path: Path, throwaway: Callable[..., asyncnode.TaskType]) -> None:
    routed = throwaway()
    cfg = build(tmp_path, {"queues": {"mail": {}, "heavy": {}}, "routes": {routed.name: "mail"}})
    assert asyncnode.validate_submission({"type": routed.name}, cfg).queue == "mail"  # its route
    assert asyncnode.validate_submission({"type": routed.name, "queue": "heavy"}, cfg).queue == "heavy"
    assert asyncnode.validate_submission({"type": routed.name, "queue": "default"}, cfg).queue == "default"


@pytest.mark.parametrize(
    ("queue", "shown"),
    [
        pytest.param("nosuch", "no queue 'nosuch'", id="unknown"),
        pytest.param("", "no queue ''", id="empty"),
        pytest.param("dlq", "no queue 'dlq'", id="reserved"),
        pytest.param("Mail", "no queue 'Mail'", id="other-case"),
        pytest.param(5, "no queue not a string", id="number"),
        pytest.param(["mail"], "no queue not a string", id="list"),
        pytest.param(True, "no queue not a string", id="bool"),
    ],
)
def test_a_submission_naming_no_declared_queue_is_refused_naming_the_known_ones(
    tmp_path: Path, throwaway: Callable[..., asyncnode.TaskType], queue: Any, shown: str
) -> None:
    ttype = throwaway()
    cfg = build(tmp_path, {"queues": {"mail": {}}})
    with pytest.raises(asyncnode.ValidationError) as err:
        asyncnode.validate_submission({"type": ttype.name, "queue": queue}, cfg)
    assert err.value.field == "queue"
    assert str(err.value) == f"'queue': {shown} (known: default, mail)"


def test_a_long_unknown_queue_is_shown_cut_short(tmp_path: Path, throwaway: Callable[..., asyncnode.TaskType]) -> None:
    ttype = throwaway()
    with pytest.raises(asyncnode.ValidationError) as err:
        asyncnode.validate_submission({"type": ttype.name, "queue": "q" * 10_000}, build(tmp_path, {}))
    assert len(str(err.value)) < 200 and repr("q" * 50) in str(err.value)


def test_an_envelope_with_a_queue_round_trips() -> None:
    env = asyncnode.Envelope("id-1", "email", {"to": "a@b.c"}, timeout=5.0, created_at=1.5, queue="mail")
    body = env.encode()
    assert asyncnode.loads(body)["queue"] == "mail"
    assert asyncnode.Envelope.decode(body) == env


def test_the_default_queue_is_left_out_of_an_envelope() -> None:
    env = asyncnode.Envelope("id-1", "email", {})
    assert env.queue == "default"
    body = env.encode()
    assert "queue" not in asyncnode.loads(body)
    assert asyncnode.Envelope.decode(body) == env
    explicit = asyncnode.dumps({"id": "id-1", "type": "email", "payload": {}, "queue": "default"}).encode()
    assert asyncnode.Envelope.decode(explicit) == env


@pytest.mark.parametrize("queue", ["Mail", "a.b", "", "x" * 41, 5, None, ["mail"]])
def test_an_envelope_with_a_bad_queue_name_is_an_envelope_error(queue: Any) -> None:
    body = asyncnode.dumps({"id": "id-1", "type": "email", "payload": {}, "queue": queue}).encode()
    with pytest.raises(asyncnode.EnvelopeError, match="queue that is not a queue name"):
        asyncnode.Envelope.decode(body)


# --- RabbitMQ names ---------------------------------------------------------------


def test_broker_names_of_default_and_named_queues(tmp_path: Path) -> None:
    cfg = build(tmp_path, {"broker": {"queue": "jobs"}, "queues": {"mail": {}}})
    assert cfg.broker_name("default") == cfg.broker.queue == "jobs"
    assert cfg.broker_name("mail") == "jobs.mail"
    assert asyncnode.retry_queue_name(cfg.broker, 1.0, "jobs.mail") == "jobs.mail.retry.1000ms"
    assert asyncnode.retry_queue_name(cfg.broker, 1.0) == "jobs.retry.1000ms"


def test_broker_queues_lists_every_work_queue_its_retry_queues_and_one_dlq(tmp_path: Path) -> None:
    cfg = build(tmp_path, {"broker": {"queue": "jobs", "retry_delays": [5, 1, 5]}, "queues": {"mail": {}}})
    assert asyncnode.broker_queues(cfg) == [
        "jobs",
        "jobs.retry.1000ms",
        "jobs.retry.5000ms",
        "jobs.mail",
        "jobs.mail.retry.1000ms",
        "jobs.mail.retry.5000ms",
        "jobs.dlq",
    ]


def test_broker_queues_of_a_config_without_queues(tmp_path: Path) -> None:
    cfg = build(tmp_path, {"broker": {"queue": "jobs", "retry_delays": [2]}})
    assert asyncnode.broker_queues(cfg) == ["jobs", "jobs.retry.2000ms", "jobs.dlq"]


# --- supervisord.conf ---------------------------------------------------------------

INSTANCES = {
    "queues": {"mail": {"limit": 2}, "heavy": {}},
    "instances": {
        "worker-mail": {"roles": ["worker"], "queues": ["mail"], "processes": 2},
        "local": {"roles": ["api", "worker"], "processes": 1},
    },
}


def programs(tmp_path: Path, cfg: asyncnode.Config, name: str) -> dict[str, Any]:
    """Render supervisord.conf for instance ``name`` and let supervisor read it: program name -> its config."""
    run_dir = tmp_path / "run" / name
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    values = asyncnode.supervisor_values(cfg, name, cfg.instances[name], run_dir, cpus=2)
    path = run_dir / "supervisord.conf"
    path.write_text(asyncnode.render_supervisord((ROOT / "supervisord.conf").read_text(), values))
    options = ServerOptions()
    options.configfile = str(path)
    options.process_config(do_usage=False)
    return {g.name: g.process_configs[0] for g in options.process_group_configs}


def test_supervisor_values_carry_the_instance_queues(tmp_path: Path) -> None:
    cfg = build(tmp_path, INSTANCES)
    values = asyncnode.supervisor_values(cfg, "worker-mail", cfg.instances["worker-mail"], tmp_path, cpus=2)
    assert values["QUEUES"] == "mail"
    values = asyncnode.supervisor_values(cfg, "local", cfg.instances["local"], tmp_path, cpus=2)
    assert values["QUEUES"] == "default,mail,heavy"  # no queues listed: every declared one


def test_rendered_workers_of_an_instance_with_queues_consume_only_those(tmp_path: Path) -> None:
    cfg = build(tmp_path, INSTANCES)
    mail = programs(tmp_path, cfg, "worker-mail")
    assert sorted(mail) == ["worker_00", "worker_01"]
    for proc in mail.values():
        assert proc.command.endswith(f"-m asyncnode worker --config {cfg.path.resolve()} --queues mail"), proc.command
        assert proc.environment == {"ASYNCNODE_INSTANCE": "worker-mail"}
    local = programs(tmp_path, cfg, "local")
    assert sorted(local) == ["api", "worker_00"]
    assert local["worker_00"].command.endswith(" --queues default,mail,heavy"), local["worker_00"].command
    assert "--queues" not in local["api"].command
