"""NYUv2 and CityScapes adapters: dense prediction on a ResNet-18 encoder with per-task conv heads.

Losses (LibMTL's): segmentation cross-entropy over labelled pixels (-1 = ignore), depth L1
over pixels with a measurement (0 = missing), normals 1 - cosine over pixels with a normal
(predictions L2-normalised). Predictions are upsampled bilinearly from the encoder's
output stride 8 to the label size. Metrics: mIoU and pixel accuracy, absolute and relative
depth error, normal angle mean / median and fractions within 11.25, 22.5, 30 degrees.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrl_arch.config import Config, ConfigError
from mtrl_arch.search.base import TrunkSpec

from . import vision_metrics as VM
from .backbones import ConvStageBank, ResNetBasicBlockBank, StageSpec
from .supervised_common import ResNetModel, SceneData, TaskAdapter, _lib, _masked_mean, _slice, _spec, data_root
from .supervised_data import DatasetData, subset_indices


# ---- NYUv2 / CityScapes (dense prediction) -------------------------------------------------------------
class DenseHeadBank(nn.Module):
    """Per-task dense head: conv 3x3 (cin -> hidden) + ReLU + conv 1x1 (hidden -> out), at the trunk's resolution.

    A plain convolutional head (LibMTL uses ASPP on a dilated ResNet; MTAN a SegNet
    decoder); predictions are upsampled bilinearly to the label size in the losses and
    metrics.
    """

    def __init__(self, n_modules: int, cin: int, hidden: int, out: int):
        super().__init__()
        self.n_modules = n_modules
        self.conv1 = ConvStageBank(n_modules, cin, hidden, 3, 1, 1, bn=False, relu=True)
        self.conv2 = ConvStageBank(n_modules, hidden, out, 1, 1, 0, bn=False, relu=False)

    def forward(self, x: Tensor, idx, aux: Tensor | None = None) -> Tensor:
        return self.conv2(self.conv1(x, idx), idx)


def dense_resnet18_stages(in_ch: int = 3, width: int = 64) -> list[StageSpec]:
    """ResNet-18 as a dense encoder of output stride 8, 9 stages.

    Stem 7x7/2 conv + BN + ReLU (no max-pool), then the eight BasicBlocks with strides
    1, 1, 2, 1, 2, 1, 1, 1 (the last stage keeps stride 1, as LibMTL's dilated ResNet; no
    dilation here): ``[3, H, W] -> [8w, H/8, W/8]``. Residual-shaped (skippable) blocks:
    stages 1, 2, 4, 6, 8.
    """
    w = width
    specs = [StageSpec(lambda n: ConvStageBank(n, in_ch, w, 7, 2, 3, bn=True, relu=True, kaiming=True),
                       f"stem {in_ch}->{w} 7x7/2")]
    plan = [(w, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1),
            (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 1), (8 * w, 8 * w, 1)]
    for cin, cout, s in plan:
        specs.append(StageSpec(lambda n, cin=cin, cout=cout, s=s: ResNetBasicBlockBank(n, cin, cout, s),
                               f"basic {cin}->{cout}/{s}", residual_shaped=(cin == cout and s == 1)))
    return specs


def _up(pred: Tensor, like: Tensor) -> Tensor:
    size = like.shape[-2:]
    return pred if pred.shape[-2:] == size else F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


class SceneMetrics:
    """mIoU / pixel accuracy (segmentation), absolute / relative error (depth), angle errors (normal)."""

    def __init__(self, tasks, widths: dict[str, int]):
        self.tasks, self.widths = tasks, widths
        self.conf = VM.ConfusionMatrix(widths["segmentation"], ignore_index=-1) if "segmentation" in tasks else None
        self.depth = torch.zeros(3, dtype=torch.float64)  # sum |e|, sum |e|/t, count
        self.angles: list[Tensor] = []

    def update(self, out: Tensor, batch: dict) -> None:
        for i, t in enumerate(self.tasks):
            p = _up(_slice(out, i, self.widths[t]).float(), batch[t])
            if t == "segmentation":
                self.conf.update(p.argmax(1), batch[t])
            elif t == "depth":
                y = batch[t]
                mk = y != 0
                e = (p - y).abs()[mk]
                self.depth += torch.stack([e.sum(), (e / y[mk].abs()).sum(), torch.tensor(float(e.numel()))]).double().cpu()
            else:
                y = batch[t]
                mk = (y != 0).any(1)
                cos = (F.normalize(p, dim=1) * y).sum(1).clamp(-1, 1)[mk]
                self.angles.append(torch.rad2deg(torch.acos(cos)).cpu())

    def compute(self) -> dict[str, dict[str, float]]:
        out = {}
        for t in self.tasks:
            if t == "segmentation":
                out[t] = self.conf.compute()
            elif t == "depth":
                n = max(float(self.depth[2]), 1.0)
                out[t] = {"abs_err": float(self.depth[0]) / n, "rel_err": float(self.depth[1]) / n}
            else:
                a = torch.cat(self.angles).double() if self.angles else torch.zeros(1, dtype=torch.float64)
                out[t] = {"mean": float(a.mean()), "median": float(a.median()),
                          **{f"within_{th}": float((a < th).double().mean()) for th in (11.25, 22.5, 30)}}
        return out


SCENE_METRICS = {"segmentation": ("miou", "pixel_acc"), "depth": ("abs_err", "rel_err"),
                 "normal": ("mean", "median", "within_11.25", "within_22.5", "within_30")}


def _check(cfg: Config, o: SceneData) -> None:
    if cfg.data.name == "cityscapes" and o.n_classes not in (7, 19):
        raise ConfigError(f"data.options.n_classes must be 7 or 19; got {o.n_classes}")


def _widths(n_classes: int) -> dict[str, int]:
    return {"segmentation": n_classes, "depth": 1, "normal": 3}


def scene_spec(cfg: Config, o: SceneData, m: ResNetModel, tasks, n_classes: int | None = None) -> TrunkSpec:
    """The trunk: the dense ResNet-18 encoder and per-task dense heads of the widest task's width. Needs no data:
    ``n_classes`` defaults to NYUv2's 13 classes or CityScapes' ``data.options.n_classes``."""
    _check(cfg, o)
    if n_classes is None:
        from .vision_scenes import NYUv2

        n_classes = NYUv2.n_classes if cfg.data.name == "nyuv2" else o.n_classes
    widths, w = _widths(n_classes), m.width
    heads = StageSpec(lambda n: DenseHeadBank(n, 8 * w, m.out_features, max(widths[t] for t in tasks)),
                      f"dense heads {8 * w}->{m.out_features}->max width")
    return _spec(tasks, dense_resnet18_stages(3, w), heads, cfg)


def build_scenes(cfg: Config, o: SceneData, m: ResNetModel, tasks) -> TaskAdapter:
    from .vision_scenes import CityScapes, NYUv2

    root = data_root(cfg)
    _check(cfg, o)
    if cfg.data.name == "nyuv2":
        sets = {s: NYUv2(root, s) for s in ("train", "val")}
    else:
        sets = {s: CityScapes(root, s, o.n_classes) for s in ("train", "val")}
    n_classes = sets["train"].n_classes
    widths = _widths(n_classes)

    def collate(items):
        out = {"x": torch.stack([x for x, _ in items])}
        for t in tasks:
            out[t] = torch.stack([y[t] for _, y in items])
        return out

    full = DatasetData(sets["train"], collate)
    tr, va = full.holdout(cfg.data.val_fraction, seed=0) if cfg.data.val_fraction > 0 else (full, None)
    tr = tr.subset(subset_indices(len(tr), o.train_subset, 0))
    te = DatasetData(sets["val"], collate)
    te = te.subset(subset_indices(len(te), o.eval_subset, 2))
    if va is not None:
        va = va.subset(subset_indices(len(va), o.eval_subset, 1))

    def losses(out: Tensor, batch: dict) -> Tensor:
        ls = []
        for i, t in enumerate(tasks):
            y = batch[t]
            p = _up(_slice(out, i, widths[t]).float(), y)
            if t == "segmentation":
                ce = F.cross_entropy(p, y.clamp_min(0), reduction="none")
                ls.append(_masked_mean(ce, (y >= 0).to(ce.dtype)))
            elif t == "depth":
                ls.append(_masked_mean((p - y).abs(), (y != 0).to(p.dtype)))
            else:
                mk = (y != 0).any(1).to(p.dtype)
                ls.append(_masked_mean(1 - (F.normalize(p, dim=1) * y).sum(1), mk))
        return torch.stack(ls)

    return TaskAdapter(
        cfg.data.name, tasks, scene_spec(cfg, o, m, tasks, n_classes), True, tr, va, te,
        inputs=lambda b: (b["x"], None), losses=losses, metrics=lambda: SceneMetrics(tasks, widths),
        lower_is_better=_lib(tasks, SCENE_METRICS),
        info={"root": str(root), "n_classes": n_classes,
              "sizes": {"train": len(tr), "val": 0 if va is None else len(va), "test": len(te)}},
    )
