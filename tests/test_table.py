"""The methods table (mtrl_arch.table): known answers for Delta_m over seeds, the IQM and its interval, tree codes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mtrl_arch.config import ConfigError
from mtrl_arch.table import iqm_ci, methods_table, tree_code
from mtrl_arch.tree import Tree

TASKS = ("top_left", "bottom_right")


def run(method: str, seed: int, acc: tuple[float, float], domain: str = "supervised", tree: Tree | None = None,
        params: dict | None = None, wall: float = 10.0):
    metric = "success_rate" if domain == "rl" else "accuracy"
    tasks = TASKS if domain != "rl" else tuple(f"t{i}" for i in range(len(acc)))
    final = {f"eval/{metric}/{t}": a for t, a in zip(tasks, acc)}
    final[f"eval/{metric}/mean"] = float(np.mean(acc))
    recs = [{"step": 0, **{f"params/trunk/{k}": v for k, v in (params or {}).items()}},
            {"step": 10, "time/wall_s": wall, **final}]
    cfg = SimpleNamespace(domain=domain, seed=seed, arch=SimpleNamespace(method=method))
    return SimpleNamespace(path=Path(f"/runs/{method}-s{seed}"), cfg=cfg, metrics=recs,
                           trees={"trunk": tree} if tree is not None else {})


def test_delta_m_per_seed_against_the_stl_seed_mean_and_the_columns() -> None:
    stl = [run("stl", 0, (0.80, 0.60), params={"shared": 0, "specific": 100, "total": 110}),
           run("stl", 1, (0.60, 0.80), params={"shared": 0, "specific": 100, "total": 110})]
    # baseline seed mean: 0.7 / 0.7; conal seed 0: (+10% + 0%)/2 = +5%, seed 1: (-10% + 0%)/2 = -5%
    sp = Tree.from_branch_points(TASKS, 3, [2, 2])
    conal = [run("conal", 0, (0.77, 0.70), tree=sp, params={"shared": 60, "specific": 20, "total": 90}, wall=30),
             run("conal", 1, (0.63, 0.70), tree=Tree.stl(TASKS, 3), params={"shared": 0, "specific": 100, "total": 110},
                 wall=50)]
    text, data = methods_table([("stl", stl), ("conal", conal)])
    assert data["baseline"] == "stl"
    rows = {r["setting"]: r for r in data["rows"]}
    np.testing.assert_allclose(rows["conal"]["delta_m"], [5.0, -5.0], atol=1e-9)
    np.testing.assert_allclose(rows["stl"]["delta_m"], [0.0, 0.0], atol=1e-9)
    assert rows["conal"]["trees"] == ["SSP", "PPP"]
    assert rows["conal"]["wall_s"] == [30, 50]
    line = next(l for l in text.splitlines() if l.startswith("| conal"))
    assert "+0.00 ± 7.07" in line  # std of +5, -5
    assert "30 / 60 / 100 (mean)" in line  # the seeds derived different trees: mean counts, flagged
    assert "| 2 | 0.7000 ± 0.0495 |" in line  # task means 0.735, 0.665
    with pytest.raises(ConfigError, match="matches 0 settings"):
        methods_table([("stl", stl), ("conal", conal)], baseline="hps")
    _, d = methods_table([("stl", stl), ("conal", conal)], baseline="conal")
    np.testing.assert_allclose(np.mean([r for r in d["rows"][1]["delta_m"]]), 0.0, atol=1e-9)


def test_rl_rows_report_the_iqm_with_a_bootstrap_interval_over_seeds() -> None:
    scores = np.array([[0.0, 0.2, 0.4, 1.0], [0.1, 0.3, 0.5, 0.9], [0.0, 0.0, 0.6, 0.8]])
    iqm, lo, hi = iqm_ci(scores)
    pooled = np.sort(scores.ravel())  # 12 values: the IQM is the mean of the middle 6
    assert iqm == pytest.approx(pooled[3:9].mean())
    assert lo <= iqm <= hi and hi - lo > 0
    assert np.isnan(iqm_ci(scores[:1])[1])  # one seed: no interval
    runs = [run("hps", s, tuple(scores[s]), domain="rl") for s in range(3)]
    text, data = methods_table([("hps", runs)])
    assert data["rows"][0]["iqm"][0] == pytest.approx(iqm)
    assert "IQM" in text and "Delta_m" not in text.splitlines()[0]


def test_tasks_with_different_metrics_head_with_each_tasks_first_metric() -> None:
    """GLUE-like: CoLA has mcc, MRPC f1 then accuracy; the headline is each task's first, Delta_m uses every metric."""
    def glue(method: str, seed: int, mcc: float, f1: float, acc: float):
        r = run(method, seed, (0.0, 0.0))
        r.metrics[-1] = {"step": 10, "eval/mcc/CoLA": mcc, "eval/f1/MRPC": f1, "eval/accuracy/MRPC": acc}
        return r

    stl = [glue("stl", 0, 0.10, 0.80, 0.70), glue("stl", 1, 0.20, 0.80, 0.70)]
    hps = [glue("hps", 0, 0.075, 0.88, 0.70)]
    text, data = methods_table([("stl", stl), ("hps", hps)])
    assert data["metric"] == {"CoLA": "mcc", "MRPC": "f1"}
    assert "| CoLA mcc | MRPC f1 |" in text.splitlines()[0]
    rows = {r["setting"]: r for r in data["rows"]}
    np.testing.assert_allclose(rows["stl"]["mean"], [0.45, 0.50])  # (0.10 + 0.80) / 2, (0.20 + 0.80) / 2
    # Delta_m over every metric against the STL seed mean (0.15; 0.80, 0.70), per task first (LibMTL's):
    # (CoLA -50% + MRPC (+10% + 0%) / 2) / 2
    np.testing.assert_allclose(rows["hps"]["delta_m"], [-22.5], atol=1e-9)


def test_tree_codes() -> None:
    assert tree_code(Tree.hps(TASKS, 3)) == "SSS"
    assert tree_code(Tree.stl(TASKS, 2)) == "PP"
    three = ("a", "b", "c")
    assert tree_code(Tree(three, (((0, 1, 2),), ((0, 1), (2,)), ((0,), (1,), (2,))))) == "SGP"
    assert tree_code(Tree(three, (((0, 1, 2),), ((0, 1),), ((0,), (1,), (2,))))) == "S-P"
