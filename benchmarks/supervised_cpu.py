"""The supervised CPU benchmark behind benchmarks/results/supervised.{json,md}.

Runs every setting below with ``mtrl-arch train`` one after another (a finished run,
one with model.pt, is skipped, so the script can be re-run after an interruption), then
collects the last evaluation of each run into the JSON and the Markdown table.

    python benchmarks/supervised_cpu.py [DATA_ROOT] [--only-table]

The budget is sized for a busy 2-core CPU (about an hour in all on a machine with a load average of 6-8), far below the papers'
(see the "Budget" lines of the table): LeNet instead of ResNet-18 on the Multi-* sets, a
20,000-composite training subset, 3 epochs, searches of about one epoch with a larger
architecture learning rate, one seed.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "bench_supervised"
RESULTS = REPO / "benchmarks" / "results"

# Multi-Fashion+MNIST / Multi-MNIST: LeNet, Adam 1e-3, batch 128, 20,000 training composites
# (157 batches per epoch), 3 epochs, evaluation on the full 20,000 test composites and
# 12,000 validation composites. Searches: one epoch of the search data.
MULTI = ["model.backbone=lenet", "train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0", "train.lr_milestones=[]",
         "train.batch_size=128", "train.epochs=3", "data.options.train_subset=20000", "eval.every_epochs=3",
         "eval.batch_size=1000", "train.threads=1", "wandb.mode=disabled"]
CONAL = ["arch.search_steps=125", "arch.options.lr=0.01"]  # 16,000 / 128 = 125: one epoch of the 80% share
# AdaShare needs residual blocks (LeNet has none): ResNet-18 at width 8, 6,000 composites, 2 epochs
RESNET = ["model.options.width=8", "train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0", "train.lr_milestones=[]",
          "train.batch_size=128", "train.epochs=2", "data.options.train_subset=6000", "eval.every_epochs=2",
          "eval.batch_size=500", "train.threads=1", "wandb.mode=disabled"]
# GLUE: CoLA, MRPC, RTE, STS-B; a 2-layer transformer (d 64) from scratch, 1,000 examples per task,
# batch 16 per task, 2 epochs (63 batches each)
GLUE = ["data.tasks=[CoLA,MRPC,RTE,STS-B]", "data.options.train_subset=1000", "data.options.max_len=64",
        "data.options.vocab_size=4000", "model.options.d_model=64", "model.options.d_ff=128", "model.options.n_layers=2",
        "train.batch_size=16", "train.epochs=2", "eval.every_epochs=2", "eval.batch_size=64", "train.threads=1",
        "wandb.mode=disabled"]


def runs(root: str) -> list[tuple[str, str, list[str], str | None]]:
    """(name, config, overrides, name of the STL baseline run)."""
    mfm = [f"data.root={root}", f"data.options.cache_dir={OUT / 'cache'}"]
    out = [("mfm_stl", "multi_fashion_mnist_stl", mfm + MULTI, None)]
    for name, cfg, extra in [
        ("mfm_hps", "multi_fashion_mnist_hps", []),
        ("mfm_hps_pcgrad", "multi_fashion_mnist_hps", ["weighting=pcgrad"]),
        ("mfm_hps_cagrad", "multi_fashion_mnist_hps", ["weighting=cagrad"]),
        ("mfm_conal", "multi_fashion_mnist_conal", CONAL),
        ("mfm_conal_cn", "multi_fashion_mnist_conal", CONAL + ["arch.conflict_noticed=true"]),
        ("mfm_conal_pcgrad", "multi_fashion_mnist_conal", CONAL + ["weighting=pcgrad"]),
        ("mfm_conal_cagrad", "multi_fashion_mnist_conal", CONAL + ["weighting=cagrad"]),
        ("mfm_conal_pro", "multi_fashion_mnist_conal_pro",
         ["arch.search_steps=126", "arch.options.steps_per_stage=42", "arch.options.lr=0.01"]),
        ("mfm_recon", "multi_fashion_mnist_recon",  # 3 LeNet stages: turn the most conflicting one task-specific
         ["arch.search_steps=157", "arch.options.fraction=0", "arch.options.k=1"]),
        ("mfm_ltb", "multi_fashion_mnist_ltb", ["arch.search_steps=157", "arch.options.total_steps=157"]),
    ]:
        out.append((name, cfg, mfm + MULTI + extra, "mfm_stl"))
    out.append(("mfm_r8_stl", "multi_fashion_mnist_stl", mfm + RESNET, None))
    out.append(("mfm_r8_hps", "multi_fashion_mnist_hps", mfm + RESNET, "mfm_r8_stl"))
    out.append(("mfm_r8_adashare", "multi_fashion_mnist_adashare", mfm + RESNET + [
        "arch.search_steps=126", "arch.options.warmup_steps=40", "arch.options.weight_steps=10",
        "arch.options.policy_steps=10", "arch.options.curriculum_speed=1"], "mfm_r8_stl"))
    mm = [f"data.root={root}", f"data.options.cache_dir={OUT / 'cache'}"]
    out.append(("mm_stl", "multi_fashion_mnist_stl", mm + MULTI + ["data.name=multi_mnist"], None))
    out.append(("mm_hps", "multi_mnist_hps", mm + MULTI, "mm_stl"))
    out.append(("mm_conal", "multi_mnist_conal", mm + MULTI + CONAL, "mm_stl"))
    g = [f"data.root={root}"]
    out.append(("glue_stl", "glue_stl", g + GLUE, None))
    out.append(("glue_hps", "glue_hps", g + GLUE, "glue_stl"))
    out.append(("glue_conal", "glue_conal", g + GLUE + ["arch.search_steps=100", "arch.options.lr=0.01"], "glue_stl"))
    return out


def train(name: str, config: str, overrides: list[str], baseline: str | None) -> None:
    run_dir = OUT / name
    if (run_dir / "model.pt").is_file():
        print(f"[{name}] done already", flush=True)
        return
    cmd = ["mtrl-arch", "train"]
    cmd += (["--resume", str(run_dir)] if (run_dir / "config.yaml").is_file() else [config, *overrides, f"run_dir={run_dir}"])
    if baseline and not (run_dir / "config.yaml").is_file():
        cmd.append(f"eval.baseline_run={OUT / baseline}")
    cmd.append("--no-progress")
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(f"[{name}] exit {r.returncode} after {time.time() - t0:.0f} s", flush=True)
    if r.returncode:
        print(r.stderr[-3000:], flush=True)


def collect(root: str) -> dict:
    from mtrl_arch.logger import read_metrics
    from mtrl_arch.run import read_arch

    rows = []
    for name, config, overrides, baseline in runs(root):
        run_dir = OUT / name
        recs = read_metrics(run_dir) if run_dir.is_dir() else []
        evals = [r for r in recs if any(k.startswith("eval/") for k in r)]
        if not evals:
            continue
        last = evals[-1]
        params = {k.split("/")[-1]: v for r in recs for k, v in r.items() if k.startswith("params/trunk/")}
        tree = read_arch(run_dir)["trunk"]
        rows.append({
            "name": name, "config": config, "overrides": overrides, "baseline": baseline,
            "command": f"mtrl-arch train {config} {' '.join(overrides)} run_dir={run_dir}"
                       + (f" eval.baseline_run={OUT / baseline}" if baseline else ""),
            "test": {k[5:]: v for k, v in last.items() if k.startswith("eval/")},
            "val": {k[4:]: v for k, v in last.items() if k.startswith("val/")},
            "params": params, "wall_s": last.get("time/wall_s"), "steps": last["step"],
            "arch": [[list(g) for g in st] for st in tree.stages], "arch_meta": tree.meta,
        })
    vers = {p: metadata.version(p) for p in ("mtrl-arch", "torch", "numpy")}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": 2, "torch_threads": 1, "note": "2 cores shared with other jobs (load average 6-9)"},
            "versions": {**vers, "python": platform.python_version()}, "git_commit": git, "seed": 0, "runs": rows}


def _arch(stages: list, T: int) -> str:
    """One letter per stage (:func:`mtrl_arch.table.tree_code`) of a recorded ``[[task, ...], ...]`` per stage."""
    from mtrl_arch.table import tree_code
    from mtrl_arch.tree import Tree

    return tree_code(Tree(tuple(str(t) for t in range(T)), tuple(tuple(tuple(g) for g in st) for st in stages)))


def markdown(res: dict) -> str:
    """The results tables (one per data set) for benchmarks/results/supervised.md and the README."""
    lines = []
    groups = [("Multi-Fashion+MNIST, LeNet", "mfm_", ["top_left", "bottom_right"]),
              ("Multi-Fashion+MNIST, ResNet-18 (width 8)", "mfm_r8_", ["top_left", "bottom_right"]),
              ("Multi-MNIST, LeNet", "mm_", ["top_left", "bottom_right"])]
    for title, prefix, tasks in groups:
        rows = [r for r in res["runs"] if r["name"].startswith(prefix) and (prefix == "mfm_r8_" or not r["name"].startswith("mfm_r8_"))]
        if not rows:
            continue
        lines += [f"**{title}** (test accuracy, 20,000 composites; Delta_m vs the STL row)", "",
                  "| run | method | weighting | top_left | bottom_right | mean | Delta_m % | params (shared / specific / total) | arch | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            t, p = r["test"], r["params"]
            o = {k.split("=")[0]: k.split("=", 1)[1] for k in r["overrides"] if "=" in k}
            method = r["config"].split("_")[-1] if not r["config"].endswith("conal_pro") else "conal_pro"
            if o.get("arch.conflict_noticed") == "true":
                method += " +CN"
            dm = t.get("delta_m")
            lines.append(f"| {r['name']} | {method} | {o.get('weighting', 'ew')} | {t['accuracy/top_left']:.4f} | "
                         f"{t['accuracy/bottom_right']:.4f} | {t['accuracy/mean']:.4f} | "
                         f"{'-' if dm is None else f'{dm:+.2f}'} | {p.get('shared', 0):,} / {p.get('specific', 0):,} / "
                         f"{p.get('total', 0):,} | {_arch(r['arch'], len(tasks))} | {r['wall_s']:.0f} |")
        lines.append("")
    rows = [r for r in res["runs"] if r["name"].startswith("glue_")]
    if rows:
        lines += ["**GLUE (CoLA, MRPC, RTE, STS-B), 2-layer transformer from scratch** (dev sets; Delta_m vs STL over all metrics)", "",
                  "| run | method | CoLA mcc | MRPC f1 / acc | RTE acc | STS-B pearson / spearman | Delta_m % | params (shared / subgroup / specific / total) | arch | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            t, p = r["test"], r["params"]
            dm = t.get("delta_m")
            lines.append(f"| {r['name']} | {r['config'].split('_')[-1]} | {t['mcc/CoLA']:.3f} | {t['f1/MRPC']:.3f} / "
                         f"{t['accuracy/MRPC']:.3f} | {t['accuracy/RTE']:.3f} | {t['pearson/STS-B']:.3f} / "
                         f"{t['spearman/STS-B']:.3f} | {'-' if dm is None else f'{dm:+.2f}'} | {p.get('shared', 0):,} / "
                         f"{p.get('subgroup', 0):,} / {p.get('specific', 0):,} / {p.get('total', 0):,} | "
                         f"{_arch(r['arch'], 4)} | {r['wall_s']:.0f} |")
        lines.append("")
    v, m = res["versions"], res["machine"]
    lines += [f"Seed {res['seed']}, one run each. Machine: {m['processor']}, {m['cpus']} cores shared with other jobs "
              f"(load average 6-9 during the runs), torch threads {m['torch_threads']}; {m['platform']}. Versions: "
              f"mtrl-arch {v['mtrl-arch']}, torch {v['torch']}, numpy {v['numpy']}, Python {v['python']}; commit "
              f"{res['git_commit']}. Wall time is the training loop's (search + retrain + evaluation), without start-up."]
    return "\n".join(lines) + "\n\n" + NOTES


NOTES = """**Reading the numbers** (seed 0, one run each; written for the committed results):

* *Budget, not method, sets the level.* 3 epochs on 20,000 of the 120,000 composites leave
  LeNet far from converged (train losses still falling). Hard sharing halves the trunk's
  parameters, and at this budget capacity is what the tasks lack: HPS is 10% below STL on
  Multi-Fashion+MNIST (3.8% on Multi-MNIST, where both tasks are digits), and PCGrad or
  CAGrad on the HPS trunk do not change that (-9.6%, -9.8%).
* *CoNAL and CoNAL-Pro chose fully task-specific networks* (branch point 0 for both tasks:
  p = 0.69 / 0.57 for CoNAL +CN; in CoNAL-Pro no task stayed in any round), so their
  retrain is an STL network; the four CoNAL rows are identical because with no shared
  module left the conflict-noticed operation, PCGrad and CAGrad have nothing to act on in
  the retrain (they changed only the search). Their spread against the STL row (+0.9% to
  +2.1%) comes from the per-task heads' initialisation and data order after the search,
  i.e. it is the noise level of one seed here.
* *Recon* ranked stage 0 (conv 1, 820 parameters) as the most conflicting (46 of 157
  steps with cosine < -0.1, against 45 and 30), turned it task-specific (2.7% of the
  shared parameters, within the paper's "fewer than 13%") and recovered more than half of
  HPS's gap to STL (-4.2% vs -10.1%) with 3% more parameters than HPS. *LTB* shared the
  two conv stages and split the fc stage (-5.4%).
* *AdaShare* (ResNet-18 at width 8, 2 epochs on 6,000 composites) skipped block 6 for both
  tasks and block 8 for top_left; all three ResNet runs are badly undertrained (the MNIST
  task at 30% under sharing).
* *GLUE* from scratch on 1,000 examples per task learns little (CoLA's MCC is about 0 for
  every run). Delta_m is then dominated by CoLA's near-zero STL baseline (0.008): CoNAL's
  +66% is 0.033 vs 0.008 on CoLA, not a real gain. CoNAL kept the embedding and first
  block shared and split RTE from the others in the last two stages.
* *Against the Recon paper* (ResNet-18, full data, 120 epochs, SGD, 3 seeds): we could not
  retrieve its Multi-Fashion+MNIST table through the search tools available here, so no
  number-by-number comparison is made. What can be compared agrees qualitatively: the
  shallowest layers rank as the most conflicting (its released ranking is led by bn1 and
  layer1 BatchNorms), the converted share of shared parameters is small, and Recon
  improves on its base method (EW). The absolute accuracies here are far lower because
  of LeNet, 1/6 of the data and 1/40 of the epochs.
"""


def main(argv: list[str]) -> int:
    root = next((a for a in argv if not a.startswith("--")), str(REPO.parent / "shared" / "data"))
    if "--only-table" not in argv:
        OUT.mkdir(parents=True, exist_ok=True)
        for spec in runs(root):
            train(*spec)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = collect(root)
    (RESULTS / "supervised.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "supervised.md").write_text(markdown(res))
    print(f"wrote {RESULTS / 'supervised.json'} and supervised.md ({len(res['runs'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
