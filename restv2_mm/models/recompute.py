"""Parts of a block whose backward computes cheap tensors again instead of keeping them.

For the backward, autograd keeps every tensor that a gradient formula reads. In a ResTv2
block three of them are large and cheap to compute again:

- GELU's output, which fc2's weight gradient reads: four times the block's width. Autograd
  keeps it beside fc1's output, from which GELU's gradient is computed.
- norm2's output, which fc1's weight gradient reads; the norm keeps its own input anyway.
- The sum of the attention's output and the normalised upsample branch, which proj's weight
  gradient reads; the attention kernel keeps its output, and up_norm its input.

:class:`NormMlp` and :class:`NormAddLinear` keep only their inputs (and fc1's output), and
compute those three again in the backward: a GELU, or a LayerNorm forward and an addition,
each one element-wise pass. Counted over the storages autograd keeps in a ResTv2-T training
forward in half precision, the GELU's output is about 370 MB of a Mask R-CNN batch
(2 x 800 x 1344) and 180 MB of a UperNet batch (4 x 512 x 512), the two others about 185 MB
and 90 MB (MB of 2^20 bytes). The gradients are those of autograd's layers, computed by the
same kernels from the same tensors. The GPU work grows by three element-wise passes per block
(two norms again, one addition); ``tools/analysis/profile_restv2.py --modes train`` lists
them.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# a LayerNorm over the last dimension: (weight, bias, eps)
Norm = Tuple[torch.Tensor, Optional[torch.Tensor], float]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """..., C -> rows x C."""
    return t.reshape(-1, t.shape[-1])


def _normalise_again(x: torch.Tensor, weight, bias, eps: float):
    """LayerNorm of x as the forward computed it, with its mean and 1/std for the backward."""
    return torch.native_layer_norm(x, x.shape[-1:], weight, bias, eps)


def _norm_backward(grad, x, weight, bias, mean, rstd, needs):
    """Gradients of a LayerNorm over the last dimension (x, weight, bias), those not in
    ``needs`` None: autograd's own formula."""
    if not any(needs):
        return None, None, None
    return torch.ops.aten.native_layer_norm_backward(grad, x, x.shape[-1:], mean, rstd, weight,
                                                     bias, list(needs))


def _linear_backward(g: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                     need_weight: bool, need_bias: bool):
    """Weight and bias gradients of a linear layer from its output gradient ``g`` and its
    input, both as rows: as addmm's backward computes them (``g^T @ input``, contiguous as
    the weight, and the sum of ``g``)."""
    gw = g.t().mm(inp) if need_weight else None
    gb = g.sum(0) if need_bias else None
    return gw, gb


class NormMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(norm(x))))``, ``norm`` a LayerNorm over the last dimension or none,
    keeping x and fc1's output for the backward. ``x``: ..., C_in (contiguous); every tensor
    of one dtype; the biases may be None."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2):
        y = x if eps is None else F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        h = F.linear(y, w1, b1)
        ctx.save_for_backward(x, h, norm_weight, norm_bias, w1, w2)
        ctx.eps = eps
        ctx.has_bias = (b1 is not None, b2 is not None)
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, h, norm_weight, norm_bias, w1, w2 = ctx.saved_tensors
        need_x, need_nw, need_nb, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        g, h = _rows(grad), _rows(h)
        gw2, gb2 = _linear_backward(g, F.gelu(h) if need_w2 else None, w2, need_w2,
                                    need_b2 and ctx.has_bias[1])
        gx = gnw = gnb = gw1 = gb1 = None
        needs_norm = (need_x, need_nw, need_nb)
        if any(needs_norm) or need_w1 or need_b1:
            gh = torch.ops.aten.gelu_backward(g.mm(w2), h)
            y = mean = rstd = None
            if ctx.eps is None:
                y = x
            elif need_w1 or any(needs_norm):
                y, mean, rstd = _normalise_again(x, norm_weight, norm_bias, ctx.eps)
            gw1, gb1 = _linear_backward(gh, _rows(y) if need_w1 else None, w1, need_w1,
                                        need_b1 and ctx.has_bias[0])
            if any(needs_norm):
                gy = gh.mm(w1).view(x.shape)
                if ctx.eps is None:
                    gx = gy
                else:
                    gx, gnw, gnb = _norm_backward(gy, x, norm_weight, norm_bias, mean, rstd,
                                                  needs_norm)
        return gx, gnw, gnb, None, gw1, gb1, gw2, gb2


class NormAddLinear(torch.autograd.Function):
    """``F.linear(a + norm(u), weight, bias)``, ``norm`` a LayerNorm over the last dimension,
    keeping a and u for the backward: the sum is computed again there. ``a`` and ``u``:
    ..., C_in of one shape; every tensor of one dtype; the bias may be None."""

    @staticmethod
    def forward(ctx, a, u, norm_weight, norm_bias, eps, weight, bias):
        z = a + F.layer_norm(u, u.shape[-1:], norm_weight, norm_bias, eps)
        ctx.save_for_backward(a, u, norm_weight, norm_bias, weight)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return F.linear(z, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        a, u, norm_weight, norm_bias, weight = ctx.saved_tensors
        need_a, need_u, need_nw, need_nb, _, need_w, need_b = ctx.needs_input_grad
        g = _rows(grad)
        needs_norm = (need_u, need_nw, need_nb)
        normed = mean = rstd = None
        if need_w or any(needs_norm):
            normed, mean, rstd = _normalise_again(u, norm_weight, norm_bias, ctx.eps)
        z = a + normed if need_w else None
        gw, gb = _linear_backward(g, None if z is None else _rows(z), weight, need_w,
                                  need_b and ctx.has_bias)
        ga = gu = gnw = gnb = None
        if need_a or any(needs_norm):
            gz = g.mm(weight).view(a.shape)
            ga = gz if need_a else None
            gu, gnw, gnb = _norm_backward(gz, u, norm_weight, norm_bias, mean, rstd, needs_norm)
        return ga, gu, gnw, gnb, None, gw, gb


def norm_mlp(x: torch.Tensor, norm: Optional[Norm], w1: torch.Tensor, b1: Optional[torch.Tensor],
             w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    """fc2(gelu(fc1(norm(x)))) keeping only x and fc1's output for the backward (see the
    module); ``norm``: (weight, bias, eps) of a LayerNorm, or None for the MLP alone. The
    norm runs in x's dtype, under autocast too."""
    weight, bias, eps = (None, None, None) if norm is None else norm
    with torch.autocast(x.device.type, enabled=False):
        return NormMlp.apply(x.contiguous(), weight, bias, eps, w1, b1, w2, b2)


def norm_add_linear(a: torch.Tensor, u: torch.Tensor, norm: Norm, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(a + norm(u), weight, bias) keeping only a and u for the backward (see the
    module); ``norm``: (weight, bias, eps) of a LayerNorm, run in u's dtype."""
    with torch.autocast(a.device.type, enabled=False):
        return NormAddLinear.apply(a, u, *norm, weight, bias)
