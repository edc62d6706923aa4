"""Load-test scenarios as data (TOML, `loadtest/scenarios/*.toml`) and the SLO verdict.

A scenario has a warm-up (excluded from every figure), steps of page views/s and
clickstream events/s, a traffic mix, and SLO thresholds that apply to the steps marked
`nominal`. `verdict()` turns a run's per-step results into pass/fail with reasons a person
can read ("step 2 (500/s): p99 31.2 ms > 15 ms").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIOS = Path(__file__).resolve().parent / "scenarios"  # the shipped *.toml files
FOLLOW_LIMIT_S = 5.0  # a click followed for freshness and not seen in a decision by then is lost
SLO_KEYS = ("p99_ms", "p999_ms", "error_rate", "max_degraded_share", "freshness_p99_ms")


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Step:
    rate: float
    events: float
    duration_s: float
    nominal: bool = False


@dataclass(frozen=True, slots=True)
class Traffic:
    multi_slot_share: float = 0.3
    returning_share: float = 0.6
    logged_in_share: float = 0.1
    freshness_sample: float = 0.02


STACK_WARMUP_S = 30.0  # a scenario's stack_warmup_s unless it says (Scenario)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    warmup_s: float
    steps: tuple[Step, ...]
    traffic: Traffic
    slo: dict[str, float]
    source: str = ""
    # Once, before the first step, at the nominal step's rates, not measured: a stack just
    # started is not the one the steps should measure. A cold Kafka broker used 75-80% of a
    # core for its first ~20 s (loading its logs, then compiling under load) against ~26%
    # warm, and the peak scenario's nominal step failed on every run started with the stack
    # (loadtest/JOURNAL.md, session 37).
    stack_warmup_s: float = STACK_WARMUP_S


def _number(where: str, table: dict[str, Any], key: str, low: float, high: float,
            default: float | None = None) -> float:  # fmt: skip
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where}: {key} must be a number")
    if not low <= value <= high:
        raise ScenarioError(f"{where}: {key} must be between {low} and {high}, got {value}")
    return float(value)


def parse_scenario(raw: dict[str, Any], where: str) -> Scenario:
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ScenarioError(f"{where}: a scenario needs at least one [[steps]]")
    steps = []
    for i, s in enumerate(steps_raw, start=1):
        at = f"{where}: steps[{i}]"
        if not isinstance(s, dict):
            raise ScenarioError(f"{at}: expected a table")
        steps.append(Step(_number(at, s, "rate", 1, 100_000),
                          _number(at, s, "events", 0, 100_000, 0),
                          _number(at, s, "duration_s", 1, 86_400),
                          bool(s.get("nominal", False))))  # fmt: skip
    if not any(s.nominal for s in steps):
        raise ScenarioError(f"{where}: mark at least one step nominal = true (the SLO's step)")
    t = raw.get("traffic", {})
    traffic = Traffic(*(_number(f"{where}: traffic", t, k, 0, 1, getattr(Traffic(), k))
                        for k in ("multi_slot_share", "returning_share", "logged_in_share",
                                  "freshness_sample")))  # fmt: skip
    slo_raw = raw.get("slo", {})
    unknown = sorted(set(slo_raw) - set(SLO_KEYS))
    if unknown:
        raise ScenarioError(f"{where}: unknown SLO key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(SLO_KEYS)}")  # fmt: skip
    slo = {k: _number(f"{where}: slo", slo_raw, k, 0, 1e9) for k in slo_raw}
    return Scenario(
        name=str(raw.get("name") or Path(where).stem),
        description=str(raw.get("description", "")),
        warmup_s=_number(where, raw, "warmup_s", 0, 3600, 2.0),
        steps=tuple(steps),
        traffic=traffic,
        slo=slo,
        source=where,
        stack_warmup_s=_number(where, raw, "stack_warmup_s", 0, 3600, STACK_WARMUP_S),
    )


def load_scenario(name_or_path: str) -> Scenario:
    """A file path, or the name of a scenario shipped in loadtest/scenarios/."""
    path = Path(name_or_path)
    if not path.exists():
        path = SCENARIOS / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
        raise ScenarioError(f"no scenario {name_or_path!r}; shipped: {known}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from None
    return parse_scenario(raw, str(path))


def verdict(scenario: Scenario, steps: list[dict[str, Any]]) -> list[str]:
    """Readable SLO failures of the nominal steps (empty: the run passed)."""
    failures: list[str] = []
    slo = scenario.slo
    for i, (step, result) in enumerate(zip(scenario.steps, steps, strict=True), start=1):
        if not step.nominal:
            continue
        name = f"step {i} ({step.rate:g}/s)"
        checks = [
            ("p99_ms", result["latency_ms"]["p99"], "p99 {v:.2f} ms > {t:g} ms"),
            ("p999_ms", result["latency_ms"]["p99.9"], "p99.9 {v:.2f} ms > {t:g} ms"),
            ("error_rate", result["error_rate"], "error rate {v:.3%} > {t:.3%}"),
            ("max_degraded_share", result["degraded_share"],
             "degraded answers {v:.2%} > {t:.2%}"),
            ("freshness_p99_ms", result["freshness_ms"].get("p99"),
             "freshness p99 {v:.0f} ms > {t:g} ms"),
        ]  # fmt: skip
        for key, value, text in checks:
            if key in slo and value is not None and value > slo[key]:
                failures.append(f"{name}: " + text.format(v=value, t=slo[key]))
        fresh = result["freshness_ms"]
        if "freshness_p99_ms" in slo and fresh.get("p99") is None:
            failures.append(f"{name}: no freshness sample came back")
        elif "freshness_p99_ms" in slo and fresh.get("lost"):
            failures.append(f"{name}: {fresh['lost']} of {fresh['samples']} clicks followed "
                            f"never showed in a decision within {FOLLOW_LIMIT_S:g} s")  # fmt: skip
    return failures


def invalid_steps(scenario: Scenario, steps: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Steps whose generator fell behind: the nominal ones (their verdict can't be trusted,
    so the run fails) and the others (they tell where this machine's generator gave out,
    not whether the SLO held)."""
    failures: list[str] = []
    notes: list[str] = []
    for i, (step, result) in enumerate(zip(scenario.steps, steps, strict=True), start=1):
        if not result.get("valid", True):
            line = f"step {i}: {result['invalid_because']}"
            (failures if step.nominal else notes).append(line)
    return failures, notes
