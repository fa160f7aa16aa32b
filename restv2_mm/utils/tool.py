"""What the command-line tools share: one error type, reading configs, building models.

The scripts in ``tools/`` are thin wrappers over the package; a problem with what the user
passed in is a :class:`ToolError`, which a tool prints as ``error: ...`` without a
traceback.
"""
import os
import os.path as osp
import re
import sys
import warnings
from typing import Callable, Optional, Sequence

import torch.nn as nn
from mmengine.config import DictAction

from ..models import ResTv2

TOOLBOXES = ('mmdet', 'mmseg')


class ToolError(Exception):
    """A problem with what the user passed in; the message says what to do about it."""


class CfgOptions(DictAction):
    """mmengine's ``DictAction`` for ``--cfg-options``, where a value it cannot read is a
    usage error that names it (``key="dict(a=1)"`` sends mmengine's reader into endless
    recursion, a traceback of a thousand lines)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for pair in values:
            try:
                super().__call__(parser, namespace, [pair], option_string)
            except (RecursionError, ValueError):
                parser.error(f'{option_string}: cannot read {pair!r}. Set the keys of a dict one '
                             f'by one, e.g. model.backbone.init_cfg.type=Pretrained '
                             f'model.backbone.init_cfg.checkpoint=PATH; lists as [1,2], '
                             f'tuples as (1,2).')


def run_tool(main: Callable[[Optional[Sequence[str]]], Optional[int]],
             argv: Optional[Sequence[str]] = None, error_code: int = 1) -> int:
    """Run a tool's ``main``; a :class:`ToolError` becomes ``error: ...`` on stderr and the
    exit status ``error_code``."""
    try:
        return main(argv) or 0
    except ToolError as e:
        print(f'error: {e}', file=sys.stderr)
        return error_code


def check_file(path: str, what: str) -> str:
    if not osp.isfile(path):
        hint = ' (it is a directory)' if osp.isdir(path) else ''
        raise ToolError(f'{what} {path!r} not found{hint} (working directory: {os.getcwd()}).')
    return path


def load_config(path: str, cfg_options: Optional[dict] = None):
    """Read an MM config file and merge ``--cfg-options`` into it."""
    from mmengine.config import Config
    if not osp.isfile(path):
        raise ToolError(f'Config file {path!r} not found (working directory: '
                        f'{os.getcwd()}); the configs are in configs/, e.g. '
                        f'configs/maskrcnn_restv2_t_coco.py.')
    if not path.endswith('.py'):
        raise ToolError(f'Config file {path!r} is not a .py file; pass an MM config such as '
                        f'configs/maskrcnn_restv2_t_coco.py.')
    try:
        with warnings.catch_warnings():  # mmengine imports pkg_resources again for each _base_
            warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
            cfg = Config.fromfile(path)
    except Exception as e:  # a syntax error or a missing _base_ file inside the config
        raise ToolError(f'Could not read config {path!r}: {type(e).__name__}: {e}') from None
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (TypeError, KeyError, ValueError) as e:  # e.g. keys under a None of the config
            raise ToolError(f'--cfg-options do not fit {path}: {e}'
                            f'{_replace_whole_hint(str(e), cfg_options)}') from None
    return cfg


def _replace_whole_hint(reason: str, cfg_options: dict) -> str:
    """For mmengine's refusal to merge keys into a setting of another type (``KEY=... in
    child config cannot inherit``, e.g. under ``init_cfg=None``): how ``_delete_=True``, which
    it suggests, is written on the command line for the options given."""
    match = re.match(r'(\w+)=', reason)
    if match is None or '_delete_' not in reason:
        return ''
    name = match.group(1)
    keys = sorted({'.'.join(parts[:parts.index(name) + 1])
                   for parts in (key.split('.') for key in cfg_options) if name in parts})
    if not keys:
        return ''
    return (f' On the command line, add {keys[0]}._delete_=True beside the keys under it '
            f'to replace it whole.')


def restv2_backbone_cfg(cfg, path: str = 'the config') -> dict:
    """``cfg.model.backbone``, or a :class:`ToolError` when the model has no ResTv2 backbone."""
    model = cfg.get('model')
    if not isinstance(model, dict):
        raise ToolError(f'{path} has no `model` dict; pass a detection or segmentation '
                        f'config whose model.backbone is type=\'ResTv2\'.')
    backbone = model.get('backbone')
    btype = backbone.get('type') if isinstance(backbone, dict) else None
    if not isinstance(btype, str) or btype.split('.')[-1] != 'ResTv2':
        raise ToolError(f'{path}: model.backbone.type is {btype!r}, not \'ResTv2\'. These '
                        f'tools analyse ResTv2 models; use one of the configs in configs/ or '
                        f'set model.backbone=dict(type=\'ResTv2\', arch=...).')
    return backbone


def toolbox_of(cfg, path: str = 'the config') -> str:
    """'mmdet' or 'mmseg': the config's ``default_scope``, or else what its model type says."""
    scope = cfg.get('default_scope')
    if scope in TOOLBOXES:
        return scope
    model_type = str((cfg.get('model') or {}).get('type', ''))
    if model_type.split('.')[0] in TOOLBOXES:
        return model_type.split('.')[0]
    if 'EncoderDecoder' in model_type:
        return 'mmseg'
    if model_type and scope is None:
        return 'mmdet'
    raise ToolError(f'Cannot tell whether {path} is for mmdet or mmseg (default_scope='
                    f'{scope!r}); configs inherit default_scope from mmdet::_base_/'
                    f'default_runtime.py or mmseg::_base_/default_runtime.py, or set '
                    f'default_scope=\'mmdet\' or \'mmseg\' in it.')


def build_model(cfg, device: str = 'cpu') -> nn.Module:
    """The whole detector or segmentor of ``cfg`` (random weights, eval mode)."""
    from mmengine.registry import init_default_scope

    from ..registry import register_all
    register_all()
    scope = toolbox_of(cfg)
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model_cfg = cfg.model.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)  # no pretrained download
    return MODELS.build(model_cfg).to(device).eval()


def build_backbone(cfg, checkpoint: Optional[str] = None, device: str = 'cpu') -> ResTv2:
    """The ResTv2 of ``cfg.model.backbone``, with the backbone weights of ``checkpoint``."""
    kwargs = dict(restv2_backbone_cfg(cfg))
    kwargs.pop('type')
    kwargs['init_cfg'] = None
    try:
        backbone = ResTv2(**kwargs)
    except (TypeError, ValueError) as e:
        raise ToolError(f'model.backbone of the config does not build: {e}') from None
    backbone.init_weights()
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint)
    return backbone.to(device).eval()


def read_checkpoint_file(path: str) -> dict:
    """A checkpoint read with the weights-only loader; unreadable files give a ToolError."""
    from ..checkpoint import read_checkpoint
    check_file(path, 'Checkpoint')
    try:
        checkpoint = read_checkpoint(path)
    except Exception as e:  # not a torch file, or an object the weights-only loader refuses
        first_line = str(e).splitlines()[0] if str(e) else ''
        raise ToolError(f'Cannot read checkpoint {path!r}: it is not a torch checkpoint '
                        f'that the weights-only loader accepts ({type(e).__name__}: '
                        f'{first_line}).') from None
    if not isinstance(checkpoint, dict):
        raise ToolError(f'{path!r} holds a {type(checkpoint).__name__}, not a checkpoint '
                        f'dict.')
    return checkpoint


def load_backbone_weights(backbone: ResTv2, checkpoint: str) -> dict:
    """Load a checkpoint of any layout into ``backbone``; errors become :class:`ToolError`."""
    from ..checkpoint import load_backbone
    check_file(checkpoint, 'Checkpoint')
    try:
        report = load_backbone(backbone, checkpoint)
    except Exception as e:  # unreadable file, wrong arch
        raise ToolError(f'Could not load {checkpoint!r}: {e}') from None
    loaded = len(backbone.state_dict()) - len(report['missing']) - len(report['kept_init'])
    if loaded <= 0:
        raise ToolError(f'{checkpoint!r} holds no ResTv2 backbone weights (nothing matched '
                        f'the backbone\'s keys); is it a checkpoint of this model?')
    return report



def model_state(model: nn.Module, checkpoint: dict, path: str) -> dict:
    """The state_dict of a whole-model checkpoint, ``module.`` prefixes stripped, checked to
    fit ``model`` (a :class:`ToolError` names the mismatched shapes)."""
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, dict):
        raise ToolError(f'{path!r} holds no state_dict.')
    state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    own = model.state_dict()
    bad = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
           if k in own and hasattr(v, 'shape') and v.shape != own[k].shape]
    if bad:
        raise ToolError(f'{path!r} does not fit the model of the config (shape mismatch: '
                        f'{"; ".join(bad[:3])}); pass the config it was trained with.')
    return state
