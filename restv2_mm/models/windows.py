"""Window attention's bookkeeping: where each token goes in a window layout and back.

A token map is laid out in windows by one gather of its tokens and put back by one more;
padding to whole windows lives only in these index tables, which are cached per map size.
Two kinds of recording build them afresh instead, as ops of what is recorded:

- a CUDA graph (``fast_inference``): the graph then owns the tables, and no cache eviction
  can free memory it reads;
- an export or compilation (ONNX, torch.export, torch.compile, jit.trace), where sizes may
  be symbolic: the exported model then works for any batch and map size.
"""
import functools
from typing import Optional, Tuple

import torch


def recording_graph(*sizes) -> bool:
    """Whether a graph is being recorded, where sizes may be symbolic: torch.export and the
    ONNX exporter built on it, torch.compile (all three count as compiling), or jit.trace
    (which the TorchScript ONNX exporter uses)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or any(isinstance(s, torch.SymInt) for s in sizes))


def _capturing(device) -> bool:
    """Whether a CUDA graph is being recorded on the current stream."""
    return torch.device(device).type == 'cuda' and torch.cuda.is_current_stream_capturing()


def window_layout(H: int, W: int, window: int, device) -> Tuple[torch.Tensor, ...]:
    """How an H x W token map (row-major tokens) is laid out in window x window windows.

    The map is padded at the bottom and right to whole windows. Returns

    - gather (nW * window * window,): the token each windowed cell takes, windows in
      row-major order; a padding cell repeats the nearest real token, so it stays finite;
    - scatter (H * W,): where each token sits in the windowed layout (the reverse);
    - real (nW, window * window), bool: False for padding cells.

    The tables are cached, so they are made as normal tensors even under inference_mode:
    a training step may use them next. While a graph is recorded they are ops of that graph.
    """
    if recording_graph(H, W) or _capturing(device):
        return _window_layout(H, W, window, device)
    return _cached_window_layout(H, W, window, device)


@functools.lru_cache(maxsize=128)
def _cached_window_layout(H: int, W: int, window: int, device) -> Tuple[torch.Tensor, ...]:
    with torch.inference_mode(False):
        return _window_layout(H, W, window, device)


def _window_layout(H: int, W: int, window: int, device) -> Tuple[torch.Tensor, ...]:
    nH, nW = (H + window - 1) // window, (W + window - 1) // window  # ceil (see EMSAv2)
    rows = torch.arange(nH * window, device=device)
    cols = torch.arange(nW * window, device=device)

    def windowed(grid):  # Hp, Wp -> nW, window * window
        grid = grid.view(nH, window, nW, window).transpose(1, 2)
        return grid.reshape(nH * nW, window * window)

    gather = windowed(rows.clamp(max=H - 1)[:, None] * W + cols.clamp(max=W - 1)[None, :])
    real = windowed((rows < H)[:, None] & (cols < W)[None, :])
    place = torch.arange(gather.numel(), device=device).view(nH, nW, window, window)
    scatter = place.transpose(1, 2).reshape(nH * window, nW * window)[:H, :W].reshape(-1)
    return gather.reshape(-1), scatter, real


def window_key_mask(B: int, H: int, W: int, window: int, device) -> Optional[torch.Tensor]:
    """Which keys of each window are real: bool, B * nW, 1, 1, window * window (broadcast
    over heads and queries); None when the map is a whole number of windows.

    While a graph is recorded for export the mask is always made (all True where nothing is
    padded), so the recorded graph holds for every map size, padded or not.
    """
    if recording_graph(B, H, W):
        return _key_mask(B, _window_layout(H, W, window, device)[2])
    if H % window == 0 and W % window == 0:
        return None
    if _capturing(device):
        return _key_mask(B, window_layout(H, W, window, device)[2])
    return _cached_key_mask(B, H, W, window, device)


@functools.lru_cache(maxsize=64)
def _cached_key_mask(B: int, H: int, W: int, window: int, device) -> torch.Tensor:
    real = window_layout(H, W, window, device)[2]
    with torch.inference_mode(False):
        return _key_mask(B, real)


def _key_mask(B: int, real: torch.Tensor) -> torch.Tensor:
    return real[:, None, None, :].repeat(B, 1, 1, 1)
