"""The methods table: settings (a method, a weighting, a derive rule ...) over seeds, against a baseline.

One row per setting (runs grouped as :func:`mtrl_arch.report.group_runs` does: same config
but the seed), from the run directories alone:

* the headline metric's last evaluation (supervised: the task mean of the first metric, or,
  where the tasks have different metrics (GLUE), of each task's first; RL: the mean success
  rate), mean ± sample std over seeds, and each task's;
* Delta_m (LibMTL's definition, :func:`mtrl_arch.metrics.delta_m`) of each seed against the
  baseline setting's seed mean, then mean ± std over seeds (supervised; RL success rates
  of 0 make it undefined, so RL rows get the IQM below instead);
* RL: the interquartile mean of all (seed, task) success rates with a 95% percentile
  bootstrap interval over seeds (``scipy.stats.bootstrap``), the statistic the MT10
  literature now reports (Agarwal et al., NeurIPS 2021, "rliable");
* trunk parameters (shared / specific / total, per network, seed mean), wall time and each
  seed's derived tree, one letter per stage: ``S`` one module for all tasks, ``P`` one per
  task, ``G`` sub-groups, ``-`` skipped by some task (AdaShare).

Cells with one seed say ``(n=1)``: such a row claims nothing.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from . import metrics as M
from .errors import ConfigError
from .tree import Tree

MEAN = "mean"


def final_eval(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The numeric ``eval/*`` values of the last record that has any."""
    for rec in reversed(records):
        if any(k.startswith("eval/") for k in rec):
            return {k: float(v) for k, v in rec.items() if k.startswith("eval/") and isinstance(v, (int, float))
                    and not isinstance(v, bool) and math.isfinite(v)}
    return {}


def per_task(final: Mapping[str, float], metric: str | None = None) -> dict[str, dict[str, float]]:
    """``eval/<metric>/<task>`` -> task -> metric -> value (task means and derived values left out)."""
    out: dict[str, dict[str, float]] = {}
    for k, v in final.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[2] != MEAN and (metric is None or parts[1] == metric):
            out.setdefault(parts[2], {})[parts[1]] = v
    return out


def tree_code(tree: Tree) -> str:
    """One letter per stage: S shared by all, P one module per task, G sub-groups, - skipped by some task."""
    out = []
    for st in tree.stages:
        if sum(len(g) for g in st) < tree.n_tasks:
            out.append("-")
        elif len(st) == 1:
            out.append("S")
        else:
            out.append("P" if all(len(g) == 1 for g in st) else "G")
    return "".join(out)


def mean_std(vals: Sequence[float], fmt: str = ".4f") -> str:
    if not vals:
        return "-"
    m = float(np.mean(vals))
    if len(vals) == 1:
        return f"{m:{fmt}} (n=1)"
    return f"{m:{fmt}} ± {float(np.std(vals, ddof=1)):{fmt.lstrip('+')}}"


def iqm_ci(scores: np.ndarray, level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of ``scores [seeds, tasks]`` (all values pooled) and a percentile bootstrap interval over seeds."""
    from scipy.stats import bootstrap, trim_mean

    iqm = float(trim_mean(scores.ravel(), 0.25))
    if scores.shape[0] < 2:
        return iqm, math.nan, math.nan
    res = bootstrap((np.arange(scores.shape[0]),), lambda idx: trim_mean(scores[idx.astype(int)].ravel(), 0.25),
                    vectorized=False, confidence_level=level, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return iqm, float(res.confidence_interval.low), float(res.confidence_interval.high)


def logged_params(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per network, the last logged ``params/<net>/<kind>`` counts (after a search: the derived network's)."""
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        for k, v in rec.items():
            parts = k.split("/")
            if parts[0] == "params" and len(parts) == 3 and parts[1] != "search" and isinstance(v, (int, float)):
                out.setdefault(parts[1], {})[parts[2]] = int(v)
    return out


def _wall(records: Sequence[Mapping[str, Any]]) -> float | None:
    walls = [r["time/wall_s"] for r in records if isinstance(r.get("time/wall_s"), (int, float))]
    return max(walls) if walls else None


def _task_mean(final: Mapping[str, float], metrics: Mapping[str, str]) -> float:
    """The run's own ``eval/<metric>/mean`` when every task has ``metric``, else the mean over tasks of each
    task's headline metric."""
    names = set(metrics.values())
    if len(names) == 1 and f"eval/{next(iter(names))}/{MEAN}" in final:
        return final[f"eval/{next(iter(names))}/{MEAN}"]
    vals = [final[f"eval/{m}/{t}"] for t, m in metrics.items() if f"eval/{m}/{t}" in final]
    return float(np.mean(vals)) if vals else math.nan


def headline_metrics(domain: str, finals: list[dict[str, float]]) -> dict[str, str]:
    """task -> its headline metric: RL's success rate; supervised: the first metric every task has, else each
    task's first (GLUE: CoLA's mcc, SST-2's accuracy, MRPC's f1 ...)."""
    if domain == "rl":
        return {t: "success_rate" for f in finals for t in per_task(f, "success_rate")}
    tasks: dict[str, list[str]] = {}
    for f in finals:
        for t, ms in per_task(f).items():
            tasks.setdefault(t, list(ms))
    common = [m for m in next(iter(tasks.values()), []) if all(m in ms for ms in tasks.values())]
    return {t: common[0] if common else ms[0] for t, ms in tasks.items()}


def headline_columns(metrics: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The one metric every task is headed by (None where each task has its own) and the task columns' headers
    (``CoLA mcc`` where the metrics differ)."""
    names = set(metrics.values())
    if len(names) == 1:
        return next(iter(names)), list(metrics)
    return None, [f"{t} {m}" for t, m in metrics.items()]


def methods_table(groups: list[tuple[str, list[Any]]], baseline: str | None = None,
                  lower_is_better: Mapping[str, bool] | None = None) -> tuple[str, dict[str, Any]]:
    """Markdown and data of the methods table for ``groups`` (label, runs) from :func:`report.group_runs`.

    ``baseline``: the label of the Delta_m baseline (a unique substring of it); default the
    group whose runs use ``arch.method=stl`` (none: no Delta_m column).
    """
    runs = [r for _, g in groups for r in g]
    if not runs:
        raise ConfigError("no runs to tabulate")
    domain = runs[0].cfg.domain
    finals = {id(r): final_eval(r.metrics) for r in runs}
    metrics = headline_metrics(domain, list(finals.values()))
    tasks = list(metrics)
    metric, headers = headline_columns(metrics)
    base = _baseline_group(groups, baseline)
    base_mean = None
    if base is not None and domain != "rl":
        vals = [per_task(finals[id(r)]) for r in base[1]]
        base_mean = {t: {m: float(np.mean([v[t][m] for v in vals if t in v and m in v[t]])) for m in vals[0][t]}
                     for t in vals[0]} if vals and vals[0] else None
    rows, lines = [], []
    head = ["setting", "seeds", f"{metric or 'first metric per task'} (mean over tasks)", *headers]
    head += ["IQM [95% CI]"] if domain == "rl" else ["Delta_m % vs " + (base[0] if base else "-")]
    head += ["params: shared / specific / total", "wall s", "derived trees (per seed)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, members in groups:
        fs = [finals[id(r)] for r in members]
        means = [_task_mean(f, metrics) for f in fs]
        row: dict[str, Any] = {"setting": label, "runs": [str(r.path) for r in members],
                               "seeds": [r.cfg.seed for r in members], "mean": means,
                               "tasks": {t: [f.get(f"eval/{metrics[t]}/{t}") for f in fs] for t in tasks}}
        cells = [label, str(len(members)), mean_std(means)]
        cells += [mean_std([v for v in row["tasks"][t] if v is not None]) for t in tasks]
        if domain == "rl":
            scores = np.array([[math.nan if v is None else v for v in vs] for vs in zip(*row["tasks"].values())])
            iqm, lo, hi = iqm_ci(scores)
            row["iqm"] = [iqm, lo, hi]
            cells.append(f"{iqm:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if not math.isnan(lo) else " (n=1)"))
        else:
            dm = [M.delta_m(per_task(f), base_mean, lower_is_better) for f in fs] if base_mean else []
            row["delta_m"] = dm
            cells.append(mean_std(dm, "+.2f") if dm else "-")
        params = [logged_params(r.metrics) for r in members]
        row["params"] = params
        cells.append(_params_cell(params))
        walls = [w for w in (_wall(r.metrics) for r in members) if w is not None]
        row["wall_s"] = walls
        cells.append(f"{np.mean(walls):.0f}" if walls else "-")
        codes = [" ".join(f"{n[0]}:{tree_code(t)}" if len(r.trees) > 1 else tree_code(t) for n, t in r.trees.items())
                 or r.cfg.arch.method for r in members]
        row["trees"] = codes
        cells.append(", ".join(codes))
        rows.append(row)
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Last evaluation of each run; mean ± sample std over seeds ((n=1): one seed, claims nothing). "
            + ("IQM: interquartile mean of all (seed, task) success rates, 95% percentile bootstrap over seeds. "
               if domain == "rl" else f"Delta_m: each seed against the mean of `{base[0]}`'s seeds. " if base_mean else "")
            + "Trees: one letter per stage (S shared, P per task, G sub-groups, - skipped).")
    return "\n".join(lines) + "\n\n" + note + "\n", {"metric": metric or metrics, "tasks": tasks,
                                                     "baseline": base[0] if base else None, "rows": rows}


def _baseline_group(groups: list[tuple[str, list[Any]]], baseline: str | None) -> tuple[str, list[Any]] | None:
    if baseline:
        hits = [g for g in groups if baseline in g[0]]
        if len(hits) != 1:
            raise ConfigError(f"--baseline {baseline!r} matches {len(hits)} settings ({', '.join(g[0] for g in groups)}); "
                              "give a substring of exactly one")
        return hits[0]
    stl = [g for g in groups if all(r.cfg.arch.method == "stl" for r in g[1])]
    return stl[0] if len(stl) == 1 else None


def _params_cell(params: list[dict[str, dict[str, int]]]) -> str:
    nets = list(dict.fromkeys(n for p in params for n in p))
    parts = []
    for n in nets:
        def avg(kind: str) -> int:
            return int(round(np.mean([p[n].get(kind, 0) for p in params if n in p])))
        shared = avg("shared") + avg("subgroup")
        spread = len({p.get(n, {}).get("total") for p in params}) > 1
        parts.append(("" if len(nets) == 1 else f"{n} ") + f"{shared:,} / {avg('specific'):,} / {avg('total'):,}"
                     + (" (mean)" if spread else ""))
    return "; ".join(parts) or "-"
