"""Data containers for the supervised adapters: deterministic, resumable batch streams.

Three kinds, one interface (what :mod:`mtrl_arch.agents.supervised` calls)::

    len(data)                                  examples (per-task data: the largest task's)
    data.n_batches(batch_size, limit)          batches per epoch
    data.batches(batch_size, shuffle, seed, epoch, limit, start, num_workers) -> Iterator[dict]
    data.holdout(fraction, seed) -> (rest, held_out | None)

* :class:`TensorData`: examples held in memory as tensors sharing their first dimension
  (Multi-MNIST composites as uint8, encoded GLUE sentences).
* :class:`DatasetData`: a ``torch.utils.data.Dataset`` read item by item (NYUv2,
  CityScapes, CelebA), optionally through worker processes.
* :class:`PerTaskData`: one :class:`TensorData` per task (GLUE): every batch holds
  ``batch_size`` examples of *each* task, stacked to ``[T, B, ...]``.

Shuffling is a pure function of ``(seed, epoch)``: epoch ``e`` always visits the
examples in the same order, so a run resumed at batch ``start`` of epoch ``e`` sees
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor


def _generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt * 104_729) % (2**63 - 1))


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices of ``range(n)``; ``round(fraction * n)`` are held out."""
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 4243])).permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[k:]), np.sort(perm[:k])


def subset_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``size`` of ``range(n)`` (all of it when size is 0 or >= n), sorted."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(np.random.SeedSequence([int(seed), 31337])).permutation(n)[:size])


class _Examples:
    """Common logic of the single-stream containers: ``fetch(indices) -> batch dict``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def fetch(self, idx: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def subset(self, idx: Sequence[int] | np.ndarray) -> "_Examples":
        raise NotImplementedError

    def n_batches(self, batch_size: int, limit: int = 0) -> int:
        n = math.ceil(len(self) / batch_size)
        return min(n, limit) if limit else n

    def order(self, shuffle: bool, seed: int, epoch: int) -> Tensor:
        if shuffle:
            return torch.randperm(len(self), generator=_generator(seed, epoch))
        return torch.arange(len(self))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, limit: int = 0,
                start: int = 0, num_workers: int = 0) -> Iterator[dict[str, Tensor]]:
        order = self.order(shuffle, seed, epoch)
        for b in range(start, self.n_batches(batch_size, limit)):
            yield self.fetch(order[b * batch_size:(b + 1) * batch_size])

    def holdout(self, fraction: float, seed: int) -> tuple["_Examples", "_Examples | None"]:
        keep, held = holdout_indices(len(self), fraction, seed)
        if len(held) == 0 or len(keep) == 0:
            return self, None
        return self.subset(keep), self.subset(held)


class TensorData(_Examples):
    """In-memory examples: ``tensors[k]`` has shape ``[N, ...]`` for every key k."""

    def __init__(self, tensors: dict[str, Tensor]):
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors differ in their first dimension: {sizes}")
        self.tensors = tensors
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def fetch(self, idx: Tensor) -> dict[str, Tensor]:
        return {k: v[idx] for k, v in self.tensors.items()}

    def subset(self, idx) -> "TensorData":
        ix = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return TensorData({k: v[ix] for k, v in self.tensors.items()})


class DatasetData(_Examples):
    """Examples read one by one from a ``Dataset``; ``collate(items) -> batch dict``."""

    def __init__(self, dataset: Any, collate: Callable[[list], dict[str, Tensor]], indices: np.ndarray | None = None):
        self.dataset, self.collate = dataset, collate
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def fetch(self, idx: Tensor) -> dict[str, Tensor]:
        return self.collate([self.dataset[int(self.indices[i])] for i in idx])

    def subset(self, idx) -> "DatasetData":
        return DatasetData(self.dataset, self.collate, self.indices[np.asarray(idx)])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, limit: int = 0,
                start: int = 0, num_workers: int = 0) -> Iterator[dict[str, Tensor]]:
        if num_workers <= 0:
            yield from super().batches(batch_size, shuffle, seed, epoch, limit, start)
            return
        from torch.utils.data import DataLoader

        order = self.order(shuffle, seed, epoch)
        plan = [[int(self.indices[i]) for i in order[b * batch_size:(b + 1) * batch_size]]
                for b in range(start, self.n_batches(batch_size, limit))]
        yield from DataLoader(self.dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=self.collate)


class PerTaskData:
    """One :class:`TensorData` per task; batches are ``[T, B, ...]`` with task t's examples in row t.

    Training (``shuffle=True``): an epoch has as many batches as the largest task needs
    (LibMTL's convention for multi-input problems); each task draws from its own endless
    stream of seeded permutations, so smaller tasks are cycled. Evaluation
    (``shuffle=False``): every task's examples in order, once; rows past a task's end are
    padding, marked False in the batch's ``valid`` ``[T, B]``.
    """

    def __init__(self, parts: Sequence[TensorData]):
        self.parts = list(parts)

    def __len__(self) -> int:
        return max(len(p) for p in self.parts)

    def n_batches(self, batch_size: int, limit: int = 0) -> int:
        n = math.ceil(len(self) / batch_size)
        return min(n, limit) if limit else n

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, limit: int = 0,
                start: int = 0, num_workers: int = 0) -> Iterator[dict[str, Tensor]]:
        n = self.n_batches(batch_size, limit)
        if shuffle:
            gens = [_generator(seed, epoch, salt=t + 1) for t in range(len(self.parts))]
            streams = [torch.cat([torch.randperm(len(p), generator=g)
                                  for _ in range(math.ceil(n * batch_size / len(p)))])
                       for p, g in zip(self.parts, gens)]
            for b in range(start, n):
                rows = [p.fetch(s[b * batch_size:(b + 1) * batch_size]) for p, s in zip(self.parts, streams)]
                out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
                out["valid"] = torch.ones(len(rows), batch_size, dtype=torch.bool)
                yield out
            return
        for b in range(start, n):
            rows, valid = [], []
            for p in self.parts:
                idx = torch.arange(b * batch_size, (b + 1) * batch_size)
                ok = idx < len(p)
                rows.append(p.fetch(torch.where(ok, idx, torch.zeros_like(idx))))
                valid.append(ok)
            out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            out["valid"] = torch.stack(valid)
            yield out

    def holdout(self, fraction: float, seed: int) -> tuple["PerTaskData", "PerTaskData | None"]:
        pairs = [p.holdout(fraction, seed + t) for t, p in enumerate(self.parts)]
        if any(h is None or len(h) == 0 for _, h in pairs):
            return self, None
        return PerTaskData([k for k, _ in pairs]), PerTaskData([h for _, h in pairs])
