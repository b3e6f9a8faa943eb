"""How often each method recovers the planted answer of the known-answer problem, and whether CoNAL beats chance.

    python benchmarks/synthetic_recovery.py [--problems 8] [--searches 2] [--out benchmarks/results/methods]
    python benchmarks/synthetic_recovery.py --controls [--problems 8] [--searches 2] [--retrain-steps 800]

:class:`mtrl_arch.synthetic.ConflictProblem` (3 tasks, 3 stages; its docstring argues the answer):
stage 0 is one module for {A, B} and another for C. Each method searches with the settings
the known-answer tests use (tests/test_conal_search.py, tests/test_search_methods.py), on
problem seeds 0..P-1 (different teachers, data and initial weights) x search seeds 0..S-1
(different batches and Gumbel draws), and derives its tree. "Recovered": A and B share
stage 0 and C is not in their module. HPS (everything shared) and STL (nothing shared)
never recover it by construction; their rows are the floor.

``--controls`` (issue 23, the known-answer regime): is CoNAL's tree better than a random tree
of the same size from the same space? For each problem seed x search seed it searches CoNAL
(the ``conal`` row), draws ``arch.method=random`` trees from CoNAL's space (and Recon's, when
any is admissible) whose trunk lies in [0.9 S, S], S the planted tree's trunk parameters by
random.py's own cost function, and retrains every tree from scratch
(:func:`mtrl_arch.synthetic.train_tree`: same steps, lr, batches and tied initial weights for
every tree), with the planted tree (the oracle), HPS and STL as references. The random draw is
seeded by the pair (problem seed x searches + search seed), not by the search seed alone: the
band and space are the same for every problem, so a search-seed draw would repeat one tree
across all problems. Its chance of hitting the planted tree is exactly 1 / (admissible trees).
Results go to a section of synthetic.md (the recovery section is kept) and synthetic_controls.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from importlib import metadata
from pathlib import Path

import torch

from mtrl_arch.errors import ConfigError
from mtrl_arch.metrics import delta_m, paired_bootstrap_ci
from mtrl_arch.search import make_method
from mtrl_arch.search.derive import DeriveRule
from mtrl_arch.search.random import Band, ConalSpace, ReconSpace
from mtrl_arch.synthetic import ConflictProblem, run_search, train_tree
from mtrl_arch.table import mean_std, tree_code
from mtrl_arch.tree import Tree
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


CONTROL_ROW = "conal"      # the searched row the controls test
RETRAIN = {"batch_size": 64, "lr": 3e-3}  # the problem's docstring table's settings (with 800 steps)
BAND_LOW = 0.9             # random trees within [0.9 S, S], S the planted (or CoNAL's) tree's trunk parameters
AT_CONAL = "random at CoNAL's size"
# differences reported with a paired-by-seed bootstrap CI: (row, minus row)
DIFFS = (("conal", "random"), ("conal", AT_CONAL), ("conal", "hps"), ("conal", "planted"), ("random", "planted"))


def recovered(tree) -> bool:
    g = tree.group_of(0, A)
    return g is not None and B in g and C not in g


def grouping(stage) -> str:
    """One stage's modules by task letters: 'AB C'."""
    return " ".join("".join("ABC"[t] for t in g) for g in stage)


def derive_rule(extra: dict) -> DeriveRule:
    return DeriveRule(extra.get("derive", "argmax"), extra.get("derive_margin", 0.1))


def searched_tree(row: str, problem: ConflictProblem, search_seed: int) -> Tree:
    """The row's method searched (if it searches) with the row's settings, and its derived tree."""
    name, steps, opts, derive, cn = ROWS[row]
    method = make_method(name, problem.spec(), opts, seed=search_seed, derive=derive_rule(derive))
    if steps:
        combiner = GradientCombiner(make_weighting("ew", n_tasks=3), conflict_noticed=cn)
        run_search(method, problem, steps=steps, combiner=combiner, seed=search_seed)
    return method.derive()


def network(tree: Tree) -> tuple:
    """A tree as the network it builds (group order within a stage does not matter)."""
    return tuple(frozenset(frozenset(g) for g in st) for st in tree.stages)


def trunk_params(tree: Tree, sizes: list[int]) -> int:
    c = tree.param_counts(sizes)
    return c["shared"] + c["subgroup"] + c["specific"]


def planted_band(problem: ConflictProblem) -> tuple[Band, int]:
    """[ceil(0.9 S), S] and S: the planted tree's trunk parameters by random.py's cost function."""
    S = ConalSpace(problem.n_tasks, problem.spec().stage_params()).cost(problem.planted_tree().meta["branch_points"])
    return size_band(S), S


def size_band(S: int) -> Band:
    return Band(math.ceil(BAND_LOW * S), S)


def random_tree(problem: ConflictProblem, space: str, band: Band, seed: int) -> Tree | None:
    """``arch.method=random``'s draw within the band, or None when no tree of the space is in it."""
    try:
        method = make_method("random", problem.spec(), {"space": space}, seed=seed,
                             derive=DeriveRule(min_params=band.lo, max_params=band.hi))
    except ConfigError:  # the empty band, refused when the method is made
        return None
    return method.derive()


def control_trees(problem: ConflictProblem, search_seed: int, draw_seed: int) -> dict[str, Tree | None]:
    """The searched tree and its controls; random rows are None where their band admits no tree."""
    band, _ = planted_band(problem)
    conal = searched_tree(CONTROL_ROW, problem, search_seed)
    conal_size = size_band(trunk_params(conal, problem.spec().stage_params()))
    return {"conal": conal, "random": random_tree(problem, "conal", band, draw_seed),
            AT_CONAL: random_tree(problem, "conal", conal_size, draw_seed),
            "random recon": random_tree(problem, "recon", band, draw_seed),
            "planted": problem.planted_tree(), "hps": Tree.hps(problem.tasks, problem.n_stages),
            "stl": Tree.stl(problem.tasks, problem.n_stages)}


def controls(problems: int, searches: int, retrain_steps: int) -> dict:
    """Every pair's trees, hits and held-out losses after retraining; then per-row summaries and paired CIs."""
    runs = []
    for ps in range(problems):
        problem = ConflictProblem(seed=ps)
        sizes, planted = problem.spec().stage_params(), network(problem.planted_tree())
        S = trunk_params(problem.planted_tree(), sizes)
        for ss in range(searches):
            t0, rows = time.time(), {}
            for row, tree in control_trees(problem, ss, draw_seed=ps * searches + ss).items():
                if tree is None:
                    continue
                net = train_tree(tree, problem, steps=retrain_steps, seed=ss, **RETRAIN)
                losses = problem.evaluate(net).tolist()
                rows[row] = {"tree": tree_code(tree), "groups": " | ".join(map(grouping, tree.stages)),
                             "trunk_params": trunk_params(tree, sizes), "planted": network(tree) == planted,
                             "recovered": recovered(tree), "admissible": tree.derive.get("admissible"),
                             "chance": chance_of_planted(tree, S),
                             "losses": dict(zip(problem.tasks, losses)), "mean_loss": sum(losses) / len(losses)}
            for v in rows.values():  # the mean loss is dominated by A's and B's scale; Delta_m weighs tasks alike
                v["delta_m"] = delta_m(*({t: {"mse": x} for t, x in r["losses"].items()} for r in (v, rows["stl"])),
                                       lower_is_better={"mse": True})
            runs.append({"problem_seed": ps, "search_seed": ss, "draw_seed": ps * searches + ss,
                         "seconds": time.time() - t0, "rows": rows})
            print(f"problem {ps} search {ss}: " + ", ".join(
                f"{r} {v['mean_loss']:.3f}{' *' if v['planted'] else ''}" for r, v in rows.items()), flush=True)
    problem = ConflictProblem(seed=0)
    (band, S), recon = planted_band(problem), ReconSpace(problem.n_tasks, problem.spec().stage_params())
    return {"band": [band.lo, band.hi], "planted_trunk_params": S, "retrain": {"steps": retrain_steps, **RETRAIN},
            "recon_trunks": sorted({recon.cost(c) for k in range(problem.n_stages + 1)
                                    for c in itertools.combinations(range(problem.n_stages), k)}),
            "problems": problems, "searches": searches, "summary": summarize(runs), "diffs": paired_diffs(runs),
            "runs": runs}


def chance_of_planted(tree: Tree, planted_params: int) -> float | None:
    """A random tree's probability of being the planted one (1 / admissible when its band holds the planted
    tree's size, else 0); None for a tree that was not drawn."""
    if "admissible" not in tree.derive:
        return None
    return 1.0 / tree.derive["admissible"] if planted_params in Band(*tree.derive["band"]) else 0.0


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for row in runs[0]["rows"]:
        got = [r["rows"][row] for r in runs if row in r["rows"]]
        out[row] = {"n": len(got), "planted": sum(g["planted"] for g in got), "recovered": sum(g["recovered"] for g in got),
                    "admissible": got[0]["admissible"], "mean_loss": [g["mean_loss"] for g in got],
                    "delta_m": [g["delta_m"] for g in got], "trunk_params": [g["trunk_params"] for g in got],
                    "expected_hits": None if got[0]["chance"] is None else sum(g["chance"] for g in got),
                    "losses": {t: [g["losses"][t] for g in got] for t in got[0]["losses"]}}
    return out


def paired_diffs(runs: list[dict]) -> dict:
    """Row minus row, per pair of seeds, on the mean held-out loss, Delta_m and each task's loss: mean and 95%
    bootstrap CI."""
    out = {}
    for a, b in DIFFS:
        pairs = [(r["rows"][a], r["rows"][b]) for r in runs if a in r["rows"] and b in r["rows"]]
        if not pairs:  # a row whose band never admitted a tree
            continue
        keys = {"mean": lambda v: v["mean_loss"], "delta_m": lambda v: v["delta_m"],
                **{t: (lambda v, t=t: v["losses"][t]) for t in pairs[0][0]["losses"]}}
        out[f"{a} - {b}"] = {k: dict(zip(("mean", "lo", "hi"), paired_bootstrap_ci([f(x) - f(y) for x, y in pairs])),
                                     n=len(pairs)) for k, f in keys.items()}
    return out


def controls_section(res: dict, vers: dict) -> str:
    s, band = res["summary"], res["band"]
    n_adm = s["random"]["admissible"]
    lines = ["## Against random trees of the planted size", "",
             f"{res['problems']} problem seeds x {res['searches']} search seeds. The planted tree (A and B share every "
             f"stage, C its own from stage 0: branch points [3, 3, 0]) has {res['planted_trunk_params']} trunk "
             f"parameters; random trees are drawn (`arch.method=random`) from CoNAL's space within "
             f"[{band[0]}, {band[1]}], where {n_adm} trees are admissible: a random draw hits the planted tree with "
             f"probability 1/{n_adm} = {1 / n_adm:.3f}. The row '{AT_CONAL}' draws within [0.9 S_c, S_c], S_c the "
             "trunk of that pair's CoNAL tree (issue 23's control for a searched tree; its admissible count varies by "
             "pair, and it can hit the planted tree only where CoNAL's tree has the planted size). In brackets: the "
             "hits expected by chance (the sum over pairs of 1 / admissible where the band holds the planted size). "
             + (f"Recon's space: {s['random recon']['admissible']} admissible trees." if "random recon" in s else
                f"Recon's space has no tree in that band (its trunks: {res['recon_trunks']}), so it has no row.")
             + f" Every tree is retrained from scratch ({res['retrain']['steps']} Adam steps, lr "
             f"{res['retrain']['lr']}, batch {res['retrain']['batch_size']} per task, the same tied initial weights "
             "and batches for every tree of a pair); held-out MSE on 512 samples per task.", "",
             "Delta_m: the mean over tasks of the relative loss change against the pair's STL, in percent, positive "
             "better (`mtrl_arch.metrics.delta_m`); it weighs the three tasks alike, where the mean loss is mostly A's "
             "and B's.", "",
             "| row | trunk params | planted tree hit (by chance) | stage 0 right | mean loss | Delta_m % vs STL | A | B | C |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, r in s.items():
        size = f"{min(r['trunk_params'])}" + (f"-{max(r['trunk_params'])}" if len(set(r["trunk_params"])) > 1 else "")
        chance = "" if r["expected_hits"] is None else f" ({r['expected_hits']:.1f})"
        lines.append(f"| {row} | {size} | {r['planted']} / {r['n']}{chance} | {r['recovered']} / {r['n']} | "
                     f"{mean_std(r['mean_loss'])} | "
                     f"{mean_std(r['delta_m'], '+.1f')} | "
                     + " | ".join(mean_std(v) for v in r["losses"].values()) + " |")
    lines += ["", "Paired by seed (row minus row), mean and 95% bootstrap CI; losses: negative means the first row "
              "is better; Delta_m: positive means the first row is better:", "",
              "| difference | mean loss | Delta_m % | A | B | C |", "|---|---|---|---|---|---|"]
    for name, d in res["diffs"].items():
        lines.append(f"| {name} (n={d['mean']['n']}) | "
                     + " | ".join(ci(v, "+.1f" if k == "delta_m" else "+.4f") for k, v in d.items()) + " |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, one torch thread, shared CPU. Versions: "
              + ", ".join(f"{k} {v}" for k, v in vers.items()) + f", Python {platform.python_version()}.",
              f"Command: `python benchmarks/synthetic_recovery.py --controls --problems {res['problems']} --searches "
              f"{res['searches']} --retrain-steps {res['retrain']['steps']}`."]
    return "\n".join(lines) + "\n"


def ci(v: dict, fmt: str) -> str:
    return f"{v['mean']:{fmt}} [{v['lo']:{fmt}}, {v['hi']:{fmt}}]"


def write_section(path: Path, section: str) -> None:
    """Replace the results file's section with the same '## ' heading, or append it; other sections stay."""
    heading = section.splitlines()[0]
    parts, cur = [], []
    for line in (path.read_text().splitlines(keepends=True) if path.exists() else []):
        if line.startswith("## ") and cur:
            parts.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        parts.append("".join(cur))
    parts = [section if p.splitlines()[0] == heading else p for p in parts]
    if section not in parts:
        parts.append(section)
    path.write_text("\n".join(p.rstrip("\n") + "\n" for p in parts))


def recovery(problems: int, searches: int, rows: list[str]) -> list[dict]:
    results = []
    for row in rows:
        name, steps, opts, derive, cn = ROWS[row]
        t0, hits, codes = time.time(), 0, []
        for ps in range(problems):
            problem = ConflictProblem(seed=ps)
            for ss in range(searches):
                tree = searched_tree(row, problem, ss)
                ok = recovered(tree)
                hits += ok
                codes.append({"problem_seed": ps, "search_seed": ss, "recovered": ok, "tree": tree_code(tree),
                              "stage0": [list(g) for g in tree.stages[0]]})
        n = problems * searches
        results.append({"row": row, "method": name, "steps": steps, "options": opts, "derive": derive,
                        "conflict_noticed": cn, "recovered": hits, "n": n, "seconds": time.time() - t0, "runs": codes})
        print(f"{row:18s} {hits}/{n} recovered ({time.time() - t0:.0f} s)", flush=True)
    return results


def recovery_section(results: list[dict], problems: int, searches: int, vers: dict) -> str:
    lines = ["## The synthetic known-answer problem: how often the planted answer is recovered", "",
             f"{problems} problem seeds x {searches} search seeds per row; recovered = A and B share stage 0 "
             "and C is not in their module (`mtrl_arch.synthetic.ConflictProblem`).", "",
             "| row | search steps | recovered | stage-0 groupings seen (count) | seconds |", "|---|---|---|---|---|"]
    for r in results:
        seen: dict[str, int] = {}
        for c in r["runs"]:
            key = grouping(c["stage0"])
            seen[key] = seen.get(key, 0) + 1
        lines.append(f"| {r['row']} | {r['steps']} | {r['recovered']} / {r['n']} | "
                     + ", ".join(f"{k} ({v})" for k, v in sorted(seen.items(), key=lambda kv: -kv[1]))
                     + f" | {r['seconds']:.0f} |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, one torch thread, shared CPU. Versions: "
              + ", ".join(f"{k} {v}" for k, v in vers.items()) + f", Python {platform.python_version()}.",
              f"Command: `python benchmarks/synthetic_recovery.py --problems {problems} --searches {searches}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--searches", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--controls", action="store_true", help="CoNAL against random trees of the planted size, retrained")
    p.add_argument("--retrain-steps", type=int, default=800)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "methods"))
    a = p.parse_args()
    torch.set_num_threads(1)
    vers = {k: metadata.version(k) for k in ("mtrl-arch", "torch")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.controls:
        res = controls(a.problems, a.searches, a.retrain_steps)
        write_section(out / "synthetic.md", controls_section(res, vers))
        (out / "synthetic_controls.json").write_text(json.dumps({"versions": vers, **res}, indent=1))
    else:
        results = recovery(a.problems, a.searches, a.rows.split(","))
        write_section(out / "synthetic.md", recovery_section(results, a.problems, a.searches, vers))
        (out / "synthetic.json").write_text(json.dumps({"versions": vers, "rows": results}, indent=1))
    print(f"wrote {out / 'synthetic.md'}")


if __name__ == "__main__":
    main()
