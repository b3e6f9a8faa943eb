"""The core's invariants: parameter counts, batched == separate modules, per-task gradients,
the conflict-noticed operation, ensembles, architecture JSON round trips."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mtrl_arch.conflict import capture_task_grads, task_gradients
from mtrl_arch.search import TrunkSpec, make_method
from mtrl_arch.steps import weight_step
from mtrl_arch.tree import Tree, TreeError
from mtrl_arch.trunk import (BatchedLinear, EnsembleBank, Trunk, VmapBank, ensemble_input, ensemble_output,
                             ensemble_stage, linear_stage, mlp_stages)
from mtrl_arch.update import GradientCombiner
from mtrl_arch.weighting import make_weighting

TASKS = ("a", "b", "c", "d")
IN, HID, OUT = 7, 16, 3


def spec(ensemble: int = 1) -> TrunkSpec:
    stages = mlp_stages(IN, [HID, HID, HID])
    head = linear_stage(HID, OUT, "identity")
    if ensemble > 1:
        stages = [ensemble_stage(f, ensemble) for f in stages]
        head = ensemble_stage(head, ensemble)
    return TrunkSpec(TASKS, stages, head)


def randomise(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---- parameter counts ------------------------------------------------------------------

def layer(i: int, o: int) -> int:
    return i * o + o


def test_hps_param_count_is_one_trunk_plus_heads() -> None:
    net = make_method("hps", spec()).build()
    trunk = layer(IN, HID) + 2 * layer(HID, HID)
    heads = len(TASKS) * layer(HID, OUT)
    counts = net.param_counts()
    assert counts == {"shared": trunk, "subgroup": 0, "specific": 0, "heads": heads, "total": trunk + heads}
    assert counts["total"] == sum(p.numel() for p in net.parameters())


def test_stl_param_count_is_t_trunks_plus_heads() -> None:
    net = make_method("stl", spec()).build()
    T = len(TASKS)
    trunk = layer(IN, HID) + 2 * layer(HID, HID)
    assert net.param_counts()["specific"] == T * trunk
    assert net.param_counts()["total"] == T * (trunk + layer(HID, OUT)) == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_conal_derivation_branching_at_p_matches_closed_form(p: int) -> None:
    sizes = [layer(IN, HID), layer(HID, HID), layer(HID, HID)]
    T = len(TASKS)
    tree = Tree.from_branch_points(TASKS, 3, [p] * T)
    net = Trunk(tree, spec().stages, spec().heads)
    shared = sum(sizes[:p])
    specific = T * sum(sizes[p:])
    heads = T * layer(HID, OUT)
    expect = {"shared": shared if T > 1 else 0, "subgroup": 0, "specific": specific, "heads": heads,
              "total": shared + specific + heads}
    assert net.param_counts() == expect
    assert sum(q.numel() for q in net.parameters()) == expect["total"]
    assert tree.param_counts(sizes, layer(HID, OUT)) == expect


def test_subgroup_modules_are_counted_as_subgroup() -> None:
    tree = Tree(TASKS, (((0, 1, 2, 3),), ((0, 1), (2, 3)), ((0,), (1,), (2,), (3,))))
    net = Trunk(tree, spec().stages, spec().heads)
    c = net.param_counts()
    assert c["shared"] == layer(IN, HID) and c["subgroup"] == 2 * layer(HID, HID)
    assert c["specific"] == 4 * layer(HID, HID)
    assert [g.name for g in net.shared_groups()] == ["stage0", "stage1.g0", "stage1.g1"]
    assert [g.tasks for g in net.shared_groups()] == [(0, 1, 2, 3), (0, 1), (2, 3)]


# ---- batched modules -------------------------------------------------------------------

ACT = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda y: y}


# relu and tanh run in place on the matmul's output; a single output is a multiply and a sum
@pytest.mark.parametrize("act,out", [("tanh", HID), ("relu", HID), ("identity", 1), ("relu", 3)])
@pytest.mark.parametrize("idx", [[0, 1, 2, 3], [2, 2, 2, 2], [3, 1, 0, 1], [0, 0, 1, 1]])
def test_batched_linear_equals_separate_modules(idx, act: str, out: int) -> None:
    torch.manual_seed(0)
    bank = BatchedLinear(4, IN, out, act)
    separate = [nn.Linear(IN, out) for _ in range(4)]
    with torch.no_grad():
        for m, lin in enumerate(separate):
            lin.weight.copy_(bank.weight[m].T)
            lin.bias.copy_(bank.bias[m])
    x = torch.randn(len(idx), 5, IN, requires_grad=True)
    y = bank(x, idx)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.stack([ACT[act](separate[m](x2[c])) for c, m in enumerate(idx)])
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for m, lin in enumerate(separate):
        if m not in idx:  # an unused module gets a zero gradient
            assert bank.weight.grad[m].abs().sum() == 0 and lin.weight.grad is None
            continue
        torch.testing.assert_close(bank.weight.grad[m], lin.weight.grad.T)
        torch.testing.assert_close(bank.bias.grad[m], lin.bias.grad)


def test_stl_trunk_equals_t_separate_mlps() -> None:
    """A fully task-specific trunk (one batched call per stage) == T independent MLPs."""
    net = make_method("stl", spec()).build()
    randomise(net)
    x = torch.randn(len(TASKS), 6, IN)
    y = net(x)
    for t in range(len(TASKS)):
        h = x[t]
        for s in range(3):
            h = torch.relu(h @ net.specific[s].weight[t] + net.specific[s].bias[t])
        torch.testing.assert_close(y[t], h @ net.heads.weight[t] + net.heads.bias[t])


def test_shared_input_and_per_task_input_agree() -> None:
    tree = Tree.from_branch_points(TASKS, 3, [3, 2, 1, 0])
    net = Trunk(tree, spec().stages, spec().heads)
    randomise(net)
    x = torch.randn(5, IN)
    torch.testing.assert_close(net(x, shared_input=True), net(x.expand(len(TASKS), 5, IN)))


def test_ensemble_bank_equals_separate_members() -> None:
    """Twin critics folded into the batch dim == each member's network run alone."""
    tree = Tree.from_branch_points(TASKS, 3, [3, 2, 1, 0])
    twin = Trunk(tree, spec(2).stages, spec(2).heads)
    randomise(twin)
    single = [Trunk(tree, spec().stages, spec().heads) for _ in range(2)]
    for e, net in enumerate(single):
        with torch.no_grad():
            for (n1, p1), (n2, p2) in zip(net.named_parameters(), twin.named_parameters()):
                M = p1.shape[0]
                p1.copy_(p2[e * M:(e + 1) * M])
    x = torch.randn(len(TASKS), 5, IN)
    y = ensemble_output(twin(ensemble_input(x, 2)), 2)
    for e in range(2):
        torch.testing.assert_close(y[e], single[e](x))


@pytest.mark.parametrize("shared_input", [False, True])
def test_conal_search_net_is_the_closed_form_mixture(shared_input: bool) -> None:
    """z_t = sum_{b<L} a_t^b P_t^{b..L-1}(x_b) + a_t^L x_L, a_t = softmax(alpha_t), then task t's
    head; x_b: the input after b shared stages, P_t: task t's private stages from b on."""
    torch.manual_seed(0)
    net = make_method("conal", spec()).build()
    randomise(net)
    with torch.no_grad():
        net.alpha.copy_(torch.randn_like(net.alpha))
    x = torch.randn(5, IN) if shared_input else torch.randn(len(TASKS), 5, IN)
    y = net(x, shared_input=shared_input)
    L = net.n_stages

    def layer(bank, m, h):
        return torch.relu(h @ bank.weight[m] + bank.bias[m])

    for t in range(len(TASKS)):
        trunk = [x if shared_input else x[t]]
        for s in range(L):
            trunk.append(layer(net.shared[s], 0, trunk[-1]))
        a = net.alpha[t].softmax(-1)
        z = a[L] * trunk[L]
        for b in range(L):
            h = trunk[b]
            for s in range(b, L):
                h = layer(net.private[s], t, h)
            z = z + a[b] * h
        torch.testing.assert_close(y[t], z @ net.heads.weight[t] + net.heads.bias[t])


def test_conal_search_net_with_ensembles_keeps_members_apart() -> None:
    """Regression: CoNAL's branches must not mix ensemble members (SAC's twin critics)."""
    torch.manual_seed(0)
    twin = make_method("conal", spec(2)).build()
    randomise(twin)
    with torch.no_grad():
        twin.alpha.copy_(torch.randn_like(twin.alpha))
    singles = []
    for e in range(2):
        net = make_method("conal", spec()).build()
        with torch.no_grad():
            for (n1, p1), (n2, p2) in zip(net.named_parameters(), twin.named_parameters()):
                assert n1 == n2.replace(".inner", "")
                if n1 == "alpha":
                    p1.copy_(p2)
                else:
                    M = p1.shape[0]
                    p1.copy_(p2[e * M:(e + 1) * M])
        singles.append(net)
    x = torch.randn(len(TASKS), 5, IN)
    y = ensemble_output(twin(ensemble_input(x, 2)), 2)
    for e in range(2):
        torch.testing.assert_close(y[e], singles[e](x))


def test_vmap_bank_follows_train_and_eval() -> None:
    bank = VmapBank(2, lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
    x = torch.ones(2, 64, 4)
    bank.eval()
    torch.testing.assert_close(bank(x, [0, 1]), bank(x, [0, 1]))
    bank.train()
    torch.manual_seed(0)
    assert (bank(x, [0, 1]) == 0).any(), "dropout is active in training mode"


# ---- per-task gradients and the conflict-noticed operation ------------------------------

def per_task_losses(net, x, y):
    return ((net(x) - y) ** 2).mean(dim=(1, 2))


@pytest.mark.parametrize("ensemble", [1, 2])
@pytest.mark.parametrize("weighting", ["ew", "rlw"])
def test_capture_path_equals_autograd_path(ensemble: int, weighting: str) -> None:
    """One backward with captured leaves gives the same unweighted per-task gradients as T autograd calls."""
    tree = Tree(TASKS, (((0, 1, 2, 3),), ((0, 1), (2,), (3,)), ((0,), (1,), (2, 3))))
    net = Trunk(tree, spec(ensemble).stages, spec(ensemble).heads)
    randomise(net)
    x = ensemble_input(torch.randn(len(TASKS), 8, IN), ensemble)
    y = torch.randn(len(TASKS), 8 * ensemble, OUT)
    w = make_weighting(weighting, len(TASKS))
    groups = net.shared_groups()
    with capture_task_grads(net, True):
        losses = per_task_losses(net, x, y)
    assert net.captured_ok
    captured = task_gradients(net, losses, groups, w.loss(losses))
    losses = per_task_losses(net, x, y)
    reference = task_gradients(net, losses, groups, w.loss(losses))
    assert [G.shape for G in captured] == [G.shape for G in reference]
    for G1, G2 in zip(captured, reference):
        torch.testing.assert_close(G1, G2, rtol=1e-4, atol=1e-6)
    # rows of tasks that do not use a group are zero
    assert captured[1][2:].abs().sum() == 0 and captured[2][:2].abs().sum() == 0


class TwoTaskLinear(nn.Module):
    """One shared linear layer (no bias) read out by a fixed vector per task: loss_t = c_t . (W x)."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.tree = Tree(("p", "q"), (((0, 1),),))
        self.trunk = Trunk(self.tree, [linear_stage(3, 2, "identity")])
        self.register_buffer("c", c)
        self.capture_requested = False

    @property
    def captured_ok(self):
        return self.trunk.captured_ok

    def forward(self, x):
        self.trunk.capture_requested = self.capture_requested
        return (self.trunk(x) * self.c[:, None, :]).sum(-1)  # [T, B]

    def shared_groups(self):
        return self.trunk.shared_groups()


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("variant", ["layer", "branch"])
def test_conflict_noticed_withholds_conflicting_and_averages_aligned(sign: float, variant: str) -> None:
    c = torch.tensor([[1.0, 2.0], [sign * 1.0, sign * 2.0]])  # task q's gradient is +-task p's
    net = TwoTaskLinear(c)
    x = torch.ones(2, 1, 3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    combiner = GradientCombiner(make_weighting("ew", 2), conflict_noticed=True, cn_variant=variant)
    weight_step(net, x, lambda n, b: n(b).mean(1), combiner, opt, step=0)
    W, b = net.trunk.shared[0].weight, net.trunk.shared[0].bias
    if sign < 0:  # opposite gradients: the shared layer is not updated
        torch.testing.assert_close(W, before["trunk.shared.0.weight"], rtol=0, atol=0)
        torch.testing.assert_close(b, before["trunk.shared.0.bias"], rtol=0, atol=0)
    else:  # aligned: the mean of the two task gradients, d/dW of c_t . (W x) = x c_t^T
        mean_grad_w = torch.ones(3, 1) @ c.mean(0, keepdim=True)
        torch.testing.assert_close(W, before["trunk.shared.0.weight"] - 0.1 * mean_grad_w[None])
        torch.testing.assert_close(b, before["trunk.shared.0.bias"] - 0.1 * c.mean(0, keepdim=True))
    s = combiner.stats.summary()
    rate = 1.0 if sign < 0 else 0.0
    assert s == {"conflict/stage0/rate": rate, "conflict/stage0/withheld": rate, "conflict/stage0/mean_cos": sign}


def test_conflict_noticed_layer_vs_branch_variant() -> None:
    """Branch variant: a conflict at stage 0 also withholds the deeper shared stage 1."""
    from mtrl_arch.conflict import conflict_mask

    tree = Tree(("p", "q"), (((0, 1),), ((0, 1),)))
    net = Trunk(tree, [linear_stage(3, 3, "identity"), linear_stage(3, 3, "identity")])
    groups = net.shared_groups()
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.5]])
    assert conflict_mask(groups, [conflicting, aligned], "layer").tolist() == [True, False]
    assert conflict_mask(groups, [conflicting, aligned], "branch").tolist() == [True, True]
    assert conflict_mask(groups, [aligned, conflicting], "branch").tolist() == [False, True]


def test_conflict_noticed_fraction_of_conflicting_pairs() -> None:
    """4 tasks, 6 pairs: task 3 opposes the other three (3 conflicting pairs = 0.5 of them)."""
    from mtrl_arch.conflict import conflict_mask

    tasks = ("a", "b", "c", "d")
    net = Trunk(Tree(tasks, (((0, 1, 2, 3),),)), [linear_stage(2, 2, "identity")])
    groups = net.shared_groups()
    G = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.2], [-1.0, 0.0]])  # per-task gradients [T, P]
    one_pair = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.1, 1.0], [-0.1, 1.0]])  # only c.d conflict: 1/6
    assert conflict_mask(groups, [G]).tolist() == [True]              # the paper's rule: any pair
    assert conflict_mask(groups, [one_pair]).tolist() == [True]
    assert conflict_mask(groups, [G], fraction=0.4).tolist() == [True]   # 0.5 > 0.4
    assert conflict_mask(groups, [G], fraction=0.5).tolist() == [False]  # not more than half
    assert conflict_mask(groups, [one_pair], fraction=0.1).tolist() == [True]
    assert conflict_mask(groups, [one_pair], fraction=0.2).tolist() == [False]
    with pytest.raises(ValueError, match="fraction"):
        conflict_mask(groups, [G], fraction=1.0)


# ---- architecture JSON -----------------------------------------------------------------

def test_tree_json_round_trip_and_version_checks(tmp_path) -> None:
    tree = Tree(TASKS, (((0, 1, 2, 3),), ((0, 1), (2, 3)), ((0,), (1,), (2,))), method="ltb", meta={"x": 1})
    assert tree.skips(2) == (3,)
    path = tmp_path / "t.json"
    tree.save(path)
    back = Tree.load(path)
    assert back == tree and back.meta == {"x": 1}
    d = json.loads(path.read_text())
    assert d["format"] == "mtrl-arch/tree" and d["version"] == 1
    with pytest.raises(TreeError, match="newer"):
        Tree.from_dict({**d, "version": 99})
    with pytest.raises(TreeError, match="format"):
        Tree.from_dict({**d, "format": "other"})
    with pytest.raises(TreeError, match="two groups"):
        Tree(TASKS, (((0, 1), (1, 2)),))
    with pytest.raises(TreeError, match="stages"):
        Trunk(tree, spec().stages[:2], spec().heads)
    assert "a" in tree.render() and "stage" in tree.render().lower()
