"""The one definition of a percentile, and the summary of a distribution built on it, for every measurement the
project reports: load benchmarks (portal/benchmark.py), the proxy and reconciler benchmarks (benchmarks/).

A percentile is nearest-rank: the p-th percentile of n values is the value at rank ceil(p / 100 * n) in
ascending order (p0 is the smallest, p100 the largest), so it is always a value that was measured.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

PERCENTILES = (50, 90, 95, 99)


def _nearest_rank(ordered: List[float], q: float) -> float:
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def percentile(values: Iterable[float], q: float) -> Optional[float]:
    """Nearest-rank percentile `q` (0 to 100) of `values`; None without values."""
    ordered = sorted(values)
    return _nearest_rank(ordered, q) if ordered else None


def distribution(values: Sequence[float], percentiles: Sequence[float] = PERCENTILES,
                 digits: Optional[int] = 6) -> Dict[str, Optional[float]]:
    """{count, mean, p<q> for each of `percentiles`, max}, rounded to `digits` places (None: as measured); all
    but the count are None without values."""
    ordered = sorted(values)

    def rounded(value: float) -> float:
        return value if digits is None else round(value, digits)

    figures: Dict[str, Optional[float]] = {"count": len(ordered),
                                           "mean": rounded(sum(values) / len(ordered)) if ordered else None}
    for q in percentiles:
        figures[f"p{q:g}"] = rounded(_nearest_rank(ordered, q)) if ordered else None
    figures["max"] = rounded(ordered[-1]) if ordered else None
    return figures
