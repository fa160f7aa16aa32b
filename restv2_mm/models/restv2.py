"""ResTv2, the network of "ResT V2: Simpler, Faster and Stronger" (NeurIPS 2022).

A four-stage hierarchical transformer whose attention, EMSAv2, attends from every token to a
depth-wise-convolution reduced map and adds back an upsample branch (depth-wise conv +
PixelShuffle on the values) that restores the detail the reduction removes.

The layers are plain ``torch.nn`` modules with the parameter names of the authors' ImageNet
checkpoints, so those files load unchanged. Besides the default ``'global'`` attention, the
backbone offers the window styles the paper measures for detection (Table 3): ``'win'``,
``'cwin'`` and ``'hwin'``. The speed machinery lives beside this file: the attention kernels
(``attention.py``), the window index tables (``windows.py``), the layers that reuse half
weights under autocast (``half_weights.py``), the parts of a block whose backward computes
cheap tensors again (``recompute.py``) and Triton kernels for inference (``fast_norm.py``,
``fast_windows.py``).
"""
import contextlib
import functools
import logging
import math
from typing import ContextManager, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mmengine.logging import print_log
from mmengine.model import BaseModule

from . import fast_windows
from .attention import ATTENTION_KERNELS, ATTN_IMPLS, query_chunks
from .cuda_graphs import GraphCache, TrainGraphCache
from .half_weights import (Conv2d, HalfWeights, LayerNorm, Linear, autocast_dtype,
                           shared_half_copies)
from .recompute import norm_add_linear, norm_mlp
from .windows import keep_tables_read, recording_graph, window_key_mask, window_layout

ATTN_STYLES = ('global', 'win', 'cwin', 'hwin')
MIN_INPUT_SIZE = 32


def as_nchw(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Tokens B, N, C -> a B, C, H, W view in channels-last memory (no copy)."""
    return x.unflatten(1, (H, W)).permute(0, 3, 1, 2)


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """B, C, H, W -> B, N, C (a view when x is channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability p."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0. or not self.training:
            return x
        return x * self._scale(x)

    def residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + self(branch)`` in one kernel (addcmul) where samples may be dropped."""
        if self.drop_prob == 0. or not self.training:
            return x + branch
        return torch.addcmul(x, branch, self._drawn_scale(branch))

    def _drawn_scale(self, branch: torch.Tensor) -> torch.Tensor:
        """The next scale :meth:`drawn_together` drew for this module, or a new draw."""
        drawn = self.__dict__.get('_drawn')
        scale = None if drawn is None else next(drawn, None)
        if scale is None or scale.dtype != branch.dtype or scale.dim() != branch.dim():
            return self._scale(branch)
        return scale

    @staticmethod
    @contextlib.contextmanager
    def drawn_together(modules: Sequence['DropPath'], keep: torch.Tensor, calls: int,
                       batch: int, dtype: torch.dtype) -> Iterator[None]:
        """Within the block, each of ``modules`` takes its first ``calls`` scales of B x 1 x 1
        from one draw made for all of them: two kernels where each call would launch its
        own two. ``keep``: their keep probabilities, float32, len(modules) x 1 x 1."""
        n = len(modules)
        scales = torch.bernoulli(keep.expand(n, calls, batch)).div_(keep).to(dtype)
        scales = scales.view(n * calls, batch, 1, 1).unbind(0)
        for i, m in enumerate(modules):
            m.__dict__['_drawn'] = iter(scales[i * calls:(i + 1) * calls])
        try:
            yield
        finally:
            for m in modules:
                m.__dict__.pop('_drawn', None)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample: 0 (dropped) or 1 / keep probability, in x's dtype."""
        keep = 1 - self.drop_prob
        return x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


class PA(nn.Module):
    """Pixel attention, ResTv2's positional encoding: x * sigmoid(dwconv3x3(x))."""

    def __init__(self, dim: int):
        super().__init__()
        self.pa_conv = Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        return x * torch.sigmoid(self.pa_conv(x))


class ConvStem(nn.Module):
    """Two stride-2 3x3 convs with BN-ReLU, a 1x1 conv, PA and LayerNorm (stride 4).

    B, C_in, H, W -> tokens B, ceil(H/4) * ceil(W/4), C and the map size.
    """

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        hidden = embed_dim // 2
        self.proj = nn.Sequential(
            Conv2d(in_channels, hidden, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            Conv2d(hidden, embed_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
            Conv2d(embed_dim, embed_dim, 1),
        )
        self.pos = PA(embed_dim)
        self.norm = LayerNorm(embed_dim)

    def forward(self, x):
        x = self.pos(self.proj(x))
        H, W = x.shape[2:]
        return self.norm(as_tokens(x)), (H, W)


class PatchEmbed(nn.Module):
    """Downsampling between stages: 3x3 conv stride 2, PA, LayerNorm.

    B, C_in, H, W -> tokens B, ceil(H/2) * ceil(W/2), C_out and the map size.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.pos = PA(out_dim)
        self.norm = LayerNorm(out_dim)

    def forward(self, x):
        x = self.pos(self.proj(x))
        H, W = x.shape[2:]
        return self.norm(as_tokens(x)), (H, W)


def _hooked(modules, backward: bool = False) -> bool:
    """Whether a forward hook, global or on one of ``modules`` (a FLOP counter, a feature
    probe), waits for them to be called; with ``backward``, a backward hook too."""
    from torch.nn.modules import module as nn_module
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               or (backward and (m._backward_hooks or m._backward_pre_hooks))
               for m in modules)


def _keeps_less(modules: Sequence[nn.Module], x: torch.Tensor, *weights) -> bool:
    """Whether a call through ``modules`` may keep fewer tensors for the backward (see
    :mod:`restv2_mm.models.recompute`): when a backward is to come (x or one of ``weights``
    requires gradients), no hook (a FLOP counter, a feature probe) waits on one of the
    modules being called, and no graph is traced."""
    return (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
            and not recording_graph() and not _hooked(modules))


def _compute_in(x: torch.Tensor, *layers) -> bool:
    """Whether ``layers`` are all ``half_weights`` layers (not replaced since) computing in
    x's dtype: autocast's half dtype under autocast, their weights' own outside it."""
    if not all(isinstance(m, HalfWeights) for m in layers):
        return False
    dtype = autocast_dtype(x)
    if dtype is not None:
        return x.dtype == dtype
    return all(m.weight.dtype == x.dtype for m in layers)


def _norm_params(norm: LayerNorm, x: torch.Tensor) -> tuple:
    """(weight, bias, eps) with which ``norm`` normalises x."""
    return (*norm.params_for(x), norm.eps)


class Mlp(nn.Module):

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x):
        if self._recomputes(x):
            w1, b1 = self.fc1.params_for(x)
            return norm_mlp(x.to(w1.dtype), None, w1, b1, *self.fc2.params_for(x))
        return self.fc2(self.act(self.fc1(x)))

    def after_norm(self, norm: LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """``self(norm(x))``; in training the norm's output is not kept either, where no
        hook waits on the norm or this module."""
        if (self._recomputes(x) and not _hooked((self, norm))
                and _compute_in(x, norm, self.fc1, self.fc2)):
            return norm_mlp(x, _norm_params(norm, x), *self.fc1.params_for(x),
                            *self.fc2.params_for(x))
        return self(norm(x))

    def _recomputes(self, x: torch.Tensor) -> bool:
        """Whether this call keeps one hidden tensor for the backward instead of two (see
        :mod:`restv2_mm.models.recompute`): when there is a backward to come, and no hook
        waits on fc1, act or fc2 being called."""
        return (type(self.act) is nn.GELU and self.act.approximate == 'none'
                and isinstance(self.fc1, HalfWeights) and isinstance(self.fc2, HalfWeights)
                and _keeps_less((self.fc1, self.act, self.fc2), x, self.fc1.weight,
                                self.fc2.weight))


class EMSAv2(nn.Module):
    """Efficient multi-head self-attention v2.

    Queries come from all H x W tokens; keys and values from the map reduced by a depth-wise
    conv (kernel r+1, stride r, padding r//2, then LayerNorm) to ceil(H/r) x ceil(W/r). The
    values also feed the upsample branch ``up``: depth-wise 3x3 conv to r*r*C channels,
    PixelShuffle(r), cropped back to H x W, LayerNorm. Output: proj(attention + up).

    Args:
        dim: channels C.
        num_heads: heads h; C must be divisible by h.
        sr_ratio: reduction ratio r (1: no reduction).
        window_size: if given, attention runs in non-overlapping windows of this many tokens
            per side (the reduced map in windows of window_size / r cells); None: global.
        attn_impl: 'sdpa' (torch's fused kernel) or 'explicit' (softmax(QK^T)V).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 sr_ratio: int = 1,
                 window_size: Optional[int] = None,
                 attn_impl: str = 'sdpa'):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.window_size = window_size
        self.set_attn_impl(attn_impl)

        self.q = Linear(dim, dim)
        self.kv = Linear(dim, dim * 2)
        if sr_ratio > 1:
            self.sr = Conv2d(
                dim, dim, sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2, groups=dim)
            self.sr_norm = LayerNorm(dim)
        self.up = nn.Sequential(
            Conv2d(dim, sr_ratio * sr_ratio * dim, 3, padding=1, groups=dim))
        self.up_norm = LayerNorm(dim)
        self.proj = Linear(dim, dim)

    def set_attn_impl(self, attn_impl: str):
        if attn_impl not in ATTENTION_KERNELS:
            raise ValueError(f'attn_impl={attn_impl!r} is not one of {ATTN_IMPLS}.')
        self.attn_impl = attn_impl
        self.attend = ATTENTION_KERNELS[attn_impl]

    def extra_repr(self):
        return (f'num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, '
                f'window_size={self.window_size}, attn_impl={self.attn_impl}')

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        r = self.sr_ratio
        q = self.q(x)
        if r > 1:
            x = as_tokens(self.sr(as_nchw(x, H, W)))
            x = self.sr_norm(x)
        # ceil, written without floor-dividing a negative size: exporters turn that into
        # ONNX's Div, which rounds towards zero
        Hr, Wr = (H + r - 1) // r, (W + r - 1) // r
        kv = self.kv(x)  # B, Hr * Wr, 2C laid out as (2, h, d)
        if self.window_size is None:
            # one split for both users of v: a training step then adds v's gradients and
            # joins them to k's, where slicing v apart would zero-fill a gradient of all kv
            k, v = kv.chunk(2, dim=-1)
            out = self._global_attention(q, k, v)
        else:
            v = kv[..., C:]
            out = self._window_attention(q, kv, H, W, Hr, Wr)

        # upsample branch on the values: B, Hr*Wr, C -> B, r*Hr, r*Wr, C -> B, N, C
        up = self.up(as_nchw(v, Hr, Wr))  # channels-last, channel = c * r * r + i * r + j
        if r > 1:
            up = up.permute(0, 2, 3, 1).reshape(B, Hr, Wr, C, r, r)
            up = up.permute(0, 1, 4, 2, 5, 3).reshape(B, Hr * r, Wr * r, C)
            up = up[:, :H, :W].reshape(B, N, C)
        else:
            up = as_tokens(up)
        return self._project(out, up)

    def _project(self, out: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """proj(out + up_norm(up)); in training the sum is not kept for the backward (see
        :mod:`restv2_mm.models.recompute`), where no hook waits on up_norm or proj."""
        if (up.dtype == out.dtype and _compute_in(out, self.up_norm, self.proj)
                and _keeps_less((self.up_norm, self.proj), out, self.up_norm.weight,
                                self.proj.weight)):
            return norm_add_linear(out, up, _norm_params(self.up_norm, up),
                                   *self.proj.params_for(out))
        return self.proj(out + self.up_norm(up))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """B, N, C -> B, h, N, d."""
        return t.view(*t.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def _global_attention(self, q, k, v):
        B, N, C = q.shape
        chunks = query_chunks(self.attn_impl, q, B * self.num_heads, k.shape[1])
        if chunks > 1:  # each chunk of queries a batch entry, with its copy of k and v
            q = q.reshape(B * chunks, N // chunks, C)
            k, v = (t.unsqueeze(1).expand(B, chunks, *t.shape[1:]).flatten(0, 1) for t in (k, v))
        out = self.attend(self._heads(q), self._heads(k), self._heads(v))
        return out.transpose(1, 2).reshape(B, N, C)  # B, h, N, d -> B, N, C

    def _window_attention(self, q, kv, H, W, Hr, Wr):
        B, _, C = q.shape
        ws, wr = self.window_size, self.window_size // self.sr_ratio
        # B, N, C -> B * nW, ws * ws, C; the reduced map in the same windows, wr * wr cells each
        fast = fast_windows.can_use(q, kv)  # CUDA inference: Triton copies
        if fast:
            qw = fast_windows.to_windows(q, H, W, ws)
            kvw = fast_windows.to_windows(kv, Hr, Wr, wr)
        else:
            q_gather, q_scatter, _ = window_layout(H, W, ws, q.device)
            kv_gather = window_layout(Hr, Wr, wr, q.device)[0]
            qw = q.index_select(1, q_gather).view(-1, ws * ws, C)
            kvw = kv.index_select(1, kv_gather).view(-1, wr * wr, 2 * C)
        kw, vw = kvw.chunk(2, dim=-1)
        key_mask = window_key_mask(B, Hr, Wr, wr, q.device)
        out = self.attend(self._heads(qw), self._heads(kw), self._heads(vw), key_mask)
        if fast:
            return fast_windows.from_windows(out, B, H, W, ws)
        out = out.transpose(1, 2).reshape(B, -1, C)  # B * nW, h, S, d -> B, nW * S, C
        return out.index_select(1, q_scatter)  # padding cells dropped


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 sr_ratio: int = 1,
                 window_size: Optional[int] = None,
                 mlp_ratio: float = 4.,
                 drop_path: float = 0.,
                 attn_impl: str = 'sdpa'):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = EMSAv2(dim, num_heads, sr_ratio, window_size, attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H: int, W: int):
        x = self.drop_path.residual(x, self.attn(self.norm1(x), H, W))
        return self.drop_path.residual(x, self.mlp.after_norm(self.norm2, x))


class CrossWindowConv(nn.Module):
    """CWin's 7x7 depth-wise conv with a residual, letting windows exchange information.

    Zero-initialised, so a model loaded from a global/win checkpoint starts out as win.
    """

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.conv = Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x, H: int, W: int):
        return x + as_tokens(self.conv(as_nchw(x, H, W)))


# --------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------
def _warn_no_graph(switch: str, error: Exception):
    """What a graph cache calls once when a recording fails (as a picklable partial)."""
    first_line = str(error).splitlines()[0] if str(error) else ''
    print_log(f'ResTv2 {switch}: recording a CUDA graph failed ({type(error).__name__}: '
              f'{first_line}); inputs of this size run eagerly. {switch}=False turns the '
              f'recording off.', 'current', level=logging.WARNING)


class ResTv2(BaseModule):
    """ResTv2 backbone (ResT V2: Simpler, Faster and Stronger, NeurIPS 2022).

    Args:
        arch (str | dict): 'tiny', 'small', 'base', 'large' (or 't', 's', 'b', 'l'), or a
            dict with the lists ``embed_dims``, ``depths``, ``num_heads`` and
            ``sr_ratios``, one entry per stage. Default: 'tiny'.
        in_channels (int): input image channels. Default: 3.
        out_indices (Sequence[int]): stages to output, 0-3; negative indices count from the
            end. Default: (0, 1, 2, 3).
        drop_path_rate (float): stochastic depth rate, rising linearly over the blocks.
            Default: 0.
        attn_style (str): 'global' (every block attends over the whole map, as trained on
            ImageNet), 'win' (every block attends within windows), 'cwin' (win plus a 7x7
            depth-wise conv after each stage's last block) or 'hwin' (windows in all but the
            last block of each stage). All four load the same checkpoints. Default: 'global'.
        window_size (Sequence[int]): window side in tokens for each stage, used by the window
            styles; each must be a multiple of its stage's sr ratio. Default: (64, 32, 16, 8),
            8 x 8 reduced cells per window as in the paper.
        attn_impl (str): 'sdpa' (``F.scaled_dot_product_attention``) or 'explicit'
            (softmax(QK^T)V written out, for export and as a reference). Default: 'sdpa'.
        frozen_stages (int): -1 freezes nothing, 0 the stem, i the stem and stages 1..i with
            their patch embeddings and output norms. Frozen parts stay in eval mode.
            Default: -1.
        norm_eval (bool): keep BatchNorm layers in eval mode while training. Default: False.
        with_cp (bool): checkpoint each block's activations to save memory. Default: False.
        fast_inference (bool): on a CUDA input, in eval mode and without gradients, replay
            the forward as a CUDA graph recorded for that input's shape, dtype and autocast
            dtype (the first call at a new signature runs eagerly, the second records it);
            the outputs are fresh tensors each call. Training, gradients, CPU inputs,
            ``with_cp`` and tracing or exporting always run eagerly, and a recording that
            fails warns once and stays eager. See :mod:`restv2_mm.models.cuda_graphs`.
            Default: True.
        graph_cache_size (int): input signatures whose graphs are kept by
            ``fast_inference``; when full, the frequent ones stay (see
            :mod:`restv2_mm.models.cuda_graphs`). Default: 16.
        fast_training (bool): on a CUDA input, in train mode with gradients, replay the
            forward and its backward as two CUDA graphs recorded for that input's signature
            (as ``fast_inference``: eager the first time, recorded the second). For inputs
            of one size, as segmentation's fixed crops, or of a few frequent sizes, as
            detection's padded batches (the rarer sizes run eagerly). All recorded sizes
            share one set of gradient buffers and one pool for the activations. Gradients
            reach the parameters as autograd's would (accumulation included); drop path
            draws new samples at every replay. ``with_cp``, hooks on any submodule,
            SyncBN, inputs that require gradients and a second forward before the first's
            backward run eagerly. See :mod:`restv2_mm.models.cuda_graphs`. Default: False.
        train_graph_cache_size (int): input signatures whose graphs are kept by
            ``fast_training``; when full, the frequent ones stay. Default: 4.
        init_cfg (dict, optional): e.g. ``dict(type='Pretrained', checkpoint=PATH)``; the
            authors' ImageNet files load as they are (see :meth:`init_weights`).

    Output: a tuple with one ``B x C_i x H_i x W_i`` map per entry of ``out_indices``, each
    through its own channels-first LayerNorm. For an input of H x W (at least 32 x 32, any
    size) the stage maps are ``H_1 = ceil(H / 4)`` and ``H_{i+1} = ceil(H_i / 2)``, likewise
    for W: strides 4, 8, 16 and 32.

    Example:
        >>> import torch
        >>> from restv2_mm import ResTv2
        >>> model = ResTv2(arch='tiny').eval()
        >>> for out in model(torch.rand(1, 3, 225, 301)):
        ...     print(tuple(out.shape))
        (1, 96, 57, 76)
        (1, 192, 29, 38)
        (1, 384, 15, 19)
        (1, 768, 8, 10)
    """

    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {
            'embed_dims': [96, 192, 384, 768],
            'depths': [1, 2, 6, 2],
            'num_heads': [1, 2, 4, 8],
            'sr_ratios': [8, 4, 2, 1],
        }),
        **dict.fromkeys(['s', 'small'], {
            'embed_dims': [96, 192, 384, 768],
            'depths': [1, 2, 12, 2],
            'num_heads': [1, 2, 4, 8],
            'sr_ratios': [8, 4, 2, 1],
        }),
        **dict.fromkeys(['b', 'base'], {
            'embed_dims': [96, 192, 384, 768],
            'depths': [1, 3, 16, 3],
            'num_heads': [1, 2, 4, 8],
            'sr_ratios': [8, 4, 2, 1],
        }),
        **dict.fromkeys(['l', 'large'], {
            'embed_dims': [128, 256, 512, 1024],
            'depths': [2, 3, 16, 2],
            'num_heads': [2, 4, 8, 16],
            'sr_ratios': [8, 4, 2, 1],
        }),
    }  # paper Table 9
    arch_keys = ('embed_dims', 'depths', 'num_heads', 'sr_ratios')
    num_stages = 4

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.,
                 attn_style: str = 'global',
                 window_size: Sequence[int] = (64, 32, 16, 8),
                 attn_impl: str = 'sdpa',
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 fast_inference: bool = True,
                 graph_cache_size: int = 16,
                 fast_training: bool = False,
                 train_graph_cache_size: int = 4,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        arch = self._parse_arch(arch)
        self.embed_dims: List[int] = arch['embed_dims']
        self.depths: List[int] = arch['depths']
        self.num_heads: List[int] = arch['num_heads']
        self.sr_ratios: List[int] = arch['sr_ratios']
        self.in_channels = in_channels
        self.out_indices = self._parse_out_indices(out_indices)
        self.attn_style = attn_style
        self.window_size = self._parse_window_size(attn_style, window_size)
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl={attn_impl!r} is not one of {ATTN_IMPLS}.')
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages={frozen_stages!r} is out of range: use -1 '
                             f'(nothing), 0 (the stem) or 1..{self.num_stages} (the stem '
                             f'and stages 1..i).')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.fast_inference = fast_inference
        self.fast_training = fast_training
        self._graphs = GraphCache(
            graph_cache_size, on_failure=functools.partial(_warn_no_graph, 'fast_inference'),
            keep=keep_tables_read)
        self._train_graphs = TrainGraphCache(
            train_graph_cache_size, arg_name='train_graph_cache_size',
            on_failure=functools.partial(_warn_no_graph, 'fast_training'), keep=keep_tables_read)
        self._state_tensors: Optional[List[torch.Tensor]] = None  # see _tracked_tensors
        self._num_params = 0

        dims = self.embed_dims
        self.stem = ConvStem(in_channels, dims[0])
        for i in range(1, self.num_stages):
            self.add_module(f'patch_{i + 1}', PatchEmbed(dims[i - 1], dims[i]))

        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        for i in range(self.num_stages):
            first = sum(self.depths[:i])
            blocks = nn.ModuleList(
                Block(
                    dims[i],
                    self.num_heads[i],
                    self.sr_ratios[i],
                    window_size=self._block_window(i, j),
                    drop_path=dpr[first + j],
                    attn_impl=attn_impl) for j in range(self.depths[i]))
            self.add_module(f'stage{i + 1}', blocks)

        # the blocks' drop paths, two calls each a forward, drawn together in training
        self._drop_paths = [blk.drop_path for i in range(self.num_stages)
                            for blk in getattr(self, f'stage{i + 1}')]
        self._keep_made_for = tuple(dpr)  # the drop-path rates drop_path_keep was made for
        self.register_buffer(
            'drop_path_keep', torch.tensor([1 - r for r in dpr]).view(-1, 1, 1), persistent=False)

        if attn_style == 'cwin':
            self.cross_window_convs = nn.ModuleList(CrossWindowConv(d) for d in dims)

        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm(dims[i]))

        # What each output is, as timm's feature_info: channels and stride.
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f'stage{i + 1}')
            for i in self.out_indices
        ]
        self._freeze_stages()

    # ------------------------------------------------------------------ argument checks
    @classmethod
    def _parse_arch(cls, arch) -> dict:
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_zoo:
                raise ValueError(f'Unknown ResTv2 arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_zoo)} or pass a dict with the keys '
                                 f'{list(cls.arch_keys)}.')
            return {k: list(v) for k, v in cls.arch_zoo[key].items()}
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, not {type(arch).__name__}.')
        missing = [k for k in cls.arch_keys if k not in arch]
        if missing:
            raise ValueError(f'The arch dict {arch} lacks the keys {missing}; it needs '
                             f'{list(cls.arch_keys)}, one value per stage.')
        lengths = {k: len(arch[k]) for k in cls.arch_keys}
        if set(lengths.values()) != {cls.num_stages}:
            raise ValueError(f'The arch dict lists disagree in length: {lengths}; each needs '
                             f'{cls.num_stages} entries, one per stage.')
        for i, (c, h) in enumerate(zip(arch['embed_dims'], arch['num_heads'])):
            if c % h:
                raise ValueError(f'Stage {i + 1}: embed_dims {c} is not divisible by '
                                 f'num_heads {h}.')
        return {k: list(arch[k]) for k in cls.arch_keys}

    def _parse_out_indices(self, out_indices) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        parsed = []
        for i in out_indices:
            if not -self.num_stages <= i < self.num_stages:
                raise ValueError(f'out_indices entry {i} is out of range: ResTv2 has '
                                 f'{self.num_stages} stages, use 0..{self.num_stages - 1} '
                                 f'or -{self.num_stages}..-1.')
            parsed.append(i % self.num_stages)
        return tuple(sorted(set(parsed)))

    def _parse_window_size(self, attn_style, window_size) -> Tuple[int, ...]:
        if attn_style not in ATTN_STYLES:
            raise ValueError(f'Unknown attn_style {attn_style!r}; choose one of '
                             f'{ATTN_STYLES}.')
        if isinstance(window_size, int):
            window_size = [window_size] * self.num_stages
        window_size = tuple(window_size)
        if len(window_size) != self.num_stages:
            raise ValueError(f'window_size={window_size} has {len(window_size)} entries; '
                             f'give one per stage ({self.num_stages}), e.g. (64, 32, 16, 8).')
        for i, (ws, r) in enumerate(zip(window_size, self.sr_ratios)):
            if not isinstance(ws, int) or ws <= 0 or ws % r:
                raise ValueError(f'window_size[{i}]={ws!r} must be a positive multiple of '
                                 f'stage {i + 1}\'s sr ratio {r}, so that each window maps '
                                 f'onto whole cells of the reduced map.')
        return window_size

    def _block_window(self, stage: int, block: int) -> Optional[int]:
        """The window of a block, or None where it attends globally."""
        if self.attn_style == 'global':
            return None
        if self.attn_style == 'hwin' and block == self.depths[stage] - 1:
            return None
        return self.window_size[stage]

    # ------------------------------------------------------------------ switches
    def set_attn_impl(self, attn_impl: str):
        """Switch every EMSAv2 between 'sdpa' and 'explicit' attention."""
        for m in self.modules():
            if isinstance(m, EMSAv2):
                m.set_attn_impl(attn_impl)
        self._graphs.clear()
        self._train_graphs.clear()

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        frozen = [self.stem]
        for i in range(1, self.frozen_stages + 1):
            if i > 1:
                frozen.append(getattr(self, f'patch_{i}'))
            frozen.append(getattr(self, f'stage{i}'))
            if hasattr(self, 'cross_window_convs'):
                frozen.append(self.cross_window_convs[i - 1])
            if i - 1 in self.out_indices:
                frozen.append(getattr(self, f'norm{i - 1}'))
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._state_tensors = None
        # the other mode's graphs are idle from now on (inference ones go stale at the first
        # optimizer step): their memory goes back, so validation amid training never holds
        # both pools
        (self._graphs if mode else self._train_graphs).clear()
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ weights
    def init_weights(self):
        """Random init as the authors' training, or load ``init_cfg=dict(type='Pretrained')``.

        A pretrained file may be an authors' ImageNet checkpoint (state_dict under 'model',
        with classifier 'head' and final 'norm'), an OpenMMLab checkpoint ('state_dict', keys
        under 'backbone.') or a bare state_dict; see :func:`restv2_mm.checkpoint.load_backbone`.
        """
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            from ..checkpoint import load_backbone
            self._init_random()
            load_backbone(self, self.init_cfg['checkpoint'],
                          prefix=self.init_cfg.get('prefix'))
            self._is_init = True
            return
        if self.init_cfg is None:
            self._init_random()
            self._is_init = True
            return
        super().init_weights()

    def _init_random(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, CrossWindowConv):
                nn.init.zeros_(m.conv.weight)
                nn.init.zeros_(m.conv.bias)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'ResTv2 expects a 4-D B x C x H x W tensor, got {shape}.')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'ResTv2 was built with in_channels={self.in_channels} but the '
                             f'input has {x.shape[1]} channels (shape {tuple(x.shape)}); set '
                             f'in_channels={x.shape[1]} or fix the data pipeline.')
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise ValueError(f'ResTv2 needs inputs of at least {MIN_INPUT_SIZE} x '
                             f'{MIN_INPUT_SIZE} pixels, got {x.shape[2]} x {x.shape[3]}; '
                             f'resize or pad the image.')

    def _run_blocks(self, blocks: nn.ModuleList, x, H: int, W: int):
        for blk in blocks:
            if self.with_cp and x.requires_grad:
                x = checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
        return x

    def _replays(self, x: torch.Tensor) -> bool:
        """Whether this call goes through the CUDA graphs of ``fast_inference``."""
        return (self.fast_inference and x.is_cuda and not self.training
                and not torch.is_grad_enabled() and not self.with_cp
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
                and not torch.onnx.is_in_onnx_export()
                and not torch.cuda.is_current_stream_capturing())

    def _trains_from_graph(self, x: torch.Tensor) -> bool:
        """Whether this call goes through the CUDA graphs of ``fast_training``."""
        return (self.fast_training and x.is_cuda and self.training
                and torch.is_grad_enabled() and not x.requires_grad and not self.with_cp
                and not recording_graph() and not torch.onnx.is_in_onnx_export()
                and not torch.cuda.is_current_stream_capturing()
                and not self._runs_only_eagerly())

    def _runs_only_eagerly(self) -> bool:
        """Hooks (a FLOP counter, a feature probe) must see their modules called, and
        SyncBN (torch's or mmcv's, after mmengine's ``sync_bn``) communicates between
        processes: neither can be replayed."""
        modules = list(self.modules())
        return (_hooked(modules, backward=True)
                or any(type(m).__name__ == 'SyncBatchNorm' for m in modules))

    def _train_graph_state(self) -> tuple:
        """What ``fast_training``'s graphs depend on besides the input: where the weights
        and buffers are and which weights train (not their versions: the optimizer updates
        them in place), the drop-path rates and each module's train/eval mode."""
        tensors = self._tracked_tensors()
        return (tuple((t.data_ptr(), t.requires_grad) for t in tensors),
                tuple((m.training, m.drop_prob) if isinstance(m, DropPath) else m.training
                      for m in self.modules()))

    def _half_dtype_for_training(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The half dtype in which one cast serves all weights of this forward (see
        :func:`~restv2_mm.models.half_weights.shared_half_copies`): autocast's, on CUDA with
        gradients on; None where each layer casts on its own (on the CPU the extra copy of
        the weights costs more than the launches it saves)."""
        if not x.is_cuda or not torch.is_grad_enabled() or self.with_cp or recording_graph():
            return None
        dtype = autocast_dtype(x)
        return dtype if dtype in (torch.float16, torch.bfloat16) else None

    def _graph_state(self) -> tuple:
        """What the recorded graphs read besides the input: weights and buffers, by address
        and version (in-place updates, ``load_state_dict`` and ``.to()`` all change it).

        The list of tensors is gathered again after ``train()``/``eval()`` and ``.to()``;
        a model whose submodules are replaced in eval mode needs an ``eval()`` call after.
        """
        return tuple((t.data_ptr(), t._version) for t in self._tracked_tensors())

    def _tracked_tensors(self, params_only: bool = False) -> List[torch.Tensor]:
        """Parameters, then buffers (or the parameters alone); gathered again after
        ``train()``, ``eval()`` and ``.to()``."""
        if self._state_tensors is None:
            params = list(self.parameters())
            self._state_tensors = params + list(self.buffers())
            self._num_params = len(params)
        return self._state_tensors[:self._num_params] if params_only else self._state_tensors

    def _apply(self, fn, *args, **kwargs):
        self._state_tensors = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        if self._replays(x):
            return self._graphs(self._forward, x, self._graph_state())
        if self._trains_from_graph(x):
            first = self._train_graphs.captures == 0
            outs = self._train_graphs(self._eager_forward, x, self._train_graph_state(),
                                      self._tracked_tensors(params_only=True), self)
            if first and self._train_graphs.captures:
                print_log(f'ResTv2 fast_training: training passes at input size '
                          f'{tuple(x.shape)} now replay as CUDA graphs.', 'current')
            return outs
        return self._eager_forward(x)

    def _eager_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        half = self._half_dtype_for_training(x)
        with self._drop_paths_drawn(x):
            if half is not None:
                with shared_half_copies(self, half):
                    return self._forward(x)
            return self._forward(x)

    def _drop_paths_drawn(self, x: torch.Tensor) -> ContextManager:
        """In training, the blocks' drop paths draw their samples at once (see
        :meth:`DropPath.drawn_together`); not with ``with_cp``, whose blocks draw again
        when they are recomputed, nor while a graph is traced or exported."""
        if (not self.training or self.with_cp or recording_graph()
                or not any(m.training and m.drop_prob > 0 for m in self._drop_paths)):
            return contextlib.nullcontext()
        rates = tuple(m.drop_prob for m in self._drop_paths)
        if rates != self._keep_made_for:  # set up, or the rates were changed
            keep = torch.tensor([1 - r for r in rates], dtype=torch.float32)
            self.drop_path_keep.copy_(keep.view_as(self.drop_path_keep))
            self._keep_made_for = rates
        dtype = autocast_dtype(x) or x.dtype  # the dtype of the blocks' tokens
        return DropPath.drawn_together(self._drop_paths, self.drop_path_keep, 2, x.shape[0],
                                       dtype)

    def _forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        B = x.shape[0]
        if x.is_cuda:  # cuDNN's NHWC kernels; token views of conv outputs need no copy
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for i in range(self.num_stages):
            if i == 0:
                x, (H, W) = self.stem(x)
            else:
                x, (H, W) = getattr(self, f'patch_{i + 1}')(x)
            x = self._run_blocks(getattr(self, f'stage{i + 1}'), x, H, W)
            if self.attn_style == 'cwin':
                x = self.cross_window_convs[i](x, H, W)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(out.view(B, H, W, -1).permute(0, 3, 1, 2).contiguous())
            if i < self.num_stages - 1:
                x = as_nchw(x, H, W)  # B, N, C -> B, C, H, W (channels-last view)
        return tuple(outs)
