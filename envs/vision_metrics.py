"""Evaluation metrics of dense prediction (NYUv2, CityScapes): segmentation, depth, surface normals.

Vision-specific, so they live with the adapters rather than in the domain-free core
(:mod:`mtrl_arch.metrics` keeps classification, correlation and :func:`~mtrl_arch.metrics.delta_m`).
Same conventions: numpy arrays or torch tensors in, plain Python floats (or dicts of them) out.

:func:`confusion_matrix` / :class:`ConfusionMatrix`, :func:`segmentation_metrics` (mIoU and
pixel accuracy with an ignore index), :func:`depth_errors` (absolute and relative error on
valid pixels), :func:`normal_errors` (angle mean/median and the fractions within 11.25, 22.5
and 30 degrees); :data:`LOWER_IS_BETTER` gives their directions for ``delta_m``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mtrl_arch.metrics import to_numpy

__all__ = [
    "confusion_matrix",
    "ConfusionMatrix",
    "segmentation_metrics",
    "segmentation_metrics_from_confusion",
    "depth_errors",
    "normal_errors",
    "LOWER_IS_BETTER",
]


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


LOWER_IS_BETTER: dict[str, bool] = {
    "miou": False, "pixel_acc": False, "abs_err": True, "rel_err": True,
    "mean": True, "median": True, "within_11.25": False, "within_22.5": False, "within_30": False,
}
"""Direction of the metrics this module computes, for :func:`mtrl_arch.metrics.delta_m`."""
