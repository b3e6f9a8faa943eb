"""The headline metric against trunk size: the figure with its frontier, and paired comparisons at a budget.

A network's *trunk* is its shared, sub-group and task-specific modules, heads not counted (the
count :mod:`mtrl_arch.search.derive` budgets with ``arch.max_params``). Each setting (the runs of
one config but the seed, :func:`mtrl_arch.report.group_runs`) becomes one point per network:
x the mean over its seeds of that network's trunk parameters (with their min-max spread: a
searched or random tree may differ between seeds), y the mean ± std over seeds of the final
headline metric (the summary table's mean over tasks).

Comparisons, per searched setting with budget B per network (its ``arch.max_params``, or the
mean size of the trees it derived when it had none), paired by seed:

* minus the random trees drawn at the same budget (``arch.method=random``, same ``max_params``;
  within 10% when B is a derived size);
* minus HPS sized to B (``model.match_params`` for the trunk or actor, and where set
  ``agent.critic_match_params`` for the critic, each the nearest within 10%).

The counterpart must agree with the searched setting on every key outside the architecture
(``arch.*`` and the width-matching keys): a run with another step budget is no counterpart.
Keys this version's config may lack (``arch.method=random``, ``arch.actor.method``,
``model.match_params``) are read from the run's record as written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .axes import clipped_band, count_formatter, human_count
from .metrics import paired_bootstrap_ci
from .search import REGISTRY
from .table import logged_params

MARKERS = {"hps": "o", "stl": "s", "conal": "^", "conal_pro": "v", "recon": "D", "ltb": "P", "adashare": "X",
           "random": "*", "manual": "h"}
# the width-matching key of each network's trunk; the trunk (supervised) and the actor share model.match_params
MATCH_KEYS = {"trunk": "model.match_params", "actor": "model.match_params", "critic": "agent.critic_match_params"}
ARCH_KEYS = ("arch.", "model.match_params", "agent.critic_match_params")  # what a counterpart may differ in
MATCH_TOLERANCE = 0.10   # a width-matched HPS (and a random draw against an unbudgeted search) within 10% of B
N_RESAMPLES = 10_000
_NETWORK_ORDER = ("actor", "critic", "trunk")


@dataclass
class Setting:
    """One setting's runs and what the figure and the comparisons read from them."""
    label: str
    keys: dict[str, Any]          # the flat config minus seed and bookkeeping (report.setting)
    values: dict[int, float]      # seed -> final headline value (mean over tasks)
    sizes: dict[str, list[int]]   # network -> trunk parameters of each run that has them

    def method(self, network: str) -> str:
        return str(self.keys.get(f"arch.{network}.method") or self.keys.get("arch.method", ""))

    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.method(n) for n in self.sizes)) or [self.method("trunk")]

    def budget_key(self, network: str) -> int:
        return int(self.keys.get(f"arch.{network}.max_params") or self.keys.get("arch.max_params") or 0)

    def size(self, network: str) -> float | None:
        s = self.sizes.get(network)
        return float(np.mean(s)) if s else None


def trunk_params(run: Any) -> dict[str, int]:
    """Per network, its trunk's parameters: the derived tree's own count (arch.json), else the last logged
    ``params/<network>/{shared,subgroup,specific}`` (a fixed tree logs them at the start)."""
    out = {n: int(t.derive["params"]["trunk"]) for n, t in run.trees.items()
           if isinstance((t.derive or {}).get("params"), dict) and "trunk" in t.derive["params"]}
    for n, c in logged_params(run.metrics).items():
        if n not in out and {"shared", "specific"} <= set(c):
            out[n] = c["shared"] + c.get("subgroup", 0) + c["specific"]
    return out


def networks(settings: Sequence[Setting]) -> list[str]:
    names = list(dict.fromkeys(n for s in settings for n in s.sizes))
    return sorted(names, key=lambda n: (_NETWORK_ORDER.index(n) if n in _NETWORK_ORDER else len(_NETWORK_ORDER), n))


def frontier(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """At each size that has a point, the best value of any point at or below that size (sizes ascending)."""
    out: list[tuple[float, float]] = []
    best = None
    for x, y in sorted(points, key=lambda p: p[0]):
        if best is None or (y > best if higher_is_better else y < best):
            best = y
        if out and out[-1][0] == x:
            out[-1] = (x, best)
        else:
            out.append((x, best))
    return out


def _std(vals: Sequence[float]) -> float:
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def plot_params(settings: Sequence[Setting], metric: str, path: Path, higher_is_better: bool = True) -> Path | None:
    """``params-<metric>.png``: one panel per network (x its trunk parameters), one marker style per method, the
    frontier as a step line. None when no setting has a size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = networks(settings)
    if not nets:
        return None
    fig, axes = plt.subplots(1, len(nets), figsize=(max(5.0 * len(nets), 8.0), 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, net in zip(axes[0], nets):
        pts = []
        for i, s in enumerate(settings):
            sizes, vals = s.sizes.get(net), list(s.values.values())
            if not sizes or not vals:
                continue
            x, y = float(np.mean(sizes)), float(np.mean(vals))
            (lo,), (hi,) = clipped_band([y], [_std(vals)], metric)
            ax.errorbar([x], [y], xerr=[[x - min(sizes)], [max(sizes) - x]], yerr=[[y - lo], [hi - y]],
                        marker=MARKERS.get(s.method(net), "."), ms=8, ls="none", capsize=3,
                        color=colors[i % len(colors)], label=f"{s.label} (n={len(vals)})")
            pts.append((x, y))
        if not pts:
            ax.axis("off")
            continue
        front = frontier(pts, higher_is_better)
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="black", lw=1.0, alpha=0.6, zorder=0, label="frontier (best at or below)")
        lo, hi = min(x for x, _ in pts), max(x for x, _ in pts)
        if lo > 0 and hi / lo > 10:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(count_formatter())
        ax.set_xlabel(f"{'' if net == 'trunk' else net + ' '}trunk parameters (mean over seeds; bar: min-max)",
                      fontsize=8)
        ax.set_ylabel(f"final {metric} (mean ± std over seeds)", fontsize=8)
        ax.set_title(net, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = 2 if len(labels) > 4 and len(nets) > 1 else 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.suptitle(f"final {metric} against trunk size; markers: method", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * math.ceil(len(labels) / ncol), 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- paired comparisons ------------------------------------------------------------------------------
def _searches(s: Setting) -> bool:
    return any(getattr(REGISTRY.get(m), "searches", False) for m in s.methods())


def _rest(s: Setting) -> dict[str, Any]:
    return {k: v for k, v in s.keys.items() if not k.startswith(ARCH_KEYS)}


def budget(s: Setting) -> tuple[dict[str, float], bool]:
    """Per network, the searched setting's budget, and whether it was set (else: the mean derived trunk size)."""
    nets = list(s.sizes) or ["trunk"]
    if all(s.budget_key(n) for n in nets):
        return {n: float(s.budget_key(n)) for n in nets}, True
    return {n: size for n in nets if (size := s.size(n)) is not None}, False


def _near(value: float, target: float, tolerance: float) -> bool:
    return target > 0 and abs(value - target) <= tolerance * target


def _nearest(candidates: list[tuple[Setting, float]]) -> Setting | None:
    return min(candidates, key=lambda c: c[1])[0] if candidates else None


def random_counterpart(s: Setting, b: dict[str, float], exact: bool, pool: Sequence[Setting]) -> Setting | None:
    tol = 0.0 if exact else MATCH_TOLERANCE
    found = [(r, sum(abs(r.budget_key(n) - v) / v for n, v in b.items())) for r in pool
             if all(m == "random" for m in r.methods()) and _rest(r) == _rest(s)
             and all(_near(r.budget_key(n), v, tol) for n, v in b.items())]
    return _nearest(found)


def hps_counterpart(s: Setting, b: dict[str, float], pool: Sequence[Setting]) -> Setting | None:
    def off(h: Setting) -> float | None:
        """The relative distance of h's matched sizes to the budget; None where one is outside the tolerance."""
        keys = {n: MATCH_KEYS[n] for n in b if n in MATCH_KEYS and h.keys.get(MATCH_KEYS[n])}
        if not any(MATCH_KEYS[n] == "model.match_params" for n in keys):
            return None
        gaps = [abs(float(h.keys[k]) - b[n]) / b[n] for n, k in keys.items()]
        return sum(gaps) if all(g <= MATCH_TOLERANCE for g in gaps) else None

    found = [(h, g) for h in pool if all(m == "hps" for m in h.methods()) and _rest(h) == _rest(s)
             and (g := off(h)) is not None]
    return _nearest(found)


def paired(s: Setting, other: Setting) -> dict[str, Any]:
    seeds = sorted(set(s.values) & set(other.values))
    if not seeds:
        return {"against": other.label, "n": 0}
    diffs = [s.values[k] - other.values[k] for k in seeds]
    mean, lo, hi = paired_bootstrap_ci(diffs, n_resamples=N_RESAMPLES)
    return {"against": other.label, "n": len(seeds), "seeds": seeds, "differences": diffs, "mean": mean,
            "ci": [lo, hi]}


def _cell(res: dict[str, Any] | None, missing: str) -> str:
    if res is None:
        return missing
    if res["n"] == 0:
        return f"no seed in common with `{res['against']}`"
    lo, hi = res["ci"]
    ci = f" [{lo:+.3f}, {hi:+.3f}]" if res["n"] > 1 else " (one pair: no interval)"
    return f"{res['mean']:+.3f}{ci}, n={res['n']} vs `{res['against']}`"


def _budget_text(b: dict[str, float], exact: bool) -> str:
    text = ", ".join(f"{n} {human_count(v)}" for n, v in b.items()) if b else "-"
    return text if exact else f"{text} (derived, no max_params)"


def comparisons(settings: Sequence[Setting], metric: str) -> tuple[str, list[dict[str, Any]]]:
    """Markdown and data: each searched setting minus its random and its width-matched HPS counterpart; empty
    when no setting searches."""
    rows, lines = [], []
    for s in settings:
        if not _searches(s):
            continue
        b, exact = budget(s)
        rnd = random_counterpart(s, b, exact, settings) if b else None
        hps = hps_counterpart(s, b, settings) if b else None
        row = {"setting": s.label, "budget": b, "budget_set": exact,
               "minus_random": paired(s, rnd) if rnd else None, "minus_hps": paired(s, hps) if hps else None}
        rows.append(row)
        bt = _budget_text(b, exact)
        lines.append(f"| {s.label} | {bt} | "
                     + _cell(row["minus_random"], "no `arch.method=random` setting at B") + " | "
                     + _cell(row["minus_hps"], f"no HPS setting with `model.match_params` within {MATCH_TOLERANCE:.0%} "
                                               "of B") + " |")
    if not rows:
        return "", []
    head = ["## Searched trees against random trees and width-matched HPS", "",
            f"Final `{metric}` (mean over tasks): the searched setting minus the other, paired by seed (the seeds both "
            f"ran; n pairs), mean and 95% percentile bootstrap interval over the pairs ({N_RESAMPLES:,} resamples). "
            "Counterparts agree on every key outside `arch.*` and the width-matching keys.", "",
            "| searched setting | budget B | minus random at B | minus HPS matched to B |", "|---|---|---|---|"]
    return "\n".join(head + lines) + "\n", rows


def settings_of(groups: Sequence[tuple[str, Sequence[Any]]], keys: Sequence[Mapping[str, Any]],
                final: Any) -> list[Setting]:
    """:class:`Setting` per group; ``final(run)``: the run's final headline value (None before any evaluation)."""
    out = []
    for (label, members), k in zip(groups, keys):
        values, sizes = {}, {}
        for r in members:
            v = final(r)
            if v is not None and r.cfg.seed not in values:
                values[r.cfg.seed] = v
            for n, p in trunk_params(r).items():
                sizes.setdefault(n, []).append(p)
        out.append(Setting(label, dict(k), values, sizes))
    return out
