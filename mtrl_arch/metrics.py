"""Evaluation metrics for the supervised multi-task benchmarks (domain-free math only).

Every function takes numpy arrays or torch tensors (anything ``np.asarray`` accepts after a
``.detach().cpu()``) and returns plain Python floats (or dicts of them), so results can go
straight into JSON. Nothing here loads data.

Classification: :func:`accuracy`, :func:`binary_f1`, :func:`matthews_corrcoef`.
Regression / correlation: :func:`pearson`, :func:`spearman` (ties get their average rank).
Multi-task summary: :func:`delta_m`. Comparing two settings seed by seed: :func:`paired_bootstrap_ci`.
The vision metrics (segmentation, depth, normals) are in :mod:`mtrl_arch.envs.vision_metrics`.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = [
    "to_numpy",
    "accuracy",
    "binary_f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "delta_m",
    "paired_bootstrap_ci",
    "LOWER_IS_BETTER",
]


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(pred: Any, target: np.ndarray) -> np.ndarray:
    """Class predictions: scores ``[N, K]`` are turned into labels by argmax."""
    p = to_numpy(pred)
    if p.ndim == target.ndim + 1:
        p = p.argmax(-1)
    if p.shape != target.shape:
        raise ValueError(f"predictions of shape {p.shape} do not match targets of shape {target.shape}")
    return p


# ---- classification ----------------------------------------------------------------------
def accuracy(pred: Any, target: Any) -> float:
    """Fraction of correct predictions. ``pred`` is labels ``[N]`` or scores ``[N, K]``."""
    t = to_numpy(target)
    p = _labels(pred, t)
    if t.size == 0:
        raise ValueError("accuracy of an empty set")
    return float((p == t).mean())


def binary_f1(pred: Any, target: Any, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2TP / (2TP + FP + FN); 0.0 when there is no TP, FP or FN."""
    t = to_numpy(target)
    p = _labels(pred, t)
    tp = int(np.sum((p == positive) & (t == positive)))
    fp = int(np.sum((p == positive) & (t != positive)))
    fn = int(np.sum((p != positive) & (t == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def matthews_corrcoef(pred: Any, target: Any) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; the binary
    MCC for two classes). 0.0 when it is undefined (a constant prediction or target), as
    in scikit-learn."""
    t = to_numpy(target).ravel()
    p = _labels(pred, to_numpy(target)).ravel()
    classes, inv = np.unique(np.concatenate([t, p]), return_inverse=True)
    k = len(classes)
    ti, pi = inv[: len(t)], inv[len(t):]
    C = np.zeros((k, k), dtype=np.float64)
    np.add.at(C, (ti, pi), 1.0)
    t_sum, p_sum = C.sum(1), C.sum(0)  # true / predicted counts per class
    n, correct = C.sum(), np.trace(C)
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    denom = np.sqrt(cov_ytyt * cov_ypyp)
    return 0.0 if denom == 0 else float(cov_ytyp / denom)


# ---- correlation ---------------------------------------------------------------------------
def pearson(x: Any, y: Any) -> float:
    """Pearson correlation; NaN when either input is constant."""
    a = to_numpy(x).astype(np.float64).ravel()
    b = to_numpy(y).astype(np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"pearson needs two equal-length inputs of 2+ values, got {a.shape} and {b.shape}")
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float("nan") if denom == 0 else float((a * b).sum() / denom)


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..N; tied values get the average of the ranks they span (scipy's 'average')."""
    a = to_numpy(x).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start of each run of equal values
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [len(a)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


# ---- multi-task summary --------------------------------------------------------------------
LOWER_IS_BETTER: dict[str, bool] = {
    "accuracy": False, "f1": False, "mcc": False, "pearson": False, "spearman": False,
}
"""Direction of the metrics this module computes, for :func:`delta_m` (the vision metrics':
:data:`mtrl_arch.envs.vision_metrics.LOWER_IS_BETTER`)."""


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    lower_is_better: Mapping[str, bool] | Mapping[str, Mapping[str, bool]] | None = None,
    per_task: bool = True,
) -> float:
    """Relative multi-task performance against a (single-task) baseline, in percent.

    LibMTL's ``count_improvement`` definition (the Maninis et al. 2019 Delta_m averaged per
    task first)::

        Delta_m = 100 / T * sum_t 1/M_t * sum_m (-1)^{l_{t,m}} (M_{t,m} - B_{t,m}) / B_{t,m}

    with ``l_{t,m} = 1`` when lower is better for metric m, ``M`` the method's results and
    ``B`` the baseline's. Positive is better than the baseline. With ``per_task=False`` it
    is the flat mean over all (task, metric) pairs (Maninis' original form; the two agree
    when every task has one metric).

    ``lower_is_better`` maps metric name -> bool, or task -> metric -> bool; metrics it does
    not name fall back to :data:`LOWER_IS_BETTER`. Every metric in ``results`` needs a
    nonzero baseline value.
    """
    lib = lower_is_better or {}
    terms: list[list[float]] = []
    for task, metrics in results.items():
        if task not in baseline:
            raise KeyError(f"no baseline for task {task!r}")
        row = []
        for name, value in metrics.items():
            if name not in baseline[task]:
                raise KeyError(f"no baseline for metric {name!r} of task {task!r}")
            b = float(baseline[task][name])
            if b == 0:
                raise ValueError(f"baseline {task}/{name} is 0; the relative change is undefined")
            spec = lib.get(task) if isinstance(lib.get(task), Mapping) else lib
            if name in spec:
                lower = bool(spec[name])
            elif name in LOWER_IS_BETTER:
                lower = LOWER_IS_BETTER[name]
            else:
                raise KeyError(f"say whether lower is better for metric {name!r} (task {task!r})")
            sign = -1.0 if lower else 1.0
            row.append(sign * (float(value) - b) / b)
        if not row:
            raise ValueError(f"task {task!r} has no metrics")
        terms.append(row)
    if not terms:
        raise ValueError("no results")
    if per_task:
        return float(100.0 * np.mean([np.mean(r) for r in terms]))
    return float(100.0 * np.mean([v for r in terms for v in r]))


# ---- comparing two settings ----------------------------------------------------------------
def paired_bootstrap_ci(diffs: Any, level: float = 0.95, n_resamples: int = 10_000,
                        seed: int = 0) -> tuple[float, float, float]:
    """The mean of paired differences (one per seed both settings ran) and its percentile bootstrap interval.

    The pairs are resampled with replacement ``n_resamples`` times (a generator seeded by
    ``seed``: the same answer every call); the interval holds the central ``level`` share of
    the resampled means. With one pair the interval is that difference (nothing to resample).
    """
    d = to_numpy(diffs).astype(np.float64).ravel()
    if d.size == 0:
        raise ValueError("no paired differences")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    means = d[np.random.default_rng(seed).integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(d.mean()), float(lo), float(hi)
