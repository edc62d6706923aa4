"""Which Redis Kairos runs on: a standalone one, or the primary of a Redis Cluster of one
shard. A node of a cluster of several shards answers MOVED for the keys it does not serve,
which the clients here do not follow: the worker took each such reply for a bad event and
sent the whole stream to the dead letters. Every process now refuses it at start, with one
line that says why (store.check_topology)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from stream_engine.exceptions import ConfigError
from stream_engine.store import _shown, check_topology
from tests.conftest import Stack, free_port, listening

pytestmark = pytest.mark.integration


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A port whose cluster bus port (+10000) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 30_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise AssertionError("no free pair of ports for a cluster node")


def _start_node(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(tmp), "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{port}.conf"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if listening(port):
        return proc
    proc.kill()
    raise AssertionError(f"redis-server in cluster mode did not start on {port}")


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[int]]:
    """Cluster nodes, one per shard (`request.param` of them), the slots split evenly."""
    shards: int = request.param
    ports = [_cluster_port() for _ in range(shards)]
    procs = [_start_node(tmp_path, port) for port in ports]
    try:
        clients = [redis.Redis(port=port) for port in ports]
        share = 16384 // shards
        for k, client in enumerate(clients):
            last = 16383 if k == shards - 1 else (k + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", k * share, last)  # type: ignore[no-untyped-call]
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 20
        while clients[0].execute_command("CLUSTER INFO").get("cluster_state") != "ok":  # type: ignore[no-untyped-call]
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.1)
        for client in clients:
            client.close()
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def test_a_password_is_never_shown() -> None:
    assert _shown("redis://:s3cret@db:6379/0") == "redis://***@db:6379/0"
    assert _shown("rediss://kairos:s3cret@db:6380/1") == "rediss://kairos:***@db:6380/1"
    assert _shown("redis://db:6379/0") == "redis://db:6379/0"


def test_a_standalone_redis_and_one_that_does_not_answer_pass(stack: Stack) -> None:
    check_topology(stack.redis_url)
    check_topology(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)  # an outage, not this


@pytest.mark.parametrize("cluster", [1], indirect=True)
def test_the_primary_of_a_cluster_of_one_shard_passes_on_database_0_only(
    cluster: list[int],
) -> None:
    (port,) = cluster
    check_topology(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(ConfigError, match="database 3 of a Redis Cluster node"):
        check_topology(f"redis://127.0.0.1:{port}/3")


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_a_cluster_of_several_shards_is_refused_by_every_process(
    cluster: list[int], tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{cluster[0]}/0"
    with pytest.raises(ConfigError, match=r"serves 8192 of as a primary \(2 primaries"):
        check_topology(url)
    env = {**os.environ, "KAIROS_REDIS_URL": url, "KAIROS_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    for command in (["stream_engine", "worker"], ["stream_engine", "attribution"],
                    ["api"], ["api", "report"]):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", *command], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert "follows no MOVED redirection" in done.stderr, (command, done.stderr[-2000:])
