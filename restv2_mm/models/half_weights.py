"""Layers that take their weights in half precision from one place under autocast.

At detection sizes a ResTv2 forward is bound by the host launching kernels, and autocast
adds one cast kernel per weight per call, and one more per weight in the backward. These
drop-in subclasses of ``nn.Linear``, ``nn.Conv2d`` and ``nn.LayerNorm`` avoid both:

- in inference they reuse their half copies while the weights do not change;
- in a forward with gradients, :func:`shared_half_copies` casts the weights of all of them
  at once (one concatenation, one cast) and hands each layer its slice; the backward then
  converts all their gradients back in one kernel too. The numbers are autocast's: the
  same roundings of the same weights and gradients.

Outside autocast they are the ``torch.nn`` layers.
"""
import contextlib
from typing import Iterator, List, Optional

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
    the weights do. With gradients they come from :func:`shared_half_copies` where it is
    active; otherwise, and while torch.compile traces, they are made afresh as autocast
    would.
    """

    def _params_as(self, dtype: torch.dtype):
        shared = self.__dict__.get('_shared_halves')  # set by shared_half_copies
        if shared is not None and shared[0] == dtype:
            return shared[1:]
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return w.to(dtype), None if b is None else b.to(dtype)
        key = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        copies = self.__dict__.setdefault('_half_copies', {})  # dtype -> (key, w, b)
        cached = copies.get(dtype)
        if cached is None or cached[0] != key:
            cached = copies[dtype] = (key, w.to(dtype), None if b is None else b.to(dtype))
        return cached[1:]

    def params_for(self, x: torch.Tensor):
        """(weight, bias) as this layer would compute with them on input ``x``: autocast's
        half copies under autocast, the parameters themselves otherwise."""
        dtype = autocast_dtype(x)
        if dtype is None:
            return self.weight, self.bias
        return self._params_as(dtype)

    def _reused_half_params(self, x: torch.Tensor):
        """(weight, bias) in autocast's dtype where this call needs no cast of its own (in
        inference, or inside :func:`shared_half_copies`); None where the ``torch.nn`` layer
        should run as it is."""
        dtype = autocast_dtype(x)
        if dtype is None or (torch.is_grad_enabled()
                             and '_shared_halves' not in self.__dict__):
            return None
        return self._params_as(dtype)


class _HalfCopies(torch.autograd.Function):
    """Copies of many float32 tensors in one half dtype, made by one cast of their
    concatenation; in the backward their gradients go back to float32 by one cast too. One
    autograd node stands for all of them: slices of a concatenation would add two view
    nodes per tensor to every backward, each a step of the host's work there."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        flat = torch._C._nn.flatten_dense_tensors(tensors).to(dtype)
        return tuple(torch._C._nn.unflatten_dense_tensors(flat, tensors))

    @staticmethod
    def backward(ctx, *grads):
        flat = torch._C._nn.flatten_dense_tensors(grads).float()
        return (None, ) + tuple(torch._C._nn.unflatten_dense_tensors(flat, grads))


@contextlib.contextmanager
def shared_half_copies(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, every :class:`HalfWeights` layer of ``module`` takes its weights
    from one ``dtype`` copy of all of them, made by one concatenation and one cast.

    For one forward with gradients under autocast: autocast would cast each weight on its
    own and convert each gradient back on its own, about 400 kernels for ResTv2-T's ~200
    weights and biases; here both directions take a few, and the backward has one node for
    all of them. Layers with frozen or non-float32 weights are left to cast their own, so
    that no gradient is computed for the frozen ones. Gradients arrive once the backward has
    passed every layer.
    """
    layers: List[HalfWeights] = [
        m for m in module.modules() if isinstance(m, HalfWeights) and all(
            t.requires_grad and t.dtype == torch.float32 for t in (m.weight, m.bias)
            if t is not None)
    ]
    tensors = [t for m in layers for t in (m.weight, m.bias) if t is not None]
    if not tensors:
        yield
        return
    halves = iter(_HalfCopies.apply(dtype, *tensors))
    for m in layers:
        w = next(halves)
        b = None if m.bias is None else next(halves)
        m.__dict__['_shared_halves'] = (dtype, w, b)
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop('_shared_halves', None)


class Linear(HalfWeights, nn.Linear):
    """``nn.Linear`` that takes half weights without a cast per call under autocast."""

    def forward(self, x):
        params = self._reused_half_params(x)
        return super().forward(x) if params is None else F.linear(x, *params)


class Conv2d(HalfWeights, nn.Conv2d):
    """``nn.Conv2d`` that takes half weights without a cast per call under autocast."""

    def forward(self, x):
        params = self._reused_half_params(x)
        return super().forward(x) if params is None else self._conv_forward(x, *params)


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
