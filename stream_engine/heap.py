"""The garbage collector and long-lived state.

CPython's full (generation 2) collection walks every tracked object. A worker or an API
process holds the catalog, its indexes and the imported libraries for its whole life, so
each full collection walked all of it: 20-35 ms with the 10k-item demo catalog, every few
seconds under load (measured with gc.callbacks in the ingest and decision benchmarks), a
stall of every batch and request in flight and most of the p99.9 of both. Objects alive
when start-up is done are moved to the permanent generation instead (gc.freeze), so full
collections walk only what was created since.

The young generation is collected after 20,000 net allocations instead of CPython's 700.
A worker batch or a decision allocates thousands of short-lived containers, and at 700
the worker ran ~225 young collections a second: 12.3 s of collections in a 110 s run at
10,000 events/s (gc.callbacks), against 0.9 s at 20,000. Objects freed by reference
counting never reach a collection, so a larger threshold costs little per collection.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """Call once the process has loaded what it keeps (catalog, config, clients)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 20)
