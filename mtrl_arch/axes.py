"""What the report's figures share about their axes: counts read in k/M, and each metric's range.

A ±1 std band drawn around a mean can leave the range its metric lives in (a success rate of
0.05 ± 0.1 is not -0.05); :func:`clipped_band` cuts it at the range :func:`metric_range` knows
from the metric's name. Names it does not know are left unclipped: observed bounds would cut a
band at the lowest value seen, which says nothing about where the metric can go.
"""
from __future__ import annotations

import math
from typing import Sequence

_UNIT = (0.0, 1.0)
_CORRELATION = (-1.0, 1.0)
_NON_NEGATIVE = (0.0, math.inf)
# by the last part of an ``eval/<metric>/<task>`` key (the vision names: envs/vision_metrics.py)
_RANGES = {"success_rate": _UNIT, "accuracy": _UNIT, "f1": _UNIT, "miou": _UNIT, "pixel_acc": _UNIT,
           "mcc": _CORRELATION, "pearson": _CORRELATION, "spearman": _CORRELATION}


def metric_range(name: str) -> tuple[float, float] | None:
    """The values ``name`` can take, from its name: rates and accuracies [0, 1], correlations [-1, 1], losses and
    errors [0, inf); None for a name it does not know (e.g. ``return``: rewards may be negative)."""
    if name in _RANGES:
        return _RANGES[name]
    if name.startswith("within_"):  # surface normals: the share of pixels within an angle
        return _UNIT
    if name.endswith(("loss", "err", "error")):
        return _NON_NEGATIVE
    return None


def clipped_band(mean: Sequence[float], std: Sequence[float], name: str) -> tuple[list[float], list[float]]:
    """The band ``mean ± std``, each edge clipped to ``name``'s range (:func:`metric_range`)."""
    lo, hi = metric_range(name) or (-math.inf, math.inf)
    return ([min(max(m - s, lo), hi) for m, s in zip(mean, std)],
            [min(max(m + s, lo), hi) for m, s in zip(mean, std)])


def human_count(x: float) -> str:
    """A count as people read it on an axis: 950, 1.5k, 200k, 1.2M, 3B (at most 3 significant digits)."""
    x = float(f"{x:.3g}")  # rounded first, so 999,999 reads 1M, not 1e+03k
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def count_formatter():
    """A matplotlib tick formatter writing counts (env steps, parameters) with :func:`human_count`."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: human_count(x))
