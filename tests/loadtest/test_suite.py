"""The peak-traffic suite: scenario files, the SLO verdict, and a smoke run end to end
against a real worker and API on the real Kafka and Redis (asserting that the report and
the verdict are produced and right for a known case, not absolute latencies)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hdrh.histogram import HdrHistogram

from loadtest.results import compare, knee, knee_line, load_previous, stack_warmup_line
from loadtest.scenario import (
    ScenarioError,
    Step,
    invalid_steps,
    load_scenario,
    parse_scenario,
    verdict,
)
from loadtest.suite import StepRecorder, live_line
from tests.conftest import REPO, Stack, free_port


def _result(p99: float, errors: int = 0, degraded: float = 0.0) -> dict[str, Any]:
    return {"latency_ms": {"p50": 1.0, "p99": p99, "p99.9": p99 * 2}, "errors": errors,
            "error_rate": errors / 1000, "degraded_share": degraded,
            "freshness_ms": {"p99": 20.0}}  # fmt: skip


def test_the_live_line_shows_the_last_second_beside_the_step_and_flags_a_broken_slo() -> None:
    rec = StepRecorder()
    for _ in range(90):
        rec.record(0, 0.002, [])
    for _ in range(10):
        rec.record(0, 0.030, ["timeout"])  # second 0: p99 30 ms, 10% degraded
    for _ in range(50):
        rec.record(1, 0.001, [])  # second 1: quiet again
    step = Step(rate=100, events=10, duration_s=30, nominal=True)
    first = live_line(rec, 2, step, 0, 15.0, errors=3, events=10)
    assert "100 answered/s" in first
    assert "p99   30.0" in first
    assert "degraded  10.0%" in first
    assert "errors 3" in first
    assert "]! SLO 15 ms" in first  # over the SLO: the bar says so
    assert "[####################]" in first  # 30 ms is twice the SLO: a full bar
    second = live_line(rec, 2, step, 1, 15.0, errors=0, events=10)
    assert "50 answered/s" in second
    assert "]  SLO" in second
    assert "(step 30.0" in second  # the step's p99 so far still holds the slow second
    assert "SLO" not in live_line(rec, 1, step, 1, None, errors=0, events=0)


def test_an_answer_recorded_builds_no_histogram_but_its_second_s_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A histogram per answer (setdefault's default, built every call) was 57% of the
    generator's CPU at 3,000/s: it fell behind, and its lateness read as the API's."""
    from loadtest import suite

    built: list[object] = []
    real = suite._second_histogram

    def counted() -> HdrHistogram:
        built.append(h := real())
        return h

    monkeypatch.setattr(suite, "_second_histogram", counted)
    rec = StepRecorder()
    for i in range(1000):
        rec.record(i // 500, 0.002, [])
    assert len(built) == 2  # one for each second
    assert rec.per_second[0].get_total_count() == 500
    assert rec.per_second[1].get_total_count() == 500
    assert rec.per_second[0].counts_len * 8 <= 32 * 1024  # a second kept all step long


def test_every_shipped_scenario_loads() -> None:
    for name in ("smoke", "peak", "spike", "soak", "overload"):
        scenario = load_scenario(name)
        assert any(s.nominal for s in scenario.steps)
        assert "p99_ms" in scenario.slo


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"steps": []}, "at least one [[steps]]"),
        ({"steps": [{"rate": 10, "duration_s": 5}]}, "mark at least one step nominal"),
        ({"steps": [{"rate": "fast", "duration_s": 5, "nominal": True}]}, "rate must be a number"),
        ({"steps": [{"rate": 10, "duration_s": 5, "nominal": True}], "slo": {"p95": 1}},
         "unknown SLO key(s) p95"),
    ],
)  # fmt: skip
def test_bad_scenarios_say_what_is_wrong(raw: dict[str, Any], says: str) -> None:
    with pytest.raises(ScenarioError, match=None) as err:
        parse_scenario(raw, "x.toml")
    assert says in str(err.value)
    assert "x.toml" in str(err.value)


def test_the_verdict_names_each_missed_slo_and_the_knee_the_first_rate_over_it() -> None:
    scenario = load_scenario("peak")
    results = [_result(5), _result(12, errors=3, degraded=0.05), _result(9), _result(40),
               _result(80)]  # fmt: skip
    failures = verdict(scenario, results)
    assert "step 2 (500/s): p99 12.00 ms > 15 ms" not in failures
    assert "step 2 (500/s): error rate 0.300% > 0.100%" in failures
    assert "step 2 (500/s): degraded answers 5.00% > 1.00%" in failures
    assert knee(scenario, results) == {"highest_rate_within_slo": 250.0,
                                       "first_rate_over_slo": 500.0,
                                       "generator_behind_from": None}  # fmt: skip


def test_a_followed_click_that_never_showed_fails_a_nominal_step() -> None:
    scenario = load_scenario("peak")
    results = [_result(5) for _ in scenario.steps]
    assert verdict(scenario, results) == []
    results[1]["freshness_ms"] = {"p99": 20.0, "samples": 200, "lost": 1}  # 0.5%: p99 holds
    assert verdict(scenario, results) == [
        "step 2 (500/s): 1 of 200 clicks followed never showed in a decision within 5 s"
    ]
    results[1]["freshness_ms"] = {"p99": None, "samples": 0, "lost": 0}
    assert verdict(scenario, results) == ["step 2 (500/s): no freshness sample came back"]


def test_a_generator_behind_fails_a_nominal_step_and_is_a_note_above_it() -> None:
    """The peak scenario's top steps are beyond what a generator sharing two cores with the
    whole stack can drive: that is where the knee search stops, not an SLO the run missed."""
    scenario = load_scenario("peak")  # step 2 (500/s) is the nominal one
    results = [_result(5) for _ in scenario.steps]
    for r in results[3:]:
        r.update(valid=False, invalid_because="the generator fell behind (late p99 60.0 ms)")
    assert invalid_steps(scenario, results) == (
        [], ["step 4: the generator fell behind (late p99 60.0 ms)",
             "step 5: the generator fell behind (late p99 60.0 ms)"])  # fmt: skip
    assert knee(scenario, results)["generator_behind_from"] == 1500.0
    assert knee_line(knee(scenario, results)) == (
        "knee: within the p99 SLO up to 2000/s, every step within it (the generator fell "
        "behind from 1500/s)")  # fmt: skip
    results[1].update(valid=False, invalid_because="the generator fell behind")
    failures, notes = invalid_steps(scenario, results)
    assert failures == ["step 2: the generator fell behind"]
    assert len(notes) == 2
    assert knee(scenario, results)["generator_behind_from"] == 500.0
    assert knee(scenario, [_result(5) for _ in scenario.steps])["generator_behind_from"] is None


def test_compare_flags_a_regression(tmp_path: Path) -> None:
    path = tmp_path / "before.json"
    path.write_bytes(orjson.dumps({"scenario": {"name": "peak"}, "steps": [_result(10.0)]}))
    before = load_previous(path, "peak")
    assert compare({"steps": [_result(11.0)]}, before) == []
    assert compare({"steps": [_result(15.0)]}, before) == [
        "step 1: p99 15.00 ms vs 10.00 ms before (+50%)"
    ]


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "No such file or directory"),
     (b"{not json", "not JSON"),
     (b'{"steps": 3}', "not the results of a `loadtest run`"),
     (b'{"scenario": {"name": "smoke"}, "steps": []}', "results of scenario 'smoke', not 'peak'")],
)  # fmt: skip
def test_a_file_to_compare_with_is_checked_before_the_run(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    """--compare with a wrong path ran the whole scenario, then ended in a traceback."""
    path = tmp_path / "before.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ScenarioError, match=re.escape(says)):
        load_previous(path, "peak")


@pytest.mark.parametrize(
    ("extra", "says"),
    [(["--slo", "bogus=3"], "KEY is one of p99_ms"),
     (["--slo", "p99_ms=-1"], "a number >= 0"),
     (["--slo", "p99_ms=nan"], "a number >= 0"),
     (["--compare", "/nonexistent/before.json"], "--compare /nonexistent/before.json"),
     (["--bootstrap", "kafka:abc"], "--bootstrap='kafka:abc': 'kafka:abc' is not host:port")],
)  # fmt: skip
def test_bad_slo_overrides_and_compare_files_stop_the_run_before_it_starts(
    extra: list[str], says: str
) -> None:
    """Nothing listens where the run would send its load: a run that started would end
    differently (an unknown SLO key used to be taken, and ignored, silently)."""
    nowhere = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "loadtest", "run", "smoke", "--api", f"http://{nowhere}",
            "--bootstrap", nowhere, *extra]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def _run(url: str, stack: Stack, catalog: Path, unique: str, out: Path,
         *extra: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAIROS_CATALOG_PATH": str(catalog),
           "KAIROS_REDIS_URL": stack.redis_url}  # fmt: skip
    argv = [sys.executable, "-m", "loadtest", "run", "smoke", "--api", url, "--bootstrap",
            stack.kafka_bootstrap, "--topic", f"clickstream.{unique}", "--out", str(out),
            *extra]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_smoke_run_produces_the_report_and_a_verdict_that_can_fail(
    kairos_services: str, stack: Stack, catalog_file: Path, unique: str, tmp_path: Path
) -> None:
    ok = _run(kairos_services, stack, catalog_file, unique, tmp_path / "ok",
              "--slo", "p99_ms=10000", "--slo", "freshness_p99_ms=60000")  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "VERDICT: PASS" in ok.stdout
    [results] = list((tmp_path / "ok").glob("loadtest-smoke-*.json"))
    body = orjson.loads(results.read_bytes())
    step = body["steps"][0]
    assert step["answered"] >= 300  # 100/s for 4 s, after the warm-up
    assert step["errors"] == 0
    assert body["baseline"]["latency_ms"]["p99"] > 0  # the null server, same run
    assert step["achieved_events"] > 50
    assert step["freshness_ms"]["samples"] > 0
    assert step["freshness_ms"]["lost"] == 0
    # Half the page views are of shoppers whose clicks are in the stream: not all cold starts.
    assert step["fallbacks"].get("no_signal", 0) < 0.8 * step["answered"]
    assert body["verdict"] == {"passed": True, "failures": [], "notes": []}
    assert body["environment"]["cores"]
    assert 0 < step["cpu"]["api"] < 200  # from the API's own /metrics, around the step
    assert "% of a core" in ok.stdout
    assert re.search(r"cold starts \d+%", ok.stdout)
    page = results.with_suffix(".html").read_text()
    assert page.count("<svg") == 4
    assert "PASSED" in page
    assert "<th>cold starts</th>" in page
    assert "no stack warm-up" in page  # the smoke scenario's stack_warmup_s is 0
    assert body["stack_warmup_cpu"] == {}

    broken = _run(kairos_services, stack, catalog_file, unique, tmp_path / "broken",
                  "--slo", "p99_ms=0.001")  # fmt: skip
    assert broken.returncode == 1
    assert "VERDICT: FAIL" in broken.stdout
    assert "step 1 (100/s): p99 " in broken.stdout
    assert "ms > 0.001 ms" in broken.stdout
    # The second run's clicks are new events, not the first run's again (which the worker
    # takes for duplicates: their followers waited in vain).
    [again] = list((tmp_path / "broken").glob("loadtest-smoke-*.json"))
    fresh = orjson.loads(again.read_bytes())["steps"][0]["freshness_ms"]
    assert fresh["samples"] > 0
    assert fresh["lost"] == 0


def test_the_api_s_cpu_seconds_come_from_its_metrics() -> None:
    from loadtest.suite import _cpu_seconds

    body = (b"# HELP process_cpu_seconds_total Total user and system CPU time\n"
            b"# TYPE process_cpu_seconds_total counter\n"
            b"process_cpu_seconds_total 12.5\nprocess_open_fds 17.0\n")  # fmt: skip
    assert _cpu_seconds(body, 3.0) == (12.5, 3.0)
    assert _cpu_seconds(b"kairos_api_in_flight 0.0\n", 3.0) is None
    assert _cpu_seconds(b"<html>not metrics</html>", 3.0) is None


def test_the_report_says_what_warmed_the_stack_up_and_how_busy_the_machine_was() -> None:
    body: dict[str, Any] = {"scenario": {"stack_warmup_s": 30.0},
                            "stack_warmup_cpu": {"generator": 29.1, "machine": 89.9}}  # fmt: skip
    assert stack_warmup_line(body) == (
        "stack warm-up: 30 s of the nominal step's traffic, not measured; the machine 90% busy "
        "meanwhile"
    )
    # results written before the warm-up existed: no such keys
    assert stack_warmup_line({"scenario": {}}).startswith("no stack warm-up")
