"""Attention kernels: one switch between PyTorch's fused kernel and the explicit math.

Both take q: B, h, Nq, d; k, v: B, h, Nk, d; and an optional bool ``key_mask`` (True = a
real key) broadcastable to B, h, Nq, Nk. They give the same result; ``'explicit'`` spells
softmax(QK^T / sqrt(d))V out, which FLOP counters and exporters can follow.
"""
from typing import Callable, Dict

import torch.nn.functional as F

ATTN_IMPLS = ('sdpa', 'explicit')


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

