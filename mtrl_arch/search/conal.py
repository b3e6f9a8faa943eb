"""CoNAL: conflict-noticed architecture learning (Yue et al., "Learning Conflict-Noticed
Architecture for Multi-Task Learning", AAAI 2023).

Search space (as in the authors' released NYUv2 code): an all-shared trunk of L stages
and, for every task, one purely-specific copy of every stage. Task t has architecture
weights alpha_t over L+1 branch points; branch point b means "shared stages 0..b-1, then
my own stages b..L-1" (b = 0 fully task-specific, b = L hard sharing)::

    z_t = sum_{b<L} a_t^b * P_t^{b..L-1}(x_b) + a_t^L * x_L,    a_t = softmax(alpha_t)

where x_b is the shared trunk's output after b stages. Each task's private copy of a
stage is reused by every branch point, so private stage s runs on the (s+1) branches
that reach it, batched over tasks and branches in one call. ``gumbel=True`` samples
a_t with hard Gumbel-softmax (straight-through) at temperature ``tau``.

Search alternates a weight step on training data with an alpha step on held-out data
(first-order bilevel). Defaults from the released code: alpha Adam lr 5e-5, weight decay
1e-5, alphas initialised equal. (Weights: Adam 1e-4, weight decay 1e-5, clip 5; those
are training settings in the configs.) The conflict-noticed operation is the training
loop's ``arch.conflict_noticed`` switch acting on ``shared_groups()``: here one group per
shared stage, used by every task. Derive: a branch point per task (the rule below), drop
the unused modules, retrain from scratch.

Derive rules (``arch.derive``, ``arch.max_params``; p_t = softmax(alpha_t) over b = 0..L):

* argmax (the paper's): b_t = argmax_b p_t[b], ties to the more shared (larger) b.
* margin M: b_t is the smallest b with p_t[b] > max_{b'>b} p_t[b'] and
  p_t[b] - max_{b'>b} p_t[b'] >= M, or L (full sharing) if no b qualifies. Read as a walk
  from L towards 0: a task moves to a less shared branch point only if it beats every more
  shared candidate by at least M. M = 0 gives argmax (ties to the more shared).
* max_params N: the argmax branch points if their trunk fits N; otherwise the branch points
  maximising sum_t log p_t[b_t] subject to trunk parameters <= N (ties: fewer parameters),
  found exactly: the trunk costs sum_{s<D} P_s + sum_t sum_{s>=b_t} P_s with D = max_t b_t
  (P_s: one module of stage s), so for each D = 0..L a multiple-choice knapsack over tasks
  with b_t <= D is solved exactly (:func:`~.derive.best_within`); counting the trunk up to D
  when every b_t < D only overstates the cost of an assignment that is also counted
  exactly at its own D, so the best over D is the optimum. Full sharing is the smallest
  tree; a budget below it is refused when the method is made.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..tree import Tree
from ..trunk import ParamGroup, call_bank, module_rows
from .base import ArchMethod, Phase, TrunkSpec
from .derive import best_within, margin_choice


@dataclass
class ConalOptions:
    lr: float = 5e-5            # architecture optimiser (Adam) learning rate
    weight_decay: float = 1e-5  # architecture optimiser weight decay
    gumbel: bool = False        # hard Gumbel-softmax over branch points instead of softmax
    tau: float = 1.0            # Gumbel temperature
    arch_every: int = 1         # one alpha step every N weight steps


def _per_task(h: Tensor, T: int) -> Tensor:
    return h.expand(T, *h.shape[1:]) if h.shape[0] == 1 and T > 1 else h


class ConalNet(nn.Module):
    def __init__(self, spec: TrunkSpec, gumbel: bool = False, tau: float = 1.0):
        super().__init__()
        T, L = spec.n_tasks, spec.n_stages
        self.n_tasks, self.n_stages, self.gumbel, self.tau = T, L, gumbel, tau
        self.shared = nn.ModuleList(f(1) for f in spec.stages)
        self.private = nn.ModuleList(f(T) for f in spec.stages)
        self.heads = spec.heads(T) if spec.heads is not None else None
        self.alpha = nn.Parameter(torch.zeros(T, L + 1))
        self.capture_requested = False
        self.captured_ok = False

    def branch_weights(self) -> Tensor:
        if self.gumbel and self.training:
            return F.gumbel_softmax(self.alpha, tau=self.tau, hard=True)
        return self.alpha.softmax(-1)

    def features(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        T, L = self.n_tasks, self.n_stages
        h = x.unsqueeze(0) if shared_input else x
        a = None if aux is None else (aux.unsqueeze(0) if shared_input else aux)
        # ensemble banks (SAC's twin critics) keep each member's rows in one block of the
        # batch dim, so branches are stacked inside each member's block, never across members
        E = getattr(self.private[0], "ensemble", 1)
        b = h.shape[1] // E
        capture = self.capture_requested and not shared_input
        self.captured_ok = capture
        trunk = [h]
        for s in range(L):
            h = call_bank(self.shared[s], h, [0] * h.shape[0], a, list(range(T)) if capture else None)
            trunk.append(h)

        def members(t: Tensor, n: int = 1) -> Tensor:  # [T, E*n*b, ...] -> [T, E, n*b, ...]
            return t.reshape(T, E, n * b, *t.shape[2:])

        # private stage s runs on branches 0..s (branch s enters here from the trunk)
        tasks = list(range(T))
        p = None
        for s in range(L):
            enter = _per_task(trunk[s], T)
            inp = enter if p is None else torch.cat([members(p, s), members(enter)], 2).flatten(1, 2)
            a_in = None
            if a is not None:
                ma = members(_per_task(a, T)).unsqueeze(2)
                a_in = ma.expand(T, E, s + 1, *ma.shape[3:]).reshape(T, E * (s + 1) * b, *ma.shape[4:])
            p = self.private[s](inp, tasks, a_in)
        p = p.reshape(T, E, L, b, *p.shape[2:]).transpose(1, 2).reshape(T, L, E * b, *p.shape[2:])
        paths = torch.cat([p, _per_task(trunk[L], T).unsqueeze(1)], 1)
        w = self.branch_weights().to(paths.dtype)
        return (w.view(T, L + 1, *([1] * (paths.dim() - 2))) * paths).sum(1)

    def forward(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        z = self.features(x, shared_input, aux)
        return self.heads(z, list(range(self.n_tasks))) if self.heads is not None else z

    def shared_groups(self) -> list[ParamGroup]:
        return [ParamGroup(f"stage{s}", list(self.shared[s].parameters()), module_rows(self.shared[s], 0), range(self.n_tasks))
                for s in range(self.n_stages)]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]


class Conal(ArchMethod):
    name = "conal"
    Options = ConalOptions

    def build(self) -> nn.Module:
        self.net = ConalNet(self.spec, self.options.gumbel, self.options.tau)
        self.make_arch_optimizer(self.options.lr, self.options.weight_decay, betas=(0.9, 0.999))
        return self.net

    def phase(self, step: int) -> Phase:
        return Phase(weights=True, arch=step % self.options.arch_every == 0)

    def branch_points(self) -> list[int]:
        """Per task, the branch point the derive rule picks (see the module docstring)."""
        alpha = self.net.alpha.detach()
        L = alpha.shape[1] - 1
        rule = self.derive_rule
        if rule.rule == "margin":
            probs = alpha.double().softmax(-1).cpu()
            return [margin_choice(probs[t].tolist(), rule.margin) for t in range(alpha.shape[0])]
        # argmax with ties to the more shared (later) branch point
        best = [int(L - torch.argmax(alpha[t].flip(0))) for t in range(alpha.shape[0])]
        self.budget_binding = bool(rule.max_params) and self.trunk_params(best) > rule.max_params
        return self.budget_branch_points(rule.max_params) if self.budget_binding else best

    def trunk_params(self, branch: list[int]) -> int:
        """Trunk parameters of the tree with these branch points: the shared stages once, the rest per task."""
        P = self.sizes()
        return sum(P[s] * (int(max(branch) > s) + sum(b <= s for b in branch)) for s in range(len(P)))

    def budget_branch_points(self, budget: int) -> list[int]:
        """The branch points with the highest sum of log-probabilities whose trunk fits ``budget`` (exact)."""
        logp = self.net.alpha.detach().double().log_softmax(-1).cpu().tolist()
        P, L = self.sizes(), self.spec.n_stages
        private = [sum(P[b:]) for b in range(L + 1)]  # one task's own modules from branch point b on
        best = None
        for D in range(L + 1):  # trunk stages 0..D-1 exist
            found = best_within([[(private[b], lp[b]) for b in range(D + 1)] for lp in logp], budget - sum(P[:D]))
            if found is not None:
                key = (found[1], -self.trunk_params(found[0]))
                if best is None or key > best[0]:
                    best = (key, found[0])
        if best is None:  # cannot happen once make_method checked full sharing fits
            raise ConfigError(self._too_small(budget, self.min_params()))
        return best[1]

    def arch_values(self) -> dict[str, float]:
        """p_t(b) per task and branch point (``b{L}``: fully shared)."""
        if self.net is None or not isinstance(self.net, ConalNet):
            return {}
        probs = self.net.alpha.detach().double().softmax(-1).cpu().tolist()
        return {f"arch/{self.spec.name}/{t}/b{b}": p for t, row in zip(self.spec.tasks, probs) for b, p in enumerate(row)}

    def derive(self) -> Tree:
        probs = self.net.alpha.detach().softmax(-1).cpu()
        tree = Tree.from_branch_points(
            self.spec.tasks, self.spec.n_stages, self.branch_points(), method=self.name,
            meta={"branch_probs": {n: [round(float(v), 4) for v in probs[t]] for t, n in enumerate(self.spec.tasks)}},
        )
        exact = self.net.alpha.detach().double().softmax(-1).cpu()
        extra = {"budget_binding": self.budget_binding} if self.derive_rule.max_params else {}
        return self.finish(tree, {"branch_probs": {n: [round(float(v), 6) for v in exact[t]]
                                                   for t, n in enumerate(self.spec.tasks)}}, **extra)
