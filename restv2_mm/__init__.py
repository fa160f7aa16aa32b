"""restv2_mm: the ResTv2 backbone for mmdet 3.x and mmseg 1.x."""
from .checkpoint import (UnsafeCheckpointError, checkpoint_globals, extract_backbone_state,
                         load_backbone, register_checkpoint_loaders)
from .registry import register_all
from .models import EMSAv2, ResTv2
from .version import __version__

register_checkpoint_loaders()
register_all()

__all__ = ['ResTv2', 'EMSAv2', 'load_backbone', 'extract_backbone_state',
           'checkpoint_globals', 'UnsafeCheckpointError', '__version__']
