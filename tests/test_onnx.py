"""ONNX export (tools/deploy/export_onnx.py): the file runs in onnxruntime at sizes and batches
other than the one it was recorded at, in every attention style, and a whole UperNet gives
mmseg's label map.

Each export takes tens of seconds on a CPU, so every style is exported once (module-scoped
fixtures) from a narrow ResTv2 with small windows, so that maps of 64-160 px already span
several windows, padded ones among them.
"""
import importlib.util
import os.path as osp
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime')  # a test extra: pip install -e ".[tests]"

from restv2_mm import ResTv2  # noqa: E402
from restv2_mm.deploy import onnx as deploy  # noqa: E402
from restv2_mm.models import ATTN_STYLES  # noqa: E402
from restv2_mm.utils.tool import build_model, load_config, run_tool  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'deploy', 'export_onnx.py')
DET_TOY = osp.join(ROOT, 'configs', 'toy', 'maskrcnn_restv2_t_toy.py')
SEG_TOY = osp.join(ROOT, 'configs', 'toy', 'upernet_restv2_t_toy.py')

# Every stage of ResTv2-T's layout (sr ratios 8, 4, 2, 1) with 2 blocks, so that hwin has a
# window block and a global one in each; windows of 8 x 8 tokens in stage 1 down to 2 x 2.
NARROW = dict(embed_dims=[16, 32, 64, 128], depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
              sr_ratios=[8, 4, 2, 1])
WINDOWS = (16, 8, 4, 2)
EXPORT_SIZE = (96, 128)
# the export size, one more and one that is no multiple of 32 (padded windows everywhere)
SIZES = [EXPORT_SIZE, (160, 64), (75, 113)]


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """PyTorch on one thread here: the exports are single-threaded anyway, and the tiny
    forwards of these tests only wait on each other's threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_export_tool(*argv):
    """tools/deploy/export_onnx.py in this process; returns the exit status."""
    spec = importlib.util.spec_from_file_location('export_onnx_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run_tool(module.main, [str(a) for a in argv])


# ---------------------------------------------------------------------- export-time layers
@pytest.mark.parametrize('size', [(1, 1), (4, 4), (7, 5), (13, 2), (23, 17)])
def test_exportable_adaptive_pool_equals_torch(size):
    x = torch.randn(2, 3, *size)
    for out in (1, 2, 3, 6, (2, 3)):
        expected = torch.nn.functional.adaptive_avg_pool2d(x, out)
        got = deploy.AdaptiveAvgPool2d(out)(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_exportable_copy_switches_attention_and_pooling_and_keeps_the_model():
    from mmseg.models.decode_heads.psp_head import PPM
    model = torch.nn.ModuleDict(dict(
        backbone=ResTv2(NARROW, attn_style='win', window_size=WINDOWS),
        ppm=PPM((1, 2, 3, 6), 128, 8, conv_cfg=None, norm_cfg=None, act_cfg=dict(type='ReLU'),
                align_corners=False)))
    copy = deploy.exportable_copy(model)
    impls = {m.attn_impl for m in copy.modules() if hasattr(m, 'attn_impl')}
    assert impls == {'explicit'}
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in copy.modules())
    assert sum(isinstance(m, deploy.AdaptiveAvgPool2d) for m in copy.modules()) == 4
    # the model itself is untouched
    assert {m.attn_impl for m in model.modules() if hasattr(m, 'attn_impl')} == {'sdpa'}
    assert sum(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules()) == 4


# ---------------------------------------------------------------------- backbone, 4 styles
@pytest.fixture(scope='module', params=ATTN_STYLES)
def exported_backbone(request, tmp_path_factory):
    """(style, model, onnxruntime session, model outputs at the export size before export)."""
    style = request.param
    torch.manual_seed(0)
    model = ResTv2(NARROW, attn_style=style, window_size=WINDOWS).eval()
    model.init_weights()
    if style == 'cwin':  # give the zero-initialised cross-window convs a part to play
        for conv in model.cross_window_convs:
            torch.nn.init.normal_(conv.conv.weight, std=0.1)
    example = deploy.example_input(2, *EXPORT_SIZE)
    before = deploy.run_torch(model, example)  # fills the eager window-table caches first
    path = str(tmp_path_factory.mktemp('onnx') / f'restv2_{style}.onnx')
    deploy.export_onnx(deploy.exportable_copy(model), example, path)
    return style, model, deploy.onnx_session(path), before


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_backbone_onnx_matches_pytorch_at_any_size_and_batch(exported_backbone, size, batch):
    style, model, session, _ = exported_backbone
    x = deploy.example_input(batch, *size, seed=batch)
    out = deploy.run_onnx(session, x)
    ref = deploy.run_torch(model, x)  # the model as trained: fused attention, cached tables
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert deploy.relative_error(out, ref) < 1e-4, style


def test_export_leaves_the_eager_model_as_it_was(exported_backbone):
    style, model, session, before = exported_backbone
    after = deploy.run_torch(model, deploy.example_input(2, *EXPORT_SIZE))
    assert deploy.relative_error(after, before) == 0
    assert {m.attn_impl for m in model.modules() if hasattr(m, 'attn_impl')} == {'sdpa'}


def test_onnx_file_has_named_dynamic_dims(exported_backbone):
    _, model, session, _ = exported_backbone
    assert session.get_inputs()[0].shape == ['batch', 3, 'height', 'width']
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == ['feat0', 'feat1', 'feat2', 'feat3']
    assert [o.shape[:2] for o in outputs] == [['batch', c] for c in NARROW['embed_dims']]


# ---------------------------------------------------------------------- detector features
def test_maskrcnn_features_onnx_matches_pytorch(tmp_path):
    """Backbone + FPN of the toy Mask R-CNN (narrow backbone): five maps, any size."""
    cfg = load_config(DET_TOY)
    cfg.model.backbone.arch = NARROW
    cfg.model.neck.in_channels = NARROW['embed_dims']
    torch.manual_seed(0)
    module, source = deploy.build_part(cfg, 'features')
    assert source == 'random weights'
    path = str(tmp_path / 'features.onnx')
    names = deploy.export_onnx(deploy.exportable_copy(module),
                               deploy.example_input(2, *EXPORT_SIZE), path)
    assert names == ['feat0', 'feat1', 'feat2', 'feat3', 'feat4']  # P2-P6
    session = deploy.onnx_session(path)
    for batch, size in ((1, EXPORT_SIZE), (2, (75, 113))):
        x = deploy.example_input(batch, *size)
        out, ref = deploy.run_onnx(session, x), deploy.run_torch(module, x)
        assert [o.shape[-2:] for o in out] == [r.shape[-2:] for r in ref]
        assert deploy.relative_error(out, ref) < 1e-4


# ---------------------------------------------------------------------- UperNet, whole model
@pytest.fixture(scope='module')
def upernet(tmp_path_factory):
    """The toy UperNet with seeded random weights as a train.py checkpoint, exported by the
    tool with --part model; (checkpoint, onnx file, the tool's stdout)."""
    import contextlib
    import io
    tmp = tmp_path_factory.mktemp('upernet')
    cfg = load_config(SEG_TOY)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    checkpoint = tmp / 'upernet_toy.pth'
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': dict(cfg.metainfo)}}, checkpoint)
    out = tmp / 'upernet_toy.onnx'
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = run_export_tool(SEG_TOY, checkpoint, '--part', 'model', '--shape', 128, 128,
                                 '--out', out, '--repeats', 1)
    assert status == 0, stdout.getvalue()
    return checkpoint, out, stdout.getvalue()


def test_export_tool_checks_its_file(upernet):
    _, out, log = upernet
    errors = re.findall(r'^\s+(\d+) x 3 x (\d+) x (\d+)\s+relative error (\S+)\s+ok$', log,
                        re.M)
    assert [e[:3] for e in errors] == [('1', '128', '128'), ('2', '97', '161')]
    assert all(float(e[3]) < 1e-4 for e in errors)
    size = float(re.search(r'wrote .* \((\d+\.\d) MB\)', log).group(1))
    assert size == pytest.approx(osp.getsize(out) / 2**20, abs=0.1)
    assert re.search(r'onnxruntime \d+\.\d ms, PyTorch \d+\.\d ms', log)
    assert 'input  image: batch x 3 x height x width' in log
    assert 'output scores: 1 x 6 x 128 x 128' in log


def test_upernet_onnx_gives_inference_model_label_map(upernet, tmp_path):
    import mmcv
    from mmseg.apis import inference_model, init_model

    from restv2_mm.toy_data import make_toy_data
    checkpoint, out, _ = upernet
    make_toy_data(str(tmp_path), kind='ade', num_train=1, num_val=1, size=128, seed=2)
    image_path = str(tmp_path / 'ade' / 'ADEChallengeData2016' / 'images' / 'validation' /
                     'ADE_val_00000001.jpg')
    model = init_model(load_config(SEG_TOY), str(checkpoint), device='cpu')
    expected = inference_model(model, image_path).pred_sem_seg.data[0].numpy()

    image = mmcv.imread(image_path)  # BGR, as the test pipeline loads it
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    scores = deploy.run_onnx(deploy.onnx_session(str(out)), x)[0]
    labels = scores.argmax(1)[0]
    assert labels.shape == expected.shape == (128, 128)
    assert len(np.unique(expected)) > 1  # a map worth comparing
    np.testing.assert_array_equal(labels, expected)


def test_backbone_file_loads_into_the_backbone_and_leaves_the_heads(tmp_path):
    """A backbone-only checkpoint (convert_official.py's layout) for a whole-model export."""
    cfg = load_config(SEG_TOY)
    torch.manual_seed(0)
    trained = build_model(cfg)
    trained.init_weights()
    path = tmp_path / 'backbone.pth'
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in trained.backbone.state_dict().items()}}, path)
    torch.manual_seed(1)
    model = build_model(cfg)
    model.init_weights()
    heads = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    assert 'backbone only' in deploy.load_model_weights(model, str(path))
    for k, v in trained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    for k, v in model.decode_head.state_dict().items():
        assert torch.equal(v, heads[k]), k


def test_segmentor_scores_pad_and_crop_like_mmseg():
    """With test_cfg=dict(size_divisor=32) mmseg pads the normalised image, predicts and crops
    the scores; the exported module does the same inside."""
    cfg = load_config(SEG_TOY, {'model.data_preprocessor.test_cfg': dict(size_divisor=32)})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    from mmseg.structures import SegDataSample
    image = torch.rand(3, 75, 100) * 255
    sample = SegDataSample(metainfo=dict(img_shape=(75, 100), ori_shape=(75, 100)))
    data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), False)
    assert data['inputs'].shape[-2:] == (96, 128)  # mmseg padded it
    with torch.no_grad():
        expected = model.predict(data['inputs'], data['data_samples'])[0].seg_logits.data
        scores = deploy.SegmentorScores(model).eval()(image[None])[0]
    assert scores.shape == expected.shape == (6, 75, 100)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the tool's errors
@pytest.mark.parametrize('argv,message', [
    ((DET_TOY, '--part', 'model'), 'mmdeploy'),
    ((SEG_TOY, 'missing.pth'), 'not found'),
    ((SEG_TOY, '--part', 'model', '--cfg-options',
      'model.data_preprocessor.test_cfg.size=[512,512]'), 'size_divisor'),
])
def test_export_tool_errors_name_the_fix(argv, message, tmp_path, capsys):
    assert run_export_tool(*argv, '--out', tmp_path / 'x.onnx') == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: ') and message in err
    assert not (tmp_path / 'x.onnx').exists()


def test_export_tool_refuses_inputs_under_32_pixels(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_export_tool(SEG_TOY, '--shape', 16, 64, '--out', tmp_path / 'x.onnx')
    assert e.value.code == 2 and 'H, W >= 32' in capsys.readouterr().err
