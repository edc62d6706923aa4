"""Quantiles of a Prometheus histogram between two scrapes, as `histogram_quantile` has them.

A benchmark reads a process's /metrics before and after a step; what the process
observed during the step is the difference of the cumulative bucket counts. The
quantile is interpolated linearly within its bucket, as Prometheus does, so it is as
fine as the buckets are.
"""

from __future__ import annotations

Buckets = dict[float, float]  # upper bound (le) -> cumulative count


def buckets(text: str, metric: str, labels: str = "") -> Buckets:
    """The cumulative bucket counts of one series of `metric` in an exposition. `labels`:
    the series' other labels as printed before `le`, e.g. 'endpoint="slots",'."""
    prefix = f'{metric}_bucket{{{labels}le="'
    found: Buckets = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            found[float(name[len(prefix) :].split('"', 1)[0])] = float(value)
    return found


def quantile(before: Buckets, after: Buckets, q: float) -> float | None:
    """The q-quantile (0 < q < 1) of what was observed between the two scrapes, in the
    metric's unit; None if nothing was. In the +Inf bucket: its lower bound, the highest
    finite one (the answer is then "at least this")."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be between 0 and 1, not {q}")
    delta = sorted((le, n - before.get(le, 0.0)) for le, n in after.items())
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in delta:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower
