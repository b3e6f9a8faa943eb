"""A random tree: the control a searched tree of the same size must beat (nothing is searched).

``arch.method=random`` draws one tree, uniformly, from a search method's space, among the
trees whose *trunk* (shared + subgroup + specific modules, heads not counted, as
:meth:`ArchMethod.finish` counts for ``arch.max_params``) has between ``arch.min_params``
and ``arch.max_params`` parameters (0: no bound). The control for a searched tree of S
trunk parameters is a random tree within, say, ``arch.min_params=0.9S arch.max_params=S``.
The draw comes from ``random.Random(seed)`` with the run's seed: the same seed gives the
same tree, and ``train --dry-run`` shows it. ``arch.json`` records the space, the band, how
many trees were admissible and the counts (``Tree.derive``). A band no tree of the space
meets is refused when the method is made, with one line.

Spaces (``arch.options.space``):

* ``conal`` (default): CoNAL's. Every task leaves the all-shared trunk at a branch point
  b_t in 0..L (0: fully task-specific, L: hard sharing). Trees, not branch-point vectors,
  are drawn uniformly: a task that alone is still in the "shared" trunk at stage s has a
  module of its own there, so its vector and the one where it leaves with the last other
  task build the same network. Counting both would favour the trees that have such a lone
  task; the draw is over distinct networks, the thing the control compares. Each tree is
  named by its canonical vector, the one whose largest branch point D is held by two or
  more tasks (or D = 0), from which the tree gives the vector back (b_t = the number of
  stages task t shares with another); every vector maps to one (lower a lone largest
  branch point to the next largest). The trunk of a canonical vector costs
  ``sum_{s<D} P_s + sum_t sum_{s>=b_t} P_s`` (P_s: one module of stage s). Tasks are
  exchangeable in the cost, so the admissible trees are counted by composition
  (n_0..n_L tasks per branch point, each worth its multinomial number of vectors, exact
  integers): C(T+L, L) compositions, not (L+1)^T vectors (MT50 with 3 stages: 23,426).
  A draw picks a composition with probability proportional to its admissible vectors,
  then a uniformly random assignment of its branch points to the tasks: exactly uniform.
* ``recon``: Recon's. A subset of the stages is turned task-specific (one module per
  task), the others stay all-shared; 2^L trees, each costing
  ``sum_s P_s + (T-1) sum_{s in S} P_s``, enumerated.

Spaces too large to count this way (over 500,000 compositions, e.g. 40 tasks over 10 stages, or
2^L subsets past that) are refused with one line. In ``arch.json`` the band is ``[min_params,
max_params]``, 0 meaning unbounded.

With one task every tree of a space is the same network (every module is the task's own),
so each space holds one tree. Derive rules: ``arch.max_params``/``arch.min_params`` bound the
draw; ``arch.derive=margin`` changes nothing (accepted, as for hps and stl).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

from ..errors import ConfigError
from ..tree import Tree
from .base import ArchMethod, Phase, TrunkSpec

SPACES = ("conal", "recon")
MAX_ENUMERATED = 500_000  # compositions (conal) or subsets (recon): about 10 s of counting on a busy CPU


@dataclass
class RandomOptions:
    space: Literal["conal", "recon"] = "conal"  # whose tree space to draw from: CoNAL's branch points or Recon's stages


class Band:
    """Trunk parameter bounds [lo, hi]; hi = 0 means no upper bound."""

    def __init__(self, lo: int = 0, hi: int = 0):
        self.lo, self.hi = int(lo), int(hi)

    def __contains__(self, cost: int) -> bool:
        return cost >= self.lo and (not self.hi or cost <= self.hi)

    def __str__(self) -> str:
        return f"[{self.lo}, {self.hi or 'inf'}]"


class ConalSpace:
    """CoNAL's trees for ``n_tasks`` tasks over stages of ``sizes`` parameters (see the module docstring)."""

    name = "conal"

    def __init__(self, n_tasks: int, sizes: Sequence[int]):
        self.T, self.P, self.L = n_tasks, [int(p) for p in sizes], len(sizes)
        self.private = [sum(self.P[b:]) for b in range(self.L + 1)]  # one task's own modules from branch point b on
        self._memo: dict[tuple[int, int], list[tuple[tuple[int, ...], int]]] = {}
        n = math.comb(self.T + self.L, self.L)
        if n > MAX_ENUMERATED:
            raise ConfigError(f"arch.method=random: CoNAL's space of {self.T} tasks and {self.L} stages has {n} "
                              f"branch-point compositions, too many to count exactly; use arch.options.space=recon")

    def cost(self, branch: Sequence[int]) -> int:
        """Trunk parameters of a canonical vector (its largest branch point shared by two tasks, or 0)."""
        D = max(branch)
        return sum(self.P[:D]) + sum(self.private[b] for b in branch)

    def _compositions(self) -> Iterator[tuple[int, ...]]:
        """Tasks per branch point (n_0..n_L), canonical ones only: the largest used point held by >= 2 tasks, or 0."""
        if self.T == 1:
            yield (1,) + (0,) * self.L
            return
        for cut in itertools.combinations(range(self.T + self.L), self.L):  # stars and bars
            n = [b - a - 1 for a, b in zip((-1,) + cut, cut + (self.T + self.L,))]
            D = max(b for b in range(self.L + 1) if n[b])
            if D == 0 or n[D] >= 2:
                yield tuple(n)

    def _weighted(self, band: Band) -> list[tuple[tuple[int, ...], int]]:
        """The admissible compositions, each with its number of vectors (= trees: canonical vectors only)."""
        if (band.lo, band.hi) in self._memo:
            return self._memo[band.lo, band.hi]
        out = []
        for n in self._compositions():
            D = max(b for b in range(self.L + 1) if n[b])
            cost = sum(self.P[:D]) + sum(k * self.private[b] for b, k in enumerate(n))
            if cost in band:
                out.append((n, math.factorial(self.T) // math.prod(math.factorial(k) for k in n)))
        self._memo[band.lo, band.hi] = out
        return out

    def count(self, band: Band) -> int:
        return sum(w for _, w in self._weighted(band))

    def draw(self, rng: random.Random, band: Band) -> list[int] | None:
        """A uniformly drawn admissible tree's branch points, or None when none is admissible."""
        weighted = self._weighted(band)
        total = sum(w for _, w in weighted)
        if not total:
            return None
        r = rng.randrange(total)  # exact for any size (Python integers)
        for n, w in weighted:
            if r < w:
                points = [b for b, k in enumerate(n) for _ in range(k)]
                rng.shuffle(points)  # every assignment of this multiset to the tasks equally likely
                return points
            r -= w
        raise AssertionError("unreachable: r < total")

    def tree(self, points: Sequence[int], tasks: Sequence[str], method: str) -> Tree:
        return Tree.from_branch_points(tasks, self.L, points, method=method, meta={"branch_points": list(points)})


class ReconSpace:
    """Recon's trees: which stages are task-specific (the rest all-shared)."""

    name = "recon"

    def __init__(self, n_tasks: int, sizes: Sequence[int]):
        self.T, self.P, self.L = n_tasks, [int(p) for p in sizes], len(sizes)
        if 2 ** self.L > MAX_ENUMERATED:
            raise ConfigError(f"arch.method=random: Recon's space of {self.L} stages has 2^{self.L} trees, too many to "
                              "enumerate; use arch.options.space=conal")

    def cost(self, specific: Sequence[int]) -> int:
        return sum(self.P) + (self.T - 1) * sum(self.P[s] for s in specific)

    def _subsets(self, band: Band) -> list[tuple[int, ...]]:
        subsets = [()] if self.T == 1 else [c for k in range(self.L + 1) for c in itertools.combinations(range(self.L), k)]
        return [c for c in subsets if self.cost(c) in band]

    def count(self, band: Band) -> int:
        return len(self._subsets(band))

    def draw(self, rng: random.Random, band: Band) -> list[int] | None:
        subsets = self._subsets(band)
        return list(subsets[rng.randrange(len(subsets))]) if subsets else None

    def tree(self, specific: Sequence[int], tasks: Sequence[str], method: str) -> Tree:
        everyone, singles = tuple(range(len(tasks))), tuple((t,) for t in range(len(tasks)))
        stages = tuple(singles if s in specific else (everyone,) for s in range(self.L))
        return Tree(tuple(tasks), stages, method=method, meta={"task_specific": [f"stage{s}" for s in specific]})


class RandomArch(ArchMethod):
    name = "random"
    Options = RandomOptions
    searches = False
    derive_rules = ("margin", "max_params", "min_params")

    def __init__(self, spec: TrunkSpec, options=None, seed: int = 0):
        super().__init__(spec, options, seed)
        self._drawn: Tree | None = None
        self._space: ConalSpace | ReconSpace | None = None

    def space(self) -> ConalSpace | ReconSpace:
        if self._space is None:  # made once: it remembers its counts
            cls = ConalSpace if self.options.space == "conal" else ReconSpace
            self._space = cls(self.spec.n_tasks, self.sizes())
        return self._space

    def band(self) -> Band:
        return Band(self.derive_rule.min_params, self.derive_rule.max_params)

    def phase(self, step: int) -> Phase:
        return Phase(weights=True, arch=False)

    def set_derive_rule(self, rule) -> None:
        """Refuse (one line) a band that no tree of the space meets, when the method is made."""
        self.check_derive_rule(rule)
        self.derive_rule, self._drawn = rule, None
        if not self.space().count(self.band()):
            raise ConfigError(
                f"arch.method=random: no tree of the {self.options.space} space for the {self.spec.name} network has a "
                f"trunk within arch.min_params={rule.min_params} .. arch.max_params={rule.max_params or 'inf'} (its trunks range from "
                f"{self._extreme(min)} to {self._extreme(max)} parameters); widen the band")

    def _extreme(self, pick) -> int:
        sp = self.space()
        trees = ([[0] * sp.T, [sp.L] * sp.T] if isinstance(sp, ConalSpace) else [[], list(range(sp.L))])
        return pick(sp.cost(t) for t in trees)

    def derive(self) -> Tree:
        """The drawn tree (drawn once per method, from the run's seed)."""
        if self._drawn is None:
            sp, band = self.space(), self.band()
            choice = sp.draw(random.Random(self.seed), band)
            tree = sp.tree(choice, self.spec.tasks, self.name)
            self._drawn = self.finish(tree, None, space=sp.name, band=[band.lo, band.hi], admissible=sp.count(band),
                                      seed=self.seed)
        return self._drawn
