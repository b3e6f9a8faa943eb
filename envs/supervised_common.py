"""What every supervised adapter module shares: the adapter record, the option classes, the data root,
tied initialisation, the trunk spec, per-task head slices and metric directions.

:mod:`.supervised` (the registry, Multi-* and CelebA), :mod:`.supervised_scenes` and
:mod:`.supervised_glue` import these from here, so none of them imports another.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mtrl_arch import metrics as M
from mtrl_arch.config import Config
from mtrl_arch.search.base import TrunkSpec
from mtrl_arch.search.width import fixed_trunk_params, match_width
from mtrl_arch.trunk import tie_stages

from . import vision_metrics as VM


@dataclass
class TaskAdapter:
    name: str
    tasks: tuple[str, ...]
    spec: TrunkSpec
    shared_input: bool
    train: Any
    val: Any | None
    test: Any
    inputs: Callable[[dict], tuple[Tensor, Tensor | None]]
    losses: Callable[[Tensor, dict], Tensor]
    metrics: Callable[[], Any]
    lower_is_better: dict[str, dict[str, bool]]
    info: dict = field(default_factory=dict)


# ---- options ------------------------------------------------------------------------------------
@dataclass
class MultiDigitData:
    cache_dir: str = ""       # keep the generated composites here as .npz (empty: regenerate, ~4 s)
    generator_seed: int = 0   # seed of the composites and of the validation split (fixed across run seeds)
    train_subset: int = 0     # use a seeded subset of this many training examples (0: all)
    eval_subset: int = 0      # likewise for the validation and test sets
    check_counts: bool = True  # false: accept IDX files holding a subset (e.g. tests/fixtures/data)


@dataclass
class CelebAData:
    image_size: list = field(default_factory=list)  # [h, w]: resize JPEGs (npy images must have their size already)
    image_source: str = "auto"  # auto | jpg | npy
    train_subset: int = 0
    eval_subset: int = 0


@dataclass
class SceneData:
    n_classes: int = 7        # CityScapes only: 7 (MTAN/LibMTL) or 19
    train_subset: int = 0
    eval_subset: int = 0


@dataclass
class GlueData:
    vocab_size: int = 8000    # WordPiece vocabulary learned on the chosen tasks' training text
    min_frequency: int = 2
    max_len: int = 128        # tokens per example, [CLS] and [SEP] included
    train_subset: int = 0     # per task
    eval_subset: int = 0      # per task


@dataclass
class LeNetModel:
    width: float = 1          # channel and fc multiplier: conv 10w, 20w, fc 50w, rounded (1: Pareto MTL's LeNet)


@dataclass
class ResNetModel:
    width: int = 64           # channels of the first stage (64: ResNet-18)
    out_features: int = 100   # classification: the shared 512 -> 100 layer (Recon); dense: head hidden width


@dataclass
class TransformerModel:
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 4
    dropout: float = 0.1


DEFAULT_ROOTS = {"multi_mnist": "data", "multi_fashion": "data", "multi_fashion_mnist": "data", "glue": "data",
                 "celeba": "data/celeba", "nyuv2": "data/nyuv2", "cityscapes": "data/cityscapes"}


def data_root(cfg: Config) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(cfg.data.root or DEFAULT_ROOTS[cfg.data.name])))


# ---- shared pieces ----------------------------------------------------------------------------------
def _spec(tasks, stages: list, heads, cfg: Config) -> TrunkSpec:
    residual = tuple(bool(getattr(f, "residual_shaped", False)) for f in stages)
    if cfg.model.tied_init:
        stages = tie_stages(stages, cfg.seed * 1000)
    return TrunkSpec(tuple(tasks), stages, heads, residual=residual, name="trunk")


# each backbone's width knob in model.options (a transformer's d_model moves in multiples of its heads)
WIDTH_KNOBS = {"lenet": "width", "resnet18": "width", "transformer": "d_model"}
# LeNet's width is a multiplier whose integer steps change the trunk about fourfold: match it in tenths
WIDTH_STEPS = {"lenet": 0.1}


def match_model_width(cfg: Config, m: Any, spec_for: Callable[[Any], TrunkSpec]) -> Any:
    """``model.match_params=N``: the model options whose trunk, under the run's fixed tree, is closest to N
    (:mod:`mtrl_arch.search.width`); the width is written back to ``cfg.model.options``, so the run's
    config.yaml (and ``train --dry-run``) shows it. ``spec_for(options)``: the benchmark's trunk for options."""
    if not cfg.model.match_params:
        return m
    knob = WIDTH_KNOBS[cfg.model.backbone]
    width, _ = match_width(
        lambda w: fixed_trunk_params(cfg.arch.method, spec_for(dataclasses.replace(m, **{knob: w})), cfg.arch.options,
                                     cfg.seed),
        cfg.model.match_params, f"model.options.{knob}", m.n_heads if knob == "d_model" else WIDTH_STEPS.get(cfg.model.backbone, 1))
    cfg.model.options[knob] = width
    return dataclasses.replace(m, **{knob: width})


def _slice(out: Tensor, t: int, width: int) -> Tensor:
    """Task t's outputs: the first ``width`` channels of its head (dim 2 of ``[T, B, C, ...]``)."""
    return out[t, :, :width]


def _lib(tasks, metric_names: dict[str, tuple[str, ...]]) -> dict[str, dict[str, bool]]:
    directions = {**M.LOWER_IS_BETTER, **VM.LOWER_IS_BETTER}
    return {t: {m: directions[m] for m in metric_names[t]} for t in tasks}


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp_min(1)
