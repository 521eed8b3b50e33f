"""The built-in task types.  Importing this package registers them.

A handler is ``async def name(payload, ctx)`` (or a plain ``def``, which runs in
a thread so it never blocks the event loop), registered with
``@asyncnode.task(...)`` under a stable type name, a one-line description and
the payload fields it expects.  The API validates payloads against those
fields before anything is queued.
"""

from handlers import mail, noop, reverse, sentiment, sleep

__all__ = ["mail", "noop", "reverse", "sentiment", "sleep"]
