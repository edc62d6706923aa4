"""The API's running state and the guarded decision path.

`Runtime.decide` is where a page decision meets its guards, in this order: pause switches,
the in-flight limit, the Redis breaker, the Redis read under its budget, holdout, consent,
co-visitation within what is left of the budget, the deadline, then the decision itself.
Every exit that is not a personalized answer is a default with its reason.

`Runtime.refresh` runs in the background: config file changes, catalog changes from the
worker's Redis mirror, trending; then it swaps in a new Serving snapshot. Then
`refresh_covis` reads the co-visitation entries that went stale again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from api.aggregates import (
    COVIS_REFRESH_CHUNK,
    COVIS_REFRESH_EVERY_S,
    COVIS_REFRESH_MAX,
    COVIS_WARM_CHUNK,
    CovisCache,
    parse_trending,
    trending_commands,
    trending_keys,
    warm_order,
)
from api.config import DecisionConfig, load_config
from api.decisions import PageAsk, SlotDecision, covis_sources, decide_page, default_decision
from api.exceptions import ConfigFileError
from api.fallback import Breaker, FallbackReason, Limiter, Pauses
from api.holdout import Group, assign, stable_id
from api.items import ServingCatalog
from api.metrics import ApiMetrics
from api.pressure import PRESSURE_EVERY_S, PRESSURE_TIMEOUT_S, SlowReads, report_commands
from api.publisher import Publisher
from api.report import Window, build_report, read_counters
from api.scoring import Trending
from api.serving import Compiled, Serving, build_serving, compile_for, needs_compile
from api.session_state import SessionView, StateReader
from api.settings import Settings
from stream_engine.catalog_updates import catalog_version_key, changed_since, mirrored
from stream_engine.latent import install_newer, latent_key
from stream_engine.looplag import LoopLag
from stream_engine.state import Keys, stored_int
from stream_engine.store import Batches, raise_error_reply, wrong_type_as_none

log = logging.getLogger("kairos.api")

STORE_ERRORS = (RedisError, OSError, ConnectionError)
BACKGROUND_READ_S = 2.0  # one background round trip: a refresh tick's reads, the report's


@dataclass(slots=True)
class ConfigSource:
    path: Path
    mtime_ns: int = -1
    error: str | None = None  # the last reload's error, while the previous config serves


@dataclass(slots=True)
class Runtime:
    settings: Settings
    redis: aioredis.Redis  # the request path's client: replies must come within its budget
    reader: StateReader
    catalog: ServingCatalog
    serving: Serving
    source: ConfigSource
    metrics: ApiMetrics
    publisher: Publisher  # exposures -> decisions topic
    beacons: Publisher  # collected events -> clickstream topic
    keys: Keys
    # Background work (trending refresh, the catalog mirror, learned models, the report,
    # admin erasure) on its own connections with a timeout in seconds: with a socket
    # timeout of the read budget (milliseconds, as the request path's client once had),
    # reading the catalog mirror or a learned model (megabytes) never finished, and the
    # refresh failed every tick ("Timeout reading from ...").
    background: aioredis.Redis
    background_batches: Batches
    breaker: Breaker = field(default_factory=Breaker)
    pauses: Pauses = field(default_factory=Pauses)
    limiter: Limiter = field(default_factory=lambda: Limiter(0.010))
    covis: CovisCache = field(default_factory=CovisCache)
    lag: LoopLag = field(default_factory=LoopLag)
    catalog_version: bytes | None = None
    latent_seen: int = 0  # the learned model version last read (installed or refused)
    tally: Counter[str] = field(default_factory=Counter)  # decisions by strategy (demo strip)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # ends background loops
    beacons_accepted: int = 0
    covis_warming: bool = False  # warm_covis is reading
    # Held by a config reload and by the part of a refresh that writes the catalog or
    # compiles: each compiles in a thread, which reads the catalog, and the refresh writes
    # it. Not over the refresh's Redis reads, which can take their whole timeout (2 s)
    # while Redis is slow: a reload waits for a compile in progress, never for Redis.
    changing: asyncio.Lock = field(default_factory=asyncio.Lock)
    refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one refresh at a time
    slow_reads: SlowReads = field(init=False)  # a third of the read budget is slow

    def __post_init__(self) -> None:
        self.slow_reads = SlowReads(self.settings.redis_timeout_ms / 3000)

    # -- the decision path ---------------------------------------------------------------

    async def decide(self, page: PageAsk) -> list[SlotDecision]:
        started = time.perf_counter()
        serving = self.serving
        if not self.limiter.try_acquire():
            group = assign(page.session_id, serving.config.holdout_share)
            return self._record(page, self._fallback(page, FallbackReason.OVERLOAD, group))
        try:
            decisions = await self._decide(page, serving, started)
        finally:
            self.limiter.release(time.perf_counter() - started)
        return self._record(page, decisions)

    async def _decide(self, page: PageAsk, serving: Serving, started: float) -> list[SlotDecision]:
        s = self.settings
        share = serving.config.holdout_share
        if all(self.pauses.paused(a.slot.name) for a in page.asks):
            return self._fallback(page, FallbackReason.PAUSED, assign(page.session_id, share))
        view, why = await self._read(page)
        if view is None:
            assert why is not None
            return self._fallback(page, why, assign(page.session_id, share))
        group = assign(stable_id(page.session_id, view.user_anchor), share)
        if group is Group.HOLDOUT:
            return self._fallback(page, FallbackReason.HOLDOUT, group, view)
        if view.block or view.user_block:
            return self._fallback(page, FallbackReason.CONSENT, group, view)
        neighbours = await self._neighbours(page, view, serving, started)
        if (time.perf_counter() - started) * 1000 > s.deadline_ms:
            why = FallbackReason.OVERLOAD if self._busy() else FallbackReason.TIMEOUT
            return self._fallback(page, why, group, view)
        paused = {a.slot.name for a in page.asks if self.pauses.paused(a.slot.name)}
        now_ms = int(time.time() * 1000)
        return decide_page(serving, page, view, group, neighbours, now_ms, paused)

    async def _read(self, page: PageAsk) -> tuple[SessionView | None, FallbackReason | None]:
        if not self.breaker.allow():
            self.slow_reads.failed()
            return None, FallbackReason.STORE_UNAVAILABLE
        budget = self.settings.redis_timeout_ms / 1000
        sent = time.perf_counter()
        try:
            view = await self.reader.read(
                page.session_id, page.user_id, int(time.time() * 1000), budget
            )
        except TimeoutError:
            self.slow_reads.failed()
            if self._busy():
                # Not Redis: this process was too busy to read its reply in time. The
                # limiter answers an overload; the breaker would send everyone to the
                # defaults for a second.
                return None, FallbackReason.OVERLOAD
            self.breaker.failure()
            return None, FallbackReason.TIMEOUT
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                return self._store_failed()
            # Redis answered: a key of this visitor holds something else than the worker
            # writes. Theirs to lose, not everyone's (the breaker counts Redis's failures).
            self.metrics.state_unreadable.inc()
            self.breaker.success()
            return SessionView(page.session_id), None
        except STORE_ERRORS:
            return self._store_failed()
        elapsed = time.perf_counter() - sent
        self.slow_reads.read(elapsed)
        self.metrics.state_read.observe(elapsed)
        self.breaker.success()
        return view, None

    def _store_failed(self) -> tuple[None, FallbackReason]:
        self.slow_reads.failed()
        self.breaker.failure()
        return None, FallbackReason.STORE_UNAVAILABLE

    def _busy(self) -> bool:
        """Whether an overrun was this process's own doing: its event loop has lately run
        a whole Redis budget late (an idle API on this shared machine sees up to ~4 ms).
        Under CPU saturation asyncio cannot interrupt anything, so reads and deadlines
        overrun whatever the store does (seen: 8 ms budgets ending after 70-100 ms with 40
        busy requests in flight). Not how late the overrun itself surfaced: a read cut off
        from a frozen Redis surfaces only after its connection is dropped, several ms late
        in an idle process (that misread a frozen Redis as an overload in CI)."""
        return self.lag.recent_s >= self.settings.redis_timeout_ms / 1000

    async def _neighbours(
        self, page: PageAsk, view: SessionView, serving: Serving, started: float
    ) -> dict[int, Any]:
        sources = covis_sources(serving, page, view)
        found, missing = self.covis.lookup(sources)
        if not missing:
            return found
        left_ms = self.settings.redis_timeout_ms - (time.perf_counter() - started) * 1000
        if left_ms <= 0.5:
            self.metrics.covis_errors.inc()
            return found
        self.metrics.covis_reads.inc()
        try:
            replies = await self.reader.execute(
                self.covis.commands(self.keys, serving.catalog, missing), left_ms / 1000
            )
        except (TimeoutError, *STORE_ERRORS):
            self.metrics.covis_errors.inc()
            return found
        found.update(self.covis.store(missing, replies, serving.catalog))
        return found

    def _fallback(
        self,
        page: PageAsk,
        why: FallbackReason,
        group: Group,
        view: SessionView | None = None,
    ) -> list[SlotDecision]:
        serving = self.serving
        age = None
        if view is not None and view.written_ms is not None:
            age = max(0, int(time.time() * 1000) - view.written_ms)
        used: set[int] = set()
        return [default_decision(serving, a, why, group, used, age) for a in page.asks]

    def _record(self, page: PageAsk, decisions: list[SlotDecision]) -> list[SlotDecision]:
        """Metrics and the exposure record of every decision (queued, never awaited)."""
        now_ms = int(time.time() * 1000)
        for d in decisions:
            reason = d.fallback_reason.value if d.fallback_reason else ""
            self.metrics.decision(d.slot, d.strategy, reason)
            self.tally[d.strategy] += 1
            if d.state_age_ms is not None:
                self.metrics.state_age.observe(d.state_age_ms / 1000)
            exposure = {
                "decision_id": d.decision_id,
                "ts": now_ms,
                "session_id": page.session_id,
                "user_id": page.user_id,
                "slot": d.slot,
                "strategy": d.strategy,
                "fallback_reason": reason or None,
                "group": d.group.value,
                "config_version": d.config_version,
                "items": [i["item_id"] for i in d.items],
                "banner": d.banner["banner_id"] if d.banner else None,
                "rules": d.rules,
            }
            self.publisher.offer(
                self.settings.decisions_topic, page.session_id.encode(), orjson.dumps(exposure)
            )
        return decisions

    # -- background refresh --------------------------------------------------------------

    async def reload_config(self, force: bool = False) -> DecisionConfig | None:
        """Load the config file if it changed (always, if forced: the admin's reload);
        raises ConfigFileError (the old one stays)."""
        async with self.changing:
            return await self._reload(force)

    async def _reload(self, force: bool) -> DecisionConfig | None:
        try:
            mtime = self.source.path.stat().st_mtime_ns
        except OSError as exc:
            raise ConfigFileError(f"{self.source.path}: cannot read ({exc.strerror})") from None
        if mtime == self.source.mtime_ns and not force:
            return None
        self.source.mtime_ns = mtime
        now = _now()
        try:
            # parsed and compiled (~50 ms with 100k items) in a thread, as the refresh's
            config, compiled = await asyncio.to_thread(self._load, now)
        except ConfigFileError as exc:
            self.source.error = str(exc)
            self.metrics.reloads.labels("error").inc()
            raise
        self.serving = build_serving(config, self.catalog, self.serving.trending, now,
                                     compiled=compiled)  # fmt: skip
        self.source.error = None
        self.metrics.reloads.labels("ok").inc()
        self.metrics.config_version.clear()
        self.metrics.config_version.labels(config.version).set(1)
        log.info("decision config %s in force (%s)", config.version, self.source.path)
        return config

    def _load(self, now: dt.datetime) -> tuple[DecisionConfig, Compiled]:
        config = load_config(self.source.path)
        return config, compile_for(config, self.catalog, now)

    async def refresh(self) -> None:
        """One background tick; a failure keeps the last snapshot and is counted."""
        async with self.refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        async with self.changing:
            try:
                await self._reload(force=False)
            except ConfigFileError as exc:
                log.error("config reload refused, keeping %s: %s",
                          self.serving.config.version, exc)  # fmt: skip
        # Redis first, outside `changing`: only this task writes the catalog, and a
        # reload only reads it
        names = trending_keys(self.catalog)
        prefix = self.settings.key_prefix
        cmds: list[tuple[Any, ...]] = [
            ("GET", catalog_version_key(prefix)), ("HGET", latent_key(prefix), "version"),
        ]  # fmt: skip
        cmds += trending_commands(self.keys, names)
        async with asyncio.timeout(BACKGROUND_READ_S):
            replies = await self.background_batches.execute(cmds)
        # A key another writer left of another type (WRONGTYPE) is read as none, not a
        # failed refresh: a trending set as an empty one, the catalog's version or the
        # model's as unknown; the rest still comes (the worker replaces them at its next
        # write). Any other error fails the refresh.
        replies = wrong_type_as_none(replies)
        trend_replies = [[] if r is None else r for r in replies[2:]]
        version, changed = replies[0], None
        if version is not None and version != self.catalog_version:
            changed = await self._catalog_changes(version)
        async with self.changing:
            if changed is not None:
                await asyncio.to_thread(self.catalog.catalog.reserve_for,
                                        [i for i, _ in changed])  # fmt: skip
                self.catalog.apply_updates(changed)
                self.catalog_version = version
            latent = stored_int(replies[1])  # none for a version that is no number
            if latent is not None and latent != self.latent_seen:
                # reads the model and swaps it in: rare, and a swap must not meet a compile
                await self._install_latent(latent)
            trending = parse_trending(names, trend_replies, self.catalog)
            previous, now = self.serving, _now()
            compiled = None
            if needs_compile(previous, previous.config, self.catalog, now):
                # in a thread: nothing writes the catalog meanwhile (self.changing)
                compiled = await asyncio.to_thread(
                    compile_for, previous.config, self.catalog, now, previous
                )
            self.serving = build_serving(previous.config, self.catalog, trending, now,
                                         previous, compiled)  # fmt: skip

    async def _catalog_changes(self, version: bytes) -> list[tuple[str, bytes]]:
        """The catalog mirror's changes up to `version`: the items changed since the
        version applied last, or the whole mirror at start, after a reset (the version
        went back) or when the change index cannot say."""
        prefix = self.settings.key_prefix
        since, upto = stored_int(self.catalog_version), stored_int(version)
        if since is not None and upto is not None and upto > since:
            async with asyncio.timeout(BACKGROUND_READ_S):
                changed = await changed_since(self.background, prefix, since, upto)
            if changed is not None:
                return changed
        return await mirrored(self.background, prefix)

    async def refresh_covis(self, limit: int = COVIS_REFRESH_MAX) -> int:
        """Read stale co-visitation entries again (those decisions asked for), a chunk per
        round trip; returns how many were read. A failed chunk is due again when next
        asked for; until then decisions use what the cache has."""
        due = self.covis.take_due(limit)
        catalog = self.serving.catalog
        done = 0
        for start in range(0, len(due), COVIS_REFRESH_CHUNK):
            rows = due[start : start + COVIS_REFRESH_CHUNK]
            async with asyncio.timeout(BACKGROUND_READ_S):
                replies = await self.background_batches.execute(
                    self.covis.commands(self.keys, catalog, rows)
                )
            self.covis.store(rows, replies, catalog)
            done += len(rows)
        return done

    async def warm_covis(self, chunk: int = COVIS_WARM_CHUNK) -> int:
        """Read the co-visitation of the catalog's items before decisions ask for it (see
        `warm_order`), a chunk per round trip on the background connection, skipping what
        decisions already read; returns how many were read. Cached like any entry (served
        up to `COVIS_TTL_S` stale, then read again in the background), with staleness
        spread so the entries are not all due at once. Stops at the first failure: what is
        left is read when a decision first asks, as without the warm-up."""
        serving = self.serving
        rows = warm_order(serving.catalog, serving.trending, serving.size, self.covis.max_items)
        started, done = time.perf_counter(), 0
        self.covis_warming = True
        try:
            for start in range(0, len(rows), chunk):
                todo = self.covis.unknown(rows[start : start + chunk])
                if not todo:
                    continue
                async with asyncio.timeout(BACKGROUND_READ_S):
                    replies = await self.background_batches.execute(
                        self.covis.commands(self.keys, serving.catalog, todo)
                    )
                # An item with no co-visitation yet is left to the first decision that
                # asks: its neighbours may appear any moment (a new session's second click).
                found = [(r, reply) for r, reply in zip(todo, replies, strict=True) if reply]
                self.covis.store([r for r, _ in found], [reply for _, reply in found],
                                 serving.catalog, spread=True)  # fmt: skip
                done += len(todo)
        except Exception as exc:  # never fatal: decisions read what is left on first ask
            log.warning("co-visitation warm-up stopped after %d items (%r); the rest is read "
                        "when first asked for", done, exc)  # fmt: skip
        else:
            log.info("co-visitation of %d items read in %.2f s", done,
                     time.perf_counter() - started)  # fmt: skip
        finally:
            self.covis_warming = False
        return done

    async def _install_latent(self, version: int) -> None:
        """A newer learned model, prepared in a thread while decisions go on with the
        vectors in use, then swapped in (stream_engine/latent.py, install_newer)."""
        self.latent_seen, model = await install_newer(
            self.background, self.settings.key_prefix, self.catalog.catalog, self.latent_seen,
            self.catalog.prepare_latent, self.catalog.adopt_latent, version,
        )  # fmt: skip
        if model is not None:
            self.metrics.latent_version.set(model.version)

    async def refresh_report(self, minutes: int = 15) -> dict[str, Any]:
        window = Window(minutes, int(time.time() * 1000))
        totals, series, counts = await read_counters(
            self.read_report, self.settings.key_prefix, window
        )
        report = build_report(self.serving.config, totals, series, counts, window)
        self.metrics.report(report)
        return report

    async def read_report(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        """The replies, error replies among them (read_counters takes those)."""
        async with asyncio.timeout(BACKGROUND_READ_S):
            return await self.background_batches.execute(cmds)

    async def _background(self, cmds: list[tuple[Any, ...]], timeout_s: float) -> list[Any]:
        async with asyncio.timeout(timeout_s):
            return raise_error_reply(await self.background_batches.execute(cmds))

    async def run_reporter(self, every_s: float = 30.0) -> None:
        """Keeps the report gauges current, so an SRE can alert on "personalization off"."""
        await self._every(every_s, self.refresh_report, "report refresh failed")

    async def run_refresher(self) -> None:
        await self._every(self.settings.refresh_interval_s, self.refresh,
                          "background refresh failed, serving the last snapshot")  # fmt: skip

    async def report_pressure(self) -> bool:
        """Tells the workers (one INCR) when this window's reads were slow: a worker
        catching up a backlog then slows down (api/pressure.py, stream_engine/pressure.py)."""
        if not self.slow_reads.take():
            return False
        self.metrics.pressure_reports.inc()
        await self._background(report_commands(self.keys.pressure), timeout_s=PRESSURE_TIMEOUT_S)
        return True

    async def run_pressure_reporter(self) -> None:
        await self._every(PRESSURE_EVERY_S, self.report_pressure,
                          "slow-read report not sent", logging.DEBUG)  # fmt: skip

    async def run_covis_refresher(self) -> None:
        """Stale co-visitation read again, a small round at a time (COVIS_REFRESH_EVERY_S).
        A failed round is counted; run_refresher's warning already says Redis is away."""
        await self._every(COVIS_REFRESH_EVERY_S, self.refresh_covis,
                          "co-visitation refresh failed", logging.DEBUG)  # fmt: skip

    async def _every(
        self,
        every_s: float,
        round_: Callable[[], Awaitable[object]],
        failed: str,
        level: int = logging.WARNING,
    ) -> None:
        """A background loop: a round every `every_s` until the API stops; a round that
        Redis failed is counted and logged, and the loop goes on."""
        while await self._tick(every_s):
            try:
                await round_()
            except (TimeoutError, *STORE_ERRORS) as exc:
                self.metrics.refresh_errors.inc()
                log.log(level, "%s: %s", failed, exc)

    async def _tick(self, every_s: float) -> bool:
        """Wait for the next round of a background loop; False once the API is stopping.
        Cancelling the loop's task is not enough on its own: on Python 3.11 a cancellation
        can be lost (asyncio.wait_for, which redis-py uses for each write, returns a result
        that arrived together with the cancel), or come out of a round as the TimeoutError
        the loop survives; the loop would go on with clients already closed (seen as a
        reconnected, never closed Redis connection at the end of a test run)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), every_s)
        return not self.stopping.is_set()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def initial_serving(config: DecisionConfig, catalog: ServingCatalog) -> Serving:
    return build_serving(config, catalog, Trending(), _now())
