"""A benchmark's wait on its worker ends as soon as the worker has exited, saying why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.ingest import LOG_TAIL_LINES, WorkerExited, check_worker


def _worker(workdir: Path, code: str) -> subprocess.Popen[bytes]:
    with (workdir / "worker-faust.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)


def test_a_worker_that_died_is_reported_with_its_code_and_last_log_lines(tmp_path: Path) -> None:
    lines = "; ".join(f"print('line {i}')" for i in range(LOG_TAIL_LINES + 5))
    proc = _worker(tmp_path, f"{lines}; raise SystemExit(3)")
    proc.wait(timeout=30)
    with pytest.raises(WorkerExited) as caught:
        check_worker(proc, tmp_path, "faust")
    said = str(caught.value)
    assert "the faust worker exited with 3" in said
    assert f"line {LOG_TAIL_LINES + 4}" in said  # the last line
    assert f"line {LOG_TAIL_LINES + 5 - LOG_TAIL_LINES}" in said  # the first of the tail
    assert "line 4\n" not in said + "\n"  # older lines left out


def test_a_running_worker_passes(tmp_path: Path) -> None:
    proc = _worker(tmp_path, "import time; time.sleep(30)")
    try:
        check_worker(proc, tmp_path, "faust")  # no exception
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_without_a_log_still_says_it_exited(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    proc.wait(timeout=30)
    with pytest.raises(WorkerExited, match=r"(?s)exited with 1.*\(nothing\)"):
        check_worker(proc, tmp_path / "gone", "librdkafka")
