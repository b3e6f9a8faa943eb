"""Width matching: HPS made wider or STL made narrower to a parameter count (``model.match_params=N``).

A searched tree's parameter saving means something only against the obvious controls of the
same size, and one is a fixed tree (hps, stl, a manual tree) at the width whose *trunk*
(shared + subgroup + specific modules, heads not counted, as ``arch.max_params`` counts) is
closest to N. The backbone says what its width is (an MLP's hidden width, LeNet's channel
multiplier, a transformer's d_model in multiples of its heads) through ``spec_for(width)``;
this module only counts and searches. Counting builds the stages on PyTorch's meta device
(shapes without memory or random draws), so a probe of a wide network costs nothing.

The trunk grows with the width for every backbone here (each layer's size is non-decreasing
in it), so the search doubles the width until the trunk reaches N, bisects for the first width
at or above N, and compares it with the one before: the closest, ties to the smaller.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from .base import TrunkSpec

MAX_WIDTH_STEPS = 1 << 20  # the widest probe, in multiples of the width step


def fixed_trunk_params(method: str, spec: TrunkSpec, options: dict | None = None, seed: int = 0) -> int:
    """Trunk parameters of the tree a non-searching method gives ``spec`` (no budget applied)."""
    from . import get_method, make_method  # the registry imports this package's modules

    cls = get_method(method)
    if cls.searches or method == "random":
        why = "searches" if cls.searches else "draws its tree by the trunk's size"
        raise ConfigError(f"model.match_params needs a tree known before training (arch.method=hps, stl or manual); "
                          f"arch.method={method} {why}")
    with torch.device("meta"):
        return int(make_method(method, spec, options, seed).derive().derive["params"]["trunk"])


def match_width(trunk_params: Callable[[float], int], target: int, key: str, step: float = 1) -> tuple[float, int]:
    """The multiple of ``step`` whose ``trunk_params`` is closest to ``target`` (ties: the smaller width) and its
    count; ``key`` names the width in errors. ``trunk_params`` must be non-decreasing in the width."""
    if target <= 0:
        raise ConfigError(f"the parameter target must be positive; got {target}")
    memo: dict[int, int] = {}

    def count(k: int) -> int:
        if k not in memo:
            memo[k] = int(trunk_params(k * step))
        return memo[k]

    hi = 1
    while count(hi) < target:
        if hi >= MAX_WIDTH_STEPS:
            raise ConfigError(f"no {key} up to {hi * step} reaches a trunk of {target} parameters (that width has "
                              f"{count(hi)}); lower the target")
        hi *= 2
    lo = hi // 2  # count(lo) < target <= count(hi), or lo = 0 when the narrowest width already reaches it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    best = hi if lo == 0 or abs(count(hi) - target) < abs(target - count(lo)) else lo
    width = best * step
    return (round(width, 6) if isinstance(step, float) else width), count(best)  # 0.30000000000000004 -> 0.3
