"""The demo storefront in a real browser (Debian's chromium, driven by Playwright) against a
real worker and API on the real Kafka and Redis: three clicks in one category move the
hero banner and the recommendations to it within a second, with the reason shown.
Screenshots before and after go to artifacts/screenshots/."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from stream_engine.state import Keys
from tests.conftest import IN_CI, REPO, SERVICES_TOKEN, STACK

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SHOTS = REPO / "artifacts" / "screenshots"
CATEGORY = "Sports > Cycling"
CHROMIUM_ARGS = [  # the closed network refuses Chromium's background connections
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> str:
    found = subprocess.run([*STACK, "browser"], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        reason = f"chromium unavailable: {found.stderr.strip()}"
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(f"LOUD SKIP: {reason}")
    return found.stdout.strip().splitlines()[-1]


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=orjson.dumps(body), method="POST")
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 202


async def _worker_consuming(url: str, redis: aioredis.Redis, prefix: str) -> None:
    """A probe beacon through the whole pipeline, so the page's clicks don't wait for the
    worker's first group join."""
    key = Keys(prefix).session("probe")
    deadline = time.monotonic() + 60
    while await redis.exists(key) == 0:
        await asyncio.to_thread(
            _post, f"{url}/v1/events", {"type": "view", "session_id": "probe",
                                        "item_id": "sku-000000"}
        )  # fmt: skip
        if time.monotonic() > deadline:
            raise TimeoutError("the worker applied nothing within 60 s")
        await asyncio.sleep(0.5)


def _treated_visitor() -> str:
    from api.app import DEMO_CONFIG
    from api.config import load_config
    from api.holdout import Group, assign

    share = load_config(DEMO_CONFIG).holdout_share
    assert share < 1
    for i in itertools.count():
        visitor = f"visitor-browser-{time.time_ns():x}-{i}"
        if assign(visitor, share) is Group.TREATMENT:
            return visitor
    raise AssertionError("unreachable")


SHOWN = """() => ({
    hero: document.getElementById("hero").dataset.bannerId,
    meta: document.getElementById("hero-meta").innerText,
    recs: [...document.querySelectorAll("#recs .card")].map((c) => c.dataset.category),
})"""


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def test_three_clicks_move_the_hero_and_the_recommendations_within_a_second(
    kairos_services: str, browser: Any, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    await _worker_consuming(kairos_services, redis_client, key_prefix)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    # The page draws a random visitor id, and one in twenty lands in the demo config's
    # holdout, which is served the defaults by design (that was this test's occasional
    # miss): the visitor here is one the hash puts in the treatment group.
    await page.add_init_script(f"localStorage.setItem('kairos-session', '{_treated_visitor()}')")
    await page.goto(f"{kairos_services}/demo/")
    await page.wait_for_selector("#hero[data-banner-id]")
    await page.wait_for_selector("#grid .card")
    before = await page.get_attribute("#hero", "data-banner-id")
    await page.screenshot(path=str(SHOTS / "demo-before.png"), full_page=True)

    await page.click(f'nav button[data-cat="{CATEGORY}"]')
    await page.wait_for_selector(f'#grid .card[data-category^="{CATEGORY}"]')
    titles = page.locator("#grid .card .title")
    for i in range(3):
        await titles.nth(i).click()
    clicked = time.monotonic()
    # the hero shows the category's banner and most recommendations are in the category
    # The page keeps looking again for a second, and any of those answers may honestly be
    # a fallback on a busy machine: the checks below read the answer that met the
    # condition, captured at that moment, not whatever is on screen later.
    from playwright.async_api import TimeoutError as PageTimeout

    try:
        shown = await page.wait_for_function(
            """(cat) => {
                const hero = document.getElementById("hero");
                const cards = [...document.querySelectorAll("#recs .card")];
                const inCat = cards.filter((c) => c.dataset.category.startsWith(cat)).length;
                const ok = hero.dataset.bannerId === "hero-cycling" && cards.length > 0
                    && inCat >= cards.length - 2;
                return ok && {
                    reason: hero.querySelector(".reason").innerText,
                    meta: document.getElementById("hero-meta").innerText,
                    recReasons: [...document.querySelectorAll("#recs .card .reason")]
                        .map((r) => r.innerText),
                };
            }""",
            arg=CATEGORY,
            timeout=1000,
        )
    except PageTimeout:
        # say what the page showed instead (a fallback and its reason, another banner, the
        # state's age), so a miss on a busy machine can be told from a broken pipeline
        seen = await page.evaluate(SHOWN)
        pytest.fail(f"a second after the third click the page showed {seen}", pytrace=False)
    took = time.monotonic() - clicked
    answer = await shown.json_value()
    await page.wait_for_timeout(300)  # let the last look-again settle before the screenshot
    await page.screenshot(path=str(SHOTS / "demo-after.png"), full_page=True)

    assert before == "hero-welcome"
    assert took <= 1.0
    reason = answer["reason"]
    assert "Cycling" in reason
    assert "because you viewed" in reason
    meta = answer["meta"]
    assert meta.startswith("personalized")
    assert "ms" in meta
    assert "state" in meta
    rec_reasons = answer["recReasons"]
    assert rec_reasons
    assert all(r for r in rec_reasons)
    assert (SHOTS / "demo-after.png").stat().st_size > 10_000

    report = await browser.new_page(viewport={"width": 1280, "height": 900})
    await report.goto(f"{kairos_services}/admin/report/page#token={SERVICES_TOKEN}")
    await report.wait_for_selector("#slots tr td")
    await report.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    assert "home_recs" in await report.inner_text("#slots")
