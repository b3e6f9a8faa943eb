"""GLUE data (five small tasks) and a WordPiece subword tokenizer built from the training text.

Layout under the data directory ``root`` (GLUE's download script, as in the shared data
README)::

    ROOT/glue/{CoLA,SST-2,MRPC,RTE,STS-B}/{train,dev}.tsv

Parsing follows the README: quoting is off (fields contain unbalanced double quotes), files
are read as ``utf-8-sig`` (MRPC starts with a BOM), CoLA has no header, RTE labels are
strings (``entailment`` -> 0, ``not_entailment`` -> 1, GLUE's label order), STS-B's label is a
float score in [0, 5].

Tokenizer (:class:`WordPieceTokenizer`)
---------------------------------------
* Normalisation: Unicode NFD, combining marks dropped (accents stripped), lowercased.
* Pre-tokenisation: runs of word characters (``\\w+``) and single punctuation/symbol
  characters (``[^\\w\\s]``); whitespace separates. The *normalised text* of ``s`` is
  ``" ".join(pre_tokenize(s))``.
* Vocabulary: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0..4), then every character seen in
  the training words (word-initial form ``c`` and continuation form ``##c``), then the
  tokens made by byte-pair-encoding merges learned on the word counts of the training text
  (the WordPiece trainer of HuggingFace ``tokenizers`` does the same): repeatedly merge
  the most frequent adjacent symbol pair, ties broken by the lexicographically smallest
  pair, until ``vocab_size`` tokens or no pair occurs ``min_frequency`` times. This is
  deterministic for the same text and settings.
* Encoding: WordPiece greedy longest-match-first per word; a word with a character outside
  the vocabulary (or longer than 100 characters) becomes ``[UNK]``. Pairs are encoded as
  ``[CLS] a [SEP] b [SEP]`` (single sentences ``[CLS] a [SEP]``), truncated longest-first
  and padded with ``[PAD]`` to ``max_len``; the mask is True on real tokens.
* :meth:`WordPieceTokenizer.decode` glues ``##`` pieces to the previous token and joins
  words with single spaces, so ``decode(encode(s))`` is the normalised text of ``s`` when
  every character of ``s`` is in the vocabulary.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtrl_arch import metrics as M

from .vision import DataError

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
    "SPECIAL_TOKENS",
    "normalize",
    "pre_tokenize",
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


# ---- tokenizer --------------------------------------------------------------------------------
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
_WORD_RE = re.compile(r"\w+|[^\w\s]")
_MAX_WORD = 100
_FORMAT = "mtrl-arch/wordpiece"


def normalize(text: str) -> str:
    """NFD, accents (combining marks) removed, lowercased."""
    if text.isascii():
        return text.lower()
    text = unicodedata.normalize("NFD", text)
    return "".join(c for c in text if unicodedata.category(c) != "Mn").lower()


def pre_tokenize(text: str) -> list[str]:
    """Normalised words: runs of ``\\w`` characters and single punctuation characters."""
    return _WORD_RE.findall(normalize(text))


def _train_wordpiece(word_counts: Counter, vocab_size: int, min_frequency: int) -> list[str]:
    vocab: list[str] = list(SPECIAL_TOKENS)
    seen = set(vocab)
    # deterministic order: sorted word types; alphabet by (-frequency, symbol)
    types = sorted(word_counts)
    counts = [word_counts[w] for w in types]
    words = [[w[0]] + ["##" + c for c in w[1:]] for w in types]
    alpha = Counter()
    for syms, c in zip(words, counts):
        for s in syms:
            alpha[s] += c
    for s, _ in sorted(alpha.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.append(s)
        seen.add(s)
    if len(vocab) >= vocab_size:
        return vocab
    allowed = set(vocab)
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for wi, (syms, c) in enumerate(zip(words, counts)):
        if any(s not in allowed for s in syms):
            words[wi] = []  # has a symbol cut from the alphabet: never merged
            continue
        for p in zip(syms, syms[1:]):
            pair_counts[p] += c
            where.setdefault(p, set()).add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negc, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -negc:
            continue  # stale entry
        if -negc < min_frequency:
            break
        new = a + b[2:]
        delta: dict[tuple[str, str], int] = {}
        # ``where`` is a superset (entries are never discarded), so a word may hold no occurrence
        for wi in where.pop((a, b), ()):
            syms, c = words[wi], counts[wi]
            L = len(syms)
            out: list[str] = []
            old_at: set[int] = set()  # start indices of old pairs that touch a merged symbol
            new_at: list[int] = []  # indices of merged symbols in ``out``
            i = 0
            while True:
                try:
                    k = syms.index(a, i)
                except ValueError:
                    break
                if k + 1 < L and syms[k + 1] == b:
                    out.extend(syms[i:k])
                    new_at.append(len(out))
                    out.append(new)
                    old_at.update((k - 1, k, k + 1))
                    i = k + 2
                else:
                    out.extend(syms[i:k + 1])
                    i = k + 1
            if not new_at:
                continue
            out.extend(syms[i:])
            for k in old_at:
                if 0 <= k < L - 1:
                    p = (syms[k], syms[k + 1])
                    delta[p] = delta.get(p, 0) - c
            for m in {x for n in new_at for x in (n - 1, n)}:
                if 0 <= m < len(out) - 1:
                    p = (out[m], out[m + 1])
                    delta[p] = delta.get(p, 0) + c
                    ws = where.get(p)
                    if ws is None:
                        where[p] = {wi}
                    else:
                        ws.add(wi)
            words[wi] = out
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts[p] + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
        if new not in seen:
            vocab.append(new)
            seen.add(new)
    return vocab


class WordPieceTokenizer:
    """Lowercasing WordPiece tokenizer (see the module docstring for every rule)."""

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"the vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has duplicate tokens")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        self._cache: dict[str, list[int]] = {}

    # -- construction / persistence --
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> "WordPieceTokenizer":
        """Build the vocabulary from ``texts`` (deterministic)."""
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}")
        counts: Counter = Counter()
        for t in texts:
            counts.update(pre_tokenize(t))
        counts = Counter({w: c for w, c in counts.items() if len(w) <= _MAX_WORD})
        return cls(_train_wordpiece(counts, vocab_size, min_frequency))

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": 1, "lowercase": True, "strip_accents": True, "vocab": self.vocab}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "WordPieceTokenizer":
        if obj.get("format") != _FORMAT or obj.get("version") != 1:
            raise ValueError(f"not a {_FORMAT} v1 tokenizer file")
        return cls(obj["vocab"])

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordPieceTokenizer":
        return cls.from_json(json.loads(Path(path).read_text()))

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- encoding --
    def _word_ids(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        ids, start, n = [], 0, len(word)
        if n > _MAX_WORD:
            ids = [UNK_ID]
        while start < n and ids != [UNK_ID]:
            end = n
            found = None
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.token_to_id.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                ids = [UNK_ID]
                break
            ids.append(found)
            start = end
        if len(self._cache) < 500_000:
            self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[str]:
        return [self.vocab[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        out: list[int] = []
        for w in pre_tokenize(text):
            out.extend(self._word_ids(w))
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        words: list[str] = []
        for i in ids:
            i = int(i)
            tok = self.vocab[i]
            if skip_special and i < len(SPECIAL_TOKENS) and i != UNK_ID:
                continue
            if tok.startswith("##") and words:
                words[-1] += tok[2:]
            else:
                words.append(tok)
        return " ".join(words)

    def encode_pair(self, a: str, b: str | None = None, max_len: int = 128) -> tuple[list[int], list[bool]]:
        """``[CLS] a [SEP] (b [SEP])`` truncated longest-first and padded to ``max_len``."""
        ta = self.encode(a)
        tb = self.encode(b) if b is not None else None
        budget = max_len - (3 if tb is not None else 2)
        if budget < 0:
            raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
        if tb is None:
            ta = ta[:budget]
        else:
            while len(ta) + len(tb) > budget:
                if len(ta) >= len(tb):
                    ta.pop()
                else:
                    tb.pop()
        ids = [CLS_ID, *ta, SEP_ID] + ([*tb, SEP_ID] if tb is not None else [])
        mask = [True] * len(ids) + [False] * (max_len - len(ids))
        return ids + [PAD_ID] * (max_len - len(ids)), mask

    def encode_batch(
        self, a: Sequence[str], b: Sequence[str] | None = None, max_len: int = 128
    ) -> tuple[Tensor, Tensor]:
        """``(ids int64 [N, max_len], mask bool [N, max_len])``."""
        if b is not None and len(b) != len(a):
            raise ValueError("text_a and text_b differ in length")
        ids = np.zeros((len(a), max_len), dtype=np.int64)
        mask = np.zeros((len(a), max_len), dtype=bool)
        for k in range(len(a)):
            row, m = self.encode_pair(a[k], None if b is None else b[k], max_len)
            ids[k], mask[k] = row, m
        return torch.from_numpy(ids), torch.from_numpy(mask)


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
