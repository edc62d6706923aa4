"""Replay: next-item questions scored for Kairos and for popularity, through the real
worker and API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _replay(api: str, stack: Stack, catalog: Path, unique: str, key_prefix: str,
            train: Path, test: Path, out: Path) -> tuple[dict[str, Any], str]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAIROS_CATALOG_PATH": str(catalog)}
    argv = [sys.executable, "-m", "loadtest", "replay", "--train", str(train), "--test",
            str(test), "--api", api, "--bootstrap", stack.kafka_bootstrap,
            "--topic", f"clickstream.{unique}", "--catalog-topic", f"catalog.{unique}",
            "--redis", stack.redis_url, "--key-prefix", key_prefix, "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=150,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = list(out.glob("replay-*.json"))
    body: dict[str, Any] = orjson.loads(result.read_bytes())
    rows = read_log(test)
    first_events = len({r.session_id for r in rows})
    assert body["kairos"]["questions"] == len(rows) - first_events
    assert body["popularity"]["questions"] == body["kairos"]["questions"]
    assert 0 <= body["kairos"]["hit_rate@10"] <= 1
    return body, done.stdout


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_replay_scores_kairos_beside_popularity(
    kairos_services: str, stack: Stack, catalog_file: Path, unique: str, key_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    train = generate(tmp_path / "train.csv", catalog_file, sessions=100, seed=21)
    test = generate(tmp_path / "test.csv", catalog_file, sessions=8, seed=22)
    body, stdout = _replay(kairos_services, stack, catalog_file, unique, key_prefix, train,
                           test, tmp_path / "out")  # fmt: skip
    assert body["registered_items"] == 0  # every item is in the catalog
    # shoppers with a category affinity: the session's own signal beats what is popular
    assert body["kairos"]["hit_rate@10"] > body["popularity"]["hit_rate@10"]
    assert "hit rate@10" in stdout


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_items_no_catalog_knows_are_registered_and_recommended_through_learned_vectors(
    kairos_services: str, stack: Stack, catalog_file: Path, unique: str, key_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    train = generate(tmp_path / "train.csv", catalog_file, sessions=400, seed=41, anonymous=True)
    test = generate(tmp_path / "test.csv", catalog_file, sessions=40, seed=42, anonymous=True)
    logged = {r.item_id for r in read_log(train) + read_log(test)}
    body, _ = _replay(kairos_services, stack, catalog_file, unique, key_prefix, train, test,
                      tmp_path / "out")  # fmt: skip
    assert body["registered_items"] == len(logged)
    assert body["latent_version"] >= 1
    # no category, no price: only co-visitation and the learned block can rank these
    assert body["kairos"]["hit_rate@10"] > body["popularity"]["hit_rate@10"]
