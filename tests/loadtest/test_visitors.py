"""Who the peak suite's page views come from, and what its generators name their sessions.

The worker takes an event whose id its session has already applied for a duplicate. The
generators used a fixed seed for their session ids, so a second run of the suite or of the
demo's simulator within a session's TTL sent the first run's event ids again: the worker
ignored them, and the suite's followed clicks never came back. And the suite's page views
came from visitors who never clicked, so 95% of its decisions were cold starts."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from loadtest import suite
from loadtest.nullserver import _Null
from loadtest.scenario import Traffic as Mix
from loadtest.scenario import load_scenario, parse_scenario
from loadtest.suite import Runner, StepRecorder, Visitors
from loadtest.traffic import Traffic
from stream_engine.catalog import Item, load_items


@pytest.fixture(scope="module")
def items(catalog_file: Path) -> list[Item]:
    return load_items(catalog_file)


def _events(traffic: Traffic, n: int) -> list[dict[str, object]]:
    return [orjson.loads(traffic.next_event(now_ms=1)[1]) for _ in range(n)]


def test_two_runs_of_one_seed_send_the_same_shopping_under_other_ids(items: list[Item]) -> None:
    first, second = (_events(Traffic(items, active_sessions=50, seed=3), 500) for _ in "ab")
    assert [(e["type"], e["item_id"]) for e in first] == [(e["type"], e["item_id"]) for e in second]
    assert not {e["session_id"] for e in first} & {e["session_id"] for e in second}
    assert not {e["event_id"] for e in first} & {e["event_id"] for e in second}
    assert len({e["event_id"] for e in first}) == 500


def test_a_run_tag_given_names_the_sessions_the_same_every_time(items: list[Item]) -> None:
    """What replay --generate relies on: a log written again from its seed is the same."""
    first, second = (_events(Traffic(items, active_sessions=50, seed=3, run="3"), 200)
                     for _ in "ab")  # fmt: skip
    assert [e["event_id"] for e in first] == [e["event_id"] for e in second]
    assert str(first[0]["session_id"]).startswith(("sim-3-", "trk-3-"))


def test_recent_sessions_are_those_of_the_last_events(items: list[Item]) -> None:
    traffic = Traffic(items, active_sessions=20, seed=1)
    rng = random.Random(2)
    assert traffic.recent_session(rng) is None  # nobody has clicked yet
    sent = [traffic.next_event(now_ms=1)[0] for _ in range(100)]
    drawn = {traffic.recent_session(rng) for _ in range(500)}
    assert drawn <= set(sent[-20:])  # only the sessions of the last 20 events
    assert len(drawn) > 5


def test_page_views_come_from_clicking_shoppers_and_new_visitors_in_the_mix(
    items: list[Item],
) -> None:
    traffic = Traffic(items, active_sessions=200, seed=1)
    clicked = {traffic.next_event(now_ms=1)[0] for _ in range(2000)}
    visitors = Visitors(Mix(returning_share=0.6, logged_in_share=0.2), traffic,
                        random.Random(5))  # fmt: skip
    views = [visitors.next() for _ in range(4000)]
    mid_session = sum(sid in clicked for sid, _ in views)
    assert 0.55 < mid_session / len(views) < 0.65
    new = [sid for sid, _ in views if sid not in clicked]
    assert len(set(new)) == len(new)  # a new visitor's first page view, each
    assert all(sid.startswith(f"new-{traffic.run}-") for sid in new)
    users: dict[str, set[str | None]] = {}
    for sid, user in views:
        users.setdefault(sid, set()).add(user)
    assert all(len(u) == 1 for u in users.values())  # logged in or not, for good
    logged_in = Counter(next(iter(u)) is not None for u in users.values())
    assert 0.15 < logged_in[True] / len(users) < 0.25


def test_only_new_visitors_when_no_page_view_is_of_a_returning_one(items: list[Item]) -> None:
    traffic = Traffic(items, active_sessions=20, seed=1)
    for _ in range(100):
        traffic.next_event(now_ms=1)
    visitors = Visitors(Mix(returning_share=0.0, logged_in_share=0.0), traffic,
                        random.Random(5))  # fmt: skip
    views = [visitors.next() for _ in range(50)]
    assert all(sid.startswith("new-") and user is None for sid, user in views)


async def test_a_click_that_never_shows_is_lost_after_the_limit_with_few_polls(
    catalog_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a server whose answers never carry the state's age: the follower gives up
    at the limit, counts the click as lost and records it at the limit, and polls less
    and less often (it used to poll every 5 ms for 5 s, then drop the sample unseen)."""
    monkeypatch.setenv("KAIROS_CATALOG_PATH", str(catalog_file))
    monkeypatch.setattr(suite, "FOLLOW_LIMIT_S", 0.5)
    server = await asyncio.get_running_loop().create_server(_Null, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runner = Runner(load_scenario("smoke"), f"http://127.0.0.1:{port}", "127.0.0.1:1", "t")
    rec = StepRecorder()
    try:
        await runner._follow(rec, "sim-x-1", produced_ms=0)
    finally:
        await runner.api.aclose()
        server.close()
    assert rec.freshness_lost == 1
    assert rec.freshness.get_total_count() == 1
    assert rec.freshness.get_max_value() >= 0.5e6  # recorded at the limit, in µs
    assert 5 < rec.follow_polls <= 22  # every 5 ms for 0.5 s would be ~100


async def test_the_stack_warm_up_sends_the_nominal_step_s_page_views_unmeasured(
    catalog_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the first step, the nominal step's rate for stack_warmup_s: every page view
    answered, none of them in a step's figures, and the machine's CPU meanwhile kept for
    the results. With stack_warmup_s = 0 (the smoke run's), nothing is sent."""
    monkeypatch.setenv("KAIROS_CATALOG_PATH", str(catalog_file))
    answered: list[int] = []

    class Counting(_Null):
        def data_received(self, data: bytes) -> None:
            answered.append(data.count(b" HTTP/1.1\r\n"))
            super().data_received(data)

    raw = {"stack_warmup_s": 0.5, "warmup_s": 0,
           "steps": [{"rate": 10, "duration_s": 1},
                     {"rate": 200, "events": 0, "duration_s": 1, "nominal": True}],
           "slo": {"p99_ms": 10}}  # fmt: skip
    server = await asyncio.get_running_loop().create_server(Counting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    warm = Runner(parse_scenario(raw, "w.toml"), f"http://127.0.0.1:{port}", "127.0.0.1:1", "t")
    cold = Runner(load_scenario("smoke"), f"http://127.0.0.1:{port}", "127.0.0.1:1", "t")
    try:
        await warm.warm_up_stack(producer=None)  # type: ignore[arg-type]  # no events: unused
        if warm.tasks:
            await asyncio.wait(set(warm.tasks), timeout=5)
        sent_warm = sum(answered)
        await cold.warm_up_stack(producer=None)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
    finally:
        await warm.api.aclose()
        await cold.api.aclose()
        server.close()
    assert 90 <= sent_warm <= 100  # 200/s for 0.5 s, the nominal step's rate, not step 1's
    assert sum(answered) == sent_warm  # the smoke scenario warms nothing up
    assert set(warm.stack_warmup) == {"generator", "machine"}
    assert cold.stack_warmup == {}
