"""CoNAL-Pro: progressive conflict-noticed architecture learning for many tasks (Yue et al.,
"Learning Conflict-Noticed Architecture for Multi-Task Learning", AAAI 2023, the
progressive extension). The paper describes it only in a figure; this is the exact
algorithm implemented here.

Modules. ``trunk[s]``: one all-shared module per stage. ``private[s]``: one purely-specific
module per task and stage. ``group[s]``: module j of stage s (j < s) is the sub-group module
that the tasks placed in the round whose active stage is j use at stage s. Every module
exists from ``build()`` on, so the loop's weight optimiser sees them all.

Rounds, deep to shallow. The active stage starts at a = L-1 with every task *remaining*.
In the round of active stage a, each remaining task t chooses, with a 2-way softmax over
``alpha[t] = (stay, leave)`` (initialised equal), between

* stay:  the current shared module at stage a (``trunk[0..a]``), then this round's
  sub-group modules ``group[a+1..L-1][a]``, shared by all remaining tasks;
* leave: its purely-specific module at stage a (``trunk[0..a-1]``, then
  ``private[a..L-1][t]``),

and its features are ``p_stay * stay + p_leave * leave``. Tasks placed in earlier rounds run
their fixed paths, and their losses keep training the trunk they share with the rest.
After ``steps_per_stage`` steps the round ends (the first ``round_warmup`` steps of a
round, and the ``warmup_steps`` before the first round, update weights only). The
remaining tasks with ``alpha[t, stay] >= alpha[t, leave]`` (ties: stay) are placed together
as one group: they share stages 0..a with the trunk and one sub-group module per stage
below a. A lone stayer is placed only if a group placed earlier also uses ``trunk[a]``
(then it shares that module); otherwise it would share nothing at stage a and stays
remaining. The others stay remaining. The search space shrinks (fewer remaining tasks,
one stage shallower), and for the next round, at active stage a-1: its sub-group modules
``group[a..L-1][a-1]`` are copied from ``trunk[a..L-1]`` (a stay path starts as the full
trunk), each remaining task's ``private[a-1]`` is copied from ``trunk[a-1]`` when
``leave_init='trunk'`` (a leave path starts as the previous round's leave path; 'fresh'
keeps the module as built), alpha is reset to zero and its optimiser restarted. When the
round at stage 0 is over only one branch point is left (branch point 0) and the tasks
still remaining get purely-specific modules at every stage; the search also ends early
when no task remains. After that ``phase`` asks for weight steps only.

Resulting architecture: group g placed at active stage a_g shares ``trunk[s]`` with every
group placed at a stage >= s, and has its own module (sub-group if it has 2..T-1 tasks,
specific if 1) at the stages s > a_g; unplaced tasks are purely specific. Groups nest
(a tree), and tasks that chose alike in one round share their modules below the branch.

Cost per step: one trunk pass up to the deepest stage still used, then the paths as
blocks (each placed group; the stay and the leave paths of the remaining tasks), one
batched bank call per block and stage, every task in at most two blocks; with a shared
input a group module runs once for all its tasks. Per task that is at most 2L module
evaluations whatever the round, where CoNAL's network runs task t's private stage s on
s+1 branches (T x L(L+1)/2 evaluations; tests/test_search_methods.py counts both, and
:func:`mtrl_arch.synthetic.conal_pro_stage_cost` times them).

Architecture updates are CoNAL's: first-order, alpha on held-out losses with Adam
(``lr``, ``weight_decay``), one alpha step every ``arch_every`` weight steps; weights on
training losses. The conflict-noticed operation acts on ``shared_groups()``: every trunk or
group module used by two or more tasks at the time.

Departures / choices not fixed by the paper: the number of steps per round, the
copy-from-trunk initialisation of new modules, ties (stay wins), the lone-stayer rule, one
group per round (tasks that choose "leave" are decided again one stage shallower, so two
clusters that both leave the trunk at stage a can still become two groups in later rounds,
but each group's branch stage is distinct), and the warm-ups (none by default).
``derive()`` in the middle of the search places the current round's stayers by the current
alpha and makes the rest purely specific. Known behaviour: a deep round decides with the
shallow stages still shared by everyone, so a conflict that lives in the first stage is
only visible in the last round, and a task placed in a deep round never leaves the trunk
again. On :class:`~mtrl_arch.synthetic.ConflictProblem` (600 steps, 200 per round,
lr 1e-2) the search finds {A,B} | {C} for seed 0 (tested), and for 5 of seeds 0-9 (4 with
the conflict-noticed operation); the misses are mostly hard sharing (C stays in the
deepest round) or C sharing stage 0.

Derive rules (``arch.derive``, ``arch.max_params``) act on every round's decision, so they
shape the search itself (they run in ``end_round``) as well as a ``derive()`` mid-search;
p = softmax(alpha[t]) over (stay, leave):

* argmax (the default): stay iff ``alpha[t, stay] >= alpha[t, leave]``, as above.
* margin M: stay unless p_leave > p_stay and p_leave - p_stay >= M (M = 0: argmax).
  The lone-stayer rule applies to the stayers either way.
* max_params N: the argmax stayers if the round keeps the final tree within N, otherwise
  the stayers S maximising sum over remaining tasks of log p(their decision) (stay for S,
  leave for the rest) among those that do (ties: more stayers). "Keeps within N": the
  smallest final tree reachable after this round, which places every task left remaining
  as one group in the next round (or, after the round at stage 0, makes it purely
  specific), fits N; a ``derive()`` mid-search counts the tree it returns (the rest purely
  specific). The optimum is exact: that parameter count depends on S only through |S|,
  and the best S of each size is the remaining tasks with the largest
  log p_stay - log p_leave. Staying is always feasible once the round before was (it
  yields the bound that round checked), and full sharing, the first bound, is checked
  when the method is made, so the final tree never exceeds N.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..tree import Tree
from ..trunk import ParamGroup, call_bank, module_rows
from .base import ArchMethod, Phase, TrunkSpec
from .derive import margin_choice


@dataclass
class ConalProOptions:
    steps_per_stage: int = 1000  # search steps per round (active stage), deep to shallow
    warmup_steps: int = 0        # weight-only steps before the first round
    round_warmup: int = 0        # weight-only steps at the start of every round (alpha frozen)
    leave_init: str = "trunk"    # a round's new purely-specific modules: 'trunk' (copy) or 'fresh' (as built)
    lr: float = 5e-5             # architecture optimiser (Adam) learning rate, CoNAL's default
    weight_decay: float = 1e-5   # architecture optimiser weight decay
    arch_every: int = 1          # one alpha step every N weight steps

    def __post_init__(self):  # checked when the config is (validate parses the options), not at build time
        if self.steps_per_stage < 1 or self.arch_every < 1:
            raise ValueError("arch.options.steps_per_stage and arch.options.arch_every must be >= 1")
        if self.leave_init not in ("trunk", "fresh"):
            raise ValueError(f"arch.options.leave_init must be 'trunk' or 'fresh', got {self.leave_init!r}")


# A path: (stream, entry stage, modules for stages entry..L-1 as (bank kind, module index)).
Path = tuple[int, int, tuple[tuple[str, int], ...]]


def _copy_module(src: nn.Module, m_src: int, dst: nn.Module, m_dst: int) -> None:
    """Copy module ``m_src`` of bank ``src`` into module ``m_dst`` of bank ``dst`` (same stage factory)."""
    rs, rd = module_rows(src, m_src), module_rows(dst, m_dst)
    rs, rd = (rs, rd) if isinstance(rs, list) else ([rs], [rd])
    for ps, pd in zip(src.parameters(), dst.parameters()):
        for i, j in zip(rs, rd):
            pd[j].copy_(ps[i])


class ConalProNet(nn.Module):
    def __init__(self, spec: TrunkSpec):
        super().__init__()
        T, L = spec.n_tasks, spec.n_stages
        self.n_tasks, self.n_stages = T, L
        self.trunk = nn.ModuleList(f(1) for f in spec.stages)
        self.group = nn.ModuleList(f(s) if s > 0 else nn.Identity() for s, f in enumerate(spec.stages))
        self.private = nn.ModuleList(f(T) for f in spec.stages)
        self.heads = spec.heads(T) if spec.heads is not None else None
        self.alpha = nn.Parameter(torch.zeros(T, 2))  # (stay, leave) per task, current round
        # search state, owned by ConalPro
        self.active = L - 1                            # active stage; -1 when the search is over
        self.remaining: list[int] = list(range(T))
        self.placed: list[tuple[tuple[int, ...], int]] = []  # (tasks, active stage when placed)
        self.capture_requested = False
        self.captured_ok = False

    # ---- which module each task uses -------------------------------------------------------------
    def _group_path(self, a: int) -> tuple[tuple[str, int], ...]:
        return tuple(("group", a) for _ in range(a + 1, self.n_stages))

    def task_paths(self, t: int) -> list[Path]:
        """Task t's path(s): one when placed or after the search, (stay, leave) while it chooses."""
        L = self.n_stages
        for tasks, a in self.placed:
            if t in tasks:
                return [(t, a + 1, self._group_path(a))]
        if self.active < 0:
            return [(t, 0, tuple(("private", t) for _ in range(L)))]
        a = self.active
        return [(t, a + 1, self._group_path(a)), (t, a, tuple(("private", t) for _ in range(a, L)))]

    def users(self) -> dict[tuple[str, int, int], set[int]]:
        """(kind, stage, module) -> tasks whose paths use it (cached until the state changes)."""
        state = (self.active, tuple(self.remaining), tuple(self.placed))
        cached = getattr(self, "_users_cache", None)
        if cached is not None and cached[0] == state:
            return cached[1]
        out: dict[tuple[str, int, int], set[int]] = {}
        for t in range(self.n_tasks):
            for _, entry, mods in self.task_paths(t):
                for s in range(entry):
                    out.setdefault(("trunk", s, 0), set()).add(t)
                for i, (kind, m) in enumerate(mods):
                    out.setdefault((kind, entry + i, m), set()).add(t)
        self._users_cache = (state, out)
        return out

    # ---- forward ---------------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[str, int, list[int]]]:
        """Paths grouped into blocks that run together: (bank kind, entry stage, tasks).

        A 'group' block runs one module (index entry-1) for all its tasks; a 'private'
        block runs each task's own module. Remaining tasks appear in a stay and a leave block.
        """
        out = [("group", a + 1, list(g)) for g, a in self.placed]
        if self.remaining:
            if self.active >= 0:
                out += [("group", self.active + 1, list(self.remaining)), ("private", self.active, list(self.remaining))]
            else:
                out.append(("private", 0, list(self.remaining)))
        return out

    def features(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        T, L = self.n_tasks, self.n_stages
        h = x.unsqueeze(0) if shared_input else x
        a = None if aux is None else (aux.unsqueeze(0) if shared_input else aux)
        S = h.shape[0]
        capture = self.capture_requested and not shared_input
        self.captured_ok = capture
        users = self.users()
        blocks = self.blocks()
        trunk_out = [h]
        for s in range(max(entry for _, entry, _ in blocks)):
            tasks = list(range(S)) if capture and len(users.get(("trunk", s, 0), ())) > 1 else None
            trunk_out.append(call_bank(self.trunk[s], trunk_out[-1], [0] * S, a, tasks))
        outs, first, second = [], [0] * T, [0] * T
        offset = 0
        for kind, entry, tasks in blocks:
            # one row per task, except a group module on a shared input stream: one row for all
            streams = tasks if S > 1 else ([0] if kind == "group" else [0] * len(tasks))
            mods = [entry - 1] * len(streams) if kind == "group" else tasks
            idx = torch.as_tensor(streams, device=h.device)
            hb = trunk_out[entry].index_select(0, idx)
            ab = None if a is None else a.index_select(0, idx)
            cap = tasks if capture and kind == "group" and len(tasks) > 1 else None
            for s in range(entry, L):
                bank = self.group[s] if kind == "group" else self.private[s]
                hb = call_bank(bank, hb, mods, ab, cap)
            outs.append(hb)
            for i, t in enumerate(tasks):
                row = offset + (i if len(streams) > 1 else 0)
                if kind == "group" and t in self.remaining:
                    first[t] = row      # stay path
                elif kind == "private" and self.active >= 0:
                    second[t] = row     # leave path
                else:
                    first[t] = second[t] = row
            offset += hb.shape[0]
        allout = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
        w = self.alpha.softmax(-1).to(allout.dtype)
        choosing = torch.zeros(T, dtype=torch.bool, device=w.device)
        if self.active >= 0 and self.remaining:
            choosing[torch.as_tensor(self.remaining, device=w.device)] = True
        c1 = torch.where(choosing, w[:, 0], torch.ones_like(w[:, 0]))
        c2 = torch.where(choosing, w[:, 1], torch.zeros_like(w[:, 1]))
        shape = (T,) + (1,) * (allout.dim() - 1)
        dev = allout.device
        return (c1.view(shape) * allout.index_select(0, torch.as_tensor(first, device=dev))
                + c2.view(shape) * allout.index_select(0, torch.as_tensor(second, device=dev)))

    def forward(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        z = self.features(x, shared_input, aux)
        return self.heads(z, list(range(self.n_tasks))) if self.heads is not None else z

    def shared_groups(self) -> list[ParamGroup]:
        out = []
        for (kind, s, m), tasks in sorted(self.users().items(), key=lambda kv: (kv[0][1], kv[0][0] != "trunk", kv[0][2])):
            if len(tasks) < 2:
                continue
            bank = self.trunk[s] if kind == "trunk" else self.group[s]
            name = f"stage{s}" if kind == "trunk" else f"stage{s}.g{m}"
            out.append(ParamGroup(name, list(bank.parameters()), module_rows(bank, m), sorted(tasks)))
        return out

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]


class ConalPro(ArchMethod):
    name = "conal_pro"
    Options = ConalProOptions

    def __init__(self, spec, options=None, seed: int = 0):
        super().__init__(spec, options, seed)
        self.rounds: list[dict] = []

    def build(self) -> nn.Module:
        self.net = ConalProNet(self.spec)
        self.make_arch_optimizer(self.options.lr, self.options.weight_decay, betas=(0.9, 0.999))
        return self.net

    @property
    def searching(self) -> bool:
        return self.net.active >= 0 and bool(self.net.remaining)

    def phase(self, step: int) -> Phase:
        o = self.options
        into = step - o.warmup_steps
        arch = (self.searching and into >= 0 and into % o.steps_per_stage >= o.round_warmup
                and step % o.arch_every == 0)
        return Phase(weights=True, arch=arch)

    def on_step(self, step: int) -> None:
        done = step + 1 - self.options.warmup_steps
        if self.searching and done > 0 and done % self.options.steps_per_stage == 0:
            self.end_round()

    def arch_values(self) -> dict[str, float]:
        """p_t(leave) of every task still choosing in the current round (``leave`` the active stage's shared module)."""
        if self.net is None or not self.searching:
            return {}
        p = self.net.alpha.detach().double().softmax(-1).cpu()
        return {f"arch/{self.spec.name}/{self.spec.tasks[t]}/leave": float(p[t, 1]) for t in self.net.remaining}

    def stayers(self, ending: bool = True) -> list[int]:
        """The remaining tasks placed if the round ended now: those preferring the shared module
        by the derive rule (see the module docstring; ``ending``: for ``end_round``, else for a
        ``derive()`` mid-search, which the budget counts differently).

        A lone stayer is placed only when it shares the module with a group placed earlier;
        otherwise it would share nothing at this stage and is left to choose again.
        """
        net, rule = self.net, self.derive_rule
        if rule.rule == "margin":
            p = net.alpha.detach().double().softmax(-1).cpu()
            stay = [t for t in net.remaining if margin_choice([float(p[t, 1]), float(p[t, 0])], rule.margin) == 1]
        else:
            alpha = net.alpha.detach()
            stay = [t for t in net.remaining if bool(alpha[t, 0] >= alpha[t, 1])]
        stay = stay if len(stay) > 1 or net.placed else []
        self.budget_binding = bool(rule.max_params) and self.round_params(stay, ending) > rule.max_params
        return self.budget_stayers(rule.max_params, ending) if self.budget_binding else stay

    def round_params(self, stay: list[int], ending: bool) -> int:
        """Trunk parameters of the tree counted for the budget if ``stay`` were placed now."""
        net, a = self.net, self.net.active
        rest = tuple(t for t in net.remaining if t not in stay)
        placed = list(net.placed) + ([(tuple(stay), a)] if stay else [])
        if ending and rest and a >= 1:  # the smallest continuation: the rest placed together next round
            placed.append((rest, a - 1))
        c = Tree(self.spec.tasks, self._layout(placed), method=self.name).param_counts(self.sizes())
        return c["shared"] + c["subgroup"] + c["specific"]

    def budget_stayers(self, budget: int, ending: bool) -> list[int]:
        """The stayers with the highest sum of decision log-probabilities whose tree fits ``budget``."""
        net = self.net
        logp = net.alpha.detach().double().log_softmax(-1).cpu()
        rem = list(net.remaining)
        order = sorted(rem, key=lambda t: (-float(logp[t, 0] - logp[t, 1]), t))  # most eager to stay first
        best = None
        for k in range(len(rem), -1, -1):  # more stayers first, so ties go to them
            stay = sorted(order[:k])
            if k == 1 and not net.placed:  # a lone stayer would not be placed
                continue
            score = sum(float(logp[t, 0] if t in stay else logp[t, 1]) for t in rem)
            if (best is None or score > best[0]) and self.round_params(stay, ending) <= budget:
                best = (score, stay)
        if best is None:  # cannot happen: staying all together fits whenever the round before did
            raise ConfigError(self._too_small(budget, self.min_params()))
        return best[1]

    def end_round(self) -> None:
        """Place this round's stayers, shrink the search space, move one stage shallower."""
        net = self.net
        if not self.searching:
            return
        a = net.active
        stay = self.stayers()
        p = net.alpha.detach().softmax(-1)[:, 0]
        self.rounds.append({"stage": a, "stay": [self.spec.tasks[t] for t in stay],
                            "p_stay": {self.spec.tasks[t]: round(float(p[t]), 4) for t in net.remaining},
                            **({"budget_binding": self.budget_binding} if self.derive_rule.max_params else {})})
        if stay:
            net.placed.append((tuple(stay), a))
            net.remaining = [t for t in net.remaining if t not in stay]
        net.active = a - 1
        if not self.searching:
            net.active = -1
            return
        with torch.no_grad():
            # the next round's sub-group modules start as the trunk below stage a-1, so a stay
            # path starts as the full trunk
            for s in range(a, net.n_stages):
                _copy_module(net.trunk[s], 0, net.group[s], a - 1)
            if self.options.leave_init == "trunk":
                for t in net.remaining:
                    _copy_module(net.trunk[a - 1], 0, net.private[a - 1], t)
            net.alpha.zero_()
        self.make_arch_optimizer(self.options.lr, self.options.weight_decay, betas=(0.9, 0.999))

    def derive(self) -> Tree:
        net = self.net
        placed = list(net.placed)
        if self.searching:
            stay = self.stayers(ending=False)
            if stay:
                placed.append((tuple(stay), net.active))
        meta = {"rounds": list(self.rounds),
                "groups": [{"tasks": [self.spec.tasks[t] for t in g], "branch_stage": a + 1} for g, a in placed]}
        tree = Tree(self.spec.tasks, self._layout(placed), method=self.name, meta=meta)
        scores = {"rounds": [{k: r[k] for k in ("stage", "p_stay", "budget_binding") if k in r} for r in self.rounds]}
        if self.searching:  # this round's decision, taken by derive()
            p = net.alpha.detach().double().softmax(-1)[:, 0].cpu()
            scores["current"] = {"stage": net.active, "p_stay": {self.spec.tasks[t]: round(float(p[t]), 6)
                                                                 for t in net.remaining}}
        return self.finish(tree, scores)

    def _layout(self, placed: list[tuple[tuple[int, ...], int]]) -> tuple:
        """Stages of the tree in which each (group, stage) of ``placed`` shares the trunk up to that
        stage and has its own module below; tasks in no group are purely specific."""
        T, L = self.spec.n_tasks, self.spec.n_stages
        in_group = {t for g, _ in placed for t in g}
        stages = []
        for s in range(L):
            trunk = tuple(sorted(t for g, a in placed if a >= s for t in g))
            groups = [trunk] if trunk else []
            groups += [tuple(g) for g, a in placed if a < s]
            groups += [(t,) for t in range(T) if t not in in_group]
            stages.append(tuple(groups))
        return tuple(stages)

    def state_dict(self) -> dict:
        net = self.net
        return {**super().state_dict(), "active": net.active, "remaining": list(net.remaining),
                "placed": [(list(g), a) for g, a in net.placed], "rounds": list(self.rounds)}

    def load_state_dict(self, d: dict) -> None:
        net = self.net
        net.active, net.remaining = int(d["active"]), list(d["remaining"])
        net.placed = [(tuple(g), int(a)) for g, a in d["placed"]]
        self.rounds = list(d.get("rounds", []))
        self.make_arch_optimizer(self.options.lr, self.options.weight_decay, betas=(0.9, 0.999))
        super().load_state_dict(d)
