"""Stage factories (the trunk's stage-bank protocol) for the vision and NLP benchmarks.

Every bank holds ``n_modules`` independent copies of one stage as stacked parameters and
runs ``bank(x, idx, aux=None)`` on ``x`` of shape ``[C, B, ...]`` (C calls, ``idx[c]`` the
module of call c) in one batched op: one module for every call -> a plain op over ``C*B``
samples; distinct modules -> a grouped convolution / batched matmul / ``torch.func.vmap``.
There is never a Python loop over modules in a forward pass.

Vision
------
* :class:`BatchedConv2d`, :class:`BatchedBatchNorm2d` (own affine parameters *and* own
  running statistics per module).
* :class:`ConvStageBank` (conv [+ BN] [+ ReLU] [+ max-pool]), :class:`ResNetBasicBlockBank`,
  :class:`PoolLinearBank`.
* :func:`resnet18_stages` (Recon's Multi-Fashion+MNIST trunk), :func:`lenet_stages`
  (Pareto MTL's LeNet), :func:`classification_heads`.

NLP
---
* :class:`EmbeddingBank` (token + learned position embeddings), :class:`TransformerBlock`
  (pre-LN encoder block, a plain module run as a bank by :class:`TransformerBlockBank`:
  stacked parameters, layer norms and linears on the real tokens only, attention cut to
  each call's longest sequence, one short loop over the calls; :class:`DropoutVmapBank`,
  the same block through ``torch.func.vmap``, is kept as its reference),
  :class:`MaskedMeanPoolBank` (final LayerNorm + mean over non-padded tokens).
* :func:`transformer_stages`.

Each factory returned by the ``*_stages`` functions is a :class:`StageSpec`: callable as
``factory(n_modules)``, with ``residual_shaped`` saying whether the stage maps its input
shape to the same shape (only such stages may be *skipped* by a task; the trunk passes
the input through unchanged).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrl_arch.trunk import BatchedLinear, StageFactory, VmapBank, select_modules, single_module

__all__ = [
    "StageSpec",
    "BatchedConv2d",
    "BatchedBatchNorm2d",
    "ConvStageBank",
    "ResNetBasicBlockBank",
    "PoolLinearBank",
    "resnet18_stages",
    "lenet_sizes",
    "lenet_stages",
    "classification_heads",
    "EmbeddingBank",
    "TransformerBlock",
    "DropoutVmapBank",
    "TransformerBlockBank",
    "MaskedMeanPoolBank",
    "transformer_stages",
]


class StageSpec:
    """A stage factory with a description: ``spec(n_modules)`` builds the bank."""

    def __init__(self, build: Callable[[int], nn.Module], name: str, residual_shaped: bool = False):
        self.build, self.name, self.residual_shaped = build, name, residual_shaped

    def __call__(self, n_modules: int) -> nn.Module:
        return self.build(n_modules)

    def __repr__(self) -> str:
        return f"StageSpec({self.name}{', residual' if self.residual_shaped else ''})"


def _index(idx: Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(list(idx), dtype=torch.long, device=device)


def _is_identity(idx: Sequence[int], n: int) -> bool:
    return len(idx) == n and all(i == j for j, i in enumerate(idx))


# ---- convolution / batch norm ------------------------------------------------------------------
class BatchedConv2d(nn.Module):
    """``n_modules`` Conv2d layers stored as ``weight [M, cout, cin, k, k]``, ``bias [M, cout]``.

    ``x [C, B, cin, H, W]`` -> ``[C, B, cout, H', W']``. One module: a plain conv over
    ``C*B`` samples. Distinct modules: the calls are laid side by side as channels
    (``[B, C*cin, H, W]``) and run as one grouped convolution (``groups=C``) with the
    selected weights stacked to ``[C*cout, cin, k, k]``; the result is returned as a
    ``[C, B, ...]`` view of the ``[B, C, ...]`` output, so a following grouped op reads
    it without a copy. Initialised like ``nn.Conv2d``, module by module.
    """

    def __init__(self, n_modules: int, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.n_modules, self.cin, self.cout, self.k = n_modules, cin, cout, k
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(n_modules, cout, cin, k, k))
        self.bias = nn.Parameter(torch.empty(n_modules, cout)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for m in range(self.n_modules):  # init only: the same draws as nn.Conv2d
                nn.init.kaiming_uniform_(self.weight[m], a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.cin * self.k * self.k)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        C, B = x.shape[:2]
        m = single_module(idx)
        if m is not None:
            y = F.conv2d(x.reshape(C * B, *x.shape[2:]), self.weight[m],
                         None if self.bias is None else self.bias[m], self.stride, self.padding)
            return y.view(C, B, *y.shape[1:])
        w = select_modules(self.weight, idx).reshape(C * self.cout, self.cin, self.k, self.k)
        b = None if self.bias is None else select_modules(self.bias, idx).reshape(C * self.cout)
        xb = x.transpose(0, 1).reshape(B, C * self.cin, *x.shape[3:])
        y = F.conv2d(xb, w, b, self.stride, self.padding, groups=C)
        return y.view(B, C, self.cout, *y.shape[2:]).transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"n_modules={self.n_modules}, {self.cin}->{self.cout}, k={self.k}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


class BatchedBatchNorm2d(nn.Module):
    """``n_modules`` BatchNorm2d layers, each with its own affine parameters and running stats.

    ``x [C, B, ch, H, W]``. Training mode normalises with batch statistics and updates the
    running statistics of the modules used (momentum 0.1, unbiased running variance, as
    ``nn.BatchNorm2d``); eval mode uses the running statistics.

    * One module for all C calls (shared): statistics over all ``C*B`` samples, as one
      shared BN layer on the concatenated batch.
    * Distinct modules: one ``F.batch_norm`` over ``C*ch`` channels on the ``[B, C*ch, H, W]``
      layout. When ``idx`` is the bank in order the running-stat buffers are passed as views
      and updated in place; otherwise they are gathered, updated by ``F.batch_norm`` and
      scattered back to their module rows.
    * A module used by several (but not all) calls, in training mode: that module's
      statistics are taken over all of its calls together (as a shared BN would), computed
      with a few batched reductions (``index_add``), then scattered to the running stats.
    """

    def __init__(self, n_modules: int, ch: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.n_modules, self.ch, self.eps, self.momentum = n_modules, ch, eps, momentum
        self.weight = nn.Parameter(torch.ones(n_modules, ch))
        self.bias = nn.Parameter(torch.zeros(n_modules, ch))
        self.register_buffer("running_mean", torch.zeros(n_modules, ch))
        self.register_buffer("running_var", torch.ones(n_modules, ch))
        self.register_buffer("num_batches_tracked", torch.zeros(n_modules, dtype=torch.long))

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        C, B, ch = x.shape[:3]
        m = single_module(idx)
        if m is not None:
            y = F.batch_norm(x.reshape(C * B, *x.shape[2:]), self.running_mean[m], self.running_var[m],
                             self.weight[m], self.bias[m], self.training, self.momentum, self.eps)
            if self.training:
                self.num_batches_tracked[m] += 1
            return y.view(x.shape)
        if self.training and len(set(idx)) < len(idx):
            return self._grouped(x, idx)
        xb = x.transpose(0, 1).reshape(B, C * ch, *x.shape[3:])
        w = select_modules(self.weight, idx).reshape(-1)
        b = select_modules(self.bias, idx).reshape(-1)
        if _is_identity(idx, self.n_modules):
            rm, rv = self.running_mean.view(-1), self.running_var.view(-1)  # updated in place
            y = F.batch_norm(xb, rm, rv, w, b, self.training, self.momentum, self.eps)
            if self.training:
                self.num_batches_tracked += 1
        else:
            ix = _index(idx, x.device)
            rm, rv = self.running_mean[ix].reshape(-1), self.running_var[ix].reshape(-1)  # copies
            y = F.batch_norm(xb, rm, rv, w, b, self.training, self.momentum, self.eps)
            if self.training:  # distinct modules: scatter the updated copies back
                self.running_mean[ix] = rm.view(C, ch)
                self.running_var[ix] = rv.view(C, ch)
                self.num_batches_tracked[ix] += 1
        return y.view(B, C, ch, *x.shape[3:]).transpose(0, 1)

    def _grouped(self, x: Tensor, idx: Sequence[int]) -> Tensor:
        C, B, ch = x.shape[:3]
        ix = _index(idx, x.device)
        uniq, inv = torch.unique(ix, return_inverse=True)
        G = len(uniq)
        per_call = B * x[0, 0, 0].numel()
        n = torch.bincount(inv, minlength=G).to(x.dtype) * per_call  # samples per module, [G]
        dims = (1, *range(3, x.dim()))
        mean_g = x.new_zeros(G, ch).index_add(0, inv, x.sum(dims)) / n[:, None]
        shape = (C, 1, ch) + (1,) * (x.dim() - 3)
        xc = x - mean_g[inv].view(shape)
        var_g = x.new_zeros(G, ch).index_add(0, inv, (xc * xc).sum(dims)) / n[:, None]  # biased
        w, b = self.weight[ix].view(shape), self.bias[ix].view(shape)
        y = xc * torch.rsqrt(var_g[inv] + self.eps).view(shape) * w + b
        with torch.no_grad():
            mom = self.momentum
            unbiased = var_g * (n / (n - 1).clamp_min(1))[:, None]
            self.running_mean[uniq] = (1 - mom) * self.running_mean[uniq] + mom * mean_g
            self.running_var[uniq] = (1 - mom) * self.running_var[uniq] + mom * unbiased
            self.num_batches_tracked[uniq] += 1
        return y

    def extra_repr(self) -> str:
        return f"n_modules={self.n_modules}, ch={self.ch}, eps={self.eps}, momentum={self.momentum}"


def _kaiming_fan_out(conv: BatchedConv2d) -> None:
    """torchvision's ResNet init: normal, fan_out, ReLU gain."""
    fan_out = conv.cout * conv.k * conv.k  # of one module's [cout, cin, k, k] weight
    with torch.no_grad():
        conv.weight.normal_(0.0, math.sqrt(2.0 / fan_out))


class ConvStageBank(nn.Module):
    """conv -> [BatchNorm] -> [ReLU] -> [max-pool]: ``[C, B, cin, H, W] -> [C, B, cout, H', W']``."""

    def __init__(self, n_modules: int, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0,
                 bn: bool = True, relu: bool = True, pool: int | None = None, kaiming: bool = False):
        super().__init__()
        self.n_modules = n_modules
        self.conv = BatchedConv2d(n_modules, cin, cout, k, stride, padding, bias=not bn)
        if kaiming:
            _kaiming_fan_out(self.conv)
        self.bn = BatchedBatchNorm2d(n_modules, cout) if bn else None
        self.relu, self.pool = relu, pool

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        y = self.conv(x, idx)
        if self.bn is not None:
            y = self.bn(y, idx)
        if self.relu:
            y = F.relu(y)
        if self.pool:
            C, B = y.shape[:2]
            y = F.max_pool2d(y.reshape(C * B, *y.shape[2:]), self.pool)
            y = y.view(C, B, *y.shape[1:])
        return y


class ResNetBasicBlockBank(nn.Module):
    """ResNet BasicBlock bank: conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv (stride) + BN when ``stride != 1`` or
    ``cin != cout`` (torchvision's option B). Shape contract: ``[C, B, cin, H, W] ->
    [C, B, cout, ceil(H/stride), ceil(W/stride)]``; the block is *residual-shaped* (may be
    skipped by a task) exactly when ``cin == cout`` and ``stride == 1``.
    """

    def __init__(self, n_modules: int, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.n_modules, self.cin, self.cout, self.stride = n_modules, cin, cout, stride
        self.residual_shaped = cin == cout and stride == 1
        self.conv1 = BatchedConv2d(n_modules, cin, cout, 3, stride, 1, bias=False)
        self.bn1 = BatchedBatchNorm2d(n_modules, cout)
        self.conv2 = BatchedConv2d(n_modules, cout, cout, 3, 1, 1, bias=False)
        self.bn2 = BatchedBatchNorm2d(n_modules, cout)
        if not self.residual_shaped:
            self.down_conv = BatchedConv2d(n_modules, cin, cout, 1, stride, 0, bias=False)
            self.down_bn = BatchedBatchNorm2d(n_modules, cout)
        else:
            self.down_conv = self.down_bn = None
        for conv in (self.conv1, self.conv2, self.down_conv):
            if conv is not None:
                _kaiming_fan_out(conv)

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x, idx), idx))
        out = self.bn2(self.conv2(out, idx), idx)
        sc = x if self.down_conv is None else self.down_bn(self.down_conv(x, idx), idx)
        return F.relu(out + sc)


class PoolLinearBank(nn.Module):
    """Global average pool + linear (+ activation): ``[C, B, cin, H, W] -> [C, B, cout]``."""

    def __init__(self, n_modules: int, cin: int, cout: int, activation: str = "relu"):
        super().__init__()
        self.n_modules = n_modules
        self.linear = BatchedLinear(n_modules, cin, cout, activation)

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        return self.linear(x.mean(dim=(-2, -1)), idx)


class _FlattenLinearBank(nn.Module):
    """Flatten ``[C, B, ...]`` to ``[C, B, F]`` + linear + activation."""

    def __init__(self, n_modules: int, cin: int, cout: int, activation: str = "relu"):
        super().__init__()
        self.n_modules = n_modules
        self.linear = BatchedLinear(n_modules, cin, cout, activation)

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        return self.linear(x.reshape(*x.shape[:2], -1), idx)


def resnet18_stages(in_ch: int = 1, width: int = 64, out_features: int = 100) -> list[StageSpec]:
    """ResNet-18 trunk for 36x36 inputs (Recon's Multi-Fashion+MNIST network), 10 stages.

    * stage 0, stem: 7x7 stride-2 conv (padding 3, no bias) + BN + ReLU; **no max-pool**
      (it would shrink a 36x36 input to 1x1 by the last block): ``[in_ch, 36, 36] ->
      [w, 18, 18]``;
    * stages 1..8, the eight BasicBlocks: (w, w), (w, w), (w -> 2w, stride 2) -> 9x9,
      (2w, 2w), (2w -> 4w, stride 2) -> 5x5, (4w, 4w), (4w -> 8w, stride 2) -> 3x3, (8w, 8w).
      Stages 1, 2, 4, 6, 8 are residual-shaped and may be skipped;
    * stage 9: global average pool + linear ``8w -> out_features`` + ReLU (the "shared
      512 -> 100 layer"): ``[C, B, 100]``.

    Heads (100 -> 10 per task) come from :func:`classification_heads`. Convolutions use
    torchvision's ResNet init (Kaiming normal, fan-out); BN starts at weight 1, bias 0.
    """
    w = width
    specs = [StageSpec(lambda n: ConvStageBank(n, in_ch, w, 7, 2, 3, bn=True, relu=True, kaiming=True),
                       f"stem {in_ch}->{w} 7x7/2")]
    plan = [(w, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1),
            (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 2), (8 * w, 8 * w, 1)]
    for cin, cout, s in plan:
        specs.append(StageSpec(lambda n, cin=cin, cout=cout, s=s: ResNetBasicBlockBank(n, cin, cout, s),
                               f"basic {cin}->{cout}/{s}", residual_shaped=(cin == cout and s == 1)))
    specs.append(StageSpec(lambda n: PoolLinearBank(n, 8 * w, out_features, "relu"),
                           f"avgpool+linear {8 * w}->{out_features}"))
    return specs


def lenet_stages(width: float = 1) -> list[StageSpec]:
    """Pareto MTL's LeNet for 36x36 single-channel inputs, 3 stages (heads 50w -> 10), w = ``width``:

    * stage 0: conv 1->10w (9x9) + ReLU + max-pool 2: ``[1, 36, 36] -> [10w, 14, 14]``;
    * stage 1: conv 10w->20w (5x5) + ReLU + max-pool 2: ``-> [20w, 5, 5]``;
    * stage 2: flatten (500w) + linear -> 50w + ReLU: ``-> [50w]``.

    A fractional ``width`` rounds each size (1.2: 12, 24, 60), so a trunk can be sized between the integer
    multiples, whose counts grow about fourfold a step (width matching needs the steps in between).
    """
    c1, c2, f = lenet_sizes(width)
    return [
        StageSpec(lambda n: ConvStageBank(n, 1, c1, 9, bn=False, relu=True, pool=2), f"conv 1->{c1} 9x9 + pool"),
        StageSpec(lambda n: ConvStageBank(n, c1, c2, 5, bn=False, relu=True, pool=2), f"conv {c1}->{c2} 5x5 + pool"),
        StageSpec(lambda n: _FlattenLinearBank(n, c2 * 5 * 5, f, "relu"), f"fc {c2 * 25}->{f}"),
    ]


def lenet_sizes(width: float) -> tuple[int, int, int]:
    """LeNet's conv channels and fc width at a width multiplier (the heads read the last)."""
    return max(1, round(10 * width)), max(1, round(20 * width)), max(1, round(50 * width))


def classification_heads(in_features: int, n_classes: int) -> StageFactory:
    """One linear ``in_features -> n_classes`` head per task (identity activation: logits)."""
    return StageSpec(lambda n: BatchedLinear(n, in_features, n_classes, "identity"),
                     f"heads {in_features}->{n_classes}")


# ---- transformer ----------------------------------------------------------------------------
class EmbeddingBank(nn.Module):
    """Token + learned position embeddings, stacked ``tok [M, vocab, d]``, ``pos [M, max_len, d]``.

    ``ids [C, B, L]`` (int64) -> ``[C, B, L, d]`` (+ dropout). The padding mask (``aux``) is
    not needed here; it is used by the blocks and the pooling. Distinct modules read one
    flat ``[M*vocab, d]`` table with ids offset by ``module * vocab`` (one lookup, no copy).
    """

    def __init__(self, n_modules: int, vocab_size: int, d_model: int, max_len: int, dropout: float = 0.1):
        super().__init__()
        self.n_modules, self.vocab_size, self.d_model, self.max_len = n_modules, vocab_size, d_model, max_len
        self.dropout = dropout
        self.tok = nn.Parameter(torch.randn(n_modules, vocab_size, d_model) * 0.02)
        self.pos = nn.Parameter(torch.randn(n_modules, max_len, d_model) * 0.02)

    def forward(self, ids: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        C, B, L = ids.shape
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len={self.max_len}")
        m = single_module(idx)
        if m is not None:
            y = F.embedding(ids, self.tok[m]) + self.pos[m, :L]
        else:
            ix = _index(idx, ids.device)
            y = F.embedding(ids + (ix * self.vocab_size).view(C, 1, 1), self.tok.view(-1, self.d_model))
            pos = torch.arange(L, device=ids.device) + (ix * self.max_len).view(C, 1)
            y = y + F.embedding(pos, self.pos.view(-1, self.d_model)).unsqueeze(1)
        return F.dropout(y, self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"n_modules={self.n_modules}, vocab={self.vocab_size}, d={self.d_model}, max_len={self.max_len}"


class TransformerBlock(nn.Module):
    """Pre-LN transformer encoder block: ``x + Drop(MHA(LN(x)))``, then ``x + Drop(MLP(LN(x)))``.

    ``forward(x [B, L, d], mask [B, L] bool, True = real token)``. Attention is written
    with explicit matmuls: ``F.scaled_dot_product_attention`` runs under ``vmap`` on CPU
    but through the slow per-example fallback (no batching rule for its CPU kernel).
    Padded keys get the dtype's most negative value (not -inf) so no row becomes NaN.
    """

    def __init__(self, d_model: int = 128, n_heads: int = 4, d_ff: int = 256, dropout: float = 0.1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B, L, d = x.shape
        h = self.n_heads
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d // h))  # [B, h, L, L]
        if mask is not None:
            scores = scores.masked_fill(~mask.bool().view(B, 1, 1, L), torch.finfo(scores.dtype).min)
        att = F.dropout(scores.softmax(-1), p, self.training)
        a = (att @ v).transpose(1, 2).reshape(B, L, d)
        x = x + F.dropout(self.proj(a), p, self.training)
        hdn = F.dropout(F.gelu(self.fc1(self.ln2(x))), p, self.training)
        return x + F.dropout(self.fc2(hdn), p, self.training)


class DropoutVmapBank(VmapBank):
    """:class:`~mtrl_arch.trunk.VmapBank` for modules with dropout.

    Two differences: the vmapped path uses ``randomness="different"`` (independent dropout
    masks per call; ``torch.func.vmap`` refuses random ops otherwise), and the template
    module follows the bank's train/eval mode (VmapBank's template is not a registered
    submodule, so ``bank.eval()`` would not reach it).
    """

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        self._template[0].train(self.training)
        if single_module(idx) is not None:
            return super().forward(x, idx, aux)
        stacked = {n: select_modules(p, idx) for n, p in zip(self._names, self.params)}
        fn = lambda p, xi, ai: self._call(p, xi, ai)  # noqa: E731
        return torch.func.vmap(fn, in_dims=(0, 0, None if aux is None else 0), randomness="different")(stacked, x, aux)


def _last_real(mask: Tensor) -> int:
    """One past the last position any row of ``mask [B, L]`` marks real (0 when none)."""
    cols = mask.any(0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else 0


class TransformerBlockBank(DropoutVmapBank):
    """``n_modules`` :class:`TransformerBlock` s run as one bank without ``vmap``.

    Same parameters (``params``, stacked in ``TransformerBlock`` order), initial draws and
    state-dict keys as :class:`DropoutVmapBank` (which stays as the reference
    implementation: ``DropoutVmapBank.forward(bank, ...)``). With a padding mask
    (``aux [C, B, L]``) every call is cut to its own longest sequence (``L_c``) and the
    layer norms and linear layers run on the real tokens only (packed ``[N_c, d]``);
    only the attention uses the ``[B, h, L_c, L_c]`` layout. Padded positions pass their
    input through unchanged (in the reference they hold values no real token ever reads:
    keys are masked, pooling is masked), so every real token's output is the reference's
    to float rounding. Attention without dropout (eval, or ``dropout=0``) is
    ``F.scaled_dot_product_attention`` with the same additive mask (most negative float
    on padded keys), which never materialises the score matrix on CPU. With dropout the
    explicit softmax + dropout path is kept; its random draws differ from the reference's
    (different shapes), not its distribution.
    """

    def _weights(self, idx: Sequence[int]) -> list[dict[str, Tensor]]:
        if self.capture_tasks is None:
            return [{n: p[m] for n, p in zip(self._names, self.params)} for m in idx]
        stacked = {n: self.gather(p, idx) for n, p in zip(self._names, self.params)}
        return [{n: t[c] for n, t in stacked.items()} for c in range(len(idx))]

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        self._template[0].train(self.training)
        C, B, L, d = x.shape
        tmpl = self._template[0]
        h, p, train = tmpl.n_heads, (tmpl.dropout if self.training else 0.0), self.training
        dh = d // h
        outs = []
        for c, w in enumerate(self._weights(idx)):
            if aux is None:
                Lc, sel = L, None
                tok = x[c].reshape(B * L, d)
            else:
                m = aux[c].bool()
                Lc = _last_real(m)
                if Lc == 0:
                    continue
                sel = m[:, :Lc]
                tok = x[c, :, :Lc][sel]                               # [N_c, d] real tokens
            qkv = F.linear(F.layer_norm(tok, (d,), w["ln1.weight"], w["ln1.bias"]), w["qkv.weight"], w["qkv.bias"])
            if sel is not None:
                qkv = qkv.new_zeros(B, Lc, 3 * d).index_put((sel,), qkv)
            q, k, v = qkv.view(B, Lc, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, Lc, dh]
            add = None
            if sel is not None:
                add = torch.zeros(B, 1, 1, Lc, dtype=q.dtype, device=q.device).masked_fill(
                    ~sel.view(B, 1, 1, Lc), torch.finfo(q.dtype).min)
            if p > 0.0:
                scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(dh))
                if add is not None:
                    scores = scores + add
                a = F.dropout(scores.softmax(-1), p, train) @ v
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=add)
            a = a.transpose(1, 2).reshape(B, Lc, d)
            a = a[sel] if sel is not None else a.reshape(B * L, d)
            tok = tok + F.dropout(F.linear(a, w["proj.weight"], w["proj.bias"]), p, train)
            hdn = F.gelu(F.linear(F.layer_norm(tok, (d,), w["ln2.weight"], w["ln2.bias"]), w["fc1.weight"], w["fc1.bias"]))
            tok = tok + F.dropout(F.linear(F.dropout(hdn, p, train), w["fc2.weight"], w["fc2.bias"]), p, train)
            outs.append(tok)
        if aux is None:
            return torch.stack(outs).view(C, B, L, d)
        if not outs:
            return x
        full = aux.bool().unsqueeze(-1).expand(C, B, L, d)
        return x.masked_scatter(full, torch.cat(outs))


class MaskedMeanPoolBank(nn.Module):
    """Final LayerNorm (the pre-LN stack needs one) + mean over non-padded tokens.

    ``x [C, B, L, d]``, ``aux`` mask ``[C, B, L]`` (True = real token; None = all) ->
    ``[C, B, d]``. Per-module LayerNorm affine parameters ``[M, d]``.
    """

    def __init__(self, n_modules: int, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.n_modules, self.d_model, self.eps = n_modules, d_model, eps
        self.weight = nn.Parameter(torch.ones(n_modules, d_model))
        self.bias = nn.Parameter(torch.zeros(n_modules, d_model))

    def forward(self, x: Tensor, idx: Sequence[int], aux: Tensor | None = None) -> Tensor:
        C = x.shape[0]
        y = F.layer_norm(x, (self.d_model,), eps=self.eps)
        m = single_module(idx)
        if m is not None:
            y = y * self.weight[m] + self.bias[m]
        else:
            w, b = select_modules(self.weight, idx), select_modules(self.bias, idx)
            y = y * w.view(C, 1, 1, -1) + b.view(C, 1, 1, -1)
        if aux is None:
            return y.mean(2)
        mk = aux.to(y.dtype).unsqueeze(-1)
        return (y * mk).sum(2) / mk.sum(2).clamp_min(1.0)


def transformer_stages(
    vocab_size: int,
    d_model: int = 128,
    n_heads: int = 4,
    d_ff: int = 256,
    n_layers: int = 4,
    max_len: int = 128,
    dropout: float = 0.1,
) -> list[StageSpec]:
    """A small pre-LN transformer encoder as ``n_layers + 2`` stages.

    * stage 0: :class:`EmbeddingBank` — ``ids [C, B, L] -> [C, B, L, d]``;
    * stages 1..n_layers: :class:`TransformerBlock` run by :class:`TransformerBlockBank`
      (residual-shaped: ``[C, B, L, d] -> [C, B, L, d]``; may be skipped);
    * stage n_layers+1: :class:`MaskedMeanPoolBank` — final LayerNorm + mean over the
      non-padded tokens -> ``[C, B, d]``. Pooling is a stage (not part of the heads) so the
      heads are plain :func:`classification_heads` (``d -> n_outputs``).

    The trunk's ``aux`` is the padding mask ``[T, B, L]`` (bool, True = token) and reaches
    every stage.
    """
    specs = [StageSpec(lambda n: EmbeddingBank(n, vocab_size, d_model, max_len, dropout),
                       f"embedding {vocab_size}x{d_model}")]
    for i in range(n_layers):
        specs.append(StageSpec(
            lambda n: TransformerBlockBank(n, lambda: TransformerBlock(d_model, n_heads, d_ff, dropout)),
            f"block {i + 1} (d={d_model}, heads={n_heads}, ff={d_ff})", residual_shaped=True))
    specs.append(StageSpec(lambda n: MaskedMeanPoolBank(n, d_model), "layernorm + masked mean pool"))
    return specs
