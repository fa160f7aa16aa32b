"""Attention kernels: one switch between PyTorch's fused kernel and the explicit math.

Both take q: B, h, Nq, d; k, v: B, h, Nk, d; and an optional bool ``key_mask`` (True = a
real key) broadcastable to B, h, Nq, Nk. They give the same result; ``'explicit'`` spells
softmax(QK^T / sqrt(d))V out, which FLOP counters and exporters can follow.

The fused kernels' backward gives each (batch entry, head, block of keys) one unit of work
and walks all the queries in it. ResTv2's global attention has few of those: stage 1 has one
head and a map reduced 8 times, so at 800 x 1344, batch 2, the cuDNN kernel PyTorch picks on
an H200 had 34 blocks of 64 keys, each walking 67200 queries, for 132 SMs.
:func:`query_chunks` says into how many chunks to cut the queries for a training step, each
chunk then a batch entry of its own with a copy of the keys and values: the same attention,
with as many times more units of work.
"""
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .windows import recording_graph

ATTN_IMPLS = ('sdpa', 'explicit')

# Query chunks stop doubling once batch x heads x chunks reaches this many attention rows,
# or once a chunk would hold fewer than twice as many queries as there are keys. Measured on
# one H200 in fp16, the GPU time of one attention's forward and backward: ResTv2-T's stages
# 1 and 2 at 800 x 1344, batch 2, 2.50 -> 0.66 ms and 0.68 -> 0.39 ms; at UperNet's
# 512 x 512, batch 4, 0.60 -> 0.12 ms and 0.17 -> 0.08 ms. Stages 3 and 4, with four times
# as many queries as keys or fewer, gained nothing in chunks or took longer: they stay whole.
MAX_ATTENTION_ROWS = 64
MIN_CHUNKS = 4


def sdpa_attention(q, k, v, key_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def explicit_attention(q, k, v, key_mask=None):
    attn = (q * q.shape[-1]**-0.5) @ k.transpose(-2, -1)
    if key_mask is not None:
        attn = attn.masked_fill(~key_mask, float('-inf'))
    return attn.softmax(dim=-1) @ v


ATTENTION_KERNELS: Dict[str, Callable] = {
    'sdpa': sdpa_attention,
    'explicit': explicit_attention,
}


def chunks_for(rows: int, queries: int, keys: int) -> int:
    """How many equal chunks of ``queries`` give the fused backward enough units of work:
    a power of two, at least :data:`MIN_CHUNKS`, or 1. ``rows``: batch x heads."""
    chunks = 1
    while (queries % (2 * chunks) == 0 and queries >= 2 * chunks * 2 * keys
           and 2 * chunks * rows <= MAX_ATTENTION_ROWS):
        chunks *= 2
    return chunks if chunks >= MIN_CHUNKS else 1


def query_chunks(attn_impl: str, q: torch.Tensor, rows: int, keys: int) -> int:
    """Chunks for the queries ``q`` (B, N, C) of one global attention (see the module): only
    for the fused kernel on CUDA, with a backward to come, and not while torch.compile, an
    exporter or jit.trace follows the forward: a trace would keep this size's chunks."""
    if (attn_impl != 'sdpa' or not q.is_cuda or not torch.is_grad_enabled()
            or not q.requires_grad or recording_graph(*q.shape)):
        return 1
    return chunks_for(rows, q.shape[1], keys)
