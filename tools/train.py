"""Train a detector (mmdet) or a segmentor (mmseg) from a config.

The toolbox is the config's ``default_scope``: 'mmdet' for the Mask R-CNN configs, 'mmseg'
for the UperNet ones. Options follow mmdet's tools/train.py:

    python tools/train.py configs/maskrcnn_restv2_t_coco.py
    python tools/train.py configs/toy/upernet_restv2_t_toy.py --work-dir work_dirs/toy_seg
    python tools/train.py CONFIG --resume                  # latest checkpoint in the work dir
    python tools/train.py CONFIG --resume work_dirs/x/epoch_3.pth
    bash tools/dist_train.sh CONFIG 8                        # 8 processes (torchrun)
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from restv2_mm.utils.dist import log_distributed, setup_distributed  # noqa: E402
from restv2_mm.utils.preflight import (check_amp, check_backbone,  # noqa: E402
                                       check_checkpoint, check_data, check_pretrained)
from restv2_mm.utils.tool import CfgOptions, ToolError, load_config, toolbox_of  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a ResTv2 detector or segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the real batch size / auto_scale_lr.'
                        'base_batch_size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or with no value from the '
                        'latest checkpoint in the work dir')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, xxx=yyy pairs, e.g. '
                        'model.backbone.init_cfg=None train_cfg.max_epochs=2')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_train_config(args):
    """The config with the command line applied, checked before anything is built."""
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    toolbox = cfg.default_scope = toolbox_of(cfg, args.config)

    # work_dir: command line > config > config file name
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') not in ('OptimWrapper',
                                                                 'AmpOptimWrapper'):
            raise ToolError(
                f'--amp needs optim_wrapper.type OptimWrapper or AmpOptimWrapper, the config '
                f'has {cfg.optim_wrapper.type!r}.')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ToolError(
                f'--auto-scale-lr needs auto_scale_lr = dict(base_batch_size=N) in '
                f'{args.config}: the batch size its lr was set for.')
        cfg.auto_scale_lr.enable = True

    # resume: an explicit checkpoint, or 'auto' for the latest one in the work dir
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        check_checkpoint(args.resume, 'checkpoint to resume from')
        cfg.resume = True
        cfg.load_from = args.resume

    check_backbone(cfg)
    check_data(cfg, 'train', args.config)
    check_pretrained(cfg)
    check_amp(cfg)
    return cfg, toolbox


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, toolbox = build_train_config(args)
        setup_distributed(cfg)
    except ToolError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if toolbox == 'mmdet':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    log_distributed(runner)
    runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
