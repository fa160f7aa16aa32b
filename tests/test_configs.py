"""Every config parses and builds its real model; the models and schedules match the paper."""
import functools
import glob
import os.path as osp

import pytest
import torch

import restv2_mm  # noqa: F401  (registers ResTv2 and the safe checkpoint globals)
from restv2_mm import ResTv2
from restv2_mm.toy_data import TOY_CLASSES, TOY_PALETTE, TOY_SEG_CLASSES, TOY_SEG_PALETTE

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(
    osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'),
                                            recursive=True))
ARCH_OF = {'t': 'tiny', 's': 'small', 'b': 'base'}
DROP_PATH = {'tiny': 0.1, 'small': 0.2, 'base': 0.3}  # FACTS.md, det and seg

# Paper Tables 4 and 5: parameters (M) with 80-class Mask R-CNN heads and with the
# 150-class UperNet + auxiliary FCN head.
PAPER_PARAMS = {
    'configs/maskrcnn_restv2_t_coco.py': 49.9,
    'configs/maskrcnn_restv2_s_coco.py': 60.7,
    'configs/maskrcnn_restv2_b_coco.py': 75.5,
    'configs/upernet_restv2_t_ade20k.py': 62.1,
    'configs/upernet_restv2_s_ade20k.py': 72.9,
    'configs/upernet_restv2_b_ade20k.py': 87.6,
}


def load(path):
    from mmengine.config import Config
    return Config.fromfile(osp.join(ROOT, path))


def build(path):
    """The model of a config, built as the Runner builds it (random init, CPU)."""
    import importlib

    from mmengine.registry import DefaultScope
    cfg = load(path)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return registry.MODELS.build(cfg.model)


@functools.lru_cache(maxsize=None)
def built(path):
    """What the tests read from a built model (the models themselves are not kept)."""
    model = build(path)
    bb = model.backbone
    return dict(
        backbone_type=type(bb),
        embed_dims=list(bb.embed_dims),
        attn_style=bb.attn_style,
        window_size=bb.window_size,
        params=sum(p.numel() for p in model.parameters()))


def n_params(path) -> float:
    return built(path)['params'] / 1e6


def test_all_configs_found():
    names = {osp.basename(p) for p in CONFIGS}
    for size in 'tsb':
        assert f'maskrcnn_restv2_{size}_coco.py' in names
        assert f'maskrcnn_restv2_{size}_coco_3x.py' in names
        assert f'upernet_restv2_{size}_ade20k.py' in names
    for style in ('win', 'cwin', 'hwin'):
        assert f'maskrcnn_restv2_t_coco_{style}.py' in names
    assert {'maskrcnn_restv2_t_toy.py', 'upernet_restv2_t_toy.py'} <= names


@pytest.mark.parametrize('path', CONFIGS)
def test_config_parses_and_builds_its_model(path):
    cfg = load(path)
    assert cfg.default_scope in ('mmdet', 'mmseg')
    assert 'restv2_mm' in cfg.custom_imports['imports']
    model = built(path)
    assert model['backbone_type'] is ResTv2
    assert model['attn_style'] == cfg.model.backbone.attn_style
    # the neck / decode head reads exactly the backbone's channels
    if cfg.default_scope == 'mmdet':
        assert list(cfg.model.neck.in_channels) == model['embed_dims']
    else:
        assert list(cfg.model.decode_head.in_channels) == model['embed_dims']
        assert cfg.model.auxiliary_head.in_channels == model['embed_dims'][2]


@pytest.mark.parametrize('path,paper', sorted(PAPER_PARAMS.items()))
def test_parameter_count_matches_paper(path, paper):
    assert abs(n_params(path) - paper) <= 0.05, (path, n_params(path))


def test_window_styles_change_only_the_attention():
    base = built('configs/maskrcnn_restv2_t_coco.py')['params']
    for style in ('win', 'hwin'):
        assert built(f'configs/maskrcnn_restv2_t_coco_{style}.py')['params'] == base
    # CWin adds one 7x7 depth-wise conv (with bias) per stage
    cwin = built('configs/maskrcnn_restv2_t_coco_cwin.py')['params']
    assert cwin - base == sum(c * 50 for c in (96, 192, 384, 768))


@pytest.mark.parametrize('size', 'tsb')
def test_maskrcnn_1x_schedule_is_the_papers(size):
    cfg = load(f'configs/maskrcnn_restv2_{size}_coco.py')
    arch = ARCH_OF[size]
    bb = cfg.model.backbone
    assert bb.type == 'ResTv2' and bb.arch == arch
    assert bb.drop_path_rate == DROP_PATH[arch]
    assert bb.init_cfg == dict(type='Pretrained', checkpoint=f'checkpoints/restv2_{arch}_224.pth')
    assert cfg.model.roi_head.bbox_head.num_classes == 80
    assert cfg.train_dataloader.dataset.data_root == 'data/coco/'
    assert cfg.train_cfg.max_epochs == 12
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert steps[0].milestones == [8, 11]
    ow = cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper'
    assert ow.optimizer.type == 'AdamW' and ow.optimizer.lr == 1e-4
    assert ow.optimizer.weight_decay == 0.05
    assert ow.paramwise_cfg.norm_decay_mult == 0 and ow.paramwise_cfg.bias_decay_mult == 0
    assert cfg.train_dataloader.batch_size * 8 == 16
    assert cfg.auto_scale_lr.base_batch_size == 16 and cfg.auto_scale_lr.enable


@pytest.mark.parametrize('size', 'tsb')
def test_maskrcnn_3x_is_36_epochs_multiscale_480_to_800(size):
    cfg = load(f'configs/maskrcnn_restv2_{size}_coco_3x.py')
    assert cfg.model.backbone.arch == ARCH_OF[size]
    assert cfg.train_cfg.max_epochs == 36
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert steps[0].milestones == [27, 33] and steps[0].end == 36
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomResize']
    assert len(resize) == 1 and resize[0].keep_ratio
    assert sorted(min(s) for s in resize[0].scale) == [480, 800]
    assert cfg.optim_wrapper.optimizer.lr == 1e-4


@pytest.mark.parametrize('style', ['win', 'cwin', 'hwin'])
def test_window_configs_set_the_style_and_paper_windows(style):
    cfg = load(f'configs/maskrcnn_restv2_t_coco_{style}.py')
    assert cfg.model.backbone.attn_style == style
    assert tuple(cfg.model.backbone.window_size) == (64, 32, 16, 8)
    assert built(f'configs/maskrcnn_restv2_t_coco_{style}.py')['window_size'] == (64, 32, 16, 8)


@pytest.mark.parametrize('size', 'tsb')
def test_upernet_schedule_is_the_papers(size):
    cfg = load(f'configs/upernet_restv2_{size}_ade20k.py')
    arch = ARCH_OF[size]
    assert cfg.model.backbone.arch == arch
    assert cfg.model.backbone.drop_path_rate == DROP_PATH[arch]
    assert cfg.model.backbone.init_cfg.checkpoint == f'checkpoints/restv2_{arch}_224.pth'
    assert cfg.model.decode_head.type == 'UPerHead'
    assert cfg.model.decode_head.num_classes == 150
    aux = cfg.model.auxiliary_head
    assert aux.type == 'FCNHead' and aux.in_index == 2 and aux.num_classes == 150
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN' and aux.norm_cfg.type == 'SyncBN'
    assert cfg.train_dataloader.dataset.data_root == 'data/ade/ADEChallengeData2016'
    assert tuple(cfg.crop_size) == (512, 512)
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    assert cfg.train_cfg.max_iters == 160000
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == 6e-5 and opt.weight_decay == 0.01
    warmup, poly = cfg.param_scheduler
    assert warmup.type == 'LinearLR' and warmup.end == 1500 and not warmup.by_epoch
    assert poly.type == 'PolyLR' and poly.begin == 1500 and poly.end == 160000
    assert cfg.train_dataloader.batch_size * 8 == 16


def test_syncbn_heads_become_batchnorm_in_one_process(tmp_path):
    """The Runner reverts the heads' SyncBN to BN when it is not distributed."""
    from mmengine.runner import Runner
    cfg = load('configs/upernet_restv2_t_ade20k.py')
    cfg.model.backbone.init_cfg = None
    cfg.work_dir = str(tmp_path)
    cfg.launcher = 'none'
    model = build('configs/upernet_restv2_t_ade20k.py')
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    runner = Runner.from_cfg(cfg)
    modules = list(runner.model.modules())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in modules)
    heads = list(runner.model.decode_head.modules()) + list(runner.model.auxiliary_head.modules())
    plain_bn = [m for m in heads if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(plain_bn) == sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_toy_configs_use_the_toy_classes_and_no_pretrained_weights():
    det = load('configs/toy/maskrcnn_restv2_t_toy.py')
    seg = load('configs/toy/upernet_restv2_t_toy.py')
    for cfg in (det, seg):
        assert cfg.model.backbone.init_cfg is None
        assert cfg.model.backbone.arch == 'tiny'
        assert cfg.optim_wrapper.type == 'OptimWrapper'  # fp32: runs on a CPU
        assert cfg.train_dataloader.dataset.data_root.startswith('data/toy/')
    assert tuple(det.metainfo.classes) == TOY_CLASSES
    assert [tuple(c) for c in det.metainfo.palette] == TOY_PALETTE
    assert det.model.roi_head.bbox_head.num_classes == len(TOY_CLASSES)
    assert det.model.roi_head.mask_head.num_classes == len(TOY_CLASSES)
    assert set(det.val_evaluator.metric) == {'bbox', 'segm'}
    assert det.val_evaluator.type == 'CocoMetric'
    assert tuple(seg.metainfo.classes) == TOY_SEG_CLASSES
    assert [tuple(c) for c in seg.metainfo.palette] == TOY_SEG_PALETTE
    assert seg.model.decode_head.num_classes == len(TOY_SEG_CLASSES)
    assert seg.train_dataloader.dataset.reduce_zero_label
    assert seg.val_evaluator.type == 'IoUMetric'


def test_gpu_toy_config_and_its_data_command_agree():
    """The command in the GPU toy config's header writes the data that the config reads."""
    import re
    import shlex
    path = 'configs/toy/maskrcnn_restv2_t_toy_gpu.py'
    cfg = load(path)
    with open(osp.join(ROOT, path)) as f:
        header = ''.join(line.lstrip('# ') for line in f if line.startswith('#'))
    command = re.search(r'(python tools/make_toy_data\.py[^&]*)&&\s*(python tools/train\.py \S+)',
                        header.replace('\\\n', ' '))
    assert command, header
    args = shlex.split(command.group(1))
    assert command.group(2).split()[-1] == path
    opt = {k: v for k, v in zip(args[2::1], args[3::1]) if k.startswith('--')}
    assert cfg.train_dataloader.dataset.data_root == osp.join(args[2], 'coco') + '/'
    assert opt['--kind'] == 'coco'
    size = int(opt['--size'])
    assert tuple(cfg.img_scale) == (size, size)
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'Resize']
    assert tuple(resize[0].scale) == (size, size)
    # the full Mask R-CNN heads of the COCO config, mixed precision, 16 images a batch
    assert cfg.model.neck.out_channels == 256
    assert cfg.model.roi_head.bbox_head.fc_out_channels == 1024
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.train_dataloader.batch_size == 16
    assert cfg.model.backbone.init_cfg is None
    iters = cfg.train_cfg.max_epochs * int(opt['--num-train']) // 16
    assert 700 <= iters <= 800  # 750: 4 min 6 s of training on one H200 (README)


def test_fast_training_as_the_configs_set_it_and_from_the_command_line():
    """On in the Mask R-CNN 1x configs (a few padded sizes), off in the 3x ones (sizes drawn
    at random) and in the UperNet configs; ``--cfg-options`` sets it."""
    import importlib

    from mmengine.registry import DefaultScope
    for size in 'tsb':
        backbone = load(f'configs/maskrcnn_restv2_{size}_coco.py').model.backbone
        assert backbone.fast_training is True and backbone.train_graph_cache_size == 8
        assert load(f'configs/maskrcnn_restv2_{size}_coco_3x.py').model.backbone \
            .fast_training is False
        assert load(f'configs/upernet_restv2_{size}_ade20k.py').model.backbone.fast_training \
            is False
    for style in ('win', 'cwin', 'hwin'):
        assert load(f'configs/maskrcnn_restv2_t_coco_{style}.py').model.backbone.fast_training
    cfg = load('configs/toy/upernet_restv2_t_toy.py')
    cfg.merge_from_dict({'model.backbone.fast_training': True,
                         'model.backbone.train_graph_cache_size': 2})
    registry = importlib.import_module('mmseg.registry')
    with DefaultScope.overwrite_default_scope('mmseg'):
        backbone = registry.MODELS.build(cfg.model).backbone
    assert backbone.fast_training is True and backbone._train_graphs.max_graphs == 2


def test_cfg_options_that_do_not_fit_the_config_stop_with_one_clear_error():
    from restv2_mm.utils.tool import ToolError, load_config
    path = osp.join(ROOT, 'configs', 'toy', 'maskrcnn_restv2_t_toy.py')  # init_cfg=None
    with pytest.raises(ToolError, match=r'--cfg-options do not fit .*toy\.py: .*init_cfg') as err:
        load_config(path, {'model.backbone.init_cfg.checkpoint': 'nope.pth'})
    # the way out mmengine suggests, as it is written on the command line, and it works
    assert 'add model.backbone.init_cfg._delete_=True beside the keys' in str(err.value)
    cfg = load_config(path, {'model.backbone.init_cfg._delete_': True,
                             'model.backbone.init_cfg.type': 'Pretrained',
                             'model.backbone.init_cfg.checkpoint': 'nope.pth'})
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint='nope.pth')
    cfg = load_config(path, {'model.backbone.fast_training': True})
    assert cfg.model.backbone.fast_training is True


def test_reading_a_config_with_bases_warns_of_nothing_in_mmengine():
    """mmengine's Config imports pkg_resources again for each _base_, and setuptools < 81
    (which mmcv's build needs) warns at each import: the tools read configs without them."""
    import warnings

    from restv2_mm.utils.tool import load_config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        cfg = load_config(osp.join(ROOT, 'configs', 'maskrcnn_restv2_t_coco.py'))
    assert cfg.model.backbone.type == 'ResTv2'
    assert not [w for w in caught if 'pkg_resources' in str(w.message)], caught


def test_a_cfg_option_mmengine_cannot_read_is_a_usage_error_naming_it(capsys):
    import argparse

    from restv2_mm.utils.tool import CfgOptions
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions)
    args = parser.parse_args(['--cfg-options', 'a.b=1', 'c=[1,2]'])
    assert args.cfg_options == {'a.b': 1, 'c': [1, 2]}
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(['--cfg-options', 'a.b=1', "init_cfg=dict(type='P',checkpoint='x')"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "cannot read \"init_cfg=dict(type='P',checkpoint='x')\"" in err
    assert 'Traceback' not in err and len(err.splitlines()) <= 3
