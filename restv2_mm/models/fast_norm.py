"""LayerNorm over the channels of token maps, one Triton kernel for many short rows.

ResTv2 normalises tokens of 96 to 768 channels, about 50 times a forward. PyTorch's CUDA
LayerNorm gives each row a thread block of its own, which suits long rows; at detection
sizes a ResTv2-T forward has more than a hundred thousand rows of 96 channels, and the
norms took 28% of its GPU time (H200, 800 x 1344, fp16). This kernel normalises a tile of
rows per program, reading each element once and writing it once, in float32 arithmetic
with the float32 weights, and writes the input's dtype.

It is used for inference on CUDA only (no autograd; see :func:`can_use`), and only where
Triton imports; everywhere else the layer is ``nn.LayerNorm``.
"""
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only torch, some platforms): the PyTorch path is used
    triton = None

TILE = 4096  # elements a program normalises: rows x the channels padded to a power of two


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _layer_norm_rows(x_ptr, w_ptr, b_ptr, y_ptr, n_rows, n_cols, eps,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        centred = tl.where(ok, x - mean[:, None], 0.)
        rstd = 1. / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)


def can_use(x: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Whether :func:`layer_norm` may replace ``F.layer_norm`` for this call."""
    return (triton is not None and x.is_cuda and weight is not None
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.is_contiguous() and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` (contiguous, CUDA) over its last dimension, in x's dtype."""
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, TILE // block_cols)
    y = torch.empty_like(x)
    grid = (triton.cdiv(n_rows, block_rows), )
    _layer_norm_rows[grid](x, weight, bias, y, n_rows, n_cols, eps, BLOCK_ROWS=block_rows,
                           BLOCK_COLS=block_cols, num_warps=4)
    return y
