"""What the analysis tools share: configs, FLOPs counting, Fourier analysis, clean errors.

The command-line tools in ``tools/`` are thin wrappers over the functions here:

- ``tools/analysis/get_flops.py``: parameters and FLOPs of the backbone or of a whole
  detector / segmentor, next to the paper's numbers (:func:`count_flops`).
- ``tools/analysis/fourier_analysis.py``: relative log amplitude of the Fourier-transformed
  block outputs, the paper's Fig. 3 (:func:`relative_log_amplitude`).
- ``tools/demo.py`` and ``tools/convert_official.py``.

FLOPs follow the convention of the paper and of fvcore: one multiply-add is one FLOP. They
are counted by tracing (mmengine's ``FlopAnalyzer``, a port of fvcore's
``FlopCountAnalysis``) with the backbone on its explicit attention path, so that the two
matrix products of every attention (Q K^T and A V) are traced and counted.
"""
import math
import os
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .restv2 import Block, ResTv2

# --------------------------------------------------------------------------------------
# The paper's numbers (GFLOPs at one multiply-add per FLOP, parameters in millions)
# --------------------------------------------------------------------------------------
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
NUM_DUMMY_PROPOSALS = 1000  # the RoI head sees this many boxes, the mask head the first 100


class ToolError(Exception):
    """A problem with what the user passed in; the tools print it as one line and exit 1."""


def run_tool(main: Callable[[Optional[Sequence[str]]], Optional[int]],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main``; a :class:`ToolError` becomes ``error: ...`` on stderr, exit 1."""
    try:
        return main(argv) or 0
    except ToolError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------
def check_file(path: str, what: str) -> str:
    if not osp.isfile(path):
        hint = ' (it is a directory)' if osp.isdir(path) else ''
        raise ToolError(f'{what} {path!r} not found{hint} (working directory: {os.getcwd()}).')
    return path


def load_config(path: str, cfg_options: Optional[dict] = None):
    """Read an MM config file, with ``--cfg-options`` merged in, and check it is ResTv2's."""
    from mmengine.config import Config
    check_file(path, 'Config file')
    if not path.endswith('.py'):
        raise ToolError(f'Config file {path!r} is not a .py file; pass an MM config such as '
                        f'configs/maskrcnn_restv2_t_coco.py.')
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # a syntax error or a missing _base_ file inside the config
        raise ToolError(f'Could not read config {path!r}: {type(e).__name__}: {e}') from None
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    restv2_backbone_cfg(cfg, path)
    return cfg


def restv2_backbone_cfg(cfg, path: str = 'the config') -> dict:
    """``cfg.model.backbone``, or a :class:`ToolError` when the model has no ResTv2 backbone."""
    model = cfg.get('model')
    if not isinstance(model, dict):
        raise ToolError(f'{path} has no `model` dict; pass a detection or segmentation '
                        f'config whose model.backbone is type=\'ResTv2\'.')
    backbone = model.get('backbone')
    btype = backbone.get('type') if isinstance(backbone, dict) else None
    if not isinstance(btype, str) or btype.split('.')[-1] != 'ResTv2':
        raise ToolError(f'{path}: model.backbone.type is {btype!r}, not \'ResTv2\'. These '
                        f'tools analyse ResTv2 models; use one of the configs in configs/ or '
                        f'set model.backbone=dict(type=\'ResTv2\', arch=...).')
    return backbone


def toolbox_of(cfg) -> str:
    """'mmdet' or 'mmseg': which toolbox builds the model of this config."""
    scope = cfg.get('default_scope')
    if scope in ('mmdet', 'mmseg'):
        return scope
    model_type = str(cfg.model.get('type', ''))
    if model_type.split('.')[0] in ('mmdet', 'mmseg'):
        return model_type.split('.')[0]
    if 'EncoderDecoder' in model_type:
        return 'mmseg'
    if model_type:
        return 'mmdet'
    raise ToolError('Cannot tell whether the config is for mmdet or mmseg: set '
                    'default_scope=\'mmdet\' or \'mmseg\' in it.')


def build_model(cfg, device: str = 'cpu') -> nn.Module:
    """The whole detector or segmentor of ``cfg`` (random weights, eval mode)."""
    import restv2_mm  # noqa: F401  registers ResTv2
    from mmengine.registry import init_default_scope
    scope = toolbox_of(cfg)
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model_cfg = cfg.model.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)  # no pretrained download
    return MODELS.build(model_cfg).to(device).eval()


def build_backbone(cfg, checkpoint: Optional[str] = None, device: str = 'cpu') -> ResTv2:
    """The ResTv2 of ``cfg.model.backbone``, with the backbone weights of ``checkpoint``."""
    kwargs = dict(restv2_backbone_cfg(cfg))
    kwargs.pop('type')
    kwargs['init_cfg'] = None
    try:
        backbone = ResTv2(**kwargs)
    except (TypeError, ValueError) as e:
        raise ToolError(f'model.backbone of the config does not build: {e}') from None
    backbone.init_weights()
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint)
    return backbone.to(device).eval()


def read_checkpoint_file(path: str) -> dict:
    """A checkpoint read with the weights-only loader; unreadable files give a ToolError."""
    from .checkpoint import read_checkpoint
    check_file(path, 'Checkpoint')
    try:
        checkpoint = read_checkpoint(path)
    except Exception as e:  # not a torch file, or an object the weights-only loader refuses
        first_line = str(e).splitlines()[0] if str(e) else ''
        raise ToolError(f'Cannot read checkpoint {path!r}: it is not a torch checkpoint '
                        f'that the weights-only loader accepts ({type(e).__name__}: '
                        f'{first_line}).') from None
    if not isinstance(checkpoint, dict):
        raise ToolError(f'{path!r} holds a {type(checkpoint).__name__}, not a checkpoint '
                        f'dict.')
    return checkpoint


def load_backbone_weights(backbone: ResTv2, checkpoint: str) -> dict:
    """Load a checkpoint of any layout into ``backbone``; errors become :class:`ToolError`."""
    from .checkpoint import load_backbone
    check_file(checkpoint, 'Checkpoint')
    try:
        report = load_backbone(backbone, checkpoint)
    except Exception as e:  # unreadable file, wrong arch
        raise ToolError(f'Could not load {checkpoint!r}: {e}') from None
    loaded = len(backbone.state_dict()) - len(report['missing']) - len(report['kept_init'])
    if loaded <= 0:
        raise ToolError(f'{checkpoint!r} holds no ResTv2 backbone weights (nothing matched '
                        f'the backbone\'s keys); is it a checkpoint of this model?')
    return report


def canonical_arch(arch) -> Optional[str]:
    """'tiny'/'small'/'base'/'large' for a named or equivalent dict arch, else None."""
    if isinstance(arch, str):
        arch = arch.lower()
        return ARCH_ALIASES.get(arch, arch) if arch in (*ARCH_NAMES, *ARCH_ALIASES) else None
    for name in ARCH_NAMES:
        if all(list(arch.get(k, [])) == ResTv2.arch_zoo[name][k] for k in ResTv2.arch_keys):
            return name
    return None


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Fourier analysis (paper Fig. 3, after Park & Kim, "How do vision transformers work?")
# --------------------------------------------------------------------------------------
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
