# Mask R-CNN + FPN with ResTv2-T, COCO 3x: 36 epochs (lr steps after epochs 27 and 33) with
# multi-scale training, the short side drawn from 480-800 (long side at most 1333).
# Paper Table 4 (3x, multi-scale): 47.6 box AP, 43.2 mask AP.
_base_ = './maskrcnn_restv2_t_coco.py'

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=[(1333, 480), (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
# drawn scales give batches of many more padded sizes than the graph cache keeps: eager
model = dict(backbone=dict(fast_training=False))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1),
]
