"""deploy/stack.py: port choice, broker config, pid ownership, and a real up/down cycle."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy._stack_module import PATH, load

script = load()


def _layout(tmp_path: Path) -> object:
    return script.Layout(stack_dir=tmp_path / "stack", cache_dir=tmp_path / "cache")


def test_busy_default_port_moves_to_a_free_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for env_name, _ in script.PORT_DEFAULTS.values():
        monkeypatch.delenv(env_name, raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setitem(script.PORT_DEFAULTS, "redis", ("KAIROS_REDIS_PORT", taken))
        ports = script.choose_ports(_layout(tmp_path), running=set())
    assert ports["redis"] != taken
    assert script.load_ports(_layout(tmp_path)) == ports


def test_explicit_port_wins_and_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAIROS_REDIS_PORT", "45678")
    ports = script.choose_ports(_layout(tmp_path), running=set())
    assert ports["redis"] == 45678
    monkeypatch.delenv("KAIROS_REDIS_PORT")
    assert script.load_ports(_layout(tmp_path))["redis"] == 45678


def test_broker_properties_bind_loopback_with_single_node_internals(tmp_path: Path) -> None:
    ports = {"kafka": 19092, "kafka_controller": 19093, "redis": 16379, "api": 18000}
    text = script.kafka_properties(_layout(tmp_path), ports, partitions=3)
    props = dict(line.split("=", 1) for line in text.splitlines())
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["num.partitions"] == "3"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    # bounded by size as well as age, in segments small enough for the bound to bite
    assert int(props["log.retention.bytes"]) == script.LOCAL_RETENTION_BYTES
    assert 0 < int(props["log.segment.bytes"]) < script.LOCAL_RETENTION_BYTES


# spawn leaves its child to the stack's pid file: its Popen object, dropped unreaped, warns
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")  # fmt: skip
def test_a_log_past_its_limit_is_moved_aside_when_its_service_starts(tmp_path: Path) -> None:
    layout = script.Layout(stack_dir=tmp_path / "stack", cache_dir=tmp_path / "cache")
    log = layout.log_file("redis")
    log.parent.mkdir(parents=True)
    log.write_bytes(b"x" * 100)
    assert not script.rotate_log(log, limit=100)  # at the limit: kept
    log.write_bytes(b"old" * 50)
    assert script.rotate_log(log, limit=100)
    assert not log.exists()
    assert log.with_name("redis.log.1").read_bytes() == b"old" * 50
    log.write_bytes(b"new" * 50)
    assert script.rotate_log(log, limit=100)  # the one before is replaced: two at most
    assert log.with_name("redis.log.1").read_bytes() == b"new" * 50
    assert not script.rotate_log(layout.log_file("kafka"))  # none yet
    # spawn rotates before it appends its start line
    log.write_bytes(b"y" * (script.LOG_ROTATE_BYTES + 1))
    pid = script.spawn(layout, "redis", [sys.executable, "-c", "pass"])
    os.waitpid(pid, 0)
    assert log.with_name("redis.log.1").stat().st_size == script.LOG_ROTATE_BYTES + 1
    assert log.read_bytes().startswith(b"\n=== ")


def test_a_process_outside_the_stack_dir_is_never_ours(tmp_path: Path) -> None:
    assert not script._owned(os.getpid(), _layout(tmp_path))


@pytest.mark.integration
def test_up_then_down_leaves_no_process(tmp_path: Path, stack: object) -> None:
    """A second, redis-only stack in its own dir: `down` stops exactly what `up` started."""
    env = {
        **os.environ,
        "KAIROS_STACK_DIR": str(tmp_path / "stack"),
        "KAIROS_REDIS_PORT": str(free_port()),
    }
    run = [sys.executable, str(PATH)]
    up = subprocess.run([*run, "up", "redis"], env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    pid = int((tmp_path / "stack" / "redis" / "pid").read_text())
    assert Path(f"/proc/{pid}").exists()
    again = subprocess.run([*run, "up", "redis"], env=env, capture_output=True, text=True)
    assert "already running" in again.stdout
    # by name: an unknown one is refused, a named one not running leaves the rest up
    typo = subprocess.run([*run, "down", "reddis"], env=env, capture_output=True, text=True)
    assert typo.returncode == 2
    assert "unknown service reddis" in typo.stderr
    api = subprocess.run([*run, "down", "api"], env=env, capture_output=True, text=True)
    assert api.returncode == 0, api.stderr
    assert "api     not running" in api.stdout
    assert script._owned(pid, script.Layout(tmp_path / "stack", tmp_path / "cache"))
    down = subprocess.run([*run, "down"], env=env, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not script._owned(pid, script.Layout(tmp_path / "stack", tmp_path / "cache"))
    assert not (tmp_path / "stack" / "redis" / "pid").exists()


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka's storage tool reads "-t -abc..." as a missing id (a CI run failed so)."""
    import uuid

    ids = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(script.uuid, "uuid4", lambda: next(ids))
    assert script.new_cluster_id() == "AQEBAQEBAQEBAQEBAQEBAQ"
