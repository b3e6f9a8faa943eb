"""Multi-task SAC: one update, per-task alpha, task-balanced replay, save/load, every method in RL."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from mtrl_arch.agents.replay import TaskBalancedReplay
from mtrl_arch.agents.sac import MTSAC
from mtrl_arch.config import ConfigError, load_config
from mtrl_arch.tree import Tree

TASKS = ("reach-v3", "push-v3", "pick-place-v3")
OBS, ACT = 39 + len(TASKS), 4


def make_cfg(*overrides: str):
    return load_config("mt10_quick", ["model.hidden=[32,32]", "agent.batch_per_task=16", "agent.buffer_size=3000",
                                      "arch.method=hps", "arch.search_steps=0", "wandb.mode=disabled", "device=cpu",
                                      *overrides])


def filled(agent: MTSAC, n: int = 300, seed: int = 0) -> MTSAC:
    rng = np.random.default_rng(seed)
    T = len(agent.tasks)
    for _ in range(n):
        obs = rng.normal(size=(T, OBS)).astype(np.float32)
        agent.replay.add(obs, rng.uniform(-1, 1, (T, ACT)), rng.normal(size=T), obs + 0.01, np.zeros(T))
    return agent


def test_one_update_changes_every_network_and_losses_are_finite() -> None:
    agent = filled(MTSAC(TASKS, OBS, ACT, make_cfg()))
    before = {k: {n: p.detach().clone() for n, p in getattr(agent, k).named_parameters()} for k in ("actor", "critic")}
    target_before = {n: p.clone() for n, p in agent.critic_target.named_parameters()}
    out = agent.train_step()
    for k, v in out.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), k
    for k in ("actor", "critic"):
        for n, p in getattr(agent, k).named_parameters():
            assert not torch.equal(p, before[k][n]), f"{k}.{n} did not change"
    # Polyak: target <- (1 - tau) target + tau online
    tau = agent.cfg.agent.tau
    for n, p in agent.critic_target.named_parameters():
        online = dict(agent.critic.named_parameters())[n]
        torch.testing.assert_close(p, (1 - tau) * target_before[n] + tau * online.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target, direction", [(10.0, 1), (-50.0, -1)])
def test_each_task_alpha_moves_toward_its_target_entropy(target: float, direction: int) -> None:
    """Entropy below the target raises alpha; above it lowers alpha -- for every task separately."""
    agent = filled(MTSAC(TASKS, OBS, ACT, make_cfg(f"agent.target_entropy={target}")))
    before = agent.log_alpha.detach().clone()
    for _ in range(3):
        agent.train_step()
    moved = torch.sign(agent.log_alpha.detach() - before)
    assert moved.tolist() == [direction] * len(TASKS)


def test_task_balanced_replay_holds_out_whole_episodes_as_the_ring_wraps() -> None:
    T, E = 4, 10  # 10-step episodes; every 5th is held out; capacity rounds down to a multiple of 5 x 10
    r = TaskBalancedReplay(T, 123, 3, 2, val_fraction=0.2, episode_len=E)
    assert r.capacity == 100
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        obs = np.stack([[t, i, i // E] for t in range(T)]).astype(np.float32)  # [task, step, episode]
        r.add(obs, np.zeros((T, 2)), np.zeros(T), obs, np.zeros(T))
    assert r.n_val() == 0  # episode 0 only: training data, no held-out episode yet
    with pytest.raises(ValueError, match="no val transitions"):
        r.sample(4, "val", g)
    for i in range(10, 275):  # wraps around twice and a half
        obs = np.stack([[t, i, i // E] for t in range(T)]).astype(np.float32)
        r.add(obs, np.zeros((T, 2)), np.zeros(T), obs, np.zeros(T))
    for split in ("all", "train", "val"):
        b = r.sample(64, split, g)
        assert b["obs"].shape == (T, 64, 3)
        # every batch holds the same number of samples of each task, each from its own task
        assert (b["obs"][:, :, 0] == torch.arange(T)[:, None]).all()
    val_eps = set(r.sample(2000, "val", g)["obs"][:, :, 2].long().flatten().tolist())
    train_eps = set(r.sample(2000, "train", g)["obs"][:, :, 2].long().flatten().tolist())
    # what the ring holds: steps 175-274, episodes 17 (second half) to 27 (first half); held out: 1, 6, 11, ...
    assert val_eps == {21, 26} and train_eps == {17, 18, 19, 20, 22, 23, 24, 25, 27}
    assert r.n_val() == 2 * E


def test_searching_agent_never_takes_a_weight_step_on_held_out_episodes() -> None:
    """During a search the weight steps sample the training episodes only, the architecture steps the held-out ones."""
    agent = MTSAC(TASKS, OBS, ACT, make_cfg("arch.method=conal", "arch.search_steps=1000", "agent.batch_per_task=8"),
                  episode_len=10)
    assert agent.searching and agent.replay.val_every == 5
    rng = np.random.default_rng(0)
    for i in range(200):  # 20 episodes; obs[..., 0] carries the episode number
        obs = rng.normal(size=(len(TASKS), OBS)).astype(np.float32)
        obs[:, 0] = i // 10
        agent.replay.add(obs, rng.uniform(-1, 1, (len(TASKS), ACT)), rng.normal(size=len(TASKS)), obs, np.zeros(len(TASKS)))
    seen: dict[str, set] = {"train": set(), "val": set()}
    sample = agent.replay.sample

    def spy(n, split="all", generator=None):
        b = sample(n, split, generator)
        seen[split] |= set(b["obs"][:, :, 0].long().flatten().tolist())
        return b

    agent.replay.sample = spy
    for _ in range(5):
        agent.train_step()
    assert seen["train"] and not seen["train"] & {1, 6, 11, 16}
    assert seen["val"] and seen["val"] <= {1, 6, 11, 16}


def test_save_load_gives_identical_predictions(tmp_path) -> None:
    agent = filled(MTSAC(TASKS, OBS, ACT, make_cfg()))
    agent.train_step()
    path = tmp_path / "model.pt"
    agent.save(str(path))
    back = MTSAC.load(str(path))
    obs = np.random.default_rng(1).normal(size=(len(TASKS), OBS)).astype(np.float32)
    a1, _ = agent.predict(obs, deterministic=True)
    a2, _ = back.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    assert a1.shape == (len(TASKS), ACT) and np.abs(a1).max() <= 1


@pytest.mark.parametrize("method, options", [
    ("conal", []), ("conal_pro", ["arch.options.steps_per_stage=2"]), ("ltb", ["arch.options.total_steps=6"]),
    ("adashare", ["arch.options.warmup_steps=2", "arch.options.weight_steps=1", "arch.options.policy_steps=1"]),
    ("recon", []),
])
def test_every_method_searches_derives_and_retrains_in_rl(method: str, options: list[str]) -> None:
    cfg = make_cfg(f"arch.method={method}", "arch.search_steps=6", "arch.conflict_noticed=true", *options)
    agent = filled(MTSAC(TASKS, OBS, ACT, cfg))
    assert agent.searching
    for _ in range(6):
        out = agent.train_step()
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())
    trees = agent.finish_search()
    assert set(trees) == {"actor", "critic"} and not agent.searching
    for name, tree in trees.items():
        assert tree.tasks == TASKS and tree.n_stages == 2
        counts = agent.param_counts()[name]
        assert counts["total"] == sum(p.numel() for p in getattr(agent, name).net.parameters())
    agent.train_step()


def test_mt10_hps_is_the_reference_setting() -> None:
    """metaworld-algorithms' multi-head MT-SAC (examples/multi_task/mtmhsac_mt10.py), setting by setting."""
    c = load_config("mt10_hps", [])
    a, t, e = c.agent, c.train, c.eval
    assert (c.arch.method, c.weighting.method, c.model.hidden, c.model.init) == ("hps", "ew", [400, 400, 400], "he_uniform")
    assert (a.batch_per_task, t.lr, a.alpha_lr, a.adam_eps, t.grad_clip) == (128, 3e-4, 3e-4, 1e-5, 1.0)
    assert (a.gamma, a.tau, a.init_alpha, a.target_entropy, a.buffer_size) == (0.99, 0.005, 1.0, 0.0, 1_000_000)
    assert (t.warmup_steps, t.updates_per_step, t.total_env_steps) == (4000, 1.0, 20_000_000)
    assert (e.every_env_steps, e.episodes_per_task, e.final_episodes_per_task) == (200_000, 50, 0)
    assert (c.env.reward_version, c.env.max_episode_steps) == ("v2", 0)  # 0: metaworld's 500


@pytest.mark.parametrize("init", ["he_uniform", "torch"])
def test_initialisation_and_adam_eps_are_what_the_config_says(init: str) -> None:
    torch.manual_seed(0)
    agent = MTSAC(TASKS, OBS, ACT, make_cfg("model.hidden=[256,256]", f"model.init={init}", "agent.adam_eps=1e-5"))
    banks = [(n, m) for net in (agent.actor.net, agent.critic.net) for n, m in net.named_modules()
             if hasattr(m, "in_features") and hasattr(m, "bias")]
    assert len(banks) == 6  # actor and critic: two hidden stages and the heads each
    for name, m in banks:
        w, b = m.weight.detach(), m.bias.detach()
        bound = math.sqrt(6.0 / m.in_features) if init == "he_uniform" else 1.0 / math.sqrt(m.in_features)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        # uniform on [-bound, bound]: std bound / sqrt(3), within 5% for these sizes
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name
        if init == "he_uniform":
            assert torch.count_nonzero(b) == 0, name
        else:
            assert b.abs().max() <= bound and torch.count_nonzero(b) == b.numel(), name
    for opt in (agent.actor_opt, agent.critic_opt, agent.alpha_opt):
        assert [g["eps"] for g in opt.param_groups] == [1e-5]
        assert [g["lr"] for g in opt.param_groups] == [3e-4]


# ---- loss weightings with state of their own: UW's log-variances, DWA's epochs -------------------------
@pytest.mark.parametrize("extra", [[], ["arch.method=conal", "arch.search_steps=6", "arch.conflict_noticed=true"]])
def test_uw_log_variances_train_in_rl(extra: list[str]) -> None:
    """The actor's and the critic's UW log-variances get gradients and move with their network's optimiser
    (also where the per-task gradients are combined by hand, with the actor's backward limited to its inputs)."""
    agent = filled(MTSAC(TASKS, OBS, ACT, make_cfg("weighting=uw", *extra)))
    s = {k: getattr(agent, f"{k}_combiner").weighting.s for k in ("actor", "critic")}
    for k, p in s.items():
        assert any(p is q for g in getattr(agent, f"{k}_opt").param_groups for q in g["params"]), k
    before = {k: p.detach().clone() for k, p in s.items()}
    for _ in range(3):
        agent.train_step()
    for k, p in s.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
        assert (p.detach() != before[k]).all(), f"{k}: UW's log-variances did not train"


def test_dwa_weighs_tasks_by_their_rl_epoch_losses() -> None:
    """Every agent.dwa_epoch_updates updates is an epoch: after two, DWA's weights leave EW's 1/T."""
    T = len(TASKS)
    agent = filled(MTSAC(TASKS, OBS, ACT, make_cfg("weighting=dwa", "agent.dwa_epoch_updates=2")))
    for _ in range(4):  # two epochs: the next update weighs by their loss ratios
        agent.train_step()
        for k in ("actor", "critic"):
            torch.testing.assert_close(getattr(agent, f"{k}_combiner").weighting.last_weights, torch.full((T,), 1 / T))
    agent.train_step()
    for k in ("actor", "critic"):
        w = getattr(agent, f"{k}_combiner").weighting
        assert len(w.history) == 2
        assert w.last_weights.sum().item() == pytest.approx(1.0)
        assert (w.last_weights - 1 / T).abs().max() > 1e-4, f"{k}: {w.last_weights.tolist()}"
    with pytest.raises(ConfigError, match="agent.dwa_epoch_updates must be >= 1; got 0"):
        make_cfg("weighting=dwa", "agent.dwa_epoch_updates=0")
    # the default epoch is long: 5 updates leave DWA at EW's weights
    ew = filled(MTSAC(TASKS, OBS, ACT, make_cfg("weighting=dwa")))
    for _ in range(5):
        ew.train_step()
    torch.testing.assert_close(ew.actor_combiner.weighting.last_weights, torch.full((T,), 1 / T))


def test_dwa_open_epoch_survives_a_state_dict_round_trip() -> None:
    """A resumed agent ends DWA's epoch where the uninterrupted one does: the same weights and networks."""
    cfg = make_cfg("weighting=dwa", "agent.dwa_epoch_updates=3")
    a = filled(MTSAC(TASKS, OBS, ACT, cfg))
    for _ in range(4):  # one epoch ended, one update into the next
        a.train_step()
    buf = io.BytesIO()  # as a checkpoint: a copy (loading live tensors would share optimiser steps with ``a``)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MTSAC(TASKS, OBS, ACT, cfg)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert b._epoch_count == a._epoch_count == 1 and torch.equal(b._epoch_sums, a._epoch_sums)
    for agent in (a, b):
        torch.manual_seed(7)  # the actor's sampling noise (the global RNG is the loop's to checkpoint)
        for _ in range(5):  # ends the open epoch and the next
            agent.train_step()
    for k in ("actor", "critic"):
        wa, wb = getattr(a, f"{k}_combiner").weighting, getattr(b, f"{k}_combiner").weighting
        assert len(wa.history) == 2 and all(torch.equal(x, y) for x, y in zip(wa.history, wb.history)), k
        assert torch.equal(wa.last_weights, wb.last_weights), k
        for (n, p), q in zip(getattr(a, k).named_parameters(), getattr(b, k).parameters()):
            assert torch.equal(p, q), f"{k}.{n}"


@pytest.mark.parametrize("searcher", ["actor", "critic"])
def test_one_network_searches_while_the_other_is_fixed(searcher: str) -> None:
    """arch.<net>.method per network: the fixed one (hps) trains through the other's search (conal), whose
    architecture steps run on their own phase; then both derive and retrain."""
    fixed = "critic" if searcher == "actor" else "actor"
    agent = filled(MTSAC(TASKS, OBS, ACT, make_cfg("arch.method=conal", "arch.search_steps=6", f"arch.{fixed}.method=hps",
                                                   "arch.options.lr=0.01"), episode_len=10))  # held-out episodes
    assert agent.replay.n_val() > 0
    methods = {"actor": agent.actor_method, "critic": agent.critic_method}
    assert agent.searching and methods[searcher].name == "conal" and methods[fixed].name == "hps"
    alpha0 = methods[searcher].net.alpha.detach().clone()
    fixed0 = [p.detach().clone() for p in getattr(agent, fixed).parameters()]
    for _ in range(6):
        agent.train_step()
    assert not torch.equal(methods[searcher].net.alpha, alpha0)  # the searcher's architecture moved
    assert all(not torch.equal(p, q) for p, q in zip(getattr(agent, fixed).parameters(), fixed0))  # the fixed one trained
    trees = agent.finish_search()
    assert trees[searcher].method == "conal" and trees[fixed] == Tree.hps(TASKS, 2)
    out = agent.train_step()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())


def test_per_network_arch_resolves_validates_and_budgets() -> None:
    cfg = make_cfg("arch.method=conal", "arch.search_steps=4", "arch.options.lr=0.01", "arch.critic.method=stl",
                   "arch.actor.max_params=5000", "arch.actor.options.tau=0.5")
    # resolved in full: the actor keeps conal's options and adds its own; the critic's method takes none of them
    assert cfg.arch.actor == {"method": "conal", "options": {"lr": 0.01, "tau": 0.5}, "derive": "argmax",
                              "derive_margin": 0.1, "max_params": 5000, "min_params": 0}
    assert cfg.arch.critic["method"] == "stl" and cfg.arch.critic["options"] == {} and cfg.arch.critic["max_params"] == 0
    assert load_config(None, [f"{k}={v}" for k, v in [("arch.method", "conal"), ("arch.search_steps", 4)]]).arch.actor == {}
    agent = MTSAC(TASKS, OBS, ACT, cfg)
    assert agent.actor_method.derive_rule.max_params == 5000 and agent.critic_method.name == "stl"
    # STL's critic trunk: 3 tasks x 2 members x ((OBS+ACT)*32+32 + 32*32+32)
    stl_trunk = 3 * 2 * ((OBS + ACT) * 32 + 32 + 32 * 32 + 32)
    assert agent.critic_method.derive().derive["params"]["trunk"] == stl_trunk
    with pytest.raises(ConfigError, match=f"below the smallest tree arch.method=stl can derive for the critic network "
                                          f"\\({stl_trunk} trunk"):
        MTSAC(TASKS, OBS, ACT, make_cfg("arch.critic.method=stl", f"arch.critic.max_params={stl_trunk - 1}"))
    for bad, msg in [("arch.critic.search_steps=3", "unknown config key 'arch.critic.search_steps'"),
                     ("arch.actor.method=conl", "unknown arch.method 'conl'"),
                     ("arch.actor.method=conal", "arch.actor.method=conal searches: set arch.search_steps > 0"),
                     ("arch.critic.options.nope=1", "unknown config key 'arch.critic.options.nope'"),
                     ("arch.critic.max_params=-1", "arch.max_params must be >= 0")]:
        with pytest.raises(ConfigError, match=msg.replace("(", "\\(")) as e:
            make_cfg(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="a supervised run has one trunk"):
        load_config("multi_fashion_mnist_hps", ["arch.critic.method=stl"])
