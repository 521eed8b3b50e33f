"""The private-instance helper itself: real redis-server and rabbitmq-server on their own ports.

The shared RabbitMQ (5672) and Redis (6379) must come out of this module untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
import redis.asyncio as aioredis

import asyncnode
from tests import privsvc
from tests.conftest import in_ci
from tests.privsvc import PrivateRabbit, PrivateRedis, PrivateServiceError, _marked_pids, _port_open, rabbitmq_available

# The fixtures, bound by name in this module. Importing them by name would do for pytest, but ruff
# then reports the import unused (F401) and every test taking one as a parameter a redefinition (F811).
private_rabbit = privsvc.private_rabbit
private_redis = privsvc.private_redis

DURABLE_QUEUE = "privsvc-durable"
SETTLE_BEFORE_KILL = 3.0  # seconds between the last durable change and a SIGKILL
SERVICE_TIMEOUT = 10.0  # seconds to connect to, or hear back from, a private instance


def redis_client(url: str) -> aioredis.Redis:
    """A client of the Redis at ``url`` whose connects and commands are bounded."""
    return aioredis.from_url(url, socket_connect_timeout=SERVICE_TIMEOUT, socket_timeout=SERVICE_TIMEOUT)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def amqp_answers(port: int) -> bool:
    """Whether an AMQP 0-9-1 broker on 127.0.0.1:port answers the protocol header."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        s.sendall(b"AMQP\x00\x00\x09\x01")
        return s.recv(3) == b"\x01\x00\x00"  # a method frame on channel 0: connection.start
    return False


def redis_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(7) == b"+PONG\r\n"
    return False


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (None if none, or not ours to see)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{entry}/fd")):
                    return int(entry)
    return None


def shared_state() -> dict[str, tuple[bool, int | None]]:
    """Whether the shared services answer, and which process listens for each."""
    return {
        "RabbitMQ :5672": (amqp_answers(5672), listener_pid(5672)),
        "Redis :6379": (redis_answers(6379), listener_pid(6379)),
    }


@pytest.fixture(scope="module", autouse=True)
def shared_services_untouched() -> Iterator[None]:
    """The shared RabbitMQ and Redis that answered before this module answer after it, same processes."""
    before = shared_state()
    yield
    after = shared_state()
    changed = {name: (before[name], after[name]) for name in before if before[name][0] and after[name] != before[name]}
    assert not changed, f"shared services were disturbed, (answers, pid) before and after: {changed}"


@pytest.fixture
async def rabbits(tmp_path: Path) -> AsyncIterator[Callable[..., PrivateRabbit]]:
    """Make PrivateRabbit instances with options; every one is stopped at the end."""
    reason = rabbitmq_available()
    if reason:
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    made: list[PrivateRabbit] = []

    def make(**kwargs: Any) -> PrivateRabbit:
        rabbit = PrivateRabbit(tmp_path / f"rabbit-{len(made)}", **kwargs)
        made.append(rabbit)
        return rabbit

    yield make
    for rabbit in made:
        await rabbit.stop()
        assert not _marked_pids(rabbit.node), f"{rabbit.node} left processes behind"


async def message_count(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url, timeout=SERVICE_TIMEOUT)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def get(url: str, key: str) -> bytes | None:
    client = redis_client(url)
    try:
        return await client.get(key)
    finally:
        await client.aclose()


async def set_(url: str, key: str, value: str) -> None:
    client = redis_client(url)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def timed(what: str, coro: Any) -> None:
    started = time.monotonic()
    await coro
    print(f"{what}: {time.monotonic() - started:.2f} s")


# -- Redis ---------------------------------------------------------------------------------


async def test_redis_start_stop_restart_on_same_port_and_kill(private_redis: PrivateRedis, tmp_path: Path) -> None:
    redis = private_redis
    assert redis.port != 6379 and redis.url == f"redis://127.0.0.1:{redis.port}/0"
    client = redis_client(redis.url)
    try:
        assert await client.ping()
        await client.set("k", "v")
    finally:
        await client.aclose()

    first_pid = redis.pid
    assert first_pid is not None
    await timed("redis stop", redis.stop())
    assert not _port_open(redis.port) and not pid_alive(first_pid)
    assert not await redis.ping()

    port = redis.port
    await timed("redis start", redis.start())
    assert redis.port == port and redis.pid != first_pid
    assert await redis.ping()

    with pytest.raises(PrivateServiceError, match="already in use"):
        await PrivateRedis(tmp_path / "intruder", port=port).start()

    second_pid = redis.pid
    assert second_pid is not None
    await redis.kill()
    assert not _port_open(port) and not pid_alive(second_pid)
    await redis.stop()  # idempotent after a kill

    # Without persistence a restart starts empty; with it, data survives a stop and a kill.
    await redis.start()
    assert await get(redis.url, "k") is None
    await redis.stop()
    durable = PrivateRedis(tmp_path / "persistent", persistent=True)
    await durable.start()
    try:
        await set_(durable.url, "k", "v")
        await durable.stop()
        await durable.start()
        assert await get(durable.url, "k") == b"v"
        await set_(durable.url, "k2", "v2")
        await durable.kill()
        await durable.start()
        assert await get(durable.url, "k2") == b"v2"
    finally:
        await durable.stop()


# -- RabbitMQ ------------------------------------------------------------------------------


async def test_rabbit_restart_keeps_durable_queue_and_persistent_message(private_rabbit: PrivateRabbit) -> None:
    rabbit = private_rabbit
    assert rabbit.port != 5672 and rabbit.url == f"amqp://guest:guest@127.0.0.1:{rabbit.port}/"
    assert rabbit.node.startswith("an") and rabbit.node.endswith("@localhost")
    assert rabbit.version and rabbit.pid is not None
    print(f"RabbitMQ {rabbit.version}, node {rabbit.node}")

    connection = await aio_pika.connect(rabbit.url, timeout=SERVICE_TIMEOUT)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(DURABLE_QUEUE, durable=True)
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(b"survives", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=DURABLE_QUEUE
        )
        assert isinstance(confirmation, aiormq.spec.Basic.Ack)

    beam = rabbit.pid
    await timed("rabbit stop", rabbit.stop())
    assert rabbit.stop_method == "rabbitmqctl"
    assert not _port_open(rabbit.port) and not _port_open(rabbit.dist_port)
    assert not pid_alive(beam) and not _marked_pids(rabbit.node)

    port = rabbit.port
    await timed("rabbit restart", rabbit.start())
    assert rabbit.port == port and rabbit.pid != beam
    connection = await aio_pika.connect(rabbit.url, timeout=SERVICE_TIMEOUT)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DURABLE_QUEUE, durable=True, passive=True)
        message = await queue.get(timeout=5)
        assert message.body == b"survives"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        await message.ack()


async def test_rabbit_consumer_timeout_is_applied_and_kill_then_recover(
    rabbits: Callable[..., PrivateRabbit],
) -> None:
    rabbit = rabbits(consumer_timeout_ms=1500, channel_tick_interval_ms=250)
    await timed("rabbit start", rabbit.start())
    assert await rabbit.eval("application:get_env(rabbit, consumer_timeout).") == "{ok,1500}"
    assert await rabbit.eval("application:get_env(rabbit, channel_tick_interval).") == "{ok,250}"

    # Enforced: a delivery left unacknowledged closes its channel within timeout + one tick.
    loop = asyncio.get_running_loop()
    connection = await aio_pika.connect(rabbit.url, timeout=SERVICE_TIMEOUT)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(DURABLE_QUEUE, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"unacked", delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=DURABLE_QUEUE
        )
        published_at = time.monotonic()
        delivered: asyncio.Future[float] = loop.create_future()
        closed: asyncio.Future[tuple[float, BaseException | None]] = loop.create_future()
        consumer = await connection.channel()
        consumer.close_callbacks.add(
            lambda _, exc: None if closed.done() else closed.set_result((time.monotonic(), exc))
        )

        async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not delivered.done():
                delivered.set_result(time.monotonic())

        await (await consumer.get_queue(queue.name)).consume(hold, no_ack=False)
        at = await asyncio.wait_for(delivered, 10)
        closed_at, exc = await asyncio.wait_for(closed, 10)
        assert isinstance(exc, aio_pika.exceptions.ChannelPreconditionFailed), exc
        assert "delivery acknowledgement" in str(exc)
        assert 1.4 < closed_at - at < 6, closed_at - at  # not the default 60 s tick

    # kill(): a crash of the VM; the port stops answering and nothing of the node is left.
    # Not within SETTLE_BEFORE_KILL of declaring and publishing: see PrivateRabbit.kill.
    await asyncio.sleep(published_at + SETTLE_BEFORE_KILL - time.monotonic())
    beam = rabbit.pid
    assert beam is not None
    await rabbit.kill()
    assert not _port_open(rabbit.port) and not pid_alive(beam) and not _marked_pids(rabbit.node)

    # Crash recovery: the confirmed persistent message, requeued by the timeout, is still there.
    await timed("rabbit start after kill", rabbit.start())
    assert await message_count(rabbit.url, DURABLE_QUEUE) == 1


async def test_a_dead_letter_supervisor_that_gave_up_is_restarted(private_rabbit: privsvc.PrivateRabbit) -> None:
    """What conftest does to the shared node before and after a run, tried on a private one: the supervisor
    stopped as RabbitMQ 3.10 leaves it when it gives up, then repaired, and a quorum queue with
    at-least-once dead-lettering works again."""
    from tests.conftest import repair_dead_letter_supervisor

    assert await repair_dead_letter_supervisor(private_rabbit.eval) is False  # sound: nothing to do
    await private_rabbit.eval("supervisor:terminate_child(rabbit_sup, rabbit_fifo_dlx_sup).")
    assert (await private_rabbit.eval("whereis(rabbit_fifo_dlx_sup).")).strip() == "undefined"
    assert await repair_dead_letter_supervisor(private_rabbit.eval) is True
    assert (await private_rabbit.eval("whereis(rabbit_fifo_dlx_sup).")).strip() != "undefined"
    connection = await aio_pika.connect(private_rabbit.url, timeout=10)
    async with connection:
        channel = await connection.channel()
        cfg = asyncnode.BrokerConfig(url=private_rabbit.url, queue="repaired")
        queue = await asyncnode.declare_queues(channel, cfg)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key="repaired")
        message = await queue.get(timeout=10)
        assert message is not None and message.body == b"x"
        await message.ack()
