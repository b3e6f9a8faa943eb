"""Multi-task loss / gradient weighting, independent of the architecture.

Methods follow LibMTL (``LibMTL/weighting/``), rewritten against one small interface::

    w = make_weighting("pcgrad", n_tasks=T, seed=0)
    total = w.loss(losses)            # losses: [T] per-task losses (with graph) -> scalar
    total.backward()                  # grads for everything that is not combined below
    if w.needs_task_grads:
        g = w.combine(G)              # G: [T, P] per-task grads of the flat shared params -> [P]
    w.parameters()                    # extra learnable tensors (UW), add them to the optimiser
    w.end_epoch(epoch_losses)         # [T] mean per-task loss of the finished epoch (DWA)
    w.state_dict() / w.load_state_dict(d)

Scale convention: everything is on the scale of the MEAN over tasks, not the sum (LibMTL
sums). EW: ``loss = losses.mean()``, ``combine(G) = G.mean(0)``. Loss weightings return
``sum(c * losses)`` with coefficients ``c`` summing to 1 for EW/RLW/DWA (UW's are learnt),
and ``combine(G) = c @ G`` is the shared-parameter gradient of that same loss. Gradient methods
return ``loss = losses.mean()`` (task-specific parameters get the EW gradient, as in LibMTL)
and a combined vector on the mean scale: PCGrad / GradVac / GradDrop / Aligned-MTL / Nash-MTL
divide LibMTL's sum by T; MGDA's min-norm point and IMTL-G's affine combination (weights sum
to 1) are already on it; CAGrad is LibMTL's ``g0 + lambda g_w`` (rescaled by ``1/(1+c^2)``),
which is ``G.mean(0)`` at ``c=0``. With one task every gradient method returns ``G[0]``.

Gradient methods run on G's device; only MGDA, CAGrad and Nash-MTL move the T x T Gram matrix
``G G^T`` to CPU numpy for their solvers. Random methods (RLW, PCGrad, GradDrop, GradVac) draw
from their own ``torch.Generator`` seeded by the ``seed`` option; RNG state is not checkpointed.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn

from .errors import ConfigError
from .options import parse_options


class Weighting:
    """Equal weighting (EW): ``loss = losses.mean()``, ``combine(G) = G.mean(0)``; base class."""
    needs_task_grads: bool = False

    def __init__(self, n_tasks: int) -> None:
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self.n_tasks = n_tasks
        self.last_losses: Tensor | None = None   # detached losses of the latest loss() call
        self.last_weights: Tensor | None = None  # coefficients c of the latest loss = sum(c*L)

    def coeffs(self, losses: Tensor) -> Tensor:
        """Coefficients c with ``loss = sum(c * losses)`` (+ a regulariser for UW)."""
        return torch.full_like(losses, 1.0 / self.n_tasks)

    def loss(self, losses: Tensor) -> Tensor:
        if losses.shape != (self.n_tasks,):
            raise ValueError(f"losses must have shape [{self.n_tasks}], got {list(losses.shape)}")
        self.last_losses = losses.detach()
        c = self.coeffs(losses)
        self.last_weights = c.detach()
        return (c * losses).sum()

    def _check(self, G: Tensor) -> None:
        if G.dim() != 2 or G.shape[0] != self.n_tasks:
            raise ValueError(f"G must have shape [{self.n_tasks}, P], got {list(G.shape)}")

    def combine(self, G: Tensor) -> Tensor:
        """Shared-parameter gradient of the latest ``loss()`` (EW weights before any call)."""
        self._check(G)
        c = self.last_weights
        if c is None:
            c = torch.full((self.n_tasks,), 1.0 / self.n_tasks)
        return c.to(G) @ G

    def parameters(self) -> list[Tensor]:
        return []

    def to(self, device: torch.device | str) -> "Weighting":
        """Move learnable tensors in place (same objects, so optimiser references stay valid)."""
        for p in self.parameters():
            p.data = p.data.to(device)
        return self

    def end_epoch(self, epoch_losses: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass


EW = Weighting


class RLW(Weighting):
    """Random Loss Weighting, Lin et al., "Reasonable Effectiveness of Random Weighting" (TMLR 2022)."""

    def __init__(self, n_tasks: int, *, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self.gen = torch.Generator().manual_seed(seed)

    def coeffs(self, losses: Tensor) -> Tensor:
        return torch.softmax(torch.randn(self.n_tasks, generator=self.gen), 0).to(losses)


class UW(Weighting):
    """UW, Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses..." (CVPR 2018)."""

    def __init__(self, n_tasks: int, *, init: float = 0.0) -> None:
        super().__init__(n_tasks)
        self.s = nn.Parameter(torch.full((n_tasks,), float(init)))  # log-variances

    def coeffs(self, losses: Tensor) -> Tensor:
        if self.s.device != losses.device:
            self.to(losses.device)
        return 1.0 / (2 * self.n_tasks * self.s.exp())

    def loss(self, losses: Tensor) -> Tensor:  # mean(L / (2 exp(s)) + s / 2)
        return super().loss(losses) + self.s.sum() / (2 * self.n_tasks)

    def parameters(self) -> list[Tensor]:
        return [self.s]

    def state_dict(self) -> dict[str, Any]:
        return {"s": self.s.detach().clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.s.data.copy_(d["s"])


class DWA(Weighting):
    """Dynamic Weight Average, Liu et al., "End-to-End Multi-Task Learning with Attention" (CVPR 2019)."""

    def __init__(self, n_tasks: int, *, temp: float = 2.0) -> None:
        super().__init__(n_tasks)
        self.temp = temp
        self.history: list[Tensor] = []  # last two epochs' mean losses, oldest first

    def coeffs(self, losses: Tensor) -> Tensor:
        if len(self.history) < 2:
            return torch.full_like(losses, 1.0 / self.n_tasks)
        r = self.history[-1] / self.history[-2]
        return torch.softmax(r / self.temp, 0).to(losses)  # = (T softmax(r/temp)) / T

    def end_epoch(self, epoch_losses: Tensor) -> None:
        if epoch_losses.shape != (self.n_tasks,):
            raise ValueError(f"epoch_losses must have shape [{self.n_tasks}], got {list(epoch_losses.shape)}")
        self.history = (self.history + [epoch_losses.detach().double().cpu()])[-2:]

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.clone() for h in self.history]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.history = [torch.as_tensor(h).double().cpu() for h in d["history"]][-2:]


class GradWeighting(Weighting):
    """Base of gradient methods: ``loss`` is EW, ``combine`` maps [T, P] -> [P]."""
    needs_task_grads = True

    def combine(self, G: Tensor) -> Tensor:
        self._check(G)
        if self.n_tasks == 1:
            return G[0].clone()
        low = G.dtype in (torch.float16, torch.bfloat16)  # solve in float32, return in G's dtype
        return self._combine(G.float()).to(G.dtype) if low else self._combine(G)

    def _combine(self, G: Tensor) -> Tensor:
        raise NotImplementedError


def _device_gen(gen: torch.Generator | None, device: torch.device, seed: int) -> torch.Generator:
    if gen is None or gen.device != device:
        gen = torch.Generator(device=device).manual_seed(seed)
    return gen


class PCGrad(GradWeighting):
    """PCGrad, Yu et al., "Gradient Surgery for Multi-Task Learning" (NeurIPS 2020)."""

    def __init__(self, n_tasks: int, *, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self.gen = torch.Generator().manual_seed(seed)

    def _combine(self, G: Tensor) -> Tensor:
        sq = (G * G).sum(1).clamp_min(1e-20)
        pc = G.clone()
        for i in range(self.n_tasks):  # as LibMTL: every j (self included), against ORIGINAL g_j
            for j in torch.randperm(self.n_tasks, generator=self.gen).tolist():
                pc[i] -= (pc[i] @ G[j]).clamp(max=0) / sq[j] * G[j]  # only when pc_i . g_j < 0
        return pc.mean(0)


class GradDrop(GradWeighting):
    """GradDrop, Chen et al., "Just Pick a Sign: ... Gradient Sign Dropout" (NeurIPS 2020).

    LibMTL's rule applied per coordinate of G: purity ``P = (1 + sum_t G / sum_t |G|) / 2``,
    ``U ~ U[0,1)``; task t keeps its coordinate if (P > U and G_t > 0) or (P < U and G_t < 0),
    else it is scaled by ``leak``. Output is the mean over tasks of the masked rows.
    """

    def __init__(self, n_tasks: int, *, leak: float = 0.0, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self.leak, self.seed, self.gen = leak, seed, None

    def _combine(self, G: Tensor) -> Tensor:
        self.gen = _device_gen(self.gen, G.device, self.seed)
        P = 0.5 * (1 + G.sum(0) / (G.abs().sum(0) + 1e-7))
        U = torch.rand(P.shape, generator=self.gen, device=G.device, dtype=P.dtype)
        M = ((P > U) & (G > 0)) | ((P < U) & (G < 0))
        return (G * (self.leak + (1 - self.leak) * M.to(G.dtype))).mean(0)


class CAGrad(GradWeighting):
    """CAGrad, Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021).

    ``d = g0 + c |g0| g_w / |g_w|`` with ``w = argmin_{simplex} g_w.g0 + c |g0| |g_w|`` (SLSQP on the
    Gram matrix, normalised by ``|g0|^2`` which leaves w unchanged); ``rescale`` 0: d, 1: d/(1+c^2),
    2: d/(1+c).
    """

    def __init__(self, n_tasks: int, *, c: float = 0.5, rescale: int = 1) -> None:
        super().__init__(n_tasks)
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
        self.c, self.rescale = c, rescale
        self.last_w: np.ndarray | None = None

    def _combine(self, G: Tensor) -> Tensor:
        g0 = G.mean(0)
        A = (G @ G.T).detach().cpu().double().numpy()
        s = A.mean()  # |g0|^2
        if self.c == 0 or s <= 0:
            return g0
        A, b, c, T = A / s, np.full(self.n_tasks, 1.0 / self.n_tasks), self.c, self.n_tasks
        res = minimize(lambda x: x @ A @ b + c * np.sqrt(x @ A @ x + 1e-8), b, bounds=[(0.0, 1.0)] * T,
                       constraints={"type": "eq", "fun": lambda x: 1.0 - x.sum()})
        self.last_w = res.x
        gw = torch.as_tensor(res.x, dtype=G.dtype, device=G.device) @ G
        d = g0 + (c * float(np.sqrt(s))) / (gw.norm() + 1e-8) * gw
        return d / (1.0, 1.0 + c ** 2, 1.0 + c)[self.rescale]


def _min_norm_2(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """argmin_gamma |gamma v1 + (1-gamma) v2|^2 on [0,1] and its cost (exact ends, LibMTL uses .999/.001)."""
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    gamma = (v22 - v12) / (v11 + v22 - 2 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def _proj_simplex(y: np.ndarray) -> np.ndarray:  # Euclidean projection onto the simplex
    css = np.cumsum(np.sort(y)[::-1]) - 1.0
    k = np.nonzero(np.sort(y)[::-1] - css / np.arange(1, len(y) + 1) > 0)[0][-1]
    return np.maximum(y - css[k] / (k + 1), 0.0)


def _next_point(x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    proj = grad - grad.sum() / len(x)
    tm1 = -x[proj < 0] / proj[proj < 0]
    tm2 = (1.0 - x[proj > 0]) / proj[proj > 0]
    tm1, tm2 = tm1[tm1 > 1e-7], tm2[tm2 > 1e-7]
    t = np.concatenate([tm1, tm2, [] if len(tm1) else [1.0]]).min()
    return _proj_simplex(proj * t + x)


def min_norm_weights(M: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """MGDA's MinNormSolver on the Gram matrix M = G G^T: simplex weights of the min-norm point."""
    T = len(M)
    best, x = np.inf, np.zeros(T)
    for i in range(T):
        for j in range(i + 1, T):
            gamma, cost = _min_norm_2(M[i, i], M[i, j], M[j, j])
            if cost < best:
                best, x = cost, np.zeros(T)
                x[i], x[j] = gamma, 1.0 - gamma
    if T < 3:
        return x
    for _ in range(max_iter):
        y = _next_point(x, -M @ x)
        gamma, _ = _min_norm_2(x @ M @ x, x @ M @ y, y @ M @ y)
        new = gamma * x + (1 - gamma) * y
        if np.abs(new - x).sum() < tol:
            return new
        x = new
    return x


class MGDA(GradWeighting):
    """MGDA-UB, Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018).

    Returns the min-norm convex combination of the (normalised) task gradients. ``normalize``:
    "none", "l2" (g/|g|), "loss" (g/L) or "loss+" (g/(L|g|)), losses from this step's ``loss()``.
    """

    def __init__(self, n_tasks: int, *, normalize: Literal["none", "l2", "loss", "loss+"] = "none") -> None:
        super().__init__(n_tasks)
        if normalize not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"mgda: normalize must be one of none, l2, loss, loss+; got {normalize!r}")
        self.normalize = normalize
        self.last_alpha: Tensor | None = None

    def _combine(self, G: Tensor) -> Tensor:
        if self.normalize != "none":
            if self.normalize.startswith("loss") and self.last_losses is None:
                raise RuntimeError(f"mgda normalize={self.normalize!r} needs w.loss(losses) before combine")
            gn = G.norm(dim=1) if self.normalize == "l2" else self.last_losses.to(G)
            if self.normalize == "loss+":
                gn = gn * G.norm(dim=1)
            G = G / gn.clamp_min(1e-12)[:, None]
        alpha = min_norm_weights((G @ G.T).detach().cpu().double().numpy())
        self.last_alpha = torch.as_tensor(alpha, dtype=G.dtype, device=G.device)
        return self.last_alpha @ G


class IMTL(GradWeighting):
    """IMTL-G, Liu et al., "Towards Impartial Multi-task Learning" (ICLR 2021).

    Closed form: the affine combination (weights sum to 1) with equal projections on every
    unit task gradient. Uses a pseudo-inverse, so identical task gradients do not break it.
    """

    def _combine(self, G: Tensor) -> Tensor:
        u = G / G.norm(dim=1, keepdim=True).clamp_min(1e-12)
        D, U = G[:1] - G[1:], u[:1] - u[1:]
        a = (G[0] @ U.T) @ torch.linalg.pinv(D @ U.T)
        self.last_alpha = torch.cat([1 - a.sum(0, keepdim=True), a])
        return self.last_alpha @ G


class NashMTL(GradWeighting):
    """Nash-MTL, Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022).

    Solves ``K a = 1/a`` (a > 0) with ``K = G G^T / ||G G^T||_F`` as the stationary point of
    ``0.5 a^T K a - sum(log a)`` in ``u = log a`` (scipy trust-exact, at most ``optim_niter``
    iterations, warm-started). ``self.alpha = a / sqrt(||G G^T||_F)`` solves the raw system
    ``(G G^T alpha) * alpha = 1``. Output ``(a @ G) / T`` (LibMTL's weights over T), then
    clipped to norm ``max_norm`` when ``max_norm > 0`` (LibMTL clips the shared gradient).
    """

    def __init__(self, n_tasks: int, *, max_norm: float = 1.0, optim_niter: int = 20) -> None:
        super().__init__(n_tasks)
        self.max_norm, self.optim_niter = max_norm, optim_niter
        self.prev = np.ones(n_tasks)
        self.alpha: Tensor | None = None

    def _solve(self, K: np.ndarray) -> np.ndarray:
        def f(u: np.ndarray) -> tuple[float, np.ndarray]:
            a = np.exp(np.clip(u, -50.0, 50.0))
            Ka = K @ a
            return 0.5 * a @ Ka - u.sum(), a * Ka - 1.0

        def hess(u: np.ndarray) -> np.ndarray:
            a = np.exp(np.clip(u, -50.0, 50.0))
            return np.diag(a * (K @ a)) + np.outer(a, a) * K

        def resid(a: np.ndarray) -> float:
            return float(np.linalg.norm(a * (K @ a) - 1.0))

        try:  # like LibMTL: if the solve fails or is unbounded (g_i can cancel), keep the previous alpha
            res = minimize(f, np.log(self.prev), jac=True, hess=hess, method="trust-exact",
                           options={"maxiter": self.optim_niter, "gtol": 1e-8})
            a = np.exp(np.clip(res.x, -30.0, 30.0))
        except Exception:  # scipy's trust-exact can raise on degenerate Hessians
            a = self.prev
        r = resid(a)
        if np.isfinite(r) and (r < 1e-3 or r < resid(self.prev)):
            self.prev = a
        return self.prev

    def _combine(self, G: Tensor) -> Tensor:
        GG = (G @ G.T).detach().cpu().double().numpy()
        f = np.linalg.norm(GG)
        if not np.isfinite(f) or f <= 0:
            return torch.zeros_like(G[0])
        a = self._solve(GG / f)
        self.alpha = torch.as_tensor(a / np.sqrt(f), dtype=G.dtype, device=G.device)
        d = torch.as_tensor(a, dtype=G.dtype, device=G.device) @ G / self.n_tasks
        if self.max_norm > 0:
            d = d * (self.max_norm / (d.norm() + 1e-6)).clamp(max=1.0)
        return d

    def state_dict(self) -> dict[str, Any]:
        return {"prev_alpha": torch.from_numpy(self.prev.copy())}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.prev = torch.as_tensor(d["prev_alpha"]).double().numpy().copy()


class GradVac(GradWeighting):
    """GradVac, Wang et al., "Gradient Vaccine: ... Multi-task Optimization in ... Multilingual Models" (ICLR 2021).

    Whole-vector granularity. For each pair (i, j != i, random order) with cosine
    ``rho(g_i', g_j) < rho_T[i, j]``, add ``w g_j`` so the cosine reaches the target; the target
    is an EMA ``rho_T <- (1-beta) rho_T + beta rho`` updated for every pair, as in the paper
    (LibMTL updates it only when the correction fires). Output: mean of corrected rows.
    """

    def __init__(self, n_tasks: int, *, beta: float = 0.5, seed: int = 0) -> None:
        super().__init__(n_tasks)
        self.beta = beta
        self.gen = torch.Generator().manual_seed(seed)
        self.rho_T = torch.zeros(n_tasks, n_tasks)

    def _combine(self, G: Tensor) -> Tensor:
        T, b = self.n_tasks, self.beta
        rho_T = self.rho_T.to(G)
        norms = G.norm(dim=1)
        pc = G.clone()
        for i in range(T):
            for j in [j for j in torch.randperm(T, generator=self.gen).tolist() if j != i]:
                ni, rt = pc[i].norm(), rho_T[i, j]
                rho = ((pc[i] @ G[j]) / (ni * norms[j] + 1e-8)).clamp(-1.0, 1.0)
                st = (1 - rt ** 2).sqrt()
                w = ni * (rt * (1 - rho ** 2).sqrt() - rho * st) / (norms[j] * st + 1e-8)
                pc[i] += torch.where(rho < rt, w, torch.zeros_like(w)) * G[j]
                rho_T[i, j] = (1 - b) * rt + b * rho
        self.rho_T = rho_T
        return pc.mean(0)

    def state_dict(self) -> dict[str, Any]:
        return {"rho_T": self.rho_T.detach().cpu().clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.rho_T = torch.as_tensor(d["rho_T"]).clone()


class AlignedMTL(GradWeighting):
    """Aligned-MTL, Senushkin et al., "Independent Component Alignment for Multi-Task Learning" (CVPR 2023).

    ``B = sqrt(lambda_min) V Sigma^-1 V^T`` from ``eigh(G G^T)`` over the eigenvalues above
    LibMTL's rank tolerance; output ``(B.sum(0) @ G) / T``.
    """

    def _combine(self, G: Tensor) -> Tensor:
        lam, V = torch.linalg.eigh(G @ G.T)
        keep = lam > lam.max() * self.n_tasks * torch.finfo(lam.dtype).eps
        inv = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
        lam_min = torch.where(keep, lam, torch.full_like(lam, torch.inf)).min()
        lam_min = torch.where(keep.any(), lam_min, torch.zeros_like(lam_min))
        self.last_alpha = (lam_min.sqrt() * (V * inv) @ V.T).sum(0)
        return self.last_alpha @ G / self.n_tasks


REGISTRY: dict[str, type[Weighting]] = {
    "ew": EW, "rlw": RLW, "uw": UW, "dwa": DWA,
    "pcgrad": PCGrad, "graddrop": GradDrop, "cagrad": CAGrad, "mgda": MGDA, "imtl": IMTL,
    "nash_mtl": NashMTL, "gradvac": GradVac, "aligned_mtl": AlignedMTL,
}


def _options_class(cls: type) -> type:
    """A weighting's keyword-only ``__init__`` arguments as a dataclass, for :func:`~.options.parse_options`."""
    hints = typing.get_type_hints(cls.__init__)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    return dataclasses.make_dataclass(f"{cls.__name__}Options",
                                      [(p.name, hints.get(p.name, Any), dataclasses.field(default=p.default)) for p in params])


OPTIONS: dict[str, type] = {k: _options_class(c) for k, c in REGISTRY.items()}
WEIGHTING_OPTIONS: dict[str, dict[str, Any]] = {k: dataclasses.asdict(o()) for k, o in OPTIONS.items()}


def make_weighting(name: str, n_tasks: int, **options: Any) -> Weighting:
    """Build a registry entry; an unknown name, an unknown option or a wrong type raises a one-line ConfigError."""
    key = name.lower()
    if key not in REGISTRY:
        raise ConfigError(f"unknown weighting {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[key](n_tasks, **vars(parse_options(OPTIONS[key], options, "weighting.options")))
