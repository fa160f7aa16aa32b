"""The analysis tools: FLOPs against the paper, Fourier analysis, demo picture, converter,
and the one-line errors they give for bad input."""
import argparse
import csv
import importlib.util
import math
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from reference_restv2 import RefResTv2
from restv2_mm import ResTv2
from restv2_mm.analysis.flops import count_flops
from restv2_mm.analysis.fourier import block_names, relative_log_amplitude
from restv2_mm.utils.tool import build_model, load_config, run_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_TOY = osp.join(ROOT, 'configs', 'toy', 'maskrcnn_restv2_t_toy.py')
SEG_TOY = osp.join(ROOT, 'configs', 'toy', 'upernet_restv2_t_toy.py')
TOOLS = {
    'get_flops': osp.join(ROOT, 'tools', 'analysis', 'get_flops.py'),
    'fourier': osp.join(ROOT, 'tools', 'analysis', 'fourier_analysis.py'),
    'demo': osp.join(ROOT, 'tools', 'demo.py'),
    'convert': osp.join(ROOT, 'tools', 'convert_official.py'),
}


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', TOOLS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, *argv):
    """Run a tool in this process as its command line does; returns the exit status."""
    from mmengine.logging import MMLogger
    for logger in MMLogger._instance_dict.values():  # log to this test's captured stderr
        for handler in logger.handlers:
            if type(handler).__name__ == 'StreamHandler':
                handler.stream = sys.stderr
    return run_tool(load_tool(name).main, [str(a) for a in argv])


def table_rows(out):
    """{row name: our number} of get_flops' table (rows 'name   1.23 G   paper  diff')."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r'^(.+?)\s+(\d+\.\d+) [GM]\s', line + ' ')
        if m:
            rows[m.group(1).strip()] = float(m.group(2))
    return rows


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A folder of three small photos-like pictures (smooth colour fields plus edges)."""
    import cv2
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for i in range(3):
        img = cv2.GaussianBlur((rng.random((96, 128, 3)) * 255).astype(np.uint8), (0, 0), 4)
        cv2.rectangle(img, (20 + 10 * i, 20), (70, 60 + 5 * i), (255, 255, 255), -1)
        cv2.imwrite(str(folder / f'img{i}.jpg'), img)
    return folder


@pytest.fixture(scope='module')
def det_checkpoint(tmp_path_factory):
    """The toy Mask R-CNN with random weights, its box head made sure of class 0."""
    cfg = load_config(DET_TOY)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.bias[0] = 8.
    path = tmp_path_factory.mktemp('det') / 'toy_det.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    return path


@pytest.fixture
def authors_checkpoint(tmp_path):
    """A file in the authors' layout: weights under 'model', training state beside them."""
    zoo = ResTv2.arch_zoo['tiny']
    torch.manual_seed(0)
    ref = RefResTv2(zoo['embed_dims'], zoo['depths'], zoo['num_heads'], zoo['sr_ratios'])
    state = ref.classification_state_dict()
    path = tmp_path / 'restv2_tiny_224.pth'
    torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 299,
                'scaler': {'scale': 65536.0},
                'args': argparse.Namespace(model='restv2_tiny', lr=1.5e-3)}, path)
    return path, state


# ---------------------------------------------------------------------------- FLOPs
def test_tiny_backbone_flops_within_3_percent_of_table1(capsys):
    assert run('get_flops', '--backbone', 'tiny') == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert abs(rows['backbone GFLOPs'] - 4.1) / 4.1 < 0.03
    assert abs(rows['classifier GFLOPs (Table 1)'] - 4.1) / 4.1 < 0.03
    assert abs(rows['classifier params (Table 1)'] - 30.43) < 0.01  # Table 1: 30.43M
    assert 'Within 3% of the paper: yes' in out


def test_attention_products_are_counted():
    """QK^T and AV of every block: 2 x N_queries x N_keys x C multiply-adds, none lost to the
    fused kernel (the model is built on the SDPA path)."""
    model = ResTv2('tiny', attn_impl='sdpa').eval()
    result = count_flops(model, torch.zeros(1, 3, 224, 224))
    expected = 0
    for i, (c, r, d) in enumerate(zip(model.embed_dims, model.sr_ratios, model.depths)):
        side = 56 // 2**i
        expected += d * 2 * side**2 * math.ceil(side / r)**2 * c
    assert result['attention'] == expected
    # a plain trace of the fused kernel sees everything but these products
    from mmengine.analysis import FlopAnalyzer
    with torch.no_grad():
        plain = FlopAnalyzer(ResTv2('tiny').eval(), (torch.zeros(1, 3, 224, 224), ))
        plain.unsupported_ops_warnings(False)
        assert plain.total() == result['flops'] - expected


@pytest.mark.parametrize('config,head', [(DET_TOY, 'roi_head'), (SEG_TOY, 'decode_head')])
def test_whole_model_flops_from_toy_config(config, head, capsys):
    assert run('get_flops', config, '--shape', '128', '128') == 0
    out = capsys.readouterr().out
    assert 'input 128x128' in out
    rows = table_rows(out)
    assert rows['GFLOPs, all ops'] > rows['GFLOPs w/o attention QK^T, AV'] > 0
    assert rows['GFLOPs, all ops'] - rows['GFLOPs w/o attention QK^T, AV'] == pytest.approx(
        rows['attention QK^T, AV (backbone)'], abs=0.02)
    assert rows['backbone'] > 0 and rows[head] > 0
    if config == DET_TOY:
        assert 'RoIAlign' in out  # the counter's blind spot is named


# ---------------------------------------------------------------------------- Fourier
def test_relative_log_amplitude_tells_smooth_from_noisy_maps():
    torch.manual_seed(0)
    noise = torch.randn(2, 8, 32, 32)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)
    noisy_curve = relative_log_amplitude(noise)
    smooth_curve = relative_log_amplitude(smooth)
    assert len(noisy_curve) == 16 and noisy_curve[0] == 0
    assert abs(noisy_curve[-1]) < 0.5  # white noise: flat spectrum
    assert smooth_curve[-1] < -2  # blurred: high frequencies damped


def test_fourier_analysis_writes_plot_and_one_csv_row_per_block(images, det_checkpoint,
                                                                  tmp_path, capsys):
    import cv2
    out_dir = tmp_path / 'fourier'
    assert run('fourier', DET_TOY, '--checkpoint', det_checkpoint, '--images', images,
               '--out-dir', out_dir, '--img-size', 64) == 0
    png = out_dir / 'fourier_maskrcnn_restv2_t_toy.png'
    assert cv2.imread(str(png)) is not None
    with open(out_dir / 'fourier_maskrcnn_restv2_t_toy.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['block'] for r in rows] == block_names(ResTv2('tiny'))  # 11 blocks of T
    for r in rows:
        assert float(r['log_amp_0.0pi']) == 0
        assert float(r['delta_log_amplitude']) == pytest.approx(float(r['log_amp_1.0pi']))
    assert [(int(r['height']), int(r['width'])) for r in rows][::5] == [(16, 16), (4, 4),
                                                                       (2, 2)]
    assert '3 images at 64x64' in capsys.readouterr().out


# ---------------------------------------------------------------------------- demo
def test_detection_demo_draws_on_the_image(images, det_checkpoint, tmp_path, capsys):
    import cv2
    out = tmp_path / 'pred.png'
    assert run('demo', images / 'img0.jpg', DET_TOY, det_checkpoint, '--out', out) == 0
    drawn = cv2.imread(str(out))
    original = cv2.imread(str(images / 'img0.jpg'))
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).mean() > 5
    assert 'objects scoring >= 0.3' in capsys.readouterr().out


def test_segmentation_demo_overlays_colours(images, tmp_path, capsys):
    import cv2
    cfg = load_config(SEG_TOY)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    ckpt = tmp_path / 'toy_seg.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    out = tmp_path / 'seg.png'
    assert run('demo', images / 'img1.jpg', SEG_TOY, ckpt, '--out', out) == 0
    drawn = cv2.imread(str(out))
    original = cv2.imread(str(images / 'img1.jpg'))
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).mean() > 5
    assert 'in the picture: ' in capsys.readouterr().out


# ---------------------------------------------------------------------------- converter
def test_converted_checkpoint_loads_with_only_output_norms_missing(authors_checkpoint,
                                                                   tmp_path, capsys):
    src, state = authors_checkpoint
    dst = tmp_path / 'backbone.pth'
    assert run('convert', src, dst) == 0
    out = capsys.readouterr().out
    assert 'head.weight' in out and 'optimizer' in out and 'args' in out

    converted = torch.load(dst, weights_only=True)
    assert converted['meta']['arch'] == 'tiny' and converted['meta']['epoch'] == 299
    assert all(k.startswith('backbone.') for k in converted['state_dict'])
    backbone = ResTv2('tiny')
    missing, unexpected = backbone.load_state_dict(
        {k[len('backbone.'):]: v for k, v in converted['state_dict'].items()}, strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f'norm{i}.{p}' for i in range(4)
                                     for p in ('weight', 'bias'))
    for k, v in backbone.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def not_restv2_config(tmp_path_factory):
    path = tmp_path_factory.mktemp('cfg') / 'resnet_maskrcnn.py'
    path.write_text("default_scope = 'mmdet'\n"
                    "model = dict(type='MaskRCNN', backbone=dict(type='ResNet', depth=50))\n")
    return path


@pytest.fixture(scope='module')
def broken_image(tmp_path_factory):
    path = tmp_path_factory.mktemp('broken') / 'broken.jpg'
    path.write_bytes(b'this is not a jpeg')
    return path


def bad_inputs(tmp, not_restv2, broken, images, det_ckpt):
    missing = tmp / 'missing.py'
    not_ckpt = tmp / 'not_a_checkpoint.pth'
    not_ckpt.write_text('hello')
    return {
        'flops_missing_config': (('get_flops', missing), 'not found'),
        'flops_not_restv2': (('get_flops', not_restv2), "is 'ResNet', not 'ResTv2'"),
        'flops_tiny_input': (('get_flops', '--backbone', 't', '--shape', '16'), 'at least 32'),
        'fourier_not_restv2': (('fourier', not_restv2, '--images', images),
                               "not 'ResTv2'"),
        'fourier_broken_image': (('fourier', DET_TOY, '--images', broken),
                                 'Cannot read image'),
        'fourier_no_folder': (('fourier', DET_TOY, '--images', tmp / 'nowhere'),
                              'not found'),
        'fourier_missing_checkpoint': (('fourier', DET_TOY, '--images', images,
                                        '--checkpoint', tmp / 'none.pth'), 'not found'),
        'demo_broken_image': (('demo', broken, DET_TOY, det_ckpt), 'Cannot read image'),
        'demo_not_restv2': (('demo', images / 'img0.jpg', not_restv2, det_ckpt),
                            "not 'ResTv2'"),
        'demo_wrong_checkpoint': (('demo', images / 'img0.jpg', DET_TOY, not_ckpt),
                                  'not a torch checkpoint'),
        'convert_missing': (('convert', tmp / 'none.pth', tmp / 'out.pth'), 'not found'),
        'convert_not_checkpoint': (('convert', not_ckpt, tmp / 'out.pth'),
                                   'not a torch checkpoint'),
    }


BAD_CASES = ['flops_missing_config', 'flops_not_restv2', 'flops_tiny_input',
             'fourier_not_restv2', 'fourier_broken_image', 'fourier_no_folder',
             'fourier_missing_checkpoint', 'demo_broken_image', 'demo_not_restv2',
             'demo_wrong_checkpoint', 'convert_missing', 'convert_not_checkpoint']


@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_input_gives_one_line_error_and_exit_1(case, tmp_path, not_restv2_config,
                                                   broken_image, images, det_checkpoint,
                                                   capsys):
    (tool, *argv), message = bad_inputs(tmp_path, not_restv2_config, broken_image, images,
                                        det_checkpoint)[case]
    assert run(tool, *argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after any log lines of the toolboxes
    assert last.startswith('error: ') and message in last
    assert 'Traceback' not in err


@pytest.mark.parametrize('tool', ['get_flops', 'fourier', 'demo', 'convert'])
def test_command_line_exit_status_without_traceback(tool, tmp_path):
    argv = {
        'get_flops': [tmp_path / 'missing.py'],
        'fourier': [tmp_path / 'missing.py', '--images', tmp_path],
        'demo': [tmp_path / 'missing.jpg', DET_TOY, tmp_path / 'none.pth'],
        'convert': [tmp_path / 'none.pth', tmp_path / 'out.pth'],
    }[tool]
    proc = subprocess.run([sys.executable, TOOLS[tool], *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert proc.returncode == 1
    assert 'not found' in proc.stderr and 'Traceback' not in proc.stderr
