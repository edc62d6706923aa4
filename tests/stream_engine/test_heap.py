"""Start-up heap freezing and the young-generation threshold."""

from __future__ import annotations

import gc

from stream_engine.heap import YOUNG_THRESHOLD, freeze_startup_heap


def test_startup_objects_are_frozen_and_young_collections_are_rarer() -> None:
    before = gc.get_threshold()
    # CPython's default: an API lifespan run by another test may have set ours already
    gc.set_threshold(700, 10, 10)
    keep = [[i] for i in range(1000)]  # long-lived containers made before start-up ends
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(keep)
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
