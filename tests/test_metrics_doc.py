"""docs/metrics.md names every metric the worker and the API register, with its labels,
and nothing they don't: a metric added or renamed without the page fails here."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from api.metrics import ApiMetrics
from stream_engine.metrics import WorkerMetrics

PAGE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(kairos_[a-z_]+)` \| (\w+) \|([^|]*)\|", re.MULTILINE)


def _registered(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    """name on the wire (counters with _total) -> (type, label names)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for family in registry.collect():
        if not family.name.startswith("kairos_"):
            continue  # process_* and the like
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = (family.type, set())
    # Label names are on the metric objects (a family with no child yet has no samples).
    for collector in list(registry._collector_to_names):
        labels = getattr(collector, "_labelnames", ())
        for name in registry._collector_to_names[collector]:
            for wire in (name, name + "_total"):
                if wire in out:
                    out[wire] = (out[wire][0], set(labels))
    return out


def _documented() -> dict[str, tuple[str, set[str]]]:
    rows = ROW.findall(PAGE.read_text())
    return {
        name: (kind, {lbl.strip(" `") for lbl in labels.split(",") if lbl.strip()})
        for name, kind, labels in rows
    }


def test_every_registered_metric_is_documented_with_its_type_and_labels() -> None:
    registered = _registered(WorkerMetrics().registry) | _registered(ApiMetrics().registry)
    documented = _documented()
    assert len(registered) > 30  # both processes were read
    assert sorted(set(registered) - set(documented)) == []  # missing from the page
    assert sorted(set(documented) - set(registered)) == []  # on the page, not registered
    assert {n: registered[n] for n in registered} == {n: documented[n] for n in registered}
