"""Synthetic multi-task problems whose right architecture is known, for tests and benchmarks.

:class:`ConflictProblem` (3 tasks, the known-answer problem)
----------------------------------------------------------
Per-task inputs (``shared_input=False``: every task has its own batch, as in RL and
mixed-task batches) in R^8. Two teachers of k = 6 orthonormal rows, W and U (drawn
independently), and positive readouts v_t define::

    y_A = v_A . relu(W x)      y_B = v_B . relu(W x)      y_C = v_C . relu(U x)

(+ noise 0.1). The trunk is ``n_stages`` = 3 linear+ReLU stages of width 8 = d (every
stage keeps its input's shape, so every stage may be skipped) and a linear head per task.

*A and B must share stage 0 with each other.* They need the same features relu(W x) on
the whole input space (held-out inputs are N(0, I_8)), but each sees only half of it in
training: A's 32 training inputs lie in a random 4-dimensional subspace, B's in its
orthogonal complement. A first layer trained on A's data alone gets no gradient at all on
its weights along B's half, so an A-specific stage 0 cannot be right on held-out inputs
however long it trains; a stage 0 shared by A and B is trained on both halves. The alpha
step of a search sees exactly this, since it uses held-out data.

*C must not share stage 0 with them.* C (1024 training inputs over the whole space) needs
kinks along six other hyperplanes. A shared 8-unit ReLU stage would have to carry 12
hyperplanes for the three tasks, so it serves everyone worse, and per-task gradients on
it pull its units toward different directions (the conflict lives in stage 0). Deeper
stages only carry features on.

Right answer: stage 0 is one module for {A, B} and another for C. Deeper stages: A and B
should keep sharing; whether C joins them there the problem does not decide, and no test
grades it (CoNAL's branch-point space has C task-specific from stage 0: [3, 3, 0]).
Measured, seeds 0-3, 800 Adam steps per tree, held-out MSE:

=======================================  ===========  ===========  ===========
tree                                     A            B            C
=======================================  ===========  ===========  ===========
{A,B} shared, C specific ([3, 3, 0])     0.55-0.93    0.27-0.54    0.038-0.058
single-task                              0.88-1.83    0.99-1.44    0.038-0.058
stage 0 shared by all, then {A,B}, {C}   0.54-1.09    0.32-0.63    0.075-0.126
{A,B} share stage 0 only, then specific  0.41-1.12    0.34-1.05    0.038-0.058
hard sharing                             0.41-1.38    0.30-1.21    0.127-0.271
=======================================  ===========  ===========  ===========

C always pays for a shared stage 0 (2-3x its loss); A and B always need each other at
stage 0; sharing stage 0 with C costs A or B in 6 of 8 seed-task pairs (one tie), and
splitting A from B after stage 0 costs them in 7 of 8. Hard sharing sometimes helps A or
B (C's whole-space data also trains the deeper shared stages) at C's expense.
``c_features='negated'`` uses U = -W instead (C needs the other half-space of A's and B's
projections): sharper gradient conflict, but C's data then also teaches A and B their
hyperplanes, so a shared stage 0 helps them while it hurts C.

Every copy of a stage starts from the same weights (``tied_init``), as when all copies
are initialised from one pretrained backbone (the CoNAL and AdaShare vision experiments)
or in Recon's rebuild ("each task's copy starts from the same initialisation"). Without
it, a search network that mixes the features of independently initialised paths before a
shared head (CoNAL) compares paths whose features are not aligned, and its choices on a
problem this small are noise (measured: no preference for sharing even when every task
agrees).

:func:`many_task_problem` gives T tasks in a few clusters for timing CoNAL-Pro's search
cost per stage (:func:`conal_pro_stage_cost`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .search.base import ArchMethod, TrunkSpec
from .steps import search_step, weight_parameters, weight_step
from .tree import Tree
from .trunk import TiedStage, Trunk, linear_stage
from .update import GradientCombiner

TASKS = ("A", "B", "C")
Batch = tuple[Tensor, Tensor]  # x [T, B, d], y [T, B, 1]


def _linear_template(in_features: int, out_features: int, g: torch.Generator) -> dict[str, Tensor]:
    bound = 1.0 / math.sqrt(in_features)
    return {"weight": torch.empty(1, in_features, out_features).uniform_(-bound, bound, generator=g),
            "bias": torch.empty(1, out_features).uniform_(-bound, bound, generator=g)}


class PerTaskRegression:
    """Shared machinery: per-task train / held-out sets, a trunk spec, losses and batches.

    Subclasses set ``tasks``, ``d`` (input size = trunk width), ``n_stages``, ``seed``,
    ``tied_init`` and the data ``train`` / ``val``: per task, a pair of lists of tensors
    ``x [n_t, d]`` and ``y [n_t, 1]``.
    """

    tasks: tuple[str, ...]
    d: int
    n_stages: int
    seed: int
    tied_init: bool
    train: tuple[list[Tensor], list[Tensor]]
    val: tuple[list[Tensor], list[Tensor]]

    def spec(self, init_seed: int | None = None) -> TrunkSpec:
        """Linear+ReLU stages of width d (all residual-shaped) and a linear head per task."""
        L = self.n_stages
        stages, head = [linear_stage(self.d, self.d, "relu") for _ in range(L)], linear_stage(self.d, 1, "identity")
        if self.tied_init:  # the heads too; nn.Linear-style uniform templates drawn in order from one generator
            g = torch.Generator().manual_seed(1000 + (self.seed if init_seed is None else init_seed))
            stages = [TiedStage(f, template=_linear_template(self.d, self.d, g)) for f in stages]
            head = TiedStage(head, template=_linear_template(self.d, 1, g))
        return TrunkSpec(self.tasks, stages, head, residual=(True,) * L)

    @staticmethod
    def losses(net: nn.Module, batch: Batch) -> Tensor:
        """Per-task mean squared error ``[T]``."""
        x, y = batch
        return ((net(x, shared_input=False) - y) ** 2).mean(dim=(1, 2))

    def batches(self, split: str, batch_size: int, g: torch.Generator) -> Iterator[Batch]:
        """Endless batches of ``batch_size`` samples per task, drawn with replacement from each task's set."""
        xs, ys = self.train if split == "train" else self.val
        sizes = torch.tensor([x.shape[0] for x in xs])
        X = torch.cat(xs)
        Y = torch.cat(ys)
        offsets = torch.cumsum(sizes, 0) - sizes
        while True:
            idx = (torch.rand(len(xs), batch_size, generator=g) * sizes[:, None]).long() + offsets[:, None]
            yield X[idx], Y[idx]

    def full(self, split: str = "val") -> Batch:
        """The whole split as one batch (needs equal sizes per task, true for the held-out sets)."""
        xs, ys = self.train if split == "train" else self.val
        return torch.stack(xs), torch.stack(ys)

    def evaluate(self, net: nn.Module, split: str = "val") -> Tensor:
        was = net.training
        net.eval()
        with torch.no_grad():
            out = self.losses(net, self.full(split))
        net.train(was)
        return out


def _teacher_data(n: int, d: int, W: Tensor, sign: float, v: Tensor, noise: float, g: torch.Generator,
                  basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``n`` samples of y = v . relu(sign * W x) + noise; x ~ N(0, I_d), or N(0, (d/h) I) inside ``basis`` [d, h]."""
    if basis is None:
        x = torch.randn(n, d, generator=g)
    else:
        x = (torch.randn(n, basis.shape[1], generator=g) * math.sqrt(d / basis.shape[1])) @ basis.T
    y = torch.relu(sign * x @ W.T) @ v
    return x, (y + noise * torch.randn(y.shape, generator=g)).unsqueeze(-1)


@dataclass
class ConflictProblem(PerTaskRegression):
    """The known-answer 3-task problem (see the module docstring for the argument)."""

    d: int = 8              # input size = trunk width
    k: int = 6              # teacher features per teacher (2k > d: one ReLU stage cannot carry both teachers)
    n_stages: int = 3
    n_train_ab: int = 32    # training samples for A and for B, each in its own half of the input space
    n_train_c: int = 1024   # training samples for C, whole input space
    n_val: int = 512        # held-out samples per task, whole input space
    noise: float = 0.1
    seed: int = 0
    tied_init: bool = True  # every copy of a stage starts from the same weights
    c_features: str = "independent"  # C's teacher: 'independent' rows U, or 'negated' (-W)

    @property
    def n_tasks(self) -> int:
        return 3

    def planted_tree(self) -> Tree:
        """The answer as one tree: A and B share every stage, C has its own from stage 0 (branch points [L, L, 0]).

        Only stage 0 is argued; of CoNAL's branch-point trees that get it right this is the smallest."""
        points = [self.n_stages, self.n_stages, 0]
        return Tree.from_branch_points(self.tasks, self.n_stages, points, method="planted", meta={"branch_points": points})

    def __post_init__(self) -> None:
        if not self.d // 2 < self.k <= self.d:
            raise ValueError(f"need d/2 < k <= d for the conflict to exist, got d={self.d}, k={self.k}")
        if self.c_features not in ("independent", "negated"):
            raise ValueError(f"c_features must be 'independent' or 'negated', got {self.c_features!r}")
        self.tasks = TASKS
        g = torch.Generator().manual_seed(self.seed)
        W = torch.linalg.qr(torch.randn(self.d, self.d, generator=g))[0][: self.k]
        V = torch.randn(3, self.k, generator=g).abs() + 0.5
        V = 2.0 * V / V.norm(dim=1, keepdim=True)
        half = self.d // 2
        Q = torch.linalg.qr(torch.randn(self.d, self.d, generator=g))[0]
        U = -W if self.c_features == "negated" else torch.linalg.qr(torch.randn(self.d, self.d, generator=g))[0][: self.k]
        self.W, self.U, self.V = W, U, V
        teachers = (W, W, U)
        self.subspaces = (Q[:, :half], Q[:, half:], None)  # where each task's training inputs lie
        n_train = (self.n_train_ab, self.n_train_ab, self.n_train_c)
        tr = [_teacher_data(n_train[t], self.d, teachers[t], 1.0, V[t], self.noise, g, self.subspaces[t]) for t in range(3)]
        va = [_teacher_data(self.n_val, self.d, teachers[t], 1.0, V[t], self.noise, g) for t in range(3)]
        self.train = ([x for x, _ in tr], [y for _, y in tr])
        self.val = ([x for x, _ in va], [y for _, y in va])


@dataclass
class ClusterProblem(PerTaskRegression):
    """T tasks in clusters; made by :func:`many_task_problem`."""

    n_tasks: int = 8
    n_clusters: int = 4
    d: int = 16
    k: int = 0              # teacher features; 0: 3d/4
    n_stages: int = 4
    n_train: int = 256
    n_val: int = 256
    noise: float = 0.1
    seed: int = 0
    tied_init: bool = True

    def __post_init__(self) -> None:
        T, d = self.n_tasks, self.d
        self.k = self.k or max(1, 3 * d // 4)
        self.tasks = tuple(f"t{t:02d}" for t in range(T))
        g = torch.Generator().manual_seed(self.seed)
        n_pairs = (self.n_clusters + 1) // 2
        Ws = [torch.linalg.qr(torch.randn(d, d, generator=g))[0][: self.k] for _ in range(n_pairs)]
        self.cluster_of = tuple(t % self.n_clusters for t in range(T))
        tr, va = [], []
        for t in range(T):
            c = self.cluster_of[t]
            W, sign = Ws[c // 2], (1.0 if c % 2 == 0 else -1.0)
            v = torch.randn(self.k, generator=g).abs() + 0.5
            v = 2.0 * v / v.norm()
            tr.append(_teacher_data(self.n_train, d, W, sign, v, self.noise, g))
            va.append(_teacher_data(self.n_val, d, W, sign, v, self.noise, g))
        self.train = ([x for x, _ in tr], [y for _, y in tr])
        self.val = ([x for x, _ in va], [y for _, y in va])


def many_task_problem(n_tasks: int, n_clusters: int = 4, d: int = 16, n_stages: int = 4, n_train: int = 256,
                      seed: int = 0, **kw) -> ClusterProblem:
    """``n_tasks`` regression tasks (per-task inputs) in ``n_clusters`` clusters, tasks assigned round-robin.

    Clusters 2i and 2i+1 use one teacher W_i with opposite signs (relu(W_i x) vs relu(-W_i x),
    the conflict of :class:`ConflictProblem`); different pairs use independent teachers.
    Tasks in one cluster differ only by their positive readouts. Built for measuring search
    cost, not for a known answer.
    """
    return ClusterProblem(n_tasks=n_tasks, n_clusters=n_clusters, d=d, n_stages=n_stages, n_train=n_train, seed=seed, **kw)


def run_search(method: ArchMethod, problem: PerTaskRegression, steps: int = 1000, batch_size: int = 64,
               lr: float = 3e-3, combiner: GradientCombiner | None = None, seed: int = 0,
               val_batch_size: int = 256) -> nn.Module:
    """Search ``steps`` steps on the problem (Adam on the weights), return the search network.

    Every step calls :func:`~mtrl_arch.steps.search_step` with one training batch and one
    held-out batch per task; the method's ``phase`` decides what is updated.
    """
    torch.manual_seed(seed)
    net = method.build()
    from .weighting import make_weighting

    combiner = combiner or GradientCombiner(make_weighting("ew", n_tasks=len(problem.tasks)))
    opt = torch.optim.Adam(weight_parameters(net), lr=lr)
    g = torch.Generator().manual_seed(seed)
    train, val = problem.batches("train", batch_size, g), problem.batches("val", val_batch_size, g)
    for step in range(steps):
        search_step(method, net, next(train), next(val), problem.losses, combiner, opt, step)
    return net


def train_tree(tree: Tree, problem: PerTaskRegression, steps: int = 800, batch_size: int = 64, lr: float = 3e-3,
               seed: int = 0) -> nn.Module:
    """Retrain a fixed tree from scratch on the training sets; evaluate it with ``problem.evaluate``.

    Every tree starts from the problem's tied templates (the same weights for every copy of a
    stage, the same for every tree) and sees the same batches for a given ``seed``, so trees
    are compared on their structure alone: a task whose modules are all its own follows the
    same path in any tree (equal weighting sums the per-task losses, and Adam is elementwise).
    """
    spec = problem.spec()
    torch.manual_seed(seed)
    net = Trunk(tree, spec.stages, spec.heads)
    from .weighting import make_weighting

    combiner = GradientCombiner(make_weighting("ew", n_tasks=len(problem.tasks)))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    train = problem.batches("train", batch_size, torch.Generator().manual_seed(seed))
    for step in range(steps):
        weight_step(net, next(train), problem.losses, combiner, opt, step)
    return net


def conal_pro_stage_cost(n_tasks_list: Sequence[int] = (4, 8, 16, 32), steps: int = 20, batch_size: int = 64,
                         n_stages: int = 4, d: int = 16, conflict_noticed: bool = False, seed: int = 0) -> dict:
    """Wall-clock cost of CoNAL-Pro's search per stage, for each number of tasks.

    For each T: a :func:`many_task_problem`, CoNAL-Pro with ``steps_per_stage=steps``, and
    ``n_stages * steps`` search steps (every stage of the schedule); reports the mean
    milliseconds per search step of each stage (the first step of a stage is not timed),
    and the same for CoNAL's full branch-point search network as the reference whose cost
    grows with T x P. Returns ``{T: {"conal_pro_ms": [per stage, deep to shallow],
    "conal_ms": float, "search_params": int}}``.
    """
    from .search import make_method
    from .weighting import make_weighting

    out: dict = {}
    for T in n_tasks_list:
        problem = many_task_problem(T, d=d, n_stages=n_stages, seed=seed)
        row: dict = {}
        for name, opts in (("conal_pro", {"steps_per_stage": steps}), ("conal", {})):
            method = make_method(name, problem.spec(), opts, seed=seed)
            torch.manual_seed(seed)
            net = method.build()
            combiner = GradientCombiner(make_weighting("ew", n_tasks=T), conflict_noticed=conflict_noticed)
            opt = torch.optim.Adam(weight_parameters(net), lr=1e-3)
            g = torch.Generator().manual_seed(seed)
            train, val = problem.batches("train", batch_size, g), problem.batches("val", batch_size, g)
            n_blocks = n_stages if name == "conal_pro" else 1
            per_block = []
            step = 0
            for _ in range(n_blocks):
                times = []
                for i in range(steps):
                    tb, vb = next(train), next(val)
                    t0 = time.perf_counter()
                    search_step(method, net, tb, vb, problem.losses, combiner, opt, step)
                    if i > 0:
                        times.append(time.perf_counter() - t0)
                    step += 1
                per_block.append(1000 * sum(times) / max(len(times), 1))
            if name == "conal_pro":
                row["conal_pro_ms"] = per_block
                row["search_params"] = sum(p.numel() for p in net.parameters())
            else:
                row["conal_ms"] = per_block[0]
        out[T] = row
    return out
