"""``arch.method=random``: a tree drawn uniformly from CoNAL's or Recon's space within a trunk-size band.

Known answers: the numbers of distinct trees of small spaces counted by hand (and by brute force over
every branch-point vector), a closed form for large ones, the band held over many draws, a chi-square
test of uniformity, the same seed giving the same tree, and an empty band refused with one line.
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
from scipy.stats import chisquare

from mtrl_arch.cli import main
from mtrl_arch.config import ConfigError, load_config
from mtrl_arch.search import TrunkSpec, make_method
from mtrl_arch.search.derive import DeriveRule
from mtrl_arch.search.random import Band, ConalSpace, ReconSpace
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import mlp_stages


def network(tree: Tree) -> tuple:
    """A tree as the network it builds: per stage, the set of module groups (order-free)."""
    return tuple(frozenset(frozenset(g) for g in st) for st in tree.stages)


def brute_force_trees(T: int, sizes: list[int], band: Band) -> dict[tuple, int]:
    """Every branch-point vector of CoNAL's space, deduplicated as networks -> trunk parameters."""
    out = {}
    names = [f"t{i}" for i in range(T)]
    for b in itertools.product(range(len(sizes) + 1), repeat=T):
        tree = Tree.from_branch_points(names, len(sizes), b)
        c = tree.param_counts(sizes)
        trunk = c["shared"] + c["subgroup"] + c["specific"]
        if trunk in band:
            out[network(tree)] = trunk
    return out


@pytest.mark.parametrize("T,L,by_hand", [(2, 1, 2), (2, 2, 3), (2, 3, 4), (3, 1, 5), (3, 2, 12), (1, 3, 1)])
def test_conal_space_counts_distinct_trees(T: int, L: int, by_hand: int) -> None:
    """Two tasks share the first k stages, k = 0..L (L+1 trees); three tasks over two stages: no sharing (1), a
    pair shares stage 0 and maybe stage 1 (3 x 2), all share stage 0 and then none, a pair or all (5): 12."""
    sizes = [3 + s for s in range(L)]
    sp = ConalSpace(T, sizes)
    assert sp.count(Band()) == by_hand == len(brute_force_trees(T, sizes, Band()))


def test_conal_space_count_closed_form_for_mt50() -> None:
    """Canonical vectors: all zero, or largest point D held by >= 2 tasks: (D+1)^T - D^T - T D^(T-1) per D."""
    T, L = 50, 3
    closed = 1 + sum((D + 1) ** T - D ** T - T * D ** (T - 1) for D in range(1, L + 1))
    assert ConalSpace(T, [5, 7, 11]).count(Band()) == closed


def test_band_counts_match_brute_force_and_draws_stay_inside() -> None:
    T, sizes = 4, [10, 100, 7]
    everything = brute_force_trees(T, sizes, Band())
    costs = sorted(set(everything.values()))
    lo, hi = costs[3], costs[-4]
    band = Band(lo, hi)
    admissible = brute_force_trees(T, sizes, band)
    sp = ConalSpace(T, sizes)
    assert 0 < sp.count(band) == len(admissible) < len(everything)
    names = [f"t{i}" for i in range(T)]
    for seed in range(300):
        b = sp.draw(random.Random(seed), band)
        tree = sp.tree(b, names, "random")
        assert network(tree) in admissible and admissible[network(tree)] == sp.cost(b)
        assert lo <= sp.cost(b) <= hi


@pytest.mark.parametrize("space", ["conal", "recon"])
def test_draws_are_uniform_over_the_admissible_trees(space: str) -> None:
    """Chi-square against the uniform distribution over the admissible trees (3 tasks, 3 stages, a band)."""
    T, sizes = 3, [10, 100, 7]
    names = [f"t{i}" for i in range(T)]
    sp = ConalSpace(T, sizes) if space == "conal" else ReconSpace(T, sizes)
    band = Band(0, 3 * 117 - 7 - 1)  # drops the STL tree and its neighbours
    k = sp.count(band)
    assert k >= 5
    n = 200 * k
    seen = Counter(network(sp.tree(sp.draw(random.Random(seed), band), names, "random")) for seed in range(n))
    assert len(seen) == k
    assert chisquare(list(seen.values())).pvalue > 1e-3


def test_recon_space_holds_trees_conal_cannot_draw() -> None:
    """Recon's PSS tree (stage 0 per task, the rest shared) is in Recon's space, not CoNAL's."""
    sizes = [820, 5020, 25050]  # Pareto MTL's LeNet: the 30.9k shared + 1.6k specific tree
    pss = Band(30890 + 820, 30890 + 820)
    assert ReconSpace(2, sizes).count(pss) == 1
    assert ConalSpace(2, sizes).count(pss) == 0
    assert ReconSpace(2, sizes).count(Band()) == 8 and ReconSpace(1, sizes).count(Band()) == 1


def spec(T: int = 3) -> TrunkSpec:
    return TrunkSpec(tuple(f"t{i}" for i in range(T)), mlp_stages(4, [8, 8, 8]))  # stages 40, 72, 72


def test_the_method_draws_from_the_seed_and_records_the_draw() -> None:
    rule = DeriveRule(max_params=400, min_params=200)
    trees = [make_method("random", spec(), {}, seed, derive=rule).derive() for seed in range(12)]
    again = make_method("random", spec(), {}, 5, derive=rule).derive()
    assert again == trees[5] and again.method == "random"
    assert len({network(t) for t in trees}) > 1  # different seeds, generally different trees
    for t in trees:
        d = t.derive
        assert 200 <= d["params"]["trunk"] <= 400
        assert d["space"] == "conal" and d["band"] == [200, 400] and d["seed"] in range(12)
        assert d["admissible"] == ConalSpace(3, [40, 72, 72]).count(Band(200, 400))
    recon = make_method("random", spec(), {"space": "recon"}, 0).derive()
    assert recon.derive["admissible"] == 8 and recon.derive["space"] == "recon"
    assert json.loads(recon.to_json())["derive"]["band"] == [0, 0]


def test_an_empty_band_is_refused_with_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        make_method("random", spec(), {"space": "recon"}, 0, derive=DeriveRule(max_params=190, min_params=185))
    msg = str(e.value)
    assert "\n" not in msg and "no tree of the recon space" in msg and "184 to 552" in msg
    with pytest.raises(ConfigError, match="arch.min_params=9 exceeds arch.max_params=8"):
        DeriveRule(max_params=8, min_params=9)
    with pytest.raises(ConfigError, match="arch.method=conal does not support arch.min_params"):
        make_method("conal", spec(), derive=DeriveRule(min_params=5))


def test_cli_dry_run_shows_the_drawn_tree_and_refuses_an_empty_band(capsys, tmp_path, monkeypatch) -> None:
    import yaml

    monkeypatch.chdir(tmp_path)
    base = ["multi_fashion_mnist_hps", "model.backbone=lenet", "data.root=/nonexistent", "arch.method=random"]
    capsys.readouterr()
    assert main(["train", *base, "arch.options.space=recon", "arch.min_params=31000", "arch.max_params=36000",
                 "--dry-run"]) == 0
    cfg_doc, counts_doc = yaml.safe_load_all(capsys.readouterr().out)
    assert cfg_doc["arch"]["min_params"] == 31000 and cfg_doc["arch"]["options"] == {"space": "recon"}
    shown = counts_doc["trees"]["trunk"]
    assert shown["derive"]["admissible"] == 2  # stage 0 (31,710) or stage 1 (35,910) turned specific
    trunk = shown["derive"]["params"]["trunk"]
    assert trunk in (31710, 35910) and counts_doc["parameters"]["trunk"]["total"] == trunk + 1020  # heads: 2 x 510
    assert main(["train", *base, "arch.max_params=30000", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: arch.method=random: no tree") and err.count("\n") == 1
    assert main(["train", *base, "arch.options.space=nas", "--dry-run"]) == 2
    assert "arch.options.space must be one of conal, recon" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert load_config("multi_fashion_mnist_hps", ["arch.method=random"]).arch.method == "random"


def test_a_random_run_trains_its_drawn_tree_and_writes_it_to_arch_json(tmp_path) -> None:
    """Supervised, end to end (tiny LeNet on real Multi-Fashion+MNIST): arch.json holds the draw and its counts."""
    from data_roots import data_overrides

    from mtrl_arch.logger import read_metrics

    run = tmp_path / "run"
    over = ["model.backbone=lenet", "arch.method=random", "arch.options.space=recon", "arch.min_params=31000",
            "arch.max_params=36000", "train.epochs=1", "train.limit_batches=2", "eval.limit_batches=1",
            "train.batch_size=8", "eval.batch_size=64", "wandb.mode=disabled", "data.num_workers=0",
            *data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "multi_fashion_mnist_hps", *over, f"run_dir={run}", "--no-progress"]) == 0
    tree = json.loads((run / "arch.json").read_text())["networks"]["trunk"]
    d = tree["derive"]
    assert tree["method"] == "random" and d["space"] == "recon" and d["band"] == [31000, 36000] and d["admissible"] == 2
    logged = next(r for r in read_metrics(run) if "params/trunk/total" in r)
    assert logged["params/trunk/total"] == d["params"]["total"] and 31000 <= d["params"]["trunk"] <= 36000


def test_rl_draws_each_network_within_its_own_band(capsys, tmp_path, monkeypatch) -> None:
    """MT10 actor and critic (3 hidden layers of 64): each draws in its own band (arch.critic.* over arch.*)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    over = ["arch.method=random", "model.hidden=[64,64,64]", "arch.min_params=40000", "arch.max_params=120000",
            "arch.critic.min_params=150000", "arch.critic.max_params=300000"]
    assert main(["train", "mt10_hps", *over, "--dry-run"]) == 0
    _, counts_doc = yaml.safe_load_all(capsys.readouterr().out)
    actor, critic = (counts_doc["trees"][n]["derive"] for n in ("actor", "critic"))
    assert 40000 <= actor["params"]["trunk"] <= 120000 and actor["band"] == [40000, 120000]
    assert 150000 <= critic["params"]["trunk"] <= 300000 and critic["band"] == [150000, 300000]
    assert actor["admissible"] > 1 and critic["admissible"] > 1
