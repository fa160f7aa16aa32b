"""Checks run on a config before a Runner is built, so that a missing dataset or weight
file, or a bad backbone argument, stops a run at once with a message that says what to do,
instead of a traceback from deep inside a dataset, a model build or an init hook.
"""
import os
import os.path as osp
import re
from typing import Iterator, List, Optional, Tuple

from ..checkpoint import OFFICIAL_CHECKPOINTS_HINT, from_scratch_hint
from .tool import ToolError

TOY_DEMO_HINT = ('To try everything without the real data, run the toy demo: '
                 '`bash tools/run_demo.sh` (it writes a small synthetic dataset in the same '
                 'layouts with `python tools/make_toy_data.py data/toy`).')

# Where each known dataset comes from, by the config's dataset type.
DATASET_SOURCES = {
    'CocoDataset': 'COCO 2017 (train2017.zip, val2017.zip and '
    'annotations_trainval2017.zip from https://cocodataset.org/#download)',
    'ADE20KDataset': 'ADE20K (ADEChallengeData2016.zip from '
    'http://sceneparsing.csail.mit.edu)',
}


def _is_url(path: str) -> bool:
    return re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', path) is not None


def _join(root: Optional[str], path: str) -> str:
    if root and not osp.isabs(path) and not _is_url(path):
        return osp.join(root, path)
    return path


def _leaf_datasets(dataset_cfg) -> Iterator[dict]:
    """The datasets inside wrappers such as RepeatDataset and ConcatDataset."""
    if not isinstance(dataset_cfg, dict):
        return
    if 'dataset' in dataset_cfg:
        yield from _leaf_datasets(dataset_cfg['dataset'])
    elif 'datasets' in dataset_cfg:
        for d in dataset_cfg['datasets']:
            yield from _leaf_datasets(d)
    else:
        yield dataset_cfg


def dataset_paths(dataset_cfg: dict) -> List[Tuple[str, bool]]:
    """The files and folders a dataset config reads, as ``(path, is_dir)``."""
    root = dataset_cfg.get('data_root')
    paths = []
    ann_file = dataset_cfg.get('ann_file')
    if ann_file:
        paths.append((_join(root, ann_file), False))
    prefix = dataset_cfg.get('data_prefix') or {}
    for value in prefix.values():
        if isinstance(value, str):
            paths.append((_join(root, value) if value else root or '.', True))
    if not paths and root:
        paths.append((root, True))
    return paths


def _missing(paths: List[Tuple[str, bool]]) -> List[str]:
    out = []
    for path, is_dir in paths:
        if _is_url(path):
            continue
        if not (osp.isdir(path) if is_dir else osp.isfile(path)):
            out.append(path.rstrip('/') + ('/' if is_dir else ''))
    return out


def _loaders_for(cfg, phase: str) -> List[str]:
    if phase == 'train':
        names = ['train_dataloader']
        if cfg.get('val_cfg') and cfg.get('val_dataloader') and cfg.get('val_evaluator'):
            names.append('val_dataloader')
        return names
    if phase == 'test':
        return ['test_dataloader']
    raise ValueError(f'phase={phase!r} must be "train" or "test".')


def _evaluator_files(evaluator) -> List[Tuple[str, bool]]:
    if isinstance(evaluator, dict):
        evaluator = [evaluator]
    paths = []
    for ev in evaluator or []:
        if isinstance(ev, dict) and ev.get('ann_file') and not ev.get('format_only'):
            paths.append((ev['ann_file'], False))
    return paths


def check_data(cfg, phase: str, config_name: str = 'the config') -> None:
    """Raise :class:`ToolError` if a file or folder the ``phase`` reads is missing."""
    loaders = _loaders_for(cfg, phase)
    paths, types = [], []
    for loader in loaders:
        for ds in _leaf_datasets((cfg.get(loader) or {}).get('dataset')):
            paths += dataset_paths(ds)
            types.append(ds.get('type'))
    if phase == 'test':
        paths += _evaluator_files(cfg.get('test_evaluator'))
    elif 'val_dataloader' in loaders:
        paths += _evaluator_files(cfg.get('val_evaluator'))
    paths = list(dict.fromkeys(paths))  # each once, in order
    missing = _missing(paths)
    if not missing:
        return

    lines = [f'The data that {config_name} reads for {phase}ing is not there. It expects '
             f'(relative to the working directory {os.getcwd()}):']
    names = [p.rstrip('/') + '/' if is_dir else p for p, is_dir in paths]
    width = max(len(n) for n in names)
    lines += [f'  {n:<{width}}  {"MISSING" if n in missing else "found"}' for n in names]
    sources = sorted({DATASET_SOURCES[t] for t in types if t in DATASET_SOURCES})
    if sources:
        lines.append('Get ' + ' and '.join(sources) + ' and unpack it there, or link a copy '
                     'you have (ln -s /path/to/it data/...).')
    lines.append('Data elsewhere: set the data_root of the dataloaders with --cfg-options '
                 '(e.g. train_dataloader.dataset.data_root=...).')
    lines.append(TOY_DEMO_HINT)
    raise ToolError('\n'.join(lines))


def _pretrained_files(node, where: str = 'model') -> Iterator[Tuple[str, str]]:
    """``(config key, checkpoint path)`` of every Pretrained init_cfg under ``node``."""
    if isinstance(node, dict):
        init_cfg = node.get('init_cfg')
        inits = init_cfg if isinstance(init_cfg, list) else [init_cfg]
        for init in inits:
            if isinstance(init, dict) and init.get('type') == 'Pretrained' \
                    and init.get('checkpoint'):
                yield f'{where}.init_cfg', init['checkpoint']
        if isinstance(node.get('pretrained'), str):
            yield f'{where}.pretrained', node['pretrained']
        for key, value in node.items():
            if key != 'init_cfg':
                yield from _pretrained_files(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _pretrained_files(value, f'{where}[{i}]')


def check_pretrained(cfg) -> None:
    """Raise :class:`ToolError` if a pretrained weight file of the model is missing."""
    for key, path in _pretrained_files(cfg.get('model')):
        if _is_url(path) or osp.isfile(path):  # URLs (also open-mmlab://) download
            continue
        raise ToolError(
            f'The pretrained weights {path!r} named by {key} do not exist (working '
            f'directory {os.getcwd()}).\n{OFFICIAL_CHECKPOINTS_HINT}\n'
            f'{from_scratch_hint(key)}')


def check_backbone(cfg) -> None:
    """Raise :class:`ToolError` if a ResTv2 backbone of the config cannot be built (an unknown
    arch, a stage out of range, a misspelt argument). It is built on the meta device: no
    memory and no weights, in milliseconds."""
    backbone = (cfg.get('model') or {}).get('backbone')
    btype = str(backbone.get('type', '')) if isinstance(backbone, dict) else ''
    if btype.split('.')[-1] != 'ResTv2':
        return
    import torch

    from ..models.restv2 import ResTv2
    try:
        with torch.device('meta'):
            ResTv2(**{k: v for k, v in backbone.items() if k != 'type'})
    except (ValueError, TypeError) as e:
        reason = str(e).rstrip('.')
        raise ToolError(f'model.backbone: {reason}. Fix it in the config or with '
                        f'--cfg-options model.backbone.<argument>=...') from None


def check_checkpoint(path: str, what: str = 'checkpoint') -> None:
    """Raise :class:`ToolError` if a checkpoint to test or resume from is missing."""
    if _is_url(path) or osp.isfile(path):
        return
    raise ToolError(
        f'The {what} {path!r} does not exist (working directory {os.getcwd()}). Pass the '
        f'path of a .pth file saved by tools/train.py (e.g. work_dirs/<config>/epoch_12.pth '
        f'or the one named in work_dirs/<config>/last_checkpoint).')


def check_amp(cfg) -> None:
    """AMP (``AmpOptimWrapper``) needs an accelerator; say how to run without one."""
    wrapper = cfg.get('optim_wrapper') or {}
    if wrapper.get('type') != 'AmpOptimWrapper':
        return
    from mmengine.device import get_device
    if get_device() == 'cpu':
        raise ToolError(
            'The config trains with mixed precision (optim_wrapper.type='
            '\'AmpOptimWrapper\'), which needs a GPU, and none is visible. To train in '
            'float32 on the CPU, pass --cfg-options optim_wrapper.type=OptimWrapper.')
