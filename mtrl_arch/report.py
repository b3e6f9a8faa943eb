"""Reports over run directories: learning curves, learned trees, a summary table.

``make_report(run_dirs, out)`` reads what ``mtrl-arch train`` wrote (config.yaml,
metrics.jsonl, arch.json) and writes into ``out``:

* ``<metric>.png`` per evaluation metric: one panel per task plus the mean over tasks;
  RL runs plot ``eval/success_rate/<task>``, supervised runs every ``eval/<metric>/<task>``.
  Runs whose configs differ only in the seed (and in bookkeeping such as ``run_dir``)
  form one group: its mean over seeds is drawn as a line with a band of +-1 standard
  deviation over seeds (the number of seeds is in the legend);
* ``tree-<run>.png`` per run with an arch.json: each network's learned tree, as modules
  per stage (columns) joined along every task's path, tasks at the leaves;
* ``arch-<run>.png`` / ``conflict-<run>.png`` per run that logged them: each task's architecture
  choice probabilities over the search (``arch/<network>/<task>/<choice>``: did it settle or
  stop at noise?) and each shared group's conflict / withheld / mean-cosine rates;
* ``params-<metric>.png`` when the runs span more than one setting: the headline metric
  against trunk parameters, one panel per network, with the frontier
  (:mod:`mtrl_arch.params_report`);
* ``summary.md`` (and ``summary.json``): one row per group (final mean metric +- std over
  seeds, per-task finals, parameters) and one row per run; each searched setting against
  random trees at its budget and width-matched HPS, paired by seed;
* with ``reference=`` (a YAML or JSON file of published points, see :func:`load_reference`):
  the points drawn on the mean panel of their metric, and a table of each group's mean at
  the points' steps against them.

Bands are clipped to their metric's range and step axes read in k/M (:mod:`mtrl_arch.axes`).
A run's config.yaml is data: keys this version does not know (written by a newer mtrl-arch)
stay readable in ``RunData.record`` and set settings apart.
Matplotlib runs on the Agg backend (no display needed) and is imported only in the plotting functions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from . import params_report
from .axes import clipped_band, count_formatter
from .config import Config, ConfigError, config_from_dict, load_yaml_text
from .logger import read_metrics
from .metrics import LOWER_IS_BETTER
from .run import read_arch, read_run_config
from .table import final_eval, headline_columns, headline_metrics, methods_table
from .tree import Tree

# config fields that do not change what a run learns: ignored when grouping runs into seeds of one setting
_BOOKKEEPING = {"seed", "run_dir", "name", "wandb", "device", "train.log_every", "train.checkpoint_every_env_steps",
                "train.checkpoint_every_epochs", "train.keep_checkpoints", "train.save_replay", "train.threads",
                "data.num_workers", "data.root", "train.report"}
_MEAN = "mean"


@dataclass
class RunData:
    path: Path
    cfg: Config
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]
    trees: dict[str, Tree] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # config.yaml as written, flat dotted keys (run: left out)

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def curves(self) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """metric -> task -> [(step, value)] from every ``eval/<metric>/<task>`` value."""
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for rec in self.metrics:
            for k, v in rec.items():
                parts = k.split("/")
                if len(parts) != 3 or parts[0] != "eval" or not _is_number(v):
                    continue
                out.setdefault(parts[1], {}).setdefault(parts[2], []).append((float(rec["step"]), float(v)))
        return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_run(path: Path) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory; expected a folder with config.yaml and metrics.jsonl "
                          "(and arch.json once a search has finished), as `mtrl-arch train` writes")
    try:
        cfg, meta = read_run_config(path)
        record = _flatten(cfg.to_dict())
    except ConfigError:
        newer = _read_newer_config(path)
        if newer is None:
            raise
        cfg, meta, record = newer
    if not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"{path} has no metrics.jsonl; expected config.yaml, metrics.jsonl (and arch.json), "
                          "as `mtrl-arch train` writes")
    metrics = read_metrics(path)
    trees = read_arch(path) if (path / "arch.json").is_file() else {}
    return RunData(path, cfg, meta, metrics, trees, record)


def _read_newer_config(path: Path) -> tuple[Config, dict[str, Any], dict[str, Any]] | None:
    """A config.yaml this version does not validate (e.g. ``arch.method=random`` or ``model.match_params`` from a
    newer mtrl-arch): its known fields unchecked (a report only reads them), and the whole record, flat. None when
    it is no config record at all (read_run_config's error stands)."""
    import yaml

    try:
        d = load_yaml_text((path / "config.yaml").read_text())
        if not isinstance(d, dict) or not isinstance(d.get("run", {}), dict):
            return None
        meta = d.pop("run", {})
        cfg = config_from_dict({"domain": d.get("domain", "rl")})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):  # missing, unreadable, not YAML, bad domain
        return None

    def fill(obj: Any, data: dict[str, Any]) -> None:
        for f in dataclasses.fields(obj):
            if f.name not in data:
                continue
            cur = getattr(obj, f.name)
            if dataclasses.is_dataclass(cur):
                if isinstance(data[f.name], dict):
                    fill(cur, data[f.name])
            else:
                setattr(obj, f.name, data[f.name])

    fill(cfg, d)
    return cfg, meta, {**_flatten(cfg.to_dict()), **_flatten(d)}


# ---- grouping --------------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("arch.options", "weighting.options", "model.options", "data.options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def setting(cfg: Config, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as flat ``dotted.key: value`` without seed and bookkeeping: equal for seeds of one setting.
    ``record``: the run's flat config.yaml, whose keys this version lacks count too."""
    flat = {**(record or {}), **_flatten(cfg.to_dict())}
    return {k: v for k, v in flat.items() if k not in _BOOKKEEPING and k.split(".")[0] not in _BOOKKEEPING}


def group_runs(runs: list[RunData]) -> list[tuple[str, list[RunData]]]:
    """Runs grouped by config minus seed, each group labelled by what sets it apart from the others."""
    groups: dict[str, list[RunData]] = {}
    keys: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = setting(r.cfg, r.record)
        k = json.dumps(s, sort_keys=True, default=str)
        groups.setdefault(k, []).append(r)
        keys[k] = s
    if len(groups) == 1:
        (k, members), = groups.items()
        return [(members[0].cfg.name, members)]
    differing = sorted({f for s in keys.values() for f in s if len({json.dumps(t.get(f), default=str)
                                                                    for t in keys.values()}) > 1})
    out = []
    for k, members in groups.items():
        s = keys[k]
        # a key only some runs' records hold (written by a newer mtrl-arch) is named where it is set
        label = ", ".join(f"{f}={_short(s[f])}" for f in [f for f in differing if s.get(f) is not None][:4]) \
            or members[0].cfg.name
        out.append((label, members))
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


# ---- curves ----------------------------------------------------------------------------------------
def _series(runs: list[RunData], metric: str, task: str) -> tuple[list[float], list[float], list[float]]:
    """Steps common to all runs of a group, the mean over runs and the std over runs at each."""
    per_run = []
    for r in runs:
        c = r.curves.get(metric, {})
        if task == _MEAN and _MEAN not in c:
            c = {_MEAN: _task_mean(c)}
        pts = dict(c.get(task, []))  # the last value at a step wins (e.g. a final evaluation at the last step)
        per_run.append(pts)
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    mean, std = [], []
    for s in steps:
        vals = [p[s] for p in per_run]
        m = sum(vals) / len(vals)
        mean.append(m)
        std.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return steps, mean, std


def _run_mean(run: RunData, metric: str) -> dict[float, float]:
    """One run's mean over tasks: step -> value."""
    steps, mean, _ = _series([run], metric, _MEAN)
    return dict(zip(steps, mean))


def _task_mean(c: dict[str, list[tuple[float, float]]]) -> list[tuple[float, float]]:
    by_step: dict[float, list[float]] = {}
    for task, pts in c.items():
        for s, v in pts:
            by_step.setdefault(s, []).append(v)
    n = len(c)
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items()) if len(v) == n]


def _tasks(runs: list[RunData], metric: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for t in r.curves.get(metric, {}):
            if t != _MEAN:
                seen[t] = None
    return list(seen)


def load_reference(path: Path) -> dict[str, Any]:
    """Published points to compare against, e.g.::

        metric: success_rate          # eval/<metric>, the mean over tasks
        source: where the numbers come from
        series:
          - label: MT-SAC 3x256 (reference)
            points: [[400000, 0.17], [1000000, 0.30]]   # [env steps, value]

    Raises :class:`ConfigError` with one line when the file is missing or malformed.
    """
    import yaml

    path = Path(path)
    try:
        d = load_yaml_text(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"reference file {path}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    ok = (isinstance(d, dict) and isinstance(d.get("metric"), str) and isinstance(d.get("series"), list)
          and all(isinstance(x, dict) and isinstance(x.get("label"), str) and isinstance(x.get("points"), list)
                  and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_is_number, p)) for p in x["points"])
                  for x in d["series"]))
    if not ok:
        raise ConfigError(f"reference file {path}: expected 'metric: NAME' and 'series: [{{label: TEXT, points: "
                          f"[[step, value], ...]}}, ...]'")
    return {"metric": d["metric"], "source": str(d.get("source", "")),
            "series": [{"label": x["label"], "points": [(float(a), float(b)) for a, b in x["points"]]} for x in d["series"]]}


def plot_metric(groups: list[tuple[str, list[RunData]]], metric: str, path: Path,
                reference: dict[str, Any] | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for _, g in groups for r in g]
    tasks = _tasks(runs, metric)
    if not tasks:
        return None
    panels = [_MEAN] + tasks
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.7 * nrow), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xlabel = "env steps (all tasks)" if runs[0].cfg.domain == "rl" else "step"
    for ax, task in zip(axes.flat, panels):
        for i, (label, members) in enumerate(groups):
            steps, mean, std = _series(members, metric, task)
            if not steps:
                continue
            c = colors[i % len(colors)]
            ax.plot(steps, mean, color=c, lw=2 if task == _MEAN else 1.4, marker="o" if len(steps) < 12 else None,
                    ms=3, label=f"{label} (n={len(members)})")
            if len(members) > 1:
                ax.fill_between(steps, *clipped_band(mean, std, metric), color=c, alpha=0.2, lw=0)
        if task == _MEAN and reference is not None and reference["metric"] == metric:
            last = max((s for _, g in groups for r in g for s in _run_mean(r, metric)), default=0.0)
            for j, ser in enumerate(reference["series"]):
                pts = [(s, v) for s, v in ser["points"] if s <= 1.05 * last]  # only where the runs reach
                if pts:
                    ax.plot(*zip(*pts), ls="none", marker="*", ms=9, color=colors[(len(groups) + j) % len(colors)],
                            label=ser["label"])
        ax.set_title("mean over tasks" if task == _MEAN else task, fontsize=9,
                     fontweight="bold" if task == _MEAN else "normal")
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(count_formatter())
        ax.grid(alpha=0.3)
        if metric == "success_rate":
            ax.set_ylim(-0.05, 1.05)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"eval/{metric}: mean over seeds" + (", band ±1 std" if any(len(g) > 1 for _, g in groups) else ""),
                 fontsize=11)
    ncol = min(3, len(labels)) if max(map(len, labels), default=0) < 50 else 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.05 + 0.035 * math.ceil(len(labels) / ncol)) / nrow, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- search trajectories -------------------------------------------------------------------------------
def _logged_series(run: RunData, prefix: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``<prefix>/<panel...>/<line>`` values of every line of metrics.jsonl: panel -> line -> [(step, value)]."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for rec in run.metrics:
        for k, v in rec.items():
            if k.startswith(prefix + "/") and _is_number(v):
                panel, line = k[len(prefix) + 1:].rsplit("/", 1)
                out.setdefault(panel, {}).setdefault(line, []).append((float(rec["step"]), float(v)))
    return out


def plot_trajectories(run: RunData, prefix: str, path: Path, title: str, ylabel: str) -> Path | None:
    """One panel per ``<prefix>/<panel>/`` key family, one line per last key component, over the steps logged:
    ``arch``: each task's choice probabilities during a search; ``conflict``: each shared group's rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _logged_series(run, prefix)
    if not series:
        return None
    panels = list(series)
    ncol = min(5, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False, sharex=True)
    for ax, panel in zip(axes.flat, panels):
        for line, pts in series[panel].items():
            ax.plot(*zip(*pts), lw=1.2, label=line)
        ax.set_title(panel, fontsize=8)
        ax.set_ylim(-1.02 if prefix == "conflict" else -0.02, 1.02)  # mean cosines may be negative
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(count_formatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, frameon=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(f"{run.name}: {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- trees -----------------------------------------------------------------------------------------
_KIND_COLOR = {"shared": "#2b6cb0", "subgroup": "#dd8a2b", "specific": "#b8c4d0"}


def draw_tree(ax, tree: Tree, title: str) -> None:
    """Modules per stage (columns) as nodes at the mean row of their tasks; every task's path as edges.

    Rows are the tasks sorted by their path (lexicographically by the module they use at each
    stage), so the tasks of a module form one block of rows at every stage of a nested tree
    (CoNAL, LTB) and no two nodes of a stage overlap. A node is labelled with its number of
    tasks ("all" for an all-shared module); a task-specific node sits on its task's row.
    """
    T, L = tree.n_tasks, tree.n_stages
    order = sorted(range(T), key=lambda t: tuple(min(g) if (g := tree.group_of(s, t)) else T for s in range(L)))
    y = {t: T - 1 - i for i, t in enumerate(order)}  # sorted path order, top to bottom

    def node_y(g) -> float:
        return sum(y[t] for t in g) / len(g)

    edges: set[tuple[tuple[float, float], tuple[float, float], bool]] = set()
    x_in = -1.0
    for t in range(T):
        prev, skipped = (x_in, (T - 1) / 2), False
        for s in range(L):
            g = tree.group_of(s, t)
            if g is None:
                skipped = True
                continue
            cur = (float(s), node_y(g))
            edges.add((prev, cur, skipped))
            prev, skipped = cur, False
        edges.add((prev, (float(L), float(y[t])), skipped))
    for (x0, y0), (x1, y1), dashed in edges:
        ax.plot([x0, x1], [y0, y1], color="#555", lw=1.0, ls="--" if dashed else "-", zorder=1)
    for s, groups in enumerate(tree.stages):
        for g in groups:
            kind = tree.kind(g)
            ax.scatter([s], [node_y(g)], s=280 if kind != "specific" else 60, color=_KIND_COLOR[kind],
                       edgecolor="black", lw=0.6, zorder=3)
            if kind != "specific":
                ax.text(s, node_y(g), "all" if kind == "shared" else str(len(g)), ha="center", va="center",
                        fontsize=6.5, zorder=4, color="white" if kind == "shared" else "black")
    ax.scatter([x_in], [(T - 1) / 2], s=60, color="black", zorder=3)
    for t, name in enumerate(tree.tasks):
        ax.text(L + 0.08, y[t], name, va="center", fontsize=7)
    ax.set_xticks([x_in, *range(L)], ["input", *[f"stage {s}" for s in range(L)]], fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(x_in - 0.3, L + 1.6)
    ax.set_ylim(-0.8, T - 0.2)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=9)


def plot_trees(run: RunData, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not run.trees:
        return None
    n = len(run.trees)
    T = max(t.n_tasks for t in run.trees.values())
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 0.9 + 0.32 * max(T, 3)), squeeze=False)
    for ax, (name, tree) in zip(axes[0], run.trees.items()):
        draw_tree(ax, tree, f"{name} ({tree.method}, {tree.n_stages} stages)")
    legend = [Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", label=k) for k, c in _KIND_COLOR.items()]
    legend.append(Line2D([], [], color="#555", ls="--", label="skips a stage"))
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"learned architecture: {run.name}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- summary ---------------------------------------------------------------------------------------
def _headline(runs: list[RunData]) -> dict[str, str]:
    """task -> the metric that heads the summary (:func:`mtrl_arch.table.headline_metrics`: GLUE's tasks each
    have their own); before any evaluation, the first logged metric's tasks."""
    metrics = headline_metrics(runs[0].cfg.domain, [final_eval(r.metrics) for r in runs])
    if metrics:
        return metrics
    first = "success_rate" if runs[0].cfg.domain == "rl" else next(iter(runs[0].curves), "")
    return {t: first for t in _tasks(runs, first)} or {_MEAN: first}


def _final(run: RunData, metrics: dict[str, str]) -> dict[str, float]:
    """The last evaluation's value of each task's headline metric (and their mean)."""
    names = set(metrics.values())
    if len(names) == 1:  # the run's own task mean where it logs one
        c = run.curves.get(next(iter(names)), {})
        out = {t: pts[-1][1] for t, pts in c.items() if pts}
        if c and _MEAN not in out:
            tm = _task_mean(c)
            if tm:
                out[_MEAN] = tm[-1][1]
        return out
    out = {t: run.curves[m][t][-1][1] for t, m in metrics.items() if run.curves.get(m, {}).get(t)}
    if out and len(out) == len(metrics):
        out[_MEAN] = sum(out.values()) / len(out)
    return out


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.3f}"
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.3f} ± {s:.3f}"


def _params(run: RunData) -> str:
    """Total parameters per network, as last logged (after a search: the derived networks)."""
    totals: dict[str, Any] = {}
    for rec in run.metrics:
        for k, v in rec.items():
            if k.startswith("params/") and k.endswith("/total") and _is_number(v):
                totals[k.split("/")[1] if k.count("/") == 2 else "net"] = int(v)
    return ", ".join(f"{n} {v:,}" for n, v in totals.items()) or "-"


def _arch_summary(run: RunData) -> str:
    if not run.trees:
        return "(search not finished)" if run.cfg.arch.method not in ("hps", "stl") else run.cfg.arch.method
    parts = []
    for name, t in run.trees.items():
        parts.append(f"{name}: " + "·".join(str(len(g)) for g in t.stages) + " modules per stage")
    return "; ".join(parts)


def summary(groups: list[tuple[str, list[RunData]]]) -> tuple[str, dict[str, Any]]:
    runs = [r for _, g in groups for r in g]
    metrics = _headline(runs)
    metric, headers = headline_columns(metrics)
    tasks = _tasks(runs, metric) if metric else list(metrics)
    if metric:
        headers = tasks
    what = f"`eval/{metric}`" if metric else "each task's first `eval/` metric"
    lines = [f"# Report: {len(runs)} run(s), {len(groups)} setting(s)", "",
             f"Final {what} (last evaluation of each run), mean ± std over seeds.", "",
             "| setting | seeds | mean | " + " | ".join(headers) + " | env/data steps |",
             "|---|---|---|" + "---|" * len(tasks) + "---|"]
    data: dict[str, Any] = {"metric": metric or metrics, "groups": [], "runs": []}
    for label, members in groups:
        finals = [_final(r, metrics) for r in members]
        cells = [_mean_std([f[t] for f in finals if t in f]) for t in [_MEAN, *tasks]]
        steps = max((r.metrics[-1]["step"] for r in members if r.metrics), default=0)
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + f" | {steps:,} |")
        data["groups"].append({"setting": label, "runs": [str(r.path) for r in members],
                               "final": {t: [f.get(t) for f in finals] for t in [_MEAN, *tasks]}})
    lines += ["", "| run | seed | mean | steps | parameters | architecture |", "|---|---|---|---|---|---|"]
    for r in runs:
        f = _final(r, metrics)
        steps = r.metrics[-1]["step"] if r.metrics else 0
        m = f"{f[_MEAN]:.3f}" if _MEAN in f else "-"
        lines.append(f"| {r.name} | {r.cfg.seed} | {m} | {steps:,} | {_params(r)} | {_arch_summary(r)} |")
        data["runs"].append({"run": str(r.path), "seed": r.cfg.seed, "final": f, "steps": steps,
                             "trees": {k: t.to_dict()["stages"] for k, t in r.trees.items()}})
    return "\n".join(lines) + "\n", data


def _against_size(groups: list[tuple[str, list[RunData]]], out: Path,
                  lower_is_better: dict[str, bool] | None) -> tuple[Path | None, str, list[dict]]:
    """The headline metric against trunk parameters (``params-<metric>.png``) and each searched setting against
    its random and width-matched HPS counterparts (:mod:`mtrl_arch.params_report`)."""
    runs = [r for _, g in groups for r in g]
    metrics = _headline(runs)
    metric = headline_columns(metrics)[0] or "headline"
    settings = params_report.settings_of(groups, [setting(g[0].cfg, g[0].record) for _, g in groups],
                                         lambda r: _final(r, metrics).get(_MEAN))
    lower = {**LOWER_IS_BETTER, **(lower_is_better or {})}.get(metric, False)
    fig = params_report.plot_params(settings, metric, out / f"params-{_safe(metric)}.png", not lower)
    table, rows = params_report.comparisons(settings, metric)
    return fig, table, rows


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def reference_table(groups: list[tuple[str, list[RunData]]], reference: dict[str, Any]) -> tuple[str, list[dict]]:
    """Each group's mean (and per-seed values) at the reference's steps, against the reference."""
    metric, rows = reference["metric"], []
    lines = [f"## Against the reference (`eval/{metric}/mean`)", ""]
    if reference["source"]:
        lines += [f"Reference: {reference['source']}", ""]
    lines += ["| setting | env steps | seeds | per seed | mean ± std | reference | ours - reference |", "|---|---|---|---|---|---|---|"]
    for label, members in groups:
        per_run = [_run_mean(r, metric) for r in members]
        for ser in reference["series"]:
            for step, ref in ser["points"]:
                vals = [p[step] for p in per_run if step in p]
                if not vals:
                    continue
                m = sum(vals) / len(vals)
                cells = ", ".join(f"{v:.3f}" for v in vals)
                lines.append(f"| {label} | {int(step):,} | {len(vals)} | {cells} | {_mean_std(vals)} | "
                             f"{ref:.2f} ({ser['label']}) | {m - ref:+.3f} |")
                rows.append({"setting": label, "step": step, "values": vals, "mean": m, "reference": ref,
                             "reference_label": ser["label"], "difference": m - ref})
    if not rows:
        lines.append("| (no run has an evaluation at a reference step) | | | | | | |")
    return "\n".join(lines) + "\n", rows


def make_report(run_dirs: list[Path], out: Path | None = None, reference: Path | None = None,
                baseline: str | None = None, lower_is_better: dict[str, bool] | None = None) -> Path:
    """Figures (PNG) and summary.md (with the methods table, :mod:`mtrl_arch.table`) for the runs in
    ``run_dirs``; returns the report folder. ``baseline``: the Delta_m baseline setting (default: the STL one)."""
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    ref = load_reference(reference) if reference is not None else None
    runs = [load_run(Path(p)) for p in run_dirs]
    out = Path(out) if out is not None else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    figures = []
    metrics = list(dict.fromkeys(m for r in runs for m in r.curves))
    if runs[0].cfg.domain == "rl":  # success first (the benchmark's measure), return shows progress before success
        metrics = [m for m in ("success_rate", "return") if m in metrics] or metrics
    for m in metrics:
        p = plot_metric(groups, m, out / f"{_safe(m)}.png", ref)
        if p is not None:
            figures.append(p)
    for r in runs:
        p = plot_trees(r, out / f"tree-{_safe(r.name)}.png")
        if p is not None:
            figures.append(p)
        for prefix, title, ylabel in (("arch", "architecture choice probabilities during the search", "probability"),
                                      ("conflict", "gradient conflicts per shared group (running rates)", "rate")):
            p = plot_trajectories(r, prefix, out / f"{prefix}-{_safe(r.name)}.png", title, ylabel)
            if p is not None:
                figures.append(p)
    text, data = summary(groups)
    table, data["methods"] = methods_table(groups, baseline, lower_is_better)
    text += "\n## Methods table\n\n" + table
    if len(groups) > 1:
        p, table, data["against_budget"] = _against_size(groups, out, lower_is_better)
        figures += [p] if p is not None else []
        text += "\n" + table if table else ""
    if ref is not None:
        table, data["reference"] = reference_table(groups, ref)
        text += "\n" + table
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(data, indent=1, default=str))
    return out
