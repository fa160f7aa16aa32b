"""Token maps into windows and back, each as one Triton copy, for window attention.

The window styles lay each block's queries and keys out in windows and put the attention's
output back in token order. With the index tables of :mod:`restv2_mm.models.windows`
these are gathers (``index_select``), which read an index for every token besides the
token itself; training keeps them, and ``python tools/analysis/profile_restv2.py
--attn-style win --modes train`` lists their time among a step's kernels. Here the same
layouts are copies whose addresses are computed in the kernel: no tables are read, and the
output is read from the attention's result as it is laid out (B * nW, heads, cells, head
channels), so its transposition costs nothing extra.

The layouts equal the tables' exactly: the map is padded at the bottom and right to whole
windows, a padding cell repeats the nearest real token, and padding cells are dropped on
the way back. Used for inference on CUDA only (no autograd; see :func:`can_use`), and only
where Triton imports; everywhere else the tables' gathers run.
"""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the index tables' gathers are used
    triton = None

TILE = 2048  # elements a program copies: window cells x channels


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _to_windows(x_ptr, y_ptr, H, W, C, nH, nW, WS: tl.constexpr, BLOCK_J: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        # one program: one row of one window (WS cells), a block of channels
        row = tl.program_id(0)  # b * nH * WS + row of the padded map
        b = row // (nH * WS)
        r = row % (nH * WS)
        win_col = tl.program_id(1)
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cells = tl.arange(0, BLOCK_J)
        ok = (cells < WS)[:, None] & (chans < C)[None, :]
        src_h = tl.minimum(r, H - 1)
        src_w = tl.minimum(win_col * WS + cells, W - 1)
        src = ((b * H + src_h).to(tl.int64) * W + src_w[:, None]) * C + chans[None, :]
        win = (b * nH + r // WS) * nW + win_col
        dst = ((win.to(tl.int64) * WS + r % WS) * WS + cells[:, None]) * C + chans[None, :]
        tl.store(y_ptr + dst, tl.load(x_ptr + src, mask=ok), mask=ok)

    @triton.jit
    def _from_windows(o_ptr, y_ptr, H, W, C, nH, nW, head_dim, stride_win, stride_head,
                      stride_cell, stride_chan, WS: tl.constexpr, BLOCK_J: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        # one program: the tokens of one map row inside one window, a block of channels
        row = tl.program_id(0)  # b * H + h
        b = row // H
        h = row % H
        win_col = tl.program_id(1)
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cells = tl.arange(0, BLOCK_J)
        w = win_col * WS + cells
        ok = ((cells < WS) & (w < W))[:, None] & (chans < C)[None, :]
        win = (b * nH + h // WS) * nW + win_col
        cell = (h % WS) * WS + cells
        src = (win.to(tl.int64) * stride_win + cell[:, None].to(tl.int64) * stride_cell
               + (chans // head_dim)[None, :] * stride_head
               + (chans % head_dim)[None, :] * stride_chan)
        dst = (row.to(tl.int64) * W + w[:, None]) * C + chans[None, :]
        tl.store(y_ptr + dst, tl.load(o_ptr + src, mask=ok), mask=ok)


def can_use(*tensors: torch.Tensor) -> bool:
    """Whether the Triton copies may replace the tables' gathers for these token maps:
    contiguous CUDA tensors, nothing to differentiate, no export or compilation."""
    return (triton is not None
            and all(t.is_cuda and t.is_contiguous() and t.numel() > 0 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def _blocks(window: int, channels: int):
    block_j = triton.next_power_of_2(window)
    return block_j, min(triton.next_power_of_2(channels), max(16, TILE // block_j))


def to_windows(x: torch.Tensor, H: int, W: int, window: int) -> torch.Tensor:
    """Tokens (B, H * W, C) of a row-major H x W map -> (B * nW, window * window, C), the
    windows in row-major order (as ``x.index_select(1, gather)`` with the tables)."""
    B, N, C = x.shape
    if N != H * W:
        raise ValueError(f'{N} tokens are not a {H} x {W} map.')
    nH, nW = triton.cdiv(H, window), triton.cdiv(W, window)
    y = x.new_empty(B * nH * nW, window * window, C)
    block_j, block_c = _blocks(window, C)
    grid = (B * nH * window, nW, triton.cdiv(C, block_c))
    _to_windows[grid](x, y, H, W, C, nH, nW, WS=window, BLOCK_J=block_j, BLOCK_C=block_c,
                      num_warps=4)
    return y


def from_windows(out: torch.Tensor, B: int, H: int, W: int, window: int) -> torch.Tensor:
    """Attention output (B * nW, heads, window * window, head channels), any strides ->
    tokens (B, H * W, heads * head channels) of the H x W map, padding cells dropped."""
    _, heads, _, head_dim = out.shape
    C = heads * head_dim
    nH, nW = triton.cdiv(H, window), triton.cdiv(W, window)
    y = out.new_empty(B, H * W, C)
    block_j, block_c = _blocks(window, C)
    grid = (B * H, nW, triton.cdiv(C, block_c))
    _from_windows[grid](out, y, H, W, C, nH, nW, head_dim, *out.stride(), WS=window,
                        BLOCK_J=block_j, BLOCK_C=block_c, num_warps=4)
    return y
