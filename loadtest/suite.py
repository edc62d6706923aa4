"""The peak-traffic suite: page views over HTTP and clickstream into Kafka, at the same time.

    python -m loadtest run peak [--api http://127.0.0.1:8000] [--bootstrap 127.0.0.1:9092]
                                [--out artifacts] [--compare previous.json] [--slo p99_ms=10]

Page views are open loop (fixed arrival rate; latency from the intended send time into an
HDR histogram, so a stalled server can't hide its tail): single-slot `GET
/v1/slots/home_recs` or, for `multi_slot_share` of them, a page `POST /v1/decisions`;
new, returning and logged-in visitors in the scenario's mix. Clickstream events (the
realistic shoppers of traffic.py) go to Kafka at their own fixed rate meanwhile. A sample of
clicks is followed until a decision reflects them (freshness: produced → the decision's
state is at least that new; same-clock machines only). Before the steps, the same
generator runs against a null server (loadtest/nullserver.py) at the nominal rate: the
same-run baseline, the floor of the measurement itself. Every second a status line (the last
second's answered rate, p99, degraded share, errors and events, a p99 bar against the SLO on
nominal steps) is redrawn in place on a terminal, or printed as a line in a log. The result
is a JSON file with the environment and per-step figures, an HTML report, and an exit code
against the scenario's SLO.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram
from prometheus_client.parser import text_string_to_metric_families

from loadtest.http import Client, HttpError, free_port
from loadtest.ingest import CpuMeter
from loadtest.openloop import open_loop
from loadtest.producer import EventProducer, make_producer
from loadtest.scenario import FOLLOW_LIMIT_S, Scenario, Step
from loadtest.traffic import Traffic
from stream_engine.catalog import load_items
from stream_engine.demo_catalog import resolve_catalog_path
from stream_engine.kafka_security import KafkaSecurity

DEGRADED = ("timeout", "overload", "store_unavailable")
FOLLOW_FIRST_S = 0.005  # the follower's first pause between polls, growing by a quarter
FOLLOW_MAX_PAUSE_S = 0.05  # to at most this
MAX_US = 60_000_000
LIVE_BAR = 20  # characters of the live p99 bar; the SLO sits at its middle


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_US, 3)


def _second_histogram() -> HdrHistogram:
    """One second's answers, for the live line and the p99 over time: two significant
    digits (a 1% bucket) take 20 KB where three take 139, and a soak keeps one a second
    (1,800 in the 30-minute scenario: 250 MB of the generator's memory at three)."""
    return HdrHistogram(1, MAX_US, 2)


def _percentiles_ms(h: HdrHistogram) -> dict[str, float | None]:
    if h.get_total_count() == 0:
        return {"p50": None, "p99": None, "p99.9": None, "max": None}
    return {
        "p50": h.get_value_at_percentile(50) / 1000,
        "p99": h.get_value_at_percentile(99) / 1000,
        "p99.9": h.get_value_at_percentile(99.9) / 1000,
        "max": h.get_max_value() / 1000,
    }


def live_line(rec: StepRecorder, index: int, step: Step, second: int, slo_p99: float | None,
              errors: int, events: int) -> str:  # fmt: skip
    """One second of a running step, for people watching: now, and the step so far."""
    n = rec.per_second_count[second]
    h = rec.per_second.get(second)
    p99 = h.get_value_at_percentile(99) / 1000 if h is not None else 0.0
    total = rec.latency
    p99_all = total.get_value_at_percentile(99) / 1000 if total.get_total_count() else 0.0
    degraded = 100 * rec.per_second_degraded[second] / n if n else 0.0
    bar = ""
    if slo_p99:
        filled = min(LIVE_BAR, round(LIVE_BAR * p99 / (2 * slo_p99)))
        over = "!" if p99 > slo_p99 else " "
        bar = f" [{'#' * filled}{'.' * (LIVE_BAR - filled)}]{over} SLO {slo_p99:g} ms at mid-bar"
    return (f"step {index} {step.rate:g}/s t+{second + 1:>3}s | {n:>5} answered/s | p99 "
            f"{p99:7.2f} ms (step {p99_all:.2f}) | degraded {degraded:5.1f}% | errors {errors} "
            f"| events {events}/s{bar}")  # fmt: skip


@dataclass
class StepRecorder:
    """Everything measured during one step (after the warm-up)."""

    latency: HdrHistogram = field(default_factory=_histogram)
    freshness: HdrHistogram = field(default_factory=_histogram)
    per_second: dict[int, HdrHistogram] = field(default_factory=dict)
    per_second_degraded: Counter[int] = field(default_factory=Counter)
    per_second_count: Counter[int] = field(default_factory=Counter)
    answered: int = 0
    errors: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    late_us: HdrHistogram = field(default_factory=_histogram)
    events_sent: int = 0
    freshness_lost: int = 0  # followed clicks no decision reflected within FOLLOW_LIMIT_S
    follow_polls: int = 0  # the followers' requests, on top of the step's page views

    def record(self, second: int, latency_s: float, reasons: list[str]) -> None:
        us = max(1, min(MAX_US, int(latency_s * 1e6)))
        self.latency.record_value(us)
        # Not setdefault(second, _histogram()): that built a histogram (65 µs, its counts
        # zeroed) for every answer: 57% of the generator's CPU at 3,000/s, where it fell
        # behind, which made its answers later still (loadtest/JOURNAL.md, session 36).
        per_second = self.per_second.get(second)
        if per_second is None:
            per_second = self.per_second[second] = _second_histogram()
        per_second.record_value(us)
        self.per_second_count[second] += 1
        self.answered += 1
        for r in reasons:
            self.fallbacks[r] += 1
        if any(r in DEGRADED for r in reasons):
            self.per_second_degraded[second] += 1

    def summary(self, step: Step, elapsed_s: float) -> dict[str, Any]:
        degraded = sum(self.fallbacks[r] for r in DEGRADED)
        total = self.answered + self.errors
        return {
            "offered_rate": step.rate,
            "achieved_rate": round(self.answered / elapsed_s, 1) if elapsed_s else 0.0,
            "goodput": round((self.answered - degraded) / elapsed_s, 1) if elapsed_s else 0.0,
            "offered_events": step.events,
            "achieved_events": round(self.events_sent / elapsed_s, 1) if elapsed_s else 0.0,
            "answered": self.answered,
            "errors": self.errors,
            "error_rate": self.errors / total if total else 0.0,
            "degraded_share": degraded / self.answered if self.answered else 0.0,
            "fallbacks": dict(self.fallbacks),
            "latency_ms": _percentiles_ms(self.latency),
            "freshness_ms": {
                **_percentiles_ms(self.freshness),
                "samples": self.freshness.get_total_count(),
                "lost": self.freshness_lost,
                "polls": self.follow_polls,
            },
            "generator_late_ms": _percentiles_ms(self.late_us),
            "over_time": [
                {
                    "second": s,
                    "count": self.per_second_count[s],
                    "p99_ms": h.get_value_at_percentile(99) / 1000,
                    "degraded_share": self.per_second_degraded[s] / self.per_second_count[s],
                }
                for s, h in sorted(self.per_second.items())
            ],
            "spectrum_ms": [
                {"percentile": q, "ms": self.latency.get_value_at_percentile(q) / 1000}
                for q in (50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100)
            ]
            if self.answered
            else [],
        }


class Visitors:
    """Who views the pages. `returning_share` of page views come from shoppers in
    mid-session, whose clicks are in the step's clickstream (Traffic.recent_session), so
    their decisions read the state those clicks wrote, as a storefront's do; the rest are
    first page views of new visitors, with no state yet (the cold-start ladder). A visitor
    is logged in or not for good, and names the same user on every page view."""

    def __init__(self, traffic: Any, shoppers: Traffic, rng: random.Random) -> None:
        self.traffic = traffic
        self.shoppers = shoppers
        self.rng = rng
        self.new = 0

    def next(self) -> tuple[str, str | None]:
        rng = self.rng
        sid = None
        if rng.random() < self.traffic.returning_share:
            sid = self.shoppers.recent_session(rng)
        if sid is None:
            self.new += 1
            sid = f"new-{self.shoppers.run}-{self.new}"
        mark = zlib.crc32(sid.encode())
        if mark % 10_000 >= self.traffic.logged_in_share * 10_000:
            return sid, None
        return sid, f"user-{self.shoppers.run}-{(mark >> 16) % 5000}"


class Runner:
    def __init__(self, scenario: Scenario, api_url: str, bootstrap: str, topic: str,
                 producer: str = "aiokafka") -> None:  # fmt: skip
        self.scenario = scenario
        self.producer_kind = producer
        self.api = Client.for_url(api_url)
        self.bootstrap = bootstrap
        self.topic = topic
        self.rng = random.Random(7)
        env = os.environ
        catalog = resolve_catalog_path(env.get("KAIROS_CATALOG_PATH", ""),
                                       env.get("KAIROS_STACK_DIR", ".stack"))  # fmt: skip
        # Session ids carry a random run tag (Traffic.run): a second run within the
        # sessions' TTL must not send the first one's event ids, which are duplicates.
        self.shoppers = Traffic(load_items(catalog), active_sessions=2000, tracked_share=0.0)
        self.visitors = Visitors(scenario.traffic, self.shoppers, self.rng)
        self.tasks: set[asyncio.Task[None]] = set()
        self.baseline: dict[str, Any] = {}
        self.stack_warmup: dict[str, float] = {}  # CpuMeter figures over the stack warm-up

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _page_view(self, rec: StepRecorder | None, intended: float, t0: float) -> None:
        sid, user = self.visitors.next()
        try:
            if self.rng.random() < self.scenario.traffic.multi_slot_share:
                body = {"session_id": sid, "slots": ["home_hero", "home_recs"]}
                if user:
                    body["user_id"] = user
                response = await self.api.request("POST", "/v1/decisions", orjson.dumps(body))
            else:
                q = f"/v1/slots/home_recs?session_id={sid}" + (f"&user_id={user}" if user else "")
                response = await self.api.request("GET", q)
        except HttpError:
            if rec is not None:
                rec.errors += 1
            return
        done = time.monotonic()
        if rec is None:
            return
        if response.status != 200:
            rec.errors += 1
            return
        header = response.headers.get(b"x-kairos-fallback", b"").decode()
        rec.record(int(intended - t0), done - intended, [r for r in header.split(",") if r])

    async def _follow(self, rec: StepRecorder, sid: str, produced_ms: int) -> None:
        """Poll a session until a decision is based on state written after the click: every
        5 ms at first, then less often (a click that never shows must not become 200
        requests a second), for at most FOLLOW_LIMIT_S. A click that never shows is counted
        as lost and recorded at the limit, so that it weighs on the percentiles."""
        start = time.monotonic()
        pause = FOLLOW_FIRST_S
        while True:
            rec.follow_polls += 1
            try:
                response = await self.api.request("GET", f"/v1/slots/home_recs?session_id={sid}")
            except HttpError:
                response = None
            age = (orjson.loads(response.body).get("state_age_ms")
                   if response is not None and response.status == 200 else None)  # fmt: skip
            now_ms = int(time.time() * 1000)
            if age is not None and now_ms - age >= produced_ms:
                rec.freshness.record_value(max(1, (now_ms - produced_ms) * 1000))
                return
            if time.monotonic() - start >= FOLLOW_LIMIT_S:
                rec.freshness_lost += 1
                rec.freshness.record_value(int(FOLLOW_LIMIT_S * 1e6))
                return
            await asyncio.sleep(pause)
            pause = min(pause * 1.25, FOLLOW_MAX_PAUSE_S)

    async def _events(self, producer: EventProducer, step: Step, rec: StepRecorder | None,
                      seconds: float) -> None:  # fmt: skip
        if step.events <= 0:
            return

        async def send(i: int, intended: float) -> None:
            sid, value, _ = self.shoppers.next_event()
            produced_ms = int(time.time() * 1000)
            await producer.send(self.topic, value, key=sid.encode())
            if rec is not None:
                rec.events_sent += 1
                if self.rng.random() < self.scenario.traffic.freshness_sample:
                    self._spawn(self._follow(rec, sid, produced_ms))

        await open_loop(step.events, seconds, send)

    async def _pages(self, step: Step, rec: StepRecorder | None, seconds: float) -> None:
        async def send(i: int, intended: float) -> None:
            if rec is not None:
                rec.late_us.record_value(max(1, int((time.monotonic() - intended) * 1e6)))
                rec.sent += 1
            self._spawn(self._page_view(rec, intended, intended - i / step.rate))

        await open_loop(step.rate, seconds, send)

    async def _unmeasured(self, producer: EventProducer, step: Step, seconds: float) -> None:
        """The step's page views and events for `seconds`, recorded nowhere (warm-ups)."""
        await asyncio.gather(self._pages(step, None, seconds),
                             self._events(producer, step, None, seconds))  # fmt: skip

    async def run_step(self, producer: EventProducer, step: Step, index: int,
                       warmup: float) -> dict[str, Any]:  # fmt: skip
        if warmup > 0:
            await self._unmeasured(producer, step, warmup)
        rec = StepRecorder()
        failed_before = producer.failed
        api_cpu = await self._api_cpu()
        cpu = CpuMeter({"generator": os.getpid()})
        progress = asyncio.create_task(self._progress(rec, index, step))
        started = time.monotonic()
        try:
            await asyncio.gather(self._pages(step, rec, step.duration_s),
                                 self._events(producer, step, rec, step.duration_s))  # fmt: skip
            elapsed = time.monotonic() - started
            if self.tasks:
                _, pending = await asyncio.wait(set(self.tasks), timeout=10)
                rec.errors += len(pending)  # never answered: counted, not hidden
                for t in pending:
                    t.cancel()
        finally:
            progress.cancel()
        out = rec.summary(step, elapsed)
        out["events_failed"] = producer.failed - failed_before  # not acknowledged by the broker
        out["producer"] = self.producer_kind
        out["cpu"] = cpu.percent()
        if api_cpu is not None and (after := await self._api_cpu()) is not None:
            out["cpu"]["api"] = round(100 * (after[0] - api_cpu[0]) / (after[1] - api_cpu[1]), 1)
        gen_late = out["generator_late_ms"]["p99"] or 0.0
        out["valid"] = gen_late <= 5.0 and out["cpu"]["generator"] < 90.0
        if not out["valid"]:
            out["invalid_because"] = (f"the generator fell behind (late p99 {gen_late:.1f} ms, "
                                      f"CPU {out['cpu']['generator']:.0f}%): it, not the "
                                      "system, was the bottleneck")  # fmt: skip
        return out

    async def _api_cpu(self) -> tuple[float, float] | None:
        """The API process's CPU seconds so far (its /metrics) and when they were read; None
        when it doesn't say (the share of a core it used in a step tells whether the API
        itself was the bottleneck, local or not)."""
        try:
            response = await self.api.request("GET", "/metrics")
        except HttpError:
            return None
        seen = time.monotonic()
        return None if response.status != 200 else _cpu_seconds(response.body, seen)

    async def _progress(self, rec: StepRecorder, index: int, step: Step) -> None:
        """A status line every second: the last whole second's answered rate, p99, degraded
        share and errors beside the step's so far, and a bar of p99 against the SLO. On a
        terminal the line is redrawn in place; in a log it is one line a second."""
        tty = sys.stdout.isatty()
        slo_p99 = self.scenario.slo.get("p99_ms")
        t0, last_errors, last_events = time.monotonic(), 0, 0
        try:
            while True:
                await asyncio.sleep(1.0)
                second = int(time.monotonic() - t0) - 1  # the last whole second
                slo = slo_p99 if step.nominal else None
                line = live_line(rec, index, step, second, slo, rec.errors - last_errors,
                                 rec.events_sent - last_events)  # fmt: skip
                last_errors, last_events = rec.errors, rec.events_sent
                print(f"\r\033[K{line}" if tty else line, end="" if tty else "\n", flush=True)
        finally:
            if tty:
                print(flush=True)

    async def calibrate(self, seconds: float = 3.0) -> dict[str, Any]:
        """The same generator and request mix against a null server, at the first nominal
        step's rate: the floor of the measurement, in the same run."""
        step = next(s for s in self.scenario.steps if s.nominal)
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.nullserver", str(port), start_new_session=True
        )
        real, self.api = self.api, Client("127.0.0.1", port)
        try:
            for _ in range(100):
                try:
                    await self.api.request("GET", "/")
                    break
                except HttpError:
                    await asyncio.sleep(0.05)
            rec = StepRecorder()
            await self._pages(Step(step.rate, 0, seconds), rec, seconds)
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=5)
            out = rec.summary(Step(step.rate, 0, seconds), seconds)
        finally:
            await self.api.aclose()
            self.api = real
            proc.terminate()
            await proc.wait()
        lat = out["latency_ms"]
        if lat["p99"] is None:
            raise HttpError("the null server answered nothing: no same-run baseline")
        print(f"baseline: null server at {step.rate:g}/s, same generator: p50 {lat['p50']:.2f} "
              f"p99 {lat['p99']:.2f} p99.9 {lat['p99.9']:.2f} ms", flush=True)  # fmt: skip
        return {"rate": step.rate, "latency_ms": lat, "errors": out["errors"]}

    async def warm_up_stack(self, producer: EventProducer) -> None:
        """The nominal step's traffic for `stack_warmup_s`, unmeasured, before the first step
        (Scenario.stack_warmup_s). Prints how busy the machine was meanwhile: on a box that
        stays busier than it was warm, the steps measure its other tenants too."""
        seconds = self.scenario.stack_warmup_s
        if seconds <= 0:
            return
        step = next(s for s in self.scenario.steps if s.nominal)
        print(f"warming the stack up: {seconds:g} s at {step.rate:g} page views/s + "
              f"{step.events:g} events/s, not measured", flush=True)  # fmt: skip
        cpu = CpuMeter({"generator": os.getpid()})
        await self._unmeasured(producer, step, seconds)
        self.stack_warmup = cpu.percent()
        print(f"  meanwhile the generator used {self.stack_warmup.get('generator', 0):.0f}% of "
              f"a core, the machine {self.stack_warmup.get('machine', 0):.0f}% of its cores",
              flush=True)  # fmt: skip

    async def run(self) -> list[dict[str, Any]]:
        self.baseline = await self.calibrate()
        security = KafkaSecurity.from_env(os.environ)  # the deployment's KAIROS_KAFKA_*
        producer = make_producer(self.producer_kind, self.bootstrap, security)
        await producer.start()
        results = []
        try:
            await self.warm_up_stack(producer)
            for i, step in enumerate(self.scenario.steps, start=1):
                print(f"step {i}: {step.rate:g} page views/s + {step.events:g} events/s for "
                      f"{step.duration_s:g} s (warm-up {self.scenario.warmup_s:g} s)",
                      flush=True)  # fmt: skip
                results.append(await self.run_step(producer, step, i, self.scenario.warmup_s))
        finally:
            await producer.stop()
            await self.api.aclose()
        return results


def _cpu_seconds(metrics: bytes, seen: float) -> tuple[float, float] | None:
    try:
        for family in text_string_to_metric_families(metrics.decode(errors="replace")):
            for sample in family.samples:
                if sample.name == "process_cpu_seconds_total":
                    return sample.value, seen
    except ValueError:  # not Prometheus text: an API without the figure
        pass
    return None
