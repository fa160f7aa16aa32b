"""The CUDA paths: fp16 autocast with reused half weights, channels-last input, SDPA kernels.

Marked ``gpu``: skipped without a CUDA device (see conftest.py).
"""
import pytest
import torch

from restv2_mm import ResTv2

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matrix products in float32, not TF32, so paths can be compared closely."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cuda_model(**kwargs):
    torch.manual_seed(0)
    model = ResTv2('tiny', **kwargs)
    model.init_weights()
    return model.cuda().eval()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize('style', ['global', 'win', 'hwin'])
def test_sdpa_equals_explicit_on_cuda_in_float32(style):
    model = cuda_model(attn_style=style, window_size=(16, 8, 4, 2))
    x = torch.rand(2, 3, 225, 301, device='cuda')  # no map is a whole number of windows
    with torch.no_grad():
        fast = model(x)
        model.set_attn_impl('explicit')
        slow = model(x)
    for a, b in zip(fast, slow):
        assert rel_err(a, b) < 1e-4


def test_fp16_inference_follows_float32_and_reuses_half_weights():
    model = cuda_model()
    x = torch.rand(2, 3, 225, 301, device='cuda')
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.float16):
            first = model(x)
            again = model(x)  # from the kept half copies
    for r, a, b in zip(ref, first, again):
        assert a.dtype == torch.float16
        assert rel_err(b, a) < 1e-4
        assert rel_err(a, r) < 2e-2
    assert model.stage1[0].attn.q.__dict__['_half_copies'][torch.float16][1].dtype == torch.float16


def test_half_copies_follow_new_weights_on_cuda():
    model = cuda_model()
    x = torch.rand(1, 3, 128, 128, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        before = model(x)
    torch.manual_seed(1)
    other = ResTv2('tiny')
    other.init_weights()
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.float16):
            after = model(x)
    assert rel_err(after[-1], ref[-1]) < 2e-2
    assert rel_err(after[-1], before[-1]) > 0.05


@pytest.mark.parametrize('style', ['global', 'win', 'cwin', 'hwin'])
def test_amp_training_step_on_cuda(style):
    model = cuda_model(attn_style=style, window_size=(16, 8, 4, 2), with_cp=True,
                       drop_path_rate=0.1).train()
    x = torch.rand(2, 3, 160, 224, device='cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        outs = model(x)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('style', ['global', 'hwin'])
def test_amp_training_casts_weights_once_and_follows_autocast(style):
    """One cast of all weights (and a recomputed GELU) against each layer casting its own
    and autograd's MLP: the same step in fp16, and a few hundred fewer kernels."""
    import copy

    from restv2_mm.models.restv2 import Mlp
    from test_backbone import CountOps
    model = cuda_model(attn_style=style, window_size=(16, 8, 4, 2)).train()
    plain = copy.deepcopy(model)
    plain._half_dtype_for_training = lambda x: None
    x = torch.rand(2, 3, 160, 224, device='cuda')

    def step(m):
        with CountOps() as ops:
            with torch.autocast('cuda', dtype=torch.float16):
                outs = m(x)
                loss = sum(o.float().pow(2).mean() for o in outs)
            (loss * 1024).backward()  # scaled as GradScaler would: no fp16 underflow
        return outs, ops.counts

    outs, counts = step(model)
    recomputes = Mlp._recomputes
    try:
        Mlp._recomputes = lambda self, x: False
        ref, ref_counts = step(plain)
    finally:
        Mlp._recomputes = recomputes
    for a, b in zip(outs, ref):
        assert a.dtype == torch.float16 and rel_err(a, b) < 1e-3
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32, name
        if q.grad.norm() > 0:
            assert rel_err(p.grad, q.grad) < 2e-2, name
        else:
            assert p.grad.norm() == 0, name
    assert ref_counts['_to_copy'] - counts['_to_copy'] > 300


def test_training_attention_in_query_chunks_follows_whole_attentions(monkeypatch):
    """On CUDA a training forward cuts the queries of stages 1 and 2 into chunks, each a
    batch entry of the fused kernel (see attention.py): the same step as whole attentions,
    in float32 and under AMP."""
    from restv2_mm.models import restv2
    from restv2_mm.models.attention import query_chunks
    model = cuda_model().train()
    x = torch.rand(2, 3, 256, 384, device='cuda')

    def step(amp):
        model.zero_grad()
        with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
            outs = model(x)
        # fixed random weights: the mean of a normalised map's squares would hardly move
        weights = torch.Generator().manual_seed(1)
        sum((o.float() * torch.randn(o.shape, generator=weights).cuda()).sum()
            for o in outs).backward()
        return outs, [p.grad.clone() for p in model.parameters()]

    cut = []

    def spy(*args):
        cut.append(query_chunks(*args))
        return cut[-1]

    monkeypatch.setattr(restv2, 'query_chunks', spy)
    chunked = {amp: step(amp) for amp in (False, True)}
    assert cut == 2 * [32, 8, 8, 1, 1, 1, 1, 1, 1, 1, 1]
    monkeypatch.setattr(restv2, 'query_chunks', lambda *args: 1)
    whole = {amp: step(amp) for amp in (False, True)}
    names = [name for name, _ in model.named_parameters()]
    for a, b in zip(chunked[False][0], whole[False][0]):
        assert rel_err(a, b) < 1e-5
    for name, g, r in zip(names, chunked[False][1], whole[False][1]):
        assert rel_err(g, r) < 1e-4, name
    # under AMP, as far from the float32 step as whole attentions are: fp16's own rounding
    for a, b in zip(chunked[True][0], whole[True][0]):
        assert rel_err(a, b) < 2e-3
    for name, g, r, t in zip(names, chunked[True][1], whole[True][1], whole[False][1]):
        assert rel_err(g, t) < 2 * rel_err(r, t) + 5e-3, name


# ------------------------------------------------------------------ fast_inference (graphs)
def fast_and_eager(**kwargs):
    fast = cuda_model(**kwargs)
    eager = cuda_model(fast_inference=False, **kwargs)
    return fast, eager


def run3(model, x):
    """Three calls: eager (first sighting), recorded, replayed."""
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        return [model(x) for _ in range(3)]


@pytest.mark.parametrize('style', ['global', 'win', 'cwin', 'hwin'])
@pytest.mark.parametrize('size', [(224, 320), (225, 301), (161, 250)])
def test_fast_inference_equals_eager_in_fp16(style, size):
    fast, eager = fast_and_eager(attn_style=style, window_size=(16, 8, 4, 2))
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        ref = eager(x)
    calls = run3(fast, x)
    assert fast._graphs.captures == 1 and len(fast._graphs) == 1
    for outs in calls:
        for a, b in zip(outs, ref):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert rel_err(a, b) < 5e-3


def test_fast_inference_float32_equals_eager_closely():
    fast, eager = fast_and_eager()
    x = torch.rand(1, 3, 200, 264, device='cuda')
    with torch.no_grad():
        ref = eager(x)
        outs = [fast(x) for _ in range(3)][-1]
    for a, b in zip(outs, ref):
        assert rel_err(a, b) < 1e-5


def test_outputs_of_one_call_survive_the_next():
    fast, eager = fast_and_eager()
    x1, x2 = torch.rand(2, 1, 3, 160, 192, device='cuda')
    run3(fast, x1)  # recorded and replayed at this size
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        first = fast(x1)
        kept = [o.clone() for o in first]
        fast(x2)  # same size: the same graph runs again
        ref = eager(x1)
    for a, k, r in zip(first, kept, ref):
        assert torch.equal(a, k)
        assert rel_err(a, r) < 5e-3


def test_an_evicted_size_is_recorded_again_and_still_right():
    fast, eager = fast_and_eager(graph_cache_size=2)
    sizes = [(128, 160), (160, 128), (192, 192)]
    xs = [torch.rand(1, 3, *s, device='cuda') for s in sizes]
    for x, times in zip(xs, (1, 1, 2)):  # 3, 3 and then 6 sightings
        for _ in range(times):
            run3(fast, x)
    assert len(fast._graphs) == 2 and fast._graphs.captures == 3
    # the third size, seen more often, took the first one's place; seen again, the first
    # one is recorded anew once it is seen more often than the second (3 sightings, the
    # least seen now): 4 sightings, eager; 5, recorded; 6, replayed
    outs = run3(fast, xs[0])
    assert fast._graphs.captures == 4
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        ref = eager(xs[0])
    for outs_i in outs:
        for a, b in zip(outs_i, ref):
            assert rel_err(a, b) < 5e-3


def test_training_after_inference_trains_and_new_weights_are_used():
    fast, _ = fast_and_eager(drop_path_rate=0.1)
    x = torch.rand(2, 3, 128, 160, device='cuda')
    before = run3(fast, x)[-1]
    fast.train()
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)
    with torch.autocast('cuda', dtype=torch.float16):
        loss = sum(o.float().pow(2).mean() for o in fast(x))
    loss.backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)
    optimizer.step()
    fast.eval()
    after = run3(fast, x)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        fast.fast_inference = False
        ref = fast(x)
    for outs in after:
        for a, b, old in zip(outs, ref, before):
            assert rel_err(a, b) < 5e-3  # the stepped weights, not the recorded ones
            assert rel_err(a, old) > 1e-2


def test_gradients_and_training_mode_never_replay():
    fast, _ = fast_and_eager()
    x = torch.rand(1, 3, 128, 128, device='cuda')
    for _ in range(3):
        fast(x)  # gradients on
    fast.train()
    with torch.no_grad():
        for _ in range(3):
            fast(x)
    assert fast._graphs.captures == 0


def test_toy_mask_rcnn_gives_the_same_ap_with_and_without_fast_inference(tmp_path):
    """The GPU toy Mask R-CNN, trained briefly, tested through tools/test.py both ways."""
    import json
    import os
    import subprocess
    import sys

    from restv2_mm.toy_data import make_toy_data
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, 'configs', 'toy', 'maskrcnn_restv2_t_toy_gpu.py')
    make_toy_data(str(tmp_path / 'data' / 'toy_gpu'), kind='coco', num_train=480, num_val=60,
                  size=256, seed=0)

    def tool(name, *args):
        proc = subprocess.run([sys.executable, os.path.join(root, 'tools', name), config,
                               *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    tool('train.py', '--work-dir', 'train', '--cfg-options', 'train_cfg.max_epochs=3',
         'train_cfg.val_interval=3')
    metrics = {}
    for fast in (True, False):
        tool('test.py', 'train/epoch_3.pth', '--work-dir', f'test_{fast}', '--cfg-options',
             f'model.backbone.fast_inference={fast}')
        with open(tmp_path / f'test_{fast}' / 'test_metrics.json') as f:
            metrics[fast] = json.load(f)['metrics']
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert metrics[True][key] > 0.05  # it learned something, so the comparison means it
        assert abs(metrics[True][key] - metrics[False][key]) <= 0.002, (key, metrics)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize('channels,rows', [(96, 134400), (192, 1001), (384, 7), (768, 4200)])
def test_triton_layer_norm_equals_pytorchs(dtype, channels, rows):
    from restv2_mm.models import fast_norm
    assert fast_norm.available()  # Triton comes with PyTorch's CUDA wheels
    torch.manual_seed(0)
    x = (torch.randn(rows, channels, device='cuda') * 2 + 0.5).to(dtype)
    w, b = torch.randn(channels, device='cuda'), torch.randn(channels, device='cuda')
    y = fast_norm.layer_norm(x, w, b, 1e-6)
    ref = torch.nn.functional.layer_norm(x.float(), (channels, ), w, b, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else (1e-3 if dtype == torch.float16 else 8e-3)
    assert rel_err(y, ref) < tol


def test_layer_norm_layer_uses_triton_only_without_autograd():
    from restv2_mm.models import fast_norm
    from restv2_mm.models.half_weights import LayerNorm
    norm = LayerNorm(96).cuda()
    x = torch.randn(2, 50, 96, device='cuda')
    with torch.no_grad():
        assert fast_norm.can_use(x, norm.weight)
    assert not fast_norm.can_use(x, norm.weight)  # gradients on: PyTorch's kernel
    assert not fast_norm.can_use(x.transpose(0, 1), norm.weight)  # not contiguous
    with torch.no_grad():
        torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(
            x, (96, ), norm.weight, norm.bias, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.float32])
@pytest.mark.parametrize('B,C,heads,H,W,window', [(2, 96, 1, 200, 336, 64),
                                                  (1, 384, 4, 50, 84, 16),
                                                  (2, 768, 8, 25, 42, 8), (1, 40, 5, 3, 2, 7)])
def test_triton_window_copies_equal_the_tables_gathers(dtype, B, C, heads, H, W, window):
    from restv2_mm.models import fast_windows
    from restv2_mm.models.windows import window_layout
    assert fast_windows.available()
    x = torch.randn(B, H * W, C, device='cuda').to(dtype)
    gather, scatter, _ = window_layout(H, W, window, x.device)
    windowed = x.index_select(1, gather).view(-1, window * window, C)
    assert torch.equal(fast_windows.to_windows(x, H, W, window), windowed)
    # the attention's output as SDPA lays it out, and contiguous
    out = torch.randn(windowed.shape[0], window * window, heads, C // heads, device='cuda')
    for out in (out.to(dtype).transpose(1, 2), out.to(dtype).transpose(1, 2).contiguous()):
        ref = out.transpose(1, 2).reshape(B, -1, C).index_select(1, scatter)
        assert torch.equal(fast_windows.from_windows(out, B, H, W, window), ref)


@pytest.mark.parametrize('style', ['win', 'cwin', 'hwin'])
def test_window_styles_give_the_same_result_with_the_triton_copies(style):
    from restv2_mm.models import fast_windows
    model = cuda_model(attn_style=style, window_size=(16, 8, 4, 2), fast_inference=False)
    x = torch.rand(2, 3, 225, 301, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        assert fast_windows.can_use(x)
        fast = model(x)
        can_use, fast_windows.can_use = fast_windows.can_use, lambda *a: False
        try:
            ref = model(x)
        finally:
            fast_windows.can_use = can_use
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize('style', ['win', 'cwin'])
def test_graphs_keep_the_window_tables_they_read(style):
    """A graph reads the cached window tables (none are built at each replay) and keeps
    them: emptying the caches and filling the freed memory leaves its results right. In
    inference only the key masks are tables; queries and keys are laid out by copies."""
    from restv2_mm.models import windows
    fast, eager = fast_and_eager(attn_style=style, window_size=(16, 8, 4, 2))
    x = torch.rand(2, 3, 200, 264, device='cuda')  # reduced maps of 7 x 9: keys padded
    run3(fast, x)
    (graph, ) = fast._graphs.graphs.values()
    stage1_keys = windows._KEY_MASKS.entries[(2, 7, 9, 2, torch.device('cuda', 0))]
    assert any(mask is stage1_keys for mask in graph.kept)
    windows._LAYOUTS.clear()
    windows._KEY_MASKS.clear()
    junk = [torch.full((1 << 20, ), -1, dtype=torch.int64, device='cuda') for _ in range(8)]
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16):
        outs = fast(x)
        ref = eager(x)
    del junk
    assert fast._graphs.captures == 1
    for a, b in zip(outs, ref):
        assert rel_err(a, b) < 5e-3


def test_training_graphs_keep_the_window_tables_they_read():
    from restv2_mm.models import windows
    model = cuda_model(attn_style='win', window_size=(16, 8, 4, 2), fast_training=True)
    model.train()
    x = torch.rand(2, 3, 200, 264, device='cuda')
    for _ in range(3):
        train_step(model, x, amp=True)
    assert model._train_graphs.captures == 1
    (graph, ) = model._train_graphs.graphs.values()
    stage1 = windows._LAYOUTS.entries[(50, 66, 16, torch.device('cuda', 0))]
    assert any(tables is stage1 for tables in graph.kept)


# ------------------------------------------------------------------ fast_training (graphs)
def graph_and_eager_trainers(**kwargs):
    """Two identical models in train mode, one replaying training passes as CUDA graphs."""
    graph = cuda_model(fast_training=True, **kwargs).train()
    eager = cuda_model(**kwargs).train()
    return graph, eager


def train_step(model, x, optimizer=None, amp=False):
    with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
        outs = model(x)
    loss = sum((o.float() * (i + 1)).pow(2).mean() for i, o in enumerate(outs))
    if amp:  # scaled as a GradScaler would, so that fp16 gradients do not flush to zero
        loss = loss * 1024
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [o.detach().clone() for o in outs], grads


def assert_close_steps(a, b, tol):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for oa, ob in zip(outs_a, outs_b):
        assert oa.shape == ob.shape and rel_err(oa, ob) < tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        a, b = grads_a[name], grads_b[name]
        assert b.norm() > 0 and rel_err(a, b) < tol, name


@pytest.mark.parametrize('style', ['global', 'win', 'cwin', 'hwin'])
@pytest.mark.parametrize('size', [(224, 320), (161, 250)])
def test_fast_training_follows_eager_steps_in_float32(style, size):
    graph, eager = graph_and_eager_trainers(attn_style=style, window_size=(16, 8, 4, 2))
    # SGD: an update in proportion to the gradient, so that the atomics' last-bit noise in
    # near-zero gradients is not blown up into different weights (as Adam's would)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (graph, eager)]
    torch.manual_seed(1)
    for step in range(4):  # eager (first sight), recorded, replayed, replayed
        x = torch.rand(2, 3, *size, device='cuda')
        assert_close_steps(train_step(graph, x, opts[0]), train_step(eager, x, opts[1]), 1e-3)
        if step == 1:
            assert graph._train_graphs.captures == 1
    assert graph._train_graphs.captures == 1 and len(graph._train_graphs) == 1
    for p, q in zip(graph.parameters(), eager.parameters()):
        assert rel_err(p, q) < 1e-3


def test_a_failed_recording_leaves_random_ops_working():
    """A recording that fails part-way must not leave the random-number generator in its
    recording state: a dropout after it (a head's) would raise."""
    from restv2_mm.models.cuda_graphs import GraphCache
    cache = GraphCache(2)

    def forward(x):
        y = torch.nn.functional.dropout(x, 0.5, training=True)
        y.sum().item()  # waits on the device: not allowed while recording
        return (y, )

    x = torch.rand(4, 4, device='cuda')
    for _ in range(3):
        (out, ) = cache(forward, x, 'state')
    assert cache.captures == 0 and len(cache.failed) == 1
    assert torch.nn.functional.dropout(x, 0.5, training=True).shape == x.shape
    torch.cuda.synchronize()


def test_fast_training_under_amp_follows_eager_and_frozen_stages_stay_frozen():
    graph, eager = graph_and_eager_trainers(frozen_stages=1)
    x = torch.rand(2, 3, 256, 320, device='cuda')
    for _ in range(3):
        a, b = train_step(graph, x, amp=True), train_step(eager, x, amp=True)
        assert_close_steps(a, b, 5e-3)
        graph.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert graph._train_graphs.captures == 1
    assert not any(n.startswith(('stem.', 'stage1.', 'norm0.')) for n in a[1])


def test_fast_training_records_while_gradient_accumulators_are_held_from_before():
    """DistributedDataParallel makes each parameter's gradient-accumulating node when it
    wraps the model (on the default stream), holds it and hooks it for its all-reduce. The
    recording must not wait on those nodes, and a replay's gradients must still pass
    through them, hooks included."""
    graph, eager = graph_and_eager_trainers()
    params = [p for p in graph.parameters() if p.requires_grad]
    held = [p.view_as(p).grad_fn.next_functions[0][0] for p in params]  # as DDP holds them
    reached = []
    for node in held:
        node.register_hook(lambda grad_inputs, grad_outputs: reached.append(1))
    x = torch.rand(2, 3, 160, 224, device='cuda')
    for step in range(3):  # eager (first sight), recorded, replayed
        reached.clear()
        assert_close_steps(train_step(graph, x, amp=True), train_step(eager, x, amp=True), 5e-3)
        assert len(reached) == len(params), step
        graph.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert graph._train_graphs.captures == 1 and not graph._train_graphs.failed
    assert all(p.view_as(p).grad_fn.next_functions[0][0] is n for p, n in zip(params, held))


def test_fast_training_accumulates_gradients_over_replays():
    graph, eager = graph_and_eager_trainers()
    xs = torch.rand(4, 1, 3, 128, 160, device='cuda')
    train_step(graph, xs[0])  # seen once: the next call records
    graph.zero_grad(set_to_none=True)
    for x in xs[1:]:  # recorded, replayed, replayed: three gradients summed without zero_grad
        train_step(graph, x)
        train_step(eager, x)
    assert graph._train_graphs.captures == 1
    for (name, p), q in zip(graph.named_parameters(), eager.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


def test_fast_training_sizes_share_one_set_of_gradient_buffers():
    graph, eager = graph_and_eager_trainers(drop_path_rate=0.)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (graph, eager)]
    sizes = [(128, 160), (160, 128), (96, 224)]
    torch.manual_seed(2)
    for size in sizes * 3:  # each size: eager, recorded, replayed; the steps follow eager
        x = torch.rand(2, 3, *size, device='cuda')
        assert_close_steps(train_step(graph, x, opts[0]), train_step(eager, x, opts[1]), 1e-3)
    cache = graph._train_graphs
    assert cache.captures == 3 and len(cache) == 3
    trainable = sum(p.requires_grad for p in graph.parameters())
    assert len(cache.grad_buffers) == trainable
    for entry in cache.graphs.values():  # the very same tensors, not copies per size
        assert all(g is None or g is cache.grad_buffers[i]
                   for i, g in enumerate(entry.static_grads))
    # gradients accumulated over two sizes: the first one's survive the second's backward
    graph.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    for size in sizes[:2]:
        x = torch.rand(2, 3, *size, device='cuda')
        for model in (graph, eager):
            sum(o.float().pow(2).mean() for o in model(x)).backward()
    for (name, p), q in zip(graph.named_parameters(), eager.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-3, name


def test_fast_training_outputs_survive_the_next_replay():
    graph, _ = graph_and_eager_trainers()
    x1, x2 = torch.rand(2, 1, 3, 128, 160, device='cuda')
    for _ in range(2):
        train_step(graph, x1)
    first = graph(x1)
    kept = [o.detach().clone() for o in first]
    sum(o.float().mean() for o in first).backward()
    second = graph(x2)
    sum(o.float().mean() for o in second).backward()
    assert graph._train_graphs.captures == 1
    for a, k in zip(first, kept):
        assert torch.equal(a.detach(), k)


def test_fast_training_second_forward_before_backward_runs_eagerly():
    graph, eager = graph_and_eager_trainers()
    x1, x2 = torch.rand(2, 1, 3, 128, 160, device='cuda')
    for _ in range(2):  # record at this size
        train_step(graph, x1)
    graph.zero_grad(set_to_none=True)
    losses = []
    for model in (graph, eager):
        loss = sum(o.float().pow(2).mean() for o in model(x1) + model(x2))
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[1])
    for (name, p), q in zip(graph.named_parameters(), eager.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


def test_fast_training_backward_of_a_replaced_replay_raises():
    graph, _ = graph_and_eager_trainers()
    x = torch.rand(1, 3, 128, 160, device='cuda')
    for _ in range(2):
        train_step(graph, x)
    loss = sum(o.float().mean() for o in graph(x))
    loss.backward(retain_graph=True)
    sum(o.float().mean() for o in graph(x)).backward()  # replays again at this size
    with pytest.raises(RuntimeError, match='fast_training=False'):
        loss.backward()


def test_fast_training_records_again_when_settings_change_and_skips_hooked_models():
    graph, eager = graph_and_eager_trainers(drop_path_rate=0.1)
    x = torch.rand(2, 3, 128, 160, device='cuda')
    for _ in range(3):
        train_step(graph, x)
    assert graph._train_graphs.captures == 1
    for m in graph.modules():  # a drop-path schedule changes the rates: a new recording
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.
    for m in eager.modules():
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.
    eager.load_state_dict(graph.state_dict())
    graph.zero_grad(set_to_none=True)  # the three steps above accumulated theirs
    for _ in range(3):
        assert_close_steps(train_step(graph, x), train_step(eager, x), 1e-4)
        graph.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
    assert graph._train_graphs.captures == 2
    handle = graph.stage2[0].register_forward_hook(lambda *args: None)
    for _ in range(3):
        train_step(graph, x)
    assert graph._train_graphs.captures == 2  # hooked: eager
    handle.remove()
    graph.eval()
    with torch.no_grad():
        graph(x)
    assert graph._train_graphs.captures == 2


def test_fast_training_drop_path_draws_new_samples_at_each_replay():
    graph, _ = graph_and_eager_trainers(drop_path_rate=0.5)
    x = torch.rand(4, 3, 128, 160, device='cuda')
    outs = [train_step(graph, x)[0][-1] for _ in range(6)]
    assert graph._train_graphs.captures == 1
    replays = outs[2:]
    assert any(not torch.equal(replays[0], o) for o in replays[1:])


def test_toy_upernet_trains_with_fast_training_through_train_py(tmp_path):
    """The toy UperNet with fast_training switched on from the command line, trained with
    AMP through tools/train.py: the graphs are recorded once and the model still learns."""
    import json
    import os
    import subprocess
    import sys

    from restv2_mm.toy_data import make_toy_data
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, 'configs', 'toy', 'upernet_restv2_t_toy.py')
    make_toy_data(str(tmp_path / 'data' / 'toy'), kind='ade', seed=0)
    proc = subprocess.run([sys.executable, os.path.join(root, 'tools', 'train.py'), config,
                           '--work-dir', 'train', '--amp', '--cfg-options',
                           'model.backbone.fast_training=True'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count('fast_training: training passes at input size') == 1, out[-4000:]
    assert 'recording a CUDA graph failed' not in out
    scalars = [json.loads(line) for line in
               open(next((tmp_path / 'train').glob('*/vis_data/scalars.json')))]
    miou = [s['mIoU'] for s in scalars if 'mIoU' in s]
    assert miou and miou[-1] > 30, miou


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_fast_training_under_ddp_replays_and_keeps_the_ranks_in_step(tmp_path):
    """The toy UperNet on two GPUs (NCCL, DistributedDataParallel) with fast_training and
    AMP: each rank records the backbone's training pass and replays it, and the ranks train
    on different images yet end with the same parameters (the replayed gradients reach the
    all-reduce)."""
    import json

    from test_distributed import probe_config, run_dist
    from test_downstream import SEG_TOY

    from restv2_mm.toy_data import make_toy_data
    make_toy_data(str(tmp_path / 'data' / 'toy'), kind='ade', num_train=32, num_val=4,
                  seed=0)
    config, probe = probe_config(tmp_path, SEG_TOY, 'upernet_probe.py')
    proc = run_dist('dist_train.sh', [
        str(config), '2', '--work-dir', 'train', '--amp', '--cfg-options',
        'model.backbone.fast_training=True', 'train_cfg.max_iters=40',
        'train_cfg.val_interval=40', 'train_dataloader.batch_size=4'
    ], cwd=tmp_path, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'training passes at input size (4, 3, 128, 128) now replay' in out, out[-4000:]
    assert 'recording a CUDA graph failed' not in out
    ranks = [json.loads((probe / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [r['world_size'] for r in ranks] == [2, 2]
    assert [r['training_graphs'] for r in ranks] == [1, 1]  # each rank recorded its size
    seen = [[name for names in r['images'].values() for name in names] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 40 * 4
    assert seen[0] != seen[1]  # the ranks trained on different batches
    assert ranks[0]['parameters'] == ranks[1]['parameters']
    assert 'mIoU' in out
