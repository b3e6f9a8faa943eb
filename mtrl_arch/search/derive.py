"""Derive rules: how a method reads its final tree off its architecture weights.

``arch.derive=argmax`` (the papers' rule, the default), ``arch.derive=margin`` with
``arch.derive_margin=M`` (a task leaves sharing only where the more private choice wins by
a probability margin of at least M), and ``arch.max_params=N`` (the best tree by the
search's own scores whose *trunk* has at most N parameters; ``arch.min_params=M``, a lower bound,
only for ``arch.method=random``, which draws its tree within [M, N]). The trunk count is what
:meth:`~mtrl_arch.tree.Tree.param_counts` and ``Trunk.param_counts`` call shared +
subgroup + specific; heads are not counted (every tree has the same heads). Each method
says which rules it supports (``ArchMethod.derive_rules``) and documents how it applies them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError

RULES = ("argmax", "margin")


@dataclass(frozen=True)
class DeriveRule:
    rule: str = "argmax"    # argmax | margin
    margin: float = 0.1     # rule=margin: the probability by which the more private choice must win
    max_params: int = 0     # > 0: a trunk parameter budget (rule must be argmax)
    min_params: int = 0     # > 0: the trunk's lower bound (arch.method=random draws within [min_params, max_params])

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"arch.derive must be one of {', '.join(RULES)}; got {self.rule!r}")
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"arch.derive_margin must be in [0, 1); got {self.margin}")
        if self.max_params < 0:
            raise ConfigError(f"arch.max_params must be >= 0 (0: no budget); got {self.max_params}")
        if self.min_params < 0:
            raise ConfigError(f"arch.min_params must be >= 0 (0: no lower bound); got {self.min_params}")
        if self.max_params and self.min_params > self.max_params:
            raise ConfigError(f"arch.min_params={self.min_params} exceeds arch.max_params={self.max_params}; "
                              "set arch.min_params <= arch.max_params")
        if self.max_params and self.rule != "argmax":
            raise ConfigError("arch.max_params needs arch.derive=argmax (a budget picks the best-scoring tree "
                              f"that fits; it does not combine with arch.derive={self.rule})")

    @classmethod
    def of(cls, x: Any = None) -> "DeriveRule":
        """A rule from None (argmax), a DeriveRule, or anything with the ArchConfig fields (``cfg.arch``)."""
        if x is None or isinstance(x, DeriveRule):
            return x or cls()
        return cls(str(x.derive), float(x.derive_margin), int(x.max_params), int(getattr(x, "min_params", 0)))

    def needs(self) -> list[str]:
        """What a method must support to apply this rule (argmax needs nothing)."""
        return ([self.rule] if self.rule != "argmax" else []) + (["max_params"] if self.max_params else []) \
            + (["min_params"] if self.min_params else [])

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule}
        if self.rule == "margin":
            out["margin"] = self.margin
        out["max_params"] = self.max_params
        if self.min_params:
            out["min_params"] = self.min_params
        return out


def margin_choice(p: Sequence[float], margin: float) -> int:
    """Choices ordered from most private (0) to most shared (last): the least shared choice that
    is strictly more probable than every more shared one, by at least ``margin``; the most shared
    choice when none is. With margin 0 this is argmax with ties going to the more shared choice.
    A win of exactly ``margin`` counts (to 1e-12: 0.5 - 0.4 is below 0.1 in floating point)."""
    choice, best = len(p) - 1, float(p[-1])  # best: the highest probability among more shared choices
    for i in range(len(p) - 2, -1, -1):
        if float(p[i]) > best and float(p[i]) - best >= margin - 1e-12:
            choice = i
        best = max(best, float(p[i]))
    return choice


def best_within(items: Sequence[Sequence[tuple[int, float]]], budget: int) -> tuple[list[int], float, int] | None:
    """Exact multiple-choice knapsack: one ``(cost, score)`` choice per item, the highest total score
    with total cost <= budget (ties: the lower cost). Returns (choice per item, score, cost), or None
    when nothing fits.

    Dynamic programme over items keeping the Pareto frontier {cost: best score so far}; a
    partial choice that costs more without scoring more is dropped, which loses nothing
    because any completion of it completes the cheaper one at least as well.
    """
    frontier: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for choices in items:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for cost, (score, picked) in frontier.items():
            for j, (c, s) in enumerate(choices):
                k = cost + int(c)
                if k > budget:
                    continue
                cand = (score + float(s), picked + (j,))
                if k not in nxt or cand > nxt[k]:  # equal scores: the larger choice tuple, for determinism
                    nxt[k] = cand
        frontier, top = {}, None
        for k in sorted(nxt):
            if top is None or nxt[k][0] > top:
                frontier[k], top = nxt[k], nxt[k][0]
        if not frontier:
            return None
    cost = max(frontier, key=lambda k: (frontier[k][0], -k))
    return list(frontier[cost][1]), frontier[cost][0], cost
