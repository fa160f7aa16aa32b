"""What each section of the benchmark measures, at full size (``FULL``) or as a CPU smoke
test (``QUICK``)."""
import copy
import sys
import time
from typing import Callable

import numpy as np
import torch

from .models import (SWIN_DET_CONFIG, SWIN_SEG_CONFIG, build_convnext_t, build_optim_wrapper,
                     build_pvtv2_b2, build_restv2, build_swin_t, build_toolbox_model,
                     config_optim_wrapper, det_data, fill_detections, seg_data, timm_available,
                     toolbox_model_config)
from .timing import Bench, progress_line

SECTIONS = ('backbone224', 'dense', 'styles', 'detector', 'segmentor')
STYLES = ('global', 'win', 'cwin', 'hwin')
RESTV2_ARCHS = ('tiny', 'small', 'base', 'large')

# Sizes and repeats: (warm-up, timed). With --rounds 3 the full run took 7.5 minutes on
# one H200.
FULL = dict(
    cls_size=(224, 224), cls_batch=128, cls_reps=(10, 30),
    dense_size=(800, 1344), dense_batch=2, dense_infer_reps=(10, 30), dense_train_reps=(4, 12),
    new_sizes=((800, 1216), (736, 1344), (800, 1088)),
    style_sizes=((800, 1344, 2), (1600, 2688, 1), (2400, 4032, 1)),
    style_reps=((10, 30), (4, 12), (3, 8)),
    det_size=(800, 1344), det_train_batch=2, det_predict_reps=(10, 30), det_train_reps=(4, 12),
    # padded batch sizes that mmdet's 1x pipeline (long side 1333, short side 800, pads to 32,
    # batches of one orientation) gives 3:2 and 4:3 images, landscape and portrait, and a wider
    # one; the mix is a stand-in, not COCO's measured frequencies
    det_stream=((800, 1216), (800, 1088), (800, 1216), (1216, 800), (800, 1088), (800, 1344)),
    det_stream_reps=(1, 2),  # whole passes over the stream
    seg_size=(512, 512), seg_train_batch=4, seg_predict_reps=(10, 30), seg_train_reps=(4, 12),
)
# The quick run only proves that every path works: tiny inputs, one timed call, and lighter
# heads for the whole models (see lighten_for_quick).
QUICK = dict(
    cls_size=(64, 64), cls_batch=1, cls_reps=(0, 1),
    dense_size=(64, 96), dense_batch=2, dense_infer_reps=(0, 1), dense_train_reps=(0, 1),
    new_sizes=((64, 64), ),
    style_sizes=((64, 96, 2), (96, 128, 1), (128, 160, 1)),
    style_reps=((0, 1), (0, 1), (0, 1)),
    det_size=(96, 128), det_train_batch=2, det_predict_reps=(0, 1), det_train_reps=(0, 1),
    det_stream=((96, 128), (128, 96)), det_stream_reps=(0, 1),
    seg_size=(64, 64), seg_train_batch=2, seg_predict_reps=(0, 1), seg_train_reps=(0, 1),
    quick=True,
)


def backbone_step(model: torch.nn.Module, x: torch.Tensor, train: bool,
                  autocast: Callable) -> Callable[[], object]:
    """One inference forward, or one training step (forward, a scalar loss over the
    outputs, backward), of a backbone already in the right mode; ``autocast()`` gives the
    precision context."""
    if not train:

        def step():
            with torch.no_grad(), autocast():
                return model(x)

        return step

    def step():
        with autocast():
            outs = model(x)
            loss = sum(o.float().mean() for o in outs)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


def backbone_steps(bench: Bench, build: Callable[[], torch.nn.Module], shape, train: bool):
    """setup() for one backbone: returns a step running inference or a training step."""

    def setup():
        model = build().to(bench.device)
        model.train(train)
        model = bench.maybe_compile(model)
        x = torch.randn(*shape, device=bench.device)
        return backbone_step(model, x, train, bench.autocast)

    return setup


def graph_floor_steps(bench: Bench, build: Callable[[], torch.nn.Module], shape):
    """setup() replaying one inference forward of a backbone as a single CUDA graph: the
    time its GPU work takes once the host's launches are out of the way."""

    def setup():
        model = build().to(bench.device)
        model.eval()  # not chained: some backbones' train() returns None
        x = torch.randn(*shape, device=bench.device)

        def forward():
            with torch.no_grad(), bench.autocast():
                return model(x)

        side = torch.cuda.Stream(bench.device)
        side.wait_stream(torch.cuda.current_stream(bench.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # cuDNN autotuning and lazy set-up happen outside the graph
                forward()
        torch.cuda.current_stream(bench.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        return graph.replay

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
    """(name, label, builder, modes) of the backbones compared at detection resolution;
    'floor' is the same inference replayed as one CUDA graph."""
    both = ('infer', 'train')
    models = [(f'restv2_t_{style}', f'ResTv2-T {style}', style_builder(style), both)
              for style in STYLES]
    models += [
        ('restv2_t_eager', 'ResTv2-T global, fast_inference=False',
         lambda: build_restv2('tiny', drop_path_rate=0.1, fast_inference=False),
         ('infer', 'floor')),
        ('restv2_t_explicit', 'ResTv2-T global, explicit attention, eager',
         lambda: build_restv2('tiny', drop_path_rate=0.1, attn_impl='explicit',
                              fast_inference=False), ('infer', 'train', 'floor')),
        ('swin_t', 'Swin-T (mmdet)', build_swin_t, ('infer', 'train', 'floor')),
        ('pvtv2_b2', 'PVTv2-b2 (mmdet)', build_pvtv2_b2, ('infer', 'floor')),
        ('convnext_t', 'ConvNeXt-T (timm)', build_convnext_t, ('infer', 'floor')),
    ]
    return models


def section_dense(bench: Bench, s: dict, args):
    """The backbones' inference side by side, their training steps side by side (both are
    bound by the host's launches when run eagerly), then each one's CUDA-graph floor on
    its own (GPU work alone: nothing to share with the others)."""
    H, W = s['dense_size']
    shape = (s['dense_batch'], 3, H, W)
    for mode in ('infer', 'train', 'floor'):
        specs = []
        for name, label, build, modes in dense_models():
            if mode not in modes:
                continue
            key = f'dense/{name}/{mode}'
            info = dict(items=shape[0], label=label, input=list(shape), mode=mode)
            if name == 'convnext_t' and not timm_available():
                bench.skip(key, 'timm is not importable; pip install timm', **info)
            elif mode == 'floor' and not bench.cuda:
                bench.skip(key, 'CUDA graphs need a GPU', **info)
            elif mode == 'floor':
                bench.measure(key, graph_floor_steps(bench, build, shape),
                              s['dense_infer_reps'], **info)
            else:
                specs.append(dict(key=key, setup=backbone_steps(bench, build, shape,
                                                                mode == 'train'),
                                  count_kernels=mode == 'train', **info))
        if specs:
            reps = s['dense_train_reps'] if mode == 'train' else s['dense_infer_reps']
            bench.measure_side_by_side(specs, reps)
    new_size_costs(bench, s)


def new_size_costs(bench: Bench, s: dict):
    """What a new input size costs ``fast_inference``: the first call (eager, with cuDNN's
    autotuning), the second (recording the graph, then replaying it), later calls, and the
    memory the recorded graph keeps (its input, output and intermediate buffers)."""
    B = 1
    for H, W in s['new_sizes']:
        key = f'dense/restv2_t_global/new_size/{H}x{W}'
        info = dict(label='ResTv2-T global, a new input size', input=[B, 3, H, W],
                    mode='new size')
        if not bench.cuda:
            bench.skip(key, 'CUDA graphs need a GPU', **info)
            continue
        bench.clear()
        model = build_restv2('tiny', drop_path_rate=0.1).to(bench.device).eval()
        x = torch.randn(B, 3, H, W, device=bench.device)
        times, memory = [], []
        for _ in range(4):
            torch.cuda.synchronize(bench.device)
            start = time.perf_counter()
            with torch.no_grad(), bench.autocast():
                model(x)
            torch.cuda.synchronize(bench.device)
            times.append((time.perf_counter() - start) * 1e3)
            memory.append(torch.cuda.memory_reserved(bench.device))
        entry = dict(key=key, section='dense', status='ok', items=B, unit='img/s',
                     first_ms=times[0], record_ms=times[1], median_ms=min(times[2:]),
                     per_s=B * 1e3 / min(times[2:]), graph_mb=(memory[1] - memory[0]) / 2**20,
                     graphs=len(model._graphs), **info)
        bench.results[key] = entry
        print(f'  {key}: first call {times[0]:.0f} ms, recording {times[1]:.1f} ms, then '
              f'{entry["median_ms"]:.2f} ms; graph memory {entry["graph_mb"]:.0f} MB',
              flush=True)
        del model
        bench.clear()


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


def config_failed(bench: Bench, prefix: str, modes, label: str, path: str, error: Exception):
    """Record every measurement of a whole model whose config could not be read."""
    for mode in modes:
        key = f'{prefix}/{mode}'
        bench.results[key] = dict(key=key, section=prefix.split('/')[0], label=label,
                                  status='error',
                                  error=f'config {path}: {type(error).__name__}: {error}')
    print(f'  ! {path}: {error}', file=sys.stderr)


def read_toolbox_configs(bench: Bench, section: str, models, peer_path: str, kind: str,
                         modes, quick: bool):
    """(name, label, path, model config, source, cudnn autotune) of each model whose
    config reads; the others are recorded as failed. Autotuning is the config's
    ``env_cfg.cudnn_benchmark`` where the benchmark allows it (on CUDA, without
    ``--no-cudnn-benchmark``)."""
    configs = []
    for name, label, path in models:
        try:
            model_cfg, source, autotune = toolbox_model_config(path, peer_path, kind, quick)
        except Exception as e:  # noqa: BLE001
            config_failed(bench, f'{section}/{name}', modes, label, path, e)
            continue
        configs.append((name, label, path, model_cfg, source,
                        autotune and bench.allow_cudnn_benchmark))
    return configs


def with_cudnn(bench: Bench, autotune: bool, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with cuDNN autotuning as its model's config asks (env_cfg), also when its
    steps are interleaved with another model's."""

    def run():
        with bench.cudnn_benchmark(autotune):
            return fn()

    return run


class FixedFeatures(torch.nn.Module):
    """Stands in for a backbone: returns the features it was given, whatever the input."""

    def __init__(self, features):
        super().__init__()
        self.features = tuple(features)

    def forward(self, x):
        return self.features


def detector_predict_setup(bench: Bench, model_cfg, size, autotune: bool, raw_head: bool,
                           dets: list, backbone_once: bool = False):
    """setup() for Mask R-CNN's ``test_step`` on one image; with ``backbone_once``, the
    backbone runs once in the set-up and its features stand in for it afterwards, so the
    steps time the neck, heads and post-processing alone."""

    def setup():
        model = build_toolbox_model(bench, model_cfg, 'mmdet').eval()
        if not raw_head:
            fill_detections(model)
        data = det_data(bench, size, 1, with_gt=False)
        if backbone_once:
            with torch.no_grad(), bench.autocast(), bench.cudnn_benchmark(autotune):
                inputs = model.data_preprocessor(data, False)['inputs']
                model.backbone = FixedFeatures(model.backbone(inputs))

        def step():
            with torch.no_grad(), bench.autocast():
                out = model.test_step(data)
            dets.append(len(out[0].pred_instances))

        return with_cudnn(bench, autotune, step)

    return setup


def section_detector(bench: Bench, s: dict, args):
    from mmengine.registry import DefaultScope
    models = [('restv2_t', 'Mask R-CNN ResTv2-T', args.restv2_det_config),
              ('swin_t', 'Mask R-CNN Swin-T (mmdet)', SWIN_DET_CONFIG)]
    H, W = s['det_size']
    B = s['det_train_batch']
    configs = read_toolbox_configs(bench, 'detector', models, SWIN_DET_CONFIG, 'det',
                                   ('predict', 'train', 'train_own_optim'),
                                   s.get('quick', False))
    with DefaultScope.overwrite_default_scope('mmdet'):
        dets = {name: [] for name, *_ in configs}
        specs = [dict(key=f'detector/{name}/predict',
                      setup=detector_predict_setup(bench, cfg, (H, W), autotune,
                                                   args.raw_det_head, dets[name]),
                      items=1, unit='FPS', label=label, config=source, input=[1, 3, H, W],
                      mode='predict', cudnn_benchmark=autotune)
                 for name, label, path, cfg, source, autotune in configs]
        specs += [dict(key='detector/heads_only/predict',
                       setup=detector_predict_setup(bench, cfg, (H, W), autotune,
                                                    args.raw_det_head, [],
                                                    backbone_once=True),
                       items=1, unit='FPS', label=f'{label}: neck, heads and '
                       'post-processing alone (backbone features computed once)',
                       config=source, input=[1, 3, H, W], mode='predict',
                       cudnn_benchmark=autotune)
                  for name, label, path, cfg, source, autotune in configs
                  if name == 'restv2_t']
        entries = bench.measure_side_by_side(specs, s['det_predict_reps'])
        for name, found in dets.items():
            if found and f'detector/{name}/predict' in entries:
                entries[f'detector/{name}/predict']['detections_per_image'] = float(
                    np.mean(found))

        for optim in ('same', 'own'):
            suffix = '_own_optim' if optim == 'own' else ''
            train = []
            for name, label, path, cfg, source, autotune in configs:
                variants = [(name, label, cfg)]
                if name == 'restv2_t' and optim == 'same':  # fast_training the other way too
                    variants.append(switched_fast_training(name, label, cfg))
                train += [
                    dict(key=f'detector/{key}/train{suffix}',
                         setup=train_steps(bench, variant_cfg, 'mmdet', optim, path,
                                           SWIN_DET_CONFIG,
                                           [det_data(bench, (H, W), B, with_gt=True)], 1e-4,
                                           0.05, autotune),
                         items=B, label=variant_label, config=source, input=[B, 3, H, W],
                         mode='train', count_kernels=True, optimizer=OPTIMIZER_NOTES[optim],
                         cudnn_benchmark=autotune)
                    for key, variant_label, variant_cfg in variants]
            bench.measure_side_by_side(train, s['det_train_reps'])

        # a step is one pass over batches of several padded sizes, as detection training has
        stream = s['det_stream']
        batches = [det_data(bench, size, B, with_gt=True, seed=i) for i, size in
                   enumerate(stream)]
        bench.measure_side_by_side([
            dict(key=f'detector/{name}/train_stream',
                 setup=train_steps(bench, cfg, 'mmdet', 'same', path, SWIN_DET_CONFIG,
                                   batches, 1e-4, 0.05, autotune),
                 items=B * len(stream), label=f'{label}, {len(stream)} batches of '
                 f'{len(set(stream))} sizes a step', config=source,
                 input=[[B, 3, h, w] for h, w in stream], mode='train',
                 optimizer=OPTIMIZER_NOTES['same'], cudnn_benchmark=autotune)
            for name, label, path, cfg, source, autotune in configs
        ], s['det_stream_reps'])


OPTIMIZER_NOTES = dict(same='one AdamW group for every model',
                       own='the optimizer set-up of the model\'s own config')


def train_steps(bench: Bench, model_cfg, scope: str, optim: str, path: str, peer_path: str,
                batches: list, lr: float, weight_decay: float, autotune: bool):
    """setup() for training iterations of a whole model (``train_step``, AMP on a GPU), one
    on each of ``batches`` a step, with the same AdamW for every model (``optim='same'``)
    or its config's (``'own'``)."""

    def setup():
        model = build_toolbox_model(bench, model_cfg, scope).train()
        if optim == 'same':
            optim_wrapper = build_optim_wrapper(bench, model, lr, weight_decay)
        else:
            optim_wrapper = config_optim_wrapper(bench, model, path, peer_path, scope)

        def step():
            for data in batches:
                model.train_step(data, optim_wrapper)

        return with_cudnn(bench, autotune, step)

    return setup


def section_segmentor(bench: Bench, s: dict, args):
    from mmengine.registry import DefaultScope
    models = [('restv2_t', 'UperNet ResTv2-T', args.restv2_seg_config),
              ('swin_t', 'UperNet Swin-T (mmseg)', SWIN_SEG_CONFIG)]
    H, W = s['seg_size']
    B = s['seg_train_batch']
    configs = read_toolbox_configs(bench, 'segmentor', models, SWIN_SEG_CONFIG, 'seg',
                                   ('predict', 'train_own_optim'), s.get('quick', False))

    def predict_setup(model_cfg, autotune):
        def setup():
            model = build_toolbox_model(bench, model_cfg, 'mmseg').eval()
            data = seg_data(bench, (H, W), 1)

            def step():
                with torch.no_grad(), bench.autocast():
                    return model.test_step(data)

            return with_cudnn(bench, autotune, step)

        return setup

    with DefaultScope.overwrite_default_scope('mmseg'):
        bench.measure_side_by_side([
            dict(key=f'segmentor/{name}/predict', setup=predict_setup(cfg, autotune),
                 items=1, unit='FPS', label=label, config=source, input=[1, 3, H, W],
                 mode='predict', cudnn_benchmark=autotune)
            for name, label, path, cfg, source, autotune in configs
        ], s['seg_predict_reps'])
        train = []
        for name, label, path, cfg, source, autotune in configs:
            variants = [(name, label, cfg)]
            if name == 'restv2_t':  # the config as it is, and with fast_training switched
                variants.append(switched_fast_training(name, label, cfg))
            train += [
                dict(key=f'segmentor/{key}/train_own_optim',
                     setup=train_steps(bench, variant_cfg, 'mmseg', 'own', path,
                                       SWIN_SEG_CONFIG,
                                       [seg_data(bench, (H, W), B, with_gt=True)], 6e-5,
                                       0.01, autotune),
                     items=B, label=variant_label, config=source, input=[B, 3, H, W],
                     mode='train', count_kernels=True, optimizer=OPTIMIZER_NOTES['own'],
                     cudnn_benchmark=autotune)
                for key, variant_label, variant_cfg in variants]
        bench.measure_side_by_side(train, s['seg_train_reps'])


def switched_fast_training(name: str, label: str, model_cfg):
    """The model config with the backbone's ``fast_training`` the other way round, its key
    (``_fast_training`` or ``_eager``) and label."""
    cfg = copy.deepcopy(model_cfg)
    on = not cfg.backbone.get('fast_training', False)
    cfg.backbone.fast_training = on
    return (f'{name}_fast_training' if on else f'{name}_eager',
            f'{label}, fast_training={on}', cfg)


SECTION_RUNNERS = dict(backbone224=section_backbone224, dense=section_dense,
                       styles=section_styles, detector=section_detector,
                       segmentor=section_segmentor)
