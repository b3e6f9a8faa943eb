"""One weight step and one search step, domain-free: every training loop is built from these.

``losses_fn(net, batch) -> Tensor[T]`` is the adapter's per-task loss. The loops (the
supervised loop in :mod:`mtrl_arch.agents.supervised`, the synthetic problem in
:mod:`mtrl_arch.synthetic`, SAC's updates in :mod:`mtrl_arch.agents.sac`, driven by
:mod:`mtrl_arch.agents.rl_loop`) differ only in where batches come from.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .conflict import capture_task_grads
from .search.base import ArchMethod
from .update import GradientCombiner

LossesFn = Callable[[nn.Module, Any], Tensor]


def weight_step(net: nn.Module, batch: Any, losses_fn: LossesFn, combiner: GradientCombiner,
                optimizer: torch.optim.Optimizer, step: int, grad_clip: float = 0.0,
                method: ArchMethod | None = None, autocast: Callable[[], Any] | None = None,
                inputs: list[Tensor] | None = None) -> Tensor:
    """Forward, combine per-task gradients, clip, step. Returns the per-task losses (detached)."""
    observers = (method,) if method is not None else ()
    need = combiner.needs_task_grads(step, observers)
    optimizer.zero_grad(set_to_none=True)
    with capture_task_grads(net, need):
        if autocast is not None:
            with autocast():
                losses = losses_fn(net, batch)
        else:
            losses = losses_fn(net, batch)
    combiner.backward(net, losses.float(), need, observers=observers, inputs=inputs)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return losses.detach().float()


def search_step(method: ArchMethod, net: nn.Module, train_batch: Any, val_batch: Any, losses_fn: LossesFn,
                combiner: GradientCombiner, optimizer: torch.optim.Optimizer, step: int,
                grad_clip: float = 0.0) -> dict[str, Tensor]:
    """One step of architecture search: a weight step and/or an architecture step, as the method says."""
    phase = method.phase(step)
    out: dict[str, Tensor] = {}
    if phase.weights:
        out["train_losses"] = weight_step(net, train_batch, losses_fn, combiner, optimizer, step, grad_clip, method)
    if phase.arch and val_batch is not None:
        val_losses = losses_fn(net, val_batch)
        method.arch_step(val_losses)
        out["val_losses"] = val_losses.detach()
    method.on_step(step)
    return out


def weight_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the architecture parameters."""
    arch = {id(p) for p in getattr(net, "arch_parameters", lambda: [])()}
    return [p for p in net.parameters() if id(p) not in arch]
