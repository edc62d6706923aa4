"""`python -m loadtest` run as an SRE would, with the stack not where it looks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import free_port


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
