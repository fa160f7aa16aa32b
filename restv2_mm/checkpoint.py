"""Reading ResTv2 weights: the authors' ImageNet files and OpenMMLab checkpoints.

Files are read with torch's weights-only unpickler. The few non-tensor types these files
hold (``argparse.Namespace`` in the authors' files; mmengine's ``HistoryBuffer`` and numpy
arrays and scalars in the checkpoints mmengine saves) are registered as safe by
:func:`register_safe_globals`, which ``import restv2_mm`` calls; nothing else is allowed.
"""
import argparse
import os
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.logging import print_log

OFFICIAL_CHECKPOINTS_HINT = (
    'The authors\' ImageNet-1k checkpoints (restv2_{tiny,small,base,large}_{224,384}.pth) '
    'are linked from the ResTv2 repository (github.com/wofmanaf/ResT); download the one for '
    'your arch into checkpoints/. To train from scratch instead, pass '
    '--cfg-options model.backbone.init_cfg=None.')

# Keys of the authors' classification model that a backbone does not use.
CLASSIFIER_KEYS = re.compile(r'^(head\.|norm\.(weight|bias)$)')
# Backbone keys that a classification checkpoint does not have: the dense-prediction output
# norms and CWin's cross-window convs keep their initialisation.
DENSE_ONLY_KEYS = re.compile(r'^(norm\d+\.|cross_window_convs\.)')


def _numpy_safe_globals():
    """The numpy callables and types that pickled arrays and scalars reference."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    dtype_types = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                                np.int32, np.uint8, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *dtype_types]


def register_safe_globals():
    """Allow the types found in ResTv2 and mmengine checkpoints in ``torch.load``.

    The set is what ``torch.serialization.get_unsafe_globals_in_checkpoint`` reports for
    the authors' files and for the checkpoints mmengine's Runner saves (mmdet and mmseg;
    AMP adds only the loss scaler's plain numbers): ``argparse.Namespace``; mmengine's
    ``HistoryBuffer`` (the message hub's logs) with the numpy arrays and scalars it holds;
    and ``getattr``, through which a pickled ``HistoryBuffer`` names its statistics
    methods (``getattr(HistoryBuffer, 'mean')``). ``getattr`` only looks an attribute up: the
    weights-only unpickler still refuses to call anything outside this list.
    """
    from mmengine.logging import HistoryBuffer
    torch.serialization.add_safe_globals(
        [argparse.Namespace, HistoryBuffer, getattr, *_numpy_safe_globals()])


def extract_backbone_state(checkpoint: dict, prefix: Optional[str] = None) -> 'OrderedDict':
    """The backbone state_dict inside any of the checkpoint layouts we meet.

    Unwraps 'model' (the authors' files) or 'state_dict' (OpenMMLab), strips a 'module.'
    prefix, keeps only the keys under ``prefix`` (default: 'backbone.' when such keys exist)
    and drops the classifier's 'head' and final 'norm'.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'A checkpoint must hold a dict, got {type(checkpoint).__name__}.')
    for key in ('model', 'state_dict'):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    state = OrderedDict((re.sub(r'^module\.', '', k), v) for k, v in checkpoint.items())
    if prefix is None and any(k.startswith('backbone.') for k in state):
        prefix = 'backbone.'
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = OrderedDict((k[len(prefix):], v) for k, v in state.items()
                            if k.startswith(prefix))
    return OrderedDict((k, v) for k, v in state.items() if not CLASSIFIER_KEYS.match(k))


def read_checkpoint(filename: str) -> dict:
    """Read a checkpoint (local path or URL) with the weights-only loader."""
    is_remote = re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', filename) is not None
    if not is_remote and not osp.isfile(filename):
        raise FileNotFoundError(f'Checkpoint {filename!r} not found (working directory: '
                                f'{os.getcwd()}). {OFFICIAL_CHECKPOINTS_HINT}')
    from mmengine.runner import CheckpointLoader
    register_safe_globals()
    return CheckpointLoader.load_checkpoint(filename, map_location='cpu')


def load_backbone(model: torch.nn.Module,
                  filename: str,
                  prefix: Optional[str] = None,
                  logger: str = 'current') -> Dict[str, list]:
    """Load ResTv2 weights from ``filename`` into ``model`` and report what did not match.

    Returns a dict with the lists 'missing', 'unexpected' and 'kept_init' (dense-only
    layers that the file has no weights for).
    """
    state = extract_backbone_state(read_checkpoint(filename), prefix)
    own = model.state_dict()
    bad_shapes = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shapes:
        raise ValueError(f'{filename} does not fit this ResTv2 (arch {model.embed_dims}, '
                         f'depths {model.depths}): ' + '; '.join(bad_shapes[:5]) +
                         (' ...' if len(bad_shapes) > 5 else '') +
                         '. Is the checkpoint for another arch?')
    missing, unexpected = model.load_state_dict(state, strict=False)
    kept_init = [k for k in missing if DENSE_ONLY_KEYS.match(k)]
    missing = [k for k in missing if not DENSE_ONLY_KEYS.match(k)]
    print_log(f'Loaded ResTv2 weights from {filename} ({len(state)} tensors).', logger)
    if kept_init:
        print_log('Initialised here, not in the file: ' +
                  ', '.join(sorted({k.rsplit('.', 1)[0] for k in kept_init})), logger)
    if missing:
        print_log(f'Missing in {filename}: {", ".join(missing)}', logger, level=30)
    if unexpected:
        print_log(f'Unexpected in {filename}: {", ".join(unexpected)}', logger, level=30)
    return dict(missing=missing, unexpected=unexpected, kept_init=kept_init)
