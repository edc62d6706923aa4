"""Redis behind Sentinel (`redis+sentinel://host:26379/service`): every Kairos connection
asks the Sentinels where the primary is when it connects, and after a failover reaches the
new one. Before, no client here spoke to Sentinel: the URL had to name an address that
followed the primary. Real redis-servers: a primary, its replica and one Sentinel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaProducer

from stream_engine.exceptions import ConfigError
from stream_engine.settings import Settings
from stream_engine.state import Keys
from stream_engine.store import Batches, SentinelUrl, Shared, check_redis_url, connect
from stream_engine.topics import ensure_topics
from tests.conftest import (
    Stack,
    Tls,
    Views,
    free_port,
    listening,
    redis_worker_env,
    spawn_group,
    stop_group,
    stop_servers,
    wait_for,
)

SERVICE = "kairos-primary"
PASSWORD = "sentinel-secret"


def test_a_sentinel_url_is_read_whole() -> None:
    url = (f"redis+sentinel://app:{PASSWORD}@10.0.0.1,10.0.0.2:26380,[::1]:26381/{SERVICE}/2"
           "?sentinel_password=s3cret")  # fmt: skip
    assert SentinelUrl.parse(url) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)),
        service=SERVICE, db=2, username="app", password=PASSWORD,
        sentinel_password="s3cret",
    )  # fmt: skip
    assert SentinelUrl.parse("redis://127.0.0.1:6379/0") is None
    check_redis_url(url)
    tls = SentinelUrl.parse(f"rediss+sentinel://h1/{SERVICE}?ssl_ca_certs=/etc/ca.pem"
                            "&ssl_cert_reqs=Required&ssl_check_hostname=false")  # fmt: skip
    assert tls is not None
    assert tls.tls
    assert dict(tls.tls_options) == {"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required",
                                     "ssl_check_hostname": False}  # fmt: skip


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://127.0.0.1:26379", "no service name"),
        ("redis+sentinel://127.0.0.1:26379/", "no service name"),
        ("redis+sentinel://127.0.0.1:26379/svc/one", "the path must be /service[/db]"),
        ("redis+sentinel://127.0.0.1:port/svc", "a Sentinel must be host[:port]"),
        ("redis+sentinel://127.0.0.1,,h2/svc", "a Sentinel must be host[:port]"),
        ("redis+sentinel://h1/svc?sentinel_pasword=x", "unknown parameters sentinel_pasword"),
        (
            "redis+sentinel://h1/svc?ssl_ca_certs=/ca.pem",
            "unknown parameters ssl_ca_certs (known: sentinel_password, sentinel_username; "
            "rediss+sentinel:// takes TLS parameters)",
        ),
        (
            "rediss+sentinel://h1/svc?ssl_cert_reqs=maybe",
            "ssl_cert_reqs: 'maybe' is none of none, optional, required",
        ),
        ("rediss+sentinel://h1/svc?ssl_check_hostname=yes", "ssl_check_hostname: 'yes' is none"),
        ("rediss+sentinel://h1", "no service name: rediss+sentinel://"),
    ],
)
def test_a_sentinel_url_that_cannot_work_is_refused_with_why(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match="KAIROS_REDIS_URL") as refused:
        check_redis_url(url)
    assert says in str(refused.value)


@dataclass
class Sentineled:
    """A primary, its replica, and one Sentinel watching them (quorum 1); with `tls`, each
    listens for TLS only, the replica and the Sentinel reach the primary over TLS too."""

    ports: dict[str, int]
    sentinel_port: int
    tls: Tls | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return (f"rediss+sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel_port}/{SERVICE}"
                    f"?ssl_ca_certs={self.tls.ca}")  # fmt: skip
        return f"redis+sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel_port}/{SERVICE}"

    def ask(self, port: int, *command: Any) -> Any:
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        with redis.Redis(port=port, password=PASSWORD if port != self.sentinel_port else None,
                         socket_timeout=5, **tls) as client:  # fmt: skip
            return client.execute_command(*command)

    def primary(self) -> int:
        _, port = self.ask(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def role(self, port: int) -> str:
        return str(self.ask(port, "ROLE")[0], "ascii")

    def fail_over(self) -> int:
        """Sentinel promotes the replica and makes the old primary, still up, its replica;
        returns the new primary's port once the old one follows it."""
        old = self.primary()
        assert self.ask(old, "WAIT", 1, 5000) == 1, "the replica did not catch up"
        deadline = time.monotonic() + 60
        while True:  # NOGOODSLAVE until the Sentinel has the replica's INFO
            try:
                self.ask(self.sentinel_port, "SENTINEL", "FAILOVER", SERVICE)
                break
            except redis.ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        while self.primary() == old or self.role(old) != "slave":
            assert time.monotonic() < deadline, "Sentinel did not fail over"
            time.sleep(0.1)
        return self.primary()


@pytest.fixture
def sentineled() -> Iterator[Sentineled]:
    yield from _sentinel_set(None)


@pytest.fixture
def tls_sentineled(tls: Tls) -> Iterator[Sentineled]:
    yield from _sentinel_set(tls)


def _sentinel_set(tls: Tls | None) -> Iterator[Sentineled]:
    workdir = Path(tempfile.mkdtemp(prefix="ksn"))
    ports = {"a": free_port(), "b": free_port()}
    sentinel_port = free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
              "--requirepass", PASSWORD, "--masterauth", PASSWORD]  # fmt: skip
    listen = {p: ["--port", str(p)] for p in ports.values()}
    sentinel_listen = f"port {sentinel_port}\n"
    if tls is not None:  # TLS only, and the replica's and the Sentinel's links too
        files = {"tls-cert-file": tls.cert, "tls-key-file": tls.key, "tls-ca-cert-file": tls.ca,
                 "tls-auth-clients": "no", "tls-replication": "yes"}  # fmt: skip
        listen = {p: ["--port", "0", "--tls-port", str(p),
                      *(a for k, v in files.items() for a in (f"--{k}", str(v)))]
                  for p in ports.values()}  # fmt: skip
        sentinel_listen = f"port 0\ntls-port {sentinel_port}\n" + "".join(
            f"{k} {v}\n" for k, v in files.items()
        )
    conf = workdir / "sentinel.conf"  # Sentinel rewrites its file: one of its own
    conf.write_text(
        f"{sentinel_listen}bind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {ports['a']} 1\n"
        f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 5000\n"
    )
    argvs = [
        ["redis-server", *listen[ports["a"]], "--dbfilename", "a.rdb", *common],
        ["redis-server", *listen[ports["b"]], "--dbfilename", "b.rdb", *common,
         "--replicaof", "127.0.0.1", str(ports["a"])],
        ["redis-server", str(conf), "--sentinel"],
    ]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        s = Sentineled(ports, sentinel_port, tls)
        for argv, port in zip(argvs, (ports["a"], ports["b"], sentinel_port), strict=True):
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))  # fmt: skip
            assert listening(port), f"a redis-server of the Sentinel set did not start on {port}"
            deadline = time.monotonic() + 30
            # the Sentinel last, once the replica is linked: its first look at the primary
            # then lists the replica (the next is 10 s later)
            while port == ports["b"] and s.ask(port, "ROLE")[3] != b"connected":
                assert time.monotonic() < deadline, "the replica did not link to the primary"
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while not s.ask(sentinel_port, "SENTINEL", "REPLICAS", SERVICE):
            assert time.monotonic() < deadline, "Sentinel did not find the replica"
            time.sleep(0.1)
        yield s
    finally:
        stop_servers(procs, workdir)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["sentineled", "tls_sentineled"])
async def test_each_connection_follows_the_primary_sentinel_names(
    which: str, request: pytest.FixtureRequest
) -> None:
    """Batches (the worker's writes), Shared (the API's reads) and redis-py's pool connect to
    the primary the Sentinel names, and after a failover to the new one (Sentinel cuts the
    old primary's clients off: at most one error each). Over TLS too (`rediss+sentinel`,
    servers that listen for TLS only): no client here spoke TLS to a Sentinel-managed
    Redis before session 41."""
    sentineled: Sentineled = request.getfixturevalue(which)
    client = connect(sentineled.url)
    batches, shared = Batches(client), Shared(client)
    first = sentineled.primary()
    try:
        await batches.execute([("SET", "k", "batches")])
        await shared.execute([("SET", "k2", "shared")], 5)
        await client.set("k3", "redis-py")
        assert sentineled.ask(first, "MGET", "k", "k2", "k3") == [b"batches", b"shared",
                                                                   b"redis-py"]  # fmt: skip
        second = sentineled.fail_over()
        assert second != first

        async def retried(call: Any) -> Any:
            try:
                return await call()
            except (redis.ConnectionError, OSError):
                return await call()  # the connection the Sentinel cut, once

        replies = [
            await retried(lambda: batches.execute([("SET", "k", "after")])),
            await retried(lambda: shared.execute([("SET", "k2", "after")], 5)),
            await retried(lambda: client.set("k3", "after")),
        ]
        for reply in replies[:2]:
            if reply != [b"OK"]:  # a READONLY reply in place: that connection is retired
                assert isinstance(reply[0], redis.ReadOnlyError)
        assert await batches.execute([("SET", "k", "after")]) == [b"OK"]
        assert await shared.execute([("SET", "k2", "after")], 5) == [b"OK"]
        assert await client.set("k3", "after") is True
        assert sentineled.ask(second, "MGET", "k", "k2", "k3") == [b"after"] * 3
    finally:
        await batches.aclose()
        await shared.aclose()
        await client.aclose()


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_the_sentinel_pool_waits_for_a_free_connection(sentineled: Sentineled) -> None:
    """Like every Kairos pool (redis-py's own Sentinel pool raised "Too many connections")."""
    client = connect(sentineled.url, max_connections=1)
    try:
        replies = await asyncio.gather(*(client.incr("waited") for _ in range(5)))
        assert sorted(replies) == [1, 2, 3, 4, 5]
        assert len(client.connection_pool._in_use_connections) == 0
    finally:
        await client.aclose()


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_service_the_sentinels_do_not_know_is_an_outage(sentineled: Sentineled) -> None:
    """Waited for like a Redis that is down (a ConnectionError), never taken for another."""
    url = sentineled.url.replace(SERVICE, "no-such-service")
    client = connect(url)
    batches = Batches(client)
    try:
        with pytest.raises(redis.ConnectionError, match="no-such-service"):
            await client.ping()
        with pytest.raises(redis.ConnectionError):
            await batches.execute([("PING",)])
    finally:
        await batches.aclose()
        await client.aclose()


@pytest.mark.integration
@pytest.mark.timeout(180)
async def test_a_worker_and_an_api_on_sentinel_carry_on_across_a_failover(
    sentineled: Sentineled, stack: Stack, unique: str, key_prefix: str, tmp_path: Path
) -> None:
    """The worker applies events on the primary the Sentinel names, then on the new one
    after a failover, each once; the API answers personalized from either. Events keep
    coming during the failover: what the worker wrote to the old primary between the
    promotion and its demotion (seconds, with Sentinel) is lost with it, and the worker
    applies it again from Kafka (Ingest._refill)."""
    api_port = free_port()
    env = redis_worker_env(stack, unique, key_prefix, tmp_path, sentineled.url,
                           KAIROS_API_PORT=str(api_port))  # fmt: skip
    await ensure_topics(Settings.from_env(env))
    worker = spawn_group([sys.executable, "-m", "stream_engine", "worker"], env,
                         tmp_path / "worker.log")  # fmt: skip
    api = spawn_group([sys.executable, "-m", "api"], env, tmp_path / "api.log")
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, linger_ms=0)
    await producer.start()
    sessions = [f"sn-s{i}" for i in range(4)]
    views = Views(producer, env["KAIROS_CLICKSTREAM_TOPIC"], sessions)
    keys = Keys(key_prefix)

    def counts(port: int) -> list[Any]:
        return [sentineled.ask(port, "HGET", keys.session(sid), "n") for sid in sessions]

    def answer() -> Any:
        url = f"http://127.0.0.1:{api_port}/v1/slots/home_recs?session_id={sessions[0]}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return orjson.loads(r.read())

    def personalized() -> bool:
        try:
            return bool(answer()["strategy"] == "personalized")
        except OSError:
            return False

    try:
        first = sentineled.primary()
        await views.send(3)
        await wait_for(lambda: counts(first) == [b"3"] * 4, 60, "three events a session")
        await wait_for(personalized, 60, "the API personalized on the first primary")
        failing_over = asyncio.create_task(asyncio.to_thread(sentineled.fail_over))
        while not failing_over.done():
            await views.send(1)
            await asyncio.sleep(0.05)
        second = await failing_over
        await views.send(3)
        each = str(views.sent // len(sessions)).encode()
        await wait_for(lambda: counts(second) == [each] * 4, 60, "every event on the new primary")
        await wait_for(personalized, 30, "the API personalized after the failover")
        for proc, log in ((worker, "worker.log"), (api, "api.log")):
            assert proc.poll() is None, (tmp_path / log).read_text()[-3000:]
    finally:
        await producer.stop()
        stop_group(api)
        stop_group(worker)
