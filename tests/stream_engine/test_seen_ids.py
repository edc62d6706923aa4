"""A session's memory of its last event ids (planning.unseen), against a plain model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_engine import planning
from stream_engine.events import Event, EventType
from stream_engine.planning import DIGEST, SEEN_IDS, Positioned, id_digest, unseen

IDS = st.text(alphabet="abc", min_size=1, max_size=3)


def _events(ids: list[str]) -> list[Positioned]:
    return [Positioned(Event(i, EventType.VIEW, "s", 1, item_id="sku-1"), 0, n, 0)
            for n, i in enumerate(ids)]  # fmt: skip


@given(before=st.lists(IDS, max_size=40), batch=st.lists(IDS, max_size=40))
def test_unseen_keeps_first_sightings_and_remembers_the_last_ids(
    before: list[str], batch: list[str]
) -> None:
    seen = b"".join(id_digest(i) for i in before)[-SEEN_IDS * DIGEST :]
    kept, after, repeats = unseen(_events(batch), seen)
    known = {seen[k : k + DIGEST] for k in range(0, len(seen), DIGEST)}
    want: list[str] = []
    for i in batch:
        if id_digest(i) not in known:
            known.add(id_digest(i))
            want.append(i)
    assert [p.event.event_id for p in kept] == want
    assert len(kept) + len(repeats) == len(batch)
    assert after == (seen + b"".join(id_digest(i) for i in want))[-SEEN_IDS * DIGEST :]


def test_a_match_across_two_digests_is_not_a_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digests are searched as bytes: an id whose digest is where one stored digest's
    end meets the next one's start is new, and one of a stored digest is a repeat."""
    a, b = planning.id_digest("a"), planning.id_digest("b")
    straddling = a[4:] + b[:4]
    digests = {"x": straddling, "b": b}
    monkeypatch.setattr(planning, "id_digest", lambda event_id: digests[event_id])
    kept, after, repeats = unseen(_events(["x", "b"]), a + b)
    assert [p.event.event_id for p in kept] == ["x"]
    assert [p.event.event_id for p in repeats] == ["b"]
    assert after == a + b + straddling
