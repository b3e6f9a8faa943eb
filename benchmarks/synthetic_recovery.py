"""How often each method recovers the planted answer of the known-answer problem.

    python benchmarks/synthetic_recovery.py [--problems 8] [--searches 2] [--out benchmarks/results/methods]

:class:`mtrl_arch.synthetic.ConflictProblem` (3 tasks, 3 stages; its docstring argues the answer):
stage 0 is one module for {A, B} and another for C. Each method searches with the settings
the known-answer tests use (tests/test_conal_search.py, tests/test_search_methods.py), on
problem seeds 0..P-1 (different teachers, data and initial weights) x search seeds 0..S-1
(different batches and Gumbel draws), and derives its tree. "Recovered": A and B share
stage 0 and C is not in their module. HPS (everything shared) and STL (nothing shared)
never recover it by construction; their rows are the floor.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata
from pathlib import Path

import torch

from mtrl_arch.search import make_method
from mtrl_arch.search.derive import DeriveRule
from mtrl_arch.synthetic import ConflictProblem, run_search
from mtrl_arch.table import tree_code
from mtrl_arch.update import GradientCombiner
from mtrl_arch.weighting import make_weighting

A, B, C = 0, 1, 2
# row -> (method, search steps, options, derive rule overrides, conflict-noticed)
ROWS = {
    "conal": ("conal", 500, {"lr": 1e-2}, {}, False),
    "conal +CN": ("conal", 500, {"lr": 1e-2}, {}, True),
    "conal margin 0.2": ("conal", 500, {"lr": 1e-2}, {"derive": "margin", "derive_margin": 0.2}, False),
    "conal_pro": ("conal_pro", 600, {"steps_per_stage": 200, "lr": 1e-2}, {}, False),
    "recon": ("recon", 300, {"S": 0.0, "k": 1}, {}, False),
    "ltb": ("ltb", 600, {"total_steps": 600}, {}, False),
    "adashare": ("adashare", 600, {"warmup_steps": 100, "weight_steps": 25, "policy_steps": 25, "curriculum_speed": 1,
                                   "derive": "argmax"}, {}, False),
    "hps": ("hps", 0, {}, {}, False),
    "stl": ("stl", 0, {}, {}, False),
}


def recovered(tree) -> bool:
    g = tree.group_of(0, A)
    return g is not None and B in g and C not in g


def derive_rule(extra: dict) -> DeriveRule:
    return DeriveRule(extra.get("derive", "argmax"), extra.get("derive_margin", 0.1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--searches", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "methods"))
    a = p.parse_args()
    torch.set_num_threads(1)
    results = []
    for row in a.rows.split(","):
        name, steps, opts, derive, cn = ROWS[row]
        t0, hits, codes = time.time(), 0, []
        for ps in range(a.problems):
            problem = ConflictProblem(seed=ps)
            for ss in range(a.searches):
                method = make_method(name, problem.spec(), opts, seed=ss, derive=derive_rule(derive))
                if steps:
                    combiner = GradientCombiner(make_weighting("ew", n_tasks=3), conflict_noticed=cn)
                    run_search(method, problem, steps=steps, combiner=combiner, seed=ss)
                tree = method.derive()
                ok = recovered(tree)
                hits += ok
                codes.append({"problem_seed": ps, "search_seed": ss, "recovered": ok, "tree": tree_code(tree),
                              "stage0": [list(g) for g in tree.stages[0]]})
        n = a.problems * a.searches
        results.append({"row": row, "method": name, "steps": steps, "options": opts, "derive": derive,
                        "conflict_noticed": cn, "recovered": hits, "n": n, "seconds": time.time() - t0, "runs": codes})
        print(f"{row:18s} {hits}/{n} recovered ({time.time() - t0:.0f} s)", flush=True)
    vers = {k: metadata.version(k) for k in ("mtrl-arch", "torch")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["## The synthetic known-answer problem: how often the planted answer is recovered", "",
             f"{a.problems} problem seeds x {a.searches} search seeds per row; recovered = A and B share stage 0 "
             "and C is not in their module (`mtrl_arch.synthetic.ConflictProblem`).", "",
             "| row | search steps | recovered | stage-0 groupings seen (count) | seconds |", "|---|---|---|---|---|"]
    for r in results:
        seen: dict[str, int] = {}
        for c in r["runs"]:
            key = " ".join("".join("ABC"[t] for t in g) for g in c["stage0"])
            seen[key] = seen.get(key, 0) + 1
        lines.append(f"| {r['row']} | {r['steps']} | {r['recovered']} / {r['n']} | "
                     + ", ".join(f"{k} ({v})" for k, v in sorted(seen.items(), key=lambda kv: -kv[1]))
                     + f" | {r['seconds']:.0f} |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, one torch thread, shared CPU. Versions: "
              + ", ".join(f"{k} {v}" for k, v in vers.items()) + f", Python {platform.python_version()}.",
              f"Command: `python benchmarks/synthetic_recovery.py --problems {a.problems} --searches {a.searches}`."]
    (out / "synthetic.md").write_text("\n".join(lines) + "\n")
    (out / "synthetic.json").write_text(json.dumps({"versions": vers, "rows": results}, indent=1))
    print(f"wrote {out / 'synthetic.md'}")


if __name__ == "__main__":
    main()
