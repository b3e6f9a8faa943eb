"""AdaShare: per-task select-or-skip policies over shared residual blocks (Sun, Panda, Feris,
Saenko, "AdaShare: Learning What To Share For Efficient Deep Multi-Task Learning", NeurIPS 2020).

Algorithm implemented (following the authors' released code, adapted to steps):

* Search network: one module per stage, shared by every task (AdaShare shares all block
  weights). Task t has logits ``[n_blocks, 2]`` (execute, skip), initialised equal. A
  block that may be skipped (``TrunkSpec.residual[l]`` True: it keeps its input's shape)
  computes ``h_t <- pi[t,l,0] * f_l(h_t) + pi[t,l,1] * h_t``; the other blocks always run.
  In training ``pi`` is a soft Gumbel-softmax sample (one per forward pass, per task and
  block) at temperature tau; in eval mode the argmax policy.
* Schedule (``phase``/``on_step``; the loop just calls ``search_step`` every step):
  ``warmup_steps`` of hard sharing (every block executed, weights only); then cycles of
  ``weight_steps`` weight updates (policies sampled, logits fixed) followed by
  ``policy_steps`` policy updates on held-out batches (weights fixed; AdaShare's train2
  split). Policy optimiser: Adam lr 0.01, weight decay 5e-4 (the paper's).
* Temperature: ``tau0 = 5``, multiplied by ``tau_decay = 0.965`` every ``tau_decay_every``
  steps after the warm-up (default: one cycle, i.e. after every policy phase, as in the
  code). ``tau(step) = tau0 * tau_decay ** ((step - warmup_steps) // tau_decay_every)``.
* Curriculum: in cycle c (c = 0 for the first cycle after the warm-up) the last
  ``c // curriculum_speed + 1`` blocks are unlocked; earlier blocks are forced to execute
  (``num_train_layers = policy_epoch // curriculum_speed + 1`` in the code, with one of our
  cycles standing for one of its epochs). Non-residual blocks stay forced throughout.
* Policy loss = mean held-out task loss + ``lambda_sparsity`` * sum over tasks of the mean
  over unlocked skippable blocks of ``-log p(skip)`` + ``lambda_sharing`` * sum over task
  pairs and skippable blocks of ``w_l * |logit_i[l, execute] - logit_j[l, execute]|`` on raw
  logits. ``sharing_weights='paper'``: ``w_l = (L - l) / L`` (shallow blocks pushed hardest
  to agree, i.e. shared; deeper ones free to become task-specific); ``'code'``:
  ``w_l = (l + 1) / L`` as in the released code.
* Derive: every skippable block of every task is executed or skipped by sampling from
  ``softmax(logits)`` with a generator seeded by the method's seed (``derive='sample'``, the
  authors' way; they sample 8 architectures and keep the best after retraining) or by
  argmax (``derive='argmax'``, ties -> execute). Blocks still locked by the curriculum are
  executed. A block executed by several tasks is one module shared by them; a block no
  task executes is skipped by all. Then the loop retrains from scratch.
* Derive rules (``arch.derive``, ``arch.max_params``; p = softmax(logits[t, l]) over
  (execute, skip)): argmax (the default) keeps ``arch.options.derive`` above. margin M
  replaces it: a block is executed unless p_skip > p_execute and p_skip - p_execute >= M
  (M = 0: argmax, ties execute). max_params N: the table above if its trunk (one module per
  block executed by any task) fits N; otherwise the table maximising the sum over tasks and
  unlocked skippable blocks of log p(decision) whose trunk fits N (ties: fewer
  parameters). Exact: a block costs its parameters iff some task executes it, so per block
  the best table is either "all skip" or the per-task argmax (if no task prefers execute:
  the one task losing least by executing), and the choice between the two over blocks is a
  knapsack solved exactly by :func:`~.derive.best_within`. Locked and non-skippable blocks
  always count; when they alone exceed N, derive fails with a one-line ConfigError naming
  that minimum (made early when the non-skippable blocks alone exceed N).

Departures: epochs become step counts (warm-up, phase lengths, decay period); the task
loss is the mean over tasks (the code sums), so with equal lambdas the regularisers weigh
T times more here; one derived architecture per call (call with other seeds for more);
AdaShare's weight phase uses SGD with momentum, here whatever optimiser the loop has.
Defaults ``lambda_sparsity=0.001, lambda_sharing=0.05`` are the NYUv2 3-task values. Once a
soft block makes the tasks' hidden states differ, every block runs on T streams (one call
over T*B rows; with a shared input the stream is shared until then).

Known behaviour: a task never gets a module of its own; it avoids a conflicting block only
by skipping it, which pays only if a later block can do that block's job. On
:class:`~mtrl_arch.synthetic.ConflictProblem` the conflicting first block stays executed by
all three tasks (tests/test_search_methods.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..tree import Tree
from ..trunk import ParamGroup, call_bank, module_rows
from .base import ArchMethod, Phase, TrunkSpec
from .derive import best_within, margin_choice


@dataclass
class AdaShareOptions:
    warmup_steps: int = 200          # hard sharing before the first policy cycle
    weight_steps: int = 50           # weight updates per cycle
    policy_steps: int = 50           # policy updates per cycle
    tau0: float = 5.0                # initial Gumbel-softmax temperature
    tau_decay: float = 0.965         # temperature factor per decay period
    tau_decay_every: int = 0         # decay period in steps after the warm-up; 0: one cycle
    curriculum_speed: int = 3        # cycles per additional unlocked block
    lambda_sparsity: float = 0.001   # weight of the sparsity loss
    lambda_sharing: float = 0.05     # weight of the sharing loss
    sharing_weights: str = "paper"   # 'paper': w_l=(L-l)/L, 'code': w_l=(l+1)/L
    lr: float = 0.01                 # policy optimiser (Adam) learning rate
    weight_decay: float = 5e-4       # policy optimiser weight decay
    derive: str = "sample"           # 'sample' (seeded) or 'argmax'

    def __post_init__(self):  # checked when the config is (validate parses the options), not at build time
        if self.sharing_weights not in ("paper", "code"):
            raise ValueError(f"arch.options.sharing_weights must be 'paper' or 'code', got {self.sharing_weights!r}")
        if self.derive not in ("sample", "argmax"):
            raise ValueError(f"arch.options.derive must be 'sample' or 'argmax', got {self.derive!r}")
        if min(self.weight_steps, self.policy_steps) < 1 or self.curriculum_speed < 1:
            raise ValueError("arch.options.weight_steps, policy_steps and curriculum_speed must be >= 1")


class AdaShareNet(nn.Module):
    def __init__(self, spec: TrunkSpec):
        super().__init__()
        T, L = spec.n_tasks, spec.n_stages
        self.n_tasks, self.n_stages = T, L
        self.blocks = nn.ModuleList(f(1) for f in spec.stages)
        self.heads = spec.heads(T) if spec.heads is not None else None
        self.logits = nn.Parameter(torch.zeros(T, L, 2))
        self.skippable = tuple(bool(r) for r in (spec.residual or (False,) * L))
        self.tau = 5.0
        self.unlocked: tuple[bool, ...] = (False,) * L  # set by the method's schedule
        self.capture_requested = False
        self.captured_ok = False

    def policy(self) -> Tensor:
        """[T, L, 2] mixing weights for this forward pass."""
        if self.training:
            return F.gumbel_softmax(self.logits, tau=self.tau, hard=False, dim=-1)
        return F.one_hot(self.logits.argmax(-1), 2).to(self.logits.dtype)

    def features(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        T = self.n_tasks
        h = x.unsqueeze(0) if shared_input else x
        a = None if aux is None else (aux.unsqueeze(0) if shared_input else aux)
        capture = self.capture_requested and not shared_input
        self.captured_ok = capture
        pi = self.policy() if any(self.unlocked) else None
        for l, block in enumerate(self.blocks):
            soft = self.unlocked[l] and self.skippable[l]
            if soft and h.shape[0] == 1 and T > 1:  # paths start to differ: one stream per task
                h = h.expand(T, *h.shape[1:])
                a = None if a is None else a.expand(T, *a.shape[1:])
            f = call_bank(block, h, [0] * h.shape[0], a, list(range(T)) if capture else None)
            if soft:
                w = pi[:, l].to(f.dtype).view(T, 2, *([1] * (f.dim() - 1)))
                h = w[:, 0] * f + w[:, 1] * h
            else:
                h = f
        return h.expand(T, *h.shape[1:]) if h.shape[0] == 1 and T > 1 else h

    def forward(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        z = self.features(x, shared_input, aux)
        return self.heads(z, list(range(self.n_tasks))) if self.heads is not None else z

    def shared_groups(self) -> list[ParamGroup]:
        return [ParamGroup(f"stage{l}", list(b.parameters()), module_rows(b, 0), range(self.n_tasks))
                for l, b in enumerate(self.blocks)]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.logits]


class AdaShare(ArchMethod):
    name = "adashare"
    Options = AdaShareOptions

    # ---- schedules (pure functions of the step) --------------------------------------------
    @property
    def cycle(self) -> int:
        return self.options.weight_steps + self.options.policy_steps

    def tau_at(self, step: int) -> float:
        o = self.options
        if step < o.warmup_steps:
            return float(o.tau0)
        period = o.tau_decay_every or self.cycle
        return float(o.tau0) * float(o.tau_decay) ** ((step - o.warmup_steps) // period)

    def n_unlocked_at(self, step: int) -> int:
        """How many blocks, counted from the last, the policy may skip at ``step`` (0 in the warm-up)."""
        o = self.options
        if step < o.warmup_steps:
            return 0
        return min(self.spec.n_stages, (step - o.warmup_steps) // self.cycle // o.curriculum_speed + 1)

    def unlocked_at(self, step: int) -> tuple[bool, ...]:
        L, n = self.spec.n_stages, self.n_unlocked_at(step)
        return tuple(l >= L - n for l in range(L))

    def apply_schedule(self, step: int) -> None:
        self.net.tau = self.tau_at(step)
        self.net.unlocked = self.unlocked_at(step)

    # ---- interface ------------------------------------------------------------------------------
    def build(self) -> nn.Module:
        self.net = AdaShareNet(self.spec)
        self.make_arch_optimizer(self.options.lr, self.options.weight_decay, betas=(0.9, 0.999))
        self.apply_schedule(0)
        return self.net

    def phase(self, step: int) -> Phase:
        o = self.options
        if step < o.warmup_steps:
            return Phase(weights=True, arch=False)
        policy = (step - o.warmup_steps) % self.cycle >= o.weight_steps
        return Phase(weights=not policy, arch=policy)

    def on_step(self, step: int) -> None:
        self.apply_schedule(step + 1)

    def regularizer(self) -> Tensor:
        o, net = self.options, self.net
        L, T = net.n_stages, net.n_tasks
        logits = net.logits
        soft = [l for l in range(L) if net.skippable[l]]
        active = [l for l in soft if net.unlocked[l]]
        reg = logits.new_zeros(())
        if active and o.lambda_sparsity:
            logp_skip = logits[:, active].log_softmax(-1)[..., 1]  # [T, n_active]
            reg = reg + o.lambda_sparsity * (-logp_skip.mean(1)).sum()
        if soft and T > 1 and o.lambda_sharing:
            l_idx = torch.tensor(soft, dtype=logits.dtype, device=logits.device)
            w = (L - l_idx) / L if o.sharing_weights == "paper" else (l_idx + 1) / L
            ex = logits[:, soft, 0]  # [T, n_soft] raw execute logits
            i, j = torch.triu_indices(T, T, 1, device=logits.device)
            reg = reg + o.lambda_sharing * (w * (ex[i] - ex[j]).abs()).sum()
        return reg

    def execute_probs(self) -> Tensor:
        return self.net.logits.detach().softmax(-1)[..., 0].cpu()  # [T, L]

    def min_params(self) -> int:
        """Every skippable block skipped by every task: the blocks that cannot be skipped."""
        skippable = self.spec.residual or (False,) * self.spec.n_stages
        return sum(n for n, r in zip(self.sizes(), skippable) if not r)

    def table_params(self, table: list[list[bool]]) -> int:
        return sum(n for l, n in enumerate(self.sizes()) if any(row[l] for row in table))

    def policy_table(self) -> list[list[bool]]:
        """Per task and block: executed in the derived architecture (by the derive rule)."""
        T, L = self.spec.n_tasks, self.spec.n_stages
        p, rule = self.execute_probs(), self.derive_rule
        self.how = "margin" if rule.rule == "margin" else self.options.derive
        if rule.rule == "margin":
            q = self.net.logits.detach().double().softmax(-1).cpu()  # (execute, skip)
            draw = torch.tensor([[margin_choice([float(q[t, l, 1]), float(q[t, l, 0])], rule.margin) == 1
                                  for l in range(L)] for t in range(T)])
        elif self.options.derive == "sample":
            g = torch.Generator().manual_seed(self.seed)
            draw = torch.rand(T, L, generator=g) < p
        else:
            draw = p >= 0.5
        locked = [not (self.net.skippable[l] and self.net.unlocked[l]) for l in range(L)]
        table = [[bool(draw[t, l]) or locked[l] for l in range(L)] for t in range(T)]
        if rule.max_params and self.table_params(table) > rule.max_params:
            self.how = "max_params"
            return self.budget_table(rule.max_params, locked)
        return table

    def budget_table(self, budget: int, locked: list[bool]) -> list[list[bool]]:
        """The table with the highest sum of decision log-probabilities whose trunk fits ``budget`` (exact)."""
        T, P = self.spec.n_tasks, self.sizes()
        logp = self.net.logits.detach().double().log_softmax(-1).cpu()  # [T, L, (execute, skip)]
        fixed = sum(n for n, lk in zip(P, locked) if lk)
        if fixed > budget:
            raise ConfigError(self._too_small(budget, fixed) + " (the blocks the curriculum has not unlocked count)")
        free = [l for l in range(len(P)) if not locked[l]]
        items, used = [], {}
        for l in free:
            e, s = logp[:, l, 0], logp[:, l, 1]
            run = [bool(e[t] >= s[t]) for t in range(T)]
            if not any(run):  # someone must execute it: the task that loses least
                run[int(torch.argmax(e - s))] = True
            used[l] = run
            items.append([(0, float(s.sum())), (P[l], sum(float(e[t] if run[t] else s[t]) for t in range(T)))])
        pick, _, _ = best_within(items, budget - fixed)
        keep = {l for l, j in zip(free, pick) if j == 1}
        return [[locked[l] or (l in keep and used[l][t]) for l in range(len(P))] for t in range(T)]

    def derive(self) -> Tree:
        T, L = self.spec.n_tasks, self.spec.n_stages
        table = self.policy_table()
        stages = []
        for l in range(L):
            users = tuple(t for t in range(T) if table[t][l])
            stages.append((users,) if users else ())
        p = self.execute_probs()
        meta = {"p_execute": {n: [round(float(v), 4) for v in p[t]] for t, n in enumerate(self.spec.tasks)},
                "derive": self.how, "seed": self.seed, "tau": self.net.tau,
                "unlocked": list(self.net.unlocked)}
        tree = Tree(self.spec.tasks, tuple(stages), method=self.name, meta=meta)
        exact = self.net.logits.detach().double().softmax(-1)[..., 0].cpu()
        # policy: what made the table (arch.options.derive's sample/argmax, margin, or max_params when the budget bound)
        return self.finish(tree, {"p_execute": {n: [round(float(v), 6) for v in exact[t]]
                                                for t, n in enumerate(self.spec.tasks)}}, policy=self.how)
