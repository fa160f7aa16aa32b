"""Reading ResTv2 weights: the authors' ImageNet files and OpenMMLab checkpoints.

Files are read with torch's weights-only unpickler (``torch.load``'s default since torch 2.6).
Besides tensors and plain containers, these files reference a few globals, which are allowed
only while a checkpoint is being read (:func:`checkpoint_globals`), never for the rest of the
process:

- ``argparse.Namespace``: the training arguments in the authors' files;
- mmengine's ``HistoryBuffer`` (the message hub's logs in a Runner checkpoint), with the
  numpy arrays and scalars it holds;
- ``getattr``, through which a pickled ``HistoryBuffer`` names its statistics methods
  (``getattr(HistoryBuffer, 'mean')``): narrowed to exactly those lookups.

``import restv2_mm`` registers the local-path and http(s) loaders of mmengine's
``CheckpointLoader`` again, wrapped in that allowance (:func:`register_checkpoint_loaders`),
so that the Runner's ``load_from`` and ``resume``, and mmdet's and mmseg's own tools, read
Runner checkpoints and the authors' files while every other ``torch.load`` in the program
keeps torch's own allowlist.
"""
import argparse
import contextlib
import functools
import os
import os.path as osp
import pickle
import re
from collections import OrderedDict
from typing import Callable, Dict, Iterator, Optional

import numpy as np
import torch
from mmengine.logging import print_log

OFFICIAL_CHECKPOINTS_HINT = (
    'The authors\' ImageNet-1k checkpoints (restv2_{tiny,small,base,large}_{224,384}.pth) '
    'are linked from the ResTv2 repository (github.com/wofmanaf/ResT); download the one for '
    'your arch into checkpoints/.')


def from_scratch_hint(key: str = 'model.backbone.init_cfg') -> str:
    """How to go without the pretrained weights that ``key`` of the config names."""
    return f'To train from scratch instead, pass --cfg-options {key}=None.'

# Keys of the authors' classification model that a backbone does not use.
CLASSIFIER_KEYS = re.compile(r'^(head\.|norm\.(weight|bias)$)')
# Backbone keys that a classification checkpoint does not have: the dense-prediction output
# norms and CWin's cross-window convs keep their initialisation.
DENSE_ONLY_KEYS = re.compile(r'^(norm\d+\.|cross_window_convs\.)')

# The statistics mmengine's HistoryBuffer registers for itself (_set_default_statistics).
# A checkpoint pickles them by name, as getattr(HistoryBuffer, name).
HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references something that the weights-only reading does not allow."""


def history_buffer_statistic(owner: type, name: str) -> Callable:
    """``getattr`` as a checkpoint may call it: one of HistoryBuffer's statistics, no more.

    Stands in for ``builtins.getattr`` while a checkpoint is read, so that a file cannot use
    it to reach any other attribute of any other object.
    """
    from mmengine.logging import HistoryBuffer
    if owner is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    owner_name = getattr(owner, '__qualname__', type(owner).__name__)
    raise UnsafeCheckpointError(
        f'the file calls getattr({owner_name}, {name!r}); a checkpoint may use getattr only '
        f'for the statistics of mmengine\'s HistoryBuffer '
        f'({", ".join(HISTORY_BUFFER_STATISTICS)})')


def _numpy_safe_globals() -> list:
    """The numpy callables and types that pickled arrays and scalars reference."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    dtype_types = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                                np.int32, np.uint8, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype,
            *dtype_types]


def checkpoint_safe_globals() -> list:
    """What ResTv2 and mmengine checkpoints need beyond torch's weights-only allowlist.

    The set is what ``torch.serialization.get_unsafe_globals_in_checkpoint`` reports for the
    authors' files and for the checkpoints mmengine's Runner saves (mmdet and mmseg; AMP adds
    only the loss scaler's plain numbers). ``getattr`` is :func:`history_buffer_statistic`
    under getattr's name.
    """
    from mmengine.logging import HistoryBuffer
    return [argparse.Namespace, HistoryBuffer, (history_buffer_statistic, 'builtins.getattr'),
            *_numpy_safe_globals()]


@contextlib.contextmanager
def checkpoint_globals() -> Iterator[None]:
    """Allow :func:`checkpoint_safe_globals` in weights-only loads inside the ``with`` block.

    On leaving, torch's allowlist is as it was before, also when the load failed; entries the
    program had allowed itself stay. Nested blocks are fine. Torch keeps one allowlist for the
    process, so a load in another thread during the block sees the allowance too.
    """
    present = torch.serialization.get_safe_globals()
    missing = [g for g in checkpoint_safe_globals() if g not in present]
    with torch.serialization.safe_globals(missing):
        yield


@contextlib.contextmanager
def _reading(filename: str) -> Iterator[None]:
    """:func:`checkpoint_globals`, and a one-line error naming the file if it is refused."""
    with checkpoint_globals():
        try:
            yield
        except UnsafeCheckpointError:
            raise
        except pickle.UnpicklingError as e:
            # torch.load re-raises the unpickler's short message inside a long preamble
            inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
            lines = str(inner).strip().splitlines() or [type(inner).__name__]
            raise UnsafeCheckpointError(
                f'{filename} cannot be read with the weights-only loader: '
                f'{lines[0].rstrip(".")}. Only '
                f'tensors, plain containers and numbers, argparse.Namespace (the authors\' '
                f'files) and mmengine\'s HistoryBuffer with its numpy arrays (Runner '
                f'checkpoints) are allowed. If you trust the file, load it with '
                f'torch.load(..., weights_only=False) and torch.save() its state_dict '
                f'alone.') from None


def _read_under_checkpoint_globals(loader: Callable) -> Callable:
    """``loader`` (a ``CheckpointLoader`` scheme) run under :func:`checkpoint_globals`."""

    @functools.wraps(loader)  # keeps the name mmengine logs ("by local backend")
    def read(filename, map_location=None):
        with _reading(filename):
            return loader(filename, map_location)

    return read


def register_checkpoint_loaders() -> None:
    """Make mmengine's ``CheckpointLoader`` read local paths and URLs under the allowance.

    Every ``CheckpointLoader.load_checkpoint`` of such a path (the Runner's ``load_from`` and
    ``resume``, ``init_cfg=dict(type='Pretrained')``) then reads Runner checkpoints and the
    authors' files; mmengine's loaders do the reading, unchanged.
    """
    from mmengine.runner import CheckpointLoader
    from mmengine.runner.checkpoint import load_from_http, load_from_local
    CheckpointLoader.register_scheme(
        '', _read_under_checkpoint_globals(load_from_local), force=True)
    CheckpointLoader.register_scheme(
        ('http://', 'https://'), _read_under_checkpoint_globals(load_from_http), force=True)


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
                                f'{os.getcwd()}). {OFFICIAL_CHECKPOINTS_HINT} '
                                f'{from_scratch_hint()}')
    from mmengine.runner import CheckpointLoader
    with _reading(filename):  # whichever loader mmengine picks for this path
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
