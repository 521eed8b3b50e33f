"""Two instances as two hosts: each ``up`` in its own network namespace, with its own address.

``api-1`` (the API) and ``worker-1`` (two worker processes) run under ``ip netns exec``
in two namespaces made for this test, each joined to the host by a veth pair with its
own subnet and no route anywhere else: the two cannot reach each other, and their
own 127.0.0.1 has no RabbitMQ or Redis.  As separate hosts would, each gets the broker
and Redis from ``RABBIT_URL``/``REDIS_URL``: addresses on its host-side veth, where a
TCP forwarder in this process relays to the shared services on the host's loopback
(so RabbitMQ sees a loopback peer and ``guest`` may log in).  The test then submits
tasks over HTTP to the API's namespace address and checks that the other namespace's
workers ran them.

A second test runs named queues across such hosts: ``api-1`` (the API and a worker of the
default queue) and ``mail-1`` (two workers of the mail queue, ``reverse`` routed there), each
also in a UTS namespace under its instance's name, so that the host part of a task's
``worker`` ("host:pid") names the host it ran on, and checks that every task ran on the
host serving its queue.

Needs root and a working ``ip netns`` (the second test ``unshare --uts`` too); skipped
with the reason otherwise, except in CI (``tests.conftest.in_ci``), where that is a
failure like any missing service.  Every wait is bounded; namespaces, veths and the
forwarder are removed even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Up, cleanup, free_port, pid_alive, skip_or_fail, wait_for, write_config

RABBIT_PORT = 5672
REDIS_PORT = 6379
TASKS = 20


# --------------------------------------------------------------------------
# Namespaces
# --------------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise with its stderr when it fails and ``check`` is set."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip() or f'exit status {result.returncode}'}")
    return result


def netns_missing() -> str | None:
    """Why this machine cannot run the test (one line), or None when it can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"an-{uuid.uuid4().hex[:6]}-probe"
    try:
        ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    try:
        ip("link", "add", f"{probe[:9]}-h", "type", "veth", "peer", "name", f"{probe[:9]}-n", "netns", probe)
        ip("netns", "exec", probe, "ip", "link", "set", "lo", "up")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot use a network namespace: {e}"
    finally:
        ip("netns", "del", probe, check=False)  # takes the veth pair with it
    return None


#: The operator token of the API, which listens on every address of its namespace.
TOKEN = "netns-test-token"


@pytest.fixture(scope="module", autouse=True)
def netns_usable(services: None) -> None:
    """Skip the module, with the reason, where namespaces (or the services) are not available; fail it in CI."""
    reason = netns_missing()
    if reason:
        skip_or_fail(reason)


@dataclass(frozen=True)
class Host:
    """One namespace joined to the host by a veth pair: ``host_addr`` on our side, ``addr`` inside."""

    ns: str
    veth: str
    host_addr: str
    addr: str


def free_subnet_octet() -> int:
    """A second octet R such that nothing on this machine uses 10.R.0.0/16 yet."""
    listing = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    used = {int(r) for r in re.findall(r"(?<![\d.])10\.(\d+)\.", listing)}
    candidates = [r for r in range(16, 250) if r not in used]
    assert candidates, "no free 10.R.0.0/16 range on this machine"
    return random.choice(candidates)


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    """Two namespaces ("api" and "worker"), each on its own /30; all deleted afterwards."""
    suffix = uuid.uuid4().hex[:6]
    octet = free_subnet_octet()
    made: list[Host] = []
    try:
        for i, role in enumerate(("api", "wrk"), start=1):
            host = Host(f"an-{suffix}-{role}", f"an{suffix}{role[0]}h", f"10.{octet}.{i}.1", f"10.{octet}.{i}.2")
            ip("netns", "add", host.ns)
            made.append(host)
            ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            ip("addr", "add", f"{host.host_addr}/30", "dev", host.veth)
            ip("link", "set", host.veth, "up")
            ip("-n", host.ns, "addr", "add", f"{host.addr}/30", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            ip("-n", host.ns, "link", "set", "lo", "up")
        yield {"api": made[0], "worker": made[1]}
    finally:
        for host in made:
            ip("link", "del", host.veth, check=False)  # gone already if the namespace went first
            ip("netns", "del", host.ns, check=False)
        namespaces = ip("netns", "list").stdout
        left = [h.ns for h in made if h.ns in namespaces]
        left += [h.veth for h in made if ip("link", "show", "dev", h.veth, check=False).returncode == 0]
        assert not left, f"namespaces or veths left behind: {left}"


# --------------------------------------------------------------------------
# Forwarder: host-side veth address -> the services on 127.0.0.1
# --------------------------------------------------------------------------


class Forwarder:
    """TCP relays from addresses of this host to ports on 127.0.0.1, on an event loop of
    their own in a thread, so they keep relaying while the test's loop is blocked (a
    synchronous ``Up.stop`` while workers close their connections, fixture teardown)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="netns-forwarder", daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.relayed: Counter[tuple[str, int]] = Counter()  # connections relayed, by (listen address, target port)

    def forward(self, host: str, target_port: int) -> int:
        """Listen on ``host`` (a free port) and relay each connection to 127.0.0.1:``target_port``."""
        return asyncio.run_coroutine_threadsafe(self._listen(host, target_port), self.loop).result(10)

    async def _listen(self, host: str, target_port: int) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay(reader, writer, (host, target_port))

        server = await asyncio.start_server(handle, host, 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: tuple[str, int]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", key[1]), 10)
            writers.append(up_writer)
            self.relayed[key] += 1
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, TimeoutError):
            pass  # the service refused or did not answer: drop the client's connection, as the service would
        finally:
            for w in writers:
                w.close()
            self.connections.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()  # the other direction then reads EOF and ends too

    async def _close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()

    def close(self) -> None:
        """Stop listening, cut every relayed connection and stop the thread."""
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            assert not self.thread.is_alive(), "forwarder thread did not stop"
            self.loop.close()


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder()
    try:
        yield fwd
    finally:
        fwd.close()


@pytest.fixture
async def netns_config(tag: str, tmp_path: Path) -> AsyncIterator[Callable[..., tuple[Path, int]]]:
    """Write the config of this test's instances (on the shared RabbitMQ and Redis) and return it with
    the API port; the test's queues and keys are deleted afterwards."""
    port = free_port()

    def make(**sections: Any) -> tuple[Path, int]:
        path = write_config(
            tmp_path / "config.toml",
            tag,
            api={"host": "0.0.0.0", "port": port, "token": TOKEN},  # beyond loopback: protected mode wants a token
            worker={"heartbeat": 0.5},
            **sections,
        )
        return path, port

    try:
        yield make
    finally:
        await cleanup(tag)


def service_env(fwd: Forwarder, host: Host) -> dict[str, str]:
    """What a host's environment says: RabbitMQ and Redis at its own host-side address."""
    rabbit = fwd.forward(host.host_addr, RABBIT_PORT)
    redis = fwd.forward(host.host_addr, REDIS_PORT)
    return {
        "RABBIT_URL": f"amqp://guest:guest@{host.host_addr}:{rabbit}/",
        "REDIS_URL": f"redis://{host.host_addr}:{redis}/0",
    }


def uts_missing() -> str | None:
    """Why a host cannot be given a hostname of its own here (one line), or None when it can."""
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    try:
        result = subprocess.run(
            ["unshare", "--uts", "hostname", "an-probe"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot make a UTS namespace: {e}"
    if result.returncode != 0:
        return f"cannot make a UTS namespace: {result.stderr.strip() or f'exit status {result.returncode}'}"
    return None


def up_on(
    ups: Callable[..., Up],
    fwd: Forwarder,
    host: Host,
    config: Path,
    run_dir: Path,
    instance: str,
    hostname: str | None = None,
) -> Up:
    """``up --instance INSTANCE`` in ``host``'s namespace, reaching the services through its own relays; with
    ``hostname``, also in a UTS namespace of its own under that name (what ``socket.gethostname()`` says there)."""
    prefix = ["ip", "netns", "exec", host.ns]
    if hostname:
        prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    return ups(config, run_dir, instance, env=service_env(fwd, host), prefix=prefix)


class Api:
    """The API in its namespace, over HTTP with the operator token; failures show the hosts' logs."""

    def __init__(self, session: aiohttp.ClientSession, base: str, hosts: list[Up]) -> None:
        self.session = session
        self.base = base
        self.hosts = hosts

    def logs(self) -> str:
        return "\n".join(up.log() for up in self.hosts)

    async def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """wait_for, failing with every host's log."""
        try:
            return await wait_for(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path) as r:
            assert r.status == 200, (path, r.status, await r.text())
            return await r.json()

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(self.base + "/readyz") as r:
                    return r.status == 200
            return False

        await self.wait(ready, 20, f"GET {self.base}/readyz to answer 200")

    async def wait_workers(self, count: int) -> list[dict[str, Any]]:
        """The live workers, once there are ``count`` of them."""

        async def live_workers() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = (await self.get("/api/workers"))["items"]
            return items if len(items) == count else None

        workers: list[dict[str, Any]] = await self.wait(live_workers, 20, f"{count} live workers in GET /api/workers")
        return workers

    async def submit(self, body: dict[str, Any]) -> str:
        async with self.session.post(self.base + "/api/tasks", json=body) as r:
            assert r.status == 202, (r.status, await r.text())
            tid: str = (await r.json())["id"]
        return tid

    async def wait_finished(self, ids: list[str], timeout: float = 30) -> dict[str, dict[str, Any]]:
        """The records of ``ids`` once every one is completed, failed or rejected."""
        records: dict[str, dict[str, Any]] = {}

        async def fetch(tid: str) -> None:
            rec = await self.get(f"/api/tasks/{tid}")
            if rec["status"] in ("completed", "failed", "rejected"):
                records[tid] = rec

        async def all_done() -> bool:
            await asyncio.gather(*(fetch(tid) for tid in ids if tid not in records))
            return len(records) == len(ids)

        await self.wait(all_done, timeout, f"all {len(ids)} tasks to finish ({len(records)} did)")
        return records


async def stop_hosts(*hosts: Up) -> None:
    """Stop each ``up`` in turn (the relays keep running meanwhile): each exits 0 and leaves no child."""
    children = set().union(*(up.children for up in hosts))
    assert children
    codes = [await asyncio.to_thread(up.stop) for up in hosts]
    assert codes == [0] * len(hosts), (codes, *(up.log() for up in hosts))
    alive = sorted(pid for pid in children if pid_alive(pid))
    assert not alive, f"children still running after stop: {alive}"


def ran_on(rec: dict[str, Any]) -> tuple[str, int]:
    """(host, pid) of the worker that ran a task, from its ``worker`` field "host:pid"."""
    host, _, pid = rec["worker"].rpartition(":")
    return host, int(pid)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


async def test_two_instances_in_separate_network_namespaces(
    netns_config: Callable[..., tuple[Path, int]],
    hosts: dict[str, Host],
    forwarder: Forwarder,
    ups: Callable[..., Up],
    tmp_path: Path,
) -> None:
    config, port = netns_config(
        instances={
            "api-1": {"roles": ["api"], "host": "api-1"},
            "worker-1": {"roles": ["worker"], "processes": 2, "host": "worker-1"},
        },
    )
    api_host, wrk_host = hosts["api"], hosts["worker"]
    api = up_on(ups, forwarder, api_host, config, tmp_path / "run-api-1", "api-1")
    wrk = up_on(ups, forwarder, wrk_host, config, tmp_path / "run-worker-1", "worker-1")
    await api.wait_running({"api"})
    worker_infos = await wrk.wait_running({"worker_00", "worker_01"})
    worker_pids = {info["pid"] for info in worker_infos.values()}
    assert len(worker_pids) == 2 and all(worker_pids), worker_infos

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        client = Api(session, f"http://{api_host.addr}:{port}", [api, wrk])
        await client.wait_ready()
        workers = await client.wait_workers(2)
        assert {w["instance"] for w in workers} == {"worker-1"}, workers
        assert {w["pid"] for w in workers} == worker_pids, (workers, worker_pids)

        texts = [f"netns task {i} {uuid.uuid4().hex[:8]}" for i in range(TASKS)]
        ids = await asyncio.gather(*(client.submit({"type": "reverse", "payload": {"text": t}}) for t in texts))
        assert len(set(ids)) == TASKS
        records = await client.wait_finished(ids)

    for tid, text in zip(ids, texts, strict=True):
        rec = records[tid]
        assert rec["status"] == "completed" and rec["result"] == text[::-1], rec
        assert ran_on(rec)[1] in worker_pids, (rec["worker"], worker_pids)
    # Each namespace reached RabbitMQ and Redis through its own relays (its 127.0.0.1 has neither).
    expected = {(h.host_addr, p) for h in (api_host, wrk_host) for p in (RABBIT_PORT, REDIS_PORT)}
    assert set(forwarder.relayed) == expected, forwarder.relayed
    await stop_hosts(wrk, api)


async def test_mail_tasks_run_on_the_mail_host_and_default_tasks_on_the_other(
    netns_config: Callable[..., tuple[Path, int]],
    hosts: dict[str, Host],
    forwarder: Forwarder,
    ups: Callable[..., Up],
    tmp_path: Path,
) -> None:
    reason = uts_missing()
    if reason:
        skip_or_fail(reason)
    # Two hosts, each with a hostname of its own (the host part of a task's "worker"): api-1 runs the API
    # and one worker of the default queue, mail-1 two workers of the mail queue; reverse is routed to mail.
    config, port = netns_config(
        queues={"mail": {}},
        routes={"reverse": "mail"},
        instances={
            "api-1": {"roles": ["api", "worker"], "queues": ["default"], "processes": 1, "host": "api-1"},
            "mail-1": {"roles": ["worker"], "queues": ["mail"], "processes": 2, "host": "mail-1"},
        },
    )
    api_host, mail_host = hosts["api"], hosts["worker"]
    api = up_on(ups, forwarder, api_host, config, tmp_path / "run-api-1", "api-1", hostname="api-1")
    mail = up_on(ups, forwarder, mail_host, config, tmp_path / "run-mail-1", "mail-1", hostname="mail-1")
    api_infos = await api.wait_running({"api", "worker_00"})
    mail_infos = await mail.wait_running({"worker_00", "worker_01"})
    pids = {"default": {api_infos["worker_00"]["pid"]}, "mail": {p["pid"] for p in mail_infos.values()}}
    assert len(pids["default"] | pids["mail"]) == 3 and all(pids["default"] | pids["mail"]), (api_infos, mail_infos)
    hostname = {"default": "api-1", "mail": "mail-1"}

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        client = Api(session, f"http://{api_host.addr}:{port}", [api, mail])
        await client.wait_ready()
        workers = await client.wait_workers(3)
        seen = {(w["host"], w["instance"], tuple(w["queues"]), w["pid"]) for w in workers}
        assert seen == {
            *(("api-1", "api-1", ("default",), pid) for pid in pids["default"]),
            *(("mail-1", "mail-1", ("mail",), pid) for pid in pids["mail"]),
        }, workers

        async def one_and_two_consumers() -> bool:
            items = (await client.get("/api/queues"))["items"]
            return {q["name"]: q["consumers"] for q in items} == {"default": 1, "mail": 2}

        await client.wait(one_and_two_consumers, 10, "GET /api/queues to count 1 default and 2 mail consumers")

        texts = [f"netns mail {i} {uuid.uuid4().hex[:8]}" for i in range(TASKS)]
        bodies: list[dict[str, Any]] = [
            *({"type": "reverse", "payload": {"text": t}} for t in texts),
            *({"type": "sleep", "payload": {"seconds": 0.01}} for _ in range(TASKS)),
        ]
        random.shuffle(bodies)  # the two queues' tasks interleaved
        ids = await asyncio.gather(*(client.submit(body) for body in bodies))
        assert len(set(ids)) == 2 * TASKS
        records = await client.wait_finished(ids)

    by_queue: dict[str, list[dict[str, Any]]] = {"default": [], "mail": []}
    for tid, body in zip(ids, bodies, strict=True):
        rec = records[tid]
        assert rec["status"] == "completed", rec
        queue = "mail" if body["type"] == "reverse" else "default"
        assert rec["queue"] == queue, rec
        if queue == "mail":
            assert rec["result"] == body["payload"]["text"][::-1], rec
        by_queue[queue].append(rec)
    for queue, recs in by_queue.items():
        assert len(recs) == TASKS
        allowed = {(hostname[queue], pid) for pid in pids[queue]}
        wrong = [(r["id"], r["worker"]) for r in recs if ran_on(r) not in allowed]
        assert not wrong, f"{queue} tasks not run on {hostname[queue]} (pids {sorted(pids[queue])}): {wrong}"
    expected = {(h.host_addr, p) for h in (api_host, mail_host) for p in (RABBIT_PORT, REDIS_PORT)}
    assert set(forwarder.relayed) == expected, forwarder.relayed
    await stop_hosts(mail, api)
