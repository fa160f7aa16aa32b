"""Evaluate a trained detector (mmdet) or segmentor (mmseg) on the test split of its config.

The toolbox is the config's ``default_scope``. The metrics are printed and written to
``<work dir>/test_metrics.json``; ``--show-dir`` saves pictures of the predictions.

    python tools/test.py configs/maskrcnn_restv2_t_coco.py work_dirs/x/epoch_12.pth
    python tools/test.py CONFIG CKPT --show-dir work_dirs/x/pictures
    bash tools/dist_test.sh CONFIG CKPT 8
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from restv2_mm.utils.dist import log_distributed, setup_distributed  # noqa: E402
from restv2_mm.utils.preflight import (check_backbone, check_checkpoint,  # noqa: E402
                                       check_data)
from restv2_mm.utils.tool import CfgOptions, ToolError, load_config, toolbox_of  # noqa: E402

METRICS_FILE = 'test_metrics.json'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a ResTv2 model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file (.pth saved by tools/train.py)')
    parser.add_argument('--work-dir', help='where the metrics and logs go (default: '
                        'work_dirs/<config name>)')
    parser.add_argument('--out', help='mmdet: dump the predictions to this .pkl file; '
                        'mmseg: save the predicted label maps in this folder')
    parser.add_argument('--show', action='store_true', help='show the predictions in a window')
    parser.add_argument('--show-dir', help='save pictures of the predictions in this folder')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each picture stays with --show')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, xxx=yyy pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation, with '
                        'the config\'s tta_model and tta_pipeline')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _show_pictures(cfg, toolbox: str, args):
    """Switch on the toolbox's visualization hook; returns where pictures will be."""
    hooks = cfg.get('default_hooks', {})
    if 'visualization' not in hooks:
        raise ToolError('--show/--show-dir need default_hooks.visualization in the '
                        'config (DetVisualizationHook or SegVisualizationHook).')
    hook = hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if not args.show_dir:
        return None
    show_dir = osp.abspath(args.show_dir)
    if toolbox == 'mmdet':
        hook['test_out_dir'] = show_dir  # the hook writes one picture per test image there
        return show_dir
    hook['interval'] = 1  # every test image, not every 50th
    cfg.visualizer['save_dir'] = show_dir
    return osp.join(show_dir, 'vis_data', 'vis_image')  # where LocalVisBackend writes


def _with_tta(cfg):
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise ToolError('--tta needs tta_model and tta_pipeline in the config.')
    from mmengine.config import ConfigDict
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)


def build_test_config(args):
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    toolbox = cfg.default_scope = toolbox_of(cfg, args.config)
    check_backbone(cfg)  # before --tta wraps the model
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    pictures = _show_pictures(cfg, toolbox, args) if args.show or args.show_dir else None
    if args.tta:
        _with_tta(cfg)
    if args.out is not None and toolbox == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    if args.out is not None and toolbox == 'mmdet' and not args.out.endswith(('.pkl',
                                                                              '.pickle')):
        raise ToolError(f'--out {args.out!r}: mmdet dumps predictions to a .pkl file.')
    check_data(cfg, 'test', args.config)
    return cfg, toolbox, pictures


def _plain(value):
    """Metrics as JSON values (numpy scalars become floats)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, 'item'):
        return value.item()
    return value


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, toolbox, pictures = build_test_config(args)
        setup_distributed(cfg)
    except ToolError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    from mmengine.dist import is_main_process
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if toolbox == 'mmdet':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    log_distributed(runner)
    if args.out is not None and toolbox == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = _plain(runner.test())

    if is_main_process():
        record = dict(config=args.config, checkpoint=args.checkpoint,
                      time=time.strftime('%Y-%m-%d %H:%M:%S'), metrics=metrics)
        path = osp.join(cfg.work_dir, METRICS_FILE)
        os.makedirs(cfg.work_dir, exist_ok=True)
        with open(path, 'w') as f:
            json.dump(record, f, indent=2)
        width = max(len(k) for k in metrics) if metrics else 0
        print('\nTest metrics:')
        for key, value in metrics.items():
            print(f'  {key:<{width}}  {value:.4f}' if isinstance(value, float) else
                  f'  {key:<{width}}  {value}')
        print(f'Metrics written to {path}')
        if pictures:
            print(f'Pictures of the predictions: {pictures}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
