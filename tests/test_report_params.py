"""The report's headline-against-trunk-size figure, its frontier, and the paired comparisons of a searched
setting against random trees at its budget and width-matched HPS, on run directories written by the real
writers (run info, Logger, arch.json); the keys a newer mtrl-arch writes (``arch.method=random``,
``model.match_params``, ``agent.critic_match_params``) are added to config.yaml as it would hold them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")

from mtrl_arch.config import load_config  # noqa: E402
from mtrl_arch.logger import Logger  # noqa: E402
from mtrl_arch.metrics import paired_bootstrap_ci  # noqa: E402
from mtrl_arch.params_report import (Setting, frontier, hps_counterpart, random_counterpart,  # noqa: E402
                                     trunk_params)
from mtrl_arch.report import group_runs, load_run, make_report  # noqa: E402
from mtrl_arch.run import write_arch, write_run_info  # noqa: E402
from mtrl_arch.tree import Tree  # noqa: E402

TASKS = ("reach-v3", "push-v3", "pick-place-v3")
PNG = b"\x89PNG\r\n\x1a\n"


def _merge(d: dict, extra: dict) -> dict:
    for k, v in extra.items():
        d[k] = _merge(dict(d.get(k) or {}), v) if isinstance(v, dict) else v
    return d


def make_run(root: Path, name: str, seed: int, final: float, method: str, sizes: dict[str, int] | None,
             overrides: tuple[str, ...] = (), newer: dict | None = None, logged: int = 0) -> Path:
    """An MT10 run whose every task ends at ``final``; ``sizes``: each network's derived trunk (arch.json), None
    for a fixed tree that logged ``logged`` task-specific parameters and wrote no arch.json; ``newer``: keys
    merged into config.yaml as a newer mtrl-arch writes them."""
    written = "conal" if method == "random" else method  # this version cannot build a random run's config
    cfg = load_config("mt10_hps", [f"arch.method={written}", f"seed={seed}", f"env.tasks=[{','.join(TASKS)}]",
                                   "arch.search_steps=100" if written == "conal" else "arch.search_steps=0",
                                   *overrides, f"run_dir={root / f'{name}-s{seed}'}"])
    d = Path(cfg.run_dir)
    write_run_info(d, cfg)
    if method == "random" or newer:
        rec = yaml.safe_load((d / "config.yaml").read_text())
        rec = _merge(_merge(rec, newer or {}), {"arch": {"method": "random"}} if method == "random" else {})
        (d / "config.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    lg = Logger(d, None)
    if logged:
        lg.log({f"params/{n}/{k}": v for n in ("actor", "critic")
                for k, v in {"shared": 0, "subgroup": 0, "specific": logged, "heads": 99, "total": logged + 99}.items()}, 0)
    for step, v in ((1000, 0.0), (2000, final)):
        lg.log({**{f"eval/success_rate/{t}": v for t in TASKS}, "eval/success_rate/mean": v}, step)
    lg.close()
    if sizes:
        write_arch(d, {n: dataclasses.replace(Tree.stl(TASKS, 3), method=method, derive={"params": {"trunk": p}})
                       for n, p in sizes.items()})
    return d


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = []
    for seed, final, actor in ((0, 0.5, 40_000), (1, 0.6, 45_000), (2, 0.7, 50_000)):
        runs.append(make_run(root, "conal50k", seed, final, "conal", {"actor": actor, "critic": 49_000},
                             ("arch.max_params=50000",)))
        runs.append(make_run(root, "hps52k", seed, 0.55, "hps", {"actor": 52_000, "critic": 50_000},
                             newer={"model": {"match_params": 52_000}, "agent": {"critic_match_params": 50_000}}))
    for seed in (0, 1):  # seed 2 never ran: two pairs
        runs.append(make_run(root, "random50k", seed, 0.4, "random", {"actor": 30_000, "critic": 30_000},
                             ("arch.max_params=50000",),
                             newer={"arch": {"options": {"space": "conal"}, "min_params": 25_000}}))
    runs.append(make_run(root, "conal100k", 0, 0.8, "conal", {"actor": 90_000, "critic": 90_000},
                         ("arch.max_params=100000",)))
    runs.append(make_run(root, "stl", 0, 0.3, "stl", None, logged=400_000))
    return runs


def test_frontier_is_the_best_at_or_below_each_size():
    pts = [(52_000, 0.55), (30_000, 0.4), (400_000, 0.3), (45_000, 0.6), (90_000, 0.8), (90_000, 0.7)]
    assert frontier(pts) == [(30_000, 0.4), (45_000, 0.6), (52_000, 0.6), (90_000, 0.8), (400_000, 0.8)]
    assert frontier([(1, 3.0), (2, 1.0), (3, 2.0)], higher_is_better=False) == [(1, 3.0), (2, 1.0), (3, 1.0)]
    assert frontier([]) == []


def test_paired_bootstrap_known_answers():
    # constant differences: nothing varies, the interval is that constant
    assert paired_bootstrap_ci([0.25] * 6) == (pytest.approx(0.25), pytest.approx(0.25), pytest.approx(0.25))
    # two pairs: resampled means 0.1, 0.15, 0.2 with chances 1/4, 1/2, 1/4; the 2.5% and 97.5% points are the ends
    assert paired_bootstrap_ci([0.1, 0.2]) == pytest.approx((0.15, 0.1, 0.2))
    # symmetric about 0: mean 0, the interval symmetric about it (up to resampling noise), inside the range
    mean, lo, hi = paired_bootstrap_ci([-1.0, -0.5, 0.5, 1.0], n_resamples=20_000)
    assert mean == pytest.approx(0.0) and -1.0 <= lo < 0 < hi <= 1.0 and hi == pytest.approx(-lo, abs=0.05)
    d = [0.3, -0.1, 0.05, 0.2, 0.12, -0.02, 0.4]
    mean, lo, hi = paired_bootstrap_ci(d)
    assert lo < mean < hi and (lo, hi) == paired_bootstrap_ci(d)[1:]  # covers the mean; seeded: the same each call
    assert paired_bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)  # one pair: nothing to resample
    with pytest.raises(ValueError, match="no paired differences"):
        paired_bootstrap_ci([])


def test_trunk_sizes_come_from_arch_json_else_the_logged_counts(budget_runs):
    runs = {r.name: r for r in map(load_run, budget_runs)}
    assert trunk_params(runs["conal50k-s1"]) == {"actor": 45_000, "critic": 49_000}
    assert trunk_params(runs["stl-s0"]) == {"actor": 400_000, "critic": 400_000}  # shared + subgroup + specific
    assert runs["random50k-s0"].cfg.arch.method == "random"  # read from a config this version does not validate
    assert runs["random50k-s0"].record["arch.min_params"] == 25_000


def test_params_figure_and_paired_comparisons(budget_runs, tmp_path):
    out = make_report(budget_runs, tmp_path / "report")
    fig = out / "params-success_rate.png"
    assert fig.read_bytes()[:8] == PNG and fig.stat().st_size > 10_000
    data = json.loads((out / "summary.json").read_text())
    labels = [g for g, _ in group_runs([load_run(p) for p in budget_runs])]
    assert len(labels) == 5
    rows = data["against_budget"]
    assert [r["budget"] for r in rows] == [{"actor": 50_000, "critic": 50_000}, {"actor": 100_000, "critic": 100_000}]
    first, second = rows
    # conal at 50k minus random at 50k: seeds 0 and 1 only, differences 0.5-0.4 and 0.6-0.4
    assert first["minus_random"]["n"] == 2 and first["minus_random"]["seeds"] == [0, 1]
    assert first["minus_random"]["mean"] == pytest.approx(0.15)
    assert first["minus_random"]["ci"] == pytest.approx([0.1, 0.2])
    # minus HPS matched to 52k (within 10% of 50k): differences -0.05, 0.05, 0.15
    hps = first["minus_hps"]
    assert hps["n"] == 3 and hps["mean"] == pytest.approx(0.05) and -0.05 - 1e-9 <= hps["ci"][0] < 0.05 < hps["ci"][1] <= 0.15 + 1e-9
    assert "hps" in hps["against"] or "52000" in hps["against"]
    assert second["minus_random"] is None and second["minus_hps"] is None  # no counterpart at 100k: said, not dropped
    md = (out / "summary.md").read_text()
    assert "## Searched trees against random trees and width-matched HPS" in md
    assert "+0.150 [+0.100, +0.200], n=2 vs" in md
    line = next(l for l in md.splitlines() if "actor 100k, critic 100k" in l)
    assert "no `arch.method=random` setting at B" in line and "no HPS setting" in line
    assert "![params-success_rate](params-success_rate.png)" in md


def test_one_setting_draws_no_params_figure(budget_runs, tmp_path):
    out = make_report([p for p in budget_runs if p.name.startswith("conal50k")], tmp_path / "one")
    assert not list(out.glob("params-*.png")) and "Searched trees against" not in (out / "summary.md").read_text()


def _setting(label: str, method: str, values: dict, keys: dict | None = None, sizes=None) -> Setting:
    return Setting(label, {"arch.method": method, "train.total_env_steps": 1000, **(keys or {})}, values,
                   sizes or {"trunk": [50_000]})


def test_counterparts_need_the_same_rest_and_a_matching_size():
    searched = _setting("conal", "conal", {0: 0.5}, {"arch.max_params": 50_000})
    b = {"trunk": 50_000.0}
    far = _setting("hps far", "hps", {0: 0.4}, {"model.match_params": 56_000})       # 12% off
    near = _setting("hps near", "hps", {0: 0.4}, {"model.match_params": 48_000})     # 4% off
    nearer = _setting("hps nearer", "hps", {0: 0.4}, {"model.match_params": 51_000})  # 2% off
    longer = _setting("hps longer", "hps", {0: 0.4}, {"model.match_params": 50_000, "train.total_env_steps": 2000})
    assert hps_counterpart(searched, b, [far, near, nearer, longer]).label == "hps nearer"
    assert hps_counterpart(searched, b, [far, longer]) is None  # off by 12%; another step budget is no counterpart
    rnd = _setting("random", "random", {0: 0.3}, {"arch.max_params": 50_000})
    other = _setting("random 60k", "random", {0: 0.3}, {"arch.max_params": 60_000})
    assert random_counterpart(searched, b, True, [other, rnd]).label == "random"
    assert random_counterpart(searched, b, True, [other]) is None  # a budget is matched exactly
    assert random_counterpart(searched, {"trunk": 57_000.0}, False, [other]).label == "random 60k"  # derived: 10%
