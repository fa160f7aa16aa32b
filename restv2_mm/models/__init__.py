"""The ResTv2 network and the layers it is built from."""
from .attention import ATTN_IMPLS
from .restv2 import (ATTN_STYLES, MIN_INPUT_SIZE, PA, Block, ConvStem, CrossWindowConv,
                     EMSAv2, Mlp, PatchEmbed, ResTv2)

__all__ = ['ResTv2', 'EMSAv2', 'Block', 'Mlp', 'PA', 'ConvStem', 'PatchEmbed',
           'CrossWindowConv', 'ATTN_STYLES', 'ATTN_IMPLS', 'MIN_INPUT_SIZE']
