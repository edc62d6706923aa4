"""The machine-speed probe: a process of its own that times a fixed loop."""

from __future__ import annotations

import time

from loadtest.probe import SpeedProbe, work


def test_the_probe_reports_the_cpu_time_of_its_loop_and_goes_away() -> None:
    start = time.thread_time()
    work()
    here_ms = (time.thread_time() - start) * 1000
    probe = SpeedProbe()
    time.sleep(1.0)  # interpreter start, then a sample every 0.1 s
    ms = probe.stop()
    assert ms is not None
    assert here_ms / 20 < ms < here_ms * 20  # the same loop, on the same machine
    assert probe.proc.poll() is not None  # stopped


def test_a_probe_stopped_before_its_first_sample_reports_none() -> None:
    probe = SpeedProbe()
    assert probe.stop() is None
