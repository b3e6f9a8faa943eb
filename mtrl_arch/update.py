"""From per-task losses to gradients: loss/gradient weighting x conflict-noticed x diagnostics.

Used by every training loop (supervised, SAC's critic and actor) in the same way::

    need = combiner.needs_task_grads(step, observers)
    with capture_task_grads(net, need):
        losses = per_task_losses(net(x), y)          # [T]
    combiner.backward(net, losses, need, extra=reg, observers=observers)
    optimizer.step()
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .conflict import ConflictStats, conflict_mask, task_grams, task_gradients, write_group_grads


class GradientCombiner:
    def __init__(self, weighting: Any, conflict_noticed: bool = False, cn_variant: str = "layer",
                 track_every: int = 0, thresholds: Sequence[float] = (0.0,), cn_fraction: float = 0.0):
        self.weighting = weighting
        self.conflict_noticed = conflict_noticed
        self.cn_variant, self.cn_fraction = cn_variant, cn_fraction
        self.track_every = track_every  # also measure conflicts every N steps when nothing needs them
        self.stats = ConflictStats(tuple(thresholds))

    def needs_task_grads(self, step: int, observers: Sequence[Any] = ()) -> bool:
        return bool(self.weighting.needs_task_grads or self.conflict_noticed
                    or any(getattr(o, "wants_task_grads", False) for o in observers)
                    or (self.track_every and step % self.track_every == 0))

    def backward(self, net: nn.Module, losses: Tensor, need: bool, extra: Tensor | None = None,
                 observers: Sequence[Any] = (), inputs: Sequence[Tensor] | None = None) -> Tensor:
        """Backward the combined objective; returns the scalar that was differentiated."""
        total = self.weighting.loss(losses)
        if extra is not None:
            total = total + extra
        groups = net.shared_groups() if need else []
        sync = distributed.active()  # data-parallel (torchrun): gradients become means over ranks
        if not groups:
            total.backward(inputs=None if inputs is None else list(inputs))
            if sync:
                distributed.all_reduce_grads(self._params(net, inputs))
            return total.detach()
        # what the loss weighting gives each task this step (RLW draws fresh weights per call)
        (w,) = torch.autograd.grad(total, losses, retain_graph=True)
        grads = task_gradients(net, losses, groups, total, inputs, loss_weights=w)
        if sync:  # combine the global per-task gradients (the same on every rank), not this rank's
            distributed.all_reduce_grads(self._params(net, inputs))
            *grads, w = distributed.all_reduce_mean([*grads, w])
        grams = task_grams(groups, grads)
        mask = conflict_mask(groups, grads, self.cn_variant, grams, self.cn_fraction) if self.conflict_noticed else None
        self.stats.update(groups, grads, mask, grams)
        for o in observers:
            if getattr(o, "wants_task_grads", False):
                o.observe_task_grads(groups, grads, grams)
        if self.weighting.needs_task_grads:
            if mask is not None:  # withheld groups take no part in the combination
                grads = [G * (~m) for G, m in zip(grads, mask)]
            sizes = [G.shape[1] for G in grads]
            combined = list(torch.split(self.weighting.combine(torch.cat(grads, 1)), sizes))
        else:  # a weighted sum: withholding a group zeroes its combined vector (no masked copy of the rows)
            combined = [w.to(G.dtype) @ G for G in grads]
            if mask is not None:
                combined = [c * (~m) for c, m in zip(combined, mask)]
        if sync:  # methods that draw random numbers (PCGrad's order, GradDrop) follow rank 0
            distributed.broadcast_(combined)
        write_group_grads(groups, combined)
        return total.detach()

    def _params(self, net: nn.Module, inputs: Sequence[Tensor] | None) -> list[Tensor]:
        """What this backward gives gradients to: ``inputs`` if given, else the net's and the weighting's."""
        if inputs is not None:
            return list(inputs)
        return [*net.parameters(), *getattr(self.weighting, "parameters", lambda: [])()]

    def state_dict(self) -> dict:
        return {"stats": self.stats.state_dict(), "weighting": self.weighting.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.stats.load_state_dict(d["stats"])
        self.weighting.load_state_dict(d["weighting"])
