"""The architecture-method interface: build a search network, step it, derive a Tree.

An architecture method is one file in this package with one class deriving from
:class:`ArchMethod`, registered in ``mtrl_arch.search.REGISTRY``. The training loops
only call the methods below, so adding a method never touches a loop:

* ``build()`` -> the search network: ``forward(x, shared_input=False, aux=None)`` gives
  per-task outputs ``[T, B, ...]``; ``shared_groups()`` lists the modules used by two or
  more tasks (what gradient combination and the conflict-noticed operation act on);
  ``arch_parameters()`` lists architecture parameters (kept out of the weight optimiser).
* ``phase(step)`` -> which updates a search step makes (weights on training data,
  architecture on held-out data).
* ``arch_step(val_losses)`` -> one architecture update from per-task validation losses.
* ``on_step(step)`` -> schedules (temperatures, curricula); ``apply_schedule(step)`` restores them on resume.
* ``observe_task_grads(groups, grads, grams)`` when ``wants_task_grads`` (Recon's statistics;
  ``grams``: per group the tasks' Gram matrix, already computed for the conflict statistics).
* ``derive()`` -> the :class:`~mtrl_arch.tree.Tree` that is retrained from scratch, read off
  the architecture weights by ``self.derive_rule`` (a :class:`~.derive.DeriveRule`: argmax,
  margin, parameter budget; ``derive_rules`` lists what the method supports) and passed
  through :meth:`ArchMethod.finish`, which records the rule, its inputs and the tree's
  parameter counts in ``Tree.derive`` (arch.json) and holds the tree to the budget.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..trunk import StageFactory, Trunk
from ..tree import Tree
from .derive import DeriveRule


@dataclass
class TrunkSpec:
    """What every method needs to know about the network it searches over."""

    tasks: tuple[str, ...]
    stages: list[StageFactory]
    heads: StageFactory | None = None
    residual: tuple[bool, ...] | None = None  # which stages keep their input shape (may be skipped)
    name: str = "trunk"  # which network of a run this is (actor, critic, trunk): selects it in an arch.json

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def stage_params(self) -> list[int]:
        """Parameters of one copy of each stage (for closed-form counts)."""
        return [sum(p.numel() for p in f(1).parameters()) for f in self.stages]

    def head_params(self) -> int:
        return 0 if self.heads is None else sum(p.numel() for p in self.heads(1).parameters())


@dataclass
class Phase:
    weights: bool = True
    arch: bool = False


@dataclass
class NoOptions:
    pass


class ArchMethod:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    searches: ClassVar[bool] = True  # False: derive() is known before any training
    wants_task_grads: ClassVar[bool] = False
    derive_rules: ClassVar[tuple[str, ...]] = ("margin", "max_params")  # supported beyond argmax
    derive_rule: DeriveRule = DeriveRule()  # set by make_method / set_derive_rule

    def __init__(self, spec: TrunkSpec, options: Any = None, seed: int = 0):
        self.spec = spec
        self.options = options if options is not None else self.Options()
        self.seed = seed
        self.net: nn.Module | None = None
        self.arch_optimizer: torch.optim.Optimizer | None = None

    # -- to override ------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The network trained during search (for non-searching methods: the final one)."""
        self.net = Trunk(self.derive(), self.spec.stages, self.spec.heads)
        return self.net

    def phase(self, step: int) -> Phase:
        return Phase(weights=True, arch=bool(self.arch_parameters()))

    def on_step(self, step: int) -> None:
        pass

    def apply_schedule(self, step: int) -> None:
        """Put the step schedules (temperatures, curricula) where ``step`` steps leave them: ``on_step(step)``
        applies step + 1's, and a resume applies the steps done, since a method built afresh starts at step 0's
        (without it the first steps after a resume run under the build-time schedule: not an exact resume)."""

    def regularizer(self) -> Tensor | None:
        return None

    def observe_task_grads(self, groups, grads, grams) -> None:
        pass

    def derive(self) -> Tree:
        raise NotImplementedError

    def arch_values(self) -> dict[str, float]:
        """The search's current choice probabilities, logged as ``arch/<network>/<task>/<choice>`` while it runs
        (``mtrl-arch report`` plots their trajectories: did the search settle, or stop at noise?)."""
        return {}

    def min_params(self) -> int | None:
        """The smallest trunk any derivable tree has (None: known only when derived); default: full sharing."""
        return sum(self.sizes())

    # -- shared machinery ----------------------------------------------------------------
    def sizes(self) -> list[int]:
        """Parameters of one module of each stage (cached: the factories build modules)."""
        if getattr(self, "_sizes", None) is None:
            self._sizes = self.spec.stage_params()
        return self._sizes

    @classmethod
    def check_derive_rule(cls, rule: DeriveRule) -> None:
        """One-line ConfigError for a rule the method does not support (config.validate calls it too)."""
        def key(r: str) -> str:
            return f"arch.{r}" if r in ("max_params", "min_params") else f"arch.derive={r}"

        for need in rule.needs():
            if need not in cls.derive_rules:
                ok = ", ".join(["arch.derive=argmax", *map(key, cls.derive_rules)])
                raise ConfigError(f"arch.method={cls.name} does not support {key(need)}; it supports {ok}")

    def set_derive_rule(self, rule: DeriveRule) -> None:
        """Refuse (one-line ConfigError) a rule the method does not support or a budget no tree meets."""
        self.check_derive_rule(rule)
        if rule.max_params:
            low = self.min_params()
            if low is not None and low > rule.max_params:
                raise ConfigError(self._too_small(rule.max_params, low))
        self.derive_rule = rule

    def _too_small(self, budget: int, low: int) -> str:
        return (f"arch.max_params={budget} is below the smallest tree arch.method={self.name} can derive for the "
                f"{self.spec.name} network ({low} trunk parameters); set arch.max_params >= {low} or 0 (no budget)")

    def finish(self, tree: Tree, scores: Any = None, **extra: Any) -> Tree:
        """Record how ``tree`` was derived (rule, margin, budget, the scores it used, ``extra``,
        parameter counts) in ``tree.derive``; fail with a one-line ConfigError if it exceeds the budget."""
        counts = tree.param_counts(self.sizes(), self.spec.head_params())
        counts["trunk"] = counts["shared"] + counts["subgroup"] + counts["specific"]  # what arch.max_params bounds
        budget = self.derive_rule.max_params
        if budget and counts["trunk"] > budget:
            raise ConfigError(self._too_small(budget, counts["trunk"]))
        rec = {**self.derive_rule.record(), **extra, "scores": scores, "params": counts}
        return dataclasses.replace(tree, derive=rec)

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.net.arch_parameters()) if self.net is not None else []

    def make_arch_optimizer(self, lr: float, weight_decay: float, betas=(0.5, 0.999)) -> None:
        params = self.arch_parameters()
        self.arch_optimizer = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay) if params else None

    def arch_step(self, val_losses: Tensor) -> None:
        """First-order architecture update on held-out per-task losses."""
        if self.arch_optimizer is None:
            return
        params = self.arch_parameters()
        self.arch_optimizer.zero_grad(set_to_none=True)
        loss = val_losses.mean()
        reg = self.regularizer()
        if reg is not None:
            loss = loss + reg
        loss.backward(inputs=params)
        self.arch_optimizer.step()

    def state_dict(self) -> dict:
        return {"arch_optimizer": None if self.arch_optimizer is None else self.arch_optimizer.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        if self.arch_optimizer is not None and d.get("arch_optimizer") is not None:
            self.arch_optimizer.load_state_dict(d["arch_optimizer"])
