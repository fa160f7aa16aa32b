"""Ratios between measurements of the same run, and the speed targets they are held to."""
from typing import Dict, List

from .sections import STYLES


def ratio_definitions(s: dict) -> List[dict]:
    """Each ratio compares entry a with entry b.

    kind 'speed': a's items/s over b's (> 1: a is faster); 'time': a's median time over b's
    (< 1: a is faster); 'memory': a's peak memory over b's; 'gpu_work': the summed run times
    of a step's kernels (``kernel_ms``, counted steps on CUDA) over b's. Where the host sets
    the pace, 'time' and 'gpu_work' part: the first is what a user waits, the second what
    the GPU does.
    """
    r = []

    def add(key, label, kind, a, b):
        r.append(dict(key=key, label=label, kind=kind, a=a, b=b))

    ch, cw = s['cls_size']
    for peer, peer_label in (('swin_t', 'Swin-T'), ('pvtv2_b2', 'PVTv2-b2'),
                             ('convnext_t', 'ConvNeXt-T')):
        add(f'backbone224/restv2_t_vs_{peer}', f'{ch}x{cw}: ResTv2-T vs {peer_label}, images/s',
            'speed', 'backbone224/restv2_t', f'backbone224/{peer}')
    dh, dw = s['dense_size']
    res = f'{dh}x{dw}'
    for mode in ('infer', 'train'):
        a, b = f'dense/restv2_t_global/{mode}', f'dense/restv2_t_explicit/{mode}'
        add(f'dense/default_vs_explicit/{mode}/speed',
            f'{res} {mode}: default vs explicit path, speed-up', 'speed', a, b)
        add(f'dense/default_vs_explicit/{mode}/time',
            f'{res} {mode}: default vs explicit path, time', 'time', a, b)
        add(f'dense/default_vs_explicit/{mode}/memory',
            f'{res} {mode}: default vs explicit path, peak memory', 'memory', a, b)
        if mode == 'train':
            add('dense/default_vs_explicit/train/gpu_work',
                f'{res} train: default vs explicit path, GPU work', 'gpu_work', a, b)
            add('dense/restv2_t_vs_swin_t/train/gpu_work',
                f'{res} train: ResTv2-T vs Swin-T, GPU work', 'gpu_work', a,
                'dense/swin_t/train')
        for style in STYLES[1:]:
            add(f'dense/{style}_vs_global/{mode}/time', f'{res} {mode}: {style} vs global, time',
                'time', f'dense/restv2_t_{style}/{mode}', f'dense/restv2_t_global/{mode}')
        add(f'dense/restv2_t_vs_swin_t/{mode}/speed', f'{res} {mode}: ResTv2-T vs Swin-T, speed',
            'speed', f'dense/restv2_t_global/{mode}', f'dense/swin_t/{mode}')
        add(f'dense/restv2_t_vs_swin_t/{mode}/memory',
            f'{res} {mode}: ResTv2-T vs Swin-T, peak memory', 'memory',
            f'dense/restv2_t_global/{mode}', f'dense/swin_t/{mode}')
    add('dense/fast_vs_eager/infer/speed',
        f'{res} infer: fast_inference vs the eager forward, speed-up', 'speed',
        'dense/restv2_t_global/infer', 'dense/restv2_t_eager/infer')
    add('dense/fast_vs_floor/infer/time',
        f'{res} infer: fast_inference vs its CUDA-graph floor, time', 'time',
        'dense/restv2_t_global/infer', 'dense/restv2_t_eager/floor')
    for name, label in (('restv2_t_eager', 'ResTv2-T eager'),
                        ('restv2_t_explicit', 'ResTv2-T explicit'), ('swin_t', 'Swin-T'),
                        ('pvtv2_b2', 'PVTv2-b2'), ('convnext_t', 'ConvNeXt-T')):
        add(f'dense/{name}/eager_vs_floor/time',
            f'{res} infer: {label} as run vs its CUDA-graph floor, time', 'time',
            f'dense/{name}/infer', f'dense/{name}/floor')
    for peer, label in (('swin_t', 'Swin-T'), ('pvtv2_b2', 'PVTv2-b2'),
                        ('convnext_t', 'ConvNeXt-T')):
        add(f'dense/restv2_t_vs_{peer}/floor/speed',
            f'{res} infer, GPU work (graph floors): ResTv2-T vs {label}, speed', 'speed',
            'dense/restv2_t_eager/floor', f'dense/{peer}/floor')
    for H, W, B in s['style_sizes']:
        for style in STYLES[1:]:
            add(f'styles/{style}_vs_global/{H}x{W}', f'{H}x{W} b{B}: {style} vs global, time',
                'time', f'styles/{style}/{H}x{W}', f'styles/global/{H}x{W}')
    add('detector/predict/speed', 'Mask R-CNN predict: ResTv2-T vs Swin-T, FPS', 'speed',
        'detector/restv2_t/predict', 'detector/swin_t/predict')
    # the most any backbone could give: the model's other parts alone against Swin-T's whole
    add('detector/predict/ceiling',
        'Mask R-CNN predict: its other parts alone (no backbone) vs Swin-T, FPS', 'speed',
        'detector/heads_only/predict', 'detector/swin_t/predict')
    for model, section in (('Mask R-CNN', 'detector'), ('UperNet', 'segmentor')):
        for train, optim in (('train', 'same optimizer'), ('train_own_optim', 'own configs')):
            for kind, said in (('time', 'time'), ('memory', 'memory'), ('gpu_work', 'GPU work')):
                add(f'{section}/{train}/{kind}',
                    f'{model} train iteration ({optim}): ResTv2-T vs Swin-T, {said}', kind,
                    f'{section}/restv2_t/{train}', f'{section}/swin_t/{train}')
    for kind in ('time', 'memory'):
        add(f'detector/train_stream/{kind}',
            f'Mask R-CNN train, a stream of batch sizes (same optimizer): ResTv2-T vs Swin-T, '
            f'{kind}', kind, 'detector/restv2_t/train_stream', 'detector/swin_t/train_stream')
    add('segmentor/predict/speed', 'UperNet predict: ResTv2-T vs Swin-T, FPS', 'speed',
        'segmentor/restv2_t/predict', 'segmentor/swin_t/predict')
    # the config's own setting of fast_training is one of the two; the other is switched
    for model, section, train in (('Mask R-CNN', 'detector', 'train'),
                                  ('UperNet', 'segmentor', 'train_own_optim')):
        for fast, eager in (('restv2_t', 'restv2_t_eager'),
                            ('restv2_t_fast_training', 'restv2_t')):
            for kind in ('time', 'memory'):
                add(f'{section}/{fast}_vs_{eager}/{train}/{kind}',
                    f'{model} train iteration: fast_training vs without, {kind}', kind,
                    f'{section}/{fast}/{train}', f'{section}/{eager}/{train}')
    return r


def compute_ratios(results: Dict[str, dict], definitions: List[dict]) -> Dict[str, dict]:
    out = {}
    for d in definitions:
        a, b = results.get(d['a']), results.get(d['b'])
        entry = dict(d, value=None)
        if a is None or b is None:
            continue  # a section that did not run
        if a['status'] != 'ok' or b['status'] != 'ok':
            bad = [e['key'] for e in (a, b) if e['status'] != 'ok']
            entry['note'] = 'no value: ' + ', '.join(f'{k} {results[k]["status"]}' for k in bad)
        elif d['kind'] == 'speed':
            entry['value'] = a['per_s'] / b['per_s']
        elif d['kind'] == 'time':
            entry['value'] = a['median_ms'] / b['median_ms']
        elif d['kind'] == 'gpu_work':
            if a.get('kernel_ms') and b.get('kernel_ms'):
                entry['value'] = a['kernel_ms'] / b['kernel_ms']
            else:
                entry['note'] = 'no value: kernels are counted on CUDA only'
        elif a.get('peak_mb') is None or b.get('peak_mb') is None:
            entry['note'] = 'no value: peak memory is measured on CUDA only'
        else:
            entry['value'] = a['peak_mb'] / b['peak_mb']
        out[d['key']] = entry
    return out


def target_definitions(s: dict) -> List[dict]:
    """The speed targets, each one comparison in the same run: ratio op threshold."""
    dh, dw = s['dense_size']
    res = f'{dh}x{dw}'
    lh, lw, lb = s['style_sizes'][-1]
    cls = 'x'.join(map(str, s['cls_size']))
    t = [
        ('1a', f'ResTv2-T backbone at {cls}: images/s vs Swin-T',
         ['backbone224/restv2_t_vs_swin_t'], '>=', 2.0),
        ('1b', f'ResTv2-T backbone at {cls}: images/s vs ConvNeXt-T',
         ['backbone224/restv2_t_vs_convnext_t'], '>=', 1.35),
        ('2a', f'{res} b2 inference: default path speed-up over the explicit path',
         ['dense/default_vs_explicit/infer/speed'], '>=', 2.0),
        ('2b', f'{res} b2 inference: default path peak memory vs explicit',
         ['dense/default_vs_explicit/infer/memory'], '<=', 0.6),
        ('2c', f'{res} b2 training step: default path time vs explicit',
         ['dense/default_vs_explicit/train/time'], '<=', 0.85),
        ('2d', f'{res} b2 training step: default path peak memory vs explicit',
         ['dense/default_vs_explicit/train/memory'], '<=', 0.55),
        ('2e', f'{res} b2 inference: fast_inference time vs its CUDA-graph floor',
         ['dense/fast_vs_floor/infer/time'], '<=', 1.15),
    ]
    for i, style in enumerate(STYLES[1:]):
        t.append((f'3{"abc"[i]}', f'{res}: {style} time vs global',
                  [f'styles/{style}_vs_global/{res}', f'dense/{style}_vs_global/infer/time'],
                  '<=', 1.1))
    t += [
        ('3d', f'{lh}x{lw} b{lb}: win time vs global', [f'styles/win_vs_global/{lh}x{lw}'],
         '<=', 0.75),
        ('4a', 'Mask R-CNN ResTv2-T predict FPS vs Swin-T', ['detector/predict/speed'], '>=',
         1.6),
        ('4b', 'Mask R-CNN ResTv2-T training iteration time vs Swin-T, own configs',
         ['detector/train_own_optim/time'], '<=', 0.85),
        ('4c', 'Mask R-CNN ResTv2-T training iteration peak memory vs Swin-T, own configs',
         ['detector/train_own_optim/memory'], '<=', 0.8),
        ('4d', 'Mask R-CNN ResTv2-T training iteration time vs Swin-T, same optimizer',
         ['detector/train/time'], '<=', 0.9),
        ('5a', 'UperNet ResTv2-T predict FPS vs Swin-T', ['segmentor/predict/speed'], '>=', 1.7),
        ('5b', 'UperNet ResTv2-T training iteration time vs Swin-T, own configs',
         ['segmentor/train_own_optim/time'], '<=', 0.8),
        ('5c', 'UperNet ResTv2-T training iteration peak memory vs Swin-T, own configs',
         ['segmentor/train_own_optim/memory'], '<=', 0.9),
    ]
    return [dict(id=i, text=text, ratios=keys, op=op, threshold=th) for i, text, keys, op, th in t]


def check_targets(ratios: Dict[str, dict], definitions: List[dict]) -> List[dict]:
    out = []
    for d in definitions:
        entry = dict(d, value=None, ratio=None)
        found = [ratios[k] for k in d['ratios'] if k in ratios]
        valued = [r for r in found if r['value'] is not None]
        if valued:
            v = valued[0]['value']
            ok = v >= d['threshold'] if d['op'] == '>=' else v <= d['threshold']
            entry.update(value=v, ratio=valued[0]['key'], status='PASS' if ok else 'MISS')
        elif found:
            entry.update(status='N/A', note=found[0].get('note', 'no value'))
        else:
            entry.update(status='N/A', note='section not run')
        out.append(entry)
    return out
