# UperNet with a ResTv2-T backbone on ADE20K: 512 x 512 crops, 160k iterations, AdamW
# lr 6e-5, weight decay 0.01 (none on norms and biases), poly decay after 1500 linear warm-up
# iterations, 16 images a batch (2 per GPU on 8 GPUs). The auxiliary FCN head reads stage 3.
# The heads' SyncBN becomes plain BN when training in one process.
# Paper Table 5: 62.1M parameters (with the auxiliary head), 977 GFLOPs at 2048 x 512,
# 47.3 mIoU (multi-scale).
#
#   python tools/train.py configs/upernet_restv2_t_ade20k.py   # data/ade/ADEChallengeData2016
#   bash tools/dist_train.sh configs/upernet_restv2_t_ade20k.py 8
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['restv2_mm'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='ResTv2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        attn_style='global',
        # True replays the backbone's training passes as CUDA graphs (every crop has the same
        # size): on one H200, 0.86x the iteration time for 1.08x the memory (README, Speed)
        fast_training=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, in_index=2, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    # the same updates as mmengine's default constructor, in 2 parameter groups instead of
    # one per tensor (restv2_mm/engine/optimizers.py)
    constructor='MergedGroupsOptimWrapperConstructor',
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0.))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16 images a batch
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
