"""Property-based fuzzing of the HTTP API against the real RabbitMQ and Redis (hypothesis).

Every answer to the generated requests (one generator per concern, below) must satisfy:

* never a 5xx, and ``/healthz`` still answers after every batch (the real-process test
  also checks that ``asyncnode.py api`` is alive and logged no error);
* on ``/api/``, an error status comes as a JSON object with a non-empty ``"error"`` string;
* the status is one the request calls for: its generator says, by construction or by asking
  the app's pure core (``validate_submission``, ``token_matches``);
* a rejected request writes nothing: after each batch the new task hashes are exactly
  those of the 202s, no other key appears but their histories, the recent-tasks index and
  the pending count grew by the number of 202s, so did the work queue (no worker runs), and
  the dead-letter queue is unchanged.

pytest-asyncio runs the examples of an ``async def`` ``@given`` test on the test's loop, so the
fixtures' connections work in all of them and are shared: each example is one batch of concurrent
requests, checked by *deltas*; a failure shrinks to the smallest batch, usually one request.
``ASYNCNODE_FUZZ_SCALE=10`` multiplies the number of examples (mind the 120 s timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aio_pika
import aiohttp
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

import asyncnode
from tests.conftest import Proc, wait_for

# The strategies are built from the task types.
asyncnode.load_handlers(asyncnode.Config(path=asyncnode.Path("config.toml")))
#: The defaults the tests' configs use too (the senders fixture checks): validation limits, body size.
ORACLE_CFG = asyncnode.Config(path=Path("fuzz-oracle.toml"))
MAX_TEXT, MAX_BODY = ORACLE_CFG.api.max_text, ORACLE_CFG.api.client_max_size
TASK_TIMEOUT = ORACLE_CFG.broker.task_timeout
TYPES = tuple(sorted(asyncnode.REGISTRY.values(), key=lambda t: t.name))
TOKEN = "fuzz-s3cret"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
JSON_CT = (("Content-Type", "application/json"),)
STATS: Counter[str] = Counter()  # requests sent and statuses seen by the whole module
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
SUPPRESSED.append(HealthCheck.large_base_example)
#: Every request of the HTTP clients, and connecting to RabbitMQ.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
SERVICE_TIMEOUT = 10.0


def fuzz(max_examples: int) -> settings:
    """The settings of a fuzz test: ``max_examples`` scaled by $ASYNCNODE_FUZZ_SCALE, no deadline, no example
    database, no explain phase (it traces every line: slow on Python 3.11)."""
    n = max(1, round(max_examples * float(os.environ.get("ASYNCNODE_FUZZ_SCALE", "1"))))
    base = settings(deadline=None, database=None, print_blob=True, suppress_health_check=SUPPRESSED)
    return settings(base, max_examples=n, phases=set(Phase) - {Phase.explain})


# --- requests, answers, and what every answer must satisfy ------------------------------------------------------------
@dataclasses.dataclass
class Req:
    """One request.  ``path`` goes out as is (percent-encoded); raw senders send ``headers`` latin-1
    encoded, so they can carry any byte.  ``expect``: the statuses allowed (None: any below 500);
    ``app``: the sender, "open" (aiohttp's client), "raw" (a bare socket) or "token" (raw, ``[api] token`` set)."""

    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    expect: set[int] | None = None
    app: str = "open"

    def __repr__(self) -> str:
        body = self.body if self.body is None or len(self.body) <= 300 else self.body[:150] + b"..."
        size = f" ({len(self.body)} bytes)" if self.body else ""
        expect = sorted(self.expect) if self.expect is not None else "any<500"
        return f"Req({self.method} {self.path[:300]!r}, {body!r}{size}, {self.headers!r}, {expect}, {self.app})"


@dataclasses.dataclass
class Answer:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


Send = Callable[[Req], Coroutine[Any, Any, Answer]]


def http_sender(session: aiohttp.ClientSession, base: str) -> Send:
    """Send through aiohttp's client; no Content-Type unless the request has one."""

    async def send(req: Req) -> Answer:
        data = None if req.body is None else io.BytesIO(req.body)  # (aiohttp warns about large bytes bodies)
        url, skip = URL(base + req.path, encoded=True), ["Content-Type"]  # no automatic one; a given one is sent
        async with session.request(
            req.method, url, data=data, headers=list(req.headers), skip_auto_headers=skip, allow_redirects=False
        ) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read())

    return send


def raw_sender(host: str, port: int) -> Send:
    """Send over a bare socket, so header values can hold bytes aiohttp's client refuses."""

    async def send(req: Req) -> Answer:
        head = [f"{req.method} {req.path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in req.headers]
        head += [] if req.body is None else [f"Content-Length: {len(req.body)}"]
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (req.body or b""))
            async with asyncio.timeout(10):
                raw = await reader.read()  # to EOF: Connection: close
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head_bytes, _, body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (ln.partition(":") for ln in lines)}
        length = int(headers.get("content-length", len(body)))
        return Answer(int(status_line.split()[1]), headers, body[:length])

    return send


def check_answer(req: Req, ans: Answer) -> list[str]:
    """Assert what every answer must satisfy; return the task ids of a 202 (a bulk submit's: several)."""
    content_type = ans.headers.get("content-type", "").partition(";")[0].strip().lower()
    where = f"\n  request: {req!r}\n  answer:  {ans.status} {content_type} {ans.body[:300]!r}"
    assert ans.status < 500, "server error" + where
    if ans.status >= 400 and req.path.startswith("/api/"):
        assert content_type == "application/json", "error answer is not JSON" + where
        data = json.loads(ans.body)
        error = data.get("error") if isinstance(data, dict) else None
        assert isinstance(error, str) and error.strip(), "error answer without an 'error' text" + where
    if ans.status == 401:
        assert ans.headers.get("www-authenticate") == "Bearer", "401 without WWW-Authenticate: Bearer" + where
    if req.expect is not None:
        assert ans.status in req.expect, f"expected one of {sorted(req.expect)}" + where
    if ans.status != 202:
        return []
    assert req.method == "POST" and req.path == "/api/tasks", "202 from something that is not a submission" + where
    data = json.loads(ans.body)
    if "location" not in ans.headers:  # a bulk submit (an array): each item as a single one's answer
        ids = [str(item.get("id")) for item in data["items"]]
        assert all(map(UUID4.fullmatch, ids)), "bad 202" + where
        assert data == {"items": [{"id": t, "status": "pending", "queue": "default"} for t in ids]}, "bad 202" + where
        return ids
    tid = ans.headers["location"].removeprefix("/api/tasks/")
    accepted = {"id": tid, "status": "pending", "queue": "default"}
    assert UUID4.fullmatch(tid) and data == accepted, "bad 202" + where
    return [tid]


# --- the audit: what Redis and RabbitMQ hold under the test's names, and one batch checked against it -----------------
@dataclasses.dataclass
class Snapshot:
    tasks: frozenset[str]  # ids with a task hash under the key prefix
    others: frozenset[str]  # every other key under the prefix, without the prefix
    recent: int  # members of the recent-tasks index
    pending: int  # tasks ever counted pending in the stats hash
    ready: int  # messages ready in the work queue
    dead: int  # messages ready in the dead-letter queue


@dataclasses.dataclass
class Audit:
    cfg: asyncnode.Config
    redis: aioredis.Redis
    channel: aio_pika.abc.AbstractChannel

    @property
    def dlq(self) -> str:
        return self.cfg.broker.queue + asyncnode.DLQ_SUFFIX

    async def depth(self, queue: str) -> int:
        return (await self.channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0

    async def snapshot(self) -> Snapshot:
        prefix = self.cfg.redis.key_prefix
        names = {k[len(prefix) :] async for k in self.redis.scan_iter(match=prefix + "*", count=1000)}
        tasks = frozenset(filter(UUID4.fullmatch, names))
        recent = int(await self.redis.zcard(prefix + asyncnode.RECENT_SUFFIX))
        pending = int(await self.redis.hget(prefix + asyncnode.STATS_SUFFIX, "pending") or 0)
        ready, dead = await self.depth(self.cfg.broker.queue), await self.depth(self.dlq)
        return Snapshot(tasks, frozenset(names - tasks), recent, pending, ready, dead)


async def send_batch(
    senders: Mapping[str, Send], audit: Audit, batch: list[Req], alive: Callable[[], Awaitable[None]] | None = None
) -> list[Answer]:
    """Send ``batch`` concurrently, check every answer and what changed, then that the server still answers."""
    before = await audit.snapshot()
    async with asyncio.TaskGroup() as group:
        sent = [group.create_task(senders[req.app](req)) for req in batch]
    answers = [task.result() for task in sent]
    STATS["requests"] += len(batch)
    STATS.update(f"status {ans.status}" for ans in answers)
    accepted = {tid for req, ans in zip(batch, answers, strict=True) for tid in check_answer(req, ans)}
    after = await audit.snapshot()

    rejected = [req for req, ans in zip(batch, answers, strict=True) if ans.status != 202]
    assert before.tasks <= after.tasks, f"task hashes disappeared: {sorted(before.tasks - after.tasks)[:5]}"
    assert after.tasks - before.tasks == accepted, f"new task hashes are not those of the 202s; non-202: {rejected}"
    statuses = {await audit.redis.hget(audit.cfg.redis.key_prefix + tid, "status") for tid in accepted}
    assert statuses <= {"pending"}, statuses
    allowed = before.others | {tid + asyncnode.HISTORY_SUFFIX for tid in accepted}  # (the indexes exist: seeded)
    allowed |= {asyncnode.METRICS_SUFFIX} if accepted else set()  # the first submission counted makes it
    # The search index's sets of the accepted tasks' terms (as its terms hash names them), and their status set.
    terms_key = audit.cfg.redis.key_prefix + asyncnode.TERMS_SUFFIX
    for tid in accepted:
        terms = str(await audit.redis.hget(terms_key, tid) or "").split("\n")
        allowed |= {asyncnode.INDEX_SUFFIX + term for term in [*terms, "s:pending"] if term}
    allowed |= {asyncnode.TERMS_SUFFIX} if accepted else set()
    assert before.others <= after.others <= allowed, f"keys {sorted(after.others ^ before.others)}; non-202: {rejected}"
    grown = (after.recent - before.recent, after.pending - before.pending, after.ready - before.ready)
    assert grown == (len(accepted),) * 3, f"recent, pending, queued grew by {grown}, 202s: {len(accepted)}; {rejected}"
    if after.dead != before.dead:  # dead letters a DLQ endpoint fetched return when its channel closes

        async def dlq_back() -> bool:
            return await audit.depth(audit.dlq) == before.dead

        await wait_for(dlq_back, 5, f"the dead-letter queue back at {before.dead} messages")
    for app in sorted({req.app for req in batch}):
        health = Req("GET", "/healthz", expect={200}, app=app)
        check_answer(health, await senders[app](health))
    if alive is not None:
        await alive()
    return answers


# --- shared strategies: texts, JSON values, encodings, Content-Types, the statuses a submission calls for -------------
#: Lone surrogates: valid in JSON text ("\ud800"), not valid Unicode text.
SURROGATES = st.lists(st.characters(categories=["Cs"]), min_size=1, max_size=2).map("".join)
#: Any character but a surrogate (st.text()'s default alphabet, without its costly codec set-up).
CHARS = st.characters(exclude_categories=["Cs"])
ODD_ALPHABET = "\r\n\t\x00\x1b\x7f\x85\u2028\u2029\ufeff\u202e\U0010ffff\"\\/%{}<>&'~\u00e9\U0001f600"
TOKENS = st.sampled_from(["\r\n", "\r\nBcc: x@y.z", "</script>", "${jndi:ldap://x}", "'; DROP TABLE t;--", ".."])


@functools.cache  # strategies are built once: building them per draw is slow
def texts(max_size: int = 12, surrogates: bool = True) -> st.SearchStrategy[str]:
    """Short text of any characters, odd ones, nasty tokens and (unless told not) lone surrogates."""
    chunks = [st.text(CHARS, max_size=max_size), st.text(ODD_ALPHABET, max_size=4), TOKENS]
    return st.lists(st.one_of([*chunks, SURROGATES] if surrogates else chunks), max_size=3).map("".join)


def quoted(max_size: int, safe: str = "") -> st.SearchStrategy[str]:
    return texts(max_size).map(lambda s: quote(s, safe=safe, errors="surrogatepass"))


HUGE_INTS = st.sampled_from([2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**100, -(10**300)])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), texts())
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts(8), kids, max_size=4), max_leaves=20
)
JSON_CTS = ["application/json", "application/json; charset=utf-8", "application/json;charset=UTF-8"]
JSON_CTS += ["application/json; charset=latin-1", 'application/json; charset="utf-16"', "application/json; foo=bar"]
#: Content-Types the server must answer 415 (None: no Content-Type at all, taken as application/octet-stream).
OTHER_CTS = [None, "text/plain", "text/json", "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz"]
OTHER_CTS += ["application/jsonx", "application/problem+json", "garbage"]
#: Content-Types the server may take as JSON or not (415): either answer is fine.
UNSURE_CTS = ["APPLICATION/JSON", "Application/Json; Charset=UTF-8", "application/json,text/plain"]
UNSURE_CTS += ["application/json/x", "application/json;;", "application/json; charset", "", ";", "\u00e9/\u00e9"]
CONTENT_TYPES: dict[str, list[Any]] = {"json": JSON_CTS, "other": OTHER_CTS, "unsure": UNSURE_CTS}


@st.composite
def content_types(draw: st.DrawFn) -> tuple[tuple[tuple[str, str], ...], str]:
    """(headers, kind): mostly a JSON Content-Type, sometimes another, a missing or an odd one."""
    kind = draw(st.sampled_from(["json"] * 10 + ["other", "unsure"]))
    ct = draw(st.sampled_from(CONTENT_TYPES[kind]))
    return ((("Content-Type", ct),) if ct is not None else ()), kind


@st.composite
def encode_json(draw: st.DrawFn, value: Any) -> bytes:
    """``value`` as JSON text: escaped or raw unicode, compact or indented, UTF-8/16/32 with or without a BOM."""
    indent, separators = draw(st.sampled_from([(None, None), (None, (",", ":")), (0, None), (2, None), ("\t", None)]))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=indent, separators=separators)
    encodings = ["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"]
    return text.encode(draw(st.sampled_from(encodings)), "surrogatepass")


def submission(body: bytes, ct: tuple[tuple[tuple[str, str], ...], str], valid: bool | None = None) -> Req:
    """POST /api/tasks with Content-Type ``ct`` (see :func:`content_types`) and the statuses that calls for;
    ``valid`` None: the API's pure core (``json.loads`` + ``validate_submission``, or ``validate_batch`` for an
    array: a bulk submit) says whether the body is."""
    headers, kind = ct
    if valid is None:
        try:
            data = json.loads(body)
            if isinstance(data, list):
                asyncnode.validate_batch(data, ORACLE_CFG)
            else:
                asyncnode.validate_submission(data, ORACLE_CFG)
            valid = True
        except (ValueError, RecursionError, asyncnode.ValidationError):
            valid = False
    by_body = {413} if len(body) > MAX_BODY else {202} if valid else {400}
    return Req("POST", "/api/tasks", body, headers, {"json": by_body, "other": {415}, "unsure": by_body | {415}}[kind])


def batches(requests: st.SearchStrategy[Req], max_size: int) -> st.SearchStrategy[list[Req]]:
    """1 to ``max_size`` requests; the size is drawn first, since st.lists favours short lists."""
    return st.integers(1, max_size).flatmap(lambda n: st.lists(requests, min_size=n, max_size=n))


# --- concern 1: near-valid bodies built from the task registry, labelled valid or not --------------------------------
ADDRESS_LOCAL = st.from_regex(r"[A-Za-z0-9._+!#$%&'*/=?^`{|}~\u00e9\u00fc-]{1,30}", fullmatch=True, alphabet=CHARS)
ADDRESS_DOMAIN = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,20}[A-Za-z0-9])?", fullmatch=True, alphabet=CHARS)
VALID_ADDRESSES = st.builds("{}@{}".format, ADDRESS_LOCAL, ADDRESS_DOMAIN) | st.just("a" * 250 + "@b.c")
BAD_ADDRESSES = ["", "a", "a@", "@b.c", "a b@c.d", "a@b.c, d@e.f", "a@b.c;d@e.f", "Name <a@b.c>", "<a@b.c>", "a@@b.c"]
BAD_ADDRESSES += ["a@-b.c", "a@b.c-", "a@b_c.d", '"a"@b.c', "a@[127.0.0.1]", "a(x)@b.c", "a@b.c ", " a@b.c", "a\\@b.c"]
BAD_ADDRESSES += ["a@b.c\x00", "a" * 251 + "@b.c"]
LINE_BREAKS = st.sampled_from(["\r", "\n", "\r\n", "\r\nBcc: e@f.g"])
WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.lists(JSON_SCALARS, max_size=3))


def inserted(base: st.SearchStrategy[str], what: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A string of ``base`` with one of ``what`` somewhere in it."""
    return st.builds(lambda s, at, w: s[:at] + w + s[at:], base, st.integers(0, 300), what)


def repeated(*lengths: int) -> st.SearchStrategy[str]:
    """One character repeated to one of ``lengths``."""
    return st.builds(str.__mul__, st.sampled_from(["x", "\u00e9", "\U0001f600", "\u2028"]), st.sampled_from(lengths))


@functools.cache
def field_values(ttype: asyncnode.TaskType, f: asyncnode.Field, valid: bool) -> st.SearchStrategy[Any]:
    """Values of field ``f`` the API must accept (``valid``) or refuse (every registered field is required)."""
    header = ttype.name == "email" and f.name in ("to", "subject")  # must not hold a line break
    address = ttype.name == "email" and f.name == "to"
    if f.type == "string":
        limit = min(f.max_length or MAX_TEXT, MAX_TEXT)
        good = texts(min(limit, 40), surrogates=False).map(lambda s: s[:limit])
        if header:
            good = good.map(lambda s: s.replace("\r", "").replace("\n", ""))
        good = VALID_ADDRESSES if address else good
        if valid:
            return good if address else st.one_of(good, good, repeated(limit - 1, limit))
        bad = [WRONG_TYPES, repeated(limit + 1, limit + 37), inserted(good, SURROGATES)]
        bad += [inserted(good, LINE_BREAKS)] if header else []
        bad += [st.sampled_from(BAD_ADDRESSES), st.lists(VALID_ADDRESSES, min_size=1)] if address else []
        return st.one_of(bad)
    if f.type == "boolean":
        return st.booleans() if valid else st.sampled_from([None, 0, 1, "true", "", [True]])
    lo, hi = f.min, f.max
    assert lo is not None and hi is not None, f"{ttype.name}.{f.name}: unbounded numbers are not generated yet"
    ints = st.integers(math.ceil(lo), math.floor(hi))
    if valid:
        edges = [x for x in (lo, hi, float(lo), float(hi), math.nextafter(hi, lo), 0, -0.0, 5e-324) if lo <= x <= hi]
        return ints if f.type == "integer" else st.floats(lo, hi) | ints | st.sampled_from(edges)
    wrong: list[Any] = [None, True, False, "5", "", [5], {"v": 5}, math.nan, math.inf, -math.inf, 10**30, -(10**30)]
    wrong += [hi + 1e-4, math.nextafter(hi, math.inf), math.floor(hi) + 1, lo - 1, math.nextafter(lo, -math.inf)]
    wrong += [1.5, float(lo)] if f.type == "integer" else []
    below = st.floats(max_value=math.nextafter(lo, -math.inf))  # (below 0 that is -5e-324: never -0.0, which equals 0)
    return st.sampled_from(wrong) | st.floats(min_value=hi, exclude_min=True) | below


BAD_TIMEOUTS: list[Any] = [0, 0.0, -0.0, -1, -5e-324, -math.inf, 10**30, True, False, "10", "", [], {}]
BAD_TIMEOUTS += [math.nextafter(TASK_TIMEOUT, math.inf), TASK_TIMEOUT + 1e-4, int(TASK_TIMEOUT) + 1, math.nan, math.inf]
GOOD_TIMEOUT = st.floats(0, TASK_TIMEOUT, exclude_min=True) | st.integers(1, int(TASK_TIMEOUT)) | st.just(None)
BAD_TIMEOUT = st.sampled_from(BAD_TIMEOUTS) | st.floats(max_value=-5e-324) | st.floats(min_value=TASK_TIMEOUT + 1e-9)
SHAPES = ["as-is"] * 8 + ["no-payload", "null-payload", "payload-not-object", "bad-type", "no-type", "extra-key"]
SHAPES.append("not-object")


@functools.cache
def bad_type_names(name: str) -> st.SearchStrategy[Any]:
    variants = [name.upper(), name.title(), f" {name}", f"{name} ", f"{name}\x00", f"{name}\n", name[:-1], "", "*"]
    choices = st.one_of(st.sampled_from(variants), texts(), st.none(), st.integers(), st.lists(st.just(name)))
    return choices.filter(lambda v: not (isinstance(v, str) and v in asyncnode.REGISTRY))


@st.composite
def near_valid_submissions(draw: st.DrawFn) -> Req:
    """A correct body of a registered type, then maybe broken: labelled valid iff nothing broke it."""
    ttype = draw(st.sampled_from(TYPES))
    names = [f.name for f in ttype.fields]
    payload: dict[str, Any] = {f.name: draw(field_values(ttype, f, True)) for f in ttype.fields}
    ok = True
    for mutation in draw(st.lists(st.sampled_from(["wrong-value", "surrogate", "drop", "null", "extra"]), max_size=2)):
        if mutation == "extra":
            payload[draw(texts().filter(lambda k: k not in names))] = draw(JSON_VALUES)
        elif not ttype.fields:
            continue
        else:
            f = draw(st.sampled_from(ttype.fields))
            value = payload.get(f.name)
            if mutation == "wrong-value":
                payload[f.name] = draw(field_values(ttype, f, False))
            elif mutation == "surrogate" and isinstance(value, str):  # an emoji cut in half by UTF-16 truncation
                payload[f.name] = value[:-1] + "\ud83d"
            elif mutation == "drop":
                payload.pop(f.name, None)
            else:  # "null", or "surrogate" where there is no string
                payload[f.name] = None
        ok = False
    body: Any = {"type": ttype.name, "payload": payload}
    shape = draw(st.sampled_from(SHAPES))
    if shape == "no-payload":
        del body["payload"]
    elif shape == "null-payload":
        body["payload"] = None
    elif shape == "payload-not-object":
        body["payload"] = draw(st.one_of(st.lists(JSON_SCALARS, max_size=3), texts(), st.integers(), st.booleans()))
    elif shape == "bad-type":
        body["type"] = draw(bad_type_names(ttype.name))
    elif shape == "no-type":
        del body["type"]
    elif shape == "extra-key":
        body[draw(texts().filter(lambda k: k not in ("type", "payload", "timeout")))] = draw(JSON_VALUES)
    if shape in ("no-payload", "null-payload"):
        ok = not ttype.fields  # an absent or null payload is {}: fine for a type without fields
    elif shape not in ("as-is", "not-object"):
        ok = False
    if draw(st.booleans()):
        good_timeout = draw(st.booleans())
        body["timeout"] = draw(GOOD_TIMEOUT if good_timeout else BAD_TIMEOUT)
        ok = ok and good_timeout
    if shape == "not-object":
        body, ok = draw(st.sampled_from([[body], ttype.name, json.dumps(body)])), False
        ok = ok if not isinstance(body, list) else None  # a bulk submit of one: the core decides
    return submission(draw(encode_json(body)), draw(content_types()), ok)


# --- concern 2: any JSON value, raw bytes, deep nesting, big bodies (the core is the oracle) -------------------------
SOME_TYPE = st.sampled_from(sorted(asyncnode.REGISTRY)) | JSON_VALUES
OPTIONAL_KEYS = {"payload": JSON_VALUES, "timeout": JSON_VALUES, "extra": JSON_VALUES}
ANY_JSON = JSON_VALUES | st.fixed_dictionaries({"type": SOME_TYPE}, optional=OPTIONAL_KEYS)
VALID_BODY = b'{"type": "reverse", "payload": {"text": "hello"}}'
NUMBER_TEXTS = ["9" * 4300, "9" * 4301, "1" * 100000, "1e999999", "-1e999999", "NaN", "Infinity", "-Infinity"]
NUMBER_TEXTS += ["-0", "0.", "01", "1e", ".5", "+1", "0x10", "1_0", "-", "\u0661"]
FRAMINGS = [b"", b" ", b"\n\t\r ", b"null", b"0", b'""', b"{}", b"[]", b"\x00", b"\xef\xbb\xbf", b"{" * 3]
FRAMINGS += [VALID_BODY + b"x", VALID_BODY + VALID_BODY, VALID_BODY + b"\x00", b"\xef\xbb\xbf" + VALID_BODY]
FRAMINGS += [b'{"type": "noop", "type": "nope"}', b'{"type": "nope", "type": "noop"}', b"{'type': 'noop'}"]
FRAMINGS += [b'{"type": "noop"} // comment', b'{"type": "noop",}', b'{"type": "no\\op"}', b'{"type": "\\u006eoop"}']
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
#: Nesting depths up to and far beyond the interpreter's recursion limit (1000), in several shapes.
DEPTHS = st.integers(1, 1100) | st.sampled_from([999, 1000, 1001, 5000, 100_000])
NESTINGS = [
    lambda n: b"[" * n,
    lambda n: b"[" * n + b"]" * n,
    lambda n: b'{"a":' * n + b"1" + b"}" * n,
    lambda n: b'{"type": "reverse", "payload": {"text": ' + b"[" * n + b'"x"' + b"]" * n + b"}}",
    lambda n: b'{"type": "noop", "timeout": ' + b'{"a":[' * n + b"1" + b"]}" * n + b"}",
]
BODY_KINDS = ["any-json"] * 5 + ["binary", "bad-utf8", "truncated", "nested", "nested", "number", "framing", "big"]


@st.composite
def body_submissions(draw: st.DrawFn) -> Req:
    kind = draw(st.sampled_from(BODY_KINDS))
    if kind == "any-json":
        body = draw(ANY_JSON.flatmap(encode_json))
    elif kind == "binary":
        body = draw(st.binary(max_size=300))
    elif kind == "nested":
        body = draw(st.sampled_from(NESTINGS))(draw(DEPTHS))
    elif kind == "number":
        body = b'{"type": "sleep", "payload": {"seconds": ' + draw(st.sampled_from(NUMBER_TEXTS)).encode() + b"}}"
    elif kind == "framing":
        body = draw(st.sampled_from(FRAMINGS))
    elif kind == "big":  # around [api] client_max_size: 413 above it, parsed at it
        body = b'{"type": "noop"}'.ljust(draw(st.sampled_from([MAX_BODY, MAX_BODY + 1, MAX_BODY + 4096])))
    else:  # a near-valid body, cut short or with bytes that are not UTF-8 in it
        body = draw(near_valid_submissions()).body or b""
        at = draw(st.integers(0, len(body)))
        body = body[:at] if kind == "truncated" else body[:at] + draw(st.sampled_from(BAD_UTF8)) + body[at:]
    return submission(body, draw(content_types()))


# --- concern 3: header bytes (sent raw), on the open API and the one with a token ------------------------------------
FIELD_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])  # what HTTP allows in a field value
GARBAGE = st.binary(max_size=40).map(lambda b: bytes(FIELD_BYTES[c % len(FIELD_BYTES)] for c in b))
UTF8_TEXT = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=20).map(str.encode)
RAW_CTS = st.sampled_from([ct.encode() for ct in JSON_CTS + UNSURE_CTS[:-1]]) | GARBAGE | UTF8_TEXT
RAW_CTS |= st.builds(bytes.__add__, st.sampled_from([b"application/json", b"application/json; charset="]), GARBAGE)
_T = TOKEN.encode()
AUTH_PREFIXES = [b"Bearer ", b"bearer ", b"Bearer " + _T, b"Bearer \xc3", b"Basic ", b"Token ", b"Bearer", b""]
AUTHORIZATIONS = st.sampled_from([b"Bearer " + _T, b"bearer " + _T, b"BEARER \t" + _T + b" "])  # valid
AUTHORIZATIONS |= st.sampled_from([b"Bearer \xff", b"Bearer \xed\xa0\x80", b"Bearer " + _T + b"\xff", b"\xff" + _T])
AUTHORIZATIONS |= st.builds(bytes.__add__, st.sampled_from(AUTH_PREFIXES), GARBAGE) | GARBAGE | UTF8_TEXT
HEADER_NAMES = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True, alphabet=CHARS)
#: (method, path, body) of the requests the header bytes go with.
HEADER_TARGETS: list[tuple[str, str, bytes | None]] = [("GET", p, None) for p in ("/api/workers", "/api/task-types")]
HEADER_TARGETS += [("GET", p, None) for p in ("/api/tasks?limit=2", "/api/dlq?limit=1")]
HEADER_TARGETS += [("POST", "/api/tasks", b) for b in (VALID_BODY, b'{"type": "noop"}', b'{"type": "nope"}')]


@st.composite
def header_requests(draw: st.DrawFn) -> Req:
    """Content-Type, Authorization and other headers made of any bytes (carried as latin-1 text)."""
    method, path, body = draw(st.sampled_from(HEADER_TARGETS))
    app = draw(st.sampled_from(["raw", "token"]))
    headers: list[tuple[str, bytes]] = []
    if body is not None and draw(st.integers(0, 5)):
        headers.append((draw(st.sampled_from(["Content-Type", "content-type"])), draw(RAW_CTS)))
    auth = draw(st.none() | AUTHORIZATIONS)
    if auth is not None:
        headers.append(("Authorization", auth))
    headers = draw(st.permutations(headers + draw(st.lists(st.tuples(HEADER_NAMES, GARBAGE), max_size=2))))
    # The core's verdict on the token, decoded and trimmed as aiohttp's server hands the header over.
    given_auth = None if auth is None else auth.decode("utf-8", "surrogateescape").strip(" \t")
    expect: set[int] | None = {401}
    if app != "token" or asyncnode.token_matches(TOKEN, given_auth, None):
        expect = {200} if body is None else submission(body, ((), "unsure")).expect
    return Req(method, path, body, tuple((n, v.decode("latin-1")) for n, v in headers), expect, app)


# --- concern 4: paths, ids, queries, methods, static file names ------------------------------------------------------
SEGMENT_TOKENS = ["..", ".", "%2e%2e", "%2E%2E", "%2F", "a%2Fb", "%2f..%2f", "..%2F..%2Fetc%2Fpasswd", "%00"]
SEGMENT_TOKENS += ["%", "%ZZ", "%ED%A0%80", "%FF", "%C0%AF", "%20", "+", ";", "a;b=c", "%3F", "%23", "*"]
KEY_NAMES = ["~recent", "%7Erecent", "%7erecent", "~workers", "~workers:fuzz-host:4242", "~workers%3Afuzz-host%3A4242"]
SEGMENT_TOKENS += [*KEY_NAMES, "requeue", "null"]
SEGMENT_TOKENS += ["00000000-0000-0000-0000-000000000000", "{id}", "%7Bid%7D", "$(id)", "'", "%22", "%5C"]
SEGMENT_TOKENS += ["a" * n for n in (63, 64, 65, 200, 255, 256, 4000)] + ["%C3%A9" * n for n in (64, 65, 128, 600)]
SEGMENTS = st.sampled_from(SEGMENT_TOKENS) | quoted(20) | quoted(20, safe="~!$&'()*+,;=:@")
SEGMENTS |= st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
#: Names longer than a file system allows (255 bytes a name, 4096 a path), under aiohttp's 8190-byte request line.
LONG_NAMES = st.builds(str.__mul__, st.sampled_from(["a", "%C3%A9", "%F0%9F%98%80"]), st.integers(256, 500))
LONG_NAMES |= st.integers(2049, 3000).map(lambda n: "a/" * n)
ODD_LIMITS = ["", " 5", "5 ", "+5", "05", "1_0", "1e3", "0x10", "1.0", "-0", "nan", "9" * 5000, "\u0663", "\uff15"]
ODD_LIMITS = [quote(s, safe="") for s in ODD_LIMITS] + ["%FF", "%ED%A0%80", "%00", "1%00", "+5", "5+", "1;2"]
ODD_LIMITS += ["1&limit=2", "2&limit=x"]  # (the first "limit" counts)
EXTRA_QUERY = st.just("") | st.builds("&{}={}".format, quoted(6), quoted(6))


def search_expect(path: str, extra: str, status: int) -> set[int]:
    """What a list with a valid or invalid ``limit`` and ``extra`` parameters answers: GET /api/tasks refuses a
    parameter it does not know (400), and one of its filter's may hold a value it refuses; /api/dlq ignores them."""
    if path != "/api/tasks" or not extra:
        return {status}
    name = unquote(extra[1:].partition("=")[0], errors="surrogatepass")
    if name in (*asyncnode.FILTER_KEYS, *asyncnode.LIST_PARAMETERS):
        return {200, 400} if status == 200 else {400}
    return {400}


@st.composite
def endpoint_requests(draw: st.DrawFn) -> Req:
    kind = draw(st.sampled_from(["task", "list", "requeue", "discard", "info", "method", "unknown", "static"]))
    seg, extra = draw(SEGMENTS), draw(EXTRA_QUERY)
    query = f"?{extra[1:]}" if extra else ""
    if kind == "task":  # ids naming other keys (the recent index, workers), malformed or unknown ones alike: 404
        return Req("GET", f"/api/tasks/{draw(st.sampled_from(KEY_NAMES) | SEGMENTS)}{query}", expect={404})
    if kind == "list":  # a plain integer limit: 200 in 1..1000, else 400; an odd one: either
        path = draw(st.sampled_from(["/api/tasks", "/api/dlq"]))
        if not draw(st.integers(0, 7)):
            return Req("GET", path + query)
        if draw(st.booleans()):
            limit = draw(st.integers(-5, 1100))
            ok = 1 <= limit <= asyncnode.MAX_LIST_LIMIT
            return Req("GET", f"{path}?limit={limit}{extra}", expect=search_expect(path, extra, 200 if ok else 400))
        limit_text = draw(st.sampled_from(ODD_LIMITS) | quoted(10))
        return Req("GET", f"{path}?limit={limit_text}{extra}", expect={200, 400})
    if kind == "requeue":
        return Req("POST", f"/api/dlq/{seg}/requeue", expect={404})
    if kind == "discard":
        return Req("DELETE", f"/api/dlq/{seg}", expect={404, 405})
    if kind == "info":
        return Req("GET", draw(st.sampled_from(["/api/workers", "/api/task-types"])) + query, expect={200})
    if kind == "method":  # a method the resource does not take: 405 (404 if the segment makes the path unroutable)
        method = draw(st.sampled_from(["PUT", "PATCH", "DELETE", "OPTIONS"]))
        path = draw(st.sampled_from(["/api/tasks", "/api/workers", "/api/task-types", "/api/dlq", f"/api/tasks/{seg}"]))
        expect = {404, 405} if path.startswith("/api/tasks/") else {405}
        return Req(method, path, draw(st.none() | st.just(VALID_BODY)), JSON_CT, expect)
    if kind == "static":  # outside /api/: any status below 500; a name too long for the file system: 404
        if draw(st.booleans()):
            return Req("GET", "/static/" + draw(LONG_NAMES), expect={404})
        return Req("GET", f"/static/{seg}")
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))
    tail = draw(st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join).filter(lambda t: len(t) <= 6000))
    first = unquote(tail.split("/")[0])
    known = not first or first in ("tasks", "task-types", "workers", "dlq")
    return Req(method, f"/api/{tail}", expect=None if known else {404})


# --- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def backend(services: None) -> str:
    """The audit reads Redis keys and RabbitMQ queues directly: this module runs on RabbitMQ and Redis only."""
    return "rabbitmq"


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary() -> Iterator[None]:
    """Print what the module sent (visible with -s)."""
    yield
    print(f"\n[fuzz] {dict(sorted(STATS.items()))}")


@pytest.fixture
async def audit(cfg: asyncnode.Config) -> AsyncIterator[Audit]:
    """The test's view of Redis and RabbitMQ, after declaring the queues (so they can be counted from the start)
    and seeding them: a task (so the recent index exists), a live worker and two dead letters, one not an envelope."""
    state = asyncnode.RedisStore(cfg.redis)
    connection = await aio_pika.connect(cfg.broker.url, timeout=SERVICE_TIMEOUT)
    try:
        channel = await connection.channel()
        await asyncnode.declare_queues(channel, cfg.broker)  # the same arguments the API declares them with
        await state.apply(asyncnode.plan_change("submitted", asyncnode.new_task_id(), "noop", {}, tasks=cfg.tasks))
        await state.beat("fuzz-host:4242", {"id": "fuzz-host:4242", "host": "fuzz-host", "pid": 4242}, ttl=600)
        envelope = asyncnode.Envelope(str(uuid.uuid4()), "reverse", {"text": "dead"})
        for message in [  # confirmed publishes: counted from the first snapshot on
            aio_pika.Message(envelope.encode(), message_id=envelope.id, headers={"x-error": "boom", "x-attempts": 4}),
            aio_pika.Message(b"\xff not an envelope", message_id="fuzz-garbage-letter"),
        ]:
            await channel.default_exchange.publish(message, routing_key=cfg.broker.queue + asyncnode.DLQ_SUFFIX)
        yield Audit(cfg, state.client, channel)
        # conftest's cleanup deletes the work queue and the DLQ, not the retry queues declare_queues made.
        for delay in sorted(set(cfg.broker.retry_delays)):
            await channel.queue_delete(asyncnode.retry_queue_name(cfg.broker, delay))
    finally:
        await connection.close()
        await state.close()


@pytest.fixture
async def senders(cfg: asyncnode.Config, aiohttp_client: Callable[..., Awaitable[Any]]) -> dict[str, Send]:
    """The test's API through aiohttp's client ("open") and a bare socket ("raw"), and the same API with
    ``[api] token`` set ("token", a bare socket); one key prefix and queue."""
    assert dataclasses.replace(cfg.api, host="", port=0) == dataclasses.replace(ORACLE_CFG.api, host="", port=0)
    assert (cfg.smtp, cfg.broker.task_timeout) == (ORACLE_CFG.smtp, TASK_TIMEOUT)
    api = await aiohttp_client(asyncnode.make_app(cfg), timeout=HTTP_TIMEOUT)
    token_cfg = dataclasses.replace(cfg, api=dataclasses.replace(cfg.api, token=TOKEN))
    token_api = await aiohttp_client(asyncnode.make_app(token_cfg), timeout=HTTP_TIMEOUT)
    return {
        "open": http_sender(api.session, f"http://{api.host}:{api.port}"),
        "raw": raw_sender(api.host, api.port),
        "token": raw_sender(token_api.host, token_api.port),
    }


@pytest.fixture
async def api_process(procs: Callable[..., Proc], config_file: Path, cfg: asyncnode.Config) -> AsyncIterator[Any]:
    """A real ``asyncnode.py api`` on the test's config, answering /healthz, and a sender to it."""
    proc = procs("api", config_file)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        send = http_sender(session, f"http://127.0.0.1:{cfg.api.port}")

        async def up() -> bool:
            assert proc.popen.poll() is None, f"the API exited with {proc.popen.returncode}:\n{proc.log()}"
            with contextlib.suppress(aiohttp.ClientError):
                return (await send(Req("GET", "/healthz"))).status == 200
            return False

        await wait_for(up, 30, "the API process to answer /healthz")
        yield proc, send


# --- the tests --------------------------------------------------------------------------------------------------------
@fuzz(35)
@given(batch=batches(near_valid_submissions(), 40))
async def test_fuzz_near_valid_bodies(senders: dict[str, Send], audit: Audit, batch: list[Req]) -> None:
    await send_batch(senders, audit, batch)


@fuzz(45)
@given(batch=batches(body_submissions(), 30))
async def test_fuzz_any_bodies(senders: dict[str, Send], audit: Audit, batch: list[Req]) -> None:
    await send_batch(senders, audit, batch)


@fuzz(35)
@given(batch=batches(header_requests(), 30))
async def test_fuzz_header_bytes(senders: dict[str, Send], audit: Audit, batch: list[Req]) -> None:
    await send_batch(senders, audit, batch)


@fuzz(35)
@given(batch=batches(endpoint_requests(), 40))
async def test_fuzz_endpoints(senders: dict[str, Send], audit: Audit, batch: list[Req]) -> None:
    await send_batch(senders, audit, batch)


@fuzz(20)
@given(batch=batches(st.one_of(near_valid_submissions(), body_submissions(), endpoint_requests()), 30))
async def test_fuzz_real_process_survives(api_process: tuple[Proc, Send], audit: Audit, batch: list[Req]) -> None:
    proc, send = api_process
    seen = len(proc.log())  # only this batch's lines count: an earlier failure must not blame this batch

    async def alive() -> None:
        assert proc.popen.poll() is None, f"the API exited with {proc.popen.returncode}:\n{proc.log()[-4000:]}"
        log = proc.log()[seen:]
        assert "Traceback" not in log and " ERROR " not in log, f"the API logged an error:\n{log[-4000:]}"

    await send_batch({"open": send}, audit, batch, alive)


SURROGATE_BODY = b'{"type": "reverse", "payload": {"text": "\\ud800"}}'  # a lone surrogate, escaped in JSON
FIXED_500S = {  # minimal examples of the 500s the fuzzing found: (request, part of the error text it gets now)
    "deeply-nested-json": (Req("POST", "/api/tasks", b"[" * 100_000, JSON_CT, {400}), "body is nested too deeply"),
    "lone-surrogate": (Req("POST", "/api/tasks", SURROGATE_BODY, JSON_CT, {400}), "payload.text is not valid Unicode"),
    "non-utf8-token": (
        Req("GET", "/api/workers", None, (("Authorization", "Bearer \xff"),), {401}, "token"),
        "wrong token",
    ),
    "id-of-recent-index": (Req("GET", "/api/tasks/~recent", expect={404}), "no task with id"),
    "id-of-worker-key": (Req("GET", "/api/tasks/~workers:fuzz-host:4242", expect={404}), "no task with id"),
    "static-name-too-long": (Req("GET", "/static/" + "a" * 256, expect={404}), "not found"),
}


@pytest.mark.parametrize("case", FIXED_500S)
async def test_fixed_500(senders: dict[str, Send], audit: Audit, case: str) -> None:
    """A 4xx JSON error naming the problem, nothing written, and the server still answers."""
    req, error = FIXED_500S[case]
    [answer] = await send_batch(senders, audit, [req])
    assert error in json.loads(answer.body)["error"], answer
