"""Redis over TLS (`rediss://`) and over a unix socket (`unix://`): Kairos' own
connections (store.Shared, Batches, psubscribe: the API's reads, the worker's writes, the
bench's visibility) reach the server the URL names, the way redis-py's do, and the worker
runs end to end on a TLS Redis. They used to take host and port alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from stream_engine.demo_catalog import generate
from stream_engine.settings import Settings
from stream_engine.state import Keys
from stream_engine.store import Batches, Shared, connect, psubscribe
from stream_engine.topics import ensure_topics
from tests.conftest import (
    Stack,
    Tls,
    free_port,
    listening,
    redis_worker_env,
    spawn_group,
    stop_group,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PASSWORD = "transport-secret"


def _server(argv: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--dir", str(workdir),
         "--requirepass", PASSWORD, "--notify-keyspace-events", "Kh", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path, tls: Tls) -> Iterator[str]:
    """A redis-server that takes TLS only (no plaintext port), with a password."""
    port = free_port()
    argv = ["--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]  # fmt: skip
    proc = _server(argv, tmp_path)
    try:
        assert listening(port), "the TLS redis-server did not start"
        yield f"rediss://:{PASSWORD}@127.0.0.1:{port}/3?ssl_ca_certs={tls.ca}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server on a unix socket only (no TCP port)."""
    sock = tmp_path / "redis.sock"
    proc = _server(["--port", "0", "--unixsocket", str(sock)], tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "the unix-socket redis-server did not start"
        yield f"unix://{sock}?db=3&password={PASSWORD}"
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return orjson.loads(r.read())


@pytest.mark.parametrize("transport", ["tls_redis", "unix_redis"])
async def test_shared_batches_and_psubscribe_reach_the_server_the_url_names(
    transport: str, request: pytest.FixtureRequest
) -> None:
    """The stack's Redis on 127.0.0.1:6379 is up meanwhile: a unix URL read as host and
    port reached it instead, and read None for the key written here."""
    url = request.getfixturevalue(transport)
    client = connect(url)
    shared, batches = Shared(client), Batches(client)
    seen: list[bytes] = []
    subscription = await psubscribe(
        client, ["__keyspace@3__:transport-*"], lambda c, m: seen.append(c)
    )
    try:
        await client.set("transport-key", url)
        assert await shared.execute([("GET", "transport-key")], 5) == [url.encode()]
        assert await batches.execute([("HSET", "transport-hash", "f", "1"), ("DBSIZE",)]) == [1, 2]
        assert await client.hget("transport-hash", "f") == b"1"  # redis-py sees it: same db
        await wait_for(lambda: b"__keyspace@3__:transport-hash" in seen, 5, "the notification")
    finally:
        subscription.close()
        await shared.aclose()
        await batches.aclose()
        await client.aclose()


async def test_a_worker_and_an_api_on_a_tls_redis_personalize(
    tls_redis: str, stack: Stack, unique: str, key_prefix: str, tmp_path: Path
) -> None:
    """The worker's writes (Batches), its reads back (Shared) and its scripts, then the
    API's state read (Shared) and its background reads, all over TLS, with AUTH and SELECT
    on every connection they open."""
    api_port = free_port()
    env = redis_worker_env(stack, unique, key_prefix, tmp_path, tls_redis,
                           KAIROS_ENGINE="aiokafka", KAIROS_API_PORT=str(api_port))  # fmt: skip
    await ensure_topics(Settings.from_env(env))
    worker = spawn_group([sys.executable, "-m", "stream_engine", "worker"], env,
                         tmp_path / "worker.log")  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=0)
    await producer.start()
    client = connect(tls_redis)
    try:
        items = [it.item_id for it in generate(100)]
        for n in range(4):
            body = {"event_id": f"t{n}", "type": "view", "session_id": "tls-s1",
                    "ts": int(time.time() * 1000), "item_id": items[n]}  # fmt: skip
            await producer.send_and_wait(env["KAIROS_CLICKSTREAM_TOPIC"], orjson.dumps(body),
                                         key=b"tls-s1")  # fmt: skip
        session = Keys(key_prefix).session("tls-s1")

        async def applied() -> bool:
            return await client.hget(session, "n") == b"4"

        await wait_for(applied, 60, "four events applied in the TLS Redis")
        api = spawn_group([sys.executable, "-m", "api"], env, tmp_path / "api.log")
        try:
            url = f"http://127.0.0.1:{api_port}"

            async def ready() -> bool:
                try:
                    return bool((await asyncio.to_thread(_get, f"{url}/readyz"))["redis"] == "ok")
                except OSError:
                    return False

            await wait_for(ready, 60, "the API ready on TLS Redis")
            answer = await asyncio.to_thread(_get, f"{url}/v1/slots/home_recs?session_id=tls-s1")
            assert (answer["strategy"], answer.get("fallback_reason")) == ("personalized", None)
        finally:
            stop_group(api)
    finally:
        await producer.stop()
        await client.aclose()
        stop_group(worker)
