"""Per-task gradients of shared modules, gradient-conflict statistics, the conflict-noticed mask.

A network that takes part exposes ``shared_groups()`` (a list of
:class:`~mtrl_arch.trunk.ParamGroup`: one module used by two or more tasks) and, for
the one-backward path, ``capture_requested`` / ``captured_ok`` and banks with
``CaptureMixin``. Per-task gradients come from one of two paths:

* capture (per-task inputs: RL, mixed-task NLP batches): shared banks run each call on a
  detached copy of their parameters, so one ordinary backward leaves task t's gradient
  in row t of the copies. Cost: about one extra weight-gradient, not T backward passes.
* autograd (a shared input feeding every task, e.g. one image for all tasks): one
  ``torch.autograd.grad`` per task, retaining the graph (T is small in those settings).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .trunk import ParamGroup


def _shared_banks(net: nn.Module, groups: Sequence[ParamGroup]) -> list[nn.Module]:
    owners = {id(p) for g in groups for p in g.params}
    return [m for m in net.modules() if getattr(m, "supports_capture", False)
            and any(id(p) in owners for p in m.parameters(recurse=False))]


@contextlib.contextmanager
def capture_task_grads(net: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the forward pass inside this to make per-task gradients available from one backward."""
    banks = _shared_banks(net, net.shared_groups()) if enabled else []
    for b in banks:
        b.captured = []
    net.capture_requested = enabled
    try:
        yield
    finally:
        net.capture_requested = False


def task_gradients(net: nn.Module, losses: Tensor, groups: Sequence[ParamGroup], total: Tensor,
                   inputs: Sequence[Tensor] | None = None, loss_weights: Tensor | None = None) -> list[Tensor]:
    """Backward ``total`` and return per-task gradients ``[T, numel]`` for every group.

    Rows of tasks that do not use a group are zero. ``inputs`` limits the backward to those
    parameters (e.g. the actor's, so the critic's weight gradients are never computed).
    On the capture path shared parameters get no ``.grad`` of their own; the caller writes
    the combined gradient with :func:`write_group_grads`. There the backward of ``total``
    leaves ``w_t * grad loss_t`` in row t, so ``loss_weights`` (``d total / d losses``;
    computed here when not given) divides it back out: rows are always unweighted.
    """
    T = losses.shape[0]
    params = list({id(p): p for g in groups for p in g.params}.values())
    if getattr(net, "captured_ok", False):
        if loss_weights is None:
            (loss_weights,) = torch.autograd.grad(total, losses, retain_graph=True)
        # a task with zero weight contributes nothing to ``total``: its row stays zero
        inv_w = torch.where(loss_weights != 0, 1.0 / loss_weights, torch.zeros_like(loss_weights)).detach()
        banks = _shared_banks(net, groups)
        leaves = [rec[1] for b in banks for rec in b.captured]
        total.backward(inputs=None if inputs is None else list(inputs) + leaves)
        full: dict[int, Tensor] = {}
        calls: dict[int, int] = {}
        for bank in banks:
            for rec in bank.captured:
                calls[id(rec[0])] = calls.get(id(rec[0]), 0) + 1
        for bank in banks:
            for param, leaf, idx, tasks in bank.captured:
                if id(param) not in full and param.shape[0] == 1 and tasks == list(range(T)) and calls[id(param)] == 1:
                    full[id(param)] = leaf.grad.unsqueeze(1)  # one module, task t in row t: no scatter needed
                    continue
                if id(param) not in full:
                    full[id(param)] = leaf.new_zeros(T, *param.shape)
                dev = leaf.device
                full[id(param)].index_put_((torch.as_tensor(tasks, device=dev), torch.as_tensor(idx, device=dev)),
                                           leaf.grad, accumulate=True)
            bank.captured = []
        rows = []
        for g in groups:
            G = torch.cat([(g.view(full[id(p)], 1) if id(p) in full else p.new_zeros(T, g.view(p).numel())).reshape(T, -1)
                           for p in g.params], 1)
            rows.append(G.mul_(inv_w.to(G.dtype)[:, None]))  # G is torch.cat's own new tensor
        return rows
    rows = []
    for t in range(T):
        gs = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append({id(p): (gp if gp is not None else torch.zeros_like(p)) for p, gp in zip(params, gs)})
    total.backward(inputs=None if inputs is None else list(inputs))
    return [torch.stack([torch.cat([g.view(r[id(p)]).reshape(-1) for p in g.params]) for r in rows]) for g in groups]


def write_group_grads(groups: Sequence[ParamGroup], combined: Sequence[Tensor]) -> None:
    """Write one combined gradient vector per group into its parameters' ``.grad``."""
    for g, vec in zip(groups, combined):
        offset = 0
        for p in g.params:
            shape = g.view(p).shape
            n = shape.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            chunk = vec[offset:offset + n].view(shape).to(p.grad.dtype)
            if g.index is None:
                p.grad.copy_(chunk)
            elif isinstance(g.index, int):
                p.grad[g.index].copy_(chunk)
            else:
                p.grad.index_copy_(0, torch.as_tensor(g.index, device=p.device), chunk)
            offset += n


def task_rows(G: Tensor, tasks: Sequence[int]) -> Tensor:
    """The rows of ``G`` of ``tasks`` (``G`` itself, not a copy, when that is every row in order)."""
    if len(tasks) == G.shape[0] and all(t == i for i, t in enumerate(tasks)):
        return G
    return G[list(tasks)]


def task_grams(groups: Sequence[ParamGroup], grads: Sequence[Tensor]) -> list[Tensor | None]:
    """Per group, the inner products of the gradients of the tasks using it ([k, k]; None for one task).

    Computed once per step and shared by the conflict-noticed mask and the statistics.
    """
    return [(R := task_rows(G, g.tasks)) @ R.T if len(g.tasks) > 1 else None for g, G in zip(groups, grads)]


def _pairs(D: Tensor) -> Tensor:
    i, j = torch.triu_indices(D.shape[0], D.shape[0], 1, device=D.device)
    return D[i, j]


def cosines_from_gram(D: Tensor) -> Tensor:
    """Cosine similarity of every task pair (i < j) from their Gram matrix ``D`` [k, k]."""
    n = D.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    return _pairs(D / (n[:, None] * n[None, :]))


def conflict_mask(groups: Sequence[ParamGroup], grads: Sequence[Tensor], variant: str = "layer",
                  grams: Sequence[Tensor | None] | None = None, fraction: float = 0.0) -> Tensor:
    """Which groups the conflict-noticed operation withholds this step (bool [n_groups]).

    ``layer``: a group conflicts when more than ``fraction`` of the pairs of tasks using it
    have gradients with a negative inner product on it; ``fraction=0`` is the paper's rule
    (any pair). With many tasks that rule fires on nearly every step (MT10: 45 pairs per
    shared group) and freezes the shared trunk during the search; a fraction (e.g. 0.5:
    most pairs conflict) scales with the number of tasks. ``branch``: a conflicting group
    also withholds every later group that shares a task with it (the deeper layers on the
    same path).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"conflict-noticed fraction must be in [0, 1); got {fraction}")
    if variant not in ("layer", "branch"):
        raise ValueError(f"unknown conflict-noticed variant {variant!r}; choose 'layer' or 'branch'")
    grams = task_grams(groups, grads) if grams is None else grams
    flags = [(_pairs(D) < 0).float().mean() > fraction if D is not None
             else torch.zeros((), dtype=torch.bool, device=G.device) for D, G in zip(grams, grads)]
    mask = torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool)
    if variant == "branch" and len(groups) > 1:
        out = mask.clone()
        for a, ga in enumerate(groups):
            for b in range(a):
                if set(groups[b].tasks) & set(ga.tasks):
                    out[a] = out[a] | mask[b]
        mask = out
    return mask


@dataclass
class ConflictStats:
    """Running per-group statistics: mean pair cosine, conflict rate, counts below thresholds.

    Kept on the device as tensors; ``summary()`` is the only place that syncs.
    """

    thresholds: tuple[float, ...] = (0.0,)
    steps: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, Tensor] = field(default_factory=dict)
    withheld: dict[str, Tensor] = field(default_factory=dict)
    cos_sum: dict[str, Tensor] = field(default_factory=dict)
    below: dict[str, Tensor] = field(default_factory=dict)  # [n_thresholds, n_pairs]

    def update(self, groups: Sequence[ParamGroup], grads: Sequence[Tensor], mask: Tensor | None = None,
               grams: Sequence[Tensor | None] | None = None) -> None:
        grams = task_grams(groups, grads) if grams is None else grams
        for k, (g, D) in enumerate(zip(groups, grams)):
            if D is None:
                continue
            cos = cosines_from_gram(D)
            th = torch.tensor(self.thresholds, device=cos.device)
            b = (cos[None, :] < th[:, None]).long()
            if g.name not in self.steps:
                self.steps[g.name] = 0
                self.conflicts[g.name] = torch.zeros((), dtype=torch.long, device=cos.device)
                self.withheld[g.name] = torch.zeros((), dtype=torch.long, device=cos.device)
                self.cos_sum[g.name] = torch.zeros_like(cos)
                self.below[g.name] = torch.zeros_like(b)
            self.steps[g.name] += 1
            self.conflicts[g.name] += (cos < 0).any().long()
            if mask is not None:
                self.withheld[g.name] += mask[k].long()
            self.cos_sum[g.name] += cos.detach()
            self.below[g.name] += b

    def summary(self) -> dict[str, float]:
        """Flat scalars for logging: conflict rate, withheld rate and mean pair cosine per group."""
        out = {}
        for name, n in self.steps.items():
            out[f"conflict/{name}/rate"] = float(self.conflicts[name]) / n
            out[f"conflict/{name}/withheld"] = float(self.withheld[name]) / n
            out[f"conflict/{name}/mean_cos"] = float(self.cos_sum[name].mean()) / n
        return out

    def scores(self, threshold: float) -> dict[str, int]:
        """Recon's layer score: number of (step, task pair) entries with cosine below ``threshold``."""
        k = self.thresholds.index(threshold)
        return {name: int(b[k].sum()) for name, b in self.below.items()}

    def state_dict(self) -> dict:
        return {"thresholds": self.thresholds, "steps": dict(self.steps),
                **{f: {k: v.cpu() for k, v in getattr(self, f).items()} for f in ("conflicts", "withheld", "cos_sum", "below")}}

    def load_state_dict(self, d: dict) -> None:
        self.thresholds = tuple(d["thresholds"])
        self.steps = dict(d["steps"])
        for f in ("conflicts", "withheld", "cos_sum", "below"):
            setattr(self, f, dict(d[f]))
