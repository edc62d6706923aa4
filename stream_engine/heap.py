"""The garbage collector and long-lived state.

CPython's full (generation 2) collection walks every tracked object. A worker or an API
process holds the catalog, its indexes and the imported libraries for its whole life, so
each full collection walked all of it: 20-35 ms with the 10k-item demo catalog, every few
seconds under load (measured with gc.callbacks in the ingest and decision benchmarks), a
stall of every batch and request in flight and most of the p99.9 of both. Objects alive
when start-up is done are moved to the permanent generation instead (gc.freeze), so full
collections walk only what was created since.

Tried and dropped: collecting the young generation after 20,000 net allocations instead
of CPython's 700. Alone, the worker spent 0.9 s instead of 12.3 s of a 110 s run at
10,000 events/s in collections; but with the worker and the API on one 2-core box (the
peak suite) the larger young collections failed the nominal step three runs in three (p99
22-44 ms at 500/s against 10.8 with 700, same code otherwise, same period).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Call once the process has loaded what it keeps (catalog, config, clients)."""
    gc.collect()
    gc.freeze()
