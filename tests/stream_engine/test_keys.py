"""The Redis key layout: no two owners ever share a key."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from stream_engine.catalog_updates import (
    catalog_changed_key,
    catalog_items_key,
    catalog_version_key,
)
from stream_engine.latent import latent_key, latent_seq_key
from stream_engine.state import Keys, hll_key, minute_key, report_fence_key

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


@given(IDS, IDS, IDS)
@example("agg", "agg", "s")
@example("report", "report", "x")
@example("catalog", "catalog", "items")
@example("ops", "ops", "pressure")
def test_no_session_or_user_shares_a_key_with_the_shared_state(
    sid: str, uid: str, item: str
) -> None:
    """A session may be named "agg", "report", "catalog" or "ops": the hash tags of the
    shared state. Its keys still never meet theirs."""
    shared = {K.agg_fence, K.agg_meta, K.agg_landmarks, K.covisit(item), K.trending(),
              K.trending(item), K.pressure, K.migrations, report_fence_key("kairos"),
              minute_key("kairos", 0), hll_key("kairos", "s", 0), catalog_items_key("kairos"),
              catalog_version_key("kairos"), catalog_changed_key("kairos"),
              latent_key("kairos"), latent_seq_key("kairos")}  # fmt: skip
    assert not (_session_keys(sid) | _user_keys(uid)) & shared
