"""Window attention's bookkeeping: where each token goes in a window layout and back.

A token map is laid out in windows by one gather of its tokens and put back by one more;
padding to whole windows lives only in these index tables, which are cached per map size.
(CUDA inference lays the tokens out with the Triton copies of :mod:`.fast_windows` instead,
which follow the same layout; there only the key masks come from here.) Recordings treat the
tables in two ways:

- a CUDA graph (``fast_inference``, ``fast_training``) reads the cached tables, made by the
  eager pass that comes before every recording; the tables it reads are collected while it
  is recorded (:func:`keep_tables_read`) and kept with the graph, so the cache dropping
  them cannot free memory the graph reads. Built inside the graph instead, they would cost
  about 40 small kernels a window block at every replay;
- an export or compilation (ONNX, torch.export, torch.compile, jit.trace), where sizes may
  be symbolic, builds them afresh as ops of what is recorded: the exported model then
  works for any batch and map size.
"""
import contextlib
from collections import OrderedDict
from typing import Callable, Iterator, List, Optional, Tuple

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


class _Tables:
    """Tables per key, at most ``size`` of them, the least recently used dropped first.
    They are made as normal tensors even under inference_mode: a training step may use
    them next."""

    def __init__(self, size: int):
        self.size = size
        self.entries: 'OrderedDict[tuple, object]' = OrderedDict()

    def get(self, key: tuple, make: Callable[[], object]):
        tables = self.entries.get(key)
        if tables is None:
            with torch.inference_mode(False):
                tables = make()
            self.entries[key] = tables
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return tables

    def clear(self):
        self.entries.clear()


_LAYOUTS = _Tables(128)
_KEY_MASKS = _Tables(64)
_kept: Optional[List] = None  # while a CUDA graph is recorded: the cached tables it reads


@contextlib.contextmanager
def keep_tables_read() -> Iterator[List]:
    """Around the recording of a CUDA graph: yields the list of the cached tables the graph
    reads. Whoever keeps the graph keeps the list. Without this, a recording builds the
    tables as ops of the graph."""
    global _kept
    outer, _kept = _kept, []
    try:
        yield _kept
    finally:
        _kept = outer


def _while_capturing(cache: _Tables, key: tuple, make: Callable[[], object]):
    """Tables for a CUDA graph being recorded: the cached ones, kept by the graph, where
    the eager pass before the recording made them; else made as ops of the graph (a
    recording cannot fill the cache: its ops run only when the graph replays)."""
    tables = cache.entries.get(key)
    if tables is None or _kept is None:
        return make()
    _kept.append(tables)
    return tables


def window_layout(H: int, W: int, window: int, device) -> Tuple[torch.Tensor, ...]:
    """How an H x W token map (row-major tokens) is laid out in window x window windows.

    The map is padded at the bottom and right to whole windows. Returns

    - gather (nW * window * window,): the token each windowed cell takes, windows in
      row-major order; a padding cell repeats the nearest real token, so it stays finite;
    - scatter (H * W,): where each token sits in the windowed layout (the reverse);
    - real (nW, window * window), bool: False for padding cells.

    Cached per size (see the module's notes on recordings).
    """
    def make():
        return _window_layout(H, W, window, device)

    if recording_graph(H, W):
        return make()
    key = (H, W, window, torch.device(device))
    if _capturing(device):
        return _while_capturing(_LAYOUTS, key, make)
    return _LAYOUTS.get(key, make)


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

    def make():
        return _key_mask(B, window_layout(H, W, window, device)[2])

    key = (B, H, W, window, torch.device(device))
    if _capturing(device):
        return _while_capturing(_KEY_MASKS, key, make)
    return _KEY_MASKS.get(key, make)


def _key_mask(B: int, real: torch.Tensor) -> torch.Tensor:
    return real[:, None, None, :].repeat(B, 1, 1, 1)
