"""The lean SAC update computes what a plain SAC update computes.

* The twin critics as one batched ensemble (search networks with EnsembleBank stages, and
  the member-major EnsembleTrunk of fixed architectures) equal two separate critics with
  the same weights: outputs and weight gradients.
* A few MTSAC updates (fused Adam, batched ensemble, foreach Polyak, backward stopped at
  the actor's weights, packed replay) give the parameters of a straightforward reference
  update written below in CleanRL's style: plain tensors, two critics, a loop over tasks
  for the heads, ``torch.optim.Adam`` without fusing, a Python loop for Polyak averaging.
  Both run in float64 from the same weights, data and seeds, so the only differences are
  summation orders: tolerance 1e-9 absolute, 1e-7 relative (float32 would compare Adam
  trajectories, where a gradient entry near zero can legitimately flip sign).
* The compiled losses (``train.compile=true``) match the eager ones (skipped where
  torch.compile does not work).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtrl_arch.agents.ensemble import EnsembleTrunk
from mtrl_arch.agents.sac import MTSAC, N_CRITICS, critic_member_stages
from mtrl_arch.config import load_config
from mtrl_arch.search import make_method
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import Trunk, ensemble_input, ensemble_output, ensemble_stage

TASKS = ("a", "b", "c")
T, OBS, ACT, HID, B = len(TASKS), 7, 2, [16, 16], 8


def trees() -> dict[str, Tree]:
    return {"hps": Tree.hps(TASKS, 2), "stl": Tree.stl(TASKS, 2),
            "conal": Tree.from_branch_points(TASKS, 2, [1, 1, 2]), "subgroups": Tree(TASKS, (((0, 1, 2),), ((0, 1), (2,))))}


def member_copy(ens: torch.nn.Module, single: torch.nn.Module, e: int) -> None:
    """Load member e's rows of an EnsembleTrunk's banks into a single-member Trunk of the same tree."""
    big = ens.state_dict()
    single.load_state_dict({k: big[k].reshape(N_CRITICS, -1, *big[k].shape[1:])[e].reshape(v.shape)
                            for k, v in single.state_dict().items()})


@pytest.mark.parametrize("name", list(trees()))
def test_batched_ensemble_critic_equals_two_separate_critics(name: str) -> None:
    tree = trees()[name]
    stages, head = critic_member_stages(OBS, ACT, HID)
    torch.manual_seed(0)
    folded = Trunk(tree, [ensemble_stage(f, N_CRITICS) for f in stages], ensemble_stage(head, N_CRITICS))
    torch.manual_seed(0)
    member_major = EnsembleTrunk(tree, stages, head, N_CRITICS)
    singles = [Trunk(tree, stages, head) for _ in range(N_CRITICS)]
    for e, s in enumerate(singles):
        member_copy(member_major, s, e)
    x = torch.randn(T, B, OBS + ACT, dtype=torch.float32)
    ref = torch.stack([s(x) for s in singles])                                    # [2, T, B, 1]
    out_mm = member_major(x)
    out_folded = ensemble_output(folded(ensemble_input(x, N_CRITICS)), N_CRITICS)
    torch.testing.assert_close(out_mm, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_folded, ref, rtol=1e-5, atol=1e-6)
    assert member_major.param_counts() == folded.param_counts()
    # gradients: the ensemble's rows of member e are member e's network's gradients
    w = torch.randn_like(ref)
    (out_mm * w).sum().backward()
    (ref * w).sum().backward()
    grads = dict(member_major.named_parameters())
    for e, s in enumerate(singles):
        for k, p in s.named_parameters():
            g = grads[k].grad.reshape(N_CRITICS, -1, *grads[k].shape[1:])[e].reshape(p.shape)
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    # the groups that gradient combination sees are the original tree's, spanning both members
    assert [(g.name, g.tasks) for g in member_major.shared_groups()] == [(g.name, g.tasks) for g in folded.shared_groups()]
    for ga, gb in zip(member_major.shared_groups(), folded.shared_groups()):
        assert ga.index == gb.index


def test_search_network_ensemble_critic_equals_two_separate_critics() -> None:
    """CoNAL's search network with ensemble stages equals two CoNAL networks with the members' weights."""
    from mtrl_arch.agents.sac import critic_spec
    from mtrl_arch.search.base import TrunkSpec

    torch.manual_seed(0)
    ens = make_method("conal", critic_spec(TASKS, OBS, ACT, HID)).build()
    stages, head = critic_member_stages(OBS, ACT, HID)
    singles = [make_method("conal", TrunkSpec(TASKS, stages, head)).build() for _ in range(N_CRITICS)]
    with torch.no_grad():
        ens.alpha.normal_()
        for s in singles:
            s.alpha.copy_(ens.alpha)
    for e, s in enumerate(singles):
        _load_conal_member(ens, s, e)
    x = torch.randn(T, B, OBS + ACT)
    out = ensemble_output(ens(ensemble_input(x, N_CRITICS)), N_CRITICS)
    torch.testing.assert_close(out, torch.stack([s(x) for s in singles]), rtol=1e-5, atol=1e-6)


def _load_conal_member(ens, single, e: int) -> None:
    big = ens.state_dict()
    out = {}
    for k, v in single.state_dict().items():
        if k == "alpha":
            out[k] = big[k]
            continue
        bk = k.replace(".weight", ".inner.weight").replace(".bias", ".inner.bias")
        out[k] = big[bk].reshape(N_CRITICS, -1, *big[bk].shape[1:])[e].reshape(v.shape)
    single.load_state_dict(out)


# ---- the update against a plain reference -------------------------------------------------------
def make_agent(*overrides: str) -> MTSAC:
    cfg = load_config(None, [f"model.hidden={HID}", f"agent.batch_per_task={B}", "agent.buffer_size=600", "arch.method=hps",
                             "device=cpu", "seed=3", "train.grad_clip=1.0", *overrides])
    return MTSAC(TASKS, OBS, ACT, cfg)


def fill(agent: MTSAC, n: int = 100) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    data = {"obs": rng.normal(size=(n, T, OBS)), "action": rng.uniform(-1, 1, (n, T, ACT)),
            "reward": rng.normal(size=(n, T)), "next_obs": rng.normal(size=(n, T, OBS)),
            "done": (rng.uniform(size=(n, T)) < 0.1).astype(np.float64)}
    data = {k: v.astype(np.float32) for k, v in data.items()}  # the replay stores what the env gave, float32
    for i in range(n):
        agent.replay.add(*(data[k][i] for k in ("obs", "action", "reward", "next_obs", "done")))
    return {k: torch.as_tensor(v, dtype=torch.get_default_dtype()).transpose(0, 1) for k, v in data.items()}  # [T, n, ...]


class Reference:
    """Multi-task SAC written plainly: an HPS actor and two HPS critics with per-task heads."""

    def __init__(self, agent: MTSAC):
        a, lr = agent.cfg.agent, agent.cfg.train.lr
        self.alpha_first = a.alpha_update == "first"
        self.gamma, self.tau, self.clip = a.gamma, a.tau, agent.cfg.train.grad_clip
        self.log_std_min, self.log_std_max = a.log_std_min, a.log_std_max
        self.target_entropy = -float(ACT)

        def layers(net, member=None):
            out = []
            for bank in net.shared:  # hps: one module per stage (member e's at row e)
                row = 0 if member is None else member
                out.append((bank.weight[row].detach().clone().requires_grad_(),
                            bank.bias[row].detach().clone().requires_grad_()))
            lo = 0 if member is None else member * T
            heads = [(net.heads.weight[lo + t].detach().clone().requires_grad_(),
                      net.heads.bias[lo + t].detach().clone().requires_grad_()) for t in range(T)]
            return out, heads

        self.actor = layers(agent.actor.net)
        self.qf1, self.qf2 = layers(agent.critic.net, 0), layers(agent.critic.net, 1)
        self.qf1_target = [[(w.detach().clone(), b.detach().clone()) for w, b in part] for part in self.qf1]
        self.qf2_target = [[(w.detach().clone(), b.detach().clone()) for w, b in part] for part in self.qf2]
        self.log_alpha = torch.full((T,), math.log(a.init_alpha), requires_grad=True)
        flat = lambda net: [p for part in net for wb in part for p in wb]  # noqa: E731
        self.actor_params, self.q_params = flat(self.actor), flat(self.qf1) + flat(self.qf2)
        self.actor_optimizer = torch.optim.Adam(self.actor_params, lr=lr, eps=a.adam_eps, foreach=False)
        self.q_optimizer = torch.optim.Adam(self.q_params, lr=lr, eps=a.adam_eps, foreach=False)
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=a.alpha_lr, eps=a.adam_eps, foreach=False)

    @staticmethod
    def mlp(net, x: torch.Tensor) -> torch.Tensor:
        trunk, heads = net
        for w, b in trunk:
            x = torch.relu(x @ w + b)
        return torch.stack([x[t] @ heads[t][0] + heads[t][1] for t in range(T)])

    def q(self, net, obs, action) -> torch.Tensor:
        return self.mlp(net, torch.cat([obs, action], -1)).squeeze(-1)

    def get_action(self, obs):
        mean, log_std = self.mlp(self.actor, obs).chunk(2, -1)
        log_std = torch.clamp(log_std, self.log_std_min, self.log_std_max)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x_t = normal.rsample()
        # log(1 - tanh(x)^2) in its exact, stable form (CleanRL adds 1e-6 inside the log instead)
        log_prob = normal.log_prob(x_t) - 2 * (math.log(2) - x_t - F.softplus(-2 * x_t))
        return torch.tanh(x_t), log_prob.sum(-1)

    def update(self, data, idx):
        take = lambda k: torch.stack([data[k][t, idx[t]] for t in range(T)])  # noqa: E731
        obs, actions, rewards, next_obs, dones = (take(k) for k in ("obs", "action", "reward", "next_obs", "done"))
        if self.alpha_first:  # the entropy coefficients step first, from a draw of the policy, and the losses use them
            with torch.no_grad():
                _, log_pi0 = self.get_action(obs)
            self.alpha_update(log_pi0)
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            next_state_actions, next_state_log_pi = self.get_action(next_obs)
            qf1_next_target = self.q(self.qf1_target, next_obs, next_state_actions)
            qf2_next_target = self.q(self.qf2_target, next_obs, next_state_actions)
            min_qf_next_target = torch.min(qf1_next_target, qf2_next_target) - alpha[:, None] * next_state_log_pi
            next_q_value = rewards + (1 - dones) * self.gamma * min_qf_next_target
        qf1_a_values = self.q(self.qf1, obs, actions)
        qf2_a_values = self.q(self.qf2, obs, actions)
        # the reference's 0.5 * sum over critics of the batch mean (tasks hold equal shares of the batch)
        qf_loss = 0.5 * sum(F.mse_loss(qf1_a_values[t], next_q_value[t]) + F.mse_loss(qf2_a_values[t], next_q_value[t])
                            for t in range(T)) / T
        self.q_optimizer.zero_grad()
        qf_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.q_params, self.clip)
        self.q_optimizer.step()

        pi, log_pi = self.get_action(obs)
        min_qf_pi = torch.min(self.q(self.qf1, obs, pi), self.q(self.qf2, obs, pi))
        actor_loss = sum(((alpha[t] * log_pi[t]) - min_qf_pi[t]).mean() for t in range(T)) / T
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.actor_params, self.clip)
        self.actor_optimizer.step()

        if not self.alpha_first:
            self.alpha_update(log_pi)

        self.polyak()

    def alpha_update(self, log_pi: torch.Tensor) -> None:
        alpha_loss = sum(-self.log_alpha[t] * (log_pi[t].detach().mean() + self.target_entropy) for t in range(T)) / T
        self.a_optimizer.zero_grad()
        alpha_loss.backward()
        self.a_optimizer.step()

    def polyak(self) -> None:
        with torch.no_grad():
            for online, target in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
                for part, tpart in zip(online, target):
                    for (w, b), (tw, tb) in zip(part, tpart):
                        tw.copy_(self.tau * w + (1 - self.tau) * tw)
                        tb.copy_(self.tau * b + (1 - self.tau) * tb)


def assert_same_parameters(agent: MTSAC, ref: Reference, rtol: float, atol: float) -> None:
    def check(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    actor, critic, target = agent.actor.net, agent.critic.net, agent.critic_target.net
    for s, (w, b) in enumerate(ref.actor[0]):
        check(actor.shared[s].weight[0], w, f"actor stage {s} weight")
        check(actor.shared[s].bias[0], b, f"actor stage {s} bias")
    for t, (w, b) in enumerate(ref.actor[1]):
        check(actor.heads.weight[t], w, f"actor head {t}")
        check(actor.heads.bias[t], b, f"actor head {t} bias")
    for e, (online, tgt) in enumerate(((ref.qf1, ref.qf1_target), (ref.qf2, ref.qf2_target))):
        for net, mine in ((online, critic), (tgt, target)):
            for s, (w, b) in enumerate(net[0]):
                check(mine.shared[s].weight[e], w, f"critic {e} stage {s}")
                check(mine.shared[s].bias[e], b, f"critic {e} stage {s} bias")
            for t, (w, b) in enumerate(net[1]):
                check(mine.heads.weight[e * T + t], w, f"critic {e} head {t}")
                check(mine.heads.bias[e * T + t], b, f"critic {e} head {t} bias")
    check(agent.log_alpha, ref.log_alpha, "log_alpha")


def run_both(agent: MTSAC, steps: int) -> Reference:
    data = fill(agent)
    ref = Reference(agent)
    gen = torch.Generator().manual_seed(agent.cfg.seed + 1)  # the agent's replay sampling generator, same seed
    for _ in range(steps):
        torch.manual_seed(1000 + agent.n_updates)            # the policy noise: same draws, same order
        agent.train_step()
        torch.manual_seed(1000 + agent.n_updates - 1)
        ref.update(data, torch.randint(0, agent.replay.size, (T, B), generator=gen))
    return ref


@pytest.mark.parametrize("alpha_update", ["first", "last"])
def test_fast_update_matches_the_reference_update(alpha_update: str) -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        agent = make_agent(f"agent.alpha_update={alpha_update}")
        ref = run_both(agent, steps=4)
        assert_same_parameters(agent, ref, rtol=1e-7, atol=1e-9)
    finally:
        torch.set_default_dtype(old)


def _compile_works() -> bool:
    try:
        f = torch.compile(lambda x: x * 2 + 1)
        return bool(torch.equal(f(torch.ones(2)), torch.full((2,), 3.0)))
    except Exception:  # noqa: BLE001 - no compiler, unsupported platform
        return False


def test_alpha_first_uses_the_stepped_coefficients_in_the_same_step() -> None:
    """A hand-computed first step: with alpha stepped first, Adam's first step moves every log-alpha by lr
    (its update is lr * sign(g) when the moments start at zero), and the actor loss uses exp of the new value;
    stepped last, the losses use the initial coefficient."""
    for order, moved in (("first", True), ("last", False)):
        agent = make_agent(f"agent.alpha_update={order}")
        fill(agent)
        torch.manual_seed(0)
        stats = agent.train_step()
        lr, init = agent.cfg.agent.alpha_lr, math.log(agent.cfg.agent.init_alpha)
        # entropy is far above -|A| at initialisation, so every gradient -(logp + target) is negative: log-alpha falls
        expected = torch.full((T,), init - lr, dtype=torch.float64)
        torch.testing.assert_close(agent.log_alpha.detach().double(), expected, rtol=0, atol=1e-6)
        used = torch.full((T,), math.exp(init - lr) if moved else math.exp(init))
        torch.testing.assert_close(stats["alpha"].float(), used, rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_update_matches_eager(mode: str) -> None:
    """``train.compile=true`` gives the eager update's parameters (policy noise drawn as eager draws it);
    on CPU ``reduce-overhead`` (CUDA graphs on a GPU) compiles without them and must match too."""
    if not _compile_works():
        pytest.skip("torch.compile is not available here")
    import torch._inductor.config as inductor_config

    old_dtype, old_random = torch.get_default_dtype(), inductor_config.fallback_random
    torch.set_default_dtype(torch.float64)
    inductor_config.fallback_random = True  # randn_like in compiled code draws from the eager generator
    try:
        eager, compiled = make_agent(), make_agent("train.compile=true", f"train.compile_mode={mode}")
        fill(eager), fill(compiled)
        for _ in range(3):
            for agent in (eager, compiled):
                torch.manual_seed(1000 + agent.n_updates)
                agent.train_step()
        for (k, p), (_, q) in zip(eager.critic.named_parameters(), compiled.critic.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-7, atol=1e-9, msg=lambda m: f"critic {k}: {m}")
        for (k, p), (_, q) in zip(eager.actor.named_parameters(), compiled.actor.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-7, atol=1e-9, msg=lambda m: f"actor {k}: {m}")
    finally:
        torch.set_default_dtype(old_dtype)
        inductor_config.fallback_random = old_random
