"""Evaluation metrics for the supervised multi-task benchmarks (domain-free math only).

Every function takes numpy arrays or torch tensors (anything ``np.asarray`` accepts after a
``.detach().cpu()``) and returns plain Python floats (or dicts of them), so results can go
straight into JSON. Nothing here loads data.

Classification: :func:`accuracy`, :func:`binary_f1`, :func:`matthews_corrcoef`.
Regression / correlation: :func:`pearson`, :func:`spearman` (ties get their average rank).
Dense prediction: :func:`confusion_matrix` / :class:`ConfusionMatrix`, :func:`segmentation_metrics`
(mIoU and pixel accuracy with an ignore index), :func:`depth_errors` (absolute and relative
error on valid pixels), :func:`normal_errors` (angle mean/median and the fractions within
11.25, 22.5 and 30 degrees).
Multi-task summary: :func:`delta_m`.
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
    "confusion_matrix",
    "ConfusionMatrix",
    "segmentation_metrics",
    "segmentation_metrics_from_confusion",
    "depth_errors",
    "normal_errors",
    "delta_m",
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


# ---- dense prediction ---------------------------------------------------------------------
def confusion_matrix(pred: Any, target: Any, n_classes: int, ignore_index: int | None = -1) -> np.ndarray:
    """``[n_classes, n_classes]`` int64 counts; rows are true classes, columns predictions.

    Pixels whose target equals ``ignore_index`` (or lies outside ``[0, n_classes)``) are
    left out. ``pred`` may be labels shaped like ``target`` or scores with the class axis
    at dimension 1 (``[N, K, H, W]`` against ``[N, H, W]``).
    """
    t = to_numpy(target)
    p = to_numpy(pred)
    if p.ndim == t.ndim + 1:
        p = p.argmax(1)
    if p.shape != t.shape:
        raise ValueError(f"predictions of shape {p.shape} do not match targets of shape {t.shape}")
    t = t.ravel().astype(np.int64)
    p = p.ravel().astype(np.int64)
    valid = (t >= 0) & (t < n_classes)
    if ignore_index is not None:
        valid &= t != ignore_index
    t, p = t[valid], p[valid]
    if p.size and (p.min() < 0 or p.max() >= n_classes):
        raise ValueError(f"predicted classes must lie in [0, {n_classes})")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; :meth:`compute` gives mIoU and pixel accuracy."""

    def __init__(self, n_classes: int, ignore_index: int | None = -1):
        self.n_classes, self.ignore_index = n_classes, ignore_index
        self.matrix = np.zeros((n_classes, n_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        self.matrix += confusion_matrix(pred, target, self.n_classes, self.ignore_index)

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self) -> dict[str, float]:
        return segmentation_metrics_from_confusion(self.matrix)


def segmentation_metrics_from_confusion(conf: np.ndarray) -> dict[str, float]:
    """``{"miou", "pixel_acc"}`` from a confusion matrix.

    IoU_c = TP / (TP + FP + FN); the mean skips classes that appear neither in the targets
    nor in the predictions (union 0), as ``np.nanmean`` over LibMTL's per-class IoU would.
    Pixel accuracy = trace / total over non-ignored pixels.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    total = conf.sum()
    miou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
    return {"miou": miou, "pixel_acc": float(tp.sum() / total) if total else float("nan")}


def segmentation_metrics(pred: Any, target: Any, n_classes: int, ignore_index: int | None = -1) -> dict[str, float]:
    """Mean IoU and pixel accuracy (see :func:`segmentation_metrics_from_confusion`)."""
    return segmentation_metrics_from_confusion(confusion_matrix(pred, target, n_classes, ignore_index))


def depth_errors(pred: Any, target: Any, valid: Any | None = None) -> dict[str, float]:
    """``{"abs_err", "rel_err"}`` over valid pixels, pooled over every pixel given.

    abs_err = mean |pred - target|, rel_err = mean |pred - target| / target. Valid pixels
    are ``valid`` when given, else those with ``target != 0`` (the MTAN / LibMTL convention:
    a depth of 0 marks a missing measurement). LibMTL averages per batch then over batches;
    pooling over pixels is the same when every batch has the same number of valid pixels.
    """
    p = to_numpy(pred).astype(np.float64)
    t = to_numpy(target).astype(np.float64)
    if p.shape != t.shape:
        raise ValueError(f"depth prediction {p.shape} and target {t.shape} differ in shape")
    m = (t != 0) if valid is None else to_numpy(valid).astype(bool)
    m = np.broadcast_to(m, t.shape)
    if not m.any():
        raise ValueError("no valid depth pixels")
    err = np.abs(p[m] - t[m])
    return {"abs_err": float(err.mean()), "rel_err": float((err / np.abs(t[m])).mean())}


def normal_errors(pred: Any, target: Any, valid: Any | None = None, axis: int = 1) -> dict[str, float]:
    """Angular error (degrees) between predicted and true surface normals on valid pixels.

    ``pred`` and ``target`` hold 3-vectors along ``axis`` (``[N, 3, H, W]`` by default).
    Predictions are L2-normalised first; targets are used as given (unit length in the
    NYUv2 files). Valid pixels are ``valid`` when given, else those whose target vector is
    not all zeros. Returns ``{"mean", "median", "within_11.25", "within_22.5",
    "within_30"}``, the last three as fractions in [0, 1] (as MTAN / LibMTL report them).
    """
    p = np.moveaxis(to_numpy(pred).astype(np.float64), axis, -1)
    t = np.moveaxis(to_numpy(target).astype(np.float64), axis, -1)
    if p.shape != t.shape or p.shape[-1] != 3:
        raise ValueError(f"normals need matching shapes with 3 components on axis {axis}; got {p.shape}, {t.shape}")
    m = np.any(t != 0, axis=-1) if valid is None else np.broadcast_to(to_numpy(valid).astype(bool), t.shape[:-1])
    if not m.any():
        raise ValueError("no valid normal pixels")
    p, t = p[m], t[m]
    p = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    cos = np.clip((p * t).sum(-1), -1.0, 1.0)
    ang = np.degrees(np.arccos(cos))
    return {
        "mean": float(ang.mean()),
        "median": float(np.median(ang)),
        "within_11.25": float((ang < 11.25).mean()),
        "within_22.5": float((ang < 22.5).mean()),
        "within_30": float((ang < 30).mean()),
    }


# ---- multi-task summary --------------------------------------------------------------------
LOWER_IS_BETTER: dict[str, bool] = {
    "accuracy": False, "f1": False, "mcc": False, "pearson": False, "spearman": False,
    "miou": False, "pixel_acc": False, "abs_err": True, "rel_err": True,
    "mean": True, "median": True, "within_11.25": False, "within_22.5": False, "within_30": False,
}
"""Direction of the metrics this module computes, for :func:`delta_m`."""


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
