#!/usr/bin/env python
"""Speed and memory of ResTv2 against its peers, measured in one run on one GPU.

    python tools/analysis/benchmark.py                       # every section, on cuda:0
    python tools/analysis/benchmark.py --sections dense,styles --out-json work_dirs/dense.json
    python tools/analysis/benchmark.py --quick               # tiny sizes on the CPU (a smoke test)
    python tools/analysis/benchmark.py --rounds 3            # best of 3 rounds (shared hosts)

Sections (``--sections``, comma separated; default all):

- ``backbone224``: backbone throughput at 224 x 224, batch 128, fp16 autocast, inference, for
  ResTv2 T/S/B/L, mmdet's Swin-T (as in mmdet's Mask R-CNN Swin-T config), mmdet's PVTv2-b2
  and timm's ConvNeXt-T (skipped with a note where timm is not installed).
- ``dense``: backbone latency and peak memory at 800 x 1344, batch 2, inference and one AMP
  training step (forward + backward), for ResTv2-T in each attention style, ResTv2-T with
  the explicit attention path (``attn_impl='explicit'``) and Swin-T.
- ``styles``: ResTv2-T inference latency in each style at 800 x 1344 (batch 2), 1600 x 2688
  and 2400 x 4032 (batch 1), drawn as latency per image against input size (``--out-plot``).
- ``detector``: Mask R-CNN ResTv2-T against mmdet's Mask R-CNN Swin-T: predict at 800 x 1344
  (batch 1, fp16) and one AMP training iteration at batch 2 with peak memory.
- ``segmentor``: UperNet ResTv2-T against mmseg's UperNet Swin-T: predict at 512 x 512.

Every model has random weights (no pretrained files are read or downloaded). Times are
medians over timed repeats after warm-up, taken with CUDA events (``time.perf_counter`` on
the CPU); peak memory is ``torch.cuda.max_memory_allocated`` over the timed repeats, weights
and optimizer state included. Each measurement is isolated (caches emptied, peak statistics
reset) and one that fails, say out of memory, is reported as such while the rest go on.
With ``--rounds R`` everything is measured R times in turn and each measurement keeps its
round with the lowest median: on a shared host whose CPU launches the kernels, contention
comes in phases that only ever add time, and R rounds give each model R chances to miss
them. The JSON keeps every round's median.

The run ends with a table of times, memory and ratios, the PASS/MISS lines of the speed
targets, and writes everything to ``--out-json`` (and the style plot to ``--out-plot``).
"""
import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import os
import os.path as osp
import platform
import shlex
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
try:
    import restv2_mm  # noqa: F401  (registers ResTv2 into mmdet's and mmseg's MODELS)
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, REPO_ROOT)
    import restv2_mm  # noqa: F401
from restv2_mm import ResTv2

SECTIONS = ('backbone224', 'dense', 'styles', 'detector', 'segmentor')
STYLES = ('global', 'win', 'cwin', 'hwin')
RESTV2_ARCHS = ('tiny', 'small', 'base', 'large')

SWIN_DET_CONFIG = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
PVTV2_B2_CONFIG = 'mmdet::pvt/retinanet_pvtv2-b2_fpn_1x_coco.py'
SWIN_SEG_CONFIG = ('mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_'
                   'ade20k-512x512.py')
RESTV2_DET_CONFIG = 'configs/maskrcnn_restv2_t_coco.py'
RESTV2_SEG_CONFIG = 'configs/upernet_restv2_t_ade20k.py'
RESTV2_T_CHANNELS = [96, 192, 384, 768]

# Sizes and repeats: (warm-up, timed). The full run stays well inside 9 minutes on an H100.
FULL = dict(
    cls_size=(224, 224), cls_batch=128, cls_reps=(10, 30),
    dense_size=(800, 1344), dense_batch=2, dense_infer_reps=(10, 30), dense_train_reps=(5, 20),
    style_sizes=((800, 1344, 2), (1600, 2688, 1), (2400, 4032, 1)),
    style_reps=((10, 30), (5, 15), (3, 10)),
    det_size=(800, 1344), det_train_batch=2, det_predict_reps=(10, 30), det_train_reps=(5, 15),
    seg_size=(512, 512), seg_predict_reps=(10, 30),
)
# The quick run only proves that every path works: tiny inputs, one timed call, and lighter
# heads for the whole models (see lighten_for_quick).
QUICK = dict(
    cls_size=(64, 64), cls_batch=1, cls_reps=(0, 1),
    dense_size=(64, 96), dense_batch=2, dense_infer_reps=(0, 1), dense_train_reps=(0, 1),
    style_sizes=((64, 96, 2), (96, 128, 1), (128, 160, 1)),
    style_reps=((0, 1), (0, 1), (0, 1)),
    det_size=(96, 128), det_train_batch=2, det_predict_reps=(0, 1), det_train_reps=(0, 1),
    seg_size=(64, 64), seg_predict_reps=(0, 1),
    quick=True,
)


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------
class Bench:
    """Runs isolated measurements on one device and keeps their results by key."""

    def __init__(self, device: torch.device, amp: bool, compile_models: bool = False,
                 cudnn_benchmark: bool = True):
        self.device = device
        self.cuda = device.type == 'cuda'
        self.amp = amp and self.cuda
        self.compile_models = compile_models
        self.allow_cudnn_benchmark = cudnn_benchmark and self.cuda
        self.results: Dict[str, dict] = {}
        torch.backends.cudnn.benchmark = self.allow_cudnn_benchmark

    @contextlib.contextmanager
    def cudnn_benchmark(self, enabled: bool):
        """cudnn autotuning as a whole model's config asks (env_cfg.cudnn_benchmark)."""
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = bool(enabled) and self.allow_cudnn_benchmark
        try:
            yield torch.backends.cudnn.benchmark
        finally:
            torch.backends.cudnn.benchmark = before

    def autocast(self):
        if self.amp:
            return torch.autocast('cuda', dtype=torch.float16)
        return contextlib.nullcontext()

    def maybe_compile(self, module):
        return torch.compile(module) if self.compile_models else module

    def clear(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def time_steps(self, step: Callable[[], object], warmup: int, reps: int) -> dict:
        """Median and spread of ``reps`` timed calls of ``step`` after ``warmup`` calls."""
        for _ in range(warmup):
            step()
        times = []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            for _ in range(reps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            peak = torch.cuda.max_memory_allocated(self.device)
            base_mb, peak_mb = base / 2**20, peak / 2**20
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            base_mb = peak_mb = None
        return dict(median_ms=float(np.median(times)), mean_ms=float(np.mean(times)),
                    min_ms=float(np.min(times)), max_ms=float(np.max(times)),
                    warmup=warmup, reps=reps, base_mb=base_mb, peak_mb=peak_mb)

    def measure(self, key: str, setup: Callable[[], Callable[[], object]], reps, *,
                items: int = 1, unit: str = 'img/s', **info) -> dict:
        """Build with ``setup()`` (which returns the step to time), time it, keep the result.

        Whatever goes wrong (out of memory included) is recorded in the entry's ``status``
        and ``error``; the caller's next measurement runs regardless.
        """
        entry = dict(key=key, section=key.split('/')[0], items=items, unit=unit, **info)
        step = None
        try:
            self.clear()
            step = setup()
            entry.update(self.time_steps(step, *reps))
            entry['per_s'] = items * 1e3 / entry['median_ms']
            entry['status'] = 'ok'
        except Exception as e:  # noqa: BLE001  (any failure is a result to report)
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e)
            entry['status'] = 'OOM' if oom else 'error'
            entry['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            print(f'  ! {key} failed: {entry["error"]}', file=sys.stderr)
            if not oom:
                traceback.print_exc(file=sys.stderr)
        finally:
            step = None
            self.clear()
        self.results[key] = entry
        print('  ' + progress_line(entry), flush=True)
        return entry

    def skip(self, key: str, note: str, **info) -> dict:
        entry = dict(key=key, section=key.split('/')[0], status='skipped', note=note, **info)
        self.results[key] = entry
        print(f'  - {key}: skipped ({note})', flush=True)
        return entry


def progress_line(e: dict) -> str:
    if e['status'] != 'ok':
        return f'{e["key"]}: {e["status"]} {e.get("error", e.get("note", ""))}'
    mem = f', peak {e["peak_mb"]:.0f} MB' if e.get('peak_mb') is not None else ''
    return (f'{e["key"]}: {e["median_ms"]:.2f} ms, {e["per_s"]:.1f} {e["unit"]}{mem}')


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def resolve_config_path(path: str) -> str:
    """'mmdet::swin/x.py' -> the file inside the installed package; other paths as given."""
    if '::' not in path:
        return path if osp.isabs(path) or osp.exists(path) else osp.join(REPO_ROOT, path)
    from mmengine.utils import get_installed_path
    package, rel = path.split('::', 1)
    return osp.join(get_installed_path(package), '.mim', 'configs', rel)


def load_config(path: str):
    from mmengine.config import Config
    return Config.fromfile(resolve_config_path(path))


def drop_pretrained(cfg):
    """Set every pretrained checkpoint in a model config to None (random weights only)."""
    if isinstance(cfg, dict):
        for key in list(cfg):
            value = cfg[key]
            if key == 'pretrained':
                cfg[key] = None
            elif key == 'init_cfg' and _is_pretrained(value):
                cfg[key] = None
            else:
                drop_pretrained(value)
    elif isinstance(cfg, (list, tuple)):
        for item in cfg:
            drop_pretrained(item)
    return cfg


def _is_pretrained(init_cfg) -> bool:
    items = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(i, dict) and i.get('type') == 'Pretrained' for i in items)


def config_backbone(path: str) -> dict:
    """The backbone dict of a toolbox config, without type, _delete_ or pretrained weights."""
    cfg = copy.deepcopy(load_config(path).model.backbone.to_dict())
    cfg.pop('_delete_', None)
    cfg.pop('type')
    cfg['init_cfg'] = None
    return cfg


def build_restv2(arch: str = 'tiny', **kwargs) -> torch.nn.Module:
    model = ResTv2(arch=arch, init_cfg=None, **kwargs)
    model.init_weights()
    return model


def build_swin_t(drop_path_rate: Optional[float] = None) -> torch.nn.Module:
    from mmdet.models.backbones import SwinTransformer
    cfg = config_backbone(SWIN_DET_CONFIG)
    if drop_path_rate is not None:
        cfg['drop_path_rate'] = drop_path_rate
    model = SwinTransformer(**cfg)
    model.init_weights()
    return model


def build_pvtv2_b2() -> torch.nn.Module:
    from mmdet.models.backbones import PyramidVisionTransformerV2
    model = PyramidVisionTransformerV2(**config_backbone(PVTV2_B2_CONFIG))
    model.init_weights()
    return model


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001  (timm or its torchvision may be missing or broken)
        return False


def build_convnext_t() -> torch.nn.Module:
    import timm
    return timm.create_model('convnext_tiny', pretrained=False, features_only=True)


def backbone_steps(bench: Bench, build: Callable[[], torch.nn.Module], shape, train: bool):
    """setup() for one backbone: returns a step running inference or a training step."""

    def setup():
        model = build().to(bench.device)
        model.train(train)
        model = bench.maybe_compile(model)
        x = torch.randn(*shape, device=bench.device)
        if not train:

            def step():
                with torch.no_grad(), bench.autocast():
                    return model(x)

            return step

        def step():
            with bench.autocast():
                outs = model(x)
                loss = sum(o.float().mean() for o in outs)
            loss.backward()
            for p in model.parameters():
                p.grad = None

        return step

    return setup


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------
def section_backbone224(bench: Bench, s: dict, args):
    H, W = s['cls_size']
    B = s['cls_batch']
    shape = (B, 3, H, W)
    info = dict(input=list(shape), mode='infer')
    models = [(f'restv2_{a[0]}', f'ResTv2-{a[0].upper()}', lambda a=a: build_restv2(a))
              for a in RESTV2_ARCHS]
    models += [('swin_t', 'Swin-T (mmdet)', build_swin_t),
               ('pvtv2_b2', 'PVTv2-b2 (mmdet)', build_pvtv2_b2)]
    for name, label, build in models:
        bench.measure(f'backbone224/{name}', backbone_steps(bench, build, shape, False),
                      s['cls_reps'], items=B, label=label, **info)
    if timm_available():
        bench.measure('backbone224/convnext_t',
                      backbone_steps(bench, build_convnext_t, shape, False), s['cls_reps'],
                      items=B, label='ConvNeXt-T (timm)', **info)
    else:
        bench.skip('backbone224/convnext_t', 'timm is not importable; pip install timm',
                   label='ConvNeXt-T (timm)', **info)


def style_builder(style: str) -> Callable[[], torch.nn.Module]:
    return lambda: build_restv2('tiny', drop_path_rate=0.1, attn_style=style)


def dense_models():
    """(name, label, builder) of the backbones compared at detection resolution."""
    models = [(f'restv2_t_{style}', f'ResTv2-T {style}', style_builder(style))
              for style in STYLES]
    models.append(('restv2_t_explicit', 'ResTv2-T global, explicit attention',
                   lambda: build_restv2('tiny', drop_path_rate=0.1, attn_impl='explicit')))
    models.append(('swin_t', 'Swin-T (mmdet)', build_swin_t))
    return models


def section_dense(bench: Bench, s: dict, args):
    H, W = s['dense_size']
    shape = (s['dense_batch'], 3, H, W)
    for name, label, build in dense_models():
        for mode, reps in (('infer', s['dense_infer_reps']), ('train', s['dense_train_reps'])):
            bench.measure(f'dense/{name}/{mode}',
                          backbone_steps(bench, build, shape, mode == 'train'), reps,
                          items=shape[0], label=label, input=list(shape), mode=mode)


def section_styles(bench: Bench, s: dict, args):
    for (H, W, B), reps in zip(s['style_sizes'], s['style_reps']):
        shape = (B, 3, H, W)
        for style in STYLES:
            key = f'styles/{style}/{H}x{W}'
            info = dict(label=f'ResTv2-T {style}', input=list(shape), mode='infer',
                        style=style)
            same = bench.results.get(f'dense/restv2_t_{style}/infer')
            if same and same['status'] == 'ok' and same['input'] == list(shape):
                entry = dict(same, key=key, section='styles', note='from the dense section',
                             **info)
                bench.results[key] = entry
                print(f'  {progress_line(entry)} (from the dense section)', flush=True)
                continue
            bench.measure(key, backbone_steps(bench, style_builder(style), shape, False), reps,
                          items=B, **info)


def plot_styles(results: Dict[str, dict], sizes, path: str, title_note: str = ''):
    """Latency per image against input size for the four attention styles."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(STYLES, 'osD^'))
    xs = [H * W / 1e6 for H, W, _ in sizes]
    for style in STYLES:
        pts = []
        for (H, W, B), x in zip(sizes, xs):
            e = results.get(f'styles/{style}/{H}x{W}')
            if e and e['status'] == 'ok':
                pts.append((x, e['median_ms'] / B))
        if pts:
            ax.plot(*zip(*pts), marker=markers[style], label=style)
    ax.set_xticks(xs)
    ax.set_xticklabels([f'{H}x{W}\n(batch {B})' for H, W, B in sizes], fontsize=8)
    ax.set_xlabel('input size (megapixels per image)')
    ax.set_ylabel('forward latency per image (ms)')
    ax.set_title(f'ResTv2-T backbone latency by attention style{title_note}', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title='attn_style')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------- whole models
def lighten_for_quick(model, kind: str):
    """Fewer proposals and narrower heads, the same for both models: a CPU smoke test."""
    if kind == 'det':
        model.test_cfg.rpn.update(nms_pre=100, max_per_img=50)
        model.test_cfg.rcnn.max_per_img = 10
        model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
        model.train_cfg.rpn.sampler.num = 64
        model.train_cfg.rcnn.sampler.num = 32
    else:
        model.decode_head.channels = 64
        model.auxiliary_head.channels = 32
    return model


def toolbox_model_config(path: str, peer_path: str, kind: str, quick: bool = False):
    """Model config from ``path``; where that file is missing, the peer's with ResTv2-T.

    Returns the model config (no pretrained checkpoints), where it came from, and the
    config's ``env_cfg.cudnn_benchmark`` (mmdet's configs leave it off, mmseg's turn it on).
    """
    resolved = resolve_config_path(path)
    if osp.exists(resolved):
        cfg = load_config(resolved)
        model = cfg.model
        source = path
    else:
        cfg = load_config(peer_path)
        model = cfg.model
        model.backbone = dict(type='ResTv2', arch='tiny', drop_path_rate=0.1, init_cfg=None)
        if kind == 'det':
            model.neck.in_channels = RESTV2_T_CHANNELS
        else:
            model.decode_head.in_channels = RESTV2_T_CHANNELS
            model.auxiliary_head.in_channels = RESTV2_T_CHANNELS[2]
        source = f'{peer_path} with a ResTv2-T backbone ({path} not found)'
    model = drop_pretrained(copy.deepcopy(model))
    model.backbone.init_cfg = None
    if quick:
        lighten_for_quick(model, kind)
    return model, source, bool(cfg.get('env_cfg', {}).get('cudnn_benchmark', False))


def build_toolbox_model(bench: Bench, model_cfg, scope: str):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope
    if scope == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(copy.deepcopy(model_cfg))
    model.init_weights()
    model = revert_sync_batchnorm(model)  # one process: SyncBN runs as BN, as mmengine does
    model.to(bench.device)
    model.backbone = bench.maybe_compile(model.backbone)
    return model


def fill_detections(model):
    """Make the random box head score every RoI as class 0, as a trained one finds objects.

    With random weights every class scores about 1/81, under the 0.05 threshold, and the
    mask head would never run; with this the test pipeline keeps max_per_img boxes after
    NMS, as a trained Mask R-CNN on COCO does, for both models alike.
    """
    fc_cls = model.roi_head.bbox_head.fc_cls
    with torch.no_grad():
        fc_cls.weight.mul_(0.)
        fc_cls.bias.fill_(0.)
        fc_cls.bias[0] = 10.


def det_data(bench: Bench, size, batch: int, with_gt: bool, seed: int = 0) -> dict:
    """Packed inputs as mmdet's PackDetInputs makes them: uint8 images and DetDataSamples."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    H, W = size
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(batch):
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
        inputs.append(img.to(bench.device))
        sample = DetDataSample(metainfo=dict(
            img_id=i, img_path=f'random_{i}.jpg', ori_shape=(H, W), img_shape=(H, W),
            scale_factor=(1., 1.), flip=False, flip_direction=None))
        if with_gt:
            n = 8
            wh = rng.uniform(0.1, 0.4, (n, 2)) * [W, H]
            xy = rng.uniform(0, 1, (n, 2)) * ([W, H] - wh)
            boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
            masks = np.zeros((n, H, W), dtype=np.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
                masks[j, y1 + (y2 - y1) // 4:y2 - (y2 - y1) // 4, x1:x2] = 1
                masks[j, y1:y2, x1 + (x2 - x1) // 4:x2 - (x2 - x1) // 4] = 1
            gt = InstanceData()
            gt.bboxes = HorizontalBoxes(torch.from_numpy(boxes))
            gt.labels = torch.from_numpy(rng.integers(0, 80, n))
            gt.masks = BitmapMasks(masks, H, W)
            sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_optim_wrapper(bench: Bench, model, lr: float, weight_decay: float):
    """AdamW in mmengine's AMP wrapper (plain wrapper on the CPU), same for every model."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if bench.amp:
        return AmpOptimWrapper(optimizer=optimizer)
    return OptimWrapper(optimizer=optimizer)


def section_detector(bench: Bench, s: dict, args):
    from mmengine.registry import DefaultScope
    models = [('restv2_t', 'Mask R-CNN ResTv2-T', args.restv2_det_config),
              ('swin_t', 'Mask R-CNN Swin-T (mmdet)', SWIN_DET_CONFIG)]
    H, W = s['det_size']
    for name, label, path in models:
        try:
            model_cfg, source, autotune = toolbox_model_config(
                path, SWIN_DET_CONFIG, 'det', s.get('quick', False))
        except Exception as e:  # noqa: BLE001
            for mode in ('predict', 'train'):
                bench.results[f'detector/{name}/{mode}'] = dict(
                    key=f'detector/{name}/{mode}', section='detector', label=label,
                    status='error', error=f'config {path}: {type(e).__name__}: {e}')
            print(f'  ! {path}: {e}', file=sys.stderr)
            continue
        with DefaultScope.overwrite_default_scope('mmdet'), \
                bench.cudnn_benchmark(autotune) as autotune:
            dets = []

            def setup_predict():
                model = build_toolbox_model(bench, model_cfg, 'mmdet').eval()
                if not args.raw_det_head:
                    fill_detections(model)
                data = det_data(bench, (H, W), 1, with_gt=False)

                def step():
                    with torch.no_grad(), bench.autocast():
                        out = model.test_step(data)
                    dets.append(len(out[0].pred_instances))

                return step

            e = bench.measure(f'detector/{name}/predict', setup_predict, s['det_predict_reps'],
                              items=1, unit='FPS', label=label, config=source,
                              input=[1, 3, H, W], mode='predict', cudnn_benchmark=autotune)
            if dets:
                e['detections_per_image'] = float(np.mean(dets))

            def setup_train():
                model = build_toolbox_model(bench, model_cfg, 'mmdet').train()
                optim_wrapper = build_optim_wrapper(bench, model, 1e-4, 0.05)
                data = det_data(bench, (H, W), s['det_train_batch'], with_gt=True)
                return lambda: model.train_step(data, optim_wrapper)

            B = s['det_train_batch']
            bench.measure(f'detector/{name}/train', setup_train, s['det_train_reps'], items=B,
                          label=label, config=source, input=[B, 3, H, W], mode='train',
                          cudnn_benchmark=autotune)


def seg_data(bench: Bench, size, batch: int, seed: int = 0) -> dict:
    """Packed inputs as mmseg's PackSegInputs makes them: uint8 images and SegDataSamples."""
    from mmseg.structures import SegDataSample
    H, W = size
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(batch):
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
        inputs.append(img.to(bench.device))
        samples.append(SegDataSample(metainfo=dict(
            img_path=f'random_{i}.jpg', ori_shape=(H, W), img_shape=(H, W),
            pad_shape=(H, W), scale_factor=(1., 1.), flip=False, flip_direction=None)))
    return dict(inputs=inputs, data_samples=samples)


def section_segmentor(bench: Bench, s: dict, args):
    from mmengine.registry import DefaultScope
    models = [('restv2_t', 'UperNet ResTv2-T', args.restv2_seg_config),
              ('swin_t', 'UperNet Swin-T (mmseg)', SWIN_SEG_CONFIG)]
    H, W = s['seg_size']
    for name, label, path in models:
        key = f'segmentor/{name}/predict'
        try:
            model_cfg, source, autotune = toolbox_model_config(
                path, SWIN_SEG_CONFIG, 'seg', s.get('quick', False))
        except Exception as e:  # noqa: BLE001
            bench.results[key] = dict(key=key, section='segmentor', label=label,
                                      status='error',
                                      error=f'config {path}: {type(e).__name__}: {e}')
            print(f'  ! {path}: {e}', file=sys.stderr)
            continue
        with DefaultScope.overwrite_default_scope('mmseg'), \
                bench.cudnn_benchmark(autotune) as autotune:

            def setup_predict():
                model = build_toolbox_model(bench, model_cfg, 'mmseg').eval()
                data = seg_data(bench, (H, W), 1)

                def step():
                    with torch.no_grad(), bench.autocast():
                        return model.test_step(data)

                return step

            bench.measure(key, setup_predict, s['seg_predict_reps'], items=1, unit='FPS',
                          label=label, config=source, input=[1, 3, H, W], mode='predict',
                          cudnn_benchmark=autotune)


SECTION_RUNNERS = dict(backbone224=section_backbone224, dense=section_dense,
                       styles=section_styles, detector=section_detector,
                       segmentor=section_segmentor)


# --------------------------------------------------------------------------------------
# Ratios and targets
# --------------------------------------------------------------------------------------
def ratio_definitions(s: dict) -> List[dict]:
    """Each ratio compares entry a with entry b.

    kind 'speed': a's items/s over b's (> 1: a is faster); 'time': a's median time over b's
    (< 1: a is faster); 'memory': a's peak memory over b's.
    """
    r = []

    def add(key, label, kind, a, b):
        r.append(dict(key=key, label=label, kind=kind, a=a, b=b))

    ch, cw = s['cls_size']
    for peer, peer_label in (('swin_t', 'Swin-T'), ('pvtv2_b2', 'PVTv2-b2'),
                             ('convnext_t', 'ConvNeXt-T')):
        add(f'backbone224/restv2_t_vs_{peer}', f'{ch}x{cw}: ResTv2-T vs {peer_label}, images/s',
            'speed', 'backbone224/restv2_t', f'backbone224/{peer}')
    dh, dw = s['dense_size']
    res = f'{dh}x{dw}'
    for mode in ('infer', 'train'):
        a, b = f'dense/restv2_t_global/{mode}', f'dense/restv2_t_explicit/{mode}'
        add(f'dense/default_vs_explicit/{mode}/speed',
            f'{res} {mode}: default vs explicit path, speed-up', 'speed', a, b)
        add(f'dense/default_vs_explicit/{mode}/time',
            f'{res} {mode}: default vs explicit path, time', 'time', a, b)
        add(f'dense/default_vs_explicit/{mode}/memory',
            f'{res} {mode}: default vs explicit path, peak memory', 'memory', a, b)
        for style in STYLES[1:]:
            add(f'dense/{style}_vs_global/{mode}/time', f'{res} {mode}: {style} vs global, time',
                'time', f'dense/restv2_t_{style}/{mode}', f'dense/restv2_t_global/{mode}')
        add(f'dense/restv2_t_vs_swin_t/{mode}/speed', f'{res} {mode}: ResTv2-T vs Swin-T, speed',
            'speed', f'dense/restv2_t_global/{mode}', f'dense/swin_t/{mode}')
        add(f'dense/restv2_t_vs_swin_t/{mode}/memory',
            f'{res} {mode}: ResTv2-T vs Swin-T, peak memory', 'memory',
            f'dense/restv2_t_global/{mode}', f'dense/swin_t/{mode}')
    for H, W, B in s['style_sizes']:
        for style in STYLES[1:]:
            add(f'styles/{style}_vs_global/{H}x{W}', f'{H}x{W} b{B}: {style} vs global, time',
                'time', f'styles/{style}/{H}x{W}', f'styles/global/{H}x{W}')
    add('detector/predict/speed', 'Mask R-CNN predict: ResTv2-T vs Swin-T, FPS', 'speed',
        'detector/restv2_t/predict', 'detector/swin_t/predict')
    add('detector/train/time', 'Mask R-CNN train iteration: ResTv2-T vs Swin-T, time', 'time',
        'detector/restv2_t/train', 'detector/swin_t/train')
    add('detector/train/memory', 'Mask R-CNN train iteration: ResTv2-T vs Swin-T, peak memory',
        'memory', 'detector/restv2_t/train', 'detector/swin_t/train')
    add('segmentor/predict/speed', 'UperNet predict: ResTv2-T vs Swin-T, FPS', 'speed',
        'segmentor/restv2_t/predict', 'segmentor/swin_t/predict')
    return r


def compute_ratios(results: Dict[str, dict], definitions: List[dict]) -> Dict[str, dict]:
    out = {}
    for d in definitions:
        a, b = results.get(d['a']), results.get(d['b'])
        entry = dict(d, value=None)
        if a is None or b is None:
            continue  # a section that did not run
        if a['status'] != 'ok' or b['status'] != 'ok':
            bad = [e['key'] for e in (a, b) if e['status'] != 'ok']
            entry['note'] = 'no value: ' + ', '.join(f'{k} {results[k]["status"]}' for k in bad)
        elif d['kind'] == 'speed':
            entry['value'] = a['per_s'] / b['per_s']
        elif d['kind'] == 'time':
            entry['value'] = a['median_ms'] / b['median_ms']
        elif a.get('peak_mb') is None or b.get('peak_mb') is None:
            entry['note'] = 'no value: peak memory is measured on CUDA only'
        else:
            entry['value'] = a['peak_mb'] / b['peak_mb']
        out[d['key']] = entry
    return out


def target_definitions(s: dict) -> List[dict]:
    """The speed targets, each one comparison in the same run: ratio op threshold."""
    dh, dw = s['dense_size']
    res = f'{dh}x{dw}'
    lh, lw, lb = s['style_sizes'][-1]
    cls = 'x'.join(map(str, s['cls_size']))
    t = [
        ('1a', f'ResTv2-T backbone at {cls}: images/s vs Swin-T',
         ['backbone224/restv2_t_vs_swin_t'], '>=', 1.3),
        ('1b', f'ResTv2-T backbone at {cls}: images/s vs ConvNeXt-T',
         ['backbone224/restv2_t_vs_convnext_t'], '>=', 1.0),
        ('2a', f'{res} b2 inference: default path speed-up over the explicit path',
         ['dense/default_vs_explicit/infer/speed'], '>=', 2.0),
        ('2b', f'{res} b2 inference: default path peak memory vs explicit',
         ['dense/default_vs_explicit/infer/memory'], '<=', 0.6),
        ('2c', f'{res} b2 training step: default path time vs explicit',
         ['dense/default_vs_explicit/train/time'], '<=', 0.85),
        ('2d', f'{res} b2 training step: default path peak memory vs explicit',
         ['dense/default_vs_explicit/train/memory'], '<=', 0.55),
    ]
    for i, style in enumerate(STYLES[1:]):
        t.append((f'3{"abc"[i]}', f'{res}: {style} time vs global',
                  [f'styles/{style}_vs_global/{res}', f'dense/{style}_vs_global/infer/time'],
                  '<=', 1.1))
    t += [
        ('3d', f'{lh}x{lw} b{lb}: win time vs global', [f'styles/win_vs_global/{lh}x{lw}'],
         '<=', 0.75),
        ('4a', 'Mask R-CNN ResTv2-T predict FPS vs Swin-T', ['detector/predict/speed'], '>=',
         1.15),
        ('4b', 'Mask R-CNN ResTv2-T training iteration time vs Swin-T', ['detector/train/time'],
         '<=', 1.0),
        ('4c', 'Mask R-CNN ResTv2-T training iteration peak memory vs Swin-T',
         ['detector/train/memory'], '<=', 1.0),
        ('5', 'UperNet ResTv2-T predict FPS vs Swin-T', ['segmentor/predict/speed'], '>=', 1.06),
    ]
    return [dict(id=i, text=text, ratios=keys, op=op, threshold=th) for i, text, keys, op, th in t]


def check_targets(ratios: Dict[str, dict], definitions: List[dict]) -> List[dict]:
    out = []
    for d in definitions:
        entry = dict(d, value=None, ratio=None)
        found = [ratios[k] for k in d['ratios'] if k in ratios]
        valued = [r for r in found if r['value'] is not None]
        if valued:
            v = valued[0]['value']
            ok = v >= d['threshold'] if d['op'] == '>=' else v <= d['threshold']
            entry.update(value=v, ratio=valued[0]['key'], status='PASS' if ok else 'MISS')
        elif found:
            entry.update(status='N/A', note=found[0].get('note', 'no value'))
        else:
            entry.update(status='N/A', note='section not run')
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               host=platform.node())
    if device.type == 'cuda':
        env['device'] = torch.cuda.get_device_name(device)
        env['cudnn'] = torch.backends.cudnn.version()
    else:
        env['device'] = f'CPU ({platform.processor() or platform.machine()}, ' \
                        f'{torch.get_num_threads()} threads)'
    for name in ('mmcv', 'mmengine', 'mmdet', 'mmseg', 'timm'):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    return env


def fmt(v, spec='.2f', none='-'):
    return none if v is None else format(v, spec)


def print_report(meta: dict, results: Dict[str, dict], ratios: Dict[str, dict],
                 targets: List[dict]):
    line = '=' * 100
    print(f'\n{line}\nResTv2 benchmark on {meta["env"]["device"]} | torch {meta["env"]["torch"]}'
          f' (CUDA {meta["env"]["cuda"]}) | amp {meta["amp"]} | compile {meta["compile"]}'
          f' | best of {meta.get("rounds", 1)} round(s)'
          f'{" | QUICK (tiny sizes, numbers not meaningful)" if meta["quick"] else ""}')
    print(f'command: {meta["command"]}\n{line}')
    by_section: Dict[str, List[dict]] = {}
    for e in results.values():
        by_section.setdefault(e['section'], []).append(e)
    head = (f'{"measurement":<44} {"input":>16} {"median ms":>10} {"rate":>14} '
            f'{"peak MB":>9}  status')
    for section in SECTIONS:
        if section not in by_section:
            continue
        print(f'\n[{section}]\n{head}')
        for e in by_section[section]:
            shape = 'x'.join(str(v) for v in e.get('input', [])) or '-'
            rate = f'{e["per_s"]:.1f} {e["unit"]}' if e['status'] == 'ok' else '-'
            status = e['status'] if e['status'] == 'ok' else \
                f'{e["status"]}: {e.get("error", e.get("note", ""))}'[:80]
            name = e['key'].split('/', 1)[1]
            print(f'{name:<44} {shape:>16} {fmt(e.get("median_ms")):>10} {rate:>14} '
                  f'{fmt(e.get("peak_mb"), ".0f"):>9}  {status}')
    if ratios:
        print('\n[ratios]')
        for r in ratios.values():
            value = f'{r["value"]:.3f}x' if r['value'] is not None else r.get('note', '-')
            print(f'{r["label"]:<72} {value}')
    print('\n[targets]')
    for t in targets:
        value = f'{t["value"]:.3f}x' if t['value'] is not None else t.get('note', '')
        print(f'{t["status"]:<5} {t["id"]:<3} {t["text"]}: {value} '
              f'(target {t["op"]} {t["threshold"]}x)')
    print(line)


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def keep_best_rounds(best: Dict[str, dict], results: Dict[str, dict]) -> Dict[str, dict]:
    """Fold one round's results into ``best``: per key, the round with the lowest median.

    Every round's median stays in the entry's ``round_medians_ms`` (None for a failed one);
    a failure is kept only while no round of that key has succeeded.
    """
    for key, entry in results.items():
        old = best.get(key)
        medians = (old or {}).get('round_medians_ms', []) + [entry.get('median_ms')]
        better = old is None or (entry['status'] == 'ok' and (
            old['status'] != 'ok' or entry['median_ms'] < old['median_ms']))
        if better:
            best[key] = dict(entry)
        best[key]['round_medians_ms'] = medians
    return best


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Speed and memory of ResTv2 against Swin-T, PVTv2-b2 and ConvNeXt-T, '
        'backbones and whole Mask R-CNN / UperNet models, on one GPU.')
    parser.add_argument('--sections', default=','.join(SECTIONS),
                        help=f'comma-separated subset of {",".join(SECTIONS)} (default: all)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes and 1-2 repeats, on the CPU unless --device says '
                        'otherwise: a smoke test, not a measurement')
    parser.add_argument('--device', default=None,
                        help='cuda, cuda:1 or cpu (default: cuda, or cpu with --quick)')
    parser.add_argument('--cpu-threads', type=int, default=None,
                        help='torch CPU threads (default: 1 with --quick on the CPU, which '
                        'is fastest on a shared machine; otherwise torch\'s default)')
    parser.add_argument('--no-amp', action='store_true',
                        help='run in float32 instead of float16 autocast')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile every backbone first (warm-up includes compiling)')
    parser.add_argument('--no-cudnn-benchmark', action='store_true',
                        help='leave torch.backends.cudnn.benchmark off everywhere (default: '
                        'on for the backbones; whole models follow their configs\' env_cfg)')
    parser.add_argument('--raw-det-head', action='store_true',
                        help='keep the random Mask R-CNN box head as initialised (it then '
                        'detects almost nothing and the mask head hardly runs); by default '
                        'it is set to keep max_per_img boxes, as a trained model does')
    parser.add_argument('--restv2-det-config', default=RESTV2_DET_CONFIG,
                        help='Mask R-CNN ResTv2-T config (default: %(default)s); if missing, '
                        "mmdet's Swin-T config with the backbone replaced")
    parser.add_argument('--restv2-seg-config', default=RESTV2_SEG_CONFIG,
                        help='UperNet ResTv2-T config (default: %(default)s); if missing, '
                        "mmseg's Swin-T config with the backbone replaced")
    parser.add_argument('--rounds', type=int, default=1,
                        help='measure everything this many times and keep, per measurement, '
                        'the round with the lowest median: on a shared host, contention '
                        'only ever adds time (default: %(default)s)')
    parser.add_argument('--out-json', default='work_dirs/benchmark/benchmark.json',
                        help='where to write every result (default: %(default)s)')
    parser.add_argument('--out-plot', default='work_dirs/benchmark/latency_vs_size.png',
                        help='latency against input size for the attention styles '
                        '(default: %(default)s)')
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(',') if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f'--sections {args.sections!r}: unknown {unknown}; choose from '
                     f'{",".join(SECTIONS)}.')
    args.sections = [s for s in SECTIONS if s in sections]
    if args.rounds < 1:
        parser.error(f'--rounds {args.rounds}: give 1 or more.')
    return args


def select_device(args) -> torch.device:
    name = args.device or ('cpu' if args.quick else 'cuda')
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit(f'--device {name}: CUDA is not available here. Run on a GPU, or '
                             'pass --quick for a CPU smoke test.')
        if device.index is not None:
            torch.cuda.set_device(device)
        else:
            device = torch.device('cuda', torch.cuda.current_device())
    else:
        threads = args.cpu_threads or (1 if args.quick else None)
        if threads:
            torch.set_num_threads(threads)
    if device.type == 'cpu' and not args.quick:
        print('warning: the full sizes on the CPU take hours; --quick is the CPU smoke test.',
              file=sys.stderr)
    return device


def quiet_mmengine():
    """Keep mmengine's per-parameter init_weights log out of the report."""
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)


def command_line(argv=None) -> str:
    if argv is None:
        return 'python ' + shlex.join(sys.argv)
    return 'python ' + shlex.join([osp.relpath(__file__)] + list(argv))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = select_device(args)
    settings = dict(QUICK if args.quick else FULL)
    torch.manual_seed(0)
    quiet_mmengine()
    bench = Bench(device, amp=not args.no_amp, compile_models=args.compile,
                  cudnn_benchmark=not args.no_cudnn_benchmark)
    meta = dict(
        command=command_line(argv),
        env=environment(device), quick=args.quick, sections=args.sections,
        amp='fp16 autocast' if bench.amp else 'off (float32)', compile=args.compile,
        cudnn_benchmark='backbones: on; whole models: as their env_cfg' if
        bench.allow_cudnn_benchmark else 'off',
        timer='CUDA events' if bench.cuda else 'time.perf_counter',
        started=time.strftime('%Y-%m-%d %H:%M:%S'),
        settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()})
    print(f'{meta["command"]}\ndevice: {meta["env"]["device"]}, torch {torch.__version__}, '
          f'sections: {",".join(args.sections)}', flush=True)

    t0 = time.perf_counter()
    section_time = dict.fromkeys(args.sections, 0.)
    best: Dict[str, dict] = {}
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f'--- round {round_ + 1} of {args.rounds}', flush=True)
        bench.results = {}
        for section in args.sections:
            print(f'[{section}]', flush=True)
            start = time.perf_counter()
            try:
                SECTION_RUNNERS[section](bench, settings, args)
            except Exception as e:  # noqa: BLE001  (a broken section must not stop the others)
                print(f'  ! section {section} stopped: {type(e).__name__}: {e}',
                      file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                bench.results[f'{section}/section'] = dict(
                    key=f'{section}/section', section=section, status='error',
                    error=f'{type(e).__name__}: {e}')
            section_time[section] += time.perf_counter() - start
        keep_best_rounds(best, bench.results)
    bench.results = best
    meta['rounds'] = args.rounds
    if 'styles' in args.sections:
        try:
            note = ' (quick: tiny sizes)' if args.quick else ''
            plot_styles(bench.results, settings['style_sizes'], args.out_plot, note)
            meta['plot'] = args.out_plot
        except Exception as e:  # noqa: BLE001
            meta['plot_error'] = f'{type(e).__name__}: {e}'
            print(f'  ! plot failed: {meta["plot_error"]}', file=sys.stderr)
    meta['seconds'] = dict(total=time.perf_counter() - t0, **section_time)

    ratios = compute_ratios(bench.results, ratio_definitions(settings))
    targets = check_targets(ratios, target_definitions(settings))
    print_report(meta, bench.results, ratios, targets)

    sections = {s: {k: e for k, e in bench.results.items() if e['section'] == s}
                for s in args.sections}
    report = dict(meta=meta, sections=sections, ratios=ratios, targets=targets)
    os.makedirs(osp.dirname(osp.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, 'w') as f:
        json.dump(report, f, indent=2, default=_json_default)
    print(f'results: {args.out_json}' + (f', plot: {args.out_plot}' if 'plot' in meta else ''))
    return report


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


if __name__ == '__main__':
    main()
