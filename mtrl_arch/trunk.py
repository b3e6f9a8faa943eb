"""Task-conditioned trunks whose task-specific modules run batched over tasks.

A *stage bank* holds ``n_modules`` copies of one stage (a linear layer, a conv block, a
transformer block) as stacked parameters and runs any list of (module, input) *calls*
in one batched op: ``bank(x, idx)`` with ``x`` of shape ``[C, B, ...]`` and ``idx`` the
module index of each of the C calls. When every call uses one module it is a plain
op over ``C*B`` rows; when the calls use distinct modules it is one bmm / grouped conv /
vmap. So a fully task-specific 10-task stage costs about one wide layer, not ten calls.

:class:`Trunk` runs a :class:`~mtrl_arch.tree.Tree` over *streams*: hidden states that
differ by input or by path. With a shared input (``x`` of shape ``[B, ...]``, one
image feeding every task) all tasks start on one stream, and a shared module is run once
per distinct input, not once per task. With per-task inputs (``[T, B, ...]``, RL and
mixed-task NLP batches) each task starts on its own stream.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tree import Tree, TreeError


class StageBank(Protocol):
    n_modules: int

    def __call__(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor: ...


StageFactory = Callable[[int], nn.Module]
"""Builds a stage bank holding the given number of module copies."""


def select_modules(param: Tensor, idx: Sequence[int]) -> Tensor:
    """``param[idx]`` without a copy when ``idx`` is the bank in order."""
    if len(idx) == param.shape[0] and all(i == j for j, i in enumerate(idx)):
        return param
    return param[torch.as_tensor(list(idx), device=param.device)]


def single_module(idx: Sequence[int]) -> int | None:
    """The one module index used by every call, or None."""
    first = idx[0]
    return first if all(i == first for i in idx) else None


def contiguous_runs(idx: Sequence[int]) -> tuple[int, int] | None:
    """``(first, n)`` when idx is n equal-length runs of modules first, first+1, ..., else None."""
    n_runs = len(set(idx))
    C = len(idx)
    if n_runs < 2 or C % n_runs:
        return None
    r = C // n_runs
    lo = idx[0]
    return (lo, n_runs) if all(i == lo + c // r for c, i in enumerate(idx)) else None


class CaptureMixin:
    """Lets a bank hand out per-call copies of its parameters as fresh leaves.

    While ``capture_tasks`` is set (by :func:`mtrl_arch.conflict.capture_task_grads`),
    every call runs on its own detached copy of its module's parameters, recorded in
    ``captured``; after one backward, ``leaf.grad[c]`` is the gradient of the call's
    task alone. That gives per-task gradients of shared modules from a single backward
    pass when each call belongs to one task (per-task inputs).
    """

    supports_capture = True
    capture_tasks: list[int] | None = None
    captured: list

    def gather(self, param: Tensor, idx: Sequence[int]) -> Tensor:
        if self.capture_tasks is None:
            return select_modules(param, idx)
        m = single_module(idx)
        if m is not None:  # one module for every call: a broadcast view, no copy of the weights
            leaf = param.detach()[m].expand(len(idx), *param.shape[1:]).requires_grad_(True)
        else:
            leaf = param[torch.as_tensor(list(idx), device=param.device)].detach().requires_grad_(True)
        self.captured.append((param, leaf, list(idx), list(self.capture_tasks)))
        return leaf


# Applied to a fresh matmul output, which they may overwrite: relu's and tanh's backward read
# only their result and the matmul's backward never reads its output, so in place they save
# a pass over a new buffer per layer (about 3% of an MLP's forward and backward on a 2-core CPU).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "gelu": F.gelu,
    "silu": F.silu,
    "identity": lambda x: x,
}


def batched_affine(b: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``b + x @ w`` batched over dim 0: ``[C, 1, n] + [C, R, K] @ [C, K, n]``.

    A single output (the critics' heads) is a multiply and a sum: its backward is then a
    broadcast multiply for ``x`` (baddbmm's is an outer product as a K=1 batched GEMM, 4x
    slower on CPU) and a reduction for ``w``; about 4% of a SAC update.
    """
    if w.shape[-1] == 1:
        return (x * w.transpose(1, 2)).sum(-1, keepdim=True) + b
    return torch.baddbmm(b, x, w)


INITS = ("torch", "he_uniform")


class BatchedLinear(CaptureMixin, nn.Module):
    """``n_modules`` linear layers (+ activation) stored as ``[M, in, out]``.

    ``init="torch"``: like ``nn.Linear``, weights and biases uniform in +-1/sqrt(in).
    ``init="he_uniform"``: weights uniform in +-sqrt(6/in) (He et al. 2015, fan-in, JAX's
    ``he_uniform``), biases zero; the MT-SAC reference (metaworld-algorithms) initialises
    every layer, heads included, this way. Either bound depends on the fan-in only, so one
    draw over the bank equals a draw per module.
    """

    def __init__(self, n_modules: int, in_features: int, out_features: int, activation: str = "relu",
                 init: str = "torch"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose from {list(INITS)}")
        self.n_modules, self.in_features, self.out_features = n_modules, in_features, out_features
        self.activation, self.init = activation, init
        self.weight = nn.Parameter(torch.empty(n_modules, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_modules, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "he_uniform":
            bound = math.sqrt(6.0 / self.in_features)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.zeros_(self.bias)
            return
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        C = x.shape[0]
        m = single_module(idx)
        if m is not None and self.capture_tasks is None:  # one module for every call: one matmul over C*B rows
            y = torch.addmm(self.bias[m], x.reshape(-1, self.in_features), self.weight[m])
        elif self.capture_tasks is None and (runs := contiguous_runs(idx)) is not None:
            # calls grouped into equal runs of one module each (ensembles): one bmm, no weight copy
            lo, n = runs
            flat = x.reshape(n, -1, self.in_features)
            # the whole bank is the parameter itself: a slice of it would cost a zero-filled full-size grad in backward
            w, b = (self.weight, self.bias) if n == self.n_modules else (self.weight[lo:lo + n], self.bias[lo:lo + n])
            y = batched_affine(b.unsqueeze(1), flat, w)
        else:
            w, b = self.gather(self.weight, idx), self.gather(self.bias, idx)
            y = batched_affine(b.unsqueeze(1), x.reshape(C, -1, self.in_features), w)
        # activation before the view: in place on a view would make autograd copy the base in backward
        return ACTIVATIONS[self.activation](y).view(C, *x.shape[1:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"n_modules={self.n_modules}, {self.in_features}->{self.out_features}, {self.activation}"


def linear_stage(in_features: int, out_features: int, activation: str = "relu", init: str = "torch") -> StageFactory:
    return lambda n: BatchedLinear(n, in_features, out_features, activation, init)


def mlp_stages(in_features: int, hidden: Sequence[int], activation: str = "relu", init: str = "torch") -> list[StageFactory]:
    """One linear+activation stage per hidden width."""
    dims = [in_features, *hidden]
    return [linear_stage(dims[i], dims[i + 1], activation, init) for i in range(len(hidden))]


class VmapBank(CaptureMixin, nn.Module):
    """Any stateless ``nn.Module`` (no buffers updated in forward) as a bank via ``torch.func.vmap``.

    Used for stages without a hand-written batched kernel, e.g. transformer blocks. The
    module's ``forward(x, aux)`` (or ``forward(x)`` when ``aux`` is None) must treat the
    leading dimension as the batch.
    """

    def __init__(self, n_modules: int, make: Callable[[], nn.Module]):
        super().__init__()
        self.n_modules = n_modules
        mods = [make() for _ in range(n_modules)]
        self._template = [copy.deepcopy(mods[0]).to("meta")]  # in a list: not a registered submodule
        names = [n for n, _ in mods[0].named_parameters()]
        self._names = names
        self.params = nn.ParameterList(
            [nn.Parameter(torch.stack([dict(m.named_parameters())[n].detach() for m in mods])) for n in names]
        )
        self._buffers_template = {n: b for n, b in mods[0].named_buffers()}

    def _call(self, params: dict[str, Tensor], x: Tensor, aux: Tensor | None) -> Tensor:
        args = (x,) if aux is None else (x, aux)
        return torch.func.functional_call(self._template[0], {**params, **self._buffers_template}, args)

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        C, B = x.shape[:2]
        m = single_module(idx)
        if m is not None and self.capture_tasks is None:
            params = {n: p[m] for n, p in zip(self._names, self.params)}
            y = self._call(params, x.reshape(C * B, *x.shape[2:]), None if aux is None else aux.reshape(C * B, *aux.shape[2:]))
            return y.view(C, B, *y.shape[1:])
        stacked = {n: self.gather(p, idx) for n, p in zip(self._names, self.params)}
        fn = lambda p, xi, ai: self._call(p, xi, ai)  # noqa: E731
        return torch.func.vmap(fn, in_dims=(0, 0, None if aux is None else 0), randomness="different")(stacked, x, aux)

    def train(self, mode: bool = True):
        # the template is not a registered submodule: pass train/eval on (dropout, norms)
        self._template[0].train(mode)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._buffers_template = {n: fn(b) for n, b in self._buffers_template.items()}
        return out


def vmap_stage(make: Callable[[], nn.Module]) -> StageFactory:
    return lambda n: VmapBank(n, make)


class EnsembleBank(nn.Module):
    """E independent copies of a bank, the member folded into the batch dimension.

    Input ``[C, E*B, ...]`` (member-major within each call's rows), output likewise. To
    every network it looks like an ordinary bank, so any architecture method's search
    network becomes an ensemble (SAC's twin critics) without knowing it. Inside, calls
    are laid out member-major so shared modules run as one bmm over the members.
    """

    def __init__(self, n_modules: int, make: StageFactory, ensemble: int):
        super().__init__()
        self.n_modules, self.ensemble = n_modules, ensemble
        self.inner = make(n_modules * ensemble)  # module m of member e at row e*n_modules + m
        self.supports_capture = getattr(self.inner, "supports_capture", False)
        self.capture_tasks: list[int] | None = None

    def module_rows(self, m: int) -> list[int]:
        return [e * self.n_modules + m for e in range(self.ensemble)]

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        E, C = self.ensemble, x.shape[0]
        B = x.shape[1] // E

        def split(t: Tensor) -> Tensor:
            return t.reshape(C, E, B, *t.shape[2:]).transpose(0, 1).reshape(E * C, B, *t.shape[2:])

        inner_idx = [e * self.n_modules + m for e in range(E) for m in idx]
        if self.capture_tasks is not None:
            self.inner.capture_tasks = [t for _ in range(E) for t in self.capture_tasks]
        try:
            y = self.inner(split(x), inner_idx, None if aux is None else split(aux))
        finally:
            if self.capture_tasks is not None:
                self.inner.capture_tasks = None
        return y.reshape(E, C, B, *y.shape[2:]).transpose(0, 1).reshape(C, E * B, *y.shape[2:])


def ensemble_stage(make: StageFactory, ensemble: int) -> StageFactory:
    return lambda n: EnsembleBank(n, make, ensemble)


class TiedStage:
    """A stage factory whose every module copy starts from one set of weights (per ensemble member).

    The authors' code starts every copy of a stage (the shared one, each task's private one,
    each group's) from one pretrained backbone, and Recon rebuilds its task-specific copies
    from the shared ones: a search then compares branch points, not initial draws. The
    template is drawn once from ``seed`` (the process's random state is left as it was), or
    given (``template``: state-dict tensors of ``members`` stacked copies), so every bank a
    search or a retrain builds from this factory starts from the same weights.
    With ``members`` > 1 (an ensemble such as SAC's twin critics, whose banks hold the copies
    member-major: rows ``[e*n/E, (e+1)*n/E)`` belong to member e) each member gets its own
    template, so the members stay independent while each member's copies are tied.
    """

    def __init__(self, factory: StageFactory, seed: int = 0, members: int = 1, template: dict[str, Tensor] | None = None):
        self.factory, self.members = factory, members
        self.name = getattr(factory, "name", "stage") + " (tied)"
        self.residual_shaped = getattr(factory, "residual_shaped", False)
        if template is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                template = {k: v.detach().clone() for k, v in factory(members).state_dict().items()}
        self.template = template

    def __call__(self, n: int) -> nn.Module:
        if n % self.members:
            raise ValueError(f"a tied stage of {self.members} members cannot hold {n} module copies")
        bank = self.factory(n)
        with torch.no_grad():
            for k, v in bank.state_dict().items():  # views of the parameters and buffers
                t = self.template[k]
                if v.shape[:1] != (n,) or t.shape[:1] != (self.members,):
                    raise ValueError(f"tied init needs module-stacked tensors; {k} has shape {tuple(v.shape)}")
                v.copy_(t.repeat_interleave(n // self.members, 0))
        return bank


def tie_stages(stages: Sequence[StageFactory], base_seed: int, members: int = 1) -> list[StageFactory]:
    """:class:`TiedStage` for every stage, stage ``s`` drawn from seed ``base_seed + s``."""
    return [TiedStage(f, base_seed + s, members) for s, f in enumerate(stages)]


def ensemble_input(x: Tensor, ensemble: int, batch_dim: int = 1) -> Tensor:
    """Repeat each call's rows once per member: ``[T, B, ...] -> [T, E*B, ...]``."""
    return torch.cat([x] * ensemble, batch_dim) if ensemble > 1 else x


def ensemble_output(y: Tensor, ensemble: int) -> Tensor:
    """``[T, E*B, ...] -> [E, T, B, ...]``."""
    T = y.shape[0]
    return y.reshape(T, ensemble, -1, *y.shape[2:]).transpose(0, 1)


class _Plan:
    """Which module runs on which stream at every stage, for one input mode."""

    def __init__(self, tree: Tree, shared_input: bool):
        T = tree.n_tasks
        stream = [0] * T if shared_input else list(range(T))
        self.n_in = 1 if shared_input else T
        self.stages = []
        # per stage, the single task on each shared call's input stream (None: several)
        self.shared_call_tasks: list[list[int | None]] = []
        for s, groups in enumerate(tree.stages):
            on_stream: dict[int, list[int]] = {}
            for t in range(T):
                on_stream.setdefault(stream[t], []).append(t)
            shared_groups = [g for g in groups if len(g) > 1]
            specific_groups = [g for g in groups if len(g) == 1]
            calls = {"shared": [], "specific": []}  # (module index, input stream)
            new_stream: dict[int, int] = {}
            keys: dict[tuple, int] = {}
            order: list[tuple] = []
            for kind, kgroups in (("shared", shared_groups), ("specific", specific_groups)):
                for m, g in enumerate(kgroups):
                    for t in g:
                        key = (kind, m, stream[t])
                        if key not in keys:
                            keys[key] = len(order)
                            order.append(key)
                            calls[kind].append((m, stream[t]))
                        new_stream[t] = keys[key]
            passthrough = []
            for t in tree.skips(s):
                key = ("skip", 0, stream[t])
                if key not in keys:
                    keys[key] = len(order)
                    order.append(key)
                    passthrough.append(stream[t])
                new_stream[t] = keys[key]
            self.stages.append((calls["shared"], calls["specific"], passthrough))
            self.shared_call_tasks.append(
                [on_stream[u][0] if len(on_stream[u]) == 1 else None for _, u in calls["shared"]]
            )
            stream = [new_stream[t] for t in range(T)]
        self.final_stream = stream
        # per-task gradients from one backward need every shared call to serve one task
        self.capturable = all(t is not None for calls in self.shared_call_tasks for t in calls)


def _gather(h: Tensor, streams: Sequence[int]) -> Tensor:
    if len(streams) == h.shape[0] and all(i == j for j, i in enumerate(streams)):
        return h
    if all(s == streams[0] for s in streams):
        return h[streams[0]].unsqueeze(0).expand(len(streams), *h.shape[1:])
    return h[torch.as_tensor(list(streams), device=h.device)]


class Trunk(nn.Module):
    """A fixed multi-task network instantiated from a :class:`Tree`.

    Stage ``s`` holds two banks: ``shared[s]`` with one module per group of two or more
    tasks (the parameters that gradient combination and the conflict-noticed operation
    act on) and ``specific[s]`` with one module per single-task group. ``heads`` (a
    factory like the stages') adds one batched module per task at the end.
    """

    def __init__(self, tree: Tree, stages: Sequence[StageFactory], heads: StageFactory | None = None):
        super().__init__()
        if len(stages) != tree.n_stages:
            raise TreeError(
                f"the architecture has {tree.n_stages} stages but the network has {len(stages)}; "
                "derive it for this network or fix the stage count"
            )
        self.tree = tree
        self.shared = nn.ModuleList()
        self.specific = nn.ModuleList()
        for s, groups in enumerate(tree.stages):
            n_sh = sum(1 for g in groups if len(g) > 1)
            n_sp = sum(1 for g in groups if len(g) == 1)
            self.shared.append(stages[s](n_sh) if n_sh else nn.Identity())
            self.specific.append(stages[s](n_sp) if n_sp else nn.Identity())
        self.heads = heads(tree.n_tasks) if heads is not None else None
        self._plans: dict[bool, _Plan] = {}
        self.capture_requested = False  # set by mtrl_arch.conflict.capture_task_grads
        self.captured_ok = False

    @property
    def n_tasks(self) -> int:
        return self.tree.n_tasks

    def plan(self, shared_input: bool) -> _Plan:
        if shared_input not in self._plans:
            self._plans[shared_input] = _Plan(self.tree, shared_input)
        return self._plans[shared_input]

    def features(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        """Per-task trunk outputs ``[T, B, ...]`` (before the heads)."""
        plan = self.plan(shared_input)
        h = x.unsqueeze(0) if shared_input else x
        if aux is not None and shared_input:
            aux = aux.unsqueeze(0)
        if h.shape[0] != plan.n_in:
            raise ValueError(f"expected {plan.n_in} input stream(s) in dim 0, got shape {tuple(x.shape)}")
        capture = self.capture_requested and plan.capturable and all(
            getattr(b, "supports_capture", False) for b in self.shared if not isinstance(b, nn.Identity))
        self.captured_ok = capture
        for s, (calls_sh, calls_sp, passthrough) in enumerate(plan.stages):
            outs, auxs = [], []
            for bank, calls in ((self.shared[s], calls_sh), (self.specific[s], calls_sp)):
                if calls:
                    streams = [c[1] for c in calls]
                    a = None if aux is None else _gather(aux, streams)
                    tasks = plan.shared_call_tasks[s] if capture and bank is self.shared[s] else None
                    outs.append(call_bank(bank, _gather(h, streams), [c[0] for c in calls], a, tasks))
                    if aux is not None:
                        auxs.append(a)
            if passthrough:
                outs.append(_gather(h, passthrough))
                if aux is not None:
                    auxs.append(_gather(aux, passthrough))
            h = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
            if aux is not None:
                aux = auxs[0] if len(auxs) == 1 else torch.cat(auxs, 0)
        return _gather(h, plan.final_stream)

    def forward(self, x: Tensor, shared_input: bool = False, aux: Tensor | None = None) -> Tensor:
        f = self.features(x, shared_input, aux)
        return self.heads(f, list(range(self.n_tasks))) if self.heads is not None else f

    # ---- the parts other components act on -------------------------------------------------
    def shared_groups(self) -> list["ParamGroup"]:
        """One layer group per module used by two or more tasks."""
        out = []
        for s, groups in enumerate(self.tree.stages):
            for m, g in enumerate([g for g in groups if len(g) > 1]):
                out.append(ParamGroup(f"stage{s}" + (f".g{m}" if len(g) < self.n_tasks else ""),
                                      list(self.shared[s].parameters()), module_rows(self.shared[s], m), g))
        return out

    def arch_parameters(self) -> list[nn.Parameter]:
        return []

    def param_counts(self) -> dict[str, int]:
        counts = {"shared": 0, "subgroup": 0, "specific": 0, "heads": 0}
        for s, groups in enumerate(self.tree.stages):
            sh = [g for g in groups if len(g) > 1]
            per_module = _per_module_numel(self.shared[s])
            for g in sh:
                counts[self.tree.kind(g)] += per_module
            counts["specific"] += sum(p.numel() for p in self.specific[s].parameters())
        if self.heads is not None:
            counts["heads"] = sum(p.numel() for p in self.heads.parameters())
        counts["total"] = sum(counts.values())
        return counts


def call_bank(bank: nn.Module, x: Tensor, idx: Sequence[int], aux: Tensor | None, capture_tasks=None) -> Tensor:
    """Run a bank; with ``capture_tasks`` (the task of each call) record per-call parameter leaves."""
    if capture_tasks is None:
        return bank(x, idx, aux)
    bank.capture_tasks = list(capture_tasks)
    try:
        return bank(x, idx, aux)
    finally:
        bank.capture_tasks = None


def _per_module_numel(bank: nn.Module) -> int:
    n = getattr(bank, "n_modules", 0)
    return sum(p.numel() for p in bank.parameters()) // n if n else 0


def module_rows(bank: nn.Module, m: int) -> int | list[int]:
    """The rows of a bank's stacked parameters that hold module ``m`` (several for ensembles)."""
    return bank.module_rows(m) if hasattr(bank, "module_rows") else m


class ParamGroup:
    """One shared module: rows ``index`` of each stacked parameter, used by ``tasks``.

    ``index`` is a row (one module), a list of rows (one module of every ensemble member),
    or None (the whole parameter).
    """

    def __init__(self, name: str, params: list[nn.Parameter], index: int | list[int] | None, tasks: Sequence[int]):
        self.name, self.params, self.tasks = name, params, tuple(tasks)
        self.index = index

    def view(self, p: Tensor, dim: int = 0) -> Tensor:
        """The group's rows of ``p`` (or of ``p``'s dimension ``dim``); a copy for row lists."""
        if self.index is None:
            return p
        if isinstance(self.index, int):
            return p.select(dim, self.index)
        return p.index_select(dim, torch.as_tensor(self.index, device=p.device))

    def numel(self) -> int:
        return sum(self.view(p).numel() for p in self.params)

    def __repr__(self) -> str:
        return f"ParamGroup({self.name}, tasks={self.tasks}, numel={self.numel()})"
