"""A failover behind an address that follows the primary (ElastiCache's primary endpoint,
a virtual IP, a proxy): connections opened before it still reach the old primary, now a
replica that answers every write with READONLY. Kairos' connections drop on such a reply
and connect again, to the new primary; they used to stay, and the worker retried its
batch on the old primary for ever.

The address here is a unix socket path that is a symlink: repointed at the other server,
it sends new connections there and leaves open ones where they are, as a DNS name does.
Both servers are real redis-servers, the second a replica of the first until it takes over."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaProducer
from redis.exceptions import ReadOnlyError

from stream_engine.settings import Settings
from stream_engine.state import Keys
from stream_engine.store import Batches, Shared, connect
from stream_engine.topics import ensure_topics
from tests.conftest import (
    Stack,
    Views,
    free_port,
    redis_worker_env,
    spawn_group,
    stop_group,
    stop_servers,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@dataclass
class Pair:
    """Two redis-servers, `b` a replica of `a`, and the address clients use (`link`)."""

    link: Path
    socks: dict[str, Path]
    ports: dict[str, int]

    @property
    def url(self) -> str:
        return f"unix://{self.link}"

    def admin(self, name: str) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socks[name]), socket_timeout=5)

    def get(self, name: str, key: str) -> Any:
        with self.admin(name) as admin:
            return admin.get(key)

    def replication(self, name: str) -> Any:
        with self.admin(name) as admin:
            return admin.info("replication")

    def failover(self) -> None:
        """`b` caught up and promoted, `a` its replica, the address pointed at `b`: what
        Sentinel or a managed service does, with the old primary still up."""
        with self.admin("a") as a, self.admin("b") as b:
            assert a.wait(1, 5000) == 1, "the replica did not catch up"
            b.replicaof("NO", "ONE")
            a.replicaof("127.0.0.1", self.ports["b"])
        moved = self.link.with_suffix(".new")
        moved.symlink_to(self.socks["b"])
        os.replace(moved, self.link)


def _start(name: str, port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--dbfilename", f"{name}.rdb",
         "--unixsocket", str(workdir / f"{name}.sock"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def pair() -> Iterator[Pair]:
    # a short directory: a unix socket's path is limited to 107 bytes
    workdir = Path(tempfile.mkdtemp(prefix="kfo"))
    ports = {"a": free_port(), "b": free_port()}
    socks = {name: workdir / f"{name}.sock" for name in ports}
    procs = [_start("a", ports["a"], workdir)]
    try:
        procs.append(_start("b", ports["b"], workdir, "--replicaof", "127.0.0.1", str(ports["a"])))
        link = workdir / "primary.sock"
        link.symlink_to(socks["a"])
        p = Pair(link, socks, ports)
        deadline = time.monotonic() + 15
        while True:
            try:
                if p.replication("b")["master_link_status"] == "up":
                    break
            except (redis.ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "the replica did not connect to its primary"
            time.sleep(0.05)
        yield p
    finally:
        stop_servers(procs, workdir)


async def test_each_connection_reaches_the_new_primary_after_at_most_one_refusal(
    pair: Pair,
) -> None:
    """Batches (the worker's writes) and Shared (the API's reads) get one READONLY at most,
    then write to the new primary; redis-py's commands and pipelines (erasure, the catalog
    mirror, attribution) do not see it at all. Before, every later write got READONLY."""
    client = connect(pair.url)
    batches, shared = Batches(client), Shared(client)
    try:
        await batches.execute([("SET", "k", "before")])
        await shared.execute([("SET", "k", "before")], 5)
        await client.set("k", "before")
        pair.failover()

        first = await batches.execute([("SET", "k", "batches")])
        assert first == [b"OK"] or isinstance(first[0], ReadOnlyError)
        assert await batches.execute([("SET", "k", "batches")]) == [b"OK"]
        assert pair.get("b", "k") == b"batches"

        first = await shared.execute([("SET", "k", "shared")], 5)
        assert first == [b"OK"] or isinstance(first[0], ReadOnlyError)
        assert await shared.execute([("SET", "k", "shared")], 5) == [b"OK"]
        assert pair.get("b", "k") == b"shared"

        assert await client.set("k", "redis-py") is True  # retried on a new connection
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("k", "pipeline")
            pipe.get("k")
            assert await pipe.execute() == [True, b"pipeline"]
        assert pair.get("b", "k") == b"pipeline"
        assert pair.replication("a")["role"] == "slave"  # still up, read-only
    finally:
        await batches.aclose()
        await shared.aclose()
        await client.aclose()


async def test_a_worker_applies_every_event_once_across_a_failover(
    pair: Pair, stack: Stack, unique: str, key_prefix: str, tmp_path: Path
) -> None:
    """Events before the failover land on the old primary and reach the new one by
    replication; events after it land on the new one: none lost, none applied twice. The
    worker's scripts are not on the new primary (a script cache is not replicated), so
    this also takes it through loading them again."""
    env = redis_worker_env(stack, unique, key_prefix, tmp_path, pair.url)
    await ensure_topics(Settings.from_env(env))
    worker = spawn_group([sys.executable, "-m", "stream_engine", "worker"], env,
                         tmp_path / "worker.log")  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=0)
    await producer.start()
    sessions = [f"fo-s{i}" for i in range(5)]
    views = Views(producer, env["KAIROS_CLICKSTREAM_TOPIC"], sessions)
    keys = Keys(key_prefix)

    def counts(server: str) -> list[Any]:
        with pair.admin(server) as admin:
            return [admin.hget(keys.session(sid), "n") for sid in sessions]

    try:
        await views.send(3)
        await wait_for(lambda: counts("a") == [b"3"] * 5, 60, "three events a session applied")
        pair.failover()
        await views.send(3)
        await wait_for(lambda: counts("b") == [b"6"] * 5, 30, "the next three on the new primary")
        await views.send(1)  # and the worker stays there
        await wait_for(lambda: counts("b") == [b"7"] * 5, 30, "one more on the new primary")
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        await producer.stop()
        stop_group(worker)
