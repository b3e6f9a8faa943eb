"""E independent copies of one derived trunk, run as a single Trunk over E x T "tasks".

SAC's twin critics are an ensemble of two networks with one architecture. While an
architecture is searched, the method's network holds them as
:class:`~mtrl_arch.trunk.EnsembleBank` stages (the member folded into each call's rows,
invisible to the method). That layout costs two copies of every hidden activation per
stage (to member-major rows and back), in the forward and again in the backward pass:
about a tenth of a SAC update on a 2-core CPU (``mtrl-arch bench sac-update``).

For the fixed trunk that is trained after deriving, the members become extra tasks of
one tree instead: member e's copy of task t is task ``e*T + t`` and uses member e's copy
of every module. The input is laid out member-major, ``[E*T, B, ...]``, once; a shared
module is then one bmm over ``[E, T*B]`` rows and a task-specific one a bmm over
``[E*T, B]``, with no copies between stages.

The parameters are laid out as EnsembleBank lays them out (module m of member e at row
``e*n + m`` of a bank, member e's head of task t at ``e*T + t``), so the two networks are
interchangeable weight for weight (their state-dict keys differ by EnsembleBank's
``inner.``). Everything that acts on shared modules (gradient combination, the
conflict-noticed operation, Recon's statistics) sees the T-task groups of the original
tree: one group per original module spanning its E copies, per-task gradients recorded
against task ``t mod T``.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mtrl_arch.tree import Tree
from mtrl_arch.trunk import ParamGroup, StageFactory, Trunk, _Plan


def member_tree(tree: Tree, ensemble: int) -> Tree:
    """The tree over ``ensemble * T`` tasks in which every member has its own copy of each module."""
    T = tree.n_tasks
    return Tree(tuple(f"{name}#{e}" for e in range(ensemble) for name in tree.tasks),
                tuple(tuple(tuple(t + e * T for t in g) for e in range(ensemble) for g in groups) for groups in tree.stages),
                method=tree.method, meta=tree.meta)


class EnsembleTrunk(Trunk):
    """``ensemble`` copies of ``Trunk(tree, stages, heads)``: ``[T, B, ...] -> [E, T, B, ...]``.

    ``stages`` and ``heads`` are the plain (single-member) factories.
    """

    ensemble_members = True  # the critic reads this: inputs [T, B, ...], outputs [E, T, B, ...]

    def __init__(self, tree: Tree, stages: Sequence[StageFactory], heads: StageFactory | None, ensemble: int):
        super().__init__(member_tree(tree, ensemble), stages, heads)
        self.base_tree, self.ensemble = tree, ensemble

    def plan(self, shared_input: bool) -> _Plan:
        fresh = shared_input not in self._plans
        p = super().plan(shared_input)
        if fresh:  # per-task gradients belong to the original task, whichever member computed them
            T = self.base_tree.n_tasks
            p.shared_call_tasks = [[None if t is None else t % T for t in calls] for calls in p.shared_call_tasks]
        return p

    def forward(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        E = self.ensemble
        if shared_input:
            y = super().forward(x, True, aux)
        else:
            def rep(t: Tensor) -> Tensor:
                return t.unsqueeze(0).expand(E, *t.shape).reshape(E * t.shape[0], *t.shape[1:])

            y = super().forward(rep(x), False, None if aux is None else rep(aux))
        return y.reshape(E, -1, *y.shape[1:])

    def shared_groups(self) -> list[ParamGroup]:
        """One group per module of the original tree used by two or more tasks, over its E copies."""
        T, E = self.base_tree.n_tasks, self.ensemble
        out = []
        for s, groups in enumerate(self.base_tree.stages):
            shared = [g for g in groups if len(g) > 1]
            for m, g in enumerate(shared):
                out.append(ParamGroup(f"stage{s}" + (f".g{m}" if len(g) < T else ""), list(self.shared[s].parameters()),
                                      [e * len(shared) + m for e in range(E)], g))
        return out

    def param_counts(self) -> dict[str, int]:
        """As :meth:`Trunk.param_counts` of the original tree, every module counted with its E copies."""
        tree = self.base_tree
        counts = {"shared": 0, "subgroup": 0, "specific": 0, "heads": 0}
        for s, groups in enumerate(tree.stages):
            shared = [g for g in groups if len(g) > 1]
            if shared:
                per_module = sum(p.numel() for p in self.shared[s].parameters()) // len(shared)
                for g in shared:
                    counts[tree.kind(g)] += per_module
            counts["specific"] += sum(p.numel() for p in self.specific[s].parameters())
        if self.heads is not None:
            counts["heads"] = sum(p.numel() for p in self.heads.parameters())
        counts["total"] = sum(counts.values())
        return counts
