"""Inference replayed as CUDA graphs: one launch for the whole forward instead of hundreds.

At detection sizes the eager forward of a ResTv2 backbone launches about 325 kernels, and the
host launches them more slowly than the GPU runs them. :class:`GraphCache` records a forward
once per input signature (shape, dtype, device, autocast dtype) and replays it afterwards:

- a new signature runs eagerly the first time (which also warms up cuDNN's autotuning, the
  half-weight copies and the window tables); the second time it is captured and replayed;
- at most ``max_graphs`` signatures are kept, least recently used first out; all graphs
  share one memory pool, so their intermediate buffers are reused across shapes;
- the outputs are copied out of the graph's buffers, so a later call never overwrites
  tensors a neck still holds;
- anything the graphs were captured with (the weights, their half copies, the buffers)
  that changes address or version drops every graph, so a training step, a
  ``load_state_dict`` or ``.to()`` between two calls can never leave a stale capture;
- a capture that fails logs one warning and leaves that signature on the eager path.
"""
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import torch

Signature = Tuple


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _Graph:
    """One captured forward: its input buffer, graph and output buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out):
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out

    def __call__(self, x: torch.Tensor):
        self.static_in.copy_(x)
        self.graph.replay()
        return tuple(out.clone() for out in self.static_out)


class GraphCache:
    """CUDA graphs of a forward ``x -> tuple of tensors``, one per input signature.

    Args:
        max_graphs: signatures kept, least recently used first out.
        on_failure: called once with the exception when a recording first fails.
    """

    def __init__(self,
                 max_graphs: int = 16,
                 on_failure: Optional[Callable[[Exception], None]] = None):
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f'graph_cache_size={max_graphs!r} must be a positive int: the '
                             f'number of input sizes whose CUDA graphs are kept.')
        self.max_graphs = max_graphs
        self.on_failure = on_failure
        self.graphs: 'OrderedDict[Signature, _Graph]' = OrderedDict()
        self.seen: 'OrderedDict[Signature, None]' = OrderedDict()  # ran once, eagerly
        self.failed: Dict[Signature, str] = {}
        self.captures = 0  # how many graphs were recorded, for tests and reports
        self._pool = None
        self._state_key = None
        self._warned = False

    # A model that holds a cache is still deep-copyable and picklable: the copy starts empty.
    def __deepcopy__(self, memo):
        return GraphCache(self.max_graphs, self.on_failure)

    def __getstate__(self):
        return dict(max_graphs=self.max_graphs, on_failure=self.on_failure)

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self):
        return len(self.graphs)

    def clear(self):
        """Drop every graph (their memory returns to the pool) and what was seen."""
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()
        self._pool = None

    def __call__(self, forward: Callable[[torch.Tensor], tuple], x: torch.Tensor,
                 state_key) -> tuple:
        """``forward(x)``, replayed from a graph where one is (or can now be) recorded.

        ``forward`` must not synchronise with the host (no ``.item()``, no data-dependent
        shapes): a recording that does fails and leaves that signature eager.

        ``state_key`` stands for everything the graphs read besides ``x`` (addresses and
        versions of weights and buffers); when it differs from the last call's, every graph
        is dropped first.
        """
        if state_key != self._state_key:
            self.clear()
            self._state_key = state_key
        sig = (tuple(x.shape), x.dtype, x.device, _autocast_dtype(x.device.type))
        graph = self.graphs.get(sig)
        if graph is not None:
            self.graphs.move_to_end(sig)
            return graph(x)
        if sig in self.failed or sig not in self.seen:
            self._remember(sig)
            return forward(x)
        graph = self._capture(forward, x, sig)
        if graph is None:
            return forward(x)
        return graph(x)

    def _remember(self, sig: Signature):
        self.seen[sig] = None
        self.seen.move_to_end(sig)
        while len(self.seen) > 4 * self.max_graphs:
            self.seen.popitem(last=False)

    def _capture(self, forward, x: torch.Tensor, sig: Signature) -> Optional[_Graph]:
        del self.seen[sig]
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        static_in = x.clone()
        graph = torch.cuda.CUDAGraph()
        autocast = _autocast_dtype(x.device.type)
        try:
            # autocast's cast cache must not hand tensors made inside the capture to later
            # eager calls; the half-weight layers keep their own copies outside it
            with torch.autocast(x.device.type, dtype=autocast or torch.float16,
                                enabled=autocast is not None, cache_enabled=False), \
                    torch.cuda.graph(graph, pool=self._pool):
                static_out = forward(static_in)
        except Exception as e:  # noqa: BLE001  (any failure leaves the eager path in place)
            self.failed[sig] = f'{type(e).__name__}: {e}'
            torch.cuda.synchronize(x.device)
            if not self._warned and self.on_failure is not None:
                self._warned = True
                self.on_failure(e)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self.captures += 1
        self.graphs[sig] = entry = _Graph(graph, static_in, tuple(static_out))
        return entry
