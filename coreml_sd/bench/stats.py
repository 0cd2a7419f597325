"""Summaries of repeated timings: median and spread, robust to the odd slow run on a shared machine."""

from __future__ import annotations

import statistics


def summarize(times: list[float]) -> dict:
    """Median, p10, p90 and IQR (seconds) of a list of seconds; n=1 gives zero spread."""
    if not times:
        raise ValueError("summarize needs at least one timing")
    if len(times) > 1:
        qs = statistics.quantiles(times, n=20, method="inclusive")  # 5 % steps: [1] = p10, [17] = p90
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        qs, q1, q3 = [times[0]] * 19, times[0], times[0]
    return {"n": len(times), "median_s": statistics.median(times), "p10_s": qs[1], "p90_s": qs[17],
            "iqr_s": q3 - q1, "min_s": min(times), "max_s": max(times)}
