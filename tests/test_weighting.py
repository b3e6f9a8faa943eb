"""Hand-checked answers for mtrl_arch.weighting (mean-over-tasks scale throughout)."""
from __future__ import annotations

import math

import pytest
import torch

from mtrl_arch.config import ConfigError
from mtrl_arch.weighting import REGISTRY, WEIGHTING_OPTIONS, make_weighting

GRAD_METHODS = {"pcgrad", "graddrop", "cagrad", "mgda", "imtl", "nash_mtl", "gradvac", "aligned_mtl"}


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def assert_near(a: torch.Tensor, b, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def test_ew() -> None:
    w = make_weighting("ew", 3)
    L = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    assert_near(w.loss(L), 3.0)
    G = torch.randn(3, 5, dtype=torch.float64)
    assert_near(w.combine(G), G.mean(0))
    assert not w.needs_task_grads and w.parameters() == []


def test_pcgrad_conflicting_by_hand() -> None:
    # g1.g2 = -1: g1' = g1 + 0.5 g2 = [0.5, 0.5]; g2' = g2 + g1 = [0, 1]; mean = [0.25, 0.75]
    G = t([1.0, 0.0], [-1.0, 1.0])
    for seed in range(4):
        assert_near(make_weighting("pcgrad", 2, seed=seed).combine(G), [0.25, 0.75])


def test_pcgrad_no_conflict_is_mean() -> None:
    G = t([1.0, 2.0, 0.0], [0.5, 0.1, 3.0], [2.0, 0.0, 1.0])  # all pairwise dots > 0
    assert_near(make_weighting("pcgrad", 3).combine(G), G.mean(0))


def test_mgda_two_tasks_closed_form() -> None:
    assert_near(make_weighting("mgda", 2).combine(t([1.0, 0.0], [0.0, 1.0])), [0.5, 0.5])
    g = torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g1, g2 = g
    gamma = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
    assert_near(make_weighting("mgda", 2).combine(g), gamma * g1 + (1 - gamma) * g2)
    # one gradient inside the other's "shadow": min-norm point is the shorter one itself
    assert_near(make_weighting("mgda", 2).combine(t([1.0, 0.0], [3.0, 1.0])), [1.0, 0.0])


def test_mgda_three_tasks_is_min_norm() -> None:
    # G = I_3: min-norm point of the simplex is the centroid [1/3]*3; KKT: g_i.d >= |d|^2 for all i
    assert_near(make_weighting("mgda", 3).combine(torch.eye(3, dtype=torch.float64)), [1 / 3] * 3, atol=1e-4)
    G = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = make_weighting("mgda", 4)
    d = w.combine(G)
    assert (G @ d >= d @ d - 1e-4).all()
    assert_near(w.last_alpha.sum(), 1.0)
    assert (w.last_alpha >= 0).all()


def test_mgda_loss_normalisation() -> None:
    w = make_weighting("mgda", 2, normalize="loss")
    w.loss(torch.tensor([2.0, 4.0], dtype=torch.float64))
    # normalised grads [0.5,0] and [0,0.25]; min-norm gamma = 0.0625/0.3125 = 0.2 -> [0.1, 0.2]
    assert_near(w.combine(t([1.0, 0.0], [0.0, 1.0])), [0.1, 0.2])


def test_cagrad_c0_is_mean() -> None:
    G = torch.randn(3, 5, dtype=torch.float64)
    assert_near(make_weighting("cagrad", 3, c=0.0).combine(G), G.mean(0))


def test_cagrad_maximises_worst_task_improvement() -> None:
    G = t([1.0, 0.0], [-2.0, 1.0])
    g0 = G.mean(0)
    d = make_weighting("cagrad", 2, c=0.5, rescale=0).combine(G)
    r = 0.5 * g0.norm()
    assert abs((d - g0).norm() - r) < 1e-4  # on the ball's boundary
    assert (G @ d).min() > (G @ g0).min() + 0.1  # mean: g1.g0 = -0.5
    # brute force max over the ball of min_i g_i.d
    th = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    rad = torch.linspace(0, 1, 101, dtype=torch.float64)
    pts = g0 + r * rad[:, None, None] * torch.stack([th.cos(), th.sin()], -1)[None]
    best = (pts @ G.T).min(-1).values.max()
    assert abs((G @ d).min() - best) < 1e-3
    d1 = make_weighting("cagrad", 2, c=0.5).combine(G)  # default rescale=1: d / (1 + c^2)
    assert_near(d1, d / 1.25, atol=1e-6)


def test_imtl_equal_projections() -> None:
    G = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = make_weighting("imtl", 4)
    d = w.combine(G)
    proj = (G / G.norm(dim=1, keepdim=True)) @ d
    assert_near(proj, proj[0].expand(4), atol=1e-8)
    assert_near(w.last_alpha.sum(), 1.0)
    assert_near(make_weighting("imtl", 2).combine(t([2.0, 0.0], [0.0, 2.0])), [1.0, 1.0])


def test_nash_mtl_bargaining_solution() -> None:
    G = t([1.0, 0.0, 0.5], [-0.3, 2.0, 0.0])
    w = make_weighting("nash_mtl", 2, max_norm=0.0)
    d = w.combine(G)
    a = w.alpha
    assert_near((G @ G.T @ a) * a, [1.0, 1.0], atol=1e-6)
    # combined = (sqrt(||GG^T||_F) * alpha) @ G / T
    assert_near(d, math.sqrt(torch.linalg.matrix_norm(G @ G.T)) * a @ G / 2)
    # max_norm clips the output norm
    assert make_weighting("nash_mtl", 2, max_norm=0.1).combine(G).norm() <= 0.1 + 1e-9
    # orthogonal unit grads: alpha = 1 each
    w2 = make_weighting("nash_mtl", 2)
    w2.combine(t([1.0, 0.0], [0.0, 1.0]))
    assert_near(w2.alpha, [1.0, 1.0], atol=1e-6)


def test_graddrop_properties() -> None:
    G = t([1.0, -2.0, 3.0, -1.0, 0.5], [2.0, -1.0, -1.0, 2.0, 0.0], [0.5, -0.5, 1.0, -3.0, 0.0])
    for seed in range(5):
        d = make_weighting("graddrop", 3, seed=seed).combine(G)
        assert_near(d[:2], G[:, :2].mean(0))  # tasks agree in sign: every row kept -> mean
        # leak 0: each coordinate is (sum of positive entries)/T or (sum of negative entries)/T
        pos, neg = G.clamp(min=0).sum(0) / 3, G.clamp(max=0).sum(0) / 3
        assert ((d - pos).abs().lt(1e-12) | (d - neg).abs().lt(1e-12)).all()
    assert_near(make_weighting("graddrop", 3, leak=1.0).combine(G), G.mean(0))  # leak 1: nothing dropped


def test_gradvac_first_step_is_pcgrad_then_ema() -> None:
    G = t([1.0, 0.0], [-1.0, 1.0])
    w = make_weighting("gradvac", 2, beta=0.5)
    assert_near(w.combine(G), [0.25, 0.75])  # target cosine 0 -> exactly the PCGrad projection
    cos = -1 / math.sqrt(2)
    assert_near(w.state_dict()["rho_T"], [[0.0, 0.5 * cos], [0.5 * cos, 0.0]])
    # non-conflicting pair with cosine above the target: unchanged -> mean
    G2 = t([1.0, 0.0], [1.0, 1.0])
    assert_near(make_weighting("gradvac", 2).combine(G2), G2.mean(0))


def test_aligned_mtl() -> None:
    # orthogonal grads with norms 1 and 2: B = sqrt(1) diag(1, 1/2) -> alpha = [1, .5], d = [1,1]/2
    assert_near(make_weighting("aligned_mtl", 2).combine(t([1.0, 0.0], [0.0, 2.0])), [0.5, 0.5])
    # G = U S Vh: aligned rows B G = s_min U Vh (all singular values s_min), d = 1^T B G / T
    G = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    d = make_weighting("aligned_mtl", 3).combine(G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    assert_near(d, S.min() * (U @ Vh).sum(0) / 3, atol=1e-8)


def test_uw_gradient() -> None:
    w = make_weighting("uw", 2)
    assert len(w.parameters()) == 1
    with torch.no_grad():
        w.parameters()[0].copy_(torch.tensor([0.3, -0.2]))
    L = torch.tensor([1.5, 0.4])
    total = w.loss(L)
    s = torch.tensor([0.3, -0.2])
    assert_near(total, (L / (2 * s.exp()) + s / 2).mean())
    total.backward()
    assert_near(w.parameters()[0].grad, (-L / (2 * s.exp()) + 0.5) / 2)
    sd = w.state_dict()
    w2 = make_weighting("uw", 2)
    w2.load_state_dict(sd)
    assert_near(w2.parameters()[0].detach(), s)


def test_dwa_weights() -> None:
    w = make_weighting("dwa", 3)
    L = torch.tensor([1.0, 2.0, 3.0])
    assert_near(w.loss(L), L.mean())  # ones before two epochs
    w.end_epoch(torch.tensor([1.0, 2.0, 4.0]))
    assert_near(w.loss(L), L.mean())
    w.end_epoch(torch.tensor([0.5, 2.0, 2.0]))
    r = torch.tensor([0.5, 1.0, 0.5])
    weights = 3 * torch.softmax(r / 2.0, 0)
    assert_near(w.loss(L), (weights * L).mean())
    assert_near(w.last_weights * 3, weights)
    w2 = make_weighting("dwa", 3)
    w2.load_state_dict(w.state_dict())
    assert_near(w2.loss(L), (weights * L).mean())


def test_rlw_weights_sum_to_one() -> None:
    w = make_weighting("rlw", 4, seed=1)
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for _ in range(3):
        total = w.loss(L)
        assert_near(w.last_weights.sum(), 1.0)
        assert (w.last_weights > 0).all()
        assert_near(total, w.last_weights @ L)


def test_registry_unknown_name_and_option() -> None:
    with pytest.raises(ValueError) as e:
        make_weighting("nope", 2)
    assert all(name in str(e.value) for name in REGISTRY)
    with pytest.raises(ConfigError, match=r"unknown config key 'weighting.options.calpha' \(valid here: c, rescale\)"):
        make_weighting("cagrad", 2, calpha=0.4)
    assert WEIGHTING_OPTIONS["nash_mtl"] == {"max_norm": 1.0, "optim_niter": 20}
    with pytest.raises(ValueError):
        make_weighting("mgda", 2, normalize="bogus")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_shape_finite_and_homogeneous(name: str) -> None:
    T, P = 4, 11
    G = torch.randn(T, P, generator=torch.Generator().manual_seed(0))
    L = torch.rand(T) + 0.5
    opts = {"max_norm": 0.0} if name == "nash_mtl" else {}
    w = make_weighting(name, T, **opts)
    assert w.needs_task_grads == (name in GRAD_METHODS)
    w.loss(L)
    d = w.combine(G)
    assert d.shape == (P,) and d.dtype == G.dtype and torch.isfinite(d).all()
    # positively homogeneous: combine(3G) == 3 combine(G) on a fresh instance
    w3 = make_weighting(name, T, **opts)
    w3.loss(L)
    assert_near(w3.combine(3 * G), 3 * d, atol=1e-4)
    # one task: everything is that task's gradient / loss (UW at s=0: L/2 + s/2)
    k = 0.5 if name == "uw" else 1.0
    w1 = make_weighting(name, 1, **opts)
    assert_near(w1.loss(L[:1]), k * L[0])
    assert_near(w1.combine(G[:1]), k * G[0])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_loss_gradient_matches_convention(name: str) -> None:
    # L_t = g_t . theta, so row t of G is dL_t/dtheta; backward of w.loss gives combine(G) for
    # loss weightings and the EW gradient G.mean(0) for gradient methods.
    T, P = 3, 5
    G = torch.randn(T, P, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    theta = torch.randn(P, dtype=torch.float64, requires_grad=True)
    w = make_weighting(name, T)
    w.end_epoch(torch.tensor([1.0, 2.0, 3.0]))
    w.end_epoch(torch.tensor([0.5, 2.5, 1.0]))
    w.loss(G @ theta).backward()
    want = G.mean(0) if w.needs_task_grads else w.combine(G)
    assert_near(theta.grad, want, atol=1e-6)
