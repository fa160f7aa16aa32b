"""Export a ResTv2 model to ONNX with dynamic batch, height and width, and check the file.

    # the backbone (any attention style) of a config, with trained weights
    python tools/deploy/export_onnx.py configs/maskrcnn_restv2_t_coco.py \\
        work_dirs/maskrcnn_restv2_t_coco/epoch_12.pth --part backbone --out restv2_t.onnx
    # backbone + FPN of Mask R-CNN (boxes and masks: mmdeploy, see below)
    python tools/deploy/export_onnx.py configs/maskrcnn_restv2_t_coco.py CHECKPOINT \\
        --part features --out maskrcnn_features.onnx --shape 800 1344
    # a whole UperNet: image in, per-pixel class scores out
    python tools/deploy/export_onnx.py configs/upernet_restv2_t_ade20k.py CHECKPOINT \\
        --part model --out upernet.onnx

Without a checkpoint the weights are random (enough to check the export). The file is
recorded at --shape (default 512 x 512) and runs at any batch and any H, W >= 32. The tool
then runs it in onnxruntime on the CPU at that size (batch 1) and at a size that is no
multiple of 32 (batch 2), prints the relative error against PyTorch in float32, the file
size and the latency of both, and exits with status 1 if an error exceeds --tolerance.

Inputs: 'backbone' and 'features' take the normalised image B x 3 x H x W, as the
backbone receives it; 'model' takes the image as mmcv reads it (BGR, 0-255, float32) and
holds the config's normalisation. Mask R-CNN's proposals, boxes and masks need NMS and
RoIAlign, which ONNX has no standard ops for: mmdeploy exports them as its custom ops.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from restv2_mm.models import MIN_INPUT_SIZE  # noqa: E402
from restv2_mm.utils.tool import (CfgOptions, ToolError, check_file, load_config,  # noqa: E402
                                  restv2_backbone_cfg, run_tool, toolbox_of)

DEFAULT_SHAPE = (512, 512)


def parse_args(argv=None):
    from restv2_mm.deploy.onnx import PARTS, TOLERANCE
    parser = argparse.ArgumentParser(
        description='Export a ResTv2 backbone, backbone + neck, or UperNet segmentor to ONNX '
        '(dynamic batch, height, width) and check it in onnxruntime.')
    parser.add_argument('config', help='MM config with a ResTv2 backbone')
    parser.add_argument('checkpoint', nargs='?',
                        help='weights: a train.py checkpoint, or a backbone file (the '
                        'authors\' ImageNet weights); random without one')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--part', choices=PARTS, default='backbone',
                        help='backbone: ResTv2 alone; features: backbone + neck; model: a '
                        'whole segmentor, image to class scores (default: backbone)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        default=DEFAULT_SHAPE,
                        help=f'input size the graph is recorded and checked at (default '
                        f'{DEFAULT_SHAPE[0]} {DEFAULT_SHAPE[1]}); other sizes run as well')
    parser.add_argument('--opset', type=int, help='ONNX opset (default: the exporter\'s)')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                        help=f'largest relative error against PyTorch that passes the check '
                        f'(default {TOLERANCE:g})')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed runs for the latencies (median; default 5)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if min(args.shape) < MIN_INPUT_SIZE:
        parser.error(f'--shape {args.shape[0]} {args.shape[1]}: ResTv2 needs H, W >= '
                     f'{MIN_INPUT_SIZE}')
    return args


def import_onnx_tools():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ToolError(f'{e.name} is not installed: pip install onnx onnxruntime onnxscript '
                        f'(bash tools/setup_env.sh installs them with the test extras).'
                        ) from None


def size_note(cfg, part: str, module) -> str:
    """What input sizes the file takes, and any padding that happens around it."""
    note = f'any batch, any H, W >= {MIN_INPUT_SIZE}'
    divisor = getattr(module, 'size_divisor', 1)
    if divisor > 1:
        return (note + f'; padded inside to a multiple of {divisor} as the config\'s test-time '
                f'data_preprocessor does, the scores cropped back')
    pad = (cfg.model.get('data_preprocessor') or {}).get('pad_size_divisor')
    if part != 'model' and pad:
        return note + f'; no padding needed (mmdet pads to a multiple of {pad}: optional)'
    return note + '; no padding needed'


def main(argv=None):
    args = parse_args(argv)
    import_onnx_tools()
    from restv2_mm.deploy import onnx as deploy

    cfg = load_config(args.config, args.cfg_options)
    restv2_backbone_cfg(cfg, args.config)
    toolbox_of(cfg, args.config)
    if args.checkpoint:
        check_file(args.checkpoint, 'Checkpoint')
    if args.part == 'model' and (cfg.model.get('test_cfg') or {}).get('mode') == 'slide':
        print('note: the config tests in slide mode; the file is the whole-image network, '
              'the sliding windows are up to the caller')

    module, source = deploy.build_part(cfg, args.part, args.checkpoint)
    image = args.part == 'model'
    H, W = args.shape
    style = cfg.model.backbone.get('attn_style', 'global')
    print(f'{args.part} of {args.config} (ResTv2 attn_style={style!r}), {source}')
    print(f'exporting at 2 x 3 x {H} x {W} with dynamic batch, height and width ...')
    input_name = 'image' if image else 'input'
    try:
        deploy.export_onnx(deploy.exportable_copy(module),
                           deploy.example_input(2, H, W, image), args.out, input_name,
                           opset=args.opset)
    except Exception as e:  # the exporter's message is the useful part
        raise ToolError(f'the export failed: {type(e).__name__}: '
                        f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}') from None

    sizes = deploy.check_sizes(H, W)
    report = deploy.check_export(args.out, module, sizes, image, args.repeats)
    what = 'BGR 0-255 as mmcv reads it, normalised inside' if image else 'normalised'
    print(f'wrote {args.out} ({report["size_mb"]:.1f} MB)')
    print(f'  input  {input_name}: batch x 3 x height x width float32, {what}')
    print(f'         {size_note(cfg, args.part, module)}')
    for name, shape in report['outputs']:
        print(f'  output {name}: {" x ".join(map(str, shape))} at 1 x 3 x {H} x {W}')
    print('onnxruntime (CPU) against PyTorch, float32:')
    failed = False
    for shape, error in report['errors']:
        ok = error <= args.tolerance
        failed |= not ok
        print(f'  {" x ".join(map(str, shape)):<20} relative error {error:.1e}  '
              f'{"ok" if ok else f"FAILED (> {args.tolerance:g})"}')
    print(f'latency at 1 x 3 x {H} x {W} (CPU, {os.cpu_count()} cores, median of '
          f'{args.repeats}): onnxruntime {report["onnx_ms"]:.1f} ms, PyTorch '
          f'{report["torch_ms"]:.1f} ms')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
