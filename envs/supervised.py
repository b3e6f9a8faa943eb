"""Supervised multi-task benchmarks as adapters for the supervised loop.

An adapter (:class:`TaskAdapter`) is everything :mod:`mtrl_arch.agents.supervised` needs
to know about one benchmark, and nothing about training:

* ``train`` / ``val`` / ``test`` data (:mod:`mtrl_arch.envs.supervised_data`); ``val`` is
  None when ``data.val_fraction`` leaves no examples;
* ``spec``: the trunk stages (a backbone from :mod:`mtrl_arch.envs.backbones`) and the
  per-task heads, as a :class:`~mtrl_arch.search.base.TrunkSpec` every architecture
  method builds from;
* ``inputs(batch) -> (x, aux)`` and ``shared_input`` (True: one image feeds every task,
  ``x [B, ...]``; False: per-task inputs ``x [T, B, ...]``, GLUE);
* ``losses(outputs, batch) -> Tensor[T]`` and ``metrics()`` (an accumulator with
  ``update(outputs, batch)`` and ``compute() -> {task: {metric: value}}``), with
  ``lower_is_better[task][metric]``.

The loop is duck-typed against these attributes (agents/ never imports envs/; build.py
hands :func:`make_adapter` to the loop). This file holds the registry and the Multi-* and
CelebA adapters; NYUv2/CityScapes are in :mod:`.supervised_scenes`, GLUE in
:mod:`.supervised_glue`, and what all of them share (the adapter record, the option
classes, tied initialisation) in :mod:`.supervised_common`, which they import (never
each other). :func:`make_spec` gives an adapter's trunk spec without loading data
(``mtrl-arch train --dry-run`` counts its parameters).

Benchmarks (``data.name``), their tasks and backbones (``model.backbone``):

=====================  ==================================  ==================  ============
data.name              tasks                               backbones           input
=====================  ==================================  ==================  ============
multi_mnist            top_left, bottom_right (10 classes) lenet, resnet18     shared
multi_fashion          top_left, bottom_right              lenet, resnet18     shared
multi_fashion_mnist    top_left (MNIST), bottom_right      lenet, resnet18     shared
celeba                 9 attributes (binary)               resnet18            shared
nyuv2                  segmentation, depth, normal         resnet18 (dense)    shared
cityscapes             segmentation, depth                 resnet18 (dense)    shared
glue                   CoLA, SST-2, MRPC, RTE, STS-B       transformer         per task
=====================  ==================================  ==================  ============

**Heterogeneous heads.** A head bank holds one module per task, all of one shape, so a
benchmark whose tasks need different output widths (GLUE: STS-B regresses 1 value, the
others score 2 classes; NYUv2: 13 classes, 1 depth, 3 normal components) gets heads of
the largest width and task t reads the first ``width[t]`` outputs of its head
(:func:`_slice`). The unused outputs never reach a loss, get zero gradient and stay at
their initial values; they are counted in ``params/trunk/heads`` (for GLUE 129 of
~1,300 head parameters, for NYUv2 12 of 13 depth-head output channels).

**Tied initialisation** (``model.tied_init``, default on, in every domain: the core's
:func:`~mtrl_arch.trunk.tie_stages`): every copy of a stage, in every bank built from it,
starts from one set of weights drawn once per stage from the run seed. That is the setting the search methods assume (CoNAL and AdaShare start all
copies from one pretrained backbone; Recon's rebuilt task-specific copies share the
initialisation), and it makes an architecture's retrain start from the same weights as
the HPS and STL baselines.

**Splits.** ``test`` is the data set's test split (Multi-*: the 20,000 test composites;
CelebA: partition 2; NYUv2/CityScapes: the ``val`` folder, the MTAN/LibMTL convention;
GLUE: the dev files, GLUE's test labels being hidden). ``val`` is CelebA's partition 1
and otherwise a seeded ``data.val_fraction`` of the training set (Multi-*: both
composites of a source image on one side).
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrl_arch.config import Config, ConfigError
from mtrl_arch.options import parse_options
from mtrl_arch.search.base import TrunkSpec

from .backbones import classification_heads, lenet_sizes, lenet_stages, resnet18_stages
from .supervised_common import (DEFAULT_ROOTS, CelebAData, GlueData, LeNetModel, MultiDigitData, ResNetModel, SceneData,
                                TaskAdapter, TransformerModel, _lib, _spec, data_root, match_model_width)
from .supervised_data import DatasetData, TensorData, subset_indices

__all__ = ["BENCHMARKS", "MODELS", "DEFAULT_ROOTS", "TaskAdapter", "check_config", "data_root", "make_adapter", "make_spec",
           "MultiDigitData", "CelebAData", "SceneData", "GlueData", "LeNetModel", "ResNetModel",
           "TransformerModel"]


def _options(cls: type, raw: dict, where: str) -> Any:
    """The shared option rules, then the benchmarks' range rule: every number is a size or a rate, so
    positive; subsets (0: all), seeds and dropout may be 0."""
    o = parse_options(cls, raw, where)
    for k in raw:
        v, zero_ok = getattr(o, k), k.endswith(("_subset", "seed", "dropout"))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < (0 if zero_ok else 1e-12):
            raise ConfigError(f"{where}.{k} must be {'>= 0' if zero_ok else 'positive'}; got {v!r}")
    return o


# ---- benchmarks -------------------------------------------------------------------------------------
BENCHMARKS: dict[str, dict[str, Any]] = {
    "multi_mnist": {"tasks": ("top_left", "bottom_right"), "backbones": ("lenet", "resnet18"), "data": MultiDigitData},
    "multi_fashion": {"tasks": ("top_left", "bottom_right"), "backbones": ("lenet", "resnet18"), "data": MultiDigitData},
    "multi_fashion_mnist": {"tasks": ("top_left", "bottom_right"), "backbones": ("lenet", "resnet18"),
                            "data": MultiDigitData},
    "celeba": {"tasks": None, "backbones": ("resnet18",), "data": CelebAData},
    "nyuv2": {"tasks": ("segmentation", "depth", "normal"), "backbones": ("resnet18",), "data": SceneData},
    "cityscapes": {"tasks": ("segmentation", "depth"), "backbones": ("resnet18",), "data": SceneData},
    "glue": {"tasks": ("CoLA", "SST-2", "MRPC", "RTE", "STS-B"), "backbones": ("transformer",), "data": GlueData},
}
MODELS = {"lenet": LeNetModel, "resnet18": ResNetModel, "transformer": TransformerModel}


def check_config(cfg: Config) -> tuple[Any, Any, tuple[str, ...]]:
    """Validate the supervised parts of a config; returns (data options, model options, tasks)."""
    name = cfg.data.name
    if name not in BENCHMARKS:
        near = difflib.get_close_matches(name, BENCHMARKS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"data.name {name!r} is not a supervised benchmark{hint}; choose from {', '.join(BENCHMARKS)}")
    b = BENCHMARKS[name]
    if cfg.model.backbone not in b["backbones"]:
        raise ConfigError(f"model.backbone {cfg.model.backbone!r} does not fit data.name={name}; "
                          f"choose from {', '.join(b['backbones'])}")
    data_opts = _options(b["data"], cfg.data.options, "data.options")
    model_opts = _options(MODELS[cfg.model.backbone], cfg.model.options, "model.options")
    valid = b["tasks"]
    if valid is None:  # CelebA: attribute names are checked against the file
        from .vision_celeba import CELEBA_9_TASKS

        tasks = tuple(cfg.data.tasks) or CELEBA_9_TASKS
    else:
        bad = [t for t in cfg.data.tasks if t not in valid]
        if bad:
            raise ConfigError(f"data.tasks has {bad}, not tasks of {name}; choose from {', '.join(valid)}")
        tasks = tuple(t for t in valid if t in cfg.data.tasks) if cfg.data.tasks else valid
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ConfigError(f"data.tasks must name distinct tasks; got {list(cfg.data.tasks)}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1); got {cfg.data.val_fraction}")
    return data_opts, model_opts, tasks


def make_adapter(cfg: Config) -> TaskAdapter:
    """The adapter for ``cfg.data.name``; raises ConfigError (bad config) or DataError (missing data).
    With ``model.match_params`` the matched width is written to ``cfg.model.options`` (GLUE: once the vocabulary,
    which sizes the embedding, is learned)."""
    data_opts, model_opts, tasks = check_config(cfg)
    if cfg.data.name != "glue":
        model_opts = match_model_width(cfg, model_opts, lambda m: _spec_of(cfg, data_opts, m, tasks))
    if cfg.data.name in ("nyuv2", "cityscapes"):
        from .supervised_scenes import build_scenes as build
    elif cfg.data.name == "glue":
        from .supervised_glue import build_glue as build
    else:
        build = _celeba if cfg.data.name == "celeba" else _multi_digit
    return build(cfg, data_opts, model_opts, tasks)


def make_spec(cfg: Config) -> TrunkSpec | None:
    """The trunk spec :func:`make_adapter` builds for ``cfg``, without loading any data; None where the
    data decides the network (GLUE: the vocabulary, hence the embedding, is learned from the training text)."""
    data_opts, model_opts, tasks = check_config(cfg)
    if cfg.data.name == "glue":
        return None
    return _spec_of(cfg, data_opts, match_model_width(cfg, model_opts, lambda m: _spec_of(cfg, data_opts, m, tasks)),
                    tasks)


def _spec_of(cfg: Config, data_opts: Any, model_opts: Any, tasks) -> TrunkSpec:
    if cfg.data.name in ("nyuv2", "cityscapes"):
        from .supervised_scenes import scene_spec

        return scene_spec(cfg, data_opts, model_opts, tasks)
    return _classification_spec(cfg, model_opts, tasks, *((3, 2) if cfg.data.name == "celeba" else (1, 10)))


def _classification_spec(cfg: Config, m: Any, tasks, in_channels: int, n_classes: int) -> TrunkSpec:
    if cfg.model.backbone == "lenet":
        stages, heads = lenet_stages(m.width), classification_heads(lenet_sizes(m.width)[2], n_classes)
    else:
        stages, heads = resnet18_stages(in_channels, m.width, m.out_features), classification_heads(m.out_features, n_classes)
    return _spec(tasks, stages, heads, cfg)


class ClassificationMetrics:
    """Accuracy per task from logits ``[T, B, K]`` and labels ``y [B, T]``."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.correct = torch.zeros(len(tasks), dtype=torch.float64)
        self.n = 0

    def update(self, out: Tensor, batch: dict) -> None:
        pred = out.argmax(-1)  # [T, B]
        self.correct += (pred == batch["y"].T).sum(1).double().cpu()
        self.n += pred.shape[1]

    def compute(self) -> dict[str, dict[str, float]]:
        return {t: {"accuracy": float(self.correct[i] / max(self.n, 1))} for i, t in enumerate(self.tasks)}


def _classification_losses(out: Tensor, batch: dict) -> Tensor:
    T, B, K = out.shape
    ce = F.cross_entropy(out.float().reshape(T * B, K), batch["y"].T.reshape(T * B), reduction="none")
    return ce.view(T, B).mean(1)


# ---- Multi-MNIST / Multi-Fashion / Multi-Fashion+MNIST ------------------------------------------------
def _multi_digit(cfg: Config, o: MultiDigitData, m: Any, tasks) -> TaskAdapter:
    from .vision import load_multi, train_val_split

    root = data_root(cfg)
    cache = o.cache_dir or None
    tr = load_multi(root, cfg.data.name, "train", seed=o.generator_seed, cache_dir=cache, check_count=o.check_counts)
    te = load_multi(root, cfg.data.name, "test", seed=o.generator_seed, cache_dir=cache, check_count=o.check_counts)
    cols = [BENCHMARKS[cfg.data.name]["tasks"].index(t) for t in tasks]

    def data(md, idx) -> TensorData:
        return TensorData({"x": torch.from_numpy(md.canvas[idx]).unsqueeze(1),
                           "y": torch.from_numpy(md.labels[idx][:, cols])})

    tr_idx, va_idx = train_val_split(len(tr), cfg.data.val_fraction, seed=o.generator_seed, group=2)
    tr_idx = tr_idx[subset_indices(len(tr_idx), o.train_subset, o.generator_seed)]
    va_idx = va_idx[subset_indices(len(va_idx), o.eval_subset, o.generator_seed + 1)]
    te_idx = subset_indices(len(te), o.eval_subset, o.generator_seed + 2)
    return TaskAdapter(
        cfg.data.name, tasks, _classification_spec(cfg, m, tasks, 1, 10), True,
        data(tr, tr_idx), data(tr, va_idx) if len(va_idx) else None, data(te, te_idx),
        inputs=lambda b: (b["x"].float().div_(255.0), None),
        losses=_classification_losses, metrics=lambda: ClassificationMetrics(tasks),
        lower_is_better=_lib(tasks, {t: ("accuracy",) for t in tasks}),
        info={"root": str(root), "generator_seed": o.generator_seed,
              "sizes": {"train": len(tr_idx), "val": len(va_idx), "test": len(te_idx)}},
    )


# ---- CelebA ---------------------------------------------------------------------------------------
def _celeba(cfg: Config, o: CelebAData, m: ResNetModel, tasks) -> TaskAdapter:
    from .vision_celeba import CelebA

    if o.image_source not in ("auto", "jpg", "npy"):
        raise ConfigError(f"data.options.image_source must be auto, jpg or npy; got {o.image_source!r}")
    if o.image_size and (len(o.image_size) != 2 or not all(isinstance(v, int) and v > 0 for v in o.image_size)):
        raise ConfigError(f"data.options.image_size must be [height, width]; got {o.image_size}")
    root = data_root(cfg)
    size = tuple(o.image_size) or None
    try:
        sets = {s: CelebA(root, s, tasks, size, o.image_source) for s in ("train", "valid", "test")}
    except ValueError as e:  # unknown attribute names
        if type(e) is not ValueError:
            raise
        raise ConfigError(f"data.tasks: {e}") from None

    def collate(items):
        return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}

    def data(ds, subset: int, salt: int) -> DatasetData:
        d = DatasetData(ds, collate)
        return d.subset(subset_indices(len(d), subset, salt))

    tr, va, te = (data(sets["train"], o.train_subset, 0), data(sets["valid"], o.eval_subset, 1),
                  data(sets["test"], o.eval_subset, 2))
    return TaskAdapter(
        "celeba", tasks, _classification_spec(cfg, m, tasks, 3, 2), True, tr, va if len(va) else None, te,
        inputs=lambda b: (b["x"], None), losses=_classification_losses, metrics=lambda: ClassificationMetrics(tasks),
        lower_is_better=_lib(tasks, {t: ("accuracy",) for t in tasks}),
        info={"root": str(root), "sizes": {"train": len(tr), "val": len(va), "test": len(te)}},
    )
