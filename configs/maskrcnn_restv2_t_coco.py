# Mask R-CNN + FPN with a ResTv2-T backbone on COCO 2017, 1x schedule (12 epochs, lr steps
# after epochs 8 and 11), fine-tuned as the authors did: AdamW lr 1e-4, weight decay 0.05
# (none on norms and biases), mixed precision, 16 images a batch (2 per GPU on 8 GPUs).
# Paper Table 4: 49.9M parameters (80-class heads), 253 GFLOPs at 1280 x 800.
#
#   python tools/train.py configs/maskrcnn_restv2_t_coco.py       # data in data/coco/
#   bash tools/dist_train.sh configs/maskrcnn_restv2_t_coco.py 8
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['restv2_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResTv2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        attn_style='global',
        # the backbone's training passes replayed as CUDA graphs, one pair per padded batch
        # size for the 8 sizes seen most often (README, Speed)
        fast_training=True,
        train_graph_cache_size=8,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    # the same updates as mmengine's default constructor, in 2 parameter groups instead of
    # one per tensor (restv2_mm/engine/optimizers.py)
    constructor='MergedGroupsOptimWrapperConstructor',
    type='AmpOptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999),
                   weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0.))

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images a batch
# The lr above is for 16 images a batch; other GPU counts scale it linearly.
auto_scale_lr = dict(enable=True, base_batch_size=16)
