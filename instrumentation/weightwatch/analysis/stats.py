"""Summary statistics of one measure: count, mean, standard deviation, percentiles, max.

Uses numpy when it is installed (it is wherever vLLM or torch is) for million-value runs; the pure
Python path gives the same numbers (linear-interpolation percentiles, sample standard deviation).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

_np: Any
try:  # optional: an order of magnitude faster on big runs
    import numpy as _np
except ImportError:  # pragma: no cover - exercised where numpy is missing
    _np = None

PERCENTILES = (50, 95, 99)
_NUMPY_MIN = 10_000


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on already sorted values."""
    n = len(sorted_values)
    if n == 1:
        return sorted_values[0]
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _empty() -> dict[str, Any]:
    return {"count": 0, "mean": None, "stddev": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """count, mean, stddev (sample), min, p50/p95/p99, max; None values are skipped, empty gives count 0."""
    if _np is not None and isinstance(values, _np.ndarray):  # the analyzer's numpy path: no None in there
        xs = values if len(values) >= _NUMPY_MIN else values.tolist()
    else:
        xs = values if isinstance(values, list) and None not in values else [v for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return _empty()
    if _np is not None and n >= _NUMPY_MIN:
        a = _np.asarray(xs, dtype=_np.float64)
        out: dict[str, Any] = {"count": n, "mean": float(a.mean()), "stddev": float(a.std(ddof=1)) if n > 1 else 0.0, "min": float(a.min())}
        for q, v in zip(PERCENTILES, _np.percentile(a, PERCENTILES), strict=False):
            out[f"p{q}"] = float(v)
        out["max"] = float(a.max())
        return out
    xs = sorted(xs)
    total = math.fsum(xs)
    mean = total / n
    var = max(0.0, (math.fsum(map(operator.mul, xs, xs)) - total * mean) / (n - 1)) if n > 1 else 0.0
    out = {"count": n, "mean": mean, "stddev": math.sqrt(var), "min": xs[0]}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["max"] = xs[-1]
    return out
