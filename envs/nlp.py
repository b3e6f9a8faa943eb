"""GLUE data (five small tasks): readers, metrics, the encoded dataset and the tokenizer built from the training text.

Layout under the data directory ``root`` (GLUE's download script, as in the shared data
README)::

    ROOT/glue/{CoLA,SST-2,MRPC,RTE,STS-B}/{train,dev}.tsv

Parsing follows the README: quoting is off (fields contain unbalanced double quotes), files
are read as ``utf-8-sig`` (MRPC starts with a BOM), CoLA has no header, RTE labels are
strings (``entailment`` -> 0, ``not_entailment`` -> 1, GLUE's label order), STS-B's label is a
float score in [0, 5].

The tokenizer (:class:`~.wordpiece.WordPieceTokenizer`) is in :mod:`.wordpiece`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtrl_arch import metrics as M

from .vision import DataError
from .wordpiece import WordPieceTokenizer

__all__ = [
    "DataError",
    "GlueTask",
    "GLUE_TASKS",
    "GLUE_ROWS",
    "GlueSplit",
    "read_glue",
    "glue_metrics",
    "GlueDataset",
    "build_glue_tokenizer",
    "WordPieceTokenizer",
]


# ---- GLUE -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task and how to score it."""

    name: str
    n_columns: int
    header: tuple[str, ...] | None  # expected header row, None when the file has none
    text_a: int  # column of the first sentence
    text_b: int | None  # column of the second sentence, None for single-sentence tasks
    label: int  # column of the label
    metrics: tuple[str, ...]  # names as in mtrl_arch.metrics.LOWER_IS_BETTER
    main_metric: str
    is_regression: bool = False
    label_names: tuple[str, ...] | None = None  # string labels in id order
    n_outputs: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_outputs", 1 if self.is_regression else 2)


GLUE_TASKS: dict[str, GlueTask] = {
    "CoLA": GlueTask("CoLA", 4, None, 3, None, 1, ("mcc",), "mcc"),
    "SST-2": GlueTask("SST-2", 2, ("sentence", "label"), 0, None, 1, ("accuracy",), "accuracy"),
    "MRPC": GlueTask("MRPC", 5, ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 3, 4, 0,
                     ("f1", "accuracy"), "f1"),
    "RTE": GlueTask("RTE", 4, ("index", "sentence1", "sentence2", "label"), 1, 2, 3, ("accuracy",), "accuracy",
                    label_names=("entailment", "not_entailment")),
    "STS-B": GlueTask("STS-B", 10, ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                                    "sentence1", "sentence2", "score"), 7, 8, 9, ("pearson", "spearman"),
                      "pearson", is_regression=True),
}
"""CoLA: Matthews corr.; SST-2: accuracy; MRPC: F1 (positive = paraphrase) and accuracy;
RTE: accuracy; STS-B: Pearson and Spearman (regression, 1 output)."""

GLUE_ROWS: dict[tuple[str, str], int] = {
    ("CoLA", "train"): 8551, ("CoLA", "dev"): 1043,
    ("SST-2", "train"): 67349, ("SST-2", "dev"): 872,
    ("MRPC", "train"): 3668, ("MRPC", "dev"): 408,
    ("RTE", "train"): 2490, ("RTE", "dev"): 277,
    ("STS-B", "train"): 5749, ("STS-B", "dev"): 1500,
}
"""Rows (without header) of each file, from the data README."""


@dataclass
class GlueSplit:
    """One split of one task: ``text_b`` is None for single-sentence tasks; ``labels`` is
    int64 (classification) or float32 (STS-B)."""

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)


def _glue_expected(root: Path, task: str) -> str:
    return (f"GLUE task {task} not found or damaged under {root}: expected glue/{task}/train.tsv, "
            f"glue/{task}/dev.tsv (see the data README)")


def read_glue(root: str | os.PathLike, task: str, split: str = "train") -> GlueSplit:
    """Read ``ROOT/glue/<task>/<split>.tsv`` (``split`` 'train' or 'dev')."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {list(GLUE_TASKS)}")
    if split not in ("train", "dev"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'dev' (GLUE test labels are hidden)")
    root = Path(root)
    info = GLUE_TASKS[task]
    path = root / "glue" / task / f"{split}.tsv"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{_glue_expected(root, task)}; {path.name}: {e.__class__.__name__}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start = 0
    if info.header is not None:
        head = tuple(c.strip() for c in lines[0].split("\t")) if lines else ()
        if head != info.header:
            raise DataError(f"{_glue_expected(root, task)}; {path.name}: header {head} is not {info.header}")
        start = 1
    a, b, labels = [], [] if info.text_b is not None else None, []
    for n, line in enumerate(lines[start:], start=start + 1):
        cols = line.rstrip("\r").split("\t")
        if len(cols) != info.n_columns:
            raise DataError(f"{_glue_expected(root, task)}; {path.name} line {n}: "
                            f"{len(cols)} columns, expected {info.n_columns}")
        a.append(cols[info.text_a].strip())
        if b is not None:
            b.append(cols[info.text_b].strip())
        raw = cols[info.label].strip()
        try:
            if info.is_regression:
                labels.append(float(raw))
            elif info.label_names is not None:
                labels.append(info.label_names.index(raw))
            else:
                labels.append(int(raw))
        except ValueError:
            raise DataError(f"{_glue_expected(root, task)}; {path.name} line {n}: bad label {raw!r}") from None
    dtype = np.float32 if info.is_regression else np.int64
    return GlueSplit(task, split, a, b, np.asarray(labels, dtype=dtype))


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's metrics: ``predictions`` are logits ``[N, 2]`` or class ids ``[N]``
    (classification) or scores ``[N]`` / ``[N, 1]`` (STS-B)."""
    info = GLUE_TASKS[task]
    y = M.to_numpy(labels)
    p = M.to_numpy(predictions)
    if info.is_regression:
        p = p.reshape(len(y), -1)[:, 0] if p.ndim > 1 else p
        return {"pearson": M.pearson(p, y), "spearman": M.spearman(p, y)}
    fns = {"mcc": M.matthews_corrcoef, "accuracy": M.accuracy, "f1": M.binary_f1}
    return {m: fns[m](p, y) for m in info.metrics}


def build_glue_tokenizer(
    root: str | os.PathLike,
    tasks: Sequence[str] = tuple(GLUE_TASKS),
    vocab_size: int = 8000,
    min_frequency: int = 2,
) -> WordPieceTokenizer:
    """A tokenizer trained on the training sentences (both columns) of ``tasks``."""
    texts: list[str] = []
    for t in tasks:
        s = read_glue(root, t, "train")
        texts.extend(s.text_a)
        if s.text_b is not None:
            texts.extend(s.text_b)
    return WordPieceTokenizer.train(texts, vocab_size, min_frequency)


class GlueDataset(Dataset):
    """A GLUE split encoded once: items ``(ids int64 [L], mask bool [L], label)`` with label
    int64 (classification) or float32 (STS-B)."""

    def __init__(self, split: GlueSplit, tokenizer: WordPieceTokenizer, max_len: int = 128):
        self.task, self.split = split.task, split.split
        self.info = GLUE_TASKS[split.task]
        self.ids, self.mask = tokenizer.encode_batch(split.text_a, split.text_b, max_len)
        self.labels = torch.from_numpy(split.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.ids[i], self.mask[i], self.labels[i]
