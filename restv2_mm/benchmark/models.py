"""The models the benchmark compares, built with random weights, and their inputs."""
import copy
import os.path as osp
from typing import Optional

import numpy as np
import torch

from ..models import ResTv2
from .timing import Bench

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SWIN_DET_CONFIG = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
PVTV2_B2_CONFIG = 'mmdet::pvt/retinanet_pvtv2-b2_fpn_1x_coco.py'
SWIN_SEG_CONFIG = ('mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_'
                   'ade20k-512x512.py')
RESTV2_DET_CONFIG = 'configs/maskrcnn_restv2_t_coco.py'
RESTV2_SEG_CONFIG = 'configs/upernet_restv2_t_ade20k.py'
RESTV2_T_CHANNELS = [96, 192, 384, 768]


def resolve_config_path(path: str) -> str:
    """'mmdet::swin/x.py' -> the file inside the installed package; other paths as given."""
    if '::' not in path:
        return path if osp.isabs(path) or osp.exists(path) else osp.join(REPO_ROOT, path)
    from mmengine.utils import get_installed_path
    package, rel = path.split('::', 1)
    return osp.join(get_installed_path(package), '.mim', 'configs', rel)


def read_config(path: str):
    """An MM config, given as a path or as 'mmdet::...' / 'mmseg::...'."""
    from mmengine.config import Config
    return Config.fromfile(resolve_config_path(path))


def drop_pretrained(cfg):
    """Set every pretrained checkpoint in a model config to None (random weights only)."""
    if isinstance(cfg, dict):
        for key in list(cfg):
            value = cfg[key]
            if key == 'pretrained':
                cfg[key] = None
            elif key == 'init_cfg' and _is_pretrained(value):
                cfg[key] = None
            else:
                drop_pretrained(value)
    elif isinstance(cfg, (list, tuple)):
        for item in cfg:
            drop_pretrained(item)
    return cfg


def _is_pretrained(init_cfg) -> bool:
    items = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(i, dict) and i.get('type') == 'Pretrained' for i in items)


def config_backbone(path: str) -> dict:
    """The backbone dict of a toolbox config, without type, _delete_ or pretrained weights."""
    cfg = copy.deepcopy(read_config(path).model.backbone.to_dict())
    cfg.pop('_delete_', None)
    cfg.pop('type')
    cfg['init_cfg'] = None
    return cfg


def build_restv2(arch: str = 'tiny', **kwargs) -> torch.nn.Module:
    model = ResTv2(arch=arch, init_cfg=None, **kwargs)
    model.init_weights()
    return model


def build_swin_t(drop_path_rate: Optional[float] = None) -> torch.nn.Module:
    from mmdet.models.backbones import SwinTransformer
    cfg = config_backbone(SWIN_DET_CONFIG)
    if drop_path_rate is not None:
        cfg['drop_path_rate'] = drop_path_rate
    model = SwinTransformer(**cfg)
    model.init_weights()
    return model


def build_pvtv2_b2() -> torch.nn.Module:
    from mmdet.models.backbones import PyramidVisionTransformerV2
    model = PyramidVisionTransformerV2(**config_backbone(PVTV2_B2_CONFIG))
    model.init_weights()
    return model


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001  (timm or its torchvision may be missing or broken)
        return False


def build_convnext_t() -> torch.nn.Module:
    import timm
    return timm.create_model('convnext_tiny', pretrained=False, features_only=True)



def lighten_for_quick(model, kind: str):
    """Fewer proposals and narrower heads, the same for both models: a CPU smoke test."""
    if kind == 'det':
        model.test_cfg.rpn.update(nms_pre=100, max_per_img=50)
        model.test_cfg.rcnn.max_per_img = 10
        model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
        model.train_cfg.rpn.sampler.num = 64
        model.train_cfg.rcnn.sampler.num = 32
    else:
        model.decode_head.channels = 64
        model.auxiliary_head.channels = 32
    return model


def toolbox_model_config(path: str, peer_path: str, kind: str, quick: bool = False):
    """Model config from ``path``; where that file is missing, the peer's with ResTv2-T.

    Returns the model config (no pretrained checkpoints), where it came from, and the
    config's ``env_cfg.cudnn_benchmark`` (mmdet's configs leave it off, mmseg's turn it on).
    """
    resolved = resolve_config_path(path)
    if osp.exists(resolved):
        cfg = read_config(resolved)
        model = cfg.model
        source = path
    else:
        cfg = read_config(peer_path)
        model = cfg.model
        model.backbone = dict(type='ResTv2', arch='tiny', drop_path_rate=0.1, init_cfg=None)
        if kind == 'det':
            model.neck.in_channels = RESTV2_T_CHANNELS
        else:
            model.decode_head.in_channels = RESTV2_T_CHANNELS
            model.auxiliary_head.in_channels = RESTV2_T_CHANNELS[2]
        source = f'{peer_path} with a ResTv2-T backbone ({path} not found)'
    model = drop_pretrained(copy.deepcopy(model))
    model.backbone.init_cfg = None
    if quick:
        lighten_for_quick(model, kind)
    return model, source, bool(cfg.get('env_cfg', {}).get('cudnn_benchmark', False))


def build_toolbox_model(bench: Bench, model_cfg, scope: str):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope
    if scope == 'mmdet':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(copy.deepcopy(model_cfg))
    model.init_weights()
    model = revert_sync_batchnorm(model)  # one process: SyncBN runs as BN, as mmengine does
    model.to(bench.device)
    model.backbone = bench.maybe_compile(model.backbone)
    return model


def fill_detections(model):
    """Make the random box head score every RoI as class 0, as a trained one finds objects.

    With random weights every class scores about 1/81, under the 0.05 threshold, and the
    mask head would never run; with this the test pipeline keeps max_per_img boxes after
    NMS, as a trained Mask R-CNN on COCO does, for both models alike.
    """
    fc_cls = model.roi_head.bbox_head.fc_cls
    with torch.no_grad():
        fc_cls.weight.mul_(0.)
        fc_cls.bias.fill_(0.)
        fc_cls.bias[0] = 10.


def det_data(bench: Bench, size, batch: int, with_gt: bool, seed: int = 0) -> dict:
    """Packed inputs as mmdet's PackDetInputs makes them: uint8 images and DetDataSamples."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    H, W = size
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(batch):
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
        inputs.append(img.to(bench.device))
        sample = DetDataSample(metainfo=dict(
            img_id=i, img_path=f'random_{i}.jpg', ori_shape=(H, W), img_shape=(H, W),
            scale_factor=(1., 1.), flip=False, flip_direction=None))
        if with_gt:
            n = 8
            wh = rng.uniform(0.1, 0.4, (n, 2)) * [W, H]
            xy = rng.uniform(0, 1, (n, 2)) * ([W, H] - wh)
            boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
            masks = np.zeros((n, H, W), dtype=np.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
                masks[j, y1 + (y2 - y1) // 4:y2 - (y2 - y1) // 4, x1:x2] = 1
                masks[j, y1:y2, x1 + (x2 - x1) // 4:x2 - (x2 - x1) // 4] = 1
            gt = InstanceData()
            gt.bboxes = HorizontalBoxes(torch.from_numpy(boxes))
            gt.labels = torch.from_numpy(rng.integers(0, 80, n))
            gt.masks = BitmapMasks(masks, H, W)
            sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def build_optim_wrapper(bench: Bench, model, lr: float, weight_decay: float):
    """The same set-up for every model: one AdamW group in mmengine's AMP wrapper (the plain
    wrapper on the CPU)."""
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if bench.amp:
        return AmpOptimWrapper(optimizer=optimizer)
    return OptimWrapper(optimizer=optimizer)


def config_optim_wrapper(bench: Bench, model, path: str, peer_path: str, scope: str):
    """The optimizer set-up of the config at ``path`` (the peer's where it is missing):
    its constructor, parameter-wise settings and optimizer, in the AMP wrapper on a GPU."""
    from mmengine.optim import build_optim_wrapper as build
    from mmengine.registry import DefaultScope
    resolved = resolve_config_path(path)
    cfg = copy.deepcopy(read_config(resolved if osp.exists(resolved) else peer_path)
                        .optim_wrapper)
    cfg['type'] = 'AmpOptimWrapper' if bench.amp else 'OptimWrapper'
    for key in ('loss_scale', 'dtype') if not bench.amp else ():
        cfg.pop(key, None)
    with DefaultScope.overwrite_default_scope(scope):
        return build(model, cfg)


def seg_data(bench: Bench, size, batch: int, with_gt: bool = False, seed: int = 0) -> dict:
    """Packed inputs as mmseg's PackSegInputs makes them: uint8 images and SegDataSamples,
    with random label maps of the 150 ADE20K classes for training."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    H, W = size
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(batch):
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=gen)
        inputs.append(img.to(bench.device))
        sample = SegDataSample(metainfo=dict(
            img_path=f'random_{i}.jpg', ori_shape=(H, W), img_shape=(H, W),
            pad_shape=(H, W), scale_factor=(1., 1.), flip=False, flip_direction=None))
        if with_gt:
            labels = torch.randint(0, 150, (1, H, W), generator=gen)
            sample.gt_sem_seg = PixelData(data=labels.to(bench.device))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)
