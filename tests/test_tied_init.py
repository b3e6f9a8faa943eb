"""Tied initialisation: one core mechanism (``mtrl_arch.trunk.TiedStage``) for every method and domain.

Every copy of a stage (the shared one, each group's, each task's private one, the retrain's)
starts from the stage's one template; an ensemble (SAC's twin critics) has one template per
member, so its members stay independent.
"""
from __future__ import annotations

import pytest
import torch

from mtrl_arch.agents.sac import MTSAC, N_CRITICS, critic_member_stages
from mtrl_arch.config import load_config
from mtrl_arch.search import make_method
from mtrl_arch.search.base import TrunkSpec
from mtrl_arch.steps import weight_parameters
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import TiedStage, Trunk, linear_stage, tie_stages

TASKS = ("a", "b", "c")
OBS, HID = 5, [8, 8, 8]
METHODS = ["hps", "stl", "conal", "conal_pro", "ltb", "adashare", "recon"]


def template_rows(stages) -> dict[tuple, list[torch.Tensor]]:
    """Every template row of every tied stage, keyed by the row's shape."""
    out: dict[tuple, list[torch.Tensor]] = {}
    for f in stages:
        for t in f.template.values():
            for row in t:
                out.setdefault(tuple(row.shape), []).append(row)
    return out


def assert_every_row_is_a_template_row(params, rows: dict[tuple, list[torch.Tensor]]) -> set[int]:
    """Every module copy of every parameter equals one template row; returns which templates were used."""
    used = set()
    for p in params:
        for r in p.detach():
            hits = [i for i, t in enumerate(rows.get(tuple(r.shape), [])) if torch.equal(r, t)]
            assert hits, f"a copy of shape {tuple(r.shape)} is not any stage's template"
            used.update(id(rows[tuple(r.shape)][i]) for i in hits)
    return used


def test_tied_stage_copies_one_template_per_member_and_leaves_the_rng_alone() -> None:
    f = linear_stage(4, 3)
    state = torch.random.get_rng_state()
    single, pair = TiedStage(f, seed=7), TiedStage(f, seed=7, members=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # building the template drew nothing from the run's stream
    bank = single(5)
    assert all(torch.equal(bank.weight[i], bank.weight[0]) for i in range(5))
    assert torch.equal(single(2).weight[1], bank.weight[0])  # every bank built from it: the same weights
    ens = pair(6)  # member-major: rows 0-2 member 0, rows 3-5 member 1
    assert torch.equal(ens.weight[2], ens.weight[0]) and torch.equal(ens.weight[5], ens.weight[3])
    assert not torch.equal(ens.weight[0], ens.weight[3])
    assert torch.equal(ens.weight[0], bank.weight[0])  # member 0's template is the single template's draw
    with pytest.raises(ValueError, match="cannot hold 5"):
        pair(5)
    assert [s.template["weight"].shape[0] for s in tie_stages([f, f], 0, members=2)] == [2, 2]
    a, b = tie_stages([f, f], 0)
    assert not torch.equal(a(1).weight, b(1).weight)  # each stage from its own seed


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_every_stage_copy_from_its_template(method: str) -> None:
    """The search network of every method, and the trunk of any tree it may derive, start tied."""
    stages = tie_stages([linear_stage(OBS, HID[0]), linear_stage(HID[0], HID[1]), linear_stage(HID[1], HID[2])], 100)
    spec = TrunkSpec(TASKS, stages, linear_stage(HID[-1], 2, "identity"), residual=(False, True, True))
    m = make_method(method, spec)
    net = m.build()
    rows = template_rows(stages)
    shapes = {tuple(r.shape) for v in rows.values() for r in v}
    stage_params = [p for p in weight_parameters(net) if tuple(p.shape[1:]) in shapes]
    assert stage_params, "no stage parameters found"
    used = assert_every_row_is_a_template_row(stage_params, rows)
    assert len(used) == len(stages) * 2  # weight and bias of every stage
    for tree in (Tree.hps(TASKS, 3), Tree.stl(TASKS, 3), Tree.from_branch_points(TASKS, 3, [1, 2, 3])):
        fixed = Trunk(tree, stages, spec.heads)
        assert_every_row_is_a_template_row([p for b in (*fixed.shared, *fixed.specific) for p in b.parameters()], rows)


@pytest.mark.parametrize("method", ["conal", "conal_pro", "ltb", "hps"])
def test_sac_search_networks_and_retrain_are_tied_per_critic_member(method: str) -> None:
    tasks = ("reach-v3", "push-v3")
    obs, act = 39 + len(tasks), 4
    cfg = load_config("mt10_quick", ["model.hidden=[16,16]", "agent.batch_per_task=8", "agent.buffer_size=2000",
                                     f"arch.method={method}", "arch.search_steps=100", "wandb.mode=disabled", "device=cpu"])
    agent = MTSAC(tasks, obs, act, cfg)
    critic_tied = critic_member_stages(obs, act, [16, 16], init=cfg.model.init, tie_seed=cfg.seed)[0]  # the agent's draws
    assert all(isinstance(t, TiedStage) and t.members == N_CRITICS for t in critic_tied)
    for stages, net in ((agent.actor_method.spec.stages, agent.actor.net), (critic_tied, agent.critic.net)):
        rows = template_rows(stages)
        shapes = {tuple(r.shape) for v in rows.values() for r in v}
        used = assert_every_row_is_a_template_row([p for p in weight_parameters(net) if tuple(p.shape[1:]) in shapes], rows)
        assert len(used) == sum(t.template["weight"].shape[0] * 2 for t in stages)  # every member's template is used
    for t in critic_tied:  # the twin critics stay independent
        assert not torch.equal(t.template["weight"][0], t.template["weight"][1])
    # the retrain of a derived tree (what a search ends in) starts from the same templates
    agent._build(search=False, trees={"actor": Tree.stl(tasks, 2), "critic": Tree.from_branch_points(tasks, 2, [1, 2])})
    rows = template_rows(critic_tied)
    used = assert_every_row_is_a_template_row([p for p in weight_parameters(agent.critic.net)
                                               if tuple(p.shape[1:]) in {(45, 16), (16, 16), (16,)}], rows)
    assert len(used) == 2 * 2 * N_CRITICS


def test_tied_init_off_gives_independent_copies() -> None:
    cfg = load_config("mt10_quick", ["model.hidden=[16,16]", "agent.buffer_size=2000", "arch.method=stl",
                                     "model.tied_init=false", "wandb.mode=disabled", "device=cpu"])
    w = MTSAC(("reach-v3", "push-v3"), 41, 4, cfg).actor.net.specific[0].weight
    assert not torch.equal(w[0], w[1])
    cfg = load_config("mt10_quick", ["model.hidden=[16,16]", "agent.buffer_size=2000", "arch.method=stl",
                                     "wandb.mode=disabled", "device=cpu"])
    w = MTSAC(("reach-v3", "push-v3"), 41, 4, cfg).actor.net.specific[0].weight
    assert torch.equal(w[0], w[1])


def test_supervised_trunks_tie_through_the_same_knob_and_the_old_key_names_it(capsys) -> None:
    from mtrl_arch.cli import main
    from mtrl_arch.envs.supervised import make_spec

    def first_conv(*ov: str) -> torch.Tensor:
        spec = make_spec(load_config("multi_fashion_mnist_stl", ["model.backbone=lenet", "model.options.width=2", *ov]))
        return Trunk(Tree.stl(spec.tasks, spec.n_stages), spec.stages, spec.heads).specific[0].conv.weight.detach()

    tied, free = first_conv(), first_conv("model.tied_init=false")
    assert tied.shape[0] == 2 and tied.shape[1] == 20  # two task copies of conv 1->10w, w = 2
    assert torch.equal(tied[0], tied[1]) and not torch.equal(free[0], free[1])
    assert main(["train", "multi_fashion_mnist_hps", "model.options.tied_init=false", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: model.options.tied_init was renamed model.tied_init"
