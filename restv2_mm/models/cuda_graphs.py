"""Forward passes (and training steps) replayed as CUDA graphs: one launch instead of hundreds.

At detection sizes the eager forward of a ResTv2 backbone launches about 325 kernels, and the
host launches them more slowly than the GPU runs them. The caches here record a pass once per
input signature (shape, dtype, device, autocast dtype) and replay it afterwards:

- :class:`GraphCache` (``fast_inference``): the forward without gradients;
- :class:`TrainGraphCache` (``fast_training``): the forward with gradients and its backward,
  as one autograd node whose backward replays the second graph.

Both share the same policy:

- a new signature runs eagerly the first time (which also warms up cuDNN's autotuning, the
  half-weight copies and the window tables); the second time it is captured and replayed;
- at most ``max_graphs`` signatures are kept. Every call counts a sighting of its signature;
  when the cache is full, a signature takes the place of the least-seen recorded one only
  once it has been seen more often by a margin (a quarter), so a stream of many sizes keeps
  its frequent ones recorded and its rare ones eager, and sizes about as frequent as each
  other do not take turns being recorded. The counts start again when the graphs are
  dropped (below). All graphs of a cache share one memory pool, so their intermediate
  buffers are reused across shapes;
- the outputs are copied out of the graph's buffers, so a later call never overwrites
  tensors a neck still holds;
- when the state the graphs were captured with changes (see ``state_key``), every graph is
  dropped, so a ``load_state_dict``, ``.to()`` or a newly frozen stage can never leave a
  stale capture;
- a capture that fails logs one warning and leaves that signature on the eager path.
"""
import contextlib
import weakref
from collections import OrderedDict
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

Signature = Tuple


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _no_autocast_cache(x: torch.Tensor):
    """Autocast as it is now, without its cast cache: a cached cast made inside a capture
    would be handed to later eager calls (the half-weight layers keep their own copies)."""
    dtype = _autocast_dtype(x.device.type)
    return torch.autocast(x.device.type, dtype=dtype or torch.float16,
                          enabled=dtype is not None, cache_enabled=False)


def _end_random_state_recording(device: torch.device):
    """A recording that fails part-way leaves the device's random-number generator in its
    recording state, and the next random op outside a recording (a head's dropout) raises.
    Recording one small op to completion ends that state."""
    if device.type != 'cuda':
        return
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.zeros(1, device=device)
    torch.cuda.synchronize(device)


@contextlib.contextmanager
def _standing_in(owner: Optional[torch.nn.Module], params: Sequence[torch.nn.Parameter],
                 stand_ins: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, ``owner`` and its submodules hold ``stand_ins[i]`` wherever they
    held ``params[i]``; nothing changes without an owner."""
    if owner is None:
        yield
        return
    by_id = {id(p): s for p, s in zip(params, stand_ins)}
    held = [(m, name, p) for m in owner.modules() for name, p in m._parameters.items()
            if p is not None and id(p) in by_id]
    try:
        for m, name, p in held:
            m._parameters[name] = by_id[id(p)]
        yield
    finally:
        for m, name, p in held:
            m._parameters[name] = p


class _SignatureCache:
    """What both caches share: signatures, the capture-on-second-sight policy, eviction,
    the shared pool, failures and the state key."""

    def __init__(self,
                 max_graphs: int = 16,
                 on_failure: Optional[Callable[[Exception], None]] = None,
                 arg_name: str = 'graph_cache_size',
                 keep: Optional[Callable[[], ContextManager[List]]] = None):
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f'{arg_name}={max_graphs!r} must be a positive int: the '
                             f'number of input sizes whose CUDA graphs are kept.')
        self.max_graphs = max_graphs
        self.on_failure = on_failure
        self.arg_name = arg_name
        self.keep = keep
        self.graphs: 'OrderedDict[Signature, object]' = OrderedDict()  # least recent first
        self.sightings: Dict[Signature, int] = {}  # calls per signature since the last clear
        self.failed: Dict[Signature, str] = {}
        self.captures = 0  # how many graphs were recorded, for tests and reports
        self._pool = None
        self._state_key = None
        self._warned = False

    # A model that holds a cache is still deep-copyable and picklable: the copy starts empty.
    def __deepcopy__(self, memo):
        return type(self)(self.max_graphs, self.on_failure, self.arg_name, self.keep)

    def __getstate__(self):
        return dict(max_graphs=self.max_graphs, on_failure=self.on_failure,
                    arg_name=self.arg_name, keep=self.keep)

    def __setstate__(self, state):
        self.__init__(**state)

    def __len__(self):
        return len(self.graphs)

    def clear(self):
        """Drop every graph (their memory returns to the pool) and what was seen."""
        self._release()
        self.graphs.clear()
        self.sightings.clear()
        self.failed.clear()
        self._pool = None

    def __call__(self, forward: Callable[[torch.Tensor], tuple], x: torch.Tensor,
                 state_key) -> tuple:
        """``forward(x)``, replayed from a graph where one is (or can now be) recorded.

        ``forward`` must not synchronise with the host (no ``.item()``, no data-dependent
        shapes): a recording that does fails and leaves that signature eager.

        ``state_key`` stands for everything the graphs read besides ``x`` (see each
        cache); when it differs from the last call's, every graph is dropped first.
        """
        if state_key != self._state_key:
            self.clear()
            self._state_key = state_key
        sig = (tuple(x.shape), x.dtype, x.device, _autocast_dtype(x.device.type))
        seen = self._sight(sig)
        graph = self.graphs.get(sig)
        if graph is not None:
            self.graphs.move_to_end(sig)
            return graph(x)
        admitted, replaced = self._admits(seen)
        if sig in self.failed or not admitted:
            return forward(x)
        if replaced is not None:
            del self.graphs[replaced]
        try:
            graph = self._record(forward, x)
        except Exception as e:  # noqa: BLE001  (any failure leaves the eager path in place)
            self.failed[sig] = f'{type(e).__name__}: {e}'
            torch.cuda.synchronize(x.device)
            _end_random_state_recording(x.device)
            if not self._warned and self.on_failure is not None:
                self._warned = True
                self.on_failure(e)
            return forward(x)
        self.captures += 1
        self.graphs[sig] = graph
        return graph(x)

    def _release(self):
        """When the graphs are dropped: what the cache keeps beside them goes too."""

    def _sight(self, sig: Signature) -> int:
        """Counts one call of ``sig`` and returns its sightings so far. The counts of at most
        ``16 * max_graphs`` signatures are kept: past that, the least-seen one that is not
        recorded is forgotten."""
        seen = self.sightings.get(sig, 0) + 1
        self.sightings[sig] = seen
        if seen == 1 and len(self.sightings) > 16 * self.max_graphs:
            rest = (s for s in self.sightings if s not in self.graphs and s != sig)
            del self.sightings[min(rest, key=self.sightings.__getitem__)]
        return seen

    def _least_seen(self) -> Signature:
        """The recorded signature seen least often (of equals, the least recently used)."""
        return min(self.graphs, key=self.sightings.__getitem__)

    def _admits(self, seen: int) -> Tuple[bool, Optional[Signature]]:
        """Whether a signature seen ``seen`` times, not recorded, is recorded now, and the
        recorded one it replaces when the cache is full (else None)."""
        if seen < 2:
            return False, None
        if len(self.graphs) < self.max_graphs:
            return True, None
        least = self._least_seen()
        fewer = self.sightings[least]
        return seen > fewer + max(1, fewer // 4), least

    def _graph(self, first: Optional[torch.cuda.CUDAGraph] = None):
        """A graph and the context that records into it, in this cache's pool."""
        graph = torch.cuda.CUDAGraph()
        pool = self._pool if first is None else first.pool()
        # thread_local: a data loader's pin-memory thread may touch CUDA meanwhile
        return graph, torch.cuda.graph(graph, pool=pool, capture_error_mode='thread_local')

    def _keeping(self) -> ContextManager[List]:
        """Around a recording: yields a list of what the graph reads besides its own
        buffers (``keep``'s, e.g. cached index tables), which the graph's entry holds."""
        return contextlib.nullcontext([]) if self.keep is None else self.keep()

    def _record(self, forward, x: torch.Tensor):
        raise NotImplementedError


class _Graph:
    """One captured forward: its input buffer, graph and output buffers."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out,
                 kept: List):
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out
        self.kept = kept  # tensors the graph reads that live outside its pool

    def __call__(self, x: torch.Tensor):
        self.static_in.copy_(x)
        self.graph.replay()
        return tuple(out.clone() for out in self.static_out)


class GraphCache(_SignatureCache):
    """CUDA graphs of a forward ``x -> tuple of tensors`` without gradients, one per input
    signature. ``state_key`` should hold the addresses and versions of the weights and
    buffers: an update in place (a training step) then drops the graphs too.

    Args:
        max_graphs: signatures kept (see the module's policy).
        on_failure: called once with the exception when a recording first fails.
    """

    def _record(self, forward, x: torch.Tensor) -> _Graph:
        static_in = x.clone()
        graph, recording = self._graph()
        with _no_autocast_cache(x), self._keeping() as kept, recording:
            static_out = forward(static_in)
        if self._pool is None:
            self._pool = graph.pool()
        return _Graph(graph, static_in, tuple(static_out), kept)


class _TrainGraph:
    """One captured training pass: the forward graph, the backward graph and their buffers.

    The backward graph leaves the parameters' gradients in the cache's gradient buffers,
    one set that every graph of the cache shares (see :class:`TrainGraphCache`). They are
    handed to autograd as they are (no copy), so after the step each ``param.grad`` shares
    memory with them.
    """

    def __init__(self, cache: 'TrainGraphCache', fwd: torch.cuda.CUDAGraph,
                 bwd: torch.cuda.CUDAGraph, static_in: torch.Tensor,
                 static_outs: Tuple[torch.Tensor, ...], static_grad_outs, params,
                 static_grads, kept: List):
        self.cache = cache
        self.fwd, self.bwd = fwd, bwd
        self.static_in = static_in
        self.static_outs = static_outs
        self.static_grad_outs = static_grad_outs
        self.params: Tuple[torch.nn.Parameter, ...] = tuple(params)
        self.static_grads: Tuple[Optional[torch.Tensor], ...] = tuple(static_grads)
        self.replays = 0  # forward replays; a backward must belong to the latest one
        self.kept = kept  # tensors the graphs read that live outside their pool

    def __call__(self, x: torch.Tensor):
        return _ReplayTrainGraph.apply(self, x, *self.params)


class _ReplayTrainGraph(torch.autograd.Function):
    """Forward: the forward graph; backward: the backward graph, returning the parameters'
    gradients. The parameters are inputs so that autograd accumulates their gradients."""

    @staticmethod
    def forward(ctx, entry: _TrainGraph, x: torch.Tensor, *params):
        entry.cache.release_held_grads()  # the first recording's buffers overlap its forward
        entry.static_in.copy_(x)
        entry.fwd.replay()
        entry.replays += 1
        ctx.entry, ctx.replay = entry, entry.replays
        entry.cache.open_backward = weakref.ref(ctx)
        outs = tuple(out.clone() for out in entry.static_outs)
        # outputs of frozen stages have no gradient, as in the eager forward
        ctx.mark_non_differentiable(*(o for o, g in zip(outs, entry.static_grad_outs)
                                      if g is None))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        entry: _TrainGraph = ctx.entry
        if ctx.replay != entry.replays:
            raise RuntimeError(
                'ResTv2 fast_training: this backward belongs to a forward whose recorded '
                'activations a later forward of the same input size has replaced (a graph '
                'kept with retain_graph=True and run backward again after another forward). '
                'Build the backbone with fast_training=False for such loops.')
        for static, grad in zip(entry.static_grad_outs, grads):
            if static is not None:
                static.copy_(grad)
        entry.cache.release_held_grads()  # accumulating: the earlier gradients move out first
        entry.bwd.replay()
        entry.cache.open_backward = None
        return (None, None) + tuple(None if g is None else g.detach()
                                    for g in entry.static_grads)


class TrainGraphCache(_SignatureCache):
    """CUDA graphs of a training pass: ``forward(x)`` with gradients and its backward to the
    parameters that require them, one pair per input signature.

    ``state_key`` should hold the addresses of the weights and buffers, which of them
    require gradients and anything the forward reads as a Python value (drop-path rates,
    train/eval flags), but not their versions: the optimizer updates the weights in place
    between steps and the graphs read them where they are.

    A forward that comes while the backward of an earlier replay is still to run (two
    forwards, then one backward of both) runs eagerly: the graph's buffers hold the first
    one's activations.

    Memory: the first recording's backward leaves the parameters' gradients in its pool,
    where they may share memory with its forward's activations; those tensors then serve
    every later recording too, whose backward ends by copying its gradients into them, so a
    size recorded later holds no gradients of its own. The gradients of the outputs are
    read from the outputs' own memory where the backward does not read that memory. As any
    replay may overwrite the gradient buffers, a ``param.grad`` still sharing them when the
    next one starts (gradients accumulated over steps) first moves to memory of its own.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open_backward: Optional[weakref.ref] = None  # the latest replay, until its backward
        self._params: Sequence[torch.nn.Parameter] = ()
        self._owner: Optional[torch.nn.Module] = None
        # the gradients every backward graph writes: one per parameter that requires one
        self.grad_buffers: Dict[int, torch.Tensor] = {}
        self._grad_ptrs: set = set()

    def __call__(self, forward, x: torch.Tensor, state_key,
                 params: Sequence[torch.nn.Parameter] = (),
                 owner: Optional[torch.nn.Module] = None) -> tuple:
        """As :meth:`GraphCache.__call__`; ``params`` are the parameters ``forward`` reads,
        of which those that require gradients get them from the backward graph. ``owner``:
        the module that holds them, whose forward is recorded with stand-ins for them (see
        :meth:`_record`)."""
        if self.open_backward is not None and self.open_backward() is not None:
            return forward(x)
        self.open_backward = None
        self._params = params
        self._owner = owner
        try:
            return super().__call__(forward, x, state_key)
        finally:
            self._owner = None  # a module holding this cache is not held by it in turn

    def release_held_grads(self):
        """Give every ``param.grad`` that still shares the gradient buffers memory of its
        own, before a replay overwrites them (gradients kept across steps: accumulation)."""
        if not self._grad_ptrs:
            return
        for p in self._params:
            g = p.grad
            if g is not None and g.data_ptr() in self._grad_ptrs:
                p.grad = g.clone()

    def _release(self):
        # a gradient still held keeps its buffer alive; the next recording makes new ones
        self.grad_buffers = {}
        self._grad_ptrs = set()

    def _record(self, forward, x: torch.Tensor) -> _TrainGraph:
        indexed = [(i, p) for i, p in enumerate(self._params) if p.requires_grad]
        params = [p for _, p in indexed]
        # The owner's forward is recorded with stand-ins for its parameters: new leaves on the
        # same memory. The backward hands each parameter's gradient to the node that
        # accumulates it and waits on that node's stream; a node made before the recording
        # and held since (DistributedDataParallel makes them when it wraps the model, on the
        # default stream) cannot be waited on from a recording. A stand-in's node is made
        # within it. Replays read and train the parameters themselves.
        stand_ins = [torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                     for p in self._params]
        recorded_params = [stand_ins[i] for i, _ in indexed]
        static_in = x.detach().clone()
        saved = set()  # storages the forward keeps for its backward

        def pack(t):
            saved.add(t.untyped_storage().data_ptr())
            return t

        fwd, recording = self._graph()
        with self._keeping() as kept, _no_autocast_cache(x), recording, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                _standing_in(self._owner, self._params, stand_ins):
            static_outs = tuple(forward(static_in))
        # The gradients of the outputs arrive in the outputs' own memory where the backward
        # does not read that memory (a replay's outputs are copied out at once); the
        # backward runs outside autocast, as mmengine's optimizer wrappers run it.
        static_grad_outs = tuple(self._grad_out_buffer(o, saved) for o in static_outs)
        bwd, recording = self._graph(first=fwd)
        with recording:
            grads = torch.autograd.grad(
                [o for o in static_outs if o.requires_grad], recorded_params,
                [g for g in static_grad_outs if g is not None], allow_unused=True)
            # later sizes copy into the buffers of the first recording
            shared = [(self.grad_buffers[i], g) for (i, _), g in zip(indexed, grads)
                      if g is not None and i in self.grad_buffers]
            if shared:
                torch._foreach_copy_([b for b, _ in shared], [g for _, g in shared])
        for (i, _), g in zip(indexed, grads):
            if g is not None and i not in self.grad_buffers:
                self.grad_buffers[i] = g
                self._grad_ptrs.add(g.data_ptr())
        static_grads = [None if g is None else self.grad_buffers[i]
                        for (i, _), g in zip(indexed, grads)]
        del grads, shared, stand_ins, recorded_params
        if self._pool is None:
            self._pool = fwd.pool()
        static_outs = tuple(o.detach() for o in static_outs)
        static_grad_outs = tuple(None if g is None else g.detach() for g in static_grad_outs)
        return _TrainGraph(self, fwd, bwd, static_in, static_outs, static_grad_outs, params,
                           static_grads, kept)

    @staticmethod
    def _grad_out_buffer(out: torch.Tensor, taken: set) -> Optional[torch.Tensor]:
        """Where the backward graph reads the gradient of ``out``: ``out``'s own memory when
        neither the backward nor another output's gradient uses it (``taken``: the storages
        in use, which this adds to), else a buffer of its own; None without a gradient."""
        if not out.requires_grad:
            return None
        storage = out.untyped_storage().data_ptr()
        if storage in taken:
            return torch.empty_like(out)
        taken.add(storage)
        return out
