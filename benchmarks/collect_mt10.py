"""Collect MT10 result runs into benchmarks/results/mt10/: per-run files, one JSON, a report.

    python benchmarks/collect_mt10.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from mtrl_arch.logger import read_metrics
from mtrl_arch.report import make_report

OUT = Path(__file__).resolve().parent / "results" / "mt10"


def main(run_dirs: list[Path]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    for rd in run_dirs:
        cfg = yaml.safe_load((rd / "config.yaml").read_text())
        lines = read_metrics(rd)
        evals = [l for l in lines if "eval/success_rate/mean" in l]
        params = {k: v for l in lines for k, v in l.items() if k.startswith("params/") and k.endswith("/total")}
        walls = [l["time/wall_s"] for l in lines if "time/wall_s" in l]
        log = rd.with_suffix(".log")  # `/usr/bin/time -v` output of the run, where there is one
        for line in log.read_text().splitlines() if log.is_file() else []:
            if "Elapsed (wall clock)" in line:
                parts = [float(x) for x in line.rsplit(" ", 1)[1].split(":")]
                walls.append(sum(v * 60 ** i for i, v in enumerate(reversed(parts))))
        name = rd.name
        rows[name] = {
            "method": "sb3_stl" if cfg["agent"]["algo"] == "sb3_stl" else cfg["arch"]["method"],
            "seed": cfg["seed"],
            "env_steps_reached": max(l["step"] for l in lines),
            "budget": {k: cfg["train"][k] for k in ("total_env_steps", "updates_per_step", "threads")}
            | {"batch_per_task": cfg["agent"]["batch_per_task"], "hidden": cfg["model"]["hidden"],
               "search_steps": cfg["arch"]["search_steps"]},
            "params": params,
            "wall_s": walls[-1] if walls else None,
            "evals": [{"step": l["step"], "episodes_per_task": l.get("eval/episodes_per_task"),
                       "mean": l["eval/success_rate/mean"],
                       "per_task": {k.split("/")[-1]: v for k, v in l.items()
                                    if k.startswith("eval/success_rate/") and not k.endswith("/mean")}}
                      for l in evals],
            # a run stopped before its end: `mtrl-arch eval RUN_DIR --episodes 10` on its last checkpoint
            "eval_of_last_checkpoint": (json.loads(rd.with_suffix(".final_eval.json").read_text())
                                        if rd.with_suffix(".final_eval.json").is_file() else None),
            "env": cfg["run"].get("env"), "versions": cfg["run"].get("versions"),
            "machine": cfg["run"].get("machine"), "git_commit": cfg["run"].get("git_commit"),
        }
        dst = OUT / name
        dst.mkdir(exist_ok=True)
        for f in ("config.yaml", "metrics.jsonl", "arch.json", "arch.txt"):
            if (rd / f).is_file():
                shutil.copy(rd / f, dst / f)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    make_report(run_dirs, OUT / "report")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
