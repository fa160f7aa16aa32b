"""restv2_mm: the ResTv2 backbone for mmdet 3.x and mmseg 1.x."""
from .checkpoint import extract_backbone_state, load_backbone, register_safe_globals
from .registry import register_all
from .models import EMSAv2, ResTv2
from .version import __version__

register_safe_globals()
register_all()

__all__ = ['ResTv2', 'EMSAv2', 'load_backbone', 'extract_backbone_state',
           'register_safe_globals', '__version__']
