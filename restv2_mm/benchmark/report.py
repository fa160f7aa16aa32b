"""The benchmark's report: the printed table, the JSON values and the style plot."""
import math
import os
import os.path as osp
import platform
from typing import Dict, List

import numpy as np
import torch

from .sections import SECTIONS, STYLES
from .timing import kernels_text


def plot_styles(results: Dict[str, dict], sizes, path: str, title_note: str = ''):
    """Latency per image against input size for the four attention styles."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(STYLES, 'osD^'))
    xs = [H * W / 1e6 for H, W, _ in sizes]
    for style in STYLES:
        pts = []
        for (H, W, B), x in zip(sizes, xs):
            e = results.get(f'styles/{style}/{H}x{W}')
            if e and e['status'] == 'ok':
                pts.append((x, e['median_ms'] / B))
        if pts:
            ax.plot(*zip(*pts), marker=markers[style], label=style)
    ax.set_xticks(xs)
    ax.set_xticklabels([f'{H}x{W}\n(batch {B})' for H, W, B in sizes], fontsize=8)
    ax.set_xlabel('input size (megapixels per image)')
    ax.set_ylabel('forward latency per image (ms)')
    ax.set_title(f'ResTv2-T backbone latency by attention style{title_note}', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title='attn_style')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)



def environment(device: torch.device) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               host=platform.node())
    if device.type == 'cuda':
        env['device'] = torch.cuda.get_device_name(device)
        env['cudnn'] = torch.backends.cudnn.version()
    else:
        env['device'] = f'CPU ({platform.processor() or platform.machine()}, ' \
                        f'{torch.get_num_threads()} threads)'
    for name in ('mmcv', 'mmengine', 'mmdet', 'mmseg', 'timm'):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    return env


def fmt(v, spec='.2f', none='-'):
    return none if v is None else format(v, spec)


def print_report(meta: dict, results: Dict[str, dict], ratios: Dict[str, dict],
                 targets: List[dict]):
    line = '=' * 100
    print(f'\n{line}\nResTv2 benchmark on {meta["env"]["device"]} | torch {meta["env"]["torch"]}'
          f' (CUDA {meta["env"]["cuda"]}) | amp {meta["amp"]} | compile {meta["compile"]}'
          f' | best of {meta.get("rounds", 1)} round(s)'
          f'{" | QUICK (tiny sizes, numbers not meaningful)" if meta["quick"] else ""}')
    print(f'command: {meta["command"]}\n{line}')
    by_section: Dict[str, List[dict]] = {}
    for e in results.values():
        by_section.setdefault(e['section'], []).append(e)
    head = (f'{"measurement":<44} {"input":>16} {"median ms":>10} {"rate":>14} '
            f'{"peak MB":>9}  status')
    for section in SECTIONS:
        if section not in by_section:
            continue
        print(f'\n[{section}]\n{head}')
        for e in by_section[section]:
            shape = 'x'.join(str(v) for v in e.get('input', [])) or '-'
            rate = f'{e["per_s"]:.1f} {e["unit"]}' if e['status'] == 'ok' else '-'
            status = e['status'] if e['status'] == 'ok' else \
                f'{e["status"]}: {e.get("error", e.get("note", ""))}'[:80]
            status += kernels_text(e)
            name = e['key'].split('/', 1)[1]
            print(f'{name:<44} {shape:>16} {fmt(e.get("median_ms")):>10} {rate:>14} '
                  f'{fmt(e.get("peak_mb"), ".0f"):>9}  {status}')
    if ratios:
        print('\n[ratios]')
        for r in ratios.values():
            value = f'{r["value"]:.3f}x' if r['value'] is not None else r.get('note', '-')
            print(f'{r["label"]:<72} {value}')
    print('\n[targets]')
    for t in targets:
        value = f'{t["value"]:.3f}x' if t['value'] is not None else t.get('note', '')
        print(f'{t["status"]:<5} {t["id"]:<3} {t["text"]}: {value} '
              f'(target {t["op"]} {t["threshold"]}x)')
    print(line)



def json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)
