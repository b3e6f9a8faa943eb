"""Learning to Branch (Guo, Lee, Ulbricht, "Learning to Branch for Multi-Task Learning", ICML
2020), following LibMTL's ``architecture/LTB.py``.

Algorithm implemented:

* Search network: every stage holds T nodes (modules). Stage-0 nodes all read the input.
  Node j of stage s >= 1 reads ``sum_k w[s-1, j, k] * node_k(stage s-1)``, and task t's
  head reads ``sum_k w[L-1, t, k] * node_k(stage L-1)``: a parent choice per level, so
  ``alpha`` has shape ``(L, T, T)`` (levels x children x parents), initialised to ones.
* Warm-up: while ``epoch < epochs / 100`` every ``w`` is all ones (each node takes the sum
  of all its parents' outputs, as LibMTL). After it, ``w`` is a hard Gumbel-softmax sample
  of ``alpha`` (straight-through) at ``tau = (epochs / 20) / sqrt(epoch + 1)``. Steps become
  LibMTL's epochs through ``epoch = step * epochs // total_steps`` (``epochs`` virtual epochs
  over the ``total_steps`` of the search), so with the default 100 epochs the warm-up is the
  first 1% of steps and tau falls from 5 to 0.5 as in a 100-epoch LibMTL run. In eval mode
  the argmax parents are used.
* ``alpha`` is trained jointly with the weights by the same optimiser on the training loss
  (no bilevel split, as LibMTL): the search network's ``arch_parameters()`` is empty, so
  the loop's weight optimiser (which takes every parameter that is not an architecture
  parameter) owns alpha, and ``phase`` never asks for an architecture step.
* Derive (the paper's, not LibMTL's, which keeps sampling at test time): each head's argmax
  parent, that node's argmax parent, and so on down to stage 0, gives each task a path of
  nodes. Nodes on no path are dropped; a node on the paths of several tasks becomes a module
  shared by them (all-shared or sub-group). Ties go to the lower node index. The loop
  retrains the derived tree from scratch.
* Derive rules: argmax only. A parent choice is not a choice between sharing and not
  sharing (whether two tasks share a node depends on every level's choices of both), so
  ``arch.derive=margin`` has no "more private" side to compare, and a parameter budget
  would need a search over joint path assignments that LTB's scores do not define; both
  are refused with a one-line ConfigError.

Departures: LibMTL's last encoder layer is fixed per task (its decoder reads node t); here
the heads choose a parent too (the paper's tree has the task heads as leaves), so the
last stage can be shared as well, and ``alpha`` has L rather than L-1 used levels. With
per-task inputs (``shared_input=False``) every node runs on every task's stream (T x T
calls per stage, one batched op), because any task may route through any node.
``shared_groups()`` is empty during the search: no module is statically shared while
parents are resampled every step, so the conflict-noticed operation does not act on LTB's
search network (it acts on the derived tree when retrained).

Known behaviour: trained on the training loss alone, a node chosen by more children gets
more gradient, becomes the better parent and is chosen more; with every node of a level
starting from the same weights the early levels collapse onto one node. On
:class:`~mtrl_arch.synthetic.ConflictProblem` every task's path goes through one stage-0
node, so LTB shares the conflicting stage (tests/test_search_methods.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tree import Tree
from ..trunk import ParamGroup
from .base import ArchMethod, Phase, TrunkSpec


@dataclass
class LTBOptions:
    total_steps: int = 10000   # length of the search in steps (maps steps onto epochs)
    epochs: int = 100          # virtual epochs the schedule of LibMTL is written in

    def __post_init__(self):  # checked when the config is (validate parses the options), not at build time
        if self.total_steps < 1 or self.epochs < 1:
            raise ValueError("arch.options.total_steps and arch.options.epochs must be >= 1")


class LTBNet(nn.Module):
    def __init__(self, spec: TrunkSpec):
        super().__init__()
        T, L = spec.n_tasks, spec.n_stages
        self.n_tasks, self.n_stages = T, L
        self.nodes = nn.ModuleList(f(T) for f in spec.stages)
        self.heads = spec.heads(T) if spec.heads is not None else None
        self.alpha = nn.Parameter(torch.ones(L, T, T))
        self.tau = 1.0
        self.warm = True  # set by the method's schedule

    def level_weights(self) -> Tensor:
        """[L, T, T] parent weights for this forward pass."""
        if self.warm:
            return torch.ones_like(self.alpha)
        if self.training:
            return F.gumbel_softmax(self.alpha, tau=self.tau, hard=True, dim=-1)
        return F.one_hot(self.alpha.argmax(-1), self.n_tasks).to(self.alpha.dtype)

    def features(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        T = self.n_tasks
        h = x.unsqueeze(0) if shared_input else x          # [S, B, ...] input streams
        S = h.shape[0]
        a = None if aux is None else (aux.unsqueeze(0) if shared_input else aux)
        # every node runs on every stream: call (node j, stream u) is row j*S + u; the batch
        # dimension is left alone (ensemble banks lay their members out along it)
        idx = [j for j in range(T) for _ in range(S)]
        a_calls = None if a is None else a.repeat(T, *([1] * (a.dim() - 1)))
        w = self.level_weights().to(x.dtype)
        rep = self.nodes[0](h.repeat(T, *([1] * (h.dim() - 1))), idx, a_calls)
        rep = rep.view(T, S, *rep.shape[1:])                # [nodes, streams, B, ...]
        for s in range(1, self.n_stages):
            mixed = torch.einsum("jk,k...->j...", w[s - 1], rep)
            rep = self.nodes[s](mixed.reshape(T * S, *mixed.shape[2:]), idx, a_calls)
            rep = rep.view(T, S, *rep.shape[1:])
        if S == 1:
            return torch.einsum("tk,k...->t...", w[-1], rep[:, 0])
        return torch.einsum("tk,kt...->t...", w[-1], rep)   # task t reads its own stream

    def forward(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        z = self.features(x, shared_input, aux)
        return self.heads(z, list(range(self.n_tasks))) if self.heads is not None else z

    def shared_groups(self) -> list[ParamGroup]:
        return []

    def arch_parameters(self) -> list[nn.Parameter]:
        return []  # alpha is trained by the weight optimiser, as in LibMTL


class LTB(ArchMethod):
    name = "ltb"
    Options = LTBOptions
    derive_rules = ()  # argmax only, see the module docstring

    # ---- schedule (pure functions of the step) -------------------------------------------------
    def epoch_at(self, step: int) -> int:
        o = self.options
        return min(step, o.total_steps - 1) * o.epochs // o.total_steps

    def warm_at(self, step: int) -> bool:
        return self.epoch_at(step) < self.options.epochs / 100

    def tau_at(self, step: int) -> float:
        return (self.options.epochs / 20) / math.sqrt(self.epoch_at(step) + 1)

    def apply_schedule(self, step: int) -> None:
        self.net.warm = self.warm_at(step)
        self.net.tau = self.tau_at(step)

    # ---- interface --------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        self.net = LTBNet(self.spec)
        self.apply_schedule(0)
        return self.net

    def phase(self, step: int) -> Phase:
        return Phase(weights=True, arch=False)

    def on_step(self, step: int) -> None:
        self.apply_schedule(step + 1)

    def paths(self) -> list[list[int]]:
        """Per task, its node at every stage (argmax parents from the head down)."""
        parent = self.net.alpha.detach().argmax(-1).cpu()  # [L, T]: chosen parent of each child
        L = self.spec.n_stages
        out = []
        for t in range(self.spec.n_tasks):
            node = int(parent[L - 1, t])
            path = [node]
            for s in range(L - 1, 0, -1):
                node = int(parent[s - 1, node])
                path.append(node)
            out.append(path[::-1])
        return out

    def derive(self) -> Tree:
        paths = self.paths()
        T, L = self.spec.n_tasks, self.spec.n_stages
        stages = []
        for s in range(L):
            by_node: dict[int, list[int]] = {}
            for t in range(T):
                by_node.setdefault(paths[t][s], []).append(t)
            stages.append(tuple(tuple(by_node[n]) for n in sorted(by_node)))
        probs = self.net.alpha.detach().softmax(-1).cpu()
        meta = {"paths": {n: paths[t] for t, n in enumerate(self.spec.tasks)},
                "parent_probs": [[[round(float(v), 4) for v in row] for row in lvl] for lvl in probs]}
        tree = Tree(self.spec.tasks, tuple(stages), method=self.name, meta=meta)
        return self.finish(tree, {"paths": meta["paths"]})
