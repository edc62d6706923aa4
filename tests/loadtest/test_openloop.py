"""The open-loop pacer: on schedule, and with the generator's garbage collector off while
it paces (a collection mid-step would be measured as the system's latency)."""

from __future__ import annotations

import gc

from loadtest.openloop import collector_paused, open_loop


async def test_every_send_is_made_with_the_collector_off_and_it_is_back_on_after() -> None:
    seen: list[tuple[int, bool]] = []

    async def send(i: int, intended: float) -> None:
        seen.append((i, gc.isenabled()))

    assert gc.isenabled()
    stats = await open_loop(200, 0.1, send)
    assert [i for i, _ in seen] == list(range(20))
    assert not any(enabled for _, enabled in seen)
    assert stats.sent == 20
    assert gc.isenabled()


def test_a_nested_pause_leaves_the_collector_to_the_outermost() -> None:
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner one did not turn it back on
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # off before: stays off
    finally:
        gc.enable()
