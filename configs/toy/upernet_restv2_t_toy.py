# ResTv2-T UperNet on the synthetic shapes in ADE20K layout (tools/make_toy_data.py), trained
# from scratch on a CPU in a few minutes: the ResTv2-T backbone and UperNet + auxiliary FCN
# head of upernet_restv2_t_ade20k.py with 6 classes (background + 5 shapes; label 0 of the
# PNGs is ignored, as ADE20K's) and narrower heads (128 and 64 channels instead of 512 and
# 256), 128 x 128 crops and a short schedule. Evaluated with mIoU (IoUMetric).
#
#   python tools/make_toy_data.py data/toy --kind ade
#   python tools/train.py configs/toy/upernet_restv2_t_toy.py
_base_ = '../upernet_restv2_t_ade20k.py'

classes = ('background', 'circle', 'square', 'triangle', 'star', 'cross')
metainfo = dict(  # restv2_mm.toy_data.TOY_SEG_CLASSES / TOY_SEG_PALETTE
    classes=classes,
    palette=[(120, 120, 120), (220, 20, 60), (0, 130, 200), (60, 180, 75), (255, 200, 0),
             (145, 30, 180)])
data_root = 'data/toy/ade/ADEChallengeData2016'
crop_size = (128, 128)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(channels=128, num_classes=len(classes)),
    auxiliary_head=dict(channels=64, num_classes=len(classes)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(
        **dataset,
        data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

# From scratch on a CPU: a larger lr, a short warm-up and poly decay over a short schedule.
max_iters = 300
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=30, end=max_iters, by_epoch=False),
]
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=1))
randomness = dict(seed=0)  # the same numbers on every run of the demo
