"""Stage banks of envs/backbones.py against separate torch.nn modules holding the same weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtrl_arch.envs.backbones import (
    BatchedBatchNorm2d,
    BatchedConv2d,
    DropoutVmapBank,
    EmbeddingBank,
    MaskedMeanPoolBank,
    ResNetBasicBlockBank,
    TransformerBlock,
    TransformerBlockBank,
    classification_heads,
    lenet_stages,
    resnet18_stages,
    transformer_stages,
)
from mtrl_arch.tree import Tree
from mtrl_arch.trunk import Trunk

IDXS = ([0, 1, 2], [2, 0, 1], [1, 1, 1], [0, 0, 2])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP fork/barrier costs,
    which dominate (tens of ms per op) on a busy machine. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _groups(idx):
    """module -> the calls that use it (a module used by several calls sees their concatenation)."""
    out: dict[int, list[int]] = {}
    for c, m in enumerate(idx):
        out.setdefault(m, []).append(c)
    return out


def _run_refs(refs, x, idx):
    """Reference output: each module runs once on the concatenated batch of its calls."""
    B = x.shape[1]
    parts = {}
    for m, calls in _groups(idx).items():
        y = refs[m](torch.cat([x[c] for c in calls]))
        for j, c in enumerate(calls):
            parts[c] = y[j * B:(j + 1) * B]
    return torch.stack([parts[c] for c in range(len(idx))])


def _assert_near(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


class RefBasicBlock(nn.Module):
    """torchvision-style BasicBlock from plain nn modules."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def _load_conv(ref: nn.Conv2d, bank: BatchedConv2d, m: int):
    with torch.no_grad():
        ref.weight.copy_(bank.weight[m])
        if bank.bias is not None:
            ref.bias.copy_(bank.bias[m])


def _load_bn(ref: nn.BatchNorm2d, bank: BatchedBatchNorm2d, m: int):
    with torch.no_grad():
        ref.weight.copy_(bank.weight[m])
        ref.bias.copy_(bank.bias[m])
        ref.running_mean.copy_(bank.running_mean[m])
        ref.running_var.copy_(bank.running_var[m])


def _randomise_bn(bank: BatchedBatchNorm2d):
    with torch.no_grad():
        bank.weight.uniform_(0.5, 1.5)
        bank.bias.normal_()
        bank.running_mean.normal_()
        bank.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("idx", IDXS)
def test_conv_bank_matches_separate_convs(idx):
    torch.manual_seed(0)
    bank = BatchedConv2d(3, 4, 6, 3, stride=2, padding=1, bias=True)
    refs = [nn.Conv2d(4, 6, 3, 2, 1) for _ in range(3)]
    for m, r in enumerate(refs):
        _load_conv(r, bank, m)
    x = torch.randn(3, 5, 4, 9, 9)
    y = bank(x, idx)
    ref = _run_refs(refs, x, idx)
    _assert_near(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for m in range(3):
        zero = torch.zeros_like(bank.weight[m])
        _assert_near(bank.weight.grad[m], refs[m].weight.grad if refs[m].weight.grad is not None else zero)
        _assert_near(bank.bias.grad[m], refs[m].bias.grad if refs[m].bias.grad is not None else zero[:, 0, 0, 0])


@pytest.mark.parametrize("idx", IDXS)
def test_bn_bank_matches_separate_bns_train_and_eval(idx):
    torch.manual_seed(1)
    bank = BatchedBatchNorm2d(3, 5)
    _randomise_bn(bank)
    refs = [nn.BatchNorm2d(5) for _ in range(3)]
    for m, r in enumerate(refs):
        _load_bn(r, bank, m)
    x = torch.randn(3, 4, 5, 6, 6) * 2 + 1
    y = bank(x, idx)
    ref = _run_refs(refs, x, idx)
    _assert_near(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for m in range(3):
        used = m in idx
        _assert_near(bank.weight.grad[m], refs[m].weight.grad if used else torch.zeros(5))
        _assert_near(bank.bias.grad[m], refs[m].bias.grad if used else torch.zeros(5))
        # running statistics land in the right module rows (unused modules untouched)
        _assert_near(bank.running_mean[m], refs[m].running_mean)
        _assert_near(bank.running_var[m], refs[m].running_var)
        assert int(bank.num_batches_tracked[m]) == int(refs[m].num_batches_tracked)
    bank.eval()
    for r in refs:
        r.eval()
    _assert_near(bank(x, idx), _run_refs(refs, x, idx))


def test_bn_shared_path_is_one_bn_over_all_calls():
    torch.manual_seed(2)
    bank = BatchedBatchNorm2d(2, 3)
    _randomise_bn(bank)
    ref = nn.BatchNorm2d(3)
    _load_bn(ref, bank, 1)
    x = torch.randn(4, 5, 3, 4, 4)
    y = bank(x, [1, 1, 1, 1])
    _assert_near(y.reshape(20, 3, 4, 4), ref(x.reshape(20, 3, 4, 4)))
    _assert_near(bank.running_mean[1], ref.running_mean)
    _assert_near(bank.running_var[1], ref.running_var)


@pytest.mark.parametrize("cin,cout,stride", [(4, 8, 2), (8, 8, 1)])
@pytest.mark.parametrize("idx", [[0, 1, 2], [1, 1, 1], [2, 2, 0]])
def test_basic_block_bank_matches_separate_blocks(cin, cout, stride, idx):
    torch.manual_seed(3)
    bank = ResNetBasicBlockBank(3, cin, cout, stride)
    assert bank.residual_shaped == (cin == cout and stride == 1)
    for bn in (bank.bn1, bank.bn2, bank.down_bn):
        if bn is not None:
            _randomise_bn(bn)
    refs = []
    for m in range(3):
        r = RefBasicBlock(cin, cout, stride)
        _load_conv(r.conv1, bank.conv1, m)
        _load_conv(r.conv2, bank.conv2, m)
        _load_bn(r.bn1, bank.bn1, m)
        _load_bn(r.bn2, bank.bn2, m)
        if r.down is not None:
            _load_conv(r.down[0], bank.down_conv, m)
            _load_bn(r.down[1], bank.down_bn, m)
        refs.append(r)
    x = torch.randn(3, 4, cin, 8, 8)
    y = bank(x, idx)
    ref = _run_refs(refs, x, idx)
    _assert_near(y, ref, 1e-4)
    assert y.shape == (3, 4, cout, 8 // stride, 8 // stride)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    for m in set(idx):
        _assert_near(bank.conv1.weight.grad[m], refs[m].conv1.weight.grad, 1e-4)
        _assert_near(bank.conv2.weight.grad[m], refs[m].conv2.weight.grad, 1e-4)
        _assert_near(bank.bn1.weight.grad[m], refs[m].bn1.weight.grad, 1e-4)
        _assert_near(bank.bn2.bias.grad[m], refs[m].bn2.bias.grad, 1e-4)
        _assert_near(bank.bn2.running_mean[m], refs[m].bn2.running_mean)
        _assert_near(bank.bn1.running_var[m], refs[m].bn1.running_var)
        if bank.down_conv is not None:
            _assert_near(bank.down_conv.weight.grad[m], refs[m].down[0].weight.grad, 1e-4)
            _assert_near(bank.down_bn.running_mean[m], refs[m].down[1].running_mean)


def _basic_params(cin, cout, stride):
    n = 9 * cin * cout + 9 * cout * cout + 2 * 2 * cout  # two 3x3 convs (no bias) + two BNs
    if stride != 1 or cin != cout:
        n += cin * cout + 2 * cout  # 1x1 conv + BN
    return n


def test_resnet18_stage_shapes_and_parameter_counts():
    specs = resnet18_stages(in_ch=1, width=64)
    assert len(specs) == 10
    counts = [sum(p.numel() for p in spec(1).parameters()) for spec in specs]
    plan = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),
            (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
    expected = [1 * 64 * 49 + 2 * 64] + [_basic_params(*p) for p in plan] + [512 * 100 + 100]
    assert counts == expected
    # the standard ResNet-18 BasicBlock counts, and the same as the nn reference
    assert counts[1] == 73_984 and counts[3] == 230_144
    assert counts[3] == sum(p.numel() for p in RefBasicBlock(64, 128, 2).parameters())
    # torchvision resnet18 (11,689,512 with a 3-channel stem and fc 512->1000), adjusted
    assert sum(counts) == 11_689_512 - 3 * 64 * 49 + 1 * 64 * 49 - 513_000 + 51_300
    assert [s.residual_shaped for s in specs] == [False, True, True, False, True, False, True, False, True, False]
    # a narrow instance for the shape contract
    x = torch.randn(1, 2, 1, 36, 36)
    shapes = []
    for spec in resnet18_stages(width=4):
        x = spec(1)(x, [0])
        shapes.append(tuple(x.shape[2:]))
    assert shapes == [(4, 18, 18), (4, 18, 18), (4, 18, 18), (8, 9, 9), (8, 9, 9),
                      (16, 5, 5), (16, 5, 5), (32, 3, 3), (32, 3, 3), (100,)]


def test_lenet_stages_counts_and_trunk_with_skip():
    specs = lenet_stages()
    counts = [sum(p.numel() for p in spec(1).parameters()) for spec in specs]
    assert counts == [10 * 81 + 10, 20 * 10 * 25 + 20, 500 * 50 + 50]
    net = Trunk(Tree.stl(["l", "r"], 3), specs, classification_heads(50, 10))
    out = net(torch.rand(6, 1, 36, 36), shared_input=True)
    assert out.shape == (2, 6, 10)
    # ResNet trunk, task 1 skips residual stage 2; stage 4 shared, others specific
    st = [((0,), (1,))] * 10
    st[2] = ((0,),)
    st[4] = ((0, 1),)
    net = Trunk(Tree(("a", "b"), tuple(st)), resnet18_stages(width=4), classification_heads(100, 10))
    out = net(torch.rand(3, 1, 36, 36), shared_input=True)
    assert out.shape == (2, 3, 10)
    out.sum().backward()


def _block_refs(bank: DropoutVmapBank, make):
    refs = []
    for m in range(bank.n_modules):
        r = make()
        r.load_state_dict({n: p[m].detach().clone() for n, p in zip(bank._names, bank.params)})
        refs.append(r)
    return refs


@pytest.mark.parametrize("idx", [[0, 1, 2], [2, 0, 2], [1, 1, 1]])
def test_transformer_block_bank_matches_separate_blocks(idx):
    torch.manual_seed(4)
    make = lambda: TransformerBlock(16, 4, 32, dropout=0.1)  # noqa: E731
    bank = DropoutVmapBank(3, make)
    refs = _block_refs(bank, make)
    bank.eval()
    for r in refs:
        r.eval()
    x = torch.randn(3, 2, 7, 16)
    mask = torch.ones(3, 2, 7, dtype=torch.bool)
    mask[:, 1, 4:] = False
    y = bank(x, idx, mask)
    ref = torch.stack([refs[m](x[c], mask[c]) for c, m in enumerate(idx)])
    _assert_near(y, ref, 1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    names = bank._names
    for m in set(idx):
        grads = dict(refs[m].named_parameters())
        for n, p in zip(names, bank.params):
            _assert_near(p.grad[m], grads[n].grad, 1e-4)


def test_transformer_dropout_in_vmap_and_eval_mode():
    torch.manual_seed(5)
    bank = DropoutVmapBank(2, lambda: TransformerBlock(16, 2, 32, dropout=0.5))
    with torch.no_grad():
        for p in bank.params:
            p[1].copy_(p[0])  # identical modules
    x = torch.randn(1, 3, 5, 16).expand(2, 3, 5, 16)
    y = bank(x, [0, 1])  # train mode: independent dropout masks per call
    assert not torch.allclose(y[0], y[1])
    bank.eval()
    y = bank(x, [0, 1])
    _assert_near(y[0], y[1])


def test_embedding_and_pool_banks():
    torch.manual_seed(6)
    emb = EmbeddingBank(3, 50, 8, max_len=10, dropout=0.0)
    ids = torch.randint(0, 50, (3, 4, 6))
    for idx in ([0, 1, 2], [2, 2, 0], [1, 1, 1]):
        y = emb(ids, idx)
        ref = torch.stack([emb.tok[m][ids[c]] + emb.pos[m, :6] for c, m in enumerate(idx)])
        _assert_near(y, ref)
    pool = MaskedMeanPoolBank(2, 8)
    with torch.no_grad():
        pool.weight.uniform_(0.5, 1.5)
        pool.bias.normal_()
    x = torch.randn(2, 3, 6, 8)
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    mask[:, :, 3:] = False
    for idx in ([0, 1], [1, 0], [1, 1]):
        y = pool(x, idx, mask)
        ln = [F.layer_norm(x[c], (8,), pool.weight[m], pool.bias[m]) for c, m in enumerate(idx)]
        _assert_near(y, torch.stack([v[:, :3].mean(1) for v in ln]))


def test_transformer_trunk_end_to_end():
    torch.manual_seed(7)
    specs = transformer_stages(100, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=12)
    assert len(specs) == 4 and [s.residual_shaped for s in specs] == [False, True, True, False]
    tree = Tree.from_branch_points(["a", "b", "c"], 4, [2, 3, 0])
    net = Trunk(tree, specs, classification_heads(16, 2))
    ids = torch.randint(5, 100, (3, 4, 12))
    mask = torch.ones(3, 4, 12, dtype=torch.bool)
    mask[:, :, 8:] = False
    out = net(ids, aux=mask)
    assert out.shape == (3, 4, 2)
    out.sum().backward()
    net.eval()
    # padding does not change the output: extra padded positions are ignored
    ids2 = ids.clone()
    ids2[:, :, 8:] = 0
    _assert_near(net(ids, aux=mask), net(ids2, aux=mask), 1e-5)
    assert copy.deepcopy(net) is not None


# ---- TransformerBlockBank (batched, packed real tokens) against the vmap reference and nn blocks ----
def _ragged_mask(C, B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (C, B), generator=g)
    lens[0] = torch.clamp(lens[0], max=L - 3)  # call 0 shorter than L: cut to its own longest
    return torch.arange(L) < lens.unsqueeze(-1)


@pytest.mark.parametrize("idx", [[0, 1, 2], [2, 0, 2], [1, 1, 1], [0, 2, 1, 0]])
def test_batched_block_bank_matches_separate_blocks_on_real_tokens(idx):
    torch.manual_seed(11)
    make = lambda: TransformerBlock(16, 4, 32, dropout=0.0)  # noqa: E731
    bank = TransformerBlockBank(3, make)
    refs = _block_refs(bank, make)
    C = len(idx)
    x = torch.randn(C, 5, 9, 16, requires_grad=True)
    mask = _ragged_mask(C, 5, 9)
    y = bank(x, idx, mask)
    ref = torch.stack([refs[m](x[c], mask[c]) for c, m in enumerate(idx)])
    m3 = mask.unsqueeze(-1).expand_as(y)
    _assert_near(y[m3], ref[m3], 1e-5)
    assert torch.equal(y[~m3], x.detach()[~m3])  # padded positions pass their input through
    g = torch.randn_like(y) * mask.unsqueeze(-1)  # what a masked pooling reads
    gx, *gp = torch.autograd.grad((y * g).sum(), [x, *bank.params])
    gx_ref = torch.autograd.grad((ref * g).sum(), [x], retain_graph=True)[0]
    _assert_near(gx[m3], gx_ref[m3], 1e-5)
    (ref * g).sum().backward()
    for m in range(3):
        grads = dict(refs[m].named_parameters())
        for n, gpn in zip(bank._names, gp):
            want = grads[n].grad if m in idx else torch.zeros_like(grads[n])
            _assert_near(gpn[m], want, 1e-4)


@pytest.mark.parametrize("idx", [[0, 1, 2], [1, 1, 1]])
def test_batched_block_bank_equals_vmap_bank(idx):
    """The batched bank and the vmap reference (DropoutVmapBank.forward) on the same parameters."""
    torch.manual_seed(12)
    bank = TransformerBlockBank(3, lambda: TransformerBlock(16, 2, 32, dropout=0.1))
    bank.eval()
    x = torch.randn(3, 4, 8, 16)
    mask = _ragged_mask(3, 4, 8, seed=1)
    m3 = mask.unsqueeze(-1).expand_as(x)
    _assert_near(bank(x, idx, mask)[m3], DropoutVmapBank.forward(bank, x, idx, mask)[m3], 1e-5)
    _assert_near(bank(x, idx), DropoutVmapBank.forward(bank, x, idx), 1e-5)  # no mask: every position
    assert set(bank.state_dict()) == set(DropoutVmapBank(3, lambda: TransformerBlock(16, 2, 32)).state_dict())


def test_batched_block_bank_dropout_and_capture():
    torch.manual_seed(13)
    bank = TransformerBlockBank(2, lambda: TransformerBlock(16, 2, 32, dropout=0.5))
    with torch.no_grad():
        for p in bank.params:
            p[1].copy_(p[0])
    x = torch.randn(1, 3, 5, 16).expand(2, 3, 5, 16)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    y = bank(x, [0, 1], mask)  # train mode: independent dropout per call
    assert not torch.allclose(y[0], y[1])
    bank.eval()
    y = bank(x, [0, 1], mask)
    _assert_near(y[0], y[1])
    # capture (per-call parameter leaves, the conflict-noticed operation's one-backward path):
    # a shared module's row c of the leaf gradient is call c's own gradient
    x = torch.randn(2, 3, 5, 16)
    mask[1, :, 3:] = False
    bank.captured, bank.capture_tasks = [], [0, 1]
    y = bank(x, [0, 0], mask)
    bank.capture_tasks = None
    (y * mask.unsqueeze(-1)).sum().backward()
    for name, (param, leaf, idx, tasks) in zip(bank._names, bank.captured):
        assert idx == [0, 0] and tasks == [0, 1]
        for c in range(2):
            p = param.detach()[0].clone().requires_grad_(True)
            bank2 = TransformerBlockBank(1, lambda: TransformerBlock(16, 2, 32, dropout=0.5))
            bank2.eval()
            with torch.no_grad():
                for q, src in zip(bank2.params, bank.params):
                    q.copy_(src[:1])
            out = bank2(x[c:c + 1], [0], mask[c:c + 1])
            (out * mask[c:c + 1].unsqueeze(-1)).sum().backward()
            want = dict(zip(bank2._names, bank2.params))[name].grad[0]
            _assert_near(leaf.grad[c], want, 1e-4)
            break  # one parameter is enough per call


def test_transformer_trunk_outputs_do_not_depend_on_padding_length():
    """Trimming to the batch's longest sequence (envs.supervised_glue.glue_inputs) is a pure
    speed-up: every stage's real-token outputs ignore trailing padding, for any tree."""
    from mtrl_arch.envs.supervised_glue import glue_inputs

    torch.manual_seed(14)
    specs = transformer_stages(100, d_model=16, n_heads=2, d_ff=32, n_layers=3, max_len=20)
    for tree in (Tree.from_branch_points(["a", "b", "c"], 5, [5, 5, 5]),
                 Tree.from_branch_points(["a", "b", "c"], 5, [2, 4, 0])):
        net = Trunk(tree, specs, classification_heads(16, 2)).eval()
        ids = torch.randint(5, 100, (3, 4, 20))
        mask = _ragged_mask(3, 4, 20, seed=2) & (torch.arange(20) < 11)
        valid = torch.ones(3, 4, dtype=torch.bool)
        valid[2, 1:] = False  # evaluation padding rows
        x, m = glue_inputs({"x": ids, "mask": mask, "valid": valid})
        assert x.shape[-1] == 11 and m.shape == x.shape
        assert torch.equal(m[valid], mask[valid][:, :11]) and not m[~valid][:, 1:].any()
        full = net(ids, aux=mask)
        cut = net(x, aux=m)
        _assert_near(cut[valid], full[valid], 1e-5)
        assert torch.isfinite(cut).all()
