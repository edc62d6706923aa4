"""Kafka over TLS and SASL (stream_engine/kafka_security.py): the settings' checks, and
the worker (every engine) and the API's publisher against a real broker that takes
nothing else on the port they are given: a SASL_SSL listener with a certificate of a CA
of the test's own, and SCRAM and PLAIN users."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._scram import (  # not re-exported by name
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from api.publisher import Publisher
from loadtest import simulate
from loadtest.producer import make_producer
from stream_engine.catalog_updates import catalog_items_key
from stream_engine.demo_catalog import generate, write_demo_catalog
from stream_engine.exceptions import ConfigError
from stream_engine.kafka_security import KafkaSecurity
from stream_engine.settings import Settings
from stream_engine.state import Keys
from tests.conftest import (
    PrivateKafka,
    Stack,
    Tls,
    free_port,
    spawn_group,
    stop_group,
    wait_for,
    worker_topics,
)

USER, PASSWORD = "kairos", "kairos-secret"
ITEMS = [it.item_id for it in generate(200)]


@dataclass(frozen=True)
class SecuredKafka:
    broker: PrivateKafka
    port: int  # the SASL_SSL listener
    ca: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    tls: Tls
    mtls_port: int  # an SSL listener that wants a client certificate of the test CA's

    def mtls_env(self) -> dict[str, str]:
        return {"KAIROS_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.mtls_port}",
                "KAIROS_KAFKA_SECURITY_PROTOCOL": "SSL",
                "KAIROS_KAFKA_SSL_CAFILE": str(self.ca),
                "KAIROS_KAFKA_SSL_CERTFILE": str(self.tls.client_cert),
                "KAIROS_KAFKA_SSL_KEYFILE": str(self.tls.client_key)}  # fmt: skip

    def security(self, mechanism: str = "SCRAM-SHA-512", password: str = PASSWORD) -> KafkaSecurity:
        return KafkaSecurity("SASL_SSL", mechanism, USER, password, str(self.ca))

    def env(self, mechanism: str = "SCRAM-SHA-512", password: str = PASSWORD) -> dict[str, str]:
        return {"KAIROS_KAFKA_BOOTSTRAP": self.bootstrap,
                "KAIROS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "KAIROS_KAFKA_SASL_MECHANISM": mechanism,
                "KAIROS_KAFKA_SASL_USERNAME": USER, "KAIROS_KAFKA_SASL_PASSWORD": password,
                "KAIROS_KAFKA_SSL_CAFILE": str(self.ca)}  # fmt: skip


@pytest.fixture(scope="module")
def secured_kafka(
    tmp_path_factory: pytest.TempPathFactory, tls: Tls, stack: Stack
) -> Iterator[SecuredKafka]:
    """A broker of the module's own (deploy/stack.py, KAIROS_KAFKA_EXTRA_PROPERTIES) with a
    SASL_SSL listener and an SSL one that wants a client certificate, beside the plaintext
    one that `stack.py up` checks it by; the SCRAM users are made through the plaintext
    one."""
    d = tmp_path_factory.mktemp("secured-kafka")
    port, plain, controller, mtls = free_port(), free_port(), free_port(), free_port()
    jaas = {
        "plain": "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{USER}="{PASSWORD}";',
        "scram-sha-256": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "scram-sha-512": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    }
    props = {
        "listeners": f"PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller},"
                     f"SASL_SSL://127.0.0.1:{port},SSL://127.0.0.1:{mtls}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{port},"
                                f"SSL://127.0.0.1:{mtls}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
                                          "SASL_SSL:SASL_SSL,SSL:SSL",
        "listener.name.ssl.ssl.client.auth": "required",
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca),
        "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        **{f"listener.name.sasl_ssl.{m}.sasl.jaas.config": v for m, v in jaas.items()},
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.server),
    }  # fmt: skip
    (d / "extra.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    env = {**os.environ, "KAIROS_STACK_DIR": str(d / "stack"), "KAIROS_KAFKA_PORT": str(plain),
           "KAIROS_KAFKA_CONTROLLER_PORT": str(controller),
           "KAIROS_KAFKA_EXTRA_PROPERTIES": str(d / "extra.properties")}  # fmt: skip
    broker = PrivateKafka(env, d / "stack")
    broker.stack("up", "kafka")
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for mechanism in (ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512):
            upsert = UserScramCredentialUpsertion(
                USER, ScramCredentialInfo(mechanism, 4096), PASSWORD.encode()
            )
            for future in admin.alter_user_scram_credentials([upsert]).values():
                future.result(30)
        yield SecuredKafka(broker, port, tls.ca, tls, mtls)
    finally:
        broker.stack("down")


# ----------------------------------------------------------------------------- settings


def _settings(**env: str) -> KafkaSecurity:
    return Settings.from_env({f"KAIROS_KAFKA_{k.upper()}": v for k, v in env.items()}).kafka


def test_plaintext_adds_nothing_to_any_client() -> None:
    security = _settings()
    assert (security.aiokafka(), security.librdkafka(), security.faust()) == ({}, {}, None)


def test_a_sasl_ssl_setting_reaches_each_clients_own_names(tls: Tls) -> None:
    security = _settings(
        security_protocol="sasl_ssl",
        sasl_mechanism="scram-sha-512",
        sasl_username=USER,
        sasl_password=PASSWORD,
        ssl_cafile=str(tls.ca),
    )
    aio = security.aiokafka()
    assert (
        aio["security_protocol"],
        aio["sasl_mechanism"],
        aio["sasl_plain_username"],
        aio["sasl_plain_password"],
    ) == ("SASL_SSL", "SCRAM-SHA-512", USER, PASSWORD)
    assert aio["ssl_context"].check_hostname
    assert security.librdkafka() == {
        "security.protocol": "sasl_ssl", "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": USER, "sasl.password": PASSWORD, "ssl.ca.location": str(tls.ca),
        "ssl.endpoint.identification.algorithm": "https",
    }  # fmt: skip
    credentials = security.faust()
    assert (credentials.protocol.value, credentials.mechanism.value) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
    )
    assert PASSWORD not in repr(security)


@pytest.mark.parametrize(
    ("env", "says"),
    [({"security_protocol": "TLS"}, "KAIROS_KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT"),
     ({"security_protocol": "SASL_SSL", "sasl_username": USER},
      "SASL_SSL needs KAIROS_KAFKA_SASL_USERNAME and KAIROS_KAFKA_SASL_PASSWORD"),
     ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": USER,
       "sasl_password": PASSWORD}, "KAIROS_KAFKA_SASL_MECHANISM must be one of PLAIN"),
     ({"sasl_username": USER, "sasl_password": PASSWORD}, "PLAINTEXT sends no credentials"),
     ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": USER, "sasl_password": PASSWORD,
       "ssl_cafile": "/etc/hostname"}, "uses no TLS, but KAIROS_KAFKA_SSL_CAFILE is set"),
     ({"security_protocol": "SSL", "ssl_certfile": "/etc/hostname"},
      "KAIROS_KAFKA_SSL_CERTFILE and KAIROS_KAFKA_SSL_KEYFILE go together"),
     ({"security_protocol": "SSL", "ssl_cafile": "/nowhere/ca.pem"},
      "KAIROS_KAFKA_SSL_CAFILE='/nowhere/ca.pem': no such readable file"),
     ({"security_protocol": "SSL", "ssl_cafile": "/etc/hostname"},
      "KAIROS_KAFKA_SSL_CAFILE: not usable for TLS")],
)  # fmt: skip
def test_a_kafka_security_setting_that_cannot_work_is_refused_at_start(
    env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        _settings(**env)


def test_the_api_reads_the_same_variables() -> None:
    from api.settings import Settings as ApiSettings

    env = {"KAIROS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAIROS_KAFKA_SASL_USERNAME": USER,
           "KAIROS_KAFKA_SASL_PASSWORD": PASSWORD}  # fmt: skip
    assert ApiSettings.from_env(env).kafka == Settings.from_env(env).kafka
    assert ApiSettings.from_env(env).kafka.librdkafka()["security.protocol"] == "sasl_plaintext"


# ----------------------------------------------------------------------------- the broker


@pytest.fixture
def worker_env(
    secured_kafka: SecuredKafka, stack: Stack, unique: str, key_prefix: str, tmp_path: Path
) -> dict[str, str]:
    return {
        **os.environ, **secured_kafka.env(),
        "KAIROS_REDIS_URL": stack.redis_url,
        "KAIROS_KEY_PREFIX": key_prefix,
        **worker_topics(unique),
        "KAIROS_CATALOG_PATH": str(write_demo_catalog(tmp_path / "catalog.jsonl", n_items=200)),
        "KAIROS_PARTITIONS": "2",
        "KAIROS_METRICS_PORT": "0",
    }  # fmt: skip


@pytest.fixture
async def secured_producer(secured_kafka: SecuredKafka) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=secured_kafka.bootstrap, linger_ms=0,
                                **secured_kafka.security().aiokafka())  # fmt: skip
    await producer.start()
    yield producer
    await producer.stop()


def _event(n: int, sid: str, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": f"e{n}", "type": "view", "session_id": sid,
                         "ts": int(time.time() * 1000), "item_id": ITEMS[n], **fields})  # fmt: skip


async def _read(secured_kafka: SecuredKafka, topic: str, n: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=secured_kafka.bootstrap,
                                auto_offset_reset="earliest", group_id=None,
                                **secured_kafka.security().aiokafka())  # fmt: skip
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < n:
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    values += [m.value for m in msgs if m.value is not None]
    finally:
        await consumer.stop()
    return values


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["faust", "aiokafka", "librdkafka"])
async def test_a_worker_on_a_sasl_ssl_broker_applies_dead_letters_and_follows_the_catalog(
    engine: str, worker_env: dict[str, str], secured_kafka: SecuredKafka,
    secured_producer: AIOKafkaProducer, redis_client: aioredis.Redis, key_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Every client of the worker goes through the secured listener: the topic admin, the
    clickstream consumer of each engine, the dead-letter producer, the catalog follower."""
    worker = spawn_group(
        [sys.executable, "-m", "stream_engine", "worker"],
        {**worker_env, "KAIROS_ENGINE": engine},
        tmp_path / "worker.log",
    )
    try:
        topic = worker_env["KAIROS_CLICKSTREAM_TOPIC"]
        for n, sid in enumerate(["s1", "s2", "s1", "s2", "s1"]):
            await secured_producer.send_and_wait(topic, _event(n, sid), key=sid.encode())
        await secured_producer.send_and_wait(topic, b"{not json", key=b"s1")
        stock = orjson.dumps({"item_id": ITEMS[0], "stock": 0})
        await secured_producer.send_and_wait(worker_env["KAIROS_CATALOG_TOPIC"], stock,
                                             key=ITEMS[0].encode())  # fmt: skip
        keys = Keys(key_prefix)

        async def applied() -> bool:
            counts = [await redis_client.hget(keys.session(s), "n") for s in ("s1", "s2")]
            return counts == [b"3", b"2"]

        await wait_for(applied, 90, f"the {engine} worker applying events over SASL_SSL")
        dead = await _read(secured_kafka, worker_env["KAIROS_DLQ_TOPIC"], 1)
        assert orjson.loads(dead[0])["reason"] == "bad_json"
        items_key = catalog_items_key(key_prefix)

        async def mirrored() -> bool:
            return await redis_client.hexists(items_key, ITEMS[0])

        await wait_for(mirrored, 30, "the catalog update mirrored over SASL_SSL")
    finally:
        stop_group(worker)


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_worker_with_a_wrong_password_says_so_and_applies_nothing(
    worker_env: dict[str, str], secured_kafka: SecuredKafka, redis_client: aioredis.Redis,
    key_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    log = tmp_path / "worker.log"
    env = {**worker_env, **secured_kafka.env(password="not-the-password"),
           "KAIROS_ENGINE": "aiokafka"}  # fmt: skip
    worker = spawn_group([sys.executable, "-m", "stream_engine", "worker"], env, log)
    try:

        def refused() -> bool:
            return "Authentication failed" in log.read_text(errors="replace")

        await wait_for(refused, 60, "the worker's log naming the failed authentication")
        assert worker.poll() is None  # it waits for Kafka, as for a broker not yet up
        assert not await redis_client.keys(f"{key_prefix}*")
    finally:
        stop_group(worker)


@pytest.mark.integration
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_the_apis_publisher_delivers_over_sasl_ssl(
    secured_kafka: SecuredKafka, unique: str, mechanism: str
) -> None:
    drops: list[tuple[str, str, int]] = []
    publisher = Publisher(secured_kafka.bootstrap, 100, lambda *d: drops.append(d), linger_ms=0,
                          security=secured_kafka.security(mechanism))  # fmt: skip
    publisher.start()
    try:
        topic = f"beacons.{unique}"
        assert publisher.offer(topic, b"s1", b'{"n": 1}')
        assert await _read(secured_kafka, topic, 1) == [b'{"n": 1}']
        await wait_for(lambda: publisher.connected, 10, "the publisher reporting a broker up")
    finally:
        await publisher.stop()
    assert drops == []


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["aiokafka", "librdkafka"])
async def test_the_load_suites_producers_send_over_sasl_ssl(
    secured_kafka: SecuredKafka, unique: str, kind: str
) -> None:
    """`loadtest run --bootstrap` aims at a deployment's broker, with its KAIROS_KAFKA_*."""
    producer = make_producer(kind, secured_kafka.bootstrap, secured_kafka.security())
    await producer.start()
    try:
        topic = f"suite.{unique}"
        await producer.send(topic, b'{"n": 2}', b"s1")
        await producer.flush()
    finally:
        await producer.stop()
    assert await _read(secured_kafka, topic, 1) == [b'{"n": 2}']


@pytest.mark.integration
async def test_the_simulator_sends_over_sasl_ssl(
    secured_kafka: SecuredKafka, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m loadtest simulate` (make demo's shoppers) with the deployment's
    KAIROS_KAFKA_*: it spoke plaintext, and against this listener sent nothing."""
    topic = f"simulated.{unique}"
    catalog = write_demo_catalog(tmp_path / "catalog.jsonl", n_items=50)
    env = {**secured_kafka.env(), "KAIROS_CLICKSTREAM_TOPIC": topic, "KAIROS_API_URL": "",
           "KAIROS_CATALOG_PATH": str(catalog)}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sent = await simulate.run(rate=20, sessions=3, duration=1.0)
    events = [orjson.loads(v) for v in await _read(secured_kafka, topic, sent)]
    assert sent >= 10
    assert len({e["event_id"] for e in events}) == sent  # every one, once


@pytest.mark.integration
async def test_the_apis_publisher_with_a_wrong_password_reports_kafka_down(
    secured_kafka: SecuredKafka,
) -> None:
    """What /readyz says as `"kafka": "disconnected"`: librdkafka's statistics never see a
    broker up (with the right password they do within seconds: the test above)."""
    publisher = Publisher(secured_kafka.bootstrap, 100, lambda *d: None, linger_ms=0,
                          security=secured_kafka.security(password="not-the-password"))  # fmt: skip
    publisher.start()
    try:
        await asyncio.sleep(4)
        assert not publisher.connected
    finally:
        await publisher.stop()


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["faust", "aiokafka", "librdkafka"])
async def test_a_worker_with_a_client_certificate_is_let_in_and_a_client_without_is_not(
    engine: str, worker_env: dict[str, str], secured_kafka: SecuredKafka,
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    """SSL with mutual TLS (Aiven's way): the worker's certificate and key reach every
    client library; the broker refuses a client that brings none."""
    plain = {k: v for k, v in worker_env.items() if not k.startswith("KAIROS_KAFKA_")}
    env = {**plain, **secured_kafka.mtls_env(), "KAIROS_ENGINE": engine}
    settings = Settings.from_env(env)
    anonymous = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=3000,
        **KafkaSecurity("SSL", ssl_cafile=str(secured_kafka.ca)).aiokafka(),
    )  # fmt: skip
    with pytest.raises(KafkaConnectionError):
        await anonymous.start()
    await anonymous.stop()
    worker = spawn_group([sys.executable, "-m", "stream_engine", "worker"], env,
                         tmp_path / "worker.log")  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=0,
                                **settings.kafka.aiokafka())  # fmt: skip
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(env["KAIROS_CLICKSTREAM_TOPIC"], _event(n, "m1"),
                                         key=b"m1")  # fmt: skip
        session = Keys(key_prefix).session("m1")

        async def applied() -> bool:
            return await redis_client.hget(session, "n") == b"3"

        await wait_for(applied, 90, f"the {engine} worker applying events over mutual TLS")
    finally:
        await producer.stop()
        stop_group(worker)
