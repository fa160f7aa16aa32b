"""ONNX export of ResTv2 models with dynamic batch, height and width, checked in onnxruntime.

Three parts of a model can be exported:

- ``'backbone'``: the ResTv2 backbone alone, any attention style; normalised image in, the
  stage maps out;
- ``'features'``: backbone + neck of a detector or segmentor (``model.extract_feat``);
- ``'model'``: a whole encoder-decoder segmentor (UperNet): the image as mmcv reads it
  (BGR, 0-255) in, per-pixel class scores at the input size out, the config's
  normalisation and test-time padding inside the graph.

A whole detector is not exported here: Mask R-CNN's proposals, boxes and masks need NMS and
RoIAlign, which ONNX has no standard form for; mmdeploy exports them as its custom ops.

The exporter is torch's dynamo exporter (``torch.export`` with symbolic sizes). The copy that
is exported differs from the model in two export-time switches, neither of which changes the
result: attention is written out (``attn_impl='explicit'``: plain MatMul and Softmax nodes),
and ``nn.AdaptiveAvgPool2d`` (UperNet's pyramid pooling), whose bins torch would compute once
for the export size, becomes :class:`AdaptiveAvgPool2d`, which computes them in the graph.
The window index tables of the window styles are built in the graph too
(``restv2_mm.models.windows``). Any H, W >= 32 and any batch then run.
"""
import copy
import logging
import os
import re
import statistics
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..models import MIN_INPUT_SIZE, ResTv2

PARTS = ('backbone', 'features', 'model')
DYNAMIC_DIMS = {0: 'batch', 2: 'height', 3: 'width'}
TOLERANCE = 1e-4  # relative error of the exported file against PyTorch, float32


# --------------------------------------------------------------------------------------
# Export-time replacements
# --------------------------------------------------------------------------------------
def _pool_weights(size, out: int, dtype, device) -> torch.Tensor:
    """out x size: row i averages input positions floor(i * size / out) to
    ceil((i + 1) * size / out) - 1, the bins of torch's adaptive average pooling."""
    i = torch.arange(out, device=device)
    start = i * size // out
    end = ((i + 1) * size + out - 1) // out  # ceil, all terms >= 0
    pos = torch.arange(size, device=device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


class AdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for any input size in an exported graph.

    The pooling is two matrix products with bin weights made from the input's (symbolic)
    size: ``P_h @ x @ P_w^T``. Equal to torch's pooling up to float rounding.
    """

    def __init__(self, output_size):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if None in output_size:
            raise ValueError(f'output_size={output_size}: the export keeps no input size; '
                             f'give both output sides.')
        self.output_size = tuple(output_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        rows = _pool_weights(H, self.output_size[0], x.dtype, x.device)
        cols = _pool_weights(W, self.output_size[1], x.dtype, x.device)
        return rows @ x @ cols.t()  # B, C, H, W -> B, C, oh, ow

    def extra_repr(self):
        return f'output_size={self.output_size}'


def exportable_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (eval mode) with the export-time switches; the module is kept."""
    module = copy.deepcopy(module).eval()
    for m in module.modules():
        if isinstance(m, ResTv2):
            m.set_attn_impl('explicit')
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(parent, name, AdaptiveAvgPool2d(child.output_size))
    return module


# --------------------------------------------------------------------------------------
# The exported parts
# --------------------------------------------------------------------------------------
class Features(nn.Module):
    """Backbone + neck of a detector or segmentor: normalised image -> feature maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.extract_feat(x))


class SegmentorScores(nn.Module):
    """A whole encoder-decoder segmentor, as ``inference_model`` runs it in 'whole' mode.

    Image B x 3 x H x W as mmcv reads it (BGR, 0-255, float) -> class scores (logits)
    B x K x H x W. Inside: the data preprocessor's channel flip and normalisation, its
    test-time padding to a multiple of ``test_cfg.size_divisor`` (removed again), the
    network, and the decode head's bilinear resize to the input size.
    """

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor
        pre = segmentor.data_preprocessor
        self.bgr_to_rgb = bool(getattr(pre, 'channel_conversion', False))
        self.normalize = bool(getattr(pre, '_enable_normalize', False))
        if self.normalize:
            self.register_buffer('mean', pre.mean.detach().clone().view(1, -1, 1, 1))
            self.register_buffer('std', pre.std.detach().clone().view(1, -1, 1, 1))
        test_cfg = getattr(pre, 'test_cfg', None) or {}
        if test_cfg.get('size') is not None:
            raise ValueError(f'data_preprocessor.test_cfg.size={test_cfg["size"]} pads every '
                             f'test image to one fixed size; the export keeps sizes dynamic. '
                             f'Use test_cfg=dict(size_divisor=...) or none.')
        self.size_divisor = test_cfg.get('size_divisor') or 1
        self.pad_val = float(getattr(pre, 'pad_val', 0))

    def forward(self, image):
        from mmseg.models.utils import resize
        H, W = image.shape[-2:]
        x = image.flip(1) if self.bgr_to_rgb else image
        if self.normalize:
            x = (x - self.mean) / self.std
        if self.size_divisor > 1:  # pad bottom and right as mmseg's stack_batch does
            d = self.size_divisor
            x = nn.functional.pad(x, (0, (W + d - 1) // d * d - W, 0, (H + d - 1) // d * d - H),
                                  value=self.pad_val)
        seg = self.segmentor
        scores = seg.decode_head.forward(seg.extract_feat(x))
        scores = resize(scores, size=x.shape[-2:], mode='bilinear',
                        align_corners=seg.align_corners)
        return scores[..., :H, :W]


def build_part(cfg, part: str, checkpoint: Optional[str] = None) -> Tuple[nn.Module, str]:
    """``part`` of the config's model in eval mode, with the weights of ``checkpoint``
    (random without one), and a line that says where its weights come from."""
    from ..utils.tool import build_backbone, build_model, toolbox_of
    if part == 'backbone':
        module = build_backbone(cfg, checkpoint)
        source = f'the backbone weights of {checkpoint}' if checkpoint else 'random weights'
        return module, source
    toolbox = toolbox_of(cfg)
    with warnings.catch_warnings():  # the toolboxes' deprecation notes while building
        warnings.simplefilter('ignore')
        model = build_model(cfg)
    source = load_model_weights(model, checkpoint) if checkpoint else 'random weights'
    try:
        return part_of(model, part, toolbox).eval(), source
    except ValueError as e:
        from ..utils.tool import ToolError
        raise ToolError(str(e)) from None


def load_model_weights(model: nn.Module, checkpoint: str) -> str:
    """Load a checkpoint of the whole model (train.py's) or of its backbone alone (the
    authors' ImageNet file, convert_official.py's output); says what was loaded."""
    from ..utils.tool import load_backbone_weights, model_state, read_checkpoint_file
    ckpt = read_checkpoint_file(checkpoint)
    own = model.state_dict()
    state = ckpt.get('state_dict', ckpt)
    names = {re.sub(r'^module\.', '', k) for k in state} if isinstance(state, dict) else set()
    if not any(k in own and not k.startswith('backbone.') for k in names):
        load_backbone_weights(model.backbone, checkpoint)
        return (f'the backbone weights of {checkpoint}; neck and heads are random (the file '
                f'holds a backbone only)')
    state = model_state(model, ckpt, checkpoint)
    model.load_state_dict(state, strict=False)
    missing = [k for k in own if k not in state]
    if missing:
        return (f'the weights of {checkpoint}; {len(missing)} not in the file, left as '
                f'initialised: {", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}')
    return f'the weights of {checkpoint}'


def part_of(model: nn.Module, part: str, toolbox: str) -> nn.Module:
    """The module to export for ``part`` of a detector/segmentor (or a bare ResTv2)."""
    if part not in PARTS:
        raise ValueError(f'part={part!r} is not one of {PARTS}.')
    if isinstance(model, ResTv2):
        if part != 'backbone':
            raise ValueError(f'part={part!r} needs a whole model; a bare ResTv2 exports as '
                             f'part=\'backbone\'.')
        return model
    if part == 'backbone':
        return model.backbone
    if part == 'features':
        return Features(model)
    if toolbox != 'mmseg' or not hasattr(model, 'decode_head'):
        raise ValueError(
            f'part=\'model\' exports encoder-decoder segmentors (UperNet); this is a '
            f'{type(model).__name__}. A whole detector needs NMS and RoIAlign, which ONNX '
            f'has no standard ops for: export it with mmdeploy (its custom ops and '
            f'TensorRT plugins), or export backbone + neck here with part=\'features\'.')
    return SegmentorScores(model)


# --------------------------------------------------------------------------------------
# Export and check
# --------------------------------------------------------------------------------------
def output_names(module: nn.Module, example: torch.Tensor) -> List[str]:
    """'scores' for a segmentor, else 'feat0', 'feat1', ... one per feature map."""
    with torch.no_grad():
        out = module(example)
    if isinstance(out, torch.Tensor):
        return ['scores']
    return [f'feat{i}' for i in range(len(out))]


def export_onnx(module: nn.Module, example: torch.Tensor, path: str,
                input_name: str = 'input', opset: Optional[int] = None) -> List[str]:
    """Export ``module`` (an :func:`exportable_copy`) to ``path`` with dynamic batch, height
    and width; ``example`` (B x C x H x W, B >= 2) is the size it is recorded at.

    Returns the output names. The file's input dims are named 'batch', 'height', 'width'.
    """
    if example.dim() != 4 or example.shape[0] < 2:
        raise ValueError(f'record the export with a B x C x H x W example of batch 2 or more '
                         f'(got {tuple(example.shape)}): torch makes a batch of 1 a constant.')
    names = output_names(module, example)
    dynamic = {axis: torch.export.Dim.DYNAMIC for axis in DYNAMIC_DIMS}
    # the exporter lists the torchvision ops it would have translated; none are used here
    registry_log = logging.getLogger('torch.onnx._internal.exporter._registration')
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            program = torch.onnx.export(
                module, (example, ), dynamo=True, dynamic_shapes=(dynamic, ),
                input_names=[input_name], output_names=names, opset_version=opset,
                verbose=False)
    finally:
        registry_log.setLevel(level)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path)
    _name_dynamic_dims(path, input_name)
    return names


def _name_dynamic_dims(path: str, input_name: str):
    """Rename the exporter's size symbols (s0, s53, ...) to batch/height/width."""
    import onnx
    model = onnx.load(path)
    graph = model.graph
    dims = next(v for v in graph.input if v.name == input_name).type.tensor_type.shape.dim
    rename = {dims[axis].dim_param: name for axis, name in DYNAMIC_DIMS.items()
              if dims[axis].dim_param}
    if not rename:
        return
    pattern = re.compile(r'\b(' + '|'.join(map(re.escape, rename)) + r')\b')
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(model, path)


def onnx_session(path: str):
    import onnxruntime as ort
    return ort.InferenceSession(path, providers=['CPUExecutionProvider'])


def run_onnx(session, x: torch.Tensor) -> List[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def run_torch(module: nn.Module, x: torch.Tensor) -> List[np.ndarray]:
    with torch.no_grad():
        out = module(x)
    out = [out] if isinstance(out, torch.Tensor) else out
    return [o.numpy() for o in out]


def relative_error(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """max |out - ref| / max |ref| over all outputs (each output scaled by its own max)."""
    if len(outputs) != len(references):
        raise ValueError(f'{len(outputs)} outputs against {len(references)} references.')
    errors = []
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            raise ValueError(f'output shape {out.shape} differs from PyTorch\'s {ref.shape}.')
        errors.append(float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return max(errors)


def check_sizes(height: int, width: int) -> List[Tuple[int, int, int]]:
    """Batch, H, W to check an export of H x W at: that size with batch 1, and with batch 2
    a size that is no multiple of 32 (odd, at least 33)."""
    other = (max(height * 3 // 4, MIN_INPUT_SIZE) | 1, max(width * 5 // 4, MIN_INPUT_SIZE) | 1)
    return [(1, height, width), (2, *other)]


def median_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def example_input(batch: int, height: int, width: int, image: bool = False,
                  seed: int = 0) -> torch.Tensor:
    """A random input: normalised values (N(0, 1)), or with ``image`` pixel values 0-255."""
    gen = torch.Generator().manual_seed(seed)
    if image:
        return torch.rand(batch, 3, height, width, generator=gen) * 255
    return torch.randn(batch, 3, height, width, generator=gen)


def check_export(path: str, reference: nn.Module, sizes: Sequence[Tuple[int, int, int]],
                 image: bool = False, repeats: int = 5) -> dict:
    """Run the file in onnxruntime (CPU) against ``reference`` in PyTorch, float32.

    Returns 'errors' (one (input shape, relative error) per entry of ``sizes``), 'outputs'
    (name and shape of each output at the first size), the file size in MB and the median
    latency of both at the first size ('onnx_ms', 'torch_ms').
    """
    session = onnx_session(path)
    errors, outputs = [], None
    for i, (b, h, w) in enumerate(sizes):
        x = example_input(b, h, w, image, seed=i)
        out = run_onnx(session, x)
        errors.append(((b, 3, h, w), relative_error(out, run_torch(reference, x))))
        if outputs is None:
            outputs = [(o.name, tuple(a.shape)) for o, a in zip(session.get_outputs(), out)]
    x = example_input(*sizes[0], image)
    onnx_ms = median_ms(lambda: run_onnx(session, x), repeats)
    torch_ms = median_ms(lambda: run_torch(reference, x), repeats)
    return dict(errors=errors, outputs=outputs, size_mb=os.path.getsize(path) / 2**20,
                onnx_ms=onnx_ms, torch_ms=torch_ms)
