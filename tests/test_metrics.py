"""mtrl_arch.metrics and mtrl_arch.envs.vision_metrics against hand-computed values (and scipy.stats for the correlations)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from mtrl_arch import metrics as M
from mtrl_arch.envs import vision_metrics as VM


def test_accuracy_labels_and_logits():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.1, 0.2], [5.0, -1.0]])
    assert M.accuracy(logits, torch.tensor([0, 1, 0, 0])) == 0.75
    with pytest.raises(ValueError):
        M.accuracy([0, 1], [0, 1, 1])


def test_binary_f1_and_mcc_by_hand():
    pred, target = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]
    # TP=2 (0, 3), FP=1 (1), FN=1 (4), TN=1 (2)
    assert M.binary_f1(pred, target) == pytest.approx(4 / 6)
    assert M.matthews_corrcoef(pred, target) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert M.matthews_corrcoef(target, target) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1 - t for t in target], target) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1, 1, 1, 1, 1], target) == 0.0  # undefined -> 0, as scikit-learn
    assert M.binary_f1([0, 0], [0, 0]) == 0.0


def test_multiclass_mcc_equals_one_hot_covariance_form():
    t = np.array([0, 1, 2, 0, 1, 2, 2, 0])
    p = np.array([0, 2, 1, 0, 0, 2, 2, 1])
    X, Y = np.eye(3)[t], np.eye(3)[p]
    cov = lambda a, b: ((a - a.mean(0)) * (b - b.mean(0))).sum()  # noqa: E731
    expected = cov(X, Y) / math.sqrt(cov(X, X) * cov(Y, Y))
    assert M.matthews_corrcoef(p, t) == pytest.approx(expected)


def test_pearson_spearman_against_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=50).astype(float)  # many ties
    y = x * 0.5 + rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    np.testing.assert_allclose(M.rankdata([3, 1, 3, 2, 3]), [4, 1, 4, 2, 4])
    np.testing.assert_allclose(M.rankdata(x), scipy.stats.rankdata(x))
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_segmentation_confusion_miou_pixel_acc():
    pred = np.array([[0, 1], [1, 1]])
    target = np.array([[0, 1], [-1, 0]])  # one ignored pixel
    conf = VM.confusion_matrix(pred, target, n_classes=3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    r = VM.segmentation_metrics(pred, target, n_classes=3)
    # IoU0 = 1/(1+1), IoU1 = 1/(1+1), class 2 absent (union 0) -> left out of the mean
    assert r["miou"] == pytest.approx(0.5)
    assert r["pixel_acc"] == pytest.approx(2 / 3)
    # scores with the class axis at dim 1, accumulated over two batches
    scores = torch.nn.functional.one_hot(torch.tensor(pred), 3).permute(2, 0, 1)[None].float()
    acc = VM.ConfusionMatrix(3)
    acc.update(scores, torch.tensor(target)[None])
    acc.update(scores, torch.tensor(target)[None])
    assert acc.compute() == pytest.approx(r)


def test_depth_errors_on_valid_pixels():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    target = np.array([1.0, 0.0, 2.0, 5.0])  # 0 = missing
    r = VM.depth_errors(pred, target)
    assert r["abs_err"] == pytest.approx((0 + 1 + 1) / 3)
    assert r["rel_err"] == pytest.approx((0 + 1 / 2 + 1 / 5) / 3)


def test_normal_angle_errors():
    angles = [0.0, 10.0, 20.0, 45.0]
    t = np.zeros((1, 3, 1, 5))
    p = np.zeros((1, 3, 1, 5))
    for j, a in enumerate(angles):
        t[0, :, 0, j] = [0, 0, 1]
        r = math.radians(a)
        p[0, :, 0, j] = [2 * math.sin(r), 0, 2 * math.cos(r)]  # not unit length: normalised
    p[0, :, 0, 4] = [1, 0, 0]  # target all-zero: invalid pixel
    r = VM.normal_errors(p, t)
    assert r["mean"] == pytest.approx(18.75)
    assert r["median"] == pytest.approx(15.0)
    assert r["within_11.25"] == 0.5
    assert r["within_22.5"] == 0.75
    assert r["within_30"] == 0.75


def test_delta_m_worked_example():
    # LibMTL's count_improvement docstring example (its weight 1 = higher is better)
    base = {"A": {"AM1": 96, "AM2": 98}, "B": {"BM1": 0.2}}
    new = {"A": {"AM1": 93, "AM2": 99}, "B": {"BM1": 0.5}}
    lower = {"AM1": False, "AM2": True, "BM1": False}
    task_a = ((93 - 96) / 96 - (99 - 98) / 98) / 2
    task_b = (0.5 - 0.2) / 0.2
    assert M.delta_m(new, base, lower) == pytest.approx(100 * (task_a + task_b) / 2)
    assert M.delta_m(new, base, lower) == pytest.approx(73.963648, abs=1e-5)
    flat = 100 * ((93 - 96) / 96 - (99 - 98) / 98 + task_b) / 3
    assert M.delta_m(new, base, lower, per_task=False) == pytest.approx(flat)
    # per-task spec, default directions, and the baseline itself scores 0
    per_task = {"A": {"AM1": False, "AM2": True}, "B": {"BM1": False}}
    assert M.delta_m(new, base, per_task) == pytest.approx(M.delta_m(new, base, lower))
    nyu = {"seg": {"miou": 0.40, "pixel_acc": 0.65}, "depth": {"abs_err": 0.60, "rel_err": 0.25}}
    assert M.delta_m(nyu, nyu, VM.LOWER_IS_BETTER) == 0.0
    better = {"seg": {"miou": 0.44, "pixel_acc": 0.65}, "depth": {"abs_err": 0.54, "rel_err": 0.25}}
    assert M.delta_m(better, nyu, VM.LOWER_IS_BETTER) == pytest.approx(100 * (0.1 / 2 + 0.1 / 2) / 2)
    with pytest.raises(KeyError):
        M.delta_m({"x": {"weird": 1.0}}, {"x": {"weird": 2.0}})
    with pytest.raises(KeyError):  # the core knows no vision metric: its adapter gives their directions
        M.delta_m(nyu, nyu)
