"""Small statistics: percentiles of sorted samples, medians of runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(sorted_samples: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of already sorted samples (NaN when there are none)."""
    if not sorted_samples:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_samples)))
    return sorted_samples[min(rank, len(sorted_samples)) - 1]


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan
