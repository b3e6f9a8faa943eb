"""Multi-task SAC whose actor and critic trunks are built by an mtrl_arch architecture method.

Soft Actor-Critic (Haarnoja et al. 2018) in the multi-task form used for Meta-World
(Yu et al. 2019; the MT-SAC reference setting): a tanh-Gaussian actor, twin critics as one
batched ensemble with Polyak-averaged targets, one learnable entropy coefficient per
task (target entropy -|A|), task-balanced batches. Observations carry the task one-hot.

Every network input is laid out per task, ``[T, B, ...]``: row t holds task t's
samples, so a task-specific module is one slice of a batched op and the per-task
gradients of shared modules come from one backward (see mtrl_arch.conflict).

Architecture search (``arch.search_steps`` vector steps, for methods that search):
weight steps use the training share of the replay, architecture steps the held-out
share (``arch.val_fraction``) with the critic's TD loss and the actor's loss; then the
derived trees are instantiated and, with ``arch.retrain=scratch``, trained from freshly
initialised weights (the replay is kept).

Data-parallel (``torchrun``; :mod:`mtrl_arch.distributed`, the loop in
:mod:`mtrl_arch.agents.rl_loop`): every rank holds the same networks (rank 0's, broadcast at
every build), its own replay, and samples ``ceil(batch_per_task / world_size)`` per task, so
the global batch is the single-process one. The weights' gradients are averaged over ranks
inside the gradient combiner (per-task rows of shared groups before they are combined), so
the actor's and critic's optimisers are marked ``SYNCED``; log-alpha's and the architecture
optimisers' gradients are averaged by ``distributed.sync_other_optimizers``, which the loop
holds open while it trains. Identical gradients and optimiser states keep the ranks'
parameters (and Polyak targets) bit-identical without further traffic.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrl_arch import distributed
from mtrl_arch.checkpoint import save_model_file
from mtrl_arch.config import Config, ConfigError, network_arch
from mtrl_arch.search import TrunkSpec, make_method
from mtrl_arch.steps import weight_parameters, weight_step
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import Trunk, ensemble_input, ensemble_output, ensemble_stage, linear_stage, mlp_stages, tie_stages
from mtrl_arch.update import GradientCombiner
from mtrl_arch.weighting import Weighting, make_weighting

from .ensemble import EnsembleTrunk
from .replay import TaskBalancedReplay

N_CRITICS = 2


def make_adam(params: list[nn.Parameter], lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam, fused where the build supports it (fastest on the CPUs and GPUs measured)."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


# tied initialisation (model.tied_init): stage s of the actor starts from seed*1000 + s, the critics' from
# seed*1000 + 500 + s, one template per critic (members stay independent, each member's copies are tied)
CRITIC_TIE_OFFSET = 500


def actor_spec(tasks, obs_dim: int, action_dim: int, hidden, activation: str = "relu", init: str = "torch",
               tie_seed: int | None = None) -> TrunkSpec:
    stages = mlp_stages(obs_dim, hidden, activation, init)
    return TrunkSpec(tuple(tasks), stages if tie_seed is None else tie_stages(stages, tie_seed * 1000),
                     linear_stage(hidden[-1], 2 * action_dim, "identity", init),
                     residual=tuple(i > 0 and hidden[i] == hidden[i - 1] for i in range(len(hidden))), name="actor")


def critic_member_stages(obs_dim: int, action_dim: int, hidden, activation: str = "relu", init: str = "torch",
                         tie_seed: int | None = None):
    """One critic's stage factories and head factory (the ensemble is added by the caller; tied per member)."""
    stages = mlp_stages(obs_dim + action_dim, hidden, activation, init)
    if tie_seed is not None:
        stages = tie_stages(stages, tie_seed * 1000 + CRITIC_TIE_OFFSET, members=N_CRITICS)
    return stages, linear_stage(hidden[-1], 1, "identity", init)


def critic_spec(tasks, obs_dim: int, action_dim: int, hidden, activation: str = "relu", init: str = "torch",
                tie_seed: int | None = None) -> TrunkSpec:
    stages, head = critic_member_stages(obs_dim, action_dim, hidden, activation, init, tie_seed)
    return TrunkSpec(tuple(tasks), [ensemble_stage(f, N_CRITICS) for f in stages], ensemble_stage(head, N_CRITICS),
                     residual=tuple(i > 0 and hidden[i] == hidden[i - 1] for i in range(len(hidden))), name="critic")


def full_precision(x: Tensor) -> Tensor:
    """fp32 for the half-precision outputs of autocast regions; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class Actor(nn.Module):
    """Tanh-Gaussian policy over any multi-task network with 2|A| outputs per task."""

    def __init__(self, net: nn.Module, log_std_min: float, log_std_max: float):
        super().__init__()
        self.net, self.log_std_min, self.log_std_max = net, log_std_min, log_std_max

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = full_precision(self.net(obs)).chunk(2, -1)  # the Gaussian's maths never in bf16
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        return self.sample_from(*self(obs))

    @staticmethod
    def sample_from(mean: Tensor, log_std: Tensor) -> tuple[Tensor, Tensor]:
        """A draw (squashed action, log-probability) from the forward's output ``(mean, log_std)``."""
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        # log N(u) - sum log(1 - tanh(u)^2), the latter written stably as 2(log 2 - u - softplus(-2u))
        logp = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), logp

    def act(self, obs: Tensor, deterministic: bool) -> Tensor:
        if deterministic:
            return torch.tanh(self(obs)[0])
        return self.sample(obs)[0]


class Critic(nn.Module):
    """Twin Q-functions as one ensemble network: ``q(obs, a) -> [2, T, B]``.

    ``net`` is a search network with :class:`~mtrl_arch.trunk.EnsembleBank` stages (inputs
    ``[T, 2B, ...]``, the member inside each task's rows) or, once the architecture is fixed,
    an :class:`~mtrl_arch.agents.ensemble.EnsembleTrunk` (member-major throughout, no copies
    between stages). Both hold the same parameters in the same layout.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.member_major = getattr(net, "ensemble_members", False)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.q(torch.cat([obs, action], -1))

    def q(self, obs_action: Tensor) -> Tensor:
        """Both members' Q-values from the concatenated input ``[T, B, |S|+|A|]``."""
        if self.member_major:
            return full_precision(self.net(obs_action)).squeeze(-1)
        return full_precision(ensemble_output(self.net(ensemble_input(obs_action, N_CRITICS)), N_CRITICS)).squeeze(-1)


class MTSAC:
    """Multi-task SAC with stable-baselines3's verbs: ``learn``, ``predict``, ``save``, ``load``."""

    # what train_step returns, each [T]; q_target: the batch's mean TD target (the scale the critics learn)
    STATS = ("critic_loss", "actor_loss", "alpha", "entropy", "q_target")

    def __init__(self, tasks: tuple[str, ...], obs_dim: int, action_dim: int, config: Config,
                 device: torch.device | str = "cpu", episode_len: int | None = None):
        self.cfg, self.tasks, self.obs_dim, self.action_dim = config, tuple(tasks), obs_dim, action_dim
        self.device = torch.device(device)
        a, T = config.agent, len(tasks)
        W = distributed.world_size()
        self.batch = -(-a.batch_per_task // W)  # per rank and task: W of these make the single-process batch
        if a.batch_per_task % W and distributed.is_main():
            print(f"warning: agent.batch_per_task={a.batch_per_task} does not divide by {W} processes; each samples "
                  f"{self.batch} per task (global batch {self.batch * W} per task)", file=sys.stderr)
        self.target_entropy = a.target_entropy or -float(action_dim)
        self.log_alpha = torch.full((T,), math.log(a.init_alpha), device=self.device, requires_grad=True)
        self.alpha_opt = make_adam([self.log_alpha], a.alpha_lr, a.adam_eps)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.n_updates = 0
        self.trees: dict[str, Tree] = {}
        # the initial weights depend on config.seed alone and the process's random state is left as it was:
        # seeding the process (exploration noise) is the run's job (RLRun.learn), as in SB3's learn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            m, critic_hidden = config.model, list(a.critic_hidden or config.model.hidden)
            tie = config.seed if m.tied_init else None
            # each network's method from its own arch (arch.actor.*, arch.critic.* over arch.*); a fixed one trains
            # through the other's search
            arch_a, arch_c = network_arch(config.arch, "actor"), network_arch(config.arch, "critic")
            self.actor_method = make_method(arch_a.method, actor_spec(tasks, obs_dim, action_dim, m.hidden, m.activation,
                                                                      m.init, tie), arch_a.options, config.seed, derive=arch_a)
            self.critic_method = make_method(arch_c.method, critic_spec(tasks, obs_dim, action_dim, critic_hidden,
                                                                        m.activation, m.init, tie), arch_c.options,
                                             config.seed, derive=arch_c)
            self.searching = (self.actor_method.searches or self.critic_method.searches) and config.arch.search_steps > 0
            # architecture steps hold out whole episodes (Meta-World's are 500 steps unless the config says otherwise)
            episode_len = episode_len or config.env.max_episode_steps or 500
            self.replay = TaskBalancedReplay(T, max(1, a.buffer_size // T), obs_dim, action_dim, self.device,
                                             config.arch.val_fraction if self.searching else 0.0, episode_len)
            self._build(search=self.searching)
        if distributed.rank() > 0:  # own replay draws (the weights come from rank 0; the noise is seeded by the run)
            self.sample_gen.manual_seed(distributed.rank_seed(config.seed) + 1)

    # ---- networks ---------------------------------------------------------------------------
    def _combiner(self) -> GradientCombiner:
        c = self.cfg
        w = make_weighting(c.weighting.method, n_tasks=len(self.tasks), **c.weighting.options).to(self.device)
        return GradientCombiner(w, c.arch.conflict_noticed, c.arch.cn_variant, c.arch.track_conflicts_every,
                                cn_fraction=c.arch.cn_fraction)

    def _build(self, search: bool, trees: dict[str, Tree] | None = None) -> None:
        """Search networks while searching; afterwards fixed trunks from the derived (or given) trees."""
        a = self.cfg.agent
        if search:
            actor_net, critic_net = self.actor_method.build(), self.critic_method.build()
        else:
            self.trees = trees or {"actor": self.actor_method.derive(), "critic": self.critic_method.derive()}
            actor_net = Trunk(self.trees["actor"], self.actor_method.spec.stages, self.actor_method.spec.heads)
            critic_hidden = list(a.critic_hidden or self.cfg.model.hidden)
            m = self.cfg.model
            stages, head = critic_member_stages(self.obs_dim, self.action_dim, critic_hidden, m.activation, m.init,
                                                self.cfg.seed if m.tied_init else None)
            critic_net = EnsembleTrunk(self.trees["critic"], stages, head, N_CRITICS)
        self.actor = Actor(actor_net, a.log_std_min, a.log_std_max).to(self.device)
        self.critic = Critic(critic_net).to(self.device)
        if distributed.active():  # every rank starts from rank 0's weights (and log-alpha)
            for m in (self.actor, self.critic):
                distributed.broadcast_module(m)
            distributed.broadcast_([self.log_alpha])
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_combiner, self.critic_combiner = self._combiner(), self._combiner()
        # the weightings' learnable tensors (UW's log-variances) train with their network's optimiser at its rate;
        # the actor's backward is limited to _actor_params (its ``inputs``), so theirs must be in it to get gradients
        self._actor_params = weight_parameters(self.actor.net) + list(self.actor_combiner.weighting.parameters())
        self._critic_params = weight_parameters(self.critic.net) + list(self.critic_combiner.weighting.parameters())
        t = self.cfg.train
        self.actor_opt = make_adam(self._actor_params, t.lr, a.adam_eps)
        self.critic_opt = make_adam(self._critic_params, t.lr, a.adam_eps)
        for opt in (self.actor_opt, self.critic_opt):  # the combiner averages these gradients before clipping
            setattr(opt, distributed.SYNCED, True)
        if search:
            for m in (self.actor_method, self.critic_method):
                if m.arch_optimizer is not None:  # the method's net moved device: rebuild its optimiser on the same tensors
                    m.make_arch_optimizer(m.arch_optimizer.defaults["lr"], m.arch_optimizer.defaults["weight_decay"],
                                          m.arch_optimizer.defaults["betas"])
        self._online = list(self.critic.parameters())
        self._target = list(self.critic_target.parameters())
        # RL has no epochs: weightings that end epochs (DWA) get the mean per-task losses of every
        # agent.dwa_epoch_updates updates (critic's and actor's, [2, T]); a new network starts a new epoch
        uses_epochs = type(self.actor_combiner.weighting).end_epoch is not Weighting.end_epoch
        self._epoch_sums = torch.zeros(2, len(self.tasks), device=self.device) if uses_epochs else None
        self._epoch_count = 0
        self._eager = {"target": self._td_target, "critic": self._critic_losses, "actor": self._actor_losses}
        # compiled once per network build; used on steps where nothing needs per-task gradients
        self._compiled = ({k: torch.compile(f, dynamic=False, mode=t.compile_mode) for k, f in self._eager.items()}
                          if t.compile else None)
        # CUDA graphs (torch's cudagraph trees) reuse their output memory at the next replay
        self._cuda_graphs = bool(t.compile and self.device.type == "cuda" and t.compile_mode in ("reduce-overhead", "max-autotune"))
        self._autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if t.amp else None

    def finish_search(self) -> dict[str, Tree]:
        """Derive both trees and switch to the fixed networks (fresh weights with retrain=scratch)."""
        self.searching = False
        old_actor, old_critic = self.actor.state_dict(), self.critic.state_dict()
        trees = {"actor": self.actor_method.derive(), "critic": self.critic_method.derive()}
        if distributed.active():  # rank 0's trees everywhere (identical parameters derive alike; this makes sure)
            sent = distributed.broadcast_object({k: t.to_dict() for k, t in trees.items()})
            trees = {k: Tree.from_dict(v) for k, v in sent.items()}
        self._build(False, trees)
        if self.cfg.arch.retrain == "continue":
            self._copy_matching(self.actor, old_actor)
            self._copy_matching(self.critic, old_critic)
            self.critic_target.load_state_dict(self.critic.state_dict())
        self.replay.val_every = 0  # every transition trains from now on
        return self.trees

    @staticmethod
    def _copy_matching(module: nn.Module, state: dict) -> None:
        # the search network's ensemble stages name their weights ``....inner.weight``; the fixed
        # critic (EnsembleTrunk) holds the same layout without ``inner.``
        state = {**{k.replace(".inner.", "."): v for k, v in state.items()}, **state}
        own = module.state_dict()
        module.load_state_dict({k: (state[k] if k in state and state[k].shape == v.shape else v) for k, v in own.items()})

    # ---- one update -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, Tensor]:
        """One SAC update from a task-balanced batch; returns per-task statistics (on device, no sync)."""
        cfg, a = self.cfg, self.cfg.agent
        split = "train" if self.searching else "all"
        if self._cuda_graphs:  # a new step: the graphs may overwrite the previous step's outputs from here
            torch.compiler.cudagraph_mark_step_begin()
        b = self.replay.sample(self.batch, split, self.sample_gen)
        step = self.n_updates
        alpha_first = a.alpha_update == "first"
        head = None  # the actor's forward on b["obs"], shared by the alpha draw and the actor loss where it can be
        if alpha_first:  # the reference's order: the entropy coefficients step first, the losses use the new values
            if self._share_actor_forward(step):
                # the actor is unchanged until its own step: one forward serves both draws (its noise drawn in the
                # same order as before), a tenth of the update at 2x256 on a CPU
                head = self.actor(b["obs"])
                with torch.no_grad():
                    logp = self.actor.sample_from(*(h.detach() for h in head))[1].mean(-1)
            else:
                with torch.no_grad(), self._autocast() if self._autocast is not None else contextlib.nullcontext():
                    logp = full_precision(self.actor.sample(b["obs"])[1]).mean(-1)
            self._alpha_step(logp)
        alpha = self.log_alpha.detach().exp()
        with self._autocast() if self._autocast is not None else contextlib.nullcontext():
            target = self._fn("target", step, self.critic_combiner)(b, alpha)
        critic_fn = self._fn("critic", step, self.critic_combiner)
        critic_losses = weight_step(self.critic.net, b, lambda net, b: critic_fn(b, target), self.critic_combiner,
                                    self.critic_opt, step, cfg.train.grad_clip, self.critic_method if self.searching else None,
                                    autocast=self._autocast)
        stats: dict[str, Tensor] = {}
        actor_fn = self._fn("actor", step, self.actor_combiner)

        def actor_losses_fn(net: nn.Module, b: dict[str, Tensor]) -> Tensor:
            losses, stats["logp"] = actor_fn(b, alpha) if head is None else self._actor_losses(b, alpha, head)
            return losses

        # inputs=: the backward stops at the actor's weights (no critic weight gradients are computed)
        actor_losses = weight_step(self.actor.net, b, actor_losses_fn, self.actor_combiner, self.actor_opt, step,
                                   cfg.train.grad_clip, self.actor_method if self.searching else None,
                                   autocast=self._autocast, inputs=self._actor_params)
        if not alpha_first:
            self._alpha_step(stats["logp"])
        with torch.no_grad():
            torch._foreach_lerp_(self._target, self._online, a.tau)
        if self.searching:
            self._arch_steps(step, alpha)
        if self._epoch_sums is not None:
            self._epoch_step(critic_losses, actor_losses)
        self.n_updates += 1
        if self._cuda_graphs:  # the loop logs these after later steps have run
            critic_losses, actor_losses = critic_losses.clone(), actor_losses.clone()
        return {"critic_loss": critic_losses, "actor_loss": actor_losses, "alpha": alpha, "entropy": -stats["logp"],
                "q_target": target.detach().mean(-1)}

    def _alpha_step(self, logp: Tensor) -> None:
        """One Adam step on the per-task log entropy coefficients from the per-task mean log-probability [T]."""
        # the mean over every sample of the batch, as in the reference (tasks hold equal shares)
        alpha_loss = -(self.log_alpha * (logp + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

    def _epoch_step(self, critic_losses: Tensor, actor_losses: Tensor) -> None:
        """Accumulate this update's per-task losses; every ``agent.dwa_epoch_updates`` updates end an epoch."""
        self._epoch_sums += torch.stack([critic_losses, actor_losses])
        self._epoch_count += 1
        if self._epoch_count < self.cfg.agent.dwa_epoch_updates:
            return
        mean = self._epoch_sums / self._epoch_count
        if distributed.active():  # the mean over every rank's batches: the ranks' weightings stay identical
            (mean,) = distributed.all_reduce_mean([mean])
        self.critic_combiner.weighting.end_epoch(mean[0])
        self.actor_combiner.weighting.end_epoch(mean[1])
        self._epoch_sums.zero_()
        self._epoch_count = 0

    def diagnostics(self) -> dict[str, float]:
        """What the log adds to its training lines: while searching, the searches' choice probabilities
        (``arch/actor/...``, ``arch/critic/...``); wherever conflicts are measured (the conflict-noticed
        operation, gradient weightings, ``arch.track_conflicts_every``), each shared group's running
        conflict and withheld rates (``conflict/actor/<group>/...``, ``conflict/critic/<group>/...``)."""
        out = {**self.actor_method.arch_values(), **self.critic_method.arch_values()} if self.searching else {}
        for net, combiner in (("actor", self.actor_combiner), ("critic", self.critic_combiner)):
            if combiner.stats.steps:
                out.update({k.replace("conflict/", f"conflict/{net}/", 1): v for k, v in combiner.stats.summary().items()})
        return out

    def _share_actor_forward(self, step: int) -> bool:
        """Whether the actor loss may reuse a forward taken before the critic's step: eager fp32 losses without
        per-task gradients (those capture the forward inside the actor's weight step)."""
        return (self._compiled is None and self._autocast is None and not self.searching
                and not self.actor_combiner.needs_task_grads(step))

    def _fn(self, name: str, step: int, combiner: GradientCombiner):
        """The compiled loss function where it may run (fixed networks, no per-task gradients), else the eager one."""
        if self._compiled is None or self.searching or combiner.needs_task_grads(step):
            return self._eager[name]
        return self._compiled[name]

    @torch.no_grad()
    def _td_target(self, b: dict[str, Tensor], alpha: Tensor) -> Tensor:
        next_action, next_logp = self.actor.sample(b["next_obs"])
        min_qf_next_target = self.critic_target(b["next_obs"], next_action).min(0).values - alpha[:, None] * next_logp
        return b["reward"] + (1.0 - b["done"]) * self.cfg.agent.gamma * min_qf_next_target

    def _critic_losses(self, b: dict[str, Tensor], target: Tensor) -> Tensor:
        q = self.critic.q(b["obs_action"])  # [2, T, B]
        return 0.5 * ((q - target) ** 2).mean(-1).sum(0)  # per task: (qf1_loss + qf2_loss) / 2, as SB3 and the reference

    def _actor_losses(self, b: dict[str, Tensor], alpha: Tensor,
                      head: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Per-task actor losses and the per-task mean log-probability (detached, for alpha); ``head``: the
        actor's forward on ``b["obs"]`` when it was already taken."""
        pi, logp = self.actor.sample(b["obs"]) if head is None else self.actor.sample_from(*head)
        min_qf_pi = self.critic(b["obs"], pi).min(0).values
        return (alpha[:, None] * logp - min_qf_pi).mean(-1), logp.detach().mean(-1)

    def _arch_steps(self, step: int, alpha: Tensor) -> None:
        """Architecture updates on held-out replay: the critic's TD loss, the actor's loss."""
        for m in (self.critic_method, self.actor_method):
            m.on_step(step)
        critic_arch, actor_arch = self.critic_method.phase(step).arch, self.actor_method.phase(step).arch
        if not (critic_arch or actor_arch) or self.replay.n_val() == 0:  # no held-out episode yet
            return
        v = self.replay.sample(self.batch, "val", self.sample_gen)
        if critic_arch:
            self.critic_method.arch_step(self._critic_losses(v, self._td_target(v, alpha)))
        if actor_arch:
            self.actor_method.arch_step(self._actor_losses(v, alpha)[0])

    # ---- acting ---------------------------------------------------------------------------------------
    @torch.inference_mode()  # cheaper than no_grad per call (no version counters); actions leave as numpy
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Actions for one observation per task: ``[T, obs_dim] -> [T, |A|]``."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device).unsqueeze(1)
        return self.actor.act(o, deterministic).squeeze(1).cpu().numpy()

    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """SB3's signature. ``observation``: ``[T, obs_dim]`` (one per task) or ``[T, n, obs_dim]``."""
        o = torch.as_tensor(np.asarray(observation), dtype=torch.float32, device=self.device)
        squeeze = o.dim() == 2
        with torch.inference_mode():
            a = self.actor.act(o.unsqueeze(1) if squeeze else o, deterministic)
        a = a.squeeze(1) if squeeze else a
        return a.cpu().numpy(), None

    # ---- bookkeeping -------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, net in (("actor", self.actor.net), ("critic", self.critic.net)):
            if hasattr(net, "param_counts"):
                out[name] = net.param_counts()
            else:
                out[name] = {"total": sum(p.numel() for p in weight_parameters(net))}
        return out

    def state_dict(self, with_replay: bool = True) -> dict[str, Any]:
        d = {
            "searching": self.searching, "n_updates": self.n_updates,
            "trees": {k: t.to_dict() for k, t in self.trees.items()},
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "log_alpha": self.log_alpha.detach().cpu(), "alpha_opt": self.alpha_opt.state_dict(),
            "actor_method": self.actor_method.state_dict(), "critic_method": self.critic_method.state_dict(),
            "actor_combiner": self.actor_combiner.state_dict(), "critic_combiner": self.critic_combiner.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            # the open epoch of a weighting that uses epochs (DWA): an exact resume ends it where it would have
            "epoch_losses": None if self._epoch_sums is None else {"sums": self._epoch_sums.to("cpu", copy=True),
                                                                   "count": self._epoch_count},
        }
        if with_replay:
            d["replay"] = self.replay.state_dict()
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if not d["searching"] and self.searching:
            self.searching = False
            self._build(False, {k: Tree.from_dict(v) for k, v in d["trees"].items()})
            self.replay.val_every = 0
        self.actor.load_state_dict(d["actor"])
        self.critic.load_state_dict(d["critic"])
        self.critic_target.load_state_dict(d["critic_target"])
        self.actor_opt.load_state_dict(d["actor_opt"])
        self.critic_opt.load_state_dict(d["critic_opt"])
        with torch.no_grad():
            self.log_alpha.copy_(d["log_alpha"])
        self.alpha_opt.load_state_dict(d["alpha_opt"])
        self.actor_method.load_state_dict(d["actor_method"])
        self.critic_method.load_state_dict(d["critic_method"])
        self.actor_combiner.load_state_dict(d["actor_combiner"])
        self.critic_combiner.load_state_dict(d["critic_combiner"])
        if self._epoch_sums is not None and d.get("epoch_losses") is not None:
            self._epoch_sums.copy_(d["epoch_losses"]["sums"])
            self._epoch_count = d["epoch_losses"]["count"]
        if "sample_gen" in d:  # rank-local: absent on ranks > 0 of a data-parallel resume
            self.sample_gen.set_state(d["sample_gen"])
        self.n_updates = d["n_updates"]
        if "replay" in d:
            self.replay.load_state_dict(d["replay"])
        if self.searching:  # the methods' schedules count updates
            for m in (self.actor_method, self.critic_method):
                m.apply_schedule(self.n_updates)

    # ---- what a training loop needs --------------------------------------------------------------------
    RANK_LOCAL = ("replay", "sample_gen")  # state_dict keys that belong to one data-parallel rank

    def store(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
              terminated: np.ndarray) -> None:
        """One vector step's transitions into the replay."""
        self.replay.add(obs, action, reward, next_obs, terminated)

    def replay_bytes(self) -> int:
        return sum(getattr(self.replay, f).numel() for f in self.replay.FIELDS) * 4

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """Every learned tensor by name (what a finiteness check reads)."""
        nets = {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target}
        return [(f"{n}.{k}", p) for n, m in nets.items() for k, p in m.named_parameters()] + [("log_alpha", self.log_alpha)]

    def reseed(self, seed: int) -> None:
        """A fresh stream for the replay's draws (ranks > 0 of a data-parallel resume)."""
        self.sample_gen.manual_seed(seed)

    # ---- stable-baselines3's verbs ---------------------------------------------------------------------
    env: Any = None
    run: Any = None

    @classmethod
    def from_env(cls, env: Any, config: Config, device: torch.device | str = "cpu") -> "MTSAC":
        agent = cls(env.tasks, env.observation_dim, env.action_dim, config, device,
                    getattr(env, "max_episode_steps", None))
        agent.env = env
        return agent

    def get_env(self) -> Any:
        return self.env

    @property
    def num_timesteps(self) -> int:
        return 0 if self.run is None else self.run.learner.num_timesteps

    @property
    def logger(self) -> Any:
        return _SB3LoggerShim(self.run)

    def learn(self, total_timesteps: int, callback: Any = None, progress_bar: bool = False,
              logger: Any = None, run_dir: Any = None) -> "MTSAC":
        """Train for ``total_timesteps`` environment steps summed over tasks (SB3's meaning, per sub-env)."""
        from mtrl_arch.loop import Run

        from .rl_loop import RLRun

        if self.env is None:
            raise ValueError("this agent has no environment; build it with MTSAC.from_env(env, config)")
        if self.run is None:
            self.run = Run(RLRun(self, self.env), self.cfg, run_dir, logger, progress_bar)
        self.run.learn(self.num_timesteps + total_timesteps, callback)
        return self

    def save(self, path: str) -> None:
        save_model_file({"format": "mtrl-arch/mtsac", "version": 1, "config": self.cfg.to_dict(), "tasks": list(self.tasks),
                         "obs_dim": self.obs_dim, "action_dim": self.action_dim, "state": self.state_dict(with_replay=False)},
                        path)

    @classmethod
    def load(cls, path: str, env: Any = None, device: torch.device | str = "cpu", trust_file: bool = False) -> "MTSAC":
        """The agent :meth:`save` wrote. A file holding more than tensors and plain data is refused
        (:class:`~mtrl_arch.safe_load.UntrustedFileError`); ``trust_file=True`` loads it anyway, for a file
        you made or trust (unpickling can run code in it)."""
        from mtrl_arch.config import config_from_dict
        from mtrl_arch.safe_load import torch_load

        d = torch_load(path, path, trust_file=trust_file)
        if not isinstance(d, dict) or d.get("format") != "mtrl-arch/mtsac":
            raise ConfigError(f"{path} is not an MTSAC file saved by mtrl-arch")
        agent = cls(tuple(d["tasks"]), d["obs_dim"], d["action_dim"], config_from_dict(d["config"]), device)
        agent.load_state_dict(d["state"])
        agent.env = env
        return agent


class _SB3LoggerShim:
    """What stable-baselines3 callbacks call on ``model.logger``: recorded values go to our log."""

    def __init__(self, run: Any):
        self.run = run
        self.pending: dict[str, Any] = {}

    def record(self, key: str, value: Any, exclude: Any = None) -> None:
        self.pending[key] = value

    def dump(self, step: int = 0) -> None:
        if self.run is not None and self.run.logger is not None and self.pending:
            self.run.logger.log(dict(self.pending), step)
        self.pending.clear()
