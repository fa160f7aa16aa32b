"""Relative log amplitude of the Fourier-transformed block outputs (paper Fig. 3).

    python tools/analysis/fourier_analysis.py configs/maskrcnn_restv2_t_coco.py \
        --checkpoint checkpoints/restv2_tiny_224.pth --images data/coco/val2017 \
        --max-images 100 --out-dir work_dirs/fourier

For every block of the backbone, its output map is Fourier transformed (2-D FFT, zero
frequency shifted to the centre), the log amplitude is averaged over channels and images and
read along the half-diagonal from the centre (0.0 pi) to the corner (1.0 pi), relative to the
centre. The tool saves the curves and the high-frequency gap
``delta = value at 1.0 pi - value at 0.0 pi`` of each block as a PNG and a CSV (one row per
block). A smaller drop (delta closer to 0) means the block keeps more high-frequency detail.
"""
import argparse
import csv
import os
import os.path as osp
import sys
import warnings

import numpy as np
import torch

from restv2_mm.analysis.fourier import block_names, curve_at, fourier_curves
from restv2_mm.utils.tool import CfgOptions, ToolError, build_backbone, load_config, run_tool

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
# ImageNet statistics (RGB), used when the config has no data_preprocessor mean/std.
DEFAULT_MEAN = (123.675, 116.28, 103.53)
DEFAULT_STD = (58.395, 57.12, 57.375)
SAMPLE_POINTS = (0.25, 0.5, 0.75)  # fractions of pi written to the CSV besides 0 and 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Relative log amplitude of the Fourier-transformed feature maps of '
        'every ResTv2 block (paper Fig. 3).')
    parser.add_argument('config', help='MM config with a ResTv2 backbone')
    parser.add_argument('--checkpoint', help='weights: a checkpoint of the config\'s '
                        'model, an authors\' ImageNet file or a converted backbone')
    parser.add_argument('--images', required=True,
                        help='folder of images (or one image file)')
    parser.add_argument('--out-dir', default='work_dirs/fourier_analysis',
                        help='where the PNG and the CSV go')
    parser.add_argument('--img-size', type=int, default=224,
                        help='images are resized to this square size (default 224)')
    parser.add_argument('--max-images', type=int, default=100,
                        help='use at most this many images, in name order (default 100)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, key=value')
    args = parser.parse_args(argv)
    if args.img_size < 32:
        parser.error(f'--img-size {args.img_size} is below ResTv2\'s minimum input of 32')
    if args.max_images < 1 or args.batch_size < 1:
        parser.error('--max-images and --batch-size must be positive')
    return args


def list_images(path: str, limit: int):
    if osp.isfile(path):
        return [path]
    if not osp.isdir(path):
        raise ToolError(f'Image folder {path!r} not found (working directory: '
                          f'{os.getcwd()}).')
    files = sorted(
        osp.join(root, f) for root, _, names in os.walk(path) for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ToolError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {path!r}; make a '
                          f'toy set with `python tools/make_toy_data.py` or point --images '
                          f'at a folder of pictures.')
    return files[:limit]


def normalisation(cfg):
    pre = cfg.model.get('data_preprocessor') or {}
    mean = pre.get('mean') or DEFAULT_MEAN
    std = pre.get('std') or DEFAULT_STD
    return (np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32),
            bool(pre.get('bgr_to_rgb', True)))


def image_batches(files, img_size, batch_size, norm, device):
    """Read, resize and normalise the images the way the config's model sees them."""
    import mmcv
    mean, std, to_rgb = norm
    batch = []
    for f in files:
        try:
            img = mmcv.imread(f)  # BGR, H x W x 3
        except Exception as e:
            raise ToolError(f'Cannot read image {f!r}: {e}') from None
        if img is None:
            raise ToolError(f'Cannot read image {f!r}: not a readable picture; remove it '
                              f'from the folder.')
        if to_rgb:
            img = mmcv.bgr2rgb(img)
        img = mmcv.imresize(img, (img_size, img_size)).astype(np.float32)
        batch.append(torch.from_numpy((img - mean) / std).permute(2, 0, 1))
        if len(batch) == batch_size:
            yield torch.stack(batch).to(device)
            batch = []
    if batch:
        yield torch.stack(batch).to(device)


def write_csv(path, backbone, curves, maps_hw):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['block', 'stage', 'depth', 'height', 'width', 'log_amp_0.0pi',
                         *(f'log_amp_{p}pi' for p in SAMPLE_POINTS), 'log_amp_1.0pi',
                         'delta_log_amplitude'])
        for depth, name in enumerate(block_names(backbone)):
            curve = curves[name]
            values = [curve_at(curve, p) for p in (0., *SAMPLE_POINTS, 1.)]
            writer.writerow([name, int(name[5]), depth, *maps_hw[name],
                             *(f'{v:.5f}' for v in values), f'{values[-1] - values[0]:.5f}'])


def plot(path, backbone, curves, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = block_names(backbone)
    cmap = matplotlib.colormaps['plasma']
    fig, (ax_curve, ax_delta) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for i, name in enumerate(names):
        curve = curves[name].numpy()
        freq = np.linspace(0, 1, len(curve))
        ax_curve.plot(freq, curve, color=cmap(i / max(len(names) - 1, 1)), lw=1.2)
    ax_curve.set_xlim(0, 1)
    ax_curve.set_xticks([0, 0.5, 1], ['0.0π', '0.5π', '1.0π'])
    ax_curve.set_xlabel('Frequency')
    ax_curve.set_ylabel('Δ log amplitude')
    ax_curve.set_title('Relative log amplitude (dark: early, light: late blocks)')
    sm = matplotlib.cm.ScalarMappable(cmap=cmap,
                                      norm=matplotlib.colors.Normalize(0, len(names) - 1))
    fig.colorbar(sm, ax=ax_curve, label='block')

    deltas = [float(curves[n][-1] - curves[n][0]) for n in names]
    depth = np.arange(len(names))
    ax_delta.plot(depth, deltas, marker='o', color='tab:blue')
    start = 0
    for i, d in enumerate(backbone.depths):
        if i % 2:
            ax_delta.axvspan(start - 0.5, start + d - 0.5, color='0.92', zorder=0)
        ax_delta.text(start + (d - 1) / 2, 0.02, f'S{i + 1}', ha='center', va='bottom',
                      transform=ax_delta.get_xaxis_transform(), fontsize=8, color='0.4')
        start += d
    ax_delta.set_xlabel('Block (depth)')
    ax_delta.set_ylabel('Δ log amplitude at 1.0π')
    ax_delta.set_title('High-frequency gap per block (S: stage)')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings('ignore')
    cfg = load_config(args.config, args.cfg_options)
    files = list_images(args.images, args.max_images)
    backbone = build_backbone(cfg, args.checkpoint, args.device)

    batches = image_batches(files, args.img_size, args.batch_size, normalisation(cfg),
                            args.device)
    curves, maps_hw = fourier_curves(backbone, batches)

    os.makedirs(args.out_dir, exist_ok=True)
    stem = osp.splitext(osp.basename(args.config))[0]
    csv_path = osp.join(args.out_dir, f'fourier_{stem}.csv')
    png_path = osp.join(args.out_dir, f'fourier_{stem}.png')
    write_csv(csv_path, backbone, curves, maps_hw)
    weights = osp.basename(args.checkpoint) if args.checkpoint else 'random weights'
    plot(png_path, backbone, curves,
         f'ResTv2 {stem} ({weights}), {len(files)} images at {args.img_size}x{args.img_size}')

    print(f'{len(files)} images at {args.img_size}x{args.img_size}, weights: {weights}')
    print(f'{"block":<10}{"map":>8}{"Δ log amp (1.0π - 0.0π)":>26}')
    for name in block_names(backbone):
        h, w = maps_hw[name]
        print(f'{name:<10}{f"{h}x{w}":>8}{float(curves[name][-1]):>26.3f}')
    print(f'saved {png_path}\nsaved {csv_path}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
