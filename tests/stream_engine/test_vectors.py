from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_engine.catalog import Vector
from stream_engine.vectors import (
    decay_factor,
    fold_events,
    fold_many,
    fold_one,
    from_bytes,
    to_bytes,
)

HALF_LIFE = 60_000.0


def test_one_half_life_halves() -> None:
    assert float(decay_factor(HALF_LIFE, HALF_LIFE)) == 0.5
    assert float(decay_factor(0, HALF_LIFE)) == 1.0


def test_fold_weights_and_decays_by_event_time() -> None:
    items = np.eye(3, dtype=np.float32)
    v, t = fold_events(
        np.zeros(3, np.float32), None, np.array([0, 60_000]), np.array([1.0, 2.0]), items[:2],
        HALF_LIFE,
    )  # fmt: skip
    assert t == 60_000
    np.testing.assert_allclose(v, [0.5, 2.0, 0.0], rtol=1e-6)


events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3_600_000),
        st.sampled_from([1.0, 2.0, 4.0, 6.0, -1.0]),
        st.integers(min_value=0, max_value=4),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200)
@given(events=events, split=st.integers(min_value=0, max_value=12), seed=st.integers(0, 99))
def test_order_and_batching_do_not_change_the_result(
    events: list[tuple[int, float, int]], split: int, seed: int
) -> None:
    """Applying a session's events in any order, in one batch or two, gives one vector."""
    rng = np.random.default_rng(seed)
    catalog = rng.random((5, 8), dtype=np.float32)

    def fold(
        evs: list[tuple[int, float, int]], old: Vector, old_ts: int | None
    ) -> tuple[Vector, int | None]:
        if not evs:
            return old, old_ts
        ts = np.array([e[0] for e in evs], dtype=np.int64)
        w = np.array([e[1] for e in evs])
        return fold_events(old, old_ts, ts, w, catalog[[e[2] for e in evs]], HALF_LIFE)

    zero = np.zeros(8, np.float32)
    whole, t_whole = fold(events, zero, None)
    shuffled = [events[i] for i in rng.permutation(len(events))]
    first, t_first = fold(shuffled[:split], zero, None)
    if t_first is None:
        two, t_two = fold(shuffled, zero, None)
    else:
        two, t_two = fold(shuffled[split:], first, t_first)
    assert t_two == t_whole
    np.testing.assert_allclose(two, whole, rtol=1e-4, atol=1e-4)


def test_bytes_round_trip_little_endian_float32() -> None:
    v = np.array([1.5, -2.25, 0.0], dtype=np.float32)
    raw = to_bytes(v)
    assert raw == np.array([1.5, -2.25, 0.0], dtype="<f4").tobytes()
    restored = from_bytes(raw, 3)
    assert restored is not None
    np.testing.assert_array_equal(restored, v)
    assert from_bytes(raw, 4) is None


@settings(max_examples=100)
@given(
    sessions=st.lists(events, min_size=1, max_size=6),
    olds=st.lists(st.one_of(st.none(), st.integers(0, 3_600_000)), min_size=6, max_size=6),
    seed=st.integers(0, 99),
)
def test_fold_many_is_fold_events_for_each_session(
    sessions: list[list[tuple[int, float, int]]], olds: list[int | None], seed: int
) -> None:
    """The batched fold the worker uses equals the one-session reference, session by session."""
    rng = np.random.default_rng(seed)
    catalog = rng.random((5, 8), dtype=np.float32)
    old = rng.random((len(sessions), 8), dtype=np.float32)
    old_ts = np.array([o or 0 for o in olds[: len(sessions)]], dtype=np.int64)
    has_old = np.array([o is not None for o in olds[: len(sessions)]])
    owner = np.array([i for i, evs in enumerate(sessions) for _ in evs], dtype=np.int64)
    flat = [e for evs in sessions for e in evs]
    many, times = fold_many(
        old, old_ts, has_old, owner, np.array([e[0] for e in flat], dtype=np.int64),
        np.array([e[1] for e in flat]), catalog[[e[2] for e in flat]], HALF_LIFE,
    )  # fmt: skip
    for i, evs in enumerate(sessions):
        one, t = fold_events(
            old[i] if has_old[i] else np.zeros(8, np.float32),
            int(old_ts[i]) if has_old[i] else None,
            np.array([e[0] for e in evs], dtype=np.int64), np.array([e[1] for e in evs]),
            catalog[[e[2] for e in evs]], HALF_LIFE,
        )  # fmt: skip
        assert int(times[i]) == t
        np.testing.assert_allclose(many[i], one, rtol=1e-4, atol=1e-4)


@settings(max_examples=200)
@given(
    ts=st.integers(0, 3_600_000),
    weight=st.floats(0.01, 10),
    row=st.integers(0, 4),
    old_ts=st.one_of(st.none(), st.integers(0, 3_600_000)),
    seed=st.integers(0, 99),
)
def test_fold_one_is_fold_events_for_one_event(
    ts: int, weight: float, row: int, old_ts: int | None, seed: int
) -> None:
    """The one-event fold the worker uses for most sessions of a small batch equals the
    reference, with or without an earlier vector, whichever is newer."""
    rng = np.random.default_rng(seed)
    catalog = rng.random((5, 8), dtype=np.float32)
    old = rng.random(8, dtype=np.float32) if old_ts is not None else None
    one, t = fold_one(old, old_ts, ts, weight, catalog[row], HALF_LIFE)
    ref, ref_t = fold_events(
        old if old is not None else np.zeros(8, np.float32), old_ts,
        np.array([ts], dtype=np.int64), np.array([weight]), catalog[[row]], HALF_LIFE,
    )  # fmt: skip
    assert t == ref_t
    assert one.dtype == np.float32
    np.testing.assert_allclose(one, ref, rtol=1e-6, atol=1e-7)
