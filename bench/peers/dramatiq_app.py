"""Dramatiq as bench/throughput.py runs it: RabbitMQ broker with delivery confirms, Redis results.

Worker: ``dramatiq dramatiq_app --processes 2 --threads 1 --queues $BENCH_QUEUE``.
Producer: ``python dramatiq_app.py produce --count N --threads T --out PATH`` (``.send()`` from T threads).

The harness sets BENCH_RABBIT_URL, BENCH_REDIS_URL, BENCH_QUEUE (the trial's queue; Dramatiq adds
``.DQ`` and ``.XQ``), BENCH_PREFIX (namespace of the result keys; completions are published on
``<prefix>done``) and BENCH_READY (a folder where each worker process notes it is ready).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

QUEUE = os.environ.get("BENCH_QUEUE", "bench-dramatiq")
PREFIX = os.environ.get("BENCH_PREFIX", "bench-dramatiq:")


class PublishingRedisBackend(RedisBackend):
    """Dramatiq's Redis result backend, which also PUBLISHes the message id in the same pipeline.

    The stock backend only LPUSHes (readers block on BRPOPLPUSH per result); one PUBLISH more lets the
    harness see every completion on one subscription, as Celery's Redis backend and asyncnode offer.
    """

    def store_result(self, message: Any, result: Any, ttl: int) -> None:
        key = self.build_message_key(message)
        with self.client.pipeline() as pipe:
            pipe.delete(key)
            pipe.lpush(key, self.encoder.encode(result))
            pipe.pexpire(key, ttl)
            pipe.publish(PREFIX + "done", message.message_id)
            pipe.execute()


class NoteReady(Middleware):
    """Each worker process notes in $BENCH_READY that it is consuming."""

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        ready = os.environ.get("BENCH_READY")
        if ready:
            Path(ready, f"dramatiq-{os.getpid()}").touch()


broker = RabbitmqBroker(
    url=os.environ.get("BENCH_RABBIT_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    confirm_delivery=True,  # a send returns once RabbitMQ has confirmed it
)
backend = PublishingRedisBackend(
    url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    namespace=PREFIX.rstrip(":"),
    use_namespace_prefix_keys=True,
)
broker.add_middleware(Results(backend=backend))
broker.add_middleware(NoteReady())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, store_results=True)
def noop() -> None:
    """The no-op task; its result (None) still goes to the result backend."""


def _send() -> str:
    return str(noop.send().message_id)


@contextlib.contextmanager
def _warm() -> Iterator[None]:
    broker.channel  # noqa: B018 - opens this thread's connection and confirming channel
    broker.declare_queue(QUEUE, ensure=True)
    yield


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from producer import main

    main(_send, _warm)
