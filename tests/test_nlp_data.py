"""envs/nlp.py and envs/wordpiece.py: GLUE readers against the data README, and the WordPiece tokenizer."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_roots import SUBSET, data_root, is_subset, real_root
from mtrl_arch.envs import wordpiece as nlp  # the tokenizer internals these tests check
from mtrl_arch.envs.nlp import GLUE_ROWS, GLUE_TASKS, DataError, GlueDataset, build_glue_tokenizer, glue_metrics, read_glue
from mtrl_arch.envs.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer, pre_tokenize


@pytest.fixture(scope="module")
def root() -> Path:
    """The real GLUE files, else their first rows in tests/fixtures/data."""
    return data_root("glue")


@pytest.fixture(scope="module")
def tok() -> WordPieceTokenizer:
    return build_glue_tokenizer(real_root("glue"), vocab_size=8000)


# the README's label counts per file
LABEL_COUNTS = {
    ("CoLA", "train"): {1: 6023, 0: 2528}, ("CoLA", "dev"): {1: 721, 0: 322},
    ("SST-2", "train"): {1: 37569, 0: 29780}, ("SST-2", "dev"): {1: 444, 0: 428},
    ("MRPC", "train"): {1: 2474, 0: 1194}, ("MRPC", "dev"): {1: 279, 0: 129},
    ("RTE", "train"): {0: 1249, 1: 1241}, ("RTE", "dev"): {0: 146, 1: 131},  # 0 = entailment
}


@pytest.mark.parametrize("task,split", sorted(GLUE_ROWS))
def test_glue_row_and_label_counts_match_readme(task, split):
    s = read_glue(real_root("glue"), task, split)
    assert len(s) == GLUE_ROWS[(task, split)]
    assert len(s.labels) == len(s.text_a)
    assert (s.text_b is None) == (GLUE_TASKS[task].text_b is None)
    if GLUE_TASKS[task].is_regression:
        assert s.labels.dtype == np.float32 and s.labels.min() >= 0.0 and s.labels.max() <= 5.0
    else:
        assert dict(Counter(s.labels.tolist())) == LABEL_COUNTS[(task, split)]
    assert all(t == t.strip() and t for t in s.text_a)


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_subset_rows_are_the_real_first_rows(task):
    """tests/fixtures/data/glue holds each real file's first rows, parsed the same way."""
    real = real_root("glue")
    for split in ("train", "dev"):
        sub, full = read_glue(SUBSET, task, split), read_glue(real, task, split)
        n = len(sub)
        assert n == 64 and sub.text_a == full.text_a[:n] and np.array_equal(sub.labels, full.labels[:n])
        assert (sub.text_b is None) or sub.text_b == full.text_b[:n]


def test_glue_parsing_details(root):
    mrpc = read_glue(root, "MRPC", "train")  # BOM + header
    assert mrpc.labels[0] == 1 and mrpc.text_a[0].startswith("Amrozi accused his brother")
    assert mrpc.text_b[0].startswith('Referring to him as only "the witness"')
    cola = read_glue(root, "CoLA", "train")  # no header
    assert cola.text_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    if not is_subset(root):
        rte = read_glue(root, "RTE", "train")  # index 2164 starts with a lone quote
        assert rte.text_a[2164].startswith('"')
    sts = read_glue(root, "STS-B", "train")
    assert sts.text_a[0] == "A plane is taking off." and sts.labels[0] == 5.0
    sst = read_glue(root, "SST-2", "dev")
    assert not sst.text_a[0].endswith(" ")


def test_glue_missing_or_damaged_files(root, tmp_path):
    with pytest.raises(DataError) as err:
        read_glue(tmp_path, "RTE", "dev")
    assert "\n" not in str(err.value) and "glue/RTE/train.tsv, glue/RTE/dev.tsv" in str(err.value)
    d = tmp_path / "glue" / "STS-B"
    d.mkdir(parents=True)
    lines = (root / "glue" / "STS-B" / "dev.tsv").read_text().splitlines()[:5]
    lines[3] = lines[3].rsplit("\t", 1)[0]  # a row loses its score column
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="dev.tsv line 4: 9 columns, expected 10"):
        read_glue(tmp_path, "STS-B", "dev")


def test_glue_metrics():
    assert glue_metrics("CoLA", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), [1, 0]) == {"mcc": 1.0}
    r = glue_metrics("MRPC", [1, 1, 0, 1], [1, 0, 0, 1])
    assert r == {"f1": pytest.approx(0.8), "accuracy": 0.75}
    r = glue_metrics("STS-B", np.array([[0.1], [0.5], [0.9]]), [1.0, 2.0, 4.0])
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0
    assert GLUE_TASKS["STS-B"].n_outputs == 1 and GLUE_TASKS["RTE"].n_outputs == 2


# ---- tokenizer ----------------------------------------------------------------------------
def _naive_wordpiece(counts: Counter, vocab_size: int, min_frequency: int) -> list[str]:
    """Textbook BPE: recount every pair after every merge."""
    vocab = list(SPECIAL_TOKENS)
    words = {w: [w[0]] + ["##" + c for c in w[1:]] for w in counts}
    alpha = Counter()
    for w, syms in words.items():
        for s in syms:
            alpha[s] += counts[w]
    vocab += [s for s, _ in sorted(alpha.items(), key=lambda kv: (-kv[1], kv[0]))][: vocab_size - len(vocab)]
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, syms in words.items():
            for p in zip(syms, syms[1:]):
                pairs[p] += counts[w]
        if not pairs:
            break
        (a, b), c = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < min_frequency:
            break
        for w, syms in words.items():
            out, k = [], 0
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    out.append(a + b[2:])
                    k += 2
                else:
                    out.append(syms[k])
                    k += 1
            words[w] = out
        if a + b[2:] not in vocab:
            vocab.append(a + b[2:])
    return vocab


def test_fast_trainer_equals_naive_bpe(root):
    texts = read_glue(root, "RTE", "dev").text_a[:80]
    counts = Counter(w for t in texts for w in pre_tokenize(t))
    assert nlp._train_wordpiece(counts, 200, 2) == _naive_wordpiece(counts, 200, 2)
    # repeated symbols (overlapping pairs) and ties
    toy = Counter({"aaaa": 5, "aaa": 3, "abab": 4, "banana": 2, "bab": 2, "ba": 1})
    assert nlp._train_wordpiece(toy, 40, 1) == _naive_wordpiece(toy, 40, 1)


def test_tokenizer_vocab_is_deterministic(root):
    texts = read_glue(root, "CoLA", "train").text_a
    size = 200 if is_subset(root) else 1500
    a = WordPieceTokenizer.train(texts, vocab_size=size)
    b = WordPieceTokenizer.train(list(texts), vocab_size=size)
    assert a.vocab == b.vocab and len(a) == size
    assert a.vocab[:5] == list(SPECIAL_TOKENS)


def test_tokenizer_round_trip_and_pairs(tok, tmp_path):
    assert len(tok) == 8000
    s = "The movie's ending was surprisingly GOOD, wasn't it?"
    ids = tok.encode(s)
    assert nlp.UNK_ID not in ids
    assert tok.decode(ids) == " ".join(pre_tokenize(s)) == "the movie ' s ending was surprisingly good , wasn ' t it ?"
    assert tok.decode(tok.encode("Café naïve")) == "cafe naive"
    assert tok.tokenize("☃ snow") == ["[UNK]", "snow"]
    assert any(t.startswith("##") for t in tok.tokenize("unbelievably overpriced"))

    ids, mask = tok.encode_pair("a man is playing", "a man plays", max_len=16)
    n = len(tok.encode("a man is playing")) + len(tok.encode("a man plays")) + 3
    assert len(ids) == 16 and sum(mask) == n and mask[:n] == [True] * n
    assert ids[0] == nlp.CLS_ID and ids[n - 1] == nlp.SEP_ID and ids[n:] == [nlp.PAD_ID] * (16 - n)
    assert ids.count(nlp.SEP_ID) == 2
    long = " ".join(["word"] * 50)
    ids, mask = tok.encode_pair(long, "short one", max_len=12)  # longest-first truncation
    assert all(mask) and tok.decode(ids) == "word word word word word word word short one"

    path = tmp_path / "tok.json"
    tok.save(path)
    again = WordPieceTokenizer.load(path)
    assert again.vocab == tok.vocab and again.encode(s) == tok.encode(s)


def test_glue_dataset_encoding(tok):
    root = real_root("glue")
    ds = GlueDataset(read_glue(root, "RTE", "dev"), tok, max_len=64)
    ids, mask, label = ds[0]
    assert ids.shape == (64,) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert len(ds) == 277 and label.dtype == torch.int64
    assert bool((ds.ids[~ds.mask] == nlp.PAD_ID).all()) and bool((ds.ids[:, 0] == nlp.CLS_ID).all())
    sts = GlueDataset(read_glue(root, "STS-B", "dev"), tok, max_len=32)
    assert sts.labels.dtype == torch.float32
