"""A derived multi-task architecture as plain, versioned data.

A :class:`Tree` says, for every stage of the trunk, which tasks share which module:
``stages[s]`` is a tuple of *groups*, each group a tuple of task indices that use one
module at stage ``s``. A group of every task is all-shared, a group of one task is
purely-specific, anything in between is sub-group shared. A task that is in no group
of a stage skips it (AdaShare's "skip"; the stage must then be residual-shaped).

The name is historical: groups need not nest (Recon turns a middle layer task-specific
and shares the next one again), and :class:`~mtrl_arch.trunk.Trunk` runs any layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ARCH_FORMAT = "mtrl-arch/tree"
ARCH_VERSION = 1

Group = tuple[int, ...]


class TreeError(ValueError):
    """A derived architecture that is malformed or does not fit the trunk."""


@dataclass(frozen=True)
class Tree:
    tasks: tuple[str, ...]
    stages: tuple[tuple[Group, ...], ...]
    method: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # how a method derived it (search/base.py ArchMethod.finish): rule, margin, budget, scores, parameter counts
    derive: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(
            self, "stages", tuple(tuple(tuple(int(t) for t in g) for g in st) for st in self.stages)
        )
        self.validate()

    # ---- construction -------------------------------------------------------------
    @classmethod
    def hps(cls, tasks: Sequence[str], n_stages: int) -> "Tree":
        """Hard parameter sharing: one module per stage for all tasks."""
        everyone = tuple(range(len(tasks)))
        return cls(tuple(tasks), tuple((everyone,) for _ in range(n_stages)), method="hps")

    @classmethod
    def stl(cls, tasks: Sequence[str], n_stages: int) -> "Tree":
        """Single-task learning: every task its own module at every stage."""
        singles = tuple((t,) for t in range(len(tasks)))
        return cls(tuple(tasks), tuple(singles for _ in range(n_stages)), method="stl")

    @classmethod
    def from_branch_points(
        cls, tasks: Sequence[str], n_stages: int, branch: Sequence[int], method: str = "conal", meta=None
    ) -> "Tree":
        """Task t uses the all-shared modules of stages < branch[t] and its own from there on.

        branch[t] = 0 is fully task-specific, branch[t] = n_stages is hard sharing.
        """
        if len(branch) != len(tasks):
            raise TreeError(f"need one branch point per task ({len(tasks)}), got {len(branch)}")
        stages = []
        for s in range(n_stages):
            shared = tuple(t for t, b in enumerate(branch) if b > s)
            groups = ((shared,) if shared else ()) + tuple((t,) for t, b in enumerate(branch) if b <= s)
            stages.append(groups)
        return cls(tuple(tasks), tuple(stages), method=method, meta=dict(meta or {}))

    # ---- queries ------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def validate(self) -> None:
        if not self.tasks:
            raise TreeError("a tree needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise TreeError(f"task names repeat: {list(self.tasks)}")
        T = len(self.tasks)
        for s, groups in enumerate(self.stages):
            seen: set[int] = set()
            for g in groups:
                if not g:
                    raise TreeError(f"stage {s} has an empty group")
                for t in g:
                    if not 0 <= t < T:
                        raise TreeError(f"stage {s} names task index {t}, but there are {T} tasks")
                    if t in seen:
                        raise TreeError(f"task {self.tasks[t]} is in two groups at stage {s}")
                    seen.add(t)

    def group_of(self, stage: int, task: int) -> Group | None:
        for g in self.stages[stage]:
            if task in g:
                return g
        return None

    def kind(self, group: Group) -> str:
        """'shared' (every task), 'specific' (one task) or 'subgroup'."""
        if len(group) == self.n_tasks and self.n_tasks > 1:
            return "shared"
        if len(group) == 1:
            return "specific"
        return "subgroup"

    def skips(self, stage: int) -> tuple[int, ...]:
        used = {t for g in self.stages[stage] for t in g}
        return tuple(t for t in range(self.n_tasks) if t not in used)

    def branch_points(self) -> list[int] | None:
        """For a CoNAL-shaped tree (shared prefix, then specific), each task's branch point."""
        out = []
        for t in range(self.n_tasks):
            b = 0
            while b < self.n_stages and self.n_tasks > 1 and self.kind(self.group_of(b, t) or ()) == "shared":
                b += 1
            out.append(b)
        return out if Tree.from_branch_points(self.tasks, self.n_stages, out).stages == self.stages else None

    def param_counts(self, stage_params: Sequence[int], head_params: int = 0) -> dict[str, int]:
        """Parameter counts by module kind, given one module's size per stage and one head's size."""
        if len(stage_params) != self.n_stages:
            raise TreeError(f"need {self.n_stages} stage sizes, got {len(stage_params)}")
        counts = {"shared": 0, "subgroup": 0, "specific": 0}
        for s, groups in enumerate(self.stages):
            for g in groups:
                counts[self.kind(g)] += int(stage_params[s])
        counts["heads"] = int(head_params) * self.n_tasks
        counts["total"] = sum(counts.values())
        return counts

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ARCH_FORMAT,
            "version": ARCH_VERSION,
            "method": self.method,
            "tasks": list(self.tasks),
            "stages": [[list(g) for g in groups] for groups in self.stages],
            # the same layout, task by task, for people reading the file
            "per_task": {
                name: [self._module_label(s, t) for s in range(self.n_stages)] for t, name in enumerate(self.tasks)
            },
            "meta": self.meta,
            **({"derive": self.derive} if self.derive else {}),  # absent in files written before derive rules
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Tree":
        if d.get("format") != ARCH_FORMAT:
            raise TreeError(f"not an mtrl-arch architecture file (format={d.get('format')!r}, expected {ARCH_FORMAT!r})")
        if int(d.get("version", -1)) > ARCH_VERSION:
            raise TreeError(
                f"architecture file version {d.get('version')} is newer than this mtrl-arch supports ({ARCH_VERSION}); upgrade mtrl-arch"
            )
        try:
            return cls(tuple(d["tasks"]), tuple(tuple(tuple(g) for g in st) for st in d["stages"]),
                       method=d.get("method", "manual"), meta=dict(d.get("meta") or {}),
                       derive=dict(d.get("derive") or {}))
        except KeyError as e:
            raise TreeError(f"architecture file lacks the key {e.args[0]!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Tree":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise TreeError(f"architecture file is not valid JSON ({e.msg} at line {e.lineno})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Tree":
        p = Path(path)
        if not p.is_file():
            raise TreeError(f"architecture file {p} does not exist; give the path of an arch.json")
        return cls.from_json(p.read_text())

    # ---- rendering -----------------------------------------------------------------
    def _module_label(self, stage: int, task: int) -> str:
        g = self.group_of(stage, task)
        if g is None:
            return "skip"
        k = self.kind(g)
        if k == "shared":
            return "S"
        if k == "specific":
            return "P"
        return "G" + "".join(str(i) for i in g) if len(g) < 6 else f"G{self.stages[stage].index(g)}"

    def render(self) -> str:
        """A table: one row per task, one column per stage.

        S = all-shared module, P = the task's purely-specific module, G<ids> = module
        shared by that sub-group, skip = stage skipped. A bar per stage lists the groups.
        """
        width = max(len(n) for n in self.tasks)
        header = " " * width + " | " + " ".join(f"s{s:<3}" for s in range(self.n_stages))
        lines = [f"method: {self.method}  tasks: {self.n_tasks}  stages: {self.n_stages}", header]
        for t, name in enumerate(self.tasks):
            cells = " ".join(f"{self._module_label(s, t):<4}" for s in range(self.n_stages))
            lines.append(f"{name:<{width}} | {cells}")
        for s, groups in enumerate(self.stages):
            desc = ", ".join("{" + ",".join(self.tasks[t] for t in g) + "}" for g in groups if len(g) > 1)
            n_spec = sum(1 for g in groups if len(g) == 1)
            lines.append(f"  stage {s}: {len(groups)} module(s); shared: {desc or '-'}; specific: {n_spec}")
        return "\n".join(lines + self._render_derive())

    def _render_derive(self) -> list[str]:
        d = self.derive
        if not d:
            return []
        rule = d.get("rule", "?") + (f" (margin {d['margin']})" if "margin" in d else "")
        budget = f"max_params {d['max_params']}" if d.get("max_params") else "no parameter budget"
        budget += f", min_params {d['min_params']}" if d.get("min_params") else ""
        lines = [f"derive: {rule}; {budget}"]
        if "admissible" in d:  # arch.method=random: what it drew from
            lines.append(f"drawn uniformly (seed {d.get('seed')}) from the {d['admissible']} trees of the "
                         f"{d.get('space')} space with a trunk in {d.get('band')}")
        c = d.get("params") or {}
        if c:
            lines.append(f"params: trunk {c.get('trunk')} (shared {c.get('shared')}, subgroup {c.get('subgroup')}, "
                         f"specific {c.get('specific')}), heads {c.get('heads')}, total {c.get('total')}")
        sc = d.get("scores")
        if sc is not None:  # what the rule read: one line per entry, one per task where the entry is per task
            lines.append("scores:")
            for k, v in (sc.items() if isinstance(sc, dict) else [("", sc)]):
                if isinstance(v, dict) and v and set(v) <= set(self.tasks):
                    lines += [f"  {k}:"] + [f"    {t}: {json.dumps(x)}" for t, x in v.items()]
                else:
                    lines.append(f"  {k}: {json.dumps(v)}")
        return lines
