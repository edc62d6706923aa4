"""`python -m loadtest stalls`: its arithmetic, its refusals, and a small run on the real
Redis."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadtest.stalls import MEASURES, summarize
from tests.conftest import Stack


def test_the_summary_is_the_median_of_each_measure() -> None:
    rounds = {"idle": [(1.0, 20.0), (3.0, 10.0), (2.0, 30.0)], "catalog": [(9.0, 8.0)]}
    s = summarize(rounds)
    assert s["idle"] == {"longest_wait_ms": 2.0, "cpu_ms": 20.0}
    assert s["catalog"] == {"longest_wait_ms": 9.0, "cpu_ms": 8.0}
    with pytest.raises(ValueError, match="no latent rounds"):
        summarize({"latent": []})


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--items", "10"], "argument --items: must be at least 100, got 10"),
     (["--items", "100", "--changes", "60", "--repeats", "2"], "must not exceed --items")],
)  # fmt: skip
def test_bad_arguments_are_refused_before_anything_runs(args: list[str], says: str) -> None:
    out = subprocess.run([sys.executable, "-m", "loadtest", "stalls", *args],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2
    assert says in out.stderr


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_small_run_reports_every_measure_on_the_real_redis(stack: Stack) -> None:
    env = {**os.environ, "KAIROS_REDIS_URL": stack.redis_url}
    argv = [sys.executable, "-m", "loadtest", "stalls", "--items", "600", "--changes", "20",
            "--repeats", "2"]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=170, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("  round ") == 2
    summary = out.stdout.split("median of 2")[1]
    for name in MEASURES:
        assert f"  {name} " in summary
    # (the command checks that each refresh applied its changes and installed its model,
    # and fails otherwise: a figure for work that did not happen is worse than none)
