"""Layers that keep half-precision copies of their weights for inference under autocast.

At detection sizes a ResTv2 forward is bound by the host launching kernels, and autocast
adds one cast kernel per weight per call. These drop-in subclasses of ``nn.Linear``,
``nn.Conv2d`` and ``nn.LayerNorm`` reuse their half copies while the weights do not change;
with gradients on they behave exactly as the ``torch.nn`` layers under autocast.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast_norm


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs matrix products in on x's device, or None outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


class HalfWeights:
    """Mixin for layers with ``weight`` and ``bias``: their copies in a half dtype.

    Autocast casts every weight on every call, one copy kernel each (about 170 per forward
    of ResTv2-T); at detection sizes the forward is bound by such launches on the host. Under
    no_grad the copies are kept, one set per half dtype, until the weights change (a new
    version, device or storage); a CUDA graph recorded with them stays valid for as long as
    the weights do. With gradients, and while torch.compile traces, they are made afresh as
    autocast would.
    """

    def _params_as(self, dtype: torch.dtype):
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return w.to(dtype), None if b is None else b.to(dtype)
        key = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        copies = self.__dict__.setdefault('_half_copies', {})  # dtype -> (key, w, b)
        cached = copies.get(dtype)
        if cached is None or cached[0] != key:
            cached = copies[dtype] = (key, w.to(dtype), None if b is None else b.to(dtype))
        return cached[1:]


class Linear(HalfWeights, nn.Linear):
    """``nn.Linear`` that reuses its half weights in inference under autocast."""

    def forward(self, x):
        dtype = autocast_dtype(x)
        if dtype is None or torch.is_grad_enabled():
            return super().forward(x)
        return F.linear(x, *self._params_as(dtype))


class Conv2d(HalfWeights, nn.Conv2d):
    """``nn.Conv2d`` that reuses its half weights in inference under autocast."""

    def forward(self, x):
        dtype = autocast_dtype(x)
        if dtype is None or torch.is_grad_enabled():
            return super().forward(x)
        return self._conv_forward(x, *self._params_as(dtype))


class LayerNorm(HalfWeights, nn.LayerNorm):
    """``nn.LayerNorm`` (eps 1e-6) that keeps half-precision activations half under autocast.

    Autocast runs layer_norm in float32 and returns float32, so each of ResTv2's ~50 norms
    would move twice the bytes and the layer after it would cast back (a third of the GPU
    time of the T backbone at 224 x 224, batch 128). The CUDA kernel accumulates half inputs
    in float32, so the result equals autocast's up to the final rounding. It needs weights
    of the input's dtype (see :class:`HalfWeights`). Inference on CUDA goes through
    :mod:`restv2_mm.models.fast_norm` where Triton is installed, which reads the float32
    weights directly. Outside autocast this is nn.LayerNorm.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)

    def forward(self, x):
        if fast_norm.can_use(x, self.weight):  # CUDA inference: one Triton kernel
            return fast_norm.layer_norm(x, self.weight, self.bias, self.eps)
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
                x.device.type):
            weight, bias = self._params_as(x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return super().forward(x)
