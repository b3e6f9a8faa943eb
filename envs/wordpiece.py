"""A WordPiece subword tokenizer trained on a corpus (GLUE's training text in :mod:`.nlp`).

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
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["WordPieceTokenizer", "SPECIAL_TOKENS", "normalize", "pre_tokenize"]


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
