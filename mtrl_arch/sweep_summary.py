"""A sweep's summary: per setting over its seeds, every final ``eval/*`` value's mean, std and t-interval
(``summary.md``/``summary.json`` in the sweep folder); the methods table with curves is the report's."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .logger import read_metrics
from .table import final_eval

SWEEP_FORMAT = "mtrl-arch/sweep"


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "did not run"
    if rc < 0:
        return "killed" if rc == -9 else f"signal {-rc}"
    return {1: "crashed", 2: "user error", 3: "diverged", 4: "checkpoint write failed"}.get(rc, f"exit {rc}")


# ---- statistics -------------------------------------------------------------------------------------
def t_interval(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample std and the two-sided ``level`` t-interval of the mean (None with one value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return {"n": n, "mean": m, "std": None, "ci95": None, "values": values}
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    from scipy.stats import t as student_t

    h = float(student_t.ppf(0.5 + level / 2, n - 1)) * s / math.sqrt(n)
    return {"n": n, "mean": m, "std": s, "ci95": [m - h, m + h], "values": values}


def last_eval(run_dir: str | Path) -> dict[str, float]:
    """The numeric ``eval/*`` values of the run's last evaluation line."""
    return final_eval(read_metrics(run_dir))


def summarise(trials: list[Any], record: dict[str, Any], grid: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """The summary of a sweep's ``trials`` (:class:`~mtrl_arch.sweep.Trial`) run with ``grid``'s settings."""
    settings: dict[str, dict[str, Any]] = {}
    for t in trials:
        s = settings.setdefault(t.setting, {"setting": t.setting, "overrides": t.overrides, "seeds": [], "failed": [],
                                            "finals": []})
        if t.status == "ok":
            vals = last_eval(t.run_dir)
            s["seeds"].append(t.seed)
            s["finals"].append(vals)
        else:
            s["failed"].append(t.seed)
    out = []
    for s in settings.values():
        keys = list(dict.fromkeys(k for f in s["finals"] for k in f))
        s["metrics"] = {k: t_interval([f[k] for f in s["finals"] if k in f]) for k in keys}
        del s["finals"]
        out.append(s)
    failed = [{"trial": t.name, "exit": t.returncode, "why": describe_exit(t.returncode), "error": t.error,
               "log": t.log} for t in trials if t.status != "ok"]
    return {"format": SWEEP_FORMAT + "-summary", "version": 1, "config": record["config"], "grid": grid,
            "overrides": record["overrides"], "seeds": record["seeds"], "runner": record["runner"],
            "n_trials": len(trials), "n_ok": sum(t.status == "ok" for t in trials), "failed": failed,
            "settings": out, "trials": [asdict(t) for t in trials]}


def _cell(st: dict[str, Any] | None) -> str:
    if not st:
        return "-"
    if st["std"] is None:
        return f"{st['mean']:.4g} (n=1)"
    lo, hi = st["ci95"]
    return f"{st['mean']:.4g} ± {st['std']:.2g} [{lo:.4g}, {hi:.4g}]"


def _families(summary: dict[str, Any]) -> dict[str, list[str]]:
    """``eval/<metric>/<task>`` keys grouped by metric (``mean`` first); other ``eval/*`` keys under ''."""
    fam: dict[str, list[str]] = {}
    for s in summary["settings"]:
        for k in s["metrics"]:
            parts = k.split("/")
            name = parts[1] if len(parts) == 3 else ""
            fam.setdefault(name, [])
            if k not in fam[name]:
                fam[name].append(k)
    for name, ks in fam.items():
        ks.sort(key=lambda k: (not k.endswith("/mean"),))
    return fam


def summary_markdown(summary: dict[str, Any]) -> str:
    grid = summary["grid"]
    varied = " ".join(f"{k}={','.join(vs)}" for k, vs in grid if len(vs) > 1) or "(none)"
    fixed = " ".join(f"{k}={vs[0]}" for k, vs in grid if len(vs) == 1)
    lines = [f"# Sweep: {summary['config']}", "",
             f"Grid: `{varied}`; seeds {', '.join(map(str, summary['seeds']))}; {summary['runner']}."
             + (f" Every trial: `{fixed}`." if fixed else ""), "",
             f"{summary['n_ok']} of {summary['n_trials']} trial(s) finished.",
             "Cells: mean ± sample std over seeds [95% t-interval of the mean] of the last evaluation's value; "
             "n=1: one seed, no interval.", ""]
    fams = _families(summary)
    for name, keys in fams.items():
        cols = [k.split("/")[-1] if name else k for k in keys]
        lines += [f"## `eval/{name}`" if name else "## other `eval/*` values", "",
                  "| setting | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for s in summary["settings"]:
            seeds = f"{len(s['seeds'])}" + (f" ({len(s['failed'])} failed)" if s["failed"] else "")
            lines.append(f"| {s['setting']} | {seeds} | " + " | ".join(_cell(s["metrics"].get(k)) for k in keys) + " |")
        lines.append("")
    if not fams:
        lines += ["No trial reached an evaluation.", ""]
    if summary["failed"]:
        lines += ["## Failed trials", "", "| trial | exit | error | log |", "|---|---|---|---|"]
        for f in summary["failed"]:
            err = f["error"].replace("|", "\\|")
            lines.append(f"| {f['trial']} | {f['exit']} ({f['why']}) | {err} | {f['log']} |")
        lines.append("")
    lines += ["## Trials", "", "| trial | status | seconds | host | run directory |", "|---|---|---|---|---|"]
    for t in summary["trials"]:
        lines.append(f"| {t['name']} | {t['status']} | {t['wall_s']:.0f} | {t['host']} | {t['run_dir']} |")
    if summary.get("report"):
        lines += ["", f"Curves with seed bands, trees and per-run table: [report/summary.md](report/summary.md)"]
    return "\n".join(lines) + "\n"
