"""The local Kairos stack: a real Kafka broker (KRaft) and a real redis-server on loopback.

    python deploy/stack.py up [SERVICE ...]   start (idempotent; default kafka redis; + worker api)
    python deploy/stack.py demo [--detach] [--no-simulator]
                                              kafka, redis, the worker, the API,
                                              attribution, the embeddings learner and
                                              simulated shoppers, until Ctrl-C
    python deploy/stack.py down               stop exactly what `up` started
    python deploy/stack.py status             one line per service
    python deploy/stack.py logs [SERVICE] [-n N] [-f]
    python deploy/stack.py env                the KAIROS_* variables of the running stack
    python deploy/stack.py browser            Debian's chromium (installed if missing), for
                                              the demo's real-browser test

Kafka is resolved from Maven Central with `mvn` (deploy/kafka/pom.xml) into a cache outside
the repository (KAIROS_CACHE_DIR, default ~/.cache/kairos); Redis is Debian's redis-server,
installed with apt-get when missing. Runtime files (pid files, logs, data, the chosen ports)
live in KAIROS_STACK_DIR (default .stack/ in the checkout), so two checkouts never share a
broker by accident. Ports default to 9092/9093 (Kafka) and 6379 (Redis), can be set with
KAIROS_KAFKA_PORT, KAIROS_KAFKA_CONTROLLER_PORT and KAIROS_REDIS_PORT, and when a default is
taken by someone else a free port is chosen and remembered.

The worker and the API run from the same Python (the venv) as this script; the worker's
metrics port is KAIROS_WORKER_METRICS_PORT (default 9464), the API's KAIROS_API_PORT (8000).

KAIROS_KAFKA_EXTRA_PROPERTIES names a file of broker properties laid over the generated
ones (a listener with TLS and SASL, say, as tests/stream_engine/test_kafka_security.py
starts); the broker keeps its plaintext listener, which `up` checks it by.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KAFKA_POM = REPO / "deploy" / "kafka" / "pom.xml"
KAFKA_LOG4J = REPO / "deploy" / "kafka" / "log4j.properties"
HOST = "127.0.0.1"
READY_TOPIC = "_kairos_ready"


class StackError(Exception):
    """A service could not be set up or started; the message says what to look at."""


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    stack_dir: Path
    cache_dir: Path

    @classmethod
    def from_env(cls) -> Layout:
        stack = Path(os.environ.get("KAIROS_STACK_DIR", REPO / ".stack")).resolve()
        cache = Path(
            os.environ.get("KAIROS_CACHE_DIR", Path.home() / ".cache" / "kairos")
        ).resolve()
        return cls(stack, cache)

    def service_dir(self, name: str) -> Path:
        return self.stack_dir / name

    def pid_file(self, name: str) -> Path:
        return self.service_dir(name) / "pid"

    def log_file(self, name: str) -> Path:
        return self.service_dir(name) / f"{name}.log"

    @property
    def ports_file(self) -> Path:
        return self.stack_dir / "ports.json"

    @property
    def env_file(self) -> Path:
        return self.stack_dir / "stack.env"


# ----------------------------------------------------------------------------- ports


PORT_DEFAULTS = {
    "kafka": ("KAIROS_KAFKA_PORT", 9092),
    "kafka_controller": ("KAIROS_KAFKA_CONTROLLER_PORT", 9093),
    "redis": ("KAIROS_REDIS_PORT", 6379),
    "api": ("KAIROS_API_PORT", 8000),
    "worker_metrics": ("KAIROS_WORKER_METRICS_PORT", 9464),
}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_ports(layout: Layout) -> dict[str, int]:
    if layout.ports_file.exists():
        return {k: int(v) for k, v in json.loads(layout.ports_file.read_text()).items()}
    return {}


def choose_ports(layout: Layout, running: set[str]) -> dict[str, int]:
    """Keep remembered ports; an explicit env port wins; a busy default moves to a free one."""
    ports = load_ports(layout)
    for key, (env_name, default) in PORT_DEFAULTS.items():
        owner = key.split("_")[0]
        if env_name in os.environ:
            ports[key] = int(os.environ[env_name])
            continue
        if owner in running and key in ports:
            continue
        wanted = ports.get(key, default)
        if not _port_free(wanted):
            free = _any_free_port()
            print(f"  port {wanted} ({key}) is taken by another process; using {free}")
            wanted = free
        ports[key] = wanted
    layout.stack_dir.mkdir(parents=True, exist_ok=True)
    layout.ports_file.write_text(json.dumps(ports, indent=2) + "\n")
    return ports


def stack_env(ports: dict[str, int]) -> dict[str, str]:
    return {
        "KAIROS_KAFKA_BOOTSTRAP": f"{HOST}:{ports['kafka']}",
        "KAIROS_REDIS_URL": f"redis://{HOST}:{ports['redis']}/0",
        "KAIROS_API_URL": f"http://{HOST}:{ports['api']}",
    }


def write_env(layout: Layout, ports: dict[str, int]) -> dict[str, str]:
    env = stack_env(ports)
    layout.env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


# ----------------------------------------------------------------------------- processes


def _read_pid(layout: Layout, name: str) -> int | None:
    try:
        return int(layout.pid_file(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _owned(pid: int, layout: Layout) -> bool:
    """True when pid is alive and is one of ours (its command line or cwd is in the stack dir).

    Guards `down` against a recycled pid: we never signal a process we did not start.
    """
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = os.readlink(proc / "cwd")
        state = next(
            (ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:")),
            "",
        )
    except OSError:
        return False
    if "zombie" in state:
        return False
    marker = str(layout.stack_dir)
    return marker in cmdline or cwd.startswith(marker)


def running_pid(layout: Layout, name: str) -> int | None:
    pid = _read_pid(layout, name)
    if pid is not None and _owned(pid, layout):
        return pid
    return None


# A service's log is appended to across starts; past this size it is moved aside (see
# rotate_log). The broker's alone had reached 360 MB over ~180 starts of a developer's stack.
LOG_ROTATE_BYTES = 32 * 1024 * 1024


def rotate_log(path: Path, limit: int = LOG_ROTATE_BYTES) -> bool:
    """Move a log past `limit` bytes to NAME.log.1, replacing the one before, so that a
    stack started again and again keeps at most two logs a service: the last start's
    history stays readable and the disk used stays bounded. Whether it moved."""
    try:
        if path.stat().st_size <= limit:
            return False
    except FileNotFoundError:
        return False
    path.replace(path.with_name(path.name + ".1"))
    return True


def spawn(layout: Layout, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    sdir = layout.service_dir(name)
    sdir.mkdir(parents=True, exist_ok=True)
    rotate_log(layout.log_file(name))
    log = layout.log_file(name).open("ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        argv,
        cwd=sdir,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    log.close()
    layout.pid_file(name).write_text(f"{proc.pid}\n")
    return proc.pid


def stop(layout: Layout, name: str, grace: float = 20.0) -> str:
    pid = running_pid(layout, name)
    if pid is None:
        layout.pid_file(name).unlink(missing_ok=True)
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _owned(pid, layout):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        time.sleep(0.2)
    _reap(pid)
    layout.pid_file(name).unlink(missing_ok=True)
    return f"stopped (pid {pid})"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise StackError(f"{what} not ready after {timeout:.0f}s; see {log}\n{tail(log, 25)}")


def tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + ln for ln in lines[-n:])


# ----------------------------------------------------------------------------- redis


def ensure_debian_binary(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian's `package` with apt-get when it is missing."""
    found = shutil.which(binary) or (
        f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise StackError(f"{binary} is not installed; run: sudo apt-get install -y {package}")
    print(f"  installing Debian's {package} (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    # policy-rc.d 101 stops a package from starting a system service (a redis on 6379)
    # behind our back.
    policy = Path("/usr/sbin/policy-rc.d")
    had_policy = policy.exists()
    if not had_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", package],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise StackError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr}")
    finally:
        if not had_policy:
            policy.unlink(missing_ok=True)
    return shutil.which(binary) or f"/usr/bin/{binary}"


def ensure_redis_binary() -> str:
    return ensure_debian_binary("redis-server", "redis-server")


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    if (pid := running_pid(layout, "redis")) is not None and redis_ping(ports["redis"]):
        return f"already running (pid {pid}) on {HOST}:{ports['redis']}"
    binary = ensure_redis_binary()
    argv = [
        binary,
        "--bind", HOST,
        "--port", str(ports["redis"]),
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(layout.service_dir("redis")),
        "--maxmemory-policy", "noeviction",
        "--loglevel", "notice",
    ]  # fmt: skip
    pid = spawn(layout, "redis", argv)
    wait_until(lambda: redis_ping(ports["redis"]), timeout, "redis", layout.log_file("redis"))
    return f"started (pid {pid}) on {HOST}:{ports['redis']}"


# ----------------------------------------------------------------------------- kafka


KAFKA_VERSION = "3.9.2"


def kafka_libs(layout: Layout) -> Path:
    """Resolve the broker's jars once per pom.xml content; later starts reuse the cache."""
    digest = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()[:10]
    libs = layout.cache_dir / f"kafka-{KAFKA_VERSION}-{digest}" / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (mvn) is needed to resolve Kafka from Maven Central")
    print(f"  resolving Apache Kafka {KAFKA_VERSION} from Maven Central into {libs} ...")
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    jars = list(staging.glob("*.jar"))
    if done.returncode != 0 or not any(j.name.startswith("kafka_2.13") for j in jars):
        raise StackError(f"mvn could not resolve Kafka:\n{done.stdout[-3000:]}{done.stderr}")
    (staging / ".complete").write_text(f"{len(jars)} jars\n")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    return libs


LOCAL_RETENTION_BYTES = 256 * 1024 * 1024  # a partition of the local broker's topics


def kafka_properties(layout: Layout, ports: dict[str, int], partitions: int) -> str:
    data = layout.service_dir("kafka") / "data"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{ports['kafka_controller']}",
        "listeners": f"PLAINTEXT://{HOST}:{ports['kafka']},CONTROLLER://{HOST}:{ports['kafka_controller']}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{ports['kafka']}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": str(partitions),
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        # A snapshot of the cluster's metadata every MiB of changes, not every 20 MiB (the
        # default): a broker starts from its last snapshot and replays the records after it.
        # The tests create and delete topics by the thousand; without snapshots a
        # developer's broker replayed ~98,000 records, all it had ever seen, at every start.
        "metadata.log.max.record.bytes.between.snapshots": str(1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
        # Redis is derived state rebuilt by replaying Kafka: keep a week locally, but
        # at most LOCAL_RETENTION_BYTES a partition. Without that bound the benches' and the
        # demo's exposures (the `decisions` topic) had grown a developer's stack to 2 GB.
        # Retention deletes whole segments, so a segment is a quarter of the bound.
        "log.retention.hours": "168",
        "log.retention.bytes": str(LOCAL_RETENTION_BYTES),
        "log.segment.bytes": str(LOCAL_RETENTION_BYTES // 4),
    }
    if extra := os.environ.get("KAIROS_KAFKA_EXTRA_PROPERTIES"):
        props |= read_properties(Path(extra))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def read_properties(path: Path) -> dict[str, str]:
    """key=value lines; blank lines and # comments skipped (no continuation lines)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise StackError(f"KAIROS_KAFKA_EXTRA_PROPERTIES: {exc}") from None
    props = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise StackError(f"{path}:{n}: expected key=value, got {line!r}")
        props[key.strip()] = value.strip()
    return props


def _java_argv(libs: Path, main: list[str], heap: str) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise StackError("java (17+) is needed to run the Kafka broker")
    return [
        java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{KAFKA_LOG4J}",
        "-cp", f"{libs}/*", *main,
    ]  # fmt: skip


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them (URL-safe base64 of a random UUID), never
    starting with "-": the storage tool would read such an id as an option and refuse to
    format ("argument --cluster-id/-t: expected one argument", one fresh start in 64)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def format_kafka(layout: Layout, libs: Path, props_file: Path) -> None:
    data = layout.service_dir("kafka") / "data"
    if (data / "meta.properties").exists():
        return
    cluster_id = new_cluster_id()
    argv = _java_argv(
        libs,
        ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props_file)],
        "256m",
    )
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"formatting KRaft storage failed:\n{done.stdout}{done.stderr}")


async def _kafka_round_trip(bootstrap: str) -> bool:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await producer.start()
        token = uuid.uuid4().bytes
        meta = await producer.send_and_wait(READY_TOPIC, token, partition=0)
        await consumer.start()
        tp = TopicPartition(READY_TOPIC, 0)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        msg = await asyncio.wait_for(consumer.getone(), timeout=5)
        return bool(msg.value == token)
    finally:
        await consumer.stop()
        await producer.stop()


def kafka_ready(port: int) -> bool:
    if not _port_open(port):
        return False
    # The first metadata request for the probe topic creates it; aiokafka logs that as a warning.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(asyncio.wait_for(_kafka_round_trip(f"{HOST}:{port}"), 15))
    except Exception:
        return False


def start_kafka(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    if (pid := running_pid(layout, "kafka")) is not None and kafka_ready(ports["kafka"]):
        return f"already running (pid {pid}) on {HOST}:{ports['kafka']}"
    libs = kafka_libs(layout)
    sdir = layout.service_dir("kafka")
    sdir.mkdir(parents=True, exist_ok=True)
    props_file = sdir / "server.properties"
    partitions = int(os.environ.get("KAIROS_KAFKA_PARTITIONS", "4"))
    props_file.write_text(kafka_properties(layout, ports, partitions))
    format_kafka(layout, libs, props_file)
    heap = os.environ.get("KAIROS_KAFKA_HEAP", "512m")
    argv = _java_argv(libs, ["kafka.Kafka", str(props_file)], heap)
    pid = spawn(layout, "kafka", argv, env={"KAFKA_LOG_DIR": str(sdir)})
    log = layout.log_file("kafka")

    def ready() -> bool:
        if running_pid(layout, "kafka") is None:
            raise StackError(f"kafka exited during start; see {log}\n{tail(log, 25)}")
        return kafka_ready(ports["kafka"])

    wait_until(ready, timeout, "kafka (produce/consume round trip)", log)
    return f"started (pid {pid}) on {HOST}:{ports['kafka']}"


# ----------------------------------------------------------------------------- worker


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_worker(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    metrics = f"http://{HOST}:{ports['worker_metrics']}/metrics"
    if (pid := running_pid(layout, "worker")) is not None:
        return f"already running (pid {pid}); metrics {metrics}"
    env = {
        **stack_env(ports),
        "KAIROS_STACK_DIR": str(layout.stack_dir),
        "KAIROS_METRICS_PORT": str(ports["worker_metrics"]),
    }
    argv = [sys.executable, "-m", "stream_engine", "worker"]
    pid = spawn(layout, "worker", argv, env={**env, "PYTHONPATH": str(REPO)})
    log = layout.log_file("worker")

    def ready() -> bool:
        if running_pid(layout, "worker") is None:
            raise StackError(f"worker exited during start; see {log}\n{tail(log, 25)}")
        return _http_ok(metrics)

    wait_until(ready, timeout, "worker", log)
    return f"started (pid {pid}); metrics {metrics}"


def admin_token(layout: Layout) -> str:
    """The local stack's admin token for the API's /admin routes, made once per stack dir."""
    path = layout.stack_dir / "admin_token"
    if not path.exists():
        layout.stack_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def start_api(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    url = f"http://{HOST}:{ports['api']}"
    if (pid := running_pid(layout, "api")) is not None:
        return f"already running (pid {pid}) on {url}"
    env = {
        **stack_env(ports),
        "KAIROS_API_PORT": str(ports["api"]),
        "KAIROS_STACK_DIR": str(layout.stack_dir),
        "KAIROS_ADMIN_TOKEN": admin_token(layout),
        "PYTHONPATH": str(REPO),
    }
    pid = spawn(layout, "api", [sys.executable, "-m", "api"], env=env)
    log = layout.log_file("api")

    def ready() -> bool:
        if running_pid(layout, "api") is None:
            raise StackError(f"api exited during start; see {log}\n{tail(log, 25)}")
        return _http_ok(f"{url}/readyz")

    wait_until(ready, timeout, "api", log)
    return f"started (pid {pid}) on {url}"


def _start_job(layout: Layout, ports: dict[str, int], name: str, argv: list[str]) -> str:
    """A background stream_engine job with the stack's settings (no metrics port)."""
    if (pid := running_pid(layout, name)) is not None:
        return f"already running (pid {pid})"
    env = {**stack_env(ports), "KAIROS_STACK_DIR": str(layout.stack_dir),
           "KAIROS_METRICS_PORT": "0", "PYTHONPATH": str(REPO)}  # fmt: skip
    pid = spawn(layout, name, [sys.executable, "-m", "stream_engine", *argv], env=env)
    time.sleep(0.5)
    if running_pid(layout, name) is None:
        log = layout.log_file(name)
        raise StackError(f"{name} exited during start; see {log}\n{tail(log, 25)}")
    return f"started (pid {pid})"


def start_attribution(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    """The attribution consumer (decisions + clickstream -> the report's counters)."""
    return _start_job(layout, ports, "attribution", ["attribution"])


def start_learner(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    """The embeddings learner (co-visitation -> learned item vectors, every minute)."""
    return _start_job(layout, ports, "learner", ["latent"])


def start_simulator(layout: Layout, ports: dict[str, int], timeout: float) -> str:
    """Simulated shoppers (python -m loadtest simulate) into the stack's clickstream."""
    if (pid := running_pid(layout, "simulator")) is not None:
        return f"already running (pid {pid})"
    env = {**stack_env(ports), "KAIROS_STACK_DIR": str(layout.stack_dir),
           "PYTHONPATH": str(REPO)}  # fmt: skip
    rate = os.environ.get("KAIROS_SIMULATOR_RATE", "20")
    argv = [sys.executable, "-m", "loadtest", "simulate", "--rate", rate]
    pid = spawn(layout, "simulator", argv, env=env)
    time.sleep(0.5)
    if running_pid(layout, "simulator") is None:
        log = layout.log_file("simulator")
        raise StackError(f"simulator exited during start; see {log}\n{tail(log, 25)}")
    return f"started (pid {pid}), {rate} events/s (KAIROS_SIMULATOR_RATE)"


# ----------------------------------------------------------------------------- commands

SERVICES: dict[str, Callable[[Layout, dict[str, int], float], str]] = {
    "redis": start_redis,
    "kafka": start_kafka,
    "worker": start_worker,
    "api": start_api,
    "attribution": start_attribution,
    "learner": start_learner,
    "simulator": start_simulator,
}
DEFAULT_SERVICES = ["redis", "kafka"]
DEMO_SERVICES = ["redis", "kafka", "worker", "api", "attribution", "learner"]
STOP_ORDER = ["api", "worker", "attribution", "learner", "simulator", "kafka", "redis"]


def _running(layout: Layout) -> set[str]:
    return {name for name in STOP_ORDER if running_pid(layout, name) is not None}


def cmd_up(layout: Layout, names: list[str], timeout: float) -> int:
    t0 = time.monotonic()
    ports = choose_ports(layout, _running(layout))
    env = write_env(layout, ports)
    for name in names or DEFAULT_SERVICES:
        if name not in SERVICES:
            raise StackError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
        t = time.monotonic()
        print(f"{name:<7} {SERVICES[name](layout, ports, timeout)} [{time.monotonic() - t:.1f}s]")
    print(f"stack ready in {time.monotonic() - t0:.1f}s; environment ({layout.env_file}):")
    for k, v in env.items():
        print(f"  {k}={v}")
    return 0


def cmd_demo(layout: Layout, timeout: float, detach: bool, simulate: bool = True) -> int:
    """Everything a newcomer needs, in the foreground; Ctrl-C stops what it started."""
    services = DEMO_SERVICES + (["simulator"] if simulate else [])
    cmd_up(layout, services, timeout)
    ports = load_ports(layout)
    print("\nKairos is running:")
    api = f"http://{HOST}:{ports['api']}"
    print(f"  demo storefront {api}/demo")
    token = admin_token(layout)
    print(f"  report          {api}/admin/report/page#token={token}")
    page = '{"session_id": "demo-1", "slots": ["home_hero", "home_recs"]}'
    click = '{"type": "click", "session_id": "demo-1", "item_id": "sku-000003"}'
    print(f"  one slot        {api}/v1/slots/home_recs?session_id=demo-1")
    print(f"  a whole page    curl -XPOST {api}/v1/decisions -d '{page}'")
    print(f"  send a click    curl -XPOST {api}/v1/events -d '{click}'")
    print(f"  API docs        {api}/openapi.json   metrics {api}/metrics")
    print(f"  admin token     {layout.stack_dir / 'admin_token'} (Authorization: Bearer …)")
    print(f"  worker metrics  http://{HOST}:{ports['worker_metrics']}/metrics")
    print(f"  publish events  Kafka {HOST}:{ports['kafka']}, topic clickstream (docs/events.md)")
    print(f"  session state   redis-cli -p {ports['redis']} --scan --pattern 'kairos:*'")
    if detach:
        print("stop it with: make down")
        return 0
    print("Ctrl-C stops everything.")

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Also when started without a terminal (SIGINT ignored in background jobs) or stopped
    # with kill (SIGTERM): stop what we started either way.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        while all(running_pid(layout, n) is not None for n in services):
            time.sleep(1)
        print("a service exited; stopping the rest (see `make logs`)", file=sys.stderr)
    except KeyboardInterrupt:
        print()
    cmd_down(layout)
    return 0


def cmd_down(layout: Layout, names: list[str] | None = None) -> int:
    """Stop the named services (all that `up` started when none are named), dependents
    first (STOP_ORDER): `down api` restarts nothing and leaves Kafka and Redis up."""
    unknown = sorted(set(names or ()) - set(STOP_ORDER))
    if unknown:
        print(f"unknown service {', '.join(unknown)}; the services are {', '.join(STOP_ORDER)}",
              file=sys.stderr)  # fmt: skip
        return 2
    for name in STOP_ORDER:
        if names and name not in names:
            continue
        if layout.pid_file(name).exists():
            print(f"{name:<7} {stop(layout, name)}")
        elif names:
            print(f"{name:<7} not running")
    return 0


def cmd_status(layout: Layout) -> int:
    ports = load_ports(layout)
    healthy = True
    for name in ("kafka", "redis"):
        pid = running_pid(layout, name)
        port = ports.get(name)
        if pid is None or port is None:
            print(f"{name:<7} down")
            healthy = False
            continue
        ok = kafka_ready(port) if name == "kafka" else redis_ping(port)
        healthy &= ok
        print(f"{name:<7} {'up' if ok else 'UNHEALTHY'} (pid {pid}) {HOST}:{port}")
    for name in ("worker", "api", "attribution", "learner", "simulator"):
        if (pid := running_pid(layout, name)) is not None:
            print(f"{name:<7} up (pid {pid})")
    return 0 if healthy else 1


def _follow(path: Path) -> Iterator[str]:
    with path.open(errors="replace") as f:
        f.seek(0, os.SEEK_END)
        while True:
            line = f.readline()
            if line:
                yield line
            else:
                time.sleep(0.2)


def cmd_logs(layout: Layout, name: str | None, lines: int, follow: bool) -> int:
    names = [name] if name else [n for n in STOP_ORDER if layout.log_file(n).exists()]
    for n in names:
        print(f"==> {layout.log_file(n)} <==")
        print(tail(layout.log_file(n), lines))
    if follow and len(names) == 1:
        with contextlib.suppress(KeyboardInterrupt):
            for line in _follow(layout.log_file(names[0])):
                print(line, end="", flush=True)
    return 0


def cmd_env(layout: Layout) -> int:
    ports = load_ports(layout)
    if not ports:
        print("stack was never started here; run: python deploy/stack.py up", file=sys.stderr)
        return 1
    for k, v in stack_env(ports).items():
        print(f"export {k}={v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start services (default: kafka and redis)")
    up.add_argument("services", nargs="*")
    up.add_argument("--timeout", type=float, default=float(os.environ.get("KAIROS_UP_TIMEOUT", 90)))
    demo = sub.add_parser("demo", help="start everything and stay in the foreground")
    demo.add_argument("--detach", action="store_true", help="return once everything is up")
    demo.add_argument("--no-simulator", action="store_true", help="no simulated shoppers")
    demo.add_argument("--timeout", type=float, default=90.0)
    down = sub.add_parser("down", help="stop services (default: everything `up` started)")
    down.add_argument("services", nargs="*")
    sub.add_parser("status", help="health of each service")
    logs = sub.add_parser("logs", help="show service logs")
    logs.add_argument("service", nargs="?")
    logs.add_argument("-n", type=int, default=40)
    logs.add_argument("-f", "--follow", action="store_true")
    sub.add_parser("env", help="print the KAIROS_* variables of this stack")
    sub.add_parser("browser", help="install Debian's chromium if missing; print its path")
    args = parser.parse_args(argv)
    layout = Layout.from_env()
    try:
        if args.command == "up":
            return cmd_up(layout, args.services, args.timeout)
        if args.command == "demo":
            return cmd_demo(layout, args.timeout, args.detach, not args.no_simulator)
        if args.command == "down":
            return cmd_down(layout, args.services)
        if args.command == "status":
            return cmd_status(layout)
        if args.command == "logs":
            return cmd_logs(layout, args.service, args.n, args.follow)
        if args.command == "browser":  # for the demo's real-browser test
            print(ensure_debian_binary("chromium", "chromium"))
            return 0
        return cmd_env(layout)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
