"""Fourier analysis of the block outputs: the paper's Fig. 3, after Park & Kim ("How do
vision transformers work?"): the relative log amplitude of each block's spectrum, from the
zero frequency to the highest.
"""
import math
from typing import Dict, List

import torch

from ..models import Block, ResTv2
from ..utils.tool import ToolError


def relative_log_amplitude(feat: torch.Tensor) -> torch.Tensor:
    """Relative log amplitude along the half-diagonal of the shifted 2-D spectrum.

    feat: B x C x H x W. Each map is Fourier transformed, the zero frequency shifted to the
    centre and the log amplitude averaged over channels and images; the curve is then read
    from the centre (0.0 pi) to the corner (1.0 pi) and made relative to its first value.
    Returns a 1-D tensor of min(H - H // 2, W - W // 2) points, starting at 0.
    """
    if feat.dim() != 4:
        raise ValueError(f'Expected a B x C x H x W feature map, got {tuple(feat.shape)}.')
    return half_diagonal(log_amplitude(feat).mean(dim=(0, 1)))


def log_amplitude(feat: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> log |FFT2| with the zero frequency shifted to (H // 2, W // 2)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(feat.double()), dim=(-2, -1))
    return torch.log(spectrum.abs() + 1e-6)


def half_diagonal(log_amp: torch.Tensor) -> torch.Tensor:
    """H x W shifted log amplitude -> its values from the centre to the corner, minus the
    centre value. Square maps give the diagonal itself; others a line sampled to the corner.
    """
    H, W = log_amp.shape
    n = min(H - H // 2, W - W // 2)
    steps = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1)
    rows = (H // 2 + steps * (H - 1 - H // 2)).round().long()
    cols = (W // 2 + steps * (W - 1 - W // 2)).round().long()
    curve = log_amp[rows, cols]
    return (curve - curve[0]).float()


def block_names(backbone: ResTv2) -> List[str]:
    return [f'stage{i + 1}.{j}' for i, d in enumerate(backbone.depths) for j in range(d)]


class BlockOutputs:
    """Collects every ResTv2 block's output as a B x C x H x W map while the model runs."""

    def __init__(self, backbone: ResTv2):
        self.maps: Dict[str, torch.Tensor] = {}
        self._handles = []
        for name in block_names(backbone):
            stage, j = name.split('.')
            block = getattr(backbone, stage)[int(j)]
            assert isinstance(block, Block)
            self._handles.append(block.register_forward_hook(self._hook(name)))

    def _hook(self, name):

        def hook(module, args, out):
            _, H, W = args
            B, N, C = out.shape
            self.maps[name] = out.detach().reshape(B, H, W, C).permute(0, 3, 1, 2)

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def fourier_curves(backbone: ResTv2, batches):
    """Relative log-amplitude curve of every block, averaged over all images of ``batches``,
    and the H x W of each block's map (two dicts keyed by block name, e.g. 'stage3.1').

    The log amplitudes are accumulated per block over images before the curve is read,
    so the result is the average over channels and images that the paper plots.
    """
    sums: Dict[str, torch.Tensor] = {}
    count = 0
    hooks = BlockOutputs(backbone)
    try:
        with torch.no_grad():
            for x in batches:
                backbone(x)
                for name, fmap in hooks.maps.items():
                    summed = log_amplitude(fmap).mean(dim=1).sum(dim=0)  # H, W
                    sums[name] = sums.get(name, 0) + summed
                count += x.shape[0]
    finally:
        hooks.remove()
    if count == 0:
        raise ToolError('No images to analyse.')
    curves = {name: half_diagonal(total / count) for name, total in sums.items()}
    sizes = {name: tuple(total.shape) for name, total in sums.items()}
    return curves, sizes


def curve_at(curve: torch.Tensor, frac: float) -> float:
    """The curve, linearly interpolated, at ``frac`` of the way from 0.0 pi to 1.0 pi."""
    if len(curve) == 1:
        return float(curve[0])
    pos = frac * (len(curve) - 1)
    lo = min(int(math.floor(pos)), len(curve) - 2)
    t = pos - lo
    return float(curve[lo] * (1 - t) + curve[lo + 1] * t)
