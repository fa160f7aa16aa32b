# ResTv2-T Mask R-CNN on the synthetic shapes (tools/make_toy_data.py), trained from scratch
# on a CPU in a few minutes: the ResTv2-T backbone and Mask R-CNN of maskrcnn_restv2_t_coco.py
# with 5-class heads made narrower (FPN and heads 128 channels instead of 256, box head
# 512-d instead of 1024), fewer proposals, 128 x 128 images and a short schedule. Evaluated
# with COCO's bbox and segm AP (CocoMetric) on the toy validation split.
#
#   python tools/make_toy_data.py data/toy --kind coco
#   python tools/train.py configs/toy/maskrcnn_restv2_t_toy.py
_base_ = '../maskrcnn_restv2_t_coco.py'

classes = ('circle', 'square', 'triangle', 'star', 'cross')  # restv2_mm.toy_data.TOY_CLASSES
metainfo = dict(
    classes=classes,
    palette=[(220, 20, 60), (0, 130, 200), (60, 180, 75), (255, 200, 0), (145, 30, 180)])
data_root = 'data/toy/coco/'
img_scale = (128, 128)

width = 128  # FPN and head channels (256 in the COCO config)
model = dict(
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    neck=dict(out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=512, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width,
                       num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100), rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val2017.json',
        data_prefix=dict(img='val2017/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# From scratch on a CPU: plain fp32, a larger lr, short warm-up, no lr scaling by batch.
max_epochs = 8
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=6e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[int(max_epochs * 0.75)], gamma=0.1),
]
auto_scale_lr = dict(enable=False)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=1, max_keep_ckpts=1))
log_processor = dict(window_size=10)
randomness = dict(seed=0)  # the same numbers on every run of the demo
