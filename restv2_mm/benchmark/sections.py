"""What each section of the benchmark measures, at full size (``FULL``) or as a CPU smoke
test (``QUICK``)."""
import sys
from typing import Callable

import numpy as np
import torch

from .models import (SWIN_DET_CONFIG, SWIN_SEG_CONFIG, build_convnext_t, build_optim_wrapper,
                     build_pvtv2_b2, build_restv2, build_swin_t, build_toolbox_model, det_data,
                     fill_detections, seg_data, timm_available, toolbox_model_config)
from .timing import Bench, progress_line

SECTIONS = ('backbone224', 'dense', 'styles', 'detector', 'segmentor')
STYLES = ('global', 'win', 'cwin', 'hwin')
RESTV2_ARCHS = ('tiny', 'small', 'base', 'large')

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
