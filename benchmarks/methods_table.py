"""The multi-seed methods table behind benchmarks/results/methods/*.md (issue: sharing that pays).

    python benchmarks/methods_table.py DATA_ROOT [--regimes capacity,data,wide] [--rows stl,hps,...]
                                       [--seeds 0,1,2] [--jobs 2] [--out RUNS] [--only-table]

Every (regime, row, seed) is one ordinary ``mtrl-arch train`` run in ``RUNS/<regime>/<row>-s<seed>``
(a finished run, one with model.pt, is skipped; an interrupted one is resumed), ``--jobs``
at a time, each on one torch thread. Then :func:`mtrl_arch.table.methods_table` writes one
table per regime to ``benchmarks/results/methods/<regime>.{md,json}`` (Delta_m of every seed
against the STL row's seed mean). ``mtrl-arch report RUNS/<regime>/* --baseline stl`` gives
the same table with curves.

Regimes (Multi-Fashion+MNIST unless the regime says otherwise; LeNet, Adam 1e-3, batch 128):

* ``capacity``: 20,000 training composites, 3 epochs (the budget of results/supervised.md):
  LeNet is too small for two tasks, STL wins.
* ``wide``: a LeNet twice as wide (``model.options.width=2``, 4x the parameters) on 10,000
  composites, 3 epochs: more capacity per task.
* ``data``: 1,000 training composites, 60 epochs (trained until the validation accuracy
  stops rising): few data, where sharing should help.
* ``data_mm`` / ``data_mf``: the ``data`` regime on Multi-MNIST / Multi-Fashion.
* ``glue``: the five GLUE tasks on the shipped ``glue_*`` configs, a 2-layer d 64 transformer from
  scratch, every task capped at 8,000 training examples (CoLA keeps all its 7,696: with less, STL's
  CoLA correlation stays near 0), 6 epochs of 250 batches; rows stl, hps, conal, conal_margin,
  hps_pcgrad (the Multi-* rows whose configs GLUE has; DATA_ROOT holds ``glue/``).
* ``mt10``: the README's main job ``mt10_quick`` (4 MT10 tasks, 80,000 env steps) with
  ``arch.method`` stl, hps or conal (5,000 search vector steps inside the same budget).

Searches run on the search-training share (80% of the training composites) for about one
epoch's worth of steps (``data``: 20 epochs' worth), the architecture learning rate 1e-2;
AdaShare needs residual blocks, which LeNet lacks, so it has no row here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "methods"

LENET = ["model.backbone=lenet", "train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0", "train.lr_milestones=[]",
         "train.batch_size=128", "eval.batch_size=1000"]
# GLUE: the shipped glue_* configs at a budget where STL learns every task on this CPU (a 2-layer d 64
# transformer, every task capped at 8,000 training examples, so CoLA keeps all of its 7,696)
GLUE = ["model.options.d_model=64", "model.options.d_ff=128", "model.options.n_layers=2", "train.lr=0.001",
        "data.options.train_subset=8000", "train.checkpoint_every_epochs=1"]
COMMON = ["train.threads=1", "wandb.mode=disabled"]
# regime -> (config family, overrides, search steps: one pass over the 80% search-training share, or as stated)
REGIMES = {
    "capacity": ("multi_fashion_mnist", LENET + ["data.options.train_subset=20000", "train.epochs=3", "eval.every_epochs=3"], 125),
    "wide": ("multi_fashion_mnist", LENET + ["model.options.width=2", "data.options.train_subset=10000", "train.epochs=3",
                                             "eval.every_epochs=3"], 63),
    "data": ("multi_fashion_mnist", LENET + ["data.options.train_subset=1000", "train.epochs=60", "eval.every_epochs=60"], 120),
    "data_mm": ("multi_fashion_mnist", LENET + ["data.name=multi_mnist", "data.options.train_subset=1000", "train.epochs=60",
                                                "eval.every_epochs=60"], 120),
    "data_mf": ("multi_fashion_mnist", LENET + ["data.name=multi_fashion", "data.options.train_subset=1000", "train.epochs=60",
                                                "eval.every_epochs=60"], 120),
    "glue": ("glue", GLUE + ["train.epochs=6", "eval.every_epochs=6"], 250),
    # the README's main job (4 MT10 tasks, 80k env steps); a search's steps count in that budget
    "mt10": ("mt10_quick", [], 5000),
}
# MT10 rows: the methods on mt10_quick; CoNAL's alpha at lr 1e-3 for 5,000 vector steps (about 5 logits)
MT10_ROWS = {"stl": ["arch.method=stl"], "hps": [],
             "conal": ["arch.method=conal", "arch.search_steps=5000", "arch.options.lr=1e-3"]}
TITLES = {"capacity": "Multi-Fashion+MNIST, capacity-limited (LeNet, 20,000 composites, 3 epochs)",
          "wide": "Multi-Fashion+MNIST, a 2x wider LeNet (10,000 composites, 3 epochs)",
          "data": "Multi-Fashion+MNIST, data-limited (LeNet, 1,000 composites, 60 epochs)",
          "data_mm": "Multi-MNIST, data-limited (LeNet, 1,000 composites, 60 epochs)",
          "data_mf": "Multi-Fashion, data-limited (LeNet, 1,000 composites, 60 epochs)",
          "glue": "GLUE, five tasks (2-layer transformer d 64 from scratch, <= 8,000 examples per task, 6 epochs)",
          "mt10": "MT10 quick (mt10_quick: reach, drawer-close, window-open, window-close; 80,000 env steps, MT-SAC 2x256)"}


def rows(steps: int, family: str = "multi_fashion_mnist") -> dict[str, tuple[str, list[str]]]:
    """row -> (config, overrides); ``steps``: the search's steps. A row whose config the family lacks is not run."""
    search = [f"arch.search_steps={steps}", "arch.options.lr=0.01"]
    return {
        "stl": (f"{family}_stl", []),
        "hps": (f"{family}_hps", []),
        "hps_pcgrad": (f"{family}_hps", ["weighting=pcgrad"]),
        "conal": (f"{family}_conal", search),
        "conal_margin": (f"{family}_conal", search + ["arch.derive=margin", "arch.derive_margin=0.2"]),
        "conal_budget": (f"{family}_conal", search + ["arch.max_params=0.95*stl"]),
        "conal_pro": (f"{family}_conal_pro", [f"arch.search_steps={steps - steps % 3}",
                                              f"arch.options.steps_per_stage={steps // 3}", "arch.options.lr=0.01"]),
        "recon": (f"{family}_recon", [f"arch.search_steps={steps}", "arch.options.fraction=0", "arch.options.k=1"]),
        "ltb": (f"{family}_ltb", [f"arch.search_steps={steps}", f"arch.options.total_steps={steps}"]),
    }


def stl_trunk_params(width: int) -> int:
    """The STL LeNet trunk's parameters (two copies of conv 1->10w, conv 10w->20w, fc 500w->50w)."""
    c1, c2, f = 10 * width, 20 * width, 50 * width
    return 2 * ((81 * c1 + c1) + (25 * c1 * c2 + c2) + (25 * c2 * f + f))


def overrides_for(regime: str, row: str, root: str, cache: Path) -> tuple[str, list[str]] | None:
    """(config, overrides) of one row in one regime, or None where the regime's family has no such row."""
    family, ov, steps = REGIMES[regime]
    if family == "mt10_quick":
        return (family, [*COMMON, *MT10_ROWS[row]]) if row in MT10_ROWS else None
    config, extra = rows(steps, family)[row]
    if not (REPO / "configs" / f"{config}.yaml").is_file() or (family != "multi_fashion_mnist" and row == "conal_budget"):
        return None  # conal_budget's 95% of STL is counted for LeNet only
    width = next((int(o.split("=")[1]) for o in ov if o.startswith("model.options.width=")), 1)
    extra = [o.replace("0.95*stl", str(int(0.95 * stl_trunk_params(width)))) for o in extra]
    data = [f"data.root={root}"] + ([f"data.options.cache_dir={cache}"] if family == "multi_fashion_mnist" else [])
    return config, [*data, *COMMON, *ov, *extra]


def train(run_dir: Path, config: str, overrides: list[str], seed: int) -> tuple[str, int, float]:
    if (run_dir / "model.pt").is_file():
        return str(run_dir), 0, 0.0
    cmd = [sys.executable, "-m", "mtrl_arch.cli", "train"]
    cmd += (["--resume", str(run_dir)] if (run_dir / "config.yaml").is_file()
            else [config, *overrides, f"seed={seed}", f"run_dir={run_dir}"])
    cmd.append("--no-progress")
    t0 = time.time()
    with open(str(run_dir) + ".log", "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    print(f"[{run_dir.parent.name}/{run_dir.name}] exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return str(run_dir), rc, time.time() - t0


def table(regime: str, out: Path, row_names: list[str]) -> None:
    from mtrl_arch.report import load_run
    from mtrl_arch.table import methods_table

    groups = []
    for row in row_names:
        runs = [load_run(d) for d in sorted((out / regime).glob(f"{row}-s*")) if d.is_dir() and (d / "model.pt").is_file()]
        if runs:
            groups.append((row, runs))
    if not groups:
        return
    text, data = methods_table(groups, baseline="stl" if any(g == "stl" for g, _ in groups) else None)
    vers = {p: metadata.version(p) for p in ("mtrl-arch", "torch", "numpy", "scipy")}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    config, ov = overrides_for(regime, "conal", "DATA_ROOT", Path("CACHE")) or overrides_for(regime, "stl", "DATA_ROOT", Path("CACHE"))
    footer = (f"Machine: {platform.processor() or platform.machine()}, 2 cores shared with other jobs, torch threads 1 "
              f"per run, {platform.platform()}. Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items())
              + f", Python {platform.python_version()}; table made at commit {git}. Runs: `python benchmarks/methods_table.py "
              f"DATA_ROOT --regimes {regime}` (each row's command is in its run directory's config.yaml). Wall time: "
              f"the training loop's (search + retrain + evaluation) under a shared CPU's load: compare within a row only.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{regime}.md").write_text(f"## {TITLES[regime]}\n\n{text}\n{footer}\n")
    (RESULTS / f"{regime}.json").write_text(json.dumps({"regime": regime, "title": TITLES[regime], "overrides": ov,
                                                        "versions": vers, "git_commit": git, **data}, indent=1, default=str))
    print(f"wrote {RESULTS / f'{regime}.md'}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_root")
    p.add_argument("--regimes", default="capacity,data,data_mm,wide,data_mf")
    p.add_argument("--rows", default=",".join(rows(1)))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "runs" / "methods"))
    p.add_argument("--only-table", action="store_true")
    a = p.parse_args()
    out, regimes, row_names = Path(a.out), a.regimes.split(","), a.rows.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.only_table:
        jobs = []
        for seed in seeds:  # seed-major: every row gets its first seed before any row gets its third
            for regime in regimes:
                for row in row_names:
                    (out / regime).mkdir(parents=True, exist_ok=True)
                    which = overrides_for(regime, row, a.data_root, out / "cache")
                    if which:
                        jobs.append((out / regime / f"{row}-s{seed}", *which, seed))
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda j: train(*j), jobs))
    for regime in regimes:
        table(regime, out, row_names)


if __name__ == "__main__":
    main()
