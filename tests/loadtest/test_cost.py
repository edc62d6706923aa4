"""`python -m loadtest cost`: the summary's arithmetic, and a small run on the real stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from loadtest.cost import MEASURES, Spread, summarize
from tests.conftest import Stack


def test_the_summary_takes_medians_and_spreads_and_relates_the_measures() -> None:
    rounds = {
        "decide": [100.0, 120.0, 110.0],
        "decide, cold": [150.0, 170.0, 130.0],
        "round trip": [50.0, 40.0, 60.0],
        "slot_body": [400.0, 300.0, 350.0],
    }
    s = summarize(rounds)
    assert s["decide"] == {"median": 110.0, "low": 100.0, "high": 120.0}
    assert s["decide, cold"]["median"] == 150.0
    assert s["cold_extra_us"] == pytest.approx(40.0)
    assert s["slot_body_per_round_trip"] == pytest.approx(7.0)


def test_no_rounds_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError, match="no rounds"):
        Spread.of([])


def test_bad_arguments_are_refused_before_anything_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "loadtest", "cost", "--rounds", "0"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2
    assert "argument --rounds: must be at least 1, got 0" in out.stderr


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_small_run_measures_each_figure_on_the_real_stack(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "KAIROS_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "KAIROS_REDIS_URL": stack.redis_url}  # fmt: skip
    argv = [sys.executable, "-m", "loadtest", "cost", "--sessions", "200", "--decisions", "100",
            "--rounds", "2", "--items", "500", "--out", str(tmp_path)]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=220, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    [results] = list(tmp_path.glob("cost-*.json"))
    body = orjson.loads(results.read_bytes())
    for name in MEASURES:
        assert len(body["rounds"][name]) == 2
        assert body["summary"][name]["median"] > 0
    s = body["summary"]
    # the endpoint reads, decides, publishes and encodes: more than the decision alone,
    # and more than a round trip that reads nothing
    assert s["slot_body"]["median"] > s["decide"]["median"]
    assert s["slot_body"]["median"] > s["round trip"]["median"]
    assert s["setup"]["sessions"] > 100
    assert "Redis round trips' worth" in out.stdout
