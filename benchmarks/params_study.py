"""Is a search worth running? Accuracy against trunk parameters, against its controls (issue 23).

    python benchmarks/params_study.py DATA_ROOT [--regimes data_mf,data_mm] [--rows ...] [--seeds 0,1,2,3,4]
                                      [--jobs 2] [--out RUNS] [--list]

Every (regime, row, seed) is one ordinary ``mtrl-arch train`` run in ``RUNS/<regime>/<row>-s<seed>``, run
(or resumed, or skipped when finished) by :func:`methods_table.train`. Then ``mtrl-arch report
RUNS/<regime>/* --out benchmarks/results/params/<regime>`` draws the metric against trunk parameters with
the frontier and writes the summary table with the paired-by-seed differences (searched minus random at
the same budget, searched minus width-matched HPS).

Regimes: the methods table's data-limited LeNet regimes (``data_mf``: Multi-Fashion, ``data_mm``: Multi-MNIST,
1,000 composites, 60 epochs). LeNet has three stages (conv 820, conv 5,020, fc 25,050 parameters a copy); with
two tasks each of the 2^3 trees (S: one module for both tasks, P: one per task) is a row ``tree-<code>``,
trained from the same seeds, so the search's pick is compared with the best tree (the oracle) and with the
mean over all trees. SSS is HPS (30,890 trunk parameters), PPP is STL (61,780).

Budgets (trunk parameters, heads not counted) between HPS and STL, chosen where the spaces have trees:

* 37,000: Recon's space holds SSS, PSS, SPS, PPS below it; its random band (0.9 B to B) holds SPS and PPS.
  CoNAL's space (a task leaves the trunk at one branch point: SSS, SSP, SPP, PPP) has no tree in that band,
  so CoNAL has no row at this budget.
* 57,000: CoNAL's band holds SSP alone (its random control is that tree); Recon's holds SSP and PSP.

Rows at a budget B: ``conal-B`` and ``recon-B`` (the search derives the best tree within B), ``random_conal-B``
and ``random_recon-B`` (a tree drawn uniformly, seeded by the run, from that space within 0.9 B..B), and
``hps-B`` (HPS made wider: LeNet's width picked so that its trunk is closest to B). ``conal`` and ``recon``
without a budget are the methods table's rows.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_table import REPO, overrides_for, train  # noqa: E402

TASKS = ("top_left", "bottom_right")
CODES = ["".join(c) for c in product("SP", repeat=3)]
# per space, the budgets whose random band (0.9 B to B) holds a tree of that space
BUDGETS = {"conal": (57000,), "recon": (37000, 57000)}
RESULTS = REPO / "benchmarks" / "results" / "params"


def tree_file(code: str, out: Path) -> Path:
    """A tree JSON (``arch.method=manual``) with one letter per stage: S shared by both tasks, P one module each."""
    stages = [[[0, 1]] if c == "S" else [[0], [1]] for c in code]
    p = out / "trees" / f"{code}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"format": "mtrl-arch/tree", "version": 1, "method": "manual", "tasks": list(TASKS),
                             "stages": stages}, indent=1))
    return p


def study_rows(regime: str, root: str, out: Path) -> dict[str, tuple[str, list[str]]]:
    """row -> (config, overrides) for one regime."""
    cache = out / "cache"
    config, base = overrides_for(regime, "hps", root, cache)
    rows: dict[str, tuple[str, list[str]]] = {}
    for code in CODES:
        rows[f"tree-{code}"] = (config, [*base, "arch.method=manual", f"arch.options.path={tree_file(code, out)}"])
    for name in ("conal", "recon"):
        rows[name] = overrides_for(regime, name, root, cache)
    for name, budgets in BUDGETS.items():
        for b in budgets:
            cfg, ov = overrides_for(regime, name, root, cache)
            rows[f"{name}-{b}"] = (cfg, [*ov, f"arch.max_params={b}"])
            rows[f"random_{name}-{b}"] = (config, [*base, "arch.method=random", f"arch.options.space={name}",
                                                   f"arch.max_params={b}", f"arch.min_params={int(0.9 * b)}"])
    for b in sorted({b for budgets in BUDGETS.values() for b in budgets}):
        rows[f"hps-{b}"] = (config, [*base, f"model.match_params={b}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_root")
    p.add_argument("--regimes", default="data_mf,data_mm")
    p.add_argument("--rows", default="", help="comma-separated row names (default: every row)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "params"))
    p.add_argument("--list", action="store_true", help="print each run's command and run nothing")
    p.add_argument("--only-report", action="store_true")
    a = p.parse_args()
    out, seeds = Path(a.out), [int(s) for s in a.seeds.split(",")]
    jobs = []
    for regime in a.regimes.split(","):
        rows = study_rows(regime, a.data_root, out)
        wanted = a.rows.split(",") if a.rows else list(rows)
        unknown = sorted(set(wanted) - set(rows))
        if unknown:
            sys.exit(f"unknown rows {unknown}; the rows are {sorted(rows)}")
        for seed in seeds:  # seed-major: every row gets its first seed before any row gets its second
            for row in wanted:
                (out / regime).mkdir(parents=True, exist_ok=True)
                jobs.append((out / regime / f"{row}-s{seed}", *rows[row], seed))
    if a.list:
        for run_dir, config, ov, seed in jobs:
            print(f"mtrl-arch train {config} {' '.join(ov)} seed={seed} run_dir={run_dir}")
        return
    if not a.only_report:
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda j: train(*j), jobs))
    for regime in a.regimes.split(","):
        runs = sorted(str(d) for d in (out / regime).iterdir() if d.is_dir() and (d / "model.pt").is_file())
        if runs:
            subprocess.run([sys.executable, "-m", "mtrl_arch.cli", "report", *runs, "--baseline", "tree-PPP",
                            "--out", str(RESULTS / regime)], check=False)


if __name__ == "__main__":
    main()
