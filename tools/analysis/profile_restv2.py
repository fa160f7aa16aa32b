#!/usr/bin/env python
"""Where the time of a ResTv2 backbone goes: torch.profiler over inference and a training step.

    python tools/analysis/profile_restv2.py                          # ResTv2-T, 800x1344, batch 2
    python tools/analysis/profile_restv2.py --attn-style win --modes train --row-limit 40
    python tools/analysis/profile_restv2.py --trace-dir work_dirs/profile   # + Chrome traces
    python tools/analysis/profile_restv2.py --quick                  # CPU, tiny input

On a GPU (float16 autocast unless ``--no-amp``) it prints, for each mode:

- the top GPU kernels by total CUDA time (calls, total, mean, share of all kernel time);
- the top operators by self CUDA time (``torch.profiler``'s own table);
- the time spent under each part of the network (stem, patch embeddings, and per stage the
  EMSAv2 attention and the MLP), forward only, from ``record_function`` ranges.

On the CPU (``--quick``, or ``--device cpu``) the same tables are ranked by CPU time.
A training step is forward, a scalar loss over the outputs and backward, with the model in
train mode (drop path 0.1 as in the detection configs).
"""
import argparse
import contextlib
import os
import os.path as osp
import sys
from typing import Dict, List

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, record_function

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
try:
    import restv2_mm  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, REPO_ROOT)
from restv2_mm import ResTv2  # noqa: E402
from restv2_mm.benchmark.sections import backbone_step  # noqa: E402
from restv2_mm.models import ATTN_IMPLS, ATTN_STYLES, EMSAv2, Mlp  # noqa: E402

MODES = ('infer', 'train')
RANGE_PREFIX = 'restv2::'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Profile the ResTv2 backbone (inference and a training step) with '
        'torch.profiler and print the top kernels by CUDA time.')
    parser.add_argument('--arch', default='tiny', help='tiny, small, base or large')
    parser.add_argument('--attn-style', default='global', choices=ATTN_STYLES)
    parser.add_argument('--attn-impl', default='sdpa', choices=ATTN_IMPLS)
    parser.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                        help='input height and width (default 800 1344; 64 96 with --quick)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--modes', default='infer,train',
                        help='comma-separated subset of infer,train (default: both)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed steps first (default 5; 1 with --quick)')
    parser.add_argument('--steps', type=int, default=None,
                        help='profiled steps (default 5; 1 with --quick)')
    parser.add_argument('--row-limit', type=int, default=25, help='rows in each table')
    parser.add_argument('--no-amp', action='store_true', help='float32 instead of fp16')
    parser.add_argument('--device', default=None,
                        help='cuda or cpu (default: cuda, or cpu with --quick)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny input and one step on the CPU: checks that it runs')
    parser.add_argument('--cpu-threads', type=int, default=None,
                        help='torch CPU threads (default: 1 with --quick)')
    parser.add_argument('--trace-dir', default=None,
                        help='also write a Chrome trace per mode (open in chrome://tracing '
                        'or https://ui.perfetto.dev)')
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f'--modes {args.modes!r}: choose from {",".join(MODES)}.')
    args.modes = modes
    args.size = args.size or ([64, 96] if args.quick else [800, 1344])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 5)
    return args


def annotate(model: torch.nn.Module) -> List:
    """Wrap the forward of each part of the network in a ``record_function`` range.

    Ranges: ``restv2::stem``, ``restv2::patch_2..4``, ``restv2::stageN.attn`` and
    ``restv2::stageN.mlp`` (all blocks of a stage under one name) and ``restv2::cwin``.
    Returns the hook handles.
    """
    handles = []

    def add(module, name):
        stack = []

        def enter(mod, inputs):
            rf = record_function(RANGE_PREFIX + name)
            rf.__enter__()
            stack.append(rf)

        def leave(mod, inputs, output):
            stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    add(model.stem, 'stem')
    for i in range(model.num_stages):
        if i:
            add(getattr(model, f'patch_{i + 1}'), f'patch_{i + 1}')
        for block in getattr(model, f'stage{i + 1}'):
            for name, sub in block.named_children():
                if isinstance(sub, EMSAv2):
                    add(sub, f'stage{i + 1}.attn')
                elif isinstance(sub, Mlp):
                    add(sub, f'stage{i + 1}.mlp')
    for conv in getattr(model, 'cross_window_convs', []):
        add(conv, 'cwin')
    return handles


def make_step(model, x, mode: str, autocast):
    model.train(mode == 'train')
    return backbone_step(model, x, mode == 'train', autocast)


def time_of(evt, cuda: bool, self_only: bool) -> float:
    """Microseconds of an averaged profiler event, on the device or the CPU."""
    if cuda:
        name = 'self_device_time_total' if self_only else 'device_time_total'
        if not hasattr(evt, name):  # torch < 2.4 names
            name = name.replace('device', 'cuda')
    else:
        name = 'self_cpu_time_total' if self_only else 'cpu_time_total'
    return float(getattr(evt, name))


def is_range(evt) -> bool:
    return evt.key.startswith(RANGE_PREFIX) or bool(getattr(evt, 'is_user_annotation', False))


def kernel_table(events, row_limit: int) -> str:
    """Top GPU kernels by total time (the ranges' GPU spans left out)."""
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not is_range(e)]
    if not kernels:
        return '(no CUDA kernels recorded)'
    total = sum(time_of(e, True, True) for e in kernels) or 1.
    kernels.sort(key=lambda e: time_of(e, True, True), reverse=True)
    lines = [f'{"kernel":<90} {"calls":>6} {"total ms":>10} {"mean us":>9} {"share":>7}']
    for e in kernels[:row_limit]:
        t = time_of(e, True, True)
        name = e.key if len(e.key) <= 90 else e.key[:87] + '...'
        lines.append(f'{name:<90} {e.count:>6} {t / 1e3:>10.3f} {t / e.count:>9.1f} '
                     f'{100 * t / total:>6.1f}%')
    lines.append(f'{"all kernels":<90} {sum(e.count for e in kernels):>6} '
                 f'{total / 1e3:>10.3f}')
    return '\n'.join(lines)


def range_table(events, cuda: bool, steps: int) -> str:
    """Time under each annotated part of the network, per profiled step."""
    ranges: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for e in events:
        if e.key.startswith(RANGE_PREFIX) and e.device_type == DeviceType.CPU:
            ranges[e.key] = ranges.get(e.key, 0.) + time_of(e, cuda, False)
            counts[e.key] = counts.get(e.key, 0) + e.count
    if not ranges:
        return '(no annotated ranges recorded)'
    total = sum(ranges.values()) or 1.
    unit = 'CUDA' if cuda else 'CPU'
    lines = [f'{"part (forward)":<28} {"calls/step":>10} {unit + " ms/step":>14} {"share":>7}']
    for key, t in sorted(ranges.items(), key=lambda kv: kv[1], reverse=True):
        lines.append(f'{key[len(RANGE_PREFIX):]:<28} {counts[key] // steps:>10} '
                     f'{t / 1e3 / steps:>14.3f} {100 * t / total:>6.1f}%')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ('cpu' if args.quick else 'cuda'))
    cuda = device.type == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise SystemExit('CUDA is not available here: run on a GPU, or pass --quick (or '
                         '--device cpu) for the CPU tables.')
    if not cuda and (args.cpu_threads or args.quick):
        torch.set_num_threads(args.cpu_threads or 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    amp = cuda and not args.no_amp

    def autocast():
        return torch.autocast('cuda', dtype=torch.float16) if amp else contextlib.nullcontext()

    H, W = args.size
    model = ResTv2(arch=args.arch, drop_path_rate=0.1, attn_style=args.attn_style,
                   attn_impl=args.attn_impl)
    model.init_weights()
    model.to(device)
    annotate(model)
    x = torch.randn(args.batch, 3, H, W, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    what = (f'ResTv2-{args.arch} attn_style={args.attn_style} attn_impl={args.attn_impl}, '
            f'input {args.batch}x3x{H}x{W}, {"fp16 autocast" if amp else "float32"}, on '
            f'{torch.cuda.get_device_name(device) if cuda else "CPU"}, torch {torch.__version__}')
    sort_by = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'

    for mode in args.modes:
        step = make_step(model, x, mode, autocast)
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        bar = '=' * 100
        print(f'\n{bar}\n{mode}: {what}; {args.steps} profiled step(s) after {args.warmup} '
              f'warm-up\n{bar}')
        if cuda:
            print(f'\n[top {args.row_limit} GPU kernels by CUDA time]')
            print(kernel_table(events, args.row_limit))
        print(f'\n[top {args.row_limit} operators by {sort_by}]')
        ops = EventList([e for e in events if not is_range(e)], use_device='cuda' if cuda else None)
        print(ops.table(sort_by=sort_by, row_limit=args.row_limit))
        print('[time by part of the network]')
        print(range_table(events, cuda, args.steps))
        if args.trace_dir:
            os.makedirs(args.trace_dir, exist_ok=True)
            path = osp.join(args.trace_dir, f'restv2_{args.arch}_{args.attn_style}_'
                            f'{args.attn_impl}_{H}x{W}_{mode}.json')
            prof.export_chrome_trace(path)
            print(f'trace: {path}')


if __name__ == '__main__':
    main()
