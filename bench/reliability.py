"""Fault-injection figures for the README, at full size: `make soak`.

Runs, against the local RabbitMQ and Redis (isolated queue and key prefix) and
private RabbitMQ/Redis instances started here for the outages:
  1. crash soak: 1,000 sleep tasks of 10-50 ms under 4 workers, one SIGKILLed every 0.3 s;
  2. RabbitMQ outage: the broker stopped for 5 s and started again while tasks stream in;
  3. Redis outage: Redis stopped for 5 s and started again, a WebSocket client watching.
Prints one JSON line of figures per scenario and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import cleanup, write_config  # noqa: E402
from tests.faults import broker_outage, crash_soak, figures_json, redis_outage  # noqa: E402
from tests.privsvc import PrivateRabbit, PrivateRedis  # noqa: E402


async def run(tasks: int, outage: float) -> list[tuple[str, dict[str, Any]]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="asyncnode-soak-") as tmp:
        work = Path(tmp)

        tag = f"soak-{uuid.uuid4().hex[:8]}"
        config = write_config(work / "soak.toml", tag, broker={"delivery_limit": 20}, worker={"heartbeat": 1.0})
        try:
            results.append(("crash soak", await crash_soak(config, work, tasks=tasks)))
        finally:
            await cleanup(tag)

        rabbit = PrivateRabbit(work / "rabbit")
        await rabbit.start()
        tag = f"soak-{uuid.uuid4().hex[:8]}"
        try:
            config = write_config(
                work / "broker.toml",
                tag,
                broker={"url": rabbit.url, "publish_timeout": 2.0, "connect_timeout": 1.0},
            )
            results.append(("RabbitMQ outage", await broker_outage(config, work, rabbit, seconds=outage)))
        finally:
            await rabbit.stop()
            await cleanup(tag, queues=False)  # its queues died with the private broker; its keys did not

        redis = PrivateRedis(work / "redis", persistent=True)
        await redis.start()
        tag = f"soak-{uuid.uuid4().hex[:8]}"
        try:
            config = write_config(work / "redis.toml", tag, redis={"url": redis.url})
            results.append(("Redis outage", await redis_outage(config, work, redis, seconds=outage)))
        finally:
            await redis.stop()
            await cleanup(tag)
    return results


COLUMNS = (
    ("tasks accepted", lambda f: f.get("accepted", f.get("tasks"))),
    ("completed", lambda f: f["completed"]),
    ("fault", lambda f: f"{f['kills']} SIGKILLs" if "kills" in f else f"down {f['outage_s']} s"),
    ("ran more than once", lambda f: f["ran_more_than_once"]),
    ("answered 503", lambda f: f.get("refused_503", "-")),
    ("other answers", lambda f: f.get("other_answers", "-")),
    ("slowest answer", lambda f: f"{f['slowest_answer_s']} s" if "slowest_answer_s" in f else "-"),
    ("first 202 after restart", lambda f: f"{f['recovery_s']} s" if "recovery_s" in f else "-"),
)


def table(results: list[tuple[str, dict[str, Any]]]) -> str:
    lines = ["| scenario | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for scenario, figures in results:
        lines.append(f"| {scenario} | " + " | ".join(str(get(figures)) for _, get in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="crash-soak tasks (default 1000)")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds each service is down (default 5)")
    args = parser.parse_args()
    results = asyncio.run(run(args.tasks, args.outage))
    for name, figures in results:
        print(f"{name}: {figures_json(figures)}")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
