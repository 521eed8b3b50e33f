"""A minimal aiohttp API doing what asyncnode's ``POST /api/tasks`` must do, and nothing else.

Per request: parse the JSON body; HSET the task's hash (``pending``) and PUBLISH the update in one
pipelined round trip; publish the envelope persistently (mandatory) to a durable queue and await
RabbitMQ's confirm; answer 202. One process, the stock event loop and json module: the naive
version asyncnode's API is measured against in bench/throughput.py.

    python bench/minimal_api.py --port P --queue Q --key-prefix K --channel C [--queue-type quorum]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import aio_pika
import redis.asyncio as aioredis
from aiohttp import web

ARGS_KEY = web.AppKey("args", argparse.Namespace)
STORE_KEY = web.AppKey("store", aioredis.Redis)
EXCHANGE_KEY = web.AppKey("exchange", aio_pika.abc.AbstractExchange)


async def submit(request: web.Request) -> web.Response:
    """``POST /api/tasks``: record, publish with confirm, 202."""
    args = request.app[ARGS_KEY]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body is not valid JSON"}, status=400)
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        return web.json_response({"error": "type: expected a string"}, status=400)
    tid, ttype, payload, now = str(uuid.uuid4()), body["type"], body.get("payload") or {}, time.time()
    async with request.app[STORE_KEY].pipeline(transaction=False) as pipe:
        fields = {"id": tid, "type": ttype, "status": "pending", "payload": json.dumps(payload), "created_at": now}
        pipe.hset(args.key_prefix + tid, mapping=fields)
        pipe.publish(args.channel, json.dumps({"id": tid, "type": ttype, "status": "pending", "ts": now}))
        await pipe.execute()
    message = aio_pika.Message(
        json.dumps({"id": tid, "type": ttype, "payload": payload}).encode(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/json",
        message_id=tid,
    )
    await request.app[EXCHANGE_KEY].publish(message, args.queue, mandatory=True)
    return web.json_response({"id": tid, "status": "pending"}, status=202)


async def healthz(request: web.Request) -> web.Response:
    """200 once connected."""
    return web.json_response({"ok": True})


async def _connections(app: web.Application):  # type: ignore[no-untyped-def]
    args = app[ARGS_KEY]
    app[STORE_KEY] = aioredis.from_url(args.redis)
    connection = await aio_pika.connect(args.rabbit)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.declare_queue(args.queue, durable=True, arguments={"x-queue-type": args.queue_type})
    app[EXCHANGE_KEY] = channel.default_exchange
    yield
    await connection.close()
    await app[STORE_KEY].aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    parser.add_argument("--key-prefix", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--rabbit", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    app = web.Application()
    app[ARGS_KEY] = args
    app.cleanup_ctx.append(_connections)
    app.router.add_post("/api/tasks", submit)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
