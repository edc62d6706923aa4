"""Replay: next-item questions scored for Kairos and for popularity, through the real
worker and API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from loadtest.replay import Scores, generate, read_log
from tests.conftest import REPO, Stack


def test_scores_count_hits_and_reciprocal_ranks() -> None:
    s = Scores(k=3)
    s.add(["a", "b", "c", "d"], "b")
    s.add(["a", "b", "c", "d"], "d")  # rank 4: outside k
    s.add(["x"], "x")
    out = s.as_json()
    assert out["questions"] == 3
    assert out["hit_rate@3"] == pytest.approx(2 / 3)
    assert out["mrr@3"] == pytest.approx((0.5 + 1.0) / 3)


def test_a_log_is_read_in_event_time_order_and_bad_rows_are_named(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("session_id,item_id,timestamp\ns1,a,2000\ns1,b,1000\n")
    assert [r.item_id for r in read_log(log)] == ["b", "a"]
    log.write_text("session_id,item_id,timestamp\ns1,a,soon\n")
    with pytest.raises(ValueError, match=r"log\.csv:2"):
        read_log(log)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_replay_scores_kairos_beside_popularity(
    kairos_services: str, stack: Stack, catalog_file: Path, unique: str, tmp_path: Path
) -> None:
    train = generate(tmp_path / "train.csv", catalog_file, sessions=100, seed=21)
    test = generate(tmp_path / "test.csv", catalog_file, sessions=8, seed=22)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAIROS_CATALOG_PATH": str(catalog_file)}
    argv = [sys.executable, "-m", "loadtest", "replay", "--train", str(train), "--test",
            str(test), "--api", kairos_services, "--bootstrap", stack.kafka_bootstrap,
            "--topic", f"clickstream.{unique}", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=150,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = list((tmp_path / "out").glob("replay-*.json"))
    body = orjson.loads(result.read_bytes())
    rows = read_log(test)
    first_events = len({r.session_id for r in rows})
    assert body["kairos"]["questions"] == len(rows) - first_events
    assert body["popularity"]["questions"] == body["kairos"]["questions"]
    assert 0 <= body["kairos"]["hit_rate@10"] <= 1
    # shoppers with a category affinity: the session's own signal beats what is popular
    assert body["kairos"]["hit_rate@10"] > body["popularity"]["hit_rate@10"]
    assert "hit rate@10" in done.stdout
