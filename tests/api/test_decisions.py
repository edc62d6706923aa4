"""Decisions on the real Redis, from state written by the real stream processor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.app import DEMO_CONFIG
from api.settings import Settings
from stream_engine.catalog import Catalog
from stream_engine.events import EventType
from tests.api.conftest import Clicks, client_for, with_

pytestmark = pytest.mark.integration
CLICK, VIEW, BUY = EventType.CLICK, EventType.VIEW, EventType.PURCHASE
Picker = Callable[[str], list[str]]


def _config(tmp_path: Path, **changes: Any) -> str:
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw.update(changes)
    path = tmp_path / "kairos.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


async def _background(clicks: Clicks, items_in: Picker) -> None:
    """Other shoppers, so trending and co-visitation have something in them."""
    for n, category in enumerate(["Home > Kitchen", "Electronics > Audio", "Books"]):
        items = items_in(category)[:6]
        await clicks(f"bg{n}", *[(VIEW, i) for i in items])


def _categories(decision: dict[str, Any]) -> list[str]:
    return [i["category"] for i in decision["items"]]


async def test_a_running_shoe_session_gets_running_banners_and_recommendations(
    settings: Settings, clicks: Clicks, items_in: Picker
) -> None:
    await _background(clicks, items_in)
    shoes = items_in("Sports > Running > Trail Running Shoes")[:3]
    await clicks("runner", *[(CLICK, i) for i in shoes])
    async with client_for(settings) as client:
        hero = (await client.get("/v1/slots/home_hero?session_id=runner")).json()
        recs = (await client.get("/v1/slots/home_recs?session_id=runner")).json()
        stranger = await client.get("/v1/slots/home_recs?session_id=someone-new")
    assert hero["strategy"] == "personalized"
    assert hero["fallback_reason"] is None
    assert hero["banner"]["banner_id"] == "hero-running"
    assert hero["banner"]["reason"] == "because you viewed 3 items in Running"
    assert recs["strategy"] == "personalized"
    cats = _categories(recs)
    assert len(cats) == 8
    assert sum(c.startswith("Sports > Running") for c in cats) >= 6
    assert "because you viewed 3 items in Trail Running Shoes" in [
        i["reason"] for i in recs["items"]
    ]
    assert not set(shoes) & {i["item_id"] for i in recs["items"]}  # seen items are not repeated
    assert recs["state_age_ms"] is not None
    assert recs["config_version"] == "demo-2026-11-22.1"
    # an unknown session: the same shape, the default, and why
    other = stranger.json()
    assert stranger.headers["x-kairos-fallback"] == "no_signal"
    assert set(other) == set(recs)
    assert len(other["items"]) == 8
    assert other["strategy"] == "default"
    assert other["fallback_reason"] == "no_signal"


async def test_purchased_and_sold_out_items_never_appear(
    settings: Settings, clicks: Clicks, items_in: Picker, catalog: Catalog
) -> None:
    running = items_in("Sports > Running")
    bought = running[0]
    await clicks("buyer", (CLICK, running[1]), (EventType.ADD_TO_CART, bought), (BUY, bought))
    sold_out = {it.item_id for it in catalog.items if it.stock == 0}
    async with client_for(settings) as client:
        response = await client.get("/v1/slots/recommendations?session_id=buyer&n=50")
    served = {i["item_id"] for i in response.json()["items"]}
    assert len(served) == 50
    assert bought not in served
    assert not served & sold_out


async def test_a_frequency_cap_stops_a_banner(
    settings: Settings, clicks: Clicks, items_in: Picker, tmp_path: Path
) -> None:
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    for b in raw["banners"]:
        if b["id"] == "hero-running":
            b["frequency_cap"] = 2
    config = _config(tmp_path, banners=raw["banners"])
    await clicks("capped", *[(CLICK, i) for i in items_in("Sports > Running")[:3]])
    async with client_for(with_(settings, config_path=config)) as client:
        first = (await client.get("/v1/slots/home_hero?session_id=capped")).json()
        await clicks(
            "capped", (EventType.IMPRESSION, "hero-running"), (EventType.IMPRESSION, "hero-running")
        )
        after = (await client.get("/v1/slots/home_hero?session_id=capped")).json()
    assert first["banner"]["banner_id"] == "hero-running"
    assert after["banner"]["banner_id"] != "hero-running"


async def test_consent_withdrawn_serves_defaults(
    settings: Settings, clicks: Clicks, items_in: Picker
) -> None:
    await clicks("private", *[(CLICK, i) for i in items_in("Home > Kitchen")[:3]])
    await clicks("private", (EventType.CONSENT, None), consent=False)
    async with client_for(settings) as client:
        response = await client.get("/v1/slots/home_recs?session_id=private")
    body = response.json()
    assert body["strategy"] == "default"
    assert body["fallback_reason"] == "consent"
    assert response.headers["x-kairos-fallback"] == "consent"


async def test_a_known_user_on_a_new_device_starts_from_the_profile_in_the_same_group(
    settings: Settings, clicks: Clicks, items_in: Picker, tmp_path: Path
) -> None:
    config = _config(tmp_path, holdout_share=0.5)
    sid = next(s for s in (f"laptop-{n}" for n in range(100)) if _group(s) == "treatment")
    await clicks(sid, *[(CLICK, i) for i in items_in("Electronics > Cameras")[:3]])
    async with client_for(with_(settings, config_path=config)) as client:
        before = (await client.get(f"/v1/slots/home_recs?session_id={sid}")).json()
        await clicks(sid, (EventType.IDENTIFY, None), user_id="ann")
        phone = next(s for s in (f"phone-{n}" for n in range(100)) if _group(s) == "holdout")
        on_phone = (await client.get(f"/v1/slots/home_recs?session_id={phone}&user_id=ann")).json()
    assert before["group"] == "treatment"
    # the phone's own id would be in the holdout; the user's anchor (the laptop) decides
    assert on_phone["group"] == "treatment"
    assert on_phone["strategy"] == "profile"
    assert sum(c.startswith("Electronics > Cameras") for c in _categories(on_phone)) >= 5


def _group(sid: str) -> str:
    from api.holdout import assign

    return assign(sid, 0.5).value


async def test_a_page_never_shows_an_item_twice(
    settings: Settings, clicks: Clicks, items_in: Picker
) -> None:
    await clicks("pager", *[(CLICK, i) for i in items_in("Fashion > Shoes")[:4]])
    slots = ["home_hero", "home_recs", {"slot": "pdp_similar", "n": 6}, "recommendations"]
    body = {"session_id": "pager", "item_id": items_in("Fashion > Shoes")[5], "slots": slots}
    async with client_for(settings) as client:
        response = await client.post("/v1/decisions", json=body)
    decisions = response.json()["decisions"]
    assert [d["slot"] for d in decisions] == [
        "home_hero",
        "home_recs",
        "pdp_similar",
        "recommendations",
    ]
    served = [i["item_id"] for d in decisions for i in d.get("items", [])]
    assert len(served) == 8 + 6 + 10
    assert len(set(served)) == len(served)
    assert decisions[2]["strategy"] == "personalized", [d["fallback_reason"] for d in decisions]
    assert len({d["decision_id"] for d in decisions}) == 4
