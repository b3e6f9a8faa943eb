"""GLUE adapter: five small tasks with per-task inputs on a small transformer trained from scratch.

The vocabulary (WordPiece, envs/nlp.py) is learned on the training text actually used
(after ``data.options.train_subset``). STS-B regresses score / 5 with the first output of
a 2-wide head; the other tasks score 2 classes (see envs/supervised.py on max-width heads).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtrl_arch.config import Config

from .backbones import classification_heads, transformer_stages
from .supervised_common import (GlueData, TaskAdapter, TransformerModel, _lib, _masked_mean, _spec, data_root,
                                match_model_width)
from .supervised_data import PerTaskData, TensorData, subset_indices


# ---- GLUE -------------------------------------------------------------------------------------------------
class GlueMetrics:
    """GLUE's metrics per task from the valid rows of every evaluation batch."""

    def __init__(self, tasks, regression: list[bool]):
        self.tasks, self.regression = tasks, regression
        self.preds: list[list[Tensor]] = [[] for _ in tasks]
        self.labels: list[list[Tensor]] = [[] for _ in tasks]

    def update(self, out: Tensor, batch: dict) -> None:
        for i in range(len(self.tasks)):
            v = batch["valid"][i]
            p = out[i, v, 0] * 5.0 if self.regression[i] else out[i, v, :2]
            self.preds[i].append(p.float().cpu())
            self.labels[i].append(batch["y"][i, v].cpu())

    def compute(self) -> dict[str, dict[str, float]]:
        from .nlp import glue_metrics

        out = {}
        for i, t in enumerate(self.tasks):
            y = torch.cat(self.labels[i])
            out[t] = glue_metrics(t, torch.cat(self.preds[i]), y if self.regression[i] else y.long())
        return out


def glue_inputs(batch: dict) -> tuple[Tensor, Tensor]:
    """The trunk's ``(ids, mask)`` of a batch, cut to the batch's longest sequence.

    Rows that are only evaluation padding (``valid`` False) keep one real token, so they
    cost nothing beyond their first position. Both are pure speed-ups: the transformer's
    outputs at real tokens (and so the pooled features) do not depend on how much padding
    follows them (see tests/test_backbones.py).
    """
    x, mask = batch["x"], batch["mask"]
    valid = batch.get("valid")
    if valid is not None and not bool(valid.all()):
        first = torch.zeros_like(mask)
        first[..., 0] = True
        mask = torch.where(valid.unsqueeze(-1), mask, first & mask[..., :1])
    cols = mask.flatten(0, -2).any(0).nonzero()
    L = int(cols[-1]) + 1 if len(cols) else 1
    return x[..., :L], mask[..., :L]


def build_glue(cfg: Config, o: GlueData, m: TransformerModel, tasks) -> TaskAdapter:
    from .nlp import GLUE_TASKS, GlueDataset, GlueSplit, WordPieceTokenizer, read_glue
    from .supervised_data import holdout_indices

    root = data_root(cfg)

    def pick(s: GlueSplit, idx: np.ndarray) -> GlueSplit:
        b = None if s.text_b is None else [s.text_b[i] for i in idx]
        return GlueSplit(s.task, s.split, [s.text_a[i] for i in idx], b, s.labels[idx])

    # choose the examples first, then learn the vocabulary on the training text actually used
    train, val, test = [], [], []
    for t, task in enumerate(tasks):
        full = read_glue(root, task, "train")
        keep, held = holdout_indices(len(full), cfg.data.val_fraction, seed=t)
        train.append(pick(full, keep[subset_indices(len(keep), o.train_subset, t)]))
        val.append(pick(full, held[subset_indices(len(held), o.eval_subset, t + 100)]))
        dev = read_glue(root, task, "dev")
        test.append(pick(dev, subset_indices(len(dev), o.eval_subset, t + 200)))
    tok = WordPieceTokenizer.train((x for s in train for x in s.text_a + (s.text_b or [])), o.vocab_size,
                                   o.min_frequency)

    def encode(s: GlueSplit) -> TensorData:
        ds = GlueDataset(s, tok, o.max_len)
        return TensorData({"x": ds.ids, "mask": ds.mask, "y": ds.labels.float()})

    train_parts, test_parts = [encode(s) for s in train], [encode(s) for s in test]
    val_parts = [encode(s) for s in val] if all(len(s) for s in val) else []
    regression = [GLUE_TASKS[t].is_regression for t in tasks]
    width = max(GLUE_TASKS[t].n_outputs for t in tasks)

    def spec_for(m: TransformerModel):  # the embedding's size is known here, once the vocabulary is learned
        return _spec(tasks, transformer_stages(len(tok), m.d_model, m.n_heads, m.d_ff, m.n_layers, o.max_len, m.dropout),
                     classification_heads(m.d_model, width), cfg)

    m = match_model_width(cfg, m, spec_for)
    stages = transformer_stages(len(tok), m.d_model, m.n_heads, m.d_ff, m.n_layers, o.max_len, m.dropout)
    heads = classification_heads(m.d_model, width)

    def losses(out: Tensor, batch: dict) -> Tensor:
        # STS-B regresses score / 5 (in [0, 1]) so its MSE is on the scale of the cross-entropies
        y, valid = batch["y"], batch["valid"].float()
        ls = []
        for i in range(len(tasks)):
            if regression[i]:
                per = (out[i, :, 0].float() - y[i] / 5.0) ** 2
            else:
                per = F.cross_entropy(out[i, :, :2].float(), y[i].long(), reduction="none")
            ls.append(_masked_mean(per, valid[i]))
        return torch.stack(ls)

    metric_names = {t: GLUE_TASKS[t].metrics for t in tasks}
    return TaskAdapter(
        "glue", tasks, _spec(tasks, stages, heads, cfg), False,
        PerTaskData(train_parts), PerTaskData(val_parts) if len(val_parts) == len(tasks) else None,
        PerTaskData(test_parts), inputs=glue_inputs, losses=losses,
        metrics=lambda: GlueMetrics(tasks, regression), lower_is_better=_lib(tasks, metric_names),
        info={"root": str(root), "vocab_size": len(tok), "regression": regression, "head_width": width,
              "sizes": {"train": [len(p) for p in train_parts], "val": [len(p) for p in val_parts],
                        "test": [len(p) for p in test_parts]}},
    )
