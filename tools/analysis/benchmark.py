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
  training step (forward + backward), for ResTv2-T in each attention style (with
  ``fast_inference``), ResTv2-T without it, ResTv2-T with the explicit attention path run
  eagerly, Swin-T, PVTv2-b2 and ConvNeXt-T; each one's inference also replayed as a single
  CUDA graph (its floor: the GPU work alone); and what a new input size costs
  ``fast_inference`` (first call, recording, memory).
- ``styles``: ResTv2-T inference latency in each style at 800 x 1344 (batch 2), 1600 x 2688
  and 2400 x 4032 (batch 1), drawn as latency per image against input size (``--out-plot``).
- ``detector``: Mask R-CNN ResTv2-T against mmdet's Mask R-CNN Swin-T: predict at 800 x 1344
  (batch 1, fp16) and one AMP training iteration at batch 2 with peak memory, with the same
  AdamW for both and with each config's own optimizer set-up (with the same AdamW, ResTv2-T's
  also with the backbone's ``fast_training`` the other way round from its config); the same
  training over a stream of batches in several padded sizes, as detection training meets
  them (a step is one pass over the stream). Also the predict of ResTv2-T's model with the
  backbone's features computed once: the neck, heads and post-processing alone, the time no
  backbone can take away.
- ``segmentor``: UperNet ResTv2-T against mmseg's UperNet Swin-T: predict at 512 x 512, and
  one AMP training iteration at batch 4 with each config's own optimizer set-up; ResTv2-T's
  also with the backbone's ``fast_training`` the other way round from its config.

Every model has random weights (no pretrained files are read or downloaded). Times are
medians over timed repeats after warm-up, taken with CUDA events (``time.perf_counter`` on
the CPU); peak memory is ``torch.cuda.max_memory_allocated`` over the timed repeats, weights
and optimizer state included, plus what CUDA graphs' private pools hold beyond it (the
buffers a replay reuses, which the counter sees as free). Run eagerly, these models are
bound by the host launching their kernels, and on a shared host that pace changes within
seconds; so the models of one comparison are set up together and timed in turn, one step of
each: the backbones' inference and their training steps at 800 x 1344, the detectors'
predict and each training set-up, the segmentors' likewise. Each one's peak is taken over
its own warm-up, less what the others hold (they are idle meanwhile). The rest (224 x 224
throughput, CUDA-graph floors, the larger style sizes) is measured one model at a time,
caches emptied and peak statistics reset. A measurement that fails, say out of memory, is
reported as such while the rest go on.
With ``--rounds R`` everything is measured R times in turn and each measurement keeps its
round with the lowest median: on a shared host whose CPU launches the kernels, contention
comes in phases that only ever add time, and R rounds give each model R chances to miss
them. The JSON keeps every round's median.

The run ends with a table of times, memory and ratios, the PASS/MISS lines of the speed
targets, and writes everything to ``--out-json`` (and the style plot to ``--out-plot``).
"""
import argparse
import json
import logging
import os
import os.path as osp
import shlex
import sys
import time
import traceback
from typing import Dict

import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
try:
    import restv2_mm  # noqa: F401  (registers ResTv2 into mmdet's and mmseg's MODELS)
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, REPO_ROOT)
from restv2_mm.benchmark.models import RESTV2_DET_CONFIG, RESTV2_SEG_CONFIG  # noqa: E402
from restv2_mm.benchmark.report import (environment, json_default, plot_styles,  # noqa: E402
                                        print_report)
from restv2_mm.benchmark.sections import FULL, QUICK, SECTION_RUNNERS, SECTIONS  # noqa: E402
from restv2_mm.benchmark.targets import (check_targets, compute_ratios,  # noqa: E402
                                         ratio_definitions, target_definitions)
from restv2_mm.benchmark.timing import Bench, keep_best_rounds  # noqa: E402


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
        meta['rounds_done'] = round_ + 1
        if round_ + 1 < args.rounds:  # a run stopped early keeps the rounds it finished
            write_report(args, meta, best, settings)
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

    report = write_report(args, meta, bench.results, settings)
    print_report(meta, bench.results, report['ratios'], report['targets'])
    print(f'results: {args.out_json}' + (f', plot: {args.out_plot}' if 'plot' in meta else ''))
    return report


def write_report(args, meta: dict, results: Dict[str, dict], settings: dict) -> dict:
    """The results with their ratios and targets, written to ``--out-json``."""
    ratios = compute_ratios(results, ratio_definitions(settings))
    targets = check_targets(ratios, target_definitions(settings))
    sections = {s: {k: e for k, e in results.items() if e['section'] == s}
                for s in args.sections}
    report = dict(meta=meta, sections=sections, ratios=ratios, targets=targets)
    os.makedirs(osp.dirname(osp.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, 'w') as f:
        json.dump(report, f, indent=2, default=json_default)
    return report


if __name__ == '__main__':
    main()
