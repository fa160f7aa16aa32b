"""A small synthetic dataset of shapes, written in the on-disk formats of COCO and ADE20K.

Every image is a textured, noisy, greyish background with a few filled shapes (circles,
squares, triangles, stars, crosses) of random size, rotation and aspect, some of them
overlapping, and a few thin clutter strokes of any colour that belong to no class. Shapes
are saturated colours; each class draws its hue from its own band, and neighbouring bands
overlap, so colour hints at the class and the outline settles it. The same scene is
written in two layouts, so the real toolboxes' datasets, pipelines and metrics read it
unchanged::

    OUT/coco/annotations/instances_{train,val}2017.json   COCO instances, polygon masks
    OUT/coco/{train,val}2017/000000000001.jpg
    OUT/ade/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_00000001.jpg
    OUT/ade/ADEChallengeData2016/annotations/{training,validation}/ADE_..._00000001.png

COCO annotations hold the visible part of each instance: polygons traced around the pixels
the instance shows, with ``area`` and ``bbox`` computed from those polygons exactly as
pycocotools decodes them, and ``iscrowd`` 0. Shapes are placed so that each keeps at least
half of itself visible and no visible part has a hole (which a COCO polygon cannot hold).

ADE annotations follow ADE20K's convention for ``reduce_zero_label=True``: 0 is 'other'
(here the clutter strokes; ignored), 1 is the background and 2.. are the shapes, so after
the reduction the classes are :data:`TOY_SEG_CLASSES`.

Everything is a function of the seed: image ``i`` of a split comes from its own random
stream, so adding images does not change the ones before it.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional

import cv2
import numpy as np

TOY_CLASSES = ('circle', 'square', 'triangle', 'star', 'cross')
TOY_SEG_CLASSES = ('background', ) + TOY_CLASSES
TOY_PALETTE = [(220, 20, 60), (0, 130, 200), (60, 180, 75), (255, 200, 0), (145, 30, 180)]
TOY_SEG_PALETTE = [(120, 120, 120)] + TOY_PALETTE

COCO_SPLITS = {'train': 'train2017', 'val': 'val2017'}
ADE_SPLITS = {'train': ('training', 'ADE_train'), 'val': ('validation', 'ADE_val')}
KINDS = ('coco', 'ade', 'both')

# Each class draws its hues (OpenCV's 0-180 scale) around its own centre; neighbouring bands
# overlap, so colour hints at the class and the outline decides.
CLASS_HUES = (0, 36, 72, 108, 144)
HUE_SPREAD = 15  # standard deviation
MIN_VISIBLE_FRACTION = 0.5  # of an instance's own area, after later shapes cover it
SPLIT_CODES = {'train': 0, 'val': 1}


# ------------------------------------------------------------------------------ shapes
def _unit_polygon(name: str) -> np.ndarray:
    """Outline of a shape of radius 1 centred on the origin, as K x 2 points."""
    if name == 'circle':
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == 'square':
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == 'triangle':
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == 'star':
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == 'cross':
        a = 0.33
        return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1),
                         (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=np.float64)
    raise ValueError(f'Unknown toy shape {name!r}; the shapes are {TOY_CLASSES}.')


UNIT_POLYGONS = {name: _unit_polygon(name) for name in TOY_CLASSES}


def _fill(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise a polygon (float pixel coordinates) into a uint8 0/1 mask."""
    mask = np.zeros((height, width), np.uint8)
    shift = 4  # sub-pixel precision of cv2's rasteriser
    pts = np.round((points - 0.5) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    return mask


def _has_hole(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] != -1).any())


# ------------------------------------------------------------------------------ pixels
def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                  channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return out.reshape(height, width, channels)


def _hsv_colour(rng: np.random.Generator, saturation, value, hue=None) -> np.ndarray:
    """A BGR colour (float, 0-255) with saturation and value drawn from the given ranges and
    the given hue (OpenCV's 0-180 scale), or a random one."""
    hue = rng.uniform(0, 180) if hue is None else hue % 180
    hsv = np.array([[[hue, 255 * rng.uniform(*saturation), 255 * rng.uniform(*value)]]])
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Greyish (low-saturation) ground with blotches, fine noise and sometimes stripes."""
    base = _hsv_colour(rng, (0.0, 0.35), (0.3, 0.85))
    img = np.empty((height, width, 3), np.float32)
    img[:] = base
    img += 40 * _smooth_noise(rng, height, width, int(rng.integers(2, 5)), channels=1)
    img += 12 * _smooth_noise(rng, height, width, int(rng.integers(2, 5)))
    img += 20 * _smooth_noise(rng, height, width, int(rng.integers(8, 16)), channels=1)
    if rng.random() < 0.5:  # stripes
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 12)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period
        img += rng.uniform(6, 18) * np.sin(phase)[..., None]
    return img


def _shape_colour(rng: np.random.Generator, label: int,
                  background_mean: np.ndarray) -> np.ndarray:
    """A saturated colour of the class's band of hues that stands out from the background
    (RGB distance > 80)."""
    for _ in range(50):
        hue = CLASS_HUES[label] + rng.normal(0, HUE_SPREAD)
        colour = _hsv_colour(rng, (0.65, 1.0), (0.5, 1.0), hue)
        if np.linalg.norm(colour - background_mean) > 80:
            return colour
    return 255 - background_mean


def _paint_shape(rng, img, mask, colour):
    """Fill ``mask`` with ``colour``, shaded by a linear gradient and its own texture."""
    height, width = mask.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    shade = colour[None, None] + rng.uniform(15, 35) * gradient[..., None]
    shade = shade + 8 * _smooth_noise(rng, height, width, int(rng.integers(6, 12)))
    m = mask.astype(bool)
    img[m] = shade[m]


# ------------------------------------------------------------------------------ scenes
def make_scene(rng: np.random.Generator, size: int, max_instances: Optional[int] = None):
    """One image with its instances.

    Returns ``(image, instances, other)``: the image as H x W x 3 uint8 BGR, a list of
    ``dict(label, mask)`` with the visible mask of each instance (labels index
    :data:`TOY_CLASSES`, later instances drawn on top), and the mask of the clutter
    strokes that no shape covers.
    """
    height = width = size
    img = _background(rng, height, width)
    bg_mean = img.reshape(-1, 3).mean(0)

    other = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(0, 4))):  # clutter strokes: not objects
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        colour = rng.uniform(0, 255, 3).tolist()
        thickness = int(rng.integers(1, 3))
        stroke = np.zeros_like(other)
        cv2.line(stroke, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, thickness)
        img[stroke.astype(bool)] = colour
        other |= stroke

    if max_instances is None:
        max_instances = 3 + size // 64
    num = int(rng.integers(1, max_instances + 1))
    labels: List[int] = []
    full_masks: List[np.ndarray] = []
    owner = np.full((height, width), -1, np.int32)  # which instance each pixel shows
    min_area = max(12.0, 0.002 * height * width)
    for _ in range(num):
        for _attempt in range(30):
            label = int(rng.integers(len(TOY_CLASSES)))
            # radius from small to large, log-uniform: 4% to 30% of the image side
            radius = size * float(np.exp(rng.uniform(np.log(0.04), np.log(0.3))))
            aspect = float(rng.uniform(0.75, 1.33))
            angle = float(rng.uniform(0, 2 * np.pi))
            centre = rng.uniform(0.1 * size, 0.9 * size, 2)
            pts = UNIT_POLYGONS[TOY_CLASSES[label]] * radius * np.array([aspect, 1 / aspect])
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            pts = pts @ rot.T + centre
            mask = _fill(pts, height, width)
            if mask.sum() < min_area:
                continue
            new_owner = np.where(mask > 0, len(labels), owner)
            ok = True
            for k, full in enumerate(full_masks):
                visible = (new_owner == k).astype(np.uint8)
                if visible.sum() < MIN_VISIBLE_FRACTION * full.sum() or _has_hole(visible):
                    ok = False
                    break
            if ok:
                labels.append(label)
                full_masks.append(mask)
                owner = new_owner
                _paint_shape(rng, img, mask, _shape_colour(rng, label, bg_mean))
                break

    img += rng.normal(0, 6, img.shape).astype(np.float32)  # sensor noise
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    image = np.clip(img, 0, 255).astype(np.uint8)
    instances = [dict(label=lab, mask=(owner == k).astype(np.uint8))
                 for k, lab in enumerate(labels)]
    other = other & (owner < 0).astype(np.uint8)
    return image, instances, other


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


# ------------------------------------------------------------------------------ COCO
def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a binary mask as COCO polygons ``[x1, y1, x2, y2, ...]``."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        c = c.reshape(-1, 2).astype(np.float64)
        if len(c) < 3:
            continue
        polygons.append([round(float(v), 2) for v in c.reshape(-1)])
    return polygons


def polygon_stats(polygons: List[List[float]], height: int, width: int):
    """``(area, [x, y, w, h])`` of polygons as pycocotools rasterises them."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    area = float(mask_utils.area(rle))
    bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    return area, bbox


def _coco_annotations(instances, image_id: int, next_id: int, height: int, width: int):
    anns = []
    for inst in instances:
        polygons = mask_to_polygons(inst['mask'])
        if not polygons:
            continue
        area, bbox = polygon_stats(polygons, height, width)
        if area < 1 or bbox[2] < 1 or bbox[3] < 1:
            continue
        anns.append(dict(id=next_id + len(anns), image_id=image_id,
                         category_id=inst['label'] + 1, segmentation=polygons, area=area,
                         bbox=bbox, iscrowd=0))
    return anns


def _coco_document(images, annotations) -> dict:
    return dict(
        info=dict(description='restv2_mm toy shapes (synthetic)', version='1.0', year=2024),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory='shape')
                    for i, name in enumerate(TOY_CLASSES)])


def _seg_map(instances, other: np.ndarray) -> np.ndarray:
    """ADE-style label map: 0 other (ignored), 1 background, 2.. the shapes."""
    seg = np.ones(other.shape, np.uint8)
    seg[other.astype(bool)] = 0
    for inst in instances:
        seg[inst['mask'].astype(bool)] = inst['label'] + 2
    return seg


# ------------------------------------------------------------------------------ writers
def make_toy_data(out_dir: str,
                  kind: str = 'both',
                  num_train: int = 200,
                  num_val: int = 50,
                  size: int = 128,
                  seed: int = 0) -> Dict[str, str]:
    """Write the toy dataset under ``out_dir``; returns the roots written.

    Args:
        out_dir: folder that receives ``coco/`` and/or ``ade/ADEChallengeData2016/``.
        kind: 'coco', 'ade' or 'both' (the same scenes in both layouts).
        num_train, num_val: images per split.
        size: image side in pixels (images are square).
        seed: the random seed; the files are a function of it and the other arguments.
    """
    if kind not in KINDS:
        raise ValueError(f'kind={kind!r} is not one of {KINDS}.')
    if size < 32:
        raise ValueError(f'size={size} is too small: ResTv2 needs images of at least 32 x 32 '
                         f'pixels; use --size 32 or more.')
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train={num_train} and num_val={num_val} must both be >= 1.')
    do_coco, do_ade = kind in ('coco', 'both'), kind in ('ade', 'both')
    coco_root = osp.join(out_dir, 'coco')
    ade_root = osp.join(out_dir, 'ade', 'ADEChallengeData2016')
    roots = {}
    if do_coco:
        os.makedirs(osp.join(coco_root, 'annotations'), exist_ok=True)
        roots['coco'] = coco_root
    if do_ade:
        roots['ade'] = ade_root

    for split, num in (('train', num_train), ('val', num_val)):
        images, annotations = [], []
        if do_coco:
            os.makedirs(osp.join(coco_root, COCO_SPLITS[split]), exist_ok=True)
        if do_ade:
            ade_split, ade_prefix = ADE_SPLITS[split]
            for sub in ('images', 'annotations'):
                os.makedirs(osp.join(ade_root, sub, ade_split), exist_ok=True)
        for index in range(num):
            image, instances, other = make_scene(_image_rng(seed, split, index), size)
            image_id = index + 1
            if do_coco:
                file_name = f'{image_id:012d}.jpg'
                cv2.imwrite(osp.join(coco_root, COCO_SPLITS[split], file_name), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                images.append(dict(id=image_id, file_name=file_name, height=size,
                                   width=size))
                annotations += _coco_annotations(instances, image_id, len(annotations) + 1,
                                                 size, size)
            if do_ade:
                name = f'{ade_prefix}_{image_id:08d}'
                cv2.imwrite(osp.join(ade_root, 'images', ade_split, name + '.jpg'), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                cv2.imwrite(osp.join(ade_root, 'annotations', ade_split, name + '.png'),
                            _seg_map(instances, other))
        if do_coco:
            ann_file = osp.join(coco_root, 'annotations', f'instances_{COCO_SPLITS[split]}.json')
            with open(ann_file, 'w') as f:
                json.dump(_coco_document(images, annotations), f)
    return roots
