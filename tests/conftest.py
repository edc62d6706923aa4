"""Session fixtures: the real Kafka broker and redis-server, and per-test isolation.

The stack is found in this order: KAIROS_KAFKA_BOOTSTRAP + KAIROS_REDIS_URL in the
environment (attach, never stop); a healthy stack from `deploy/stack.py up` in this checkout
(attach, never stop); otherwise the fixture starts one and stops it when the session ends.
Outside CI a stack that cannot start skips the integration tests with the reason; with
CI=true it fails them.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent
STACK = [sys.executable, str(REPO / "deploy" / "stack.py")]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SERVICES_TOKEN = "services-admin-token-0123456789"  # the admin token of kairos_services


@dataclass(frozen=True)
class Stack:
    kafka_bootstrap: str
    redis_url: str


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and the real stack is unavailable: {reason}", pytrace=False)
    pytest.skip(f"LOUD SKIP: real Kafka/Redis unavailable ({reason}); run `make up`")


def _stack_env() -> dict[str, str]:
    out = subprocess.run([*STACK, "env"], capture_output=True, text=True, check=False)
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


# Every `unique` id handed out this session: the topics named after them (workers and apps
# create clickstream.<unique>, decisions.<unique>, ...) are deleted when the session ends.
# Left behind, a developer's broker gathered ~2,000 partitions in a day and slowed down.
_UNIQUES: set[str] = set()


def _delete_test_topics(bootstrap: str) -> None:
    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            mine = [t for t in await admin.list_topics() if any(u in t for u in _UNIQUES)]
            for start in range(0, len(mine), 100):
                await admin.delete_topics(mine[start : start + 100])
        finally:
            await admin.close()

    if _UNIQUES:
        try:
            asyncio.run(asyncio.wait_for(run(), 60))
        except Exception as exc:  # cleanup only: never fail the session for it
            print(f"test topics not deleted: {exc!r}", file=sys.stderr)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    if "KAIROS_KAFKA_BOOTSTRAP" in os.environ and "KAIROS_REDIS_URL" in os.environ:
        yield Stack(os.environ["KAIROS_KAFKA_BOOTSTRAP"], os.environ["KAIROS_REDIS_URL"])
        _delete_test_topics(os.environ["KAIROS_KAFKA_BOOTSTRAP"])
        return
    healthy = subprocess.run([*STACK, "status"], capture_output=True, check=False).returncode == 0
    started = False
    if not healthy:
        up = subprocess.run([*STACK, "up"], capture_output=True, text=True, check=False)
        if up.returncode != 0:
            _unavailable(f"`deploy/stack.py up` failed:\n{up.stdout}\n{up.stderr}")
        started = True
    env = _stack_env()
    try:
        yield Stack(env["KAIROS_KAFKA_BOOTSTRAP"], env["KAIROS_REDIS_URL"])
        _delete_test_topics(env["KAIROS_KAFKA_BOOTSTRAP"])
    finally:
        if started:
            subprocess.run([*STACK, "down"], capture_output=True, check=False, timeout=60)


@pytest.fixture
def unique() -> str:
    """A short id for this test's topics, groups and key prefix."""
    _UNIQUES.add(u := uuid.uuid4().hex[:12])
    return u


@pytest.fixture
def key_prefix(unique: str) -> str:
    return f"test-{unique}"


@pytest.fixture
async def redis_client(stack: Stack, key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the real Redis; every key under this test's prefix is deleted afterwards."""
    client = aioredis.Redis.from_url(stack.redis_url)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        _unavailable(f"redis at {stack.redis_url}: {exc}")
    try:
        yield client
    finally:
        async for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
            await client.delete(key)
        await client.aclose()


TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def kafka_admin(stack: Stack) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        _unavailable(f"kafka at {stack.kafka_bootstrap}: {exc}")
    try:
        yield admin
    finally:
        await admin.close()


@pytest.fixture
async def topic_factory(
    kafka_admin: AIOKafkaAdminClient, unique: str
) -> AsyncIterator[TopicFactory]:
    """Creates uniquely named topics on the real broker and deletes them after the test."""
    created: list[str] = []

    async def make(base: str = "t", partitions: int = 1) -> str:
        name = f"{base}.{unique}.{len(created)}"
        await kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        created.append(name)
        return name

    yield make
    if created:
        await kafka_admin.delete_topics(created)


def redis_server(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A redis-server of a test's own on `port`, without persistence (a restart starts
    empty), listening when this returns."""
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    listening(port)
    return proc


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, so the test may freeze it."""
    port = free_port()
    proc = redis_server(port, tmp_path)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=10)


@dataclass(frozen=True)
class PrivateKafka:
    """A broker of this test's own (deploy/stack.py in a stack dir of its own), so the
    test may crash it: SIGKILL, no clean shutdown, then started again on the same data."""

    env: dict[str, str]
    stack_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.env['KAIROS_KAFKA_PORT']}"

    def stack(self, *args: str) -> None:
        argv = [sys.executable, str(REPO / "deploy" / "stack.py"), *args]
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr

    def crash(self) -> None:
        pid = int((self.stack_dir / "kafka" / "pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid):
            time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "gone"


@pytest.fixture
def private_kafka(tmp_path: Path, stack: Stack) -> Iterator[PrivateKafka]:
    stack_dir = tmp_path / "stack"
    env = {**os.environ, "KAIROS_STACK_DIR": str(stack_dir), "KAIROS_KAFKA_PORT": str(free_port()),
           "KAIROS_KAFKA_CONTROLLER_PORT": str(free_port())}  # fmt: skip
    broker = PrivateKafka(env, stack_dir)
    broker.stack("up", "kafka")
    try:
        yield broker
    finally:
        broker.stack("down")


async def wait_for(
    check: Callable[[], object], within: float, what: str, step: float = 0.1
) -> None:
    """Until `check()` (a plain or an async function) is true; AssertionError naming `what`
    after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def listening(port: int, within_s: float = 10.0) -> bool:
    """Whether something listens on 127.0.0.1:`port` within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@dataclass(frozen=True)
class Tls:
    """A CA of the tests' own, and a server certificate it signed for 127.0.0.1: for the
    secured Kafka listener and the TLS Redis."""

    ca: Path  # the test CA's certificate, what clients trust
    server: Path  # the server's key and certificate (for 127.0.0.1), one PEM file
    key: Path  # the same key alone
    cert: Path  # and the certificate alone
    client_key: Path  # a client's key and certificate, for servers that ask for one
    client_cert: Path


def _openssl(*args: str) -> None:
    # Debian's openssl, installed like redis-server when missing (deploy/stack.py)
    from tests.deploy._stack_module import load

    openssl = load().ensure_debian_binary("openssl", "openssl")
    subprocess.run([openssl, *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=kairos-test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / "san.ext"), "-out", str(d / "server.crt"))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kairos-client",
             "-keyout", str(d / "client.key"), "-out", str(d / "client.csr"))  # fmt: skip
    _openssl("x509", "-req", "-in", str(d / "client.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-out", str(d / "client.crt"))  # fmt: skip
    server = d / "server.pem"
    server.write_bytes((d / "server.key").read_bytes() + (d / "server.crt").read_bytes())
    return Tls(d / "ca.pem", server, d / "server.key", d / "server.crt",
               d / "client.key", d / "client.crt")  # fmt: skip


def worker_topics(unique: str) -> dict[str, str]:
    """A test's own topics and consumer group, as the worker's variables name them."""
    return {
        "KAIROS_CLICKSTREAM_TOPIC": f"clickstream.{unique}",
        "KAIROS_DLQ_TOPIC": f"clickstream.dlq.{unique}",
        "KAIROS_CATALOG_TOPIC": f"catalog.{unique}",
        "KAIROS_DECISIONS_TOPIC": f"decisions.{unique}",
        "KAIROS_CONSUMER_GROUP": f"kairos-test-{unique}",
    }


def stop_servers(procs: list[subprocess.Popen[bytes]], workdir: Path) -> None:
    """A test's own servers stopped (all signalled first, then each waited for) and their
    directory removed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def redis_worker_env(
    stack: Stack, unique: str, key_prefix: str, tmp_path: Path, redis_url: str,
    **extra: str,
) -> dict[str, str]:  # fmt: skip
    """A one-partition worker's (and an API's) environment on a Redis of the test's own:
    the stack's broker, the test's topics, keys and a 100-item demo catalog."""
    from stream_engine.demo_catalog import write_demo_catalog

    return {
        **os.environ, **worker_topics(unique),
        "KAIROS_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "KAIROS_REDIS_URL": redis_url,
        "KAIROS_KEY_PREFIX": key_prefix,
        "KAIROS_CATALOG_PATH": str(write_demo_catalog(tmp_path / "catalog.jsonl", n_items=100)),
        "KAIROS_PARTITIONS": "1",
        "KAIROS_METRICS_PORT": "0",
        **extra,
    }  # fmt: skip


@dataclass
class Views:
    """View events into `topic`, a round being one for each session, every one with an id
    of its own, sent and acknowledged one at a time."""

    producer: AIOKafkaProducer
    topic: str
    sessions: list[str]
    sent: int = 0

    async def send(self, rounds: int = 1) -> None:
        from stream_engine.demo_catalog import generate

        items = [it.item_id for it in generate(100)]
        for _ in range(rounds):
            for sid in self.sessions:
                body = {"event_id": f"{self.topic}-{self.sent}", "type": "view",
                        "session_id": sid, "ts": int(time.time() * 1000),
                        "item_id": items[self.sent % len(items)]}  # fmt: skip
                await self.producer.send_and_wait(self.topic, orjson.dumps(body),
                                                  key=sid.encode())  # fmt: skip
                self.sent += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rdkafka_threads() -> int:
    """librdkafka's threads in this process (rdk:main, rdk:broker…): a closed producer
    leaves none."""
    tasks = Path("/proc/self/task")
    return sum((t / "comm").read_text().startswith("rdk:") for t in tasks.iterdir())


def spawn_group(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child process in its own process group, output to `log` (its folder is the cwd)."""
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, cwd=log.parent, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def stop_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2,000-item demo catalog shared by the worker, the API and the tests."""
    from stream_engine.demo_catalog import write_demo_catalog

    return write_demo_catalog(tmp_path_factory.mktemp("catalog") / "demo.jsonl", n_items=2000)


@pytest.fixture
def kairos_services(
    stack: Stack, unique: str, key_prefix: str, catalog_file: Path, tmp_path: Path
) -> Iterator[str]:
    """A worker (aiokafka engine) and an API of this test's own (own topics, group and key
    prefix, the demo catalog file); the API's URL."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "KAIROS_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        "KAIROS_REDIS_URL": stack.redis_url,
        "KAIROS_KEY_PREFIX": key_prefix,
        "KAIROS_CATALOG_PATH": str(catalog_file),
        "KAIROS_CLICKSTREAM_TOPIC": f"clickstream.{unique}",
        "KAIROS_DLQ_TOPIC": f"dlq.{unique}",
        "KAIROS_CATALOG_TOPIC": f"catalog.{unique}",
        "KAIROS_DECISIONS_TOPIC": f"decisions.{unique}",
        "KAIROS_CONSUMER_GROUP": f"group-{unique}",
        "KAIROS_ENGINE": "aiokafka",
        "KAIROS_PARTITIONS": "1",
        "KAIROS_METRICS_PORT": "0",
        "KAIROS_API_PORT": str(port),
        "KAIROS_ADMIN_TOKEN": SERVICES_TOKEN,
    }
    worker = spawn_group(
        [sys.executable, "-m", "stream_engine", "worker"], env, tmp_path / "worker.log"
    )
    api = spawn_group([sys.executable, "-m", "api"], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError((tmp_path / "api.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        stop_group(api)
        stop_group(worker)
