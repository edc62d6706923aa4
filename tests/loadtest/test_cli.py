"""`python -m loadtest` run as an SRE would, with the stack not where it looks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Stack, free_port


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["cost", "--rounds", "2"], "KAIROS_REDIS_URL"),
        (["ingest", "--rates", "1000", "--duration", "2", "--repeats", "1"],
         "KAIROS_KAFKA_BOOTSTRAP"),
        (["run", "smoke"], "KAIROS_KAFKA_BOOTSTRAP"),
    ],
)  # fmt: skip
def test_a_stack_it_cannot_reach_is_one_line_that_says_where_it_looked(
    command: list[str], env: str
) -> None:
    """A benchmark started before `make up` ended in a page of traceback from whichever
    client failed first."""
    port = free_port()  # nothing listens there
    where = f"redis://127.0.0.1:{port}/0" if env == "KAIROS_REDIS_URL" else f"127.0.0.1:{port}"
    done = subprocess.run([sys.executable, "-m", "loadtest", *command],
                          env={**os.environ, env: where}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"loadtest {command[0]}: " in done.stderr
    assert where in done.stderr
    assert "`make up`" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Unclosed" not in done.stderr


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["decisions", "--rates", "abc"], "--rates: each rate 'abc' is not a whole number"),
        (["decisions", "--rates", "0"], "argument --rates: each rate must be at least 1, got 0"),
        (["decisions", "--rates", "1000,-5"], "each rate must be at least 1, got -5"),
        (["decisions", "--rates", ","], "argument --rates: give at least one rate"),
        (["decisions", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        (["decisions", "--sessions", "0"], "argument --sessions: must be at least 1, got 0"),
        (["decisions", "--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
        (["ingest", "--duration", "-1"], "argument --duration: must be more than 0, got -1"),
        (["ingest", "--duration", "nan"], "argument --duration: 'nan' is not a number of seconds"),
        (["ingest", "--engines", "faust,nope"], "argument --engines: takes faust, aiokafka"),
        (["memory", "--engine", "nope"], "argument --engine: invalid choice: 'nope'"),
        (["drain", "--engines", ","], "argument --engines: takes faust"),
        (["simulate", "--rate", "0"], "argument --rate: must be more than 0, got 0"),
        (["replay", "--k", "0"], "argument --k: must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_before_anything_runs(command: list[str], says: str) -> None:
    """Rates of 0 divided by zero after the stack was seeded, negative ones ran and wrote a
    results file of nothing, --repeats 0 failed on an empty median at the end of the run:
    now the parser refuses each, naming the option, and nothing is started (the stack
    variables point at nothing: a run that started would fail differently)."""
    nowhere = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "KAIROS_KAFKA_BOOTSTRAP": nowhere,
           "KAIROS_REDIS_URL": f"redis://{nowhere}/0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "loadtest", *command], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr
    assert "make up" not in done.stderr  # refused by the parser, not by a failed connection


def test_a_redis_url_it_cannot_use_is_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest", "cost", "--rounds", "1"],
                          env={**os.environ, "KAIROS_REDIS_URL": "localhost:6379"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "loadtest cost: KAIROS_REDIS_URL='localhost:6379': Redis URL must specify" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_bench_stopped_by_sigterm_stops_the_api_it_started(stack: Stack) -> None:
    """A CI job's timeout or a `kill` ended the bench at once, and the API it had started
    (in a session of its own) kept running, port and all. SIGTERM now runs its cleanup."""
    env = {**os.environ, "KAIROS_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "KAIROS_REDIS_URL": stack.redis_url}  # fmt: skip
    argv = [sys.executable, "-m", "loadtest", "decisions", "--rates", "100", "--repeats", "1",
            "--duration", "60", "--sessions", "200", "--rss-items", "0"]  # fmt: skip
    bench = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        api = None
        deadline = time.monotonic() + 120
        while api is None and time.monotonic() < deadline and bench.poll() is None:
            api = _child_running(bench.pid, b"-m\0api")
            time.sleep(0.5)
        assert api is not None, "the bench started no API"
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 130
    assert b"interrupted; what it had started is stopped" in err
    assert b"Traceback" not in err
    assert not Path(f"/proc/{api}").exists()  # stopped and reaped


def _child_running(parent: int, marker: bytes) -> int | None:
    """The pid of a child of `parent` whose command line holds `marker`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if marker in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    return None
