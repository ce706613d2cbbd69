"""The one percentile definition (nearest rank) and the distribution summary every benchmark reports."""
from portal.distribution import distribution, percentile


def test_nearest_rank_is_a_measured_value():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0, 20, 21, 50, 90, 95, 99, 100)] == [1.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0]
    assert percentile([1, 2, 3, 4], 50) == 2  # rank ceil(0.5 * 4) = 2: no average of the two middle values
    assert percentile([1, 2, 3, 4], 51) == 3
    assert percentile(range(1, 101), 95) == 95 and percentile(range(1, 21), 95) == 19
    assert percentile([], 50) is None
    assert percentile([7.5], 99) == 7.5


def test_distribution_summary():
    values = [0.3, 0.1, 0.2, 0.4]
    assert distribution(values) == {"count": 4, "mean": 0.25, "p50": 0.2, "p90": 0.4, "p95": 0.4, "p99": 0.4,
                                    "max": 0.4}
    assert list(distribution(values)) == ["count", "mean", "p50", "p90", "p95", "p99", "max"]
    assert distribution([1 / 3], (50,), digits=3) == {"count": 1, "mean": 0.333, "p50": 0.333, "max": 0.333}
    assert distribution([1 / 3], (50,), digits=None)["p50"] == 1 / 3
    assert distribution([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p95": None, "p99": None,
                                "max": None}
