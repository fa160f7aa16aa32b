"""The paper's reference numbers as data: Tables 1, 4 and 5.

GFLOPs count one multiply-add as one FLOP, as the paper does; parameters are in millions.
"""
from typing import Optional

from ..models import ResTv2

ARCH_NAMES = ('tiny', 'small', 'base', 'large')
ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large'}

# Table 1: the ImageNet classifiers at 224 x 224 (backbone + 1000-class head).
PAPER_CLASSIFIER = {
    'tiny': dict(gflops=4.1, params_m=30.43),
    'small': dict(gflops=6.0, params_m=41.21),
    'base': dict(gflops=7.9, params_m=55.97),
    'large': dict(gflops=13.8, params_m=86.53),
}
# Table 4: Mask R-CNN + FPN on COCO, 80 classes, FLOPs at 1280 x 800.
PAPER_MASK_RCNN = {
    'tiny': dict(gflops=253., params_m=49.9),
    'small': dict(gflops=290., params_m=60.7),
    'base': dict(gflops=328., params_m=75.5),
}
# Table 5: UperNet (+ auxiliary FCN head for the parameters) on ADE20K, FLOPs at 2048 x 512.
PAPER_UPERNET = {
    'tiny': dict(gflops=977., params_m=62.1),
    'small': dict(gflops=1035., params_m=72.9),
    'base': dict(gflops=1095., params_m=87.6),
}
CLASSIFIER_SHAPE = (224, 224)
DETECTION_SHAPE = (1280, 800)  # H, W as the authors' counting script feeds it
SEGMENTATION_SHAPE = (2048, 512)


def canonical_arch(arch) -> Optional[str]:
    """'tiny'/'small'/'base'/'large' for a named or equivalent dict arch, else None."""
    if isinstance(arch, str):
        arch = arch.lower()
        return ARCH_ALIASES.get(arch, arch) if arch in (*ARCH_NAMES, *ARCH_ALIASES) else None
    for name in ARCH_NAMES:
        if all(list(arch.get(k, [])) == ResTv2.arch_zoo[name][k] for k in ResTv2.arch_keys):
            return name
    return None
