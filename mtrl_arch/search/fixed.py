"""Architectures known before training: hard sharing, single-task, and a user's JSON.

* ``hps``: hard parameter sharing (Caruana 1997): every stage shared, per-task heads.
* ``stl``: single-task learning: every task its own copy of every stage (one network per
  task), computed batched over tasks.
* ``manual``: a derived architecture given as an ``arch.json`` (``arch.options.path``).

Derive rules: there is nothing to choose, so ``arch.derive=margin`` changes nothing (it is
accepted, so one override can span a sweep over methods); ``arch.max_params`` is checked: a
tree over the budget is a one-line ConfigError (hps and stl when the method is made,
manual when its file is read). A manual tree keeps the derive record of the search that
wrote it under ``derive.source``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import json
from pathlib import Path

from ..tree import Tree, TreeError


def load_network_tree(path: str, network: str) -> Tree:
    """A Tree file, or one network's tree from an arch.json holding several (actor, critic, ...)."""
    p = Path(path)
    if p.is_dir():
        p = p / "arch.json"
    if not p.is_file():
        raise TreeError(f"architecture file {p} does not exist; give the path of an arch.json")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TreeError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if "networks" in d:
        nets = d["networks"]
        if network not in nets:
            if len(nets) != 1:
                raise TreeError(f"{p} has networks {sorted(nets)}, none named {network!r}")
            network = next(iter(nets))
        d = nets[network]
    return Tree.from_dict(d)
from .base import ArchMethod, Phase


class HPS(ArchMethod):
    name = "hps"
    searches = False

    def phase(self, step: int) -> Phase:
        return Phase(weights=True, arch=False)

    def derive(self) -> Tree:
        return self.finish(Tree.hps(self.spec.tasks, self.spec.n_stages))


class STL(HPS):
    name = "stl"

    def min_params(self) -> int:
        return self.spec.n_tasks * sum(self.sizes())

    def derive(self) -> Tree:
        return self.finish(Tree.stl(self.spec.tasks, self.spec.n_stages))


@dataclass
class ManualOptions:
    path: str = ""  # an arch.json written by `mtrl-arch arch` or by a search


class Manual(HPS):
    name = "manual"
    Options = ManualOptions

    def min_params(self) -> None:
        return None  # the file's tree, checked when derived

    def derive(self) -> Tree:
        if not self.options.path:
            raise TreeError("arch.method=manual needs arch.options.path=PATH/TO/arch.json")
        tree = load_network_tree(self.options.path, self.spec.name)
        if tree.tasks != tuple(self.spec.tasks):
            raise TreeError(f"{self.options.path} is for tasks {list(tree.tasks)}, this run has {list(self.spec.tasks)}")
        if tree.n_stages != self.spec.n_stages:
            raise TreeError(f"{self.options.path} has {tree.n_stages} stages, this network has {self.spec.n_stages}")
        out = self.finish(tree)
        return dataclasses.replace(out, derive={**out.derive, "source": tree.derive}) if tree.derive else out
