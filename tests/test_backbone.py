"""The ResTv2 backbone: shapes, faithfulness to the authors' model, switches, errors."""
import argparse
import math

import pytest
import torch

from reference_restv2 import RefResTv2
from restv2_mm import ResTv2

ARCHS = ['tiny', 'small', 'base', 'large']


def stage_sizes(h, w):
    sizes = [(math.ceil(h / 4), math.ceil(w / 4))]
    for _ in range(3):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def reference_for(model):
    return RefResTv2(model.embed_dims, model.depths, model.num_heads, model.sr_ratios).eval()


def randomised(model, seed=0):
    """A model with random weights everywhere, BatchNorm statistics included."""
    torch.manual_seed(seed)
    model.init_weights()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('arch', ARCHS)
def test_output_shapes_every_arch(arch):
    model = ResTv2(arch).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == model.embed_dims
    assert [tuple(o.shape[2:]) for o in outs] == stage_sizes(64, 96)


@pytest.mark.parametrize('size', [(224, 224), (225, 301), (32, 32), (33, 47), (800, 1199)])
def test_output_shapes_any_size(size):
    model = ResTv2('tiny').eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, *size))
    assert [tuple(o.shape[2:]) for o in outs] == stage_sizes(*size)
    assert all(torch.isfinite(o).all() for o in outs)


def test_docstring_example_sizes():
    with torch.no_grad():
        outs = ResTv2('t').eval()(torch.rand(1, 3, 225, 301))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 57, 76), (1, 192, 29, 38),
                                              (1, 384, 15, 19), (1, 768, 8, 10)]


def test_out_indices_negative_and_subset():
    model = ResTv2('tiny', out_indices=(-1, 1)).eval()
    assert model.out_indices == (1, 3)
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    with torch.no_grad():
        outs = model(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 192, 8, 8), (2, 768, 2, 2)]
    assert [f['reduction'] for f in model.feature_info] == [8, 32]


def test_arch_aliases_and_custom_dict():
    assert ResTv2('t').depths == ResTv2('TINY').depths == [1, 2, 6, 2]
    custom = dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                  sr_ratios=[8, 4, 2, 1])
    model = ResTv2(custom).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 64, 128, 256]


@pytest.mark.parametrize('arch,count', [('tiny', 29_667_120), ('small', 40_438_320),
                                        ('base', 55_197_552), ('large', 85_509_312)])
def test_parameter_counts_match_paper(arch, count):
    # Table 1's classification models less head and final norm, plus four output norms.
    assert sum(p.numel() for p in ResTv2(arch).parameters()) == count


# ---------------------------------------------------------------------------- faithfulness
@pytest.mark.parametrize('arch', ARCHS)
def test_stage_features_equal_authors_model(arch):
    model = randomised(ResTv2(arch))
    ref = reference_for(model)
    ref.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model(x), ref.forward_features(x)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5


def test_same_function_as_authors_model_in_float64():
    model = randomised(ResTv2('tiny')).double()
    ref = reference_for(model).double()
    ref.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 96, 128, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(model(x), ref.forward_features(x)):
            assert rel_err(a, b) < 1e-12


def test_state_dict_keys_are_the_official_ones(official_keys):
    for arch in ('tiny', 'large'):
        ours = set(ResTv2(arch).state_dict())
        dense_only = {k for k in ours if k.startswith('norm') and k[4].isdigit()}
        assert ours - dense_only == official_keys(arch) - {
            'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}


@pytest.mark.parametrize('size', [(224, 224), (225, 301)])
def test_sdpa_and_explicit_paths_agree(size):
    model = randomised(ResTv2('tiny'))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fused = model(x)
        model.set_attn_impl('explicit')
        explicit = model(x)
    for a, b in zip(fused, explicit):
        assert rel_err(a, b) < 1e-5


def test_query_chunks_cut_only_attentions_with_many_more_queries_than_keys():
    from restv2_mm.models.attention import chunks_for, query_chunks
    # ResTv2-T at 800 x 1344, batch 2, stage by stage: (batch x heads, queries, keys)
    assert [chunks_for(2 * h, n, 1050) for h, n in ((1, 67200), (2, 16800), (4, 4200),
                                                     (8, 1050))] == [32, 8, 1, 1]
    # UperNet's 512 x 512 crops, batch 4
    assert [chunks_for(4 * h, n, 256) for h, n in ((1, 16384), (2, 4096), (4, 1024),
                                                    (8, 256))] == [16, 8, 1, 1]
    assert chunks_for(128, 3136, 49) == 1  # a classification batch fills the GPU already
    assert chunks_for(2, 200 * 334, 1050) == 16  # equal chunks only: 66800 = 16 x 4175
    assert chunks_for(2, 2 * 1051, 1) == 1  # no power of two of 4 or more divides it
    q = torch.rand(2, 67200, 96, requires_grad=True)
    assert query_chunks('sdpa', q, 2, 1050) == 1  # the CPU's kernels: no backward to spread
    if torch.cuda.is_available():
        q = q.detach().cuda().requires_grad_()
        assert query_chunks('sdpa', q, 2, 1050) == 32
        assert query_chunks('explicit', q, 2, 1050) == 1
        with torch.no_grad():
            assert query_chunks('sdpa', q, 2, 1050) == 1


@pytest.mark.parametrize('impl', ['sdpa', 'explicit'])
def test_queries_in_chunks_give_the_same_outputs_and_gradients(monkeypatch, impl):
    """The chunking the GPU's training uses, forced on the CPU: the same attention."""
    from restv2_mm.models import restv2
    from restv2_mm.models.attention import chunks_for
    model = randomised(ResTv2('tiny', attn_impl=impl)).train()
    x = torch.rand(2, 3, 64, 96)

    def step():
        model.zero_grad()
        outs = model(x)
        # fixed random weights: the mean of a normalised map's squares would hardly move
        weights = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=weights)).sum() for o in outs).backward()
        return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()]

    ref_outs, ref_grads = step()
    cut = []

    def chunks(attn_impl, q, rows, keys):
        cut.append(chunks_for(rows, q.shape[1], keys))
        return cut[-1]

    monkeypatch.setattr(restv2, 'query_chunks', chunks)
    outs, grads = step()
    assert cut == [32, 8, 8, 1, 1, 1, 1, 1, 1, 1, 1]  # stages 1 and 2 of the 11 blocks
    for a, b in zip(outs, ref_outs):
        assert rel_err(a, b) < 1e-6
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name


def test_explicit_path_from_constructor():
    model = ResTv2('tiny', attn_impl='explicit')
    assert all(m.attn_impl == 'explicit' for m in model.modules() if hasattr(m, 'attn_impl'))


# ---------------------------------------------------------------------------- checkpoints
class Arbitrary:
    """A type no checkpoint needs: the weights-only loader must refuse it."""


def test_official_checkpoint_loads_without_conversion(tmp_path, caplog):
    source = randomised(ResTv2('tiny'), seed=1)
    ref = reference_for(source)
    ref.load_state_dict(source.state_dict(), strict=False)
    state = {'module.' + k: v for k, v in ref.classification_state_dict().items()}
    path = tmp_path / 'restv2_tiny_224.pth'
    torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 299,
                'scaler': {'scale': 65536.0}, 'args': argparse.Namespace(model='restv2_tiny',
                                                                         lr=1.5e-3)}, path)

    model = ResTv2('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    model.eval()
    report_free = {k: v for k, v in model.state_dict().items()
                   if not (k.startswith('norm') and k[4].isdigit())}
    for k, v in report_free.items():
        assert torch.equal(v, ref.state_dict()[k]), k
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fresh = randomised(ResTv2('tiny'), seed=2)(x)
        loaded = model(x)
        expected = ref.forward_features(x)
    for a, b, c in zip(loaded, expected, fresh):
        assert rel_err(a, b) < 1e-5
        assert rel_err(a, c) > 1e-2


def test_checkpoint_reports_missing_and_unexpected(tmp_path):
    from restv2_mm import load_backbone
    model = ResTv2('tiny')
    state = model.state_dict()
    state.pop('stage1.0.attn.q.weight')
    state['stage9.extra'] = torch.zeros(1)
    state['head.weight'] = torch.zeros(1000, 768)
    path = tmp_path / 'partial.pth'
    torch.save({'model': state}, path)
    report = load_backbone(ResTv2('tiny'), str(path))
    assert report['missing'] == ['stage1.0.attn.q.weight']
    assert report['unexpected'] == ['stage9.extra']  # head dropped without noise


def test_checkpoint_of_another_arch_is_named(tmp_path):
    from restv2_mm import load_backbone
    path = tmp_path / 'large.pth'
    torch.save({'model': ResTv2('large').state_dict()}, path)
    with pytest.raises(ValueError, match='another arch'):
        load_backbone(ResTv2('tiny'), str(path))


def test_missing_checkpoint_says_where_files_come_from(tmp_path):
    model = ResTv2('tiny', init_cfg=dict(type='Pretrained',
                                         checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='init_cfg=None'):
        model.init_weights()


def test_checkpoint_with_unknown_pickled_type_is_refused(tmp_path):
    from restv2_mm import load_backbone
    path = tmp_path / 'unsafe.pth'
    torch.save({'model': ResTv2('tiny').state_dict(), 'payload': Arbitrary()}, path)
    with pytest.raises(Exception, match='(?i)weights_only|unpickl'):
        load_backbone(ResTv2('tiny'), str(path))


# ---------------------------------------------------------------------------- training switches
def test_frozen_stages_have_no_gradient_and_stay_in_eval():
    model = ResTv2('tiny', frozen_stages=2, drop_path_rate=0.1)
    model.train()
    frozen = [model.stem, model.stage1, model.patch_2, model.stage2, model.norm0, model.norm1]
    for m in frozen:
        assert not m.training
        assert all(not p.requires_grad for p in m.parameters())
    assert model.stage3.training and model.patch_3.training
    outs = model(torch.rand(2, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert model.stage3[0].attn.q.weight.grad is not None


def test_frozen_stem_only():
    model = ResTv2('tiny', frozen_stages=0).train()
    assert not model.stem.training and model.stage1.training
    assert model.stem.proj[1].weight.requires_grad is False
    assert model.stage1[0].attn.q.weight.requires_grad


def test_norm_eval_keeps_batchnorm_statistics():
    model = ResTv2('tiny', norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    model(torch.rand(2, 3, 64, 64))
    assert torch.equal(bns[0].running_mean, before)


def test_with_cp_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = ResTv2('tiny')
    plain.init_weights()
    cp = ResTv2('tiny', with_cp=True)
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    grads = []
    for model in (plain, cp):
        model.train()
        outs = model(x)
        sum((o * o).mean() for o in outs).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        outs_eval = [o.detach() for o in outs]
        if model is plain:
            ref_outs = outs_eval
    for a, b in zip(ref_outs, outs_eval):
        torch.testing.assert_close(a, b)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('kwargs,match', [
    (dict(arch='huge'), "Unknown ResTv2 arch 'huge'.*'tiny'"),
    (dict(arch=dict(embed_dims=[96] * 4, depths=[1, 2], num_heads=[1] * 4,
                    sr_ratios=[8, 4, 2, 1])), 'disagree in length'),
    (dict(arch=dict(embed_dims=[96] * 4)), 'lacks the keys'),
    (dict(arch=dict(embed_dims=[96] * 4, depths=[1] * 4, num_heads=[5] * 4,
                    sr_ratios=[8, 4, 2, 1])), 'not divisible by num_heads'),
    (dict(out_indices=(0, 4)), 'out_indices entry 4'),
    (dict(out_indices=(-5, )), 'out_indices entry -5'),
    (dict(frozen_stages=5), 'frozen_stages=5'),
    (dict(frozen_stages=-2), 'frozen_stages=-2'),
    (dict(attn_impl='flash'), "attn_impl='flash'"),
    (dict(graph_cache_size=0), 'graph_cache_size=0 must be a positive int'),
    (dict(train_graph_cache_size=True), 'train_graph_cache_size=True must be a positive int'),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResTv2(**kwargs)


@pytest.mark.parametrize('shape,match', [
    ((3, 64, 64), '4-D'),
    ((1, 1, 64, 64), 'in_channels=3.*1 channels'),
    ((1, 3, 31, 64), 'at least 32 x 32.*31 x 64'),
])
def test_bad_inputs_raise_clear_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        ResTv2('tiny')(torch.rand(*shape))


def test_layer_norm_keeps_half_activations_under_autocast():
    from restv2_mm.models.half_weights import LayerNorm
    norm = LayerNorm(64)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 10, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), norm(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_backbone_runs_under_autocast():
    model = ResTv2('tiny').eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(torch.rand(1, 3, 64, 64))
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o.float()).all() for o in outs)


@pytest.mark.parametrize('layer,args,kwargs,x_shape', [
    ('Linear', (32, 48), {}, (5, 32)),
    ('Conv2d', (32, 64, 3), dict(padding=1, groups=32), (2, 32, 8, 8)),
])
def test_half_weights_are_reused_in_inference_and_follow_new_weights(layer, args, kwargs,
                                                                     x_shape):
    from restv2_mm.models import half_weights
    plain = getattr(torch.nn, layer)(*args, **kwargs)
    ours = getattr(half_weights, layer)(*args, **kwargs)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(x_shape)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        first = ours(x)
        copies = ours._params_as(torch.bfloat16)
        assert all(a is b for a, b in zip(copies, ours._params_as(torch.bfloat16)))
        torch.testing.assert_close(first, plain(x))  # what autocast gives, bit for bit
    plain.weight.data.mul_(2)
    ours.load_state_dict(plain.state_dict())  # new weights: the copies follow
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x), plain(x))
    # with gradients nothing is kept, and gradients reach the float32 weights
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours(x).float().sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------- fast_inference
def test_fast_inference_on_the_cpu_is_the_eager_path_exactly():
    fast = randomised(ResTv2('tiny', attn_style='hwin', window_size=(16, 8, 4, 2)))
    eager = randomised(ResTv2('tiny', attn_style='hwin', window_size=(16, 8, 4, 2),
                              fast_inference=False))
    x = torch.rand(2, 3, 97, 130)
    with torch.no_grad():
        for _ in range(3):
            for a, b in zip(fast(x), eager(x)):
                assert torch.equal(a, b)
    assert fast._graphs.captures == 0 and len(fast._graphs) == 0


def test_a_model_with_fast_inference_copies_and_pickles():
    import copy
    import pickle
    model = randomised(ResTv2('tiny'))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.stage1[0].attn.q.weight.mul_(2)
        x = torch.rand(1, 3, 64, 64)
        assert not torch.equal(clone(x)[0], model(x)[0])  # the copy runs its own weights
    again = pickle.loads(pickle.dumps(model))
    assert again._graphs is not model._graphs and len(again._graphs) == 0
    assert again._graphs.max_graphs == model._graphs.max_graphs == 16
    assert again._train_graphs.max_graphs == clone._train_graphs.max_graphs == 4
    assert again._train_graphs.arg_name == 'train_graph_cache_size'


def test_fast_training_on_the_cpu_is_the_eager_path_exactly():
    kwargs = dict(attn_style='win', window_size=(16, 8, 4, 2), drop_path_rate=0.)
    fast = randomised(ResTv2('tiny', fast_training=True, **kwargs)).train()
    eager = randomised(ResTv2('tiny', **kwargs)).train()
    x = torch.rand(2, 3, 97, 130)
    for _ in range(3):
        for model in (fast, eager):
            sum(o.pow(2).mean() for o in model(x)).backward()
    for (name, p), q in zip(fast.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert fast._train_graphs.captures == 0 and len(fast._train_graphs) == 0


def test_switching_mode_drops_the_other_modes_graphs():
    model = ResTv2('tiny', fast_training=True)
    for mode in (True, False):
        model._graphs.graphs['size'] = model._train_graphs.graphs['size'] = object()
        model.train(mode)
        kept, dropped = ((model._train_graphs, model._graphs) if mode else
                         (model._graphs, model._train_graphs))
        assert len(kept) == 1 and len(dropped) == 0


def test_fast_training_leaves_hooked_and_sync_bn_models_eager():
    model = ResTv2('tiny', fast_training=True)
    assert not model._runs_only_eagerly()
    handle = model.stage3[2].mlp.fc1.register_forward_pre_hook(lambda *args: None)
    assert model._runs_only_eagerly()
    handle.remove()
    assert not model._runs_only_eagerly()
    assert torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)._runs_only_eagerly()

    class SyncBatchNorm(torch.nn.BatchNorm2d):  # as mmcv.ops.SyncBatchNorm is named
        pass

    model = ResTv2('tiny', fast_training=True)
    model.stem.proj[1] = SyncBatchNorm(model.stem.proj[1].num_features)
    assert model._runs_only_eagerly()


# ---------------------------------------------------------------------------- training
class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run inside it, by name (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def bf16_training_step(model, x, shared: bool):
    """Forward under CPU bf16 autocast and backward; ``shared``: all weights cast at once."""
    import contextlib
    from restv2_mm.models.half_weights import shared_half_copies
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with shared_half_copies(model, torch.bfloat16) if shared else contextlib.nullcontext():
            outs = model._forward(x)
        loss = sum((o.float()**2).mean() for o in outs)
    loss.backward()
    return outs


def test_one_cast_for_all_weights_gives_autocasts_numbers_exactly(monkeypatch):
    from restv2_mm.models.restv2 import Mlp
    monkeypatch.setattr(Mlp, '_recomputes', lambda self, x: False)  # the cast alone
    model = randomised(ResTv2('tiny', frozen_stages=1)).train()
    plain = randomised(ResTv2('tiny', frozen_stages=1)).train()
    x = torch.rand(2, 3, 64, 96)
    with CountOps() as shared_ops:
        outs = bf16_training_step(model, x, shared=True)
    with CountOps() as plain_ops:
        ref = bf16_training_step(plain, x, shared=False)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # frozen stages stay without
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    # autocast casts each of ~200 weights and biases forward and back; here a few casts do
    assert plain_ops.counts['_to_copy'] > 300
    assert shared_ops.counts['_to_copy'] < 60
    assert not any('_shared_halves' in m.__dict__ for m in model.modules())


def test_one_cast_for_all_weights_is_not_used_on_the_cpu():
    model = ResTv2('tiny').train()
    x = torch.rand(1, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert model._half_dtype_for_training(x) is None  # each layer casts its own
        with CountOps() as ops:
            model(x)
    assert ops.counts['_to_copy'] > 150


@pytest.mark.parametrize('autocast', [None, torch.bfloat16])
def test_mlp_keeps_one_hidden_tensor_and_gives_the_same_gradients(autocast):
    import contextlib
    from restv2_mm.models.restv2 import Mlp
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(2, 50, 32, requires_grad=True)

    def step(recompute):
        saved = []
        mlp.zero_grad()
        x.grad = None
        mlp._recomputes = lambda inp: recompute and Mlp._recomputes(mlp, inp)
        ctx = torch.autocast('cpu', dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx, torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            out = mlp(x)
        (out.float()**2).sum().backward()
        return out, [x.grad] + [p.grad for p in mlp.parameters()], sum(saved)

    out, grads, saved = step(True)
    ref_out, ref_grads, ref_saved = step(False)
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    hidden = 2 * 50 * 128 * (2 if autocast else 4)  # one B x N x 4C tensor
    assert ref_saved - saved >= hidden


def saved_storage_bytes(fn):
    """fn()'s result and the bytes of the distinct storages autograd keeps for its backward."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_norm_mlp_and_norm_add_linear_give_autograds_gradients_keeping_less(dtype):
    import torch.nn.functional as F

    from restv2_mm.models.recompute import norm_add_linear, norm_mlp
    torch.manual_seed(0)
    C, hidden, shape = 32, 128, (2, 50, 32)

    def leaves(*shapes):
        return [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]

    x, a, u = leaves(shape, shape, shape)
    nw, nb, w1, b1, w2, b2, w, b = leaves((C, ), (C, ), (hidden, C), (hidden, ), (C, hidden),
                                          (C, ), (C, C), (C, ))
    inputs = [x, a, u, nw, nb, w1, b1, w2, b2, w, b]

    def run(fused):
        for t in inputs:
            t.grad = None
        if fused:
            mlp, saved_mlp = saved_storage_bytes(
                lambda: norm_mlp(x, (nw, nb, 1e-6), w1, b1, w2, b2))
            proj, saved_proj = saved_storage_bytes(  # a kept anyway, as by the attention
                lambda: norm_add_linear(a.sigmoid(), u, (nw, nb, 1e-6), w, b))
        else:
            mlp, saved_mlp = saved_storage_bytes(lambda: F.linear(
                F.gelu(F.linear(F.layer_norm(x, (C, ), nw, nb, 1e-6), w1, b1)), w2, b2))
            proj, saved_proj = saved_storage_bytes(
                lambda: F.linear(a.sigmoid() + F.layer_norm(u, (C, ), nw, nb, 1e-6), w, b))
        (mlp.float().pow(2).sum() + proj.float().pow(3).sum()).backward()
        return (mlp, proj), [t.grad for t in inputs], (saved_mlp, saved_proj)

    outs, grads, (saved_mlp, saved_proj) = run(True)
    ref_outs, ref_grads, (ref_mlp, ref_proj) = run(False)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref_outs))
    for t, g, r in zip(inputs, grads, ref_grads):
        assert g is not None and g.dtype == dtype and torch.equal(g, r), tuple(t.shape)
    token_map = x.numel() * x.element_size()
    assert ref_mlp - saved_mlp >= 5 * token_map  # the norm's output, GELU's (4x wide)
    assert ref_proj - saved_proj >= token_map  # the sum proj reads


def test_training_only_the_biases_gives_autograds_gradients():
    """Frozen weights, trained biases (a BitFit-style fine-tune): the recomputing parts
    compute the gradients asked for, as the plain layers do."""
    torch.manual_seed(0)
    model = randomised(ResTv2('tiny')).train()
    plain = randomised(ResTv2('tiny')).train()
    for m in (model, plain):
        for name, p in m.named_parameters():
            p.requires_grad_(name.endswith('bias'))
    for name, m in plain.named_modules():
        if name.endswith(('.norm2', '.attn.proj')):
            m.register_forward_hook(lambda *args: None)  # the plain layers run
    x = torch.rand(1, 3, 64, 64)
    for m in (model, plain):
        sum((o**2).mean() for o in m(x)).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name


def test_recomputing_parts_give_a_bias_gradient_alone():
    import torch.nn.functional as F

    from restv2_mm.models.recompute import norm_add_linear, norm_mlp
    torch.manual_seed(0)
    x, a, u = torch.randn(3, 3, 5, 8).unbind(0)
    norm = (torch.rand(8), torch.rand(8), 1e-6)
    w1, w2, w = torch.randn(16, 8), torch.randn(8, 16), torch.randn(8, 8)
    b1, b2, b = (torch.randn(n, requires_grad=True) for n in (16, 8, 8))
    mlp = norm_mlp(x, norm, w1, b1, w2, b2)
    proj = norm_add_linear(a, u, norm, w, b)
    grads = torch.autograd.grad((mlp**2).sum() + (proj**2).sum(), (b1, b2, b))
    ref_mlp = F.linear(F.gelu(F.linear(F.layer_norm(x, (8, ), *norm), w1, b1)), w2, b2)
    ref_proj = F.linear(a + F.layer_norm(u, (8, ), *norm), w, b)
    ref = torch.autograd.grad((ref_mlp**2).sum() + (ref_proj**2).sum(), (b1, b2, b))
    assert all(torch.equal(g, r) for g, r in zip(grads, ref))


def test_training_blocks_keep_less_and_give_the_same_gradients():
    """A training forward keeps neither norm2's output nor the sum before proj; a hook on
    those modules (a probe) sees them called, at the cost of keeping both."""
    torch.manual_seed(0)
    model = randomised(ResTv2('tiny', drop_path_rate=0.)).train()
    probed = randomised(ResTv2('tiny', drop_path_rate=0.)).train()
    seen = []
    for name, m in probed.named_modules():
        if name.endswith(('.norm2', '.attn.up_norm', '.attn.proj')):
            m.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    x = torch.rand(2, 3, 64, 96)

    def step(m):
        outs, saved = saved_storage_bytes(lambda: m(x))
        sum((o**2).mean() for o in outs).backward()
        return outs, saved

    outs, saved = step(model)
    ref, ref_saved = step(probed)
    assert len(seen) == 3 * 11  # three hooked modules in each of the 11 blocks
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    for (name, p), q in zip(model.named_parameters(), probed.parameters()):
        assert torch.equal(p.grad, q.grad), name
    # per block, two token maps fewer and the two norms' means and 1/stds (computed again):
    # 2 x 16 x 24 tokens of 96 channels in stage 1, and so on
    rows = [(depth, 2 * (64 >> i + 2) * (96 >> i + 2), dim)
            for i, (depth, dim) in enumerate(zip((1, 2, 6, 2), (96, 192, 384, 768)))]
    assert ref_saved - saved == sum(2 * depth * n * (dim + 2) * 4 for depth, n, dim in rows)


def test_blocks_whose_layers_were_replaced_train_through_them():
    model = ResTv2('tiny').train()
    block = model.stage1[0]
    block.norm2 = torch.nn.LayerNorm(96, eps=1e-6)  # e.g. swapped by a user's tool
    block.attn.up_norm = torch.nn.LayerNorm(96, eps=1e-6)
    model.stage2[0].mlp.fc1 = torch.nn.Linear(192, 768)
    sum(o.sum() for o in model(torch.rand(1, 3, 64, 64))).backward()
    for layer in (block.norm2, block.attn.up_norm, model.stage2[0].mlp.fc1):
        assert layer.weight.grad.abs().sum() > 0


def test_mlp_hooks_still_see_its_layers_in_training():
    from restv2_mm.models.restv2 import Mlp
    mlp = Mlp(16, 64)
    seen = []
    mlp.fc1.register_forward_hook(lambda m, i, o: seen.append('fc1'))
    mlp(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert seen == ['fc1']


def test_drop_path_residual_adds_the_same_as_drop_path():
    from restv2_mm.models.restv2 import DropPath
    dp = DropPath(0.5).train()
    x, branch = torch.randn(64, 5, 8), torch.randn(64, 5, 8)
    torch.manual_seed(3)
    fused = dp.residual(x, branch)
    torch.manual_seed(3)
    torch.testing.assert_close(fused, x + dp(branch))
    kept = [(fused[i] - x[i]).abs().sum() > 0 for i in range(64)]
    assert 10 < sum(kept) < 54  # whole samples dropped, about half of them
    dp.eval()
    assert torch.equal(dp.residual(x, branch), x + branch)


def test_drop_paths_drawn_together_give_each_call_its_own_samples():
    from restv2_mm.models.restv2 import DropPath
    modules = [DropPath(r).train() for r in (0., 0.5, 0.8)]
    keep = torch.tensor([1., 0.5, 0.2]).view(-1, 1, 1)
    x, branch = torch.zeros(4000, 1, 1), torch.ones(4000, 1, 1)
    torch.manual_seed(0)
    with CountOps() as ops, DropPath.drawn_together(modules, keep, 2, 4000, torch.float64):
        first = [m.residual(x.double(), branch.double()) for m in modules]
        second = [m.residual(x.double(), branch.double()) for m in modules]
    assert ops.counts['bernoulli'] == 1  # one draw for all six calls
    for out, again, k in zip(first, second, (1., 0.5, 0.2)):
        assert out.dtype == torch.float64
        assert set(out.unique().tolist()) <= {0., 1 / k}  # whole samples, rescaled
        assert abs((out > 0).double().mean().item() - k) < 0.04
        assert k == 1. or not torch.equal(out, again)  # each call its own samples
    assert not any('_drawn' in m.__dict__ for m in modules)
    with CountOps() as ops:
        modules[1].residual(x, branch)  # outside the block: a draw of its own
    assert ops.counts['bernoulli_'] == 1


def test_training_forward_draws_all_drop_paths_at_once_at_the_current_rates():
    model = ResTv2('tiny', drop_path_rate=0.3).train()
    x = torch.rand(2, 3, 64, 64)
    with CountOps() as ops:
        model(x)
    assert ops.counts['bernoulli'] == 1  # 11 blocks, 22 residuals
    for m in model.modules():  # rates changed after construction are the ones drawn at
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 1 - 1e-9
    with torch.no_grad():
        model(x)
    assert torch.equal(model.drop_path_keep.flatten(), torch.full((11, ), 1e-9))
    assert 'drop_path_keep' not in model.state_dict()
    with_cp = ResTv2('tiny', drop_path_rate=0.3, with_cp=True).train()
    with CountOps() as ops:  # checkpointed blocks draw their own, to draw them again alike
        with_cp(x.requires_grad_())
    assert ops.counts['bernoulli_'] == 20 and 'bernoulli' not in ops.counts  # rates > 0
