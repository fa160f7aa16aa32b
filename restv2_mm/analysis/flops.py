"""Parameters and FLOPs of ResTv2 backbones and whole models, next to the paper's.

FLOPs follow the convention of the paper and of fvcore: one multiply-add is one FLOP. They
are counted by tracing (mmengine's ``FlopAnalyzer``, a port of fvcore's
``FlopCountAnalysis``) with the backbone on its explicit attention path, so that the two
matrix products of every attention (Q K^T and A V) are traced and counted.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import ResTv2
from ..utils.tool import ToolError, build_model, restv2_backbone_cfg, toolbox_of
from .paper import (CLASSIFIER_SHAPE, DETECTION_SHAPE, PAPER_MASK_RCNN, PAPER_UPERNET,
                    SEGMENTATION_SHAPE, canonical_arch)

NUM_DUMMY_PROPOSALS = 1000  # the RoI head sees this many boxes, the mask head the first 100


class ResTv2Classifier(nn.Module):
    """The authors' ImageNet model on top of our backbone: last stage, its norm, mean pool
    over the tokens, linear head. Only used to count what Table 1 counts."""

    def __init__(self, arch: str, num_classes: int = 1000):
        super().__init__()
        self.backbone = ResTv2(arch, out_indices=(3, ), attn_impl='explicit')
        self.head = nn.Linear(self.backbone.embed_dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean(dim=(2, 3)))


class _Traced(nn.Module):
    """Wraps ``fn(model, x)`` as a module so that the tracer sees the model's submodules."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x):
        return self.fn(self.model, x)


def set_explicit_attention(model: nn.Module) -> int:
    """Put every ResTv2 inside ``model`` on the explicit attention path; returns how many."""
    found = [m for m in model.modules() if isinstance(m, ResTv2)]
    for m in found:
        m.set_attn_impl('explicit')
    return len(found)


def count_flops(model: nn.Module,
                inputs: torch.Tensor,
                forward: Optional[Callable] = None) -> Dict[str, object]:
    """Trace ``forward(model, inputs)`` (default ``model(inputs)``) and count its FLOPs.

    Every ResTv2 inside ``model`` is put on the explicit attention path first, so that the
    attention's matrix products are traced as ``aten::matmul`` and counted.

    Returns a dict with ``flops`` (multiply-adds, all counted ops), ``attention`` (the part
    of it in the ResTv2 attention products Q K^T and A V), ``params`` (all parameters of
    ``model``), ``by_module`` (FLOPs of each top-level child) and ``uncounted``: ops that do
    arithmetic but that the counter has no rule for (e.g. mmcv's RoIAlign), with how often
    each ran.
    """
    from mmengine.analysis import FlopAnalyzer
    set_explicit_attention(model)
    traced = _Traced(model, forward or (lambda m, x: m(x)))
    with torch.no_grad():
        analyzer = FlopAnalyzer(traced, (inputs, ))
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        try:
            total = analyzer.total()
        except ValueError as e:  # e.g. an input below ResTv2's minimum size
            raise ToolError(str(e)) from None
        per_module = analyzer.by_module_and_operator()
        unsupported = analyzer.unsupported_ops()
    restv2_names = [n for n, m in traced.named_modules() if isinstance(m, ResTv2)]
    outermost = [n for n in restv2_names
                 if not any(n.startswith(o + '.') for o in restv2_names if o != n)]
    attention = sum(per_module.get(n, {}).get('matmul', 0) for n in outermost)
    by_module = {
        name[len('model.'):]: sum(ops.values())
        for name, ops in per_module.items()
        if name.count('.') == 1 and name.startswith('model.')
    }
    uncounted = {op: n for op, n in unsupported.items() if op not in FREE_OPS}
    params = sum(p.numel() for p in model.parameters())
    return dict(flops=total, attention=attention, params=params, by_module=by_module,
                uncounted=uncounted)


# Ops the counter sees without a rule and that fvcore's convention leaves out on purpose:
# elementwise arithmetic, activations, reshapes, indexing, random numbers. Anything else
# without a rule is reported as not counted.
FREE_OPS = frozenset('aten::' + op for op in (
    'add add_ sub sub_ rsub mul mul_ div div_ neg pow sqrt rsqrt exp exp_ log log2 abs '
    'softmax log_softmax gelu sigmoid sigmoid_ relu relu_ silu tanh erf softplus '
    'unflatten flatten view reshape permute transpose contiguous expand expand_as repeat '
    'chunk split cat stack slice select index index_select gather scatter scatter_ '
    'masked_fill masked_fill_ where clamp clamp_ clamp_min max min topk sort argmax '
    'sum mean cumsum floor floor_divide ceil round remainder ge gt le lt eq ne '
    'bitwise_not __and__ __or__ lift_fresh new_zeros new_full zeros ones full fill_ '
    'copy_ to rand randn arange linspace meshgrid nonzero max_pool2d pixel_shuffle '
    'feature_dropout dropout'.split())) | {'prim::PythonOp.DropPath'}


def classifier_complexity(arch: str, shape: Tuple[int, int] = CLASSIFIER_SHAPE) -> dict:
    """FLOPs and parameters of the backbone alone (4 outputs with their norms) and of the
    authors' classifier (backbone + 1000-class head), which is what Table 1 reports."""
    backbone = ResTv2(arch, attn_impl='explicit').eval()
    x = torch.zeros(1, 3, *shape)
    bb = count_flops(backbone, x)
    clf = count_flops(ResTv2Classifier(arch).eval(), x)
    return dict(backbone=bb, classifier=clf)


def detector_dummy_forward(model: nn.Module, x: torch.Tensor):
    """Backbone, neck, RPN head and RoI heads on ``NUM_DUMMY_PROPOSALS`` fixed boxes.

    The counting forward of the authors' script (mmdet 2.x ``forward_dummy``): the RPN's
    outputs are not decoded (no NMS), the box head runs on 1000 proposals and the mask
    head on the first 100, so the count does not depend on the weights.
    """
    from mmengine.structures import InstanceData
    feats = model.extract_feat(x)
    outs = []
    if getattr(model, 'with_rpn', False):
        outs.append(model.rpn_head(feats))
    if hasattr(model, 'roi_head'):
        H, W = x.shape[2:]
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(NUM_DUMMY_PROPOSALS, 2, generator=g) * torch.tensor([W, H]) * 0.8
        wh = torch.rand(NUM_DUMMY_PROPOSALS, 2, generator=g) * torch.tensor([W, H]) * 0.2 + 8
        proposals = InstanceData(bboxes=torch.cat([xy, xy + wh], dim=1).to(x.device))
        outs.append(model.roi_head.forward(feats, [proposals]))
    elif hasattr(model, 'bbox_head'):
        outs.append(model.bbox_head(feats))
    return outs


def segmentor_dummy_forward(model: nn.Module, x: torch.Tensor):
    """Backbone, neck and decode head, logits resized to the input (as in inference).

    The auxiliary head only trains, so it is not counted; its parameters are.
    """
    feats = model.extract_feat(x)
    logits = model.decode_head.forward(feats)
    return F.interpolate(logits, size=x.shape[2:], mode='bilinear', align_corners=False)


def model_complexity(cfg, shape: Optional[Tuple[int, int]] = None) -> dict:
    """FLOPs and parameters of the whole model of ``cfg`` at ``shape`` (H, W)."""
    model = build_model(cfg)
    scope = toolbox_of(cfg)
    if shape is None:
        shape = DETECTION_SHAPE if scope == 'mmdet' else SEGMENTATION_SHAPE
    forward = detector_dummy_forward if scope == 'mmdet' else segmentor_dummy_forward
    result = count_flops(model, torch.zeros(1, 3, *shape), forward)
    result.update(toolbox=scope, shape=tuple(shape))
    return result


def paper_reference(cfg) -> Tuple[Optional[dict], str]:
    """The paper's numbers for this config's model, if it reports them, and the table."""
    arch = canonical_arch(restv2_backbone_cfg(cfg).get('arch', 'tiny'))
    if arch is None:
        return None, ''
    scope = toolbox_of(cfg)
    model = cfg.model
    if scope == 'mmdet' and 'MaskRCNN' in str(model.get('type')):
        # the paper's model: 80 COCO classes
        if model.get('roi_head', {}).get('bbox_head', {}).get('num_classes') == 80:
            return PAPER_MASK_RCNN.get(arch), 'Table 4 (Mask R-CNN, 1280x800)'
    decode_head = model.get('decode_head', {})
    if scope == 'mmseg' and 'UPerHead' in str(decode_head.get('type')):
        # the paper's model: 150 ADE20K classes, 512-channel UperNet
        if decode_head.get('num_classes') == 150 and decode_head.get('channels') == 512:
            return PAPER_UPERNET.get(arch), 'Table 5 (UperNet, 2048x512)'
    return None, ''


def format_row(name: str, ours: float, paper: Optional[float], unit: str) -> str:
    if paper is None:
        return f'{name:<34}{ours:>10.2f} {unit:<3}{"-":>10}{"-":>10}'
    diff = 100. * (ours - paper) / paper
    return f'{name:<34}{ours:>10.2f} {unit:<3}{paper:>10.2f}{diff:>+9.1f}%'


def table_header() -> str:
    return f'{"":<34}{"ours":>10} {"":<3}{"paper":>10}{"diff":>10}'

