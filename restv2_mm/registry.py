"""Registration into the OpenMMLab registries: ``ResTv2`` into the model registries of
whichever toolboxes are installed, the optimizer constructor into mmengine's own (which
every toolbox's scope falls back to)."""
import importlib
from typing import List

from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from .engine import MergedGroupsOptimWrapperConstructor
from .models import ResTv2

TOOLBOX_REGISTRIES = ('mmdet.registry', 'mmseg.registry')


def register_all() -> List[str]:
    """Register ``ResTv2`` in mmdet's and mmseg's ``MODELS``; returns the toolboxes done.

    A toolbox that is not installed is skipped, so either one alone is enough.
    """
    OPTIM_WRAPPER_CONSTRUCTORS.register_module(
        name='MergedGroupsOptimWrapperConstructor', module=MergedGroupsOptimWrapperConstructor,
        force=True)
    done = []
    for name in TOOLBOX_REGISTRIES:
        try:
            registry = importlib.import_module(name)
        except ImportError:
            continue
        registry.MODELS.register_module(name='ResTv2', module=ResTv2, force=True)
        done.append(name.split('.')[0])
    return done
