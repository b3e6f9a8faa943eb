"""Derive rules (arch.derive, arch.derive_margin, arch.max_params): known answers on hand-set
architecture weights, budgets against brute force, one-line errors, arch.json round trips."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from mtrl_arch.cli import main as cli_main
from mtrl_arch.config import ConfigError, load_config
from mtrl_arch.run import read_arch, write_arch
from mtrl_arch.search import DeriveRule, TrunkSpec, make_method
from mtrl_arch.search.derive import best_within, margin_choice
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import Trunk, linear_stage, mlp_stages

TASKS = ("a", "b", "c")
IN, OUT = 5, 2
HIDDEN = [8, 12, 6]  # distinct stage sizes, so budgets tell trees apart


def spec(hidden=HIDDEN, residual=None) -> TrunkSpec:
    return TrunkSpec(TASKS, mlp_stages(IN, hidden), linear_stage(hidden[-1], OUT, "identity"), residual=residual)


def sizes(s: TrunkSpec) -> list[int]:
    return s.stage_params()


def trunk_params(tree: Tree, s: TrunkSpec) -> int:
    """The budgeted count, from the network actually built (not the closed form the methods use)."""
    c = Trunk(tree, s.stages, s.heads).param_counts()
    return c["shared"] + c["subgroup"] + c["specific"]


def conal(probs, rule=None, s=None):
    """CoNAL with alpha = log(probs): softmax(alpha) gives back the probabilities."""
    m = make_method("conal", s or spec(), derive=rule)
    m.build()
    with torch.no_grad():
        m.net.alpha.copy_(torch.tensor(probs, dtype=torch.float32).log())
    return m


# ---- the rules' building blocks ----------------------------------------------------------------------
def test_margin_choice_known_answers() -> None:
    # choices from most private (0) to most shared (last)
    assert margin_choice([0.40, 0.05, 0.55], 0.1) == 2    # nothing beats sharing
    assert margin_choice([0.50, 0.10, 0.40], 0.1) == 0    # private wins by exactly M
    assert margin_choice([0.50, 0.10, 0.40], 0.11) == 2   # ... by less than M: share
    assert margin_choice([0.45, 0.45, 0.10], 0.1) == 1    # a tie with a more shared choice is no win
    assert margin_choice([0.30, 0.60, 0.10], 0.2) == 1    # branch later, not fully private
    assert margin_choice([0.6, 0.4], 0.3) == 1 and margin_choice([0.7, 0.3], 0.3) == 0


def test_margin_zero_is_argmax_with_ties_to_sharing() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = torch.randint(0, 4, (5,), generator=g).double()  # many ties
        argmax = int(4 - torch.argmax(p.flip(0)))
        assert margin_choice(p.tolist(), 0.0) == argmax


def test_best_within_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        items = [[(int(torch.randint(0, 20, (1,), generator=g)), float(torch.randn(1, generator=g))) for _ in range(3)]
                 for _ in range(4)]
        for budget in (0, 10, 25, 40, 80):
            found = best_within(items, budget)
            fits = [sum(it[j][1] for it, j in zip(items, pick)) for pick in itertools.product(range(3), repeat=4)
                    if sum(it[j][0] for it, j in zip(items, pick)) <= budget]
            if not fits:
                assert found is None
                continue
            pick, score, cost = found
            assert cost == sum(it[j][0] for it, j in zip(items, pick)) <= budget
            assert score == pytest.approx(max(fits)) == pytest.approx(sum(it[j][1] for it, j in zip(items, pick)))


# ---- CoNAL ---------------------------------------------------------------------------------------
PROBS = [[0.40, 0.05, 0.05, 0.50],   # a: sharing wins
         [0.45, 0.05, 0.10, 0.40],   # b: fully private wins by 0.05
         [0.60, 0.05, 0.05, 0.30]]   # c: fully private wins by 0.30


def test_conal_argmax_is_unchanged() -> None:
    m = conal(PROBS)
    tree = m.derive()
    assert m.branch_points() == [3, 0, 0]
    old = Tree.from_branch_points(TASKS, 3, [3, 0, 0])  # today's rule, by hand
    assert tree == old and tree.derive["rule"] == "argmax" and tree.derive["max_params"] == 0
    assert conal(PROBS, DeriveRule()).derive() == tree
    # equal weights (a fresh search): every tie goes to sharing
    fresh = make_method("conal", spec())
    fresh.build()
    assert fresh.branch_points() == [3, 3, 3]


def test_conal_margin_shares_below_the_margin_and_branches_above() -> None:
    m = conal(PROBS, DeriveRule("margin", 0.1))
    assert m.branch_points() == [3, 3, 0]          # b wins by 0.05 < 0.1: shares; c wins by 0.3: branches
    tree = m.derive()
    assert tree.derive["rule"] == "margin" and tree.derive["margin"] == 0.1
    assert tree.derive["scores"]["branch_probs"]["b"][0] == pytest.approx(0.45, abs=1e-6)
    assert conal(PROBS, DeriveRule("margin", 0.0)).branch_points() == conal(PROBS).branch_points()
    assert conal(PROBS, DeriveRule("margin", 0.35)).branch_points() == [3, 3, 3]


def _brute_conal(logp, s, budget):
    best = None
    for b in itertools.product(range(4), repeat=len(TASKS)):
        cost = trunk_params(Tree.from_branch_points(TASKS, 3, list(b)), s)
        if cost <= budget:
            key = (sum(logp[t][bt] for t, bt in enumerate(b)), -cost)
            best = key if best is None or key > best else best
    return best


def test_conal_max_params_is_the_best_tree_within_the_budget() -> None:
    s = spec()
    P = sizes(s)
    low, high = sum(P), len(TASKS) * sum(P)
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        probs = torch.rand(3, 4, generator=g) ** 3 + 1e-3
        probs = (probs / probs.sum(1, keepdim=True)).tolist()
        logp = torch.tensor(probs).double().log().log_softmax(-1).tolist()
        for budget in sorted({low, low + P[2], low + 2 * P[2] + P[1], (low + high) // 2, high - P[0], high}):
            m = conal(probs, DeriveRule(max_params=budget), s)
            tree = m.derive()
            cost = trunk_params(tree, s)
            assert cost <= budget and tree.derive["params"]["trunk"] == cost
            score = sum(logp[t][b] for t, b in enumerate(m.branch_points()))
            want = _brute_conal(logp, s, budget)
            assert score == pytest.approx(want[0], abs=1e-9), (trial, budget)


def test_conal_max_params_keeps_argmax_when_it_fits() -> None:
    s = spec()
    free = conal(PROBS, s=s).derive()
    fits = conal(PROBS, DeriveRule(max_params=trunk_params(free, s)), s).derive()
    assert fits == free and fits.derive["budget_binding"] is False
    tight = conal(PROBS, DeriveRule(max_params=trunk_params(free, s) - 1), s).derive()
    assert tight != free and trunk_params(tight, s) < trunk_params(free, s) and tight.derive["budget_binding"] is True


def test_a_budget_below_full_sharing_is_a_one_line_error() -> None:
    s = spec()
    low = sum(sizes(s))
    for name in ("conal", "conal_pro", "recon", "hps"):
        with pytest.raises(ConfigError, match=f"arch.max_params >= {low} ") as e:
            make_method(name, s, derive=DeriveRule(max_params=low - 1))
        assert "\n" not in str(e.value)
    make_method("conal", s, derive=DeriveRule(max_params=low))  # exactly full sharing fits
    with pytest.raises(ConfigError, match=f">= {len(TASKS) * low} "):
        make_method("stl", s, derive=DeriveRule(max_params=len(TASKS) * low - 1))


# ---- CoNAL-Pro -----------------------------------------------------------------------------------
def conal_pro(rule=None, s=None):
    m = make_method("conal_pro", s or spec(), {"steps_per_stage": 10}, derive=rule)
    m.build()
    return m


def set_stay(m, p_stay) -> None:
    with torch.no_grad():
        p = torch.tensor(p_stay, dtype=torch.float64)
        m.net.alpha.copy_(torch.stack([p.log(), (1 - p).log()], 1).float())


def test_conal_pro_margin_per_round() -> None:
    # a: stays; b: leave wins by 0.04; c: leave wins by 0.4
    p_stay = [0.7, 0.48, 0.3]
    argmax = conal_pro()
    set_stay(argmax, p_stay)
    assert argmax.stayers() == []        # only a prefers to stay, and a lone stayer is not placed
    m = conal_pro(DeriveRule("margin", 0.1))
    set_stay(m, p_stay)
    assert m.stayers() == [0, 1]         # b's 0.04 is below the margin: it stays with a
    m.end_round()
    assert m.net.placed == [((0, 1), 2)] and m.net.remaining == [2]
    fresh = conal_pro(DeriveRule("margin", 0.0))
    set_stay(fresh, p_stay)
    assert fresh.stayers() == argmax.stayers()


def _brute_stayers(m, budget, ending):
    logp = m.net.alpha.detach().double().log_softmax(-1)
    rem, best = m.net.remaining, None
    for k in range(len(rem), -1, -1):
        for stay in itertools.combinations(rem, k):
            if k == 1 and not m.net.placed:
                continue
            if m.round_params(list(stay), ending) > budget:
                continue
            score = sum(float(logp[t, 0] if t in stay else logp[t, 1]) for t in rem)
            best = score if best is None or score > best else best
    return best


def test_conal_pro_max_params_per_round_against_brute_force() -> None:
    s = spec()
    low = sum(sizes(s))
    g = torch.Generator().manual_seed(3)
    n_binding = [0, 0]
    for budget in (low, low + sizes(s)[2], low + 2 * sizes(s)[2], low + 400, 3 * low):
        for trial in range(4):
            m = conal_pro(DeriveRule(max_params=budget), s)
            while m.searching:
                set_stay(m, (torch.rand(3, generator=g) * 0.9 + 0.05).tolist())
                logp = m.net.alpha.detach().double().log_softmax(-1)
                stay = m.stayers()
                assert m.round_params(stay, True) <= budget
                # today's stayers (lone-stayer rule included) when they fit, else the best that fits
                argmax = [t for t in m.net.remaining if logp[t, 0] >= logp[t, 1]]
                argmax = argmax if len(argmax) > 1 or m.net.placed else []
                if m.round_params(argmax, True) <= budget:
                    assert stay == argmax
                else:
                    score = sum(float(logp[t, 0] if t in stay else logp[t, 1]) for t in m.net.remaining)
                    assert score == pytest.approx(_brute_stayers(m, budget, True), abs=1e-9)
                    n_binding[0] += 1
                mid = m.derive()  # a derive() mid-search fits too (the rest purely specific)
                assert trunk_params(mid, s) <= budget
                if m.round_params(argmax, False) > budget:
                    mid_stay = m.stayers(ending=False)
                    score = sum(float(logp[t, 0] if t in mid_stay else logp[t, 1]) for t in m.net.remaining)
                    assert score == pytest.approx(_brute_stayers(m, budget, False), abs=1e-9)
                    n_binding[1] += 1
                m.end_round()
            tree = m.derive()
            assert trunk_params(tree, s) <= budget == tree.derive["max_params"]
    assert min(n_binding) >= 5, n_binding  # the budget did bind in several rounds


# ---- AdaShare ------------------------------------------------------------------------------------
def adashare(p_exec, rule=None, options=None):
    s = spec([8, 8, 8], residual=(False, True, True))
    m = make_method("adashare", s, {"derive": "argmax", **(options or {})}, derive=rule)
    m.build()
    m.net.unlocked = (True, True, True)
    with torch.no_grad():
        p = torch.tensor(p_exec, dtype=torch.float64)
        m.net.logits.copy_(torch.stack([p.log(), (1 - p).log()], -1).float())
    return m, s


P_EXEC = [[0.9, 0.48, 0.2],    # a: block 1 skip wins by 0.04, block 2 by 0.6
          [0.9, 0.6, 0.45],    # b: block 2 skip wins by 0.1
          [0.9, 0.3, 0.7]]


def test_adashare_margin_keeps_a_block_unless_skip_wins_by_m() -> None:
    m, _ = adashare(P_EXEC)
    assert m.policy_table() == [[True, False, False], [True, True, False], [True, False, True]]  # argmax
    m, _ = adashare(P_EXEC, DeriveRule("margin", 0.1))
    # block 0 is not skippable; a's block 1 (0.04 < M) kept; b's block 2 (0.1 = M) skipped
    assert m.policy_table() == [[True, True, False], [True, True, False], [True, False, True]]
    tree = m.derive()
    assert tree.derive["rule"] == "margin" and tree.derive["policy"] == tree.meta["derive"] == "margin"


def test_adashare_max_params_against_brute_force() -> None:
    g = torch.Generator().manual_seed(5)
    for trial in range(5):
        p = (torch.rand(3, 3, generator=g) * 0.9 + 0.05).tolist()
        m, s = adashare(p)
        P = sizes(s)
        logp = m.net.logits.detach().double().log_softmax(-1)
        for budget in (P[0], P[0] + P[1], sum(P) - 1, sum(P)):
            m.set_derive_rule(DeriveRule(max_params=budget))
            table = m.policy_table()
            tree = m.derive()
            assert trunk_params(tree, s) <= budget
            score = sum(float(logp[t, l, 0 if table[t][l] else 1]) for t in range(3) for l in (1, 2))
            best = None
            for bits in itertools.product((True, False), repeat=6):
                tab = [[True, bits[2 * t], bits[2 * t + 1]] for t in range(3)]
                if m.table_params(tab) <= budget:
                    sc = sum(float(logp[t, l, 0 if tab[t][l] else 1]) for t in range(3) for l in (1, 2))
                    best = sc if best is None or sc > best else best
            assert score == pytest.approx(best, abs=1e-9), (trial, budget)


def test_adashare_budget_below_the_blocks_that_cannot_be_skipped() -> None:
    s = spec([8, 8, 8], residual=(False, True, True))
    with pytest.raises(ConfigError, match=f">= {sizes(s)[0]} "):
        make_method("adashare", s, derive=DeriveRule(max_params=sizes(s)[0] - 1))


# ---- Recon, LTB, fixed ---------------------------------------------------------------------------
def test_recon_budget_takes_layers_in_conflict_order_while_it_fits() -> None:
    s = spec()
    P, T = sizes(s), len(TASKS)
    m = make_method("recon", s, derive=DeriveRule(max_params=sum(P) + (T - 1) * P[2]))
    m.counts = {"stage0": torch.tensor([0, 0, 5]), "stage1": torch.tensor([0, 0, 9]), "stage2": torch.tensor([0, 0, 7])}
    assert m.ranking() == [1, 2, 0]
    assert m.selected() == []                          # stage 1 does not fit: stop there (stage 2 would)
    m.set_derive_rule(DeriveRule(max_params=sum(P) + (T - 1) * (P[1] + P[2])))
    assert m.selected() == [1, 2]
    tree = m.derive()
    assert trunk_params(tree, s) == tree.derive["params"]["trunk"] <= sum(P) + (T - 1) * (P[1] + P[2])
    assert tree.derive["scores"]["ranking"] == ["stage1", "stage2", "stage0"]
    with pytest.raises(ConfigError, match="fraction"):
        make_method("recon", s, {"fraction": 0.5}, derive=DeriveRule(max_params=10_000))


@pytest.mark.parametrize("name, rule, what", [("ltb", DeriveRule("margin"), "arch.derive=margin"),
                                              ("ltb", DeriveRule(max_params=10**6), "arch.max_params"),
                                              ("recon", DeriveRule("margin"), "arch.derive=margin")])
def test_unsupported_rules_are_refused(name, rule, what) -> None:
    with pytest.raises(ConfigError, match=f"arch.method={name} does not support {what}") as e:
        make_method(name, spec(), derive=rule)
    assert "\n" not in str(e.value)


def test_config_validation() -> None:
    cfg = load_config("mt10_conal", ["arch.derive=margin", "arch.derive_margin=0.2"])
    assert DeriveRule.of(cfg.arch) == DeriveRule("margin", 0.2, 0)
    assert DeriveRule.of(load_config("mt10_conal", ["arch.max_params=5000"]).arch).max_params == 5000
    assert DeriveRule.of(load_config("mt10_conal").arch) == DeriveRule()
    bad = {"arch.derive=best": "arch.derive must be one of argmax, margin",
           "arch.derive_margin=1.0": r"arch.derive_margin must be in \[0, 1\)",
           "arch.derive_margin=-0.1": r"arch.derive_margin must be in \[0, 1\)",
           "arch.max_params=-1": "arch.max_params must be >= 0"}
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load_config("mt10_conal", [override])
    with pytest.raises(ConfigError, match="arch.max_params needs arch.derive=argmax"):
        load_config("mt10_conal", ["arch.derive=margin", "arch.max_params=5000"])
    with pytest.raises(ConfigError, match="arch.method=ltb does not support arch.derive=margin"):
        load_config("mt10_ltb", ["arch.derive=margin"])


def test_make_method_reads_the_run_config() -> None:
    cfg = load_config("mt10_conal", ["arch.derive=margin", "arch.derive_margin=0.25"])
    m = make_method("conal", spec(), derive=cfg.arch)
    assert m.derive_rule == DeriveRule("margin", 0.25)
    assert make_method("conal", spec()).derive_rule == DeriveRule()


# ---- recorded in arch.json -----------------------------------------------------------------------
def test_arch_json_round_trip_keeps_the_rule_and_counts(tmp_path, capsys) -> None:
    s = spec()
    tree = conal(PROBS, DeriveRule("margin", 0.1), s).derive()
    c = Trunk(tree, s.stages, s.heads).param_counts()
    assert tree.derive["params"] == {**c, "trunk": c["shared"] + c["subgroup"] + c["specific"]}
    write_arch(tmp_path, {"trunk": tree})
    back = read_arch(tmp_path)["trunk"]
    assert back == tree and back.derive == json.loads(json.dumps(tree.derive))
    assert back.derive["rule"] == "margin" and back.derive["params"]["total"] == c["total"]
    assert "derive: margin (margin 0.1)" in (tmp_path / "arch.txt").read_text()
    assert cli_main(["arch", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "derive: margin (margin 0.1); no parameter budget" in out
    trunk = c["shared"] + c["subgroup"] + c["specific"]
    assert f"params: trunk {trunk} (shared {c['shared']}, subgroup {c['subgroup']}, specific {c['specific']})" in out
    assert "branch_probs:" in out and "b: [0.45" in out


def test_old_arch_json_without_derive_fields_still_reads(tmp_path, capsys) -> None:
    tree = Tree.from_branch_points(TASKS, 3, [3, 3, 0])
    d = tree.to_dict()
    assert "derive" not in d  # a tree with no record writes none: the old format
    (tmp_path / "arch.json").write_text(json.dumps({"format": "mtrl-arch/arch-set", "version": 1,
                                                    "networks": {"actor": d}}))
    back = read_arch(tmp_path)["actor"]
    assert back == tree and back.derive == {}
    assert cli_main(["arch", str(tmp_path)]) == 0
    assert "derive:" not in capsys.readouterr().out


def test_manual_keeps_the_source_record(tmp_path) -> None:
    s = spec()
    tree = conal(PROBS, DeriveRule("margin", 0.1), s).derive()
    write_arch(tmp_path, {"trunk": tree})
    m = make_method("manual", s, {"path": str(tmp_path)})
    got = m.derive()
    assert got == tree and got.derive["rule"] == "argmax" and got.derive["source"]["rule"] == "margin"
    with pytest.raises(ConfigError, match=f">= {trunk_params(tree, s)} "):
        small = DeriveRule(max_params=trunk_params(tree, s) - 1)
        make_method("manual", s, {"path": str(tmp_path)}, derive=small).build()


def test_rl_budget_counts_every_critic_member() -> None:
    """arch.max_params bounds each network; the critic's count holds all its ensemble members,
    as the logged params/critic/* counts do."""
    from agents.ensemble import EnsembleTrunk
    from agents.sac import N_CRITICS, critic_member_stages, critic_spec

    s = critic_spec(TASKS, IN, OUT, [16, 16])
    m = make_method("conal", s, derive=DeriveRule(max_params=3 * sum(s.stage_params()) - 1))
    m.build()
    with torch.no_grad():
        m.net.alpha.copy_(torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]]))  # all want to be private
    tree = m.derive()
    stages, head = critic_member_stages(IN, OUT, [16, 16])
    c = EnsembleTrunk(tree, stages, head, N_CRITICS).param_counts()
    assert tree.derive["params"] == {**c, "trunk": c["shared"] + c["subgroup"] + c["specific"]}
    assert tree.derive["params"]["trunk"] <= tree.derive["max_params"] and tree.derive["budget_binding"]
