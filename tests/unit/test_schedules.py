"""Periodic schedules without services: the slot arithmetic as pure functions on an injected clock (``every``
and cron, a DST change in Europe/Berlin, 29 February, catch_up one/none, a new schedule, a late tick), and the
config errors ``Config.from_toml`` raises itself."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import asyncnode

BERLIN = ZoneInfo("Europe/Berlin")


def schedule(
    *, cron: str = "", every: float | None = None, timezone: str = "UTC", catch_up: str = "one"
) -> asyncnode.ScheduleConfig:
    """A schedule of ``noop`` tasks firing on ``cron`` or ``every``."""
    return asyncnode.ScheduleConfig(name="s", type="noop", cron=cron, every=every, timezone=timezone, catch_up=catch_up)


def berlin(year: int, month: int, day: int, hour: int, minute: int = 0, *, fold: int = 0) -> float:
    """Epoch seconds of a wall-clock time in Berlin (``fold=1``: the second of a repeated hour)."""
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold).timestamp()


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: float = 0) -> float:
    """Epoch seconds of a UTC time."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() + second


def chain(s: asyncnode.ScheduleConfig, after: float, count: int) -> list[float]:
    """The ``count`` slots after ``after``, each found by next_slot from the one before."""
    slots = []
    for _ in range(count):
        after = asyncnode.next_slot(s, after)
        slots.append(after)
    return slots


def local(slots: list[float]) -> list[str]:
    """The slots as Berlin wall-clock times with their offsets (for the failure message)."""
    return [datetime.fromtimestamp(slot, BERLIN).isoformat() for slot in slots]


# ---------------------------------------------------------------------------- every


def test_every_slots_are_multiples_of_it_since_the_epoch_and_next_is_strictly_after() -> None:
    s = schedule(every=300)
    assert asyncnode.next_slot(s, 1000.0) == 1200.0
    assert asyncnode.next_slot(s, 1199.999) == 1200.0
    assert asyncnode.next_slot(s, 1200.0) == 1500.0  # strictly after: a slot is never its own next
    assert chain(s, 1000.0, 3) == [1200.0, 1500.0, 1800.0]


def test_every_latest_slot_is_the_last_at_or_before() -> None:
    s = schedule(every=300)
    assert asyncnode.latest_slot(s, 1200.0) == 1200.0  # at the slot itself: due
    assert asyncnode.latest_slot(s, 1199.999) == 900.0
    assert asyncnode.latest_slot(s, 1499.5) == 1200.0


def test_every_slots_are_utc_multiples_whatever_the_timezone() -> None:
    s = schedule(every=7200, timezone="Europe/Berlin")
    # 10:30 in Berlin in winter is 09:30 UTC: the next even UTC hour is 10:00 UTC, 11:00 in Berlin (aligned to
    # Berlin's own midnight it would be 12:00).
    assert asyncnode.next_slot(s, berlin(2027, 1, 15, 10, 30)) == utc(2027, 1, 15, 10)
    assert asyncnode.latest_slot(s, berlin(2027, 1, 15, 10, 30)) == utc(2027, 1, 15, 8)


def test_every_of_a_fraction_of_a_second() -> None:
    s = schedule(every=0.5)
    assert chain(s, 100.2, 3) == [100.5, 101.0, 101.5]
    assert asyncnode.latest_slot(s, 100.75) == 100.5


# ---------------------------------------------------------------------------- cron


def test_cron_in_utc() -> None:
    s = schedule(cron="0 3 * * *")
    assert asyncnode.next_slot(s, utc(2027, 5, 10, 2, 59, 59)) == utc(2027, 5, 10, 3)
    assert asyncnode.next_slot(s, utc(2027, 5, 10, 3)) == utc(2027, 5, 11, 3)
    assert asyncnode.latest_slot(s, utc(2027, 5, 10, 3)) == utc(2027, 5, 10, 3)
    assert asyncnode.latest_slot(s, utc(2027, 5, 10, 2, 59)) == utc(2027, 5, 9, 3)


def test_cron_is_read_in_the_schedules_timezone() -> None:
    s = schedule(cron="0 3 * * *", timezone="Europe/Berlin")
    assert asyncnode.next_slot(s, utc(2027, 1, 10)) == utc(2027, 1, 10, 2)  # 03:00 CET is 02:00 UTC
    assert asyncnode.next_slot(s, utc(2027, 7, 10)) == utc(2027, 7, 10, 1)  # 03:00 CEST is 01:00 UTC


def test_cron_at_three_in_berlin_fires_once_every_local_day_across_both_dst_changes() -> None:
    s = schedule(cron="0 3 * * *", timezone="Europe/Berlin")
    spring = chain(s, berlin(2027, 3, 26, 12), 4)
    assert spring == [berlin(2027, 3, d, 3) for d in (27, 28, 29, 30)], local(spring)
    fall = chain(s, berlin(2027, 10, 29, 12), 4)
    assert fall == [berlin(2027, 10, 30, 3), berlin(2027, 10, 31, 3), berlin(2027, 11, 1, 3), berlin(2027, 11, 2, 3)]
    # 23 hours from Saturday's to Sunday's on the spring day, 25 on the autumn day: the clock moved, the slot did not.
    assert (spring[1] - spring[0], fall[1] - fall[0]) == (23 * 3600, 25 * 3600)


def test_cron_at_0230_in_berlin_on_the_spring_day_fires_once_at_three_as_croniter_defines() -> None:
    # 2027-03-28 02:00 CET jumps to 03:00 CEST: 02:30 does not exist that day. croniter fires at 03:00 CEST
    # (01:00 UTC) instead; one slot for that day, none lost, none doubled.
    s = schedule(cron="30 2 * * *", timezone="Europe/Berlin")
    slots = chain(s, berlin(2027, 3, 26, 12), 4)
    expected = [
        berlin(2027, 3, 27, 2, 30),
        berlin(2027, 3, 28, 3, 0),
        berlin(2027, 3, 29, 2, 30),
        berlin(2027, 3, 30, 2, 30),
    ]
    assert slots == expected, local(slots)
    assert expected[1] == utc(2027, 3, 28, 1)
    assert [datetime.fromtimestamp(x, BERLIN).date().day for x in slots] == [27, 28, 29, 30]
    assert asyncnode.latest_slot(s, berlin(2027, 3, 28, 12)) == berlin(2027, 3, 28, 3, 0)


def test_cron_at_0230_in_berlin_on_the_fall_back_day_fires_at_each_0230_croniter_gives() -> None:
    # 2027-10-31 03:00 CEST goes back to 02:00 CET: 02:30 happens twice, at 00:30 UTC and at 01:30 UTC. croniter
    # 7 gives both; these are its exact values (nothing in between, nothing lost, the next day once).
    s = schedule(cron="30 2 * * *", timezone="Europe/Berlin")
    slots = chain(s, berlin(2027, 10, 29, 12), 4)
    expected = [
        berlin(2027, 10, 30, 2, 30),
        berlin(2027, 10, 31, 2, 30, fold=0),  # 02:30 CEST
        berlin(2027, 10, 31, 2, 30, fold=1),  # 02:30 CET, an hour later
        berlin(2027, 11, 1, 2, 30),
    ]
    assert slots == expected, local(slots)
    assert expected[1:3] == [utc(2027, 10, 31, 0, 30), utc(2027, 10, 31, 1, 30)]
    assert asyncnode.latest_slot(s, berlin(2027, 10, 31, 12)) == berlin(2027, 10, 31, 2, 30, fold=1)
    assert asyncnode.latest_slot(s, berlin(2027, 10, 31, 2, 45, fold=0)) == berlin(2027, 10, 31, 2, 30, fold=0)


def test_cron_on_29_february_waits_for_the_next_leap_year_in_the_schedules_zone() -> None:
    s = schedule(cron="0 12 29 2 *", timezone="Europe/Berlin")
    assert chain(s, berlin(2027, 1, 1, 0), 2) == [berlin(2028, 2, 29, 12), berlin(2032, 2, 29, 12)]
    assert berlin(2028, 2, 29, 12) == utc(2028, 2, 29, 11)  # noon in Berlin, not in UTC
    assert asyncnode.latest_slot(s, berlin(2031, 6, 1, 0)) == berlin(2028, 2, 29, 12)
    assert asyncnode.next_slot(schedule(cron="0 12 29 2 *"), utc(2027, 1, 1)) == utc(2028, 2, 29, 12)


# ---------------------------------------------------------------------------- slots_to_fire

#: A schedule every 10 s: slots at 100, 110, 120, ...
EVERY_10 = 10


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_nothing_due_fires_nothing_and_keeps_last(catch_up: str) -> None:
    s = schedule(every=EVERY_10, catch_up=catch_up)
    assert asyncnode.slots_to_fire(s, 100.0, 100.0) == ([], 100.0)
    assert asyncnode.slots_to_fire(s, 100.0, 109.999) == ([], 100.0)


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_a_slot_due_on_time_fires_once_and_becomes_last(catch_up: str) -> None:
    s = schedule(every=EVERY_10, catch_up=catch_up)
    assert asyncnode.slots_to_fire(s, 100.0, 110.0) == ([110.0], 110.0)  # due at its very time
    assert asyncnode.slots_to_fire(s, 100.0, 110.3) == ([110.0], 110.0)
    assert asyncnode.slots_to_fire(s, 110.0, 110.4) == ([], 110.0)  # the next tick: handled already


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_a_late_tick_still_fires_a_slot_at_most_2_s_old(catch_up: str) -> None:
    s = schedule(every=EVERY_10, catch_up=catch_up)
    assert asyncnode.slots_to_fire(s, 100.0, 111.5) == ([110.0], 110.0)
    assert asyncnode.slots_to_fire(s, 100.0, 112.0) == ([110.0], 110.0)  # 2 s old: not yet missed


def test_a_tick_more_than_2_s_late_fires_the_missed_slot_with_catch_up_one() -> None:
    s = schedule(every=EVERY_10, catch_up="one")
    assert asyncnode.slots_to_fire(s, 100.0, 112.5) == ([110.0], 110.0)


def test_a_tick_more_than_2_s_late_skips_the_missed_slot_with_catch_up_none() -> None:
    s = schedule(every=EVERY_10, catch_up="none")
    assert asyncnode.slots_to_fire(s, 100.0, 112.5) == ([], 110.0)  # skipped: never fired later either
    assert asyncnode.slots_to_fire(s, 110.0, 115.0) == ([], 110.0)


def test_many_missed_slots_fire_one_task_for_the_latest_with_catch_up_one() -> None:
    s = schedule(every=EVERY_10, catch_up="one")
    assert asyncnode.slots_to_fire(s, 100.0, 145.0) == ([140.0], 140.0)  # 110..140 due, all missed: one task


def test_many_missed_slots_fire_nothing_with_catch_up_none() -> None:
    s = schedule(every=EVERY_10, catch_up="none")
    assert asyncnode.slots_to_fire(s, 100.0, 145.0) == ([], 140.0)


def test_missed_slots_then_a_fresh_one_fire_one_task_for_the_missed_and_the_fresh_one_with_catch_up_one() -> None:
    # A holder took over at 140.5: 110, 120, 130 were missed (one task, for 130), 140 is on time.
    s = schedule(every=EVERY_10, catch_up="one")
    assert asyncnode.slots_to_fire(s, 100.0, 140.5) == ([130.0, 140.0], 140.0)


def test_missed_slots_then_a_fresh_one_fire_only_the_fresh_one_with_catch_up_none() -> None:
    s = schedule(every=EVERY_10, catch_up="none")
    assert asyncnode.slots_to_fire(s, 100.0, 140.5) == ([140.0], 140.0)


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_every_slot_at_most_2_s_old_fires_on_its_own_after_a_late_tick(catch_up: str) -> None:
    s = schedule(every=1, catch_up=catch_up)
    assert asyncnode.slots_to_fire(s, 100.0, 101.2) == ([101.0], 101.0)
    assert asyncnode.slots_to_fire(s, 357.0, 359.004) == ([358.0, 359.0], 359.0)  # a tick 1.7 s late loses none


def test_every_second_after_a_gap_covers_the_missed_seconds_with_one_task_with_catch_up_one() -> None:
    s = schedule(every=1, catch_up="one")
    assert asyncnode.slots_to_fire(s, 100.0, 104.5) == ([102.0, 103.0, 104.0], 104.0)  # 102 covers 101..102
    assert asyncnode.slots_to_fire(s, 100.0, 110.5) == ([108.0, 109.0, 110.0], 110.0)  # 108 covers 101..108


def test_every_second_after_a_gap_skips_the_missed_seconds_with_catch_up_none() -> None:
    s = schedule(every=1, catch_up="none")
    assert asyncnode.slots_to_fire(s, 100.0, 110.5) == ([109.0, 110.0], 110.0)


@pytest.mark.parametrize("catch_up", ["one", "none"])
def test_a_new_schedule_starts_from_now_without_past_slots(catch_up: str) -> None:
    # A schedule first seen at 105 has ``last`` = 105: slot 100 is before it and never fires.
    s = schedule(every=EVERY_10, catch_up=catch_up)
    assert asyncnode.slots_to_fire(s, 105.0, 105.0) == ([], 105.0)
    assert asyncnode.slots_to_fire(s, 105.0, 109.9) == ([], 105.0)
    assert asyncnode.slots_to_fire(s, 105.0, 110.2) == ([110.0], 110.0)


def test_cron_missed_days_with_catch_up_one_fire_once_for_the_latest() -> None:
    s = schedule(cron="0 3 * * *", catch_up="one")
    last = utc(2027, 5, 1, 3)
    assert asyncnode.slots_to_fire(s, last, utc(2027, 5, 4, 3, 0, 5)) == ([utc(2027, 5, 4, 3)], utc(2027, 5, 4, 3))
    assert asyncnode.slots_to_fire(s, last, utc(2027, 5, 4, 2)) == ([utc(2027, 5, 3, 3)], utc(2027, 5, 3, 3))


def test_cron_missed_days_with_catch_up_none_fire_nothing_unless_the_latest_is_on_time() -> None:
    s = schedule(cron="0 3 * * *", catch_up="none")
    last = utc(2027, 5, 1, 3)
    assert asyncnode.slots_to_fire(s, last, utc(2027, 5, 4, 3, 0, 5)) == ([], utc(2027, 5, 4, 3))
    assert asyncnode.slots_to_fire(s, last, utc(2027, 5, 4, 3, 0, 0.5)) == ([utc(2027, 5, 4, 3)], utc(2027, 5, 4, 3))


def test_cron_on_the_fall_back_day_fires_the_second_0230_after_the_first() -> None:
    s = schedule(cron="30 2 * * *", timezone="Europe/Berlin")
    first, second = berlin(2027, 10, 31, 2, 30, fold=0), berlin(2027, 10, 31, 2, 30, fold=1)
    assert asyncnode.slots_to_fire(s, berlin(2027, 10, 30, 2, 30), first + 0.3) == ([first], first)
    assert asyncnode.slots_to_fire(s, first, first + 1800) == ([], first)
    assert asyncnode.slots_to_fire(s, first, second + 0.3) == ([second], second)


# ---------------------------------------------------------------------------- config

#: A queue declared for the schedules that name one.
MAIL = "[queues.mail]\n"


def load(tmp_path: Path, text: str) -> asyncnode.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return asyncnode.Config.from_toml(path, env={})


def test_a_schedule_loads_with_its_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[schedules.ping]\ntype = "noop"\nevery = 60\n')
    ping = cfg.schedules["ping"]
    assert ping == asyncnode.ScheduleConfig(name="ping", type="noop", every=60)
    assert (ping.timezone, ping.catch_up, ping.cron, ping.queue) == ("UTC", "one", "", "")  # "": none
    assert cfg.scheduler.lease_ttl == 10.0


def test_a_cron_schedule_loads_every_key(tmp_path: Path) -> None:
    text = (
        MAIL
        + "[scheduler]\nlease_ttl = 2.5\n"
        + '[schedules.nightly-report]\ntype = "reverse"\ncron = "0 3 * * *"\ntimezone = "Europe/Berlin"\n'
        + 'queue = "mail"\ncatch_up = "none"\npayload = { text = "abc" }\n'
        + '[schedules.b_2]\ntype = "noop"\nevery = 0.5\n'
    )
    cfg = load(tmp_path, text)
    assert list(cfg.schedules) == ["nightly-report", "b_2"]  # config order
    assert cfg.schedules["nightly-report"] == asyncnode.ScheduleConfig(
        name="nightly-report",
        type="reverse",
        payload={"text": "abc"},
        cron="0 3 * * *",
        timezone="Europe/Berlin",
        queue="mail",
        catch_up="none",
    )
    assert cfg.schedules["b_2"].every == 0.5
    assert cfg.scheduler.lease_ttl == 2.5


#: Config errors Config.from_toml finds itself: (the schedule's keys, the message after the file's name).
FROM_TOML_ERRORS = [
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
        'type = "noop"\ncron = "61 3 * * *"\n',
        "[schedules.nightly] cron: '61 3 * * *' is not a five-field cron expression",
        id="bad-cron-minute",
    ),
    pytest.param(
        'type = "noop"\ncron = "every night"\n',
        "[schedules.nightly] cron: 'every night' is not a five-field cron expression",
        id="bad-cron-words",
    ),
    pytest.param(
        'type = "noop"\ncron = "0 3 * *"\n',
        "[schedules.nightly] cron: '0 3 * *' is not a five-field cron expression",
        id="cron-of-four-fields",
    ),
    pytest.param(
        'type = "noop"\ncron = "0 3 * * * *"\n',
        "[schedules.nightly] cron: '0 3 * * * *' is not a five-field cron expression",
        id="cron-of-six-fields",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\ntimezone = "Mars/Olympus"\n',
        "[schedules.nightly] timezone: unknown time zone 'Mars/Olympus' (e.g. UTC, Europe/Berlin)",
        id="unknown-timezone",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\ncatch_up = "all"\n',
        "[schedules.nightly] catch_up: expected one of 'one', 'none', got 'all'",
        id="bad-catch-up",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\nqueue = "heavy"\n',
        "[schedules.nightly] queue: 'heavy' is not declared (declared: default, mail)",
        id="undeclared-queue",
    ),
    pytest.param(
        'type = "noop"\nevery = 60\ncolour = "red"\n',
        "[schedules.nightly] colour: unknown key (known: type, payload, cron, every, timezone, queue, catch_up)",
        id="unknown-key",
    ),
    pytest.param(
        'type = "noop"\nevery = 0\n', "[schedules.nightly] every: expected a value ≥ 0.001, got 0", id="every-0"
    ),
    pytest.param(
        'type = "noop"\nevery = -5\n',
        "[schedules.nightly] every: expected a value ≥ 0.001, got -5",
        id="every-negative",
    ),
    pytest.param(
        'type = "noop"\nevery = "60"\n', "[schedules.nightly] every: expected a number, got '60'", id="every-a-string"
    ),
]


@pytest.mark.parametrize(("keys", "expected"), FROM_TOML_ERRORS)
def test_from_toml_refuses_a_bad_schedule_in_one_line_naming_file_schedule_and_key(
    tmp_path: Path, keys: str, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(MAIL + "[schedules.nightly]\n" + keys)
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.Config.from_toml(path, env={})
    assert str(err.value) == f"{path}: {expected}"


@pytest.mark.parametrize("name", ["Nightly", "night ly", "a" * 41, "été"])
def test_from_toml_refuses_a_bad_schedule_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[schedules."{name}"]\ntype = "noop"\nevery = 60\n')
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.Config.from_toml(path, env={})
    message = str(err.value)
    assert message.startswith(f"{path}: [schedules.") and name in message and "\n" not in message, message


def test_a_40_character_schedule_name_is_fine(tmp_path: Path) -> None:
    name = "a-b_" + "c" * 36
    assert list(load(tmp_path, f'[schedules.{name}]\ntype = "noop"\nevery = 60\n').schedules) == [name]


@pytest.mark.parametrize("lease_ttl", ["0.5", "0", '"10"'])
def test_from_toml_refuses_a_lease_ttl_that_is_not_a_number_of_at_least_a_second(
    tmp_path: Path, lease_ttl: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[scheduler]\nlease_ttl = {lease_ttl}\n")
    with pytest.raises(asyncnode.ConfigError) as err:
        asyncnode.Config.from_toml(path, env={})
    message = str(err.value)
    assert message.startswith(f"{path}: [scheduler] lease_ttl: ") and "\n" not in message, message
