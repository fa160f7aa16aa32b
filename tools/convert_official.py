"""Turn an authors' ResTv2 ImageNet checkpoint into a backbone checkpoint for ``load_from``.

    python tools/convert_official.py checkpoints/restv2_tiny_224.pth \
        checkpoints/restv2_tiny_224_backbone.pth

The authors' file is a dict with the state_dict under 'model' (and, when written by their
training script, 'optimizer', 'epoch', 'scaler' and 'args'). The output keeps only the
backbone weights, under 'backbone.', in the OpenMMLab layout
``{'state_dict': {'backbone.' + key: tensor}, 'meta': {...}}``, and prints what it left out.
The backbone also loads the authors' file directly through
``init_cfg=dict(type='Pretrained', checkpoint=...)``; this tool is for ``load_from`` and for
smaller files.
"""
import argparse
import os
import os.path as osp
import re
import sys
from collections import OrderedDict

import torch

from restv2_mm import ResTv2
from restv2_mm.utils.tool import ToolError, read_checkpoint_file, run_tool
from restv2_mm.checkpoint import extract_backbone_state


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an authors\' ResTv2 classification checkpoint into a backbone '
        'checkpoint for mmdet/mmseg `load_from`.')
    parser.add_argument('src', help='the authors\' checkpoint, e.g. restv2_tiny_224.pth')
    parser.add_argument('dst', help='where to write the backbone checkpoint')
    return parser.parse_args(argv)


def infer_arch(state) -> dict:
    """embed_dims, depths and sr_ratios of a ResTv2 state_dict, read off the key shapes."""
    try:
        dims = [int(state['stem.norm.weight'].shape[0])]
        dims += [int(state[f'patch_{i}.norm.weight'].shape[0]) for i in (2, 3, 4)]
    except KeyError as e:
        raise ToolError(f'No ResTv2 weights found: the key {e.args[0]!r} is missing. Is this '
                        f'a ResTv2 checkpoint?') from None
    depths, ratios = [], []
    for i, c in enumerate(dims):
        blocks = {int(m.group(1)) for k in state
                  if (m := re.match(rf'stage{i + 1}\.(\d+)\.', k))}
        if not blocks:
            raise ToolError(f'No blocks of stage {i + 1} (keys stage{i + 1}.*) in the '
                            f'checkpoint; is it a ResTv2 checkpoint?')
        depths.append(max(blocks) + 1)
        up = state.get(f'stage{i + 1}.0.attn.up.0.weight')
        ratios.append(round((up.shape[0] // c)**0.5) if up is not None else 1)
    return dict(embed_dims=dims, depths=depths, sr_ratios=ratios)


def convert(src: str, dst: str) -> dict:
    checkpoint = read_checkpoint_file(src)
    inner_key = next((k for k in ('model', 'state_dict') if isinstance(checkpoint.get(k),
                                                                        dict)), None)
    source_state = checkpoint[inner_key] if inner_key else checkpoint
    state = extract_backbone_state(checkpoint)
    state = OrderedDict((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    arch = infer_arch(state)
    name = zoo_name(arch)

    # check the weights against a backbone of that shape (heads do not change the shapes)
    probe = ResTv2(name or dict(arch, num_heads=[1] * 4))
    own = probe.state_dict()
    bad = [f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not re.match(r'norm\d+\.', k)]
    if bad or unexpected or missing:
        details = '; '.join(
            filter(None, [
                bad and 'shape mismatch ' + ', '.join(bad[:3]),
                unexpected and 'unknown keys ' + ', '.join(unexpected[:5]),
                missing and 'missing keys ' + ', '.join(missing[:5]),
            ]))
        raise ToolError(f'{src!r} is not a ResTv2 checkpoint this backbone can take: '
                        f'{details}.')

    dropped_keys = [k for k in source_state if backbone_key(k, source_state) not in state]
    dropped_entries = [k for k in checkpoint if k != inner_key] if inner_key else []

    meta = dict(source=osp.basename(src), arch=name or arch,
                converted_by='tools/convert_official.py')
    if isinstance(checkpoint.get('epoch'), int):
        meta['epoch'] = checkpoint['epoch']
    args = checkpoint.get('args')
    if getattr(args, 'model', None):
        meta['source_model'] = str(args.model)
    out = dict(state_dict=OrderedDict(('backbone.' + k, v) for k, v in state.items()),
               meta=meta)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(out, dst)
    return dict(kept=len(state), dropped_keys=dropped_keys, dropped_entries=dropped_entries,
                arch=name or arch, meta=meta)


def zoo_name(arch: dict):
    """'tiny', 'small', 'base' or 'large' when the shapes are those of a named arch."""
    for name in ('tiny', 'small', 'base', 'large'):
        zoo = ResTv2.arch_zoo[name]
        if all(list(arch[k]) == zoo[k] for k in ('embed_dims', 'depths', 'sr_ratios')):
            return name
    return None


def backbone_key(key: str, state) -> str:
    """The backbone key a source key becomes ('' for keys outside the backbone)."""
    key = re.sub(r'^module\.', '', key)
    if any(re.sub(r'^module\.', '', k).startswith('backbone.') for k in state):
        return key[len('backbone.'):] if key.startswith('backbone.') else ''
    return key


def main(argv=None):
    args = parse_args(argv)
    if osp.abspath(args.src) == osp.abspath(args.dst):
        raise ToolError('SRC and DST are the same file; write the backbone checkpoint to a '
                        'new path.')
    report = convert(args.src, args.dst)
    arch = report['arch']
    print(f'ResTv2 arch: {arch if isinstance(arch, str) else arch} '
          f'({"recognised" if isinstance(arch, str) else "not one of the four named archs"})')
    print(f'kept {report["kept"]} backbone tensors, now under "backbone."')
    if report['dropped_keys']:
        print(f'dropped {len(report["dropped_keys"])} classifier tensors: '
              f'{", ".join(report["dropped_keys"])}')
    if report['dropped_entries']:
        print(f'dropped the entries besides the weights: {", ".join(report["dropped_entries"])}')
    print('not in the file, initialised by the detector/segmentor: the output norms '
          'norm0..norm3')
    print(f'saved {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
