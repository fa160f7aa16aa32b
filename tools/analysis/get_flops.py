"""Parameters and FLOPs of a ResTv2 backbone or of a whole model, next to the paper's.

    # the backbone alone at 224 x 224, against Table 1
    python tools/analysis/get_flops.py --backbone tiny
    # the backbone of a config (its arch and attention style)
    python tools/analysis/get_flops.py configs/maskrcnn_restv2_t_coco.py --backbone-only
    # the whole detector at 1280 x 800 (Table 4) or segmentor at 2048 x 512 (Table 5)
    python tools/analysis/get_flops.py configs/maskrcnn_restv2_t_coco.py
    python tools/analysis/get_flops.py configs/upernet_restv2_t_ade20k.py --shape 2048 512

One multiply-add counts as one FLOP, as in the paper. The model is traced (mmengine's
FlopAnalyzer, fvcore's counting rules) with ResTv2 on its explicit attention path, so the two
matrix products of every attention are counted; they are also shown apart, because the
paper's detection numbers (Table 4) leave them out.
"""
import argparse
import sys
import warnings

import torch

from restv2_mm import ResTv2
from restv2_mm.analysis.flops import (NUM_DUMMY_PROPOSALS, ResTv2Classifier, count_flops,
                                      format_row, model_complexity, paper_reference,
                                      table_header)
from restv2_mm.analysis.paper import (ARCH_ALIASES, ARCH_NAMES, CLASSIFIER_SHAPE,
                                      DETECTION_SHAPE, PAPER_CLASSIFIER, SEGMENTATION_SHAPE,
                                      canonical_arch)
from restv2_mm.utils.tool import (CfgOptions, ToolError, load_config, restv2_backbone_cfg, run_tool,
                                  toolbox_of)

TOLERANCE = 3.0  # percent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs (multiply-adds) of ResTv2 models, compared with '
        'the paper.')
    parser.add_argument('config', nargs='?', help='MM config of a detector or segmentor')
    parser.add_argument(
        '--backbone', choices=[*ARCH_NAMES, *ARCH_ALIASES],
        help='count a plain ResTv2 of this arch instead of a config (global attention)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='with a config: count only its backbone')
    parser.add_argument(
        '--shape', type=int, nargs='+', metavar='N',
        help='input H W (or one number for a square); default 224 224 for a backbone, '
        '1280 800 for a detector, 2048 512 for a segmentor')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.backbone is None):
        parser.error('give one of CONFIG and --backbone ARCH')
    if args.backbone_only and args.config is None:
        parser.error('--backbone-only needs a CONFIG')
    if args.shape is not None:
        if len(args.shape) == 1:
            args.shape = args.shape * 2
        if len(args.shape) != 2 or min(args.shape) <= 0:
            parser.error(f'--shape takes H W (or one size), got {args.shape}')
        args.shape = tuple(args.shape)
    return args


def gflops(n):
    return n / 1e9


def mparams(n):
    return n / 1e6


def verdict(ours, paper):
    return abs(100. * (ours - paper) / paper) <= TOLERANCE


def backbone_report(arch: str, backbone_cfg: dict, shape) -> None:
    """Backbone FLOPs and parameters; at 224 x 224 also the classifier of Table 1."""
    kwargs = {k: v for k, v in backbone_cfg.items() if k not in ('type', 'init_cfg')}
    try:
        backbone = ResTv2(**kwargs).eval()
    except (TypeError, ValueError) as e:
        raise ToolError(f'The backbone settings do not build a ResTv2: {e}') from None
    result = count_flops(backbone, torch.zeros(1, 3, *shape))
    name = canonical_arch(arch)
    style = backbone.attn_style
    print(f'ResTv2 backbone, arch {arch!r}, {style} attention, input {shape[0]}x{shape[1]}')
    print('(1 multiply-add = 1 FLOP; the attention\'s matrix products are counted)\n')
    paper = PAPER_CLASSIFIER.get(name) if (
        shape == CLASSIFIER_SHAPE and style == 'global') else None
    print(table_header())
    print(format_row('backbone GFLOPs', gflops(result['flops']),
                       paper and paper['gflops'], 'G'))
    print(format_row('  of which attention QK^T, AV', gflops(result['attention']), None,
                       'G'))
    print(format_row('backbone params', mparams(result['params']), None, 'M'))
    if paper is not None:
        clf = count_flops(ResTv2Classifier(name).eval(), torch.zeros(1, 3, *shape))
        print(format_row('classifier GFLOPs (Table 1)', gflops(clf['flops']),
                           paper['gflops'], 'G'))
        print(format_row('classifier params (Table 1)', mparams(clf['params']),
                           paper['params_m'], 'M'))
        print('\nTable 1 counts the ImageNet classifier: the backbone plus a pooled '
              '1000-class head (+0.8M parameters, under 0.1% of the FLOPs). The backbone '
              'normalises each of its 4 outputs, the classifier only the last.')
        ok = verdict(gflops(result['flops']), paper['gflops']) and verdict(
            mparams(clf['params']), paper['params_m'])
        print(f'Within {TOLERANCE:.0f}% of the paper: {"yes" if ok else "NO"}')
    elif shape != CLASSIFIER_SHAPE or style != 'global':
        print('\nThe paper reports backbone numbers for global attention at 224x224 only.')


def model_report(cfg, config_path: str, shape) -> None:
    """Whole-model FLOPs and parameters, against Table 4 or 5 where they apply."""
    backbone_cfg = restv2_backbone_cfg(cfg, config_path)
    scope = toolbox_of(cfg)
    result = model_complexity(cfg, shape)
    shape = result['shape']
    paper, table = paper_reference(cfg)
    default_shape = DETECTION_SHAPE if scope == 'mmdet' else SEGMENTATION_SHAPE
    attn_style = backbone_cfg.get('attn_style', 'global')
    if shape != default_shape or attn_style != 'global':
        paper = None  # the paper's numbers are for global attention at these sizes only
    model_type = cfg.model.get('type')
    if scope == 'mmseg':
        model_type = f'{model_type} + {cfg.model.decode_head.get("type")}'
    print(f'{model_type} ({scope}) from {config_path}')
    print(f'ResTv2 arch {backbone_cfg.get("arch", "tiny")!r}, {attn_style} attention, '
          f'input {shape[0]}x{shape[1]}')
    print('(1 multiply-add = 1 FLOP)\n')
    print(table_header())
    print(format_row('params', mparams(result['params']), paper and paper['params_m'],
                       'M'))
    all_ops = gflops(result['flops'])
    no_attn = gflops(result['flops'] - result['attention'])
    print(format_row('GFLOPs, all ops', all_ops, paper and paper['gflops'], 'G'))
    print(format_row('GFLOPs w/o attention QK^T, AV', no_attn, paper and paper['gflops'],
                       'G'))
    for name, n in result['by_module'].items():
        if n:
            print(format_row(f'  {name}', gflops(n), None, 'G'))
    print(format_row('  attention QK^T, AV (backbone)', gflops(result['attention']), None,
                       'G'))
    if scope == 'mmdet':
        print(f'\nThe RoI heads run on {NUM_DUMMY_PROPOSALS} fixed proposals (the mask '
              f'head on the first 100), the RPN outputs are not decoded: the counting '
              f'forward of the authors\' script.')
    else:
        print('\nCounted: backbone, neck, decode head and the resize of its logits to the '
              'input; the auxiliary head only trains (its parameters are counted).')
    if result['uncounted']:
        ops = ', '.join(f'{op} x{n}' for op, n in sorted(result['uncounted'].items()))
        print(f'Not counted (no counting rule for these ops): {ops}.')
    if paper is None:
        return
    print()
    if verdict(all_ops, paper['gflops']):
        print(f'{table} matches the full count (attention products included).')
    elif verdict(no_attn, paper['gflops']):
        print(f'{table} agrees with the count that leaves out the attention\'s matrix '
              f'products (Q K^T and A V, {gflops(result["attention"]):.1f} G here), so the '
              f'counter behind those numbers did not see them. The full cost of this model '
              f'is the "all ops" line ({all_ops:.1f} G).')
    else:
        print(f'NO count is within {TOLERANCE:.0f}% of {table} ({paper["gflops"]} G).')


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings('ignore')
    if args.backbone is not None:
        arch = ARCH_ALIASES.get(args.backbone, args.backbone)
        backbone_report(arch, dict(arch=arch), args.shape or CLASSIFIER_SHAPE)
        return 0
    cfg = load_config(args.config, args.cfg_options)
    if args.backbone_only:
        backbone_cfg = restv2_backbone_cfg(cfg, args.config)
        backbone_report(backbone_cfg.get('arch', 'tiny'), backbone_cfg,
                        args.shape or CLASSIFIER_SHAPE)
    else:
        model_report(cfg, args.config, args.shape)
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
