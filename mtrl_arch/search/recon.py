"""Recon: turn the layers with the most gradient conflict task-specific (Shi et al., "Recon:
Reducing Conflicting Gradients from the Root for Multi-Task Learning", ICLR 2023).

Algorithm implemented (the authors' released procedure, on this package's stages):

1. Search = train the hard-parameter-sharing network (every stage shared, per-task heads)
   with the run's loss/gradient weighting. ``wants_task_grads`` makes the loop compute the
   per-task gradients of every shared group each step (one backward with per-task inputs,
   see :mod:`mtrl_arch.conflict`) and hand them to :meth:`Recon.observe_task_grads`.
2. For every shared layer (here: one stage = one layer, its weight and bias together, as
   Recon groups a module's parameters) and every threshold in ``thresholds``, count the
   (step, task pair) entries whose gradient cosine is below the threshold. The score of a
   layer is its count at ``S``; the other thresholds are recorded for comparison.
3. Rank layers by score (ties: the shallower stage first) and turn the top ``k`` layers
   task-specific, or, when ``fraction`` > 0, the longest prefix of the ranking whose
   parameters stay within ``fraction`` of the shared parameters (Recon converts under 13%).
4. Derive a :class:`~mtrl_arch.tree.Tree` whose selected stages are all-specific and the
   others all-shared (not nested: a shared stage may follow a specific one; Trunk runs
   it). ``Tree.meta`` keeps every layer's counts at every threshold, the ranking and the
   number of observed steps. The loop retrains it from scratch (each task's copy of a
   stage starting from the same initialisation when the stage factory makes it so).

Departures: Recon ranks individual modules (a ResNet has ~40: convs and BatchNorms); a
stage of this package may hold several modules and is ranked as one. Recon counts every
iteration; a loop that computes per-task gradients only every few steps (not the case
with ``wants_task_grads``) would count those steps only. Defaults: ``S = 0.0``
(CityScapes; the paper uses -0.1 on Multi-Fashion+MNIST and -0.02 on NYUv2), ``k = 1``.

Derive rules: ``arch.max_params=N`` replaces ``k`` (and refuses ``fraction``, another way of
saying the same budget): the longest prefix of the ranking whose tree (turned stages once
per task, the others once) has at most N trunk parameters (stopping at the first layer that
does not fit, like ``fraction``). Recon has no probabilities, so ``arch.derive=margin`` is
refused with a one-line ConfigError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..conflict import cosines_from_gram
from ..tree import Tree
from ..trunk import ParamGroup, Trunk
from .base import ArchMethod, Phase


@dataclass
class ReconOptions:
    S: float = 0.0                              # threshold whose counts rank the layers
    thresholds: tuple = (-0.1, -0.02, 0.0)      # counts kept for all of these (S is added if missing)
    k: int = 1                                  # number of layers turned task-specific
    fraction: float = 0.0                       # if > 0: budget as a fraction of shared parameters instead of k


class Recon(ArchMethod):
    name = "recon"
    Options = ReconOptions
    wants_task_grads = True
    derive_rules = ("max_params",)

    def __init__(self, spec, options=None, seed: int = 0):
        super().__init__(spec, options, seed)
        th = [float(t) for t in self.options.thresholds]
        if float(self.options.S) not in th:
            th.append(float(self.options.S))
        self.thresholds: tuple[float, ...] = tuple(th)
        self.counts: dict[str, Tensor] = {}  # layer -> [n_thresholds] (on the gradients' device)
        self.steps_seen = 0

    def set_derive_rule(self, rule) -> None:
        if rule.max_params and self.options.fraction > 0:
            raise ConfigError("arch.max_params and arch.options.fraction both set Recon's parameter budget; "
                              "set one of them")
        super().set_derive_rule(rule)

    def build(self) -> nn.Module:
        self.net = Trunk(Tree.hps(self.spec.tasks, self.spec.n_stages), self.spec.stages, self.spec.heads)
        return self.net

    def phase(self, step: int) -> Phase:
        return Phase(weights=True, arch=False)

    def observe_task_grads(self, groups: Sequence[ParamGroup], grads: Sequence[Tensor],
                           grams: Sequence[Tensor | None]) -> None:
        self.steps_seen += 1
        for g, D in zip(groups, grams):
            if D is None:  # a group used by one task has no pairs
                continue
            cos = cosines_from_gram(D)
            th = torch.tensor(self.thresholds, device=cos.device, dtype=cos.dtype)
            below = (cos[None, :] < th[:, None]).sum(1)
            if g.name not in self.counts:
                self.counts[g.name] = torch.zeros(len(self.thresholds), dtype=torch.long, device=cos.device)
            self.counts[g.name] += below

    # ---- ranking and derivation ------------------------------------------------------------
    def scores(self, threshold: float | None = None) -> dict[str, int]:
        """Layer -> number of (step, task pair) entries with cosine below ``threshold`` (default S)."""
        i = self.thresholds.index(float(self.options.S if threshold is None else threshold))
        names = [f"stage{s}" for s in range(self.spec.n_stages)]
        return {n: int(self.counts[n][i]) if n in self.counts else 0 for n in names}

    def ranking(self) -> list[int]:
        """Stages by score, highest first; ties go to the shallower stage."""
        sc = self.scores()
        return sorted(range(self.spec.n_stages), key=lambda s: (-sc[f"stage{s}"], s))

    def selected(self) -> list[int]:
        rank = self.ranking()
        if self.derive_rule.max_params:  # turning stage s specific adds T-1 copies of it to the full-sharing trunk
            sizes, T = self.sizes(), self.spec.n_tasks
            out, used = [], sum(sizes)
            for s in rank:
                if used + (T - 1) * sizes[s] > self.derive_rule.max_params:
                    break
                out.append(s)
                used += (T - 1) * sizes[s]
            return sorted(out)
        if self.options.fraction > 0:
            sizes = self.spec.stage_params()
            budget = self.options.fraction * sum(sizes)
            out, used = [], 0
            for s in rank:
                if used + sizes[s] > budget:
                    break
                out.append(s)
                used += sizes[s]
            return sorted(out)
        return sorted(rank[: max(0, int(self.options.k))])

    def derive(self) -> Tree:
        T, L = self.spec.n_tasks, self.spec.n_stages
        chosen = set(self.selected())
        everyone = tuple(range(T))
        stages = [tuple((t,) for t in range(T)) if s in chosen else (everyone,) for s in range(L)]
        meta = {
            "S": float(self.options.S),
            "steps": self.steps_seen,
            "scores": {str(th): self.scores(th) for th in self.thresholds},
            "ranking": [f"stage{s}" for s in self.ranking()],
            "task_specific": [f"stage{s}" for s in sorted(chosen)],
        }
        tree = Tree(self.spec.tasks, tuple(stages), method=self.name, meta=meta)
        return self.finish(tree, {"conflicts_at_S": self.scores(), "ranking": meta["ranking"]})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "counts": {k: v.cpu() for k, v in self.counts.items()},
                "steps_seen": self.steps_seen}

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        self.counts = dict(d.get("counts", {}))
        self.steps_seen = int(d.get("steps_seen", 0))
