"""Celery 5 as bench/throughput.py runs it: RabbitMQ broker with publisher confirms, Redis results.

Worker: ``celery -A celery_app worker --pool prefork --concurrency 2 -Q $BENCH_QUEUE``.
Producer: ``python celery_app.py produce --count N --threads T --out PATH`` (``.delay()`` from T threads).

The harness sets, per trial:
  BENCH_RABBIT_URL, BENCH_REDIS_URL  the shared services
  BENCH_QUEUE      the trial's own queue (and Celery's exchange of the same name)
  BENCH_PREFIX     the trial's own prefix for result keys (and their pub/sub channels)
  BENCH_MODE       "strict": acks late, prefetch 1 (the delivery guarantee asyncnode gives);
                   "default": Celery's defaults, acks on receipt, prefetch 4 per process (its best case)
  BENCH_READY      a folder where the worker notes it is ready
  BENCH_THREADS    producer threads (its connection pool is sized to match)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

QUEUE = os.environ.get("BENCH_QUEUE", "bench-celery")
STRICT = os.environ.get("BENCH_MODE", "strict") == "strict"

app = Celery(
    "bench",
    broker=os.environ.get("BENCH_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    # A send returns only once RabbitMQ has confirmed it, as asyncnode's API does before its 202.
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    broker_pool_limit=int(os.environ.get("BENCH_THREADS", "10")),
    result_backend_transport_options={"global_keyprefix": os.environ.get("BENCH_PREFIX", "bench-celery:")},
    task_default_queue=QUEUE,  # durable, persistent messages: Celery's defaults
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=STRICT,
    worker_prefetch_multiplier=1 if STRICT else 4,
    worker_hijack_root_logger=False,
    worker_enable_remote_control=False,  # no pidbox queue or exchange: nothing to do with running tasks
)


@app.task(name="bench.noop")
def noop() -> None:
    """The no-op task; its result (None) still goes to the result backend."""


@worker_ready.connect
def _note_ready(**_: Any) -> None:
    ready = os.environ.get("BENCH_READY")
    if ready:
        Path(ready, f"celery-{os.getpid()}").touch()


def _send() -> str:
    return str(noop.delay().id)


@contextlib.contextmanager
def _warm() -> Iterator[None]:
    # Hold a pooled connection, connected, until every thread has one: none is opened mid-burst.
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        yield


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from producer import main

    main(_send, _warm)
