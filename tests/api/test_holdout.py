"""Holdout hashing: deterministic, the configured share, and stable when a visitor logs in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.holdout import Group, assign, bucket, stable_id

IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)


@given(IDS, st.floats(0.0, 0.5))
def test_assignment_is_deterministic_and_monotonic_in_the_share(sid: str, share: float) -> None:
    assert assign(sid, share) is assign(sid, share)
    if assign(sid, share) is Group.HOLDOUT:
        assert assign(sid, min(0.5, share + 0.1)) is Group.HOLDOUT
    assert 0.0 <= bucket(sid) < 1.0


def test_the_share_is_what_is_configured() -> None:
    n = 20_000
    held = sum(assign(f"session-{i}", 0.05) is Group.HOLDOUT for i in range(n))
    assert abs(held / n - 0.05) < 0.006  # ~4 standard deviations


@given(IDS)
def test_a_visitor_keeps_the_group_after_logging_in(sid: str) -> None:
    before = assign(stable_id(sid, None), 0.3)
    # identify makes this session the user's anchor; every later request uses it
    assert assign(stable_id(sid, sid), 0.3) is before
    assert assign(stable_id("another-device-session", sid), 0.3) is before
