"""The pieces of ``benchmarks/synthetic_recovery.py --controls`` and :func:`mtrl_arch.synthetic.train_tree`.

Known answers: the planted tree's size and its band's admissible trees counted by hand and by brute
force, Recon's space empty in that band, a task whose modules are all its own learning the same in
any tree, C paying for a shared stage 0, and the paired differences of hand-made runs.
"""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from mtrl_arch.search.random import ConalSpace
from mtrl_arch.synthetic import ConflictProblem, train_tree
from mtrl_arch.tree import Tree

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "synthetic_recovery.py"
spec = importlib.util.spec_from_file_location("synthetic_recovery", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_planted_band_holds_the_planted_tree_and_six_trees() -> None:
    """Stages of 8x8+8 = 72 parameters. The planted tree [3, 3, 0] has 6 modules (A and B's 3, C's 3): 432. The
    band [389, 432] admits trees of exactly 6 modules: [3, 3, 0] and [2, 2, 1], each with any task as the odd one."""
    problem = ConflictProblem(seed=0)
    sizes = problem.spec().stage_params()
    assert sizes == [72, 72, 72]
    band, S = bench.planted_band(problem)
    planted = problem.planted_tree()
    assert S == 432 == bench.trunk_params(planted, sizes) and S in band and (band.lo, band.hi) == (389, 432)
    assert bench.recovered(planted) and planted.group_of(1, 0) == (0, 1) and planted.group_of(2, 2) == (2,)
    brute = {bench.network(Tree.from_branch_points(problem.tasks, 3, b)) for b in itertools.product(range(4), repeat=3)
             if bench.trunk_params(Tree.from_branch_points(problem.tasks, 3, b), sizes) in band}
    assert len(brute) == ConalSpace(3, sizes).count(band) == 6
    assert bench.network(planted) in brute


def test_random_rows_draw_inside_the_band_and_recon_has_none() -> None:
    problem = ConflictProblem(seed=0)
    band, _ = bench.planted_band(problem)
    planted, hits = bench.network(problem.planted_tree()), 0
    for seed in range(60):
        tree = bench.random_tree(problem, "conal", band, seed)
        assert bench.trunk_params(tree, [72] * 3) in band and tree.derive["admissible"] == 6
        assert bench.chance_of_planted(tree, 432) == pytest.approx(1 / 6)
        hits += bench.network(tree) == planted
    assert 0 < hits < 30  # about 1 in 6 (10 expected)
    assert bench.random_tree(problem, "recon", band, 0) is None  # Recon's trunks: 216, 360, 504, 648
    everything = bench.random_tree(problem, "conal", bench.size_band(648), 0)  # STL's size: [584, 648] holds STL only
    assert everything.derive["admissible"] == 1 and bench.network(everything) == bench.network(Tree.stl(problem.tasks, 3))
    assert bench.chance_of_planted(everything, 432) == 0.0 and bench.chance_of_planted(problem.planted_tree(), 432) is None


def test_retrained_trees_c_learns_alone_where_private_and_pays_for_sharing() -> None:
    """C's modules are all its own in the planted tree and in STL: the same start, batches and (summed, elementwise
    Adam) updates, so the same held-out loss. Hard sharing makes C share stage 0 with A and B: a worse C."""
    for seed in (0, 1):
        problem = ConflictProblem(seed=seed)
        loss = {name: problem.evaluate(train_tree(tree, problem, steps=200, seed=0)) for name, tree in
                (("planted", problem.planted_tree()), ("stl", Tree.stl(problem.tasks, 3)),
                 ("hps", Tree.hps(problem.tasks, 3)))}
        torch.testing.assert_close(loss["planted"][2], loss["stl"][2], rtol=1e-4, atol=1e-6)
        assert loss["planted"][2] < 0.5 * loss["hps"][2], loss
        assert not torch.allclose(loss["planted"][:2], loss["stl"][:2])  # A and B do share in the planted tree
    again = problem.evaluate(train_tree(problem.planted_tree(), problem, steps=200, seed=0))
    assert torch.equal(again, loss["planted"])


def test_summaries_and_paired_differences_of_hand_made_runs() -> None:
    def row(a: float, b: float, c: float, planted: bool = False) -> dict:
        return {"losses": {"A": a, "B": b, "C": c}, "mean_loss": (a + b + c) / 3, "delta_m": -a, "planted": planted,
                "recovered": planted, "admissible": None, "trunk_params": 432, "chance": None}

    runs = [{"rows": {"conal": row(1, 2, 3, True), "random": row(2, 2, 6), "hps": row(1, 2, 3), "planted": row(1, 2, 3, True)}},
            {"rows": {"conal": row(2, 2, 2), "random": row(3, 2, 5), "hps": row(2, 2, 2), "planted": row(1, 1, 1, True)}}]
    s = bench.summarize(runs)
    assert (s["conal"]["planted"], s["random"]["planted"], s["conal"]["n"]) == (1, 0, 2)
    assert s["random"]["losses"]["C"] == [6, 5]
    d = bench.paired_diffs(runs)
    assert d["conal - random"]["A"]["mean"] == pytest.approx(-1.0)  # both pairs -1: the interval is a point
    assert d["conal - random"]["A"]["lo"] == pytest.approx(-1.0) == d["conal - random"]["A"]["hi"]
    assert d["conal - random"]["mean"]["mean"] == pytest.approx(-(4 / 3 + 4 / 3) / 2)
    assert d["conal - random"]["delta_m"]["mean"] == pytest.approx(1.0)
    assert d["conal - hps"]["mean"]["mean"] == 0.0 and d["conal - planted"]["C"]["mean"] == pytest.approx(0.5)
    assert d["conal - random"]["B"]["n"] == 2 and set(d) == {f"{a} - {b}" for a, b in bench.DIFFS if bench.AT_CONAL not in (a, b)}


def test_write_section_replaces_its_own_heading_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "r.md"
    bench.write_section(path, "## One\n\nfirst\n")
    bench.write_section(path, "## Two\n\nsecond\n")
    bench.write_section(path, "## One\n\nfirst, again\n")
    assert path.read_text() == "## One\n\nfirst, again\n\n## Two\n\nsecond\n"
