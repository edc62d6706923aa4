"""The "zero-to-zero" report: is personalization on, for whom, and does it change anything?

Built from the counters the attribution consumer keeps (stream_engine/attribution.py) over a
window of minutes: per slot, the share of decisions that were personalized and why the
rest were not; treatment vs holdout click-through and conversion with the lift, a 95%
confidence interval and the sample sizes ("not enough data yet" below the minimums); a
sample-ratio-mismatch check of the observed split against the configured one; banners and
rules that never fired; identity resolution. Each figure carries the threshold at which it
becomes a warning, and the warnings are written for a person.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from api.config import DecisionConfig
from stream_engine.state import FRESHNESS_FIELDS, FRESHNESS_MS
from stream_engine.store import hash_reply, wrong_type_as_none

PERSONAL = ("personalized", "profile", "contextual")
MIN_EXPOSURES = 200  # per group, before a lift is shown
MIN_EVENTS = 10  # successes (clicks or purchases) over both groups
SRM_P = 0.001
DEFAULT_SHARE_WARN = 0.5  # more than half of a slot's decisions were defaults
Z95 = 1.959964
MAX_REPORT_MINUTES = 8 * 24 * 60  # what the counters' TTL keeps
COUNTED = frozenset("xkapr")  # exposures, clicks, carts, purchases, revenue (attribution.py)


@dataclass(frozen=True, slots=True)
class Window:
    minutes: int
    until_ms: int

    @property
    def minute_range(self) -> range:
        last = self.until_ms // 60_000
        return range(last - self.minutes + 1, last + 1)

    @property
    def hour_range(self) -> range:
        first = (self.minute_range[0] * 60_000) // 3_600_000
        return range(first, self.until_ms // 3_600_000 + 1)


Execute = Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]]


async def read_counters(
    execute: Execute, prefix: str, window: Window
) -> tuple[dict[str, float], dict[int, dict[str, float]], dict[str, int]]:
    """(totals over the window, per-minute counters, HyperLogLog counts), in one round trip
    through `execute` (a held connection's batch: see api/session_state.py), which returns
    error replies rather than raising them. A key of another type or a counter that is not
    a number (written by something else than attribution) counts as none, rather than
    failing the report until it expires; any other error is raised."""
    minutes = list(window.minute_range)
    cmds: list[tuple[Any, ...]] = [("HGETALL", f"{prefix}:{{report}}:m:{m}") for m in minutes]
    hours = list(window.hour_range)
    hll = {"treatment": "v:treatment", "holdout": "v:holdout", "sessions": "s", "linked": "su",
           "personalized": "vp"}  # fmt: skip
    for kind in hll.values():
        cmds.append(("PFCOUNT", *[f"{prefix}:{{report}}:{kind}:{h}" for h in hours]))
    replies = wrong_type_as_none(await execute(cmds))
    totals: dict[str, float] = defaultdict(float)
    series: dict[int, dict[str, float]] = {}
    for m, raw in zip(minutes, replies[: len(minutes)], strict=True):
        if raw:
            row = {_text(k): v for k, raw_v in hash_reply(raw).items()
                   if (v := _count(raw_v)) is not None}  # fmt: skip
            series[m] = row
            for k, v in row.items():
                totals[k] += v
    counts = {name: int(c or 0) for name, c in zip(hll, replies[len(minutes) :], strict=True)}
    return dict(totals), series, counts


def _count(raw: bytes | str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def proportion_lift(success_t: float, n_t: float, success_h: float, n_h: float) -> dict[str, Any]:
    """Treatment vs holdout rate: absolute and relative lift with a 95% interval (normal
    approximation of the difference of two proportions), or why there is none yet."""
    out: dict[str, Any] = {"treatment": {"n": int(n_t), "successes": int(success_t)},
                           "holdout": {"n": int(n_h), "successes": int(success_h)}}  # fmt: skip
    if min(n_t, n_h) < MIN_EXPOSURES or success_t + success_h < MIN_EVENTS:
        out["status"] = "not enough data yet"
        out["needs"] = (f"at least {MIN_EXPOSURES} exposures per group and {MIN_EVENTS} "
                        "successes in all")  # fmt: skip
        return out
    p_t, p_h = success_t / n_t, success_h / n_h
    diff = p_t - p_h
    se = math.sqrt(p_t * (1 - p_t) / n_t + p_h * (1 - p_h) / n_h)
    low, high = diff - Z95 * se, diff + Z95 * se
    out["treatment"]["rate"] = p_t
    out["holdout"]["rate"] = p_h
    out.update(
        status="ok",
        absolute_lift=diff,
        ci95=[low, high],
        relative_lift=diff / p_h if p_h > 0 else None,
        relative_ci95=[low / p_h, high / p_h] if p_h > 0 else None,
        significant=low > 0 or high < 0,
    )
    return out


def sample_ratio(n_holdout: float, n_total: float, share: float) -> dict[str, Any]:
    """Chi-square test (1 degree of freedom) of the observed holdout share."""
    out: dict[str, Any] = {"expected_holdout_share": share, "n": int(n_total)}
    if n_total < 100 or share <= 0 or share >= 1:
        out["status"] = "not enough data yet"
        return out
    expected_h, expected_t = n_total * share, n_total * (1 - share)
    chi2 = (n_holdout - expected_h) ** 2 / expected_h + (
        (n_total - n_holdout) - expected_t
    ) ** 2 / expected_t
    p = math.erfc(math.sqrt(chi2 / 2))
    out.update(observed_holdout_share=n_holdout / n_total, chi2=chi2, p_value=p,
               status="mismatch" if p < SRM_P else "ok")  # fmt: skip
    return out


def _cells(totals: Mapping[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """slot -> "strategy|group" -> metric -> value."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for key, value in totals.items():
        parts = key.split("|")
        if len(parts) == 4 and parts[0] in COUNTED:
            out[parts[1]][f"{parts[2]}|{parts[3]}"][parts[0]] = value
    return out


def _slot_report(slot: str, cells: Mapping[str, Mapping[str, float]],
                 totals: Mapping[str, float]) -> dict[str, Any]:  # fmt: skip
    by_group: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_strategy: dict[str, float] = defaultdict(float)
    for cell, metrics in cells.items():
        strategy, group = cell.split("|")
        by_strategy[strategy] += metrics.get("x", 0.0)
        for m, v in metrics.items():
            by_group[group][m] += v
    exposures = sum(by_strategy.values())
    personal = sum(by_strategy[s] for s in PERSONAL)
    reasons = {k.split("|")[2]: v for k, v in totals.items()
               if k.startswith(f"f|{slot}|")}  # fmt: skip
    t, h = by_group["treatment"], by_group["holdout"]
    return {
        "decisions": int(exposures),
        "personalized_share": personal / exposures if exposures else None,
        "default_share": 1 - personal / exposures if exposures else None,
        "by_strategy": {k: int(v) for k, v in sorted(by_strategy.items())},
        "fallback_reasons": {k: int(v) for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])},
        "click_through": proportion_lift(t["k"], t["x"], h["k"], h["x"]),
        "conversion": proportion_lift(t["p"], t["x"], h["p"], h["x"]),
        "revenue": {"treatment": round(t["r"], 2), "holdout": round(h["r"], 2)},
    }


def _warnings(slots: Mapping[str, Any], srm: Mapping[str, Any], identity: Mapping[str, Any],
              never: Mapping[str, list[str]]) -> list[str]:  # fmt: skip
    out: list[str] = []
    for name, s in slots.items():
        share = s["default_share"]
        if share is not None and share > DEFAULT_SHARE_WARN:
            reasons = s["fallback_reasons"]
            top = max(reasons, key=lambda k: reasons[k]) if reasons else "unknown"
            top_share = reasons.get(top, 0) / s["decisions"] if s["decisions"] else 0
            hint = {"no_signal": " — most sessions have no history yet when they ask",
                    "paused": " — personalization is paused for it",
                    "timeout": " — decisions run out of time",
                    "store_unavailable": " — Redis is unavailable",
                    "overload": " — the API sheds load"}.get(top, "")  # fmt: skip
            out.append(f"{share:.0%} of {name} decisions were the default: {top_share:.0%} "
                       f"had {top.replace('_', ' ')}{hint}")  # fmt: skip
        for metric in ("click_through", "conversion"):
            lift = s[metric]
            if lift["status"] == "ok" and lift["significant"] and lift["absolute_lift"] < 0:
                out.append(f"{name}: the holdout {metric.replace('_', '-')} is higher than "
                           "the treatment's (personalization is doing harm here)")  # fmt: skip
    if srm.get("status") == "mismatch":
        out.append(f"sample ratio mismatch: {srm['observed_holdout_share']:.1%} of visitors "
                   f"were in the holdout, {srm['expected_holdout_share']:.1%} configured "
                   f"(p = {srm['p_value']:.1g}); the lift figures can't be trusted")  # fmt: skip
    if never["banners"]:
        out.append(f"{len(never['banners'])} configured banner(s) never served: "
                   + ", ".join(never["banners"][:5]))  # fmt: skip
    if never["rules"]:
        out.append(f"{len(never['rules'])} rule(s) never fired: " + ", ".join(never["rules"][:5]))
    linked = identity.get("linked_session_share")
    if linked is not None and linked < 0.05:
        out.append(f"only {linked:.1%} of sessions are linked to a user: anonymous and "
                   "logged-in visitors stay strangers")  # fmt: skip
    return out


def _served(seen: set[str], configured: list[str]) -> str:
    return f"{len(seen & set(configured))} of {len(configured)}"


FRESHNESS_P99_WARN_MS = 100.0
SIGNAL_WARN = 0.2  # fewer than a fifth of visitors ever got a personalized answer


def freshness(totals: Mapping[str, float]) -> dict[str, Any]:
    """p50/p99 of produced -> state written, as the upper bound of the histogram bucket."""
    counts = [totals.get(f, 0.0) for f in FRESHNESS_FIELDS]
    total = sum(counts)
    out: dict[str, Any] = {"events": int(total)}
    if not total:
        return out
    bounds = [*FRESHNESS_MS, math.inf]
    for name, q in (("p50_ms_at_most", 0.5), ("p99_ms_at_most", 0.99)):
        running = 0.0
        for bound, n in zip(bounds, counts, strict=True):
            running += n
            if running >= q * total:
                out[name] = bound
                break
    return out


def build_report(
    config: DecisionConfig,
    totals: Mapping[str, float],
    series: Mapping[int, Mapping[str, float]],
    counts: Mapping[str, int],
    window: Window,
) -> dict[str, Any]:
    cells = _cells(totals)
    slots = {name: _slot_report(name, cells.get(name, {}), totals) for name in config.slots}
    visitors = counts.get("treatment", 0) + counts.get("holdout", 0)
    srm = sample_ratio(counts.get("holdout", 0), visitors, config.holdout_share)
    srm["unit"] = "visitors (sessions exposed)"
    served_banners = {k[2:] for k in totals if k.startswith("b|")}
    fired_rules = {k[2:] for k in totals if k.startswith("u|")}
    never = {
        "banners": sorted(b.banner_id for b in config.banners if b.banner_id not in served_banners),
        "rules": sorted(r.rule_id for r in config.rules if r.rule_id not in fired_rules),
    }
    fresh = freshness(totals)
    signal = {
        "visitors": visitors,
        "personalized_visitor_share": counts.get("personalized", 0) / visitors
        if visitors
        else None,
    }
    events = totals.get("ev", 0.0)
    sessions = counts.get("sessions", 0)
    identity = {
        "events": int(events),
        "events_with_user_share": totals.get("eu", 0.0) / events if events else None,
        "sessions": sessions,
        "linked_session_share": counts.get("linked", 0) / sessions if sessions else None,
    }
    over_time = []
    for minute in sorted(series):
        row = series[minute]
        per_slot = {}
        for name in config.slots:
            x = sum(v for k, v in row.items() if k.startswith(f"x|{name}|"))
            p = sum(v for k, v in row.items()
                    if k.startswith(f"x|{name}|") and k.split("|")[2] in PERSONAL)  # fmt: skip
            per_slot[name] = {"decisions": int(x), "personalized_share": p / x if x else None}
        over_time.append({"minute": minute * 60_000, "slots": per_slot})
    report: dict[str, Any] = {
        "generated_at": int(time.time() * 1000),
        "window": {"minutes": window.minutes, "until": window.until_ms},
        "config_version": config.version,
        "thresholds": {
            "default_share_warning": DEFAULT_SHARE_WARN,
            "lift_min_exposures_per_group": MIN_EXPOSURES,
            "lift_min_successes": MIN_EVENTS,
            "sample_ratio_p_value": SRM_P,
            "linked_session_share_warning": 0.05,
            "freshness_p99_ms_warning": FRESHNESS_P99_WARN_MS,
            "personalized_visitor_share_warning": SIGNAL_WARN,
        },
        "slots": slots,
        "sample_ratio": srm,
        "served": {
            "banners": _served(served_banners, [b.banner_id for b in config.banners]),
            "rules": _served(fired_rules, [r.rule_id for r in config.rules]),
        },
        "never_fired": never,
        "identity": identity,
        "freshness": fresh,
        "signal": signal,
        "over_time": over_time,
    }
    warnings = _warnings(slots, srm, identity, never)
    report["warnings"] = warnings
    if fresh.get("p99_ms_at_most", 0) > FRESHNESS_P99_WARN_MS:
        warnings.append(
            f"freshness p99 is up to {fresh['p99_ms_at_most']:g} ms: a click takes that long "
            "to reach the next decision"
        )
    share = signal["personalized_visitor_share"]
    if share is not None and share < SIGNAL_WARN:
        warnings.append(
            f"only {share:.0%} of visitors ever got a personalized answer: most sessions "
            "leave before their first event reaches the engine"
        )
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _lift_cell(lift: Mapping[str, Any]) -> str:
    if lift["status"] != "ok":
        return "not enough data yet"
    low, high = lift["ci95"]
    return (f"{lift['treatment']['rate']:.2%} vs {lift['holdout']['rate']:.2%}: "
            f"{lift['absolute_lift']:+.2%} [{low:+.2%}, {high:+.2%}]")  # fmt: skip


def render_table(report: Mapping[str, Any]) -> str:
    """The report as the CLI prints it."""
    lines = [f"Kairos report: last {report['window']['minutes']} min, "
             f"config {report['config_version']}", ""]  # fmt: skip
    head = f"{'slot':<16} {'decisions':>9} {'personal':>9}  {'top fallback':<22} click-through lift"
    lines += [head, "-" * len(head)]
    for name, s in report["slots"].items():
        reasons = s["fallback_reasons"]
        top = next(iter(reasons), "")
        top_text = f"{top} {reasons[top] / s['decisions']:.0%}" if top and s["decisions"] else ""
        lines.append(f"{name:<16} {s['decisions']:>9} {_pct(s['personalized_share']):>9}  "
                     f"{top_text:<22} {_lift_cell(s['click_through'])}")  # fmt: skip
    srm = report["sample_ratio"]
    lines += ["", f"sample ratio: {srm['status']}"
              + (f" (holdout {srm['observed_holdout_share']:.1%}, configured "
                 f"{srm['expected_holdout_share']:.1%})" if "observed_holdout_share" in srm
                 else "")]  # fmt: skip
    ident = report["identity"]
    lines.append(f"identity: {_pct(ident['events_with_user_share'])} of {ident['events']} "
                 f"events carry a user; {_pct(ident['linked_session_share'])} of "
                 f"{ident['sessions']} sessions linked")  # fmt: skip
    fresh = report["freshness"]
    if "p99_ms_at_most" in fresh:
        lines.append(f"freshness: p50 <= {fresh['p50_ms_at_most']:g} ms, p99 <= "
                     f"{fresh['p99_ms_at_most']:g} ms over {fresh['events']} events")  # fmt: skip
    signal = report["signal"]
    lines.append(f"signal: {_pct(signal['personalized_visitor_share'])} of "
                 f"{signal['visitors']} visitors got a personalized answer")  # fmt: skip
    lines.append(f"served: banners {report['served']['banners']}, "
                 f"rules {report['served']['rules']}")  # fmt: skip
    lines += ["", "warnings:" if report["warnings"] else "no warnings"]
    lines += [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)
