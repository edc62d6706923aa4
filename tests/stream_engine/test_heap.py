"""Start-up heap freezing."""

from __future__ import annotations

import gc

from stream_engine.heap import freeze_startup_heap


def test_startup_objects_are_frozen_out_of_full_collections() -> None:
    keep = [[i] for i in range(1000)]  # long-lived containers made before start-up ends
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(keep)
        walked = {id(o) for o in gc.get_objects(generation=2)}
        assert id(keep) not in walked  # a full collection no longer walks it
    finally:
        gc.unfreeze()
