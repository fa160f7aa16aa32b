"""Draw a ResTv2 model's predictions on one image.

    python tools/demo.py demo.jpg configs/maskrcnn_restv2_t_coco.py work_dirs/epoch_36.pth \
        --out demo_pred.jpg
    python tools/demo.py demo.jpg configs/upernet_restv2_t_ade20k.py iter_160000.pth

Detection configs get boxes, class names and masks (mmdet's DetLocalVisualizer);
segmentation configs a colour overlay of the predicted classes (mmseg's SegLocalVisualizer).
"""
import argparse
import os
import os.path as osp
import sys
import warnings

from restv2_mm.utils.tool import (CfgOptions, ToolError, check_file, load_config, model_state,
                                  read_checkpoint_file, restv2_backbone_cfg, run_tool,
                                  toolbox_of)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Draw the predictions of a ResTv2 detector or segmentor on an image.')
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='MM config with a ResTv2 backbone')
    parser.add_argument('checkpoint', help='checkpoint of that model (e.g. from train.py)')
    parser.add_argument('--out', help='output picture (default: <image>_pred.<ext> in the '
                        'working directory)')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw boxes scoring at least this (default 0.3)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='segmentation: opacity of the colour overlay (default 0.5)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def read_image(path: str):
    import mmcv
    check_file(path, 'Image')
    try:
        img = mmcv.imread(path)
    except Exception as e:
        raise ToolError(f'Cannot read image {path!r}: {e}') from None
    if img is None or img.ndim != 3:
        raise ToolError(f'Cannot read image {path!r}: not a picture that OpenCV can decode '
                          f'(jpg, png, bmp, ...).')
    return img  # BGR


def test_dataset_meta(cfg) -> dict:
    """Classes and palette of the config's test set (read lazily, no annotation files)."""
    from mmengine.registry import DATASETS
    try:
        dataset_cfg = cfg.test_dataloader.dataset.copy()
        dataset_cfg['lazy_init'] = True
        return dict(DATASETS.build(dataset_cfg).metainfo)
    except Exception:
        return {}


def numbered_classes(num_classes: int) -> dict:
    """Class names and colours for a model whose checkpoint and config name no classes."""
    import numpy as np
    rng = np.random.default_rng(0)
    palette = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(num_classes)]
    return dict(classes=tuple(f'class {i}' for i in range(num_classes)), palette=palette)


def load_weights(model, checkpoint: str) -> dict:
    """Load a checkpoint of this model; returns its meta. Clear errors when it does not fit."""
    ckpt = read_checkpoint_file(checkpoint)
    state = model_state(model, ckpt, checkpoint)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if len(missing) > len(own) // 2:
        raise ToolError(f'{checkpoint!r} does not hold this model: {len(missing)} of its '
                        f'{len(own)} weights are missing (e.g. {missing[0]}). For an '
                        f'authors\' ImageNet file use tools/train.py first.')
    model.load_state_dict(state, strict=False)
    if missing:
        print(f'warning: {len(missing)} weights not in the checkpoint, left as '
              f'initialised: {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
    return (ckpt.get('meta') or {}).get('dataset_meta') or {}


def without_annotations(pipeline):
    return [t for t in pipeline if not str(t.get('type', '')).endswith('LoadAnnotations')]


def detect(cfg, img, checkpoint, args):
    from mmcv.transforms import Compose
    from mmdet.apis import inference_detector, init_detector
    from mmdet.utils import get_test_pipeline_cfg
    from mmdet.visualization import DetLocalVisualizer

    model = init_detector(cfg, None, device=args.device)
    dataset_meta = load_weights(model, checkpoint) or test_dataset_meta(cfg)
    num_classes = model.roi_head.bbox_head.num_classes if hasattr(model, 'roi_head') else 0
    if not dataset_meta.get('classes') and num_classes:
        dataset_meta = numbered_classes(num_classes)
    if dataset_meta.get('classes'):
        model.dataset_meta = {k.lower(): v for k, v in dataset_meta.items()}
    pipeline = without_annotations(get_test_pipeline_cfg(cfg.copy()))
    pipeline[0] = dict(pipeline[0], type='mmdet.LoadImageFromNDArray')
    result = inference_detector(model, img, test_pipeline=Compose(pipeline))

    visualizer = DetLocalVisualizer(name='restv2_demo')
    visualizer.dataset_meta = model.dataset_meta
    visualizer.add_datasample(
        'prediction', img[..., ::-1].copy(), data_sample=result, draw_gt=False,
        pred_score_thr=args.score_thr, out_file=args.out)
    kept = (result.pred_instances.scores >= args.score_thr).sum().item()
    return f'{kept} objects scoring >= {args.score_thr}'


def segment(cfg, img, checkpoint, args):
    from mmseg.apis import inference_model, init_model
    from mmseg.visualization import SegLocalVisualizer

    cfg.test_pipeline = without_annotations(cfg.get('test_pipeline') or
                                            cfg.test_dataloader.dataset.pipeline)
    model = init_model(cfg, None, device=args.device)
    dataset_meta = load_weights(model, checkpoint) or test_dataset_meta(cfg)
    if not dataset_meta.get('classes'):
        dataset_meta = numbered_classes(model.decode_head.num_classes)
    model.dataset_meta = dict(dataset_meta)
    result = inference_model(model, img)

    visualizer = SegLocalVisualizer(name='restv2_demo', alpha=args.opacity)
    visualizer.dataset_meta = model.dataset_meta
    visualizer.add_datasample(
        'prediction', img[..., ::-1].copy(), data_sample=result, draw_gt=False,
        out_file=args.out)
    labels = result.pred_sem_seg.data.unique().tolist()
    classes = model.dataset_meta.get('classes') or []
    names = [classes[i] if i < len(classes) else str(i) for i in labels]
    noun = 'class' if len(labels) == 1 else 'classes'
    return f'{len(labels)} {noun} in the picture: {", ".join(map(str, names[:10]))}'


def main(argv=None):
    args = parse_args(argv)
    # the toolboxes warn about steps this tool takes on purpose (no checkpoint at build time,
    # boxes reaching past the image); what matters is printed below
    warnings.showwarning = lambda *args, **kwargs: None
    img = read_image(args.image)
    cfg = load_config(args.config, args.cfg_options)
    restv2_backbone_cfg(cfg, args.config)
    check_file(args.checkpoint, 'Checkpoint')
    cfg.model.backbone.init_cfg = None  # the checkpoint brings the backbone weights
    if args.out is None:
        stem, ext = osp.splitext(osp.basename(args.image))
        args.out = f'{stem}_pred{ext if ext.lower() in (".jpg", ".jpeg", ".png") else ".png"}'
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)

    import restv2_mm  # noqa: F401  registers ResTv2 in both toolboxes
    if toolbox_of(cfg) == 'mmdet':
        summary = detect(cfg, img, args.checkpoint, args)
    else:
        summary = segment(cfg, img, args.checkpoint, args)
    print(f'{summary}\nsaved {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
