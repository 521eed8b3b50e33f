"""The limit: a minimal aio-pika + redis.asyncio worker doing exactly asyncnode's per-task work.

Per delivery: parse the envelope; write ``started`` to the task's hash and publish it on the update
channel (one pipelined round trip); run nothing (a no-op task); write ``completed`` and publish it
(one more); ack. Nothing else: no retries, no dead letters, no heartbeats, no guard against
redeliveries. bench/throughput.py runs two of these against a preloaded queue, as the ceiling for
asyncnode's design. Stock asyncio event loop and json module, as a first version would have.

    python bench/raw_worker.py --queue Q --key-prefix P --channel C [--prefetch N] [--rabbit URL] [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time

import aio_pika
import redis.asyncio as aioredis


async def work(args: argparse.Namespace) -> None:
    """Consume until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    store = aioredis.from_url(args.redis)
    connection = await aio_pika.connect(args.rabbit)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.get_queue(args.queue, ensure=True)  # declared by whoever preloaded it

        async def record(tid: str, ttype: str, status: str, fields: dict[str, str | float]) -> None:
            now = time.time()
            async with store.pipeline(transaction=False) as pipe:
                pipe.hset(args.key_prefix + tid, mapping={"status": status, **fields})
                pipe.publish(
                    args.channel, json.dumps({"id": tid, "type": ttype, "status": status, "ts": now, **fields})
                )
                await pipe.execute()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = json.loads(message.body)
            tid, ttype = task["id"], task["type"]
            await record(tid, ttype, "started", {"worker": worker, "started_at": time.time()})
            result = None  # the no-op handler
            await record(tid, ttype, "completed", {"result": json.dumps(result), "finished_at": time.time()})
            await message.ack()

        await queue.consume(on_message)
        await stop.wait()
    await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--key-prefix", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--rabbit", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    asyncio.run(work(parser.parse_args()))


if __name__ == "__main__":
    main()
