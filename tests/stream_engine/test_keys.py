"""The Redis key layout: no two owners ever share a key."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stream_engine.state import Keys

IDS = st.from_regex(r"[A-Za-z0-9._:@\-]{1,128}", fullmatch=True)  # events.ID_PATTERN
K = Keys("kairos")


def _session_keys(sid: str) -> set[str]:
    return {K.session(sid), K.impressions(sid), K.exposures(sid), K.session_block(sid)}


def _user_keys(uid: str) -> set[str]:
    return {K.user(uid), K.user_sessions(uid), K.user_block(uid)}


@given(IDS, IDS)
def test_no_session_shares_a_key_with_a_user(sid: str, uid: str) -> None:
    assert not _session_keys(sid) & _user_keys(uid)


@given(IDS, IDS)
def test_two_sessions_or_two_users_share_no_key(a: str, b: str) -> None:
    if a != b:
        assert not _session_keys(a) & _session_keys(b)
        assert not _user_keys(a) & _user_keys(b)


def test_the_session_named_after_a_user_is_the_case_that_once_collided() -> None:
    assert K.session_block("u:alice") == "kairos:{u:alice}:x"
    assert K.user_block("alice") != K.session_block("u:alice")
