"""Results of a suite run: the JSON file, the HTML report with plots, and compare mode."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, cast

import orjson

from loadtest.ingest import environment
from loadtest.scenario import Scenario, ScenarioError

REGRESSION = 1.2  # a p99 more than 20% above the previous run's is flagged


def write(out_dir: Path, scenario: Scenario, steps: list[dict[str, Any]],
          failures: list[str], redis_info: dict[str, Any],
          baseline: dict[str, Any] | None = None,
          notes: list[str] | None = None,
          stack_warmup: dict[str, float] | None = None) -> tuple[Path, Path]:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    body = {
        "scenario": {"name": scenario.name, "source": scenario.source, "slo": scenario.slo,
                     "warmup_s": scenario.warmup_s, "stack_warmup_s": scenario.stack_warmup_s,
                     "steps": [{"rate": s.rate, "events": s.events, "duration_s": s.duration_s,
                                "nominal": s.nominal} for s in scenario.steps]},
        "verdict": {"passed": not failures, "failures": failures, "notes": notes or []},
        "knee": knee(scenario, steps),
        "baseline": baseline or {},
        "stack_warmup_cpu": stack_warmup or {},
        "steps": steps,
        "environment": environment(redis_info),
    }  # fmt: skip
    json_path = out_dir / f"loadtest-{scenario.name}-{stamp}.json"
    json_path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    html_path = json_path.with_suffix(".html")
    html_path.write_text(render_html(body))
    return json_path, html_path


def knee(scenario: Scenario, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest offered rate whose p99 and errors met the SLO, the first that didn't, and
    the first whose generator fell behind (from there on, its lateness is in the latencies:
    the knee may lie higher on a machine of the generator's own)."""
    p99_slo = scenario.slo.get("p99_ms")
    held, broke = None, None
    behind = next((s.rate for s, r in zip(scenario.steps, steps, strict=True)
                   if not r.get("valid", True)), None)  # fmt: skip
    for step, result in zip(scenario.steps, steps, strict=True):
        p99 = result["latency_ms"]["p99"]
        ok = result["errors"] == 0 and (p99_slo is None or (p99 is not None and p99 <= p99_slo))
        if ok and broke is None:
            held = step.rate
        elif not ok and broke is None:
            broke = step.rate
    return {"highest_rate_within_slo": held, "first_rate_over_slo": broke,
            "generator_behind_from": behind}  # fmt: skip


def knee_line(k: dict[str, Any]) -> str:
    """The knee in words, for the run's last lines."""
    held, broke = k["highest_rate_within_slo"], k["first_rate_over_slo"]
    text = "knee: " + ("no step within the p99 SLO" if held is None
                       else f"within the p99 SLO up to {held:g}/s")  # fmt: skip
    text += ", every step within it" if broke is None else f", over it from {broke:g}/s"
    return text + _behind(k)


def load_previous(path: Path, scenario: str) -> dict[str, Any]:
    """A previous results file to compare against, read before the run starts: a path that
    is not one of `scenario`'s results is refused with the reason, not found at the end."""
    try:
        previous = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ScenarioError(f"--compare {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError:
        raise ScenarioError(f"--compare {path}: not JSON (a loadtest-*.json file?)") from None
    if not isinstance(previous, dict):
        raise ScenarioError(f"--compare {path}: not the results of a `loadtest run`")
    steps, ran = previous.get("steps"), previous.get("scenario")
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ScenarioError(f"--compare {path}: not the results of a `loadtest run`")
    name = ran.get("name") if isinstance(ran, dict) else None
    if name is not None and name != scenario:
        raise ScenarioError(f"--compare {path}: results of scenario {name!r}, not {scenario!r}")
    return cast(dict[str, Any], previous)


def compare(current: dict[str, Any], previous: dict[str, Any]) -> list[str]:
    """Regressions against a previous results file of the same scenario (load_previous)."""
    flagged = []
    for i, (now, before) in enumerate(
        zip(current["steps"], previous["steps"], strict=False), start=1
    ):
        p_now = now["latency_ms"]["p99"]
        p_before = before.get("latency_ms", {}).get("p99")
        if p_now and p_before and p_now > REGRESSION * p_before:
            flagged.append(f"step {i}: p99 {p_now:.2f} ms vs {p_before:.2f} ms before "
                           f"(+{(p_now / p_before - 1):.0%})")  # fmt: skip
        degraded_before = before.get("degraded_share", 0.0)
        if now["degraded_share"] > degraded_before + 0.01:
            flagged.append(f"step {i}: degraded {now['degraded_share']:.1%} vs "
                           f"{degraded_before:.1%} before")  # fmt: skip
        errors_before = before.get("errors", 0)
        if now["errors"] > errors_before:
            flagged.append(f"step {i}: {now['errors']} errors vs {errors_before} before")
    return flagged


def _polyline(points: list[tuple[float, float]], w: int, h: int, y_max: float,
              color: str) -> str:  # fmt: skip
    if not points:
        return ""
    x_max = max(x for x, _ in points) or 1.0
    xy = " ".join(f"{40 + (w - 50) * x / x_max:.1f},{h - 20 - (h - 30) * min(y, y_max) / y_max:.1f}"
                  for x, y in points)  # fmt: skip
    dots = "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{color}"/>'
                   for p in xy.split())  # fmt: skip
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{xy}"/>{dots}'


def _chart(title: str, series: list[tuple[str, str, list[tuple[float, float]]]],
           y_label: str) -> str:  # fmt: skip
    w, h = 1000, 220
    y_max = max([y for _, _, pts in series for _, y in pts] + [1e-9]) * 1.1
    lines = "".join(_polyline(pts, w, h, y_max, color) for _, color, pts in series)
    legend = " ".join(f'<span style="color:{c}">■ {html.escape(n)}</span>' for n, c, _ in series)
    return (f"<h2>{html.escape(title)}</h2><svg viewBox='0 0 {w} {h}' width='100%'>"
            f"<line x1='40' y1='{h - 20}' x2='{w}' y2='{h - 20}' stroke='#ccc'/>"
            f"<text x='2' y='12'>{y_max:.3g} {html.escape(y_label)}</text>"
            f"<text x='2' y='{h - 22}'>0</text>{lines}</svg><div>{legend}</div>")  # fmt: skip


COLORS = ["#3b5bdb", "#0ca678", "#f08c00", "#e03131", "#7048e8", "#1098ad"]


def _baseline(b: dict[str, Any]) -> str:
    if not b:
        return "no same-run baseline"
    lat = b["latency_ms"]
    return (
        f"same-run baseline (null server, same generator, {b['rate']:g}/s): "
        f"p50 {lat['p50']:.2f} / p99 {lat['p99']:.2f} / p99.9 {lat['p99.9']:.2f} ms"
    )


def stack_warmup_line(body: dict[str, Any]) -> str:
    """What ran before the steps, unmeasured (Runner.warm_up_stack), and how busy the
    machine was meanwhile."""
    seconds = body["scenario"].get("stack_warmup_s") or 0
    if not seconds:
        return "no stack warm-up: the steps met the stack as it was"
    cpu = body.get("stack_warmup_cpu") or {}
    busy = f"; the machine {cpu['machine']:.0f}% busy meanwhile" if "machine" in cpu else ""
    return f"stack warm-up: {seconds:g} s of the nominal step's traffic, not measured{busy}"


def _behind(knee: dict[str, Any]) -> str:
    rate = knee.get("generator_behind_from")
    return "" if rate is None else f" (the generator fell behind from {rate:g}/s)"


def cold_share(step: dict[str, Any]) -> str:
    """Answers from the cold-start ladder (`no_signal`): the cheap path, when most are."""
    n = step.get("fallbacks", {}).get("no_signal", 0)
    return f"{100 * n / step['answered']:.0f}%" if step.get("answered") else "-"


def _lost(freshness: dict[str, Any]) -> str:
    lost = freshness.get("lost") or 0
    return f" ({lost} of {freshness.get('samples', 0)} lost)" if lost else ""


def _row(i: int, s: dict[str, Any]) -> str:
    lat, fresh = s["latency_ms"], s["freshness_ms"]["p99"]
    valid = "yes" if s["valid"] else "NO: " + html.escape(s.get("invalid_because", ""))
    cells = [i + 1, f"{s['offered_rate']:g}", s["achieved_rate"], s["goodput"],
             f"{lat['p50'] or 0:.2f}", f"{lat['p99'] or 0:.2f}", f"{lat['p99.9'] or 0:.2f}",
             s["errors"], f"{100 * s['degraded_share']:.2f}%", cold_share(s),
             "-" if fresh is None else f"{fresh:.1f}" + _lost(s["freshness_ms"]),
             f"{s['cpu']['api']:g}%" if "api" in s.get("cpu", {}) else "-", valid]  # fmt: skip
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_html(body: dict[str, Any]) -> str:
    steps = body["steps"]
    offset = 0.0
    p99_series, degraded_series = [], []
    for i, s in enumerate(steps):
        color = COLORS[i % len(COLORS)]
        pts = [(offset + o["second"], o["p99_ms"]) for o in s["over_time"]]
        deg = [(offset + o["second"], 100 * o["degraded_share"]) for o in s["over_time"]]
        p99_series.append((f"step {i + 1} ({s['offered_rate']:g}/s)", color, pts))
        degraded_series.append((f"step {i + 1}", color, deg))
        offset += max([o["second"] for o in s["over_time"]] + [0]) + 1
    spectrum = [(f"step {i + 1}", COLORS[i % len(COLORS)],
                 [(float(j), float(p["ms"])) for j, p in enumerate(s["spectrum_ms"])])
                for i, s in enumerate(steps)]  # fmt: skip
    knee_pts = [(s["offered_rate"], s["latency_ms"]["p99"] or 0.0) for s in steps]
    rows = "".join(_row(i, s) for i, s in enumerate(steps))
    verdict = body["verdict"]
    failures = "".join(f"<li>{html.escape(f)}</li>" for f in verdict["failures"])
    status = (
        "<p style='color:#0ca678'><b>PASSED</b></p>"
        if verdict["passed"]
        else f"<p style='color:#e03131'><b>FAILED</b></p><ul>{failures}</ul>"
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in verdict.get("notes", []))
    if notes:
        status += f"<p>Not nominal steps, so not in the verdict:</p><ul>{notes}</ul>"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Kairos load test: {html.escape(body["scenario"]["name"])}</title>
<style>body{{font:14px system-ui,sans-serif;max-width:1040px;margin:20px auto;color:#1d2430}}
table{{border-collapse:collapse}}
td,th{{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}}
svg text{{font-size:11px;fill:#667085}}</style></head><body>
<h1>Kairos load test: {html.escape(body["scenario"]["name"])}</h1>{status}
<p>{_baseline(body.get("baseline") or {})}<br>{html.escape(stack_warmup_line(body))}</p>
<p>knee: highest rate within the p99 SLO {body["knee"]["highest_rate_within_slo"]}, first over
it {body["knee"]["first_rate_over_slo"]}{_behind(body["knee"])}. SLO:
{html.escape(str(body["scenario"]["slo"]))}</p>
<table><tr><th>step</th><th>offered/s</th><th>achieved/s</th><th>goodput/s</th><th>p50 ms</th>
<th>p99 ms</th><th>p99.9 ms</th><th>errors</th><th>degraded</th><th>cold starts</th>
<th>freshness p99 ms</th>
<th>API CPU</th><th>valid</th></tr>{rows}</table>
{_chart("p99 latency over time (per second)", p99_series, "ms")}
{_chart("Latency spectrum (p50, p75, p90, p95, p99, p99.5, p99.9, p99.99, max)", spectrum, "ms")}
{_chart("Degraded answers over time", degraded_series, "%")}
{_chart("The knee: p99 by offered rate", [("p99", "#e03131", knee_pts)], "ms")}
</body></html>"""
